use super::*;
use proptest::prelude::*;
use std::io::Write;

fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    f
}

fn spec(f: &tempfile::NamedTempFile, data_start: u64) -> ShardSpec {
    ShardSpec {
        path: f.path().to_path_buf(),
        data_start,
        file_len: std::fs::metadata(f.path()).unwrap().len(),
    }
}

/// A segment of live bytes in memory.
fn mem(shard: usize, offset: u64, data: &[u8], width: u8) -> Segment<'_> {
    Segment {
        shard,
        offset,
        data: Live::Mem(data),
        width,
    }
}

/// Bytes in aligned blocks where `a` and `b` differ.
fn changed_block_bytes(a: &[u8], b: &[u8], block: usize) -> u64 {
    a.chunks(block)
        .zip(b.chunks(block))
        .filter(|(x, y)| x != y)
        .map(|(x, _)| x.len() as u64)
        .sum()
}

/// Syncs `live` (segments cut at `cuts`, skipping `skip`) into a file
/// holding `orig`, and returns the file's bytes and the report.
fn run(
    orig: &[u8],
    live: &[u8],
    data_start: usize,
    cuts: &[usize],
    skip: &[usize],
    opts: Options,
) -> (Vec<u8>, ShardReport) {
    let (after, report, _) = run_from(orig, live, data_start, cuts, skip, opts, false);
    (after, report)
}

/// As `run`, reading the live bytes from a file with `pread` when
/// `from_file`. With `opts.log`, also commits the log, then rolls the sync
/// back as recovery would an uncommitted generation, and
/// returns the file's bytes after the undo.
fn run_from(
    orig: &[u8],
    live: &[u8],
    data_start: usize,
    cuts: &[usize],
    skip: &[usize],
    opts: Options,
    from_file: bool,
) -> (Vec<u8>, ShardReport, Option<Vec<u8>>) {
    let live_file = file_with(live);
    let live_handle = std::fs::File::open(live_file.path()).unwrap();
    let f = file_with(orig);
    let log_spec = opts.log.clone();
    let mut syncer = Syncer::new(vec![spec(&f, data_start as u64)], opts).unwrap();
    let mut bounds = vec![data_start];
    bounds.extend(
        cuts.iter()
            .copied()
            .filter(|&c| c > data_start && c < orig.len()),
    );
    bounds.push(orig.len());
    bounds.sort();
    bounds.dedup();
    let segs: Vec<Segment<'_>> = bounds
        .windows(2)
        .enumerate()
        .filter(|(i, _)| !skip.contains(i))
        .map(|(_, w)| Segment {
            shard: 0,
            offset: w[0] as u64,
            data: if from_file {
                Live::File {
                    file: &live_handle,
                    offset: w[0] as u64,
                    len: w[1] - w[0],
                }
            } else {
                Live::Mem(&live[w[0]..w[1]])
            },
            width: 2,
        })
        .collect();
    // Feed in two batches to exercise state kept across calls.
    let half = segs.len() / 2;
    syncer.feed(&segs[..half]).unwrap();
    syncer.feed(&segs[half..]).unwrap();
    let report = syncer.finish().unwrap().pop().unwrap();
    let after = std::fs::read(f.path()).unwrap();
    let undone = log_spec.map(|spec| {
        if spec.path.exists() {
            let log = crate::log::LogFile::open(&spec.path).unwrap();
            assert!(!log.is_committed());
            crate::log::recover(f.path().parent().unwrap(), &[&log], 0, false).unwrap();
        }
        std::fs::read(f.path()).unwrap()
    });
    (after, report, undone)
}

#[test]
fn writes_exactly_the_changed_blocks() {
    let orig: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut live = orig.clone();
    for &i in &[100usize, 5000, 5001, 40_000, 99_999] {
        live[i] ^= 0x5a;
    }
    let (after, rep) = run(
        &orig,
        &live,
        0,
        &[1000, 4097, 50_000],
        &[],
        Options::default(),
    );
    assert_eq!(after, live);
    let expected = changed_block_bytes(&orig, &live, 4096);
    assert_eq!(rep.bytes_changed, expected);
    assert_eq!(
        rep.bytes_written_direct + rep.bytes_written_buffered,
        expected
    );
    assert_eq!(rep.bytes_compared, orig.len() as u64);
}

