// SPDX-License-Identifier: Apache-2.0
//! The sandbox through the real binary: the serving process runs as the
//! `--user` user with no capabilities, no_new_privs and a seccomp filter; a
//! system call outside the filter kills it with SIGSYS, the top process
//! says so and starts another; `--seccomp log` lets the call through;
//! Landlock keeps socket files to the directories the daemon was given; an
//! unknown user starts nothing; an upgrade keeps all of that.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{Daemon, proc_status, run_cli, test_user, wait_until};
use vhost_rng::service::control::{self, PROBES_ENV, Request, Response};
use vhost_rng_testing::{Buffer, TestVmm, TestVmmConfig};

const PATIENCE: Duration = Duration::from_secs(30);

fn serve_64(vmm: &mut TestVmm) {
    vmm.post(&[Buffer::writable(64)]).unwrap();
    vmm.kick().unwrap();
    assert_eq!(vmm.wait_used(1, PATIENCE).unwrap()[0].len, 64);
}

/// A directory the `--user` user may enter (tempdirs are root's alone),
/// as /run/vhost-rng would be.
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn start(socket: &Path, extra: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Daemon {
    let mut args = vec![
        "serve".to_owned(),
        "--source".into(),
        "os".into(),
        "--socket".into(),
        socket.display().to_string(),
    ];
    if let Some(user) = test_user() {
        args.extend(["--user".into(), user]);
    }
    args.extend(extra.iter().map(|&a| a.to_owned()));
    let mut daemon = Daemon::start_with_env(args, env);
    daemon.wait_for_socket(socket);
    daemon.wait_for_log("serving process ready", 1);
    daemon
}

#[test]
fn the_serving_process_runs_unprivileged_with_no_capabilities_and_a_filter() {
    let dir = shared_dir();
    let socket = dir.path().join("vm.sock");
    let daemon = start(&socket, &[], &[]);
    daemon.assert_sandboxed();
    let mut vmm = TestVmm::connect(&socket, TestVmmConfig::qemu()).unwrap();
    serve_64(&mut vmm);

    let status = daemon.status_json();
    let sandbox = &status["sandbox"];
    assert_eq!(sandbox["seccomp"], "kill", "{status}");
    assert!(
        sandbox["landlock"]
            .as_str()
            .is_some_and(|l| l.starts_with("fully enforced") || l.starts_with("not enforced")),
        "{status}"
    );
    if let Some(user) = test_user() {
        assert!(
            sandbox["user"].as_str().unwrap().starts_with(&user),
            "{status}"
        );
        // The top process keeps only what the serving process's root
        // set-up needs (chown, dac_override, dac_read_search, fowner, kill,
        // setgid, setuid, setpcap, net_bind_service), in every set.
        let top = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert!(top.contains(&format!("{set}:\t00000000000005ef")), "{top}");
        }
        assert!(top.contains("CapInh:\t0000000000000000"), "{top}");
        let worker = proc_status(daemon.serving_pid());
        let uid = worker["Uid"].split_whitespace().next().unwrap().to_owned();
        // Every thread, not just the first, dropped root and is filtered.
        let tasks = format!("/proc/{}/task", daemon.serving_pid());
        for task in std::fs::read_dir(tasks).unwrap() {
            let text = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
            assert!(
                text.contains(&format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}")),
                "{text}"
            );
            assert!(text.contains("CapEff:\t0000000000000000"), "{text}");
            assert!(text.contains("Seccomp:\t2"), "{text}");
        }
    }
    let rendered = run_cli([
        "status".as_ref(),
        "--control".as_ref(),
        daemon.control().as_os_str(),
    ]);
    assert!(
        String::from_utf8_lossy(&rendered.stdout).contains("sandbox: user "),
        "{rendered:?}"
    );
}

