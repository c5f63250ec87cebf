//! Encodes the delta between two files of one dtype, in records of a fixed
//! size, as a sync would: time per pass, payload size, and a check that every
//! record applies back. For measuring the codec on real optimizer steps
//! (`benches/probes/dump_step.py` writes such pairs).
//!
//! Run: `cargo run --release -p apollo_sync_core --example codec_files -- OLD NEW [width] [record MiB] [rounds]`

use std::time::Instant;

use apollo_sync_core::delta::Codec;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: codec_files OLD NEW [width=2] [record MiB=4] [rounds=5]");
        std::process::exit(2);
    }
    let old = std::fs::read(&args[0]).expect("read OLD");
    let new = std::fs::read(&args[1]).expect("read NEW");
    assert_eq!(old.len(), new.len(), "the files differ in length");
    let width: usize = args.get(2).map_or(2, |a| a.parse().expect("width"));
    let record = args
        .get(3)
        .map_or(4, |a| a.parse::<usize>().expect("record MiB"))
        << 20;
    let rounds: usize = args.get(4).map_or(5, |a| a.parse().expect("rounds"));

    let mut codec = Codec::new();
    let mut payloads: Vec<Vec<u8>> = old.chunks(record).map(|_| Vec::new()).collect();
    let mut best = f64::INFINITY;
    let mut k = 0;
    for _ in 0..rounds {
        k = 0;
        let t = Instant::now();
        for ((o, n), p) in old
            .chunks(record)
            .zip(new.chunks(record))
            .zip(&mut payloads)
        {
            p.clear();
            k += codec.encode(o, n, width, p).expect("encode");
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    let bytes: usize = payloads.iter().map(Vec::len).sum();
    let t = Instant::now();
    let mut back = new.clone();
    for (b, p) in back.chunks_mut(record).zip(&payloads) {
        codec.apply(p, width, b).expect("apply");
    }
    let apply = t.elapsed().as_secs_f64();
    assert!(back == old, "applying the payloads to NEW did not give OLD");
    let elements = old.len().div_ceil(width);
    println!(
        "{} MB, {:.2}% of elements changed: payload {:.3}% of the file ({:.2} B/element), \
         encode {:.3} s ({:.2} GB/s, {:.1} ns/changed element), apply {:.3} s",
        old.len() / 1_000_000,
        100.0 * k as f64 / elements as f64,
        100.0 * bytes as f64 / old.len() as f64,
        bytes as f64 / k.max(1) as f64,
        best,
        old.len() as f64 / best / 1e9,
        best * 1e9 / k.max(1) as f64,
        apply,
    );
}
