//! The delta codec on arbitrary payloads: `Codec::decode` and `Codec::apply`
//! for any payload, element width and target length. Either succeeds, or
//! fails leaving its target as it was; applying twice is a no-op.
//!
//! Input: width selector (1 byte; 1, 2, 4, 8 or anything else), target
//! length (2 bytes, little endian), then the payload.
#![no_main]

use apollo_sync_core::delta::Codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [w, l0, l1, payload @ ..] = data else {
        return;
    };
    let width = match w % 5 {
        0 => 1,
        1 => 2,
        2 => 4,
        3 => 8,
        _ => *w as usize, // mostly invalid widths
    };
    let len = u16::from_le_bytes([*l0, *l1]) as usize;
    let mut codec = Codec::new();
    let _ = Codec::elements(payload);

    let mut xor = vec![0xa5u8; len];
    let decoded = codec.decode(payload, width, &mut xor).is_ok();
    if !decoded {
        assert!(xor.iter().all(|&b| b == 0xa5), "decode wrote on error");
    }

    let old: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31)).collect();
    let mut t = old.clone();
    match codec.apply(payload, width, &mut t) {
        Ok(()) => {
            assert!(decoded, "apply took what decode refused");
            let want: Vec<u8> = old.iter().zip(&xor).map(|(a, b)| a ^ b).collect();
            assert_eq!(t, want, "apply is not XOR with the decoded bytes");
            codec.apply(payload, width, &mut t).unwrap();
            assert_eq!(t, old, "applying twice is not a no-op");
        }
        Err(_) => {
            assert!(!decoded, "decode took what apply refused");
            assert_eq!(t, old, "apply wrote on error");
        }
    }
});
