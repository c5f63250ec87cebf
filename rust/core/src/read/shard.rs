//! Positional I/O on one shard: reads through the page cache; writes of the
//! changed blocks through the page cache, or aligned with `O_DIRECT`.
//!
//! Why the page cache by default: the filesystem writes back only the dirty
//! blocks of a folio (ext4's buffer heads, iomap's per-block dirty state), so
//! the disk receives exactly the changed blocks either way (the block
//! device's own counter; `getrusage` charges a buffered writer the whole folio
//! it dirties, up to 2 MiB). But a direct write evicts the cached folio around
//! its block, and with large folios a scattered change evicts most of a
//! shard: on the 2-core machine the next sync of a 4 GB model took 1.17–1.31 s
//! after direct writes against 0.32–0.42 s after page-cache ones, though a
//! first sync is ~0.1 s faster direct (BENCHMARKS.md). Direct writes remain an
//! option for filesystems that would write back whole folios.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

/// Alignment of staging buffers for direct I/O (covers 512 B and 4 KiB
/// logical sectors).
pub const DIRECT_ALIGN: usize = 4096;

/// Largest single write; longer runs are written in pieces of this size.
pub const MAX_WRITE: usize = 8 << 20;

/// A heap buffer aligned for `O_DIRECT`.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only hand out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up to the alignment).
    pub fn new(len: usize) -> Self {
        let len = len.max(DIRECT_ALIGN).next_multiple_of(DIRECT_ALIGN);
        let layout = Layout::from_size_align(len, DIRECT_ALIGN).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, DIRECT_ALIGN).expect("valid layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// A reusable aligned staging buffer that grows to the largest write it has
/// served (at most [`MAX_WRITE`]); one per writer thread, so it is zeroed once.
#[derive(Default)]
pub struct Staging(Option<AlignedBuf>);

impl Staging {
    /// An aligned slice of exactly `len` bytes (`len` ≤ [`MAX_WRITE`]).
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= MAX_WRITE);
        if self.0.as_ref().is_none_or(|b| b.len() < len) {
            self.0 = Some(AlignedBuf::new(len.next_power_of_two().min(MAX_WRITE)));
        }
        &mut self.0.as_mut().expect("allocated").as_mut_slice()[..len]
    }
}

/// Counters of what one shard's writer did.
#[derive(Debug, Default)]
pub struct WriteCounters {
    pub direct_bytes: AtomicU64,
    pub buffered_bytes: AtomicU64,
    pub writes: AtomicU64,
}

/// One shard opened for syncing: a read handle, and write handles opened on
/// first use (a dry run or an unchanged file never opens one).
pub struct ShardIo {
    path: PathBuf,
    read: File,
    len: u64,
    allow_direct: bool,
    align: usize,
    direct: OnceLock<Option<File>>,
    buffered: OnceLock<File>,
    direct_refused: AtomicBool,
    fallback_reason: Mutex<Option<String>>,
    pub counters: WriteCounters,
}

