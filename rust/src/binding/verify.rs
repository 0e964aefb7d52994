//! Reading and verifying files: `read_header`, `verify_files`, `verify_fds` and
//! `read_verified_fd`.

use std::path::PathBuf;

use pyo3::prelude::*;

use super::args::{fd_arg, key_bytes, opt_path_arg, path_arg};
use super::buffer::ByteBuffer;
use super::errors::{detach, detach_on_this_thread, error_instance, value_error};
use super::header::{py_header, PyHeader};
use crate::error::Error;
use crate::header::Header;
use crate::verify;

/// Read and parse a file's header; checks the file length against it.
#[pyfunction]
fn read_header<'py>(py: Python<'py>, path: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyHeader>> {
    let path = path_arg(path, "path")?;
    let header = detach(py, || verify::read_header(&path))?;
    py_header(py, header)
}

/// [`verify_files`] of open descriptors (kept open), in parallel; `paths` name them in
/// messages. Failures are returned, not raised.
#[pyfunction]
#[pyo3(signature = (fds, paths, hmac_key = None))]
fn verify_fds<'py>(
    py: Python<'py>,
    fds: Vec<Bound<'py, PyAny>>,
    paths: Vec<Bound<'py, PyAny>>,
    hmac_key: Option<&Bound<'py, PyAny>>,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    if fds.len() != paths.len() {
        return Err(value_error(py, "fds and paths must have the same length"));
    }
    let fds = fds
        .iter()
        .map(|fd| fd_arg(fd, "fd"))
        .collect::<PyResult<Vec<_>>>()?;
    let paths = path_args(&paths)?;
    let key = key_bytes(hmac_key)?;
    let results =
        detach_on_this_thread(py, || Ok(verify::verify_fds(&fds, &paths, key.as_deref())))?;
    outcomes(py, results)
}

/// Checks header, length, payload digest and (keyed) HMAC tag of many files in
/// parallel; failures are returned, not raised.
#[pyfunction]
#[pyo3(signature = (paths, hmac_key = None))]
fn verify_files<'py>(
    py: Python<'py>,
    paths: Vec<Bound<'py, PyAny>>,
    hmac_key: Option<&Bound<'py, PyAny>>,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let paths = path_args(&paths)?;
    let key = key_bytes(hmac_key)?;
    let results = detach(py, || Ok(verify::verify_files(&paths, key.as_deref())))?;
    outcomes(py, results)
}

fn path_args(paths: &[Bound<'_, PyAny>]) -> PyResult<Vec<PathBuf>> {
    paths.iter().map(|p| path_arg(p, "path")).collect()
}

/// One header or exception per file: per-file failures are values here, not errors
/// of the call.
fn outcomes<'py>(
    py: Python<'py>,
    results: Vec<Result<Header, Error>>,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    results
        .into_iter()
        .map(|r| match r {
            Ok(h) => py_header(py, h).map(Bound::into_any),
            Err(e) => error_instance(py, &e),
        })
        .collect()
}

/// Read a whole open file into the writable buffer `out` (exactly the file's
/// length), verifying it from memory; return its header. The descriptor stays open;
/// `path` names the file in messages.
#[pyfunction]
#[pyo3(signature = (fd, out, hmac_key = None, path = None))]
fn read_verified_fd<'py>(
    py: Python<'py>,
    fd: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    hmac_key: Option<&Bound<'py, PyAny>>,
    path: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyHeader>> {
    let fd = fd_arg(fd, "fd")?;
    let path = opt_path_arg(path, "path")?;
    let key = key_bytes(hmac_key)?;
    let mut dst = ByteBuffer::get_writable(out, "out")?;
    let buf = dst.bytes_mut();
    let header = detach_on_this_thread(py, || {
        verify::read_verified_fd(fd, path.as_deref(), key.as_deref(), buf)
    })?;
    py_header(py, header)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_header, m)?)?;
    m.add_function(wrap_pyfunction!(verify_files, m)?)?;
    m.add_function(wrap_pyfunction!(verify_fds, m)?)?;
    m.add_function(wrap_pyfunction!(read_verified_fd, m)?)?;
    Ok(())
}
