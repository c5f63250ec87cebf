//! Element-level XOR deltas: what a record of the log carries.
//!
//! PLACEHOLDER until the measured codec lands: the payload is the XOR bytes,
//! stored. The API is the one the log is written against.

mod codec;

pub use codec::{Codec, CodecError};
