//! The thread pool that runs the parallel work of calls from Python.
//!
//! After `fork()` a child inherits rayon's pool bookkeeping but none of its threads,
//! and the first parallel call would wait forever. So the pool belongs to a process:
//! a call from a process that did not build it builds a new one.

use std::sync::{Arc, Mutex};

use rayon::{ThreadPool, ThreadPoolBuilder};

static POOL: Mutex<Option<(u32, Arc<ThreadPool>)>> = Mutex::new(None);

/// This process's pool (`RAYON_NUM_THREADS` or one thread per core), or `None` if no
/// thread could be started.
fn pool() -> Option<Arc<ThreadPool>> {
    let pid = std::process::id();
    let mut slot = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((owner, pool)) = slot.as_ref() {
        if *owner == pid {
            return Some(Arc::clone(pool));
        }
    }
    let pool = Arc::new(
        ThreadPoolBuilder::new()
            .thread_name(|i| format!("h5ckpt-{i}"))
            .build()
            .ok()?,
    );
    if let Some((_, inherited)) = slot.replace((pid, Arc::clone(&pool))) {
        // Its threads live only in the parent: never touch or drop it here.
        std::mem::forget(inherited);
    }
    Some(pool)
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
