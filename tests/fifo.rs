// SPDX-License-Identifier: Apache-2.0
//! `fifo=` guests through the real binary: the daemon makes the named pipe
//! (or reuses one), keeps it filled for any number of readers coming and
//! going, leaves it in place across its own restarts and crashes (a reader
//! holding it open is served by the next daemon), removes it only with the
//! guest, and refuses a path that is not a FIFO.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use common::{Daemon, run_cli, wait_until};
use nix::sys::signal::{self, Signal};

fn serve_fifo(path: &Path, extra: &str) -> Daemon {
    let mut daemon = Daemon::start([
        "serve".to_owned(),
        "--source".into(),
        "os".into(),
        "--guest".into(),
        format!("name=vm,fifo={}{extra}", path.display()),
    ]);
    daemon.wait_for_log_while_running("filling FIFO", 1);
    daemon
}

fn read_n(reader: &mut File, n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    reader.read_exact(&mut bytes).unwrap();
    bytes
}

#[test]
fn readers_come_and_go_and_each_gets_fresh_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.fifo");
    let daemon = serve_fifo(&path, "");
    let metadata = std::fs::symlink_metadata(&path).unwrap();
    assert!(metadata.file_type().is_fifo());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);

    let mut first = File::open(&path).unwrap();
    let a = read_n(&mut first, 1 << 20);
    drop(first);
    // A second reader after the first went; two at once.
    let mut second = File::open(&path).unwrap();
    let mut third = File::open(&path).unwrap();
    let b = read_n(&mut second, 64 << 10);
    let c = read_n(&mut third, 64 << 10);
    assert_ne!(&a[..64], &b[..64]);
    assert_ne!(&b[..64], &c[..64]);
    // Nothing repeats in what one reader got.
    let mut seen = std::collections::HashSet::new();
    for block in a.chunks(32) {
        assert!(seen.insert(block.to_vec()), "a 32-byte block came twice");
    }
    let served = daemon.guest("vm").bytes;
    assert!(served >= (1 << 20) + (128 << 10), "{served}");
    // At most the pipe's worth was generated ahead.
    assert!(served <= (1 << 20) + (128 << 10) + 8192 + 4096, "{served}");
}

#[test]
fn the_fifo_outlives_the_daemon_and_a_reader_is_served_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.fifo");
    let daemon = serve_fifo(&path, "");
    let mut reader = File::open(&path).unwrap();
    read_n(&mut reader, 64 << 10);
    assert!(daemon.stop_with(Signal::SIGTERM).success());
    assert!(path.exists(), "the FIFO stays for the next daemon");
    // The reader still holds the pipe: what was in it, then the next
    // daemon's bytes.
    let daemon = serve_fifo(&path, "");
    read_n(&mut reader, 64 << 10);
    assert!(daemon.guest("vm").bytes >= (64 << 10) - 8192);

    // Its serving process killed: the pipe is the same, reading goes on.
    let worker = daemon.serving_pid();
    signal::kill(worker, Signal::SIGKILL).unwrap();
    wait_until("another serving process", || daemon.serving_pid() != worker);
    daemon.wait_for_log("taking over 1 guest(s)", 1);
    read_n(&mut reader, 64 << 10);

    // Removing the guest removes its FIFO.
    let output = run_cli([
        "guest".as_ref(),
        "remove".as_ref(),
        "vm".as_ref(),
        "--control".as_ref(),
        daemon.control().as_os_str(),
    ]);
    assert!(output.status.success(), "{output:?}");
    assert!(!path.exists());
}

#[test]
fn an_upgrade_keeps_the_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.fifo");
    let daemon = serve_fifo(&path, "");
    let mut reader = File::open(&path).unwrap();
    read_n(&mut reader, 16 << 10);
    let output = run_cli([
        "upgrade".as_ref(),
        "--control".as_ref(),
        daemon.control().as_os_str(),
    ]);
    assert!(output.status.success(), "{output:?}");
    read_n(&mut reader, 64 << 10);
    assert!(daemon.log().contains("taking over 1 guest(s)"));
}

#[test]
fn a_rate_limited_fifo_waits_for_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.fifo");
    // 8 KiB/s, burst 8 KiB: reading 24 KiB needs tokens refilled twice.
    let daemon = serve_fifo(&path, ",rate-bytes=8192,burst=8192");
    let mut reader = File::open(&path).unwrap();
    read_n(&mut reader, 24 << 10);
    let status = daemon.guest("vm");
    assert!(status.throttled_seconds > 0.0, "{status:?}");
}

#[test]
fn a_path_that_is_not_a_fifo_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regular");
    std::fs::write(&file, b"keep me").unwrap();
    let target = dir.path().join("target");
    std::fs::write(&target, b"keep me too").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for path in [&file, &link] {
        let daemon = Daemon::start([
            "serve".to_owned(),
            "--source".into(),
            "os".into(),
            "--guest".into(),
            format!("name=vm,fifo={}", path.display()),
        ]);
        let (status, log) = daemon.wait_exit();
        assert!(!status.success());
        assert!(
            log.contains("exists and is not a FIFO (named pipe); refusing to use it"),
            "{log}"
        );
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me too");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn an_existing_fifo_is_used_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.fifo");
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o640)).unwrap();
    let _daemon = serve_fifo(&path, "");
    let mut reader = File::open(&path).unwrap();
    read_n(&mut reader, 4096);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "an existing FIFO keeps its mode");
}
