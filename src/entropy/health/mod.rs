// SPDX-License-Identifier: Apache-2.0
//! Continuous health tests of NIST SP 800-90B section 4.4, run on the raw
//! bytes of an entropy source before any mixing, each byte one 8-bit
//! sample.
//!
//! - [`RepetitionCountTest`] (4.4.1) catches a source stuck on one value.
//! - [`AdaptiveProportionTest`] (4.4.2) catches a source producing one value
//!   far too often, in windows of [`WINDOW_NON_BINARY`] = 512 samples.
//! - [`HealthTests`] runs both on every byte, runs the start-up test, and
//!   says which bytes are approved for use.
//!
//! Cutoffs come from the claimed min-entropy `H` (bits per byte) and the
//! false-positive probability `alpha = 2^-alpha_log2` ([`rct_cutoff`],
//! [`apt_cutoff`]).
//!
//! # Approval
//!
//! A byte is approved once the adaptive proportion window it belongs to has
//! completed with neither test failing, and the start-up test is over.
//! Approved bytes are always the oldest bytes not yet approved, so a caller
//! keeps the bytes it fed but has not seen approved, in order, and forwards
//! the first `n` of them whenever [`HealthTests::feed`] returns `Ok(n)`. On
//! a failure it discards them all (the data since the last good check) and
//! calls [`HealthTests::restart`]. Besides what was just fed, that backlog
//! stays below the start-up length during start-up and below one window
//! afterwards:
//!
//! ```
//! use vhost_rng::entropy::health::{HealthConfig, HealthTests};
//!
//! let mut tests = HealthTests::new(HealthConfig::new(1.0)).unwrap();
//! let mut unapproved = Vec::new();
//! let mut forwarded = Vec::new();
//! let raw: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
//! for chunk in raw.chunks(700) {
//!     unapproved.extend_from_slice(chunk);
//!     match tests.feed(chunk) {
//!         Ok(n) => forwarded.extend(unapproved.drain(..n)),
//!         Err(failure) => {
//!             eprintln!("{failure}");
//!             unapproved.clear();
//!             tests.restart();
//!         }
//!     }
//! }
//! // Start-up (1024 bytes) plus three more 512-byte windows.
//! assert_eq!(forwarded.len(), 2560);
//! assert_eq!(unapproved.len(), 3000 - 2560);
//! ```
//!
//! # Start-up
//!
//! SP 800-90B 4.3 requires a start-up test over at least 1024 consecutive
//! samples before a source may be used, and allows the tested samples to be
//! used once it passes. Here the start-up test is the continuous tests run
//! over [`HealthConfig::startup_samples`] (at least 1024), rounded up to a
//! whole number of windows so that it ends on a window boundary (1024 is
//! two windows exactly). Nothing is approved during start-up; when its last
//! window completes, all its bytes are approved at once. After that, each
//! completed window approves its 512 bytes. A failure, or a
//! [`HealthTests::restart`], requires the start-up test again.
//!
//! The repetition count test runs across window boundaries. A run that
//! begins in a window already approved and reaches the cutoff in the next
//! fails that next window only: the earlier window had completed with no
//! test failing, which is the check it was approved on.
//!
//! # False positives
//!
//! `alpha` bounds the false-positive probability per opportunity (each
//! sample for the repetition count test, each window for the adaptive
//! proportion test) for a source with exactly `H` bits per byte. A source
//! with more entropy than claimed trips far less often: with uniform bytes
//! and `H = 4`, a run of 6 has probability `2^-40` per byte. Claiming
//! close to 8 bits per byte on a fast source makes failures routine (at
//! `H = 8` the repetition cutoff is 4, a run a uniform source produces with
//! probability `2^-24` per byte), unless `alpha_log2` is raised.

mod apt;
mod cutoffs;
mod rct;

pub use apt::AdaptiveProportionTest;
pub use cutoffs::{
    DEFAULT_ALPHA_LOG2, MAX_ALPHA_LOG2, MAX_MIN_ENTROPY, MAX_WINDOW, WINDOW_BINARY,
    WINDOW_NON_BINARY, apt_cutoff, check_alpha_log2, check_min_entropy, rct_cutoff,
};
pub use rct::RepetitionCountTest;

