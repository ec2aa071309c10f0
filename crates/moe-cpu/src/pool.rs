//! The threads the CPU backend's parallel steps run on.
//!
//! A decode step (one token) is a chain of short parallel steps: the router, the gather, gate_up,
//! the activation, down, the combine. Each lasts tens of microseconds, and rayon's workers go to
//! sleep between them: on a 16-core VM an empty rayon region costs 6 us right after another one
//! and 31-44 us once its threads slept (`examples/pool_probe.rs`), several times per step. So the
//! backend keeps its own team: workers spin on a shared word for [`spin_us`] after their last
//! step (as OpenMP runtimes do, which is what PyTorch's CPU kernels run on) and only then park.
//! The caller is worker 0. Each participant starts on its own contiguous share of the items and
//! then takes what others have not started, from the back of their shares; a step ends when
//! every item is done, without waiting for a worker that never joined it (preempted, asleep).
//!
//! `MOE_CPU_POOL=rayon` (or [`set_use_team`]) runs the same steps on rayon's current pool
//! instead. A step started while another thread's step holds the team waits for it (in-process
//! expert-parallel ranks take turns with all cores, rather than two pools fighting over them);
//! a step started from inside a step runs inline on its thread. The team's size follows
//! `rayon::current_num_threads()` of the caller, so a rayon pool installed around the call
//! (`--threads`) sets both.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::tuning::UNSET;

static USE_TEAM: AtomicUsize = AtomicUsize::new(UNSET);
static SPIN_US: AtomicUsize = AtomicUsize::new(UNSET);

/// Whether parallel steps run on the spinning team (default) rather than on rayon's pool
/// (`MOE_CPU_POOL=rayon`).
pub fn use_team() -> bool {
    match USE_TEAM.load(Ordering::Relaxed) {
        UNSET => {
            let team = std::env::var("MOE_CPU_POOL").map_or(true, |v| !v.eq_ignore_ascii_case("rayon"));
            let _ = USE_TEAM.compare_exchange(UNSET, team as usize, Ordering::Relaxed, Ordering::Relaxed);
            USE_TEAM.load(Ordering::Relaxed) != 0
        }
        v => v != 0,
    }
}

/// Overrides [`use_team`].
pub fn set_use_team(on: bool) {
    USE_TEAM.store(on as usize, Ordering::Relaxed);
}

/// Microseconds a team worker keeps polling for the next step before it parks (default 2000,
/// `MOE_CPU_SPIN_US`). A decode loop's steps come well within that, so none of them pays a
/// wake-up; an idle process stops burning its cores 2 ms after its last step.
pub fn spin_us() -> usize {
    crate::tuning::get(&SPIN_US, "MOE_CPU_SPIN_US", 2000)
}

/// Overrides [`spin_us`] (workers already spinning finish their current wait first).
pub fn set_spin_us(us: usize) {
    SPIN_US.store(us, Ordering::Relaxed);
}

/// Threads a parallel step uses from the calling thread: rayon's current pool size.
pub fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Runs `f(item, slot)` for every `item < n`, spread over [`threads`] threads, and returns when
/// all have run. `slot < threads()` names the thread running the item (indexes per-thread
/// scratch); two items with the same slot never run at the same time.
///
/// # Panics
/// If `f` panics (the panic is re-raised on the caller once no other thread runs an item).
pub fn for_each(n: usize, f: impl Fn(usize, usize) + Sync) {
    let threads = threads();
    if n == 0 {
        return;
    }
    // One item, one thread, or a step inside a team step: inline on this thread.
    if n == 1 || threads == 1 || IN_STEP.get() {
        (0..n).for_each(|i| f(i, 0));
        return;
    }
    // (The team's item ranges hold 32-bit indices.)
    if use_team() && n <= u32::MAX as usize {
        let team = Team::global();
        // A step that panicked earlier left no state behind (`run` resets it): ignore poison.
        let _busy = team.busy.lock().unwrap_or_else(|p| p.into_inner());
        IN_STEP.set(true);
        let _in_step = Unset;
        team.run(threads.min(n), n, &f);
        return;
    }
    on_rayon(n, threads, &f);
}

/// The step on rayon's current pool (`slot`: the pool's thread index).
fn on_rayon(n: usize, threads: usize, f: &(dyn Fn(usize, usize) + Sync)) {
    (0..n).into_par_iter().for_each(|i| f(i, rayon::current_thread_index().unwrap_or(0) % threads));
}

