//! Stage 6, with a log, after the commit: a generation's shards made durable
//! in the background, and the checkpoint marked.
//!
//! A committed generation is current through the page cache. Its flush
//! `fdatasync`s every shard it wrote, on a thread of its own, once the flush
//! of the generation before it has ended; then, only if both succeeded, it
//! creates the generation's *checkpoint marker* (`<N>.flushed` beside the
//! logs) and makes the marker's directory durable. The checkpoint (the last
//! generation the shards hold on disk by themselves, where recovery starts)
//! is the newest marker, so it never passes a generation that is not on
//! disk (given that the caller, like `journal.py`, starts each generation's
//! flush after its predecessor's and recovers from the logs before flushing
//! again once one failed). A failure is kept for whoever waits, and the next call redoes those
//! generations from their logs with fresh writes: Linux may mark pages whose
//! writeback failed clean, so the page cache proves nothing.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::faults;

/// `fdatasync` of each path: returns the first error, after trying every path.
fn flush_files(paths: &[PathBuf]) -> Result<()> {
    let mut first = None;
    for p in paths {
        let r = faults::reached("flush")
            .map_err(|e| Error::io(p, "fsync", e))
            .and_then(|()| {
                OpenOptions::new()
                    .write(true)
                    .open(p)
                    .and_then(|f| f.sync_data())
                    .map_err(|e| Error::io(p, "fsync", e))
            });
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Creates `path` (empty, if absent) and makes its directory entry durable.
pub fn touch_durably(path: &Path) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, "create", e))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, "fsync", e))
}

/// How a flush ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The shards are durable and the marker is made.
    Durable,
    /// Why not (no marker was made).
    Failed(String),
}

/// The background flush of one committed generation.
pub struct GenerationFlush {
    number: u64,
    outcome: Mutex<Option<Outcome>>,
    ended: Condvar,
}

impl GenerationFlush {
    /// Starts flushing `paths` for generation `number` once `after` (the
    /// flush of the generation before it, if still known) has ended; on
    /// success, marks the checkpoint with `marker`.
    pub fn start(
        number: u64,
        paths: Vec<PathBuf>,
        marker: PathBuf,
        after: Option<Arc<GenerationFlush>>,
    ) -> Result<Arc<Self>> {
        let flush = Arc::new(GenerationFlush {
            number,
            outcome: Mutex::new(None),
            ended: Condvar::new(),
        });
        let mine = flush.clone();
        std::thread::Builder::new()
            .name(format!("apollo-sync-flush-{number}"))
            .spawn(move || {
                let run =
                    std::panic::AssertUnwindSafe(|| match after.map(|a| (a.number, a.wait())) {
                        Some((n, Outcome::Failed(why))) => Outcome::Failed(format!(
                            "generation {n} before it was not made durable ({why})"
                        )),
                        _ => match flush_files(&paths).and_then(|()| touch_durably(&marker)) {
                            Ok(()) => Outcome::Durable,
                            Err(e) => Outcome::Failed(e.to_string()),
                        },
                    });
                // a panic is a failure too: never a flush that runs forever
                let outcome = std::panic::catch_unwind(run)
                    .unwrap_or_else(|_| Outcome::Failed("the flush thread panicked".into()));
                *mine.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
                mine.ended.notify_all();
            })
            .map_err(|e| Error::Plan(format!("cannot start the flush thread: {e}")))?;
        Ok(flush)
    }

    pub fn number(&self) -> u64 {
        self.number
    }

    /// How it ended, or `None` while it runs.
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits for it to end.
    pub fn wait(&self) -> Outcome {
        let o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        let o = self
            .ended
            .wait_while(o, |o| o.is_none())
            .unwrap_or_else(|e| e.into_inner());
        o.clone().expect("ended")
    }

    /// Waits for it to end, at most `limit`; `None` if it still runs.
    pub fn wait_for(&self, limit: Duration) -> Option<Outcome> {
        let o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        let (o, _) = self
            .ended
            .wait_timeout_while(o, limit, |o| o.is_none())
            .unwrap_or_else(|e| e.into_inner());
        o.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_marks_its_checkpoint_only_when_it_and_the_one_before_succeeded() {
        let dir = tempfile::tempdir().unwrap();
        let shard = dir.path().join("m.safetensors");
        std::fs::write(&shard, b"bytes").unwrap();
        let marker = |n: u64| dir.path().join(format!("{n}.flushed"));
        let gone = dir.path().join("gone.safetensors");

        // The first flush blocks opening a FIFO for writing until a reader
        // comes: its successor must still be waiting for it then.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a plain syscall with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let failed = GenerationFlush::start(2, vec![fifo.clone(), gone], marker(2), None).unwrap();
        let next = GenerationFlush::start(3, vec![shard.clone()], marker(3), Some(failed.clone()))
            .unwrap();
        assert_eq!(
            next.wait_for(Duration::from_millis(200)),
            None,
            "ran before its predecessor"
        );
        assert!(!marker(3).exists());
        let _reader = File::open(&fifo).unwrap(); // lets the first one go on
        match next.wait() {
            Outcome::Failed(why) => {
                assert!(why.starts_with("generation 2 before it"), "{why}");
                assert!(why.contains("fifo: fsync failed"), "{why}");
            }
            Outcome::Durable => panic!("a flush after a failed one marked its checkpoint"),
        }
        assert!(matches!(failed.outcome(), Some(Outcome::Failed(_))));
        assert!(!marker(2).exists() && !marker(3).exists());

        let ok = GenerationFlush::start(4, vec![shard], marker(4), Some(next)).unwrap();
        assert!(
            matches!(ok.wait(), Outcome::Failed(_)),
            "its predecessor failed"
        );
        let alone =
            GenerationFlush::start(5, vec![dir.path().join("m.safetensors")], marker(5), None)
                .unwrap();
        assert_eq!(alone.wait(), Outcome::Durable);
        assert_eq!(alone.wait(), Outcome::Durable, "the outcome stays");
        assert!(marker(5).exists() && !marker(4).exists());
    }
}
