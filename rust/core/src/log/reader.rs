//! Reading a log back, trusting nothing: the header, every record's
//! checksum and epoch, and the commit's count and hash are checked.
//!
//! Records are read in order until the first that does not check out. What
//! follows it is a torn tail (written after the last barrier, so nothing
//! acted on it) unless a valid barrier or commit record of this file lies
//! further on: then the log is damaged inside, and it is refused whole.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{
    self, CommitHead, DeltaHead, FileHeader, Frame, Kind, ShardBinding, COMMIT_HEAD, DELTA_HEAD,
    FRAME, TYPE_BARRIER, TYPE_COMMIT, TYPE_DELTA,
};
use crate::delta::Codec;
use crate::error::{Error, Result};

/// Body bytes read per step while checking a record.
const READ_BYTES: usize = 1 << 20;

/// A delta record of a log, located in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordIndex {
    pub head: DeltaHead,
    /// The frame checksum (what the commit's records hash covers).
    pub checksum: u64,
    pub(crate) hashes_at: u64,
    pub(crate) payload_at: u64,
}

impl RecordIndex {
    pub fn end(&self) -> u64 {
        self.head.offset + self.head.len
    }
}

/// A log's commit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub records_hash: u64,
    /// The committer's metadata (JSON text).
    pub meta: String,
}

/// A log read back and checked.
pub struct LogFile {
    path: PathBuf,
    file: File,
    pub header: FileHeader,
    pub records: Vec<RecordIndex>,
    /// Present when the generation is committed (the commit record and the
    /// records before it check out).
    pub commit: Option<Commit>,
    /// Bytes after the last valid record (a tail torn by a crash).
    pub torn_tail: u64,
    /// Length of the file.
    pub len: u64,
}

