//! The kernels' weight layout and the repacking from the canonical nn.Linear `(out, in)` order.
//!
//! A matrix of `n` outputs and `k` inputs is cut into blocks of [`NB`] = 32 output columns; a
//! block is contiguous, so a kernel streams one block front to back:
//! - widening kernels (f32 FMA): block = `[k][32]` elements;
//! - pair kernels (`vdpbf16ps`): block = `[k/2][32][2]`, the two inputs of a pair adjacent
//!   (k padded to even with zeros).
//!
//! Columns past `n` are zero. For the fused gate_up projection a block holds 16 gate columns
//! then the 16 up columns of the same intermediate indices, so one tile yields both halves of the
//! activation's inputs. A quantized format plugs in as another [`WElem`] (its panel loader widens
//! to f32 in registers), without touching the engine.

use half::{bf16, f16};
use moe_core::tensor::HostData;
use rayon::prelude::*;

/// Output columns per block (two 16-lane vectors).
pub const NB: usize = 32;

/// A weight element as stored in packed blocks.
pub trait WElem: Copy + Default + Send + Sync + 'static {
    /// Name for messages.
    const NAME: &'static str;
    /// To f32 (exact for every supported type).
    fn to_f32(self) -> f32;
    /// From f32 (rounded to nearest even).
    fn from_f32(x: f32) -> Self;
    /// The host data as a slice of this type, when it is stored as this type.
    fn host_slice(h: &HostData) -> Option<&[Self]>;
    /// `s` itself when this type is f32 (no widening copy needed).
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }
}

impl WElem for f32 {
    const NAME: &'static str = "f32";
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn host_slice(h: &HostData) -> Option<&[Self]> {
        match h {
            HostData::F32(v) => Some(v),
            _ => None,
        }
    }
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
}

impl WElem for bf16 {
    const NAME: &'static str = "bf16";
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn host_slice(h: &HostData) -> Option<&[Self]> {
        match h {
            HostData::BF16(v) => Some(v),
            _ => None,
        }
    }
}

impl WElem for f16 {
    const NAME: &'static str = "f16";
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn host_slice(h: &HostData) -> Option<&[Self]> {
        match h {
            HostData::F16(v) => Some(v),
            _ => None,
        }
    }
}

/// Which canonical row feeds lane `l` of block `b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnMap {
    /// Plain: column `32 b + l` is row `32 b + l` of an `[n, k]` matrix.
    Plain,
    /// Fused gate_up of a `[2 inter, k]` matrix: lanes 0..16 are gate rows `16 b + l`, lanes
    /// 16..32 the up rows `inter + 16 b + l - 16`.
    GateUp {
        /// Intermediate size.
        inter: usize,
    },
}

/// A stack of `mats` matrices in the block layout.
#[derive(Debug, Clone)]
pub struct PackedMats<W> {
    data: Vec<W>,
    /// Matrices (experts) held.
    pub mats: usize,
    /// Blocks per matrix.
    pub blocks: usize,
    /// Inputs per matrix (unpadded).
    pub k: usize,
    /// Padded inputs: the row stride of the activations the kernels read.
    pub kp: usize,
    /// Output rows of the canonical matrix.
    pub n: usize,
    /// Pair layout (`vdpbf16ps`) or plain.
    pub pairs: bool,
    map: ColumnMap,
}

impl<W: WElem> PackedMats<W> {
    /// Zeroed storage for `mats` matrices of `n` outputs (canonical rows) and `k` inputs.
    pub fn new(mats: usize, n: usize, k: usize, map: ColumnMap, pairs: bool) -> Self {
        let blocks = match map {
            ColumnMap::Plain => n.div_ceil(NB),
            ColumnMap::GateUp { inter } => inter.div_ceil(NB / 2),
        };
        let kp = if pairs { k.div_ceil(2) * 2 } else { k };
        // Reserve, advise, then touch: pages faulted in after the advice can come as huge pages.
        let len = mats * blocks * kp * NB;
        let mut data = Vec::with_capacity(len);
        crate::tuning::advise_huge_pages(data.as_ptr() as usize, len * std::mem::size_of::<W>());
        data.resize(len, W::default());
        PackedMats { data, mats, blocks, k, kp, n, pairs, map }
    }

