//! The `vhost-rng` binary's command line and lifecycle as an operator sees
//! them: exit statuses, error messages, socket files, signals.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;

use common::{Daemon, run_cli};
use nix::sys::signal::Signal;

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
fn sighup_does_not_stop_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hup.sock");
    let mut daemon = Daemon::serve(&[&socket]);

    nix::sys::signal::kill(daemon.pid(), Signal::SIGHUP).unwrap();
    daemon.wait_for_log("SIGHUP", 1);

    assert!(daemon.is_running());
    assert!(socket.exists());
}
