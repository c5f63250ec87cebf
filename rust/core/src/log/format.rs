//! The bytes of a log file: every layout constant, and the functions that
//! encode and decode them. `docs/FORMAT.md` describes the same bytes for
//! other tools; the fuzz target `log_reader` feeds this module garbage.
//!
//! A log file holds one generation: the deltas that take the shards from
//! generation N-1 to N, then, once the generation is committed, a commit
//! record. All integers are little endian; hashes are xxh3-64 (seed 0).
//!
//! ```text
//! File header
//!   0   magic "APSXLOG1"
//!   8   version u32 (1)
//!   12  header length H u32 (everything up to and including the hash below)
//!   16  epoch u64: random per file; every record repeats it
//!   24  generation u64
//!   32  kind u32: 0 sync, 1 rollback
//!   36  shard count u32
//!   40  per shard: name length u16, name (UTF-8), file length u64, data start
//!       u64 (8 + the safetensors header's length), header hash u64 (xxh3-64 of
//!       the shard's bytes 0..data start)
//!   H-8 xxh3-64 of bytes 0..H-8
//!
//! Record frame (from H on, back to back)
//!   0   type u8: 1 delta, 2 commit, 3 barrier; then 3 zero bytes
//!   4   body length u32
//!   8   epoch u64 (the file's)
//!   16  checksum u64: xxh3-64 of frame bytes 0..16 followed by the body
//!   24  body
//!
//! Delta body: the XOR of a run's bytes before and after
//!   0   shard u32 (index into the shard table)
//!   4   element width u8 (1, 2, 4, 8), codec u8 (1: `delta::Codec`), 2 zero bytes
//!   8   offset u64: file offset of the run, a multiple of 4096
//!   16  length u64: bytes covered, a multiple of 4096 unless the run ends the file
//!   24  elements u64: elements whose bytes differ
//!   32  old hash u64: xxh3-64 of the run's bytes before
//!   40  payload length u32, unit count u32 (= ceil(length / 4096))
//!   48  unit hashes: one u64 per 4 KiB unit, xxh3-64 of the unit's bytes after
//!   ..  payload: the codec's encoding of before XOR after
//!
//! Barrier body: the writer made every record before it durable here, and
//! only then wrote in place what they cover
//!   0   delta records before it u64
//!
//! Commit body
//!   0   generation u64
//!   8   delta records before it u64
//!   16  records hash u64: xxh3-64 of the checksums of those records (8 bytes
//!       each), in file order
//!   24  metadata length u32, then the metadata (UTF-8 JSON, the caller's)
//! ```

use std::hash::Hasher;

use twox_hash::XxHash3_64;

/// xxh3-64 of `bytes` (seed 0).
pub fn xxh3_64(bytes: &[u8]) -> u64 {
    XxHash3_64::oneshot(bytes)
}

/// xxh3-64 (seed 0) of the bytes given in pieces.
pub struct Xxh3(XxHash3_64);

impl Default for Xxh3 {
    fn default() -> Self {
        Self::new()
    }
}

impl Xxh3 {
    pub fn new() -> Self {
        Self(XxHash3_64::new())
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    pub fn digest(&self) -> u64 {
        self.0.finish()
    }
}

/// Bytes of a unit: the granularity of the hashes recovery decides by.
pub const UNIT: usize = 4096;
/// Bytes of a sector: a torn unit is old or new sector by sector.
pub const SECTOR: usize = 512;
pub const MAGIC: &[u8; 8] = b"APSXLOG1";
pub const VERSION: u32 = 1;
pub const FRAME: usize = 24;
pub const DELTA_HEAD: usize = 48;
pub const COMMIT_HEAD: usize = 28;
pub const TYPE_DELTA: u8 = 1;
pub const TYPE_COMMIT: u8 = 2;
pub const TYPE_BARRIER: u8 = 3;
pub const CODEC_DELTA: u8 = 1;
/// The longest run a record may cover. Runs come from one diff job (4 MiB);
/// the reader refuses longer ones rather than allocate for them.
pub const MAX_RECORD_LEN: u64 = 64 << 20;
/// The largest body the reader accepts.
pub const MAX_BODY: u64 = 3 * MAX_RECORD_LEN;
/// The largest header the reader accepts.
pub const MAX_HEADER: u32 = 16 << 20;

/// Why a log generation was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sync = 0,
    Rollback = 1,
}

