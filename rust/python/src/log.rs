//! The XOR-delta log: read one back, commit one, recover, roll back; and
//! after a commit, the flush that marks the checkpoint.

use std::path::PathBuf;
use std::sync::Arc;

use apollo_sync_core::flush;
use apollo_sync_core::log::{self, apply, DeltaLog, Kind, LogFile, LogSpec};
use pyo3::prelude::*;

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

/// Reads and checks every log of `paths`, in order.
fn open_all(paths: &[PathBuf]) -> apollo_sync_core::Result<Vec<LogFile>> {
    paths.iter().map(|p| LogFile::open(p)).collect()
}

/// Reads and checks the log at `path`.
#[pyfunction]
pub fn read_log(py: Python<'_>, path: PathBuf) -> PyResult<LogInfo> {
    py.detach(|| LogFile::open(&path).map(|l| LogInfo::from(&l)))
        .map_err(to_py)
}

/// What a committed log holds.
#[pyclass(module = "apollo_sync._core", frozen, get_all)]
pub struct LogStats {
    records: u64,
    bytes: u64,
    elements: u64,
    covered: u64,
}

/// A generation's log being written (by a sync or a rollback): commit it once
/// the in-place writes are done.
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

    /// Appends the commit record (with `meta`, JSON text) and makes it durable.
    fn commit(&self, py: Python<'_>, meta: &str) -> PyResult<LogStats> {
        let s = py
            .detach(|| self.inner.commit(meta.as_bytes()))
            .map_err(to_py)?;
        Ok(LogStats {
            records: s.records,
            bytes: s.bytes,
            elements: s.elements,
            covered: s.covered,
        })
    }
}

/// What recovery found and did.
#[pyclass(module = "apollo_sync._core", frozen, get_all)]
pub struct RecoverReport {
    units: u64,
    units_written: u64,
    torn: u64,
    bytes_written: u64,
    files: Vec<String>,
    undecided: Vec<(String, u64)>,
}

/// Brings every unit the logs at `paths` (generation order, from the
/// checkpoint on) touch to the state after `paths[:committed]`, rolling the
/// rest back; `force` rewrites units already there. Makes the shards durable.
#[pyfunction]
pub fn recover_logs(
    py: Python<'_>,
    model_dir: PathBuf,
    paths: Vec<PathBuf>,
    committed: usize,
    force: bool,
) -> PyResult<RecoverReport> {
    let r = py
        .detach(|| {
            let logs = open_all(&paths)?;
            let refs: Vec<&LogFile> = logs.iter().collect();
            apply::recover(&model_dir, &refs, committed, force)
        })
        .map_err(to_py)?;
    Ok(RecoverReport {
        units: r.units,
        units_written: r.units_written,
        torn: r.torn,
        bytes_written: r.bytes_written,
        files: r.files,
        undecided: r.undecided,
    })
}

/// What a rollback wrote.
#[pyclass(module = "apollo_sync._core", frozen, get_all)]
pub struct ApplyReport {
    records: u64,
    bytes: u64,
    files: Vec<String>,
}

/// Undoes the committed generations whose logs are at `paths` (newest first)
/// as generation `generation`, logged at `new_path`; returns what it wrote
/// and the new log, to commit.
#[pyfunction]
pub fn rollback_logs(
    py: Python<'_>,
    model_dir: PathBuf,
    paths: Vec<PathBuf>,
    new_path: PathBuf,
    generation: u64,
) -> PyResult<(ApplyReport, LogWriter)> {
    let (r, out) = py
        .detach(|| {
            let logs = open_all(&paths)?;
            let refs: Vec<&LogFile> = logs.iter().collect();
            let spec = LogSpec {
                path: new_path,
                generation,
                kind: Kind::Rollback,
            };
            let out = Arc::new(DeltaLog::new(
                spec,
                apply::current_bindings(&model_dir, &refs)?,
            ));
            let r = log::rollback(&model_dir, &refs, &out)?;
            Ok::<_, apollo_sync_core::Error>((r, out))
        })
        .map_err(to_py)?;
    Ok((
        ApplyReport {
            records: r.records,
            bytes: r.bytes,
            files: r.files,
        },
        LogWriter { inner: out },
    ))
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

/// Creates `path` (empty) if absent and makes its directory entry durable: a
/// checkpoint marker.
#[pyfunction]
pub fn touch_durably(py: Python<'_>, path: PathBuf) -> PyResult<()> {
    py.detach(|| flush::touch_durably(&path)).map_err(to_py)
}
