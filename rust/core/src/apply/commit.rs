//! Stage 5, apply, with a log: the commit thread, which makes each batch of held
//! records durable (a log barrier), then hands the batch to the writers, which
//! write its bytes in place while the next batch is made durable.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, sync_channel, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::hold::{Batch, WriteReq, SPARE};
use super::write::{writer_write, IO_THREADS};
use crate::error::{Error, Result};
use crate::flush::writeback::{Behind, Kicker};
use crate::log::DeltaLog;
use crate::read::shard::Staging;
use crate::sync::worker::{FirstError, Worker};
use crate::sync::{Shard, Timings};

/// The background thread of a logged sync: for each batch, a log barrier,
/// then the batch handed to the [`Writers`] (writes through the page cache:
/// the caller makes them durable after the commit).
pub(crate) struct Committer {
    pub(super) tx: Option<SyncSender<Batch>>,
    /// Its `errors.stop` stops the sync: batches not yet queued are dropped,
    /// writers stop between runs.
    pub(super) worker: Worker,
}

impl Committer {
    pub(crate) fn spawn(
        shards: Arc<Vec<Shard>>,
        log: Arc<DeltaLog>,
        hold_bytes: usize,
        writeback_bytes: usize,
        errors: FirstError,
        timings: Arc<Timings>,
    ) -> Result<Self> {
        let (tx, rx) = sync_channel::<Batch>(1);
        let halt = errors.stop.clone();
        let writers = Writers::spawn(
            shards,
            hold_bytes,
            writeback_bytes,
            errors.clone(),
            timings.clone(),
        )?;
        let worker = Worker::spawn("commit", errors, move |fail| {
            let mut writers = writers;
            for batch in rx {
                if halt.is_aborted() {
                    // the sync is being abandoned, or a writer failed: drain
                    // without a barrier or a write
                    continue;
                }
                let start = Instant::now();
                match log.barrier() {
                    Ok(made) => {
                        if made {
                            Timings::add(&timings.barrier_ns, start);
                            timings.barriers.fetch_add(1, Ordering::Relaxed);
                        }
                        writers.queue(batch)
                    }
                    Err(e) => fail(e),
                }
            }
            if let Err(e) = writers.finish() {
                fail(e);
            }
        })?;
        Ok(Committer {
            tx: Some(tx),
            worker,
        })
    }

    /// The sync's first error so far (an earlier batch's), if any.
    pub(crate) fn check(&self) -> Result<()> {
        self.worker.check()
    }

    pub(crate) fn submit(&self, batch: Batch) -> Result<()> {
        self.check()?;
        let tx = self.tx.as_ref().expect("open until finish");
        if tx.send(batch).is_err() {
            return Err(Error::Plan("the commit thread stopped".into()));
        }
        Ok(())
    }

    /// Waits for every batch to be durable and written.
    pub(crate) fn finish(mut self) -> Result<()> {
        drop(self.tx.take());
        self.worker.join()
    }
}

impl Drop for Committer {
    /// Unless [`finish`](Self::finish) ran, stops without writing what is
    /// still queued, and waits for the thread: once a sync is abandoned,
    /// nothing may write behind the back of whoever undoes it.
    fn drop(&mut self) {
        if self.worker.joined() {
            return; // finished: nothing to stop (and the flusher must go on)
        }
        self.worker.errors.stop.abort();
        drop(self.tx.take());
        let _ = self.worker.join();
    }
}

/// The in-place writers of a logged sync. A batch's runs are queued here once
/// its barrier is done, and the commit thread goes on to the next barrier while
/// they are written: barriers and writes no longer take turns (an H200's
/// every-block AdamW sync of 5.5 GB: 0.94-1.10 s, against 1.22-1.35 s when
/// they did; BENCHMARKS.md, session 11). Each shard's runs go to one thread,
/// in file order: writes through the page cache to one file serialize on its
/// inode lock, so more threads on one file only wait for each other, while
/// several shards write at once. Direct writes, which each wait for the
/// device, go to every thread in turn. The bytes queued and not yet written
/// are bounded by a batch.
struct Writers {
    txs: Vec<Sender<WriteReq<'static>>>,
    threads: Vec<JoinHandle<()>>,
    queued: Arc<Queued>,
    /// Direct writes: the thread the next run goes to.
    direct: Option<usize>,
    /// Starts the writeback of what the writers wrote.
    kicker: Option<Kicker>,
}

