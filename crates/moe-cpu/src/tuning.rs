//! Process-wide switches of the streaming paths, for measurements: whether packed weights ask
//! for transparent huge pages, how far ahead the bf16 matrix-vector kernel prefetches, how many
//! tasks a thread gets in the split (few experts) schedule, from how many rows an expert the
//! quantized experts run a tile path and whether it is the integer tiles, from how many rows a
//! bf16 tile runs on AMX, and how the small bf16 tiles prefetch. Defaults come from `MOE_CPU_THP` /
//! `MOE_CPU_GEMV_PREFETCH` / `MOE_CPU_SPLIT_TASKS` / `MOE_CPU_QUANT_TILE_ROWS` /
//! `MOE_CPU_QUANT_INT_TILES` / `MOE_CPU_AMX_ROWS` / `MOE_CPU_SMALL_TILE_PF`; moe-runtime's
//! `examples/cpu_ab.rs` flips them between interleaved timing slices so both variants see the
//! same host noise.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A switch not yet read from the environment or set.
pub(crate) const UNSET: usize = usize::MAX;
static HUGE_PAGES: AtomicUsize = AtomicUsize::new(UNSET);
static GEMV_PREFETCH: AtomicUsize = AtomicUsize::new(UNSET);
static SPLIT_TASKS: AtomicUsize = AtomicUsize::new(UNSET);
static QUANT_TILE_ROWS: AtomicUsize = AtomicUsize::new(UNSET);
static QUANT_INT_TILES: AtomicUsize = AtomicUsize::new(UNSET);
static AMX_ROWS: AtomicUsize = AtomicUsize::new(UNSET);
static INT4_ACT: AtomicUsize = AtomicUsize::new(UNSET);
static QUANT_DECODE: AtomicUsize = AtomicUsize::new(UNSET);
static INT4_ROWS: AtomicUsize = AtomicUsize::new(UNSET);
static K_CHUNK: AtomicUsize = AtomicUsize::new(UNSET);
static SMALL_TILE_PF: AtomicUsize = AtomicUsize::new(UNSET);

/// The switch's value: set explicitly, else read once from the environment (`default` when the
/// variable is absent or not a number).
pub(crate) fn get(cell: &AtomicUsize, var: &str, default: usize) -> usize {
    match cell.load(Ordering::Relaxed) {
        UNSET => {
            let v = std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
            // A concurrent `set_*` wins over the environment.
            let _ = cell.compare_exchange(UNSET, v, Ordering::Relaxed, Ordering::Relaxed);
            cell.load(Ordering::Relaxed)
        }
        v => v,
    }
}

/// Whether newly packed weights ask for transparent huge pages (default: off).
pub fn huge_pages() -> bool {
    get(&HUGE_PAGES, "MOE_CPU_THP", 0) != 0
}

/// Overrides [`huge_pages`] for weights packed from now on.
pub fn set_huge_pages(on: bool) {
    HUGE_PAGES.store(on as usize, Ordering::Relaxed);
}

/// Steps (of two 64-byte lines) the bf16 matrix-vector kernel prefetches ahead (default 16, 2 KiB;
/// 0: none). With 16 threads a core streams too few lines at once for the memory latency without
/// it (interleaved A/B, qwen3 T = 1: 0.85x the time); on 2 cores it measured neutral.
pub fn gemv_prefetch() -> usize {
    get(&GEMV_PREFETCH, "MOE_CPU_GEMV_PREFETCH", 16)
}

/// Overrides [`gemv_prefetch`].
pub fn set_gemv_prefetch(steps: usize) {
    GEMV_PREFETCH.store(steps, Ordering::Relaxed);
}

