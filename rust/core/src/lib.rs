//! apollo_sync_core: keep safetensors files equal to live tensors by writing
//! only the blocks that changed.
//!
//! No Python here: the binding crate converts types and releases the GIL.
//! - [`header`]: read and validate a safetensors header.
//! - [`diff`]: the block-diff kernel.
//! - [`delta`]: the element-level XOR-delta codec of one delta-log record.
//! - [`io`]: positional reads, block writes (page cache or `O_DIRECT`), durability.
//! - [`live`]: where live bytes come from (memory, or a file read with `pread`).
//! - [`sync`]: the engine that ties them together across shards.
//! - [`log`]: the XOR-delta log that makes a sync atomic, crash-safe and
//!   undoable: format, writer, reader, recovery and rollback.
//! - [`faults`]: crash and error injection for the crash-safety tests.

mod apply;
pub mod delta;
pub mod diff;
pub mod error;
pub mod faults;
mod flush;
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
