//! Applying logs to the shards: recovery (bring every unit touched after the
//! checkpoint to the last committed generation) and rollback (walk the
//! deltas of committed generations back, as a new logged generation).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::chain::{identify, Found};
use super::format::{self, DeltaHead, ShardBinding, UNIT};
use super::reader::{LogFile, RecordIndex};
use super::writer::{bind, DeltaLog, RecordParts};
use crate::delta::Codec;
use crate::error::{Error, Result};
use crate::faults;
use crate::io::{ShardIo, Staging, DIRECT_ALIGN};

/// Bytes a rollback holds in memory before a barrier lets them be written
/// (more in one batch when a single record is larger).
const HOLD_BYTES: usize = 128 << 20;

/// What recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoverReport {
    /// Units the logs touch (each checked).
    pub units: u64,
    /// Units rewritten.
    pub units_written: u64,
    /// Units that held a mix of states, sector by sector.
    pub torn: u64,
    pub bytes_written: u64,
    /// Shards made durable.
    pub files: Vec<String>,
    /// `(shard, offset)` of units that matched no state of their chain: left
    /// as they are.
    pub undecided: Vec<(String, u64)>,
}

/// What a rollback wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub records: u64,
    pub bytes: u64,
    pub files: Vec<String>,
}

/// The shards of a model directory, opened by name, each checked against the
/// binding the logs recorded (a shard replaced by another tool is refused).
struct Shards {
    dir: PathBuf,
    open: BTreeMap<String, ShardIo>,
}

impl Shards {
    fn open(dir: &Path, logs: &[&LogFile]) -> Result<Shards> {
        let mut open = BTreeMap::new();
        for log in logs {
            let used: std::collections::BTreeSet<u32> =
                log.records.iter().map(|r| r.head.shard).collect();
            for i in used {
                let b = &log.shards()[i as usize];
                let path = dir.join(&b.name);
                let now = bind(&path, b.data_start)?;
                if now.file_len != b.file_len || now.header_hash != b.header_hash {
                    return Err(Error::Changed {
                        path,
                        reason: format!(
                            "it is not the file generation {}'s records were made for \
                             (replaced or rewritten by another tool)",
                            log.generation()
                        ),
                    });
                }
                if !open.contains_key(&b.name) {
                    // Through the page cache, as a sync writes.
                    let io = ShardIo::open(&path, now.file_len, false, DIRECT_ALIGN)?;
                    open.insert(b.name.clone(), io);
                }
            }
        }
        Ok(Shards {
            dir: dir.to_path_buf(),
            open,
        })
    }

    fn io(&self, name: &str) -> &ShardIo {
        &self.open[name]
    }

    fn write(&self, name: &str, data: &[u8], at: u64, staging: &mut Staging) -> Result<()> {
        faults::reached("apply").map_err(|e| Error::io(&self.dir, "apply", e))?;
        self.open[name].write_at(data, at, staging)
    }

    /// `fdatasync` of the shards written (or of every shard, `all`).
    fn sync(&self, all: bool) -> Result<Vec<String>> {
        let mut files = Vec::new();
        for (name, io) in &self.open {
            if all || io.written() {
                faults::reached("fsync").map_err(|e| Error::io(io.path(), "fsync", e))?;
                io.sync_always()?;
                files.push(name.clone());
            }
        }
        Ok(files)
    }
}

/// One record of one log, decoded once while the sweep needs it.
struct Decoded {
    xor: Vec<u8>,
    hashes: Vec<u64>,
}

