// SPDX-License-Identifier: Apache-2.0
//! Entropy-engine benchmark: how fast each stage runs on one core, next to
//! the raw rates of the host's sources. Reported figures, not a pass/fail
//! test.
//!
//! ```sh
//! cargo bench --bench entropy              # default: about 1 s a figure
//! cargo bench --bench entropy -- --seconds 3
//! ```
//!
//! Stages, each on one thread:
//! - health tests (RCT + APT) on uniform bytes, at the credit RDSEED gets;
//! - HMAC-SHA-256 conditioning at 4 and 1 bits/byte credit;
//! - health tests and conditioning together (what a source thread plus the
//!   conditioner do per input byte);
//! - the per-guest DRBG's candidates with 4 KiB, 64-byte and 16 KiB
//!   requests, each re-keyed after every request (fast key erasure): the
//!   former ChaCha20 DRBG (RustCrypto `ChaCha20Rng`, re-seeded from its own
//!   output), ChaCha20 through the cipher API (its SIMD backend chosen at
//!   run time) and AES-256-CTR (`aes` + `ctr`, AES-NI chosen at run time),
//!   then `Drbg` itself (AES-256 CTR_DRBG, key and V replaced by the
//!   update step after every request). 16 KiB is a batch of 256 64-byte
//!   requests answered by one call, as the vhost-user data path does.
//!
//! Sources: RDSEED, /dev/hwrng (for at most the measuring time; it may be
//! very slow) and getrandom.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes::cipher::{KeyIvInit, StreamCipher};
use rand_core::{Rng, SeedableRng};
use vhost_rng::entropy::conditioner::Conditioner;
use vhost_rng::entropy::drbg::{self, Drbg, ReseedPolicy};
use vhost_rng::entropy::health::{HealthConfig, HealthTests};
use vhost_rng::entropy::source::{RawSource, SourceSpec};

/// Deterministic uniform bytes (splitmix64), so the health tests see data
/// that passes them.
fn uniform_bytes(len: usize) -> Vec<u8> {
    let mut state = 0x5eed_u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs `step` (which processes `bytes_per_step` bytes) for about `time`
/// and returns MB/s.
fn rate(time: Duration, bytes_per_step: usize, mut step: impl FnMut()) -> f64 {
    let started = Instant::now();
    let mut bytes = 0u64;
    while started.elapsed() < time {
        for _ in 0..16 {
            step();
        }
        bytes += 16 * bytes_per_step as u64;
    }
    bytes as f64 / started.elapsed().as_secs_f64() / 1e6
}

fn print_requests(label: &str, mb_per_s: f64, size: usize) {
    println!(
        "{label:<48} {mb_per_s:>12.0}   ({:.2} M requests/s)",
        mb_per_s / size as f64
    );
}

fn source_rate(spec: &str, time: Duration) -> String {
    let spec: SourceSpec = match spec.parse() {
        Ok(spec) => spec,
        Err(e) => return e,
    };
    let mut source: Box<dyn RawSource> = match spec.open() {
        Ok(source) => source,
        Err(e) => return format!("unavailable ({e})"),
    };
    // Read on a thread of its own: a stalled device must not stall the bench.
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let started = Instant::now();
        let mut bytes = 0u64;
        while started.elapsed() < time {
            match source.read(&mut buf) {
                Ok(n) => bytes += n as u64,
                Err(e) => {
                    let _ = done.send(Err(e.to_string()));
                    return;
                }
            }
        }
        let _ = done.send(Ok(bytes as f64 / started.elapsed().as_secs_f64()));
    });
    match result.recv_timeout(time + Duration::from_secs(5)) {
        Ok(Ok(rate)) if rate >= 1e6 => format!("{:.1} MB/s", rate / 1e6),
        Ok(Ok(rate)) => format!("{:.1} kB/s", rate / 1e3),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "stalled (no read completed)".into(),
    }
}

