//! Safetensors tensors of a model directory: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Headers are parsed up front (only the shards that hold a
//! requested tensor are opened); tensor bytes are read on demand, one expert slice at a time.
//!
//! Bytes are read with positioned reads rather than a memory map: `memmap2::Mmap::map` is
//! `unsafe` (the file may change under the map) and this crate forbids `unsafe`. Converting to
//! the requested dtype copies every element anyway, so a map would save no copy.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use half::{bf16, f16};
use safetensors::tensor::{Dtype, Metadata};

use crate::error::{MoeError, Result};
use crate::tensor::{DType, HostData, Tensor};

/// Header of one tensor: where it lives and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMeta {
    /// The safetensors file.
    pub file: PathBuf,
    /// Element type on disk.
    pub dtype: Dtype,
    /// Shape on disk.
    pub shape: Vec<usize>,
}

#[derive(Debug)]
struct Shard {
    path: PathBuf,
    file: Mutex<File>,
    /// Byte offset of the data section.
    data_start: u64,
    meta: Metadata,
}

/// The tensors of a model directory.
#[derive(Debug)]
pub struct TensorStore {
    dir: PathBuf,
    /// Tensor name -> shard file name.
    index: BTreeMap<String, String>,
    /// Opened shards by file name.
    shards: Mutex<HashMap<String, Arc<Shard>>>,
}

fn io_err(path: &Path, source: std::io::Error) -> MoeError {
    MoeError::Io { path: path.display().to_string(), source }
}

fn ckpt_err(path: &Path, tensor: &str, reason: impl Into<String>) -> MoeError {
    MoeError::checkpoint(path.display().to_string(), tensor, reason)
}

impl Shard {
    fn open(path: &Path) -> Result<Shard> {
        let mut file = File::open(path).map_err(|e| io_err(path, e))?;
        let len = file.metadata().map_err(|e| io_err(path, e))?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n).map_err(|_| {
            ckpt_err(path, "-", format!("truncated file: {len} bytes, too short for a safetensors header"))
        })?;
        let n = u64::from_le_bytes(n);
        if n > 100 << 20 || 8 + n > len {
            return Err(ckpt_err(
                path,
                "-",
                format!("truncated or corrupt file: header claims {n} bytes, file has {len} bytes"),
            ));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(|e| io_err(path, e))?;
        let meta: Metadata = serde_json::from_slice(&header)
            .map_err(|e| ckpt_err(path, "-", format!("invalid safetensors header: {e}")))?;
        let need = 8 + n + meta.data_len() as u64;
        if len < need {
            // Name the first tensor that does not fit, so the user knows how much is missing.
            let cut = meta
                .offset_keys()
                .into_iter()
                .find(|k| meta.info(k).is_some_and(|i| 8 + n + i.data_offsets.1 as u64 > len))
                .unwrap_or_else(|| "-".into());
            return Err(ckpt_err(
                path,
                &cut,
                format!("truncated file: the header describes {need} bytes, the file has {len} (re-download it)"),
            ));
        }
        Ok(Shard { path: path.to_path_buf(), file: Mutex::new(file), data_start: 8 + n, meta })
    }

    fn read_bytes(&self, name: &str, start: usize, len: usize) -> Result<Vec<u8>> {
        let info = self.meta.info(name).ok_or_else(|| ckpt_err(&self.path, name, "tensor is not in this file"))?;
        let (a, b) = info.data_offsets;
        if start + len > b - a {
            return Err(ckpt_err(&self.path, name, format!("read of {len} bytes at {start} past the tensor's end")));
        }
        let mut buf = vec![0u8; len];
        let mut f = self.file.lock().map_err(|_| ckpt_err(&self.path, name, "file handle poisoned by a panic"))?;
        f.seek(SeekFrom::Start(self.data_start + (a + start) as u64)).map_err(|e| io_err(&self.path, e))?;
        f.read_exact(&mut buf).map_err(|e| ckpt_err(&self.path, name, format!("read failed: {e}")))?;
        Ok(buf)
    }
}

