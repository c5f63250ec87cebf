//! The log reader on arbitrary files: `LogFile::open`, then every record's
//! unit hashes and decoded payload. Errors are fine; a panic, an overflow or
//! an allocation past libFuzzer's limit is a bug.
//!
//! Each input is read twice: as it is (the checksums, the torn tail, the
//! resync by epoch), and with its checksums repaired (the header hash, every
//! frame's checksum, a commit's records hash), so that mutations reach the
//! checks behind them instead of dying at the first checksum.
//!
//! The input goes to a memfd, opened by its `/proc/self/fd` path: no disk.
#![no_main]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use apollo_sync_core::delta::Codec;
use apollo_sync_core::log::format::{self, FRAME, TYPE_COMMIT, TYPE_DELTA};
use apollo_sync_core::LogFile;
use libfuzzer_sys::fuzz_target;

struct Memfd {
    file: File,
    path: PathBuf,
}

fn memfd() -> &'static Memfd {
    static FD: OnceLock<Memfd> = OnceLock::new();
    FD.get_or_init(|| {
        // SAFETY: a plain syscall; the name is a NUL-terminated literal.
        let fd = unsafe { libc::memfd_create(c"log_reader".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        Memfd { file, path }
    })
}

fn read_back(data: &[u8]) {
    let m = memfd();
    m.file.set_len(0).unwrap();
    m.file.write_all_at(data, 0).unwrap();
    let Ok(log) = LogFile::open(&m.path) else {
        return;
    };
    assert!(log.torn_tail <= log.len);
    let mut codec = Codec::new();
    let (mut hashes, mut scratch) = (Vec::new(), Vec::new());
    for r in &log.records {
        assert!((r.head.shard as usize) < log.shards().len());
        if log.unit_hashes(r, &mut hashes).is_ok() {
            assert_eq!(hashes.len(), r.head.units as usize);
        }
        if let Ok(xor) = log.decode(r, &mut codec, &mut scratch) {
            assert_eq!(xor.len() as u64, r.head.len);
        }
    }
    let _ = (
        log.elements(),
        log.is_committed(),
        log.generation(),
        log.kind(),
    );
}

/// `data` with valid checksums wherever its lengths let them be computed.
fn repaired(data: &[u8]) -> Vec<u8> {
    let mut b = data.to_vec();
    let Some(fixed) = b.get(..16).and_then(|f| <[u8; 16]>::try_from(f).ok()) else {
        return b;
    };
    let h = format::u32_at(&fixed, 12) as usize;
    if !(48..=b.len()).contains(&h) {
        return b;
    }
    let sum = format::hash(&b[..h - 8]);
    b[h - 8..h].copy_from_slice(&sum.to_le_bytes());
    // The delta checksums so far, for a commit's records hash.
    let mut sums = Vec::new();
    let mut pos = h;
    while pos + FRAME <= b.len() {
        let end = pos + FRAME + format::u32_at(&b, pos + 4) as usize;
        if end > b.len() {
            break;
        }
        let kind = b[pos];
        if kind == TYPE_COMMIT && end - pos >= FRAME + 24 {
            let digest = format::hash(&sums);
            b[pos + FRAME + 16..pos + FRAME + 24].copy_from_slice(&digest.to_le_bytes());
        }
        let sum = format::checksum(&b[pos..pos + 16], &[&b[pos + FRAME..end]]);
        b[pos + 16..pos + 24].copy_from_slice(&sum.to_le_bytes());
        if kind == TYPE_DELTA {
            sums.extend_from_slice(&sum.to_le_bytes());
        }
        pos = end;
    }
    b
}

fuzz_target!(|data: &[u8]| {
    read_back(data);
    let fixed = repaired(data);
    if fixed != data {
        read_back(&fixed);
    }
});
