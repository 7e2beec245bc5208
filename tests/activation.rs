// SPDX-License-Identifier: Apache-2.0
//! Sockets handed to the daemon, as QEMU's vhost-user backend program
//! conventions and systemd socket activation hand them: `LISTEN_FDS` with
//! `LISTEN_FDNAMES`, `--fd N` (after `serve` or alone), `--socket-path`, and
//! `--print-capabilities`. Each passed listening socket is served as a
//! guest through the real binary and a test VMM, across a crash of the
//! serving process, and its file is left in place when the daemon stops.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Daemon, run_cli, wait_until};
use nix::sys::signal::{Signal, kill};
use vhost_rng_testing::{Buffer, TestVmm, TestVmmConfig};

const SERVED: Duration = Duration::from_secs(20);

fn listen(path: &Path) -> OwnedFd {
    OwnedFd::from(UnixListener::bind(path).unwrap())
}

fn assert_served(path: &Path) {
    let mut vmm = TestVmm::connect(path, TestVmmConfig::qemu()).unwrap();
    let head = vmm.post(&[Buffer::writable(256)]).unwrap();
    vmm.kick().unwrap();
    let used = vmm.wait_used(1, SERVED).unwrap();
    assert_eq!((used[0].head, used[0].len), (head, 256));
}

fn names(daemon: &Daemon) -> Vec<String> {
    daemon.guests().into_iter().map(|g| g.name).collect()
}

/// Runs the binary with `fd` as descriptor 3 and no systemd variables.
fn spawn_with_fd3(args: &[&str], fd: &OwnedFd, log: &Path) -> std::process::Child {
    let raw = fd.as_raw_fd();
    let mut command = Command::new(env!("CARGO_BIN_EXE_vhost-rng"));
    command
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    // SAFETY: only dup2 between fork and exec, on a descriptor this
    // process holds open until the child has started.
    unsafe {
        command.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: clear it then.
            let done = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 3)
            };
            if done < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().unwrap()
}

#[test]
fn socket_activated_sockets_are_guests_named_by_fdname_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web-socket.sock");
    let db = dir.path().join("db.sock");
    let unit = dir.path().join("vm3.sock");
    let fds = vec![
        ("web".to_string(), listen(&web)),
        ("unknown".to_string(), listen(&db)),
        // systemd's default FDNAME is the socket unit's name.
        ("vhost-rng@vm3.socket".to_string(), listen(&unit)),
    ];
    let mut daemon = Daemon::start_with_fds(&["serve"], &[], &fds);
    drop(fds);
    daemon.wait_for_log_while_running("serving 3 guest(s)", 1);
    assert_eq!(names(&daemon), ["db", "vm3", "web"]);
    assert_eq!(
        daemon.guest("web").path,
        web.display().to_string(),
        "served at the path the socket is bound to"
    );
    for path in [&web, &db, &unit] {
        assert_served(path);
    }
    assert!(daemon.bytes_served("web").unwrap() >= 256);

    // A crash of the serving process keeps them: the top process holds the
    // sockets and hands them to the next one.
    let serving = daemon.serving_pid();
    kill(serving, Signal::SIGKILL).unwrap();
    daemon.wait_for_log_while_running("serving 3 guest(s)", 2);
    assert_served(&web);

    // They can be removed like any runtime guest; the file stays.
    let out = run_cli(
        ["guest", "remove", "db", "--control"]
            .iter()
            .copied()
            .chain([daemon.control().to_str().unwrap()]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(names(&daemon), ["vm3", "web"]);
    assert!(db.exists());

    let status = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
    // The files are the socket units', not the daemon's.
    assert!(web.exists() && unit.exists());
}

#[test]
fn a_configured_guest_of_the_same_name_and_path_takes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web.sock");
    let other = dir.path().join("other.sock");
    let fds = vec![("web".to_string(), listen(&web))];
    let spec = format!("name=web,socket={},rate-bytes=100000", web.display());
    let clash = format!("name=twin,socket={}", other.display());
    let mut daemon =
        Daemon::start_with_fds(&["serve", "--guest", &spec, "--guest", &clash], &[], &fds);
    drop(fds);
    daemon.wait_for_log_while_running("serving 2 guest(s)", 1);
    let web_status = daemon.guest("web");
    assert_eq!(
        web_status.rate_bytes,
        Some(100_000),
        "the configured limits apply"
    );
    assert_served(&web);
    let log = daemon.log();
    assert!(!log.contains("is closed"), "{log}");
    daemon.stop_with(Signal::SIGTERM);
    assert!(web.exists(), "never removed, configured or not");
}

#[test]
fn fd_option_serves_a_listening_socket_a_parent_made() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm9.sock");
    let fd = listen(&path);
    let control = dir.path().join("control.sock");
    let log = dir.path().join("log");
    let mut child = spawn_with_fd3(
        &["serve", "--fd", "3", "--control", control.to_str().unwrap()],
        &fd,
        &log,
    );
    drop(fd);
    wait_until("the guest to be served", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("serving 1 guest(s)"))
    });
    assert_served(&path);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("guest vm9: serving a passed socket"),
        "{text}"
    );
    kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(path.exists());
}

