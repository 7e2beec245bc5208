// SPDX-License-Identifier: Apache-2.0
//! Per-guest deterministic random bit generator (DRBG mode).
//!
//! Each guest stream is a CTR_DRBG in the manner of NIST SP 800-90A
//! (10.2.1): AES-256 in counter mode (RustCrypto `aes` and `ctr`, on AES-NI
//! where the CPU has it, chosen at run time), a 256-bit key and a 128-bit
//! counter `V`, no derivation function. It is seeded with 256 bits of
//! full-entropy conditioner output that no other guest ever receives, so no
//! two guests share a stream.
//!
//! Every call of [`Drbg::generate`] is one generate request of the standard:
//! the output is the keystream from `V + 1` on, and before the call returns
//! the key and counter are replaced by the next 48 bytes of that keystream
//! (the standard's update step). The key that produced the output is gone
//! once the caller has it ("fast key erasure"): bytes already handed out
//! cannot be recomputed from the daemon's memory later. How often that
//! happens is the caller's choice: the vhost-user data path asks once for
//! a batch of a queue pass's requests (see docs/entropy.md for the
//! argument).
//!
//! The generator must be reseeded with fresh conditioned entropy at least
//! every `reseed_bytes` bytes and every `reseed_interval`; once a bound is
//! reached and no seed is available it hands out nothing (fail closed)
//! instead of running on.

use std::time::{Duration, Instant};

use aes::Aes256Enc;
use aes::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use zeroize::Zeroizing;

/// Size of a seed: one conditioned block, the key's size.
pub const SEED_BYTES: usize = 32;

/// Most bytes one key produces before the update step replaces it: SP
/// 800-90A's bound for one AES CTR_DRBG request (2^19 bits). Longer calls
/// of [`Drbg::generate`] re-key every this many bytes.
pub const MAX_BYTES_PER_KEY: usize = 1 << 16;

const KEY_BYTES: usize = 32;
const BLOCK_BYTES: usize = 16;
/// Key and V together: the standard's seedlen.
const STATE_BYTES: usize = KEY_BYTES + BLOCK_BYTES;

/// AES-256 in counter mode with a 128-bit big-endian counter.
type Keystream = ctr::Ctr128BE<Aes256Enc>;

/// Whether AES runs on the CPU's AES instructions here (else RustCrypto's
/// constant-time software AES, several times slower).
pub fn hardware_accelerated() -> bool {
    aes::hardware_accelerated()
}

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
    /// The working state: the key, then V. Wiped when replaced or dropped.
    state: Zeroizing<[u8; STATE_BYTES]>,
    seeded_at: Instant,
    bytes_since_seed: u64,
}

impl Seeded {
    /// The standard's instantiate step starts from an all-zero key and V.
    fn zero(now: Instant) -> Self {
        Seeded {
            state: Zeroizing::new([0; STATE_BYTES]),
            seeded_at: now,
            bytes_since_seed: 0,
        }
    }

    /// AES-256 under the current key, counting from V + 1; `None` only if
    /// the state had the wrong length, which it cannot.
    fn keystream(&self) -> Option<Keystream> {
        let (key, v) = self.state.split_at(KEY_BYTES);
        let v = u128::from_be_bytes(v.try_into().ok()?);
        Keystream::new_from_slices(key, &v.wrapping_add(1).to_be_bytes()).ok()
    }

    /// The update step: key and V become the next 48 bytes of keystream,
    /// XORed with `provided` (a seed on reseed, nothing after output).
    /// False (state unchanged) if the 128-bit counter would wrap first,
    /// which 2^-120 of all states come near.
    fn update(&mut self, cipher: Option<Keystream>, provided: Option<&[u8; STATE_BYTES]>) -> bool {
        let Some(mut cipher) = cipher else {
            return false;
        };
        // The cipher has its own copy of the key, so the state can be
        // overwritten in place: no other copy of the new key is made.
        // It checks the counter before it writes anything.
        if cipher.try_write_keystream(self.state.as_mut()).is_err() {
            return false;
        }
        if let Some(provided) = provided {
            for (n, p) in self.state.iter_mut().zip(provided) {
                *n ^= p;
            }
        }
        true
    }

