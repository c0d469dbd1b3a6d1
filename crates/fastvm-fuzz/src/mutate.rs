//! A small deterministic byte mutator: the budgeted runner's stand-in for
//! libFuzzer's mutations (no coverage feedback). Each call picks a seed and
//! applies 1 to 8 mutations.

use rand::{rngs::StdRng, seq::SliceRandom, Rng};

/// Integers that sit on the edges of length and count checks.
const INTERESTING_U32: &[u32] = &[
    0,
    1,
    2,
    4,
    5,
    11,
    0x7f,
    0x80,
    0xff,
    0x100,
    0xffff,
    0x1_0000,
    1 << 20,
    (1 << 20) + 1,
    0x7fff_ffff,
    0x8000_0000,
    u32::MAX,
];

/// A mutation of one of `seeds` (which must not be empty).
pub fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds.choose(rng).cloned().unwrap_or_default();
    let rounds = rng.gen_range(1..=8);
    for _ in 0..rounds {
        apply(rng, seeds, &mut data);
    }
    data
}

fn apply(rng: &mut StdRng, seeds: &[Vec<u8>], data: &mut Vec<u8>) {
    let len = data.len();
    match rng.gen_range(0..9) {
        // Flip one bit.
        0 if len > 0 => {
            let i = rng.gen_range(0..len);
            data[i] ^= 1 << rng.gen_range(0..8);
        }
        // Overwrite one byte.
        1 if len > 0 => {
            let i = rng.gen_range(0..len);
            data[i] = *[0u8, 0xff, 0x7f, 0x80, b'"', b'\\', b'\n', b'/', b'.', 0]
                .choose(rng)
                .unwrap_or(&0);
            if rng.gen_bool(0.5) {
                data[i] = rng.gen();
            }
        }
        // Write a boundary integer (little or big endian).
        2 if len >= 4 => {
            let i = rng.gen_range(0..=len - 4);
            let v = *INTERESTING_U32.choose(rng).unwrap_or(&0);
            let bytes = if rng.gen_bool(0.5) {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            };
            data[i..i + 4].copy_from_slice(&bytes);
        }
        // Insert random bytes.
        3 => {
            let i = rng.gen_range(0..=len);
            let n = rng.gen_range(1..=16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            data.splice(i..i, bytes);
        }
        // Delete a range.
        4 if len > 0 => {
            let i = rng.gen_range(0..len);
            let n = rng.gen_range(1..=(len - i).min(64));
            data.drain(i..i + n);
        }
        // Duplicate a range in place.
        5 if len > 0 => {
            let i = rng.gen_range(0..len);
            let n = rng.gen_range(1..=(len - i).min(64));
            let copy = data[i..i + n].to_vec();
            data.splice(i..i, copy);
        }
        // Splice in a piece of another seed.
        6 => {
            if let Some(other) = seeds.choose(rng).filter(|s| !s.is_empty()) {
                let from = rng.gen_range(0..other.len());
                let n = rng.gen_range(1..=(other.len() - from).min(256));
                let at = rng.gen_range(0..=len);
                data.splice(at..at, other[from..from + n].iter().copied());
            }
        }
        // Truncate.
        7 if len > 0 => {
            let keep = rng.gen_range(0..len);
            data.truncate(keep);
        }
        // Repeat the whole input (long and repeated structures).
        8 if len > 0 && len < 64 << 10 => {
            let copy = data.clone();
            data.extend_from_slice(&copy);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn deterministic_for_a_seed() {
        let seeds = vec![b"0123456789abcdef".to_vec()];
        let a: Vec<_> = {
            let mut r = StdRng::seed_from_u64(7);
            (0..50).map(|_| mutate(&mut r, &seeds)).collect()
        };
        let b: Vec<_> = {
            let mut r = StdRng::seed_from_u64(7);
            (0..50).map(|_| mutate(&mut r, &seeds)).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().any(|m| m != &seeds[0]),
            "mutations change the input"
        );
    }

    #[test]
    fn empty_seeds_are_fine() {
        let mut r = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            let _ = mutate(&mut r, &[Vec::new()]);
        }
    }
}
