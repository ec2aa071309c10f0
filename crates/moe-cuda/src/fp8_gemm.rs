//! The Hopper FP8 grouped GEMM (`GemmTile::F8T128` / `F8T256` and their 2-CTA forms): e4m3 activations and weights with f32
//! block scales (DeepSeek-V3 FP8: weights per 128 x 128 block, activations per row per 128
//! channels), TMA-fed, warp-specialized, per-k-tile promotion into f32. The quantized-expert
//! store launches it for large token counts; the row tiles come from the backend's layouts.

use crate::device::{env_switch, CudaDevice};
use crate::error::{CudaError, CudaResult};
use crate::kernels::{Elem, F8TmaParams, GemmParams, GemmTile, KernelId, F8_PINGPONG};

/// One FP8 grouped GEMM launch. `params` carries the row-tile mapping (mode, tile map, counts),
/// `a` (e4m3 `[a_rows, k]`), `w` (e4m3 `[w_rows, k]`, experts stacked), `out`, `bias` and the
/// activation; `n` and `k` are set here.
#[derive(Debug, Clone, Copy)]
pub struct Fp8Gemm {
    /// gate_up (fused bias + activation, output in the activation dtype) or down.
    pub gate_up: bool,
    /// Tile mapping, pointers and epilogue parameters.
    pub params: GemmParams,
    /// Row tiles of 128 rows.
    pub tiles: usize,
    /// Output columns (gate_up: the intermediate size; its weights hold 2n rows per expert).
    pub n: usize,
    /// Reduction size in elements (= bytes).
    pub k: usize,
    /// Rows of `a` (bounds the TMA map and the scale reads).
    pub a_rows: usize,
    /// f32 `[ceil(k / 128), a_rows]`: the activation scale of each row per 128 channels.
    pub a_scales: u64,
    /// Stacked weight rows (`experts * n_total`).
    pub w_rows: usize,
    /// f32 `[experts][ceil(k / 128), n_total]`: the block scale of each weight row.
    pub w_scales: u64,
    /// down: write outputs in the activation dtype instead of f32.
    pub y16: bool,
}

/// Why the FP8 tile cannot run this problem on `arch`, if it cannot.
pub fn refuse(arch: &str, n: usize, k: usize, gate_up: bool) -> Option<String> {
    if arch != "sm_90a" {
        return Some(format!("the FP8 wgmma tile needs Hopper (sm_90a), not {arch}"));
    }
    if gate_up && !n.is_multiple_of(128) {
        return Some(format!("intermediate size {n} is not a multiple of 128 (the up rows must start a scale block)"));
    }
    if !k.is_multiple_of(16) {
        return Some(format!("reduction size {k} is not a multiple of 16 bytes (TMA row stride)"));
    }
    if !n.is_multiple_of(4) {
        return Some(format!("output width {n} is not a multiple of 4 (16-byte copies of the weight scales)"));
    }
    None
}

/// Whether consumers promote one k-tile while the next one's MMAs run (`MOE_CUDA_F8_PINGPONG=0`
/// turns it off). On by default: it is the form every GPU test of session 7 ran, and its one
/// measured round was within noise of the single partial sum (docs/perf/quant.md).
fn pingpong() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| env_switch("MOE_CUDA_F8_PINGPONG", true))
}

/// Whether neighbouring column blocks run as 2-CTA clusters sharing their A tile where the
/// column-block count is even (`MOE_CUDA_F8_CLUSTER=1`; off by default: measured slower).
fn cluster_pairs() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| env_switch("MOE_CUDA_F8_CLUSTER", false))
}

/// The FP8 tiles [`launch_tile`] runs.
pub const TILES: [GemmTile; 4] = [GemmTile::F8T128, GemmTile::F8T128X2, GemmTile::F8T256, GemmTile::F8T256X2];

/// `MOE_CUDA_F8_TILE`, read once: `0` keeps FP8-block experts on the mma.sync GEMM instead of
/// these tiles, `t128` picks the 128 x 128 tile instead of 128 x 256.
fn tile_switch() -> Option<&'static str> {
    static V: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    V.get_or_init(|| std::env::var("MOE_CUDA_F8_TILE").ok()).as_deref()
}

/// Whether FP8-block experts use these wgmma tiles where they can (`MOE_CUDA_F8_TILE=0`: no).
pub fn tiles_enabled() -> bool {
    tile_switch() != Some("0")
}

fn narrow_tile() -> bool {
    tile_switch().is_some_and(|v| v.trim() == "t128")
}

/// Output columns a block of `tile` covers (gate_up: half its weight rows are the up rows).
fn block_cols(tile: GemmTile, gate_up: bool) -> usize {
    if gate_up {
        tile.block_n() / 2
    } else {
        tile.block_n()
    }
}

/// Column blocks of `tile` over `g`'s output columns (a 2-CTA tile pairs them up).
fn column_blocks(tile: GemmTile, g: &Fp8Gemm) -> usize {
    g.n.div_ceil(block_cols(tile, g.gate_up))
}