/// How the AVX-512 BF16 tiles of 2-8 rows prefetch (`MOE_CPU_SMALL_TILE_PF`): 0 the next block
/// into L2 at the pace of this one, 1 this block [`gemv_prefetch`] steps ahead into L1 (as the
/// one-row kernel), 2 both (default). Interleaved A/B on the 2-core dev VM (docs/perf/cpu.md,
/// session 17), 2 against 0: qwen3 T = 16 0.946x and 0.972x the time, T = 128 0.987x, T = 1024
/// 0.995x; 1 against 0: T = 16 0.981x.
pub fn small_tile_prefetch() -> usize {
    get(&SMALL_TILE_PF, "MOE_CPU_SMALL_TILE_PF", 2).min(2)
}

/// Overrides [`small_tile_prefetch`].
pub fn set_small_tile_prefetch(mode: usize) {
    SMALL_TILE_PF.store(mode, Ordering::Relaxed);
}

/// Tasks per thread in the engine's split schedule (default 12): more give work stealing room
/// to even out a thread that the host preempts. Interleaved A/B (docs/perf/cpu.md, session 4):
/// 12 against 3 on a 16-core VM with ~20% steal time, qwen3 T = 1: 0.825x the time; on 2 cores
/// the same within noise.
pub fn split_tasks_per_thread() -> usize {
    get(&SPLIT_TASKS, "MOE_CPU_SPLIT_TASKS", 12).max(1)
}

/// Overrides [`split_tasks_per_thread`].
pub fn set_split_tasks_per_thread(tasks: usize) {
    SPLIT_TASKS.store(tasks, Ordering::Relaxed);
}

/// Inputs per k-chunk of the dense engine's block products (`MOE_CPU_KC`, default 2048; rounded
/// down to a multiple of 256, at least 256): a chunk of a weight block stays in L1/L2 while every
/// row tile of the task sweeps it. The row-tile size does not follow it.
pub fn k_chunk() -> usize {
    (get(&K_CHUNK, "MOE_CPU_KC", 2048) / 256).max(1) * 256
}

/// Overrides [`k_chunk`].
pub fn set_k_chunk(inputs: usize) {
    K_CHUNK.store(inputs, Ordering::Relaxed);
}

/// Rows an expert from which quantized experts run the dense bf16 tile on dequantized panels
/// (`MOE_CPU_QUANT_TILE_ROWS`; AVX-512 BF16 with bf16 activations only); `default` (the
/// format's measured switch point) unless set.
pub fn quant_tile_rows(default: usize) -> usize {
    match get(&QUANT_TILE_ROWS, "MOE_CPU_QUANT_TILE_ROWS", 0) {
        0 => default,
        v => v,
    }
}

/// Overrides [`quant_tile_rows`] (0: back to the formats' defaults).
pub fn set_quant_tile_rows(rows: usize) {
    QUANT_TILE_ROWS.store(rows, Ordering::Relaxed);
}

/// Whether int4, int8, MXFP4 and NVFP4 experts at or above the tile switch run the integer tiles of
/// `quant::itiles` (int8 activations, `vpdpbusd`) where the CPU has AVX-512 VNNI and int8
/// activations are on (`MOE_CPU_QUANT_INT_TILES`: 0 never, 1 always, unset or 2: unless `amx`,
/// the bf16 tiles running on AMX, which is not measured against them yet). On the dev VM's Xeon
/// (no AMX) int4 / int8 forwards took 0.35-0.55x the time of the bf16 tiles at T = 128 and 1024
/// (docs/perf/quant.md, "CPU, integer tiles").
pub fn quant_int_tiles(amx: bool) -> bool {
    match get(&QUANT_INT_TILES, "MOE_CPU_QUANT_INT_TILES", 2) {
        0 => false,
        1 => true,
        _ => !amx,
    }
}

/// Overrides [`quant_int_tiles`] (0 never, 1 always, 2 the default).
pub fn set_quant_int_tiles(mode: usize) {
    QUANT_INT_TILES.store(mode, Ordering::Relaxed);
}

