// SPDX-License-Identifier: Apache-2.0
//! End to end over vsock: a real Linux guest under QEMU runs the in-guest
//! agent (`vhost-rng agent`), which fetches entropy from the `vhost-rng`
//! daemon through `vhost-user-vsock-pci` (backed by vhost-device-vsock's
//! hybrid vsock) and injects it into the guest kernel.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{Daemon, boot_guest, build_agent_guest, static_agent, wait_until};

/// What this test needs from the host, or `None` when the QEMU tests are
/// skipped with VHOST_RNG_SKIP_QEMU=1. As for the other real-guest tests,
/// anything missing otherwise is a failure, never a skip.
struct Host {
    agent: PathBuf,
    vsock_backend: PathBuf,
}

fn host() -> Option<Host> {
    let agent = static_agent()?;
    let vsock_backend = find_vhost_device_vsock();
    assert!(
        vsock_backend.is_some(),
        "the vsock guest test needs vhost-device-vsock (on PATH or in ~/.cargo/bin): run \
         tests/run-all.sh, or set VHOST_RNG_SKIP_QEMU=1"
    );
    Some(Host {
        agent,
        vsock_backend: vsock_backend.unwrap(),
    })
}

/// `VHOST_RNG_VSOCK_BACKEND` names another build to test (the one built
/// with `--features xen` for the Xen path, docs/fallbacks.md); otherwise
/// the one on PATH or in ~/.cargo/bin.
fn find_vhost_device_vsock() -> Option<PathBuf> {
    if let Some(backend) = std::env::var_os("VHOST_RNG_VSOCK_BACKEND") {
        return Some(PathBuf::from(backend));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(cargo_bin)
        .map(|dir| dir.join("vhost-device-vsock"))
        .find(|candidate| candidate.is_file())
}

/// A vhost-device-vsock process, killed when dropped.
struct VsockBackend {
    child: Child,
    log: PathBuf,
}

impl VsockBackend {
    /// Serves QEMU on `socket` as guest CID 3, mapping the guest's
    /// connections to host port P onto the Unix socket `uds_P`.
    fn start(binary: &Path, socket: &Path, uds: &Path, log: PathBuf) -> VsockBackend {
        let out = fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(binary)
            .arg("--guest-cid")
            .arg("3")
            .arg("--socket")
            .arg(socket)
            .arg("--uds-path")
            .arg(uds)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start vhost-device-vsock");
        let mut backend = VsockBackend { child, log };
        wait_until("vhost-device-vsock to listen", || {
            if let Some(status) = backend.child.try_wait().unwrap() {
                panic!(
                    "vhost-device-vsock exited with {status}:\n{}",
                    backend.log()
                );
            }
            socket.exists()
        });
        backend
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for VsockBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn guest_agent_fetches_entropy_over_hybrid_vsock() {
    let Some(host) = host() else { return };
    let guest = build_agent_guest(&host.agent);
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let vhost_socket = dir.path().join("vhost.sock");

    let mut daemon = Daemon::start_sandboxed([
        "serve".to_owned(),
        "--source".into(),
        "os".into(),
        // The shorthand the issue names: a guest named after the file, "vm".
        "--vsock-uds".into(),
        uds.display().to_string(),
    ]);
    daemon.wait_for_socket(&dir.path().join("vm.vsock_5564"));
    daemon.wait_for_log("control socket on", 1);
    let backend = VsockBackend::start(
        &host.vsock_backend,
        &vhost_socket,
        &uds,
        dir.path().join("vhost-device-vsock.log"),
    );

    let report = boot_guest(
        &guest,
        &[
            "--vsock",
            vhost_socket.to_str().unwrap(),
            "--agent",
            "--bytes",
            "256",
            "--timeout",
            "120",
        ],
    );
    let context = || {
        format!(
            "{}\n--- daemon:\n{}\n--- vhost-device-vsock:\n{}",
            report.console,
            daemon.log(),
            backend.log()
        )
    };
    assert!(
        report.status.success(),
        "QEMU failed: {}\n{}",
        report.status,
        context()
    );
    assert!(
        report.console.contains("VRNG-AGENT ok bytes=256 "),
        "{}",
        context()
    );
    assert_eq!(report.get("agent"), "ok", "{}", context());
    assert_eq!(report.get("bytes"), "256", "{}", context());
    // 4 bits credited per byte, as guest-init.sh asks.
    assert_eq!(report.get("credited_bits"), "1024", "{}", context());
    assert_eq!(report.get("done"), "status=ok", "{}", context());

    // The daemon may count the request just after the guest has its bytes.
    let mut status = daemon.guest("vm");
    wait_until("the daemon to count the agent's request", || {
        status = daemon.guest("vm");
        status.bytes >= 256 && status.connections >= 1
    });
    assert_eq!(status.defective_requests, 0, "{status:?}");
    assert!(daemon.is_running(), "daemon died:\n{}", daemon.log());
}
