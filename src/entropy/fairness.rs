// SPDX-License-Identifier: Apache-2.0
//! Weighted fair sharing of scarce raw output among the guests asking for
//! it (raw mode, when the sources cannot keep up): start-time fair queuing
//! over the pool's full-entropy bytes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A guest that asked for raw bytes less than this long ago competes for
/// them; one that did not has left its share to the others.
pub const ACTIVE_WINDOW: Duration = Duration::from_millis(500);
/// How far (in bytes per unit of weight) a guest may run ahead of the
/// guest furthest behind before it has to let that one go first.
const FAIR_QUANTUM: f64 = 512.0;

/// Weighted fair sharing of scarce raw output (start-time fair queuing):
/// each stream's virtual time advances by bytes / weight; a stream ahead
/// of another active stream by more than a quantum waits for it.
#[derive(Default)]
pub struct Fairness {
    shares: HashMap<u64, Share>,
    next_id: u64,
}

struct Share {
    vtime: f64,
    last_ask: Instant,
}

impl Fairness {
    /// A new stream id, never handed out before; the stream has no share
    /// until it first asks ([`Fairness::may_take`]).
    pub fn register(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Whether stream `id` may take bytes now; marks it active.
    pub fn may_take(&mut self, id: u64, now: Instant) -> bool {
        let behind = self
            .shares
            .iter()
            .filter(|(other, share)| {
                **other != id && now.saturating_duration_since(share.last_ask) < ACTIVE_WINDOW
            })
            .map(|(_, share)| share.vtime)
            .reduce(f64::min);
        let share = self.shares.entry(id).or_insert(Share {
            vtime: behind.unwrap_or(0.0),
            last_ask: now,
        });
        if now.saturating_duration_since(share.last_ask) >= ACTIVE_WINDOW {
            // Back from idle: no credit banked while away.
            share.vtime = share.vtime.max(behind.unwrap_or(share.vtime));
        }
        share.last_ask = now;
        behind.is_none_or(|min| share.vtime <= min + FAIR_QUANTUM)
    }

    /// Advances stream `id`'s virtual time for `bytes` taken at `weight` (0
    /// counts as 1). Does nothing for a stream that never asked.
    pub fn charge(&mut self, id: u64, bytes: usize, weight: u32) {
        if let Some(share) = self.shares.get_mut(&id) {
            share.vtime += bytes as f64 / f64::from(weight.max(1));
        }
    }

    /// Drops stream `id`'s share, when its guest goes away.
    pub fn forget(&mut self, id: u64) {
        self.shares.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out `units` 64-byte units to streams that always ask, trying
    /// them in turn from a rotating start; returns bytes per stream.
    fn share_out(
        fairness: &mut Fairness,
        ids: &[(u64, u32)],
        units: usize,
        t: Instant,
    ) -> Vec<usize> {
        let mut got = vec![0; ids.len()];
        for unit in 0..units {
            for k in 0..ids.len() {
                let i = (unit + k) % ids.len();
                let (id, weight) = ids[i];
                if fairness.may_take(id, t) {
                    fairness.charge(id, 64, weight);
                    got[i] += 64;
                    break;
                }
            }
        }
        got
    }

    #[test]
    fn scarce_output_is_shared_by_weight() {
        let mut fairness = Fairness::default();
        let (a, b) = (fairness.register(), fairness.register());
        let got = share_out(&mut fairness, &[(a, 1), (b, 3)], 40_000, Instant::now());
        let ratio = got[1] as f64 / got[0] as f64;
        assert!((2.8..=3.2).contains(&ratio), "{got:?}");
    }

    #[test]
    fn an_idle_guest_leaves_its_share_and_banks_no_credit() {
        let mut fairness = Fairness::default();
        let (a, b) = (fairness.register(), fairness.register());
        let t0 = Instant::now();
        // b asks once, then goes quiet; a gets everything after the window.
        assert!(fairness.may_take(b, t0));
        let later = t0 + ACTIVE_WINDOW;
        let got = share_out(&mut fairness, &[(a, 1)], 1000, later);
        assert_eq!(got[0], 64_000);
        // Back from idle, b does not get to catch up on what it missed:
        // the two share evenly from here on.
        let got = share_out(&mut fairness, &[(a, 1), (b, 1)], 1000, later);
        assert!((got[0] as i64 - got[1] as i64).abs() <= 64 * 10, "{got:?}");
    }

    #[test]
    fn a_lone_guest_is_never_held_back() {
        let mut fairness = Fairness::default();
        let a = fairness.register();
        let got = share_out(&mut fairness, &[(a, 1)], 10_000, Instant::now());
        assert_eq!(got[0], 640_000);
    }
}
