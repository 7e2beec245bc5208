// SPDX-License-Identifier: Apache-2.0
//! The x86 RDSEED instruction as a raw entropy source.
//!
//! RDSEED hands out values straight from the CPU's entropy conditioner (not
//! from a DRBG seeded by it, which is what RDRAND returns), so it is the
//! closest thing to the noise source a guest can be given through us. The
//! conditioner is shared by many cores (and the VMs running on them) and can
//! run dry: the instruction then clears CF and returns no value. This module
//! retries such draws a bounded number of times, counts the retries and the
//! draws it gave up on, and leaves backing off for longer to its caller,
//! which reads each source on a thread of its own.
//!
//! [`RdseedSource::detect`] checks CPUID and then runs a start-up sanity
//! self-test, because CPUs have shipped that advertise the instruction and
//! report success while returning a constant (see `check_self_test`).
//!
//! The draw/retry/self-test logic is written against the small
//! `SeedInstruction` trait so that unit tests can drive it with scripted
//! fakes; only `HwRdseed` executes the real instruction.

use thiserror::Error;

/// Tries per 64-bit draw before giving up and reporting
/// [`RdseedError::Exhausted`].
///
/// Intel's DRNG software implementation guide gives a fixed count (10 tight
/// retries) only for RDRAND, whose DRBG practically never underflows. For
/// RDSEED it treats underflow as expected whenever consumers outpace the
/// conditioner, and suggests retrying with PAUSE between attempts without
/// naming a count. 100 tries covers a transient drain by other cores or
/// VMs: on the development host (AMD EPYC guest) a successful RDSEED takes
/// about 1 µs and a PAUSE about 40 ns, so a fully failed draw gives up after
/// roughly 0.1 ms. That is long enough to ride out contention, yet short
/// enough that a dead or saturated unit quickly returns control to the
/// caller, which then sleeps instead of spinning a core.
pub const MAX_TRIES: u32 = 100;

/// Values drawn by the start-up self-test.
const SELF_TEST_DRAWS: usize = 32;

/// Most self-test values allowed to repeat an earlier one. For a working
/// 64-bit source even one repeat among 32 values has a probability of about
/// 3e-17, so this is not a statistical threshold: it aims the rule at the
/// gross faults it is for (stuck or short-cycle output, which repeats many
/// times), and a small allowance gives up no detection of those.
const SELF_TEST_MAX_REPEATS: usize = 2;

/// Why RDSEED cannot be used, or why a read failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RdseedError {
    /// CPUID does not report RDSEED, or this is not an x86_64 build.
    #[error(
        "RDSEED is not available: the CPU does not report it (CPUID.07H:EBX bit 18) or this is not an x86_64 build"
    )]
    Unsupported,
    /// Every try of one draw came back without a value (CF=0).
    #[error(
        "RDSEED returned no value in {tries} tries: the CPU's entropy unit is drained (heavy use by other cores or VMs) or failing"
    )]
    Exhausted {
        /// Tries made, all without a value: [`MAX_TRIES`].
        tries: u32,
    },
    /// The start-up sanity self-test rejected the instruction's output.
    #[error("RDSEED start-up self-test failed, not using it: {reason}")]
    SelfTestFailed {
        /// What the self-test found: identical or repeated values, or a draw
        /// that got no value.
        reason: String,
    },
}

/// One execution of the instruction, abstracted so tests can script it.
trait SeedInstruction {
    /// Executes RDSEED once: `Some(value)` when the CPU reported success
    /// (CF=1), `None` when it had no value ready (CF=0).
    fn step(&mut self) -> Option<u64>;

    /// Waits briefly before a retry.
    fn pause(&mut self) {}
}

/// The real instruction. A value of this type exists only if CPUID reported
/// RDSEED: [`HwRdseed::new`] is the only constructor, and that invariant is
/// what makes [`HwRdseed::step`] sound.
#[derive(Debug)]
struct HwRdseed {
    _cpuid_checked: (),
}

impl HwRdseed {
    fn new() -> Option<HwRdseed> {
        rdseed_supported().then_some(HwRdseed { _cpuid_checked: () })
    }
}