#[test]
fn a_forbidden_system_call_kills_the_serving_process_and_another_takes_over() {
    let dir = shared_dir();
    let socket = dir.path().join("vm.sock");
    let one = std::ffi::OsStr::new("1");
    let fast = std::ffi::OsStr::new("100");
    let mut daemon = start(
        &socket,
        &[],
        &[
            (PROBES_ENV, one),
            ("VHOST_RNG_TEST_RESTART_BACKOFF_MS", fast),
        ],
    );
    let mut vmm = TestVmm::connect(&socket, TestVmmConfig::qemu()).unwrap();
    serve_64(&mut vmm);
    let first = daemon.serving_pid();

    // The serving process dies in the call: no answer comes back.
    let answer = control::request(daemon.control(), &Request::ForbiddenSyscallProbe);
    assert!(!matches!(answer, Ok(Response::Ok)), "{answer:?}");
    daemon.wait_for_log("was killed by SIGSYS", 1);
    wait_until("another serving process", || daemon.serving_pid() != first);
    daemon.wait_for_log("taking over 1 guest(s)", 1);
    assert!(daemon.is_running());

    let status = daemon.status_json();
    assert_eq!(status["worker_restarts"], 1, "{status}");
    assert_eq!(
        status["last_worker_exit"], "was killed by SIGSYS",
        "{status}"
    );
    // The VMM never noticed, and the new process is sandboxed as well.
    serve_64(&mut vmm);
    daemon.assert_sandboxed();
}

#[test]
fn with_seccomp_log_the_call_goes_through_and_the_process_lives() {
    let dir = shared_dir();
    let socket = dir.path().join("vm.sock");
    let one = std::ffi::OsStr::new("1");
    let daemon = start(&socket, &["--seccomp", "log"], &[(PROBES_ENV, one)]);
    let worker = daemon.serving_pid();
    let answer = control::request(daemon.control(), &Request::ForbiddenSyscallProbe).unwrap();
    assert_eq!(answer, Response::Ok);
    assert_eq!(daemon.serving_pid(), worker);
    assert_eq!(daemon.status_json()["sandbox"]["seccomp"], "log");
    daemon.assert_sandboxed();
}

#[test]
fn the_probe_is_refused_unless_the_daemon_was_started_for_tests() {
    let dir = shared_dir();
    let socket = dir.path().join("vm.sock");
    let daemon = start(&socket, &[], &[]);
    let worker = daemon.serving_pid();
    let answer = control::request(daemon.control(), &Request::ForbiddenSyscallProbe);
    assert!(
        matches!(&answer, Err(control::ControlError::Refused(m)) if m == "unknown command"),
        "{answer:?}"
    );
    assert_eq!(daemon.serving_pid(), worker);
}

#[test]
fn an_unknown_user_starts_nothing() {
    let dir = shared_dir();
    let socket = dir.path().join("vm.sock");
    let daemon = Daemon::start([
        "serve",
        "--source",
        "os",
        "--socket",
        socket.to_str().unwrap(),
        "--user",
        "no-such-user-vhost-rng",
    ]);
    let (status, log) = daemon.wait_exit();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("--user: no user named 'no-such-user-vhost-rng' on this host"),
        "{log}"
    );
    assert!(!socket.exists());
}

#[test]
fn root_without_user_is_warned_about() {
    if test_user().is_none() {
        return;
    }
    let dir = shared_dir();
    let socket = dir.path().join("vm.sock");
    let mut daemon = Daemon::serve(&[&socket]);
    daemon.wait_for_log("running as root without --user", 1);
    assert!(daemon.is_running());
}

#[test]
fn socket_files_are_made_only_in_the_directories_given() {
    let dir = shared_dir();
    let socket = dir.path().join("vm.sock");
    let elsewhere = shared_dir();
    let allowed = shared_dir();
    if let Some(user) = test_user() {
        // The user may write both; only Landlock tells them apart.
        let user = nix::unistd::User::from_name(&user).unwrap().unwrap();
        for d in [&elsewhere, &allowed, &dir] {
            nix::unistd::chown(d.path(), Some(user.uid), None).unwrap();
        }
    }
    let daemon = start(
        &socket,
        &["--socket-dir", allowed.path().to_str().unwrap()],
        &[],
    );
    let add = |path: &Path, name: &str| {
        run_cli([
            "guest".as_ref(),
            "add".as_ref(),
            format!("name={name},socket={}", path.display()).as_ref(),
            "--control".as_ref(),
            daemon.control().as_os_str(),
        ])
    };
    let refused = add(&elsewhere.path().join("x.sock"), "x");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Permission denied"),
        "{refused:?}"
    );
    let added = add(&allowed.path().join("y.sock"), "y");
    assert!(added.status.success(), "{added:?}");
    let beside = add(&dir.path().join("z.sock"), "z");
    assert!(beside.status.success(), "{beside:?}");
}

