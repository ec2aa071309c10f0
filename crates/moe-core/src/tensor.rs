//! A minimal tensor: a shape, a dtype and storage that lives on the host or on a device.
//!
//! Device storage is an opaque trait object so the core crate never names a CUDA type;
//! a device crate implements [`DeviceStorage`] and downcasts through [`DeviceStorage::as_any`].

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use half::{bf16, f16};

use crate::error::{MoeError, Result};

/// Element types the runtime stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE half precision.
    F16,
    /// 32-bit signed integer (expert ids).
    I32,
    /// Raw bytes: packed 4-bit values, E8M0/E4M3 scales, FP8 payloads.
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::U8 => 1,
        }
    }

    /// Whether this is a floating-point activation/weight dtype.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }

    /// Parses `f32`, `bf16`, `f16` (and the long spellings).
    pub fn parse_float(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
            other => Err(MoeError::config("dtype", format!("unknown dtype `{other}`; use f32, bf16 or f16"))),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::U8 => "u8",
        };
        f.write_str(s)
    }
}

/// Host-resident element data.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    /// f32 elements.
    F32(Vec<f32>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// f16 elements.
    F16(Vec<f16>),
    /// i32 elements.
    I32(Vec<i32>),
    /// Raw bytes.
    U8(Vec<u8>),
}

impl HostData {
    /// The dtype of these elements.
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::BF16(_) => DType::BF16,
            HostData::F16(_) => DType::F16,
            HostData::I32(_) => DType::I32,
            HostData::U8(_) => DType::U8,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::BF16(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::I32(v) => v.len(),
            HostData::U8(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Storage owned by a device crate (e.g. a CUDA buffer). The core only moves it around.
pub trait DeviceStorage: Send + Sync + fmt::Debug {
    /// For downcasting by the crate that created it.
    fn as_any(&self) -> &dyn Any;
    /// Human-readable location, e.g. `cuda:0`.
    fn location(&self) -> String;
    /// Copies the contents back to the host (blocking).
    fn to_host(&self) -> Result<HostData>;
}

/// Where a tensor's elements live.
#[derive(Debug, Clone)]
pub enum Storage {
    /// In host memory, shared by clones (cloning a tensor never copies its elements; writing
    /// through [`Tensor::host_mut`] copies them first if another clone still holds them).
    Host(Arc<HostData>),
    /// On a device; opaque to the core.
    Device(Arc<dyn DeviceStorage>),
}

/// A dense row-major tensor.
#[derive(Debug, Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

fn shape_str(shape: &[usize]) -> String {
    format!("{shape:?}")
}

impl Tensor {
    /// Wraps host data, checking that the element count matches the shape.
    pub fn from_host(shape: Vec<usize>, data: HostData) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(MoeError::shape(
                "Tensor::from_host",
                format!("{numel} elements for shape {}", shape_str(&shape)),
                format!("{} elements", data.len()),
            ));
        }
        Ok(Tensor { dtype: data.dtype(), shape, storage: Storage::Host(Arc::new(data)) })
    }

    /// Wraps device storage. The caller vouches that `dtype` and `shape` describe it.
    pub fn from_device(shape: Vec<usize>, dtype: DType, storage: Arc<dyn DeviceStorage>) -> Self {
        Tensor { shape, dtype, storage: Storage::Device(storage) }
    }

    /// An f32 host tensor.
    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        Self::from_host(shape, HostData::F32(data))
    }

    /// An i32 host tensor.
    pub fn from_i32(shape: Vec<usize>, data: Vec<i32>) -> Result<Self> {
        Self::from_host(shape, HostData::I32(data))
    }

    /// A host tensor of `dtype` built from f32 values (rounded to nearest even).
    pub fn from_f32_as(shape: Vec<usize>, data: &[f32], dtype: DType) -> Result<Self> {
        let host = match dtype {
            DType::F32 => HostData::F32(data.to_vec()),
            DType::BF16 => HostData::BF16(convert(data, bf16::from_f32)),
            DType::F16 => HostData::F16(convert(data, f16::from_f32)),
            other => {
                return Err(MoeError::DType {
                    op: "Tensor::from_f32_as",
                    expected: "f32, bf16 or f16".into(),
                    got: other.to_string(),
                })
            }
        };
        Self::from_host(shape, host)
    }

