// SPDX-License-Identifier: Apache-2.0
//! Per-guest deterministic random bit generator (DRBG mode).
//!
//! Each guest stream is a ChaCha20 generator (RustCrypto `chacha20`) keyed
//! with 256 bits of full-entropy conditioner output that no other guest ever
//! receives, so no two guests share a stream. After every request the key is
//! replaced by fresh generator output ("fast key erasure"): bytes already
//! handed to a guest cannot be recomputed from the daemon's memory later.
//!
//! The generator must be reseeded with fresh conditioned entropy at least
//! every `reseed_bytes` bytes and every `reseed_interval`; once a bound is
//! reached and no seed is available it hands out nothing (fail closed)
//! instead of running on.

use std::time::{Duration, Instant};

use chacha20::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use zeroize::Zeroizing;

/// Size of a seed: one ChaCha20 key.
pub const SEED_BYTES: usize = 32;

/// When a generator must take a new seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReseedPolicy {
    /// Most bytes generated from one seed.
    pub max_bytes: u64,
    /// Longest time one seed is used.
    pub max_age: Duration,
}

impl Default for ReseedPolicy {
    fn default() -> Self {
        ReseedPolicy {
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
        }
    }
}

/// A seeded generator and the use it has had since its last seed.
pub struct Drbg {
    policy: ReseedPolicy,
    state: Option<Seeded>,
}

struct Seeded {
    rng: ChaCha20Rng,
    seeded_at: Instant,
    bytes_since_seed: u64,
}

impl Drbg {
    /// An unseeded generator: it produces nothing until [`Drbg::reseed`].
    pub fn new(policy: ReseedPolicy) -> Self {
        Drbg {
            policy,
            state: None,
        }
    }

    /// Whether a new seed is needed before more output (never seeded, or a
    /// reseed bound reached).
    pub fn needs_reseed(&self, now: Instant) -> bool {
        match &self.state {
            None => true,
            Some(seeded) => {
                seeded.bytes_since_seed >= self.policy.max_bytes
                    || now.saturating_duration_since(seeded.seeded_at) >= self.policy.max_age
            }
        }
    }

    /// Whether three quarters of a reseed bound are used up: the time to
    /// reseed if a seed is at hand, before the hard bound stops output.
    pub fn due_soon(&self, now: Instant) -> bool {
        match &self.state {
            None => true,
            Some(seeded) => {
                seeded.bytes_since_seed >= self.policy.max_bytes / 4 * 3
                    || now.saturating_duration_since(seeded.seeded_at)
                        >= self.policy.max_age / 4 * 3
            }
        }
    }

    /// Mixes a fresh full-entropy seed in. The new key depends on both the
    /// seed and the current state, so a reseed never weakens the generator.
    pub fn reseed(&mut self, seed: &[u8; SEED_BYTES], now: Instant) {
        // The key and what it is made of are wiped once the generator has
        // it; the old generator (and its key) is wiped as it is replaced.
        let mut key = Zeroizing::new(*seed);
        if let Some(seeded) = &mut self.state {
            let mut carried = Zeroizing::new([0u8; SEED_BYTES]);
            seeded.rng.fill_bytes(carried.as_mut());
            for (k, c) in key.iter_mut().zip(carried.iter()) {
                *k ^= c;
            }
        }
        self.state = Some(Seeded {
            rng: ChaCha20Rng::from_seed(*key),
            seeded_at: now,
            bytes_since_seed: 0,
        });
    }

    /// Fills `buf` unless a reseed is due, returning the bytes written (all
    /// of `buf`, or 0). Output past the byte bound is cut to the bound.
    pub fn generate(&mut self, buf: &mut [u8], now: Instant) -> usize {
        if self.needs_reseed(now) {
            return 0;
        }
        let Some(seeded) = &mut self.state else {
            return 0;
        };
        let left = self.policy.max_bytes - seeded.bytes_since_seed;
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        seeded.rng.fill_bytes(&mut buf[..n]);
        seeded.bytes_since_seed += n as u64;

        // Fast key erasure: the key that produced `buf` is gone (the old
        // generator is wiped as it is dropped), and so is this copy of the
        // next one.
        let mut next_key = Zeroizing::new([0u8; SEED_BYTES]);
        seeded.rng.fill_bytes(next_key.as_mut());
        seeded.rng = ChaCha20Rng::from_seed(*next_key);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_bytes: u64, secs: u64) -> ReseedPolicy {
        ReseedPolicy {
            max_bytes,
            max_age: Duration::from_secs(secs),
        }
    }

