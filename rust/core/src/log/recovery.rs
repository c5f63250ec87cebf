//! A model directory brought to its last committed generation, whatever was
//! interrupted: the plan (which logs to redo, which to roll back, from which
//! checkpoint) and its execution through [`apply::recover`].
//!
//! 1. Logs past the state file's generation: one whose header never reached
//!    the disk covers no in-place byte and is removed; a committed one (killed
//!    between its commit record and the state file) is entered in the
//!    history; the rest are uncommitted and will be rolled back.
//! 2. For one host of a group, `limit` is what the group committed: a
//!    generation this host committed past it is rolled back like an
//!    uncommitted one.
//! 3. The caller settles its own background flushes ([`Flushes`]): the one
//!    of the last generation may go on (it will mark the checkpoint), the
//!    others are waited for, so the markers say what is on disk.
//! 4. Every unit the logs after the checkpoint touch is brought to the last
//!    committed generation, rewritten even where it reads right (a failed
//!    writeback may have left pages marked clean), and made durable.
//! 5. Leftovers go: logs of pruned generations, markers older than the newest.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Unbounded};
use std::path::PathBuf;

use super::apply;
use super::dir::{fsync_dir, header_written, remove, GenDir};
use super::reader::LogFile;
use super::state::{Generation, State};
use crate::error::{Error, Result};
use crate::faults;
use crate::flush::touch_durably;

/// What recovery did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The generation the directory is at afterwards.
    pub generation: u64,
    /// Uncommitted generations rolled back.
    pub rolled_back: Vec<u64>,
    /// Committed generations whose in-place writes were checked (and redone).
    pub rolled_forward: Vec<u64>,
    pub units: u64,
    pub units_written: u64,
    pub torn: u64,
    pub bytes_written: u64,
    pub files: Vec<String>,
}

/// The recovering process's own background flushes (they live in its
/// package: a process knows only its own).
pub trait Flushes {
    /// Called once the last committed generation is known. `ahead`: the
    /// host is past what its group committed, so none of its flushes may go
    /// on. Waits for every flush that may not go on, and returns whether this
    /// process's flush of `generation` is running and may go on: recovery
    /// then leaves the checkpoint to it.
    fn settle(&mut self, generation: u64, ahead: bool) -> Result<bool>;
}

/// A process with no flush of its own (a fresh `recover`, the tests).
pub struct NoFlushes;

impl Flushes for NoFlushes {
    fn settle(&mut self, _generation: u64, _ahead: bool) -> Result<bool> {
        Ok(false)
    }
}