/// Fewest samples a start-up test may cover (SP 800-90B 4.3).
pub const STARTUP_MIN_SAMPLES: usize = 1024;
/// Most samples a start-up test may cover; more is taken for a mistake.
pub const STARTUP_MAX_SAMPLES: usize = 1 << 30;

/// How a source's bytes are tested.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthConfig {
    /// Claimed min-entropy in bits per byte, `0 < H <= 8`, from the
    /// source's entropy assessment. Lower is more conservative: longer runs
    /// and more repeats are tolerated.
    pub min_entropy: f64,
    /// False-positive probability `alpha = 2^-alpha_log2`, `1..=64`;
    /// default 20.
    pub alpha_log2: u32,
    /// Samples the start-up test covers, at least 1024; rounded up to a
    /// whole number of 512-sample windows. Default 1024.
    pub startup_samples: usize,
}

impl HealthConfig {
    /// Defaults for everything but the claimed min-entropy.
    pub fn new(min_entropy: f64) -> Self {
        Self {
            min_entropy,
            ..Self::default()
        }
    }
}

impl Default for HealthConfig {
    /// `H = 1` bit per byte (a conservative claim: set it from the source's
    /// assessment), `alpha = 2^-20`, a 1024-sample start-up test.
    fn default() -> Self {
        Self {
            min_entropy: 1.0,
            alpha_log2: DEFAULT_ALPHA_LOG2,
            startup_samples: STARTUP_MIN_SAMPLES,
        }
    }
}

/// Why a health-test configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HealthConfigError {
    /// The claimed min-entropy is not in `0 < H <= 8` (or is not a number).
    #[error(
        "invalid min-entropy {value}: it must be a number of bits per sample \
         greater than 0 and at most {max}"
    )]
    MinEntropy {
        /// The min-entropy given, in bits per byte.
        value: f64,
        /// The largest allowed, [`MAX_MIN_ENTROPY`].
        max: f64,
    },
    /// `alpha_log2` is not in `1..=64`.
    #[error(
        "invalid false-positive rate 2^-{value}: the exponent (alpha_log2) must be \
         between 1 and {max}"
    )]
    AlphaLog2 {
        /// The exponent given.
        value: u32,
        /// The largest allowed, [`MAX_ALPHA_LOG2`].
        max: u32,
    },
    /// The adaptive proportion window is smaller than 2 samples or larger
    /// than [`MAX_WINDOW`].
    #[error(
        "invalid adaptive proportion test window of {value} samples: it must be \
         between 2 and {max}"
    )]
    Window {
        /// The window given, in samples.
        value: u32,
        /// The largest allowed, [`MAX_WINDOW`].
        max: u32,
    },
    /// The min-entropy is so low that the repetition count cutoff overflows a
    /// `u32`.
    #[error(
        "min-entropy {min_entropy} bits per sample is too low: the repetition \
         count cutoff would not fit in 32 bits"
    )]
    RctCutoffTooLarge {
        /// The min-entropy given, in bits per byte.
        min_entropy: f64,
    },
    /// The min-entropy is so low that no count in a window would be rare
    /// enough to fail the adaptive proportion test.
    #[error(
        "min-entropy {min_entropy} bits per sample is too low for the adaptive \
         proportion test: at a false-positive rate of 2^-{alpha_log2} not even \
         {window} equal samples in a {window}-sample window would be rare enough, \
         so the test could never fail"
    )]
    AptCannotFail {
        /// The min-entropy given, in bits per byte.
        min_entropy: f64,
        /// The false-positive exponent in use.
        alpha_log2: u32,
        /// The window, in samples.
        window: u32,
    },
    /// A cutoff given directly to a test is out of its range.
    #[error("invalid {test} test cutoff {value}: it must be between {min} and {max}")]
    Cutoff {
        /// Which test: "repetition count" or "adaptive proportion".
        test: &'static str,
        /// The cutoff given.
        value: u32,
        /// The smallest allowed.
        min: u32,
        /// The largest allowed (the window, for the adaptive proportion test).
        max: u32,
    },
    /// `startup_samples` is below [`STARTUP_MIN_SAMPLES`].
    #[error(
        "start-up test of {value} samples is too short: SP 800-90B requires at \
         least {min}"
    )]
    StartupTooShort {
        /// The samples given.
        value: usize,
        /// The fewest allowed, [`STARTUP_MIN_SAMPLES`].
        min: usize,
    },
    /// `startup_samples` is above [`STARTUP_MAX_SAMPLES`].
    #[error("start-up test of {value} samples is too long: at most {max} are allowed")]
    StartupTooLong {
        /// The samples given.
        value: usize,
        /// The most allowed, [`STARTUP_MAX_SAMPLES`].
        max: usize,
    },
}

