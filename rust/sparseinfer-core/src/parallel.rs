//! A persistent, spinning thread pool for many small parallel loops.
//!
//! A decode step runs ~200 matvecs of tens of microseconds each, so waking threads through the OS on every
//! call would cost as much as the work. Like llama.cpp's pool, workers spin on an epoch counter for a while
//! after each job and only then sleep on a condvar. The calling thread always takes part in the work.
//!
//! One job runs at a time; a second caller that finds the pool busy runs its loop on its own thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

/// The low byte of the epoch word carries the number of threads the current job may use.
const THREADS_BITS: u64 = 8;

struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n_tasks: usize,
    next: AtomicUsize,
    /// Workers that have not yet finished with this job (all workers, participants or not).
    pending: AtomicUsize,
    panicked: AtomicBool,
}

impl Job<'_> {
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n_tasks {
                break;
            }
            if catch_unwind(AssertUnwindSafe(|| (self.f)(i))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
        }
    }
}

struct Shared {
    /// `(counter << 8) | threads`; bumped once per job.
    epoch: AtomicU64,
    job: AtomicPtr<Job<'static>>,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

/// The pool. Use [`global`] for the process-wide one.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: usize,
    busy: Mutex<()>,
}

impl ThreadPool {
    /// A pool with `workers` background threads (so `workers + 1` threads compute, counting the caller).
    pub fn new(workers: usize) -> ThreadPool {
        let workers = workers.min((1 << THREADS_BITS) - 2);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        for index in 0..workers {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("sparseinfer-{index}"))
                .spawn(move || worker(&shared, index))
                .expect("spawning a sparseinfer worker thread");
        }
        ThreadPool { shared, workers, busy: Mutex::new(()) }
    }

    /// Threads that can compute at once, counting the caller.
    pub fn max_threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `f(0..n_tasks)` on up to `threads` threads (the caller included) and returns when all are done.
    /// Tasks are handed out dynamically, so uneven tasks balance. Panics if a task panicked.
    pub fn run(&self, n_tasks: usize, threads: usize, f: &(dyn Fn(usize) + Sync)) {
        let threads = threads.clamp(1, self.max_threads());
        let guard = if threads > 1 && n_tasks > 1 { self.busy.try_lock().ok() } else { None };
        if guard.is_none() {
            (0..n_tasks).for_each(f);
            return;
        }
        let job = Job {
            f,
            n_tasks,
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(self.workers),
            panicked: AtomicBool::new(false),
        };
        // SAFETY: the pointer is only dereferenced by workers before they decrement `pending`, and we do not
        // return (so `job` stays alive) until `pending` reaches zero.
        let ptr = &job as *const Job<'_> as *mut Job<'static>;
        self.shared.job.store(ptr, Ordering::Relaxed);
        let next_epoch = ((self.shared.epoch.load(Ordering::Relaxed) >> THREADS_BITS) + 1) << THREADS_BITS;
        self.shared.epoch.store(next_epoch | threads as u64, Ordering::SeqCst);
        if self.shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _lock = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        job.work();
        while job.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        drop(guard);
        if job.panicked.load(Ordering::Relaxed) {
            panic!("a sparseinfer parallel task panicked");
        }
    }
}

fn worker(shared: &Shared, index: usize) {
    // Every pool starts at epoch 0: reading the current epoch here instead could skip a job posted before
    // this thread started, and the caller would wait for it forever.
    let mut seen = 0;
    loop {
        // Wait for a new epoch: spin first, then sleep.
        let start = Instant::now();
        let mut epoch = shared.epoch.load(Ordering::Acquire);
        while epoch == seen {
            if start.elapsed() > SPIN {
                shared.sleepers.fetch_add(1, Ordering::SeqCst);
                let mut lock = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
                while shared.epoch.load(Ordering::SeqCst) == seen {
                    lock = shared.wake.wait(lock).unwrap_or_else(|e| e.into_inner());
                }
                drop(lock);
                shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
            std::hint::spin_loop();
            epoch = shared.epoch.load(Ordering::Acquire);
        }
        seen = epoch;
        // SAFETY: the caller keeps the job alive until every worker has decremented `pending`.
        let job = unsafe { &*shared.job.load(Ordering::Acquire) };
        let threads = (epoch & ((1 << THREADS_BITS) - 1)) as usize;
        if index + 1 < threads {
            job.work();
        }
        job.pending.fetch_sub(1, Ordering::Release);
    }
}

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Threads the kernels use: [`set_num_threads`], else `SPARSEINFER_NUM_THREADS`, else the CPU count.
pub fn num_threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => default_threads(),
        n => n,
    }
}

