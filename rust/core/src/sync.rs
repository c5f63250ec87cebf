//! The sync engine: live bytes in, changed blocks out.
//!
//! A caller describes the shards once, then feeds *segments*: a shard, an
//! absolute file offset and the live bytes that belong there. Per shard,
//! segments arrive in increasing offset order and never overlap (they are the
//! tensors of the file, in file order; gaps keep the file's bytes).
//!
//! Blocks are aligned to file offsets. A block wholly inside one segment is
//! diffed in parallel with the others (rayon); a block shared by several
//! segments, or by a segment and bytes that are not fed (the header, a tensor
//! nobody trains), is assembled in a *pending* block that starts as the file's
//! bytes and is overlaid by each segment in turn, then compared and written
//! once when the feed moves past it. Every write therefore covers whole blocks
//! and never clobbers a neighbour's new bytes with old ones.
//!
//! With a log ([`Options::log`]), the XOR delta of every changed run is
//! encoded (on the diff worker that found it) and appended to the
//! generation's log, and the new bytes are held back; held runs are written
//! only after a log barrier has made their records durable (when the held
//! bytes pass [`HOLD_BYTES`], and in [`Syncer::finish`]). The shards are then
//! current through the page cache; making them durable is the caller's
//! (after the commit, in the background). Without a log, writer threads
//! write changed runs while the diff goes on, and `finish` makes every
//! written shard durable.

use std::borrow::Cow;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, RwLock};

use rayon::prelude::*;

use crate::diff::changed_runs_at;
use crate::error::{Error, Result};
use crate::faults;
use crate::io::{ShardIo, Staging, DIRECT_ALIGN};
use crate::live::Live;
use crate::log::writer::bind;
use crate::log::{DeltaLog, Encoder, LogSpec};

/// Smallest and largest accepted block sizes.
pub const MIN_BLOCK: usize = 512;
pub const MAX_BLOCK: usize = JOB_BYTES;

/// Bytes of one parallel job: a multiple of every accepted block size, so no
/// job ends inside a block.
const JOB_BYTES: usize = 4 << 20;
/// Bytes read from the page cache per step inside a job (stays in L2).
const READ_BYTES: usize = 256 << 10;
/// Threads that issue writes while the diff goes on. A direct write blocks its
/// thread for a device round trip (~100 µs on a virtual disk), so the diff
/// workers hand changed runs to these instead of waiting themselves.
const IO_THREADS: usize = 16;
/// Threads that write through the page cache: such a write is a copy into the
/// cache that never waits for the device, and writes to one file serialize on
/// its inode lock, so more threads only spin on it.
const CACHED_IO_THREADS: usize = 1;
/// Changed runs queued for the writers before the diff waits for them.
const WRITE_QUEUE: usize = 4096;
/// New bytes held back, with a log, before a barrier lets them be
/// written. Bounds memory whatever the size of the change; a sync that
/// changes less than this makes exactly one barrier.
pub const HOLD_BYTES: usize = 128 << 20;

/// With a log: held runs are also released once the feed has compared this
/// much since the last release (a sparse change then reaches the disk in a
/// few batches while the feed goes on, not all at the end).
const RELEASE_BYTES: u64 = 512 << 20;

/// A shard to sync, as its header describes it.
#[derive(Debug, Clone)]
pub struct ShardSpec {
    pub path: PathBuf,
    /// First byte that belongs to tensor data (8 + header length).
    pub data_start: u64,
    /// File length the header implies.
    pub file_len: u64,
}

/// How to sync.
#[derive(Debug, Clone)]
pub struct Options {
    /// Diff and write granularity in bytes: a power of two in
    /// [`MIN_BLOCK`], [`MAX_BLOCK`]. Blocks smaller than a page are written
    /// through the page cache: two writers must never share a page with one
    /// writing directly and the other through the cache.
    pub block_size: usize,
    /// Compare and count, write nothing.
    pub dry_run: bool,
    /// Write aligned blocks with `O_DIRECT` (falls back to buffered writes,
    /// reported per shard, where the filesystem refuses). Off by default: a
    /// direct write evicts the cached folio around it, which the next sync
    /// then reads back from disk (see `io`).
    pub direct_io: bool,
    /// Worker threads; 0 means one per available core.
    pub threads: usize,
    /// Log the XOR delta of what is overwritten (crash safety, rollback).
    /// Needs blocks of at least [`LOG_MIN_BLOCK`] bytes: the log's hashes
    /// cover whole 4 KiB units.
    pub log: Option<LogSpec>,
    /// With a log: new bytes held back before a barrier ([`HOLD_BYTES`]).
    pub hold_bytes: usize,
}

/// Smallest block size a logged sync accepts.
pub const LOG_MIN_BLOCK: usize = crate::log::format::UNIT;

impl Default for Options {
    fn default() -> Self {
        Options {
            block_size: 4096,
            dry_run: false,
            direct_io: false,
            threads: 0,
            log: None,
            hold_bytes: HOLD_BYTES,
        }
    }
}

/// Live bytes destined for `offset..offset + data.len()` of shard `shard`.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub shard: usize,
    pub offset: u64,
    pub data: Live<'a>,
    /// Bytes per element of the tensor these bytes belong to (1, 2, 4 or 8):
    /// the log encodes deltas element by element.
    pub width: u8,
}

impl<'a> Segment<'a> {
    /// A segment of bytes in memory (elements of one byte).
    pub fn mem(shard: usize, offset: u64, data: &'a [u8]) -> Self {
        Segment {
            shard,
            offset,
            data: Live::Mem(data),
            width: 1,
        }
    }
}

