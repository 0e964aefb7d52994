//! Checkpoint names and directory listings: the name rule, the format sniff,
//! `scan` and its `Entry`.

use std::ffi::OsStr;

use pyo3::prelude::*;
use pyo3::types::PyString;

use super::args::{path_arg, str_arg, u64_arg};
use super::errors::detach;
use super::header::{py_header, PyHeader};
use crate::scan::Entry;

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
fn checkpoint_name(prefix: &Bound<'_, PyAny>, batch_idx: &Bound<'_, PyAny>) -> PyResult<String> {
    let prefix = str_arg(prefix, "prefix")?;
    let batch_idx = u64_arg(batch_idx, "batch_idx")?;
    Ok(crate::scan::checkpoint_name(&prefix, batch_idx))
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

/// One file of a directory scan whose name matches `{prefix}_batch_<digits>.h5`.
#[pyclass(frozen, name = "Entry", module = "h5ckpt._native")]
struct PyEntry {
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

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEntry>()?;
    m.add_function(wrap_pyfunction!(checkpoint_batch, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_name_parts, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_name, m)?)?;
    m.add_function(wrap_pyfunction!(file_kind, m)?)?;
    m.add_function(wrap_pyfunction!(scan, m)?)?;
    Ok(())
}