/// Brings every unit the records of `logs` touch to the state after the
/// last record of `logs[..committed]` (the last committed generation),
/// rolling the records of `logs[committed..]` (uncommitted) back, whatever
/// state of that chain each unit holds, sector by sector; then makes the
/// shards durable. `logs` are in generation order; those from the checkpoint
/// on. With `force`, every unit is rewritten even where it already holds its
/// target (after a failed writeback, whose pages Linux may have marked
/// clean). Running it again after a crash gives the same result.
pub fn recover(
    dir: &Path,
    logs: &[&LogFile],
    committed: usize,
    force: bool,
) -> Result<RecoverReport> {
    let shards = Shards::open(dir, logs)?;
    let mut report = RecoverReport::default();
    let mut codec = Codec::new();
    let mut scratch = Vec::new();
    let mut staging = Staging::default();
    // Per shard: (unit, log, record) for every unit of every record, in chain order.
    let mut touches: BTreeMap<&str, Vec<(u64, u32, u32)>> = BTreeMap::new();
    for (li, log) in logs.iter().enumerate() {
        for (ri, r) in log.records.iter().enumerate() {
            let name = log.shards()[r.head.shard as usize].name.as_str();
            let t = touches.entry(name).or_default();
            let first = r.head.offset / UNIT as u64;
            t.extend((0..r.head.units as u64).map(|u| (first + u, li as u32, ri as u32)));
        }
    }
    for (name, mut t) in touches {
        t.sort_unstable();
        let io = shards.io(name);
        let mut cache: HashMap<(u32, u32), Decoded> = HashMap::new();
        let mut unit = vec![0u8; UNIT];
        let mut last = vec![0u8; UNIT];
        let mut i = 0;
        while i < t.len() {
            let u = t[i].0;
            let j = i + t[i..].iter().take_while(|x| x.0 == u).count();
            let at = u * UNIT as u64;
            cache.retain(|&(li, ri), _| logs[li as usize].records[ri as usize].end() > at);
            let len = (io.len() - at).min(UNIT as u64) as usize;
            for &(_, li, ri) in &t[i..j] {
                if let std::collections::hash_map::Entry::Vacant(e) = cache.entry((li, ri)) {
                    let log = logs[li as usize];
                    let r = &log.records[ri as usize];
                    let mut hashes = Vec::new();
                    log.unit_hashes(r, &mut hashes)?;
                    let xor = log.decode(r, &mut codec, &mut scratch)?;
                    e.insert(Decoded { xor, hashes });
                }
            }
            let slice = |li: u32, ri: u32| -> (&[u8], u64) {
                let r = &logs[li as usize].records[ri as usize];
                let d = &cache[&(li, ri)];
                let k = (at - r.head.offset) as usize;
                (&d.xor[k..k + len], d.hashes[k / UNIT])
            };
            let deltas: Vec<&[u8]> = t[i..j].iter().map(|&(_, li, ri)| slice(li, ri).0).collect();
            let (_, last_hash) = slice(t[j - 1].1, t[j - 1].2);
            let cur = &mut unit[..len];
            io.read_at(cur, at)?;
            report.units += 1;
            match identify(cur, &deltas, last_hash, &mut last[..len]) {
                Found::Undecided => {
                    report.undecided.push((name.to_owned(), at));
                }
                found => {
                    report.torn += (found == Found::Torn) as u64;
                    // Roll the uncommitted records back off the last state.
                    let target = &mut last[..len];
                    for (&(_, li, _), d) in t[i..j].iter().zip(&deltas) {
                        if li as usize >= committed {
                            for (x, y) in target.iter_mut().zip(d.iter()) {
                                *x ^= y;
                            }
                        }
                    }
                    if force || target != cur {
                        shards.write(name, target, at, &mut staging)?;
                        report.units_written += 1;
                        report.bytes_written += len as u64;
                    }
                }
            }
            i = j;
        }
    }
    report.files = shards.sync(true)?;
    Ok(report)
}