/// Brings the directory to its last committed generation (for one host of a
/// group, `limit`: the generation the group committed), with the shards
/// durable. Returns what it did, or `None` when there was nothing to redo or
/// undo. The caller holds the exclusive lock.
pub fn recover(
    dir: &GenDir,
    limit: Option<u64>,
    flushes: &mut dyn Flushes,
) -> Result<Option<Recovered>> {
    let mut state = State::load(dir)?;
    let mut logs = dir.logs()?;
    let ahead = limit.is_some_and(|l| state.generation > l || logs.keys().any(|&n| n > l));

    // 1. what the logs past the state file are
    let mut uncommitted = Vec::new();
    let past: Vec<(u64, PathBuf)> = logs
        .range((Excluded(state.generation), Unbounded))
        .map(|(&n, p)| (n, p.clone()))
        .collect();
    for (n, path) in past {
        if !header_written(&path)? {
            remove(&path)?;
            logs.remove(&n);
            continue;
        }
        let log = LogFile::open(&path)?;
        if log.is_committed() && limit.is_none_or(|l| n <= l) {
            state = state.with_generation(Generation::of_log(&log)?);
            state.save(dir, true)?;
        } else {
            uncommitted.push(n);
        }
    }

    // 2. a group's commit point
    let mut dropped = false;
    if let Some(l) = limit {
        if state.generation > l {
            // prepared here, never committed by the group
            uncommitted.extend(between(&logs, l, state.generation));
            uncommitted.sort_unstable();
            uncommitted.dedup();
            state = state.upto(l);
            dropped = true;
        }
        if state.generation < l {
            return Err(Error::state(
                dir.meta(),
                format!(
                    "this host is at generation {}, but the group committed generation {l}: \
                     its namespace was removed or replaced",
                    state.generation
                ),
            ));
        }
    }

    // 3. the checkpoint, once this process's flushes are settled
    let own = flushes.settle(state.generation, ahead)? && !ahead;
    let mut k = if own {
        state.generation
    } else {
        dir.checkpoint(&state)?
    };
    if let Some(l) = limit {
        k = k.min(l);
        let stale: Vec<PathBuf> = dir
            .markers()?
            .range((Excluded(l), Unbounded))
            .map(|(_, p)| p.clone())
            .collect();
        for p in &stale {
            remove(p)?; // a marker of a generation the group did not commit
        }
        if !stale.is_empty() {
            fsync_dir(&dir.log_dir())?;
        }
    }
    let missing: Vec<u64> = (k.saturating_add(1)..=state.generation)
        .filter(|n| !logs.contains_key(n))
        .collect();
    if !missing.is_empty() {
        return Err(Error::state(
            dir.root(),
            format!(
                "generation(s) {missing:?} are not on disk yet and have no log; cannot tell \
                 what the files hold"
            ),
        ));
    }

    // 4. every unit after the checkpoint brought to the last commit
    let redo = between(&logs, k, state.generation);
    let mut done = None;
    if !redo.is_empty() || !uncommitted.is_empty() {
        let opened = redo
            .iter()
            .chain(&uncommitted)
            .map(|n| LogFile::open(&logs[n]))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&LogFile> = opened.iter().collect();
        // rewritten even where it reads right: a failed writeback may have marked it clean
        let report = apply::recover(dir.root(), &refs, redo.len(), true)?;
        if !report.undecided.is_empty() {
            return Err(undecided(dir, &report.undecided));
        }
        if dropped {
            state.save(dir, true)?;
        }
        for n in &uncommitted {
            faults::reached("recover").map_err(|e| Error::io(&logs[n], "remove", e))?;
            remove(&logs[n])?;
        }
        if state.generation > 0 && !own {
            touch_durably(&dir.marker_path(state.generation))?;
        }
        done = Some(Recovered {
            generation: state.generation,
            rolled_back: uncommitted,
            rolled_forward: redo,
            units: report.units,
            units_written: report.units_written,
            torn: report.torn,
            bytes_written: report.bytes_written,
            files: report.files,
        });
    } else if dropped {
        // a generation without a log here (this host changed nothing in it)
        state.save(dir, true)?;
    }

    // 5. leftovers
    clean_leftovers(dir, &state)?;
    Ok(done)
}

/// The generations of `logs` after `after`, up to `upto`.
fn between(logs: &BTreeMap<u64, PathBuf>, after: u64, upto: u64) -> Vec<u64> {
    logs.keys()
        .copied()
        .filter(|&n| after < n && n <= upto)
        .collect()
}

fn undecided(dir: &GenDir, units: &[(String, u64)]) -> Error {
    let places: Vec<String> = units
        .iter()
        .take(10)
        .map(|(f, o)| format!("{f} at {o}"))
        .collect();
    Error::state(
        dir.root(),
        format!(
            "{} 4 KiB unit(s) match no state of their generations ({}{}); they were left as \
             they are, and nothing else is lost: the logs stay for inspection. Restore those \
             files from a copy, or sync from the live weights.",
            units.len(),
            places.join(", "),
            if units.len() > 10 { " ..." } else { "" }
        ),
    )
}

