//! `tree_digest`: the payload digest of bytes in memory.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::args::chunk_log2_arg;
use super::buffer::ByteBuffer;
use super::errors::detach;
use crate::digest;

/// Payload digest (docs/format.md) of an in-memory byte string.
#[pyfunction]
#[pyo3(signature = (data, chunk_size = None))]
fn tree_digest<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    chunk_size: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let log2 = chunk_log2_arg(py, chunk_size)?;
    let buf = ByteBuffer::get(data, "data")?;
    let bytes = buf.bytes();
    let root = detach(py, || Ok(digest::tree_digest(bytes, log2)))?;
    Ok(PyBytes::new(py, &root))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(tree_digest, m)?)?;
    Ok(())
}
