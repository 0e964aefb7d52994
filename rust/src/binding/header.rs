//! `Header`, a parsed header, and `parse_header`.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::buffer::ByteBuffer;
use super::errors::detach_on_this_thread;
use crate::header::{self, Header};

/// A parsed, self-consistent h5ckpt header (its header digest checked).
#[pyclass(frozen, name = "Header", module = "h5ckpt._native")]
pub(super) struct PyHeader(Header);

#[pymethods]
impl PyHeader {
    #[getter]
    fn format_major(&self) -> u16 {
        self.0.format_major
    }
    #[getter]
    fn format_minor(&self) -> u16 {
        self.0.format_minor
    }
    #[getter]
    fn payload_offset(&self) -> u64 {
        self.0.payload_offset
    }
    #[getter]
    fn payload_length(&self) -> u64 {
        self.0.payload_length
    }
    #[getter]
    fn chunk_size(&self) -> u64 {
        self.0.chunk_size()
    }
    #[getter]
    fn chunk_count(&self) -> u64 {
        self.0.chunk_count
    }
    #[getter]
    fn flags(&self) -> u32 {
        self.0.flags
    }
    #[getter]
    fn keyed(&self) -> bool {
        self.0.keyed()
    }
    #[getter]
    fn batch_idx(&self) -> u64 {
        self.0.batch_idx
    }
    #[getter]
    fn loss(&self) -> f64 {
        self.0.loss
    }
    #[getter]
    fn timestamp(&self) -> f64 {
        self.0.timestamp
    }
    #[getter]
    fn payload_digest<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.payload_digest)
    }
    #[getter]
    fn hmac_tag<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.0.keyed().then(|| PyBytes::new(py, &self.0.hmac_tag))
    }
    #[getter]
    fn header_digest<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.header_digest)
    }

    /// Every field as a dict.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("format_major", self.0.format_major)?;
        d.set_item("format_minor", self.0.format_minor)?;
        d.set_item("payload_offset", self.0.payload_offset)?;
        d.set_item("payload_length", self.0.payload_length)?;
        d.set_item("chunk_size", self.0.chunk_size())?;
        d.set_item("chunk_count", self.0.chunk_count)?;
        d.set_item("flags", self.0.flags)?;
        d.set_item("keyed", self.0.keyed())?;
        d.set_item("batch_idx", self.0.batch_idx)?;
        d.set_item("loss", self.0.loss)?;
        d.set_item("timestamp", self.0.timestamp)?;
        d.set_item("payload_digest", self.payload_digest(py))?;
        d.set_item("hmac_tag", self.hmac_tag(py))?;
        d.set_item("header_digest", self.header_digest(py))?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let h = &self.0;
        format!(
            "Header(format={}.{}, batch_idx={}, loss={:?}, timestamp={:?}, payload_length={}, \
             chunk_size={}, keyed={})",
            h.format_major,
            h.format_minor,
            h.batch_idx,
            h.loss,
            h.timestamp,
            h.payload_length,
            h.chunk_size(),
            if h.keyed() { "True" } else { "False" },
        )
    }
}

pub(super) fn py_header(py: Python<'_>, header: Header) -> PyResult<Bound<'_, PyHeader>> {
    Bound::new(py, PyHeader(header))
}

/// Parse and check the first 512 bytes of a file (no payload check).
#[pyfunction]
fn parse_header<'py>(py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyHeader>> {
    let buf = ByteBuffer::get(data, "data")?;
    let bytes = buf.bytes();
    let header = detach_on_this_thread(py, || header::parse(bytes))?;
    py_header(py, header)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyHeader>()?;
    m.add_function(wrap_pyfunction!(parse_header, m)?)?;
    Ok(())
}
