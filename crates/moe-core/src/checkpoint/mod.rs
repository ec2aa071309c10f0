//! Hugging Face checkpoints: one MoE block of a model directory (`config.json` plus safetensors,
//! single-file or sharded) loaded into the canonical [`MoeWeights`] with its [`MoeConfig`].
//!
//! - [`hf_config`]: `config.json` -> family, block hyper-parameters, which layers are MoE layers.
//! - [`store`]: safetensors headers, shards, dtype conversion (bf16/f16/f32 on disk).
//! - [`layout`]: tensor names per family and every expert layout -> canonical.
//! - [`quant`]: where quantized formats plug in ([`QuantLoader`](quant::QuantLoader)), and a clear
//!   error naming the tensor and format when none accepts a quantized checkpoint;
//!   [`quantized`]: the loaders.
//!
//! ```no_run
//! # fn main() -> moe_core::Result<()> {
//! use moe_core::checkpoint::Checkpoint;
//! let ckpt = Checkpoint::open("path/to/Qwen3-30B-A3B")?;
//! let layer = ckpt.load_layer(0, None, &mut |_done, _total| {})?;
//! println!("{:?} with {} experts", ckpt.spec().family, layer.config.num_experts);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use crate::config::MoeConfig;
use crate::error::{MoeError, Result};
use crate::quant::{ExpertTensor, QuantFormat};
use crate::tensor::{DType, HostData, Tensor};
use crate::weights::{ExpertWeights, MoeWeights, RouterWeights, SharedWeights};

pub mod hf_config;
pub mod layout;
pub mod quant;
pub mod quantized;
pub mod store;
pub mod tensor_file;

pub use hf_config::{Family, LayerRule, ModelSpec};
pub use layout::{BlockLayout, ExpertLayout};
pub use store::TensorStore;
pub use tensor_file::{read_tensor_file, take_tensor, write_tensor_file};

/// An opened model directory.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    spec: ModelSpec,
    store: TensorStore,
}

/// One loaded MoE block.
#[derive(Debug, Clone)]
pub struct LoadedLayer {
    /// Layer index.
    pub layer: usize,
    /// The block's config, with weight and activation dtype set to the loaded dtype.
    pub config: MoeConfig,
    /// The weights in canonical layout.
    pub weights: MoeWeights,
    /// Tensor names the weights came from.
    pub layout: BlockLayout,
}

impl Checkpoint {
    /// Opens `dir`: parses `config.json` and the safetensors headers (no tensor data is read).
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(MoeError::checkpoint(dir.display().to_string(), "-", "not a directory"));
        }
        let spec = ModelSpec::from_dir(&dir)?;
        let store = TensorStore::open(&dir)?;
        Ok(Checkpoint { dir, spec, store })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What `config.json` says.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The tensors.
    pub fn store(&self) -> &TensorStore {
        &self.store
    }

    /// The layers that are MoE layers.
    pub fn moe_layers(&self) -> Vec<usize> {
        self.spec.moe_layers()
    }

    /// The block config of `layer` in `dtype` (default: the checkpoint's dtype, else f32).
    pub fn moe_config(&self, layer: usize, dtype: Option<DType>) -> Result<MoeConfig> {
        self.spec.check_moe_layer(layer).map_err(|e| match e {
            MoeError::NotMoeLayer { layer, reason } => {
                MoeError::NotMoeLayer { layer, reason: format!("{reason}; the MoE layers are {:?}", self.moe_layers()) }
            }
            other => other,
        })?;
        let dt = dtype.or(self.spec.dtype).unwrap_or(DType::F32);
        let mut c = self.spec.block.clone();
        c.weight_dtype = dt;
        c.act_dtype = dt;
        Ok(c)
    }

    /// The tensor names of `layer`'s block.
    pub fn layout(&self, layer: usize) -> Result<BlockLayout> {
        self.spec.check_moe_layer(layer)?;
        layout::locate(&self.store, self.spec.family, layer)
    }

    /// Loads `layer`'s block with weights in `dtype` (default: the checkpoint's dtype).
    /// `progress(done, total)` is called in bytes read as experts arrive.
    pub fn load_layer(
        &self,
        layer: usize,
        dtype: Option<DType>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<LoadedLayer> {
        let mut config = self.moe_config(layer, dtype)?;
        let layout = self.layout(layer)?;
        let quant = quant::detect(&self.store, &self.spec, &layout)?;
        let mut loader = Loader { store: &self.store, cfg: &config, done: 0, total: 0, progress };
        loader.total = loader.total_bytes(&layout)?;
        let router = loader.router(&layout)?;
        let mut qshared = None;
        let experts = match quant {
            Some(q) => {
                let mut tick = |n: u64| loader_tick(&mut loader.done, loader.total, n, loader.progress);
                let w13 = q.load(&self.store, &self.spec, &layout, quant::Projection::GateUp, &mut tick)?;
                let w2 = q.load(&self.store, &self.spec, &layout, quant::Projection::Down, &mut tick)?;
                let (b13, b2) = q.load_biases(&self.store, &self.spec, &layout)?;
                qshared = q.load_shared(&self.store, &self.spec, &layout, config.weight_dtype)?;
                ExpertWeights { w13, w2, b13, b2 }
            }
            None => loader.experts(&layout.experts)?,
        };
        let shared = match qshared {
            Some(s) => Some(s),
            None => loader.shared(&layout)?,
        };
        (loader.progress)(loader.total, loader.total);
        config.quant = experts.w13.format;
        let weights = MoeWeights { router, experts, shared };
        weights.validate(&config)?;
        Ok(LoadedLayer { layer, config, weights, layout })
    }
}

