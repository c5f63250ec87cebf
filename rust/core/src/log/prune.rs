//! Old rollback points dropped: the logs of the oldest generations, beyond a
//! count and a byte budget.

use super::dir::{fsync_dir, remove, GenDir};
use super::state::State;
use crate::error::{Error, Result};
use crate::faults;

/// Drops the logs of old generations beyond the `keep` newest, or beyond
/// `max_bytes` of logs in total. The newest log is always kept, and none
/// after the checkpoint (recovery may need it). A generation is a rollback
/// point only while every later log is kept, so everything older than a
/// dropped log goes too. The state file is committed first, then the files
/// removed: a crash between leaves only files recovery removes. Returns the
/// generations whose logs were dropped, oldest first.
pub fn prune(dir: &GenDir, keep: usize, max_bytes: Option<u64>) -> Result<Vec<u64>> {
    let state = State::load(dir)?;
    let k = dir.checkpoint(&state)?;
    let kept: Vec<_> = state.history.iter().rev().filter(|g| g.log).collect();
    let mut total = 0u64;
    let mut newest = None;
    for (i, g) in kept.iter().enumerate() {
        total = total.saturating_add(g.log_bytes);
        let over = i >= keep || max_bytes.is_some_and(|m| total > m);
        if i > 0 && over && g.number <= k {
            newest = Some(newest.map_or(g.number, |n: u64| n.max(g.number)));
        }
    }
    let Some(newest) = newest else {
        return Ok(Vec::new());
    };
    let mut drop: Vec<u64> = kept
        .iter()
        .map(|g| g.number)
        .filter(|&n| n <= newest)
        .collect();
    drop.sort_unstable();
    let mut next = state.clone();
    for g in next.history.iter_mut().filter(|g| drop.contains(&g.number)) {
        g.tensor_count = Some(g.touched());
        g.log = false;
        g.log_bytes = 0;
        g.tensors.clear();
    }
    next.save(dir, true)?;
    for &n in &drop {
        let path = dir.log_path(n);
        faults::reached("prune").map_err(|e| Error::io(&path, "remove", e))?;
        remove(&path)?;
    }
    fsync_dir(&dir.log_dir())?;
    Ok(drop)
}

#[cfg(test)]
mod tests {
    use super::super::state::Generation;
    use super::*;

    fn dir_with(logs: &[(u64, u64)], checkpoint: u64) -> (tempfile::TempDir, GenDir) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = GenDir::new(tmp.path(), tmp.path().join(".apollo_sync"));
        let mut s = State::default();
        for &(n, bytes) in logs {
            s = s.with_generation(Generation {
                number: n,
                time: 0.0,
                kind: "sync".into(),
                bytes_changed: 4096,
                log_bytes: bytes,
                log: bytes > 0,
                elements_changed: 1,
                files: vec![],
                tensors: [("w".to_owned(), 1)].into(),
                rollback_to: None,
                tensor_count: None,
            });
            std::fs::create_dir_all(dir.log_dir()).unwrap();
            if bytes > 0 {
                std::fs::write(dir.log_path(n), b"log").unwrap();
            }
        }
        s.checkpoint = checkpoint;
        s.save(&dir, true).unwrap();
        (tmp, dir)
    }

    fn logs(dir: &GenDir) -> Vec<u64> {
        dir.logs().unwrap().into_keys().collect()
    }

    #[test]
    fn keeps_the_newest_and_never_one_after_the_checkpoint() {
        let (_t, dir) = dir_with(&[(1, 10), (2, 10), (3, 10), (4, 10)], 2);
        assert_eq!(prune(&dir, 1, None).unwrap(), vec![1, 2]);
        assert_eq!(logs(&dir), vec![3, 4], "3 and 4 are after the checkpoint");
        let s = State::load(&dir).unwrap();
        let one = s.find(1).unwrap();
        assert!(!one.log && one.log_bytes == 0 && one.tensors.is_empty());
        assert_eq!(one.touched(), 1, "the count stays");
        std::fs::write(dir.marker_path(4), b"").unwrap();
        assert_eq!(prune(&dir, 1, None).unwrap(), vec![3]);
        assert_eq!(
            prune(&dir, 0, Some(0)).unwrap(),
            Vec::<u64>::new(),
            "the newest stays"
        );
        assert_eq!(logs(&dir), vec![4]);
    }

    #[test]
    fn a_budget_drops_everything_older_than_what_passes_it() {
        let (_t, dir) = dir_with(&[(1, 10), (2, 0), (3, 50), (4, 30), (5, 30)], 5);
        // newest first: 5 (30), 4 (60), 3 (110 > 100): 3 goes, and 1 with it
        assert_eq!(prune(&dir, 20, Some(100)).unwrap(), vec![1, 3]);
        assert_eq!(logs(&dir), vec![4, 5]);
        assert_eq!(prune(&dir, 20, Some(100)).unwrap(), Vec::<u64>::new());
    }
}