impl SeedInstruction for HwRdseed {
    #[cfg(target_arch = "x86_64")]
    fn step(&mut self) -> Option<u64> {
        // SAFETY: `rdseed64` requires a CPU that implements RDSEED, else it
        // executes an invalid opcode. `self` can only have been built by
        // `HwRdseed::new`, which checked that the CPU reports RDSEED first.
        unsafe { rdseed64() }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn step(&mut self) -> Option<u64> {
        // Unreachable: `rdseed_supported` is false here, so `new` never
        // builds a value.
        None
    }

    #[cfg(target_arch = "x86_64")]
    fn pause(&mut self) {
        // PAUSE between retries, as Intel recommends: it spaces the tries out
        // (giving the conditioner time to refill) and yields execution
        // resources to a sibling hyperthread instead of spinning flat out.
        // spin_loop is PAUSE on x86_64.
        std::hint::spin_loop();
    }
}

/// Executes one 64-bit RDSEED.
///
/// # Safety
///
/// The CPU must implement RDSEED (CPUID.07H.0H:EBX bit 18).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "rdseed")]
unsafe fn rdseed64() -> Option<u64> {
    let mut value = 0u64;
    // With the `rdseed` feature enabled on this function the intrinsic is
    // safe on current toolchains; older ones within our `rust-version` still
    // declare it `unsafe`. Its only requirement is the caller's contract.
    #[allow(unused_unsafe)]
    // SAFETY: the caller guarantees the CPU has RDSEED; the intrinsic only
    // writes `value`, which lives for the call.
    let carry = unsafe { core::arch::x86_64::_rdseed64_step(&mut value) };
    // The 64-bit form on purpose: it needs half the executions of the 32-bit
    // one, and AMD's 2025 Zen 5 advisory (zero returned with CF=1) concerned
    // the 16- and 32-bit forms. The self-test checks for that fault anyway.
    (carry == 1).then_some(value)
}

/// Whether the CPU reports the RDSEED instruction (CPUID only; no self-test).
pub fn rdseed_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("rdseed")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The bounded-retry draw loop and its counters, over any instruction.
#[derive(Debug)]
struct Drawer<I> {
    insn: I,
    /// Tries beyond the first of a draw. Each one follows a CF=0, so the
    /// CF=0 total is `retries + exhausted_draws`.
    retries: u64,
    /// Draws abandoned after [`MAX_TRIES`] failed tries.
    exhausted_draws: u64,
}

impl<I: SeedInstruction> Drawer<I> {
    fn new(insn: I) -> Self {
        Drawer {
            insn,
            retries: 0,
            exhausted_draws: 0,
        }
    }

    /// One 64-bit value, trying up to [`MAX_TRIES`] times with a pause
    /// between tries (none after the last: the caller backs off anyway).
    fn draw(&mut self) -> Result<u64, RdseedError> {
        let mut tries = 1;
        loop {
            if let Some(value) = self.insn.step() {
                return Ok(value);
            }
            if tries == MAX_TRIES {
                self.exhausted_draws += 1;
                return Err(RdseedError::Exhausted { tries });
            }
            self.insn.pause();
            self.retries += 1;
            tries += 1;
        }
    }

    /// Fills all of `buf`, 8 bytes per draw. A tail shorter than 8 bytes
    /// takes the first bytes of one more draw and drops the rest: keeping
    /// leftovers would add state for a case that callers reading whole
    /// words never hit. On error the contents of `buf` are unspecified.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, RdseedError> {
        let len = buf.len();
        let mut words = buf.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.draw()?.to_ne_bytes());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            let bytes = self.draw()?.to_ne_bytes();
            tail.copy_from_slice(&bytes[..tail.len()]);
        }
        Ok(len)
    }

    /// Draws [`SELF_TEST_DRAWS`] values and runs [`check_self_test`] on them.
    fn self_test(&mut self) -> Result<(), RdseedError> {
        let mut values = [0u64; SELF_TEST_DRAWS];
        for (index, value) in values.iter_mut().enumerate() {
            *value = self.draw().map_err(|_| RdseedError::SelfTestFailed {
                reason: if index == 0 {
                    format!(
                        "the CPU never reported success (CF=1) in {MAX_TRIES} tries; \
                         the instruction is advertised but not delivering"
                    )
                } else {
                    format!(
                        "draw {} of {SELF_TEST_DRAWS} got no value in {MAX_TRIES} tries",
                        index + 1
                    )
                },
            })?;
        }
        check_self_test(&values).map_err(|reason| RdseedError::SelfTestFailed { reason })
    }
}