/// What a sync did to one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardReport {
    pub path: PathBuf,
    /// Live bytes compared against the file.
    pub bytes_compared: u64,
    /// Bytes in blocks that differed (what a sync must write).
    pub bytes_changed: u64,
    pub blocks_changed: u64,
    /// Bytes written with `O_DIRECT` and through the page cache.
    pub bytes_written_direct: u64,
    pub bytes_written_buffered: u64,
    /// `pwrite` calls issued (adjacent changed blocks merge into one).
    pub writes: u64,
    /// Elements whose bytes changed (counted where a log encodes them).
    pub elements_changed: u64,
    /// Why direct I/O was not used, where it was wanted.
    pub direct_io_fallback: Option<String>,
}

struct Pending {
    start: u64,
    orig: Vec<u8>,
    new: Vec<u8>,
    /// Element width of what was laid over it: one width, else bytes.
    width: Option<u8>,
}

/// A shard as the diff workers and writers share it.
struct Shard {
    io: ShardIo,
    changed: AtomicU64,
    changed_blocks: AtomicU64,
    elements: AtomicU64,
}

/// Where the feed stands in a shard (touched by the feeding thread only).
struct FeedState {
    data_start: u64,
    /// No segment may start before this offset (the end of the last one).
    cursor: u64,
    pending: Option<Pending>,
    compared: u64,
}

struct Job<'a> {
    shard: usize,
    offset: u64,
    data: Live<'a>,
    width: u8,
}

/// Per-worker scratch space, allocated once per pool thread and reused.
struct Scratch {
    /// File bytes being compared.
    read: Vec<u8>,
    /// Live bytes being compared, when they come from a file.
    live: Vec<u8>,
    runs: Vec<Range<usize>>,
    /// Encodes log records.
    enc: Encoder,
}

/// Stops a sync's in-place writes from any thread. Once [`abort`](Self::abort)
/// returns, no write of the sync is in flight and none will start: whoever
/// undoes the sync afterwards is not raced by it.
#[derive(Clone, Default)]
pub struct AbortHandle(Arc<RwLock<bool>>);

impl AbortHandle {
    /// Stops the writes, waiting for the ones in flight.
    pub fn abort(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = true;
    }

    pub fn is_aborted(&self) -> bool {
        *self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `write` unless aborted, holding [`abort`](Self::abort) off until
    /// it returns.
    fn guard<T>(&self, write: impl FnOnce() -> T) -> Option<T> {
        let aborted = self.0.read().unwrap_or_else(|e| e.into_inner());
        (!*aborted).then(write)
    }
}

/// A changed run on its way to a writer thread: borrowed from live memory, or
/// copied out of a chunk read from a live file.
struct WriteReq<'a> {
    shard: usize,
    offset: u64,
    data: Cow<'a, [u8]>,
}

/// Changed runs whose records are logged but not yet durable.
#[derive(Default)]
struct Held {
    runs: Vec<WriteReq<'static>>,
    bytes: usize,
}

/// Buffers of held runs, handed back once written: a sync that holds
/// gigabytes in turn reuses the pages of its first batches instead of faulting
/// fresh zeroed ones in for every run (on two cores, page faults and
/// `clear_page` were a sixth of a logged sync's time). Never more than the
/// held batches in flight at once (two), so the pool needs no bound of its own.
#[derive(Default)]
struct Spare(Mutex<Vec<Vec<u8>>>);

impl Spare {
    /// Smaller buffers come cheaply from the allocator's heap.
    const MIN: usize = 64 << 10;

    fn copy_of(&self, bytes: &[u8]) -> Vec<u8> {
        let reused = match bytes.len() >= Self::MIN {
            true => self.0.lock().unwrap_or_else(|e| e.into_inner()).pop(),
            false => None,
        };
        let mut v = reused.unwrap_or_default();
        v.clear();
        v.extend_from_slice(bytes);
        v
    }

    fn put(&self, batch: Batch) {
        let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
        free.extend(batch.into_iter().filter_map(|r| match r.data {
            Cow::Owned(v) if v.capacity() >= Self::MIN => Some(v),
            _ => None,
        }));
    }
}

/// Where the diff sends a changed run.
#[derive(Clone, Copy)]
enum Sink<'s, 'a> {
    /// Count only.
    Dry,
    /// To the writer threads, once the job that found them is compared (a
    /// direct write evicts the cached folio around it, which the job may not
    /// have read yet).
    Queue(&'s SyncSender<WriteReq<'a>>),
    /// The delta to the log, new bytes held for after the barrier.
    Hold(&'s DeltaLog, &'s Mutex<Held>, &'s Spare),
}

impl<'a> Sink<'_, 'a> {
    /// `live_mem` is the run's bytes in live memory, when they are there (so a
    /// queued write can borrow them instead of copying). Runs for the writer
    /// threads go to `found`, which the caller queues once its job is done.
    #[allow(clippy::too_many_arguments)]
    fn emit(
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
            Sink::Hold(log, held, spare) => {
                let n = log.append_delta(enc, shard as u32, offset, width as usize, old, new)?;
                s.elements.fetch_add(n, Ordering::Relaxed);
                // Copied before the lock: every diff worker holds runs here.
                let run = WriteReq {
                    shard,
                    offset,
                    data: Cow::Owned(spare.copy_of(new)),
                };
                let mut h = held.lock().unwrap_or_else(|e| e.into_inner());
                h.bytes += new.len();
                h.runs.push(run);
                Ok(())
            }
        }
    }
}

