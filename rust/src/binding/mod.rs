//! The Python module `h5ckpt._native`.
//!
//! This layer only converts arguments into owned Rust values (or borrowed byte
//! slices whose Python buffers stay exported for the whole call; see `args` and
//! `buffer`), releases the GIL around every piece of I/O and hashing, and maps
//! [`crate::Error`] onto the exception classes of `h5ckpt.errors` (both in
//! `errors`). No Python object is touched while the GIL is released. Each other
//! module binds one module of the crate.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

mod args;
mod blosc;
mod buffer;
mod catalog;
mod digest;
mod errors;
mod finalize;
mod header;
mod retention;
mod scan;
mod verify;

use crate::catalog::Status;
use crate::error::{OsClass, ERRNO_CLASSES};
use crate::header::{
    DEFAULT_CHUNK_SIZE, FORMAT_MAJOR, FORMAT_MINOR, HDF5_SIGNATURE, HEADER_SIZE, MAGIC,
};

/// Rust core of h5ckpt: hashing, headers, verification, scanning and retention.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    add_constants(m)?;
    header::register(m)?;
    digest::register(m)?;
    verify::register(m)?;
    finalize::register(m)?;
    blosc::register(m)?;
    scan::register(m)?;
    retention::register(m)?;
    catalog::register(m)?;
    Ok(())
}

/// The format's constants and the one definition of the status strings and of the
/// errno table, for the Python layer to read.
fn add_constants(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAGIC", PyBytes::new(py, &MAGIC))?;
    m.add("HDF5_SIGNATURE", PyBytes::new(py, &HDF5_SIGNATURE))?;
    m.add("HEADER_SIZE", HEADER_SIZE)?;
    m.add("FORMAT_MAJOR", FORMAT_MAJOR)?;
    m.add("FORMAT_MINOR", FORMAT_MINOR)?;
    m.add("DEFAULT_CHUNK_SIZE", DEFAULT_CHUNK_SIZE)?;
    m.add("STATUS_VALID", Status::Valid.as_str())?;
    m.add("STATUS_INVALID", Status::Invalid.as_str())?;
    m.add("STATUS_LEGACY", Status::Legacy.as_str())?;
    m.add("STATUS_UNVERIFIED", Status::Unverified.as_str())?;
    let errno_classes = PyDict::new(py);
    for (errno, class) in ERRNO_CLASSES {
        errno_classes.set_item(errno, class.class_name())?;
    }
    m.add("ERRNO_CLASSES", errno_classes)?;
    m.add("DEFAULT_OS_ERROR_CLASS", OsClass::Storage.class_name())?;
    Ok(())
}
