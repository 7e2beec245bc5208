// SPDX-License-Identifier: Apache-2.0
//! The files shipped for QEMU's vhost-user backend conventions and for
//! systemd socket activation: `contrib/qemu/50-vhost-rng.json` (the
//! descriptor for /usr/share/qemu/vhost-user/) and the template units
//! `contrib/systemd/vhost-rng@.socket` and `vhost-rng@.service`.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

/// Where a package installs the binary; every shipped file names it.
const INSTALLED_BINARY: &str = "/usr/bin/vhost-rng";

fn contrib(path: &str) -> String {
    std::fs::read_to_string(common::repo_root().join("contrib").join(path)).unwrap()
}

#[test]
fn the_qemu_descriptor_is_a_vhost_user_backend_of_type_rng() {
    let name = "50-vhost-rng.json";
    // vhost-user.json: a two-digit prefix, so management software sorts
    // the files of all backends predictably.
    assert!(name.as_bytes()[..2].iter().all(u8::is_ascii_digit) && name.as_bytes()[2] == b'-');
    let value: serde_json::Value = serde_json::from_str(&contrib(&format!("qemu/{name}"))).unwrap();
    let object = value.as_object().unwrap();
    // @VhostUserBackend: description, type, binary and optional tags only.
    for key in object.keys() {
        assert!(
            ["description", "type", "binary", "tags"].contains(&key.as_str()),
            "unknown key {key}"
        );
    }
    assert!(!object["description"].as_str().unwrap().is_empty());
    assert_eq!(object["type"], "rng");
    let binary = object["binary"].as_str().unwrap();
    assert!(Path::new(binary).is_absolute(), "{binary}");
    assert_eq!(binary, INSTALLED_BINARY);
    // The same binary the units run.
    for unit in ["systemd/vhost-rng.service", "systemd/vhost-rng@.service"] {
        assert!(
            contrib(unit).contains(&format!("ExecStart={INSTALLED_BINARY} serve")),
            "{unit}"
        );
    }
    // The binary's own capabilities name the same type.
    let out = common::run_cli(["--print-capabilities"]);
    assert!(out.status.success());
    let capabilities: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(capabilities["type"], object["type"]);
}

#[test]
fn the_template_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let socket = contrib("systemd/vhost-rng@.socket");
    let service = contrib("systemd/vhost-rng@.service");
    assert!(
        socket.contains("ListenStream=/run/vhost-rng-guests/%i.sock"),
        "{socket}"
    );
    assert!(socket.contains("FileDescriptorName=%i"), "{socket}");
    assert!(service.contains("Type=notify"), "{service}");
    // Verified as an instance, installed, with ExecStart naming the
    // binary built here.
    let binary = env!("CARGO_BIN_EXE_vhost-rng");
    std::fs::write(dir.path().join("vhost-rng@vm1.socket"), &socket).unwrap();
    std::fs::write(
        dir.path().join("vhost-rng@vm1.service"),
        service.replace(INSTALLED_BINARY, binary),
    )
    .unwrap();
    for unit in ["vhost-rng@vm1.socket", "vhost-rng@vm1.service"] {
        let output = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.path().join(unit))
            .output()
            .expect("systemd-analyze (package systemd) must be installed");
        assert!(
            output.status.success() && output.stderr.is_empty(),
            "{unit}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
