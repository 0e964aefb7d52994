//! The Python module `h5ckpt._native`.
//!
//! This layer only converts arguments into owned Rust values (or borrowed byte
//! slices whose Python buffers stay exported for the whole call), releases the GIL
//! around every piece of I/O and hashing (see [`detach`]), and maps [`Error`] onto
//! the exception classes of `h5ckpt.errors`. No Python object is touched while the
//! GIL is released.

use std::ffi::OsStr;
use std::path::PathBuf;

use pyo3::exceptions::{
    PyBufferError, PyMemoryError, PyOSError, PyOverflowError, PyRuntimeError, PyTypeError,
    PyValueError,
};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyDict, PyString, PyType};

mod catalog;

use crate::catalog::Status;
use crate::digest::{self, Segment};
use crate::error::{os_class, Error, OsClass, ERRNO_CLASSES};
use crate::finalize::Seal;
use crate::header::{self, Header};
use crate::retention::{self, Policy};
use crate::scan::Entry;
use crate::verify;

// ---------------------------------------------------------------------------
// Errors

/// The classes of `h5ckpt.errors`, looked up once.
struct ErrorClasses {
    not_found: Py<PyType>,
    permission: Py<PyType>,
    storage: Py<PyType>,
    resource: Py<PyType>,
    corrupt: Py<PyType>,
    authentication: Py<PyType>,
    version: Py<PyType>,
    value: Py<PyType>,
}

static ERROR_CLASSES: PyOnceLock<ErrorClasses> = PyOnceLock::new();

fn error_classes(py: Python<'_>) -> PyResult<&ErrorClasses> {
    ERROR_CLASSES.get_or_try_init(py, || {
        let module = py.import("h5ckpt.errors")?;
        let class = |name: &str| -> PyResult<Py<PyType>> {
            Ok(module.getattr(name)?.cast_into::<PyType>()?.unbind())
        };
        Ok(ErrorClasses {
            not_found: class("CheckpointNotFoundError")?,
            permission: class("CheckpointPermissionError")?,
            storage: class("CheckpointStorageError")?,
            resource: class("CheckpointResourceError")?,
            corrupt: class("CheckpointCorruptError")?,
            authentication: class("CheckpointAuthenticationError")?,
            version: class("CheckpointVersionError")?,
            value: class("CheckpointValueError")?,
        })
    })
}

/// The exception instance for `err`: `Class(message, error_context)`.
fn error_instance<'py>(py: Python<'py>, err: &Error) -> PyResult<Bound<'py, PyAny>> {
    let classes = error_classes(py)?;
    let ctx = PyDict::new(py);
    if let Some(path) = err.path() {
        ctx.set_item("path", path.as_os_str())?;
    }
    let class = match err {
        Error::Io { op, source, .. } => {
            ctx.set_item("op", *op)?;
            ctx.set_item("errno", source.raw_os_error())?;
            ctx.set_item("reason", source.to_string())?;
            match os_class(source.raw_os_error(), source.kind()) {
                OsClass::NotFound => &classes.not_found,
                OsClass::Permission => &classes.permission,
                OsClass::Resource => &classes.resource,
                OsClass::Storage => &classes.storage,
            }
        }
        Error::Corrupt { reason, .. } => {
            ctx.set_item("reason", reason)?;
            &classes.corrupt
        }
        Error::Authentication { reason, .. } => {
            ctx.set_item("reason", reason)?;
            &classes.authentication
        }
        Error::Version { major, minor, .. } => {
            ctx.set_item("format_major", *major)?;
            ctx.set_item("format_minor", *minor)?;
            ctx.set_item("supported_major", header::FORMAT_MAJOR)?;
            &classes.version
        }
        Error::InvalidArgument(reason) => {
            ctx.set_item("reason", reason)?;
            &classes.value
        }
    };
    class.bind(py).call1((err.to_string(), ctx))
}

