//! Launch-shape choices, kept apart from the launches: masked vs contiguous layout and the GEMM
//! row tile. Every choice depends only on host-known sizes (tokens, k, local experts), never on
//! the routing itself, so a forward needs no host synchronisation and its launch shapes are
//! fixed for a given token count (CUDA-graph friendly).

use crate::kernels::GemmTile;

/// Default largest token count that uses the masked layout. Measured on the H100 with CUDA graphs
/// on for both layouts (docs/perf/cuda.md, "masked/contiguous switch point"): masked is faster at
/// T = 2..16 on all four standard shapes (up to 5%), contiguous at T = 24 on all four and at 32 on
/// three (up to 4%); beyond that they trade places within a few percent.
pub const DEFAULT_MASKED_MAX_TOKENS: usize = 16;

/// The switch point: `MOE_CUDA_MASKED_MAX_TOKENS` or the default.
pub fn masked_max_tokens() -> usize {
    std::env::var("MOE_CUDA_MASKED_MAX_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_MASKED_MAX_TOKENS)
}

/// Default smallest average rows per expert that use the TMA warp-specialized tile (`T256`) on
/// sm_90a instead of the cp.async `W256` tile. 0: T256 wherever a 128-row tile is chosen. With
/// its dynamic tile scheduler T256 won at every measured point on the H100, including the
/// weight-bound deepseek-v3 T = 4096 (128 rows per expert: 11.4 ms against 12.2-12.4 ms for
/// W256; docs/perf/cuda.md).
pub const DEFAULT_TMA_MIN_ROWS: usize = 0;

/// The T256 switch point: `MOE_CUDA_TMA_MIN_ROWS` or the default (0: always T256).
pub fn tma_min_rows() -> usize {
    std::env::var("MOE_CUDA_TMA_MIN_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_TMA_MIN_ROWS)
}

/// Whether a forward of `tokens` tokens runs the matrix-vector decode path (two launches
/// straight from the routing, no layout). Each (token, choice) pair reads its expert's weights
/// itself, so the path wins while few pairs share an expert: up to 2 tokens, or while the pairs
/// number at most a quarter of the experts. Measured on the H100 (docs/perf/cuda.md): decode
/// beat the masked layout at T = 1, 2 on all four standard shapes, at T <= 8 on qwen3-30b-a3b
/// and deepseek-v3, and lost at T = 4 on mixtral-8x7b (8 experts, 2 choices) and at T = 16 on
/// deepseek-v3.
pub fn decode_auto(tokens: usize, k: usize, experts: usize) -> bool {
    tokens <= 2 || tokens * k * 4 <= experts
}

/// `MOE_CUDA_DECODE_MAX_TOKENS`: a fixed largest token count for the decode path (0 turns it
/// off) instead of [`decode_auto`].
pub fn decode_max_tokens() -> Option<usize> {
    std::env::var("MOE_CUDA_DECODE_MAX_TOKENS").ok().and_then(|v| v.parse().ok())
}

/// Row layout of the expert inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// No layout: each (token, choice) pair runs as matrix-vector products (decode sizes).
    Decode,
    /// `[local_experts, max_m, H]`; expert `e` uses its first `counts[e]` rows.
    Masked {
        /// Rows reserved per expert (a multiple of the tile's BM, at least the token count).
        max_m: usize,
    },
    /// Rows sorted by expert, each expert's block padded to BM; a device-built tile map.
    Contiguous,
}

/// The launch plan of one `run_moe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Layout.
    pub layout: Layout,
    /// GEMM row tile.
    pub tile: GemmTile,
    /// Row tiles launched (grid y); tiles with no rows exit at once.
    pub tiles: usize,
    /// Rows of the permuted buffers.
    pub rows: usize,
}

/// The tile for groups of about `rows_per_group` rows.
pub fn tile_for(rows_per_group: usize) -> GemmTile {
    if rows_per_group <= 16 {
        GemmTile::M16
    } else if rows_per_group <= 64 {
        GemmTile::M64
    } else {
        GemmTile::M128
    }
}

/// Plans a forward of `tokens` tokens, `k` choices each, over `n_local` local experts.
pub fn plan(tokens: usize, k: usize, n_local: usize, masked_max: usize) -> Plan {
    let pairs = tokens * k;
    let n_local = n_local.max(1);
    if tokens <= masked_max {
        // An expert receives at most one row per token.
        let tile = tile_for(tokens);
        let bm = tile.block_m();
        let max_m = tokens.div_ceil(bm).max(1) * bm;
        return Plan { layout: Layout::Masked { max_m }, tile, tiles: n_local * max_m / bm, rows: n_local * max_m };
    }
    let tile = tile_for(pairs.div_ceil(n_local));
    let bm = tile.block_m();
    let tiles = aligned_tiles(pairs, n_local, bm, bm);
    Plan { layout: Layout::Contiguous, tile, tiles, rows: tiles * bm }
}

