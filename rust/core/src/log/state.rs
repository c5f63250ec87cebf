//! `state.json`: the committed generation, the checkpoint and the history.
//!
//! A cache of what the logs say, replaced whole (temp file, `fsync`, rename)
//! after each commit: a generation whose commit record is durable is
//! committed even when the state file does not list it yet, and recovery
//! adds it from its log ([`Generation::of_log`]).
//!
//! ```text
//! {"format": 2, "generation": N, "checkpoint": K,
//!  "history": [{"number", "time", "kind", "bytes_changed", "log_bytes", "log",
//!               "elements_changed", "files", "tensors", "rollback_to",
//!               "tensor_count"}, ...]}
//! ```
//!
//! A state file of apollo_sync 0.1 (`"format": 1`, undo journals) reads as a
//! history without rollback points.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::dir::{fsync_dir, GenDir};
use super::reader::LogFile;
use crate::error::{Error, Result};
use crate::faults;

/// The version of `state.json` this build writes.
pub const FORMAT: u64 = 2;

/// Generations listed at most, besides those whose log is kept (never
/// dropped). The file is rewritten at every commit, so it must not grow with
/// the number of syncs a training run makes.
pub const HISTORY_LIMIT: usize = 256;

/// One committed state of the directory, and how it was reached. A field
/// this build does not know is refused, not dropped at the next rewrite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generation {
    pub number: u64,
    /// Commit time, seconds since the epoch.
    pub time: f64,
    /// "sync" or "rollback".
    pub kind: String,
    /// Bytes of the blocks it overwrote.
    pub bytes_changed: u64,
    /// Bytes of its log (0 once pruned, or when synced without one).
    pub log_bytes: u64,
    /// Whether its log is kept, so a rollback can go back past it.
    pub log: bool,
    #[serde(default)]
    pub elements_changed: u64,
    #[serde(default)]
    pub files: Vec<String>,
    /// Elements changed per tensor touched, while its log is kept.
    #[serde(default)]
    pub tensors: BTreeMap<String, u64>,
    #[serde(default)]
    pub rollback_to: Option<u64>,
    /// How many tensors it touched, once `tensors` was dropped.
    #[serde(default)]
    pub tensor_count: Option<u64>,
}

/// What a commit record's metadata says (the history entry less what the
/// log itself tells: its number, size and elements).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitMeta {
    pub time: f64,
    pub kind: String,
    pub bytes_changed: u64,
    pub files: Vec<String>,
    pub tensors: BTreeMap<String, u64>,
    pub rollback_to: Option<u64>,
}

impl Generation {
    /// The number of tensors it touched.
    pub fn touched(&self) -> u64 {
        self.tensor_count.unwrap_or(self.tensors.len() as u64)
    }

    /// The history entry a committed log stands for.
    pub fn of_log(log: &LogFile) -> Result<Generation> {
        let Some(commit) = &log.commit else {
            return Err(Error::Plan(format!(
                "{}: not committed",
                log.path().display()
            )));
        };
        let meta: Value = serde_json::from_str(if commit.meta.is_empty() {
            "{}"
        } else {
            &commit.meta
        })
        .map_err(|e| Error::state(log.path(), format!("unreadable commit metadata: {e}")))?;
        let Value::Object(meta) = meta else {
            return Err(Error::state(log.path(), "commit metadata is not an object"));
        };
        let bad = |what: &str| Error::state(log.path(), format!("commit metadata: bad {what}"));
        let u64_of = |v: &Value| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64));
        let tensors = match meta.get("tensors") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| Ok((k.clone(), u64_of(v).ok_or_else(|| bad("tensors"))?)))
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad("tensors")),
        };
        let files = match meta.get("files") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|f| f.as_str().map(str::to_owned).ok_or_else(|| bad("files")))
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad("files")),
        };
        let covered = log.records.iter().map(|r| r.head.len).sum();
        Ok(Generation {
            number: log.generation(),
            time: meta.get("time").and_then(Value::as_f64).unwrap_or(0.0),
            kind: log.kind().name().to_owned(),
            bytes_changed: meta
                .get("bytes_changed")
                .and_then(u64_of)
                .unwrap_or(covered),
            log_bytes: log.len,
            log: true,
            elements_changed: log.elements(),
            files,
            tensors,
            rollback_to: meta.get("rollback_to").and_then(u64_of),
            tensor_count: None,
        })
    }
}

/// The committed generation, the checkpoint and what led to them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub generation: u64,
    /// Every generation up to this one was durable in the shards themselves.
    pub checkpoint: u64,
    pub history: Vec<Generation>,
}

#[derive(Serialize)]
struct StateFile<'a> {
    format: u64,
    #[serde(flatten)]
    state: &'a State,
}

impl State {
    pub fn find(&self, number: u64) -> Option<&Generation> {
        self.history.iter().find(|g| g.number == number)
    }

