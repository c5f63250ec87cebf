//! The generation files of one model directory: where they live and which
//! are there.
//!
//! ```text
//! <model-dir>/.apollo_sync/          (or .apollo_sync/hosts/<h>/, one host of a group)
//!     state.json        the history, the generation and the checkpoint (state.rs)
//!     log/<N>.xlog      generation N's deltas and commit record (format.rs)
//!     log/<N>.flushed   the shards were durable with generation N: the checkpoint
//! ```
//!
//! The lock file, `last_sync.json` and the group file sit beside them and
//! belong to the Python package.

use std::collections::BTreeMap;
use std::fs::{DirBuilder, File};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::format::MAGIC;
use super::state::State;
use crate::error::{Error, Result};

/// The generation files of a model directory.
#[derive(Debug, Clone)]
pub struct GenDir {
    root: PathBuf,
    meta: PathBuf,
}

impl GenDir {
    /// The files under `meta` (`.apollo_sync/`, or a host's folder in it) of
    /// the model directory `root`.
    pub fn new(root: impl Into<PathBuf>, meta: impl Into<PathBuf>) -> Self {
        GenDir {
            root: root.into(),
            meta: meta.into(),
        }
    }

    /// The model directory (where the shards are).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn meta(&self) -> &Path {
        &self.meta
    }

    pub fn log_dir(&self) -> PathBuf {
        self.meta.join("log")
    }

    pub fn state_path(&self) -> PathBuf {
        self.meta.join("state.json")
    }

    pub fn log_path(&self, number: u64) -> PathBuf {
        self.log_dir().join(format!("{number}.xlog"))
    }

    pub fn marker_path(&self, number: u64) -> PathBuf {
        self.log_dir().join(format!("{number}.flushed"))
    }

    /// Creates the folders (private to the user), durably. Every folder's
    /// entry is made durable every time, not only when created: a process
    /// killed between a `mkdir` and its `fsync` leaves a folder that exists
    /// but might not survive a power cut.
    pub fn ensure(&self) -> Result<()> {
        let log_dir = self.log_dir();
        let below = log_dir.strip_prefix(&self.root).unwrap_or(&log_dir);
        let mut at = self.root.clone();
        for part in below.components() {
            at.push(part);
            match DirBuilder::new().mode(0o700).create(&at) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists && at.is_dir() => {}
                Err(e) => return Err(Error::io(&at, "create folder", e)),
            }
            fsync_dir(at.parent().unwrap_or(Path::new(".")))?;
        }
        Ok(())
    }

    /// Logs present, by generation.
    pub fn logs(&self) -> Result<BTreeMap<u64, PathBuf>> {
        self.numbered("xlog")
    }

    /// Checkpoint markers present, by generation.
    pub fn markers(&self) -> Result<BTreeMap<u64, PathBuf>> {
        self.numbered("flushed")
    }

    /// The newest generation marked durable in the shards (0 if none).
    pub fn flushed(&self) -> Result<u64> {
        Ok(self.markers()?.keys().next_back().copied().unwrap_or(0))
    }

    /// The checkpoint: the last generation the shards hold on disk by
    /// themselves (the state file's, or a newer marker's).
    pub fn checkpoint(&self, state: &State) -> Result<u64> {
        Ok(state.checkpoint.max(self.flushed()?))
    }

    /// `<N>.<ext>` files of the log folder, by `N`.
    fn numbered(&self, ext: &str) -> Result<BTreeMap<u64, PathBuf>> {
        let dir = self.log_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(Error::io(&dir, "list", e)),
        };
        let mut found = BTreeMap::new();
        for entry in entries {
            let path = entry.map_err(|e| Error::io(&dir, "list", e))?.path();
            if path.extension().is_some_and(|x| x == ext) {
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                if !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_digit()) {
                    if let Ok(n) = stem.parse() {
                        found.insert(n, path);
                    }
                }
            }
        }
        Ok(found)
    }
}

/// Whether a log's header reached the file. The first barrier writes it with
/// the first records and makes both durable before any in-place write; a log
/// without it covers no in-place byte (a damaged header past that point is
/// reported by the reader). A page lost before any barrier reads as zeros.
pub fn header_written(path: &Path) -> Result<bool> {
    let mut head = [0u8; 16];
    let mut f = File::open(path).map_err(|e| Error::io(path, "open log", e))?;
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, "read log", e)),
        }
    }
    if got < 16 || head[..8] == [0; 8] {
        return Ok(false);
    }
    if &head[..8] != MAGIC {
        return Ok(true); // something else: the reader reports it
    }
    let declared = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
    let len = f
        .metadata()
        .map_err(|e| Error::io(path, "stat log", e))?
        .len();
    Ok(len >= u64::from(declared))
}

/// Makes `path`'s entries (files created, renamed, removed) durable.
pub fn fsync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(path, "fsync", e))
}

/// Removes `path`; one already gone is no error.
pub(super) fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(Error::io(path, "remove", e)),
        _ => Ok(()),
    }
}
