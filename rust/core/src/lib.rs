//! apollo_sync_core: keep safetensors files equal to live tensors by writing
//! only the blocks that changed.
//!
//! No Python here: the binding crate converts types and releases the GIL.
//! [`header`] reads and validates a safetensors header; then come the stages,
//! a folder each, in the order a byte passes them:
//! - `plan/`: a batch of segments checked and cut into jobs, and the pending
//!   blocks that several segments share.
//! - `read/`: `live.rs`, re-exported as [`live`]: where live bytes come from
//!   (memory, or a file read with `pread`); `shard.rs`, re-exported as
//!   [`io`]: positional reads, block writes (page cache or `O_DIRECT`),
//!   durability.
//! - [`diff`]: the block-diff kernel, and each job compared with it.
//! - [`delta`]: the element-level XOR-delta codec of one delta-log record.
//! - [`log`]: the XOR-delta log that makes a sync atomic, crash-safe and
//!   undoable: format, writer, reader, recovery and rollback; and the
//!   generations of a directory built on it (`state.json`, the commit,
//!   recovery of the directory, pruning).
//! - `apply/`: the in-place writes (held runs, the commit thread, the writer
//!   threads).
//! - [`flush`]: shards made durable (after the commit, with the checkpoint
//!   marked), and the writeback started early.
//!
//! And beside them:
//! - [`sync`]: the engine that ties them together across shards.
//! - [`faults`]: crash and error injection for the crash-safety tests.

mod apply;
pub mod delta;
pub mod diff;
pub mod error;
pub mod faults;
pub mod flush;
pub mod header;
pub mod log;
mod plan;
mod read;
pub mod sync;

// The read stage's modules, under the names they had at the crate root.
pub use read::live;
pub use read::shard as io;

pub use error::{Error, Result};
pub use header::{Header, TensorEntry};
pub use log::{DeltaLog, Kind, LogFile, LogSpec};
pub use read::live::Live;
pub use sync::{AbortHandle, Options, Segment, ShardReport, ShardSpec, Syncer, Timings};