/// Sets the thread count for later kernel calls (`0` restores the default). Capped at the pool size.
pub fn set_num_threads(n: usize) {
    THREADS.store(n, Ordering::Relaxed);
}

fn default_threads() -> usize {
    static DEFAULT: OnceLock<usize> = OnceLock::new();
    *DEFAULT.get_or_init(|| {
        std::env::var("SPARSEINFER_NUM_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(cpu_count)
    })
}

/// CPUs this process may run on.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The process-wide pool, sized for the larger of the CPU count and the configured thread count.
pub fn global() -> &'static ThreadPool {
    static POOL: OnceLock<ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| ThreadPool::new(cpu_count().max(default_threads()).saturating_sub(1)))
}

/// Rows below which [`for_rows`] stays on the calling thread: a pool wake-up costs microseconds, a row of a
/// few thousand values about as much.
pub const MIN_ROWS_PER_TASK: usize = 16;

/// Calls `f(first_row, rows)` over `out` cut into contiguous runs of whole rows of `width` values, one run per
/// thread on the pool, or once over everything when there are too few rows ([`MIN_ROWS_PER_TASK`] per
/// thread) to pay for the hand-off. For row-wise work (norms, activations, residual adds, quantizers) that is
/// serial otherwise: each row's result is the same whichever thread computes it.
pub fn for_rows<T: Send>(out: &mut [T], width: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    for_rows_on(num_threads(), out, width, f)
}

/// [`for_rows`] on up to `threads` threads.
pub(crate) fn for_rows_on<T: Send>(threads: usize, out: &mut [T], width: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let rows = out.len().checked_div(width).unwrap_or(0);
    let threads = threads.min(rows / MIN_ROWS_PER_TASK);
    if threads <= 1 {
        f(0, out);
        return;
    }
    let per = rows.div_ceil(threads);
    let parts: Vec<std::sync::Mutex<&mut [T]>> = out.chunks_mut(per * width).map(std::sync::Mutex::new).collect();
    global().run(parts.len(), threads, &|t| {
        let mut part = parts[t].lock().unwrap_or_else(|e| e.into_inner());
        f(t * per, &mut part);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn for_rows_covers_every_row_once() {
        for (rows, width) in [(0, 3), (1, 3), (15, 2), (33, 5), (64, 1), (1000, 7)] {
            let mut out = vec![0usize; rows * width];
            for_rows_on(4, &mut out, width, |r0, part| {
                assert_eq!(part.len() % width, 0);
                for (i, v) in part.iter_mut().enumerate() {
                    *v += r0 * width + i + 1;
                }
            });
            assert!(out.iter().enumerate().all(|(i, &v)| v == i + 1), "{rows} rows of {width}");
        }
    }

    #[test]
    fn every_task_runs_once() {
        let pool = ThreadPool::new(3);
        for n in [0, 1, 2, 7, 100, 1000] {
            for threads in 1..=4 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n, threads, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n} threads={threads}");
            }
        }
    }

    #[test]
    fn survives_sleeping_workers_and_concurrent_callers() {
        let pool = Arc::new(ThreadPool::new(2));
        std::thread::sleep(Duration::from_millis(5)); // workers go to sleep
        let total = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (pool, total) = (pool.clone(), total.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        pool.run(16, 3, &|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 16);
    }

    #[test]
    fn task_panic_reaches_the_caller() {
        let pool = ThreadPool::new(1);
        let r = catch_unwind(AssertUnwindSafe(|| pool.run(8, 2, &|i| assert!(i != 5))));
        assert!(r.is_err());
        // The pool still works afterwards.
        let count = AtomicUsize::new(0);
        pool.run(8, 2, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 8);
    }
}