    /// One generate request of at most [`MAX_BYTES_PER_KEY`] bytes: the
    /// keystream into `out`, then the update step. False if the counter
    /// would wrap (nothing usable was produced).
    fn produce(&mut self, out: &mut [u8]) -> bool {
        debug_assert!(out.len() <= MAX_BYTES_PER_KEY);
        let Some(mut cipher) = self.keystream() else {
            return false;
        };
        if cipher.try_write_keystream(out).is_err() {
            return false;
        }
        // The rest of the last block is discarded, as the standard does:
        // the update starts at the next whole block.
        let used_blocks = out.len().div_ceil(BLOCK_BYTES) as u64;
        if cipher.try_seek(used_blocks * BLOCK_BYTES as u64).is_err() {
            return false;
        }
        self.update(Some(cipher), None)
    }
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

    /// Mixes a fresh full-entropy seed in: the standard's reseed (or, the
    /// first time, instantiate) with the seed as entropy input, zero-padded
    /// to the 384 bits of key and V. The new key depends on both the seed
    /// and the current state, so a reseed never weakens the generator.
    pub fn reseed(&mut self, seed: &[u8; SEED_BYTES], now: Instant) {
        let mut provided = Zeroizing::new([0u8; STATE_BYTES]);
        provided[..SEED_BYTES].copy_from_slice(seed);
        let mut seeded = self.state.take().unwrap_or_else(|| Seeded::zero(now));
        let cipher = seeded.keystream();
        if !seeded.update(cipher, Some(&provided)) {
            // Only a counter about to wrap gets here; start over from the
            // seed alone rather than not at all.
            seeded = Seeded::zero(now);
            let cipher = seeded.keystream();
            seeded.update(cipher, Some(&provided));
        }
        seeded.seeded_at = now;
        seeded.bytes_since_seed = 0;
        self.state = Some(seeded);
    }

