//! Python buffers (bytes, bytearray, memoryview, numpy arrays) read or written as
//! plain bytes for the length of a call.

use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

use super::errors::value_error;

/// An exported buffer read as plain bytes: bytes, bytearray, memoryview, numpy
/// arrays of any dtype and shape (0-d included), anything with the buffer protocol,
/// as long as it is C-contiguous. The export (and so the memory) lives until drop.
pub(super) struct ByteBuffer(Box<ffi::Py_buffer>);

impl ByteBuffer {
    pub(super) fn get(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Self> {
        Self::get_with(obj, what, ffi::PyBUF_SIMPLE)
    }

    /// A writable export (bytearray, numpy array, writable memoryview).
    pub(super) fn get_writable(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Self> {
        Self::get_with(obj, what, ffi::PyBUF_WRITABLE)
    }

    fn get_with(obj: &Bound<'_, PyAny>, what: &str, flags: std::ffi::c_int) -> PyResult<Self> {
        let py = obj.py();
        let mut raw = Box::<ffi::Py_buffer>::new_uninit();
        // SAFETY: `raw` is writable memory for one Py_buffer, at a stable address
        // (exporters may point fields of the struct at itself). PyBUF_SIMPLE (and
        // PyBUF_WRITABLE, which adds writability to it) asks for `len` contiguous
        // bytes at `buf`, which C-contiguous data satisfies.
        let rc = unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), raw.as_mut_ptr(), flags) };
        if rc != 0 {
            let err = PyErr::fetch(py);
            if err.is_instance_of::<PyBufferError>(py) || err.is_instance_of::<PyValueError>(py) {
                let kind = if flags & ffi::PyBUF_WRITABLE != 0 {
                    "writable C-contiguous"
                } else {
                    "C-contiguous"
                };
                return Err(value_error(
                    py,
                    format!("{what} must be a {kind} buffer ({err})"),
                ));
            }
            return Err(err);
        }
        // SAFETY: PyObject_GetBuffer succeeded, so it filled the struct.
        Ok(ByteBuffer(unsafe { raw.assume_init() }))
    }

    /// The bytes, valid while `self` lives.
    ///
    /// Another Python thread may still write into a mutable buffer (bytearray, numpy
    /// array) while the GIL is released; callers must not do that, as with any
    /// extension that reads a buffer without the GIL.
    pub(super) fn bytes(&self) -> &[u8] {
        let len = usize::try_from(self.0.len).unwrap_or(0);
        if len == 0 || self.0.buf.is_null() {
            return &[];
        }
        // SAFETY: a PyBUF_SIMPLE export spans `len` bytes from `buf`, kept alive and
        // in place by the export that `self` holds.
        unsafe { std::slice::from_raw_parts(self.0.buf.cast::<u8>(), len) }
    }

    /// The bytes of a writable export ([`ByteBuffer::get_writable`]), valid while
    /// `self` lives. The same caveat as [`ByteBuffer::bytes`] applies.
    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        let len = usize::try_from(self.0.len).unwrap_or(0);
        if len == 0 || self.0.buf.is_null() || self.0.readonly != 0 {
            return &mut [];
        }
        // SAFETY: a writable export spans `len` bytes from `buf`, kept alive and in
        // place by the export that `self` holds; `&mut self` makes this the only
        // slice handed out from it.
        unsafe { std::slice::from_raw_parts_mut(self.0.buf.cast::<u8>(), len) }
    }
}

impl Drop for ByteBuffer {
    fn drop(&mut self) {
        // SAFETY: the struct was filled by a successful PyObject_GetBuffer and is
        // released exactly once, with the interpreter attached.
        Python::attach(|_| unsafe { ffi::PyBuffer_Release(&mut *self.0) });
    }
}
