//! Throughput of the XOR-delta codec on one 4 MiB bf16 run.
//!
//! `old` holds bf16 values of a N(0, 0.02)-like spread; `new` differs from it in
//! 0.1%, 1% or 10% of the elements, spread evenly so every 4 KiB block changes,
//! by a small step (the low mantissa bits flip, as a small optimizer update
//! does). Results read as bytes of one side (`old`) per second: the sync's diff
//! wants encode at >= 2 GB/s per core at 1%.
//!
//! Run: `cargo bench -p apollo_sync_core --bench codec`

use std::hint::black_box;
use std::time::Duration;

use apollo_sync_core::delta::Codec;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const LEN: usize = 4 << 20;
const WIDTH: usize = 2; // bf16

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

/// `(old, new)` with `per_100k` of every 100,000 elements changed.
fn buffers(per_100k: u64) -> (Vec<u8>, Vec<u8>) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut old = Vec::with_capacity(LEN);
    while old.len() < LEN {
        // Sign and exponent of |x| in [2^-10, 2^-5): bf16 high bytes 0x3a..0x3d.
        let r = rng.next();
        let hi = (0x3a + (r % 4) as u8) | ((r >> 8) as u8 & 0x80);
        old.extend_from_slice(&[(r >> 16) as u8, hi]);
    }
    let mut new = old.clone();
    for e in 0..LEN / WIDTH {
        let r = rng.next();
        if r % 100_000 < per_100k {
            // x ^ (x ± a few ulps) flips 1, 2, 3... low bits.
            new[e * WIDTH] ^= (1u8 << (1 + (r >> 20) % 4)) - 1;
        }
    }
    (old, new)
}

fn bench_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec_bf16_4MiB");
    group
        .throughput(Throughput::Bytes(LEN as u64))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut codec = Codec::new();
    for (name, per_100k) in [("0.1%", 100), ("1%", 1_000), ("10%", 10_000)] {
        let (old, new) = buffers(per_100k);
        let mut payload = Vec::new();
        let k = codec.encode(&old, &new, WIDTH, &mut payload).unwrap();
        eprintln!(
            "codec bench {name}: {k} elements changed, payload {} B ({:.2} B/element)",
            payload.len(),
            payload.len() as f64 / k as f64
        );
        let mut out = Vec::with_capacity(payload.len() * 2);
        group.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| {
                out.clear();
                codec
                    .encode(black_box(&old), black_box(&new), WIDTH, &mut out)
                    .unwrap()
            })
        });
        let mut target = old.clone();
        group.bench_function(format!("apply_{name}"), |b| {
            b.iter(|| {
                codec
                    .apply(black_box(&payload), WIDTH, black_box(&mut target))
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_codec);
criterion_main!(benches);
