// SPDX-License-Identifier: Apache-2.0
//! Repetition Count Test (SP 800-90B 4.4.1): catches a source stuck on one
//! value by counting consecutive identical samples.

use super::{HealthConfigError, HealthFailure};

/// Counts how often the latest sample value has repeated in a row and
/// fails when the run reaches the cutoff `C` (see
/// [`rct_cutoff`](super::rct_cutoff)).
///
/// The run length includes the run's first sample: `C` identical samples in
/// a row fail, `C - 1` pass. The state carries over between calls, so runs
/// spanning chunk boundaries are counted whole.
#[derive(Debug, Clone)]
pub struct RepetitionCountTest {
    cutoff: u32,
    last: u8,
    /// Length of the current run; 0 before the first sample.
    run: u32,
}

impl RepetitionCountTest {
    /// A test failing at `cutoff` identical samples in a row; `cutoff` must
    /// be at least 2 (one sample is always a run of 1).
    pub fn new(cutoff: u32) -> Result<Self, HealthConfigError> {
        if cutoff < 2 {
            return Err(HealthConfigError::Cutoff {
                test: "repetition count",
                value: cutoff,
                min: 2,
                max: u32::MAX,
            });
        }
        Ok(Self {
            cutoff,
            last: 0,
            run: 0,
        })
    }

    /// The run length at which the test fails.
    pub fn cutoff(&self) -> u32 {
        self.cutoff
    }

    /// The current run: its value and length (length 0 before any sample).
    pub fn run(&self) -> (u8, u32) {
        (self.last, self.run)
    }

    /// Tests one sample. Once failed, further identical samples keep
    /// failing; [`reset`](Self::reset) starts over.
    #[inline]
    pub fn sample(&mut self, value: u8) -> Result<(), HealthFailure> {
        self.scan(std::slice::from_ref(&value))
            .map_err(|(_, failure)| failure)
    }

    /// Tests `samples` in order and stops at the first failing one, giving
    /// its index in `samples` with the failure.
    pub fn scan(&mut self, samples: &[u8]) -> Result<(), (usize, HealthFailure)> {
        let cutoff = self.cutoff;
        let mut last = self.last;
        let mut run = self.run;
        let mut result = Ok(());
        for (i, &value) in samples.iter().enumerate() {
            // Before the first sample `run` is 0, so whichever branch is
            // taken the run becomes 1.
            if value == last {
                run = run.saturating_add(1);
                if run >= cutoff {
                    result = Err((i, HealthFailure::RepetitionCount { value, run, cutoff }));
                    break;
                }
            } else {
                last = value;
                run = 1;
            }
        }
        self.last = last;
        self.run = run;
        result
    }

    /// Forgets the current run, as before the first sample.
    pub fn reset(&mut self) {
        self.last = 0;
        self.run = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(test: &mut RepetitionCountTest, samples: &[u8]) -> Result<(), (usize, HealthFailure)> {
        for (i, &s) in samples.iter().enumerate() {
            test.sample(s).map_err(|f| (i, f))?;
        }
        Ok(())
    }

    #[test]
    fn fails_exactly_at_the_cutoff() {
        let mut rct = RepetitionCountTest::new(5).unwrap();
        assert_eq!(feed(&mut rct, &[7; 4]), Ok(()));
        assert_eq!(rct.run(), (7, 4));
        assert_eq!(
            rct.sample(7),
            Err(HealthFailure::RepetitionCount {
                value: 7,
                run: 5,
                cutoff: 5
            })
        );
    }

    #[test]
    fn first_sample_of_zero_counts_once() {
        // The initial `last` is 0; a leading 0 must still be a run of 1.
        let mut rct = RepetitionCountTest::new(3).unwrap();
        assert_eq!(feed(&mut rct, &[0, 0]), Ok(()));
        assert!(rct.sample(0).is_err());
    }

    #[test]
    fn runs_below_the_cutoff_pass() {
        let mut rct = RepetitionCountTest::new(4).unwrap();
        let samples: Vec<u8> = (0..1000u32).map(|i| (i / 3) as u8).collect();
        assert_eq!(feed(&mut rct, &samples), Ok(()));
        // A change of value restarts the count.
        assert_eq!(feed(&mut rct, &[1, 1, 1, 2, 2, 2, 1, 1, 1]), Ok(()));
    }

    #[test]
    fn reset_forgets_the_run() {
        let mut rct = RepetitionCountTest::new(3).unwrap();
        assert_eq!(feed(&mut rct, &[9, 9]), Ok(()));
        rct.reset();
        assert_eq!(rct.run(), (0, 0));
        assert_eq!(feed(&mut rct, &[9, 9]), Ok(()));
        assert_eq!(feed(&mut rct, &[9]).unwrap_err().0, 0);
    }

    #[test]
    fn keeps_failing_without_overflow() {
        let mut rct = RepetitionCountTest::new(u32::MAX).unwrap();
        rct.run = u32::MAX - 1;
        rct.last = 3;
        assert!(rct.sample(3).is_err());
        assert!(rct.sample(3).is_err());
        assert_eq!(rct.run(), (3, u32::MAX));
    }

    #[test]
    fn scan_agrees_with_sample_by_sample() {
        // Few distinct values, so that runs reach the cutoff now and then.
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let samples: Vec<u8> = (0..20_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 3) as u8
            })
            .collect();
        let mut whole = RepetitionCountTest::new(6).unwrap();
        let mut single = RepetitionCountTest::new(6).unwrap();
        let mut start = 0;
        let mut failures = 0;
        while start < samples.len() {
            match whole.scan(&samples[start..]) {
                Ok(()) => {
                    assert_eq!(feed(&mut single, &samples[start..]), Ok(()));
                    break;
                }
                Err((at, failure)) => {
                    assert_eq!(feed(&mut single, &samples[start..]), Err((at, failure)));
                    failures += 1;
                    whole.reset();
                    single.reset();
                    start += at + 1;
                }
            }
        }
        assert!(failures > 10, "{failures}");
    }

    #[test]
    fn rejects_a_cutoff_below_two() {
        assert!(RepetitionCountTest::new(0).is_err());
        assert!(RepetitionCountTest::new(1).is_err());
        assert_eq!(RepetitionCountTest::new(2).unwrap().cutoff(), 2);
    }
}
