//! Stage 6, flush, started early: for a sync whose caller waits for the flush
//! (`durable`), the writeback of what the writers wrote, begun while the sync
//! goes on.
//!
//! Without it a logged sync leaves every byte it wrote dirty until the
//! `fdatasync` after the commit: on a training step that changes every block,
//! a model's worth of dirty pages, all written back after the last write. With
//! it the pages go to the device as they are written, and that `fdatasync`
//! waits only for the tail.
//!
//! Measured on one AdamW lr 1e-5 step, every block changed
//! (`benches/probes/writeback.py`, H200 host, 16 cores, 5.5 GB): a durable
//! sync took 3.65 s with the writeback left to the flush and 2.74 s with it
//! started here; the `Dirty:` peak fell from 5252 to 137-149 MiB. But a sync
//! that returns at its commit went from 1.37 to 2.83 s with it: the log's
//! barriers, on the sync's path, queue behind the writeback on the device. So
//! only a durable sync starts it ([`Options::writeback_bytes`]); the others
//! leave it to the flush after the commit, which runs while the caller trains.
//!
//! A thread of its own starts it, at the lowest CPU priority:
//! `SYNC_FILE_RANGE_WRITE` blocks once the device's queue is full, and a
//! writer that waited would hold up the batches behind it; and on a machine
//! whose cores the diff keeps busy (two), the submission gets only idle time.
//! (Under the BFQ scheduler nice 19 also means the lowest best-effort I/O
//! priority for the writes it submits; the measurements above were made with
//! the writer threads starting it as well, at normal priority, with the same
//! result.)
//! What it has not started when the writes end is dropped: the flush writes
//! those pages. Each writer thread counts its own bytes: a shard has one
//! writer through the page cache, so its writeback starts every 16 MiB; with
//! direct I/O (where a refused shard falls back to the page cache) a shard's
//! runs go to every writer in turn, each counting its 16 MiB. A span handed
//! over covers the gaps between its runs too: those pages are clean or
//! already under writeback, which `sync_file_range` skips. Starting it is
//! advice: a thread that cannot be started, or a failed start, leaves the
//! sync as it was; a failed writeback stays recorded on the file for the
//! flush's `fdatasync`, which reports it (`SYNC_FILE_RANGE_WRITE` alone does
//! not consume the error).
//!
//! [`Options::writeback_bytes`]: crate::sync::Options::writeback_bytes

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::apply::hold::WriteReq;
use crate::error::{Error, Result};
use crate::sync::{Shard, Timings};

/// `(shard, start, end)` of written bytes whose writeback is asked for.
type Span = (usize, u64, u64);

/// The span of each shard a writer thread wrote since it last handed one to
/// the [`Kicker`]; handed over once it holds `every` bytes.
pub(crate) struct Behind {
    every: u64,
    kicker: Option<(Sender<Span>, Arc<Timings>)>,
    /// `(shard, start, end, bytes written in it)`, a few shards at most.
    spans: Vec<(usize, u64, u64, u64)>,
}

impl Behind {
    pub(crate) fn new(every: usize, kicker: Option<&Kicker>) -> Self {
        Behind {
            every: every as u64,
            kicker: kicker.and_then(|k| Some((k.tx.clone()?, k.timings.clone()))),
            spans: Vec::new(),
        }
    }

    /// Counts a run written through the page cache.
    pub(crate) fn wrote(&mut self, shard: &Shard, run: &WriteReq<'_>) {
        let Some((kicker, timings)) = &self.kicker else {
            return;
        };
        if self.every == 0 || shard.io.writes_direct() {
            return;
        }
        let (start, end) = (run.offset, run.offset + run.data.len() as u64);
        let i = match self.spans.iter().position(|s| s.0 == run.shard) {
            Some(i) => i,
            None => {
                self.spans.push((run.shard, start, end, 0));
                self.spans.len() - 1
            }
        };
        let span = &mut self.spans[i];
        span.1 = span.1.min(start);
        span.2 = span.2.max(end);
        span.3 += end - start;
        if span.3 >= self.every {
            let (shard, lo, hi, _) = self.spans.swap_remove(i);
            timings.writeback_spans.fetch_add(1, Ordering::Relaxed);
            let _ = kicker.send((shard, lo, hi)); // a stopped kicker drops it
        }
    }
}

/// The thread that starts the writeback of the spans the writers hand it,
/// at nice 19.
pub(crate) struct Kicker {
    tx: Option<Sender<Span>>,
    timings: Arc<Timings>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Kicker {
    pub(crate) fn spawn(shards: Arc<Vec<Shard>>, timings: Arc<Timings>) -> Result<Self> {
        let (tx, rx) = channel::<Span>();
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let counted = timings.clone();
        let thread = std::thread::Builder::new()
            .name("apollo-sync-writeback".into())
            .spawn(move || {
                lowest_priority();
                for (shard, lo, hi) in rx {
                    if halt.load(Ordering::Relaxed) {
                        break;
                    }
                    // Advice: an error here is not the sync's. A failed
                    // writeback stays recorded on the file for the
                    // `fdatasync` after the commit, which reports it (and
                    // the checkpoint does not pass it).
                    let _ = shards[shard].io.start_writeback(lo, hi - lo);
                    counted.writeback_started.fetch_add(1, Ordering::Relaxed);
                }
            })
            .map_err(|e| Error::Plan(format!("cannot start the writeback thread: {e}")))?;
        Ok(Kicker {
            tx: Some(tx),
            timings,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Kicker {
    /// Drops the spans not started yet and waits for the one being started.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Lowers the calling thread's CPU priority to nice 19 (Linux: a thread's
/// nice value is its own). Best effort.
fn lowest_priority() {
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::read::shard::ShardIo;

    #[test]
    fn a_span_is_handed_over_once_its_shard_has_that_many_bytes_written() {
        let (tx, rx) = channel();
        let timings = Arc::new(Timings::default());
        let mut behind = Behind {
            every: 3 << 12,
            kicker: Some((tx, timings.clone())),
            spans: Vec::new(),
        };
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let io = ShardIo::open(f.path(), 1 << 20, false, 4096).unwrap();
        let shard = Shard {
            io,
            changed: AtomicU64::new(0),
            changed_blocks: AtomicU64::new(0),
            elements: AtomicU64::new(0),
        };
        let run = |shard: usize, offset: u64| WriteReq {
            shard,
            offset,
            data: Cow::Owned(vec![0; 4096]),
        };
        // Shard 0: blocks 0 and 8 (two blocks written, nine blocks of extent:
        // not yet), shard 1's block 20 between them, then shard 0's block 5:
        // three blocks written, the span handed over, gap and all.
        behind.wrote(&shard, &run(0, 0));
        behind.wrote(&shard, &run(0, 8 << 12));
        behind.wrote(&shard, &run(1, 20 << 12));
        assert!(
            rx.try_recv().is_err(),
            "counts bytes written, not the extent"
        );
        behind.wrote(&shard, &run(0, 5 << 12));
        assert_eq!(rx.try_recv(), Ok((0, 0, 9 << 12)));
        assert!(rx.try_recv().is_err(), "shard 1 holds one block of three");
        assert_eq!(behind.spans, vec![(1, 20 << 12, 21 << 12, 4096)]);
        assert_eq!(timings.writeback_spans.load(Ordering::Relaxed), 1);
    }
}