#[test]
fn an_upgrade_keeps_the_guest_and_the_sandbox() {
    let dir = shared_dir();
    let socket = dir.path().join("vm.sock");
    let daemon = start(&socket, &[], &[]);
    let mut vmm = TestVmm::connect(&socket, TestVmmConfig::qemu()).unwrap();
    serve_64(&mut vmm);
    let (top, worker) = (daemon.pid(), daemon.serving_pid());
    let output = run_cli([
        "upgrade".as_ref(),
        "--control".as_ref(),
        daemon.control().as_os_str(),
    ]);
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        daemon.log()
    );
    wait_until("the new serving process", || daemon.serving_pid() != worker);
    assert_eq!(daemon.pid(), top);
    serve_64(&mut vmm);
    let status = daemon.status_json();
    assert_eq!(status["upgrades"], 1, "{status}");
    assert_eq!(status["worker_restarts"], 0, "{status}");
    daemon.assert_sandboxed();
}

#[test]
fn socket_files_the_unprivileged_process_cannot_remove_are_removed_at_stop() {
    // Root's directory, which the --user user may not write.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let egd = dir.path().join("legacy.egd");
    let daemon = start(
        &socket,
        &["--guest", &format!("name=legacy,egd={}", egd.display())],
        &[],
    );
    let control = daemon.control().to_owned();
    let status = daemon.stop_with(nix::sys::signal::Signal::SIGTERM);
    assert!(status.success(), "{status}");
    for path in [&socket, &egd, &control] {
        assert!(!path.exists(), "{} left behind", path.display());
    }
}

#[test]
fn socket_dirs_are_made_for_the_user_and_one_it_cannot_write_is_named_at_start() {
    let user = test_user().expect("the sandbox tests run as root");
    let user = nix::unistd::User::from_name(&user).unwrap().unwrap();
    let dir = shared_dir();
    let socket = dir.path().join("vm.sock");
    // Missing: made for the user.
    let made = dir.path().join("runtime/guests");
    // Root's, 0755: the user cannot make files there.
    let roots = shared_dir();
    // Root's, the user's group may write, sticky: as the packaged unit
    // leaves /run/vhost-rng.
    let sticky = shared_dir();
    nix::unistd::chown(sticky.path(), None, Some(user.gid)).unwrap();
    std::fs::set_permissions(sticky.path(), std::fs::Permissions::from_mode(0o1775)).unwrap();
    let (made_arg, roots_arg, sticky_arg) = (
        made.display().to_string(),
        roots.path().display().to_string(),
        sticky.path().display().to_string(),
    );
    let daemon = start(
        &socket,
        &[
            "--socket-dir",
            &made_arg,
            "--socket-dir",
            &roots_arg,
            "--socket-dir",
            &sticky_arg,
        ],
        &[],
    );
    let meta = std::fs::metadata(&made).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (user.uid.as_raw(), user.gid.as_raw(), 0o755)
    );
    let warning = |dir: &str| format!("--socket-dir {dir}: the serving process runs as");
    daemon.wait_for_log(&warning(&roots_arg), 1);
    assert!(!daemon.log().contains(&warning(&sticky_arg)));
    assert!(!daemon.log().contains(&warning(&made_arg)));

    let control = |args: &[&str]| {
        let mut full: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        full.extend(["--control".as_ref(), daemon.control().as_os_str()]);
        run_cli(full)
    };
    let late = made.join("late.sock");
    let added = control(&[
        "guest",
        "add",
        &format!("name=late,socket={}", late.display()),
    ]);
    assert!(added.status.success(), "{added:?}");
    let mut vmm = TestVmm::connect(&late, TestVmmConfig::qemu()).unwrap();
    serve_64(&mut vmm);
    let refused = control(&[
        "guest",
        "add",
        &format!("name=no,socket={}", roots.path().join("no.sock").display()),
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Permission denied"),
        "{refused:?}"
    );
    let shared = sticky.path().join("shared.sock");
    let added = control(&[
        "guest",
        "add",
        &format!("name=shared,socket={}", shared.display()),
    ]);
    assert!(added.status.success(), "{added:?}");
    assert!(shared.exists());
    let removed = control(&["guest", "remove", "shared"]);
    assert!(removed.status.success(), "{removed:?}");
    assert!(
        !shared.exists(),
        "the socket file is removed with its guest"
    );
}
