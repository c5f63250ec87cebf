//! Stage 5, apply, without a log: writer threads that write changed runs in place
//! while the diff goes on; and the in-place write itself.

use std::borrow::Cow;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Mutex;
use std::time::Instant;

use super::hold::WriteReq;
use crate::error::{Error, Result};
use crate::faults;
use crate::read::shard::Staging;
use crate::sync::worker::FirstError;
use crate::sync::{AbortHandle, Shard, Timings};

/// Threads that issue writes while the diff goes on. A direct write blocks its
/// thread for a device round trip (~100 µs on a virtual disk), so the diff
/// workers hand changed runs to these instead of waiting themselves.
pub(super) const IO_THREADS: usize = 16;

/// Threads that write through the page cache: such a write is a copy into the
/// cache that never waits for the device, and writes to one file serialize on
/// its inode lock, so more threads only spin on it.
pub(super) const CACHED_IO_THREADS: usize = 1;

/// Changed runs queued for the writers before the diff waits for them.
pub(crate) const WRITE_QUEUE: usize = 4096;

/// Writer threads for these shards: many for direct writes, which each wait
/// for the device, one for writes through the page cache.
pub(crate) fn io_threads(shards: &[Shard]) -> usize {
    if shards.iter().any(|s| s.io.writes_direct()) {
        IO_THREADS
    } else {
        CACHED_IO_THREADS
    }
}

/// One in-place write of changed blocks (a fault-injection point).
pub(crate) fn write_run(s: &Shard, offset: u64, data: &[u8], staging: &mut Staging) -> Result<()> {
    faults::reached("write").map_err(|e| Error::io(s.io.path(), "write", e))?;
    s.io.write_at(data, offset, staging)
}

/// Hands a run to the writers. The receiver lives as long as the feed and
/// the writers drain it even after a failure, so the send cannot fail.
pub(crate) fn queue<'a>(
    tx: &SyncSender<WriteReq<'a>>,
    shard: usize,
    offset: u64,
    data: Cow<'a, [u8]>,
) {
    let sent = tx.send(WriteReq {
        shard,
        offset,
        data,
    });
    debug_assert!(sent.is_ok(), "the write queue closed during a feed");
}

/// A writer thread: takes queued runs and writes them until the queue closes.
/// After the sync's first failure (which aborts it) it keeps draining, so the
/// diff never blocks on a full queue, but writes nothing more.
pub(crate) fn write_loop(
    shards: &[Shard],
    rx: &Mutex<Receiver<WriteReq<'_>>>,
    errors: &FirstError,
    timings: &Timings,
) {
    let mut staging = Staging::default();
    let mut busy = 0;
    loop {
        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(req) = next else { break };
        // Aborted: `writer_write` drains without writing.
        if let Some(Err(e)) = writer_write(shards, &req, &mut staging, &errors.stop, &mut busy) {
            errors.set(e);
        }
    }
    timings.writer_done(busy);
}

/// One run written by a writer thread; `None` once the sync is aborted. A
/// panic becomes an error like any other, so a writer never leaves the others
/// (or the diff) waiting. Adds the time it took to `busy_ns`.
pub(super) fn writer_write(
    shards: &[Shard],
    r: &WriteReq<'_>,
    staging: &mut Staging,
    stop: &AbortHandle,
    busy_ns: &mut u64,
) -> Option<Result<()>> {
    let start = Instant::now();
    let done = stop.guard(|| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            write_run(&shards[r.shard], r.offset, &r.data, staging)
        }))
        .unwrap_or_else(|_| Err(Error::Plan("a writer thread panicked".into())))
    });
    *busy_ns += start.elapsed().as_nanos() as u64;
    done
}