    #[test]
    fn unseeded_generator_produces_nothing() {
        let mut drbg = Drbg::new(ReseedPolicy::default());
        let mut buf = [0u8; 16];
        assert!(drbg.needs_reseed(Instant::now()));
        assert_eq!(drbg.generate(&mut buf, Instant::now()), 0);
        assert_eq!(buf, [0; 16]);
    }

    #[test]
    fn different_seeds_give_different_streams_and_output_never_repeats() {
        let now = Instant::now();
        let mut a = Drbg::new(ReseedPolicy::default());
        let mut b = Drbg::new(ReseedPolicy::default());
        a.reseed(&[1; 32], now);
        b.reseed(&[2; 32], now);
        let (mut x, mut y) = ([0u8; 64], [0u8; 64]);
        assert_eq!(a.generate(&mut x, now), 64);
        assert_eq!(b.generate(&mut y, now), 64);
        assert_ne!(x, y);
        let mut x2 = [0u8; 64];
        a.generate(&mut x2, now);
        assert_ne!(x, x2);
    }

    #[test]
    fn same_seed_is_deterministic() {
        let now = Instant::now();
        let mut a = Drbg::new(ReseedPolicy::default());
        let mut b = Drbg::new(ReseedPolicy::default());
        a.reseed(&[7; 32], now);
        b.reseed(&[7; 32], now);
        let (mut x, mut y) = ([0u8; 100], [0u8; 100]);
        a.generate(&mut x, now);
        b.generate(&mut y, now);
        assert_eq!(x, y);
    }

    #[test]
    fn stops_at_the_byte_bound_until_reseeded() {
        let now = Instant::now();
        let mut drbg = Drbg::new(policy(100, 60));
        drbg.reseed(&[3; 32], now);
        let mut buf = [0u8; 64];
        assert_eq!(drbg.generate(&mut buf, now), 64);
        // Only 36 bytes of budget remain: the request is cut to the bound.
        assert_eq!(drbg.generate(&mut buf, now), 36);
        assert!(drbg.needs_reseed(now));
        assert_eq!(drbg.generate(&mut buf, now), 0);

        drbg.reseed(&[4; 32], now);
        assert_eq!(drbg.generate(&mut buf, now), 64);
    }

    #[test]
    fn stops_at_the_age_bound_until_reseeded() {
        let start = Instant::now();
        let mut drbg = Drbg::new(policy(u64::MAX, 60));
        drbg.reseed(&[5; 32], start);
        let mut buf = [0u8; 8];
        assert_eq!(drbg.generate(&mut buf, start + Duration::from_secs(59)), 8);
        let late = start + Duration::from_secs(60);
        assert!(drbg.needs_reseed(late));
        assert_eq!(drbg.generate(&mut buf, late), 0);
        drbg.reseed(&[6; 32], late);
        assert_eq!(drbg.generate(&mut buf, late), 8);
    }

    #[test]
    fn due_soon_at_three_quarters_of_either_bound() {
        let start = Instant::now();
        let mut drbg = Drbg::new(policy(1000, 60));
        drbg.reseed(&[1; 32], start);
        assert!(!drbg.due_soon(start));
        let mut buf = [0u8; 750];
        drbg.generate(&mut buf, start);
        assert!(drbg.due_soon(start));
        assert!(!drbg.needs_reseed(start));

        drbg.reseed(&[2; 32], start);
        assert!(!drbg.due_soon(start + Duration::from_secs(44)));
        assert!(drbg.due_soon(start + Duration::from_secs(45)));
    }

    #[test]
    fn reseed_depends_on_previous_state() {
        let now = Instant::now();
        let mut fresh = Drbg::new(ReseedPolicy::default());
        fresh.reseed(&[9; 32], now);
        let mut reseeded = Drbg::new(ReseedPolicy::default());
        reseeded.reseed(&[8; 32], now);
        reseeded.reseed(&[9; 32], now);
        let (mut x, mut y) = ([0u8; 32], [0u8; 32]);
        fresh.generate(&mut x, now);
        reseeded.generate(&mut y, now);
        assert_ne!(x, y, "a reseed must not discard the old state");
    }
}
