//! Crate errors as the exceptions of `h5ckpt.errors`, and the one way GIL-free work
//! is run and its error raised.

use pyo3::exceptions::{PyOSError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};

use crate::error::{os_class, Error, OsClass};

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
pub(super) fn error_instance<'py>(py: Python<'py>, err: &Error) -> PyResult<Bound<'py, PyAny>> {
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
        Error::Version {
            major,
            minor,
            supported,
            ..
        } => {
            ctx.set_item("format_major", *major)?;
            ctx.set_item("format_minor", *minor)?;
            ctx.set_item("supported_major", *supported)?;
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
pub(super) fn to_pyerr(py: Python<'_>, err: Error) -> PyErr {
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

/// A `CheckpointValueError` saying `msg`.
pub(super) fn value_error(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    to_pyerr(py, Error::invalid(msg))
}

/// Runs `f` with the GIL released, in this process's thread pool, and maps its
/// error: the one pattern every function that does I/O or hashing goes through.
pub(super) fn detach<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: FnOnce() -> Result<T, Error> + Send,
    T: Send,
{
    detach_on_this_thread(py, || crate::parallel::install(f))
}

/// [`detach`] for work that must stay on the calling thread (it takes a lock that
/// no worker of the pool may wait for) and runs only its parallel parts in the pool.
pub(super) fn detach_on_this_thread<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: FnOnce() -> Result<T, Error> + Send,
    T: Send,
{
    py.detach(f).map_err(|e| to_pyerr(py, e))
}
