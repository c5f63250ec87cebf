//! Where a sync's wall-clock time went, stage by stage: the threads of a sync
//! add to one shared [`Timings`] as they go, and the caller reads it after
//! [`Syncer::finish`](super::Syncer::finish).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Nanoseconds of wall clock per stage of one sync, summed over its calls.
/// Stages run on different threads and overlap: they do not add up to the
/// sync's time; the ones on its critical path are `feed`, `release_wait` and
/// `finish`.
#[derive(Debug, Default)]
pub struct Timings {
    /// Inside [`Syncer::feed`](super::Syncer::feed): reading the files,
    /// comparing, encoding and holding (or queuing writes, without a log).
    pub feed_ns: AtomicU64,
    /// Waiting to hand held runs to the commit thread while it still had a
    /// batch queued (the barriers or the writers lag the diff); part of
    /// `feed_ns`, or of `finish_ns` for the last batch.
    pub release_wait_ns: AtomicU64,
    /// Log barriers made (commit thread).
    pub barriers: AtomicU64,
    /// Time in those barriers (appends flushed, `fdatasync` of the log).
    pub barrier_ns: AtomicU64,
    /// Writing in place, summed over the writer threads.
    pub write_ns: AtomicU64,
    /// Writing in place, on the busiest writer thread.
    pub write_busiest_ns: AtomicU64,
    /// Spans of written bytes handed to the writeback thread (a durable
    /// sync's; see `flush/writeback.rs`).
    pub writeback_spans: AtomicU64,
    /// Of those, the spans whose writeback it started before the writes
    /// ended (the rest are left to the flush).
    pub writeback_started: AtomicU64,
    /// Inside [`Syncer::finish`](super::Syncer::finish): the last pending
    /// blocks, the last barrier, waiting for the writers' tail, and (without
    /// a log) the `fdatasync` of every written shard.
    pub finish_ns: AtomicU64,
}

/// A field of [`Timings`] with its name, in seconds, for reports.
pub type Stage = (&'static str, f64);

impl Timings {
    /// Adds the time since `since` to `field`.
    pub(crate) fn add(field: &AtomicU64, since: Instant) {
        field.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// A writer thread's total busy time, once it ends.
    pub(crate) fn writer_done(&self, busy_ns: u64) {
        self.write_ns.fetch_add(busy_ns, Ordering::Relaxed);
        self.write_busiest_ns.fetch_max(busy_ns, Ordering::Relaxed);
    }

    /// Every stage, in seconds (and the counts of barriers and writeback
    /// spans), in pipeline order.
    pub fn stages(&self) -> Vec<Stage> {
        let s = |f: &AtomicU64| f.load(Ordering::Relaxed) as f64 / 1e9;
        vec![
            ("feed", s(&self.feed_ns)),
            ("release_wait", s(&self.release_wait_ns)),
            ("barriers", self.barriers.load(Ordering::Relaxed) as f64),
            ("barrier", s(&self.barrier_ns)),
            ("write", s(&self.write_ns)),
            ("write_busiest", s(&self.write_busiest_ns)),
            (
                "writeback_spans",
                self.writeback_spans.load(Ordering::Relaxed) as f64,
            ),
            (
                "writeback_started",
                self.writeback_started.load(Ordering::Relaxed) as f64,
            ),
            ("finish", s(&self.finish_ns)),
        ]
    }
}
