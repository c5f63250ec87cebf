//! A generation committed, or what an uncommitted one wrote put back.
//!
//! The commit record at the end of a generation's log is the commit point;
//! the state file's entry follows it (and is rebuilt from the log by
//! recovery when a crash came between the two).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use super::apply;
use super::dir::{fsync_dir, header_written, GenDir};
use super::reader::LogFile;
use super::state::{CommitMeta, Generation, State};
use super::writer::DeltaLog;
use crate::error::{Error, Result};
use crate::faults;

/// What the caller knows of the generation it commits (the log knows the rest).
#[derive(Debug, Clone, Default)]
pub struct Entry {
    /// Bytes of the blocks it overwrote.
    pub bytes_changed: u64,
    pub files: Vec<String>,
    /// Elements changed per tensor touched.
    pub tensors: BTreeMap<String, u64>,
    /// For a rollback: the generation it restored.
    pub rollback_to: Option<u64>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Commits the generation `log` holds: its commit record (the commit point,
/// with `entry` as its metadata), then its entry in the state file. Returns
/// the new state and the entry.
pub fn commit_logged(dir: &GenDir, log: &DeltaLog, entry: Entry) -> Result<(State, Generation)> {
    let state = State::load(dir)?; // a bad state file is refused before the commit
    let meta = CommitMeta {
        time: now(),
        kind: log.kind().name().to_owned(),
        bytes_changed: entry.bytes_changed,
        files: entry.files,
        tensors: entry.tensors,
        rollback_to: entry.rollback_to,
    };
    let text = serde_json::to_vec(&meta)
        .map_err(|e| Error::Plan(format!("cannot encode the commit metadata: {e}")))?;
    let stats = log.commit(&text)?;
    faults::reached("committed").map_err(|e| Error::io(log.path(), "commit", e))?;
    let generation = Generation {
        number: log.generation(),
        time: meta.time,
        kind: meta.kind,
        bytes_changed: meta.bytes_changed,
        log_bytes: stats.bytes,
        log: true,
        elements_changed: stats.elements,
        files: meta.files,
        tensors: meta.tensors,
        rollback_to: meta.rollback_to,
        tensor_count: None,
    };
    let new = state.with_generation(generation.clone());
    new.save(dir, false)?; // the commit record is the commit point
    Ok((new, generation))
}

/// Commits a generation synced without a log (its shards already durable):
/// its entry, and the checkpoint moved to it, durably.
pub fn commit_unlogged(dir: &GenDir, mut generation: Generation) -> Result<State> {
    generation.log = false;
    generation.log_bytes = 0;
    if generation.time == 0.0 {
        generation.time = now();
    }
    let number = generation.number;
    let mut new = State::load(dir)?.with_generation(generation);
    new.checkpoint = number;
    new.save(dir, true)?;
    Ok(new)
}

/// After a failed sync or rollback of this process: puts back what the
/// uncommitted log of generation `number` covers, then removes the log.
/// Nothing to do when there is no log, when no barrier completed (nothing
/// was written in place) or when the generation is committed after all.
pub fn undo_uncommitted(dir: &GenDir, number: u64) -> Result<()> {
    let path = dir.log_path(number);
    if !path.exists() {
        return Ok(());
    }
    if header_written(&path)? {
        let log = LogFile::open(&path)?;
        if log.is_committed() {
            return Ok(());
        }
        let report = apply::recover(dir.root(), &[&log], 0, false)?;
        if !report.undecided.is_empty() {
            return Err(Error::state(
                &path,
                format!("{} unit(s) match no state", report.undecided.len()),
            ));
        }
    }
    std::fs::remove_file(&path).map_err(|e| Error::io(&path, "remove", e))?;
    fsync_dir(&dir.log_dir())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::testing::{bytes, step, sync_logged};

    fn setup() -> (tempfile::TempDir, GenDir, Vec<u8>) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = GenDir::new(tmp.path(), tmp.path().join(".apollo_sync"));
        dir.ensure().unwrap();
        let old = bytes(100_000, 3);
        std::fs::write(dir.root().join("m.safetensors"), &old).unwrap();
        (tmp, dir, old)
    }

    #[test]
    fn a_commit_records_its_entry_after_its_commit_record() {
        let (_t, dir, old) = setup();
        let new = step(&old, 1);
        let log = sync_logged(&dir.root().join("m.safetensors"), dir.log_path(1), &new, 1);
        let entry = Entry {
            bytes_changed: 12288,
            files: vec!["m.safetensors".into()],
            tensors: [("w".to_owned(), 9)].into(),
            rollback_to: None,
        };
        let (state, g) = commit_logged(&dir, &log, entry).unwrap();
        assert_eq!(State::load(&dir).unwrap(), state);
        assert_eq!(
            (state.generation, state.checkpoint),
            (1, 0),
            "not flushed yet"
        );
        let on_disk = LogFile::open(&dir.log_path(1)).unwrap();
        assert_eq!(
            Generation::of_log(&on_disk).unwrap(),
            g,
            "the log says the same"
        );
        assert_eq!(
            (g.kind.as_str(), g.bytes_changed, g.log),
            ("sync", 12288, true)
        );
        assert_eq!(g.log_bytes, on_disk.len);
        assert!(g.elements_changed > 0 && g.time > 0.0);

        let next = commit_unlogged(&dir, Generation { number: 2, ..g }).unwrap();
        assert_eq!(
            (next.generation, next.checkpoint),
            (2, 2),
            "durable: the checkpoint"
        );
        assert!(!next.find(2).unwrap().log);
    }

    #[test]
    fn an_uncommitted_generation_is_put_back_and_its_log_removed() {
        let (_t, dir, old) = setup();
        let shard = dir.root().join("m.safetensors");
        sync_logged(&shard, dir.log_path(1), &step(&old, 2), 1);
        assert_ne!(std::fs::read(&shard).unwrap(), old);
        undo_uncommitted(&dir, 1).unwrap();
        assert_eq!(std::fs::read(&shard).unwrap(), old);
        assert!(dir.logs().unwrap().is_empty());
        undo_uncommitted(&dir, 1).unwrap(); // nothing left to do

        // a committed one stays as it is
        let new = step(&old, 3);
        sync_logged(&shard, dir.log_path(1), &new, 1)
            .commit(b"{}")
            .unwrap();
        undo_uncommitted(&dir, 1).unwrap();
        assert_eq!(std::fs::read(&shard).unwrap(), new);
        assert!(dir.log_path(1).exists());
    }
}