#[test]
fn second_sync_writes_nothing() {
    let orig = vec![3u8; 50_000];
    let (after, rep) = run(&orig, &orig, 77, &[1234], &[], Options::default());
    assert_eq!(after, orig);
    assert_eq!(rep.bytes_changed, 0);
    assert_eq!(rep.writes, 0);
}

#[test]
fn dry_run_counts_but_leaves_the_file() {
    let orig = vec![1u8; 20_000];
    let live = vec![2u8; 20_000];
    let opts = Options {
        dry_run: true,
        ..Options::default()
    };
    let (after, rep) = run(&orig, &live, 0, &[], &[], opts);
    assert_eq!(after, orig);
    assert_eq!(rep.bytes_changed, 20_000);
    assert_eq!(rep.writes, 0);
}

#[test]
fn out_of_order_and_out_of_range_segments_are_refused_before_any_write() {
    let orig = vec![0u8; 10_000];
    let f = file_with(&orig);
    let mut s = Syncer::new(vec![spec(&f, 16)], Options::default()).unwrap();
    let new = vec![1u8; 100];
    let bad_order = [mem(0, 5000, &new, 1), mem(0, 4000, &new, 1)];
    assert!(matches!(s.feed(&bad_order), Err(Error::Plan(_))));
    let in_header = [mem(0, 0, &new, 1)];
    assert!(matches!(s.feed(&in_header), Err(Error::Plan(_))));
    let past_end = [mem(0, 9950, &new, 1)];
    assert!(matches!(s.feed(&past_end), Err(Error::Plan(_))));
    let no_shard = [mem(3, 100, &new, 1)];
    assert!(matches!(s.feed(&no_shard), Err(Error::Plan(_))));
    s.finish().unwrap();
    assert_eq!(std::fs::read(f.path()).unwrap(), orig);
}

#[test]
fn a_shard_truncated_during_a_sync_is_an_error_not_a_crash() {
    // A file cut short behind the sync's back (by a tool that ignores the
    // model lock) must come back as an I/O error and the feed must write
    // nothing. Reading the old bytes through a mapping would turn it into
    // SIGBUS, which kills the training process: one reason the diff reads
    // with `pread` (BENCHMARKS.md, sessions 7 and 9).
    let orig = vec![7u8; 3 << 20];
    let f = file_with(&orig);
    for dry_run in [true, false] {
        let opts = Options {
            dry_run,
            ..Options::default()
        };
        let mut s = Syncer::new(vec![spec(&f, 0)], opts).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(f.path())
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let live = vec![8u8; 3 << 20];
        let err = s.feed(&[mem(0, 0, &live, 1)]).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        let _ = s.finish();
        assert_eq!(std::fs::read(f.path()).unwrap(), vec![7u8; 1 << 20]);
        std::fs::write(f.path(), &orig).unwrap();
    }
}

#[test]
fn bad_block_size_and_changed_length_are_refused() {
    let f = file_with(&[0u8; 100]);
    for b in [0usize, 1000, 256, 32 << 20] {
        let opts = Options {
            block_size: b,
            ..Options::default()
        };
        assert!(matches!(
            Syncer::new(vec![spec(&f, 0)], opts),
            Err(Error::Plan(_))
        ));
    }
    let mut wrong = spec(&f, 0);
    wrong.file_len = 99;
    assert!(matches!(
        Syncer::new(vec![wrong], Options::default()),
        Err(Error::Changed { .. })
    ));
}

