//! The XOR-delta log: read one back, commit one, recover, roll back; and
//! after a commit, the flush that marks the checkpoint.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use apollo_sync_core::flush;
use apollo_sync_core::log::{
    self, DeltaLog, Entry, Flushes, GenDir, Generation, Kind, LogFile, State,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::to_py;

/// `(shard index, offset, length, elements changed)` of each record.
type Runs = Vec<(u32, u64, u64, u64)>;

/// A log read back and checked (every record's checksum holds).
#[pyclass(module = "apollo_sync._core", frozen, get_all)]
pub struct LogInfo {
    path: PathBuf,
    generation: u64,
    /// "sync" or "rollback".
    kind: String,
    committed: bool,
    /// The committer's metadata (JSON text), when committed.
    meta: Option<String>,
    shards: Vec<String>,
    records: u64,
    /// Bytes of the log file.
    bytes: u64,
    elements: u64,
    /// Bytes its records cover.
    covered: u64,
    torn_tail: u64,
    runs: Runs,
}

impl From<&LogFile> for LogInfo {
    fn from(l: &LogFile) -> Self {
        LogInfo {
            path: l.path().to_path_buf(),
            generation: l.generation(),
            kind: l.kind().name().to_owned(),
            committed: l.is_committed(),
            meta: l.commit.as_ref().map(|c| c.meta.clone()),
            shards: l.shards().iter().map(|s| s.name.clone()).collect(),
            records: l.records.len() as u64,
            bytes: l.len,
            elements: l.elements(),
            covered: l.records.iter().map(|r| r.head.len).sum(),
            torn_tail: l.torn_tail,
            runs: l
                .records
                .iter()
                .map(|r| (r.head.shard, r.head.offset, r.head.len, r.head.elements))
                .collect(),
        }
    }
}

/// Reads and checks the log at `path`.
#[pyfunction]
pub fn read_log(py: Python<'_>, path: PathBuf) -> PyResult<LogInfo> {
    py.detach(|| LogFile::open(&path).map(|l| LogInfo::from(&l)))
        .map_err(to_py)
}

/// A generation's log being written by a sync: committed (`commit_logged`)
/// once the in-place writes are done.
#[pyclass(module = "apollo_sync._core", frozen)]
pub struct LogWriter {
    pub(crate) inner: Arc<DeltaLog>,
}

#[pymethods]
impl LogWriter {
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }

    /// Shard names, by the index records use.
    #[getter]
    fn shards(&self) -> Vec<String> {
        self.inner.shards().iter().map(|s| s.name.clone()).collect()
    }

    /// `(shard index, offset, length, elements changed)` of each record so far.
    fn runs(&self) -> Runs {
        self.inner
            .summaries()
            .iter()
            .map(|r| (r.shard, r.offset, r.len, r.elements))
            .collect()
    }
}

/// The background flush of a committed generation: `fdatasync` of the shards
/// it wrote once the flush before it (`after`) has ended, then, only if both
/// succeeded, its checkpoint marker created durably. Runs on a thread of the
/// core (no Python thread, no GIL).
#[pyclass(module = "apollo_sync._core", frozen)]
pub struct GenerationFlush {
    inner: Arc<flush::GenerationFlush>,
}

#[pymethods]
impl GenerationFlush {
    #[new]
    #[pyo3(signature = (number, paths, marker, after = None))]
    fn new(
        number: u64,
        paths: Vec<PathBuf>,
        marker: PathBuf,
        after: Option<&GenerationFlush>,
    ) -> PyResult<Self> {
        let after = after.map(|a| a.inner.clone());
        let inner = flush::GenerationFlush::start(number, paths, marker, after).map_err(to_py)?;
        Ok(GenerationFlush { inner })
    }

    #[getter]
    fn number(&self) -> u64 {
        self.inner.number()
    }

    /// Whether it is still running.
    #[getter]
    fn running(&self) -> bool {
        self.inner.outcome().is_none()
    }

    /// Why it failed (`None` while it runs, and once it succeeded).
    #[getter]
    fn error(&self) -> Option<String> {
        failure(self.inner.outcome())
    }

