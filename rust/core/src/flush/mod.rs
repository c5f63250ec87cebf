//! Stage 6, flush: written shards made durable.
//!
//! - Without a log, here: each shard made durable in the background once its
//!   writes are done, before the sync returns.
//! - With one, `generation.rs`: after the commit, a generation's shards made
//!   durable in the background and its checkpoint marked; `writeback.rs`: for
//!   a sync that waits for that flush, the writeback started while it writes.

use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::faults;
use crate::sync::worker::{FirstError, Worker};
use crate::sync::Shard;

mod generation;
pub(crate) mod writeback;

pub use generation::{touch_durably, GenerationFlush, Outcome};

/// Makes shards durable (`fdatasync`) on a background thread. Page-cache
/// writes reach the disk only at writeback: flushing a shard once its writes
/// are done lets the device work while the next shard is diffed and written,
/// so `finish` waits for little more than the last one. An error is kept
/// for [`finish`](Self::finish) (a failed `fdatasync` is reported once).
pub(crate) struct Flusher {
    tx: Option<Sender<usize>>,
    worker: Worker,
}

impl Flusher {
    pub(crate) fn spawn(shards: Arc<Vec<Shard>>, errors: FirstError) -> Result<Self> {
        let (tx, rx) = channel::<usize>();
        let halt = errors.stop.clone();
        let worker = Worker::spawn("flush", errors, move |fail| {
            for i in rx {
                if halt.is_aborted() {
                    continue;
                }
                let s = &shards[i];
                if let Err(e) = faults::reached("flush")
                    .map_err(|e| Error::io(s.io.path(), "fsync", e))
                    .and_then(|()| s.io.sync())
                {
                    fail(e);
                }
            }
        })?;
        Ok(Flusher {
            tx: Some(tx),
            worker,
        })
    }

    /// Flushes shard `i` when the thread gets to it.
    pub(crate) fn flush(&self, i: usize) {
        let tx = self.tx.as_ref().expect("open until finish");
        let _ = tx.send(i); // the thread lives until `finish`: the send cannot fail
    }

    /// Waits for every requested flush (once every sender is gone).
    pub(crate) fn finish(mut self) -> Result<()> {
        drop(self.tx.take());
        self.worker.join()
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        drop(self.tx.take());
        let _ = self.worker.join();
    }
}