/// A health test failed: the source is not producing the entropy claimed
/// for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HealthFailure {
    /// The same byte came `cutoff` times in a row (SP 800-90B 4.4.1).
    #[error(
        "repetition count test failed: byte {value:#04x} repeated {run} times in a \
         row (cutoff {cutoff})"
    )]
    RepetitionCount {
        /// The repeated byte.
        value: u8,
        /// How many times in a row it came when the test stopped.
        run: u32,
        /// The run length at which the test fails.
        cutoff: u32,
    },
    /// One byte came `cutoff` times or more in one window (SP 800-90B 4.4.2).
    #[error(
        "adaptive proportion test failed: byte {value:#04x} occurred {count} times \
         in one {window}-byte window (cutoff {cutoff})"
    )]
    AdaptiveProportion {
        /// The byte counted: the window's first.
        value: u8,
        /// How many times it occurred in the window.
        count: u32,
        /// The window, in samples (bytes).
        window: u32,
        /// The count at which the test fails.
        cutoff: u32,
    },
}

impl HealthFailure {
    /// Short name of the failed test: `RCT` or `APT`.
    pub fn test_name(&self) -> &'static str {
        match self {
            HealthFailure::RepetitionCount { .. } => "RCT",
            HealthFailure::AdaptiveProportion { .. } => "APT",
        }
    }
}

/// The cutoffs [`HealthTests`] runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutoffs {
    /// Run length at which the repetition count test fails.
    pub repetition_count: u32,
    /// Count at which the adaptive proportion test fails.
    pub adaptive_proportion: u32,
    /// Adaptive proportion test window, in samples.
    pub window: u32,
}

/// Both continuous tests on one source's bytes, with the start-up test and
/// the bookkeeping of which bytes are approved (see the [module
/// documentation](self)).
#[derive(Debug, Clone)]
pub struct HealthTests {
    rct: RepetitionCountTest,
    apt: AdaptiveProportionTest,
    /// Start-up length, a whole number of windows.
    startup: u64,
    /// Bytes tested since the last restart.
    tested: u64,
    /// Of those, bytes reported approved by `feed`.
    approved: u64,
    /// Set when a test fails; cleared by `restart`.
    failure: Option<HealthFailure>,
    /// Bytes the failing `feed` call had approved before the failure.
    approved_before_failure: usize,
}

impl HealthTests {
    /// Validates `config` and computes the cutoffs. Refuses a min-entropy
    /// outside `0 < H <= 8` (or not a number), `alpha_log2` outside
    /// `1..=64`, a start-up test outside 1024 to 2^30 samples, and a
    /// min-entropy so low that the adaptive proportion test could never
    /// fail.
    pub fn new(config: HealthConfig) -> Result<Self, HealthConfigError> {
        let HealthConfig {
            min_entropy,
            alpha_log2,
            startup_samples,
        } = config;
        let window = WINDOW_NON_BINARY;
        let rct = RepetitionCountTest::new(rct_cutoff(min_entropy, alpha_log2)?)?;
        let apt_cutoff = apt_cutoff(min_entropy, alpha_log2, window)?;
        if apt_cutoff > window {
            return Err(HealthConfigError::AptCannotFail {
                min_entropy,
                alpha_log2,
                window,
            });
        }
        let apt = AdaptiveProportionTest::new(apt_cutoff, window)?;
        if startup_samples < STARTUP_MIN_SAMPLES {
            return Err(HealthConfigError::StartupTooShort {
                value: startup_samples,
                min: STARTUP_MIN_SAMPLES,
            });
        }
        if startup_samples > STARTUP_MAX_SAMPLES {
            return Err(HealthConfigError::StartupTooLong {
                value: startup_samples,
                max: STARTUP_MAX_SAMPLES,
            });
        }
        // At most 2^30 rounded up to a multiple of 512, which is 2^30.
        let startup = (startup_samples as u64).next_multiple_of(u64::from(window));
        Ok(Self {
            rct,
            apt,
            startup,
            tested: 0,
            approved: 0,
            failure: None,
            approved_before_failure: 0,
        })
    }