    /// Waits for it to end (GIL released); returns why it failed, or `None`.
    /// Signals are checked every 100 ms, so Ctrl-C interrupts the wait (not
    /// the flush).
    fn wait(&self, py: Python<'_>) -> PyResult<Option<String>> {
        loop {
            let inner = self.inner.clone();
            let step = std::time::Duration::from_millis(100);
            if let Some(done) = py.detach(move || inner.wait_for(step)) {
                return Ok(failure(Some(done)));
            }
            py.check_signals()?;
        }
    }
}

fn failure(outcome: Option<flush::Outcome>) -> Option<String> {
    match outcome {
        Some(flush::Outcome::Failed(why)) => Some(why),
        _ => None,
    }
}

/// The generation files of `root`, under `meta`.
fn gen_dir(root: PathBuf, meta: PathBuf) -> GenDir {
    GenDir::new(root, meta)
}

/// A history entry as a dict of its fields (the keyword arguments of the
/// package's `Generation`).
fn entry_dict<'py>(py: Python<'py>, g: &Generation) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("number", g.number)?;
    d.set_item("time", g.time)?;
    d.set_item("kind", &g.kind)?;
    d.set_item("bytes_changed", g.bytes_changed)?;
    d.set_item("log_bytes", g.log_bytes)?;
    d.set_item("log", g.log)?;
    d.set_item("elements_changed", g.elements_changed)?;
    d.set_item("files", &g.files)?;
    d.set_item("tensors", &g.tensors)?;
    d.set_item("rollback_to", g.rollback_to)?;
    d.set_item("tensor_count", g.tensor_count)?;
    Ok(d)
}

/// Creates the folders of the generation files under `meta`, durably.
#[pyfunction]
pub fn ensure_dirs(py: Python<'_>, root: PathBuf, meta: PathBuf) -> PyResult<()> {
    py.detach(|| gen_dir(root, meta).ensure()).map_err(to_py)
}

/// The state file under `meta` (`state.rs`): `(generation, checkpoint,
/// history)`, each entry a dict of its fields.
#[pyfunction]
pub fn load_state<'py>(
    py: Python<'py>,
    root: PathBuf,
    meta: PathBuf,
) -> PyResult<(u64, u64, Vec<Bound<'py, PyDict>>)> {
    let state = py
        .detach(|| State::load(&gen_dir(root, meta)))
        .map_err(to_py)?;
    let history = state
        .history
        .iter()
        .map(|g| entry_dict(py, g))
        .collect::<PyResult<_>>()?;
    Ok((state.generation, state.checkpoint, history))
}

/// Commits the generation `writer` logged: its commit record, then its entry
/// in the state file. Returns the entry (a dict of its fields).
#[pyfunction]
#[pyo3(signature = (root, meta, writer, *, bytes_changed, files, tensors, rollback_to = None))]
#[allow(clippy::too_many_arguments)]
pub fn commit_logged<'py>(
    py: Python<'py>,
    root: PathBuf,
    meta: PathBuf,
    writer: &LogWriter,
    bytes_changed: u64,
    files: Vec<String>,
    tensors: BTreeMap<String, u64>,
    rollback_to: Option<u64>,
) -> PyResult<Bound<'py, PyDict>> {
    let entry = Entry {
        bytes_changed,
        files,
        tensors,
        rollback_to,
    };
    let inner = writer.inner.clone();
    let (_, generation) = py
        .detach(|| log::commit_logged(&gen_dir(root, meta), &inner, entry))
        .map_err(to_py)?;
    entry_dict(py, &generation)
}

/// Commits generation `number`, synced without a log (its shards durable):
/// its entry, and the checkpoint moved to it. Returns the entry (a dict).
#[pyfunction]
#[pyo3(signature = (root, meta, number, *, bytes_changed, files))]
pub fn commit_unlogged<'py>(
    py: Python<'py>,
    root: PathBuf,
    meta: PathBuf,
    number: u64,
    bytes_changed: u64,
    files: Vec<String>,
) -> PyResult<Bound<'py, PyDict>> {
    let generation = Generation {
        number,
        time: 0.0, // now
        kind: Kind::Sync.name().to_owned(),
        bytes_changed,
        log_bytes: 0,
        log: false,
        elements_changed: 0,
        files,
        tensors: BTreeMap::new(),
        rollback_to: None,
        tensor_count: None,
    };
    let state = py
        .detach(|| log::commit_unlogged(&gen_dir(root, meta), generation))
        .map_err(to_py)?;
    entry_dict(py, state.find(number).expect("just committed"))
}

