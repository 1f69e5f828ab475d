//! Deterministic test/verification data: the same seed always yields the same
//! bytes, with no dependencies, so a writer and a later checker (possibly in
//! another process, e.g. after a crash) agree on what a block must hold.

/// xorshift64*: deterministic, dependency-free pseudo-randomness.
///
/// Not for anything security-related. A zero state stays zero; seed with a
/// non-zero value.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next pseudo-random value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A pseudo-random value in `0..n` (`n` must not be 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Deterministic test/verification data: a buffer of `len` pseudo-random
/// bytes derived from `seed`, never all zero (the first byte is odd).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut v: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
    if let Some(first) = v.first_mut() {
        *first |= 1;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_never_zero() {
        assert_eq!(pattern(7, 4096), pattern(7, 4096));
        assert_ne!(pattern(7, 4096), pattern(8, 4096));
        assert_eq!(pattern(7, 100), pattern(7, 4096)[..100]);
        assert!(pattern(0, 0).is_empty());
        for seed in 0..1000 {
            assert_eq!(pattern(seed, 1)[0] & 1, 1, "seed {seed}");
        }
    }
}
