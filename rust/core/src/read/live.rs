//! Where live bytes come from: memory the caller holds, or a range of an open
//! file read with `pread`.
//!
//! The file form exists for another process's shared memory: mapping it costs
//! one page fault per 4 KiB page on first touch (about 0.1 s per GiB here, more
//! than the compare itself), while `pread` from tmpfs copies at page-cache speed
//! with no page-table work.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};

/// Live bytes of a segment.
#[derive(Debug, Clone, Copy)]
pub enum Live<'a> {
    /// Bytes in memory, compared in place.
    Mem(&'a [u8]),
    /// `len` bytes at `offset` of `file`, read in chunks as they are compared.
    File {
        file: &'a File,
        offset: u64,
        len: usize,
    },
}

impl<'a> Live<'a> {
    pub fn len(&self) -> usize {
        match self {
            Live::Mem(b) => b.len(),
            Live::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes `start..end` of these bytes (same source).
    pub fn slice(&self, start: usize, end: usize) -> Live<'a> {
        assert!(start <= end && end <= self.len(), "slice out of range");
        match *self {
            Live::Mem(b) => Live::Mem(&b[start..end]),
            Live::File { file, offset, .. } => Live::File {
                file,
                offset: offset + start as u64,
                len: end - start,
            },
        }
    }

    /// Bytes `start..start + buf.len()`, copied into `buf`.
    pub fn read_into(&self, start: usize, buf: &mut [u8]) -> Result<()> {
        match *self {
            Live::Mem(b) => {
                buf.copy_from_slice(&b[start..start + buf.len()]);
                Ok(())
            }
            Live::File { file, offset, .. } => file
                .read_exact_at(buf, offset + start as u64)
                .map_err(|e| Error::io("<live bytes file>", "read", e)),
        }
    }
}