#[test]
fn large_bodies_span_jobs_and_read_chunks_from_memory_and_files() {
    let len = 9 * (1 << 20) + 12_345;
    let orig: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    let mut live = orig.clone();
    for i in (777..len).step_by(300_007) {
        live[i] ^= 0xff;
    }
    let dir = tempfile::tempdir().unwrap();
    for block in [4096usize, 1 << 16, MAX_BLOCK] {
        for (from_file, journaled) in [(false, false), (true, false), (false, true), (true, true)] {
            let log = journaled.then(|| LogSpec {
                path: dir.path().join(format!("{block}-{from_file}.xlog")),
                generation: 1,
                kind: crate::log::Kind::Sync,
            });
            let opts = Options {
                block_size: block,
                log,
                ..Options::default()
            };
            let (after, rep, undone) =
                run_from(&orig, &live, 100, &[5 << 20], &[], opts, from_file);
            assert_eq!(
                after, live,
                "block {block} from_file {from_file} journal {journaled}"
            );
            if let Some(undone) = undone {
                assert_eq!(undone, orig, "undo, block {block} from_file {from_file}");
            }
            assert_eq!(rep.bytes_changed, changed_block_bytes(&orig, &live, block));
            assert_eq!(
                rep.blocks_changed,
                orig.chunks(block)
                    .zip(live.chunks(block))
                    .filter(|(a, b)| a != b)
                    .count() as u64
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn file_ends_equal_to_live_outside_skipped_segments(
        len in 1usize..40_000,
        data_start_frac in 0.0f64..0.2,
        cut_fracs in proptest::collection::vec(0.0f64..1.0, 0..12),
        flip_fracs in proptest::collection::vec(0.0f64..1.0, 0..10),
        skip in proptest::collection::vec(0usize..13, 0..3),
        block_pow in 9u32..14,
        seed in any::<u8>(),
        from_file in any::<bool>(),
        journaled in any::<bool>(),
        hold_bytes in 1usize..20_000,
        direct_io in any::<bool>(),
    ) {
        let block = 1usize << block_pow;
        let orig: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        let data_start = (len as f64 * data_start_frac) as usize;
        let mut live = orig.clone();
        for f in &flip_fracs {
            let i = data_start + ((len - data_start) as f64 * f) as usize;
            if i < len { live[i] = live[i].wrapping_add(1); }
        }
        let cuts: Vec<usize> = cut_fracs.iter().map(|f| (len as f64 * f) as usize).collect();
        let dir = tempfile::tempdir().unwrap();
        let journaled = journaled && block >= LOG_MIN_BLOCK;
        let log = journaled.then(|| LogSpec { path: dir.path().join("1.xlog"), generation: 1, kind: crate::log::Kind::Sync });
        let opts = Options { block_size: block, log, hold_bytes, direct_io, ..Options::default() };
        let (after, rep, undone) =
            run_from(&orig, &live, data_start, &cuts, &skip, opts, from_file);
        // Expected: live bytes where fed, original bytes in skipped segments.
        let mut bounds = vec![data_start];
        bounds.extend(cuts.iter().copied().filter(|&c| c > data_start && c < len));
        bounds.push(len);
        bounds.sort();
        bounds.dedup();
        let mut expected = orig.clone();
        for (i, w) in bounds.windows(2).enumerate() {
            if !skip.contains(&i) {
                expected[w[0]..w[1]].copy_from_slice(&live[w[0]..w[1]]);
            }
        }
        prop_assert_eq!(&after, &expected);
        prop_assert_eq!(rep.bytes_changed, changed_block_bytes(&orig, &expected, block));
        prop_assert_eq!(rep.bytes_written_direct + rep.bytes_written_buffered, rep.bytes_changed);
        if let Some(undone) = undone {
            // Every changed byte was logged, and recovery undoes the sync.
            prop_assert_eq!(&undone, &orig);
        }
    }
}

/// A block two tensors share (a bf16 one ending mid-block, an f32 one after it,
/// the second cut at an odd element phase by the block boundary) is one
/// record, but its summary is split per tensor, each counted at its width.
#[test]
fn a_block_two_tensors_share_is_counted_per_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (start, a_end, len) = (64usize, 64 + 6002, 64 + 6002 + 4 * 2000);
    let orig: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let mut live = orig.clone();
    // bf16 tensor A: elements 2000 (in block 0) and 2990..2999 (in block 1, shared)
    for e in [2000usize, 2990, 2995, 2999] {
        live[start + 2 * e] ^= 1;
    }
    // f32 tensor B: elements 0, 3 (shared block 1) and 1500 (block 2)
    for e in [0usize, 3, 1500] {
        live[a_end + 4 * e + 2] ^= 0x40;
    }
    let f = file_with(&orig);
    let log_path = dir.path().join("1.xlog");
    let opts = Options {
        log: Some(LogSpec {
            path: log_path,
            generation: 1,
            kind: crate::log::Kind::Sync,
        }),
        ..Options::default()
    };
    let mut syncer = Syncer::new(vec![spec(&f, start as u64)], opts).unwrap();
    let log = syncer.log().unwrap();
    syncer
        .feed(&[
            mem(0, start as u64, &live[start..a_end], 2),
            mem(0, a_end as u64, &live[a_end..], 4),
        ])
        .unwrap();
    syncer.finish().unwrap();
    let mut per: Vec<(u64, u64)> = log
        .summaries()
        .iter()
        .map(|r| (r.offset, r.elements))
        .collect();
    per.sort();
    // Block 0: the header and A's head, one tensor: one summary. Block 1: A's
    // tail and B's head: two. Block 2: B alone, diffed as a job.
    assert_eq!(per, vec![(0, 1), (4096, 3), (a_end as u64, 2), (8192, 1)]);
}

/// One feed that changes every block of 24 MiB, with 1 MiB held per batch: the
/// held bytes never pass the bound by more than one run (the bound is kept
/// inside a feed, not only between feeds), and the file ends equal to live.
#[test]
fn held_bytes_stay_bounded_inside_one_large_feed() {
    let dir = tempfile::tempdir().unwrap();
    let len = 24 << 20;
    let orig: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
    let live: Vec<u8> = orig.iter().map(|b| b ^ 1).collect();
    let f = file_with(&orig);
    let bound = 1 << 20;
    let opts = Options {
        log: Some(LogSpec {
            path: dir.path().join("1.xlog"),
            generation: 1,
            kind: crate::log::Kind::Sync,
        }),
        hold_bytes: bound,
        threads: 4,
        ..Options::default()
    };
    let mut syncer = Syncer::new(vec![spec(&f, 0)], opts).unwrap();
    syncer.feed(&[mem(0, 0, &live, 2)]).unwrap();
    let peak = syncer.peak_held();
    let rep = syncer.finish().unwrap();
    assert_eq!(rep[0].bytes_changed, len as u64);
    assert_eq!(std::fs::read(f.path()).unwrap(), live);
    // A run is at most one read step; each of the 4 workers may add one
    // while another hands a batch over.
    assert!(
        peak >= bound,
        "held {peak} bytes: the bound was never reached"
    );
    assert!(
        peak <= bound + 4 * READ_BYTES,
        "held {peak} bytes with a {bound}-byte bound"
    );
}

#[test]
fn changed_elements_counts_from_the_element_phase() {
    use crate::plan::pending::changed_elements;
    let old = [0u8; 12];
    let mut new = old;
    new[0] = 1; // the tail of an element that began before the piece
    new[5] = 1;
    // f32 elements starting 1 byte before the piece: [-1..3), [3..7), [7..11), [11..12)
    assert_eq!(changed_elements(&old, &new, 4, 1), 2);
    new[3] = 1; // same element as byte 5
    assert_eq!(changed_elements(&old, &new, 4, 1), 2);
    new[11] = 1; // the short last one
    assert_eq!(changed_elements(&old, &new, 4, 1), 3);
    // aligned: [0..4) holds bytes 0 and 3, [4..8) byte 5, [8..12) byte 11
    assert_eq!(changed_elements(&old, &new, 4, 0), 3);
    assert_eq!(changed_elements(&old, &new, 1, 0), 4);
}

#[test]
fn logged_batches_over_several_shards_land_whole_and_undo_whole() {
    logged_batches_over_four_shards(0);
}

#[test]
fn writeback_started_during_the_sync_changes_no_byte() {
    // The writeback thread started every 8 KiB of a shard: the same bytes
    // land, the same records undo them.
    logged_batches_over_four_shards(8 << 10);
}

/// Small batches over four shards fed in turn: each batch's runs go to the
/// writer of their shard while later batches are made durable. Every shard
/// must end equal to its live bytes, and undoing the uncommitted log must
/// give back every original byte (the records match what the writers wrote).
fn logged_batches_over_four_shards(writeback_bytes: usize) {
    let dir = tempfile::tempdir().unwrap();
    let len = 1 << 20;
    let origs: Vec<Vec<u8>> = (0..4)
        .map(|s| (0..len).map(|i| (i * 7 + s * 31) as u8).collect())
        .collect();
    let lives: Vec<Vec<u8>> = origs
        .iter()
        .enumerate()
        .map(|(s, o)| {
            let mut v = o.clone();
            for k in (0..len).step_by(4096 + 6 * s + 2) {
                v[k] ^= 0x5a; // one element in most blocks, two in some
            }
            v
        })
        .collect();
    let files: Vec<_> = origs.iter().map(|o| file_with(o)).collect();
    let log_path = dir.path().join("1.xlog");
    let opts = Options {
        log: Some(LogSpec {
            path: log_path.clone(),
            generation: 1,
            kind: crate::log::Kind::Sync,
        }),
        hold_bytes: 64 << 10,
        threads: 4,
        writeback_bytes,
        ..Options::default()
    };
    let mut syncer = Syncer::new(files.iter().map(|f| spec(f, 0)).collect(), opts).unwrap();
    let timings = syncer.timings();
    for (s, live) in lives.iter().enumerate() {
        for piece in 0..4 {
            let at = piece * len / 4;
            syncer
                .feed(&[mem(s, at as u64, &live[at..at + len / 4], 2)])
                .unwrap();
        }
    }
    let reports = syncer.finish().unwrap();
    // runs of up to a read step each, every shard's ~1 MiB handed over in
    // spans of at least 8 KiB (the last one may stay with its writer)
    let spans = timings.writeback_spans.load(Ordering::Relaxed);
    match writeback_bytes {
        0 => assert_eq!(spans, 0),
        every => assert!(
            (4..=4 * (1 << 20) / every as u64).contains(&spans),
            "{spans} spans"
        ),
    }
    for (s, f) in files.iter().enumerate() {
        assert_eq!(std::fs::read(f.path()).unwrap(), lives[s], "shard {s}");
        let changed = changed_block_bytes(&origs[s], &lives[s], 4096);
        assert_eq!(reports[s].bytes_changed, changed, "shard {s}");
        assert_eq!(reports[s].bytes_written_buffered, changed, "shard {s}");
    }
    let log = crate::log::LogFile::open(&log_path).unwrap();
    let parent = files[0].path().parent().unwrap();
    crate::log::recover(parent, &[&log], 0, false).unwrap();
    for (s, f) in files.iter().enumerate() {
        assert_eq!(
            std::fs::read(f.path()).unwrap(),
            origs[s],
            "shard {s} undone"
        );
    }
}

#[test]
fn the_first_error_of_any_thread_wins_and_stops_the_writes() {
    let stop = AbortHandle::default();
    let errors = FirstError::new(stop.clone());
    for i in 0..4 {
        let e = errors.clone();
        std::thread::spawn(move || e.set(Error::Plan(format!("error {i}"))))
            .join()
            .unwrap();
    }
    assert!(stop.is_aborted(), "an error stops the sync's writes");
    assert!(stop.guard(|| ()).is_none());
    match errors.take() {
        Err(Error::Plan(m)) => assert_eq!(m, "error 0"),
        other => panic!("{other:?}"),
    }
    assert!(errors.take().is_ok(), "handed out once");
}