impl TensorStore {
    /// Opens `dir`: `model.safetensors.index.json` if present, else `model.safetensors`, else the
    /// only `*.safetensors` file that is not an input/reference file.
    pub fn open(dir: &Path) -> Result<TensorStore> {
        let index_path = dir.join("model.safetensors.index.json");
        let store = TensorStore { dir: dir.to_path_buf(), index: BTreeMap::new(), shards: Mutex::new(HashMap::new()) };
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| io_err(&index_path, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ckpt_err(&index_path, "-", format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ckpt_err(&index_path, "-", "no `weight_map` object"))?;
            let mut index = BTreeMap::new();
            for (k, f) in map {
                let f = f.as_str().ok_or_else(|| ckpt_err(&index_path, k, "weight_map value is not a file name"))?;
                index.insert(k.clone(), f.to_string());
            }
            return Ok(TensorStore { index, ..store });
        }
        let single = dir.join("model.safetensors");
        let file = if single.exists() {
            single
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| io_err(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .filter(|p| !p.file_stem().is_some_and(|s| s == "input" || s == "reference"))
                .collect();
            found.sort();
            match found.len() {
                1 => found.remove(0),
                0 => return Err(ckpt_err(
                    dir,
                    "-",
                    "no model.safetensors or model.safetensors.index.json (is this a Hugging Face model directory?)",
                )),
                _ => {
                    return Err(ckpt_err(dir, "-", format!("several .safetensors files and no index.json: {found:?}")))
                }
            }
        };
        let shard = Shard::open(&file)?;
        let fname = file.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let index = shard.meta.offset_keys().into_iter().map(|k| (k, fname.clone())).collect();
        store.shards.lock().map_err(|_| ckpt_err(dir, "-", "store poisoned"))?.insert(fname, Arc::new(shard));
        Ok(TensorStore { index, ..store })
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    /// Whether the checkpoint has `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn shard_of(&self, name: &str) -> Result<Arc<Shard>> {
        let fname =
            self.index.get(name).ok_or_else(|| ckpt_err(&self.dir, name, "tensor not found in the checkpoint"))?;
        let mut shards = self.shards.lock().map_err(|_| ckpt_err(&self.dir, name, "store poisoned"))?;
        if let Some(s) = shards.get(fname) {
            return Ok(s.clone());
        }
        let path = self.dir.join(fname);
        if !path.exists() {
            return Err(ckpt_err(
                &path,
                name,
                "model.safetensors.index.json points to this shard, but the file does not exist (incomplete download?)",
            ));
        }
        let shard = Arc::new(Shard::open(&path)?);
        if shard.meta.info(name).is_none() {
            return Err(ckpt_err(
                &path,
                name,
                "the index maps this tensor to this shard, but the shard does not hold it",
            ));
        }
        shards.insert(fname.clone(), shard.clone());
        Ok(shard)
    }

    /// Header of `name`.
    pub fn meta(&self, name: &str) -> Result<TensorMeta> {
        let shard = self.shard_of(name)?;
        let info = shard.meta.info(name).ok_or_else(|| ckpt_err(&shard.path, name, "tensor not in this file"))?;
        Ok(TensorMeta { file: shard.path.clone(), dtype: info.dtype, shape: info.shape.clone() })
    }

    /// Bytes of `name` on disk (for progress accounting).
    pub fn byte_len(&self, name: &str) -> Result<usize> {
        let m = self.meta(name)?;
        Ok(m.shape.iter().product::<usize>() * m.dtype.bitsize() / 8)
    }

    /// Raw bytes of `name` (any dtype), e.g. for a quantized format's loader.
    pub fn read_raw(&self, name: &str) -> Result<(TensorMeta, Vec<u8>)> {
        let m = self.meta(name)?;
        let len = m.shape.iter().product::<usize>() * m.dtype.bitsize() / 8;
        let bytes = self.shard_of(name)?.read_bytes(name, 0, len)?;
        Ok((m, bytes))
    }

    /// Reads `name`, checks its shape is `expected` and converts it to `dtype` (f32, bf16, f16).
    pub fn read(&self, name: &str, expected: &[usize], dtype: DType) -> Result<Tensor> {
        let m = self.meta(name)?;
        check_shape(&m, name, expected)?;
        // After the shape check, the rows of the leading dimension are the whole tensor.
        self.read_rows(name, 0, m.shape.first().copied().unwrap_or(1), dtype)
    }

    /// Rows `[start, start + count)` of the leading dimension of `name`, converted to `dtype`.
    pub fn read_rows(&self, name: &str, start: usize, count: usize, dtype: DType) -> Result<Tensor> {
        let m = self.meta(name)?;
        let elem = float_elem_size(&m, name)?;
        let (lead, row): (usize, usize) = match m.shape.split_first() {
            Some((l, rest)) => (*l, rest.iter().product()),
            None => (1, 1),
        };
        if start + count > lead {
            return Err(ckpt_err(&m.file, name, format!("rows {start}..{} of {lead}", start + count)));
        }
        let bytes = self.shard_of(name)?.read_bytes(name, start * row * elem, count * row * elem)?;
        let data = convert(&bytes, m.dtype, dtype).map_err(|r| ckpt_err(&m.file, name, r))?;
        let mut shape = m.shape.clone();
        if shape.is_empty() {
            shape.push(1);
        }
        shape[0] = count;
        Tensor::from_host(shape, data)
    }
}

/// Errors with the file and tensor when the on-disk shape is not `expected`.
pub fn check_shape(m: &TensorMeta, name: &str, expected: &[usize]) -> Result<()> {
    if m.shape != expected {
        return Err(ckpt_err(
            &m.file,
            name,
            format!("wrong shape: expected {expected:?} from config.json, found {:?}", m.shape),
        ));
    }
    Ok(())
}

fn float_elem_size(m: &TensorMeta, name: &str) -> Result<usize> {
    match m.dtype {
        Dtype::F32 => Ok(4),
        Dtype::BF16 | Dtype::F16 => Ok(2),
        other => Err(ckpt_err(&m.file, name, format!("unsupported dtype {other:?}: {}", dtype_hint(other)))),
    }
}

/// What a non-float dtype on disk usually means.
pub fn dtype_hint(d: Dtype) -> &'static str {
    match d {
        Dtype::F8_E4M3 | Dtype::F8_E5M2 => {
            "an FP8-quantized checkpoint; quantized checkpoints are not loadable in this build yet (need bf16/f16/f32)"
        }
        Dtype::U8 | Dtype::I8 | Dtype::I32 | Dtype::F4 | Dtype::F8_E8M0 => {
            "packed quantized weights (MXFP4/NVFP4/AWQ/GPTQ); quantized checkpoints are not loadable in this build yet"
        }
        _ => "expected bf16, f16 or f32 weights",
    }
}

