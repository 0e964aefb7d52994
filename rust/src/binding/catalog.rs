//! `h5ckpt.CheckpointInfo` and `h5ckpt._native.Catalog`: listing a directory with
//! what is known of its files, building the info objects here rather than in
//! Python (10,000 of them cost about a millisecond this way).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use super::args::{f64_arg, opt_str_arg, path_arg, str_arg, u64_arg};
use super::errors::{detach_on_this_thread, to_pyerr, value_error};
use crate::catalog::{Catalog, Record, Status, Verdict};
use crate::error::Error;
use crate::scan::Identity;

/// What an info object holds, gathered while the GIL is released.
struct InfoData {
    path: PathBuf,
    name: String,
    batch_idx: u64,
    loss: f64,
    timestamp: f64,
    size_bytes: u64,
    status: Status,
    verified: bool,
    error: Option<String>,
    identity: Identity,
}

impl InfoData {
    fn of(record: &Record, keyed: bool) -> Self {
        let (status, verified, error) = record.assess(keyed);
        let (loss, timestamp) = record.loss_and_timestamp();
        let e = &record.entry;
        InfoData {
            path: e.path.clone(),
            name: e.name.clone(),
            batch_idx: e.batch_idx,
            loss,
            timestamp,
            size_bytes: e.identity.size,
            status,
            verified,
            error: error.map(|e| e.into_owned()),
            identity: e.identity,
        }
    }
}

/// One checkpoint file of a directory, as ``CheckpointManager.list_checkpoints``
/// reports it. Immutable; equal when every public field is (NaN equal to NaN).
///
/// ``status`` is ``"valid"`` (an h5ckpt file, every byte verified),
/// ``"unverified"`` (h5ckpt header intact, payload not hashed yet), ``"legacy"`` (a
/// file of the predecessor's format; checked when ``verified`` is true) or
/// ``"invalid"`` (corrupt, truncated, tampered, foreign content; ``error`` says
/// why).
#[pyclass(frozen, name = "CheckpointInfo", module = "h5ckpt")]
pub struct PyCheckpointInfo {
    data: InfoData,
    path_object: PyOnceLock<Py<PyAny>>,
}

impl PyCheckpointInfo {
    fn new_from(data: InfoData) -> Self {
        PyCheckpointInfo {
            data,
            path_object: PyOnceLock::new(),
        }
    }

    fn key(&self) -> (&PathBuf, u64, u64, u64, u64, Status, bool, Option<&str>) {
        let d = &self.data;
        (
            &d.path,
            d.batch_idx,
            float_key(d.loss),
            float_key(d.timestamp),
            d.size_bytes,
            d.status,
            d.verified,
            d.error.as_deref(),
        )
    }
}

/// Bits that are equal exactly when the floats are, counting NaN equal to NaN.
fn float_key(x: f64) -> u64 {
    if x.is_nan() {
        f64::NAN.to_bits()
    } else if x == 0.0 {
        0
    } else {
        x.to_bits()
    }
}