    /// Reads the state file (generation 0 with no history when there is none).
    pub fn load(dir: &GenDir) -> Result<State> {
        let path = dir.state_path();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(Error::state(&path, format!("unreadable state file: {e}"))),
        };
        // The version first, skipping the rest unparsed: then the body
        // straight into its types (no tree of values: 139 kB of a 400-tensor
        // model's history in about a third of the time).
        #[derive(Deserialize)]
        struct Version {
            format: Option<Value>,
        }
        let unreadable =
            |e: serde_json::Error| Error::state(&path, format!("unreadable state file: {e}"));
        let version: Version = serde_json::from_slice(&text).map_err(unreadable)?;
        match version.format.as_ref().and_then(Value::as_u64) {
            Some(FORMAT) => serde_json::from_slice(&text)
                .map_err(|e| Error::state(&path, format!("malformed state file: {e}"))),
            Some(1) => {
                let raw: Value = serde_json::from_slice(&text).map_err(unreadable)?;
                from_format_1(dir, &raw)
                    .ok_or_else(|| Error::state(&path, "malformed state file (format 1)"))?
            }
            _ => Err(Error::state(
                &path,
                format!("not a format-{FORMAT} apollo_sync state file"),
            )),
        }
    }

    /// Replaces the state file atomically: its bytes are made durable before
    /// the rename, so a power cut leaves the old file or the new one, whole.
    /// `durable` makes the rename durable too (one more `fsync`); a commit
    /// whose log holds the commit record does without it, since recovery
    /// rebuilds the entry from the log.
    pub fn save(&self, dir: &GenDir, durable: bool) -> Result<()> {
        dir.ensure()?;
        let data = serde_json::to_vec(&StateFile {
            format: FORMAT,
            state: self,
        })
        .map_err(|e| Error::Plan(format!("cannot encode the state file: {e}")))?;
        let path = dir.state_path();
        let tmp = dir.meta().join("state.json.tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, "create", e))?;
        f.write_all(&data)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(&tmp, "write", e))?;
        drop(f);
        faults::reached("state").map_err(|e| Error::io(&path, "replace", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, "replace", e))?;
        if durable {
            fsync_dir(dir.meta())?;
        }
        let old = dir.meta().join("undo");
        if old.is_dir() {
            // apollo_sync 0.1's journals, unreadable now (see `load`)
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(())
    }

    /// This state with `generation` committed; beyond [`HISTORY_LIMIT`]
    /// entries the oldest without a log are dropped from the history.
    pub fn with_generation(&self, generation: Generation) -> State {
        let number = generation.number;
        let mut history: Vec<Generation> = self
            .history
            .iter()
            .filter(|g| g.number != number)
            .cloned()
            .collect();
        history.push(generation);
        let excess = history.len().saturating_sub(HISTORY_LIMIT);
        if excess > 0 {
            let mut old: Vec<u64> = history[..history.len() - 1]
                .iter()
                .filter(|g| !g.log)
                .map(|g| g.number)
                .collect();
            old.sort_unstable();
            old.truncate(excess);
            history.retain(|g| !old.contains(&g.number));
        }
        State {
            generation: self.generation.max(number),
            checkpoint: self.checkpoint,
            history,
        }
    }

    /// The history up to generation `limit`, as the directory stands once
    /// what came after it is rolled back.
    pub fn upto(&self, limit: u64) -> State {
        State {
            generation: limit.min(self.generation),
            checkpoint: self.checkpoint.min(limit),
            history: self
                .history
                .iter()
                .filter(|g| g.number <= limit)
                .cloned()
                .collect(),
        }
    }
}

