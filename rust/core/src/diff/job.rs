//! Stage 3, diff: a job's live bytes (read as `crate::read` has them) against
//! the file's, a chunk at a time; each changed run (with the file's old bytes) goes to a [`Sink`].

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use super::kernel::changed_runs_at;
use crate::apply::hold::{Sink, WriteReq};
use crate::apply::write::queue;
use crate::error::Result;
use crate::log::Encoder;
use crate::read::live::Live;
use crate::sync::Shard;

pub(crate) struct Job<'a> {
    pub(crate) shard: usize,
    pub(crate) offset: u64,
    pub(crate) data: Live<'a>,
    pub(crate) width: u8,
}

/// Per-worker scratch space, allocated once per pool thread and reused.
pub(crate) struct Scratch {
    /// File bytes being compared.
    pub(super) read: Vec<u8>,
    /// Live bytes being compared, when they come from a file.
    pub(super) live: Vec<u8>,
    pub(super) runs: Vec<Range<usize>>,
    /// Encodes log records.
    pub(super) enc: Encoder,
}

/// Scratch spaces of finished syncs, for the next sync of the process: their
/// buffers (and the encoder's zstd contexts) are then warm, not faulted in
/// afresh by every sync.
static KEPT: Mutex<Vec<Scratch>> = Mutex::new(Vec::new());

impl Scratch {
    /// Most scratch spaces kept between syncs (one per worker thread of the
    /// syncs a process runs at once).
    const KEEP: usize = 64;

    /// A kept scratch space, or a new one, with a read buffer of `read_len`
    /// bytes (the diff reads that much per step).
    pub(crate) fn take(read_len: usize) -> Scratch {
        let kept = KEPT.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut s = kept.unwrap_or_else(|| Scratch {
            read: Vec::new(),
            live: Vec::new(),
            runs: Vec::new(),
            enc: Encoder::new(),
        });
        s.read.resize(read_len, 0);
        s
    }

    pub(crate) fn give_back(self) {
        let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < Self::KEEP {
            kept.push(self);
        }
    }
}

/// Compares one job's live bytes with the file, a chunk at a time, and sends
/// each changed run (with the file's old bytes for it) to `sink`.
pub(crate) fn diff_job<'a>(
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