fn convert(bytes: &[u8], from: Dtype, to: DType) -> std::result::Result<HostData, String> {
    fn words<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        b.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
    }
    let f32s = || -> Vec<f32> {
        match from {
            Dtype::F32 => words::<4>(bytes).map(f32::from_le_bytes).collect(),
            Dtype::BF16 => words::<2>(bytes).map(|w| bf16::from_le_bytes(w).to_f32()).collect(),
            _ => words::<2>(bytes).map(|w| f16::from_le_bytes(w).to_f32()).collect(),
        }
    };
    Ok(match (from, to) {
        (Dtype::BF16, DType::BF16) => HostData::BF16(words::<2>(bytes).map(bf16::from_le_bytes).collect()),
        (Dtype::F16, DType::F16) => HostData::F16(words::<2>(bytes).map(f16::from_le_bytes).collect()),
        (_, DType::F32) => HostData::F32(f32s()),
        (_, DType::BF16) => HostData::BF16(f32s().into_iter().map(bf16::from_f32).collect()),
        (_, DType::F16) => HostData::F16(f32s().into_iter().map(f16::from_f32).collect()),
        (_, other) => return Err(format!("cannot convert weights to {other}; use f32, bf16 or f16")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_between_float_dtypes() {
        let v = [1.5f32, -2.25, 3.0e-3];
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let HostData::BF16(b) = convert(&bytes, Dtype::F32, DType::BF16).unwrap() else { panic!("bf16") };
        assert_eq!(b[0].to_f32(), 1.5);
        let bb: Vec<u8> = b.iter().flat_map(|x| x.to_le_bytes()).collect();
        let HostData::F32(f) = convert(&bb, Dtype::BF16, DType::F32).unwrap() else { panic!("f32") };
        assert_eq!(f[1], -2.25);
        assert!((f[2] - 3.0e-3).abs() < 2e-5);
        assert!(convert(&bytes, Dtype::F32, DType::I32).is_err());
    }
}
