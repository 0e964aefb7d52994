//! The name rule and the format sniff of `crate::scan`. Directories are listed
//! through the catalog (`binding::catalog`).

use pyo3::prelude::*;
use pyo3::types::PyString;

use super::args::{str_arg, u64_arg};

/// The batch index of a checkpoint file name of `prefix`, or `None`: the one name
/// rule (a name that is not valid UTF-8 is no checkpoint, as for a listing).
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

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(checkpoint_batch, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_name_parts, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_name, m)?)?;
    m.add_function(wrap_pyfunction!(file_kind, m)?)?;
    Ok(())
}
