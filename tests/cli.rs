// SPDX-License-Identifier: Apache-2.0
//! The `vhost-rng` binary's command line and lifecycle as an operator sees
//! them: exit statuses, error messages, socket files, signals.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;

use std::time::Duration;

use common::{Daemon, run_cli};
use nix::sys::signal::Signal;
use vhost_rng_testing::{Buffer, TestVmm, TestVmmConfig};

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn help_names_the_serve_options() {
    let output = run_cli(["serve", "--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for option in [
        "--socket <PATH>",
        "--connect <PATH>",
        "--socket-mode <MODE>",
        "--socket-group <GROUP>",
    ] {
        assert!(help.contains(option), "missing {option} in:\n{help}");
    }
}

#[test]
fn bad_command_lines_exit_2_and_start_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let socket = socket.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["serve"], "--socket <PATH>"),
        (
            &["serve", "--socket", socket, "--socket-mode", "999"],
            "not a permission mode",
        ),
        (
            &[
                "serve",
                "--socket",
                socket,
                "--socket-group",
                "no-such-group-x",
            ],
            "no group named",
        ),
        (
            &["serve", "--socket", socket, "--socket", socket],
            "more than once",
        ),
        (&["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, message) in cases {
        let output = run_cli(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(message),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            !dir.path().join("a.sock").exists(),
            "{args:?} created a socket"
        );
    }
}

#[test]
fn socket_in_use_by_another_process_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let free = dir.path().join("free.sock");
    let busy = dir.path().join("busy.sock");
    let _other_daemon = UnixListener::bind(&busy).unwrap();

    let output = run_cli([
        "serve",
        "--socket",
        free.to_str().unwrap(),
        "--socket",
        busy.to_str().unwrap(),
    ]);

    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("another process is listening"),
        "{}",
        stderr(&output)
    );
    assert!(
        !free.exists(),
        "half a start left {} behind",
        free.display()
    );
    assert!(
        busy.exists(),
        "the other process's socket must be left alone"
    );
}

#[test]
fn stale_socket_is_replaced_and_socket_mode_applied() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("stale.sock");
    drop(UnixListener::bind(&socket).unwrap());

    let mut daemon = Daemon::start([
        "serve",
        "--socket",
        socket.to_str().unwrap(),
        "--socket-mode",
        "0660",
    ]);
    daemon.wait_for_socket(&socket);

    let metadata = std::fs::symlink_metadata(&socket).unwrap();
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o660);
    assert!(
        daemon.log().contains("replacing stale socket file"),
        "{}",
        daemon.log()
    );
}

#[test]
fn sigint_and_sigterm_shut_down_cleanly_and_remove_sockets() {
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("one.sock");
        let second = dir.path().join("two.sock");
        let daemon = Daemon::serve(&[&first, &second]);

        let status = daemon.stop_with(signal);

        assert!(status.success(), "{signal}: {status}");
        assert!(
            !first.exists() && !second.exists(),
            "{signal} left socket files"
        );
    }
}

#[test]
fn sighup_reloads_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hup.sock");
    let config = dir.path().join("vhost-rng.toml");
    std::fs::write(
        &config,
        format!(
            "[[guest]]\nname = \"hup\"\nsocket = \"{}\"\n",
            socket.display()
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start([
        "serve",
        "--source",
        "os",
        "--config",
        config.to_str().unwrap(),
    ]);
    daemon.wait_for_socket(&socket);
    daemon.wait_for_log("control socket on", 1);
    // A VMM connected before the signal must be served after it.
    let mut vmm = TestVmm::connect(&socket, TestVmmConfig::qemu()).unwrap();
    assert_served(&mut vmm);

    nix::sys::signal::kill(daemon.pid(), Signal::SIGHUP).unwrap();
    // Fails at once if SIGHUP killed the daemon.
    daemon.wait_for_log_while_running("SIGHUP: reloaded", 1);
    assert!(
        daemon
            .log()
            .contains("0 added, 0 removed, 0 changed, 1 unchanged"),
        "{}",
        daemon.log()
    );

    assert!(daemon.is_running(), "{}", daemon.log());
    assert!(socket.exists());
    // Still serving: the guest over its kept connection, the VMM once it
    // reconnects, and the control socket.
    assert_served(&mut vmm);
    vmm.disconnect().unwrap();
    assert_served(&mut TestVmm::connect(&socket, TestVmmConfig::qemu()).unwrap());
    let guests = daemon.guests();
    assert_eq!(guests.len(), 1, "{guests:?}");
    assert_eq!(guests[0].name, "hup");
    assert!(guests[0].bytes >= 3 * 64, "{guests:?}");
    assert!(daemon.is_running(), "{}", daemon.log());
}

/// Posts one 64-byte request and asserts it is filled.
fn assert_served(vmm: &mut TestVmm) {
    let head = vmm.post(&[Buffer::writable(64)]).unwrap();
    vmm.kick().unwrap();
    let used = vmm.wait_used(1, Duration::from_secs(10)).unwrap();
    assert_eq!((used[0].head, used[0].len), (head, 64));
}

#[test]
fn version_names_the_commit() {
    let output = run_cli(["--version"]);
    assert!(output.status.success());
    let version = String::from_utf8_lossy(&output.stdout);
    assert!(
        version.starts_with(&format!("vhost-rng {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert!(version.trim_end().ends_with(')'), "{version}");
}

#[test]
fn check_config_accepts_a_good_file_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let socket = dir.path().join("vm1.sock");
    let control = dir.path().join("control.sock");
    std::fs::write(
        &config,
        format!(
            "sources = [\"os\"]\ncontrol = \"{}\"\n[[guest]]\nname = \"vm1\"\nsocket = \"{}\"\n",
            control.display(),
            socket.display()
        ),
    )
    .unwrap();
    let output = run_cli([
        "serve".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--check-config".as_ref(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("configuration OK: 1 guest(s)"), "{stdout}");
    assert!(
        !socket.exists() && !control.exists(),
        "--check-config made sockets"
    );

    // The file the package installs: no guests on purpose.
    std::fs::write(&config, "sources = [\"os\"]\nguest = []\n").unwrap();
    let output = run_cli([
        "serve".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--check-config".as_ref(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("none, on purpose"));
}

#[test]
fn check_config_refuses_a_bad_file_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let check = |config: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "serve".into(),
            "--config".into(),
            config.as_os_str().to_owned(),
            "--check-config".into(),
        ];
        args.extend(extra.iter().map(std::ffi::OsString::from));
        run_cli(args)
    };
    std::fs::write(&config, "sources = [\"os\"]\nno-such-key = 1\n").unwrap();
    let output = check(&config, &[]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains("configuration refused") && err.contains("no-such-key"),
        "{err}"
    );

    std::fs::write(&config, "sources = [\"os\"]\nguest = []\n").unwrap();
    let output = check(&config, &["--user", "no-such-user-vhost-rng"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("no-such-user-vhost-rng"),
        "{}",
        stderr(&output)
    );

    let output = check(&dir.path().join("missing.toml"), &[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("missing.toml"),
        "{}",
        stderr(&output)
    );
}