/// Converts `err` into the exception to raise. An OS error also becomes the
/// `__cause__` (an `OSError` with `errno` and `strerror`).
pub(crate) fn to_pyerr(py: Python<'_>, err: Error) -> PyErr {
    match error_instance(py, &err) {
        Ok(instance) => {
            let pyerr = PyErr::from_value(instance);
            if let Some(errno) = err.errno() {
                // OSError(errno, strerror, filename) picks the matching subclass.
                let strerror = std::io::Error::from_raw_os_error(errno).to_string();
                let strerror = match strerror.rfind(" (os error ") {
                    Some(at) => strerror[..at].to_string(),
                    None => strerror,
                };
                let filename = err.path().map(|p| p.as_os_str().to_os_string());
                let cause = PyOSError::new_err((errno, strerror, filename));
                pyerr.set_cause(py, Some(cause));
            }
            pyerr
        }
        Err(lookup_failed) => {
            // Without `h5ckpt.errors` (a broken install, an interpreter shutting
            // down) the error still says what went wrong.
            let fallback = match err.errno() {
                Some(errno) => PyOSError::new_err((errno, err.to_string())),
                None => PyRuntimeError::new_err(err.to_string()),
            };
            fallback.set_cause(py, Some(lookup_failed));
            fallback
        }
    }
}

pub(crate) fn value_error(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    to_pyerr(py, Error::invalid(msg))
}

/// Runs `f` with the GIL released, in this process's thread pool, and maps its
/// error: the one pattern every function that does I/O or hashing goes through.
pub(crate) fn detach<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: FnOnce() -> Result<T, Error> + Send,
    T: Send,
{
    py.detach(|| crate::parallel::install(f))
        .map_err(|e| to_pyerr(py, e))
}

/// [`detach`] for work that runs on the calling thread: `f` uses no rayon of its
/// own, or only through `crate::parallel`, which takes work to the pool when there
/// is enough of it. A small file is then verified or sealed without waking a pool
/// thread and waiting for it.
pub(crate) fn detach_here<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: FnOnce() -> Result<T, Error> + Send,
    T: Send,
{
    py.detach(f).map_err(|e| to_pyerr(py, e))
}

// ---------------------------------------------------------------------------
// Arguments

/// An exported buffer read as plain bytes: bytes, bytearray, memoryview, numpy
/// arrays of any dtype and shape (0-d included), anything with the buffer protocol,
/// as long as it is C-contiguous. The export (and so the memory) lives until drop.
struct ByteBuffer(Box<ffi::Py_buffer>);

