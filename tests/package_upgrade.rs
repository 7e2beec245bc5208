// SPDX-License-Identifier: Apache-2.0
//! The package upgrade keeps a running daemon's guests served: with the
//! vhost-rng package installed, the daemon started as its unit starts it
//! and a VMM (the test VMM) connected, `dpkg -i` of the next version runs
//! the postinst, which finds the daemon through its control socket and
//! upgrades it in place; the VMM's requests are answered all along, on the
//! same connection, by the same process.
//!
//! It installs packages on this machine, so it only runs when asked:
//! tests/package.sh installs version N, then runs
//! `cargo test --test package_upgrade -- --ignored` with
//! `VHOST_RNG_NEXT_DEB` naming the package of version N+1.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use vhost_rng_testing::{Buffer, TestVmm, TestVmmConfig};

const BINARY: &str = "/usr/bin/vhost-rng";
const CONFIG: &str = "/etc/vhost-rng/config.toml";
const RUNTIME_DIR: &str = "/run/vhost-rng";
const CONTROL: &str = "/run/vhost-rng/control.sock";
/// Longest a request may wait for its answer, upgrade included.
const MOST_WAIT: Duration = Duration::from_secs(5);

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(BINARY)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn status() -> serde_json::Value {
    let output = cli(&["status", "--json", "--control", CONTROL]);
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon as vhost-rng.service starts it (no systemd runs here: its
/// RuntimeDirectory= is made by hand), stopped when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(log: PathBuf) -> Daemon {
        fs::create_dir_all(RUNTIME_DIR).unwrap();
        let child = Command::new(BINARY)
            .args(["serve", "--config", CONFIG, "--user", "vhost-rng"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let daemon = Daemon { child, log };
        wait_until("the control socket", || {
            Path::new(CONTROL).exists() && cli(&["status", "--control", CONTROL]).status.success()
        });
        daemon
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = signal::kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "installs packages on this machine: run by tests/package.sh"]
fn package_upgrade_keeps_the_guest_served() {
    let next = PathBuf::from(
        std::env::var_os("VHOST_RNG_NEXT_DEB")
            .expect("VHOST_RNG_NEXT_DEB: the next version's .deb"),
    );
    let installed = |what: &str| {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Version}", "vhost-rng"])
            .output()
            .unwrap();
        let version = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "vhost-rng is not installed {what}");
        version
    };
    let before_version = installed("before the upgrade");

    // The operator's edit: the installed file's `guest = []` replaced
    // with a guest. (The next version's config.toml is the same file, so
    // dpkg keeps the edited one without asking.)
    let installed_config = fs::read_to_string(CONFIG).unwrap();
    assert!(installed_config.contains("\nguest = []\n"));
    let socket = format!("{RUNTIME_DIR}/pkgtest.sock");
    let edited = format!(
        "{}\n[[guest]]\nname = \"pkgtest\"\nsocket = \"{socket}\"\n",
        installed_config.replace("\nguest = []\n", "\n")
    );
    fs::write(CONFIG, &edited).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path().join("daemon.log"));
    wait_until("the guest's socket", || Path::new(&socket).exists());
    let mut vmm = TestVmm::connect(Path::new(&socket), TestVmmConfig::qemu()).unwrap();
    let negotiated = vmm.sent_requests().len();

    // The guest asks for 64 bytes again and again, before, during and after
    // the upgrade; each answer must come within MOST_WAIT.
    let stop = Arc::new(AtomicBool::new(false));
    let guest = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut answered = 0u64;
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let asked = Instant::now();
                vmm.post(&[Buffer::writable(64)]).unwrap();
                vmm.kick().unwrap();
                let used = vmm
                    .wait_used(1, MOST_WAIT)
                    .unwrap_or_else(|e| panic!("request {answered} unanswered: {e}"));
                assert_eq!(used[0].len, 64);
                slowest = slowest.max(asked.elapsed());
                answered += 1;
                thread::sleep(Duration::from_millis(5));
            }
            (vmm, answered, slowest)
        })
    };
    thread::sleep(Duration::from_millis(500));

    let output = Command::new("dpkg")
        .arg("-i")
        .arg(&next)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let dpkg = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "dpkg -i failed:\n{dpkg}\n{}",
        daemon.log()
    );
    println!("{dpkg}");
    assert!(
        dpkg.contains("upgrading the running daemon in place")
            && dpkg.contains("upgraded: vhost-rng"),
        "the postinst did not upgrade the daemon:\n{dpkg}\n{}",
        daemon.log()
    );
    let after_version = installed("after the upgrade");
    assert_ne!(before_version, after_version);
    assert_eq!(
        fs::read_to_string(CONFIG).unwrap(),
        edited,
        "the edited config is kept"
    );

    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (vmm, answered, slowest) = guest.join().expect("the guest was served throughout");
    println!("{answered} requests answered, slowest in {slowest:?}");
    assert!(answered > 10, "{answered}");
    assert_eq!(
        vmm.sent_requests().len(),
        negotiated,
        "the VMM did not have to set its device up again"
    );

    let now = status();
    assert_eq!(now["upgrades"].as_u64(), Some(1), "{now}");
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon started before the upgrade runs on (re-executed, same pid)"
    );
    let log = daemon.log();
    assert!(log.contains("taking over 1 guest(s)"), "{log}");
    assert!(!log.contains("disconnected"), "{log}");
    drop(vmm);
    drop(daemon);
}
