//! The undo journal: the old bytes of every run of blocks a sync overwrites,
//! made durable before the first in-place write, so that a crash at any
//! instant can be undone, and kept afterwards as a rollback point.
//!
//! File layout (little endian):
//!
//! ```text
//! 0   magic "APSUNDO1"
//! 8   header length (u32), reserved (u32)
//! 16  slot 0: seq u64, durable length u64, records u64, crc32 u32, pad u32
//! 48  slot 1: the same
//! 80  generation u64, shard count u32, per shard: name length u32 + name,
//!     crc32 u32 of bytes 0..16 and of this body
//! H   records: shard u32, length u32, offset u64, crc32 u32 of those 16
//!     bytes and the old data, then the old data
//! ```
//!
//! A record only counts once a *barrier* has covered it: the records are
//! written and `fdatasync`ed, then the next slot (alternating, with an
//! increasing sequence number) is written with the new durable length and
//! `fdatasync`ed again. In-place writes of a batch start only after its
//! barrier, so bytes past the durable length are a torn tail nobody acted
//! on, while any damage inside it is corruption: reported, never half-applied.
//! The file is created under a temporary name, its header made durable and
//! then renamed, so a journal that exists always has a readable header.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::faults;
use crate::io::{ShardIo, Staging, DIRECT_ALIGN};

const MAGIC: &[u8; 8] = b"APSUNDO1";
const SLOTS: [u64; 2] = [16, 48];
const SLOT_LEN: usize = 32;
const BODY_AT: usize = 80;
const REC_HEAD: usize = 20;
/// Records are buffered and written in pieces of about this size.
const FLUSH_BYTES: usize = 1 << 20;
/// Old bytes read per step while checking or applying a record.
const COPY_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    seq: u64,
    durable_len: u64,
    records: u64,
}

impl Slot {
    fn encode(&self) -> [u8; SLOT_LEN] {
        let mut b = [0u8; SLOT_LEN];
        b[0..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.durable_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.records.to_le_bytes());
        let crc = crc32fast::hash(&b[0..24]);
        b[24..28].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Slot> {
        let crc = u32::from_le_bytes(b[24..28].try_into().ok()?);
        if crc32fast::hash(&b[0..24]) != crc {
            return None;
        }
        Some(Slot {
            seq: u64::from_le_bytes(b[0..8].try_into().ok()?),
            durable_len: u64::from_le_bytes(b[8..16].try_into().ok()?),
            records: u64::from_le_bytes(b[16..24].try_into().ok()?),
        })
    }
}

fn record_crc(shard: u32, len: u32, offset: u64) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new();
    h.update(&shard.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(&offset.to_le_bytes());
    h
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::Journal {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, "fsync directory", e))
}

struct Open {
    file: Arc<File>,
    /// Bytes in the file (records flushed so far).
    written: u64,
    buf: Vec<u8>,
    records: u64,
    bytes: u64,
    durable: Slot,
}

/// An undo journal being written. Created on the first record, so a sync that
/// changes nothing leaves no file.
pub struct UndoLog {
    path: PathBuf,
    generation: u64,
    shards: Vec<String>,
    state: Mutex<Option<Open>>,
}

