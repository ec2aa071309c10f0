//! Wire format of dispatched tokens, shared by the strategies: one fixed-size record per token
//! holding its activation row (plain or quantized payload), its scale row when the input is
//! quantized (post-quant dispatch), and its routing row (`k` slot ids and `k` weights).

use crate::backend::BackendInput;
use crate::error::{MoeError, Result};
use crate::routing::{Physical, TopK};
use crate::tensor::{DType, HostData, Tensor};

/// The record layout, derived from a rank's own (possibly empty) input so that every rank agrees.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RecordFormat {
    hidden_dtype: DType,
    hidden_row: Vec<usize>,
    scales: Option<(DType, Vec<usize>)>,
    k: usize,
    weights_on_input: bool,
}

fn row_elems(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl RecordFormat {
    pub(crate) fn of(input: &BackendInput, routing: &TopK<Physical>) -> Result<Self> {
        let hs = input.hidden.shape();
        if hs.is_empty() {
            return Err(MoeError::shape("dispatch", "hidden [T, ...]", format!("{hs:?}")));
        }
        let t = hs[0];
        if routing.num_tokens() != t {
            return Err(MoeError::shape(
                "dispatch",
                format!("routing for {t} tokens"),
                routing.num_tokens().to_string(),
            ));
        }
        let scales = match &input.scales {
            Some(s) => {
                if s.shape().first() != Some(&t) {
                    return Err(MoeError::shape("dispatch", format!("scales [{t}, ...]"), format!("{:?}", s.shape())));
                }
                Some((s.dtype(), s.shape()[1..].to_vec()))
            }
            None => None,
        };
        Ok(RecordFormat {
            hidden_dtype: input.hidden.dtype(),
            hidden_row: hs[1..].to_vec(),
            scales,
            k: routing.k(),
            weights_on_input: routing.weights_on_input(),
        })
    }

    fn hidden_bytes(&self) -> usize {
        row_elems(&self.hidden_row) * self.hidden_dtype.size_bytes()
    }

    fn scale_bytes(&self) -> usize {
        self.scales.as_ref().map_or(0, |(d, r)| row_elems(r) * d.size_bytes())
    }

    /// Bytes per token record.
    pub(crate) fn record_bytes(&self) -> usize {
        self.hidden_bytes() + self.scale_bytes() + 8 * self.k
    }

    /// Bytes of activations (payload + scales) per token, the part that counts as bandwidth.
    pub(crate) fn payload_bytes(&self) -> usize {
        self.hidden_bytes() + self.scale_bytes()
    }
}

/// Host views of one chunk's input as bytes, ready to be cut into records.
pub(crate) struct Encoder {
    hidden: Vec<u8>,
    scales: Option<Vec<u8>>,
    ids: Vec<u8>,
    weights: Vec<u8>,
    fmt: RecordFormat,
}

impl Encoder {
    pub(crate) fn new(input: &BackendInput, routing: &TopK<Physical>) -> Result<Self> {
        let fmt = RecordFormat::of(input, routing)?;
        let scales = match &input.scales {
            Some(s) => Some(tensor_bytes(s)?),
            None => None,
        };
        Ok(Encoder {
            hidden: tensor_bytes(&input.hidden)?,
            scales,
            ids: tensor_bytes(routing.ids())?,
            weights: tensor_bytes(routing.weights())?,
            fmt,
        })
    }

    pub(crate) fn format(&self) -> &RecordFormat {
        &self.fmt
    }

    /// Appends the record of token `t` to `out`.
    pub(crate) fn push(&self, t: usize, out: &mut Vec<u8>) {
        let hb = self.fmt.hidden_bytes();
        out.extend_from_slice(&self.hidden[t * hb..(t + 1) * hb]);
        if let Some(s) = &self.scales {
            let sb = self.fmt.scale_bytes();
            out.extend_from_slice(&s[t * sb..(t + 1) * sb]);
        }
        let kb = 4 * self.fmt.k;
        out.extend_from_slice(&self.ids[t * kb..(t + 1) * kb]);
        out.extend_from_slice(&self.weights[t * kb..(t + 1) * kb]);
    }

    /// Records of `tokens`, in order.
    pub(crate) fn records(&self, tokens: impl Iterator<Item = usize>) -> Vec<u8> {
        let mut out = Vec::new();
        for t in tokens {
            self.push(t, &mut out);
        }
        out
    }
}

/// Rebuilds input and routing from the records received from every rank, in rank order.
pub(crate) fn decode(fmt: &RecordFormat, parts: &[Vec<u8>]) -> Result<(BackendInput, TopK<Physical>)> {
    let rb = fmt.record_bytes();
    let total: usize = parts.iter().map(|p| p.len()).sum();
    if rb == 0 || !total.is_multiple_of(rb) {
        return Err(MoeError::shape("dispatch.decode", format!("a multiple of {rb} bytes"), total.to_string()));
    }
    let n = total / rb;
    let (hb, sb, kb) = (fmt.hidden_bytes(), fmt.scale_bytes(), 4 * fmt.k);
    let mut hidden = Vec::with_capacity(n * hb);
    let mut scales = Vec::with_capacity(n * sb);
    let mut ids = Vec::with_capacity(n * fmt.k);
    let mut weights = Vec::with_capacity(n * fmt.k);
    for part in parts {
        for rec in part.chunks_exact(rb) {
            hidden.extend_from_slice(&rec[..hb]);
            scales.extend_from_slice(&rec[hb..hb + sb]);
            let r = &rec[hb + sb..];
            ids.extend(r[..kb].chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            weights.extend(r[kb..2 * kb].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        }
    }
    let shape = |row: &[usize]| [&[n][..], row].concat();
    let hidden = Tensor::from_host(shape(&fmt.hidden_row), bytes_to_host(fmt.hidden_dtype, &hidden)?)?;
    let scales = match &fmt.scales {
        Some((d, row)) => Some(Tensor::from_host(shape(row), bytes_to_host(*d, &scales)?)?),
        None => None,
    };
    let routing = TopK::from_vecs(n, fmt.k, ids, weights, fmt.weights_on_input)?;
    Ok((BackendInput { hidden, scales }, routing))
}

/// Little-endian bytes of a tensor's elements (device tensors are copied to the host first).
pub(crate) fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let host = t.to_host()?;
    Ok(match host.host()? {
        HostData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        HostData::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        HostData::F16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        HostData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        HostData::U8(v) => v.clone(),
    })
}

/// Elements of `dtype` from little-endian bytes.
pub(crate) fn bytes_to_host(dtype: DType, b: &[u8]) -> Result<HostData> {
    let sz = dtype.size_bytes();
    if !b.len().is_multiple_of(sz) {
        return Err(MoeError::shape(
            "comm.decode",
            format!("a multiple of {sz} bytes for {dtype}"),
            b.len().to_string(),
        ));
    }
    let two = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]);
    let four = |c: &[u8]| [c[0], c[1], c[2], c[3]];
    Ok(match dtype {
        DType::F32 => HostData::F32(b.chunks_exact(4).map(|c| f32::from_le_bytes(four(c))).collect()),
        DType::I32 => HostData::I32(b.chunks_exact(4).map(|c| i32::from_le_bytes(four(c))).collect()),
        DType::BF16 => HostData::BF16(b.chunks_exact(2).map(|c| half::bf16::from_bits(two(c))).collect()),
        DType::F16 => HostData::F16(b.chunks_exact(2).map(|c| half::f16::from_bits(two(c))).collect()),
        DType::U8 => HostData::U8(b.to_vec()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_scales() {
        let hidden = Tensor::from_host(vec![3, 4], HostData::U8((0..12).collect())).unwrap();
        let scales = Tensor::from_f32(vec![3, 2], vec![0.5, 1.5, 2.5, 3.5, 4.5, 5.5]).unwrap();
        let input = BackendInput { hidden, scales: Some(scales) };
        let routing = TopK::<Physical>::from_vecs(3, 2, vec![0, 1, 2, 3, 4, 5], vec![0.1; 6], false).unwrap();
        let enc = Encoder::new(&input, &routing).unwrap();
        let parts = vec![enc.records([2usize].into_iter()), enc.records([0usize, 1].into_iter())];
        let (inp, r) = decode(enc.format(), &parts).unwrap();
        assert_eq!(inp.hidden.as_u8().unwrap(), &[8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(inp.scales.unwrap().as_f32().unwrap(), &[4.5, 5.5, 0.5, 1.5, 2.5, 3.5]);
        assert_eq!(r.ids_host().unwrap(), &[4, 5, 0, 1, 2, 3]);
    }

    /// Host data posing as device storage, as a device backend's tensors would arrive.
    #[derive(Debug)]
    struct FakeDevice(HostData);

    impl crate::tensor::DeviceStorage for FakeDevice {
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
        fn location(&self) -> String {
            "fake:0".into()
        }
        fn to_host(&self) -> Result<HostData> {
            Ok(self.0.clone())
        }
    }

    fn on_device(t: Tensor) -> Tensor {
        let host = t.host().unwrap().clone();
        Tensor::from_device(t.shape().to_vec(), t.dtype(), std::sync::Arc::new(FakeDevice(host)))
    }

    #[test]
    fn device_resident_inputs_and_routing_are_encoded() {
        let hidden = Tensor::from_f32_as(vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], DType::BF16).unwrap();
        let routing = TopK::<Physical>::new(
            on_device(Tensor::from_i32(vec![2, 1], vec![7, 3]).unwrap()),
            on_device(Tensor::from_f32(vec![2, 1], vec![0.25, 0.75]).unwrap()),
            false,
        )
        .unwrap();
        let input = BackendInput::plain(on_device(hidden.clone()));
        let enc = Encoder::new(&input, &routing).unwrap();
        let (inp, r) = decode(enc.format(), &[enc.records([1usize, 0].into_iter())]).unwrap();
        assert_eq!(inp.hidden.to_f32_vec().unwrap(), vec![4.0, 5.0, 6.0, 1.0, 2.0, 3.0]);
        assert_eq!(r.ids_host().unwrap(), &[3, 7]);
        assert_eq!(r.weights_host().unwrap(), &[0.75, 0.25]);
    }

    #[test]
    fn bf16_round_trips_bitwise() {
        let t = Tensor::from_f32_as(vec![2, 2], &[1.0, -2.5, 3.25, 1e-3], DType::BF16).unwrap();
        let back = Tensor::from_host(vec![2, 2], bytes_to_host(DType::BF16, &tensor_bytes(&t).unwrap()).unwrap());
        assert_eq!(back.unwrap().to_f32_vec().unwrap(), t.to_f32_vec().unwrap());
    }
}