#[test]
fn backend_program_form_without_a_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("solo.sock");
    let fd = listen(&path);
    let log = dir.path().join("log");
    // As management software runs a vhost-user backend: `BINARY --fd=N`.
    let mut child = spawn_with_fd3(&["--fd=3"], &fd, &log);
    drop(fd);
    wait_until("the guest to be served", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("serving 1 guest(s)"))
    });
    assert_served(&path);
    kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn unusable_fd_arguments_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let control = dir.path().join("control.sock");
    let control = control.to_str().unwrap();
    let null = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    let status = spawn_with_fd3(&["serve", "--fd", "3", "--control", control], &null, &log)
        .wait()
        .unwrap();
    assert_eq!(status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("--fd 3: not a socket"), "{text}");

    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let status = spawn_with_fd3(
        &["serve", "--fd", "3", "--control", control],
        &OwnedFd::from(a),
        &log,
    )
    .wait()
    .unwrap();
    assert_eq!(status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("vhost-rng takes a listening socket"),
        "{text}"
    );

    let out = run_cli(["serve", "--fd", "1", "--control", control]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("descriptors 0, 1 and 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn print_capabilities_prints_the_rng_type_and_ignores_the_rest() {
    for args in [
        &["--print-capabilities"][..],
        &[
            "--print-capabilities",
            "--socket-path",
            "/nonexistent/x.sock",
        ],
        &["serve", "--no-such-option", "--print-capabilities"],
    ] {
        let out = run_cli(args);
        assert!(out.status.success(), "{args:?}");
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(value, serde_json::json!({"type": "rng"}), "{args:?}");
    }
}

/// With systemd's file descriptor store in use, a restart gets the guest
/// back from the store and the same socket again from its socket unit:
/// one guest, the VMM's connection kept, nothing closed.
#[test]
fn a_restart_with_the_store_and_the_socket_unit_keeps_one_guest_and_its_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web.sock");
    // What the socket unit holds for the service's whole life.
    let unit_socket = listen(&web);
    let mut systemd = common::fake_systemd::FakeSystemd::new();
    let notify = systemd.path.clone();
    let env = [("NOTIFY_SOCKET", notify.as_os_str())];
    let args = ["serve", "--source", "os"];
    let passed = vec![("web".to_string(), unit_socket.try_clone().unwrap())];
    let daemon = Daemon::start_with_fds(&args, &env, &passed);
    systemd.wait_for("READY=1\nSTATUS=serving 1 guest(s)");
    let mut vmm = TestVmm::connect(&web, TestVmmConfig::qemu()).unwrap();
    vmm.post(&[Buffer::writable(64)]).unwrap();
    vmm.kick().unwrap();
    assert_eq!(vmm.wait_used(1, SERVED).unwrap()[0].len, 64);
    wait_until("the guest's record with its connection", || {
        systemd
            .record("web")
            .is_some_and(|r| !r["state"]["connection"].is_null())
    });

    let serving = daemon.serving_pid();
    assert!(daemon.stop_with(Signal::SIGTERM).success());
    common::wait_gone(serving);
    systemd.sync();
    assert!(web.exists());

    let mut passed = systemd.passed();
    passed.push(("web".to_string(), unit_socket.try_clone().unwrap()));
    let mut daemon = Daemon::start_with_fds(&args, &env, &passed);
    drop(passed);
    systemd.wait_for("READY=1\nSTATUS=serving 1 guest(s)");
    vmm.post(&[Buffer::writable(64)]).unwrap();
    vmm.kick().unwrap();
    assert_eq!(vmm.wait_used(1, SERVED).unwrap()[0].len, 64);
    assert_eq!(names(&daemon), ["web"]);
    let log = daemon.log();
    // Taken from the store, the duplicate from the socket unit dropped
    // quietly: nothing closed, no clash reported, not adopted twice.
    for unexpected in [
        "guest web: what was handed over",
        "has the name",
        "serving a passed socket",
    ] {
        assert!(!log.contains(unexpected), "{unexpected}: {log}");
    }
    // A VMM that comes next still reaches the socket unit's socket (one
    // VMM at a time per vhost-user guest).
    drop(vmm);
    assert_served(&web);
    assert!(daemon.is_running());
}

/// With `--user`, the top process removes the socket files the
/// unprivileged serving process cannot; a passed socket's file is not
/// among them.
#[test]
fn an_unprivileged_serving_process_leaves_the_passed_socket_file_too() {
    let Some(user) = common::test_user() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web.sock");
    let own = dir.path().join("own.sock");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let fds = vec![("web".to_string(), listen(&web))];
    let own_arg = own.to_str().unwrap();
    let mut daemon =
        Daemon::start_with_fds(&["serve", "--user", &user, "--socket", own_arg], &[], &fds);
    drop(fds);
    daemon.wait_for_log_while_running("serving 2 guest(s)", 1);
    assert_served(&web);
    assert!(daemon.stop_with(Signal::SIGTERM).success());
    assert!(web.exists(), "the passed socket's file stays");
    assert!(!own.exists(), "the daemon's own socket file goes");
}
