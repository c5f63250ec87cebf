//! Throughput of the block-diff kernel against a plain `memcmp` of the same bytes.
//!
//! Two 64 MiB buffers of random bytes; `disk` equals `live` except in 0.5% of
//! the 4 KiB blocks. Results read as bytes compared per second: the issue wants
//! `changed_runs` at ≥ 80% of `memcmp`.
//!
//! Run: `cargo bench -p apollo_sync_core --bench diff`

use std::hint::black_box;
use std::ops::Range;
use std::time::Duration;

use apollo_sync_core::diff::changed_runs;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const LEN: usize = 64 << 20;
const BLOCK: usize = 4096;
const CHANGED_PERMILLE: u64 = 5; // 0.5% of the 4 KiB blocks

/// xorshift64*: deterministic, fast, good enough for benchmark data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// `(live, disk)`: random bytes, and the same with one byte flipped in exactly 0.5% of
/// the blocks (at random places).
fn buffers() -> (Vec<u8>, Vec<u8>) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut live = Vec::with_capacity(LEN);
    while live.len() < LEN {
        live.extend_from_slice(&rng.next().to_le_bytes());
    }
    let mut disk = live.clone();
    let blocks = LEN / BLOCK;
    let want = (blocks as u64 * CHANGED_PERMILLE / 1000) as usize;
    let mut hit = vec![false; blocks];
    let mut flipped = 0;
    while flipped < want {
        let b = rng.next() as usize % blocks;
        if !hit[b] {
            hit[b] = true;
            disk[b * BLOCK + rng.next() as usize % BLOCK] ^= 0x5a;
            flipped += 1;
        }
    }
    eprintln!("diff bench: {blocks} blocks of {BLOCK} B, {flipped} differ");
    (live, disk)
}

fn bench_diff(c: &mut Criterion) {
    let (live, disk) = buffers();
    let mut group = c.benchmark_group("diff_64MiB");
    group
        .throughput(Throughput::Bytes(LEN as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));

    // `memcmp` stops at the first difference, so the reference is a full scan of two
    // equal buffers (the same bytes as `live`, a separate allocation).
    let same = live.clone();
    group.bench_function("memcmp_equal_buffers", |b| {
        b.iter(|| black_box(black_box(live.as_slice()) == black_box(same.as_slice())))
    });
    // On the pair that differs: stops early at the first changed block (shown for contrast).
    group.bench_function("memcmp_first_difference", |b| {
        b.iter(|| black_box(black_box(live.as_slice()) == black_box(disk.as_slice())))
    });
    // memcmp of each 4 KiB block with no bookkeeping: the kernel's loop minus its output.
    group.bench_function("memcmp_per_4k_block", |b| {
        b.iter(|| {
            let l = black_box(live.as_slice());
            let d = black_box(disk.as_slice());
            l.chunks(BLOCK)
                .zip(d.chunks(BLOCK))
                .filter(|(x, y)| x != y)
                .count()
        })
    });
    for block in [4096usize, 65536] {
        let mut runs: Vec<Range<usize>> = Vec::with_capacity(LEN / block);
        group.bench_function(format!("changed_runs_block_{block}"), |b| {
            b.iter(|| {
                runs.clear();
                changed_runs(black_box(&live), black_box(&disk), block, &mut runs);
                black_box(runs.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_diff);
criterion_main!(benches);