    /// Runs every sample through both tests, in order, and returns how many
    /// more bytes are now approved: the oldest bytes fed since the last
    /// restart that were not approved yet. Nothing is approved before the
    /// start-up test completes; after that, each completed window approves
    /// its bytes.
    ///
    /// On a failure, testing stops at the failing sample and the failure is
    /// returned; nothing of this call is reported approved (see
    /// [`approved_before_failure`](Self::approved_before_failure)). The
    /// failure is latched: later calls return it again, testing nothing,
    /// until [`restart`](Self::restart).
    pub fn feed(&mut self, samples: &[u8]) -> Result<usize, HealthFailure> {
        if let Some(failure) = self.failure {
            return Err(failure);
        }
        // Each test scans the slice on its own, which keeps both loops
        // tight. The earliest failing sample is the same as when testing
        // sample by sample: the adaptive proportion test only needs the
        // samples before the one the repetition count test failed at (on a
        // tie, the repetition count failure is reported).
        let (clean, rct_failure) = match self.rct.scan(samples) {
            Ok(()) => (samples.len(), None),
            Err((at, failure)) => (at, Some(failure)),
        };
        let failed = match self.apt.scan(&samples[..clean]) {
            Ok(()) => rct_failure.map(|failure| (clean, failure)),
            Err(failed) => Some(failed),
        };
        // Samples before the failing one, or all of them.
        let passed = failed.map_or(samples.len(), |(at, _)| at);
        let tested = self.tested + passed as u64;
        // The last window boundary: the adaptive proportion test is
        // `position()` samples into the window of the next sample.
        let boundary = tested - u64::from(self.apt.position());
        let newly = if boundary >= self.startup {
            to_usize(boundary.saturating_sub(self.approved))
        } else {
            0
        };
        match failed {
            None => {
                self.tested = tested;
                self.approved += newly as u64;
                Ok(newly)
            }
            Some((_, failure)) => {
                self.tested = tested + 1;
                self.failure = Some(failure);
                self.approved_before_failure = newly;
                Err(failure)
            }
        }
    }

    /// Starts over after a failure (or at any time): both tests forget
    /// their state, nothing fed so far will be approved, and the start-up
    /// test is required again. The caller must drop its unapproved bytes.
    pub fn restart(&mut self) {
        self.rct.reset();
        self.apt.reset();
        self.tested = 0;
        self.approved = 0;
        self.failure = None;
        self.approved_before_failure = 0;
    }

    /// Whether the start-up test is still to pass since the last restart:
    /// the source may not contribute yet.
    pub fn in_startup(&self) -> bool {
        self.approved < self.startup
    }

    /// The latched failure, if a test failed since the last restart.
    pub fn failure(&self) -> Option<HealthFailure> {
        self.failure
    }

    /// After [`feed`](Self::feed) failed: how many bytes it had approved
    /// before the failing sample (windows that completed earlier in the same
    /// call). They are the oldest unapproved bytes and passed their tests,
    /// so a caller may still forward them; discarding them with the rest is
    /// the simpler, conservative choice. 0 when no test has failed.
    pub fn approved_before_failure(&self) -> usize {
        self.approved_before_failure
    }

    /// Bytes tested since the last restart, the failing one included.
    pub fn tested(&self) -> u64 {
        self.tested
    }