/// `f(i, chunk i of buf, slot)` for the `width`-element chunks of `buf` (the last may be
/// shorter), as [`for_each`].
pub fn for_each_chunk<T: Send>(buf: &mut [T], width: usize, f: impl Fn(usize, &mut [T], usize) + Sync) {
    if width == 0 || buf.is_empty() {
        return;
    }
    let len = buf.len();
    let out = Out::new(buf);
    for_each(len.div_ceil(width), |i, slot| {
        let start = i * width;
        // SAFETY: chunk i is [i * width, i * width + n) of `buf`: chunks are disjoint and each
        // index runs exactly once.
        f(i, unsafe { out.slice(start, width.min(len - start)) }, slot)
    });
}

/// `f(r, row r of buf)` for `rows` rows of `width` elements: inline below 16 KiB of output
/// (an empty parallel step costs a few microseconds even on the spinning team), else as
/// [`for_each_chunk`].
pub fn each_row<T: Send>(buf: &mut [T], width: usize, rows: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let buf = &mut buf[..rows * width];
    if width == 0 {
        return;
    }
    if std::mem::size_of_val(buf) < 16 << 10 {
        buf.chunks_mut(width).enumerate().for_each(|(r, o)| f(r, o));
    } else {
        for_each_chunk(buf, width, |r, o, _| f(r, o));
    }
}

thread_local! {
    /// Whether this thread is running items of a team step (workers always are).
    static IN_STEP: Cell<bool> = const { Cell::new(false) };
}

/// Clears [`IN_STEP`] when the caller's step ends, by return or by panic.
struct Unset;
impl Drop for Unset {
    fn drop(&mut self) {
        IN_STEP.set(false);
    }
}

/// A buffer that parallel items write in disjoint ranges (the item partition guarantees it).
pub(crate) struct Out<T> {
    ptr: *mut T,
    len: usize,
}

impl<T> Clone for Out<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Out<T> {}
// SAFETY: `Out` is only a pointer into a buffer that outlives the parallel step using it; items
// write disjoint ranges, so no element is written by two threads.
unsafe impl<T: Send> Send for Out<T> {}
// SAFETY: as above; no item reads what another writes within one parallel step.
unsafe impl<T: Send> Sync for Out<T> {}

impl<T> Out<T> {
    pub(crate) fn new(buf: &mut [T]) -> Self {
        Out { ptr: buf.as_mut_ptr(), len: buf.len() }
    }

    /// Elements `[start, start + n)`.
    ///
    /// # Safety
    /// No other live reference may cover these elements (the item partition guarantees it).
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, n: usize) -> &mut [T] {
        assert!(start + n <= self.len, "parallel write {start}+{n} past {}", self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(start), n)
    }
}

/// One step handed to the team: lives on the caller's stack until the step is closed and no
/// worker is inside it.
struct Job<'a> {
    f: &'a (dyn Fn(usize, usize) + Sync),
}

struct Shared {
    /// `epoch << 16 | participants`: a new value starts a step. Packed in one word so that a
    /// worker never pairs one step's epoch with another's participant count.
    state: AtomicU64,
    /// The current step's `Job` (valid until the step is closed and no worker is active).
    job: AtomicUsize,
    /// Per participant, the items it has not started: `start << 32 | end`. A participant takes
    /// its own from the front (so each thread walks a contiguous run of items, e.g. one
    /// expert's weights front to back), then takes others' from the back once its own are gone.
    ranges: Box<[Range]>,
    /// Epoch of the last step whose items were all taken: workers arriving later stay out.
    closed: AtomicU64,
    /// Workers inside a step (between joining and finishing their items).
    active: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

struct Team {
    shared: Arc<Shared>,
    /// Workers spawned (ids 1..=spawned).
    spawned: Mutex<usize>,
    /// Held by the thread whose step the team runs.
    busy: Mutex<()>,
}

const PARTICIPANTS_BITS: u32 = 16;

impl Team {
    fn global() -> &'static Team {
        static TEAM: OnceLock<Team> = OnceLock::new();
        TEAM.get_or_init(|| Team {
            shared: Arc::new(Shared {
                state: AtomicU64::new(0),
                job: AtomicUsize::new(0),
                ranges: (0..MAX_PARTICIPANTS).map(|_| Range(AtomicU64::new(0))).collect(),
                closed: AtomicU64::new(0),
                active: AtomicUsize::new(0),
                panicked: AtomicBool::new(false),
                sleepers: AtomicUsize::new(0),
                park: Mutex::new(()),
                wake: Condvar::new(),
            }),
            spawned: Mutex::new(0),
            busy: Mutex::new(()),
        })
    }

