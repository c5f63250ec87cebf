//! Stage 1, plan, continued: pending blocks, the blocks that several
//! segments (or a segment and bytes that are not fed) share, assembled from
//! the file's bytes and each segment in turn, then compared and written once.

use std::sync::atomic::Ordering;

use crate::apply::hold::{Holding, Sink};
use crate::apply::write::write_run;
use crate::error::{Error, Result};
use crate::log::RecordSummary;
use crate::read::live::Live;
use crate::sync::Syncer;

/// A block that several segments share: the file's bytes, and the segments
/// laid over them so far.
pub(crate) struct Pending {
    start: u64,
    orig: Vec<u8>,
    new: Vec<u8>,
    /// Element width of what was laid over it: one width, else bytes.
    width: Option<u8>,
    /// What was laid over it: `(start, end, width, phase)` relative to the
    /// block, `phase` the bytes of an element that lie before `start`.
    pieces: Vec<(usize, usize, u8, u8)>,
}

impl Syncer {
    /// Copies `bytes` (all inside one block) over that block's pending image.
    pub(super) fn overlay(
        &mut self,
        shard: usize,
        at: u64,
        bytes: Live<'_>,
        width: u8,
        phase: u8,
    ) -> Result<()> {
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
                pieces: Vec::new(),
            });
        }
        let p = self.feeds[shard].pending.as_mut().expect("pending block");
        if p.width != Some(width) {
            p.width = None;
        }
        let rel = (at - p.start) as usize;
        p.pieces.push((rel, rel + bytes.len(), width, phase));
        let rel = (at - p.start) as usize;
        bytes.read_into(0, &mut p.new[rel..rel + bytes.len()])
    }

    pub(crate) fn flush_pending(&mut self, shard: usize) -> Result<()> {
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
        if self.log.is_none() {
            return write_run(s, p.start, &p.new, &mut self.staging);
        }
        match Holding::of(&self.log, &self.held, &self.committer, self.opts.hold_bytes) {
            Some(hold) => {
                Sink::Hold(hold).emit(
                    shard,
                    s,
                    p.start,
                    &p.orig,
                    &p.new,
                    p.width.unwrap_or(1),
                    None,
                    &mut self.enc,
                    &mut Vec::new(),
                )?;
                if p.pieces.len() > 1 {
                    // Several tensors share the block: count each one's elements.
                    let pieces: Vec<RecordSummary> = p
                        .pieces
                        .iter()
                        .map(|&(a, b, w, phase)| RecordSummary {
                            shard: shard as u32,
                            offset: p.start + a as u64,
                            len: (b - a) as u64,
                            elements: changed_elements(&p.orig[a..b], &p.new[a..b], w, phase),
                        })
                        .filter(|r| r.elements > 0)
                        .collect();
                    hold.log.split_summary(shard as u32, p.start, &pieces);
                }
                Ok(())
            }
            // Logged, but the commit thread is gone (aborted): never in place unlogged.
            None => Err(Error::Plan("the commit thread stopped".into())),
        }
    }
}

/// Elements of `width` bytes that differ between `old` and `new`, the first
/// starting `phase` bytes before them (its bytes here count as one element).
pub(crate) fn changed_elements(old: &[u8], new: &[u8], width: u8, phase: u8) -> u64 {
    let w = usize::from(width.max(1));
    let head = (w - usize::from(phase) % w) % w;
    let head = head.min(old.len());
    let mut n = u64::from(old[..head] != new[..head]);
    n += old[head..]
        .chunks(w)
        .zip(new[head..].chunks(w))
        .filter(|(a, b)| a != b)
        .count() as u64;
    n
}