/// A sync in progress over a fixed set of shards.
pub struct Syncer {
    shards: Arc<Vec<Shard>>,
    feeds: Vec<FeedState>,
    opts: Options,
    pool: rayon::ThreadPool,
    /// One per pool thread, indexed by `rayon::current_thread_index`.
    scratch: Vec<Mutex<Scratch>>,
    staging: Staging,
    /// Set when a batch failed after it started writing.
    broken: bool,
    log: Option<Arc<DeltaLog>>,
    /// Encodes the records of pending blocks (on the feeding thread).
    enc: Encoder,
    held: Mutex<Held>,
    /// Bytes compared since the held runs were last released.
    since_release: u64,
    spare: Arc<Spare>,
    /// With a log: makes batches of held runs durable and writes them in
    /// the background while the feed goes on.
    committer: Option<Committer>,
    /// Flushes shards in the background once their writes are done (without
    /// a log, and not in a dry run).
    flusher: Option<Flusher>,
    /// Shards handed to the flusher by a feed without a log.
    flushed: Vec<bool>,
    stop: AbortHandle,
}

impl Syncer {
    /// Opens every shard (checking its length against its header) and
    /// validates the options. Writes nothing.
    pub fn new(specs: Vec<ShardSpec>, opts: Options) -> Result<Self> {
        let b = opts.block_size;
        if !b.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&b) {
            return Err(Error::Plan(format!(
                "block size {b} must be a power of two between {MIN_BLOCK} and {MAX_BLOCK}"
            )));
        }
        let logged = opts.log.is_some() && !opts.dry_run;
        if logged && b < LOG_MIN_BLOCK {
            return Err(Error::Plan(format!(
                "block size {b}: a logged sync needs blocks of at least {LOG_MIN_BLOCK} bytes \
                 (the log hashes whole 4 KiB units); use a larger block or no log"
            )));
        }
        let mut bindings = Vec::with_capacity(specs.len());
        let mut shards = Vec::with_capacity(specs.len());
        let mut feeds = Vec::with_capacity(specs.len());
        for spec in specs {
            if spec.data_start > spec.file_len {
                return Err(Error::Plan(format!(
                    "{}: data start {} is past the file length {}",
                    spec.path.display(),
                    spec.data_start,
                    spec.file_len
                )));
            }
            let io = ShardIo::open(
                &spec.path,
                spec.file_len,
                opts.direct_io && !opts.dry_run && b >= DIRECT_ALIGN,
                DIRECT_ALIGN,
            )?;
            shards.push(Shard {
                io,
                changed: AtomicU64::new(0),
                changed_blocks: AtomicU64::new(0),
                elements: AtomicU64::new(0),
            });
            if logged {
                bindings.push(bind(&spec.path, spec.data_start)?);
            }
            feeds.push(FeedState {
                data_start: spec.data_start,
                cursor: spec.data_start,
                pending: None,
                compared: 0,
            });
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.threads)
            .thread_name(|i| format!("apollo-sync-{i}"))
            .build()
            .map_err(|e| Error::Plan(format!("cannot start worker threads: {e}")))?;
        let scratch = (0..pool.current_num_threads())
            .map(|_| {
                Mutex::new(Scratch {
                    read: vec![0u8; READ_BYTES.max(b)],
                    live: Vec::new(),
                    runs: Vec::new(),
                    enc: Encoder::new(),
                })
            })
            .collect();
        let n_shards = shards.len();
        let shards = Arc::new(shards);
        let log = match (&opts.log, logged) {
            (Some(spec), true) => Some(Arc::new(DeltaLog::new(spec.clone(), bindings))),
            _ => None,
        };
        let stop = AbortHandle::default();
        let flusher = match opts.dry_run || logged {
            false => Some(Flusher::spawn(shards.clone(), stop.clone())?),
            true => None,
        };
        let spare = Arc::new(Spare::default());
        let committer = match &log {
            Some(log) => Some(Committer::spawn(
                shards.clone(),
                log.clone(),
                spare.clone(),
                stop.clone(),
            )?),
            None => None,
        };
        Ok(Syncer {
            shards,
            feeds,
            opts,
            pool,
            scratch,
            staging: Staging::default(),
            broken: false,
            log,
            enc: Encoder::new(),
            held: Mutex::new(Held::default()),
            since_release: 0,
            spare,
            committer,
            flusher,
            flushed: vec![false; n_shards],
            stop,
        })
    }

    /// The log this sync appends to (to commit it once the sync is done).
    pub fn log(&self) -> Option<Arc<DeltaLog>> {
        self.log.clone()
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Diffs a batch of segments and writes the blocks that changed.
    ///
    /// The whole batch is checked first (shard index, range inside the
    /// shard's tensor data, order after everything fed before): a bad batch
    /// is refused before any byte is read or written.
    pub fn feed<'d>(&mut self, segments: &[Segment<'d>]) -> Result<()> {
        self.usable()?;
        self.check(segments)?;
        let result = self.feed_checked(segments);
        // A batch that failed halfway leaves blocks of it written and others
        // not: refuse to go on as if it had not happened.
        if result.is_err() {
            self.abort();
        }
        result
    }

    /// Abandons the sync: stops the commit thread (dropping batches not yet
    /// written) and waits for it, so that nothing this sync queued is written
    /// afterwards; further feeds are refused. What was written is in the
    /// log, for the caller to undo.
    pub fn abort(&mut self) {
        self.broken = true;
        self.stop.abort();
        self.join_threads();
    }

    /// Ends the commit thread, then the flush thread: the flusher's thread
    /// ends only once the committer's sender to it is gone.
    fn join_threads(&mut self) {
        drop(self.committer.take());
        drop(self.flusher.take());
    }

    /// A handle that aborts this sync's writes from another thread, even while
    /// a [`feed`](Self::feed) is running.
    pub fn abort_handle(&self) -> AbortHandle {
        self.stop.clone()
    }

    fn usable(&self) -> Result<()> {
        if self.broken {
            return Err(Error::Plan(
                "an earlier batch of this sync failed; nothing more is written".into(),
            ));
        }
        Ok(())
    }

    fn feed_checked<'d>(&mut self, segments: &[Segment<'d>]) -> Result<()> {
        let b = self.opts.block_size as u64;
        let mut jobs: Vec<Job<'d>> = Vec::new();
        for seg in segments {
            let s = seg.offset;
            let e = s + seg.data.len() as u64;
            if s == e {
                continue;
            }
            let file_len = self.shards[seg.shard].io.len();
            self.feeds[seg.shard].cursor = e;
            self.feeds[seg.shard].compared += seg.data.len() as u64;
            // Head: the part of the first block that the segment shares.
            let head_end = if s % b == 0 {
                s
            } else {
                e.min(s.next_multiple_of(b))
            };
            if head_end > s {
                let head = seg.data.slice(0, (head_end - s) as usize);
                self.overlay(seg.shard, s, head, seg.width)?;
            }
            // Body: blocks the segment covers alone (the file's short last
            // block counts when the segment runs to the end of the file).
            let body_end = if e == file_len {
                e
            } else {
                (e / b * b).max(head_end)
            };
            // Jobs end on multiples of JOB_BYTES in the file, so a page-cache
            // folio (at most 2 MiB, naturally aligned) lies in one job unless a
            // segment boundary cuts it.
            let mut at = head_end;
            while at < body_end {
                let end = body_end.min((at / JOB_BYTES as u64 + 1) * JOB_BYTES as u64);
                jobs.push(Job {
                    shard: seg.shard,
                    offset: at,
                    data: seg.data.slice((at - s) as usize, (end - s) as usize),
                    width: seg.width,
                });
                at = end;
            }
            // Tail: the start of a block the next segment (or the file) shares.
            if e > body_end {
                let from = (body_end - s) as usize;
                let tail = seg.data.slice(from, seg.data.len());
                self.overlay(seg.shard, body_end, tail, seg.width)?;
            }
        }
        let shards = &*self.shards;
        let block = self.opts.block_size;
        let scratch = &self.scratch;
        let pool = &self.pool;
        let abort = AtomicBool::new(false);
        let diff_all = |sink: Sink<'_, 'd>| {
            pool.install(|| {
                jobs.par_iter().try_for_each(|job| {
                    if abort.load(Ordering::Relaxed) {
                        return Ok(()); // a writer failed: its error is returned below
                    }
                    let i = rayon::current_thread_index().expect("inside the pool");
                    let mut s = scratch[i].lock().expect("poisoned");
                    diff_job(&shards[job.shard], job, block, &mut s, sink)
                })
            })
        };
        if self.opts.dry_run {
            return diff_all(Sink::Dry);
        }
        if let Some(log) = &self.log {
            diff_all(Sink::Hold(log, &self.held, &self.spare))?;
            // Release the held runs when they grow large, or once the feed has
            // compared RELEASE_BYTES more: their barrier and writes then run
            // while the feed goes on, and `finish` is left with a short tail.
            // (Releasing whenever the interleaved feed touched a later shard
            // put a barrier after nearly every batch.)
            self.since_release += segments.iter().map(|s| s.data.len() as u64).sum::<u64>();
            let bytes = self.held.lock().unwrap_or_else(|e| e.into_inner()).bytes;
            if bytes >= self.opts.hold_bytes || (bytes > 0 && self.since_release >= RELEASE_BYTES) {
                self.since_release = 0;
                self.release()?;
            }
            return Ok(());
        }
        // Diff workers queue changed runs; writer threads drain the queue
        // concurrently. Runs borrow the fed buffers, which outlive the scope.
        let (tx, rx) = sync_channel::<WriteReq<'d>>(WRITE_QUEUE);
        let rx = Mutex::new(rx);
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..io_threads(shards) {
                scope.spawn(|| write_loop(shards, &rx, &failed, &abort, &self.stop));
            }
            let diffed = diff_all(Sink::Queue(&tx));
            drop(tx); // writers finish the queue, then stop
            diffed
        })?;
        if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        // The feed has moved past the shards before the last one it touched:
        // their writes are done (but for a pending block, which `finish`
        // writes and flushes), so they can reach the disk now.
        if let (Some(f), Some(last)) = (&self.flusher, segments.iter().map(|s| s.shard).max()) {
            for i in 0..last {
                let s = &self.shards[i];
                if !self.flushed[i] && s.io.counters.buffered_bytes.load(Ordering::Relaxed) > 0 {
                    self.flushed[i] = true;
                    f.flush(i);
                }
            }
        }
        Ok(())
    }

    /// Writes the last pending blocks, makes every written shard durable
    /// (`fdatasync`) and reports per shard.
    pub fn finish(mut self) -> Result<Vec<ShardReport>> {
        self.usable()?;
        for i in 0..self.shards.len() {
            self.flush_pending(i)?;
        }
        self.release()?;
        if let Some(c) = self.committer.take() {
            c.finish()?;
        }
        if let Some(f) = self.flusher.take() {
            f.finish()?;
        }
        // Without a log, fsync the shards in parallel (each waits on its own
        // device flush); with one, the caller commits and flushes.
        if self.log.is_none() {
            self.pool.install(|| {
                self.shards.par_iter().try_for_each(|s| {
                    if s.io.written() {
                        faults::reached("fsync").map_err(|e| Error::io(s.io.path(), "fsync", e))?;
                    }
                    s.io.sync()
                })
            })?;
        }
        Ok(self
            .shards
            .iter()
            .zip(&self.feeds)
            .map(|(s, f)| {
                let c = &s.io.counters;
                ShardReport {
                    path: s.io.path().to_path_buf(),
                    bytes_compared: f.compared,
                    bytes_changed: s.changed.load(Ordering::Relaxed),
                    blocks_changed: s.changed_blocks.load(Ordering::Relaxed),
                    bytes_written_direct: c.direct_bytes.load(Ordering::Relaxed),
                    bytes_written_buffered: c.buffered_bytes.load(Ordering::Relaxed),
                    writes: c.writes.load(Ordering::Relaxed),
                    elements_changed: s.elements.load(Ordering::Relaxed),
                    direct_io_fallback: s.io.fallback_reason(),
                }
            })
            .collect())
    }

    fn check(&self, segments: &[Segment<'_>]) -> Result<()> {
        let mut cursors: Vec<u64> = self.feeds.iter().map(|f| f.cursor).collect();
        for (i, seg) in segments.iter().enumerate() {
            let (shard, data_start) = match (self.shards.get(seg.shard), self.feeds.get(seg.shard))
            {
                (Some(s), Some(f)) => (s, f.data_start),
                _ => {
                    return Err(Error::Plan(format!(
                        "segment {i}: shard index {} out of range",
                        seg.shard
                    )))
                }
            };
            let end = seg.offset.checked_add(seg.data.len() as u64);
            let path = shard.io.path().display();
            match end {
                Some(end) if seg.offset >= data_start && end <= shard.io.len() => {
                    if seg.data.is_empty() {
                        continue; // an empty tensor changes nothing wherever it sits
                    }
                    if seg.offset < cursors[seg.shard] {
                        return Err(Error::Plan(format!(
                            "{path}: segment at {} overlaps or precedes bytes already fed (up to {})",
                            seg.offset, cursors[seg.shard]
                        )));
                    }
                    cursors[seg.shard] = end;
                }
                _ => {
                    return Err(Error::Plan(format!(
                        "{path}: segment of {} bytes at {} lies outside the tensor data {}..{}",
                        seg.data.len(),
                        seg.offset,
                        data_start,
                        shard.io.len()
                    )))
                }
            }
        }
        Ok(())
    }

    /// Copies `bytes` (all inside one block) over that block's pending image.
    fn overlay(&mut self, shard: usize, at: u64, bytes: Live<'_>, width: u8) -> Result<()> {
        let b = self.opts.block_size as u64;
        let start = at / b * b;
        if self.feeds[shard].pending.as_ref().map(|p| p.start) != Some(start) {
            self.flush_pending(shard)?;
            let s = &self.shards[shard];
            let len = (start + b).min(s.io.len()) - start;
            let mut orig = vec![0u8; len as usize];
            s.io.read_at(&mut orig, start)?;
            let new = orig.clone();
            self.feeds[shard].pending = Some(Pending {
                start,
                orig,
                new,
                width: Some(width),
            });
        }
        let p = self.feeds[shard].pending.as_mut().expect("pending block");
        if p.width != Some(width) {
            p.width = None;
        }
        let rel = (at - p.start) as usize;
        bytes.read_into(0, &mut p.new[rel..rel + bytes.len()])
    }

    fn flush_pending(&mut self, shard: usize) -> Result<()> {
        let Some(p) = self.feeds[shard].pending.take() else {
            return Ok(());
        };
        if p.new == p.orig {
            return Ok(());
        }
        let s = &self.shards[shard];
        s.changed.fetch_add(p.new.len() as u64, Ordering::Relaxed);
        s.changed_blocks.fetch_add(1, Ordering::Relaxed);
        if self.opts.dry_run {
            return Ok(());
        }
        match &self.log {
            Some(log) => Sink::Hold(log, &self.held, &self.spare).emit(
                shard,
                s,
                p.start,
                &p.orig,
                &p.new,
                p.width.unwrap_or(1),
                None,
                &mut self.enc,
                &mut Vec::new(),
            ),
            None => write_run(s, p.start, &p.new, &mut self.staging),
        }
    }

    /// Hands the held runs to the committer (which makes the log durable,
    /// then writes them). Blocks while it is still busy with the previous batch,
    /// so at most two batches are held in memory.
    fn release(&mut self) -> Result<()> {
        let Some(c) = &self.committer else {
            return Ok(());
        };
        let runs = {
            let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
            h.bytes = 0;
            std::mem::take(&mut h.runs)
        };
        if runs.is_empty() {
            return c.check();
        }
        c.submit(runs)
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.join_threads();
    }
}