/// Launches `g` on `dev`'s stream with the default tile; `counter` is a u32 device word the
/// tile scheduler uses (zeroed here, stream-ordered). The default is `f8t256`: 7-9% faster than
/// `f8t128` at deepseek-v3 T = 16384 and 1-2% at 4096 (H100, session 15, docs/perf/quant.md).
/// `MOE_CUDA_F8_TILE=t128` runs `f8t128`; `MOE_CUDA_F8_CLUSTER=1` runs the chosen tile's 2-CTA
/// form where the column blocks pair up.
pub fn launch(dev: &CudaDevice, elem: Elem, counter: u64, g: &Fp8Gemm) -> CudaResult<()> {
    let (single, pair) =
        if narrow_tile() { (GemmTile::F8T128, GemmTile::F8T128X2) } else { (GemmTile::F8T256, GemmTile::F8T256X2) };
    let tile = if cluster_pairs() && column_blocks(pair, g).is_multiple_of(2) { pair } else { single };
    launch_tile(dev, elem, counter, g, tile)
}

/// [`launch`] with an explicit tile (one of [`TILES`]).
pub fn launch_tile(dev: &CudaDevice, elem: Elem, counter: u64, g: &Fp8Gemm, tile: GemmTile) -> CudaResult<()> {
    if !tile.is_fp8() {
        return Err(CudaError::Kernel(format!("{tile:?} is not an FP8 tile (one of {TILES:?})")));
    }
    if let Some(why) = refuse(dev.arch(), g.n, g.k, g.gate_up) {
        return Err(CudaError::Kernel(why));
    }
    let mut p = g.params;
    p.n = g.n as i32;
    p.k = g.k as i32;
    let cols = block_cols(tile, g.gate_up);
    let num_n = column_blocks(tile, g);
    p.num_n = num_n as i32;
    let pairs = tile.cluster() > 1;
    if pairs && !num_n.is_multiple_of(2) {
        return Err(CudaError::Kernel(format!(
            "{tile:?} pairs neighbouring column blocks: {num_n} blocks of {cols} columns is odd"
        )));
    }
    let blocks = num_n * g.tiles;
    if blocks == 0 || g.a_rows == 0 {
        return Ok(());
    }
    if blocks > i32::MAX as usize {
        return Err(CudaError::Kernel(format!("{blocks} FP8 GEMM blocks exceed 2^31")));
    }
    // Each stage copies a whole tile's 128 activation scales and 16-byte runs of weight scales.
    if g.a_rows < g.tiles * tile.block_m() || !g.a_rows.is_multiple_of(4) {
        return Err(CudaError::Kernel(format!(
            "the FP8 tile needs a_rows (the scale stride) a multiple of 4 covering all {} tiles of {} rows; got {}",
            g.tiles,
            tile.block_m(),
            g.a_rows
        )));
    }
    if !g.a_scales.is_multiple_of(16) || !g.w_scales.is_multiple_of(16) {
        return Err(CudaError::Kernel("the FP8 tile needs 16-byte aligned scale arrays".into()));
    }
    dev.memset_ptr(counter, 4)?;
    let fp = F8TmaParams {
        // Clusters: each CTA loads (and multicasts) half of the A rows.
        a: dev.tensor_map_2d(p.a, g.a_rows, g.k, 1, (tile.block_m() / if pairs { 2 } else { 1 }) as u32, 128)?,
        b: dev.tensor_map_2d(p.w, g.w_rows, g.k, 1, cols as u32, 128)?,
        p,
        num_m: g.tiles as i32,
        y16: g.y16 as i32,
        tile_counter: counter,
        a_scales: g.a_scales,
        w_scales: g.w_scales,
        a_rows: g.a_rows as i32,
        flags: if pingpong() { F8_PINGPONG } else { 0 },
    };
    let id = if g.gate_up { KernelId::GemmGateUp(elem, tile) } else { KernelId::GemmDown(elem, tile) };
    // The grid of a cluster launch is whole clusters, one a pair of SMs.
    let grid = if pairs { dev.persistent_cluster_grid(blocks, 2) } else { dev.persistent_grid(blocks) };
    dev.launch(id, (grid, 1, 1), tile.threads(), tile.smem_bytes(), &fp)
}

#[cfg(test)]
mod tests {
    use super::refuse;

    #[test]
    fn refusals_name_the_limit() {
        assert!(refuse("sm_90a", 2048, 7168, true).is_none());
        assert!(refuse("sm_90a", 7168, 2048, false).is_none());
        assert!(refuse("sm_89", 2048, 7168, true).unwrap().contains("sm_90a"));
        assert!(refuse("sm_90a", 192, 320, true).unwrap().contains("multiple of 128"));
        // down: the output width need not be a multiple of 128 (partial column tiles)
        assert!(refuse("sm_90a", 320, 192, false).is_none());
        assert!(refuse("sm_90a", 256, 100, false).unwrap().contains("16 bytes"));
        assert!(refuse("sm_90a", 322, 128, false).unwrap().contains("multiple of 4"));
    }
}