impl ByteBuffer {
    fn get(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Self> {
        Self::get_with(obj, what, ffi::PyBUF_SIMPLE)
    }

    /// A writable export (bytearray, numpy array, writable memoryview).
    fn get_writable(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Self> {
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
    fn bytes(&self) -> &[u8] {
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
    fn bytes_mut(&mut self) -> &mut [u8] {
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

/// Copies an optional HMAC key out of any bytes-like object.
fn key_bytes(key: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<u8>>> {
    key.map(|k| {
        let bytes = ByteBuffer::get(k, "hmac_key")?.bytes().to_vec();
        if bytes.is_empty() {
            return Err(value_error(k.py(), "hmac_key must not be empty"));
        }
        Ok(bytes)
    })
    .transpose()
}

// Scalars and paths are taken as Python objects and converted here, so that a bad
// value is a `CheckpointValueError` naming the argument and what it must be, never a
// bare OverflowError, TypeError or UnicodeEncodeError from the generic conversion.

/// `repr(obj)`, cut short: an int of 400 digits is not a message.
fn short_repr(obj: &Bound<'_, PyAny>) -> String {
    let text = obj
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| format!("<{} object>", obj.get_type()));
    if text.chars().count() <= 60 {
        text
    } else {
        text.chars().take(59).chain(std::iter::once('…')).collect()
    }
}

/// Whether `err` is what a failed conversion raises (as opposed to, say, a
/// KeyboardInterrupt from inside `__index__`, which must propagate as it is).
fn conversion_failed(py: Python<'_>, err: &PyErr) -> bool {
    err.is_instance_of::<PyTypeError>(py)
        || err.is_instance_of::<PyOverflowError>(py)
        || err.is_instance_of::<PyValueError>(py)
}

/// An integer argument in `min..=max` (`range` says it in words); bool is refused.
pub(crate) fn int_in<T: TryFrom<i128>>(
    obj: &Bound<'_, PyAny>,
    name: &str,
    (min, max, range): (i128, i128, &str),
) -> PyResult<T> {
    let py = obj.py();
    let refuse = || {
        value_error(
            py,
            format!("{name} must be an integer {range}, got {}", short_repr(obj)),
        )
    };
    if obj.is_instance_of::<PyBool>() {
        return Err(refuse());
    }
    let wide = match obj.extract::<i128>() {
        Ok(v) => v,
        Err(e) if conversion_failed(py, &e) => return Err(refuse()),
        Err(e) => return Err(e),
    };
    if !(min..=max).contains(&wide) {
        return Err(refuse());
    }
    T::try_from(wide).map_err(|_| refuse())
}

pub(crate) const U64: (i128, i128, &str) = (0, u64::MAX as i128, "from 0 to 2**64-1");
/// Any C int: what the OS makes of a bad descriptor is its own error (EBADF).
const FD: (i128, i128, &str) = (
    i32::MIN as i128,
    i32::MAX as i128,
    "from -2**31 to 2**31-1 (a file descriptor)",
);
/// Blosc frames hold less than 2 GiB.
const CHUNK_BYTES: (i128, i128, &str) = (0, i32::MAX as i128, "from 0 to 2**31-1");

pub(crate) fn u64_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<u64> {
    int_in(obj, name, U64)
}

fn usize_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<usize> {
    int_in(
        obj,
        name,
        (
            0,
            usize::MAX as i128,
            "from 0 to the largest size of this platform",
        ),
    )
}

/// A float argument: anything Python converts with `float()` except text, and
/// without overflow (an int of 400 digits has no float).
pub(crate) fn f64_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<f64> {
    let py = obj.py();
    match obj.extract::<f64>() {
        Ok(v) => Ok(v),
        Err(e) if conversion_failed(py, &e) => Err(value_error(
            py,
            format!(
                "{name} must be a real number that fits a 64-bit float, got {} ({})",
                short_repr(obj),
                e.value(py)
            ),
        )),
        Err(e) => Err(e),
    }
}

/// A text argument that Rust can hold: a str without lone surrogates.
pub(crate) fn str_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<String> {
    let py = obj.py();
    match obj.extract::<String>() {
        Ok(v) => Ok(v),
        Err(e) if conversion_failed(py, &e) => {
            let problem = if obj.is_instance_of::<PyString>() {
                "must be text without lone surrogates (it is not UTF-8)"
            } else {
                "must be a str"
            };
            Err(value_error(
                py,
                format!("{name} {problem}, got {}", short_repr(obj)),
            ))
        }
        Err(e) => Err(e),
    }
}

pub(crate) fn opt_str_arg(obj: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<Option<String>> {
    obj.filter(|o| !o.is_none())
        .map(|o| str_arg(o, name))
        .transpose()
}

/// A file name argument (str or os.PathLike) that the OS can be given.
pub(crate) fn path_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<PathBuf> {
    let py = obj.py();
    let path = match obj.extract::<PathBuf>() {
        Ok(p) => p,
        Err(e) if conversion_failed(py, &e) => {
            let problem = if obj.is_instance_of::<PyString>() {
                "has a character that is no file name byte"
            } else {
                "must be a str or os.PathLike"
            };
            return Err(value_error(
                py,
                format!("{name} {problem}, got {}", short_repr(obj)),
            ));
        }
        Err(e) => return Err(e),
    };
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(value_error(
            py,
            format!(
                "{name} contains a NUL character, which no file name can hold: {}",
                short_repr(obj)
            ),
        ));
    }
    Ok(path)
}

fn chunk_log2(py: Python<'_>, chunk_size: &Bound<'_, PyAny>) -> PyResult<u32> {
    let size = u64_arg(chunk_size, "chunk_size")?;
    header::chunk_log2_of(size).map_err(|e| to_pyerr(py, e))
}

// ---------------------------------------------------------------------------
// Classes

/// A parsed, self-consistent h5ckpt header (its header digest checked).
#[pyclass(frozen, name = "Header", module = "h5ckpt._native")]
pub struct PyHeader(Header);

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

/// One file of a directory scan whose name matches `{prefix}_batch_<digits>.h5`.
#[pyclass(frozen, name = "Entry", module = "h5ckpt._native")]
pub struct PyEntry {
    entry: Entry,
    header: Option<Py<PyHeader>>,
}

#[pymethods]
impl PyEntry {
    #[getter]
    fn path(&self) -> &OsStr {
        self.entry.path.as_os_str()
    }
    #[getter]
    fn name(&self) -> &str {
        &self.entry.name
    }
    #[getter]
    fn batch_idx(&self) -> u64 {
        self.entry.batch_idx
    }
    #[getter]
    fn size(&self) -> u64 {
        self.entry.identity.size
    }
    #[getter]
    fn mtime_ns(&self) -> i128 {
        self.entry.identity.mtime_ns
    }
    #[getter]
    fn ctime_ns(&self) -> i128 {
        self.entry.identity.ctime_ns
    }
    #[getter]
    fn inode(&self) -> u64 {
        self.entry.identity.inode
    }
    #[getter]
    fn device(&self) -> u64 {
        self.entry.identity.device
    }
    #[getter]
    fn kind(&self) -> &'static str {
        self.entry.kind.as_str()
    }
    #[getter]
    fn header(&self, py: Python<'_>) -> Option<Py<PyHeader>> {
        self.header.as_ref().map(|h| h.clone_ref(py))
    }
    #[getter]
    fn error(&self) -> Option<&str> {
        self.entry.error.as_deref()
    }

    fn __repr__(&self) -> String {
        format!(
            "Entry(name={:?}, batch_idx={}, kind={:?}, size={}, error={:?})",
            self.entry.name,
            self.entry.batch_idx,
            self.entry.kind.as_str(),
            self.entry.identity.size,
            self.entry.error
        )
    }
}

fn py_header(py: Python<'_>, header: Header) -> PyResult<Bound<'_, PyHeader>> {
    Bound::new(py, PyHeader(header))
}

// ---------------------------------------------------------------------------
// Functions

/// Payload digest (docs/format.md) of an in-memory byte string.
#[pyfunction]
#[pyo3(signature = (data, chunk_size = None))]
fn tree_digest<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    chunk_size: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let log2 = match chunk_size {
        Some(c) => chunk_log2(py, c)?,
        None => header::DEFAULT_CHUNK_LOG2,
    };
    let buf = ByteBuffer::get(data, "data")?;
    let bytes = buf.bytes();
    let root = detach(py, || Ok(digest::tree_digest(bytes, log2)))?;
    Ok(PyBytes::new(py, &root))
}

/// Parse and check the first 512 bytes of a file (no payload check).
#[pyfunction]
fn parse_header<'py>(py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyHeader>> {
    let buf = ByteBuffer::get(data, "data")?;
    let bytes = buf.bytes();
    let header = detach_here(py, || header::parse(bytes))?;
    py_header(py, header)
}

/// Read and parse a file's header; checks the file length against it.
#[pyfunction]
fn read_header<'py>(py: Python<'py>, path: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyHeader>> {
    let path = path_arg(path, "path")?;
    let header = detach(py, || verify::read_header(&path))?;
    py_header(py, header)
}

/// Check header, length, payload digest and (keyed) HMAC tag of one file.
#[pyfunction]
#[pyo3(signature = (path, hmac_key = None))]
fn verify_file<'py>(
    py: Python<'py>,
    path: &Bound<'py, PyAny>,
    hmac_key: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyHeader>> {
    let path = path_arg(path, "path")?;
    let key = key_bytes(hmac_key)?;
    let header = detach(py, || verify::verify_file(&path, key.as_deref()))?;
    py_header(py, header)
}

/// `verify_file` of open descriptors (kept open), in parallel; `paths` name them in
/// messages. Failures are returned, not raised.
#[pyfunction]
#[pyo3(signature = (fds, paths, hmac_key = None))]
fn verify_fds<'py>(
    py: Python<'py>,
    fds: Vec<i32>,
    paths: Vec<PathBuf>,
    hmac_key: Option<&Bound<'py, PyAny>>,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    if fds.len() != paths.len() {
        return Err(value_error(py, "fds and paths must have the same length"));
    }
    let key = key_bytes(hmac_key)?;
    let results = detach_here(py, || Ok(verify::verify_fds(&fds, &paths, key.as_deref())))?;
    results
        .into_iter()
        .map(|r| match r {
            Ok(h) => py_header(py, h).map(Bound::into_any),
            Err(e) => error_instance(py, &e),
        })
        .collect()
}

/// `verify_file` over many files in parallel; failures are returned, not raised.
#[pyfunction]
#[pyo3(signature = (paths, hmac_key = None))]
fn verify_files<'py>(
    py: Python<'py>,
    paths: Vec<Bound<'py, PyAny>>,
    hmac_key: Option<&Bound<'py, PyAny>>,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let paths = paths
        .iter()
        .map(|p| path_arg(p, "path"))
        .collect::<PyResult<Vec<_>>>()?;
    let key = key_bytes(hmac_key)?;
    // Per-file failures are values here, not errors of the call.
    let results = detach(py, || Ok(verify::verify_files(&paths, key.as_deref())))?;
    results
        .into_iter()
        .map(|r| match r {
            Ok(h) => py_header(py, h).map(Bound::into_any),
            Err(e) => error_instance(py, &e),
        })
        .collect()
}

/// A raw pointer that may cross into the GIL-free closure; the memory it points to
/// is owned by a `bytes` object that nothing else can see yet.
struct Unshared(*mut u8);
// SAFETY: the pointee is reachable only through this pointer until the closure ends.
unsafe impl Send for Unshared {}

/// Asks the kernel for transparent huge pages over the 2 MiB-aligned part of the
/// fresh buffer at `ptr`, as numpy does for its large arrays: reading a file into it
/// then takes one page fault per 2 MiB instead of one per 4 KiB. Only a hint.
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        if len < 2 * HUGE {
            return; // numpy's threshold too: small buffers stay on small pages
        }
        let start = (ptr as usize).div_ceil(HUGE) * HUGE;
        let end = (ptr as usize).saturating_add(len) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside the allocation at `ptr` (page aligned, as
            // madvise needs), which stays alive; MADV_HUGEPAGE changes no contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// Read a whole file once, verify it from memory, return its header and bytes.
#[pyfunction]
#[pyo3(signature = (path, hmac_key = None))]
fn read_verified<'py>(
    py: Python<'py>,
    path: &Bound<'py, PyAny>,
    hmac_key: Option<&Bound<'py, PyAny>>,
) -> PyResult<(Bound<'py, PyHeader>, Bound<'py, PyBytes>)> {
    let path = path_arg(path, "path")?;
    let key = key_bytes(hmac_key)?;
    let (file, len) = detach(py, || verify::open(&path))?;
    let len = isize::try_from(len)
        .map_err(|_| PyMemoryError::new_err("file too large to read into memory"))?;
    // An uninitialised bytes object of the file's length: the file is read straight
    // into it (one copy, from the page cache), with the GIL released.
    // SAFETY: a NULL source asks CPython for an uninitialised object of `len` bytes.
    let bytes = unsafe {
        Bound::from_owned_ptr_or_err(py, ffi::PyBytes_FromStringAndSize(std::ptr::null(), len))?
            .cast_into_unchecked::<PyBytes>()
    };
    // SAFETY: `bytes` is a bytes object.
    let ptr = Unshared(unsafe { ffi::PyBytes_AsString(bytes.as_ptr()) }.cast::<u8>());
    let len = len as usize;
    advise_huge_pages(ptr.0, len);
    let header = detach(py, move || {
        let ptr = ptr;
        // SAFETY: `ptr` addresses `len` writable bytes owned by `bytes`, which outlives
        // this closure and is not visible to any other code yet. They are handed over
        // as uninitialised memory, which read_verified_into fills completely before
        // it returns Ok; on error `bytes` is dropped unseen.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(ptr.0.cast::<std::mem::MaybeUninit<u8>>(), len)
        };
        verify::read_verified_into(&file, &path, key.as_deref(), buf)
    })?;
    Ok((py_header(py, header)?, bytes))
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
    let fd: i32 = int_in(fd, "fd", FD)?;
    let path = path
        .filter(|p| !p.is_none())
        .map(|p| path_arg(p, "path"))
        .transpose()?;
    let key = key_bytes(hmac_key)?;
    let mut dst = ByteBuffer::get_writable(out, "out")?;
    let buf = dst.bytes_mut();
    let header = detach_here(py, || {
        verify::read_verified_fd(fd, path.as_deref(), key.as_deref(), buf)
    })?;
    py_header(py, header)
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
    let fd: i32 = int_in(fd, "fd", FD)?;
    let chunk_log2 = match chunk_size {
        Some(c) => chunk_log2(py, c)?,
        None => header::DEFAULT_CHUNK_LOG2,
    };
    let batch_idx = u64_arg(batch_idx, "batch_idx")?;
    let loss = f64_arg(loss, "loss")?;
    let timestamp = f64_arg(timestamp, "timestamp")?;
    let key = key_bytes(hmac_key)?;
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
    let seal = Seal {
        batch_idx,
        loss,
        timestamp,
        key: key.as_deref(),
        durable,
        chunk_log2,
    };
    let header = detach_here(py, || crate::finalize::finalize_fd(fd, &segs, &seal))?;
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
    let fd: i32 = int_in(fd, "fd", FD)?;
    let chunk_log2 = match chunk_size {
        Some(c) => chunk_log2(py, c)?,
        None => header::DEFAULT_CHUNK_LOG2,
    };
    let seal = Seal {
        batch_idx: u64_arg(batch_idx, "batch_idx")?,
        loss: f64_arg(loss, "loss")?,
        timestamp: f64_arg(timestamp, "timestamp")?,
        key: None,
        durable,
        chunk_log2,
    };
    let key = key_bytes(hmac_key)?;
    let seal = Seal {
        key: key.as_deref(),
        ..seal
    };
    // `bytes` is immutable: what is hashed is what is written.
    let image = image.as_bytes();
    let header = detach_here(py, || crate::finalize::seal_image_fd(fd, image, &seal))?;
    py_header(py, header)
}

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
    let chunk_bytes: usize = int_in(chunk_bytes, "chunk_bytes", CHUNK_BYTES)?;
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
fn blosc_max_frame_len(chunk_bytes: &Bound<'_, PyAny>) -> PyResult<usize> {
    let chunk_bytes: usize = int_in(chunk_bytes, "chunk_bytes", CHUNK_BYTES)?;
    Ok(crate::blosc::max_frame_len(chunk_bytes))
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
    let fd: i32 = int_in(fd, "fd", FD)?;
    let offset = offset.map(|o| u64_arg(o, "offset")).transpose()?;
    let length = length.map(|l| u64_arg(l, "length")).transpose()?;
    let (offset, length) = (offset.unwrap_or(0), length.unwrap_or(0));
    py.detach(|| crate::finalize::start_writeback_fd(fd, offset, length));
    Ok(())
}

