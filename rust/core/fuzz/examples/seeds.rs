//! Writes the starting corpora of the fuzz targets:
//! `cargo run --example seeds -- <corpus dir>`.
//!
//! `log_reader/`: a few valid logs, small (the fuzzer mutates them byte by
//! byte), covering each record type, both kinds, every element width, gaps
//! and bitmap positions, stored and zstd bodies, a short last unit, an
//! uncommitted log and a torn tail. `tiny.xlog` is the worked example of
//! docs/FORMAT.md. `delta_codec/`: payloads in that target's input layout.

use std::path::Path;

use apollo_sync_core::delta::Codec;
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
    let old: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(37) ^ 0x5a)
        .collect();
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
    let root = std::env::args().nth(1).expect("usage: seeds <corpus dir>");
    let root = Path::new(&root);
    codec_seeds(&root.join("delta_codec"));
    let dir = &root.join("log_reader");
    std::fs::create_dir_all(dir).unwrap();
    let mut enc = Encoder::new();

    // One record of two bf16 elements in a short last unit, a barrier, the commit.
    let l = log(
        dir,
        "tiny.xlog",
        1,
        Kind::Sync,
        vec![shard("m.safetensors", 4096 + 100)],
    );
    let old = [0u8; 100];
    let mut new = old;
    new[10] = 0x01;
    new[62] = 0x80;
    l.append_delta(&mut enc, 0, 4096, 2, &old, &new).unwrap();
    l.barrier().unwrap();
    l.commit(b"{}").unwrap();

    // Two shards, every width, gaps and bitmap, three barriers.
    let shards = vec![
        shard("a.safetensors", 1 << 20),
        shard("b.safetensors", 300_000),
    ];
    let l = log(dir, "mixed.xlog", 7, Kind::Sync, shards);
    let (o, n) = pair(16_384, 2, 40, false); // sparse gaps, zstd
    l.append_delta(&mut enc, 0, 0, 2, &o, &n).unwrap();
    let (o, n) = pair(4096, 1, 2, true); // dense: bitmap
    l.append_delta(&mut enc, 0, 65_536, 1, &o, &n).unwrap();
    l.barrier().unwrap();
    let (o, n) = pair(8192, 4, 300, true); // few elements, wide values
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
    let l = log(
        dir,
        "rollback.xlog",
        9,
        Kind::Rollback,
        vec![shard("m.safetensors", 8192)],
    );
    let (o, n) = pair(8192, 2, 5, false);
    l.append_delta(&mut enc, 0, 0, 2, &n, &o).unwrap();
    l.barrier().unwrap();
    l.commit(br#"{"rollback_to": 7}"#).unwrap();
    let path = dir.join("rollback.xlog");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&[0x01, 0, 0, 0, 0x40]);
    std::fs::write(&path, bytes).unwrap();

    // Uncommitted: a barrier, then a record the crash cut short.
    let l = log(
        dir,
        "uncommitted.xlog",
        2,
        Kind::Sync,
        vec![shard("m.safetensors", 12_288)],
    );
    let (o, n) = pair(4096, 2, 9, false);
    l.append_delta(&mut enc, 0, 0, 2, &o, &n).unwrap();
    l.barrier().unwrap();
    l.append_delta(&mut enc, 0, 8192, 2, &n, &o).unwrap();
    l.barrier().unwrap();
    let path = dir.join("uncommitted.xlog");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 32 - 20]).unwrap();
    println!("seeds written under {}", root.display());
}

/// Payloads of each width and density, as `delta_codec` reads its input:
/// width selector (0, 1, 2, 3 for 1, 2, 4, 8 bytes), length u16, payload.
fn codec_seeds(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut codec = Codec::new();
    for (sel, width) in [1usize, 2, 4, 8].into_iter().enumerate() {
        for (every, wild) in [(1, true), (9, false), (200, true)] {
            let len = 1000 + 3 * sel; // a short last element for most widths
            let (old, new) = pair(len, width, every, wild);
            let mut input = vec![sel as u8];
            input.extend_from_slice(&(len as u16).to_le_bytes());
            codec.encode(&old, &new, width, &mut input).unwrap();
            std::fs::write(dir.join(format!("w{width}-{every}")), input).unwrap();
        }
    }
}
