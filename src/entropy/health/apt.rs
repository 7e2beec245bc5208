// SPDX-License-Identifier: Apache-2.0
//! Adaptive Proportion Test (SP 800-90B 4.4.2): catches a source that
//! produces one value far too often, by counting, in each window of `W`
//! samples, how often the window's first value occurs.

use super::{HealthConfigError, HealthFailure};

/// Splits the samples into consecutive, non-overlapping windows of `W`
/// samples. The first sample of each window is its reference value; the
/// test counts the samples of the window equal to it, the first one
/// included (so the count starts at 1), and fails when the count reaches
/// the cutoff `C` (see [`apt_cutoff`](super::apt_cutoff)).
///
/// Only the reference value is counted: a window starting with a rare
/// value passes whatever follows. The next window, with a new reference,
/// starts right after the `W`-th sample.
#[derive(Debug, Clone)]
pub struct AdaptiveProportionTest {
    cutoff: u32,
    window: u32,
    reference: u8,
    count: u32,
    /// Samples of the current window seen so far, `0..window`.
    seen: u32,
}

impl AdaptiveProportionTest {
    /// A test over `window`-sample windows failing when the reference value
    /// occurs `cutoff` times. Requires `2 <= cutoff <= window`: a cutoff of
    /// 1 would fail on every window's first sample, and one above `window`
    /// could never fail.
    pub fn new(cutoff: u32, window: u32) -> Result<Self, HealthConfigError> {
        if !(2..=window).contains(&cutoff) {
            return Err(HealthConfigError::Cutoff {
                test: "adaptive proportion",
                value: cutoff,
                min: 2,
                max: window,
            });
        }
        Ok(Self {
            cutoff,
            window,
            reference: 0,
            count: 0,
            seen: 0,
        })
    }

    /// The count at which the test fails.
    pub fn cutoff(&self) -> u32 {
        self.cutoff
    }

    /// The window size `W`.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Samples of the current window seen so far (0 at a window boundary).
    pub fn position(&self) -> u32 {
        self.seen
    }

    /// Tests one sample. `Ok(true)` when this sample completed a window
    /// without failure, `Ok(false)` when the window goes on. After a
    /// failure, [`reset`](Self::reset) before testing again.
    #[inline]
    pub fn sample(&mut self, value: u8) -> Result<bool, HealthFailure> {
        match self.scan(std::slice::from_ref(&value)) {
            Ok(()) => Ok(self.seen == 0),
            Err((_, failure)) => Err(failure),
        }
    }

    /// Tests `samples` in order and stops at the first failing one, giving
    /// its index in `samples` with the failure; [`position`](Self::position)
    /// is then that sample's index in its window. After a failure,
    /// [`reset`](Self::reset) before testing again.
    pub fn scan(&mut self, samples: &[u8]) -> Result<(), (usize, HealthFailure)> {
        let mut rest = samples;
        let mut done = 0;
        while let Some(&first) = rest.first() {
            if self.seen == 0 {
                // A new window; its first sample is counted by the loop
                // below, as equal to itself.
                self.reference = first;
                self.count = 0;
            }
            let room = (self.window - self.seen) as usize;
            let (part, tail) = rest.split_at(room.min(rest.len()));
            let (reference, cutoff) = (self.reference, self.cutoff);
            let mut count = self.count;
            for (i, &value) in part.iter().enumerate() {
                if value == reference {
                    count = count.saturating_add(1);
                    // The window's first sample makes the count 1, below
                    // any cutoff (at least 2).
                    if count >= cutoff {
                        self.count = count;
                        // Fits: `i` is below `window - seen`.
                        self.seen += i as u32;
                        return Err((
                            done + i,
                            HealthFailure::AdaptiveProportion {
                                value,
                                count,
                                window: self.window,
                                cutoff,
                            },
                        ));
                    }
                }
            }
            self.count = count;
            // Fits: `part` is at most `window - seen` long.
            self.seen += part.len() as u32;
            if self.seen == self.window {
                self.seen = 0;
            }
            done += part.len();
            rest = tail;
        }
        Ok(())
    }

