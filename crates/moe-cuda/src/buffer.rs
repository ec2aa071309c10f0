//! Device tensors: [`CudaBuffer`] implements the core's [`DeviceStorage`], so tensors stay on the
//! GPU between stages (router logits -> route -> run_moe -> finalize) and `Tensor::to_host`
//! copies them back. A buffer may carry the forward's error flag: reading it back reports
//! non-finite router logits or out-of-range expert ids found by the kernels, without a host
//! synchronisation on the forward path itself.

use std::any::Any;
use std::sync::Arc;

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use moe_core::tensor::{DeviceStorage, HostData, Storage};
use moe_core::{DType, MoeError, Result, Tensor};

use crate::device::CudaDevice;
use crate::error::CudaError;

/// Typed device memory.
#[derive(Debug)]
pub enum Slice {
    /// f32 elements.
    F32(CudaSlice<f32>),
    /// bf16 / f16 bit patterns.
    U16(CudaSlice<u16>),
    /// i32 elements.
    I32(CudaSlice<i32>),
}

/// An error flag written by kernels: 0 = fine, t + 1 = token t had a non-finite router logit,
/// -(i + 1) = routing entry i named a slot out of range.
#[derive(Debug)]
pub struct ErrorFlag {
    pub(crate) slice: CudaSlice<i32>,
}

impl ErrorFlag {
    /// Reads the flag (waits for the stream) and turns a set flag into an error.
    pub fn check(&self, dev: &CudaDevice, k: usize) -> Result<()> {
        let v = dev.download(&self.slice, 1)?;
        match v.first().copied().unwrap_or(0) {
            0 => Ok(()),
            t if t > 0 => Err(MoeError::NonFinite {
                op: "cuda.route",
                detail: format!("router logits of token {} hold NaN or infinity", t - 1),
            }),
            i => {
                let i = (-i - 1) as usize;
                Err(MoeError::shape(
                    "cuda.run_moe",
                    "slot ids within the configured slots",
                    format!("an out-of-range id at token {} choice {}", i / k.max(1), i % k.max(1)),
                ))
            }
        }
    }
}

/// A tensor's elements on a CUDA device.
#[derive(Debug)]
pub struct CudaBuffer {
    pub(crate) dev: Arc<CudaDevice>,
    pub(crate) slice: Slice,
    pub(crate) len: usize,
    pub(crate) flag: Option<(Arc<ErrorFlag>, usize)>,
}

impl CudaBuffer {
    /// Wraps a slice of `len` elements.
    pub fn new(dev: Arc<CudaDevice>, slice: Slice, len: usize) -> Self {
        CudaBuffer { dev, slice, len, flag: None }
    }

    /// Attaches the forward's error flag (checked on read-back); `k` names entries in messages.
    pub fn with_flag(mut self, flag: Arc<ErrorFlag>, k: usize) -> Self {
        self.flag = Some((flag, k));
        self
    }

    /// Device address.
    pub fn ptr(&self) -> u64 {
        match &self.slice {
            Slice::F32(s) => self.dev.ptr(s),
            Slice::U16(s) => self.dev.ptr(s),
            Slice::I32(s) => self.dev.ptr(s),
        }
    }

    /// Wraps into a core tensor.
    pub fn into_tensor(self, shape: Vec<usize>, dtype: DType) -> Tensor {
        Tensor::from_device(shape, dtype, Arc::new(self))
    }

    /// The CUDA buffer behind a device tensor, if it is one of ours.
    pub fn of(t: &Tensor) -> Option<&CudaBuffer> {
        match t.storage() {
            Storage::Device(d) => d.as_any().downcast_ref::<CudaBuffer>(),
            Storage::Host(_) => None,
        }
    }

    /// The error flag carried, if any.
    pub fn flag(&self) -> Option<&(Arc<ErrorFlag>, usize)> {
        self.flag.as_ref()
    }
}

impl DeviceStorage for CudaBuffer {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn location(&self) -> String {
        format!("cuda:{}", self.dev.ordinal())
    }

    fn to_host(&self) -> Result<HostData> {
        if let Some((flag, k)) = &self.flag {
            flag.check(&self.dev, *k)?;
        }
        Ok(match &self.slice {
            Slice::F32(s) => HostData::F32(self.dev.download(s, self.len)?),
            Slice::I32(s) => HostData::I32(self.dev.download(s, self.len)?),
            Slice::U16(_) => {
                return Err(MoeError::Device(
                    "16-bit device buffers are read back through CudaBuffer::to_host_as (dtype needed)".into(),
                ))
            }
        })
    }
}

/// Copies a device tensor of 16-bit floats back. (`DeviceStorage::to_host` has no dtype, so 16-bit
/// buffers are wrapped in [`Half16`] which knows it.)
#[derive(Debug)]
pub struct Half16 {
    pub(crate) inner: CudaBuffer,
    pub(crate) dtype: DType,
}

impl Half16 {
    /// Wraps a 16-bit buffer of `dtype` (bf16 or f16) into a core tensor.
    pub fn tensor(inner: CudaBuffer, shape: Vec<usize>, dtype: DType) -> Tensor {
        Tensor::from_device(shape, dtype, Arc::new(Half16 { inner, dtype }))
    }

    /// The CUDA buffer behind a 16-bit device tensor.
    pub fn of(t: &Tensor) -> Option<&CudaBuffer> {
        match t.storage() {
            Storage::Device(d) => d.as_any().downcast_ref::<Half16>().map(|h| &h.inner),
            Storage::Host(_) => None,
        }
    }
}

impl DeviceStorage for Half16 {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    fn to_host(&self) -> Result<HostData> {
        if let Some((flag, k)) = &self.inner.flag {
            flag.check(&self.inner.dev, *k)?;
        }
        let Slice::U16(s) = &self.inner.slice else {
            return Err(CudaError::Kernel("a 16-bit tensor holds a non-16-bit buffer".into()).into());
        };
        let bits = self.inner.dev.download(s, self.inner.len)?;
        Ok(match self.dtype {
            DType::BF16 => HostData::BF16(bits.into_iter().map(bf16::from_bits).collect()),
            DType::F16 => HostData::F16(bits.into_iter().map(f16::from_bits).collect()),
            other => {
                return Err(MoeError::DType {
                    op: "cuda to_host",
                    expected: "bf16 or f16".into(),
                    got: other.to_string(),
                })
            }
        })
    }
}

/// Any of our device tensors' buffers (32-bit or 16-bit).
pub fn device_buffer(t: &Tensor) -> Option<&CudaBuffer> {
    CudaBuffer::of(t).or_else(|| Half16::of(t))
}
