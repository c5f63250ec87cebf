//! Which state of its chain a 4 KiB unit holds.
//!
//! A unit touched by records r1..rk (oldest first) has been in k + 1 states:
//! s0 before r1, and s_i after r_i. The log keeps, for every record, the
//! unit's delta D_i = s_(i-1) XOR s_i and the hash of s_i. Whatever state the
//! unit holds, XORing it with the deltas after that state gives s_k, whose
//! hash is known: so the state is the t whose suffix D_(t+1) .. D_k turns
//! the unit's bytes into bytes that hash to H_k.
//!
//! After a power cut a unit may be torn: each 512-byte sector holds its own
//! state (a 512e drive, writeback of a large folio cut short). A page is
//! written back by one write at a time, so a unit torn by the write in flight
//! at the cut holds two states: the one the last whole write left and the
//! one being written, any two of the chain. Those are tried first: for each
//! pair of states, every split of the sectors where they differ (at most 2^8
//! for a 4 KiB unit). Only a device that kept parts of several unflushed
//! writes can leave more; then the search runs sector by sector: for each
//! sector, the distinct suffixes it may take, every combination tried until
//! one hashes to H_k. Sectors a delta leaves alone have a single candidate,
//! so that search is small for short chains; past [`MAX_COMBINATIONS`] (a
//! unit touched by four or more records, every sector each time) the unit is
//! reported undecided.

use super::format::{hash, SECTOR};

/// Combinations of sector states tried before a unit is called undecided.
pub const MAX_COMBINATIONS: u64 = 1 << 16;

/// Hashes tried by the two-state search before it gives up (about a second
/// for one unit: a chain of some 180 records, every sector changed each time).
pub const MAX_PAIR_TRIES: u64 = 1 << 22;

/// How a unit's state was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// The whole unit holds state t (0 = before the first record).
    Whole(usize),
    /// Sectors hold different states.
    Torn,
    /// No combination of the chain's states hashes right (or too many to try).
    Undecided,
}

/// Finds the state of `current` in the chain `deltas` (oldest first, each
/// the unit's length) whose last state hashes to `last_hash`, and writes that
/// last state into `last`.
pub fn identify(current: &[u8], deltas: &[&[u8]], last_hash: u64, last: &mut [u8]) -> Found {
    let n = current.len();
    debug_assert!(deltas.iter().all(|d| d.len() == n) && last.len() == n);
    // suffix[t] = D_(t+1) ^ .. ^ D_k: what turns state t into state k.
    let k = deltas.len();
    let mut suffix = vec![vec![0u8; n]; k + 1];
    for t in (0..k).rev() {
        let (lo, hi) = suffix.split_at_mut(t + 1);
        for ((s, next), d) in lo[t].iter_mut().zip(&hi[0]).zip(deltas[t]) {
            *s = next ^ d;
        }
    }
    // Whole states first, newest first: after a clean stop the unit is whole.
    for t in (0..=k).rev() {
        xor_into(last, current, &suffix[t]);
        if hash(last) == last_hash {
            return Found::Whole(t);
        }
    }
    // Torn: per sector, the distinct suffixes it may hold.
    let sectors: Vec<(usize, usize)> = (0..n)
        .step_by(SECTOR)
        .map(|a| (a, (a + SECTOR).min(n)))
        .collect();
    let mut choices: Vec<Vec<usize>> = Vec::with_capacity(sectors.len());
    let mut combos = 1u64;
    for &(a, b) in &sectors {
        let mut seen: Vec<usize> = Vec::new();
        for t in 0..=k {
            if !seen.iter().any(|&u| suffix[u][a..b] == suffix[t][a..b]) {
                seen.push(t);
            }
        }
        combos = combos.saturating_mul(seen.len() as u64);
        choices.push(seen);
    }
    if combos <= 1 {
        return Found::Undecided; // every sector has one candidate: tried above
    }
    if torn_between_two(current, &suffix, &sectors, last_hash, last) {
        return Found::Torn;
    }
    if combos > MAX_COMBINATIONS {
        return Found::Undecided;
    }
    let mut pick = vec![0usize; sectors.len()];
    for (j, &(a, b)) in sectors.iter().enumerate() {
        xor_into(
            &mut last[a..b],
            &current[a..b],
            &suffix[choices[j][0]][a..b],
        );
    }
    loop {
        if hash(last) == last_hash {
            return Found::Torn;
        }
        // Next combination (odometer); rewrite only the sectors that moved.
        let mut j = 0;
        loop {
            if j == sectors.len() {
                return Found::Undecided;
            }
            pick[j] += 1;
            let wrapped = pick[j] == choices[j].len();
            if wrapped {
                pick[j] = 0;
            }
            let (a, b) = sectors[j];
            xor_into(
                &mut last[a..b],
                &current[a..b],
                &suffix[choices[j][pick[j]]][a..b],
            );
            if !wrapped {
                break;
            }
            j += 1;
        }
    }
}