impl ShardIo {
    /// Opens `path` for reading and checks it still has `expected_len` bytes.
    /// Direct writes are attempted for pieces aligned to `align` bytes (a
    /// power of two, at most [`DIRECT_ALIGN`]).
    pub fn open(path: &Path, expected_len: u64, allow_direct: bool, align: usize) -> Result<Self> {
        assert!(align.is_power_of_two() && align <= DIRECT_ALIGN);
        let read = File::open(path).map_err(|e| Error::io(path, "open", e))?;
        let len = read
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        if len != expected_len {
            return Err(Error::Changed {
                path: path.to_path_buf(),
                reason: format!("length is {len}, header said {expected_len}"),
            });
        }
        Ok(ShardIo {
            path: path.to_path_buf(),
            read,
            len,
            allow_direct,
            align,
            direct: OnceLock::new(),
            buffered: OnceLock::new(),
            direct_refused: AtomicBool::new(false),
            fallback_reason: Mutex::new(None),
            counters: WriteCounters::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Why direct I/O was not used, if it was wanted and refused.
    pub fn fallback_reason(&self) -> Option<String> {
        self.fallback_reason.lock().expect("poisoned").clone()
    }

    /// Whether aligned blocks are written with `O_DIRECT` (asked for, and not
    /// refused so far).
    pub fn writes_direct(&self) -> bool {
        self.allow_direct && !self.direct_refused.load(Ordering::Relaxed)
    }

    /// Whether any byte was written.
    pub fn written(&self) -> bool {
        self.counters.writes.load(Ordering::Relaxed) > 0
    }

    /// Reads exactly `buf.len()` bytes at `offset` through the page cache.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(&self.path, "read", e))
    }

    /// Writes `data` at `offset`. With direct I/O, aligned whole blocks go
    /// through `O_DIRECT` (via `staging`, for alignment) and an unaligned tail
    /// (the file's last, short block) through the page cache; without it,
    /// everything goes through the page cache.
    pub fn write_at(&self, data: &[u8], offset: u64, staging: &mut Staging) -> Result<()> {
        if offset + data.len() as u64 > self.len {
            return Err(Error::Plan(format!(
                "{}: write of {} bytes at {offset} would extend the file",
                self.path.display(),
                data.len()
            )));
        }
        let mut done = 0usize;
        while done < data.len() {
            let piece_len = (data.len() - done).min(MAX_WRITE);
            let piece = &data[done..done + piece_len];
            let at = offset + done as u64;
            let aligned_len = piece_len - piece_len % self.align;
            if at % self.align as u64 == 0 && aligned_len > 0 {
                if let Some(file) = self.direct_file() {
                    let buf = staging.get(aligned_len);
                    buf.copy_from_slice(&piece[..aligned_len]);
                    match file.write_all_at(buf, at) {
                        Ok(()) => {
                            self.count(aligned_len, true);
                            if aligned_len < piece_len {
                                self.write_buffered(
                                    &piece[aligned_len..],
                                    at + aligned_len as u64,
                                )?;
                            }
                            done += piece_len;
                            continue;
                        }
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                            self.refuse_direct(format!("O_DIRECT write refused ({e})"));
                        }
                        Err(e) => return Err(Error::io(&self.path, "direct write", e)),
                    }
                }
            }
            self.write_buffered(piece, at)?;
            done += piece_len;
        }
        Ok(())
    }

    /// Makes every write durable (`fdatasync`); a no-op for an unwritten shard.
    pub fn sync(&self) -> Result<()> {
        if !self.written() {
            return Ok(());
        }
        let file = match (self.direct.get(), self.buffered.get()) {
            (_, Some(f)) => f,
            (Some(Some(f)), None) => f,
            _ => return Ok(()),
        };
        file.sync_data()
            .map_err(|e| Error::io(&self.path, "fsync", e))
    }

    /// `fdatasync` whether or not this handle wrote: what other processes
    /// wrote through the page cache reaches the disk too.
    pub fn sync_always(&self) -> Result<()> {
        let file = match self.buffered.get() {
            Some(f) => f,
            None => &self.read,
        };
        file.sync_data()
            .map_err(|e| Error::io(&self.path, "fsync", e))
    }

    /// Starts the writeback of `[offset, offset + len)` if this handle wrote
    /// through the page cache (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: the
    /// dirty pages there go to the device now instead of at the `fdatasync`
    /// after the commit, which then finds little left to do). It waits for
    /// nothing (a full device queue can make it block) and reports no
    /// writeback error: those stay recorded on the file until an
    /// `fdatasync` reports them, which is what makes anything durable.
    pub(crate) fn start_writeback(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let Some(file) = self.buffered.get() else {
            return Ok(());
        };
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Ok(());
        };
        // SAFETY: a plain syscall on a descriptor this handle owns.
        let r = unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
        };
        match r {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }

    fn write_buffered(&self, data: &[u8], at: u64) -> Result<()> {
        let file = match self.buffered.get() {
            Some(f) => f,
            None => {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&self.path)
                    .map_err(|e| Error::io(&self.path, "open for writing", e))?;
                let _ = self.buffered.set(f);
                self.buffered.get().expect("just set")
            }
        };
        file.write_all_at(data, at)
            .map_err(|e| Error::io(&self.path, "write", e))?;
        self.count(data.len(), false);
        Ok(())
    }

    fn direct_file(&self) -> Option<&File> {
        if !self.writes_direct() {
            return None;
        }
        self.direct
            .get_or_init(|| {
                match OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&self.path)
                {
                    Ok(f) => Some(f),
                    Err(e) => {
                        self.refuse_direct(format!("O_DIRECT open refused ({e})"));
                        None
                    }
                }
            })
            .as_ref()
    }

    fn refuse_direct(&self, reason: String) {
        self.direct_refused.store(true, Ordering::Relaxed);
        let mut slot = self.fallback_reason.lock().expect("poisoned");
        slot.get_or_insert(reason);
    }

    fn count(&self, n: usize, direct: bool) {
        let c = &self.counters;
        c.writes.fetch_add(1, Ordering::Relaxed);
        if direct {
            c.direct_bytes.fetch_add(n as u64, Ordering::Relaxed);
        } else {
            c.buffered_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}
