//! Blosc frames compressed on all cores: `blosc_compress_chunks`,
//! `blosc_max_frame_len` and `blosc_ratio`.

use pyo3::prelude::*;

use super::args::{chunk_bytes_arg, usize_arg};
use super::buffer::ByteBuffer;
use super::errors::{detach, to_pyerr, value_error};

/// Byte-shuffle + LZ4 Blosc frames of consecutive `chunk_bytes` pieces of `data`
/// (the last padded with zeros), compressed on all cores: frame `i` goes to
/// `out[i * slot..]` with `slot = blosc_max_frame_len(chunk_bytes)`. Returns the
/// frame lengths.
#[pyfunction]
fn blosc_compress_chunks<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    chunk_bytes: &Bound<'py, PyAny>,
    typesize: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
) -> PyResult<Vec<usize>> {
    let chunk_bytes = chunk_bytes_arg(chunk_bytes, "chunk_bytes")?;
    let typesize = usize_arg(typesize, "typesize")?;
    let buf = ByteBuffer::get(data, "data")?;
    let mut dst = ByteBuffer::get_writable(out, "out")?;
    let bytes = buf.bytes();
    let out = dst.bytes_mut();
    let (a, b) = (bytes.as_ptr_range(), out.as_ptr_range());
    if !bytes.is_empty() && !out.is_empty() && a.start < b.end && b.start < a.end {
        return Err(value_error(py, "data and out must not overlap"));
    }
    detach(py, || {
        crate::blosc::compress_chunks_into(bytes, chunk_bytes, typesize, out)
    })
}

/// Bytes of output space one frame of a `chunk_bytes` chunk may need.
#[pyfunction]
fn blosc_max_frame_len(py: Python<'_>, chunk_bytes: &Bound<'_, PyAny>) -> PyResult<usize> {
    let chunk_bytes = chunk_bytes_arg(chunk_bytes, "chunk_bytes")?;
    crate::blosc::max_frame_len(chunk_bytes).map_err(|e| to_pyerr(py, e))
}

/// Compressed over raw size of `data` as [`blosc_compress_chunks`] stores it.
#[pyfunction]
fn blosc_ratio(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    typesize: &Bound<'_, PyAny>,
) -> PyResult<f64> {
    let typesize = usize_arg(typesize, "typesize")?;
    let buf = ByteBuffer::get(data, "data")?;
    let bytes = buf.bytes();
    detach(py, || crate::blosc::ratio(bytes, typesize))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(blosc_compress_chunks, m)?)?;
    m.add_function(wrap_pyfunction!(blosc_max_frame_len, m)?)?;
    m.add_function(wrap_pyfunction!(blosc_ratio, m)?)?;
    Ok(())
}
