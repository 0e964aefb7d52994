//! Arguments converted into owned Rust values, a bad one refused as a
//! `CheckpointValueError` that names it.

use std::os::fd::RawFd;
use std::path::PathBuf;

use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyString};

use super::buffer::ByteBuffer;
use super::errors::{to_pyerr, value_error};
use crate::header;

/// Copies an optional HMAC key out of any bytes-like object.
pub(super) fn key_bytes(key: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<u8>>> {
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
fn int_in<T: TryFrom<i128>>(
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

const U64: (i128, i128, &str) = (0, u64::MAX as i128, "from 0 to 2**64-1");
/// Any C int: what becomes of a negative descriptor or one that is not open is up to
/// the callee (see [`crate::fd`]; the writeback hint ignores them).
const FD: (i128, i128, &str) = (
    i32::MIN as i128,
    i32::MAX as i128,
    "from -2**31 to 2**31-1 (a file descriptor)",
);
/// Blosc frames hold less than 2 GiB.
const CHUNK_BYTES: (i128, i128, &str) = (0, i32::MAX as i128, "from 0 to 2**31-1");

/// A file descriptor the caller owns (see [`crate::fd`]).
pub(super) fn fd_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<RawFd> {
    int_in(obj, name, FD)
}

/// The length of the chunks to cut into Blosc frames.
pub(super) fn chunk_bytes_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<usize> {
    int_in(obj, name, CHUNK_BYTES)
}

pub(super) fn u64_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<u64> {
    int_in(obj, name, U64)
}

pub(super) fn usize_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<usize> {
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
pub(super) fn f64_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<f64> {
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
pub(super) fn str_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<String> {
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

/// A file name argument that may be None.
pub(super) fn opt_path_arg(
    obj: Option<&Bound<'_, PyAny>>,
    name: &str,
) -> PyResult<Option<PathBuf>> {
    obj.filter(|o| !o.is_none())
        .map(|o| path_arg(o, name))
        .transpose()
}

/// A text argument that may be None.
pub(super) fn opt_str_arg(obj: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<Option<String>> {
    obj.filter(|o| !o.is_none())
        .map(|o| str_arg(o, name))
        .transpose()
}

/// A file name argument (str or os.PathLike) that the OS can be given.
pub(super) fn path_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<PathBuf> {
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

/// The log2 of a `chunk_size` argument; `None` means the default chunk size.
pub(super) fn chunk_log2_arg(
    py: Python<'_>,
    chunk_size: Option<&Bound<'_, PyAny>>,
) -> PyResult<u32> {
    let Some(chunk_size) = chunk_size else {
        return Ok(header::DEFAULT_CHUNK_LOG2);
    };
    let size = u64_arg(chunk_size, "chunk_size")?;
    header::chunk_log2_of(size).map_err(|e| to_pyerr(py, e))
}
