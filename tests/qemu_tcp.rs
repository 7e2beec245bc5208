// SPDX-License-Identifier: Apache-2.0
//! End to end over encrypted TCP, the path of a guest with only an IP
//! network (Xen and the like): a real Linux guest under QEMU, with a
//! virtio-net NIC on QEMU user networking, runs the in-guest agent
//! (`vhost-rng agent --connect tcp:10.0.2.2:PORT`), which fetches entropy
//! from the `vhost-rng` daemon over the Noise transport with the guest's
//! pre-shared key and injects it into the guest kernel.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{
    Daemon, GuestReport, boot_guest, build_agent_guest, new_psk, static_agent, wait_until,
};

/// Bytes the agent asks for.
const BYTES: u64 = 256;

/// Boots the agent guest once: it brings up its NIC and runs the agent
/// against the daemon's port `port` as guest `name` with the key in `key`.
fn boot_tcp_agent(guest: &Path, port: u16, name: &str, key: &Path) -> GuestReport {
    boot_guest(
        guest,
        &[
            "--tcp-agent",
            &port.to_string(),
            name,
            key.to_str().unwrap(),
            "--bytes",
            &BYTES.to_string(),
            // The agent's own limit in the guest, so that a hang fails
            // within the QEMU timeout with the guest's report.
            "--append",
            "vrng.timeout=30",
            "--timeout",
            "120",
        ],
    )
}

/// The guest's console and the daemon's log, for a failed assertion.
fn failure_context(report: &GuestReport, daemon: &Daemon) -> String {
    // The agent needs random bytes for its Noise handshake, possibly before
    // the guest's CRNG is seeded: it takes them from getrandom(2), which
    // makes the kernel seed itself (noise::kernel_random). A hang here
    // means that path was lost, e.g. to a fallback that polls /dev/random.
    let hint = if report.console.contains("reason=agent_timeout") {
        "\n(the agent timed out: did it block waiting for the guest's CRNG? see \
         noise::kernel_random)"
    } else {
        ""
    };
    format!("{}{hint}\n--- daemon:\n{}", report.console, daemon.log())
}

#[test]
fn guest_agent_fetches_entropy_over_encrypted_tcp() {
    let Some(agent) = static_agent() else { return };
    let guest = build_agent_guest(&agent);
    let dir = tempfile::tempdir().unwrap();
    let key = new_psk(dir.path(), "xen1");
    let wrong_key = new_psk(dir.path(), "wrong");

    let mut daemon = Daemon::start_sandboxed([
        "serve".to_owned(),
        "--source".into(),
        "os".into(),
        "--listen-tcp".into(),
        "127.0.0.1:0".into(),
        "--guest".into(),
        format!("name=xen1,tcp-psk={},rate-bytes=65536", key.display()),
    ]);
    let addr = daemon.tcp_addr();
    daemon.wait_for_log("control socket on", 1);

    // The right key: the guest gets its bytes.
    let report = boot_tcp_agent(&guest, addr.port(), "xen1", &key);
    let context = |report: &GuestReport| failure_context(report, &daemon);
    assert!(
        report.status.success(),
        "QEMU failed: {}\n{}",
        report.status,
        context(&report)
    );
    assert!(
        report
            .console
            .contains(&format!("VRNG-AGENT ok bytes={BYTES} ")),
        "{}",
        context(&report)
    );
    assert_eq!(report.get("agent"), "ok", "{}", context(&report));
    assert_eq!(
        report.get("bytes"),
        BYTES.to_string(),
        "{}",
        context(&report)
    );
    // 4 bits credited per byte, as guest-init.sh asks.
    assert_eq!(
        report.get("credited_bits"),
        (4 * BYTES).to_string(),
        "{}",
        context(&report)
    );
    assert_eq!(report.get("done"), "status=ok", "{}", context(&report));

    // The daemon may count the request just after the guest has its bytes.
    let mut status = daemon.guest("xen1");
    wait_until("the daemon to count the agent's request", || {
        status = daemon.guest("xen1");
        status.bytes >= BYTES && status.connections >= 1
    });
    assert_eq!(status.bytes, BYTES, "{status:?}");
    assert_eq!(status.defective_requests, 0, "{status:?}");

    // Another key under the same name: refused, and nothing served.
    let report = boot_tcp_agent(&guest, addr.port(), "xen1", &wrong_key);
    assert!(
        report.status.success(),
        "QEMU failed: {}\n{}",
        report.status,
        context(&report)
    );
    assert!(
        report
            .console
            .contains("VRNG-AGENT error reason=credentials-refused"),
        "{}",
        context(&report)
    );
    assert_eq!(report.get("agent"), "error", "{}", context(&report));
    assert_eq!(
        report.get("done"),
        "status=error reason=agent_failed",
        "{}",
        context(&report)
    );
    daemon.wait_for_log("refused: wrong key for guest xen1", 1);
    let after = daemon.guest("xen1");
    assert_eq!(after.wrong_key_connections, 1, "{after:?}");
    assert_eq!(after.bytes, BYTES, "{after:?}");
    assert_eq!(after.requests, status.requests, "{after:?}");
    assert!(daemon.is_running(), "daemon died:\n{}", daemon.log());
}