/// Undoes the generations of `logs` (newest first, each committed, with no
/// gap) on `dir`, as the new generation `out` logs: every record is checked
/// and every unit they touch is checked to hold what the newest of them left
/// before the first write; then the deltas are applied newest first, each
/// logged (the same payload, with the hashes of what it leaves) and made
/// durable before its in-place write. The shards are made durable at the end.
pub fn rollback(dir: &Path, logs: &[&LogFile], out: &DeltaLog) -> Result<ApplyReport> {
    let shards = Shards::open(dir, logs)?;
    let index: HashMap<&str, u32> = out
        .shards()
        .iter()
        .enumerate()
        .map(|(i, b)| (b.name.as_str(), i as u32))
        .collect();
    // Which record is the newest to touch each unit: it alone says what the
    // unit holds now. `owns[log][record][k]`: the record's unit `k` is its.
    let mut seen: HashMap<&str, Vec<bool>> = HashMap::new();
    let mut owns: Vec<Vec<Vec<bool>>> = Vec::with_capacity(logs.len());
    for log in logs {
        if !log.is_committed() {
            return Err(Error::Plan(format!(
                "{}: generation {} is not committed",
                log.path().display(),
                log.generation()
            )));
        }
        let mut mine = vec![Vec::new(); log.records.len()];
        for (ri, r) in log.records.iter().enumerate().rev() {
            let name = name_of(log, r);
            if !index.contains_key(name) {
                return Err(Error::Plan(format!(
                    "the rollback's log does not list {name}"
                )));
            }
            let io = shards.io(name);
            let bits = seen
                .entry(name)
                .or_insert_with(|| vec![false; io.len().div_ceil(UNIT as u64) as usize]);
            let first = (r.head.offset / UNIT as u64) as usize;
            mine[ri] = (0..r.head.units as usize)
                .map(|k| !std::mem::replace(&mut bits[first + k], true))
                .collect();
        }
        owns.push(mine);
    }
    drop(seen);
    // Check, on every core: every record decodes; every unit holds what the
    // newest record touching it left.
    let all: Vec<(usize, usize)> = logs
        .iter()
        .enumerate()
        .flat_map(|(li, l)| (0..l.records.len()).map(move |ri| (li, ri)))
        .collect();
    all.par_iter().try_for_each_init(
        || (Codec::new(), Vec::new(), Vec::new(), Vec::new()),
        |(codec, scratch, hashes, bytes), &(li, ri)| -> Result<()> {
            let log = logs[li];
            let r = &log.records[ri];
            log.decode(r, codec, scratch)?;
            let own = &owns[li][ri];
            if !own.contains(&true) {
                return Ok(());
            }
            log.unit_hashes(r, hashes)?;
            let io = shards.io(name_of(log, r));
            bytes.resize(r.head.len as usize, 0);
            io.read_at(bytes, r.head.offset)?;
            for (k, h) in hashes.iter().enumerate().filter(|&(k, _)| own[k]) {
                let at = r.head.offset + (k * UNIT) as u64;
                let len = (io.len() - at).min(UNIT as u64) as usize;
                let rel = k * UNIT;
                let unit: std::borrow::Cow<'_, [u8]> = if rel + len <= bytes.len() {
                    std::borrow::Cow::Borrowed(&bytes[rel..rel + len])
                } else {
                    let mut u = vec![0u8; len];
                    io.read_at(&mut u, at)?;
                    std::borrow::Cow::Owned(u)
                };
                if format::hash(&unit) != *h {
                    return Err(Error::Changed {
                        path: io.path().to_path_buf(),
                        reason: format!(
                            "bytes {at}..{} are not what generation {} left (changed outside \
                             apollo-sync?); nothing was rolled back",
                            at + len as u64,
                            log.generation()
                        ),
                    });
                }
            }
            Ok(())
        },
    )?;
    drop(owns);
    // Apply, newest first, in batches of records that do not overlap (a
    // rollback's own log may hold several generations' records for one
    // unit) and hold at most HOLD_BYTES: each batch computed on every core,
    // logged, made durable by a barrier, then written.
    let mut report = ApplyReport::default();
    let order: Vec<(usize, usize)> = logs
        .iter()
        .enumerate()
        .flat_map(|(li, l)| (0..l.records.len()).rev().map(move |ri| (li, ri)))
        .collect();
    let mut at = 0;
    while at < order.len() {
        let mut taken: BTreeMap<(&str, u64), u64> = BTreeMap::new();
        let mut bytes = 0usize;
        let mut end = at;
        while end < order.len() && (end == at || bytes < HOLD_BYTES) {
            let (li, ri) = order[end];
            let r = &logs[li].records[ri];
            let name = name_of(logs[li], r);
            let (start, stop) = (r.head.offset, r.end());
            let before = taken.range(..(name, stop)).next_back();
            if before.is_some_and(|(&(n, _), &e)| n == name && e > start) {
                break; // overlaps a record of this batch: it waits for the next
            }
            taken.insert((name, start), stop);
            bytes += r.head.len as usize;
            end += 1;
        }
        let done: Vec<Applied> = order[at..end]
            .par_iter()
            .map_init(Codec::new, |codec, &(li, ri)| {
                let log = logs[li];
                let r = &log.records[ri];
                let name = name_of(log, r);
                let mut bytes = vec![0u8; r.head.len as usize];
                shards.io(name).read_at(&mut bytes, r.head.offset)?;
                let old_hash = format::hash(&bytes);
                let mut payload = Vec::new();
                log.payload(r, &mut payload)?;
                codec
                    .apply(&payload, r.head.width as usize, &mut bytes)
                    .map_err(|e| Error::Log {
                        path: log.path().to_path_buf(),
                        reason: e.to_string(),
                    })?;
                let mut hashes = Vec::new();
                format::unit_hashes(&bytes, &mut hashes);
                Ok(Applied {
                    name,
                    head: DeltaHead {
                        shard: index[name],
                        old_hash,
                        ..r.head
                    },
                    hashes,
                    payload,
                    bytes,
                })
            })
            .collect::<Result<_>>()?;
        for a in &done {
            out.append(RecordParts {
                head: a.head,
                unit_hashes: &a.hashes,
                payload: &a.payload,
            })?;
            report.records += 1;
            report.bytes += a.head.len;
        }
        out.barrier()?;
        done.par_iter()
            .try_for_each_init(Staging::default, |staging, a| {
                shards.write(a.name, &a.bytes, a.head.offset, staging)
            })?;
        at = end;
    }
    report.files = shards.sync(false)?;
    Ok(report)
}

