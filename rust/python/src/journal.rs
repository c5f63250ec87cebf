//! Undo journals: read one back, undo it, or roll several back as one step.

use std::path::PathBuf;

use apollo_sync_core::journal;
use pyo3::prelude::*;

use crate::errors::to_py;

/// A journal read back and checked (every durable record's checksum holds).
#[pyclass(module = "apollo_sync._core", frozen, get_all)]
pub struct JournalInfo {
    path: PathBuf,
    generation: u64,
    shards: Vec<String>,
    records: u64,
    bytes: u64,
    torn_tail: u64,
    /// Barriers that made it durable (each: two fsyncs).
    barriers: u64,
    /// `(shard index, offset, length)` of each durable record.
    runs: Vec<(u32, u64, u32)>,
}

/// What undoing or rolling back wrote.
#[pyclass(module = "apollo_sync._core", frozen, get_all)]
pub struct UndoReport {
    records: u64,
    bytes: u64,
    files: Vec<String>,
}

impl From<journal::UndoReport> for UndoReport {
    fn from(r: journal::UndoReport) -> Self {
        UndoReport {
            records: r.records,
            bytes: r.bytes,
            files: r.files,
        }
    }
}

/// Reads and checks the journal at `path`.
#[pyfunction]
pub fn read_journal(py: Python<'_>, path: PathBuf) -> PyResult<JournalInfo> {
    let j = py
        .detach(|| journal::UndoJournal::open(&path))
        .map_err(to_py)?;
    Ok(JournalInfo {
        path,
        generation: j.generation,
        shards: j.shards.clone(),
        records: j.records.len() as u64,
        bytes: j.bytes(),
        torn_tail: j.torn_tail,
        barriers: j.barriers,
        runs: j
            .records
            .iter()
            .map(|r| (r.shard, r.offset, r.len))
            .collect(),
    })
}

/// Writes the old bytes saved in the journal at `path` back into the shards
/// of `model_dir` (newest record first) and makes them durable.
#[pyfunction]
pub fn undo_journal(py: Python<'_>, path: PathBuf, model_dir: PathBuf) -> PyResult<UndoReport> {
    py.detach(|| {
        let j = journal::UndoJournal::open(&path)?;
        journal::undo(&j, &model_dir)
    })
    .map(UndoReport::from)
    .map_err(to_py)
}

/// Undoes the journals at `paths` (newest first) as one journaled step whose
/// own undo journal is written to `new_path` for `generation`.
#[pyfunction]
pub fn rollback_journals(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    model_dir: PathBuf,
    new_path: PathBuf,
    generation: u64,
) -> PyResult<UndoReport> {
    py.detach(|| {
        let opened = paths
            .iter()
            .map(|p| journal::UndoJournal::open(p))
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&journal::UndoJournal> = opened.iter().collect();
        let log = journal::UndoLog::new(new_path, generation, journal::shard_names(&refs));
        journal::rollback(&refs, &model_dir, &log)
    })
    .map(UndoReport::from)
    .map_err(to_py)
}
