//! What the log's tests share: shards of made-up bytes, steps that move a few
//! elements of every block, and logged syncs of them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{DeltaLog, Kind, LogSpec};
use crate::sync::{Options, Segment, ShardSpec, Syncer};

/// Where a test shard's data starts (its first bytes stand for a header).
pub const DATA_START: u64 = 64;

/// `n` bytes of a pattern that depends on `seed`.
pub fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

/// Like a training step: a few elements of every block move.
pub fn step(v: &[u8], seed: usize) -> Vec<u8> {
    let mut out = v.to_vec();
    for i in (DATA_START as usize + seed % 7..v.len()).step_by(1499) {
        out[i] = out[i].wrapping_add(1 + (seed % 5) as u8);
    }
    out
}

/// Syncs `live` into the shard at `shard` as generation `generation`, logged
/// at `log` (not committed); returns the log.
pub fn sync_logged(shard: &Path, log: PathBuf, live: &[u8], generation: u64) -> Arc<DeltaLog> {
    let opts = Options {
        log: Some(LogSpec {
            path: log,
            generation,
            kind: Kind::Sync,
        }),
        hold_bytes: 20_000, // several barriers
        ..Options::default()
    };
    let spec = ShardSpec {
        path: shard.to_path_buf(),
        data_start: DATA_START,
        file_len: live.len() as u64,
    };
    let mut s = Syncer::new(vec![spec], opts).unwrap();
    let seg = Segment {
        shard: 0,
        offset: DATA_START,
        data: crate::live::Live::Mem(&live[DATA_START as usize..]),
        width: 2,
    };
    s.feed(&[seg]).unwrap();
    let log = s.log().unwrap();
    s.finish().unwrap();
    log
}