    /// A zero-filled host tensor.
    pub fn zeros(shape: Vec<usize>, dtype: DType) -> Self {
        let n: usize = shape.iter().product();
        let data = match dtype {
            DType::F32 => HostData::F32(vec![0.0; n]),
            DType::BF16 => HostData::BF16(vec![bf16::ZERO; n]),
            DType::F16 => HostData::F16(vec![f16::ZERO; n]),
            DType::I32 => HostData::I32(vec![0; n]),
            DType::U8 => HostData::U8(vec![0; n]),
        };
        Tensor { shape, dtype, storage: Storage::Host(Arc::new(data)) }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of dimension `d` (errors name the op when the rank is too small).
    pub fn dim(&self, d: usize) -> Result<usize> {
        self.shape
            .get(d)
            .copied()
            .ok_or_else(|| MoeError::shape("Tensor::dim", format!("at least {} dims", d + 1), shape_str(&self.shape)))
    }

    /// The storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Whether the elements are in host memory.
    pub fn is_host(&self) -> bool {
        matches!(self.storage, Storage::Host(_))
    }

    /// Host data, or an error if the tensor is on a device.
    pub fn host(&self) -> Result<&HostData> {
        match &self.storage {
            Storage::Host(h) => Ok(h),
            Storage::Device(d) => Err(MoeError::Device(format!(
                "tensor is on {}; copy it to the host first (Tensor::to_host)",
                d.location()
            ))),
        }
    }

    /// Mutable host data, or an error if the tensor is on a device. The shape and dtype stay
    /// fixed: callers may only overwrite elements.
    pub fn host_mut(&mut self) -> Result<&mut HostData> {
        match &mut self.storage {
            Storage::Host(h) => Ok(Arc::make_mut(h)),
            Storage::Device(d) => Err(MoeError::Device(format!(
                "tensor is on {}; it cannot be written in place from the host",
                d.location()
            ))),
        }
    }

    /// A host copy (no copy of data already on the host beyond the clone).
    pub fn to_host(&self) -> Result<Tensor> {
        match &self.storage {
            Storage::Host(_) => Ok(self.clone()),
            Storage::Device(d) => Tensor::from_host(self.shape.clone(), d.to_host()?),
        }
    }

    /// Checks the shape, naming `op` in the error.
    pub fn expect_shape(&self, op: &'static str, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(MoeError::shape(op, shape_str(expected), shape_str(&self.shape)));
        }
        Ok(())
    }

    /// Borrowed f32 slice (host, f32 only).
    pub fn as_f32(&self) -> Result<&[f32]> {
        match self.host()? {
            HostData::F32(v) => Ok(v),
            other => {
                Err(MoeError::DType { op: "Tensor::as_f32", expected: "f32".into(), got: other.dtype().to_string() })
            }
        }
    }

    /// Borrowed i32 slice (host, i32 only).
    pub fn as_i32(&self) -> Result<&[i32]> {
        match self.host()? {
            HostData::I32(v) => Ok(v),
            other => {
                Err(MoeError::DType { op: "Tensor::as_i32", expected: "i32".into(), got: other.dtype().to_string() })
            }
        }
    }

    /// Borrowed bytes (host, u8 only).
    pub fn as_u8(&self) -> Result<&[u8]> {
        match self.host()? {
            HostData::U8(v) => Ok(v),
            other => {
                Err(MoeError::DType { op: "Tensor::as_u8", expected: "u8".into(), got: other.dtype().to_string() })
            }
        }
    }

    /// The host elements, without a copy when no other clone shares them (device data is copied
    /// to the host).
    pub fn into_host_data(self) -> Result<HostData> {
        match self.storage {
            Storage::Host(h) => Ok(Arc::try_unwrap(h).unwrap_or_else(|shared| (*shared).clone())),
            Storage::Device(d) => d.to_host(),
        }
    }