/// Bytes queued for the writers and not yet written.
struct Queued {
    bytes: Mutex<usize>,
    written: Condvar,
    limit: usize,
}

impl Queued {
    /// Waits until `n` more bytes fit (or nothing is queued: a run larger than
    /// the limit still goes, alone).
    fn add(&self, n: usize) {
        let mut q = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        while *q > 0 && *q + n > self.limit {
            q = self.written.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        *q += n;
    }

    fn done(&self, n: usize) {
        *self.bytes.lock().unwrap_or_else(|e| e.into_inner()) -= n;
        self.written.notify_all();
    }
}

impl Writers {
    /// Batches' worth of buffers kept for reuse: the one being held, the one
    /// queued for the commit thread, the one it is queuing, the bytes queued.
    const KEEP_BATCHES: usize = 4;

    fn spawn(
        shards: Arc<Vec<Shard>>,
        hold_bytes: usize,
        writeback_bytes: usize,
        errors: FirstError,
        timings: Arc<Timings>,
    ) -> Result<Self> {
        let direct = shards.iter().any(|s| s.io.writes_direct());
        let n = match direct {
            true => IO_THREADS,
            false => IO_THREADS.min(shards.len()).max(1),
        };
        let queued = Arc::new(Queued {
            bytes: Mutex::new(0),
            written: Condvar::new(),
            limit: hold_bytes,
        });
        let keep = Self::KEEP_BATCHES * hold_bytes;
        let kicker = match writeback_bytes {
            0 => None,
            // advice: a sync without it is whole, only its flush is longer
            _ => Kicker::spawn(shards.clone(), timings.clone()).ok(),
        };
        let mut txs = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = channel::<WriteReq<'static>>();
            let (shards, queued, errors, timings) = (
                shards.clone(),
                queued.clone(),
                errors.clone(),
                timings.clone(),
            );
            let mut behind = Behind::new(writeback_bytes, kicker.as_ref());
            let thread = std::thread::Builder::new()
                .name(format!("apollo-sync-write-{i}"))
                .spawn(move || {
                    let mut staging = Staging::default();
                    let mut busy = 0;
                    for run in rx {
                        let len = run.data.len();
                        match writer_write(&shards, &run, &mut staging, &errors.stop, &mut busy) {
                            Some(Err(e)) => errors.set(e), // the other writers stop too
                            Some(Ok(())) => behind.wrote(&shards[run.shard], &run),
                            None => {}
                        }
                        SPARE.put(run, keep);
                        queued.done(len);
                    }
                    timings.writer_done(busy);
                })
                .map_err(|e| Error::Plan(format!("cannot start a writer thread: {e}")))?;
            txs.push(tx);
            threads.push(thread);
        }
        Ok(Writers {
            txs,
            threads,
            queued,
            direct: direct.then_some(0),
            kicker,
        })
    }

    /// Queues a batch whose records are durable, in file order.
    fn queue(&mut self, mut runs: Batch) {
        runs.sort_unstable_by_key(|r| (r.shard, r.offset));
        let n = self.txs.len();
        for run in runs {
            self.queued.add(run.data.len());
            let to = match &mut self.direct {
                Some(next) => {
                    *next = (*next + 1) % n;
                    *next
                }
                None => run.shard % n,
            };
            // A writer drains its queue until it closes, so the send cannot fail.
            let _ = self.txs[to].send(run);
        }
    }

    /// Waits for every queued write (their errors are the sync's
    /// [`FirstError`]'s).
    fn finish(&mut self) -> Result<()> {
        self.txs.clear();
        let mut joined = Ok(());
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                joined = Err(Error::Plan("a writer thread panicked".into()));
            }
        }
        // What it has not started yet the flush after the commit writes.
        drop(self.kicker.take());
        joined
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