/// The batch index of a checkpoint file name of `prefix`, or `None`: the one name
/// rule (a name that is not valid UTF-8 is no checkpoint, as for the scan).
#[pyfunction]
fn checkpoint_batch(name: &Bound<'_, PyString>, prefix: &Bound<'_, PyString>) -> Option<u64> {
    crate::scan::parse_name(name.to_str().ok()?, prefix.to_str().ok()?)
}

/// `(prefix, batch_idx)` of a checkpoint file name of any prefix, or `None`.
#[pyfunction]
fn checkpoint_name_parts(name: &Bound<'_, PyString>) -> Option<(String, u64)> {
    let (prefix, batch) = crate::scan::parse_any_name(name.to_str().ok()?)?;
    Some((prefix.to_owned(), batch))
}

/// The file name of the checkpoint of `batch_idx` under `prefix`.
#[pyfunction]
fn checkpoint_name(prefix: &str, batch_idx: &Bound<'_, PyAny>) -> PyResult<String> {
    Ok(crate::scan::checkpoint_name(
        prefix,
        u64_arg(batch_idx, "batch_idx")?,
    ))
}

/// `"h5ckpt"`, `"legacy"` or `"foreign"` from a file's first bytes.
#[pyfunction]
fn file_kind(head: &[u8]) -> &'static str {
    crate::scan::Kind::of_head(head).as_str()
}