impl Kind {
    pub fn from_u32(v: u32) -> Option<Kind> {
        match v {
            0 => Some(Kind::Sync),
            1 => Some(Kind::Rollback),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Sync => "sync",
            Kind::Rollback => "rollback",
        }
    }
}

/// A shard as a log's records were made for it: a record only applies to a
/// file of this length whose safetensors header hashes to this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardBinding {
    pub name: String,
    pub file_len: u64,
    /// Where tensor data starts: the bytes before it are the header.
    pub data_start: u64,
    pub header_hash: u64,
}

/// The fixed fields of a log file's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHeader {
    pub epoch: u64,
    pub generation: u64,
    pub kind: Kind,
    pub shards: Vec<ShardBinding>,
}

impl FileHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.shards.len() * 64);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // length, set below
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&(self.kind as u32).to_le_bytes());
        b.extend_from_slice(&(self.shards.len() as u32).to_le_bytes());
        for s in &self.shards {
            b.extend_from_slice(&(s.name.len() as u16).to_le_bytes());
            b.extend_from_slice(s.name.as_bytes());
            b.extend_from_slice(&s.file_len.to_le_bytes());
            b.extend_from_slice(&s.data_start.to_le_bytes());
            b.extend_from_slice(&s.header_hash.to_le_bytes());
        }
        let len = (b.len() + 8) as u32;
        b[12..16].copy_from_slice(&len.to_le_bytes());
        let h = xxh3_64(&b);
        b.extend_from_slice(&h.to_le_bytes());
        b
    }

    /// The header length declared by the first 16 bytes, checked for range.
    pub fn declared_len(fixed: &[u8; 16]) -> Result<u32, String> {
        if &fixed[0..8] != MAGIC {
            return Err("not an apollo_sync log (bad magic)".into());
        }
        let version = u32_at(fixed, 8);
        if version != VERSION {
            return Err(format!(
                "log format version {version}; this build reads {VERSION}"
            ));
        }
        let len = u32_at(fixed, 12);
        if !(48..=MAX_HEADER).contains(&len) {
            return Err(format!("header length {len} out of range"));
        }
        Ok(len)
    }

    /// Decodes a whole header (`b` is exactly its declared length).
    pub fn decode(b: &[u8]) -> Result<FileHeader, String> {
        let n = b.len();
        if n < 48 {
            return Err("header cut short".into());
        }
        if xxh3_64(&b[..n - 8]) != u64_at(b, n - 8) {
            return Err("header checksum mismatch".into());
        }
        let kind = Kind::from_u32(u32_at(b, 32)).ok_or("unknown generation kind")?;
        let count = u32_at(b, 36) as usize;
        let mut shards = Vec::with_capacity(count.min(1 << 12));
        let mut at = 40usize;
        for _ in 0..count {
            let name_len = b
                .get(at..at + 2)
                .map(|x| u16::from_le_bytes([x[0], x[1]]) as usize)
                .ok_or("shard table runs past the header")?;
            let name = b
                .get(at + 2..at + 2 + name_len)
                .and_then(|x| std::str::from_utf8(x).ok())
                .ok_or("bad shard name in the header")?;
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(format!("shard name {name:?} is not a file name"));
            }
            let rest = at + 2 + name_len;
            if rest + 24 > n - 8 {
                return Err("shard table runs past the header".into());
            }
            let binding = ShardBinding {
                name: name.to_owned(),
                file_len: u64_at(b, rest),
                data_start: u64_at(b, rest + 8),
                header_hash: u64_at(b, rest + 16),
            };
            if binding.data_start > binding.file_len {
                return Err(format!("shard {name:?} starts its data past its end"));
            }
            shards.push(binding);
            at = rest + 24;
        }
        if at != n - 8 {
            return Err("bytes left over after the shard table".into());
        }
        Ok(FileHeader {
            epoch: u64_at(b, 16),
            generation: u64_at(b, 24),
            kind,
            shards,
        })
    }
}

/// The first 24 bytes of a record, as read (not yet checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub body_len: u32,
    pub epoch: u64,
    pub checksum: u64,
}

impl Frame {
    pub fn parse(b: &[u8; FRAME]) -> Frame {
        Frame {
            kind: b[0],
            body_len: u32_at(b, 4),
            epoch: u64_at(b, 8),
            checksum: u64_at(b, 16),
        }
    }