/// Rejects output that no working generator produces, returning why.
///
/// This is a sanity check for gross faults, not a statistical test (the
/// health tests downstream do that on the running stream). It catches:
///
/// - every value identical: a stuck unit. This covers all ones, which is
///   what AMD CPUs returned, with CF=1, when their random-number unit was
///   broken — family 15h/16h parts after suspend/resume when the BIOS did
///   not restore it (Linux hides RDRAND on those for this reason), and
///   early Zen 2 (Ryzen 3000) firmware for RDRAND and RDSEED alike — and
///   all zeros reported as success;
/// - 0 or `u64::MAX` more than once: each has probability 2^-64 per draw,
///   so twice in 32 means a unit that keeps falling back to a fixed value,
///   as in AMD's 2025 Zen 5 advisory where RDSEED returned 0 with CF=1;
/// - more than [`SELF_TEST_MAX_REPEATS`] values repeating an earlier one:
///   stuck or short-cycle output that is not constant throughout.
fn check_self_test(values: &[u64]) -> Result<(), String> {
    let n = values.len();
    // (No `if let` chain here: they need a newer toolchain than `rust-version`.)
    let first = values.first().copied();
    if let Some(first) = first.filter(|&first| values.iter().all(|&value| value == first)) {
        let hint = match first {
            u64::MAX => " (all ones: the known AMD failure mode)",
            0 => " (zero reported as success)",
            _ => "",
        };
        return Err(format!("all {n} values were {first:#018x}{hint}"));
    }
    for special in [0, u64::MAX] {
        let count = values.iter().filter(|&&value| value == special).count();
        if count > 1 {
            return Err(format!(
                "{count} of {n} values were {special:#018x}, expected at most one"
            ));
        }
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let repeats = sorted.windows(2).filter(|pair| pair[0] == pair[1]).count();
    if repeats > SELF_TEST_MAX_REPEATS {
        return Err(format!(
            "{repeats} of {n} values repeated an earlier one, expected at most {SELF_TEST_MAX_REPEATS}"
        ));
    }
    Ok(())
}

/// Raw RDSEED output, checked at start-up.
#[derive(Debug)]
pub struct RdseedSource {
    drawer: Drawer<HwRdseed>,
}

impl RdseedSource {
    /// Checks CPUID for RDSEED, then runs the start-up self-test: 32 draws
    /// that must not be constant, hold 0 or all ones more than once, or
    /// repeat more than twice. Always [`RdseedError::Unsupported`] on
    /// non-x86_64 builds.
    pub fn detect() -> Result<RdseedSource, RdseedError> {
        let insn = HwRdseed::new().ok_or(RdseedError::Unsupported)?;
        let mut drawer = Drawer::new(insn);
        drawer.self_test()?;
        Ok(RdseedSource { drawer })
    }

    /// Name in logs, status and metrics.
    pub fn name(&self) -> &str {
        "rdseed"
    }

    /// RDSEED output comes from the CPU's hardware noise source.
    pub fn is_hardware(&self) -> bool {
        true
    }

    /// Fills all of `buf` and returns its length. Fails with
    /// [`RdseedError::Exhausted`] when one draw got no value in
    /// [`MAX_TRIES`] tries; the caller should count that and back off. On
    /// error the contents of `buf` are unspecified.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, RdseedError> {
        self.drawer.fill(buf)
    }

    /// Tries repeated after the CPU had no value ready, since
    /// [`detect`](Self::detect) (its self-test draws included).
    pub fn retries(&self) -> u64 {
        self.drawer.retries
    }

    /// Draws abandoned after [`MAX_TRIES`] tries, each reported as
    /// [`RdseedError::Exhausted`] (or as a failed self-test).
    pub fn exhausted_draws(&self) -> u64 {
        self.drawer.exhausted_draws
    }
}

impl super::RawSource for RdseedSource {
    fn name(&self) -> &str {
        RdseedSource::name(self)
    }