/// Regular files named `{prefix}_batch_<digits>.h5`, headers read in parallel,
/// sorted by `(batch_idx, name)`.
#[pyfunction]
fn scan<'py>(
    py: Python<'py>,
    directory: &Bound<'py, PyAny>,
    prefix: &Bound<'py, PyAny>,
) -> PyResult<Vec<Bound<'py, PyEntry>>> {
    let directory = path_arg(directory, "directory")?;
    let prefix = str_arg(prefix, "prefix")?;
    let entries = detach(py, || crate::scan::scan(&directory, &prefix))?;
    entries
        .into_iter()
        .map(|mut entry| {
            let header = entry
                .header
                .take()
                .map(|h| py_header(py, h).map(Bound::unbind))
                .transpose()?;
            Bound::new(py, PyEntry { entry, header })
        })
        .collect()
}

/// Indices of `(batch_idx, valid, loss)` candidates that the policy deletes.
#[pyfunction]
#[pyo3(signature = (
    candidates, keep_last_n, keep_every = None, keep_best_n = None, maximize = false,
    delete_invalid = false,
))]
#[allow(clippy::type_complexity)]
fn plan_retention<'py>(
    py: Python<'py>,
    candidates: Vec<(Bound<'py, PyAny>, bool, Bound<'py, PyAny>)>,
    keep_last_n: Option<&Bound<'py, PyAny>>,
    keep_every: Option<&Bound<'py, PyAny>>,
    keep_best_n: Option<&Bound<'py, PyAny>>,
    maximize: bool,
    delete_invalid: bool,
) -> PyResult<Vec<usize>> {
    let candidates = candidates
        .iter()
        .map(|(b, v, l)| {
            Ok((
                u64_arg(b, "batch_idx of a candidate")?,
                *v,
                f64_arg(l, "loss of a candidate")?,
            ))
        })
        .collect::<PyResult<Vec<_>>>()?;
    let keep_every = keep_every
        .map(|k| match u64_arg(k, "keep_every")? {
            0 => Err(value_error(py, "keep_every must be at least 1")),
            k => Ok(k),
        })
        .transpose()?;
    let policy = Policy {
        keep_last_n: keep_last_n
            .map(|n| usize_arg(n, "keep_last_n"))
            .transpose()?,
        keep_every,
        keep_best_n: keep_best_n
            .map(|n| usize_arg(n, "keep_best_n"))
            .transpose()?
            .unwrap_or(0),
        maximize,
        delete_invalid,
    };
    retention::plan(&candidates, &policy).map_err(|e| to_pyerr(py, e))
}

