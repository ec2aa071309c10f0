//! AMX-BF16 tiles (Sapphire Rapids and later): `tdpbf16ps` multiplies a 16 x 32 bf16 tile of
//! activations by a 16-pair x 16-column tile of pair-packed weights into 16 x 16 f32, about 16x
//! the work of one `vdpbf16ps`. The pair-packed block layout (`[k/2][32][2]`) is already AMX's
//! B-tile layout: one k pair's 16 columns are 64 contiguous bytes, rows 128 bytes apart, so the
//! two halves of a block load with a stride and nothing is repacked.
//!
//! Eight tile registers: two C row tiles x two column halves (tmm0..3), two A row tiles (tmm4,
//! tmm5), two B halves (tmm6, tmm7): 32 rows x 32 columns per 32-deep k step. The k remainder
//! below 32 (k is padded to even only) runs on the AVX-512 BF16 kernel and is added.
//!
//! Linux keeps AMX state off until a process asks for it (`arch_prctl(ARCH_REQ_XCOMP_PERM)`);
//! [`status`] asks once and reports AMX only if the CPU has it and the kernel granted it.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use half::bf16;

use super::{avx512_bf16, Tile, MR_REG};
use crate::pack::NB;

/// Rows per AMX row tile.
const TM: usize = 16;
/// bf16 inputs per A tile row (64 bytes).
const TK: usize = 32;

/// `Ok` when AMX-BF16 tiles can run here; otherwise why not. Decided once per process: the
/// first call asks Linux for the tile state.
pub(crate) fn status() -> Result<(), &'static str> {
    static STATUS: OnceLock<Result<(), String>> = OnceLock::new();
    STATUS
        .get_or_init(|| {
            if !cpu_has_amx_bf16() {
                return Err("this CPU has no AMX-BF16".into());
            }
            request_tile_permission()
        })
        .as_ref()
        .map(|_| ())
        .map_err(|e| e.as_str())
}

fn cpu_has_amx_bf16() -> bool {
    const AMX_BF16: u32 = 1 << 22;
    const AMX_TILE: u32 = 1 << 24;
    // leaf 7 only where the CPU reports it
    let edx7 = if __cpuid(0).eax >= 7 { __cpuid_count(7, 0).edx } else { 0 };
    edx7 & AMX_BF16 != 0
        && edx7 & AMX_TILE != 0
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

#[cfg(target_os = "linux")]
fn request_tile_permission() -> Result<(), String> {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM only asks the kernel to enlarge this process's
    // signal and context-switch state for the tile registers; it touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    Err(match err.raw_os_error() {
        // Linux checks every thread's alternate signal stack against the larger signal frame.
        Some(libc::ENOSPC) => format!(
            "Linux refused the AMX tile state ({err}): a thread of this process has an alternate signal \
             stack too small for it; ask for AMX before starting such threads (moe_cpu::kernels::amx_available)"
        ),
        _ => format!("Linux refused the AMX tile state: arch_prctl(ARCH_REQ_XCOMP_PERM): {err}"),
    })
}

#[cfg(not(target_os = "linux"))]
fn request_tile_permission() -> Result<(), String> {
    Err("AMX tiles are only enabled on Linux".into())
}

/// The 64-byte tile configuration (`ldtilecfg`): palette 1, bytes per row and rows per tile.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    _reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// C, A and B tiles for row tiles of `m0` and `m1` rows (`m1` may be 0: tiles 1 and 3 and
    /// A tile 5 are then left unconfigured and must not be used).
    fn new(m0: usize, m1: usize) -> Self {
        let mut cfg = TileConfig { palette: 1, start_row: 0, _reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        let rows = [m0, m0, m1, m1, m0, m1, TK / 2, TK / 2];
        for (t, &r) in rows.iter().enumerate() {
            if r > 0 {
                cfg.rows[t] = r as u8;
                cfg.colsb[t] = 64;
            }
        }
        cfg
    }
}