fn loader_tick(done: &mut u64, total: u64, n: u64, progress: &mut dyn FnMut(u64, u64)) {
    *done = (*done + n).min(total);
    progress(*done, total);
}

/// Reads one block's tensors, converting layouts and reporting progress.
struct Loader<'a> {
    store: &'a TensorStore,
    cfg: &'a MoeConfig,
    done: u64,
    total: u64,
    progress: &'a mut dyn FnMut(u64, u64),
}

impl Loader<'_> {
    fn total_bytes(&self, l: &BlockLayout) -> Result<u64> {
        let mut names: Vec<String> = vec![l.router.clone()];
        match &l.experts {
            ExpertLayout::PerExpert { gate, up, down } => {
                for e in 0..self.cfg.num_experts {
                    names.extend([gate, up, down].map(|p| ExpertLayout::expert_name(p, e)));
                }
            }
            ExpertLayout::Fused { gate_up, down } | ExpertLayout::Transposed { gate_up, down, .. } => {
                names.extend([gate_up.clone(), down.clone()]);
            }
        }
        // Missing tensors are reported with their expected shape when they are read.
        Ok(names.iter().filter_map(|n| self.store.byte_len(n).ok()).sum::<usize>() as u64)
    }

    fn tick(&mut self, name: &str) {
        let n = self.store.byte_len(name).unwrap_or(0) as u64;
        loader_tick(&mut self.done, self.total, n, self.progress);
    }

    fn router(&mut self, l: &BlockLayout) -> Result<RouterWeights> {
        let (e, h) = (self.cfg.num_experts, self.cfg.hidden_size);
        let weight = self.store.read(&l.router, &[e, h], DType::F32)?;
        self.tick(&l.router);
        let vec_e = |name: &Option<String>| name.as_ref().map(|n| self.store.read(n, &[e], DType::F32)).transpose();
        Ok(RouterWeights { weight, bias: vec_e(&l.router_bias)?, correction_bias: vec_e(&l.correction_bias)? })
    }

    fn experts(&mut self, x: &ExpertLayout) -> Result<ExpertWeights> {
        let (e, h, i, dt) =
            (self.cfg.num_experts, self.cfg.hidden_size, self.cfg.intermediate_size, self.cfg.weight_dtype);
        let mut w13 = empty(dt, e * 2 * i * h);
        let mut w2 = empty(dt, e * h * i);
        let (mut b13, mut b2) = (None, None);
        match x {
            ExpertLayout::PerExpert { gate, up, down } => {
                for ex in 0..e {
                    for (pat, shape, is_w13) in [(gate, [i, h], true), (up, [i, h], true), (down, [h, i], false)] {
                        let name = ExpertLayout::expert_name(pat, ex);
                        if !self.store.contains(&name) {
                            return Err(missing_expert(self.store, &name, ex, e));
                        }
                        let t = self.store.read(&name, &shape, dt)?;
                        extend(if is_w13 { &mut w13 } else { &mut w2 }, t.host()?);
                        self.tick(&name);
                    }
                }
            }
            ExpertLayout::Fused { gate_up, down } => {
                self.stacked(gate_up, &[e, 2 * i, h], None, &mut w13)?;
                self.stacked(down, &[e, h, i], None, &mut w2)?;
            }
            ExpertLayout::Transposed { gate_up, down, interleaved, biases } => {
                let gu = layout::gate_up_permutation(h, i, *interleaved);
                self.stacked(gate_up, &[e, h, 2 * i], Some(&gu), &mut w13)?;
                self.stacked(down, &[e, i, h], Some(&layout::transpose_permutation(i, h)), &mut w2)?;
                if let Some((bgu, bd)) = biases {
                    let raw = self.store.read(bgu, &[e, 2 * i], DType::F32)?.to_f32_vec()?;
                    let perm = layout::bias_permutation(i, *interleaved);
                    let v: Vec<f32> = raw.chunks(2 * i).flat_map(|row| perm.iter().map(|&s| row[s])).collect();
                    b13 = Some(Tensor::from_f32(vec![e, 2 * i], v)?);
                    b2 = Some(self.store.read(bd, &[e, h], DType::F32)?);
                }
            }
        }
        let as_expert = |data: HostData, rows: usize, cols: usize| -> Result<ExpertTensor> {
            let t = Tensor::from_host(vec![e, rows, cols], data)?;
            Ok(ExpertTensor {
                format: QuantFormat::None,
                experts: e,
                rows,
                cols,
                parts: [("weight".to_string(), t)].into_iter().collect(),
            })
        };
        Ok(ExpertWeights { w13: as_expert(w13, 2 * i, h)?, w2: as_expert(w2, h, i)?, b13, b2 })
    }

    /// Reads a `[E, ...]` tensor expert by expert, optionally permuting each expert's elements.
    fn stacked(&mut self, name: &str, shape: &[usize], perm: Option<&[usize]>, dst: &mut HostData) -> Result<()> {
        if !self.store.contains(name) {
            return Err(MoeError::checkpoint(
                self.store.dir().display().to_string(),
                name,
                format!("missing tensor (expected shape {shape:?})"),
            ));
        }
        store::check_shape(&self.store.meta(name)?, name, shape)?;
        let per = shape[1..].iter().product::<usize>();
        let bytes_per = self.store.byte_len(name)? as u64 / shape[0].max(1) as u64;
        for ex in 0..shape[0] {
            let t = self.store.read_rows(name, ex, 1, self.cfg.weight_dtype)?;
            match perm {
                None => extend(dst, t.host()?),
                Some(p) => extend(dst, &permute(t.host()?, p, per)),
            }
            loader_tick(&mut self.done, self.total, bytes_per, self.progress);
        }
        Ok(())
    }

    fn shared(&mut self, l: &BlockLayout) -> Result<Option<SharedWeights>> {
        let (Some(names), Some(sc)) = (&l.shared, self.cfg.shared_expert) else { return Ok(None) };
        let (h, si, dt) = (self.cfg.hidden_size, sc.intermediate_size, self.cfg.weight_dtype);
        let mut w13 = empty(dt, 2 * si * h);
        extend(&mut w13, self.store.read(&names.gate, &[si, h], dt)?.host()?);
        extend(&mut w13, self.store.read(&names.up, &[si, h], dt)?.host()?);
        let w2 = self.store.read(&names.down, &[h, si], dt)?;
        let gate = match (&names.gate_weight, sc.gated) {
            (Some(g), true) => Some(Tensor::from_f32(vec![h], self.store.read(g, &[1, h], DType::F32)?.to_f32_vec()?)?),
            _ => None,
        };
        Ok(Some(SharedWeights { w13: Tensor::from_host(vec![2 * si, h], w13)?, w2, gate }))
    }
}