/// The name of the shard record `r` of `log` was made for.
fn name_of<'l>(log: &'l LogFile, r: &RecordIndex) -> &'l str {
    log.shards()[r.head.shard as usize].name.as_str()
}

/// One record of a rollback, applied in memory: what goes to its log and to
/// the shard.
struct Applied<'a> {
    name: &'a str,
    head: DeltaHead,
    hashes: Vec<u64>,
    payload: Vec<u8>,
    bytes: Vec<u8>,
}

/// The bindings of the shards `logs` name, as the files are now (for a
/// rollback's own log).
pub fn current_bindings(dir: &Path, logs: &[&LogFile]) -> Result<Vec<ShardBinding>> {
    let mut used: BTreeMap<&str, u64> = BTreeMap::new();
    for l in logs {
        for r in &l.records {
            let b = &l.shards()[r.head.shard as usize];
            used.insert(b.name.as_str(), b.data_start);
        }
    }
    used.iter()
        .map(|(n, &start)| bind(&dir.join(n), start))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::testing::{bytes, step, sync_logged};
    use crate::log::{Kind, LogSpec};

    /// A shard of `n` bytes whose first 64 bytes stand for its header.
    fn shard(dir: &Path, bytes: &[u8]) -> PathBuf {
        let p = dir.join("m.safetensors");
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Syncs `live` into the shard as logged generation `generation`;
    /// commits it unless `commit` is false. Returns the log's path.
    fn sync_gen(p: &Path, live: &[u8], generation: u64, commit: bool) -> PathBuf {
        let path = p.with_file_name(format!("{generation}.xlog"));
        let log = sync_logged(p, path.clone(), live, generation);
        if commit {
            log.commit(br#"{"test": true}"#).unwrap();
        }
        path
    }

    fn open(p: &Path) -> LogFile {
        LogFile::open(p).unwrap()
    }

    #[test]
    fn a_committed_log_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let a = bytes(300_000, 1);
        let b = step(&a, 1);
        let p = shard(dir.path(), &a);
        let l = open(&sync_gen(&p, &b, 1, true));
        assert_eq!(std::fs::read(&p).unwrap(), b);
        assert!(l.is_committed());
        assert_eq!(l.commit.as_ref().unwrap().meta, r#"{"test": true}"#);
        assert_eq!(l.generation(), 1);
        assert_eq!(l.torn_tail, 0);
        let changed = a.chunks(2).zip(b.chunks(2)).filter(|(x, y)| x != y).count() as u64;
        assert_eq!(l.elements(), changed);
        // Records cover exactly the changed 4 KiB units.
        let covered: u64 = l.records.iter().map(|r| r.head.len).sum();
        let units = a.chunks(UNIT).zip(b.chunks(UNIT)).filter(|(x, y)| x != y);
        assert_eq!(covered, units.map(|(x, _)| x.len() as u64).sum::<u64>());
    }

    #[test]
    fn a_torn_tail_is_ignored_and_damage_inside_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = bytes(200_000, 2);
        let p = shard(dir.path(), &a);
        let path = sync_gen(&p, &step(&a, 2), 1, true);
        let clean = std::fs::read(&path).unwrap();
        let mut torn = clean.clone();
        torn.extend_from_slice(&[7u8; 100]);
        std::fs::write(&path, &torn).unwrap();
        let l = open(&path);
        assert!(l.is_committed());
        assert_eq!(l.torn_tail, 100);
        // A flipped byte anywhere (header, a record, the commit) is reported,
        // or (in the commit) makes the generation uncommitted.
        let commit_at = clean.len() - (FRAME_AND_COMMIT + 14);
        for at in [
            0,
            20,
            60,
            clean.len() / 3,
            clean.len() / 2,
            commit_at,
            clean.len() - 1,
        ] {
            let mut bad = clean.clone();
            bad[at] ^= 1;
            std::fs::write(&path, &bad).unwrap();
            match LogFile::open(&path) {
                Err(Error::Log { .. }) => {}
                Err(e) => panic!("byte {at}: unexpected error {e}"),
                Ok(l) if at >= commit_at => assert!(!l.is_committed(), "byte {at}"),
                Ok(_) => panic!("byte {at}: damage not detected"),
            }
        }
        std::fs::write(&path, &clean[..clean.len() - 1]).unwrap();
        assert!(!open(&path).is_committed());
    }

    #[test]
    fn records_of_another_epoch_end_the_log_even_when_whole() {
        // Space reused from an older log (a retried generation, a log file
        // written over) holds whole records with valid checksums, down to a
        // commit; their epoch is not this log's, so none of them counts.
        let dir = tempfile::tempdir().unwrap();
        let a = bytes(200_000, 4);
        let p = shard(dir.path(), &a);
        let mut b = a.clone();
        for unit in [2, 10, 20, 30, 40] {
            b[unit * UNIT + 100] ^= 1; // units apart: a record each
        }
        let path = sync_gen(&p, &b, 1, true);
        let log = open(&path);
        assert!(log.is_committed() && log.records.len() == 5);
        let mut raw = std::fs::read(&path).unwrap();
        let keep = 2; // records of this log left before the reused space
        let mut at = log.records[keep].hashes_at as usize - format::FRAME - format::DELTA_HEAD;
        let cut = at;
        let stale = log.header.epoch ^ 0x5a5a_5a5a_5a5a_5a5a;
        while at + format::FRAME <= raw.len() {
            // Every frame from here on: re-stamped with the other epoch, its
            // checksum made valid again.
            let body_len = u32::from_le_bytes(raw[at + 4..at + 8].try_into().unwrap()) as usize;
            let end = at + format::FRAME + body_len;
            raw[at + 8..at + 16].copy_from_slice(&stale.to_le_bytes());
            let sum = format::checksum(&raw[at..at + 16], &[&raw[at + format::FRAME..end]]);
            raw[at + 16..at + 24].copy_from_slice(&sum.to_le_bytes());
            at = end;
        }
        assert_eq!(at, raw.len(), "walked every frame");
        std::fs::write(&path, &raw).unwrap();
        let l = open(&path);
        assert!(
            !l.is_committed(),
            "a commit of another epoch committed this log"
        );
        assert_eq!(l.records.len(), keep);
        assert_eq!(l.torn_tail, (raw.len() - cut) as u64);
    }

    #[test]
    fn records_past_a_torn_piece_without_a_barrier_after_them_are_a_torn_tail() {
        // Pieces of the log reach the disk in any order before a barrier: a later
        // record can survive a power cut that lost an earlier one. Nothing acted
        // on either, so this is a torn tail, not damage.
        let dir = tempfile::tempdir().unwrap();
        let a = bytes(100_000, 8);
        let p = shard(dir.path(), &a);
        let path = sync_gen(&p, &step(&a, 8), 1, false);
        let log = open(&path);
        let r = log.records[0];
        let (start, end) = (
            r.hashes_at as usize - super::format::FRAME - super::format::DELTA_HEAD,
            (r.payload_at + r.head.payload_len as u64) as usize,
        );
        let mut raw = std::fs::read(&path).unwrap();
        let valid = raw[start..end].to_vec();
        raw.extend_from_slice(&[0u8; 100]); // the lost piece
        raw.extend_from_slice(&valid); // a later piece that made it
        std::fs::write(&path, &raw).unwrap();
        let l = open(&path);
        assert_eq!(l.records.len(), log.records.len());
        assert_eq!(l.torn_tail, 100 + valid.len() as u64);
    }

    #[test]
    fn a_lost_piece_is_damage_only_where_a_later_barrier_counts_it() {
        // Before a barrier, a power cut may keep a later piece of the log and lose
        // an earlier one; only a barrier counting the lost record (written after
        // it was durable) or a commit makes the loss damage.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.xlog");
        let binding = ShardBinding {
            name: "m.safetensors".into(),
            file_len: 1 << 20,
            data_start: 0,
            header_hash: 0,
        };
        let log = DeltaLog::new(
            LogSpec {
                path: path.clone(),
                generation: 1,
                kind: Kind::Sync,
            },
            vec![binding],
        );
        let mut enc = crate::log::Encoder::new();
        let (old, new) = (vec![0u8; 4096], vec![1u8; 4096]);
        let mut add = |at: u64| log.append_delta(&mut enc, 0, at, 2, &old, &new).unwrap();
        add(0);
        log.barrier().unwrap(); // B1 (counts 1) waits in the buffer
        add(4096);
        add(8192);
        log.barrier().unwrap(); // writes B1, r2, r3; B2 (counts 3) waits
        let full = std::fs::read(&path).unwrap();
        let r = open(&path).records;
        let r2 = r[1].hashes_at as usize - super::format::FRAME - super::format::DELTA_HEAD;
        let mut lost = full.clone();
        lost[r2..r2 + 200].fill(0); // r2's piece lost, r3's kept
        std::fs::write(&path, &lost).unwrap();
        let l = open(&path);
        assert_eq!(l.records.len(), 1, "B1 counts r1 only: a torn tail");
        add(12288);
        log.barrier().unwrap(); // now B2, which counts r2, reaches the file
        let mut damaged = std::fs::read(&path).unwrap();
        damaged[r2..r2 + 200].fill(0);
        std::fs::write(&path, &damaged).unwrap();
        assert!(matches!(LogFile::open(&path), Err(Error::Log { .. })));
    }

    const FRAME_AND_COMMIT: usize = super::format::FRAME + super::format::COMMIT_HEAD;

    #[test]
    fn recovery_rolls_a_committed_generation_forward_when_its_writes_were_lost() {
        let dir = tempfile::tempdir().unwrap();
        let a = bytes(150_000, 3);
        let b = step(&a, 3);
        let p = shard(dir.path(), &a);
        let l = open(&sync_gen(&p, &b, 1, true));
        std::fs::write(&p, &a).unwrap(); // the in-place writes never reached the disk
        let r = recover(dir.path(), &[&l], 1, false).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b);
        assert!(r.units_written > 0 && r.undecided.is_empty());
        // Again: nothing left to write.
        let r = recover(dir.path(), &[&l], 1, false).unwrap();
        assert_eq!((r.units_written, std::fs::read(&p).unwrap()), (0, b));
    }

    #[test]
    fn recovery_finds_torn_units_across_a_chain_and_rolls_uncommitted_work_back() {
        let dir = tempfile::tempdir().unwrap();
        let s0 = bytes(100_000, 4);
        let s1 = step(&s0, 1);
        let s2 = step(&s1, 2);
        let s3 = step(&s2, 3);
        let p = shard(dir.path(), &s0);
        let l1 = open(&sync_gen(&p, &s1, 1, true));
        let l2 = open(&sync_gen(&p, &s2, 2, true));
        let l3 = open(&sync_gen(&p, &s3, 3, false));
        assert!(!l3.is_committed());
        // Each 512-byte sector holds any of the four states.
        let states = [&s0, &s1, &s2, &s3];
        let mut torn = s3.clone();
        for (j, sector) in torn.chunks_mut(512).enumerate() {
            let st = states[(j * 7 + j / 8) % 4];
            sector.copy_from_slice(&st[j * 512..j * 512 + sector.len()]);
        }
        std::fs::write(&p, &torn).unwrap();
        let r = recover(dir.path(), &[&l1, &l2, &l3], 2, false).unwrap();
        assert!(r.undecided.is_empty(), "{:?}", r.undecided);
        assert!(r.torn > 0);
        assert_eq!(std::fs::read(&p).unwrap(), s2);
    }

    #[test]
    fn a_unit_that_matches_no_state_is_reported_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let a = bytes(50_000, 5);
        let b = step(&a, 5);
        let p = shard(dir.path(), &a);
        let l = open(&sync_gen(&p, &b, 1, true));
        let mut odd = b.clone();
        odd[10_000] ^= 0xff;
        std::fs::write(&p, &odd).unwrap();
        let r = recover(dir.path(), &[&l], 1, false).unwrap();
        assert_eq!(r.undecided, vec![("m.safetensors".to_string(), 8192)]);
        assert_eq!(std::fs::read(&p).unwrap(), odd);
    }

    #[test]
    fn rollback_over_generations_is_logged_and_itself_undoable() {
        let dir = tempfile::tempdir().unwrap();
        let s0 = bytes(120_000, 6);
        let s1 = step(&s0, 1);
        let s2 = step(&s1, 2);
        let p = shard(dir.path(), &s0);
        let l1 = open(&sync_gen(&p, &s1, 1, true));
        let l2 = open(&sync_gen(&p, &s2, 2, true));
        let logs = [&l2, &l1];
        let out = DeltaLog::new(
            LogSpec {
                path: dir.path().join("3.xlog"),
                generation: 3,
                kind: Kind::Rollback,
            },
            current_bindings(dir.path(), &logs).unwrap(),
        );
        rollback(dir.path(), &logs, &out).unwrap();
        out.commit(b"{}").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), s0);
        // The rollback is a generation like any other: roll it back.
        let l3 = open(&dir.path().join("3.xlog"));
        let out = DeltaLog::new(
            LogSpec {
                path: dir.path().join("4.xlog"),
                generation: 4,
                kind: Kind::Rollback,
            },
            current_bindings(dir.path(), &[&l3]).unwrap(),
        );
        rollback(dir.path(), &[&l3], &out).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), s2);
        // And recovery of an interrupted rollback (4, uncommitted) takes it back.
        let l4 = open(&dir.path().join("4.xlog"));
        recover(dir.path(), &[&l1, &l2, &l3, &l4], 3, false).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), s0);
    }

    #[test]
    fn rollback_refuses_a_changed_unit_or_a_replaced_shard_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let s0 = bytes(60_000, 7);
        let s1 = step(&s0, 1);
        let p = shard(dir.path(), &s0);
        let l1 = open(&sync_gen(&p, &s1, 1, true));
        let out = |n: u64| {
            DeltaLog::new(
                LogSpec {
                    path: dir.path().join(format!("{n}.xlog")),
                    generation: n,
                    kind: Kind::Rollback,
                },
                current_bindings(dir.path(), &[&l1]).unwrap(),
            )
        };
        let mut odd = s1.clone();
        odd[40_000] ^= 1;
        std::fs::write(&p, &odd).unwrap();
        assert!(matches!(
            rollback(dir.path(), &[&l1], &out(2)),
            Err(Error::Changed { .. })
        ));
        assert_eq!(std::fs::read(&p).unwrap(), odd);
        let mut replaced = s1.clone();
        replaced[3] ^= 1; // inside the "header"
        std::fs::write(&p, &replaced).unwrap();
        assert!(matches!(
            rollback(dir.path(), &[&l1], &out(3)),
            Err(Error::Changed { .. })
        ));
        assert_eq!(std::fs::read(&p).unwrap(), replaced);
    }
}
