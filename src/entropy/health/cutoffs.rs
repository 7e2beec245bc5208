// SPDX-License-Identifier: Apache-2.0
//! Cutoff arithmetic for the continuous health tests of SP 800-90B section
//! 4.4: how long a run, and how many repeats within a window, a source with
//! the claimed min-entropy produces with probability at most `alpha`.
//!
//! `alpha`, the acceptable false-positive probability, is given as its
//! exponent: `alpha = 2^-alpha_log2`. SP 800-90B recommends
//! `2^-40 <= alpha <= 2^-20`; [`DEFAULT_ALPHA_LOG2`] is 20.
//!
//! Both cutoffs are computed once, when the tests are configured; nothing
//! here runs per sample.

use std::f64::consts::LN_2;

use super::HealthConfigError;

/// `alpha = 2^-20`, the false-positive rate SP 800-90B uses for its tables.
pub const DEFAULT_ALPHA_LOG2: u32 = 20;
/// Largest accepted `alpha_log2` (`alpha = 2^-64`); beyond it the adaptive
/// proportion test could not fail within any supported window.
pub const MAX_ALPHA_LOG2: u32 = 64;
/// Adaptive proportion test window for binary samples (one bit each).
pub const WINDOW_BINARY: u32 = 1024;
/// Adaptive proportion test window for non-binary samples, such as bytes.
pub const WINDOW_NON_BINARY: u32 = 512;
/// Largest accepted adaptive proportion test window.
pub const MAX_WINDOW: u32 = 1 << 16;
/// Largest min-entropy a sample can carry: 8 bits for a byte.
pub const MAX_MIN_ENTROPY: f64 = 8.0;

/// `alpha_log2 / H` values this close (relatively) to an integer count as
/// that integer, so that a decimal claim such as `H = 0.1` gives the cutoff
/// of the exact ratio (`20 / 0.1 = 200`) and not one more because the
/// nearest `f64` to 0.1 is not exactly 0.1.
const SNAP_TOLERANCE: f64 = 1e-9;

/// Checks a claimed min-entropy per sample: a number with `0 < H <= 8`.
pub fn check_min_entropy(min_entropy: f64) -> Result<(), HealthConfigError> {
    // Written so that NaN fails too.
    if min_entropy > 0.0 && min_entropy <= MAX_MIN_ENTROPY {
        Ok(())
    } else {
        Err(HealthConfigError::MinEntropy {
            value: min_entropy,
            max: MAX_MIN_ENTROPY,
        })
    }
}

/// Checks a false-positive exponent: `1 <= alpha_log2 <= 64`.
pub fn check_alpha_log2(alpha_log2: u32) -> Result<(), HealthConfigError> {
    if (1..=MAX_ALPHA_LOG2).contains(&alpha_log2) {
        Ok(())
    } else {
        Err(HealthConfigError::AlphaLog2 {
            value: alpha_log2,
            max: MAX_ALPHA_LOG2,
        })
    }
}

/// Repetition Count Test cutoff (SP 800-90B 4.4.1):
///
/// ```text
/// C = 1 + ceil(-log2(alpha) / H) = 1 + ceil(alpha_log2 / H)
/// ```
///
/// A run of `C` identical samples has probability at most
/// `2^(-H * (C - 1)) <= alpha` from a source with min-entropy `H` per
/// sample, so the test fails when a run reaches `C`.
///
/// Examples at `alpha = 2^-20`: `H = 1` gives 21, `H = 8` gives 4 and
/// `H = 0.5` gives 41. The result is always at least 2.
pub fn rct_cutoff(min_entropy: f64, alpha_log2: u32) -> Result<u32, HealthConfigError> {
    check_min_entropy(min_entropy)?;
    check_alpha_log2(alpha_log2)?;
    let ratio = f64::from(alpha_log2) / min_entropy;
    let nearest = ratio.round();
    let steps = if (ratio - nearest).abs() <= ratio * SNAP_TOLERANCE {
        nearest
    } else {
        ratio.ceil()
    };
    // `steps + 1` must fit in a u32; also catches an infinite ratio.
    if steps < f64::from(u32::MAX) {
        // In range 1..u32::MAX and integral, so the conversion is exact.
        Ok(steps as u32 + 1)
    } else {
        Err(HealthConfigError::RctCutoffTooLarge { min_entropy })
    }
}

