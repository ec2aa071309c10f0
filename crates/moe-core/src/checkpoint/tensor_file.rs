//! Small whole-file safetensors I/O for activations: `moe run --input/--output` and the golden
//! fixtures (`hidden_states`, `topk_ids`, `topk_weights`). Model weights go through
//! [`TensorStore`](super::TensorStore) instead, which reads only what a layer needs.

use std::borrow::Cow;
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::error::{MoeError, Result};
use crate::tensor::{HostData, Tensor};

fn err(path: &Path, tensor: &str, reason: impl Into<String>) -> MoeError {
    MoeError::checkpoint(path.display().to_string(), tensor, reason)
}

/// Every tensor of a safetensors file, in name order. f32/bf16/f16/i32 keep their dtype; i64
/// becomes i32 (expert ids); other dtypes are an error naming the tensor.
pub fn read_tensor_file(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|e| MoeError::Io { path: path.display().to_string(), source: e })?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| err(path, "-", format!("not a valid safetensors file: {e}")))?;
    let mut names = st.names();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let v = st.tensor(name).map_err(|e| err(path, name, e.to_string()))?;
        let b = v.data();
        let data = match v.dtype() {
            Dtype::F32 => {
                HostData::F32(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            Dtype::BF16 => HostData::BF16(b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])).collect()),
            Dtype::F16 => HostData::F16(b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect()),
            Dtype::I32 => {
                HostData::I32(b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            Dtype::I64 => HostData::I32(
                b.chunks_exact(8)
                    .map(|c| {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(c);
                        i64::from_le_bytes(a) as i32
                    })
                    .collect(),
            ),
            other => {
                return Err(err(path, name, format!("unsupported dtype {other:?} (use f32, bf16, f16, i32 or i64)")))
            }
        };
        out.push((name.to_string(), Tensor::from_host(v.shape().to_vec(), data)?));
    }
    Ok(out)
}

/// One tensor of [`read_tensor_file`]'s result by name, with an error listing what is there.
pub fn take_tensor(path: &Path, tensors: &[(String, Tensor)], name: &str) -> Result<Tensor> {
    tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone()).ok_or_else(|| {
        let have: Vec<_> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        err(path, name, format!("tensor not in the file (it has: {})", have.join(", ")))
    })
}

struct Bytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Bytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes host tensors (f32, bf16, f16, i32, u8) to a safetensors file.
pub fn write_tensor_file(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_host()?;
        let (dtype, data): (Dtype, Vec<u8>) = match t.host()? {
            HostData::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            HostData::BF16(v) => (Dtype::BF16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            HostData::F16(v) => (Dtype::F16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            HostData::I32(v) => (Dtype::I32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            HostData::U8(v) => (Dtype::U8, v.clone()),
        };
        views.push((name.to_string(), Bytes { dtype, shape: t.shape().to_vec(), data }));
    }
    let refs: Vec<(String, &Bytes)> = views.iter().map(|(n, b)| (n.clone(), b)).collect();
    safetensors::tensor::serialize_to_file(refs, None, path)
        .map_err(|e| err(path, "-", format!("cannot write safetensors file: {e}")))
}
