//! Sealing and syncing files: `finalize`, `start_writeback` and `fsync_directory`.

use std::os::fd::RawFd;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::args::{chunk_log2_arg, f64_arg, fd_arg, key_bytes, path_arg, u64_arg};
use super::buffer::ByteBuffer;
use super::errors::detach_on_this_thread;
use super::header::{py_header, PyHeader};
use crate::digest::Segment;
use crate::finalize::Seal;

/// The arguments `finalize` and `seal_image` share, converted to owned values.
struct SealArgs {
    fd: RawFd,
    batch_idx: u64,
    loss: f64,
    timestamp: f64,
    key: Option<Vec<u8>>,
    durable: bool,
    chunk_log2: u32,
}

impl SealArgs {
    fn convert(
        fd: &Bound<'_, PyAny>,
        batch_idx: &Bound<'_, PyAny>,
        loss: &Bound<'_, PyAny>,
        timestamp: &Bound<'_, PyAny>,
        hmac_key: Option<&Bound<'_, PyAny>>,
        durable: bool,
        chunk_size: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        Ok(Self {
            fd: fd_arg(fd, "fd")?,
            chunk_log2: chunk_log2_arg(fd.py(), chunk_size)?,
            batch_idx: u64_arg(batch_idx, "batch_idx")?,
            loss: f64_arg(loss, "loss")?,
            timestamp: f64_arg(timestamp, "timestamp")?,
            key: key_bytes(hmac_key)?,
            durable,
        })
    }

    fn seal(&self) -> Seal<'_> {
        Seal {
            batch_idx: self.batch_idx,
            loss: self.loss,
            timestamp: self.timestamp,
            key: self.key.as_deref(),
            durable: self.durable,
            chunk_log2: self.chunk_log2,
        }
    }
}

/// Complete a payload written by HDF5 and seal it with a header.
#[pyfunction]
#[pyo3(signature = (
    fd, segments, batch_idx, loss, timestamp, hmac_key = None, durable = true,
    chunk_size = None,
))]
#[allow(clippy::too_many_arguments)]
fn finalize<'py>(
    py: Python<'py>,
    fd: &Bound<'py, PyAny>,
    segments: Vec<(Bound<'py, PyAny>, Bound<'py, PyAny>)>,
    batch_idx: &Bound<'py, PyAny>,
    loss: &Bound<'py, PyAny>,
    timestamp: &Bound<'py, PyAny>,
    hmac_key: Option<&Bound<'py, PyAny>>,
    durable: bool,
    chunk_size: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyHeader>> {
    let args = SealArgs::convert(
        fd, batch_idx, loss, timestamp, hmac_key, durable, chunk_size,
    )?;
    // The exported buffers stay alive (and their memory in place) until the end of
    // this function, past the GIL-free section that reads them.
    let mut buffers = Vec::with_capacity(segments.len());
    for (offset, obj) in &segments {
        let offset = u64_arg(offset, "segment offset")?;
        buffers.push((offset, ByteBuffer::get(obj, "segment")?));
    }
    let segs: Vec<Segment<'_>> = buffers
        .iter()
        .map(|(offset, buf)| Segment {
            offset: *offset,
            data: buf.bytes(),
        })
        .collect();
    let seal = args.seal();
    let header = detach_on_this_thread(py, || crate::finalize::finalize_fd(args.fd, &segs, &seal))?;
    drop(segs);
    drop(buffers);
    py_header(py, header)
}

/// Write a whole checkpoint (header, then the payload `image`) into the empty file
/// `fd` in one write, and seal it.
#[pyfunction]
#[pyo3(signature = (
    fd, image, batch_idx, loss, timestamp, hmac_key = None, durable = true,
    chunk_size = None,
))]
#[allow(clippy::too_many_arguments)]
fn seal_image<'py>(
    py: Python<'py>,
    fd: &Bound<'py, PyAny>,
    image: &Bound<'py, PyBytes>,
    batch_idx: &Bound<'py, PyAny>,
    loss: &Bound<'py, PyAny>,
    timestamp: &Bound<'py, PyAny>,
    hmac_key: Option<&Bound<'py, PyAny>>,
    durable: bool,
    chunk_size: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyHeader>> {
    let args = SealArgs::convert(
        fd, batch_idx, loss, timestamp, hmac_key, durable, chunk_size,
    )?;
    let seal = args.seal();
    // `bytes` is immutable: what is hashed is what is written.
    let image = image.as_bytes();
    let header =
        detach_on_this_thread(py, || crate::finalize::seal_image_fd(args.fd, image, &seal))?;
    py_header(py, header)
}

/// Start writing the dirty pages of a file range to the disk, without waiting
/// (`length` 0: to the end of the file). A hint: errors surface at the next fsync.
#[pyfunction]
#[pyo3(signature = (fd, offset = None, length = None))]
fn start_writeback(
    py: Python<'_>,
    fd: &Bound<'_, PyAny>,
    offset: Option<&Bound<'_, PyAny>>,
    length: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let fd = fd_arg(fd, "fd")?;
    let offset = offset.map(|o| u64_arg(o, "offset")).transpose()?;
    let length = length.map(|l| u64_arg(l, "length")).transpose()?;
    let (offset, length) = (offset.unwrap_or(0), length.unwrap_or(0));
    py.detach(|| crate::finalize::start_writeback_fd(fd, offset, length));
    Ok(())
}

/// fsync a directory, so that a rename in it is durable.
#[pyfunction]
fn fsync_directory(py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<()> {
    let path = path_arg(path, "path")?;
    detach_on_this_thread(py, || crate::finalize::fsync_directory(&path))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(finalize, m)?)?;
    m.add_function(wrap_pyfunction!(seal_image, m)?)?;
    m.add_function(wrap_pyfunction!(start_writeback, m)?)?;
    m.add_function(wrap_pyfunction!(fsync_directory, m)?)?;
    Ok(())
}