    /// Bytes reported approved by [`feed`](Self::feed) since the last
    /// restart.
    pub fn approved(&self) -> u64 {
        self.approved
    }

    /// Length of the start-up test in samples, after rounding up to whole
    /// windows.
    pub fn startup_samples(&self) -> u64 {
        self.startup
    }

    /// The cutoffs in use.
    pub fn cutoffs(&self) -> Cutoffs {
        Cutoffs {
            repetition_count: self.rct.cutoff(),
            adaptive_proportion: self.apt.cutoff(),
            window: self.apt.window(),
        }
    }
}

/// Approval counts never exceed the start-up length plus one slice, both of
/// which fit a `usize`; saturates rather than panicking all the same.
fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: a small deterministic generator for uniform test bytes.
    struct SplitMix(u64);

    impl SplitMix {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            let mut out = Vec::with_capacity(n + 8);
            while out.len() < n {
                out.extend_from_slice(&self.next_u64().to_le_bytes());
            }
            out.truncate(n);
            out
        }

        /// A value in `0..bound`.
        fn below(&mut self, bound: u64) -> u64 {
            self.next_u64() % bound
        }
    }

    fn tests_for(min_entropy: f64) -> HealthTests {
        HealthTests::new(HealthConfig::new(min_entropy)).unwrap()
    }

    /// What feeding `data` in chunks of `chunk` bytes did: bytes approved
    /// (those approved before a failure included), bytes tested, failure.
    fn run_chunked(
        tests: &mut HealthTests,
        data: &[u8],
        chunk: usize,
    ) -> (u64, u64, Option<HealthFailure>) {
        let mut approved = 0u64;
        for piece in data.chunks(chunk) {
            match tests.feed(piece) {
                Ok(n) => approved += n as u64,
                Err(failure) => {
                    approved += tests.approved_before_failure() as u64;
                    return (approved, tests.tested(), Some(failure));
                }
            }
        }
        (approved, tests.tested(), None)
    }

    /// `n` bytes where `value` has probability `percent`% and runs of it are
    /// cut at `max_run`; other bytes are uniform over the other values.
    fn biased(seed: u64, n: usize, value: u8, percent: u64, max_run: u32) -> Vec<u8> {
        let mut rng = SplitMix(seed);
        let mut out = Vec::with_capacity(n);
        let mut run = 0;
        while out.len() < n {
            if rng.below(100) < percent && run < max_run {
                out.push(value);
                run += 1;
            } else {
                let other = (value as u64 + 1 + rng.below(255)) as u8;
                out.push(other);
                run = 0;
            }
        }
        out
    }

    #[test]
    fn default_config_and_cutoffs() {
        let config = HealthConfig::default();
        assert_eq!(config.min_entropy, 1.0);
        assert_eq!(config.alpha_log2, 20);
        assert_eq!(config.startup_samples, 1024);
        let tests = tests_for(1.0);
        assert_eq!(
            tests.cutoffs(),
            Cutoffs {
                repetition_count: 21,
                adaptive_proportion: 311,
                window: 512
            }
        );
        assert_eq!(tests.startup_samples(), 1024);
        assert!(tests.in_startup());
        let cutoffs = tests_for(8.0).cutoffs();
        assert_eq!(
            (cutoffs.repetition_count, cutoffs.adaptive_proportion),
            (4, 13)
        );
    }

    #[test]
    fn refuses_bad_configs() {
        for h in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, -1.0, 8.5] {
            let err = HealthTests::new(HealthConfig::new(h)).unwrap_err();
            assert!(
                matches!(err, HealthConfigError::MinEntropy { .. }),
                "{h}: {err}"
            );
        }
        let with = |alpha_log2, startup_samples| HealthConfig {
            min_entropy: 2.0,
            alpha_log2,
            startup_samples,
        };
        assert!(matches!(
            HealthTests::new(with(0, 1024)),
            Err(HealthConfigError::AlphaLog2 { .. })
        ));
        assert!(matches!(
            HealthTests::new(with(65, 1024)),
            Err(HealthConfigError::AlphaLog2 { .. })
        ));
        assert!(matches!(
            HealthTests::new(with(20, 1023)),
            Err(HealthConfigError::StartupTooShort { .. })
        ));
        assert!(matches!(
            HealthTests::new(with(20, 0)),
            Err(HealthConfigError::StartupTooShort { .. })
        ));
        assert!(matches!(
            HealthTests::new(with(20, usize::MAX)),
            Err(HealthConfigError::StartupTooLong { .. })
        ));
        assert!(matches!(
            HealthTests::new(HealthConfig::new(0.01)),
            Err(HealthConfigError::AptCannotFail { .. })
        ));
        assert!(matches!(
            HealthTests::new(HealthConfig::new(1e-12)),
            Err(HealthConfigError::RctCutoffTooLarge { .. })
        ));
        assert!(HealthTests::new(with(64, STARTUP_MAX_SAMPLES)).is_ok());
    }

    #[test]
    fn config_errors_read_well() {
        let err = HealthTests::new(HealthConfig::new(f64::NAN)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid min-entropy NaN: it must be a number of bits per sample greater \
             than 0 and at most 8"
        );
        let err = HealthTests::new(HealthConfig {
            startup_samples: 100,
            ..HealthConfig::default()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "start-up test of 100 samples is too short: SP 800-90B requires at least 1024"
        );
    }

    #[test]
    fn failures_read_well() {
        let rct = HealthFailure::RepetitionCount {
            value: 0,
            run: 21,
            cutoff: 21,
        };
        assert_eq!(
            rct.to_string(),
            "repetition count test failed: byte 0x00 repeated 21 times in a row (cutoff 21)"
        );
        assert_eq!(rct.test_name(), "RCT");
        let apt = HealthFailure::AdaptiveProportion {
            value: 0x41,
            count: 177,
            window: 512,
            cutoff: 177,
        };
        assert_eq!(
            apt.to_string(),
            "adaptive proportion test failed: byte 0x41 occurred 177 times in one \
             512-byte window (cutoff 177)"
        );
        assert_eq!(apt.test_name(), "APT");
    }

    #[test]
    fn stuck_source_fails_rct_at_the_cutoff_and_approves_nothing() {
        let expected = HealthFailure::RepetitionCount {
            value: 0,
            run: 21,
            cutoff: 21,
        };
        // One byte at a time: 20 zeros pass, the 21st fails.
        let mut tests = tests_for(1.0);
        for _ in 0..20 {
            assert_eq!(tests.feed(&[0]), Ok(0));
        }
        assert_eq!(tests.feed(&[0]), Err(expected));
        assert_eq!(tests.tested(), 21);
        assert_eq!(tests.approved(), 0);
        // All at once: same point, nothing approved.
        let mut tests = tests_for(1.0);
        assert_eq!(tests.feed(&[0; 4096]), Err(expected));
        assert_eq!(tests.tested(), 21);
        assert_eq!(tests.approved_before_failure(), 0);
        assert!(tests.in_startup());
    }

    #[test]
    fn source_getting_stuck_after_start_up_fails() {
        let mut tests = tests_for(8.0);
        let mut data = SplitMix(1).bytes(2048);
        data[2047] = 0x11; // Not the stuck value, so the run starts after it.
        assert_eq!(tests.feed(&data), Ok(2048));
        assert!(!tests.in_startup());
        // H = 8: the fourth 0xff in a row fails.
        assert_eq!(tests.feed(&[0xff; 3]), Ok(0));
        assert_eq!(
            tests.feed(&[0xff]),
            Err(HealthFailure::RepetitionCount {
                value: 0xff,
                run: 4,
                cutoff: 4
            })
        );
        assert_eq!(tests.tested(), 2052);
        assert_eq!(tests.approved(), 2048);
    }

    #[test]
    fn repeats_below_the_cutoff_pass() {
        for (h, run) in [(1.0, 20), (2.0, 10), (8.0, 3)] {
            // Runs of C - 1 of each value in turn.
            let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i / run) as u8).collect();
            let mut tests = tests_for(h);
            assert_eq!(tests.feed(&data), Ok(1 << 20), "H = {h}");
        }
    }

    #[test]
    fn biased_source_fails_apt() {
        // H = 1: 0x41 at 90%, about 460 per window against a cutoff of 311.
        // H = 2: 0x41 at 60%, about 307 per window against 177.
        // Runs are cut below the repetition cutoff so that only the APT can
        // catch the bias.
        for (h, percent, max_run) in [(1.0, 90, 20), (2.0, 60, 10)] {
            let data = biased(7, 1 << 16, 0x41, percent, max_run);
            let mut tests = tests_for(h);
            let cutoff = tests.cutoffs().adaptive_proportion;
            let failure = tests.feed(&data).unwrap_err();
            assert_eq!(
                failure,
                HealthFailure::AdaptiveProportion {
                    value: 0x41,
                    count: cutoff,
                    window: 512,
                    cutoff
                },
                "H = {h}"
            );
            // Within the first few windows: only a window starting with
            // 0x41 is caught.
            assert!(tests.tested() < 4 * 512, "H = {h}: {}", tests.tested());
        }
    }

    #[test]
    fn alternating_bytes_fail_apt_only_when_claiming_high_entropy() {
        let data: Vec<u8> = (0..1 << 20)
            .map(|i: u32| if i & 1 == 0 { 0x00 } else { 0xff })
            .collect();
        // H = 8: cutoff 13; the 13th 0x00 of the first window is byte 25.
        let mut tests = tests_for(8.0);
        assert_eq!(
            tests.feed(&data),
            Err(HealthFailure::AdaptiveProportion {
                value: 0x00,
                count: 13,
                window: 512,
                cutoff: 13
            })
        );
        assert_eq!(tests.tested(), 25);
        // H = 1: 256 per window is below the cutoff of 311, and no value
        // ever repeats, so the pattern passes.
        let mut tests = tests_for(1.0);
        assert_eq!(tests.feed(&data), Ok(1 << 20));
    }

    #[test]
    fn uniform_bytes_pass_at_conservative_claims() {
        for (seed, h) in [(1, 1.0), (2, 2.0), (3, 4.0)] {
            let data = SplitMix(seed).bytes(4 << 20);
            let mut tests = tests_for(h);
            assert_eq!(tests.feed(&data), Ok(4 << 20), "H = {h}");
        }
        // At H = 8, uniform bytes trip the tests at about the designed rate
        // (a run of 4 every 2^24 bytes); a shorter stream passes.
        let data = SplitMix(4).bytes(1 << 16);
        assert_eq!(tests_for(8.0).feed(&data), Ok(1 << 16));
    }

    #[test]
    fn start_up_approves_nothing_until_its_last_window_completes() {
        let data = SplitMix(5).bytes(4096);
        let mut tests = tests_for(2.0);
        assert_eq!(tests.feed(&data[..1023]), Ok(0));
        assert!(tests.in_startup());
        assert_eq!(tests.feed(&data[1023..1024]), Ok(1024));
        assert!(!tests.in_startup());
        assert_eq!(tests.feed(&data[1024..1535]), Ok(0));
        assert_eq!(tests.feed(&data[1535..1536]), Ok(512));
        assert_eq!(tests.feed(&data[1536..3000]), Ok(1024));
        assert_eq!(tests.approved(), 2560);
        assert_eq!(tests.tested(), 3000);
    }

    #[test]
    fn start_up_is_rounded_up_to_whole_windows() {
        let data = SplitMix(6).bytes(4096);
        let mut tests = HealthTests::new(HealthConfig {
            min_entropy: 2.0,
            startup_samples: 1500,
            ..HealthConfig::default()
        })
        .unwrap();
        assert_eq!(tests.startup_samples(), 1536);
        assert_eq!(tests.feed(&data[..1535]), Ok(0));
        assert!(tests.in_startup());
        assert_eq!(tests.feed(&data[1535..1536]), Ok(1536));
        assert!(!tests.in_startup());
        assert_eq!(tests.feed(&data[1536..2048]), Ok(512));
    }

    #[test]
    fn failure_is_latched_until_restart() {
        let mut tests = tests_for(1.0);
        let failure = tests.feed(&[7; 100]).unwrap_err();
        assert_eq!(tests.failure(), Some(failure));
        let data = SplitMix(8).bytes(2048);
        assert_eq!(tests.feed(&data), Err(failure));
        assert_eq!(tests.tested(), 21);

        tests.restart();
        assert_eq!(tests.failure(), None);
        assert_eq!((tests.tested(), tests.approved()), (0, 0));
        assert!(tests.in_startup());
        // The start-up test runs again in full.
        assert_eq!(tests.feed(&data[..1023]), Ok(0));
        assert_eq!(tests.feed(&data[1023..]), Ok(2048));
    }

    #[test]
    fn restart_forgets_partial_runs_and_windows() {
        let mut tests = tests_for(1.0);
        let mut data = SplitMix(9).bytes(1500);
        data[1479] = 4;
        data[1480..].fill(3); // a run of 20, one short of failing
        assert_eq!(tests.feed(&data), Ok(1024));
        tests.restart();
        // The run does not continue, and 1024 more bytes are needed.
        assert_eq!(tests.feed(&[3]), Ok(0));
        let more = SplitMix(10).bytes(1023);
        assert_eq!(tests.feed(&more), Ok(1024));
    }

    #[test]
    fn windows_before_a_failure_in_the_same_call_are_held_back() {
        let mut data = SplitMix(11).bytes(2048);
        data[2047] = 0x55;
        data.extend_from_slice(&[0; 100]);
        let mut tests = tests_for(1.0);
        assert!(tests.feed(&data).is_err());
        assert_eq!(tests.tested(), 2048 + 21);
        assert_eq!(tests.approved(), 0);
        assert_eq!(tests.approved_before_failure(), 2048);
        tests.restart();
        assert_eq!(tests.approved_before_failure(), 0);
    }

    #[test]
    fn chunk_size_does_not_matter() {
        let mut good = SplitMix(12).bytes(100_000);
        let mut failing = good.clone();
        failing.extend(biased(13, 10_000, 0x41, 90, 20));
        good.truncate(99_999);
        let chunks = [1, 3, 100, 511, 512, 513, 1000, 4096, 1 << 20];
        for (data, name) in [(&good, "good"), (&failing, "failing")] {
            let reference = run_chunked(&mut tests_for(1.0), data, 1);
            for chunk in chunks {
                assert_eq!(
                    run_chunked(&mut tests_for(1.0), data, chunk),
                    reference,
                    "{name} data in chunks of {chunk}"
                );
            }
            let (approved, tested, failure) = reference;
            match failure {
                None => {
                    assert_eq!(tested, 99_999);
                    assert_eq!(approved, 99_999 / 512 * 512);
                }
                Some(failure) => {
                    assert_eq!(failure.test_name(), "APT");
                    assert!(tested > 100_000, "{tested}");
                    assert_eq!(approved, (tested - 1) / 512 * 512);
                }
            }
        }
    }

    #[test]
    fn on_a_tie_the_repetition_count_failure_is_reported() {
        // H = 8: RCT cutoff 4, APT cutoff 13. The 13th 0xaa of the window is
        // also the 4th in a row.
        let mut data = Vec::new();
        for other in 1..=9 {
            data.extend_from_slice(&[0xaa, other]);
        }
        data.extend_from_slice(&[0xaa; 4]);
        data.extend_from_slice(&[0xaa; 10]);
        let expected = HealthFailure::RepetitionCount {
            value: 0xaa,
            run: 4,
            cutoff: 4,
        };
        for chunk in [1, 5, data.len()] {
            let mut tests = tests_for(8.0);
            assert_eq!(
                run_chunked(&mut tests, &data, chunk),
                (0, 22, Some(expected)),
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn empty_feed_changes_nothing() {
        let mut tests = tests_for(1.0);
        assert_eq!(tests.feed(&[]), Ok(0));
        assert_eq!(tests.tested(), 0);
        assert!(tests.in_startup());
    }
}