/// Adaptive Proportion Test cutoff (SP 800-90B 4.4.2), with the standard's
/// spreadsheet formula:
///
/// ```text
/// C = 1 + CRITBINOM(W, 2^-H, 1 - alpha)
/// ```
///
/// `CRITBINOM(n, p, 1 - alpha)` is the smallest `k` with
/// `P[X <= k] >= 1 - alpha` for `X ~ Binomial(n, p)`, so `C` is the
/// smallest count with
///
/// ```text
/// P[X >= C] <= alpha,   X ~ Binomial(W, p = 2^-H)
/// ```
///
/// The test fails when a window's count of its first value reaches `C`.
/// `window` is [`WINDOW_NON_BINARY`] (512) for bytes, [`WINDOW_BINARY`]
/// (1024) for bits.
///
/// Examples at `alpha = 2^-20` and `W = 512` (the standard's Table 2):
/// `H = 0.5` gives 410, `H = 1` gives 311, `H = 2` gives 177, `H = 4`
/// gives 62 and `H = 8` gives 13.
///
/// The result can be `window + 1` when the claimed min-entropy is so low
/// that even `W` repeats are not rare enough (`2^(-H * W) > alpha`); a test
/// with that cutoff can never fail, and [`super::HealthTests`] rejects such
/// a configuration.
///
/// Note: the count in the test includes the window's first sample, which
/// matches its own value by definition, so the exact distribution of the
/// count is `1 + Binomial(W - 1, p)` rather than `Binomial(W, p)`. The
/// standard's formula, used here, gives the same or a one smaller cutoff
/// than the exact one, i.e. a false-positive rate a few times `alpha` at
/// most. It is kept because it is the published, table-checked formula.
pub fn apt_cutoff(
    min_entropy: f64,
    alpha_log2: u32,
    window: u32,
) -> Result<u32, HealthConfigError> {
    check_min_entropy(min_entropy)?;
    check_alpha_log2(alpha_log2)?;
    if !(2..=MAX_WINDOW).contains(&window) {
        return Err(HealthConfigError::Window {
            value: window,
            max: MAX_WINDOW,
        });
    }
    let alpha = (-f64::from(alpha_log2)).exp2();
    Ok(smallest_rare_count(window, min_entropy, alpha))
}

/// Smallest `c` with `P[X >= c] <= alpha` for `X ~ Binomial(n, 2^-h)`,
/// for `0 < alpha < 1`. Returns `n + 1` when no `c <= n` qualifies.
///
/// Sums the upper tail from `k = n` downwards, with each probability
/// computed in log space from the previous one:
///
/// ```text
/// ln P[X = n]     = n ln p
/// ln P[X = k - 1] = ln P[X = k] + ln k - ln(n - k + 1) + ln q - ln p
/// ```
///
/// Terms too small for an `f64` (far below any `alpha >= 2^-64`) add
/// nothing, which is harmless. `q = 1 - 2^-h` is taken as `-expm1(-h ln 2)`
/// so it stays accurate for small `h`.
fn smallest_rare_count(n: u32, h: f64, alpha: f64) -> u32 {
    let ln_p = -h * LN_2;
    let ln_q = (-ln_p.exp_m1()).ln();
    let step = ln_q - ln_p;
    let mut ln_term = f64::from(n) * ln_p;
    let mut tail = 0.0;
    let mut k = n;
    loop {
        // tail = P[X >= k]
        tail += ln_term.exp();
        if tail > alpha {
            // P[X >= k] > alpha but P[X >= k + 1] <= alpha.
            return k + 1;
        }
        if k == 0 {
            // P[X >= 0] = 1 > alpha: not reached for alpha < 1 unless the
            // sum fell short by rounding; 0 is then the honest answer.
            return 0;
        }
        ln_term += f64::from(k).ln() - f64::from(n - k + 1).ln() + step;
        k -= 1;
    }
}

