//! The diff kernel: which blocks of a live buffer differ from the disk copy.
//!
//! Pure and allocation-free (the caller owns the output vector), so it can be
//! benchmarked against `memcmp` and property-tested on its own.

use std::ops::Range;

/// Appends to `runs` the changed blocks of `live` against `disk`, merged into
/// maximal runs of adjacent changed blocks.
///
/// Block boundaries fall at multiples of `block` from the start of the slices
/// (the caller passes slices that start on a block boundary of the file); the
/// last block may be short. A run that would continue the last run already in
/// `runs` (it starts where that one ends) extends it, so a caller can feed a
/// region in pieces and still get merged runs.
///
/// # Panics
/// If the slices differ in length or `block` is zero.
pub fn changed_runs(live: &[u8], disk: &[u8], block: usize, runs: &mut Vec<Range<usize>>) {
    changed_runs_at(0, live, disk, block, runs)
}

/// As [`changed_runs`], with the runs expressed relative to `base` (the
/// position of `live[0]` in the caller's coordinates).
pub fn changed_runs_at(
    base: usize,
    live: &[u8],
    disk: &[u8],
    block: usize,
    runs: &mut Vec<Range<usize>>,
) {
    assert_eq!(
        live.len(),
        disk.len(),
        "live and disk slices differ in length"
    );
    assert!(block > 0, "block size must be positive");
    // Most spans are unchanged: one memcmp over a whole span costs less than a
    // call per block, and only a span that differs is looked at block by block.
    let span = block * (SPAN_BYTES / block).max(1);
    let mut pos = base;
    for (ls, ds) in live.chunks(span).zip(disk.chunks(span)) {
        if ls == ds {
            pos += ls.len();
            continue;
        }
        for (l, d) in ls.chunks(block).zip(ds.chunks(block)) {
            let end = pos + l.len();
            if l != d {
                match runs.last_mut() {
                    Some(last) if last.end == pos => last.end = end,
                    _ => runs.push(pos..end),
                }
            }
            pos = end;
        }
    }
}

/// Bytes compared with one call before single blocks are looked at.
const SPAN_BYTES: usize = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Obvious reference: mark each block, then merge.
    fn reference(live: &[u8], disk: &[u8], block: usize) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        let mut i = 0;
        while i < live.len() {
            let e = (i + block).min(live.len());
            if live[i..e] != disk[i..e] {
                if let Some(last) = out.last_mut().filter(|r| r.end == i) {
                    last.end = e;
                } else {
                    out.push(i..e);
                }
            }
            i = e;
        }
        out
    }

    #[test]
    fn identical_buffers_have_no_runs() {
        let a = vec![7u8; 10_000];
        let mut runs = Vec::new();
        changed_runs(&a, &a, 4096, &mut runs);
        assert!(runs.is_empty());
    }

    #[test]
    fn adjacent_blocks_merge_and_short_tail_counts() {
        let a = vec![0u8; 4096 * 3 + 100];
        let mut b = a.clone();
        b[10] = 1; // block 0
        b[4096 + 5] = 1; // block 1
        b[4096 * 3 + 99] = 1; // short tail block
        let mut runs = Vec::new();
        changed_runs(&b, &a, 4096, &mut runs);
        assert_eq!(runs, vec![0..8192, 12288..12388]);
    }

    #[test]
    fn pieces_fed_in_order_merge_across_the_seam() {
        let a = vec![0u8; 8192];
        let mut b = a.clone();
        b[4095] = 9;
        b[4096] = 9;
        let mut runs = Vec::new();
        changed_runs_at(0, &b[..4096], &a[..4096], 4096, &mut runs);
        changed_runs_at(4096, &b[4096..], &a[4096..], 4096, &mut runs);
        assert_eq!(runs, vec![0..8192]);
    }

    proptest! {
        #[test]
        fn matches_reference(
            disk in proptest::collection::vec(any::<u8>(), 0..20_000),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..12),
            block_pow in 0u32..13,
        ) {
            let block = 1usize << block_pow;
            let mut live = disk.clone();
            if !live.is_empty() {
                for (idx, x) in &flips {
                    let i = idx.index(live.len());
                    live[i] ^= x;
                }
            }
            let mut runs = Vec::new();
            changed_runs(&live, &disk, block, &mut runs);
            prop_assert_eq!(&runs, &reference(&live, &disk, block));
            // Every changed byte lies in a run; every run is block-aligned.
            for (i, (l, d)) in live.iter().zip(&disk).enumerate() {
                if l != d {
                    prop_assert!(runs.iter().any(|r| r.contains(&i)));
                }
            }
            for r in &runs {
                prop_assert_eq!(r.start % block, 0);
                prop_assert!(r.end % block == 0 || r.end == live.len());
            }
        }
    }
}
