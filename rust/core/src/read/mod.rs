//! Stage 2, read: where the bytes a sync compares come from.
//!
//! - `live.rs`: the live bytes ([`Live`](live::Live)), memory the caller
//!   holds or a range of a file read with `pread`;
//! - `shard.rs`: the file's, through one shard's [`ShardIo`](shard::ShardIo):
//!   positional reads, and the block writes and durability that the later
//!   stages (`crate::apply`, `crate::flush`, `crate::log`) go through, with
//!   their [`Staging`](shard::Staging) buffers and write counters.
//!
//! The crate root re-exports them under their former names, `live` and `io`.

pub mod live;
pub mod shard;
