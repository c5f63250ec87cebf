//! Stage 1, plan: a batch of segments checked, cut into jobs of whole blocks
//! (diffed in parallel) and pending blocks that several segments share
//! (assembled in `pending.rs`, then compared and written once).

use std::sync::atomic::Ordering;
use std::sync::mpsc::sync_channel;
use std::sync::Mutex;

use rayon::prelude::*;

use crate::apply::hold::{Sink, WriteReq};
use crate::apply::write::{io_threads, write_loop, WRITE_QUEUE};
use crate::diff::job::{diff_job, Job};
use crate::error::{Error, Result};
use crate::sync::{Segment, Syncer, JOB_BYTES, RELEASE_BYTES};

pub(crate) mod pending;

impl Syncer {
    pub(crate) fn feed_checked<'d>(&mut self, segments: &[Segment<'d>]) -> Result<()> {
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
                self.overlay(seg.shard, s, head, seg.width, 0)?;
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
                let phase = ((body_end - s) % u64::from(seg.width.max(1))) as u8;
                self.overlay(seg.shard, body_end, tail, seg.width, phase)?;
            }
        }
        let shards = &*self.shards;
        let block = self.opts.block_size;
        let scratch = &self.scratch;
        let pool = &self.pool;
        let stop = &self.errors.stop;
        let diff_all = |sink: Sink<'_, 'd>| {
            pool.install(|| {
                jobs.par_iter().try_for_each(|job| {
                    if stop.is_aborted() {
                        // a writer failed (the sync's first error, returned
                        // below), or the caller abandoned the sync
                        return Err(Error::Plan("the sync was aborted".into()));
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
        if self.log.is_some() {
            // Logged, but the commit thread is gone (aborted): never in place unlogged.
            let hold = self
                .holding()
                .ok_or_else(|| Error::Plan("the commit thread stopped".into()))?;
            let diffed = diff_all(Sink::Hold(hold));
            self.errors.take()?;
            diffed?;
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
        let diffed = std::thread::scope(|scope| {
            for _ in 0..io_threads(shards) {
                scope.spawn(|| write_loop(shards, &rx, &self.errors, &self.timings));
            }
            let diffed = diff_all(Sink::Queue(&tx));
            drop(tx); // writers finish the queue, then stop
            diffed
        });
        self.errors.take()?; // a writer's error first: it is why the diff stopped
        diffed?;
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

    pub(crate) fn check(&self, segments: &[Segment<'_>]) -> Result<()> {
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
}