    fn is_hardware(&self) -> bool {
        true
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, super::SourceError> {
        RdseedSource::read(self, buf).map_err(|e| super::SourceError::Unavailable {
            source_name: "rdseed".into(),
            reason: e.to_string(),
        })
    }

    fn retries(&self) -> u64 {
        RdseedSource::retries(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted instruction: `outcome(n)` decides the n-th step (from 0).
    struct Fake<F> {
        outcome: F,
        steps: u64,
        pauses: u64,
    }

    impl<F: FnMut(u64) -> Option<u64>> SeedInstruction for Fake<F> {
        fn step(&mut self) -> Option<u64> {
            let result = (self.outcome)(self.steps);
            self.steps += 1;
            result
        }

        fn pause(&mut self) {
            self.pauses += 1;
        }
    }

    fn fake<F: FnMut(u64) -> Option<u64>>(outcome: F) -> Drawer<Fake<F>> {
        Drawer::new(Fake {
            outcome,
            steps: 0,
            pauses: 0,
        })
    }

    /// Distinct, well-mixed values (a SplitMix-style finalizer over n), so
    /// none is 0, all ones or a repeat.
    fn mixed(n: u64) -> u64 {
        let mut z = n.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn self_test_reason<F: FnMut(u64) -> Option<u64>>(outcome: F) -> String {
        match fake(outcome).self_test() {
            Err(RdseedError::SelfTestFailed { reason }) => reason,
            other => panic!("expected a self-test failure, got {other:?}"),
        }
    }

    #[test]
    fn always_failing_draw_is_exhausted_after_exactly_max_tries() {
        let mut drawer = fake(|_| None);
        assert_eq!(
            drawer.draw(),
            Err(RdseedError::Exhausted { tries: MAX_TRIES })
        );
        assert_eq!(drawer.insn.steps, u64::from(MAX_TRIES));
        assert_eq!(drawer.insn.pauses, u64::from(MAX_TRIES - 1));
        assert_eq!(drawer.retries, u64::from(MAX_TRIES - 1));
        assert_eq!(drawer.exhausted_draws, 1);

        // A read stops at its first exhausted draw.
        let mut buf = [0u8; 24];
        assert!(matches!(
            drawer.fill(&mut buf),
            Err(RdseedError::Exhausted { .. })
        ));
        assert_eq!(drawer.insn.steps, 2 * u64::from(MAX_TRIES));
        assert_eq!(drawer.retries, 2 * u64::from(MAX_TRIES - 1));
        assert_eq!(drawer.exhausted_draws, 2);
    }

    #[test]
    fn failures_then_success_count_as_retries() {
        let mut drawer = fake(|n| (n >= 5).then_some(0x1234));
        assert_eq!(drawer.draw(), Ok(0x1234));
        assert_eq!(drawer.retries, 5);
        assert_eq!(drawer.insn.pauses, 5);
        assert_eq!(drawer.exhausted_draws, 0);

        // Success on the very last allowed try still counts as a value.
        let last = u64::from(MAX_TRIES - 1);
        let mut drawer = fake(move |n| (n == last).then_some(7));
        assert_eq!(drawer.draw(), Ok(7));
        assert_eq!(drawer.retries, last);
        assert_eq!(drawer.exhausted_draws, 0);

        // One try later is too late.
        let late = u64::from(MAX_TRIES);
        let mut drawer = fake(move |n| (n == late).then_some(7));
        assert!(drawer.draw().is_err());
        assert_eq!(drawer.exhausted_draws, 1);
    }

    #[test]
    fn fills_every_length_including_tails() {
        for len in 0..=17usize {
            // Step n returns the byte pattern n+1 repeated.
            let mut drawer = fake(|n| Some(0x0101_0101_0101_0101 * (n + 1)));
            let mut buf = vec![0u8; len];
            assert_eq!(drawer.fill(&mut buf), Ok(len));
            let draws = len.div_ceil(8);
            assert_eq!(drawer.insn.steps, draws as u64, "len {len}");
            let expected: Vec<u8> = (0..len).map(|i| (i / 8 + 1) as u8).collect();
            assert_eq!(buf, expected, "len {len}");
        }
    }

    #[test]
    fn self_test_accepts_good_values() {
        let mut drawer = fake(|n| Some(mixed(n)));
        assert_eq!(drawer.self_test(), Ok(()));
        assert_eq!(drawer.insn.steps, SELF_TEST_DRAWS as u64);

        // A single 0 or all-ones value, or a couple of repeats, is tolerated.
        assert!(
            fake(|n| Some(if n == 3 { 0 } else { mixed(n) }))
                .self_test()
                .is_ok()
        );
        assert!(
            fake(|n| Some(if n == 3 { u64::MAX } else { mixed(n) }))
                .self_test()
                .is_ok()
        );
        assert!(fake(|n| Some(mixed(n % 30))).self_test().is_ok());

        // Occasional retries do not fail it.
        assert!(fake(|n| (n % 3 != 0).then(|| mixed(n))).self_test().is_ok());
    }

    #[test]
    fn self_test_rejects_all_ones() {
        let reason = self_test_reason(|_| Some(u64::MAX));
        assert!(reason.contains("0xffffffffffffffff"), "{reason}");
        assert!(reason.contains("all ones"), "{reason}");
    }

    #[test]
    fn self_test_rejects_zero_reported_as_success() {
        let reason = self_test_reason(|_| Some(0));
        assert!(reason.contains("zero reported as success"), "{reason}");
    }

    #[test]
    fn self_test_rejects_any_constant() {
        let reason = self_test_reason(|_| Some(0x5555_5555_5555_5555));
        assert!(reason.contains("all 32 values"), "{reason}");
    }

    #[test]
    fn self_test_rejects_repeated_zero_or_all_ones() {
        let reason = self_test_reason(|n| Some(if n % 10 == 0 { 0 } else { mixed(n) }));
        assert!(
            reason.contains("4 of 32 values were 0x0000000000000000"),
            "{reason}"
        );
        let reason = self_test_reason(|n| Some(if n < 2 { u64::MAX } else { mixed(n) }));
        assert!(reason.contains("2 of 32"), "{reason}");
    }

    #[test]
    fn self_test_rejects_short_cycles() {
        let reason = self_test_reason(|n| Some(mixed(n % 29)));
        assert!(reason.contains("3 of 32 values repeated"), "{reason}");
        let reason = self_test_reason(|n| Some(mixed(n % 4)));
        assert!(reason.contains("28 of 32"), "{reason}");
    }

    #[test]
    fn self_test_fails_when_cf_is_never_set() {
        let reason = self_test_reason(|_| None);
        assert!(reason.contains("never reported success (CF=1)"), "{reason}");

        // Going dry part-way through fails it too.
        let reason = self_test_reason(|n| (n < 10).then(|| mixed(n)));
        assert!(reason.contains("draw 11 of 32"), "{reason}");
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            RdseedError::Exhausted { tries: 100 }.to_string(),
            "RDSEED returned no value in 100 tries: the CPU's entropy unit is \
             drained (heavy use by other cores or VMs) or failing"
        );
        assert!(RdseedError::Unsupported.to_string().contains("bit 18"));
    }

    /// Whether the kernel lists `flag` among the CPU's features in
    /// /proc/cpuinfo: a witness independent of our own CPUID check.
    fn cpuinfo_has(flag: &str) -> bool {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_else(|e| panic!("this test needs /proc/cpuinfo: {e}"));
        let flags = cpuinfo
            .lines()
            .find(|line| line.starts_with("flags"))
            .and_then(|line| line.split_once(':'))
            .map(|(_, flags)| flags)
            .unwrap_or_else(|| {
                // x86_64 kernels always list flags; other architectures
                // have none to compare with, and no RDSEED either.
                if cfg!(target_arch = "x86_64") {
                    panic!("no flags line in /proc/cpuinfo");
                }
                ""
            });
        flags.split_whitespace().any(|f| f == flag)
    }

    #[test]
    fn detection_agrees_with_the_kernel() {
        let listed = cpuinfo_has("rdseed");
        assert_eq!(
            rdseed_supported(),
            listed,
            "CPUID and /proc/cpuinfo disagree about RDSEED"
        );
        match RdseedSource::detect() {
            // Detected means its self-test passed too.
            Ok(_) => assert!(listed, "detected without the rdseed flag"),
            Err(error) => assert!(
                !listed && error == RdseedError::Unsupported,
                "the CPU lists rdseed, yet detection failed: {error}"
            ),
        }
    }

    /// Runs the real instruction where the CPU has it (this one must draw
    /// from it); where it does not, detection must say so.
    #[test]
    fn real_rdseed_reads_varied_bytes() {
        if !cpuinfo_has("rdseed") {
            assert_eq!(
                RdseedSource::detect().unwrap_err(),
                RdseedError::Unsupported
            );
            return;
        }
        let mut source = RdseedSource::detect()
            .unwrap_or_else(|e| panic!("the CPU lists rdseed, yet detection failed: {e}"));
        assert_eq!(source.name(), "rdseed");
        assert!(source.is_hardware());
        let mut buf = vec![0u8; 4096];
        assert_eq!(source.read(&mut buf), Ok(4096));
        let words: Vec<u64> = buf
            .chunks_exact(8)
            .map(|word| u64::from_ne_bytes(word.try_into().unwrap()))
            .collect();
        assert!(
            words.iter().any(|&word| word != words[0]),
            "constant output"
        );
        assert_eq!(check_self_test(&words), Ok(()));
        println!(
            "rdseed: 4096 bytes, {} retries, {} exhausted draws",
            source.retries(),
            source.exhausted_draws()
        );
    }
}
