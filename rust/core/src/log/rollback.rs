//! A model directory rolled back to an earlier generation, as a new logged
//! generation (itself undoable): the chain of logs checked, the deltas
//! walked back ([`apply::rollback`]), the new generation committed and its
//! checkpoint marked (the rollback made the shards durable).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::apply::{self, ApplyReport};
use super::commit::{commit_logged, Entry};
use super::dir::GenDir;
use super::reader::LogFile;
use super::state::{Generation, State};
use super::writer::{DeltaLog, LogSpec};
use super::Kind;
use crate::error::{Error, Result};
use crate::flush::touch_durably;

/// Restores the directory to generation `to` exactly, as generation N+1
/// (N: the current one). Needs the log of every generation after `to`;
/// checks every record and every unit it will touch before its first write.
/// The caller holds the exclusive lock, has recovered, and undoes an
/// uncommitted N+1 if this fails ([`super::undo_uncommitted`]).
pub fn rollback_to(dir: &GenDir, to: u64) -> Result<(Generation, ApplyReport)> {
    let state = State::load(dir)?;
    let current = state.generation;
    let refuse = |why: String| {
        Error::Rollback(format!(
            "{}: cannot roll back to generation {to}: {why}",
            dir.root().display()
        ))
    };
    if to >= current {
        return Err(refuse(format!(
            "the current generation is {current}{}",
            if to == current {
                " (already there)"
            } else {
                ""
            }
        )));
    }
    let steps: Vec<Option<&Generation>> = (to + 1..=current).map(|n| state.find(n)).collect();
    let lost: Vec<String> = (to + 1..=current)
        .zip(&steps)
        .filter(|(_, g)| !g.is_some_and(|g| g.log))
        .map(|(n, _)| n.to_string())
        .collect();
    if !lost.is_empty() {
        return Err(refuse(format!(
            "the log of generation(s) {} is gone (pruned, or synced without one)",
            lost.join(", ")
        )));
    }
    let logs = (to + 1..=current)
        .rev()
        .map(|n| LogFile::open(&dir.log_path(n)))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&LogFile> = logs.iter().collect();
    let number = current
        .checked_add(1)
        .ok_or_else(|| refuse("no generation number is left".into()))?;
    let spec = LogSpec {
        path: dir.log_path(number),
        generation: number,
        kind: Kind::Rollback,
    };
    let out = Arc::new(DeltaLog::new(
        spec,
        apply::current_bindings(dir.root(), &refs)?,
    ));
    let report = apply::rollback(dir.root(), &refs, &out)?;
    if report.records == 0 {
        return Err(Error::Rollback(format!(
            "{}: generations after {to} changed nothing",
            dir.root().display()
        )));
    }
    let mut tensors: BTreeMap<String, u64> = BTreeMap::new();
    for g in steps.iter().flatten() {
        for (t, n) in &g.tensors {
            *tensors.entry(t.clone()).or_default() += n;
        }
    }
    let entry = Entry {
        bytes_changed: report.bytes,
        files: report.files.clone(),
        tensors,
        rollback_to: Some(to),
    };
    let (_, generation) = commit_logged(dir, &out, entry)?;
    touch_durably(&dir.marker_path(number))?; // the rollback made the shards durable
    Ok((generation, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::prune::prune;
    use crate::log::testing::{bytes, step, sync_logged};

    /// Generations 1..=3 committed, each with its entry.
    fn three() -> (tempfile::TempDir, GenDir, Vec<Vec<u8>>) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = GenDir::new(tmp.path(), tmp.path().join(".apollo_sync"));
        dir.ensure().unwrap();
        let shard = dir.root().join("m.safetensors");
        let mut states = vec![bytes(150_000, 9)];
        std::fs::write(&shard, &states[0]).unwrap();
        for n in 1..=3u64 {
            let next = step(states.last().unwrap(), n as usize);
            let log = sync_logged(&shard, dir.log_path(n), &next, n);
            let entry = Entry {
                bytes_changed: 1,
                files: vec!["m.safetensors".into()],
                tensors: [("w".to_owned(), n)].into(),
                rollback_to: None,
            };
            commit_logged(&dir, &log, entry).unwrap();
            states.push(next);
        }
        (tmp, dir, states)
    }

    #[test]
    fn a_rollback_restores_the_bytes_as_a_new_generation_itself_undoable() {
        let (_t, dir, states) = three();
        let shard = dir.root().join("m.safetensors");
        let (g, report) = rollback_to(&dir, 1).unwrap();
        assert_eq!(std::fs::read(&shard).unwrap(), states[1]);
        assert_eq!(
            (g.number, g.kind.as_str(), g.rollback_to),
            (4, "rollback", Some(1))
        );
        assert_eq!(g.bytes_changed, report.bytes);
        assert_eq!(
            g.tensors,
            [("w".to_owned(), 5)].into(),
            "generations 3 and 2"
        );
        assert_eq!(
            dir.flushed().unwrap(),
            4,
            "durable: its checkpoint is marked"
        );
        // the rollback is a generation like any: rolling it back restores 3
        rollback_to(&dir, 3).unwrap();
        assert_eq!(std::fs::read(&shard).unwrap(), states[3]);
        assert_eq!(State::load(&dir).unwrap().generation, 5);
    }

    #[test]
    fn a_rollback_it_cannot_do_is_refused_before_any_write() {
        let (_t, dir, states) = three();
        let shard = dir.root().join("m.safetensors");
        let refused = |to| rollback_to(&dir, to).unwrap_err();
        assert!(
            matches!(refused(3), Error::Rollback(m) if m.contains("the current generation is 3 (already there)"))
        );
        assert!(
            matches!(refused(7), Error::Rollback(m) if m.ends_with("the current generation is 3"))
        );
        std::fs::write(dir.marker_path(3), b"").unwrap();
        assert_eq!(prune(&dir, 2, None).unwrap(), vec![1]);
        assert!(
            matches!(refused(0), Error::Rollback(m) if m.contains("the log of generation(s) 1 is gone"))
        );
        // a unit that no longer holds what generation 3 left
        let mut now = states[3].clone();
        now[5000] ^= 0xff;
        std::fs::write(&shard, &now).unwrap();
        assert!(rollback_to(&dir, 1).is_err());
        assert_eq!(std::fs::read(&shard).unwrap(), now, "nothing written");
        assert_eq!(State::load(&dir).unwrap().generation, 3);
    }
}