/// Puts back what the uncommitted log of generation `number` wrote, then
/// removes the log (nothing when it is gone, empty or committed).
#[pyfunction]
pub fn undo_uncommitted(py: Python<'_>, root: PathBuf, meta: PathBuf, number: u64) -> PyResult<()> {
    py.detach(|| log::undo_uncommitted(&gen_dir(root, meta), number))
        .map_err(to_py)
}

/// Drops old rollback points (`prune.rs`); returns their generations.
#[pyfunction]
#[pyo3(signature = (root, meta, keep, max_bytes = None))]
pub fn prune(
    py: Python<'_>,
    root: PathBuf,
    meta: PathBuf,
    keep: usize,
    max_bytes: Option<u64>,
) -> PyResult<Vec<u64>> {
    py.detach(|| log::prune(&gen_dir(root, meta), keep, max_bytes))
        .map_err(to_py)
}

/// What recovery did (`recovery.rs`).
#[pyclass(module = "apollo_sync._core", frozen, get_all)]
pub struct Recovered {
    generation: u64,
    rolled_back: Vec<u64>,
    rolled_forward: Vec<u64>,
    units: u64,
    units_written: u64,
    torn: u64,
    bytes_written: u64,
    files: Vec<String>,
}

/// The Python package's flushes, asked through `settle(generation, ahead)`.
struct Settle<'a> {
    settle: &'a Py<PyAny>,
    /// What the callable raised (raised again once the GIL is back).
    raised: Option<PyErr>,
}

impl Flushes for Settle<'_> {
    fn settle(&mut self, generation: u64, ahead: bool) -> apollo_sync_core::Result<bool> {
        Python::attach(|py| {
            self.settle
                .call1(py, (generation, ahead))
                .and_then(|own| own.extract::<bool>(py))
        })
        .map_err(|e| {
            self.raised = Some(e);
            apollo_sync_core::Error::Plan("settling the flushes failed".into())
        })
    }
}

/// Brings the directory to its last committed generation (for one host of a
/// group, `limit`: the group's). `settle(generation, ahead) -> bool` waits for
/// this process's flushes that may not go on and says whether its flush of
/// `generation` goes on. Returns what it did, or `None`.
#[pyfunction]
#[pyo3(signature = (root, meta, settle, limit = None))]
pub fn recover_generations(
    py: Python<'_>,
    root: PathBuf,
    meta: PathBuf,
    settle: Py<PyAny>,
    limit: Option<u64>,
) -> PyResult<Option<Recovered>> {
    let mut flushes = Settle {
        settle: &settle,
        raised: None,
    };
    let done = py.detach(|| log::recovery::recover(&gen_dir(root, meta), limit, &mut flushes));
    if let Some(e) = flushes.raised.take() {
        return Err(e);
    }
    Ok(done.map_err(to_py)?.map(|r| Recovered {
        generation: r.generation,
        rolled_back: r.rolled_back,
        rolled_forward: r.rolled_forward,
        units: r.units,
        units_written: r.units_written,
        torn: r.torn,
        bytes_written: r.bytes_written,
        files: r.files,
    }))
}

/// Restores the directory to generation `to` as a new logged generation
/// (`rollback.rs`); returns its entry. The caller undoes an uncommitted one
/// if this fails.
#[pyfunction]
pub fn rollback_generations<'py>(
    py: Python<'py>,
    root: PathBuf,
    meta: PathBuf,
    to: u64,
) -> PyResult<Bound<'py, PyDict>> {
    let (generation, _) = py
        .detach(|| log::rollback::rollback_to(&gen_dir(root, meta), to))
        .map_err(to_py)?;
    entry_dict(py, &generation)
}
