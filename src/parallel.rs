//! The one thread knob: a single rayon pool shared by tract (the frozen
//! backbone's matrix products) and the tail (its dense products, batched
//! attention products and row-wise ops).
//!
//! [`set_threads`] builds the pool once per call and hands the same pool to
//! tract, so `--threads N` means N worker threads in total, never N for tract
//! plus N for the tail. Work is split into disjoint output blocks whose
//! arithmetic does not depend on the split (a GEMM is cut along its output
//! rows or columns, never along `k`), so results are bit-identical for every
//! thread count — the trainer's determinism does not depend on the knob.

use std::sync::{Arc, RwLock};

use rayon::ThreadPool;

use crate::error::{Error, Result};

static POOL: RwLock<Option<Arc<ThreadPool>>> = RwLock::new(None);

/// The most threads [`set_threads`] accepts; more is a mistake, not a wish.
pub const MAX_THREADS: usize = 256;

/// Work below this many operations stays on the calling thread: handing it
/// to the pool costs more than it saves.
pub const MIN_PARALLEL_WORK: usize = 1 << 16;

/// A dense product below this many multiply-adds runs on one thread:
/// matrixmultiply's packing dominates below it (a 64×32×64 attention
/// product ran at 17 GFLOP/s split in two, 42 on one core).
pub const MIN_PARALLEL_GEMM: usize = 1 << 21;

/// Uses `n` threads for the backbone and the tail (1 = single-threaded, the
/// default; 0 = one per available core). Refuses `n` above [`MAX_THREADS`].
pub fn set_threads(n: usize) -> Result<()> {
    let n = if n == 0 { std::thread::available_parallelism().map_or(1, |c| c.get()) } else { n };
    if n > MAX_THREADS {
        return Err(Error::Config(format!(
            "{n} threads requested; at most {MAX_THREADS} are supported (this machine has {})",
            std::thread::available_parallelism().map_or(1, |c| c.get())
        )));
    }
    let pool = if n <= 1 {
        None
    } else {
        let p = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("hydra-edge-{i}"))
            .build()
            .map_err(|e| Error::Config(format!("cannot start {n} threads: {e}")))?;
        Some(Arc::new(p))
    };
    #[cfg(feature = "onnx")]
    {
        use tract_linalg::multithread::{Executor, set_default_executor};
        set_default_executor(match &pool {
            Some(p) => Executor::MultiThread(p.clone()),
            None => Executor::SingleThread,
        });
    }
    *POOL.write().unwrap_or_else(|e| e.into_inner()) = pool;
    Ok(())
}

thread_local! {
    /// Set while this thread runs a share of a [`for_each`] / [`chunks_mut`].
    static IN_TASK: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

/// Runs `f` as a share of split work ([`in_worker`] is true inside it).
fn as_task<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            IN_TASK.with(|t| t.set(self.0));
        }
    }
    let _restore = Restore(IN_TASK.with(|t| t.replace(true)));
    f()
}

/// Whether the caller already runs a share of split work, or on a pool
/// thread (work it hands out there would only be split again; it runs it
/// itself instead).
pub fn in_worker() -> bool {
    IN_TASK.with(|t| t.get()) || rayon::current_thread_index().is_some()
}

/// Threads in use (1 when single-threaded).
pub fn threads() -> usize {
    pool().map_or(1, |p| p.current_num_threads())
}