/// `c[r][l] = sum_{kk < 2 * ksteps} a[r * lda + kk] * b_pairs[kk][l]` for `r < m` (1..=32); rows
/// at or past `m` of `c` are left alone. `pf` (start, 64-byte lines) is prefetched into L2
/// meanwhile, spread evenly over the k steps.
///
/// # Safety
/// [`status`] must have returned `Ok`; `a` holds `m` rows of `2 * ksteps` bf16 at stride
/// `lda`, `b` a pair-packed block of `ksteps * 64` bf16, `c` room for `m` rows. (Prefetches never
/// fault, so `pf` needs no such guarantee.)
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn tile(
    a: *const bf16,
    lda: usize,
    m: usize,
    b: *const bf16,
    ksteps: usize,
    c: &mut Tile,
    (pf, pf_lines): (*const bf16, usize),
) {
    let kmain = 2 * ksteps / TK * TK;
    let (m0, m1) = (m.min(TM), m.saturating_sub(TM));
    if kmain > 0 {
        let cfg = TileConfig::new(m0, m1);
        let (sa, sb, sc) = (2 * lda, 4 * NB, 4 * NB);
        // SAFETY (all asm below): the tile registers are used by no compiler-generated code, so
        // their state persists from one block to the next; every load reads `rows` rows of 64
        // bytes inside `a` (rows < m, inputs < kmain) or `b` (pairs < kmain / 2), and every store
        // writes rows < m of `c`, as the caller guarantees.
        asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly));
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
        if m1 > 0 {
            asm!("tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        }
        let per_step = pf_lines.div_ceil(kmain / TK);
        for (step, k0) in (0..kmain).step_by(TK).enumerate() {
            let bp = b.add(k0 * NB);
            // a few lines of the next block a step, into L2: a burst of them would stall the
            // loads the tiles wait on
            let p = (pf as *const i8).wrapping_add(64 * step * per_step);
            for l in 0..per_step.min(pf_lines.saturating_sub(step * per_step)) {
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(64 * l));
            }
            let ap = a.add(k0);
            // both B halves and the first row tile, then (tiles persist between blocks) the
            // second row tile against the same B halves
            asm!(
                "tileloadd tmm6, [{b} + {sb}*1]",
                "tileloadd tmm7, [{b2} + {sb}*1]",
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                b = in(reg) bp,
                b2 = in(reg) bp.add(16 * 2), // columns 16..32
                sb = in(reg) sb,
                a = in(reg) ap,
                sa = in(reg) sa,
                options(nostack, readonly),
            );
            if m1 > 0 {
                asm!(
                    "tileloadd tmm5, [{a} + {sa}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a = in(reg) ap.add(TM * lda),
                    sa = in(reg) sa,
                    options(nostack, readonly),
                );
            }
        }
        let cp = c.as_mut_ptr() as *mut f32;
        asm!(
            "tilestored [{c} + {s}*1], tmm0",
            "tilestored [{c2} + {s}*1], tmm1",
            c = in(reg) cp,
            c2 = in(reg) cp.add(16),
            s = in(reg) sc,
            options(nostack),
        );
        if m1 > 0 {
            let cp = cp.add(TM * NB);
            asm!(
                "tilestored [{c} + {s}*1], tmm2",
                "tilestored [{c2} + {s}*1], tmm3",
                c = in(reg) cp,
                c2 = in(reg) cp.add(16),
                s = in(reg) sc,
                options(nostack),
            );
        }
    } else {
        for row in c.iter_mut().take(m) {
            *row = [0.0; NB];
        }
    }
    let tail = ksteps - kmain / 2;
    if tail > 0 {
        let mut t: Tile = [[0.0; NB]; super::MR_MAX];
        for r0 in (0..m).step_by(MR_REG) {
            let mm = MR_REG.min(m - r0);
            avx512_bf16::tile(
                a.add(r0 * lda + kmain),
                lda,
                mm,
                b.add(kmain * NB),
                tail,
                t.as_mut_ptr(),
                std::ptr::null(),
            );
            for (c, t) in c[r0..r0 + mm].iter_mut().zip(&t) {
                c.iter_mut().zip(t).for_each(|(c, t)| *c += t);
            }
        }
    }
}
