//! Reading and validating a safetensors header without touching tensor data.
//!
//! Parsing and the format's own rules (JSON shape, dtype names, offsets that are
//! contiguous from 0, sizes equal to dtype × shape, no overflow) come from the
//! reference `safetensors` crate, so "valid here" means "loadable there". This
//! module adds what it cannot know from the header alone: the file's length.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::tensor::Metadata;

use crate::error::{Error, Result};

/// Largest header the format accepts (the reference crate's limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor as the file describes it. Offsets are absolute file offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    /// The safetensors dtype name (`"BF16"`, `"F8_E4M3"`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

/// A parsed, validated header.
#[derive(Debug, Clone)]
pub struct Header {
    pub path: PathBuf,
    /// Absolute offset of the first tensor byte (8 + header length).
    pub data_start: u64,
    /// File length the header implies (and the file had when read).
    pub file_len: u64,
    pub metadata: Option<HashMap<String, String>>,
    /// Tensors in increasing offset order; they tile `data_start..file_len`.
    pub tensors: Vec<TensorEntry>,
}

impl Header {
    /// Reads and validates the header of the safetensors file at `path`.
    pub fn read(path: &Path) -> Result<Header> {
        let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        let mut len_bytes = [0u8; 8];
        if file_len < 8 {
            return Err(bad(
                path,
                format!("file is {file_len} bytes, shorter than the 8-byte length prefix"),
            ));
        }
        file.read_exact_at(&mut len_bytes, 0)
            .map_err(|e| Error::io(path, "read", e))?;
        let n = u64::from_le_bytes(len_bytes);
        if n > MAX_HEADER_LEN {
            return Err(bad(
                path,
                format!("header length {n} exceeds the format's limit of {MAX_HEADER_LEN}"),
            ));
        }
        if 8 + n > file_len {
            return Err(bad(
                path,
                format!("header length {n} runs past the end of the {file_len}-byte file"),
            ));
        }
        let mut json = vec![0u8; n as usize];
        file.read_exact_at(&mut json, 8)
            .map_err(|e| Error::io(path, "read", e))?;
        Self::parse(path, &json, file_len)
    }

    /// Validates header JSON bytes against a file of `file_len` bytes.
    pub fn parse(path: &Path, json: &[u8], file_len: u64) -> Result<Header> {
        let text = std::str::from_utf8(json)
            .map_err(|e| bad(path, format!("header is not UTF-8: {e}")))?;
        let meta: Metadata = parse_metadata(text).map_err(|e| bad(path, e))?;
        let data_start = 8 + json.len() as u64;
        let data_len = meta.data_len() as u64;
        if data_start + data_len != file_len {
            return Err(bad(
                path,
                format!(
                    "tensor data should end at byte {} but the file is {file_len} bytes{}",
                    data_start + data_len,
                    if file_len < data_start + data_len {
                        " (truncated?)"
                    } else {
                        " (trailing bytes)"
                    }
                ),
            ));
        }
        let mut tensors: Vec<TensorEntry> = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| TensorEntry {
                name,
                dtype: info.dtype.to_string(),
                shape: info.shape.clone(),
                start: data_start + info.data_offsets.0 as u64,
                end: data_start + info.data_offsets.1 as u64,
            })
            .collect();
        tensors.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
        Ok(Header {
            path: path.to_path_buf(),
            data_start,
            file_len,
            metadata: meta.metadata().clone(),
            tensors,
        })
    }
}

fn parse_metadata(text: &str) -> std::result::Result<Metadata, String> {
    // The reference crate's deserializer validates offsets and sizes as it builds.
    serde_json::from_str::<Metadata>(text).map_err(|e| e.to_string())
}

fn bad(path: &Path, reason: impl ToString) -> Error {
    Error::Header {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}
