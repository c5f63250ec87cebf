//! Writing a generation's log: delta records appended from the diff workers,
//! barriers that make them durable before the in-place writes they cover,
//! and the commit record.
//!
//! The file is created on the first record (a sync that changes nothing
//! leaves none), under its final name: its header goes out with the first
//! records, and nothing is written in place before the barrier that makes
//! both durable (with the directory entry). A log whose header cannot be
//! read therefore covers no in-place byte.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::format::Xxh3;
use super::format::{
    self, CommitHead, DeltaHead, FileHeader, Kind, ShardBinding, CODEC_DELTA, TYPE_BARRIER,
    TYPE_COMMIT, TYPE_DELTA, UNIT,
};
use crate::delta::Codec;
use crate::error::{Error, Result};
use crate::faults;

/// Records are buffered and written in pieces of about this size.
const FLUSH_BYTES: usize = 1 << 20;

/// Where a generation's log goes and what it is.
#[derive(Debug, Clone)]
pub struct LogSpec {
    pub path: PathBuf,
    pub generation: u64,
    pub kind: Kind,
}

/// One record as the caller will want to see it (which tensors it touched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordSummary {
    pub shard: u32,
    pub offset: u64,
    pub len: u64,
    pub elements: u64,
}

/// What a committed log holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogStats {
    pub records: u64,
    /// Bytes of the log file.
    pub bytes: u64,
    pub elements: u64,
    /// Bytes covered by its records.
    pub covered: u64,
}

/// A delta record ready to append: every field but the frame.
pub struct RecordParts<'a> {
    pub head: DeltaHead,
    pub unit_hashes: &'a [u64],
    pub payload: &'a [u8],
}

struct Open {
    file: Arc<File>,
    written: u64,
    buf: Vec<u8>,
    records: u64,
    records_hash: Xxh3,
    durable_records: u64,
    dir_synced: bool,
    summaries: Vec<RecordSummary>,
    elements: u64,
    covered: u64,
}

/// A generation's log being written. Appends may come from any thread.
pub struct DeltaLog {
    spec: LogSpec,
    header: FileHeader,
    state: Mutex<Option<Open>>,
    committed: Mutex<Option<LogStats>>,
}

/// Per-thread scratch for encoding records.
#[derive(Default)]
pub struct Encoder {
    codec: Codec,
    payload: Vec<u8>,
    hashes: Vec<u64>,
}

impl Encoder {
    pub fn new() -> Self {
        Encoder::default()
    }
}