#[pymethods]
impl PyCheckpointInfo {
    #[new]
    #[pyo3(signature = (path, batch_idx, loss, timestamp, size_bytes, status, verified = false, error = None))]
    #[allow(clippy::too_many_arguments)]
    fn py_new(
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        batch_idx: &Bound<'_, PyAny>,
        loss: &Bound<'_, PyAny>,
        timestamp: &Bound<'_, PyAny>,
        size_bytes: &Bound<'_, PyAny>,
        status: &Bound<'_, PyAny>,
        verified: bool,
        error: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let path = path_arg(path, "path")?;
        let status = Status::parse(&str_arg(status, "status")?).map_err(|e| to_pyerr(py, e))?;
        let error = opt_str_arg(error, "error")?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self::new_from(InfoData {
            name,
            batch_idx: u64_arg(batch_idx, "batch_idx")?,
            loss: f64_arg(loss, "loss")?,
            timestamp: f64_arg(timestamp, "timestamp")?,
            size_bytes: u64_arg(size_bytes, "size_bytes")?,
            status,
            verified,
            error,
            identity: Identity::default(),
            path,
        }))
    }

    /// The file (a ``pathlib.Path``).
    #[getter]
    fn path(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        // Made on first use: 10,000 Path objects would cost more than the scan.
        self.path_object
            .get_or_try_init(py, || {
                // PyO3 converts a Rust path into a `pathlib.Path`.
                Ok::<_, PyErr>(self.data.path.as_path().into_pyobject(py)?.unbind())
            })
            .map(|p| p.clone_ref(py))
    }

    /// Batch index, from the file name.
    #[getter]
    fn batch_idx(&self) -> u64 {
        self.data.batch_idx
    }

    /// Loss at that batch (NaN when unknown).
    #[getter]
    fn loss(&self) -> f64 {
        self.data.loss
    }

    /// Save time, seconds since the epoch (NaN when unknown).
    #[getter]
    fn timestamp(&self) -> f64 {
        self.data.timestamp
    }

    /// File size in bytes.
    #[getter]
    fn size_bytes(&self) -> u64 {
        self.data.size_bytes
    }

    /// ``"valid"``, ``"unverified"``, ``"legacy"`` or ``"invalid"``.
    #[getter]
    fn status(&self) -> &'static str {
        self.data.status.as_str()
    }

    /// Whether the whole file was checked for this status.
    #[getter]
    fn verified(&self) -> bool {
        self.data.verified
    }

    /// Why the file is invalid (None otherwise).
    #[getter]
    fn error(&self) -> Option<&str> {
        self.data.error.as_deref()
    }

    /// True when the file was verified intact (h5ckpt or legacy).
    #[getter]
    fn is_valid(&self) -> bool {
        self.data.verified && matches!(self.data.status, Status::Valid | Status::Legacy)
    }

    /// Pickles (and copies) as the constructor call that makes an equal object.
    #[allow(clippy::type_complexity)]
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(
        Bound<'py, pyo3::types::PyType>,
        (
            Py<PyAny>,
            u64,
            f64,
            f64,
            u64,
            &'static str,
            bool,
            Option<String>,
        ),
    )> {
        let py = slf.py();
        let this = slf.get();
        let d = &this.data;
        Ok((
            slf.get_type(),
            (
                this.path(py)?,
                d.batch_idx,
                d.loss,
                d.timestamp,
                d.size_bytes,
                d.status.as_str(),
                d.verified,
                d.error.clone(),
            ),
        ))
    }

    fn __eq__(&self, other: PyRef<'_, Self>) -> bool {
        self.key() == other.key()
    }

    fn __hash__(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.key().hash(&mut h);
        h.finish()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let d = &self.data;
        let path = self.path(py)?;
        let error = match &d.error {
            Some(e) => e.into_pyobject(py)?.repr()?.to_string(),
            None => "None".to_string(),
        };
        Ok(format!(
            "CheckpointInfo(path={}, batch_idx={}, loss={}, timestamp={}, size_bytes={}, \
             status='{}', verified={}, error={})",
            path.bind(py).repr()?,
            d.batch_idx,
            d.loss.into_pyobject(py)?.repr()?,
            d.timestamp.into_pyobject(py)?.repr()?,
            d.size_bytes,
            d.status.as_str(),
            if d.verified { "True" } else { "False" },
            error,
        ))
    }
}

/// The checkpoint files of one directory and prefix, with what verifying them
/// showed (by file identity). Thread-safe: the catalog is locked only while the
/// GIL is released; nobody waits for the GIL while holding a lock, and no worker of
/// the thread pool ever waits for one.
///
/// Fork-safe: a child of `fork()` may inherit the catalog locked by a thread that
/// exists only in the parent, or half-updated. So the state belongs to a process:
/// the first call in a process that did not make it makes a fresh one.
#[pyclass(frozen, name = "Catalog", module = "h5ckpt._native")]
pub struct PyCatalog {
    directory: PathBuf,
    prefix: String,
    keyed: bool,
    /// The owning process and its state. Locked only with the GIL held and never
    /// across a release of it, so no thread holds it when `os.fork()` runs (the
    /// forking thread holds the GIL).
    state: Mutex<(u32, Arc<State>)>,
}

struct State {
    catalog: Mutex<Catalog>,
    /// The info objects of the records of the last listing (and of later notes),
    /// by record version: a record that did not change gets the same object back.
    infos: Mutex<HashMap<u64, Py<PyCheckpointInfo>>>,
}

