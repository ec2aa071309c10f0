//! Process-wide switches of the streaming paths, for measurements: whether packed weights ask
//! for transparent huge pages, and how far ahead the bf16 matrix-vector kernel prefetches.
//! Defaults come from `MOE_CPU_THP` / `MOE_CPU_GEMV_PREFETCH`; `examples/cpu_ab.rs` flips them
//! between interleaved timing slices so both variants see the same host noise.

use std::sync::atomic::{AtomicUsize, Ordering};

const UNSET: usize = usize::MAX;
static HUGE_PAGES: AtomicUsize = AtomicUsize::new(UNSET);
static GEMV_PREFETCH: AtomicUsize = AtomicUsize::new(UNSET);
static QUANT_TILE_ROWS: AtomicUsize = AtomicUsize::new(UNSET);

/// The switch's value: set explicitly, else read once from the environment (`default` when the
/// variable is absent or not a number).
fn get(cell: &AtomicUsize, var: &str, default: usize) -> usize {
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

/// Steps (of two 64-byte lines) the bf16 matrix-vector kernel prefetches ahead; 0: none (default).
pub fn gemv_prefetch() -> usize {
    get(&GEMV_PREFETCH, "MOE_CPU_GEMV_PREFETCH", 0)
}

/// Overrides [`gemv_prefetch`].
pub fn set_gemv_prefetch(steps: usize) {
    GEMV_PREFETCH.store(steps, Ordering::Relaxed);
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