    /// Converts float elements to an f32 vector (copies device data to the host first).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let owned;
        let host = match &self.storage {
            Storage::Host(h) => h,
            Storage::Device(d) => {
                owned = d.to_host()?;
                &owned
            }
        };
        Ok(match host {
            HostData::F32(v) => v.clone(),
            HostData::BF16(v) => convert(v, |x| x.to_f32()),
            HostData::F16(v) => convert(v, |x| x.to_f32()),
            HostData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            HostData::U8(_) => {
                return Err(MoeError::DType {
                    op: "Tensor::to_f32_vec",
                    expected: "a float or i32 dtype".into(),
                    got: "u8".into(),
                })
            }
        })
    }

    /// A host copy converted to another float dtype.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype && self.is_host() {
            return Ok(self.clone());
        }
        if let Storage::Host(h) = &self.storage {
            if let HostData::F32(v) = &**h {
                return Tensor::from_f32_as(self.shape.clone(), v, dtype);
            }
        }
        Tensor::from_f32_as(self.shape.clone(), &self.to_f32_vec()?, dtype)
    }

    /// Rows `[start, start + len)` of the leading dimension, copied (host only).
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Tensor> {
        let rows = self.dim(0)?;
        if start + len > rows {
            return Err(MoeError::shape(
                "Tensor::narrow_rows",
                format!("rows {start}..{} within {rows}", start + len),
                shape_str(&self.shape),
            ));
        }
        let row: usize = self.shape[1..].iter().product();
        let (a, b) = (start * row, (start + len) * row);
        let data = match self.host()? {
            HostData::F32(v) => HostData::F32(v[a..b].to_vec()),
            HostData::BF16(v) => HostData::BF16(v[a..b].to_vec()),
            HostData::F16(v) => HostData::F16(v[a..b].to_vec()),
            HostData::I32(v) => HostData::I32(v[a..b].to_vec()),
            HostData::U8(v) => HostData::U8(v[a..b].to_vec()),
        };
        let mut shape = self.shape.clone();
        shape[0] = len;
        Tensor::from_host(shape, data)
    }

    /// Concatenates host tensors along the leading dimension. All must share dtype and row shape.
    pub fn cat_rows(parts: &[Tensor], row_shape: &[usize], dtype: DType) -> Result<Tensor> {
        let mut rows = 0;
        let mut data = match dtype {
            DType::F32 => HostData::F32(Vec::new()),
            DType::BF16 => HostData::BF16(Vec::new()),
            DType::F16 => HostData::F16(Vec::new()),
            DType::I32 => HostData::I32(Vec::new()),
            DType::U8 => HostData::U8(Vec::new()),
        };
        for p in parts {
            if &p.shape[1..] != row_shape || p.dtype != dtype {
                return Err(MoeError::shape(
                    "Tensor::cat_rows",
                    format!("{dtype} rows of {}", shape_str(row_shape)),
                    format!("{} {}", p.dtype, shape_str(&p.shape)),
                ));
            }
            rows += p.shape[0];
            match (&mut data, p.host()?) {
                (HostData::F32(d), HostData::F32(s)) => d.extend_from_slice(s),
                (HostData::BF16(d), HostData::BF16(s)) => d.extend_from_slice(s),
                (HostData::F16(d), HostData::F16(s)) => d.extend_from_slice(s),
                (HostData::I32(d), HostData::I32(s)) => d.extend_from_slice(s),
                (HostData::U8(d), HostData::U8(s)) => d.extend_from_slice(s),
                // dtypes were checked equal above, so this arm is never taken
                _ => {}
            }
        }
        Tensor::from_host([&[rows][..], row_shape].concat(), data)
    }
}
/// `src` mapped element-wise by `f`, on rayon's pool from 64 Ki elements (a prefill-sized output
/// converted on one thread took ~4 ms of a 1024-token forward on a 16-core host).
fn convert<S: Copy + Sync, D: Send>(src: &[S], f: impl Fn(S) -> D + Sync + Send) -> Vec<D> {
    use rayon::prelude::*;
    if src.len() < 1 << 16 {
        src.iter().map(|&x| f(x)).collect()
    } else {
        src.par_iter().with_min_len(1 << 14).map(|&x| f(x)).collect()
    }
}
