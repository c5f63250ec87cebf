//! The XOR-delta log: what makes a sync atomic, crash-safe and undoable.
//!
//! A generation's log holds, for every run of blocks the sync changed, the
//! XOR of its bytes before and after (encoded sparse by [`crate::delta`]) and
//! the hash of every 4 KiB unit after; its commit record makes the
//! generation. XOR is its own inverse, so one record both redoes and undoes;
//! the hashes tell which side a unit is on, even torn sector by sector.
//!
//! - [`format`]: the bytes (one place; `docs/FORMAT.md` says the same).
//! - [`writer`]: appending records, barriers, the commit.
//! - [`reader`]: reading a log back, checking everything.
//! - [`chain`]: which state of its chain a unit holds.
//! - [`apply`]: recovery and rollback on the shards, unit by unit.
//!
//! And the generations of a model directory, built on them:
//! - [`dir`]: where the generation files live, which are there.
//! - [`state`]: `state.json`, the history (a cache of what the logs say).
//! - [`commit`]: a generation committed (commit record, then its entry), or
//!   an uncommitted one put back.
//! - [`recovery`]: the directory brought to its last committed generation.
//! - [`rollback`]: the directory back to an earlier generation, as a new one.
//! - [`prune`]: old rollback points dropped.

pub mod apply;
pub mod chain;
pub mod commit;
pub mod dir;
pub mod format;
pub mod prune;
pub mod reader;
pub mod recovery;
pub mod rollback;
pub mod state;
#[cfg(test)]
mod testing;
pub mod writer;

pub use apply::{recover, rollback, ApplyReport, RecoverReport};
pub use commit::{commit_logged, commit_unlogged, undo_uncommitted, Entry};
pub use dir::GenDir;
pub use format::{Kind, ShardBinding};
pub use prune::prune;
pub use reader::LogFile;
pub use recovery::{Flushes, NoFlushes, Recovered};
pub use state::{Generation, State};
pub use writer::{DeltaLog, Encoder, LogSpec, LogStats, RecordSummary};