impl DeltaLog {
    /// A log for `spec` whose records name `shards` by index. Nothing is
    /// written until the first record.
    pub fn new(spec: LogSpec, shards: Vec<ShardBinding>) -> Self {
        let header = FileHeader {
            epoch: random_epoch(),
            generation: spec.generation,
            kind: spec.kind,
            shards,
        };
        DeltaLog {
            spec,
            header,
            state: Mutex::new(None),
            committed: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.spec.path
    }

    pub fn shards(&self) -> &[ShardBinding] {
        &self.header.shards
    }

    pub fn generation(&self) -> u64 {
        self.header.generation
    }

    pub fn kind(&self) -> Kind {
        self.header.kind
    }

    fn lock(&self) -> MutexGuard<'_, Option<Open>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Each record appended so far, in file order.
    pub fn summaries(&self) -> Vec<RecordSummary> {
        self.lock()
            .as_ref()
            .map_or_else(Vec::new, |o| o.summaries.clone())
    }

    /// Replaces the summary of the record at `offset` of shard `shard` by
    /// `pieces` (the tensors that share its block, each counted at its own
    /// element width), so that per-tensor counts need no guess at a block two
    /// tensors share. The record and the log's totals are unchanged.
    pub fn split_summary(&self, shard: u32, offset: u64, pieces: &[RecordSummary]) {
        let mut guard = self.lock();
        let Some(o) = guard.as_mut() else { return };
        if let Some(i) = o
            .summaries
            .iter()
            .rposition(|r| r.shard == shard && r.offset == offset)
        {
            o.summaries.splice(i..=i, pieces.iter().copied());
        }
    }

    /// Encodes the delta from `old` to `new` (the run at `offset` of shard
    /// `shard`, elements of `width` bytes) and appends it. Encoding runs on
    /// the caller's thread; only the append takes the lock. Returns the
    /// number of elements that changed.
    pub fn append_delta(
        &self,
        enc: &mut Encoder,
        shard: u32,
        offset: u64,
        width: usize,
        old: &[u8],
        new: &[u8],
    ) -> Result<u64> {
        debug_assert_eq!(offset % UNIT as u64, 0, "records start on a unit");
        enc.payload.clear();
        enc.hashes.clear();
        let elements = enc
            .codec
            .encode(old, new, width, &mut enc.payload)
            .map_err(|e| Error::Plan(format!("cannot encode a delta: {e}")))?;
        format::unit_hashes(new, &mut enc.hashes);
        let head = DeltaHead {
            shard,
            width: width as u8,
            codec: CODEC_DELTA,
            offset,
            len: old.len() as u64,
            elements,
            old_hash: format::hash(old),
            payload_len: u32::try_from(enc.payload.len())
                .map_err(|_| Error::Plan("a delta payload over 4 GiB".into()))?,
            units: enc.hashes.len() as u32,
        };
        self.append(RecordParts {
            head,
            unit_hashes: &enc.hashes,
            payload: &enc.payload,
        })?;
        Ok(elements)
    }

    /// Appends a record whose parts are already made (a rollback reuses the
    /// payloads of the generations it undoes). Not durable until the next
    /// [`barrier`](Self::barrier).
    pub fn append(&self, r: RecordParts<'_>) -> Result<()> {
        faults::reached("log").map_err(|e| Error::io(self.path(), "append", e))?;
        let head = r.head.encode();
        let hashes: Vec<u8> = r.unit_hashes.iter().flat_map(|h| h.to_le_bytes()).collect();
        let (frame, sum) =
            format::frame(TYPE_DELTA, self.header.epoch, &[&head, &hashes, r.payload]);
        let mut guard = self.lock();
        let o = self.open(&mut guard)?;
        o.buf.extend_from_slice(&frame);
        o.buf.extend_from_slice(&head);
        o.buf.extend_from_slice(&hashes);
        o.buf.extend_from_slice(r.payload);
        o.records += 1;
        o.records_hash.update(&sum.to_le_bytes());
        o.elements += r.head.elements;
        o.covered += r.head.len;
        o.summaries.push(RecordSummary {
            shard: r.head.shard,
            offset: r.head.offset,
            len: r.head.len,
            elements: r.head.elements,
        });
        if o.buf.len() >= FLUSH_BYTES {
            flush(self.path(), o)?;
        }
        Ok(())
    }

    fn open<'g>(&self, guard: &'g mut MutexGuard<'_, Option<Open>>) -> Result<&'g mut Open> {
        if guard.is_none() {
            let path = self.path();
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => Error::Plan(format!(
                        "{}: a log of this generation already exists",
                        path.display()
                    )),
                    _ => Error::io(path, "create log", e),
                })?;
            let mut buf = Vec::with_capacity(FLUSH_BYTES + (1 << 16));
            buf.extend_from_slice(&self.header.encode());
            **guard = Some(Open {
                file: Arc::new(file),
                written: 0,
                buf,
                records: 0,
                records_hash: Xxh3::new(),
                durable_records: 0,
                dir_synced: false,
                summaries: Vec::new(),
                elements: 0,
                covered: 0,
            });
        }
        Ok(guard.as_mut().expect("just opened"))
    }

    /// Makes every appended record durable (write, `fdatasync`; the first
    /// time also the directory entry). Returns false when there was nothing
    /// new. Records appended meanwhile wait for the next barrier; barriers
    /// must not run concurrently.
    pub fn barrier(&self) -> Result<bool> {
        let (file, records, dir) = {
            let mut guard = self.lock();
            let Some(o) = guard.as_mut() else {
                return Ok(false);
            };
            if o.records == o.durable_records {
                return Ok(false);
            }
            faults::reached("barrier").map_err(|e| Error::io(self.path(), "fsync log", e))?;
            flush(self.path(), o)?;
            (o.file.clone(), o.records, !o.dir_synced)
        };
        // The fsync runs without the lock, so appends from the diff go on.
        file.sync_data()
            .map_err(|e| Error::io(self.path(), "fsync log", e))?;
        if dir {
            if let Some(d) = self.path().parent() {
                fsync_dir(d)?;
            }
        }
        if let Some(o) = self.lock().as_mut() {
            o.durable_records = o.durable_records.max(records);
            o.dir_synced = true;
            // A barrier record, only now that its records are durable: it goes
            // out with the next write, so one found on disk proves that the
            // records before it (its count) were durable before it was written,
            // and damage to any of them is damage, not a torn tail.
            let body = records.to_le_bytes();
            let (frame, _) = format::frame(TYPE_BARRIER, self.header.epoch, &[&body]);
            o.buf.extend_from_slice(&frame);
            o.buf.extend_from_slice(&body);
        }
        Ok(true)
    }

    /// Commits the generation: the commit record (the record count, a hash of
    /// the records, `meta`) after the last record, made durable with them. A
    /// log that holds no record cannot be committed.
    pub fn commit(&self, meta: &[u8]) -> Result<LogStats> {
        if let Some(s) = *self.committed.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(s);
        }
        // Records first, on their own: a commit on disk then proves them durable
        // (a power cut may keep a later piece of a write and lose an earlier one).
        self.barrier()?;
        let (file, stats, dir) = {
            let mut guard = self.lock();
            let Some(o) = guard.as_mut() else {
                return Err(Error::Plan(format!(
                    "{}: nothing to commit (no record was logged)",
                    self.path().display()
                )));
            };
            let head = CommitHead {
                generation: self.header.generation,
                records: o.records,
                records_hash: o.records_hash.digest(),
                meta_len: u32::try_from(meta.len())
                    .map_err(|_| Error::Plan("commit metadata over 4 GiB".into()))?,
            }
            .encode();
            let (frame, _) = format::frame(TYPE_COMMIT, self.header.epoch, &[&head, meta]);
            faults::reached("commit").map_err(|e| Error::io(self.path(), "commit", e))?;
            o.buf.extend_from_slice(&frame);
            o.buf.extend_from_slice(&head);
            o.buf.extend_from_slice(meta);
            flush(self.path(), o)?;
            let stats = LogStats {
                records: o.records,
                bytes: o.written,
                elements: o.elements,
                covered: o.covered,
            };
            (o.file.clone(), stats, !o.dir_synced)
        };
        file.sync_data()
            .map_err(|e| Error::io(self.path(), "fsync log", e))?;
        if dir {
            if let Some(d) = self.path().parent() {
                fsync_dir(d)?;
            }
        }
        *self.committed.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
        Ok(stats)
    }
}

