//! The element-level XOR delta: how one record of the delta log stores
//! `old XOR new` for a run of changed bytes.
//!
//! An optimizer step on bf16 weights changes 0.1–13% of the elements but
//! nearly every 4 KiB block, so blocks are the wrong grain: the payload lists
//! the changed *elements* (positions) and what changed in them (XOR values).
//! XOR is its own inverse, so one payload takes old to new and new to old.
//!
//! # Payload layout (version 1)
//!
//! The caller stores the record's byte length `len` and element width `w`
//! (1, 2, 4 or 8) in its own header. Element `i` is bytes `[i*w, (i+1)*w)`;
//! `n = ceil(len / w)` elements, the last one short when `w` does not divide
//! `len`. Integers are unsigned LEB128 varints (7 bits a byte, low first, high
//! bit set on all but the last byte, at most 10 bytes).
//!
//! | field     | size        | meaning |
//! |-----------|-------------|---------|
//! | version   | 1 byte      | `1` |
//! | mode      | 1 byte      | bit 0: positions are a bitmap (else gaps); bit 1: body is zstd (else stored); other bits 0 |
//! | `k`       | varint      | number of elements whose XOR is nonzero, `k <= n` |
//! | `body_len`| varint      | length of the *uncompressed* body |
//! | body      | rest        | stored: exactly `body_len` bytes; zstd: one or more zstd frames that decompress to exactly `body_len` bytes |
//!
//! When `k = 0` the payload is exactly `01 00 00 00`: mode 0, `body_len` 0, no body.
//!
//! The uncompressed body is the positions section followed by the values section:
//!
//! - **Positions, gaps** (mode bit 0 clear): element `e_0 < e_1 < ... < e_{k-1}`
//!   as gaps `g_0 = e_0`, `g_i = e_i - e_{i-1} - 1`, each a LEB128 varint,
//!   *split*: first the first byte of every gap (exactly `k` bytes), then the
//!   remaining bytes of the gaps that need more than one, in order. Its length
//!   is at most `ceil(n / 8)` (else the encoder writes the bitmap), and at least `k`.
//! - **Positions, bitmap** (mode bit 0 set): `ceil(n / 8)` bytes, bit `e % 8`
//!   (least significant first) of byte `e / 8` set for each listed element; exactly
//!   `k` bits set, none at `e >= n`.
//! - **Values**: `w` planes of `k` bytes each: plane `j` holds byte `j` (in
//!   memory order) of each listed element's XOR, in position order. A short
//!   last element's missing bytes are zero in the planes. Every listed element
//!   has a nonzero XOR.
//!
//! So `body_len = positions + k * w`, and a reader bounds every buffer by
//! `ceil(n / 8) + k * w` bytes, a little over `len`.
//!
//! # Why this encoding
//!
//! Measured on one optimizer step of a bf16 Qwen3 (4 layers, hidden 512, 42 MB,
//! weights N(0, 0.02), a random 4×256-token batch), the records being the runs
//! of changed 4 KiB blocks inside each 4 MiB of the file. Sizes are payload
//! bytes as % of the model; "log" adds 8 B of hash per changed 4 KiB block
//! and 32 B per record. The first five columns come from a prototype of the
//! same sections (8 B a record added for a header), one zstd block per body;
//! "gaps z3" is the starting point; lz4 and stored take the smaller of gaps
//! and bitmap.
//!
//! | step        | elements | blocks | gaps z1 | bitmap z1 | gaps z3 | lz4    | stored | **this** | log   |
//! |-------------|----------|--------|---------|-----------|---------|--------|--------|----------|-------|
//! | APOLLO 1e-6 | 0.65%    | 87.8%  | 0.623   | 0.849     | 0.627   | 0.789  | 1.095  | **0.574**| 0.78% |
//! | APOLLO 1e-5 | 6.35%    | 87.8%  | 3.833   | 4.095     | 3.964   | 6.301  | 9.542  | **3.830**| 4.04% |
//! | AdamW 1e-6  | 1.60%    | 87.8%  | 1.274   | 1.611     | 1.276   | 1.628  | 2.474  | **1.159**| 1.37% |
//! | AdamW 1e-5  | 12.76%   | 87.8%  | 6.346   | 6.395     | 6.840   | 10.586 | 17.946 | **6.377**| 6.59% |
//!
//! The order-0 entropy of gaps plus values is 1.54, 1.12, 1.32 and 0.91 B per
//! changed element; this codec spends 1.78, 1.21, 1.45 and 1.00.
//!
//! - **Positions carry most of the information.** Which elements change depends on
//!   each weight's magnitude against the update, and the codec cannot see that
//!   (it must decode without the old or new bytes), so positions look random and
//!   cost about their entropy, 0.5–1.1 B each. Gaps as varints reach that under
//!   zstd's Huffman coding; a bitmap does too when dense, and is smaller raw
//!   above one change in 8 elements, so the encoder picks the smaller raw section.
//!   Splitting first bytes from continuation bytes keeps the first-byte
//!   statistics clean (−1–2% at low density).
//! - **Values split in byte planes.** For bf16 the XOR of a small update is
//!   mostly `0x01`, `0x03`, `0x07`... in the low byte and zero in the high byte
//!   (98.5%): each plane is its own zstd block with its own Huffman table, so the
//!   high plane costs next to nothing (−4–9% at low density against one block
//!   for the whole body, +0.5% at 13%). The format does not depend on this: the
//!   encoder ends a zstd block after each section, the decoder sees one
//!   ordinary frame.
//! - **zstd level 1** compresses these bodies better than level 3 (matches do not
//!   pay on entropy-like bytes) and faster; lz4 is 25–65% larger. Its match
//!   finder is kept to the smallest table (hash log 6) and the longest minimum
//!   match (7): on one real AdamW lr 1e-5 step (159 MB, 14% of elements) the
//!   payload went from 6.88% to 6.73% of the model and encoding 1.4× faster;
//!   skipping ahead in the match finder (target length 16–1000, Huffman-coded
//!   literals forced on) saved no time and grew the payload to 6.83–7.35%. Stored is the
//!   fallback when zstd does not make the body smaller (short records: most
//!   of the embedding's, whose changed rows are scattered).
//!
//! Speed, one core of a 2-core x86 VM (`benches/codec.rs`, synthetic bf16, 4 MiB):
//! encode 25.8 / 5.5 / 2.4 GiB/s and apply 165 / 19.6 / 3.0 GiB/s at 0.1 / 1 / 10%
//! of the elements changed. On real steps (`examples/codec_files.rs` on
//! 159 MB dumps of one step by `benches/probes/dump_step.py`, 4 MiB
//! records): AdamW lr 1e-5 (14% of elements) encodes in 0.052–0.067 s
//! (2.4–3.1 GB/s; 0.120–0.131 s before the one-pass scan below), APOLLO
//! lr 1e-5 (5%) in 0.041–0.045 s (0.050–0.053 s before).
//! The scan is one pass: each 16 bytes of `old XOR new` give one bitmap byte,
//! and for bf16/fp16 one SSSE3 `pshufb` moves the nonzero elements' low and
//! high bytes into the two planes (no branch per element: on a training
//! step a branch per element mispredicts about as often as it is taken).
//! The gaps, when they are smaller than the bitmap, are then written from
//! the bitmap; above one changed element in eight they never are.
//! - **Version and mode first**, so the format can change without guessing.

mod codec;

pub use codec::{Codec, CodecError, VERSION};