fn main() {
    let mut seconds = 1.0f64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|s: &f64| *s > 0.0)
                    .unwrap_or_else(|| {
                        eprintln!("--seconds needs a positive number");
                        std::process::exit(2)
                    })
            }
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => {
                eprintln!("unknown argument {other}; usage: [--seconds S]");
                std::process::exit(2);
            }
        }
    }
    let time = Duration::from_secs_f64(seconds);
    let input = uniform_bytes(1 << 20);

    println!("entropy engine, one core each ({seconds} s a figure)\n");
    println!("{:<48} {:>12}", "stage", "MB/s");

    let mut tests = HealthTests::new(HealthConfig::new(4.0)).expect("valid config");
    let health = rate(time, input.len(), || {
        black_box(tests.feed(black_box(&input)).expect("uniform data passes"));
    });
    println!(
        "{:<48} {:>12.0}",
        "health tests (RCT+APT, H=4), input", health
    );

    for h in [4.0, 1.0] {
        let mut conditioner = Conditioner::new([7; 32]);
        let mut blocks = Vec::new();
        let conditioning = rate(time, input.len(), || {
            conditioner.absorb(black_box(&input), h, &mut blocks);
            blocks.clear();
        });
        println!(
            "{:<48} {:>12.0}   ({:.0} MB/s full-entropy output)",
            format!("HMAC-SHA-256 conditioning at H={h}, input"),
            conditioning,
            conditioning * h / 10.0
        );
    }

    let mut tests = HealthTests::new(HealthConfig::new(4.0)).expect("valid config");
    let mut conditioner = Conditioner::new([7; 32]);
    let mut blocks = Vec::new();
    let both = rate(time, input.len(), || {
        let approved = tests.feed(&input).expect("uniform data passes");
        conditioner.absorb(&input[..approved], 4.0, &mut blocks);
        blocks.clear();
    });
    println!(
        "{:<48} {:>12.0}",
        "health tests + conditioning (H=4), input", both
    );

    let policy = ReseedPolicy {
        max_bytes: u64::MAX,
        max_age: Duration::from_secs(3600),
    };
    // The former DRBG: ChaCha20Rng, re-seeded from its own output after
    // every request.
    for size in [4096usize, 64] {
        let mut rng = chacha20::ChaCha20Rng::from_seed([1; 32]);
        let mut buf = vec![0u8; size];
        let generated = rate(time, size, || {
            rng.fill_bytes(black_box(&mut buf));
            let mut next = [0u8; 32];
            rng.fill_bytes(&mut next);
            rng = chacha20::ChaCha20Rng::from_seed(next);
        });
        println!(
            "{:<48} {:>12.0}   ({:.2} M requests/s)",
            format!("ChaCha20 DRBG, {size}-byte requests"),
            generated,
            generated / size as f64
        );
    }

    println!(
        "\nDRBG candidates, re-keyed after every request (AES-NI {}, AVX2 {})\n",
        if drbg::hardware_accelerated() {
            "used"
        } else {
            "NOT available: software AES"
        },
        if std::arch::is_x86_feature_detected!("avx2") {
            "present"
        } else {
            "absent"
        },
    );
    println!("{:<48} {:>12}", "generator", "MB/s");
    for size in [4096usize, 64, 16384] {
        let mut key = [2u8; 32];
        let mut buf = vec![0u8; size];
        let generated = rate(time, size, || {
            let mut cipher = chacha20::ChaCha20::new(&key.into(), &[0u8; 12].into());
            cipher.write_keystream(black_box(&mut buf));
            cipher.write_keystream(&mut key);
        });
        print_requests(
            &format!("ChaCha20 cipher API, {size}-byte requests"),
            generated,
            size,
        );
    }
    for size in [4096usize, 64, 16384] {
        let mut state = [3u8; 48];
        let mut buf = vec![0u8; size];
        let generated = rate(time, size, || {
            let (key, iv) = state.split_at(32);
            let mut cipher = ctr::Ctr128BE::<aes::Aes256Enc>::new_from_slices(key, iv).unwrap();
            cipher.write_keystream(black_box(&mut buf));
            cipher.write_keystream(&mut state);
        });
        print_requests(
            &format!("AES-256-CTR, {size}-byte requests"),
            generated,
            size,
        );
    }
    for size in [4096usize, 64, 16384] {
        let mut drbg = Drbg::new(policy);
        let now = Instant::now();
        drbg.reseed(&[1; 32], now);
        let mut buf = vec![0u8; size];
        let generated = rate(time, size, || {
            drbg.generate(black_box(&mut buf), now);
        });
        print_requests(
            &format!("Drbg (AES-256 CTR_DRBG), {size}-byte requests"),
            generated,
            size,
        );
    }

    println!("\nraw sources on this host ({seconds} s each, 512-byte reads)\n");
    for spec in ["rdseed", "hwrng", "os"] {
        println!("{:<48} {:>12}", spec, source_rate(spec, time));
    }
}