/// fsync a directory, so that a rename in it is durable.
#[pyfunction]
fn fsync_directory(py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<()> {
    let path = path_arg(path, "path")?;
    detach_here(py, || crate::finalize::fsync_directory(&path))
}

/// Rust core of h5ckpt: hashing, headers, verification, scanning and retention.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAGIC", PyBytes::new(py, &header::MAGIC))?;
    m.add("HDF5_SIGNATURE", PyBytes::new(py, &header::HDF5_SIGNATURE))?;
    m.add("HEADER_SIZE", header::HEADER_SIZE)?;
    m.add("FORMAT_MAJOR", header::FORMAT_MAJOR)?;
    m.add("FORMAT_MINOR", header::FORMAT_MINOR)?;
    m.add("DEFAULT_CHUNK_SIZE", header::DEFAULT_CHUNK_SIZE)?;
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
    m.add_class::<PyHeader>()?;
    m.add_class::<PyEntry>()?;
    m.add_class::<catalog::PyCheckpointInfo>()?;
    m.add_class::<catalog::PyCatalog>()?;
    m.add_function(wrap_pyfunction!(tree_digest, m)?)?;
    m.add_function(wrap_pyfunction!(parse_header, m)?)?;
    m.add_function(wrap_pyfunction!(read_header, m)?)?;
    m.add_function(wrap_pyfunction!(verify_file, m)?)?;
    m.add_function(wrap_pyfunction!(verify_files, m)?)?;
    m.add_function(wrap_pyfunction!(verify_fds, m)?)?;
    m.add_function(wrap_pyfunction!(read_verified, m)?)?;
    m.add_function(wrap_pyfunction!(read_verified_fd, m)?)?;
    m.add_function(wrap_pyfunction!(finalize, m)?)?;
    m.add_function(wrap_pyfunction!(seal_image, m)?)?;
    m.add_function(wrap_pyfunction!(start_writeback, m)?)?;
    m.add_function(wrap_pyfunction!(blosc_compress_chunks, m)?)?;
    m.add_function(wrap_pyfunction!(blosc_ratio, m)?)?;
    m.add_function(wrap_pyfunction!(blosc_max_frame_len, m)?)?;
    m.add_function(wrap_pyfunction!(scan, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_batch, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_name_parts, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_name, m)?)?;
    m.add_function(wrap_pyfunction!(file_kind, m)?)?;
    m.add_function(wrap_pyfunction!(plan_retention, m)?)?;
    m.add_function(wrap_pyfunction!(fsync_directory, m)?)?;
    Ok(())
}
