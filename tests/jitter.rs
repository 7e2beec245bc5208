// SPDX-License-Identifier: Apache-2.0
//! The `jitter` source through the real binary: `vhost-rng check --source
//! jitter`, and a daemon serving a guest from it alone.
//!
//! These fail, not skip, where the kernel should offer the jitter RNG over
//! AF_ALG and does not. A kernel whose own configuration (`/proc/config.gz`)
//! says it was built without the AF_ALG rng interface is checked for the
//! error an operator then gets instead: this project's development and CI
//! machines run such a kernel (jitterentropy_rng built in, listed in
//! /proc/crypto, but `# CONFIG_CRYPTO_USER_API_RNG is not set` and no
//! loadable modules), Debian 12's kernel has both.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Daemon, run_cli};
use vhost_rng::entropy::source::jitter::kernel_lacks_af_alg_rng;
use vhost_rng_testing::{TestVmm, TestVmmConfig};

#[test]
fn check_source_jitter_exits_0_on_a_kernel_that_offers_it() {
    let out = run_cli(["check", "--source", "jitter", "--bytes", "16384"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if kernel_lacks_af_alg_rng() {
        assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
        assert!(
            stdout.contains("jitter") && stdout.contains("failed"),
            "{stdout}"
        );
        assert!(stdout.contains("CONFIG_CRYPTO_USER_API_RNG"), "{stdout}");
        eprintln!("this kernel has no AF_ALG rng interface: checked the error only");
        return;
    }
    assert!(out.status.success(), "{stdout}{stderr}");
    let row = stdout
        .lines()
        .find(|line| line.starts_with("jitter "))
        .unwrap_or_else(|| panic!("no jitter row: {stdout}"));
    assert!(row.contains("healthy"), "{row}");
    assert!(row.contains("credited 1 bits/byte"), "{row}");
    assert!(row.contains("not hardware"), "{row}");
}

#[test]
fn a_guest_is_served_from_jitter_alone() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("j.sock");
    let mut daemon = Daemon::start([
        "serve",
        "--source",
        "jitter",
        "--socket",
        socket.to_str().unwrap(),
    ]);
    if kernel_lacks_af_alg_rng() {
        let (status, log) = daemon.wait_exit();
        assert_eq!(status.code(), Some(1), "{log}");
        assert!(log.contains("jitter: the kernel has no AF_ALG"), "{log}");
        return;
    }
    daemon.wait_for_socket(&socket);
    let mut vmm = TestVmm::connect(&socket, TestVmmConfig::qemu()).unwrap();
    let head = vmm
        .post(&[vhost_rng_testing::Buffer::writable(64)])
        .unwrap();
    vmm.kick().unwrap();
    let used = vmm.wait_used(1, Duration::from_secs(60)).unwrap();
    assert_eq!((used[0].head, used[0].len), (head, 64));
    let status = daemon.stop_with(nix::sys::signal::Signal::SIGTERM);
    assert!(status.success());
}
