//! PLACEHOLDER codec: mode byte 0, element count (u64), then the XOR bytes.

/// A payload that cannot be decoded.
#[derive(Debug, thiserror::Error)]
#[error("bad delta payload: {0}")]
pub struct CodecError(pub String);

/// Reusable per-thread codec state.
#[derive(Default)]
pub struct Codec;

impl Codec {
    pub fn new() -> Self {
        Codec
    }

    pub fn encode(
        &mut self,
        old: &[u8],
        new: &[u8],
        width: usize,
        out: &mut Vec<u8>,
    ) -> Result<u64, CodecError> {
        check_width(width)?;
        if old.len() != new.len() {
            return Err(CodecError("lengths differ".into()));
        }
        let mut n = 0u64;
        for (o, w) in old.chunks(width).zip(new.chunks(width)) {
            n += (o != w) as u64;
        }
        out.push(0);
        out.extend_from_slice(&n.to_le_bytes());
        out.extend(old.iter().zip(new).map(|(a, b)| a ^ b));
        Ok(n)
    }

    pub fn decode(
        &mut self,
        payload: &[u8],
        width: usize,
        xor: &mut [u8],
    ) -> Result<(), CodecError> {
        check_width(width)?;
        if payload.len() != 9 + xor.len() || payload[0] != 0 {
            return Err(CodecError("length or mode".into()));
        }
        xor.copy_from_slice(&payload[9..]);
        Ok(())
    }

    pub fn apply(
        &mut self,
        payload: &[u8],
        width: usize,
        target: &mut [u8],
    ) -> Result<(), CodecError> {
        check_width(width)?;
        if payload.len() != 9 + target.len() || payload[0] != 0 {
            return Err(CodecError("length or mode".into()));
        }
        for (t, x) in target.iter_mut().zip(&payload[9..]) {
            *t ^= x;
        }
        Ok(())
    }

    pub fn elements(payload: &[u8]) -> Result<u64, CodecError> {
        let b = payload
            .get(1..9)
            .ok_or_else(|| CodecError("short".into()))?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

fn check_width(width: usize) -> Result<(), CodecError> {
    match width {
        1 | 2 | 4 | 8 => Ok(()),
        w => Err(CodecError(format!("element width {w}"))),
    }
}
