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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use safetensors::tensor::{Dtype, TensorView};
    use std::io::Write;

    const DTYPES: [(Dtype, usize); 6] = [
        (Dtype::BF16, 2),
        (Dtype::F16, 2),
        (Dtype::F32, 4),
        (Dtype::I64, 8),
        (Dtype::BOOL, 1),
        (Dtype::F8_E4M3, 1),
    ];

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the reference crate serializes, we read back exactly.
        #[test]
        fn round_trips_the_reference_serializer(
            specs in proptest::collection::vec((0usize..6, proptest::collection::vec(0usize..9, 0..3)), 0..8),
        ) {
            let datas: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = specs
                .iter()
                .enumerate()
                .map(|(i, (d, shape))| {
                    let (dtype, size) = DTYPES[*d];
                    let n: usize = shape.iter().product::<usize>() * size;
                    (format!("t{i}"), dtype, shape.clone(), vec![i as u8; n])
                })
                .collect();
            let views: Vec<(String, TensorView<'_>)> = datas
                .iter()
                .map(|(name, dtype, shape, data)| {
                    (name.clone(), TensorView::new(*dtype, shape.clone(), data).unwrap())
                })
                .collect();
            let bytes = safetensors::serialize(views, None).unwrap();
            let f = write(&bytes);
            let h = Header::read(f.path()).unwrap();
            prop_assert_eq!(h.file_len, bytes.len() as u64);
            prop_assert_eq!(h.tensors.len(), datas.len());
            let mut at = h.data_start;
            for t in &h.tensors {
                prop_assert_eq!(t.start, at);
                at = t.end;
                let (_, dtype, shape, data) = datas.iter().find(|d| d.0 == t.name).unwrap();
                prop_assert_eq!(&t.dtype, &dtype.to_string());
                prop_assert_eq!(&t.shape, shape);
                prop_assert_eq!(t.end - t.start, data.len() as u64);
                prop_assert_eq!(&bytes[t.start as usize..t.end as usize], &data[..]);
            }
            prop_assert_eq!(at, h.file_len);
        }

        /// Corrupt bytes never panic: they parse or give a Header error.
        #[test]
        fn corruption_is_an_error_not_a_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let data = [1u8; 24];
            let views = vec![
                ("a".to_string(), TensorView::new(Dtype::F32, vec![2, 2], &data[..16]).unwrap()),
                ("b".to_string(), TensorView::new(Dtype::BF16, vec![4], &data[16..]).unwrap()),
            ];
            let mut bytes = safetensors::serialize(views, None).unwrap();
            for (i, x) in &flips {
                let k = i.index(bytes.len());
                bytes[k] ^= x;
            }
            if let Some(c) = cut {
                bytes.truncate(c.index(bytes.len()));
            }
            let f = write(&bytes);
            match Header::read(f.path()) {
                Ok(h) => {
                    prop_assert_eq!(h.file_len, bytes.len() as u64);
                    prop_assert!(h.tensors.iter().all(|t| t.start >= h.data_start && t.end <= h.file_len));
                }
                Err(Error::Header { .. }) => {}
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }
}
