// SPDX-License-Identifier: Apache-2.0
//! `vhost-rng seed` through the real binary: every format from a running
//! daemon's pool over its control socket, the request bounds, and the path
//! with no daemon, where the sources are read directly.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Daemon, run_cli, wait_until};
use vhost_rng::service::control::{self, Request, Response};
use vhost_rng::service::seed::decode_base64;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn daemon() -> Daemon {
    let daemon = Daemon::start(["serve", "--source", "os"]);
    wait_until("the control socket", || {
        control::request(daemon.control(), &Request::Status).is_ok()
    });
    daemon
}

#[test]
fn every_format_from_a_running_daemon() {
    let daemon = daemon();
    let control = daemon.control().to_str().unwrap();

    let raw = run_cli([
        "seed",
        "--control",
        control,
        "--format",
        "raw",
        "--bytes",
        "100",
    ]);
    assert!(raw.status.success(), "{}", text(&raw.stderr));
    assert_eq!(raw.stdout.len(), 100);
    // Not the daemon missing: nothing said about reading sources.
    assert!(
        !text(&raw.stderr).contains("no daemon"),
        "{}",
        text(&raw.stderr)
    );

    let b64 = run_cli(["seed", "--control", control]);
    assert!(b64.status.success(), "{}", text(&b64.stderr));
    let line = text(&b64.stdout);
    assert!(
        line.ends_with('\n') && line.lines().count() == 1,
        "{line:?}"
    );
    let decoded = decode_base64(line.trim_end()).unwrap();
    assert_eq!(decoded.len(), 512, "the default is 512 bytes");

    let again = run_cli(["seed", "--control", control]);
    assert_ne!(again.stdout, b64.stdout, "two seeds must differ");

    let cloud = run_cli([
        "seed",
        "--control",
        control,
        "--format",
        "cloud-init",
        "--bytes",
        "64",
    ]);
    assert!(cloud.status.success(), "{}", text(&cloud.stderr));
    let doc = text(&cloud.stdout);
    let mut lines = doc.lines();
    assert_eq!(lines.next(), Some("#cloud-config"));
    assert!(
        doc.contains("\nrandom_seed:\n  file: /dev/urandom\n  encoding: b64\n"),
        "{doc}"
    );
    let data = doc
        .lines()
        .find_map(|l| l.strip_prefix("  data: "))
        .unwrap_or_else(|| panic!("no data: {doc}"));
    assert_eq!(decode_base64(data).unwrap().len(), 64);
    let command = doc
        .lines()
        .find_map(|l| l.strip_prefix("  command: "))
        .unwrap_or_else(|| panic!("no command: {doc}"));
    // A flow sequence of strings, which JSON reads the same way YAML does.
    let argv: Vec<String> = serde_json::from_str(command).unwrap();
    assert_eq!(&argv[..2], ["sh", "-c"]);
    assert!(argv[2].contains("/var/lib/systemd/random-seed"), "{argv:?}");
    assert!(doc.contains("\n  command_required: false\n"), "{doc}");
}

#[test]
fn requests_are_bounded_on_both_ends() {
    let out = run_cli(["seed", "--bytes", "4097"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("from 1 to 4096"),
        "{}",
        text(&out.stderr)
    );
    let out = run_cli(["seed", "--bytes", "0"]);
    assert_eq!(out.status.code(), Some(2));

    // A client bypassing the command line is refused by the daemon.
    let daemon = daemon();
    let refused = control::request(daemon.control(), &Request::Seed { bytes: 1 << 20 });
    match refused {
        Err(control::ControlError::Refused(message)) => assert_eq!(
            message,
            "1048576 bytes asked for: a seed is at most 4096 bytes"
        ),
        other => panic!("{other:?}"),
    }
    match control::request(daemon.control(), &Request::Seed { bytes: 4096 }).unwrap() {
        Response::Seed { data } => assert_eq!(decode_base64(&data).unwrap().len(), 4096),
        other => panic!("{other:?}"),
    }
}

#[test]
fn with_no_daemon_the_sources_are_read_directly() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("control.sock");
    let absent = absent.to_str().unwrap();
    let out = run_cli([
        "seed",
        "--control",
        absent,
        "--source",
        "os",
        "--bytes",
        "32",
        "--format",
        "raw",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), 32);
    assert!(
        text(&out.stderr).contains(&format!(
            "vhost-rng seed: no daemon at {absent}; drew from the sources directly (os)"
        )),
        "{}",
        text(&out.stderr)
    );

    // A broken source gives nothing: the health tests hold it back.
    let started = std::time::Instant::now();
    let out = run_cli([
        "seed",
        "--control",
        absent,
        "--source",
        "file=/dev/zero",
        "--timeout",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        text(&out.stderr).contains("vhost-rng seed: no entropy within 2s: no source is healthy"),
        "{}",
        text(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(15));

    // No source at all: the reason is given, and the control socket tried.
    let out = run_cli([
        "seed",
        "--control",
        absent,
        "--source",
        "file=/nonexistent/x",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("no daemon at {absent}")), "{err}");
    assert!(err.contains("/nonexistent/x"), "{err}");
}