impl UndoLog {
    /// A journal for `generation` at `path` (created on first use, refusing
    /// to replace an existing file), whose records name `shards` by index.
    pub fn new(path: PathBuf, generation: u64, shards: Vec<String>) -> Self {
        UndoLog {
            path,
            generation,
            shards,
            state: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records appended so far.
    pub fn records(&self) -> u64 {
        self.lock().as_ref().map_or(0, |o| o.records)
    }

    /// Old bytes appended so far.
    pub fn bytes(&self) -> u64 {
        self.lock().as_ref().map_or(0, |o| o.bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Open>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn create(&self) -> Result<Open> {
        let mut body = Vec::new();
        body.extend_from_slice(&self.generation.to_le_bytes());
        body.extend_from_slice(&(self.shards.len() as u32).to_le_bytes());
        for name in &self.shards {
            body.extend_from_slice(&(name.len() as u32).to_le_bytes());
            body.extend_from_slice(name.as_bytes());
        }
        let header_len = BODY_AT + body.len() + 4;
        let mut head = vec![0u8; header_len];
        head[0..8].copy_from_slice(MAGIC);
        head[8..12].copy_from_slice(&(header_len as u32).to_le_bytes());
        let first = Slot {
            seq: 0,
            durable_len: header_len as u64,
            records: 0,
        };
        head[16..16 + SLOT_LEN].copy_from_slice(&first.encode());
        head[BODY_AT..BODY_AT + body.len()].copy_from_slice(&body);
        let mut h = crc32fast::Hasher::new();
        h.update(&head[0..16]);
        h.update(&body);
        head[header_len - 4..].copy_from_slice(&h.finalize().to_le_bytes());

        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, "create journal", e))?;
        file.write_all_at(&head, 0)
            .and_then(|()| file.sync_data())
            .map_err(|e| Error::io(&tmp, "write journal header", e))?;
        if self.path.exists() {
            return Err(Error::Plan(format!(
                "{}: a journal of this generation already exists",
                self.path.display()
            )));
        }
        std::fs::rename(&tmp, &self.path).map_err(|e| Error::io(&self.path, "rename", e))?;
        if let Some(dir) = self.path.parent() {
            fsync_dir(dir)?;
        }
        Ok(Open {
            file: Arc::new(file),
            written: header_len as u64,
            buf: Vec::with_capacity(FLUSH_BYTES + REC_HEAD),
            records: 0,
            bytes: 0,
            durable: first,
        })
    }

    /// Appends the old bytes `old` of `shard` at `offset`. Not durable until
    /// the next [`barrier`](Self::barrier).
    pub fn append(&self, shard: u32, offset: u64, old: &[u8]) -> Result<()> {
        faults::reached("journal").map_err(|e| Error::io(&self.path, "append", e))?;
        let len = u32::try_from(old.len())
            .map_err(|_| Error::Plan(format!("undo record of {} bytes", old.len())))?;
        let mut h = record_crc(shard, len, offset);
        h.update(old);
        let mut guard = self.lock();
        if guard.is_none() {
            *guard = Some(self.create()?);
        }
        let o = guard.as_mut().expect("just created");
        o.buf.extend_from_slice(&shard.to_le_bytes());
        o.buf.extend_from_slice(&len.to_le_bytes());
        o.buf.extend_from_slice(&offset.to_le_bytes());
        o.buf.extend_from_slice(&h.finalize().to_le_bytes());
        o.buf.extend_from_slice(old);
        o.records += 1;
        o.bytes += old.len() as u64;
        if o.buf.len() >= FLUSH_BYTES {
            Self::flush(&self.path, o)?;
        }
        Ok(())
    }

    fn flush(path: &Path, o: &mut Open) -> Result<()> {
        o.file
            .write_all_at(&o.buf, o.written)
            .map_err(|e| Error::io(path, "write journal", e))?;
        // Start writing these pages back now, while the diff goes on, so that
        // the barrier's fdatasync finds little left to do. A hint: errors
        // surface at the fdatasync.
        // SAFETY: a plain syscall on an open descriptor.
        unsafe {
            libc::sync_file_range(
                o.file.as_raw_fd(),
                o.written as libc::off64_t,
                o.buf.len() as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        o.written += o.buf.len() as u64;
        o.buf.clear();
        Ok(())
    }

    /// Makes every appended record durable: records, `fdatasync`, the next
    /// slot, `fdatasync`. Returns false when there was nothing new. Records
    /// may be appended meanwhile (they wait for the next barrier); barriers
    /// themselves must not run concurrently.
    pub fn barrier(&self) -> Result<bool> {
        let (file, next) = {
            let mut guard = self.lock();
            let Some(o) = guard.as_mut() else {
                return Ok(false);
            };
            if o.records == o.durable.records {
                return Ok(false);
            }
            faults::reached("barrier").map_err(|e| Error::io(&self.path, "fsync journal", e))?;
            Self::flush(&self.path, o)?;
            let next = Slot {
                seq: o.durable.seq + 1,
                durable_len: o.written,
                records: o.records,
            };
            (o.file.clone(), next)
        };
        // The fsyncs run without the lock, so appends from the diff go on.
        file.sync_data()
            .map_err(|e| Error::io(&self.path, "fsync journal", e))?;
        file.write_all_at(&next.encode(), SLOTS[(next.seq % 2) as usize])
            .and_then(|()| file.sync_data())
            .map_err(|e| Error::io(&self.path, "commit journal slot", e))?;
        if let Some(o) = self.lock().as_mut() {
            o.durable = next;
        }
        Ok(true)
    }
}

/// One durable record of a journal: where its old bytes go and where they are.
#[derive(Debug, Clone, Copy)]
pub struct UndoRecord {
    pub shard: u32,
    pub offset: u64,
    pub len: u32,
    /// Position of the old bytes in the journal file.
    data_at: u64,
}

/// A journal read back and checked: every durable record's checksum holds.
pub struct UndoJournal {
    path: PathBuf,
    file: File,
    pub generation: u64,
    pub shards: Vec<String>,
    pub records: Vec<UndoRecord>,
    /// Bytes past the durable length (a torn tail, ignored).
    pub torn_tail: u64,
    /// Barriers that made it durable (the commit slot's sequence number).
    pub barriers: u64,
}

impl UndoJournal {
    /// Reads and checks the journal at `path`. Any damage inside the durable
    /// part is an [`Error::Journal`]; nothing is applied from such a journal.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, "open journal", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat journal", e))?
            .len();
        let read = |buf: &mut [u8], at: u64, what: &str| -> Result<()> {
            file.read_exact_at(buf, at)
                .map_err(|e| corrupt(path, format!("cannot read {what} at byte {at}: {e}")))
        };
        let mut fixed = [0u8; BODY_AT];
        read(&mut fixed, 0, "the header")?;
        if &fixed[0..8] != MAGIC {
            return Err(corrupt(path, "not an apollo_sync undo journal (bad magic)"));
        }
        let header_len = u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes")) as usize;
        if header_len < BODY_AT + 16 || header_len as u64 > file_len {
            return Err(corrupt(
                path,
                format!("header length {header_len} out of range"),
            ));
        }
        let mut body = vec![0u8; header_len - BODY_AT];
        read(&mut body, BODY_AT as u64, "the header")?;
        let (body, crc) = body.split_at(body.len() - 4);
        let mut h = crc32fast::Hasher::new();
        h.update(&fixed[0..16]);
        h.update(body);
        if h.finalize() != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(corrupt(path, "header checksum mismatch"));
        }
        let generation = u64::from_le_bytes(body[0..8].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) as usize;
        let mut shards = Vec::with_capacity(count.min(1 << 16));
        let mut at = 12usize;
        for _ in 0..count {
            let n = body
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
                .ok_or_else(|| corrupt(path, "shard list runs past the header"))?;
            let name = body
                .get(at + 4..at + 4 + n)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(|| corrupt(path, "bad shard name in the header"))?;
            shards.push(name.to_owned());
            at += 4 + n;
        }
        let slot = SLOTS
            .iter()
            .filter_map(|&s| Slot::decode(&fixed[s as usize..s as usize + SLOT_LEN]))
            .max_by_key(|s| s.seq)
            .ok_or_else(|| corrupt(path, "no valid commit slot"))?;
        if slot.durable_len < header_len as u64 || slot.durable_len > file_len {
            return Err(corrupt(
                path,
                format!(
                    "durable length {} outside the file (length {file_len}): truncated",
                    slot.durable_len
                ),
            ));
        }
        let mut records = Vec::new();
        let mut pos = header_len as u64;
        let mut data = vec![0u8; COPY_BYTES];
        while pos < slot.durable_len {
            let mut head = [0u8; REC_HEAD];
            if pos + REC_HEAD as u64 > slot.durable_len {
                return Err(corrupt(path, format!("record at byte {pos} is cut short")));
            }
            read(&mut head, pos, "a record")?;
            let shard = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
            let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
            let offset = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
            let crc = u32::from_le_bytes(head[16..20].try_into().expect("4 bytes"));
            let data_at = pos + REC_HEAD as u64;
            if shard as usize >= shards.len() || data_at + len as u64 > slot.durable_len {
                return Err(corrupt(
                    path,
                    format!("record {} at byte {pos} is malformed", records.len()),
                ));
            }
            let mut h = record_crc(shard, len, offset);
            let mut done = 0u64;
            while done < len as u64 {
                let n = (len as u64 - done).min(COPY_BYTES as u64) as usize;
                read(&mut data[..n], data_at + done, "record data")?;
                h.update(&data[..n]);
                done += n as u64;
            }
            if h.finalize() != crc {
                return Err(corrupt(
                    path,
                    format!("record {} at byte {pos}: checksum mismatch", records.len()),
                ));
            }
            records.push(UndoRecord {
                shard,
                offset,
                len,
                data_at,
            });
            pos = data_at + len as u64;
        }
        if records.len() as u64 != slot.records {
            return Err(corrupt(
                path,
                format!(
                    "{} records found where the commit slot says {}",
                    records.len(),
                    slot.records
                ),
            ));
        }
        Ok(UndoJournal {
            path: path.to_path_buf(),
            file,
            generation,
            shards,
            records,
            torn_tail: file_len - slot.durable_len,
            barriers: slot.seq,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Old bytes held by the durable records.
    pub fn bytes(&self) -> u64 {
        self.records.iter().map(|r| r.len as u64).sum()
    }

    fn read_data(&self, rec: &UndoRecord, buf: &mut Vec<u8>) -> Result<()> {
        buf.resize(rec.len as usize, 0);
        self.file
            .read_exact_at(buf, rec.data_at)
            .map_err(|e| Error::io(&self.path, "read journal", e))
    }
}

/// What applying journals did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UndoReport {
    pub records: u64,
    pub bytes: u64,
    /// Names of the shards written.
    pub files: Vec<String>,
}

/// The shards of a model directory, opened for restoring, by name.
struct Shards {
    dir: PathBuf,
    open: HashMap<String, ShardIo>,
}

impl Shards {
    /// Opens every shard the journals name and checks that every record lies
    /// inside its file, before anything is written.
    fn open(dir: &Path, journals: &[&UndoJournal]) -> Result<Self> {
        let mut open: HashMap<String, ShardIo> = HashMap::new();
        for j in journals {
            for r in &j.records {
                let name = &j.shards[r.shard as usize];
                if !open.contains_key(name) {
                    if name.contains('/') || name == ".." || name == "." {
                        return Err(corrupt(
                            j.path(),
                            format!("shard name {name:?} is not a file name"),
                        ));
                    }
                    let path = dir.join(name);
                    let len = std::fs::metadata(&path)
                        .map_err(|e| Error::io(&path, "stat", e))?
                        .len();
                    // Through the page cache, as a sync writes: the same disk
                    // bytes, and the next sync finds the model still cached.
                    open.insert(
                        name.clone(),
                        ShardIo::open(&path, len, false, DIRECT_ALIGN)?,
                    );
                }
                let io = &open[name];
                if r.offset + r.len as u64 > io.len() {
                    return Err(Error::Changed {
                        path: io.path().to_path_buf(),
                        reason: format!(
                            "journal {} restores bytes {}..{} past the end of the file ({})",
                            j.path().display(),
                            r.offset,
                            r.offset + r.len as u64,
                            io.len()
                        ),
                    });
                }
            }
        }
        Ok(Shards {
            dir: dir.to_path_buf(),
            open,
        })
    }

    /// Writes each journal's old bytes back, newest record first.
    fn restore(&self, journals: &[&UndoJournal], report: &mut UndoReport) -> Result<()> {
        let mut staging = Staging::default();
        let mut buf = Vec::new();
        for j in journals {
            for r in j.records.iter().rev() {
                faults::reached("undo").map_err(|e| Error::io(&self.dir, "restore", e))?;
                j.read_data(r, &mut buf)?;
                self.open[&j.shards[r.shard as usize]].write_at(&buf, r.offset, &mut staging)?;
                report.records += 1;
                report.bytes += r.len as u64;
            }
        }
        Ok(())
    }

    fn sync(&self, report: &mut UndoReport) -> Result<()> {
        let mut names: Vec<&String> = self.open.keys().collect();
        names.sort();
        for name in names {
            let io = &self.open[name];
            if io.written() {
                faults::reached("fsync").map_err(|e| Error::io(io.path(), "fsync", e))?;
                io.sync()?;
                report.files.push(name.clone());
            }
        }
        Ok(())
    }
}

/// Restores the bytes `journal` saved into the shards of `dir` (an
/// interrupted sync, rolled back to its last committed generation), then
/// makes them durable. Applying the same journal twice gives the same bytes,
/// so a crash here is recovered by running it again.
pub fn undo(journal: &UndoJournal, dir: &Path) -> Result<UndoReport> {
    let shards = Shards::open(dir, &[journal])?;
    let mut report = UndoReport::default();
    shards.restore(&[journal], &mut report)?;
    shards.sync(&mut report)?;
    Ok(report)
}

/// Applies `journals` (newest first) to `dir` as one journaled step: the
/// current bytes of every range they touch go to `log` first (made durable),
/// then each journal is undone in turn. Afterwards `dir` is what it was
/// before the oldest journal's sync; `log` undoes the whole step.
pub fn rollback(journals: &[&UndoJournal], dir: &Path, log: &UndoLog) -> Result<UndoReport> {
    let shards = Shards::open(dir, journals)?;
    let index: HashMap<&str, u32> = log
        .shards
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32))
        .collect();
    let mut buf = Vec::new();
    for j in journals {
        for r in &j.records {
            let name = &j.shards[r.shard as usize];
            let at = *index.get(name.as_str()).ok_or_else(|| {
                Error::Plan(format!("rollback journal does not list shard {name}"))
            })?;
            buf.resize(r.len as usize, 0);
            shards.open[name].read_at(&mut buf, r.offset)?;
            log.append(at, r.offset, &buf)?;
        }
    }
    log.barrier()?;
    let mut report = UndoReport::default();
    shards.restore(journals, &mut report)?;
    shards.sync(&mut report)?;
    Ok(report)
}

/// The shard names a rollback over `journals` touches, sorted: the shard list
/// of its own journal.
pub fn shard_names(journals: &[&UndoJournal]) -> Vec<String> {
    let mut names: Vec<String> = journals
        .iter()
        .flat_map(|j| j.records.iter().map(|r| j.shards[r.shard as usize].clone()))
        .collect();
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::{JournalSpec, Options, Segment, ShardSpec, Syncer};

    /// A directory holding one shard `m.safetensors` (no header: data from 0).
    fn shard(dir: &Path, bytes: &[u8]) -> PathBuf {
        let p = dir.join("m.safetensors");
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Syncs `live` into the shard with a journal for `generation`; returns
    /// the journal's path.
    fn sync_gen(shard: &Path, live: &[u8], generation: u64, hold_bytes: usize) -> PathBuf {
        let path = shard.with_file_name(format!("{generation}.undo"));
        let opts = Options {
            journal: Some(JournalSpec {
                path: path.clone(),
                generation,
            }),
            hold_bytes,
            ..Options::default()
        };
        let spec = ShardSpec {
            path: shard.to_path_buf(),
            data_start: 0,
            file_len: live.len() as u64,
        };
        let mut s = Syncer::new(vec![spec], opts).unwrap();
        let half = live.len() / 2;
        s.feed(&[Segment::mem(0, 0, &live[..half])]).unwrap();
        s.feed(&[Segment::mem(0, half as u64, &live[half..])])
            .unwrap();
        s.finish().unwrap();
        path
    }

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
            .collect()
    }

    fn changed(orig: &[u8], at: &[usize]) -> Vec<u8> {
        let mut v = orig.to_vec();
        for &i in at {
            v[i] ^= 0x5a;
        }
        v
    }

    #[test]
    fn a_sync_that_changes_nothing_leaves_no_journal() {
        let dir = tempfile::tempdir().unwrap();
        let a = bytes(1 << 16, 1);
        let p = shard(dir.path(), &a);
        let j = sync_gen(&p, &a, 1, HOLD);
        assert!(!j.exists());
        assert!(!dir.path().join("1.undo.tmp").exists());
    }

    const HOLD: usize = 128 << 20;

    #[test]
    fn undo_restores_and_is_idempotent_with_many_barriers() {
        let dir = tempfile::tempdir().unwrap();
        let a = bytes(1 << 20, 1);
        let b = changed(&a, &[0, 5000, 70_000, 70_001, 500_000, (1 << 20) - 1]);
        let p = shard(dir.path(), &a);
        // A hold of one block forces a barrier per feed: both slots are used.
        let j = sync_gen(&p, &b, 1, 4096);
        assert_eq!(std::fs::read(&p).unwrap(), b);
        let journal = UndoJournal::open(&j).unwrap();
        assert_eq!(journal.generation, 1);
        assert_eq!(journal.shards, vec!["m.safetensors".to_string()]);
        // Blocks 0 and 1 merge into one run; 70_000 and 70_001 share a block.
        assert_eq!(journal.records.len(), 4);
        assert_eq!(journal.torn_tail, 0);
        let r = undo(&journal, dir.path()).unwrap();
        assert_eq!(r.bytes, 5 * 4096);
        assert_eq!(std::fs::read(&p).unwrap(), a);
        undo(&journal, dir.path()).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), a);
    }