/// Row tiles of `bm` rows a contiguous layout needs when every expert's rows start on an
/// `align`-row boundary (a multiple of `bm`; `2 bm` for the paired T256X2 tile):
/// `sum_e (align / bm) ceil(c_e / align)`. At most min(pairs, n_local) experts get rows and each
/// pads by at most align - 1, so sum_e ceil(c_e / align) <= (pairs + active (align - 1)) / align.
/// This tight bound matters at small T: every launched tile of an empty expert still costs a
/// block launch in both GEMMs.
pub fn aligned_tiles(pairs: usize, n_local: usize, bm: usize, align: usize) -> usize {
    let active = pairs.min(n_local.max(1));
    align / bm * ((pairs + active * (align - 1)) / align).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_path_while_few_pairs_share_an_expert() {
        // Up to 2 tokens always; beyond that while T k <= E / 4 (the measured switch points).
        assert!(decode_auto(1, 2, 8) && decode_auto(2, 2, 8));
        assert!(!decode_auto(4, 2, 8)); // mixtral: decode lost at T = 4
        assert!(decode_auto(4, 8, 128) && !decode_auto(5, 8, 128)); // qwen3
        assert!(decode_auto(8, 8, 256) && !decode_auto(16, 8, 256)); // deepseek-v3: lost at 16
        assert!(decode_auto(2, 4, 32) && !decode_auto(3, 4, 32)); // gpt-oss
    }

    #[test]
    fn tiles_aligned_to_pairs_cover_every_split_of_the_rows() {
        // Worst case for a bound: the rows spread so that each active expert pads the most.
        for (pairs, n_local) in [(1usize, 8usize), (8, 8), (300, 8), (32768, 128), (131072, 256), (257, 1)] {
            let t = aligned_tiles(pairs, n_local, 128, 256);
            assert!(t.is_multiple_of(2), "{pairs} {n_local}: {t}");
            let active = pairs.min(n_local);
            // `active` experts, one with the remainder: every expert's 256-row padding counted.
            let per = pairs / active;
            let mut need = 0;
            for e in 0..active {
                let c = per + if e == 0 { pairs - per * active } else { 0 };
                need += 2 * c.div_ceil(256);
            }
            assert!(t >= need, "{pairs} {n_local}: {t} < {need}");
            // And every expert at 1 row but one: each pads to two tiles.
            let need1 = 2 * (active - 1) + 2 * (pairs - (active - 1)).div_ceil(256);
            assert!(t >= need1, "{pairs} {n_local}: {t} < {need1}");
        }
    }

    #[test]
    fn small_batches_are_masked_and_large_contiguous() {
        let p = plan(1, 8, 256, DEFAULT_MASKED_MAX_TOKENS);
        assert_eq!(p.layout, Layout::Masked { max_m: 16 });
        assert_eq!(p.tile, GemmTile::M16);
        assert_eq!(p.tiles, 256);
        let p = plan(4096, 8, 256, DEFAULT_MASKED_MAX_TOKENS);
        assert_eq!(p.layout, Layout::Contiguous);
        assert_eq!(p.tile, GemmTile::M128);
        assert!(p.rows >= 4096 * 8 + 256);
    }

    #[test]
    fn decode_sized_contiguous_launches_only_possible_tiles() {
        // T = 1, k = 8 over 128 experts: at most 8 experts have a row, so 8 tiles, not 8 + 128.
        let p = plan(1, 8, 128, 0);
        assert_eq!((p.tile, p.tiles), (GemmTile::M16, 8));
    }

    #[test]
    fn contiguous_bound_holds_for_any_split() {
        // Worst case for padding: every expert gets a count just past a tile boundary.
        for (t, k, e) in [(33, 2, 8), (100, 8, 128), (1000, 4, 32), (1, 8, 128), (3, 8, 256), (16, 4, 32)] {
            let p = plan(t, k, e, 0);
            let bm = p.tile.block_m();
            let mut counts = vec![(t * k) / e; e];
            counts[0] += t * k - counts.iter().sum::<usize>();
            let need: usize = counts.iter().map(|c| c.div_ceil(bm)).sum();
            assert!(need <= p.tiles, "{t} {k} {e}");
            // Fewer pairs than experts: one row in each of `pairs` experts, the most tiles.
            let ones: usize = (0..e).map(|i| usize::from(i < t * k)).map(|c| c.div_ceil(bm)).sum();
            assert!(ones <= p.tiles, "{t} {k} {e} (one row per expert)");
        }
    }
}