    /// Whether the frame could start a record of a log with this epoch (the
    /// checksum is checked once the body is read).
    pub fn plausible(&self, epoch: u64, raw: &[u8; FRAME]) -> bool {
        self.epoch == epoch
            && matches!(self.kind, TYPE_DELTA | TYPE_COMMIT | TYPE_BARRIER)
            && raw[1..4] == [0, 0, 0]
            && (self.body_len as u64) <= MAX_BODY
    }
}

/// A frame's checksum: xxh3-64 of its first 16 bytes and the body.
pub fn checksum(head16: &[u8], body_parts: &[&[u8]]) -> u64 {
    let mut h = Xxh3::new();
    h.update(head16);
    for p in body_parts {
        h.update(p);
    }
    h.digest()
}

/// Frame bytes 0..24 for a body made of `parts`.
pub fn frame(kind: u8, epoch: u64, parts: &[&[u8]]) -> ([u8; FRAME], u64) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut head = [0u8; FRAME];
    head[0] = kind;
    head[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    head[8..16].copy_from_slice(&epoch.to_le_bytes());
    let sum = checksum(&head[..16], parts);
    head[16..24].copy_from_slice(&sum.to_le_bytes());
    (head, sum)
}

/// The fixed fields of a delta body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaHead {
    pub shard: u32,
    pub width: u8,
    pub codec: u8,
    pub offset: u64,
    pub len: u64,
    pub elements: u64,
    pub old_hash: u64,
    pub payload_len: u32,
    pub units: u32,
}

impl DeltaHead {
    pub fn encode(&self) -> [u8; DELTA_HEAD] {
        let mut b = [0u8; DELTA_HEAD];
        b[0..4].copy_from_slice(&self.shard.to_le_bytes());
        b[4] = self.width;
        b[5] = self.codec;
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.elements.to_le_bytes());
        b[32..40].copy_from_slice(&self.old_hash.to_le_bytes());
        b[40..44].copy_from_slice(&self.payload_len.to_le_bytes());
        b[44..48].copy_from_slice(&self.units.to_le_bytes());
        b
    }

    /// Decodes and checks a delta body's head against the body's length.
    pub fn decode(b: &[u8], body_len: u64) -> Result<DeltaHead, String> {
        if b.len() < DELTA_HEAD {
            return Err("delta record cut short".into());
        }
        let h = DeltaHead {
            shard: u32_at(b, 0),
            width: b[4],
            codec: b[5],
            offset: u64_at(b, 8),
            len: u64_at(b, 16),
            elements: u64_at(b, 24),
            old_hash: u64_at(b, 32),
            payload_len: u32_at(b, 40),
            units: u32_at(b, 44),
        };
        if b[6..8] != [0, 0] || !matches!(h.width, 1 | 2 | 4 | 8) || h.codec != CODEC_DELTA {
            return Err("delta record with a bad width or codec".into());
        }
        if h.offset % UNIT as u64 != 0 || h.len == 0 || h.len > MAX_RECORD_LEN {
            return Err(format!("delta record at {} of {} bytes", h.offset, h.len));
        }
        if h.elements > h.len.div_ceil(h.width as u64) {
            return Err("delta record with more changed elements than its run holds".into());
        }
        if h.units as u64 != h.len.div_ceil(UNIT as u64) {
            return Err("delta record's unit count disagrees with its length".into());
        }
        let want = DELTA_HEAD as u64 + 8 * h.units as u64 + h.payload_len as u64;
        if want != body_len {
            return Err("delta record's sizes disagree with its length".into());
        }
        Ok(h)
    }
}

/// A commit body's fixed fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitHead {
    pub generation: u64,
    pub records: u64,
    pub records_hash: u64,
    pub meta_len: u32,
}