fn missing_expert(store: &TensorStore, name: &str, ex: usize, e: usize) -> MoeError {
    MoeError::checkpoint(
        store.dir().display().to_string(),
        name,
        format!("missing expert {ex} of {e} (config.json says {e} experts; incomplete or mismatched checkpoint?)"),
    )
}

fn empty(dt: DType, cap: usize) -> HostData {
    match dt {
        DType::BF16 => HostData::BF16(Vec::with_capacity(cap)),
        DType::F16 => HostData::F16(Vec::with_capacity(cap)),
        _ => HostData::F32(Vec::with_capacity(cap)),
    }
}

fn extend(dst: &mut HostData, src: &HostData) {
    match (dst, src) {
        (HostData::F32(d), HostData::F32(s)) => d.extend_from_slice(s),
        (HostData::BF16(d), HostData::BF16(s)) => d.extend_from_slice(s),
        (HostData::F16(d), HostData::F16(s)) => d.extend_from_slice(s),
        // The store converts every read to the loader's dtype, so the dtypes always agree.
        _ => {}
    }
}

fn permute(src: &HostData, perm: &[usize], n: usize) -> HostData {
    fn p<T: Copy>(v: &[T], perm: &[usize]) -> Vec<T> {
        perm.iter().map(|&i| v[i]).collect()
    }
    debug_assert_eq!(perm.len(), n);
    match src {
        HostData::F32(v) => HostData::F32(p(v, perm)),
        HostData::BF16(v) => HostData::BF16(p(v, perm)),
        HostData::F16(v) => HostData::F16(p(v, perm)),
        HostData::I32(v) => HostData::I32(p(v, perm)),
        HostData::U8(v) => HostData::U8(p(v, perm)),
    }
}
