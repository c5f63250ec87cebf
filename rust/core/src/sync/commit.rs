//! Stage 4, with a log: the commit thread, which makes each batch of held
//! records durable (a log barrier), then writes their bytes in place.

use super::*;

/// The background thread of a logged sync: for each batch, a log barrier,
/// then the in-place writes (through the page cache: the caller makes them
/// durable after the commit).
pub(super) struct Committer {
    pub(super) tx: Option<SyncSender<Batch>>,
    pub(super) worker: Worker,
    /// Set to stop: batches not yet started are dropped, writers stop between runs.
    pub(super) stop: AbortHandle,
}

impl Committer {
    pub(super) fn spawn(
        shards: Arc<Vec<Shard>>,
        log: Arc<DeltaLog>,
        keep: usize,
        stop: AbortHandle,
    ) -> Result<Self> {
        let (tx, rx) = sync_channel::<Batch>(1);
        let halt = stop.clone();
        let worker = Worker::spawn("commit", stop.clone(), move |fail| {
            for batch in rx {
                if halt.is_aborted() {
                    continue; // drain without writing: the sync is being abandoned
                }
                match commit_batch(&shards, &log, batch, &halt) {
                    Ok(written) => SPARE.put(written, keep),
                    Err(e) => fail(e),
                }
            }
        })?;
        Ok(Committer {
            tx: Some(tx),
            worker,
            stop,
        })
    }

    /// The first error of an earlier batch, if any.
    pub(super) fn check(&self) -> Result<()> {
        self.worker.check()
    }

    pub(super) fn submit(&self, batch: Batch) -> Result<()> {
        self.check()?;
        let tx = self.tx.as_ref().expect("open until finish");
        if tx.send(batch).is_err() {
            return Err(Error::Plan("the commit thread stopped".into()));
        }
        Ok(())
    }

    /// Waits for every batch to be durable and written.
    pub(super) fn finish(mut self) -> Result<()> {
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
        self.stop.abort();
        drop(self.tx.take());
        let _ = self.worker.join();
    }
}

/// A log barrier, then the batch's in-place writes in file order (the runs
/// come back, for their buffers to be reused). Direct
/// writes go out from [`IO_THREADS`] threads, run by run; writes through the
/// page cache from one thread per shard (writes to one file serialize on its
/// inode lock, so more threads on one file only wait for each other, but
/// shards write in parallel).
pub(super) fn commit_batch(
    shards: &[Shard],
    log: &DeltaLog,
    mut runs: Batch,
    stop: &AbortHandle,
) -> Result<Batch> {
    log.barrier()?;
    runs.sort_unstable_by_key(|r| (r.shard, r.offset));
    let groups: Vec<&[WriteReq<'static>]> = if io_threads(shards) == CACHED_IO_THREADS {
        runs.chunk_by(|a, b| a.shard == b.shard).collect()
    } else {
        runs.chunks(1).collect()
    };
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..IO_THREADS.min(groups.len()) {
            scope.spawn(|| {
                let mut staging = Staging::default();
                while !abort.load(Ordering::Relaxed) {
                    let Some(group) = groups.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    for r in group.iter() {
                        match writer_write(shards, r, &mut staging, stop) {
                            None => return, // aborted
                            Some(Err(e)) => return fail(&failed, &abort, e),
                            Some(Ok(())) => {}
                        }
                    }
                }
            });
        }
    });
    drop(groups);
    match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(runs),
    }
}
