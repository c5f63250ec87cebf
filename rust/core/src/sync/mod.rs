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
//!
//! One folder a stage (of `rust/core/src`), in the order a byte passes them,
//! one concept a file:
//!
//! 1. `plan/`: a batch of segments checked and cut into jobs of whole
//!    blocks (`mod.rs`), and pending blocks that several segments share
//!    (`pending.rs`);
//! 2. `read/`: where the bytes compared come from: the live bytes
//!    (`live.rs`) and the file's (`shard.rs`, through which the later stages
//!    also write blocks and make a shard durable);
//! 3. `diff/`: each job's live bytes compared with the file's (`job.rs`),
//!    block by block (`kernel.rs`);
//! 4. `delta/` and `log/`: with a log, each changed run's delta encoded and
//!    appended to the generation's log (the codec, the format and the writer);
//! 5. `apply/`: `hold.rs` (with a log, the new bytes held until their records
//!    are durable), then `commit.rs` (with a log: a barrier, then the held
//!    runs written by writer threads while the next batch's barrier goes on)
//!    or `write.rs` (without: writer threads beside the diff);
//! 6. `flush/`: without a log, shards made durable in the background
//!    (`mod.rs`); with one, after the commit, a generation's shards made
//!    durable and its checkpoint marked (`generation.rs`, started by the
//!    caller), and for a caller that waits for that, the writeback of what
//!    was written started while the sync goes on (`writeback.rs`).
//!
//! This folder ties them together: `mod.rs` the options, the [`Syncer`] and
//! its shards; `worker.rs` the threads' plumbing: the background worker, the
//! abort handle and the sync's one first-error slot, which every thread
//! reports to; `timings.rs` the wall clock each stage took, for reports;
//! `tests.rs` the engine's tests.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use rayon::prelude::*;

use crate::apply::commit::Committer;
use crate::apply::hold::{Held, Holding};
use crate::diff::job::Scratch;
use crate::error::{Error, Result};
use crate::faults;
use crate::flush::Flusher;
use crate::log::writer::bind;
use crate::log::{DeltaLog, Encoder, LogSpec};
use crate::plan::pending::Pending;
use crate::read::live::Live;
use crate::read::shard::{ShardIo, Staging, DIRECT_ALIGN};

#[cfg(test)]
mod tests;
mod timings;
pub(crate) mod worker;

pub use timings::{Stage, Timings};
pub use worker::AbortHandle;
use worker::FirstError;

/// Smallest and largest accepted block sizes.
pub const MIN_BLOCK: usize = 512;
pub const MAX_BLOCK: usize = JOB_BYTES;

/// Bytes of one parallel job: a multiple of every accepted block size, so no
/// job ends inside a block.
pub(crate) const JOB_BYTES: usize = 4 << 20;
/// Bytes read from the page cache per step inside a job (stays in L2).
const READ_BYTES: usize = 256 << 10;
/// New bytes held back, with a log, before a barrier lets them be
/// written. Bounds memory whatever the size of the change or of the caller's
/// feeds: the diff worker that crosses it hands the batch to the commit
/// thread, and waits while another batch is queued there; the commit thread
/// queues a batch for the writers only while less than this is waiting to
/// be written. So at most four are in memory (filling, queued, being queued,
/// being written). A sync that changes less
/// than this makes exactly one barrier. 32 MiB rather than 128: a process's
/// first logged sync faults every held page in fresh, and with 128 MiB that
/// made it ~2x the next (600 MB every-block change, 2 cores: 0.68 s -> 0.47-0.54
/// s); later syncs and an H200's 3 GB every-block sync were no slower (0.66-0.76
/// s against 0.70-1.09 s), the extra barriers overlapping the diff. (Until
/// session 8 the bound was checked only between feeds, so a 128 MiB feed
/// held up to 128 MiB per batch.)
pub const HOLD_BYTES: usize = 32 << 20;

/// With a log, for a sync whose caller waits for the flush: the writeback of
/// a shard's written runs starts every this many bytes (see `flush/writeback.rs`).
pub const WRITEBACK_BYTES: usize = 16 << 20;

/// With a log: held runs are also released once the feed has compared this
/// much since the last release (a sparse change then reaches the disk in a
/// few batches while the feed goes on, not all at the end).
pub(crate) const RELEASE_BYTES: u64 = 512 << 20;

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
    /// With a log: the writeback of what a writer thread wrote to a shard
    /// is started (from a low-priority thread) every this many bytes; 0
    /// (the default) leaves it to the `fdatasync` after the commit. For a
    /// caller that waits for that flush ([`WRITEBACK_BYTES`]): see
    /// `flush/writeback.rs` for why not otherwise.
    pub writeback_bytes: usize,
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
            writeback_bytes: 0,
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