    /// Spawns workers up to id `want - 1`; returns how many participants the team can field.
    fn ensure(&self, want: usize) -> usize {
        let mut spawned = self.spawned.lock().unwrap_or_else(|p| p.into_inner());
        while *spawned + 1 < want {
            let id = *spawned + 1;
            let shared = Arc::clone(&self.shared);
            let seen = shared.state.load(Ordering::Acquire);
            let spawn =
                std::thread::Builder::new().name(format!("moe-cpu-{id}")).spawn(move || worker(&shared, id, seen));
            if spawn.is_err() {
                break; // run with the workers we have
            }
            *spawned += 1;
        }
        *spawned + 1
    }

    /// Runs the step on `threads` participants (the caller is one). Needs `busy` held.
    fn run(&self, threads: usize, n: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        let threads = threads.min(MAX_PARTICIPANTS);
        let threads = self.ensure(threads).min(threads);
        let job = Job { f };
        let s = &*self.shared;
        for (p, r) in s.ranges[..threads].iter().enumerate() {
            r.0.store(((p * n / threads) as u64) << 32 | ((p + 1) * n / threads) as u64, Ordering::Relaxed);
        }
        s.job.store(&job as *const Job as usize, Ordering::Relaxed);
        let epoch = (s.state.load(Ordering::Relaxed) >> PARTICIPANTS_BITS) + 1;
        // SeqCst with the sleepers check below: a worker either sees this step or is counted.
        s.state.store(epoch << PARTICIPANTS_BITS | threads as u64, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.park.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| take_items(s, &job, 0, threads)));
        // Every item is taken. Close the step, then wait for the workers that joined it: one
        // that was preempted or asleep and joins after this point sees `closed` and stays out,
        // so the step never waits for a thread that has nothing left to do.
        s.closed.store(epoch, Ordering::SeqCst);
        let mut spins = 0u32;
        while s.active.load(Ordering::SeqCst) > 0 {
            backoff(&mut spins);
        }
        // No worker is inside the step and none can enter it: `job` may go out of scope now.
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a moe-cpu worker panicked in a parallel step (see its message above)");
        }
    }
}

/// Runs items until every participant's range is empty: this slot's own from the front, then
/// the others' from the back.
fn take_items(s: &Shared, job: &Job, slot: usize, participants: usize) {
    while let Some(i) = s.ranges[slot].take(true) {
        (job.f)(i, slot);
    }
    loop {
        let stolen = (1..participants).find_map(|v| s.ranges[(slot + v) % participants].take(false));
        match stolen {
            Some(i) => (job.f)(i, slot),
            None => return,
        }
    }
}

/// Most participants in one step.
const MAX_PARTICIPANTS: usize = 1024;

/// Items `[start, end)` not yet taken, as `start << 32 | end`, alone on its cache line.
#[repr(align(64))]
struct Range(AtomicU64);

impl Range {
    /// Takes the first (`front`) or last item, if any is left.
    fn take(&self, front: bool) -> Option<usize> {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let (start, end) = (cur >> 32, cur & 0xFFFF_FFFF);
            if start >= end {
                return None;
            }
            let (next, item) =
                if front { ((start + 1) << 32 | end, start) } else { (start << 32 | (end - 1), end - 1) };
            match self.0.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(item as usize),
                Err(now) => cur = now,
            }
        }
    }
}

/// One turn of a polling loop: yields the core every 256 turns in case the machine is
/// oversubscribed, and is otherwise empty. No `pause`: under KVM a tight `pause` loop makes the
/// hypervisor take the vCPU away (pause-loop exiting), and on a 2-vCPU VM that held every step
/// at 6.6 us against 0.6 us without it (`examples/pool_probe.rs`).
fn backoff(spins: &mut u32) {
    *spins = spins.wrapping_add(1);
    if spins.is_multiple_of(256) {
        std::thread::yield_now();
    }
}