    #[test]
    fn a_torn_tail_is_ignored_and_damage_inside_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = bytes(1 << 18, 2);
        let p = shard(dir.path(), &a);
        let j = sync_gen(&p, &changed(&a, &[10, 200_000]), 1, HOLD);
        let clean = std::fs::read(&j).unwrap();

        // Bytes appended after the last barrier: a record nobody acted on.
        let mut torn = clean.clone();
        torn.extend_from_slice(&[7u8; 100]);
        std::fs::write(&j, &torn).unwrap();
        let journal = UndoJournal::open(&j).unwrap();
        assert_eq!((journal.torn_tail, journal.records.len()), (100, 2));

        // Any flipped byte in the durable part (header, slots, records) is
        // reported; nothing is applied.
        for at in [0, 9, 20, 90, clean.len() - 4100, clean.len() - 1] {
            let mut bad = clean.clone();
            bad[at] ^= 1;
            std::fs::write(&j, &bad).unwrap();
            match UndoJournal::open(&j) {
                Err(Error::Journal { .. }) => {}
                Err(e) => panic!("byte {at}: unexpected error {e}"),
                Ok(_) if (16..48).contains(&at) => {} // the older, unused slot
                Ok(_) => panic!("byte {at}: damage not detected"),
            }
        }
        // Truncated inside the durable part.
        std::fs::write(&j, &clean[..clean.len() - 1]).unwrap();
        assert!(matches!(UndoJournal::open(&j), Err(Error::Journal { .. })));
    }

    #[test]
    fn rollback_over_generations_is_itself_undoable() {
        let dir = tempfile::tempdir().unwrap();
        let a = bytes(1 << 18, 3);
        let b = changed(&a, &[1, 9000, 100_000]);
        let c = changed(&b, &[9001, 150_000, 262_000]);
        let p = shard(dir.path(), &a);
        let j1 = sync_gen(&p, &b, 1, HOLD);
        let j2 = sync_gen(&p, &c, 2, HOLD);
        assert_eq!(std::fs::read(&p).unwrap(), c);
        let (u1, u2) = (
            UndoJournal::open(&j1).unwrap(),
            UndoJournal::open(&j2).unwrap(),
        );
        let journals = [&u2, &u1];
        let log = UndoLog::new(dir.path().join("3.undo"), 3, shard_names(&journals));
        rollback(&journals, dir.path(), &log).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), a);
        // Undoing the rollback returns to where it started.
        let u3 = UndoJournal::open(&dir.path().join("3.undo")).unwrap();
        undo(&u3, dir.path()).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), c);
        // Rolling back one generation only.
        let log = UndoLog::new(dir.path().join("4.undo"), 4, shard_names(&[&u2]));
        rollback(&[&u2], dir.path(), &log).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b);
    }

    #[test]
    fn a_record_past_the_end_of_a_shard_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let a = bytes(1 << 16, 4);
        let p = shard(dir.path(), &a);
        let j = sync_gen(&p, &changed(&a, &[10, 65_000]), 1, HOLD);
        let journal = UndoJournal::open(&j).unwrap();
        let now = std::fs::read(&p).unwrap();
        std::fs::write(&p, &now[..60_000]).unwrap();
        assert!(matches!(
            undo(&journal, dir.path()),
            Err(Error::Changed { .. })
        ));
        assert_eq!(std::fs::read(&p).unwrap(), &now[..60_000]);
    }
}
