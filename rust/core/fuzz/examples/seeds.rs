//! Writes a few valid logs, the starting corpus of the `log_reader` target:
//! `cargo run --example seeds -- <dir>`. They are small (the fuzzer mutates
//! them byte by byte) and cover each record type, both kinds, every element
//! width, each payload mode (gaps, bitmap, stored, zstd), a short last unit,
//! an uncommitted log and a torn tail. `tiny.xlog` is the worked example of
//! docs/FORMAT.md.

use std::path::Path;

use apollo_sync_core::log::{DeltaLog, Encoder, Kind, LogSpec, ShardBinding};

fn shard(name: &str, file_len: u64) -> ShardBinding {
    ShardBinding {
        name: name.into(),
        file_len,
        data_start: 64,
        header_hash: 0x0123_4567_89ab_cdef,
    }
}

fn log(dir: &Path, name: &str, generation: u64, kind: Kind, shards: Vec<ShardBinding>) -> DeltaLog {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    DeltaLog::new(
        LogSpec {
            path,
            generation,
            kind,
        },
        shards,
    )
}

/// `len` bytes of a weight-like pattern, and the same with every `every`-th
/// element of `width` bytes nudged (a small step: low bits flipped) or, with
/// `wild`, replaced.
fn pair(len: usize, width: usize, every: usize, wild: bool) -> (Vec<u8>, Vec<u8>) {
    let old: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(37) ^ 0x5a).collect();
    let mut new = old.clone();
    for e in (3..len.div_ceil(width)).step_by(every) {
        if wild {
            for b in &mut new[e * width..((e + 1) * width).min(len)] {
                *b = !*b;
            }
        } else {
            new[e * width] ^= 1 + (e % 3) as u8;
        }
    }
    (old, new)
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: seeds <dir>");
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir).unwrap();
    let mut enc = Encoder::new();

    // One record of two bf16 elements in a short last unit, a barrier, the commit.
    let l = log(dir, "tiny.xlog", 1, Kind::Sync, vec![shard("m.safetensors", 4096 + 100)]);
    let old = [0u8; 100];
    let mut new = old;
    new[10] = 0x01;
    new[62] = 0x80;
    l.append_delta(&mut enc, 0, 4096, 2, &old, &new).unwrap();
    l.barrier().unwrap();
    l.commit(b"{}").unwrap();

    // Two shards, every width and payload mode, three barriers.
    let shards = vec![shard("a.safetensors", 1 << 20), shard("b.safetensors", 300_000)];
    let l = log(dir, "mixed.xlog", 7, Kind::Sync, shards);
    let (o, n) = pair(16_384, 2, 40, false); // sparse gaps, zstd
    l.append_delta(&mut enc, 0, 0, 2, &o, &n).unwrap();
    let (o, n) = pair(4096, 1, 2, true); // dense: bitmap
    l.append_delta(&mut enc, 0, 65_536, 1, &o, &n).unwrap();
    l.barrier().unwrap();
    let (o, n) = pair(8192, 4, 300, true); // few, random values: stored
    l.append_delta(&mut enc, 1, 8192, 4, &o, &n).unwrap();
    let (o, n) = pair(4096, 8, 1, true); // every element
    l.append_delta(&mut enc, 1, 32_768, 8, &o, &n).unwrap();
    l.barrier().unwrap();
    let (o, n) = pair(300_000 - 294_912, 2, 7, false); // the shard's short last unit
    l.append_delta(&mut enc, 1, 294_912, 2, &o, &n).unwrap();
    l.barrier().unwrap();
    l.commit(br#"{"time": 1.5, "files": ["a.safetensors", "b.safetensors"]}"#)
        .unwrap();

    // A rollback's log, committed, then a torn tail after the commit.
    let l = log(dir, "rollback.xlog", 9, Kind::Rollback, vec![shard("m.safetensors", 8192)]);
    let (o, n) = pair(8192, 2, 5, false);
    l.append_delta(&mut enc, 0, 0, 2, &n, &o).unwrap();
    l.barrier().unwrap();
    l.commit(br#"{"rollback_to": 7}"#).unwrap();
    let path = dir.join("rollback.xlog");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&[0x01, 0, 0, 0, 0x40]);
    std::fs::write(&path, bytes).unwrap();

    // Uncommitted: a barrier, then a record the crash cut short.
    let l = log(dir, "uncommitted.xlog", 2, Kind::Sync, vec![shard("m.safetensors", 12_288)]);
    let (o, n) = pair(4096, 2, 9, false);
    l.append_delta(&mut enc, 0, 0, 2, &o, &n).unwrap();
    l.barrier().unwrap();
    l.append_delta(&mut enc, 0, 8192, 2, &n, &o).unwrap();
    l.barrier().unwrap();
    let path = dir.join("uncommitted.xlog");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 32 - 20]).unwrap();
    println!("seeds written to {}", dir.display());
}