    /// Elements per block.
    #[inline]
    pub fn block_len(&self) -> usize {
        self.kp * NB
    }

    /// Block `b` of matrix `m`.
    #[inline]
    pub fn block(&self, m: usize, b: usize) -> &[W] {
        let bl = self.block_len();
        let off = (m * self.blocks + b) * bl;
        &self.data[off..off + bl]
    }

    /// Bytes of storage.
    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<W>()
    }

    fn row_of(&self, b: usize, l: usize) -> Option<usize> {
        match self.map {
            ColumnMap::Plain => Some(b * NB + l).filter(|&r| r < self.n),
            ColumnMap::GateUp { inter } => {
                let (half, j) = (l / 16, b * 16 + l % 16);
                (j < inter).then_some(half * inter + j)
            }
        }
    }

    /// Packs one canonical `[n, k]` matrix (row-major) into slot `m`.
    pub fn pack_one(&mut self, m: usize, src: &[W]) {
        let per = self.blocks * self.block_len();
        let mut dst = std::mem::take(&mut self.data);
        self.pack_into(&mut dst[m * per..(m + 1) * per], src);
        self.data = dst;
    }

    /// Packs `mats` canonical matrices stored back to back, in parallel.
    pub fn pack_all(&mut self, src: &[W]) {
        let per = self.blocks * self.block_len();
        let (n, k) = (self.n, self.k);
        let mut dst = std::mem::take(&mut self.data);
        dst.par_chunks_mut(per.max(1))
            .enumerate()
            .for_each(|(m, d)| self.pack_into(d, &src[m * n * k..(m + 1) * n * k]));
        self.data = dst;
    }

    fn pack_into(&self, dst: &mut [W], src: &[W]) {
        let (k, kp, bl) = (self.k, self.kp, self.block_len());
        for b in 0..self.blocks {
            let blk = &mut dst[b * bl..(b + 1) * bl];
            for l in 0..NB {
                let Some(r) = self.row_of(b, l) else {
                    for kk in 0..kp {
                        blk[self.index(kk, l)] = W::default();
                    }
                    continue;
                };
                let row = &src[r * k..(r + 1) * k];
                for (kk, &v) in row.iter().enumerate() {
                    blk[self.index(kk, l)] = v;
                }
                for kk in k..kp {
                    blk[self.index(kk, l)] = W::default();
                }
            }
        }
    }

    #[inline]
    fn index(&self, kk: usize, l: usize) -> usize {
        if self.pairs {
            (kk / 2) * 2 * NB + l * 2 + kk % 2
        } else {
            kk * NB + l
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_place_every_element() {
        let (n, k) = (40, 5);
        let src: Vec<f32> = (0..n * k).map(|i| i as f32 + 1.0).collect();
        for pairs in [false, true] {
            let mut p = PackedMats::<f32>::new(1, n, k, ColumnMap::Plain, pairs);
            p.pack_one(0, &src);
            assert_eq!(p.blocks, 2);
            for r in 0..n {
                for kk in 0..k {
                    let (b, l) = (r / NB, r % NB);
                    assert_eq!(p.block(0, b)[p.index(kk, l)], src[r * k + kk]);
                }
            }
            // padding columns and padded k are zero
            assert_eq!(p.block(0, 1)[p.index(0, n % NB)], 0.0);
        }
        let inter = 20;
        let src: Vec<f32> = (0..2 * inter * k).map(|i| i as f32 + 1.0).collect();
        let mut p = PackedMats::<f32>::new(1, 2 * inter, k, ColumnMap::GateUp { inter }, false);
        p.pack_one(0, &src);
        assert_eq!(p.blocks, 2);
        // block 1 lane 3 is gate row 19; lane 19 is up row inter + 19; lane 4 is padding
        assert_eq!(p.block(0, 1)[p.index(2, 3)], src[19 * k + 2]);
        assert_eq!(p.block(0, 1)[p.index(2, 19)], src[(inter + 19) * k + 2]);
        assert_eq!(p.block(0, 1)[p.index(2, 4)], 0.0);
    }
}
