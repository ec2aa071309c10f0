//! Quantized checkpoints: where a format plugs in, and a clear error until it does.
//!
//! A quantized format joins the loader by implementing [`QuantLoader`] (detect its tensors in a
//! block, then produce the canonical [`ExpertTensor`] parts for `w13` and `w2`) and adding itself
//! to [`quant_loaders`]. The unquantized path never goes through here.

use crate::checkpoint::hf_config::ModelSpec;
use crate::checkpoint::layout::{BlockLayout, ExpertLayout};
use crate::checkpoint::store::TensorStore;
use crate::error::{MoeError, Result};
use crate::quant::{ExpertTensor, QuantFormat};

/// Which canonical projection a loader is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    /// `w13 [E, 2I, H]`: gate rows then up rows.
    GateUp,
    /// `w2 [E, H, I]`.
    Down,
}

/// Loads one quantized on-disk format into [`ExpertTensor`] parts.
pub trait QuantLoader: Send + Sync {
    /// The format produced.
    fn format(&self) -> QuantFormat;

    /// Whether the block's experts are stored in this format.
    fn detect(&self, store: &TensorStore, spec: &ModelSpec, layout: &BlockLayout) -> bool;

    /// The projection as a `[experts, rows, cols]` tensor in canonical order (see `weights.rs`).
    fn load(
        &self,
        store: &TensorStore,
        spec: &ModelSpec,
        layout: &BlockLayout,
        projection: Projection,
        progress: &mut dyn FnMut(u64),
    ) -> Result<ExpertTensor>;

    /// Expert biases `[E, 2I]` (gate then up) and `[E, H]`, for formats whose checkpoints have
    /// them (GPT-OSS MXFP4); default none.
    fn load_biases(
        &self,
        store: &TensorStore,
        spec: &ModelSpec,
        layout: &BlockLayout,
    ) -> Result<(Option<crate::tensor::Tensor>, Option<crate::tensor::Tensor>)> {
        let _ = (store, spec, layout);
        Ok((None, None))
    }

    /// The shared expert dequantized to `dtype` when the checkpoint stores it quantized too;
    /// `None` (the default) lets the plain loader read it.
    fn load_shared(
        &self,
        store: &TensorStore,
        spec: &ModelSpec,
        layout: &BlockLayout,
        dtype: crate::tensor::DType,
    ) -> Result<Option<crate::weights::SharedWeights>> {
        let _ = (store, spec, layout, dtype);
        Ok(None)
    }
}

/// The registered quantized-format loaders (see `checkpoint/quantized.rs`).
pub fn quant_loaders() -> Vec<Box<dyn QuantLoader>> {
    crate::checkpoint::quantized::loaders()
}

/// Suffixes that give a quantized format away, with the format's name.
const MARKERS: [(&str, &str); 8] = [
    ("_scale_inv", "FP8 block-scaled (`weight_scale_inv`, DeepSeek-V3 style)"),
    ("_blocks", "MXFP4 (`_blocks` + `_scales`, GPT-OSS style)"),
    ("_scale_2", "NVFP4 (`weight_scale_2`, ModelOpt)"),
    ("_scale", "FP8 per-tensor or NVFP4 (`weight_scale`)"),
    ("_packed", "compressed-tensors packed int4 (`weight_packed`)"),
    ("qweight", "AWQ/GPTQ int4 (`qweight` + `scales` + `qzeros`)"),
    ("scales", "group-quantized int4 (`scales`)"),
    ("_zeros", "group-quantized int4 (`qzeros`)"),
];

/// Errors naming the tensor and format when the block's experts are quantized and no loader
/// handles them; `Ok(None)` when they are plain float tensors.
pub fn detect(store: &TensorStore, spec: &ModelSpec, layout: &BlockLayout) -> Result<Option<Box<dyn QuantLoader>>> {
    if let Some(l) = quant_loaders().into_iter().find(|l| l.detect(store, spec, layout)) {
        return Ok(Some(l));
    }
    // The first expert's tensors, with the `.weight` (or nothing) stripped, as name stems.
    let stems: Vec<String> = match &layout.experts {
        ExpertLayout::PerExpert { gate, .. } => {
            let g = ExpertLayout::expert_name(gate, 0);
            vec![g.trim_end_matches("weight").to_string(), g]
        }
        ExpertLayout::Fused { gate_up, .. } | ExpertLayout::Transposed { gate_up, .. } => vec![gate_up.clone()],
    };
    for stem in &stems {
        for (suffix, what) in MARKERS {
            if let Some(hit) = store.names().find(|n| n.starts_with(stem.as_str()) && n.ends_with(suffix)) {
                let file = store.meta(hit).map(|m| m.file.display().to_string()).unwrap_or_default();
                return Err(MoeError::checkpoint(
                    file,
                    hit,
                    format!(
                        "quantized checkpoint ({what}); quantized checkpoints cannot be loaded in this build yet: \
                         use a bf16/f16/f32 checkpoint"
                    ),
                ));
            }
        }
    }
    if let Some(m) = &spec.quant_method {
        return Err(MoeError::checkpoint(
            store.dir().join("config.json").display().to_string(),
            "-",
            format!(
                "quantization_config.quant_method = `{m}`: quantized checkpoints cannot be loaded in this build \
                 yet; use a bf16/f16/f32 checkpoint"
            ),
        ));
    }
    Ok(None)
}