fn pool() -> Option<Arc<ThreadPool>> {
    POOL.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Runs `f(i)` for `i in 0..parts`, on the pool when there is one and the
/// work (`work` multiply-adds in all) is worth it, else in order here.
///
/// The calling thread runs share 0 itself and the pool the others: handing
/// all of them over (`install`) left the caller asleep and cost a wake-up of
/// the caller on every split (7 µs warm, ~45 µs after an idle moment; a
/// MiniLM step splits a few hundred times), and the caller's own share
/// overlaps the pool thread's wake-up.
pub fn for_each(parts: usize, work: usize, f: impl Fn(usize) + Sync + Send) {
    match pool() {
        Some(p) if parts > 1 && work >= MIN_PARALLEL_WORK && !in_worker() => {
            let f = &f;
            p.in_place_scope(|s| {
                for i in 1..parts {
                    s.spawn(move |_| as_task(|| f(i)));
                }
                as_task(|| f(0));
            });
        }
        // On a pool thread outside a share (tract's own work): rayon's
        // work stealing, as tract does.
        Some(p) if parts > 1 && work >= MIN_PARALLEL_WORK && !IN_TASK.with(|t| t.get()) => {
            p.install(|| {
                use rayon::prelude::*;
                (0..parts).into_par_iter().for_each(|i| as_task(|| f(i)))
            });
        }
        _ => (0..parts).for_each(f),
    }
}

/// Splits `len` items into at most `threads()` contiguous ranges whose starts
/// are multiples of `align` (the last may be short).
pub fn ranges(len: usize, align: usize) -> Vec<core::ops::Range<usize>> {
    let t = threads().max(1);
    let align = align.max(1);
    let blocks = len.div_ceil(align);
    let per = blocks.div_ceil(t).max(1) * align;
    (0..len).step_by(per.max(1)).map(|s| s..(s + per).min(len)).collect()
}

/// Calls `f(chunk_index, chunk)` on consecutive `chunk`-sized pieces of `data`
/// (the last may be shorter), in parallel when worth it: one contiguous run
/// of chunks per thread, the first run on the calling thread (as
/// [`for_each`]).
pub fn chunks_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    work: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    let chunk = chunk.max(1);
    let run = |first: usize, part: &mut [T]| {
        for (j, c) in part.chunks_mut(chunk).enumerate() {
            f(first + j, c);
        }
    };
    match pool() {
        Some(p) if data.len() > chunk && work >= MIN_PARALLEL_WORK && !in_worker() => {
            let per = data.len().div_ceil(chunk).div_ceil(threads().max(1)).max(1);
            let run = &run;
            p.in_place_scope(|s| {
                let mut runs = data.chunks_mut(per * chunk).enumerate();
                let first = runs.next();
                for (g, part) in runs {
                    s.spawn(move |_| as_task(|| run(g * per, part)));
                }
                if let Some((_, part)) = first {
                    as_task(|| run(0, part));
                }
            });
        }
        // On a pool thread outside a share (tract's own work): rayon's
        // work stealing, as in `for_each`.
        Some(p)
            if data.len() > chunk && work >= MIN_PARALLEL_WORK && !IN_TASK.with(|t| t.get()) =>
        {
            p.install(|| {
                use rayon::prelude::*;
                data.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| as_task(|| f(i, c)))
            });
        }
        _ => run(0, data),
    }
}

/// Held by the crate's unit tests that change the thread count (the pool is
/// process-wide and tests run in parallel).
#[cfg(test)]
pub(crate) static TEST_THREADS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_everything_once_and_align() {
        for len in [0usize, 1, 7, 8, 9, 63, 64, 65, 1000] {
            for align in [1usize, 8] {
                let r = ranges(len, align);
                let mut next = 0;
                for x in &r {
                    assert_eq!(x.start, next);
                    assert_eq!(x.start % align, 0);
                    next = x.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    /// Every share runs exactly once, on any thread count, and shares see
    /// themselves as pool work (a product inside one is not split again).
    #[test]
    fn shares_run_once_and_do_not_split_again() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let _g = TEST_THREADS.lock().unwrap_or_else(|e| e.into_inner());
        for t in [1, 2, 3] {
            set_threads(t).unwrap();
            let hits: Vec<AtomicUsize> = (0..7).map(|_| AtomicUsize::new(0)).collect();
            for_each(7, MIN_PARALLEL_WORK, |i| {
                assert!(in_worker() || threads() == 1);
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "{t} threads");
            let mut data: Vec<usize> = vec![usize::MAX; 1000];
            chunks_mut(&mut data, 64, MIN_PARALLEL_WORK, |c, part| {
                for (j, v) in part.iter_mut().enumerate() {
                    *v = c * 64 + j;
                }
            });
            assert!(data.iter().enumerate().all(|(i, &v)| v == i), "{t} threads");
            assert!(!in_worker());
        }
        set_threads(1).unwrap();
    }

    #[test]
    fn too_many_threads_is_an_error() {
        assert!(set_threads(MAX_THREADS + 1).is_err());
    }
}