impl CommitHead {
    pub fn encode(&self) -> [u8; COMMIT_HEAD] {
        let mut b = [0u8; COMMIT_HEAD];
        b[0..8].copy_from_slice(&self.generation.to_le_bytes());
        b[8..16].copy_from_slice(&self.records.to_le_bytes());
        b[16..24].copy_from_slice(&self.records_hash.to_le_bytes());
        b[24..28].copy_from_slice(&self.meta_len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<CommitHead, String> {
        if b.len() < COMMIT_HEAD {
            return Err("commit record cut short".into());
        }
        let h = CommitHead {
            generation: u64_at(b, 0),
            records: u64_at(b, 8),
            records_hash: u64_at(b, 16),
            meta_len: u32_at(b, 24),
        };
        if COMMIT_HEAD as u64 + h.meta_len as u64 != b.len() as u64 {
            return Err("commit record's sizes disagree with its length".into());
        }
        Ok(h)
    }
}

/// xxh3-64 of each 4 KiB unit of `bytes` (the last may be short), appended.
pub fn unit_hashes(bytes: &[u8], out: &mut Vec<u64>) {
    out.extend(bytes.chunks(UNIT).map(xxh3_64));
}

pub fn hash(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format says xxh3-64 with seed 0: these are that function's values
    /// (from the reference implementation through another crate), short and
    /// long inputs (the long ones take the SIMD path chosen at run time).
    #[test]
    fn hashes_are_xxh3_64() {
        let v: Vec<u8> = (0..100_000u32)
            .map(|i| ((i * 31 + 7) % 251) as u8)
            .collect();
        let known = [
            (0, 0x2d06_8005_38d3_94c2),
            (3, 0x15f7_093b_173d_005c),
            (200, 0xf4b5_4cdc_82f2_0685),
            (4096, 0x04a1_779c_9e7d_dcd7),
            (100_000, 0xddc5_6558_5fab_0e61),
        ];
        for (n, want) in known {
            assert_eq!(xxh3_64(&v[..n]), want, "{n} bytes");
            let mut h = Xxh3::new();
            for piece in v[..n].chunks(777) {
                h.update(piece);
            }
            assert_eq!(h.digest(), want, "{n} bytes in pieces");
        }
    }

    #[test]
    fn header_round_trips_and_any_flip_is_caught() {
        let h = FileHeader {
            epoch: 0x1234_5678_9abc_def0,
            generation: 7,
            kind: Kind::Rollback,
            shards: vec![
                ShardBinding {
                    name: "model-00001-of-00002.safetensors".into(),
                    file_len: 1 << 30,
                    data_start: 1000,
                    header_hash: 42,
                },
                ShardBinding {
                    name: "b.safetensors".into(),
                    file_len: 5,
                    data_start: 5,
                    header_hash: 1,
                },
            ],
        };
        let b = h.encode();
        let fixed: [u8; 16] = b[..16].try_into().unwrap();
        assert_eq!(FileHeader::declared_len(&fixed).unwrap() as usize, b.len());
        assert_eq!(FileHeader::decode(&b).unwrap(), h);
        for i in 16..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x10;
            assert!(FileHeader::decode(&bad).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn delta_head_checks_its_sizes() {
        let h = DeltaHead {
            shard: 1,
            width: 2,
            codec: CODEC_DELTA,
            offset: 8192,
            len: 4096 * 3 - 10,
            elements: 5,
            old_hash: 9,
            payload_len: 100,
            units: 3,
        };
        let body_len = (DELTA_HEAD + 24 + 100) as u64;
        assert_eq!(DeltaHead::decode(&h.encode(), body_len).unwrap(), h);
        assert!(DeltaHead::decode(&h.encode(), body_len + 1).is_err());
        let misaligned = DeltaHead { offset: 100, ..h };
        assert!(DeltaHead::decode(&misaligned.encode(), body_len).is_err());
        let bad_units = DeltaHead { units: 2, ..h };
        assert!(DeltaHead::decode(&bad_units.encode(), body_len - 8).is_err());
    }

    /// Found by the `log_reader` fuzz target: two records claiming 2^63
    /// changed elements each overflowed `LogFile::elements`.
    #[test]
    fn delta_head_refuses_more_elements_than_its_run_holds() {
        let h = DeltaHead {
            shard: 0,
            width: 2,
            codec: CODEC_DELTA,
            offset: 0,
            len: 4096 + 3,
            elements: 2050, // ceil(4099 / 2)
            old_hash: 0,
            payload_len: 4,
            units: 2,
        };
        let body_len = (DELTA_HEAD + 16 + 4) as u64;
        assert!(DeltaHead::decode(&h.encode(), body_len).is_ok());
        for elements in [2051, 1 << 63] {
            let bad = DeltaHead { elements, ..h };
            assert!(DeltaHead::decode(&bad.encode(), body_len).is_err());
        }
    }
}
