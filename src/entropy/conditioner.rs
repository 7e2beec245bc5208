// SPDX-License-Identifier: Apache-2.0
//! The conditioner: turns health-tested raw input from all sources into
//! full-entropy blocks.
//!
//! It is HMAC-SHA-256, one of the vetted conditioning components of
//! SP 800-90B (3.1.5.1.1). Input is credited at each source's min-entropy
//! estimate; a 256-bit output block is released only once the input behind
//! it carries at least 256 + 64 bits of credited entropy, which SP 800-90C
//! requires for the output to count as full entropy. Surplus credit is not
//! carried over into the next block: conservative, and simple to audit.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Bytes in one full-entropy output block.
pub const BLOCK_BYTES: usize = 32;
/// Credited input bits needed for one full-entropy block: output bits + 64.
pub const BITS_PER_BLOCK: f64 = (BLOCK_BYTES * 8 + 64) as f64;

type HmacSha256 = Hmac<Sha256>;

/// Accumulates credited input and releases full-entropy blocks.
pub struct Conditioner {
    /// HMAC keyed once; each block starts from a copy of it, which saves
    /// rehashing the key for every block.
    keyed: HmacSha256,
    mac: HmacSha256,
    credited_bits: f64,
    blocks: u64,
}

impl Conditioner {
    /// `key` need not be secret (SP 800-90B allows a fixed key); a random
    /// per-process key costs nothing and keeps outputs of different daemons
    /// unrelated even on identical input.
    pub fn new(key: [u8; 32]) -> Self {
        let keyed = new_mac(&key);
        Conditioner {
            mac: keyed.clone(),
            keyed,
            credited_bits: 0.0,
            blocks: 0,
        }
    }

    /// Absorbs `input` credited at `min_entropy` bits per byte, appending
    /// every full-entropy block that becomes available to `out`.
    ///
    /// Input is absorbed in pieces no larger than one block's worth of
    /// credit, so a large chunk yields several blocks, each backed by its
    /// own input.
    pub fn absorb(&mut self, mut input: &[u8], min_entropy: f64, out: &mut Vec<[u8; BLOCK_BYTES]>) {
        if !(min_entropy > 0.0 && min_entropy <= 8.0) {
            // Uncredited input: mixed in, but it can never release output.
            self.mac.update(input);
            return;
        }
        while !input.is_empty() {
            let missing_bits = BITS_PER_BLOCK - self.credited_bits;
            let bytes_needed = (missing_bits / min_entropy).ceil().max(1.0) as usize;
            let take = bytes_needed.min(input.len());
            self.mac.update(&input[..take]);
            self.credited_bits += take as f64 * min_entropy;
            input = &input[take..];
            if self.credited_bits >= BITS_PER_BLOCK {
                out.push(self.release());
            }
        }
    }

    fn release(&mut self) -> [u8; BLOCK_BYTES] {
        let mac = std::mem::replace(&mut self.mac, self.keyed.clone());
        self.credited_bits = 0.0;
        self.blocks += 1;
        mac.finalize().into_bytes().into()
    }

    /// Credited bits absorbed towards the next block.
    pub fn pending_bits(&self) -> f64 {
        self.credited_bits
    }

    /// Full-entropy blocks released so far.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
}

fn new_mac(key: &[u8; 32]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn absorb(conditioner: &mut Conditioner, input: &[u8], h: f64) -> Vec<[u8; 32]> {
        let mut out = Vec::new();
        conditioner.absorb(input, h, &mut out);
        out
    }

    #[test]
    fn a_block_needs_output_bits_plus_64_of_credit() {
        let mut c = Conditioner::new([0; 32]);
        // At 1 bit per byte, 320 bytes carry exactly 320 bits.
        assert!(absorb(&mut c, &[0x55; 319], 1.0).is_empty());
        assert_eq!(c.pending_bits(), 319.0);
        assert_eq!(absorb(&mut c, &[0x55; 1], 1.0).len(), 1);
        assert_eq!(c.pending_bits(), 0.0);
    }

    #[test]
    fn credit_follows_each_inputs_min_entropy() {
        let mut c = Conditioner::new([0; 32]);
        // 40 bytes at 8 bits = 320 bits: one block.
        assert_eq!(absorb(&mut c, &[1; 40], 8.0).len(), 1);
        // 100 bytes at 2 bits + 30 bytes at 4 bits = 320 bits: one block.
        assert!(absorb(&mut c, &[2; 100], 2.0).is_empty());
        assert_eq!(absorb(&mut c, &[3; 30], 4.0).len(), 1);
        assert_eq!(c.blocks(), 2);
    }

    #[test]
    fn large_input_yields_one_block_per_credit_quantum_and_no_more() {
        let mut c = Conditioner::new([0; 32]);
        // 4096 bytes at 0.5 bits = 2048 bits = 6.4 blocks' worth: 6 blocks.
        let input: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let blocks = absorb(&mut c, &input, 0.5);
        assert_eq!(blocks.len(), 6);
        assert!(c.pending_bits() < BITS_PER_BLOCK);
        let mut distinct = blocks.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 6);
    }

    #[test]
    fn uncredited_input_never_releases_output() {
        let mut c = Conditioner::new([0; 32]);
        for bad in [0.0, -1.0, f64::NAN, 9.0] {
            assert!(absorb(&mut c, &[7; 10_000], bad).is_empty());
        }
        assert_eq!(c.pending_bits(), 0.0);
    }

    #[test]
    fn output_is_hmac_sha256_of_the_input_under_the_key() {
        let key = [0x0b; 32];
        let mut c = Conditioner::new(key);
        let input = [0xabu8; 40];
        let block = absorb(&mut c, &input, 8.0)[0];

        let mut mac = new_mac(&key);
        mac.update(&input);
        let expected: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(block, expected);
    }

    #[test]
    fn different_keys_give_unrelated_output() {
        let mut a = Conditioner::new([1; 32]);
        let mut b = Conditioner::new([2; 32]);
        assert_ne!(absorb(&mut a, &[5; 40], 8.0), absorb(&mut b, &[5; 40], 8.0));
    }
}
