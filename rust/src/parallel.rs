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

/// Runs `f` (and every rayon call inside it) in this process's pool.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match pool() {
        Some(pool) => pool.install(f),
        None => f(),
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
}
