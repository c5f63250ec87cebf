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
//! - [`apply`]: recovery and rollback on the shards.

pub mod apply;
pub mod chain;
pub mod format;
pub mod reader;
pub mod writer;

pub use apply::{recover, rollback, ApplyReport, RecoverReport};
pub use format::{Kind, ShardBinding};
pub use reader::LogFile;
pub use writer::{DeltaLog, Encoder, LogSpec, LogStats, RecordSummary};