fn worker(s: &Shared, id: usize, mut seen: u64) {
    IN_STEP.set(true);
    loop {
        let state = wait_for_step(s, seen);
        seen = state;
        let participants = (state & ((1 << PARTICIPANTS_BITS) - 1)) as usize;
        if id >= participants {
            continue;
        }
        // Join, then check the step is still open (SeqCst, against the caller's store to
        // `closed` and its reads of `active`: either the caller waits for this worker, or this
        // worker sees the step closed or replaced and leaves without touching its job).
        s.active.fetch_add(1, Ordering::SeqCst);
        let epoch = state >> PARTICIPANTS_BITS;
        if s.closed.load(Ordering::SeqCst) == epoch || s.state.load(Ordering::SeqCst) != state {
            s.active.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        // SAFETY: the caller published `job` before this state and, having closed the step,
        // waits until `active` is 0 before the job leaves its stack; this worker is counted.
        let job = unsafe { &*(s.job.load(Ordering::Relaxed) as *const Job) };
        if catch_unwind(AssertUnwindSafe(|| take_items(s, job, id, participants))).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits for a state other than `seen`: polling for [`spin_us`], then parked.
fn wait_for_step(s: &Shared, seen: u64) -> u64 {
    let start = Instant::now();
    let window = Duration::from_micros(spin_us() as u64);
    let mut spins = 0u32;
    loop {
        let state = s.state.load(Ordering::Acquire);
        if state != seen {
            return state;
        }
        backoff(&mut spins);
        if spins.is_multiple_of(64) && start.elapsed() >= window {
            break;
        }
    }
    s.sleepers.fetch_add(1, Ordering::SeqCst);
    let mut g = s.park.lock().unwrap_or_else(|p| p.into_inner());
    let state = loop {
        let state = s.state.load(Ordering::SeqCst);
        if state != seen {
            break state;
        }
        g = s.wake.wait(g).unwrap_or_else(|p| p.into_inner());
    };
    drop(g);
    s.sleepers.fetch_sub(1, Ordering::SeqCst);
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
    }

    #[test]
    fn every_item_runs_once_with_distinct_live_slots() {
        for team in [true, false] {
            pool(4).install(|| {
                for n in [0usize, 1, 3, 4, 5, 100, 1000] {
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    let in_slot: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
                    let run = |i: usize, slot: usize| {
                        assert!(slot < 4);
                        assert_eq!(in_slot[slot].fetch_add(1, Ordering::SeqCst), 0, "slot {slot} used twice at once");
                        hits[i].fetch_add(1, Ordering::Relaxed);
                        in_slot[slot].fetch_sub(1, Ordering::SeqCst);
                    };
                    if team {
                        let t = Team::global();
                        let _busy = t.busy.lock().unwrap_or_else(|p| p.into_inner());
                        if n > 0 {
                            t.run(4, n, &run);
                        }
                    } else {
                        on_rayon(n, 4, &run);
                    }
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}, team {team}");
                }
            });
        }
    }

    #[test]
    fn a_range_gives_its_items_from_either_end_once() {
        let r = Range(AtomicU64::new(3 << 32 | 7));
        assert_eq!(r.take(true), Some(3));
        assert_eq!(r.take(false), Some(6));
        assert_eq!(r.take(true), Some(4));
        assert_eq!(r.take(false), Some(5));
        assert_eq!((r.take(true), r.take(false)), (None, None));
    }

    #[test]
    fn chunks_cover_the_buffer_and_parked_workers_wake() {
        pool(3).install(|| {
            let mut v = vec![0u32; 1001];
            for_each_chunk(&mut v, 10, |i, c, _| c.iter_mut().for_each(|x| *x += i as u32 + 1));
            assert!(v.iter().enumerate().all(|(j, &x)| x == j as u32 / 10 + 1));
            // Longer than the spin window: the workers park, and the next step wakes them.
            set_spin_us(100);
            std::thread::sleep(Duration::from_millis(5));
            let sum = AtomicUsize::new(0);
            for_each(64, |i, _| {
                sum.fetch_add(i, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 63 * 64 / 2);
            set_spin_us(2000);
        });
    }

    #[test]
    fn a_step_inside_a_step_runs_inline_and_other_threads_take_turns() {
        pool(4).install(|| {
            let sum = AtomicUsize::new(0);
            std::thread::scope(|sc| {
                for _ in 0..3 {
                    sc.spawn(|| {
                        pool(4).install(|| {
                            for_each(8, |i, _| {
                                for_each(4, |j, slot| {
                                    assert_eq!(slot, 0, "nested items run inline");
                                    sum.fetch_add(i * 4 + j, Ordering::Relaxed);
                                });
                            })
                        })
                    });
                }
            });
            assert_eq!(sum.load(Ordering::Relaxed), 3 * (31 * 32 / 2));
        });
    }

    #[test]
    fn a_panicking_item_reaches_the_caller_and_the_team_keeps_working() {
        pool(4).install(|| {
            let t = Team::global();
            let r = catch_unwind(AssertUnwindSafe(|| {
                let _busy = t.busy.lock().unwrap_or_else(|p| p.into_inner());
                t.run(4, 64, &|i, _| assert!(i != 40, "item 40"));
            }));
            assert!(r.is_err());
            let sum = AtomicUsize::new(0);
            let _busy = t.busy.lock().unwrap_or_else(|p| p.into_inner());
            t.run(4, 10, &|i, _| {
                sum.fetch_add(i, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 45);
        });
    }
}