/// A batch of changed runs whose records are logged.
type Batch = Vec<WriteReq<'static>>;

/// A thread that works through a queue in the background and keeps its first
/// error for whoever waits for it. Reporting an error also aborts the sync's
/// writes.
struct Worker {
    name: &'static str,
    thread: Option<std::thread::JoinHandle<()>>,
    failed: Arc<Mutex<Option<Error>>>,
}

impl Worker {
    /// Runs `body` on a thread named after `name`; `body` reports errors
    /// through the function it is given.
    fn spawn(
        name: &'static str,
        stop: AbortHandle,
        body: impl FnOnce(&dyn Fn(Error)) + Send + 'static,
    ) -> Result<Self> {
        let failed: Arc<Mutex<Option<Error>>> = Arc::default();
        let slot = failed.clone();
        let thread = std::thread::Builder::new()
            .name(format!("apollo-sync-{name}"))
            .spawn(move || {
                body(&|e| {
                    stop.abort();
                    slot.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                })
            })
            .map_err(|e| Error::Plan(format!("cannot start the {name} thread: {e}")))?;
        Ok(Worker {
            name,
            thread: Some(thread),
            failed,
        })
    }

    /// The first error so far, if any.
    fn check(&self) -> Result<()> {
        match self.failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits for the thread (whose queue the caller has closed), then
    /// returns its first error.
    fn join(&mut self) -> Result<()> {
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| Error::Plan(format!("the {} thread panicked", self.name)))?;
        }
        self.check()
    }

    fn joined(&self) -> bool {
        self.thread.is_none()
    }
}