impl State {
    fn new(directory: &Path, prefix: &str, keyed: bool) -> Arc<Self> {
        Arc::new(State {
            catalog: Mutex::new(Catalog::new(
                directory.to_path_buf(),
                prefix.to_string(),
                keyed,
            )),
            infos: Mutex::new(HashMap::new()),
        })
    }
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind, still usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PyCatalog {
    /// This process's state (made afresh in a forked child).
    fn state(&self, _py: Python<'_>) -> Arc<State> {
        let pid = std::process::id();
        let mut slot = locked(&self.state);
        if slot.0 != pid {
            let fresh = State::new(&self.directory, &self.prefix, self.keyed);
            let inherited = std::mem::replace(&mut *slot, (pid, fresh));
            // Its locks may be held by threads that exist only in the parent and its
            // data be half-changed: never touch or drop it here.
            std::mem::forget(inherited);
        }
        Arc::clone(&slot.1)
    }

    /// Runs `f` on the locked catalog with the GIL released.
    ///
    /// `f` runs on the calling thread, and only its parallel part in the thread
    /// pool (see `list`): no pool worker may ever wait for a lock, because a worker
    /// that waits for a parallel job can run another caller's job meanwhile, and if
    /// that job waited for a lock the worker holds further up its own stack,
    /// neither would finish.
    fn with_catalog<T, F>(&self, py: Python<'_>, f: F) -> PyResult<T>
    where
        F: FnOnce(&mut Catalog, &State) -> Result<T, Error> + Send,
        T: Send,
    {
        let state = self.state(py);
        detach_on_this_thread(py, || f(&mut locked(&state.catalog), &state))
    }

    /// The record of version `version`, if the catalog still holds it.
    fn current(&self, py: Python<'_>, version: u64) -> PyResult<Option<InfoData>> {
        self.with_catalog(py, |catalog, _| {
            let keyed = catalog.keyed();
            let data = catalog
                .records()
                .find(|r| r.version == version)
                .map(|r| InfoData::of(r, keyed));
            Ok(data)
        })
    }

    /// The info object for `data` at `version`, made and remembered.
    fn store(
        &self,
        py: Python<'_>,
        version: u64,
        data: InfoData,
    ) -> PyResult<Py<PyCheckpointInfo>> {
        let info = Py::new(py, PyCheckpointInfo::new_from(data))?;
        locked(&self.state(py).infos).insert(version, info.clone_ref(py));
        Ok(info)
    }
}

#[pymethods]
impl PyCatalog {
    #[new]
    fn py_new(
        directory: &Bound<'_, PyAny>,
        prefix: &Bound<'_, PyAny>,
        keyed: bool,
    ) -> PyResult<Self> {
        let directory = path_arg(directory, "directory")?;
        let prefix = str_arg(prefix, "prefix")?;
        let state = State::new(&directory, &prefix, keyed);
        Ok(PyCatalog {
            directory,
            prefix,
            keyed,
            state: Mutex::new((std::process::id(), state)),
        })
    }

    /// Scan the directory again: ``(infos by batch index, indices of the legacy
    /// files whose loss and timestamp are still to be read)``.
    fn list(&self, py: Python<'_>) -> PyResult<(Vec<Py<PyCheckpointInfo>>, Vec<usize>)> {
        // (version, data unless an info object of that version exists, needs summary)
        let state = self.state(py);
        let snaps = self.with_catalog(py, |catalog, state| {
            catalog.refresh()?;
            let keyed = catalog.keyed();
            let infos = locked(&state.infos);
            Ok(catalog
                .records()
                .map(|r| {
                    let data = (!infos.contains_key(&r.version)).then(|| InfoData::of(r, keyed));
                    (r.version, data, r.needs_summary(keyed))
                })
                .collect::<Vec<_>>())
        })?;
        let mut known = std::mem::take(&mut *locked(&state.infos));
        let mut fresh = HashMap::with_capacity(snaps.len());
        let mut out = Vec::with_capacity(snaps.len());
        let mut pending = Vec::new();
        for (version, data, needs_summary) in snaps {
            let info = match (data, known.remove(&version)) {
                (_, Some(info)) => info,
                (Some(data), None) => Py::new(py, PyCheckpointInfo::new_from(data))?,
                // Another listing took the object meanwhile: build it again.
                (None, None) => match self.current(py, version)? {
                    Some(data) => Py::new(py, PyCheckpointInfo::new_from(data))?,
                    None => continue, // changed or forgotten meanwhile
                },
            };
            if needs_summary {
                pending.push(out.len());
            }
            out.push(info.clone_ref(py));
            fresh.insert(version, info);
        }
        // Objects another thread stored meanwhile (a note) are kept too.
        let mut infos = locked(&state.infos);
        infos.extend(fresh);
        drop(infos);
        drop(known);
        Ok((out, pending))
    }

    /// Attach a verification result (``status``, ``error``) and/or a legacy file's
    /// ``loss`` and ``timestamp`` to the file ``info`` describes, if it has not
    /// changed since; return the info object that shows it.
    #[pyo3(signature = (info, status = None, error = None, loss = None, timestamp = None))]
    fn note(
        &self,
        py: Python<'_>,
        info: PyRef<'_, PyCheckpointInfo>,
        status: Option<&Bound<'_, PyAny>>,
        error: Option<&Bound<'_, PyAny>>,
        loss: Option<&Bound<'_, PyAny>>,
        timestamp: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyCheckpointInfo>> {
        let status = opt_str_arg(status, "status")?;
        let error = opt_str_arg(error, "error")?;
        let loss = loss.map(|l| f64_arg(l, "loss")).transpose()?;
        let timestamp = timestamp.map(|t| f64_arg(t, "timestamp")).transpose()?;
        let verdict = match status.as_deref() {
            Some(s) => Some(Verdict {
                status: Status::parse(s).map_err(|e| to_pyerr(py, e))?,
                error,
            }),
            None => None,
        };
        let summary = loss.zip(timestamp);
        let name = info.data.name.clone();
        let identity = info.data.identity;
        let noted = {
            let verdict = verdict.clone();
            self.with_catalog(py, |catalog, _| {
                let keyed = catalog.keyed();
                Ok(catalog
                    .note(&name, &identity, verdict, summary)
                    .map(|r| (r.version, InfoData::of(r, keyed))))
            })?
        };
        match noted {
            Some((version, data)) => self.store(py, version, data),
            None => {
                // The file changed since it was listed: report the result for this
                // listing without keeping it.
                let d = &info.data;
                let (loss, timestamp) = summary.unwrap_or((d.loss, d.timestamp));
                let (status, verified, error) = match verdict {
                    Some(v) => (v.status, true, v.error),
                    None => (d.status, d.verified, d.error.clone()),
                };
                let data = InfoData {
                    path: d.path.clone(),
                    name: d.name.clone(),
                    loss,
                    timestamp,
                    status,
                    verified,
                    error,
                    ..*d
                };
                Py::new(py, PyCheckpointInfo::new_from(data))
            }
        }
    }

    /// Record a verification result for the file ``name`` as it is now.
    #[pyo3(signature = (name, status, error = None))]
    fn remember(
        &self,
        py: Python<'_>,
        name: &Bound<'_, PyAny>,
        status: &Bound<'_, PyAny>,
        error: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let name = str_arg(name, "name")?;
        let status = Status::parse(&str_arg(status, "status")?).map_err(|e| to_pyerr(py, e))?;
        let error = opt_str_arg(error, "error")?;
        if status == Status::Unverified {
            return Err(value_error(py, "a remembered status must be a verdict"));
        }
        self.with_catalog(py, |catalog, _| {
            catalog.remember(&name, Verdict { status, error })
        })
    }

    /// Forget the file ``name``.
    fn forget(&self, py: Python<'_>, name: &Bound<'_, PyAny>) -> PyResult<()> {
        let name = str_arg(name, "name")?;
        let state = self.state(py);
        py.detach(|| locked(&state.catalog).forget(&name));
        Ok(())
    }

    fn __len__(&self, py: Python<'_>) -> usize {
        let state = self.state(py);
        py.detach(|| locked(&state.catalog).len())
    }

    fn __contains__(&self, py: Python<'_>, name: &Bound<'_, PyAny>) -> PyResult<bool> {
        let name = str_arg(name, "name")?;
        let state = self.state(py);
        Ok(py.detach(|| locked(&state.catalog).get(&name).is_some()))
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCheckpointInfo>()?;
    m.add_class::<PyCatalog>()?;
    Ok(())
}