    /// Abandons the current window; the next sample starts a new one.
    pub fn reset(&mut self) {
        self.reference = 0;
        self.count = 0;
        self.seen = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `samples`; the number of completed windows, or where and how
    /// it failed.
    fn feed(
        test: &mut AdaptiveProportionTest,
        samples: &[u8],
    ) -> Result<usize, (usize, HealthFailure)> {
        let mut windows = 0;
        for (i, &s) in samples.iter().enumerate() {
            if test.sample(s).map_err(|f| (i, f))? {
                windows += 1;
            }
        }
        Ok(windows)
    }

    #[test]
    fn count_includes_the_first_sample() {
        // Cutoff 4: the reference plus three more occurrences fail.
        let mut apt = AdaptiveProportionTest::new(4, 16).unwrap();
        let samples = [5, 1, 5, 2, 5, 3, 5];
        let (at, failure) = feed(&mut apt, &samples).unwrap_err();
        assert_eq!(at, 6);
        assert_eq!(
            failure,
            HealthFailure::AdaptiveProportion {
                value: 5,
                count: 4,
                window: 16,
                cutoff: 4
            }
        );
    }

    #[test]
    fn one_below_the_cutoff_passes() {
        let mut apt = AdaptiveProportionTest::new(4, 8).unwrap();
        assert_eq!(feed(&mut apt, &[5, 5, 5, 1, 2, 3, 4, 6]), Ok(1));
        assert_eq!(apt.position(), 0);
    }

    #[test]
    fn only_the_reference_value_counts() {
        let mut apt = AdaptiveProportionTest::new(4, 8).unwrap();
        // Reference 1; the seven 0s are not counted.
        assert_eq!(feed(&mut apt, &[1, 0, 0, 0, 0, 0, 0, 0]), Ok(1));
    }

    #[test]
    fn each_window_takes_a_new_reference() {
        let mut apt = AdaptiveProportionTest::new(3, 4).unwrap();
        // Windows [1 2 1 3] [2 2 4 5]: two 1s then two 2s, both below 3,
        // although 2 occurs three times across the boundary.
        assert_eq!(feed(&mut apt, &[1, 2, 1, 3, 2, 2, 4, 5]), Ok(2));
        // Next window [6 6 6 ..] fails at its third sample.
        assert_eq!(feed(&mut apt, &[6, 6, 6]).unwrap_err().0, 2);
    }

    #[test]
    fn occurrences_before_the_reference_do_not_count() {
        let mut apt = AdaptiveProportionTest::new(3, 4).unwrap();
        // Window [9 7 7 7]: 7 three times but not the reference.
        assert_eq!(feed(&mut apt, &[9, 7, 7, 7]), Ok(1));
    }

    #[test]
    fn reset_starts_a_new_window() {
        let mut apt = AdaptiveProportionTest::new(3, 8).unwrap();
        assert_eq!(feed(&mut apt, &[4, 4, 1]), Ok(0));
        assert_eq!(apt.position(), 3);
        apt.reset();
        assert_eq!(apt.position(), 0);
        // A fresh window with reference 8: the earlier 4s are forgotten.
        assert_eq!(feed(&mut apt, &[8, 4, 4, 4, 8, 1, 2, 3]), Ok(1));
    }

    #[test]
    fn scan_agrees_with_sample_by_sample() {
        // Few distinct values, so that windows reach the cutoff now and
        // then.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let samples: Vec<u8> = (0..20_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 5) as u8
            })
            .collect();
        let mut whole = AdaptiveProportionTest::new(12, 32).unwrap();
        let mut single = AdaptiveProportionTest::new(12, 32).unwrap();
        let mut start = 0;
        let mut failures = 0;
        while start < samples.len() {
            let scanned = whole.scan(&samples[start..]);
            let fed = feed(&mut single, &samples[start..]);
            assert_eq!(whole.position(), single.position());
            match (scanned, fed) {
                (Ok(()), Ok(_)) => break,
                (Err(scanned), Err(fed)) => {
                    assert_eq!(scanned, fed);
                    // The failing sample's place in its window.
                    assert!(whole.position() < 32);
                    failures += 1;
                    whole.reset();
                    single.reset();
                    start += scanned.0 + 1;
                }
                other => panic!("scan and sample disagree: {other:?}"),
            }
        }
        assert!(failures > 10, "{failures}");
    }

    #[test]
    fn scan_reports_the_failing_samples_place() {
        let mut apt = AdaptiveProportionTest::new(3, 8).unwrap();
        // Window 1 passes; window 2 is [2 1 2 1 2]: fails at its 5th sample.
        let samples = [1, 2, 3, 4, 5, 6, 7, 8, 2, 1, 2, 1, 2, 9];
        assert_eq!(apt.scan(&samples).unwrap_err().0, 12);
        assert_eq!(apt.position(), 4);
    }

    #[test]
    fn rejects_cutoffs_outside_two_to_window() {
        assert!(AdaptiveProportionTest::new(0, 512).is_err());
        assert!(AdaptiveProportionTest::new(1, 512).is_err());
        assert!(AdaptiveProportionTest::new(513, 512).is_err());
        assert!(AdaptiveProportionTest::new(2, 0).is_err());
        let apt = AdaptiveProportionTest::new(512, 512).unwrap();
        assert_eq!((apt.cutoff(), apt.window()), (512, 512));
    }
}
