//! The thread pool that runs the parallel work of calls from Python.
//!
//! After `fork()` a child inherits rayon's pool bookkeeping but none of its threads,
//! and the first parallel call would wait forever. So the pool belongs to a process:
//! a call from a process that did not build it builds a new one.

use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use rayon::{ThreadPool, ThreadPoolBuilder};

/// A pool and the process that built it.
struct Owned {
    pid: u32,
    pool: ThreadPool,
}

/// The pool of the process that installed it last. No lock guards it: a lock that
/// another thread held while the process forked (building the pool takes a while)
/// would stay locked in the child forever. An installed pool is never freed, so a
/// loaded pointer stays valid.
static POOL: AtomicPtr<Owned> = AtomicPtr::new(ptr::null_mut());

/// This process's pool (`RAYON_NUM_THREADS` or one thread per core), or `None` if no
/// thread could be started.
fn pool() -> Option<&'static ThreadPool> {
    let pid = std::process::id();
    let mut current = POOL.load(Ordering::Acquire);
    loop {
        // SAFETY: a non-null pointer in POOL came from Box::into_raw below and is
        // never freed.
        if let Some(owned) = unsafe { current.as_ref() } {
            if owned.pid == pid {
                return Some(&owned.pool);
            }
        }
        let pool = ThreadPoolBuilder::new()
            .thread_name(|i| format!("h5ckpt-{i}"))
            .build()
            .ok()?;
        let fresh = Box::into_raw(Box::new(Owned { pid, pool }));
        match POOL.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire) {
            // An inherited pool is left as it is: its threads live only in the parent.
            // SAFETY: just installed, and never freed.
            Ok(_) => return Some(unsafe { &(*fresh).pool }),
            Err(other) => {
                // Another thread of this process installed one first: use that one.
                // SAFETY: `fresh` was never shared; its threads are this process's.
                drop(unsafe { Box::from_raw(fresh) });
                current = other;
            }
        }
    }
}

/// Runs `f` (and every rayon call inside it) in this process's pool. From a thread
/// of the pool, `f` runs right there.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match pool() {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

/// `items` mapped in order, stopping at the first error: in this process's pool
/// when there are at least `min_parallel` of them, else on the calling thread.
/// Handing small work to a pool thread and waiting for it costs two thread
/// wake-ups (on a busy machine, a wait for a core as well), more than hashing a
/// small file or checking a few directory entries.
pub fn map_collect<T, R, E>(
    items: Vec<T>,
    min_parallel: usize,
    f: impl Fn(T) -> Result<R, E> + Sync + Send,
) -> Result<Vec<R>, E>
where
    T: Send,
    R: Send,
    E: Send,
{
    use rayon::prelude::*;
    if items.len() < min_parallel.max(2) {
        return items.into_iter().map(f).collect();
    }
    install(|| items.into_par_iter().map(f).collect())
}

/// [`map_collect`] of a function that cannot fail.
pub fn map_all<T: Send, R: Send>(
    items: Vec<T>,
    min_parallel: usize,
    f: impl Fn(T) -> R + Sync + Send,
) -> Vec<R> {
    match map_collect(items, min_parallel, |x| {
        Ok::<R, std::convert::Infallible>(f(x))
    }) {
        Ok(out) => out,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn runs_in_named_pool() {
        let names: Vec<String> = install(|| {
            (0..64)
                .into_par_iter()
                .map(|_| std::thread::current().name().unwrap_or("").to_string())
                .collect()
        });
        assert!(names.iter().all(|n| n.starts_with("h5ckpt-")), "{names:?}");
        assert_eq!(install(|| 7), 7);
    }

    #[test]
    fn map_collect_keeps_order_and_runs_one_item_here() {
        let here = std::thread::current().id();
        let thread = |x: u32| Ok::<_, ()>((x * 2, std::thread::current().id()));
        assert_eq!(map_collect(vec![5], 2, thread), Ok(vec![(10, here)]));
        let below: Vec<_> = map_collect((0..7).collect(), 8, thread).unwrap();
        assert!(below.iter().all(|&(_, id)| id == here));
        let many: Result<Vec<u32>, ()> = map_collect((0..100).collect(), 2, |x| Ok(x + 1));
        assert_eq!(many, Ok((1..101).collect()));
        let names: Result<Vec<String>, ()> = map_collect((0..64).collect(), 2, |_: u32| {
            Ok(std::thread::current().name().unwrap_or("").to_string())
        });
        assert!(names.unwrap().iter().all(|n| n.starts_with("h5ckpt-")));
        for min_parallel in [2, 100] {
            let failed: Result<Vec<u32>, u32> = map_collect((0..10).collect(), min_parallel, |x| {
                if x == 7 {
                    Err(x)
                } else {
                    Ok(x)
                }
            });
            assert_eq!(failed, Err(7));
        }
    }
}