/// Rows from which a bf16 row tile runs on AMX tiles where the CPU has them (default 2; 0: never,
/// every tile runs on `vdpbf16ps`). Interleaved A/B on a 16-core Xeon (docs/perf/cpu.md, session
/// 5): AMX from 1 row against none, T = 16: 0.945x the time; from 1 against 4 rows, T = 128:
/// 0.989x; but from 1 against 2, T = 1 (one-row tiles only): 1.035x, so single rows stay on the
/// `vdpbf16ps` matrix-vector kernel.
pub fn amx_rows() -> usize {
    get(&AMX_ROWS, "MOE_CPU_AMX_ROWS", 2)
}

/// Overrides [`amx_rows`].
pub fn set_amx_rows(rows: usize) {
    AMX_ROWS.store(rows, Ordering::Relaxed);
}

/// How int4 rows (and int8 rows: 1 and 2 take them through the decode path of `quant::decode`,
/// 0 leaves them widened to bf16) take bf16 activations at decode sizes (up to 8 rows an expert)
/// where the CPU has AVX-512 VNNI (`MOE_CPU_INT4_ACT`): 0 as bf16 (`vdpbf16ps`), 1 as one int8 byte per value
/// per 128-input group (`vpdpbusd`; about 1% error on a dot, more than bf16's rounding), 2 as two
/// bytes (a residual byte below the first: finer than bf16, twice the `vpdpbusd`s).
pub fn int4_act() -> usize {
    get(&INT4_ACT, "MOE_CPU_INT4_ACT", 2).min(2)
}

/// Overrides [`int4_act`].
pub fn set_int4_act(mode: usize) {
    INT4_ACT.store(mode, Ordering::Relaxed);
}

/// Whether decode-sized int4 and int8 forwards with int8 activations take the two-step path of
/// `quant::decode` (`MOE_CPU_QUANT_DECODE` not 0; default on) instead of the general six-step one.
pub fn quant_decode() -> bool {
    get(&QUANT_DECODE, "MOE_CPU_QUANT_DECODE", 4) != 0
}

/// Tasks each 128-wide intermediate group of an expert is split into in that path's gate_up step
/// (`MOE_CPU_QUANT_DECODE` = 1, 2, 4 or 8; other values round down to those). Default 4: on the
/// 16-core host (session 11) 4 took 0.92-0.96x the time of 1 and 8 1.03x that of 4; neutral on 2 cores.
pub fn quant_decode_splits() -> usize {
    match get(&QUANT_DECODE, "MOE_CPU_QUANT_DECODE", 4) {
        0 | 1 => 1,
        2 | 3 => 2,
        4..=7 => 4,
        _ => 8,
    }
}

/// Overrides [`quant_decode`] and [`quant_decode_splits`]: 0 off, else the split count.
pub fn set_quant_decode(splits: usize) {
    QUANT_DECODE.store(splits, Ordering::Relaxed);
}

/// Weight rows one int8-activation dot of the two-step int4 decode path takes together
/// (`MOE_CPU_INT4_ROWS`: 4, the default, or 1): four rows share the activation loads and keep
/// four independent chains in flight.
pub fn int4_dot_rows() -> usize {
    if get(&INT4_ROWS, "MOE_CPU_INT4_ROWS", 4) >= 4 {
        4
    } else {
        1
    }
}

/// Overrides [`int4_dot_rows`].
pub fn set_int4_dot_rows(rows: usize) {
    INT4_ROWS.store(rows, Ordering::Relaxed);
}

/// Asks Linux to back the 2 MiB-aligned interior of the not yet touched allocation
/// `[start, start + bytes)` with transparent huge pages (`MADV_HUGEPAGE`), when [`huge_pages`]
/// is on. Best effort: the result is ignored (the buffer works either way).
pub fn advise_huge_pages(start: usize, bytes: usize) {
    if !huge_pages() {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let aligned = start.next_multiple_of(HUGE);
        let end = start + bytes;
        if end > aligned + HUGE {
            let len = (end - aligned) / HUGE * HUGE;
            // SAFETY: [aligned, aligned + len) lies inside the caller's live allocation;
            // MADV_HUGEPAGE only changes how the kernel backs those pages, never their contents.
            unsafe {
                libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, bytes);
}