/// Removes the logs of pruned generations (an interrupted prune) and the
/// markers older than the newest.
fn clean_leftovers(dir: &GenDir, state: &State) -> Result<()> {
    for (n, path) in dir.logs()? {
        if n <= state.generation && !state.find(n).is_some_and(|g| g.log) {
            remove(&path)?;
        }
    }
    let markers: BTreeMap<u64, PathBuf> = dir.markers()?;
    if let Some(&newest) = markers.keys().next_back() {
        for (_, path) in markers.range(..newest) {
            remove(path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::commit::{commit_logged, Entry};
    use super::*;
    use crate::log::testing::{bytes, step, sync_logged};
    use std::path::Path;

    fn shard(dir: &GenDir) -> PathBuf {
        dir.root().join("m.safetensors")
    }

    /// Syncs `live` into the shard as logged generation `n`; returns its log.
    fn sync_gen(dir: &GenDir, live: &[u8], n: u64) -> std::sync::Arc<crate::log::DeltaLog> {
        dir.ensure().unwrap();
        sync_logged(&shard(dir), dir.log_path(n), live, n)
    }

    fn entry(tensor: &str) -> Entry {
        Entry {
            bytes_changed: 4096,
            files: vec!["m.safetensors".into()],
            tensors: [(tensor.to_owned(), 3)].into(),
            rollback_to: None,
        }
    }

    /// Records what recovery asked of the caller's flushes.
    struct Asked(Vec<(u64, bool)>, bool);

    impl Flushes for Asked {
        fn settle(&mut self, generation: u64, ahead: bool) -> Result<bool> {
            self.0.push((generation, ahead));
            Ok(self.1)
        }
    }

    /// Generations 1..=n synced and committed (with their state entries).
    fn committed(n: u64) -> (tempfile::TempDir, GenDir, Vec<Vec<u8>>) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = GenDir::new(tmp.path(), tmp.path().join(".apollo_sync"));
        let mut states = vec![bytes(200_000, 1)];
        std::fs::write(shard(&dir), &states[0]).unwrap();
        for g in 1..=n {
            let next = step(states.last().unwrap(), g as usize);
            let log = sync_gen(&dir, &next, g);
            commit_logged(&dir, &log, entry(&format!("w{g}"))).unwrap();
            states.push(next);
        }
        (tmp, dir, states)
    }

    #[test]
    fn recovery_enters_a_commit_the_state_missed_and_rolls_uncommitted_work_back() {
        let (_t, dir, mut states) = committed(1);
        // generation 2: its commit record durable, killed before its state entry
        let two = step(&states[1], 2);
        sync_gen(&dir, &two, 2).commit(br#"{"time": 5.0, "kind": "sync", "bytes_changed": 8192, "files": ["m.safetensors"], "tensors": {"w": 7}, "rollback_to": null}"#).unwrap();
        states.push(two);
        // generation 3: written in place, never committed
        sync_gen(&dir, &step(&states[2], 3), 3);
        // generation 4: a log whose header never reached the disk
        std::fs::write(dir.log_path(4), [0u8; 64]).unwrap();
        assert_eq!(State::load(&dir).unwrap().generation, 1);

        let mut asked = Asked(vec![], false);
        let done = recover(&dir, None, &mut asked)
            .unwrap()
            .expect("work to do");
        assert_eq!(
            asked.0,
            vec![(2, false)],
            "settled once the commit is known"
        );
        assert_eq!(done.generation, 2);
        assert_eq!(done.rolled_back, vec![3]);
        assert_eq!(done.rolled_forward, vec![1, 2], "nothing flushed yet");
        assert_eq!(std::fs::read(shard(&dir)).unwrap(), states[2]);
        let state = State::load(&dir).unwrap();
        assert_eq!(state.generation, 2);
        let g = state.find(2).unwrap();
        assert_eq!((g.time, g.bytes_changed, g.log), (5.0, 8192, true));
        assert_eq!(g.tensors, [("w".to_owned(), 7)].into());
        assert_eq!(
            dir.logs().unwrap().into_keys().collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(dir.flushed().unwrap(), 2, "the shards were made durable");

        // then nothing is left to do
        assert_eq!(recover(&dir, None, &mut NoFlushes).unwrap(), None);
    }

    #[test]
    fn the_flush_of_the_last_generation_is_left_to_mark_the_checkpoint() {
        let (_t, dir, states) = committed(2);
        std::fs::write(dir.marker_path(1), b"").unwrap();
        let mut own = Asked(vec![], true);
        assert_eq!(recover(&dir, None, &mut own).unwrap(), None);
        assert_eq!(dir.flushed().unwrap(), 1, "left to the running flush");
        // without that flush, generation 2 is checked and marked
        let done = recover(&dir, None, &mut NoFlushes).unwrap().unwrap();
        assert_eq!(done.rolled_forward, vec![2]);
        assert_eq!(
            dir.markers().unwrap().into_keys().collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(std::fs::read(shard(&dir)).unwrap(), states[2]);
    }

    #[test]
    fn a_host_past_its_groups_commit_is_rolled_back_to_it() {
        let (_t, dir, states) = committed(3);
        std::fs::write(dir.marker_path(3), b"").unwrap(); // even flushed
        assert!(recover(&dir, Some(5), &mut NoFlushes)
            .unwrap_err()
            .to_string()
            .contains("this host is at generation 3, but the group committed generation 5"));
        let mut asked = Asked(vec![], true);
        let done = recover(&dir, Some(1), &mut asked).unwrap().unwrap();
        assert_eq!(asked.0, vec![(1, true)]);
        assert_eq!(done.generation, 1);
        assert_eq!(done.rolled_back, vec![2, 3]);
        assert_eq!(std::fs::read(shard(&dir)).unwrap(), states[1]);
        let state = State::load(&dir).unwrap();
        assert_eq!(state.generation, 1);
        assert_eq!(state.history.len(), 1);
        assert_eq!(dir.logs().unwrap().into_keys().collect::<Vec<_>>(), vec![1]);
        assert_eq!(
            dir.markers().unwrap().into_keys().collect::<Vec<_>>(),
            vec![1]
        );
    }

    #[test]
    fn a_generation_after_the_checkpoint_without_a_log_is_refused() {
        let (_t, dir, states) = committed(2);
        std::fs::remove_file(dir.log_path(1)).unwrap();
        let e = recover(&dir, None, &mut NoFlushes).unwrap_err().to_string();
        assert!(
            e.contains("generation(s) [1] are not on disk yet and have no log"),
            "{e}"
        );
        assert_eq!(
            std::fs::read(shard(&dir)).unwrap(),
            states[2],
            "nothing changed"
        );
        assert_eq!(State::load(&dir).unwrap().generation, 2);
    }

    #[test]
    fn a_pruned_generations_leftover_log_and_old_markers_are_removed() {
        let (_t, dir, _) = committed(3);
        for n in 1..=3 {
            std::fs::write(dir.marker_path(n), b"").unwrap();
        }
        let mut state = State::load(&dir).unwrap();
        state.history[0].log = false; // pruned, killed before its file went
        state.save(&dir, true).unwrap();
        assert_eq!(recover(&dir, None, &mut NoFlushes).unwrap(), None);
        assert_eq!(
            dir.logs().unwrap().into_keys().collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(
            dir.markers().unwrap().into_keys().collect::<Vec<_>>(),
            vec![3]
        );
        assert!(Path::new(&dir.log_path(2)).exists());
        // a stray marker numbered at the end of the range breaks no arithmetic
        std::fs::write(dir.marker_path(u64::MAX), b"").unwrap();
        assert_eq!(recover(&dir, Some(3), &mut NoFlushes).unwrap(), None);
        assert_eq!(
            dir.markers().unwrap().into_keys().collect::<Vec<_>>(),
            vec![3]
        );
    }
}
