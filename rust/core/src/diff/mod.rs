//! Stage 3, diff: which blocks of the live bytes differ from the file's.
//!
//! - `kernel.rs`: the block-diff kernel ([`changed_runs`],
//!   [`changed_runs_at`]), pure and allocation-free;
//! - `job.rs`: a job's live bytes compared with the file's, a chunk at a
//!   time, each changed run sent on to be written (and logged).

pub(crate) mod job;
mod kernel;

pub use kernel::{changed_runs, changed_runs_at};
