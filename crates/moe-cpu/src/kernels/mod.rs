//! Micro-kernels: `C[m, 32] = A[m, k] * B_block[k, 32]` for `m <= mr` rows, one packed block
//! (see [`crate::pack`]) at a time, f32 accumulation. One file per instruction set; the engine sees
//! only the [`Family`] trait.
//!
//! Families:
//! - [`DotBf16`]: bf16 activations x bf16 pair-packed weights with `vdpbf16ps` (AVX-512 BF16),
//!   and AMX-BF16 tiles for row tiles of [`crate::tuning::amx_rows`] rows or more where the CPU
//!   has them.
//! - [`Widen`]: f32 activations x weights of any [`WidenElem`] (f32, bf16, f16) widened to f32 in
//!   registers, then FMA. A dequantize-on-the-fly format is one more `WidenElem` (its loader turns
//!   a panel row into 32 f32 lanes) and reuses the whole engine.

use std::fmt;
use std::marker::PhantomData;

use half::{bf16, f16};

use crate::isa::Isa;
use crate::pack::{WElem, NB};

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_bf16;
mod portable;

/// The most rows any kernel computes at once (AMX: two 16-row tiles).
pub const MR_MAX: usize = 32;

/// The most rows a register-file kernel (AVX-512, AVX2, portable) computes at once.
pub const MR_REG: usize = 8;

/// A tile of results: `MR_MAX` rows of one block's 32 columns.
pub type Tile = [[f32; NB]; MR_MAX];

/// An activation element as the kernels read it.
pub trait AElem: Copy + Default + Send + Sync + fmt::Debug + 'static {
    /// From f32 (round to nearest even).
    fn from_f32(x: f32) -> Self;
    /// To f32 (exact).
    fn to_f32(self) -> f32;
}

impl AElem for f32 {
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
}

impl AElem for bf16 {
    #[inline]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// A kernel family: activation and weight types and the tile kernel.
pub trait Family: Send + Sync + fmt::Debug {
    /// Activation element.
    type A: AElem;
    /// Weight element.
    type W: WElem;
    /// Whether weights are pair-packed.
    const PAIRS: bool;
    /// Rows per tile.
    fn mr(&self) -> usize;
    /// The instruction set.
    fn isa(&self) -> Isa;
    /// Whether the engine should hand every row tile a share of the next block to prefetch
    /// (`next` of [`Family::tile`] is then that share, spread over the tile's k steps), instead of
    /// the whole block to the first row tile: for kernels fast enough that one tile cannot
    /// absorb a whole block's prefetches.
    fn spreads_prefetch(&self) -> bool {
        false
    }
    /// `c[r][l] = sum_{kk < kp} a[r * lda + kk] * b[kk][l]` for `r < m`. `next`, (a share of) the
    /// block the caller reads after this one, may be prefetched meanwhile (a hint; kernels may
    /// ignore it).
    ///
    /// # Panics
    /// When `m` is 0 or above [`Family::mr`] or a slice is shorter than the shapes say (an internal
    /// bug: the engine sizes every buffer before it calls a kernel).
    #[allow(clippy::too_many_arguments)]
    fn tile(
        &self,
        a: &[Self::A],
        lda: usize,
        m: usize,
        b: &[Self::W],
        kp: usize,
        c: &mut Tile,
        next: Option<&[Self::W]>,
    );
}

#[inline]
fn check(m: usize, mr: usize, a_len: usize, lda: usize, b_len: usize, kp: usize) {
    assert!(m >= 1 && m <= mr && lda >= kp, "kernel tile of {m} rows (max {mr}), lda {lda} < k {kp}");
    assert!(a_len >= (m - 1) * lda + kp && b_len >= kp * NB, "kernel operands shorter than their shapes");
}

/// `vdpbf16ps` kernels (requires [`Isa::Avx512Bf16`]), with AMX-BF16 tiles where the CPU has
/// them.
#[derive(Debug, Clone, Copy)]
pub struct DotBf16 {
    amx: bool,
}

impl DotBf16 {
    /// The family, if this CPU has AVX-512 BF16; it uses AMX when [`amx_available`].
    pub fn new() -> Option<Self> {
        Isa::Avx512Bf16.available().then(|| DotBf16 { amx: amx_available() })
    }

    /// The family without AMX (to compare or test the two), if this CPU has AVX-512 BF16.
    pub fn without_amx() -> Option<Self> {
        Isa::Avx512Bf16.available().then_some(DotBf16 { amx: false })
    }