/// Whether `current` is two states of the chain, sector by sector: for each
/// pair (t, u), every split of the sectors where their suffixes differ. On
/// success `last` holds state k.
fn torn_between_two(
    current: &[u8],
    suffix: &[Vec<u8>],
    sectors: &[(usize, usize)],
    last_hash: u64,
    last: &mut [u8],
) -> bool {
    let mut tries = 0u64;
    for t in 0..suffix.len() {
        for u in t + 1..suffix.len() {
            let differ: Vec<usize> = (0..sectors.len())
                .filter(|&j| {
                    let (a, b) = sectors[j];
                    suffix[t][a..b] != suffix[u][a..b]
                })
                .collect();
            if differ.len() < 2 || differ.len() > 16 {
                continue; // whole states are tried already; wider units are not 4 KiB
            }
            tries += 1 << differ.len();
            if tries > MAX_PAIR_TRIES {
                return false;
            }
            xor_into(last, current, &suffix[t]);
            // Gray code: each step moves one sector between the two states.
            let mut on = vec![false; differ.len()];
            for step in 1u32..(1 << differ.len()) {
                let j = step.trailing_zeros() as usize;
                on[j] = !on[j];
                let (a, b) = sectors[differ[j]];
                let from = if on[j] { &suffix[u] } else { &suffix[t] };
                xor_into(&mut last[a..b], &current[a..b], &from[a..b]);
                if hash(last) == last_hash {
                    return true;
                }
            }
        }
    }
    false
}

fn xor_into(out: &mut [u8], a: &[u8], b: &[u8]) {
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = x ^ y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn xor(a: &[u8], b: &[u8]) -> Vec<u8> {
        a.iter().zip(b).map(|(x, y)| x ^ y).collect()
    }

    /// States s0..sk of a unit of `n` bytes, each changing `touch` sectors.
    fn states(n: usize, k: usize, seed: u8) -> Vec<Vec<u8>> {
        let mut s = vec![(0..n)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect::<Vec<u8>>()];
        for g in 0..k {
            let mut next = s[g].clone();
            for (i, b) in next.iter_mut().enumerate() {
                if (i * 31 + g * 17) % 97 < 3 {
                    *b = b.wrapping_add(1 + g as u8);
                }
            }
            s.push(next);
        }
        s
    }

    #[test]
    fn every_whole_state_is_found() {
        let s = states(4096, 3, 1);
        let deltas: Vec<Vec<u8>> = s.windows(2).map(|w| xor(&w[0], &w[1])).collect();
        let refs: Vec<&[u8]> = deltas.iter().map(|d| d.as_slice()).collect();
        let mut last = vec![0u8; 4096];
        for (t, st) in s.iter().enumerate() {
            assert_eq!(identify(st, &refs, hash(&s[3]), &mut last), Found::Whole(t));
            assert_eq!(last, s[3]);
        }
        let mut junk = s[1].clone();
        junk[5] ^= 0xff;
        assert_eq!(
            identify(&junk, &refs, hash(&s[3]), &mut last),
            Found::Undecided
        );
    }

    #[test]
    fn a_short_last_unit_works() {
        let s = states(1000, 1, 2);
        let d = xor(&s[0], &s[1]);
        let mut last = vec![0u8; 1000];
        assert_eq!(
            identify(&s[0], &[&d], hash(&s[1]), &mut last),
            Found::Whole(0)
        );
        assert_eq!(last, s[1]);
    }

    #[test]
    fn a_unit_torn_between_two_states_of_a_long_chain_is_recovered() {
        // Eight records each changing every sector: 9^8 combinations, past
        // MAX_COMBINATIONS, but a tear between any two states is found.
        let k = 8;
        let mut s = vec![(0..4096).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>()];
        for g in 0..k {
            let mut next = s[g].clone();
            for j in 0..8 {
                next[j * 512 + g] ^= 0x40; // every sector, every generation
            }
            s.push(next);
        }
        let deltas: Vec<Vec<u8>> = s.windows(2).map(|w| xor(&w[0], &w[1])).collect();
        let refs: Vec<&[u8]> = deltas.iter().map(|d| d.as_slice()).collect();
        let mut last = vec![0u8; 4096];
        for (t, u, mask) in [
            (0, 8, 0b1010_0110u32),
            (2, 5, 0b0000_0001),
            (6, 7, 0b0111_1110),
        ] {
            let mut torn = s[t].clone();
            for j in (0..8).filter(|j| mask >> j & 1 == 1) {
                torn[j * 512..(j + 1) * 512].copy_from_slice(&s[u][j * 512..(j + 1) * 512]);
            }
            assert_eq!(identify(&torn, &refs, hash(&s[k]), &mut last), Found::Torn);
            assert_eq!(last, s[k]);
        }
        // Three states in one unit, past the cap: undecided, not guessed.
        let mut three = s[0].clone();
        three[512..1024].copy_from_slice(&s[4][512..1024]);
        three[1024..1536].copy_from_slice(&s[8][1024..1536]);
        assert_eq!(
            identify(&three, &refs, hash(&s[k]), &mut last),
            Found::Undecided
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Each sector of the unit independently in any of the chain's
        /// states: the last state is always recovered.
        #[test]
        fn torn_units_are_recovered(k in 1usize..3, pick in proptest::collection::vec(0usize..3, 8), seed in any::<u8>()) {
            let s = states(4096, k, seed);
            let deltas: Vec<Vec<u8>> = s.windows(2).map(|w| xor(&w[0], &w[1])).collect();
            let refs: Vec<&[u8]> = deltas.iter().map(|d| d.as_slice()).collect();
            let mut torn = vec![0u8; 4096];
            for (j, p) in pick.iter().enumerate() {
                let t = p % (k + 1);
                torn[j * 512..(j + 1) * 512].copy_from_slice(&s[t][j * 512..(j + 1) * 512]);
            }
            let mut last = vec![0u8; 4096];
            let found = identify(&torn, &refs, hash(&s[k]), &mut last);
            prop_assert!(found != Found::Undecided);
            prop_assert_eq!(&last, &s[k]);
        }
    }
}