/// A shard as the diff workers and writers share it.
pub(crate) struct Shard {
    pub(crate) io: ShardIo,
    pub(crate) changed: AtomicU64,
    pub(crate) changed_blocks: AtomicU64,
    pub(crate) elements: AtomicU64,
}

/// Where the feed stands in a shard (touched by the feeding thread only).
pub(crate) struct FeedState {
    pub(crate) data_start: u64,
    /// No segment may start before this offset (the end of the last one).
    pub(crate) cursor: u64,
    pub(crate) pending: Option<Pending>,
    pub(crate) compared: u64,
}

/// A sync in progress over a fixed set of shards.
pub struct Syncer {
    pub(crate) shards: Arc<Vec<Shard>>,
    pub(crate) feeds: Vec<FeedState>,
    pub(crate) opts: Options,
    pub(crate) pool: rayon::ThreadPool,
    /// One per pool thread, indexed by `rayon::current_thread_index`.
    pub(crate) scratch: Vec<Mutex<Scratch>>,
    pub(crate) staging: Staging,
    /// Set when a batch failed after it started writing.
    broken: bool,
    pub(crate) log: Option<Arc<DeltaLog>>,
    /// Encodes the records of pending blocks (on the feeding thread).
    pub(crate) enc: Encoder,
    pub(crate) held: Mutex<Held>,
    /// Bytes compared since the held runs were last released.
    pub(crate) since_release: u64,
    /// With a log: makes batches of held runs durable and writes them in
    /// the background while the feed goes on.
    pub(crate) committer: Option<Committer>,
    /// Flushes shards in the background once their writes are done (without
    /// a log, and not in a dry run).
    pub(crate) flusher: Option<Flusher>,
    /// Shards handed to the flusher by a feed without a log.
    pub(crate) flushed: Vec<bool>,
    /// The first error of any of the sync's threads, and the handle that
    /// stops its writes (`errors.stop`).
    pub(crate) errors: FirstError,
    pub(crate) timings: Arc<Timings>,
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
            .map(|_| Mutex::new(Scratch::take(READ_BYTES.max(b))))
            .collect();
        let n_shards = shards.len();
        let shards = Arc::new(shards);
        let log = match (&opts.log, logged) {
            (Some(spec), true) => Some(Arc::new(DeltaLog::new(spec.clone(), bindings))),
            _ => None,
        };
        let errors = FirstError::new(AbortHandle::default());
        let timings = Arc::new(Timings::default());
        let flusher = match opts.dry_run || logged {
            false => Some(Flusher::spawn(shards.clone(), errors.clone())?),
            true => None,
        };
        let committer = match &log {
            Some(log) => Some(Committer::spawn(
                shards.clone(),
                log.clone(),
                opts.hold_bytes,
                opts.writeback_bytes,
                errors.clone(),
                timings.clone(),
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
            committer,
            flusher,
            flushed: vec![false; n_shards],
            errors,
            timings,
        })
    }

    /// The log this sync appends to (to commit it once the sync is done).
    pub fn log(&self) -> Option<Arc<DeltaLog>> {
        self.log.clone()
    }

    /// Where this sync's time goes, filled in as it runs (read it after
    /// [`finish`](Self::finish)).
    pub fn timings(&self) -> Arc<Timings> {
        self.timings.clone()
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
        let start = Instant::now();
        let result = self.feed_checked(segments);
        Timings::add(&self.timings.feed_ns, start);
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
        self.errors.stop.abort();
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
        self.errors.stop.clone()
    }

    fn usable(&self) -> Result<()> {
        if self.broken {
            return Err(Error::Plan(
                "an earlier batch of this sync failed; nothing more is written".into(),
            ));
        }
        Ok(())
    }

    /// Writes the last pending blocks, makes every written shard durable
    /// (`fdatasync`) and reports per shard.
    pub fn finish(mut self) -> Result<Vec<ShardReport>> {
        self.usable()?;
        let start = Instant::now();
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
        Timings::add(&self.timings.finish_ns, start);
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

    /// The most new bytes held at once so far (with a log).
    #[cfg(test)]
    fn peak_held(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).peak
    }

    /// What the diff workers of a logged sync share to hold new bytes.
    pub(crate) fn holding(&self) -> Option<Holding<'_>> {
        Holding::of(&self.log, &self.held, &self.committer, self.opts.hold_bytes)
    }

    /// Hands the held runs to the committer (which makes the log durable,
    /// then writes them). Blocks while another batch is queued there.
    pub(crate) fn release(&mut self) -> Result<()> {
        let Some(hold) = self.holding() else {
            return Ok(());
        };
        let runs = hold.take();
        if runs.is_empty() {
            return hold.committer.check();
        }
        let start = Instant::now();
        let sent = hold.committer.submit(runs);
        Timings::add(&self.timings.release_wait_ns, start);
        sent
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.join_threads();
        for s in self.scratch.drain(..) {
            s.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .give_back();
        }
    }
}