fn damaged(path: &Path, reason: impl Into<String>) -> Error {
    Error::Log {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl LogFile {
    /// Reads and checks the log at `path`. Damage anywhere but a torn tail
    /// is an [`Error::Log`], and nothing is applied from such a log.
    pub fn open(path: &Path) -> Result<LogFile> {
        let file = File::open(path).map_err(|e| Error::io(path, "open log", e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat log", e))?
            .len();
        let mut fixed = [0u8; 16];
        file.read_exact_at(&mut fixed, 0)
            .map_err(|_| damaged(path, "shorter than a log header"))?;
        let header_len = FileHeader::declared_len(&fixed).map_err(|r| damaged(path, r))? as u64;
        if header_len > len {
            return Err(damaged(path, "header cut short"));
        }
        let mut hb = vec![0u8; header_len as usize];
        file.read_exact_at(&mut hb, 0)
            .map_err(|e| Error::io(path, "read log", e))?;
        let header = FileHeader::decode(&hb).map_err(|r| damaged(path, r))?;
        let mut log = LogFile {
            path: path.to_path_buf(),
            file,
            header,
            records: Vec::new(),
            commit: None,
            torn_tail: 0,
            len,
        };
        let stop = log.scan(header_len)?;
        log.torn_tail = len - stop;
        if stop < len {
            if let Some(at) = log.find_proof_after(stop, log.records.len() as u64)? {
                return Err(damaged(
                    path,
                    format!(
                        "damaged record at byte {stop}, yet a barrier or commit follows at {at}"
                    ),
                ));
            }
        }
        Ok(log)
    }

    /// Reads records from `pos` on; returns where the valid ones end.
    fn scan(&mut self, mut pos: u64) -> Result<u64> {
        let mut body = Vec::new();
        let mut sums = format::Xxh3::new();
        while let Some((frame, next)) = self.read_record(pos, &mut body)? {
            match frame.kind {
                TYPE_DELTA if self.commit.is_none() => {
                    let head = DeltaHead::decode(&body, frame.body_len as u64)
                        .map_err(|r| damaged(&self.path, format!("record at byte {pos}: {r}")))?;
                    if head.shard as usize >= self.header.shards.len() {
                        return Err(damaged(
                            &self.path,
                            format!("record at byte {pos} names shard {}", head.shard),
                        ));
                    }
                    let shard_len = self.header.shards[head.shard as usize].file_len;
                    let fits = head.offset.checked_add(head.len).is_some_and(|end| {
                        end <= shard_len
                            && (head.len % format::UNIT as u64 == 0 || end == shard_len)
                    });
                    if !fits {
                        return Err(damaged(
                            &self.path,
                            format!("record at byte {pos} does not fit its shard"),
                        ));
                    }
                    sums.update(&frame.checksum.to_le_bytes());
                    let at = pos + FRAME as u64 + DELTA_HEAD as u64;
                    self.records.push(RecordIndex {
                        head,
                        checksum: frame.checksum,
                        hashes_at: at,
                        payload_at: at + 8 * head.units as u64,
                    });
                }
                TYPE_BARRIER if self.commit.is_none() => {
                    let said = (body.len() == 8).then(|| format::u64_at(&body, 0));
                    if said.is_none_or(|n| n > self.records.len() as u64) {
                        return Err(damaged(
                            &self.path,
                            format!("barrier at byte {pos} does not match the records before it"),
                        ));
                    }
                }
                TYPE_COMMIT if self.commit.is_none() => {
                    let head = CommitHead::decode(&body)
                        .map_err(|r| damaged(&self.path, format!("commit at byte {pos}: {r}")))?;
                    // A commit that does not validate means "not committed".
                    if head.generation == self.header.generation
                        && head.records == self.records.len() as u64
                        && head.records_hash == sums.digest()
                    {
                        let meta = String::from_utf8_lossy(&body[COMMIT_HEAD..]).into_owned();
                        self.commit = Some(Commit {
                            records_hash: head.records_hash,
                            meta,
                        });
                    } else {
                        return Ok(pos);
                    }
                }
                _ => {
                    return Err(damaged(
                        &self.path,
                        format!("record at byte {pos} follows the commit"),
                    ))
                }
            }
            pos = next;
        }
        Ok(pos)
    }

    /// The record at `pos` with its body in `body`, or None when none that
    /// checks out starts there.
    fn read_record(&self, pos: u64, body: &mut Vec<u8>) -> Result<Option<(Frame, u64)>> {
        let mut raw = [0u8; FRAME];
        if pos + FRAME as u64 > self.len {
            return Ok(None);
        }
        self.read(&mut raw, pos)?;
        let frame = Frame::parse(&raw);
        let end = pos + FRAME as u64 + frame.body_len as u64;
        if !frame.plausible(self.header.epoch, &raw) || end > self.len {
            return Ok(None);
        }
        // The heads are kept; delta payloads are only hashed, a piece at a time.
        let keep = match frame.kind {
            TYPE_DELTA => (DELTA_HEAD as u64).min(frame.body_len as u64),
            _ => frame.body_len as u64,
        } as usize;
        body.resize(keep, 0);
        self.read(body, pos + FRAME as u64)?;
        let mut h = format::Xxh3::new();
        h.update(&raw[..16]);
        h.update(body);
        let mut piece = vec![0u8; READ_BYTES.min(frame.body_len as usize - keep)];
        let mut at = pos + FRAME as u64 + keep as u64;
        while at < end {
            let n = (end - at).min(READ_BYTES as u64) as usize;
            self.read(&mut piece[..n], at)?;
            h.update(&piece[..n]);
            at += n as u64;
        }
        Ok((h.digest() == frame.checksum).then_some((frame, end)))
    }

    /// Where a record of this file that checks out and proves the record at
    /// `from` (the `index`-th) was durable starts, if any: a commit, or a
    /// barrier counting more than `index` records (written only after those
    /// were durable). Delta records alone prove nothing: pieces of the log
    /// reach the disk in any order before a barrier.
    fn find_proof_after(&self, from: u64, index: u64) -> Result<Option<u64>> {
        let epoch = self.header.epoch.to_le_bytes();
        let mut buf = vec![0u8; READ_BYTES + 8];
        let mut body = Vec::new();
        let mut at = from + 1;
        while at + 16 <= self.len {
            let n = ((self.len - at) as usize).min(buf.len());
            self.read(&mut buf[..n], at)?;
            for i in 0..n.saturating_sub(15) {
                if buf[i + 8..i + 16] == epoch {
                    let start = at + i as u64;
                    let proves = match self.read_record(start, &mut body)? {
                        Some((f, _)) if f.kind == TYPE_COMMIT => true,
                        Some((f, _)) if f.kind == TYPE_BARRIER && body.len() == 8 => {
                            format::u64_at(&body, 0) > index
                        }
                        _ => false,
                    };
                    if proves {
                        return Ok(Some(start));
                    }
                }
            }
            at += n.saturating_sub(15).max(1) as u64;
        }
        Ok(None)
    }

    fn read(&self, buf: &mut [u8], at: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, at)
            .map_err(|e| Error::io(&self.path, "read log", e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn generation(&self) -> u64 {
        self.header.generation
    }

    pub fn kind(&self) -> Kind {
        self.header.kind
    }

    pub fn shards(&self) -> &[ShardBinding] {
        &self.header.shards
    }

    pub fn is_committed(&self) -> bool {
        self.commit.is_some()
    }

    /// Elements changed, over every record.
    pub fn elements(&self) -> u64 {
        self.records.iter().map(|r| r.head.elements).sum()
    }

    /// The unit hashes of record `r`.
    pub fn unit_hashes(&self, r: &RecordIndex, out: &mut Vec<u64>) -> Result<()> {
        let mut b = vec![0u8; 8 * r.head.units as usize];
        self.read(&mut b, r.hashes_at)?;
        out.clear();
        out.extend(b.chunks_exact(8).map(|c| format::u64_at(c, 0)));
        Ok(())
    }

    /// The payload of record `r`.
    pub fn payload(&self, r: &RecordIndex, out: &mut Vec<u8>) -> Result<()> {
        out.resize(r.head.payload_len as usize, 0);
        self.read(out, r.payload_at)
    }

    /// The XOR bytes of record `r` (its length), decoded.
    pub fn decode(
        &self,
        r: &RecordIndex,
        codec: &mut Codec,
        scratch: &mut Vec<u8>,
    ) -> Result<Vec<u8>> {
        self.payload(r, scratch)?;
        let mut xor = vec![0u8; r.head.len as usize];
        codec
            .decode(scratch, r.head.width as usize, &mut xor)
            .map_err(|e| {
                damaged(
                    &self.path,
                    format!("record at {} of shard {}: {e}", r.head.offset, r.head.shard),
                )
            })?;
        Ok(xor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::format::{DeltaHead, CODEC_DELTA};
    use crate::log::writer::RecordParts;
    use crate::log::{DeltaLog, LogSpec};

    /// A committed log of one record at `offset` (one unit, no change) in a
    /// shard of 8 KiB.
    fn log_with_record_at(dir: &Path, offset: u64) -> PathBuf {
        let path = dir.join("1.xlog");
        let shard = ShardBinding {
            name: "m.safetensors".into(),
            file_len: 8192,
            data_start: 64,
            header_hash: 0,
        };
        let spec = LogSpec {
            path: path.clone(),
            generation: 1,
            kind: Kind::Sync,
        };
        let log = DeltaLog::new(spec, vec![shard]);
        let payload = [crate::delta::VERSION, 0, 0, 0];
        let head = DeltaHead {
            shard: 0,
            width: 2,
            codec: CODEC_DELTA,
            offset,
            len: 4096,
            elements: 0,
            old_hash: 0,
            payload_len: payload.len() as u32,
            units: 1,
        };
        log.append(RecordParts {
            head,
            unit_hashes: &[0],
            payload: &payload,
        })
        .unwrap();
        log.commit(b"{}").unwrap();
        path
    }

    #[test]
    fn a_record_whose_end_overflows_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let ok = log_with_record_at(dir.path(), 4096);
        assert_eq!(LogFile::open(&ok).unwrap().records.len(), 1);
        std::fs::remove_file(&ok).unwrap();
        // offset + len wraps to 0, which "fits" a shard of any length.
        let bad = log_with_record_at(dir.path(), u64::MAX - 4095);
        assert!(matches!(LogFile::open(&bad), Err(Error::Log { .. })));
    }
}
