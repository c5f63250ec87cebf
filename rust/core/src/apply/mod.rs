//! Stage 5, apply: the changed runs written in place.
//!
//! - `hold.rs`: with a log, each changed run's delta appended to the log and
//!   its new bytes held until a barrier has made the record durable;
//! - `commit.rs`: with a log, the commit thread (a barrier per batch of held
//!   runs) and the writer threads that write each batch once it is durable;
//! - `write.rs`: without a log, writer threads that write changed runs while
//!   the diff goes on; and the in-place write itself.

pub(crate) mod commit;
pub(crate) mod hold;
pub(crate) mod write;
