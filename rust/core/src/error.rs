//! The one error type of the core. Each variant means something to a user and
//! carries the path it concerns; the Python binding maps variants to classes.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A safetensors header that cannot be trusted: bad length, bad JSON,
    /// offsets out of range or overlapping, sizes that disagree with
    /// dtype × shape, or a file whose length disagrees with its header.
    #[error("{path}: invalid safetensors header: {reason}")]
    Header { path: PathBuf, reason: String },

    /// A shard changed on disk between planning and syncing (another writer,
    /// a truncation): syncing into it would write at stale offsets.
    #[error("{path}: file changed on disk since it was read ({reason})")]
    Changed { path: PathBuf, reason: String },

    /// An operating-system I/O failure, with the file and the operation.
    #[error("{path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// A log that cannot be trusted: bad magic, a checksum that does not
    /// hold, a damaged record with valid ones after it. Nothing is applied
    /// from it.
    #[error("{path}: damaged log: {reason}")]
    Log { path: PathBuf, reason: String },

    /// A model directory's generation files that say something impossible:
    /// an unreadable `state.json`, a generation the shards may hold that has
    /// no log, units that match no state of their chain. Nothing is changed.
    #[error("{path}: {reason}")]
    State { path: PathBuf, reason: String },

    /// A rollback that cannot be done: no such generation, or the log of a
    /// generation it must walk back is gone. Nothing is written.
    #[error("{0}")]
    Rollback(String),

    /// The caller asked for something inconsistent (a segment outside its
    /// tensor region, out of order, a bad block size). Nothing is written.
    #[error("{0}")]
    Plan(String),
}

impl Error {
    pub(crate) fn state(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::State {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }
}

/// Result with the core's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
