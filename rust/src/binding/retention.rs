//! `plan_retention`: which checkpoints a retention policy deletes.

use pyo3::prelude::*;

use super::args::{f64_arg, u64_arg, usize_arg};
use super::errors::{to_pyerr, value_error};
use crate::retention::{self, Policy};

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

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(plan_retention, m)?)?;
    Ok(())
}