/// Makes shards durable (`fdatasync`) on a background thread. Page-cache
/// writes reach the disk only at writeback: flushing a shard once its writes
/// are done lets the device work while the next shard is diffed and written,
/// so `finish` waits for little more than the last one. An error is kept
/// for [`finish`](Self::finish) (a failed `fdatasync` is reported once).
struct Flusher {
    tx: Option<Sender<usize>>,
    worker: Worker,
}

impl Flusher {
    fn spawn(shards: Arc<Vec<Shard>>, stop: AbortHandle) -> Result<Self> {
        let (tx, rx) = channel::<usize>();
        let halt = stop.clone();
        let worker = Worker::spawn("flush", stop, move |fail| {
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
    fn flush(&self, i: usize) {
        let tx = self.tx.as_ref().expect("open until finish");
        let _ = tx.send(i); // the thread lives until `finish`: the send cannot fail
    }

    /// Waits for every requested flush (once every sender is gone).
    fn finish(mut self) -> Result<()> {
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

/// The background thread of a logged sync: for each batch, a log barrier,
/// then the in-place writes (through the page cache: the caller makes them
/// durable after the commit).
struct Committer {
    tx: Option<SyncSender<Batch>>,
    worker: Worker,
    /// Set to stop: batches not yet started are dropped, writers stop between runs.
    stop: AbortHandle,
}

impl Committer {
    fn spawn(
        shards: Arc<Vec<Shard>>,
        log: Arc<DeltaLog>,
        spare: Arc<Spare>,
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
                    Ok(written) => spare.put(written),
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
    fn check(&self) -> Result<()> {
        self.worker.check()
    }

    fn submit(&self, batch: Batch) -> Result<()> {
        self.check()?;
        let tx = self.tx.as_ref().expect("open until finish");
        if tx.send(batch).is_err() {
            return Err(Error::Plan("the commit thread stopped".into()));
        }
        Ok(())
    }

    /// Waits for every batch to be durable and written.
    fn finish(mut self) -> Result<()> {
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
fn commit_batch(
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

/// Writer threads for these shards: many for direct writes, which each wait
/// for the device, one for writes through the page cache.
fn io_threads(shards: &[Shard]) -> usize {
    if shards.iter().any(|s| s.io.writes_direct()) {
        IO_THREADS
    } else {
        CACHED_IO_THREADS
    }
}

/// One in-place write of changed blocks (a fault-injection point).
fn write_run(s: &Shard, offset: u64, data: &[u8], staging: &mut Staging) -> Result<()> {
    faults::reached("write").map_err(|e| Error::io(s.io.path(), "write", e))?;
    s.io.write_at(data, offset, staging)
}

/// Compares one job's live bytes with the file, a chunk at a time, and sends
/// each changed run (with the file's old bytes for it) to `sink`.
fn diff_job<'a>(
    shard: &Shard,
    job: &Job<'a>,
    block: usize,
    scratch: &mut Scratch,
    sink: Sink<'_, 'a>,
) -> Result<()> {
    let Scratch {
        read,
        live,
        runs,
        enc,
    } = scratch;
    let step = read.len() / block * block;
    let (mut changed, mut blocks) = (0u64, 0u64);
    let mut found: Vec<WriteReq<'a>> = Vec::new();
    let mut rel = 0usize;
    while rel < job.data.len() {
        let n = step.min(job.data.len() - rel);
        let disk = &mut read[..n];
        shard.io.read_at(disk, job.offset + rel as u64)?;
        let (chunk, mem) = match job.data {
            Live::Mem(bytes) => (&bytes[rel..rel + n], Some(&bytes[rel..rel + n])),
            Live::File { .. } => {
                live.resize(n.max(live.len()), 0);
                job.data.read_into(rel, &mut live[..n])?;
                (&live[..n], None)
            }
        };
        runs.clear();
        changed_runs_at(0, chunk, disk, block, runs);
        for r in runs.iter() {
            changed += r.len() as u64;
            blocks += r.len().div_ceil(block) as u64;
            let at = job.offset + (rel + r.start) as u64;
            let borrowed = mem.map(|m| &m[r.clone()]);
            sink.emit(
                job.shard,
                shard,
                at,
                &disk[r.clone()],
                &chunk[r.clone()],
                job.width,
                borrowed,
                enc,
                &mut found,
            )?;
        }
        rel += n;
    }
    shard.changed.fetch_add(changed, Ordering::Relaxed);
    shard.changed_blocks.fetch_add(blocks, Ordering::Relaxed);
    if let Sink::Queue(tx) = sink {
        for req in found {
            queue(tx, req.shard, req.offset, req.data);
        }
    }
    Ok(())
}

/// Hands a run to the writers. The receiver lives as long as the feed and
/// the writers drain it even after a failure, so the send cannot fail.
fn queue<'a>(tx: &SyncSender<WriteReq<'a>>, shard: usize, offset: u64, data: Cow<'a, [u8]>) {
    let sent = tx.send(WriteReq {
        shard,
        offset,
        data,
    });
    debug_assert!(sent.is_ok(), "the write queue closed during a feed");
}

/// A writer thread: takes queued runs and writes them until the queue closes.
/// After the first failure it keeps draining (so the diff never blocks on a
/// full queue) but writes nothing more.
fn write_loop(
    shards: &[Shard],
    rx: &Mutex<Receiver<WriteReq<'_>>>,
    failed: &Mutex<Option<Error>>,
    abort: &AtomicBool,
    stop: &AbortHandle,
) {
    let mut staging = Staging::default();
    loop {
        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(req) = next else { return };
        if abort.load(Ordering::Relaxed) {
            continue;
        }
        // Aborted: drain without writing (the diff must never block on a
        // queue nobody drains).
        if let Some(Err(e)) = writer_write(shards, &req, &mut staging, stop) {
            fail(failed, abort, e);
        }
    }
}

/// One run written by a writer thread; `None` once the sync is aborted. A
/// panic becomes an error like any other, so a writer never leaves the others
/// (or the diff) waiting.
fn writer_write(
    shards: &[Shard],
    r: &WriteReq<'_>,
    staging: &mut Staging,
    stop: &AbortHandle,
) -> Option<Result<()>> {
    stop.guard(|| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            write_run(&shards[r.shard], r.offset, &r.data, staging)
        }))
        .unwrap_or_else(|_| Err(Error::Plan("a writer thread panicked".into())))
    })
}

/// Records a writer's failure (the first one wins) and stops the other writers.
fn fail(failed: &Mutex<Option<Error>>, abort: &AtomicBool, e: Error) {
    abort.store(true, Ordering::Relaxed);
    failed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert(e);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }

    fn spec(f: &tempfile::NamedTempFile, data_start: u64) -> ShardSpec {
        ShardSpec {
            path: f.path().to_path_buf(),
            data_start,
            file_len: std::fs::metadata(f.path()).unwrap().len(),
        }
    }

    /// Bytes in aligned blocks where `a` and `b` differ.
    fn changed_block_bytes(a: &[u8], b: &[u8], block: usize) -> u64 {
        a.chunks(block)
            .zip(b.chunks(block))
            .filter(|(x, y)| x != y)
            .map(|(x, _)| x.len() as u64)
            .sum()
    }

    /// Syncs `live` (segments cut at `cuts`, skipping `skip`) into a file
    /// holding `orig`, and returns the file's bytes and the report.
    fn run(
        orig: &[u8],
        live: &[u8],
        data_start: usize,
        cuts: &[usize],
        skip: &[usize],
        opts: Options,
    ) -> (Vec<u8>, ShardReport) {
        let (after, report, _) = run_from(orig, live, data_start, cuts, skip, opts, false);
        (after, report)
    }

    /// As `run`, reading the live bytes from a file with `pread` when
    /// `from_file`. With `opts.log`, also commits the log, then rolls the sync
    /// back as recovery would an uncommitted generation, and
    /// returns the file's bytes after the undo.
    fn run_from(
        orig: &[u8],
        live: &[u8],
        data_start: usize,
        cuts: &[usize],
        skip: &[usize],
        opts: Options,
        from_file: bool,
    ) -> (Vec<u8>, ShardReport, Option<Vec<u8>>) {
        let live_file = file_with(live);
        let live_handle = std::fs::File::open(live_file.path()).unwrap();
        let f = file_with(orig);
        let log_spec = opts.log.clone();
        let mut syncer = Syncer::new(vec![spec(&f, data_start as u64)], opts).unwrap();
        let mut bounds = vec![data_start];
        bounds.extend(
            cuts.iter()
                .copied()
                .filter(|&c| c > data_start && c < orig.len()),
        );
        bounds.push(orig.len());
        bounds.sort();
        bounds.dedup();
        let segs: Vec<Segment<'_>> = bounds
            .windows(2)
            .enumerate()
            .filter(|(i, _)| !skip.contains(i))
            .map(|(_, w)| Segment {
                shard: 0,
                offset: w[0] as u64,
                data: if from_file {
                    Live::File {
                        file: &live_handle,
                        offset: w[0] as u64,
                        len: w[1] - w[0],
                    }
                } else {
                    Live::Mem(&live[w[0]..w[1]])
                },
                width: 2,
            })
            .collect();
        // Feed in two batches to exercise state kept across calls.
        let half = segs.len() / 2;
        syncer.feed(&segs[..half]).unwrap();
        syncer.feed(&segs[half..]).unwrap();
        let report = syncer.finish().unwrap().pop().unwrap();
        let after = std::fs::read(f.path()).unwrap();
        let undone = log_spec.map(|spec| {
            if spec.path.exists() {
                let log = crate::log::LogFile::open(&spec.path).unwrap();
                assert!(!log.is_committed());
                crate::log::recover(f.path().parent().unwrap(), &[&log], 0, false).unwrap();
            }
            std::fs::read(f.path()).unwrap()
        });
        (after, report, undone)
    }

    #[test]
    fn writes_exactly_the_changed_blocks() {
        let orig: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut live = orig.clone();
        for &i in &[100usize, 5000, 5001, 40_000, 99_999] {
            live[i] ^= 0x5a;
        }
        let (after, rep) = run(
            &orig,
            &live,
            0,
            &[1000, 4097, 50_000],
            &[],
            Options::default(),
        );
        assert_eq!(after, live);
        let expected = changed_block_bytes(&orig, &live, 4096);
        assert_eq!(rep.bytes_changed, expected);
        assert_eq!(
            rep.bytes_written_direct + rep.bytes_written_buffered,
            expected
        );
        assert_eq!(rep.bytes_compared, orig.len() as u64);
    }

    #[test]
    fn second_sync_writes_nothing() {
        let orig = vec![3u8; 50_000];
        let (after, rep) = run(&orig, &orig, 77, &[1234], &[], Options::default());
        assert_eq!(after, orig);
        assert_eq!(rep.bytes_changed, 0);
        assert_eq!(rep.writes, 0);
    }

    #[test]
    fn dry_run_counts_but_leaves_the_file() {
        let orig = vec![1u8; 20_000];
        let live = vec![2u8; 20_000];
        let opts = Options {
            dry_run: true,
            ..Options::default()
        };
        let (after, rep) = run(&orig, &live, 0, &[], &[], opts);
        assert_eq!(after, orig);
        assert_eq!(rep.bytes_changed, 20_000);
        assert_eq!(rep.writes, 0);
    }

    #[test]
    fn out_of_order_and_out_of_range_segments_are_refused_before_any_write() {
        let orig = vec![0u8; 10_000];
        let f = file_with(&orig);
        let mut s = Syncer::new(vec![spec(&f, 16)], Options::default()).unwrap();
        let new = vec![1u8; 100];
        let bad_order = [
            Segment {
                shard: 0,
                offset: 5000,
                data: Live::Mem(&new),
                width: 1,
            },
            Segment {
                shard: 0,
                offset: 4000,
                data: Live::Mem(&new),
                width: 1,
            },
        ];
        assert!(matches!(s.feed(&bad_order), Err(Error::Plan(_))));
        let in_header = [Segment {
            shard: 0,
            offset: 0,
            data: Live::Mem(&new),
            width: 1,
        }];
        assert!(matches!(s.feed(&in_header), Err(Error::Plan(_))));
        let past_end = [Segment {
            shard: 0,
            offset: 9950,
            data: Live::Mem(&new),
            width: 1,
        }];
        assert!(matches!(s.feed(&past_end), Err(Error::Plan(_))));
        let no_shard = [Segment {
            shard: 3,
            offset: 100,
            data: Live::Mem(&new),
            width: 1,
        }];
        assert!(matches!(s.feed(&no_shard), Err(Error::Plan(_))));
        s.finish().unwrap();
        assert_eq!(std::fs::read(f.path()).unwrap(), orig);
    }

    #[test]
    fn bad_block_size_and_changed_length_are_refused() {
        let f = file_with(&[0u8; 100]);
        for b in [0usize, 1000, 256, 32 << 20] {
            let opts = Options {
                block_size: b,
                ..Options::default()
            };
            assert!(matches!(
                Syncer::new(vec![spec(&f, 0)], opts),
                Err(Error::Plan(_))
            ));
        }
        let mut wrong = spec(&f, 0);
        wrong.file_len = 99;
        assert!(matches!(
            Syncer::new(vec![wrong], Options::default()),
            Err(Error::Changed { .. })
        ));
    }

    #[test]
    fn large_bodies_span_jobs_and_read_chunks_from_memory_and_files() {
        let len = 9 * (1 << 20) + 12_345;
        let orig: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let mut live = orig.clone();
        for i in (777..len).step_by(300_007) {
            live[i] ^= 0xff;
        }
        let dir = tempfile::tempdir().unwrap();
        for block in [4096usize, 1 << 16, MAX_BLOCK] {
            for (from_file, journaled) in
                [(false, false), (true, false), (false, true), (true, true)]
            {
                let log = journaled.then(|| LogSpec {
                    path: dir.path().join(format!("{block}-{from_file}.xlog")),
                    generation: 1,
                    kind: crate::log::Kind::Sync,
                });
                let opts = Options {
                    block_size: block,
                    log,
                    ..Options::default()
                };
                let (after, rep, undone) =
                    run_from(&orig, &live, 100, &[5 << 20], &[], opts, from_file);
                assert_eq!(
                    after, live,
                    "block {block} from_file {from_file} journal {journaled}"
                );
                if let Some(undone) = undone {
                    assert_eq!(undone, orig, "undo, block {block} from_file {from_file}");
                }
                assert_eq!(rep.bytes_changed, changed_block_bytes(&orig, &live, block));
                assert_eq!(
                    rep.blocks_changed,
                    orig.chunks(block)
                        .zip(live.chunks(block))
                        .filter(|(a, b)| a != b)
                        .count() as u64
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn file_ends_equal_to_live_outside_skipped_segments(
            len in 1usize..40_000,
            data_start_frac in 0.0f64..0.2,
            cut_fracs in proptest::collection::vec(0.0f64..1.0, 0..12),
            flip_fracs in proptest::collection::vec(0.0f64..1.0, 0..10),
            skip in proptest::collection::vec(0usize..13, 0..3),
            block_pow in 9u32..14,
            seed in any::<u8>(),
            from_file in any::<bool>(),
            journaled in any::<bool>(),
            hold_bytes in 1usize..20_000,
            direct_io in any::<bool>(),
        ) {
            let block = 1usize << block_pow;
            let orig: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
            let data_start = (len as f64 * data_start_frac) as usize;
            let mut live = orig.clone();
            for f in &flip_fracs {
                let i = data_start + ((len - data_start) as f64 * f) as usize;
                if i < len { live[i] = live[i].wrapping_add(1); }
            }
            let cuts: Vec<usize> = cut_fracs.iter().map(|f| (len as f64 * f) as usize).collect();
            let dir = tempfile::tempdir().unwrap();
            let journaled = journaled && block >= LOG_MIN_BLOCK;
            let log = journaled.then(|| LogSpec { path: dir.path().join("1.xlog"), generation: 1, kind: crate::log::Kind::Sync });
            let opts = Options { block_size: block, log, hold_bytes, direct_io, ..Options::default() };
            let (after, rep, undone) =
                run_from(&orig, &live, data_start, &cuts, &skip, opts, from_file);
            // Expected: live bytes where fed, original bytes in skipped segments.
            let mut bounds = vec![data_start];
            bounds.extend(cuts.iter().copied().filter(|&c| c > data_start && c < len));
            bounds.push(len);
            bounds.sort();
            bounds.dedup();
            let mut expected = orig.clone();
            for (i, w) in bounds.windows(2).enumerate() {
                if !skip.contains(&i) {
                    expected[w[0]..w[1]].copy_from_slice(&live[w[0]..w[1]]);
                }
            }
            prop_assert_eq!(&after, &expected);
            prop_assert_eq!(rep.bytes_changed, changed_block_bytes(&orig, &expected, block));
            prop_assert_eq!(rep.bytes_written_direct + rep.bytes_written_buffered, rep.bytes_changed);
            if let Some(undone) = undone {
                // Every changed byte was logged, and recovery undoes the sync.
                prop_assert_eq!(&undone, &orig);
            }
        }
    }
}