    /// Whether row tiles of [`crate::tuning::amx_rows`] or more run on AMX tiles.
    pub fn uses_amx(&self) -> bool {
        self.amx
    }
}

/// Whether this CPU has AMX-TILE and AMX-BF16 and the OS granted this process the tile state.
/// The first call asks Linux for it; call this early (before threads with small alternate signal
/// stacks exist, which make Linux refuse).
pub fn amx_available() -> bool {
    amx_status().is_ok()
}

/// `Ok` when AMX-BF16 tiles run here, else the reason (for reports).
pub fn amx_status() -> Result<(), &'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        amx::status()
    }
    #[cfg(not(target_arch = "x86_64"))]
    Err("AMX is an x86-64 extension")
}

impl Family for DotBf16 {
    type A = bf16;
    type W = bf16;
    const PAIRS: bool = true;

    fn mr(&self) -> usize {
        if self.amx {
            MR_MAX
        } else {
            MR_REG
        }
    }

    fn isa(&self) -> Isa {
        Isa::Avx512Bf16
    }

    fn spreads_prefetch(&self) -> bool {
        self.amx && crate::tuning::amx_rows() > 0
    }

    fn tile(&self, a: &[bf16], lda: usize, m: usize, b: &[bf16], kp: usize, c: &mut Tile, next: Option<&[bf16]>) {
        check(m, self.mr(), a.len(), lda, b.len(), kp);
        assert!(kp.is_multiple_of(2), "pair kernels need an even k");
        #[cfg(target_arch = "x86_64")]
        {
            let amx_rows = crate::tuning::amx_rows();
            if self.amx && amx_rows > 0 && m >= amx_rows {
                let pf = next.map_or((std::ptr::null(), 0), |n| (n.as_ptr(), n.len() * 2 / 64));
                // SAFETY: `amx` is set only when `amx::status()` is `Ok` (CPU support and the OS's
                // permission, checked at run time); `check` verified `m <= 32` rows of `kp`
                // elements at stride `lda` in `a`, a whole block in `b` and `m` rows in `c`.
                unsafe { amx::tile(a.as_ptr(), lda, m, b.as_ptr(), kp / 2, c, pf) };
                return;
            }
            // (a share of the next block when `spreads_prefetch`: the row kernels want it whole)
            let pf = next.filter(|n| n.len() >= kp * NB).map_or(std::ptr::null(), |n| n.as_ptr());
            for r0 in (0..m).step_by(MR_REG) {
                let mm = MR_REG.min(m - r0);
                let pf = if r0 == 0 { pf } else { std::ptr::null() };
                // SAFETY: `DotBf16` exists only when AVX-512F and AVX-512 BF16 were detected at
                // run time (`DotBf16::new`); `check` verified that rows `r0 .. r0 + mm` of `a`
                // hold `kp` elements at stride `lda`, that `b` holds a whole block and that `c`
                // has room for them.
                unsafe {
                    avx512_bf16::tile(a.as_ptr().add(r0 * lda), lda, mm, b.as_ptr(), kp / 2, c.as_mut_ptr().add(r0), pf)
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("DotBf16 is only constructed on x86-64 with AVX-512 BF16")
    }
}

/// Weight elements the widening kernels load.
pub trait WidenElem: WElem {
    /// The SIMD tile for `isa` (not `Portable`).
    ///
    /// # Safety
    /// `isa` must be available on this CPU; `a` must hold `m` rows of `k` f32 at stride `lda`,
    /// `b` a block of `k * 32` elements, `c` room for `m <= isa.mr()` rows.
    unsafe fn tile_simd(isa: Isa, a: *const f32, lda: usize, m: usize, b: *const Self, k: usize, c: *mut [f32; NB]);
}

macro_rules! widen_elem {
    ($t:ty, $f512:ident, $f256:ident) => {
        impl WidenElem for $t {
            unsafe fn tile_simd(
                isa: Isa,
                a: *const f32,
                lda: usize,
                m: usize,
                b: *const Self,
                k: usize,
                c: *mut [f32; NB],
            ) {
                #[cfg(target_arch = "x86_64")]
                match isa {
                    Isa::Avx512Bf16 | Isa::Avx512 => avx512::$f512(a, lda, m, b, k, c),
                    Isa::Avx2 => avx2::$f256(a, lda, m, b, k, c),
                    Isa::Portable => unreachable!("portable tiles do not go through tile_simd"),
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = (isa, a, lda, m, b, k, c);
                    unreachable!("no SIMD kernels on this architecture")
                }
            }
        }
    };
}

widen_elem!(f32, tile_f32, tile_f32);
widen_elem!(bf16, tile_bf16, tile_bf16);
widen_elem!(f16, tile_f16, tile_f16);

/// Widening kernels for weights of type `W`.
#[derive(Debug, Clone, Copy)]
pub struct Widen<W> {
    isa: Isa,
    _w: PhantomData<W>,
}

impl<W> Widen<W> {
    /// Kernels for `isa` (which must be available: see [`Isa::detect`]).
    pub fn new(isa: Isa) -> Self {
        Widen { isa: if isa.available() { isa } else { Isa::Portable }, _w: PhantomData }
    }
}

impl<W: WidenElem + fmt::Debug> Family for Widen<W> {
    type A = f32;
    type W = W;
    const PAIRS: bool = false;

    fn mr(&self) -> usize {
        self.isa.mr()
    }

    fn isa(&self) -> Isa {
        self.isa
    }

    fn tile(&self, a: &[f32], lda: usize, m: usize, b: &[W], kp: usize, c: &mut Tile, _next: Option<&[W]>) {
        check(m, self.mr(), a.len(), lda, b.len(), kp);
        match self.isa {
            Isa::Portable => portable::tile(a, lda, m, b, kp, c),
            // SAFETY: `Widen::new` keeps `isa` only if the CPU supports it (run-time detection);
            // `check` verified the operand lengths, row stride and `m <= mr` rows of `c`.
            isa => unsafe { W::tile_simd(isa, a.as_ptr(), lda, m, b.as_ptr(), kp, c.as_mut_ptr()) },
        }
    }
}

/// Lanes (experts) of one router block: `k x 16` weights, an expert per lane. Narrower than
/// [`NB`] so that a decode step's router splits over twice as many threads (the sum per expert
/// must stay sequential over the inputs, so experts are the only axis to split).
pub const ROUTER_LANES: usize = 16;

/// Results of [`tile_exact`]: row `r` of block `j` at `r * nblk + j`.
pub type RouterTile = [[f32; ROUTER_LANES]; 2 * MR_REG];

/// Blocks one [`tile_exact`] call takes for `m` rows: enough independent add chains (one per row
/// and block) that the add latency (4 cycles a step) does not bound a tile.
pub fn router_blocks_per_call(m: usize) -> usize {
    if m == 1 {
        4
    } else {
        2
    }
}

/// Router weight elements: stored as the checkpoint gives them (every one widens to f32 exactly,
/// so the products are those of the f32 reference while the bytes read shrink).
pub trait ExactElem: WElem {
    /// The AVX-512 tile.
    ///
    /// # Safety
    /// AVX-512F must be available; `a` holds `m <= 8` rows of `k` f32 at stride `lda`, `b.0`
    /// `b.1` blocks of `k * 16` elements at stride `b.2`, `c` room for `m * b.1` rows (at most 16).
    #[cfg(target_arch = "x86_64")]
    unsafe fn exact_avx512(
        a: *const f32,
        lda: usize,
        m: usize,
        b: (*const Self, usize, usize),
        k: usize,
        c: *mut [f32; ROUTER_LANES],
    );
}

macro_rules! exact_elem {
    ($t:ty, $f:ident) => {
        impl ExactElem for $t {
            #[cfg(target_arch = "x86_64")]
            unsafe fn exact_avx512(
                a: *const f32,
                lda: usize,
                m: usize,
                b: (*const Self, usize, usize),
                k: usize,
                c: *mut [f32; ROUTER_LANES],
            ) {
                avx512::$f(a, lda, m, b, k, c)
            }
        }
    };
}

exact_elem!(f32, exact_f32);
exact_elem!(bf16, exact_bf16);
exact_elem!(f16, exact_f16);

/// Router tile: `c[r * nblk + j][l] = sum_kk a[r, kk] * b_j[kk][l]` with one rounding per
/// multiply and per add, in `kk` order (bit-identical to the reference's scalar loop, which widens
/// the weights to f32), for `nblk` consecutive blocks of [`ROUTER_LANES`] lanes in `b` (at most
/// [`router_blocks_per_call`]`(m)`).
///
/// # Panics
/// If `m` or `nblk` is out of range or the operands are shorter than their shapes (a caller bug).
#[allow(clippy::too_many_arguments)]
pub fn tile_exact<W: ExactElem>(
    isa: Isa,
    a: &[f32],
    lda: usize,
    m: usize,
    b: &[W],
    nblk: usize,
    k: usize,
    c: &mut RouterTile,
) {
    let bstride = k * ROUTER_LANES;
    assert!((1..=MR_REG).contains(&m) && lda >= k, "router tile of {m} rows (max {MR_REG}), lda {lda} < k {k}");
    assert!((1..=router_blocks_per_call(m)).contains(&nblk), "router tile of {nblk} blocks for {m} rows");
    assert!(a.len() >= (m - 1) * lda + k && b.len() >= nblk * bstride, "router operands shorter than their shapes");
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512Bf16 | Isa::Avx512) && isa.available() {
        // SAFETY: AVX-512F was detected at run time (`isa.available()`); the asserts above
        // verified the operand lengths, the row stride and that `c` holds `m * nblk <= 16` rows.
        unsafe { W::exact_avx512(a.as_ptr(), lda, m, (b.as_ptr(), nblk, bstride), k, c.as_mut_ptr()) };
        return;
    }
    let _ = isa;
    for r in 0..m {
        for j in 0..nblk {
            let blk = &b[j * bstride..(j + 1) * bstride];
            let mut acc = [-0.0f32; ROUTER_LANES];
            for (kk, &av) in a[r * lda..r * lda + k].iter().enumerate() {
                for (acc, w) in acc.iter_mut().zip(&blk[kk * ROUTER_LANES..(kk + 1) * ROUTER_LANES]) {
                    *acc += w.to_f32() * av;
                }
            }
            c[r * nblk + j] = acc;
        }
    }
}

/// Wrapping sum of `words`, read with the widest loads the CPU has (a bandwidth probe).
pub fn sum_words(words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx512.available() {
        // SAFETY: AVX-512F was detected at run time; the pointer and length come from a slice.
        return unsafe { avx512::sum_u64(words.as_ptr(), words.len()) };
    }
    words.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // (row, lane) indices address several arrays at once
mod tests {
    use super::*;
    use crate::pack::{ColumnMap, PackedMats};

    fn naive(a: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for r in 0..m {
            for j in 0..n {
                c[r * n + j] = (0..k).map(|kk| a[r * k + kk] as f64 * w[j * k + kk] as f64).sum::<f64>() as f32;
            }
        }
        c
    }

    fn run<F: Family>(fam: &F, k: usize, tol: f32) {
        let n = 40;
        let w: Vec<f32> = (0..n * k).map(|i| (i * 7919 % 97) as f32 / 48.0 - 1.0).collect();
        let wq: Vec<F::W> = w.iter().map(|&x| F::W::from_f32(x)).collect();
        let wr: Vec<f32> = wq.iter().map(|x| x.to_f32()).collect();
        let mut p = PackedMats::<F::W>::new(1, n, k, ColumnMap::Plain, F::PAIRS);
        p.pack_one(0, &wq);
        for m in 1..=fam.mr() {
            let a32: Vec<f32> =
                (0..m * p.kp).map(|i| if i % p.kp < k { (i % 13) as f32 / 6.0 - 1.0 } else { 0.0 }).collect();
            let a: Vec<F::A> = a32.iter().map(|&x| F::A::from_f32(x)).collect();
            let ar: Vec<f32> = (0..m).flat_map(|r| a[r * p.kp..r * p.kp + k].iter().map(|x| x.to_f32())).collect();
            let want = naive(&ar, &wr, m, n, k);
            for b in 0..p.blocks {
                let mut c = [[f32::NAN; NB]; MR_MAX];
                fam.tile(&a, p.kp, m, p.block(0, b), p.kp, &mut c, None);
                for r in 0..m {
                    for l in 0..NB {
                        let j = b * NB + l;
                        let want = if j < n { want[r * n + j] } else { 0.0 };
                        let scale = 1.0 + want.abs();
                        assert!(
                            (c[r][l] - want).abs() <= tol * scale,
                            "{:?} m={m} r={r} j={j}: {} vs {want}",
                            fam.isa(),
                            c[r][l]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn word_sum_matches_a_fold() {
        let w: Vec<u64> = (0..1003u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
        assert_eq!(sum_words(&w), w.iter().fold(0u64, |a, &b| a.wrapping_add(b)));
    }

    #[test]
    fn exact_router_tile_is_bit_identical_to_a_sequential_sum() {
        fn check<W: ExactElem>(from: fn(f32) -> W) {
            let (n, k, rows) = (64, 333, 8);
            let w: Vec<W> = (0..n * k).map(|i| from(((i * 7919 % 997) as f32).sin())).collect();
            // the router block layout: blocks of 16 experts, input-major, an expert per lane
            let l = ROUTER_LANES;
            let blocks: Vec<W> = (0..n * k).map(|i| w[(i / (k * l) * l + i % l) * k + i / l % k]).collect();
            let a: Vec<f32> = (0..rows * k).map(|i| ((i * 31 % 101) as f32).cos()).collect();
            for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                for m in 1..=rows {
                    for nblk in 1..=router_blocks_per_call(m) {
                        let mut c = [[f32::NAN; ROUTER_LANES]; 2 * MR_REG];
                        tile_exact(isa, &a, k, m, &blocks, nblk, k, &mut c);
                        for r in 0..m {
                            for j in 0..nblk * l {
                                let want = w[j * k..(j + 1) * k]
                                    .iter()
                                    .zip(&a[r * k..(r + 1) * k])
                                    .fold(-0.0f32, |s, (x, y)| s + x.to_f32() * y);
                                let got = c[r * nblk + j / l][j % l];
                                assert_eq!(
                                    got.to_bits(),
                                    want.to_bits(),
                                    "{} {isa:?} m={m} nblk={nblk} r={r} j={j}",
                                    W::NAME
                                );
                            }
                        }
                    }
                }
            }
        }
        check::<f32>(|x| x);
        check::<bf16>(bf16::from_f32);
        check::<f16>(f16::from_f32);
    }

    #[test]
    fn huge_page_advice_keeps_packed_contents() {
        // 2048 x 1024 bf16 = 4 MiB: large enough for a 2 MiB-aligned interior to be advised.
        let (n, k) = (2048, 1024);
        let w: Vec<bf16> = (0..n * k).map(|i| bf16::from_f32((i % 251) as f32 / 125.0 - 1.0)).collect();
        let pack = |huge: bool| {
            crate::tuning::set_huge_pages(huge);
            let mut p = PackedMats::<bf16>::new(1, n, k, ColumnMap::Plain, true);
            p.pack_one(0, &w);
            p
        };
        let (plain, huge) = (pack(false), pack(true));
        crate::tuning::set_huge_pages(false);
        for b in 0..plain.blocks {
            assert_eq!(plain.block(0, b), huge.block(0, b), "block {b}");
        }
    }

    #[test]
    fn every_available_kernel_matches_naive() {
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            for k in [1, 2, 7, 64] {
                run(&Widen::<f32>::new(isa), k, 1e-5);
                run(&Widen::<bf16>::new(isa), k, 1e-5);
                run(&Widen::<f16>::new(isa), k, 1e-5);
            }
        }
        if let Some(d) = DotBf16::without_amx() {
            for k in [1, 2, 7, 64] {
                run(&d, k, 1e-4);
            }
            // The measurement switches of `tuning` change speed only: same checks with the GEMV
            // prefetch off and at another distance (past the end of the block included).
            let default = crate::tuning::gemv_prefetch();
            for pf in [0, 8] {
                crate::tuning::set_gemv_prefetch(pf);
                for k in [7, 64, 300] {
                    run(&d, k, 1e-4);
                }
            }
            crate::tuning::set_gemv_prefetch(default);
        }
    }

    #[test]
    fn amx_tiles_match_naive_where_the_cpu_has_them() {
        let Some(d) = DotBf16::new().filter(|d| d.uses_amx()) else {
            eprintln!("skipped: this CPU or OS offers no AMX-BF16 (DotBf16 runs vdpbf16ps only)");
            return;
        };
        assert_eq!(d.mr(), MR_MAX);
        // Row tiles of 1..=32 rows on AMX (16-row tiles, partial second tile) and on the
        // 8-row `vdpbf16ps` fallback; k below 32, a multiple of 32 and with a 32-deep remainder.
        let default = crate::tuning::amx_rows();
        for rows in [1, 8] {
            crate::tuning::set_amx_rows(rows);
            for k in [7, 64, 300] {
                run(&d, k, 1e-4);
            }
        }
        crate::tuning::set_amx_rows(default);
    }
}
