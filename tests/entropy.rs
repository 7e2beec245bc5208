// SPDX-License-Identifier: Apache-2.0
//! Fault injection into the entropy engine through `--source file=`, seen
//! from a guest driven by the in-tree test VMM: broken sources never put a
//! byte into a guest, and the daemon keeps serving from healthy ones.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use common::Daemon;
use vhost_rng::entropy::conditioner::{BITS_PER_BLOCK, BLOCK_BYTES};
use vhost_rng_testing::{Buffer, TestVmm, TestVmmConfig};

const SERVED: Duration = Duration::from_secs(20);
/// How long a request is watched to show it is not answered.
const WITHHELD: Duration = Duration::from_secs(3);

/// Deterministic, uniformly distributed test bytes (splitmix64).
struct TestBytes(u64);

impl TestBytes {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// A FIFO the daemon reads as `--source file=PATH`, written by a test thread.
struct Fifo {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fifo {
    fn new() -> Fifo {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entropy.fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        Fifo { path, _dir: dir }
    }

    fn spec(&self, options: &str) -> String {
        format!("file={}{options}", self.path.display())
    }

    /// Writes `good` uniform bytes, then `then` forever (until the reader goes).
    fn feed(&self, good: usize, then: impl Fn(&mut TestBytes, &mut [u8]) + Send + 'static) {
        let path = self.path.clone();
        thread::spawn(move || {
            let Ok(mut fifo) = OpenOptions::new().write(true).open(&path) else {
                return;
            };
            let mut bytes = TestBytes(42);
            let mut buf = vec![0u8; good];
            bytes.fill(&mut buf);
            if fifo.write_all(&buf).is_err() {
                return;
            }
            let mut chunk = [0u8; 4096];
            loop {
                then(&mut bytes, &mut chunk);
                if fifo.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
    }
}

fn start(dir: &tempfile::TempDir, args: &[&str]) -> (Daemon, TestVmm) {
    let socket = dir.path().join("guest.sock");
    let mut all = vec!["serve", "--socket", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut daemon = Daemon::start(all);
    daemon.wait_for_socket(&socket);
    let vmm = TestVmm::connect(&socket, TestVmmConfig::qemu()).unwrap();
    (daemon, vmm)
}

/// Posts 64-byte requests until one is not answered within `WITHHELD`;
/// returns the bytes received. The unanswered request stays posted.
fn drain(vmm: &mut TestVmm) -> usize {
    let mut received = 0;
    loop {
        vmm.post(&[Buffer::writable(64)]).unwrap();
        vmm.kick().unwrap();
        match vmm.wait_used(1, WITHHELD) {
            Ok(used) => received += used[0].len as usize,
            Err(_) => return received,
        }
    }
}

fn assert_served(vmm: &mut TestVmm) {
    let head = vmm.post(&[Buffer::writable(4096)]).unwrap();
    vmm.kick().unwrap();
    let used = vmm.wait_used(1, SERVED).unwrap();
    assert_eq!((used[0].head, used[0].len), (head, 4096));
}

/// Most full-entropy output `good` bytes credited at `h` bits can back.
fn output_bound(good: usize, h: f64) -> usize {
    ((good as f64 * h) / BITS_PER_BLOCK).floor() as usize * BLOCK_BYTES
}

#[test]
fn a_source_stuck_mid_stream_puts_nothing_more_into_guests() {
    let fifo = Fifo::new();
    let good = 64 * 1024;
    fifo.feed(good, |_, chunk| chunk.fill(0));
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut vmm) = start(&dir, &["--mode", "raw", "--source", &fifo.spec("")]);

    let received = drain(&mut vmm);

    eprintln!(
        "received {received} bytes; bound {}",
        output_bound(good, 1.0)
    );
    // Everything the guest got is backed by the good prefix; the endless
    // zeros after it contributed nothing.
    assert!(received > 0, "the good prefix should have been served");
    assert!(
        received <= output_bound(good, 1.0),
        "{received} bytes served, more than {} the good prefix can back",
        output_bound(good, 1.0)
    );
    daemon.wait_for_log("repetition count test failed", 1);
    daemon.wait_for_log("no healthy entropy source", 1);
}

#[test]
fn a_biased_source_fails_the_adaptive_proportion_test() {
    let fifo = Fifo::new();
    // Every other byte is 'A': no long runs, but far too frequent for a
    // source credited 4 bits per byte.
    fifo.feed(0, |bytes, chunk| {
        bytes.fill(chunk);
        for pair in chunk.chunks_mut(2) {
            pair[0] = b'A';
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut vmm) = start(
        &dir,
        &["--mode", "raw", "--source", &fifo.spec(",min-entropy=4")],
    );

    assert_eq!(drain(&mut vmm), 0, "a biased source served a guest");
    daemon.wait_for_log("adaptive proportion test failed", 1);
}

#[test]
fn a_stuck_only_source_never_serves_and_the_daemon_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut vmm) = start(&dir, &["--source", "file=/dev/zero"]);

    assert_eq!(drain(&mut vmm), 0);
    daemon.wait_for_log("no healthy entropy source", 1);
}

#[test]
fn eio_and_hanging_sources_do_not_stop_the_healthy_one() {
    let hanging = Fifo::new(); // never written: its reader blocks in open()
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut vmm) = start(
        &dir,
        &[
            "--source",
            "file=/proc/self/mem", // reads at offset 0 fail with EIO
            "--source",
            &hanging.spec(""),
            "--source",
            "os",
        ],
    );

    for _ in 0..4 {
        assert_served(&mut vmm);
    }
    daemon.wait_for_log("file:/proc/self/mem: read failed", 1);
    daemon.wait_for_log("entropy available from os", 1);
}

#[test]
fn a_waiting_guest_is_served_when_its_source_recovers() {
    let fifo = Fifo::new();
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, mut vmm) = start(&dir, &["--mode", "raw", "--source", &fifo.spec("")]);

    // Nothing to give yet: the request waits...
    let head = vmm.post(&[Buffer::writable(64)]).unwrap();
    vmm.kick().unwrap();
    assert!(
        vmm.wait_used(1, WITHHELD).is_err(),
        "served with no source data"
    );

    // ...and is answered, without another kick, once the source delivers.
    fifo.feed(0, |bytes, chunk| bytes.fill(chunk));
    let used = vmm.wait_used(1, SERVED).unwrap();
    assert_eq!((used[0].head, used[0].len), (head, 64));
}

#[test]
fn default_sources_or_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let mut daemon = Daemon::start(["serve", "--socket", socket.to_str().unwrap()]);
    if vhost_rng::entropy::source::default_sources().is_empty() {
        let (status, log) = daemon.wait_exit();
        assert_eq!(status.code(), Some(1));
        assert!(log.contains("--source os"), "{log}");
    } else {
        daemon.wait_for_socket(&socket);
        let mut vmm = TestVmm::connect(&socket, TestVmmConfig::qemu()).unwrap();
        assert_served(&mut vmm);
    }
}