    /// Fills `buf` unless a reseed is due, returning the bytes written (all
    /// of `buf`, or 0). Output past the byte bound is cut to the bound.
    /// Before it returns, the key that produced the bytes is replaced
    /// (every [`MAX_BYTES_PER_KEY`] bytes, and at the end).
    pub fn generate(&mut self, buf: &mut [u8], now: Instant) -> usize {
        if self.needs_reseed(now) {
            return 0;
        }
        let Some(seeded) = &mut self.state else {
            return 0;
        };
        let left = self.policy.max_bytes - seeded.bytes_since_seed;
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let mut written = 0;
        for chunk in buf[..n].chunks_mut(MAX_BYTES_PER_KEY) {
            if !seeded.produce(chunk) {
                // Fail closed: nothing more until a new seed.
                self.state = None;
                return written;
            }
            written += chunk.len();
        }
        seeded.bytes_since_seed += n as u64;
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

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// AES-256 of single blocks, by the block cipher alone: an independent
    /// check of the counter mode and of the update step.
    fn aes_blocks(key: &[u8], first_counter: u128, blocks: usize) -> Vec<u8> {
        use aes::cipher::{BlockCipherEncrypt, KeyInit};
        let cipher = Aes256Enc::new_from_slice(key).unwrap();
        let mut out = Vec::new();
        for i in 0..blocks {
            let mut block = first_counter.wrapping_add(i as u128).to_be_bytes().into();
            cipher.encrypt_block(&mut block);
            out.extend_from_slice(&block);
        }
        out
    }

    fn state_of(drbg: &Drbg) -> [u8; STATE_BYTES] {
        *drbg.state.as_ref().unwrap().state
    }

    fn with_state(state: &[u8], now: Instant) -> Drbg {
        let mut seeded = Seeded::zero(now);
        seeded.state.copy_from_slice(state);
        Drbg {
            policy: ReseedPolicy::default(),
            state: Some(seeded),
        }
    }

    #[test]
    fn keystream_is_aes_256_ctr_as_in_sp_800_38a() {
        // NIST SP 800-38A, F.5.5 (CTR-AES256.Encrypt): the keystream is
        // ciphertext XOR plaintext. V is the initial counter block minus
        // one: CTR_DRBG counts from V + 1.
        let key = hex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4");
        let v = (u128::from_be_bytes(hex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff").try_into().unwrap())
            - 1)
        .to_be_bytes();
        let plain = hex(concat!(
            "6bc1bee22e409f96e93d7e117393172a",
            "ae2d8a571e03ac9c9eb76fac45af8e51",
            "30c81c46a35ce411e5fbc1191a0a52ef",
            "f69f2445df4f9b17ad2b417be66c3710"
        ));
        let cipher = hex(concat!(
            "601ec313775789a5b7a7f504bbf3d228",
            "f443e3ca4d62b59aca84e990cacaf5c5",
            "2b0930daa23de94ce87017ba2d84988d",
            "dfc9c58db67aada613c2dd08457941a6"
        ));
        let expected: Vec<u8> = plain.iter().zip(&cipher).map(|(p, c)| p ^ c).collect();
        let now = Instant::now();
        let mut drbg = with_state(&[key.as_slice(), &v].concat(), now);
        let mut out = [0u8; 64];
        assert_eq!(drbg.generate(&mut out, now), 64);
        assert_eq!(out.as_slice(), expected.as_slice());
    }

    #[test]
    fn every_generate_replaces_key_and_v_with_the_next_blocks() {
        let now = Instant::now();
        let mut drbg = Drbg::new(ReseedPolicy::default());
        drbg.reseed(&[0x42; 32], now);
        // 20 bytes use two blocks (the rest of the second is dropped): the
        // update takes blocks 3 to 5, AES(K, V+3) .. AES(K, V+5).
        for len in [20usize, 64, 4096, 1] {
            let before = state_of(&drbg);
            let v = u128::from_be_bytes(before[KEY_BYTES..].try_into().unwrap());
            let blocks = len.div_ceil(BLOCK_BYTES);
            let expected_output = aes_blocks(&before[..KEY_BYTES], v.wrapping_add(1), blocks);
            let expected_state = aes_blocks(
                &before[..KEY_BYTES],
                v.wrapping_add(1 + blocks as u128),
                STATE_BYTES / BLOCK_BYTES,
            );
            let mut out = vec![0u8; len];
            assert_eq!(drbg.generate(&mut out, now), len);
            assert_eq!(out, expected_output[..len]);
            let after = state_of(&drbg);
            assert_eq!(after.as_slice(), expected_state.as_slice());
            assert_ne!(after[..KEY_BYTES], before[..KEY_BYTES], "the key changed");
        }
    }

    #[test]
    fn instantiate_and_reseed_are_the_update_step_with_the_seed() {
        let now = Instant::now();
        let seed = [0x17u8; 32];
        let mut padded = seed.to_vec();
        padded.resize(STATE_BYTES, 0);
        let xor = |a: &[u8], b: &[u8]| a.iter().zip(b).map(|(x, y)| x ^ y).collect::<Vec<u8>>();

        // Instantiate: from key 0 and V 0.
        let mut drbg = Drbg::new(ReseedPolicy::default());
        drbg.reseed(&seed, now);
        let zero_key = [0u8; KEY_BYTES];
        let first = xor(&aes_blocks(&zero_key, 1, 3), &padded);
        assert_eq!(state_of(&drbg).as_slice(), first.as_slice());

        // Reseed: from the current key and V.
        let mut out = [0u8; 32];
        drbg.generate(&mut out, now);
        let before = state_of(&drbg);
        let v = u128::from_be_bytes(before[KEY_BYTES..].try_into().unwrap());
        drbg.reseed(&seed, now);
        let expected = xor(
            &aes_blocks(&before[..KEY_BYTES], v.wrapping_add(1), 3),
            &padded,
        );
        assert_eq!(state_of(&drbg).as_slice(), expected.as_slice());
    }

    #[test]
    fn long_requests_take_a_new_key_every_64_kib() {
        let now = Instant::now();
        let mut whole = Drbg::new(ReseedPolicy::default());
        let mut parts = Drbg::new(ReseedPolicy::default());
        whole.reseed(&[0x99; 32], now);
        parts.reseed(&[0x99; 32], now);
        let len = MAX_BYTES_PER_KEY + 1000;
        let mut a = vec![0u8; len];
        assert_eq!(whole.generate(&mut a, now), len);
        let mut b = vec![0u8; len];
        let (first, second) = b.split_at_mut(MAX_BYTES_PER_KEY);
        assert_eq!(parts.generate(first, now), MAX_BYTES_PER_KEY);
        assert_eq!(parts.generate(second, now), 1000);
        assert_eq!(a, b);
        assert_eq!(state_of(&whole), state_of(&parts));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn aes_instructions_are_used_where_the_cpu_has_them() {
        assert_eq!(
            hardware_accelerated(),
            std::arch::is_x86_feature_detected!("aes")
        );
    }

    #[test]
    fn many_seeds_give_distinct_outputs() {
        let now = Instant::now();
        let mut seen = std::collections::HashSet::new();
        for i in 0..=255u8 {
            let mut seed = [0u8; 32];
            seed[31] = i;
            let mut drbg = Drbg::new(ReseedPolicy::default());
            drbg.reseed(&seed, now);
            let mut out = [0u8; 16];
            assert_eq!(drbg.generate(&mut out, now), 16);
            assert!(seen.insert(out), "seed {i} repeated an earlier output");
        }
    }
}