fn flush(path: &Path, o: &mut Open) -> Result<()> {
    if o.buf.is_empty() {
        return Ok(());
    }
    o.file
        .write_all_at(&o.buf, o.written)
        .map_err(|e| Error::io(path, "write log", e))?;
    // Start writing these pages back now, while the diff goes on, so that the
    // barrier's fdatasync finds little left to do. A hint: errors surface at
    // the fdatasync.
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

pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, "fsync directory", e))
}

/// A fresh random epoch, so that bytes of an earlier file left in reused
/// space never read as this file's records.
fn random_epoch() -> u64 {
    let mut b = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u64::from_le_bytes(b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format::hash(&[t.to_le_bytes(), (std::process::id() as u64).to_le_bytes()].concat())
}

/// How the log binds a shard: its name, length, data start and the hash of
/// its safetensors header (bytes `0..data_start`).
pub fn bind(path: &Path, data_start: u64) -> Result<ShardBinding> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Plan(format!("{}: not a UTF-8 file name", path.display())))?;
    let f = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, "stat", e))?.len();
    let mut head = vec![0u8; data_start.min(file_len) as usize];
    f.read_exact_at(&mut head, 0)
        .map_err(|e| Error::io(path, "read", e))?;
    Ok(ShardBinding {
        name: name.to_owned(),
        file_len,
        data_start,
        header_hash: format::hash(&head),
    })
}
