//! Stage 5, apply, with a log: a changed run's delta is encoded and appended
//! to the log (stage 4: `crate::delta`, `crate::log`), its new bytes held until a barrier has made the record durable.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};

use super::commit::Committer;
use crate::error::Result;
use crate::log::{DeltaLog, Encoder};
use crate::sync::Shard;

/// A changed run on its way to a writer thread: borrowed from live memory, or
/// copied out of a chunk read from a live file.
pub(crate) struct WriteReq<'a> {
    pub(crate) shard: usize,
    pub(crate) offset: u64,
    pub(crate) data: Cow<'a, [u8]>,
}

/// Changed runs whose records are logged but not yet durable.
#[derive(Default)]
pub(crate) struct Held {
    pub(super) runs: Vec<WriteReq<'static>>,
    pub(crate) bytes: usize,
    /// The most bytes ever held at once in this sync (what the bound bounds).
    pub(crate) peak: usize,
}

/// Buffers of held runs, handed back once written and kept for the next
/// batch and the next sync of the process: a sync that holds gigabytes in turn
/// reuses the pages of its first batches, and a training loop's next sync
/// reuses this one's, instead of faulting fresh zeroed pages in for every run
/// (on two cores, page faults and `clear_page` were a sixth of a logged sync's
/// time; a pool per sync still paid them once per sync). Process-wide, bounded
/// by what the batches in flight hold (see [`Spare::put`]).
pub(super) static SPARE: Spare = Spare(Mutex::new(Pool {
    free: Vec::new(),
    bytes: 0,
}));

pub(super) struct Spare(Mutex<Pool>);

pub(super) struct Pool {
    free: Vec<Vec<u8>>,
    /// Capacity of the buffers in `free`.
    bytes: usize,
}

impl Spare {
    /// Smaller buffers come cheaply from the allocator's heap.
    const MIN: usize = 64 << 10;

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn copy_of(&self, bytes: &[u8]) -> Vec<u8> {
        let reused = match bytes.len() >= Self::MIN {
            true => {
                let mut p = self.pool();
                let v = p.free.pop();
                p.bytes -= v.as_ref().map_or(0, Vec::capacity);
                v
            }
            false => None,
        };
        let mut v = reused.unwrap_or_default();
        v.clear();
        v.extend_from_slice(bytes);
        v
    }

    /// Keeps a written run's buffer, up to `keep` bytes in the pool (what the
    /// batches a sync has in flight hold: more would only sit idle).
    pub(super) fn put(&self, run: WriteReq<'static>, keep: usize) {
        if let Cow::Owned(v) = run.data {
            let mut p = self.pool();
            if v.capacity() >= Self::MIN && p.bytes + v.capacity() <= keep {
                p.bytes += v.capacity();
                p.free.push(v);
            }
        }
    }
}

/// What a logged sync's diff workers share to hold new bytes.
#[derive(Clone, Copy)]
pub(crate) struct Holding<'s> {
    pub(crate) log: &'s DeltaLog,
    pub(super) held: &'s Mutex<Held>,
    pub(crate) committer: &'s Committer,
    /// Held bytes that make a batch
    /// ([`Options::hold_bytes`](crate::sync::Options::hold_bytes)).
    pub(super) bound: usize,
}

impl<'s> Holding<'s> {
    /// `None` without a log (or in a dry run: no committer).
    pub(crate) fn of(
        log: &'s Option<Arc<DeltaLog>>,
        held: &'s Mutex<Held>,
        committer: &'s Option<Committer>,
        bound: usize,
    ) -> Option<Self> {
        Some(Holding {
            log: log.as_deref()?,
            held,
            committer: committer.as_ref()?,
            bound,
        })
    }

    /// Takes every held run, for the committer.
    pub(crate) fn take(&self) -> Batch {
        let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        h.bytes = 0;
        std::mem::take(&mut h.runs)
    }
}

/// Where the diff sends a changed run.
#[derive(Clone, Copy)]
pub(crate) enum Sink<'s, 'a> {
    /// Count only.
    Dry,
    /// To the writer threads, once the job that found them is compared (a
    /// direct write evicts the cached folio around it, which the job may not
    /// have read yet).
    Queue(&'s SyncSender<WriteReq<'a>>),
    /// The delta to the log, new bytes held for after the barrier; once
    /// they pass the bound, handed to the committer from the worker that
    /// crossed it.
    Hold(Holding<'s>),
}

impl<'a> Sink<'_, 'a> {
    /// `live_mem` is the run's bytes in live memory, when they are there (so a
    /// queued write can borrow them instead of copying). Runs for the writer
    /// threads go to `found`, which the caller queues once its job is done.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn emit(
        &self,
        shard: usize,
        s: &Shard,
        offset: u64,
        old: &[u8],
        new: &[u8],
        width: u8,
        live_mem: Option<&'a [u8]>,
        enc: &mut Encoder,
        found: &mut Vec<WriteReq<'a>>,
    ) -> Result<()> {
        match *self {
            Sink::Dry => Ok(()),
            Sink::Queue(_) => {
                let data = live_mem.map_or_else(|| Cow::Owned(new.to_vec()), Cow::Borrowed);
                found.push(WriteReq {
                    shard,
                    offset,
                    data,
                });
                Ok(())
            }
            Sink::Hold(hold) => {
                let n =
                    hold.log
                        .append_delta(enc, shard as u32, offset, width as usize, old, new)?;
                s.elements.fetch_add(n, Ordering::Relaxed);
                // Copied before the lock: every diff worker holds runs here.
                let run = WriteReq {
                    shard,
                    offset,
                    data: Cow::Owned(SPARE.copy_of(new)),
                };
                let full = {
                    let mut h = hold.held.lock().unwrap_or_else(|e| e.into_inner());
                    h.bytes += new.len();
                    h.peak = h.peak.max(h.bytes);
                    h.runs.push(run);
                    h.bytes >= hold.bound
                };
                // Every held run's record is appended already, so the barrier
                // of this batch covers them all. Batches are disjoint (a block
                // is diffed once per sync), so their order does not matter.
                // Waits while the committer has a batch queued: the bound on
                // memory, whatever the size of the caller's feed.
                // (Two workers may cross it at once: the second finds nothing.)
                let batch = if full { hold.take() } else { Vec::new() };
                match batch.is_empty() {
                    true => Ok(()),
                    false => hold.committer.submit(batch),
                }
            }
        }
    }
}

/// A batch of changed runs whose records are logged.
pub(super) type Batch = Vec<WriteReq<'static>>;