/// The history of an apollo_sync 0.1 directory: its syncs were durable when
/// they returned; its undo journals cannot be read by this version. `None`
/// when a field is missing or of the wrong type.
fn from_format_1(dir: &GenDir, raw: &Value) -> Option<Result<State>> {
    let generation = raw.get("generation")?.as_u64()?;
    let undo = dir.meta().join("undo");
    if let Ok(entries) = std::fs::read_dir(&undo) {
        for e in entries.flatten() {
            let p = e.path();
            let n = p
                .file_stem()
                .and_then(|s| s.to_str())
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok());
            if p.extension().is_some_and(|x| x == "undo") && n.is_some_and(|n| n > generation) {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                return Some(Err(Error::state(
                    dir.root(),
                    format!(
                        "an interrupted sync of apollo_sync 0.1 awaits recovery ({name}); \
                         run `apollo-sync recover` with apollo_sync 0.1 first"
                    ),
                )));
            }
        }
    }
    let mut history = Vec::new();
    for g in raw.get("history")?.as_array()? {
        let files = match g.get("files") {
            Some(Value::Array(a)) => a.iter().map(|f| f.as_str().map(str::to_owned)).collect(),
            _ => Some(Vec::new()),
        }?;
        let tensors = g
            .get("tensors")
            .and_then(Value::as_array)
            .map_or(0, Vec::len) as u64;
        history.push(Generation {
            number: g.get("number")?.as_u64()?,
            time: g.get("time")?.as_f64()?,
            kind: g.get("kind")?.as_str()?.to_owned(),
            bytes_changed: g.get("bytes_changed")?.as_u64()?,
            log_bytes: 0,
            log: false,
            elements_changed: 0,
            files,
            tensors: BTreeMap::new(),
            rollback_to: g.get("rollback_to").and_then(Value::as_u64),
            tensor_count: Some(
                g.get("tensor_count")
                    .and_then(Value::as_u64)
                    .filter(|&n| n > 0)
                    .unwrap_or(tensors),
            ),
        });
    }
    Some(Ok(State {
        generation,
        checkpoint: generation,
        history,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(number: u64, log: bool) -> Generation {
        Generation {
            number,
            time: 1.5,
            kind: "sync".into(),
            bytes_changed: 4096,
            log_bytes: if log { 100 } else { 0 },
            log,
            elements_changed: 3,
            files: vec!["a.safetensors".into()],
            tensors: BTreeMap::from([("w".into(), 3)]),
            rollback_to: None,
            tensor_count: None,
        }
    }

    #[test]
    fn a_state_saved_reads_back_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = GenDir::new(tmp.path(), tmp.path().join(".apollo_sync"));
        assert_eq!(State::load(&dir).unwrap(), State::default(), "none yet");
        let s = State::default()
            .with_generation(entry(1, false))
            .with_generation(entry(2, true));
        s.save(&dir, true).unwrap();
        assert_eq!(State::load(&dir).unwrap(), s);
        assert_eq!(s.generation, 2);
        assert!(!dir.meta().join("state.json.tmp").exists());
    }

    #[test]
    fn the_history_drops_its_oldest_entries_without_a_log_past_the_limit() {
        let mut s = State::default();
        for n in 1..=(HISTORY_LIMIT as u64 + 10) {
            s = s.with_generation(entry(n, n <= 5 || n > 200));
        }
        assert_eq!(s.history.len(), HISTORY_LIMIT);
        let kept: Vec<u64> = s.history.iter().map(|g| g.number).collect();
        assert_eq!(
            &kept[..7],
            &[1, 2, 3, 4, 5, 16, 17],
            "logs are never dropped"
        );
        assert_eq!(*kept.last().unwrap(), HISTORY_LIMIT as u64 + 10);
        // committing an entry again replaces it
        let again = s.with_generation(entry(3, false));
        assert_eq!(again.history.iter().filter(|g| g.number == 3).count(), 1);
    }

    #[test]
    fn bad_state_files_are_refused_with_their_path() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = GenDir::new(tmp.path(), tmp.path().join(".apollo_sync"));
        dir.ensure().unwrap();
        for (text, says) in [
            ("{not json", "unreadable state file"),
            (r#"{"format": 3}"#, "not a format-2"),
            (r#"{"format": 2, "generation": 1}"#, "malformed state file"),
            (r#"{"format": 1, "history": []}"#, "malformed state file"),
        ] {
            std::fs::write(dir.state_path(), text).unwrap();
            let e = State::load(&dir).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("state.json"), "{text}: {e}");
        }
    }

    #[test]
    fn a_format_1_state_reads_as_a_history_without_rollback_points() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = GenDir::new(tmp.path(), tmp.path().join(".apollo_sync"));
        dir.ensure().unwrap();
        let undo = dir.meta().join("undo");
        std::fs::create_dir(&undo).unwrap();
        std::fs::write(
            dir.state_path(),
            r#"{"format": 1, "generation": 2, "history": [
                {"number": 1, "time": 1.0, "kind": "sync", "bytes_changed": 8192,
                 "files": ["a.safetensors"], "tensors": ["w", "b"]},
                {"number": 2, "time": 2.0, "kind": "rollback", "bytes_changed": 4096,
                 "rollback_to": 0, "tensor_count": 5}]}"#,
        )
        .unwrap();
        std::fs::write(undo.join("3.undo"), b"").unwrap();
        let e = State::load(&dir).unwrap_err().to_string();
        assert!(
            e.contains("apollo_sync 0.1 awaits recovery (3.undo)"),
            "{e}"
        );
        std::fs::remove_file(undo.join("3.undo")).unwrap();
        std::fs::write(undo.join("2.undo"), b"").unwrap(); // committed: stale
        let s = State::load(&dir).unwrap();
        assert_eq!((s.generation, s.checkpoint), (2, 2));
        assert!(s.history.iter().all(|g| !g.log));
        assert_eq!(s.history[0].touched(), 2);
        assert_eq!(s.history[1].touched(), 5);
        assert_eq!(s.history[1].rollback_to, Some(0));
        s.save(&dir, true).unwrap(); // the first save drops the old journals
        assert!(!undo.exists());
        assert_eq!(State::load(&dir).unwrap(), s);
    }
}
