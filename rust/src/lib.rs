//! Rust core of h5ckpt: crash-safe, verified HDF5 checkpoints.
//!
//! The modules below know nothing of Python; `binding` (feature `python`) is the thin
//! PyO3 layer that exposes them as `h5ckpt._native`.

pub mod blosc;
pub mod catalog;
pub mod digest;
pub mod error;
pub mod fd;
pub mod finalize;
pub mod header;
pub mod parallel;
pub mod retention;
pub mod scan;
pub mod verify;

pub use error::{Error, Result};

#[cfg(feature = "python")]
mod binding;