/// Upper tail `P[X >= c]` for `X ~ Binomial(n, 2^-h)`, summed term by term
/// in plain (not log) space from `k = 0` upwards. A second, independent
/// computation for the tests; only accurate where `(1 - 2^-h)^n` does not
/// underflow.
#[cfg(test)]
fn upper_tail_forward(n: u32, h: f64, c: u32) -> f64 {
    let p = (-h).exp2();
    let q = 1.0 - p;
    let mut term = q.powi(n as i32);
    let mut below = 0.0;
    for k in 0..c.min(n + 1) {
        below += term;
        term *= f64::from(n - k) / f64::from(k + 1) * p / q;
    }
    (1.0 - below).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rct_cutoffs_at_default_alpha() {
        // C = 1 + ceil(20 / H):
        let cases = [
            (0.5, 41),  // 20 / 0.5 = 40
            (1.0, 21),  // 20 / 1 = 20
            (2.0, 11),  // 10
            (3.0, 8),   // 6.67 -> 7
            (4.0, 6),   // 5
            (5.0, 5),   // 4
            (6.0, 5),   // 3.33 -> 4
            (7.0, 4),   // 2.86 -> 3
            (8.0, 4),   // 2.5 -> 3
            (0.1, 201), // 200 exactly, although 0.1 is not an exact f64
            (0.3, 68),  // 66.67 -> 67
            (2.5, 9),   // 8
        ];
        for (h, expected) in cases {
            assert_eq!(rct_cutoff(h, 20).unwrap(), expected, "H = {h}");
        }
    }

    #[test]
    fn rct_cutoffs_at_other_alphas() {
        assert_eq!(rct_cutoff(8.0, 40).unwrap(), 6); // 1 + ceil(5)
        assert_eq!(rct_cutoff(1.0, 40).unwrap(), 41);
        assert_eq!(rct_cutoff(3.0, 30).unwrap(), 11); // 1 + 10
        assert_eq!(rct_cutoff(8.0, 1).unwrap(), 2); // 1 + ceil(0.125)
        assert_eq!(rct_cutoff(1.0 / 49.0, 1).unwrap(), 50); // 1 + 49, snapped
    }

    #[test]
    fn rct_rejects_bad_parameters() {
        for h in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.0,
            -0.0,
            -1.0,
            8.000001,
            1e300,
        ] {
            assert!(
                matches!(rct_cutoff(h, 20), Err(HealthConfigError::MinEntropy { .. })),
                "H = {h}"
            );
        }
        assert!(matches!(
            rct_cutoff(1.0, 0),
            Err(HealthConfigError::AlphaLog2 { value: 0, .. })
        ));
        assert!(matches!(
            rct_cutoff(1.0, 65),
            Err(HealthConfigError::AlphaLog2 { value: 65, .. })
        ));
        // Tiny but valid H: the cutoff would not fit in 32 bits.
        for h in [1e-9, 1e-300, f64::MIN_POSITIVE, 5e-324] {
            assert!(
                matches!(
                    rct_cutoff(h, 20),
                    Err(HealthConfigError::RctCutoffTooLarge { .. })
                ),
                "H = {h}"
            );
        }
        assert_eq!(rct_cutoff(1e-6, 20).unwrap(), 20_000_001);
    }

    #[test]
    fn apt_cutoffs_match_the_standards_table_for_512() {
        // SP 800-90B Table 2, W = 512, alpha = 2^-20.
        for (h, expected) in [(0.5, 410), (1.0, 311), (2.0, 177), (4.0, 62), (8.0, 13)] {
            assert_eq!(
                apt_cutoff(h, 20, WINDOW_NON_BINARY).unwrap(),
                expected,
                "H = {h}"
            );
        }
    }

    #[test]
    fn apt_cutoffs_for_512_between_the_table_rows() {
        // Computed with exact rational arithmetic for integer H, in double
        // precision for the rest.
        let cases = [
            (0.2, 480),
            (0.4, 433),
            (0.6, 388),
            (0.8, 348),
            (1.5, 234),
            (3.0, 103),
            (5.0, 39),
            (6.0, 25),
            (7.0, 18),
        ];
        for (h, expected) in cases {
            assert_eq!(
                apt_cutoff(h, 20, WINDOW_NON_BINARY).unwrap(),
                expected,
                "H = {h}"
            );
        }
    }

    #[test]
    fn apt_cutoffs_for_binary_window() {
        // W = 1024, alpha = 2^-20; binary samples carry H <= 1.
        let cases = [
            (0.2, 941),
            (0.4, 840),
            (0.5, 793),
            (0.6, 748),
            (0.8, 664),
            (1.0, 589),
        ];
        for (h, expected) in cases {
            assert_eq!(
                apt_cutoff(h, 20, WINDOW_BINARY).unwrap(),
                expected,
                "H = {h}"
            );
        }
    }

    #[test]
    fn apt_cutoffs_at_other_alphas() {
        // W = 512, alpha = 2^-30.
        assert_eq!(apt_cutoff(1.0, 30, WINDOW_NON_BINARY).unwrap(), 325);
        assert_eq!(apt_cutoff(8.0, 30, WINDOW_NON_BINARY).unwrap(), 16);
        assert_eq!(apt_cutoff(8.0, 40, WINDOW_NON_BINARY).unwrap(), 19);
    }

    #[test]
    fn apt_cutoff_is_the_smallest_rare_count() {
        // Checked against a tail computed a different way: forwards, in
        // plain space.
        let alpha = (-20f64).exp2();
        for h in [
            0.5, 0.75, 1.0, 1.25, 2.0, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 7.9, 8.0,
        ] {
            let c = apt_cutoff(h, 20, WINDOW_NON_BINARY).unwrap();
            let at = upper_tail_forward(WINDOW_NON_BINARY, h, c);
            let below = upper_tail_forward(WINDOW_NON_BINARY, h, c - 1);
            assert!(at <= alpha, "H = {h}: P[X >= {c}] = {at:e}");
            assert!(below > alpha, "H = {h}: P[X >= {}] = {below:e}", c - 1);
        }
    }

    #[test]
    fn apt_cutoff_decreases_with_entropy() {
        let mut previous = u32::MAX;
        for tenth in 1..=80 {
            let h = f64::from(tenth) / 10.0;
            let c = apt_cutoff(h, 20, WINDOW_NON_BINARY).unwrap();
            assert!(c <= previous, "H = {h}");
            assert!((2..=WINDOW_NON_BINARY).contains(&c), "H = {h}: {c}");
            previous = c;
        }
    }

    #[test]
    fn apt_cutoff_can_exceed_the_window_for_tiny_entropy() {
        // 2^(-0.01 * 512) = 2^-5.12 > 2^-20: no count is rare enough.
        assert_eq!(
            apt_cutoff(0.01, 20, WINDOW_NON_BINARY).unwrap(),
            WINDOW_NON_BINARY + 1
        );
        assert_eq!(apt_cutoff(1e-300, 20, WINDOW_NON_BINARY).unwrap(), 513);
        assert_eq!(apt_cutoff(5e-324, 64, MAX_WINDOW).unwrap(), MAX_WINDOW + 1);
        // 2^(-0.04 * 512) = 2^-20.48 <= 2^-20: only a full window is.
        assert_eq!(apt_cutoff(0.04, 20, WINDOW_NON_BINARY).unwrap(), 512);
    }

    #[test]
    fn apt_rejects_bad_parameters() {
        for h in [f64::NAN, f64::INFINITY, 0.0, -2.0, 9.0] {
            assert!(
                matches!(
                    apt_cutoff(h, 20, WINDOW_NON_BINARY),
                    Err(HealthConfigError::MinEntropy { .. })
                ),
                "H = {h}"
            );
        }
        assert!(matches!(
            apt_cutoff(1.0, 0, WINDOW_NON_BINARY),
            Err(HealthConfigError::AlphaLog2 { .. })
        ));
        for w in [0, 1, MAX_WINDOW + 1, u32::MAX] {
            assert!(
                matches!(
                    apt_cutoff(1.0, 20, w),
                    Err(HealthConfigError::Window { .. })
                ),
                "W = {w}"
            );
        }
        // W = 2, p = 2^-8: P[X >= 2] = 2^-16 <= 2^-10 < P[X >= 1].
        assert_eq!(apt_cutoff(8.0, 10, 2).unwrap(), 2);
    }
}
