// SPDX-License-Identifier: Apache-2.0
//! Shared helpers for the integration tests: run the real `vhost-rng`
//! binary, and boot the real test guest under QEMU.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

pub mod fake_systemd;

/// The user the real-guest tests pass to `--user` when run as root:
/// vhost-rng-test (tests/run-all.sh creates it), else nobody. None when
/// not root (nothing to drop).
pub fn test_user() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    ["vhost-rng-test", "nobody"]
        .into_iter()
        .find(|name| nix::unistd::User::from_name(name).ok().flatten().is_some())
        .map(str::to_owned)
}

/// The `Key: value` lines of /proc/PID/status.
pub fn proc_status(pid: Pid) -> HashMap<String, String> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            Some((key.to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// Upper bound for anything a test waits on; only there so a broken build
/// fails instead of hanging CI.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Polls `condition` until it holds or `PATIENCE` runs out.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until process `pid` has ended (gone, or a zombie nobody reaped).
pub fn wait_gone(pid: Pid) {
    wait_until(&format!("process {pid} to end"), || {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| stat.contains(") Z "))
            .unwrap_or(true)
    });
}

/// A `vhost-rng` process started by a test; SIGKILLed if the test forgets it.
pub struct Daemon {
    child: Child,
    log_path: PathBuf,
    control: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `vhost-rng` with `args` (RUST_LOG=info, stderr captured).
    /// A `serve` without `--control` gets a control socket of its own, so
    /// daemons of tests running side by side (as root) never share the
    /// default one.
    pub fn start<I, S>(args: I) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Daemon::start_with_env(args, &[])
    }

    /// [`Daemon::start`] with `env` added to the daemon's environment.
    pub fn start_with_env<I, S>(args: I, env: &[(&str, &std::ffi::OsStr)]) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Daemon::start_binary(Path::new(env!("CARGO_BIN_EXE_vhost-rng")), args, env)
    }

    /// [`Daemon::start_with_env`] running the binary at `binary` (a copy
    /// a test can replace, as a package upgrade would).
    pub fn start_binary<I, S>(binary: &Path, args: I, env: &[(&str, &std::ffi::OsStr)]) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        Daemon::launch(Command::new(binary), |command, control| {
            if args.first().is_some_and(|a| a == "serve") && !args.iter().any(|a| a == "--control")
            {
                args.push("--control".into());
                args.push(control.into());
            }
            command.args(&args).envs(env.iter().copied());
        })
    }

    /// Runs `command` (completed by `finish`, given the control socket a
    /// `serve` without one gets) with RUST_LOG=info and its standard error
    /// in a log of its own.
    fn launch(mut command: Command, finish: impl FnOnce(&mut Command, &Path)) -> Daemon {
        let log_dir = tempfile::tempdir().unwrap();
        let log_path = log_dir.path().join("daemon.log");
        let control = log_dir.path().join("control.sock");
        let log = fs::File::create(&log_path).unwrap();
        command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        finish(&mut command, &control);
        let child = command.spawn().expect("start vhost-rng");
        Daemon {
            child,
            log_path,
            control,
            _log_dir: log_dir,
        }
    }

    /// [`Daemon::start_with_env`] as systemd starts a service with
    /// descriptors to pass (its file descriptor store, socket units): `fds`
    /// become descriptors 3, 4, ... with `LISTEN_FDS`, `LISTEN_FDNAMES` and
    /// `LISTEN_PID` (the daemon's own pid, set by a shell that then
    /// executes it) as sd_listen_fds(3) reads them.
    pub fn start_with_fds(
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
        fds: &[(String, std::os::fd::OwnedFd)],
    ) -> Daemon {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let names: Vec<&str> = fds.iter().map(|(name, _)| name.as_str()).collect();
        let raw: Vec<i32> = fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"")
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_vhost-rng"))
            .args(args)
            .env("LISTEN_FDS", raw.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .envs(env.iter().copied());
        // Out of the way first, then into place: the sources may sit where
        // the targets go. (No allocation after fork: `moved` is ready.)
        let high = raw.iter().copied().max().unwrap_or(0).max(3) + raw.len() as i32 + 3;
        let mut moved = vec![-1; raw.len()];
        // SAFETY: only fcntl and dup2 between fork and exec, on descriptors
        // this process holds open until the child has started.
        unsafe {
            command.pre_exec(move || {
                for (i, &fd) in raw.iter().enumerate() {
                    moved[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, high);
                    if moved[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, &fd) in moved.iter().enumerate() {
                    if libc::dup2(fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Daemon::launch(command, |command, control| {
            command.arg("--control").arg(control);
        })
    }

    /// The control socket given to a `serve` that named none.
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// `vhost-rng guest list --json` on this daemon's control socket.
    pub fn guests(&self) -> Vec<vhost_rng::service::status::GuestStatus> {
        guests_at(&self.control).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Bytes served to guest `name` so far, if the daemon answers now (it
    /// does not for a moment while a serving process is replaced).
    pub fn bytes_served(&self, name: &str) -> Option<u64> {
        guests_at(&self.control)
            .ok()?
            .into_iter()
            .find(|g| g.name == name)
            .map(|g| g.bytes)
    }

    /// Waits until guest `name` has been served more than `than` bytes
    /// (the daemon may not answer for a moment while its serving process
    /// is replaced) and returns how many; fails with the log otherwise.
    pub fn wait_served_more(&self, name: &str, than: u64) -> u64 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(bytes) = self.bytes_served(name).filter(|&bytes| bytes > than) {
                return bytes;
            }
            assert!(
                Instant::now() < deadline,
                "guest {name} was served no more than {than} bytes:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The listed guest named `name`.
    pub fn guest(&self, name: &str) -> vhost_rng::service::status::GuestStatus {
        self.guests()
            .into_iter()
            .find(|g| g.name == name)
            .unwrap_or_else(|| panic!("the daemon lists no guest {name}"))
    }

    /// Starts `vhost-rng serve` listening on each of `sockets` and waits
    /// until every socket accepts connections and the daemon is ready.
    pub fn serve(sockets: &[&Path]) -> Daemon {
        let mut args = vec!["serve".to_owned()];
        for socket in sockets {
            args.push("--socket".into());
            args.push(socket.display().to_string());
        }
        let mut daemon = Daemon::start(args);
        for socket in sockets {
            daemon.wait_for_socket(socket);
        }
        // The control socket and the shared listeners come after the
        // guests' sockets; READY after them.
        daemon.wait_for_log_while_running("serving process ready", 1);
        daemon
    }

    /// [`Daemon::start`] as the real-guest tests run it: started as root,
    /// with `--user` ([`test_user`]), so that guests are served by an
    /// unprivileged, filtered serving process exactly as in production.
    pub fn start_sandboxed<I, S>(args: I) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        if let Some(user) = test_user() {
            args.push("--user".into());
            args.push(user.into());
        }
        Daemon::start(args)
    }

    /// [`Daemon::serve`] with `--user` ([`Daemon::start_sandboxed`]).
    pub fn serve_sandboxed(sockets: &[&Path]) -> Daemon {
        let mut args = vec!["serve".to_owned()];
        for socket in sockets {
            args.push("--socket".into());
            args.push(socket.display().to_string());
        }
        let mut daemon = Daemon::start_sandboxed(args);
        for socket in sockets {
            daemon.wait_for_socket(socket);
        }
        daemon.wait_for_log_while_running("serving process ready", 1);
        daemon
    }

    /// Checks the serving process's sandbox in /proc: not root when run
    /// with `--user`, no capabilities, no_new_privs, a seccomp filter; and
    /// no_new_privs and a filter in the top process too.
    pub fn assert_sandboxed(&self) {
        // The serving process drops root once its set-up is done.
        let dropped = |status: &HashMap<String, String>| {
            let filters: u32 = status
                .get("Seccomp_filters")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let uid = status.get("Uid").and_then(|u| u.split_whitespace().next());
            filters >= 2 && (test_user().is_none() || uid.is_some_and(|uid| uid != "0"))
        };
        wait_until("the serving process to drop privileges", || {
            dropped(&proc_status(self.serving_pid()))
        });
        let worker = proc_status(self.serving_pid());
        if test_user().is_some() {
            assert_ne!(
                worker["Uid"].split_whitespace().next(),
                Some("0"),
                "{worker:?}"
            );
            for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
                assert_eq!(worker[set], "0000000000000000", "{set}: {worker:?}");
            }
            assert_eq!(worker["Groups"], "", "{worker:?}");
        }
        for status in [worker, proc_status(self.pid())] {
            assert_eq!(status["NoNewPrivs"], "1", "{status:?}");
            assert_eq!(status["Seccomp"], "2", "{status:?}");
        }
    }

    /// Waits until the daemon reports it listens on `path`. Watches the log
    /// rather than probing the socket, since a probe is a VMM connection.
    pub fn wait_for_socket(&mut self, path: &Path) {
        let needle = format!("serving on {}", path.display());
        wait_until(&format!("{} to accept connections", path.display()), || {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("vhost-rng exited with {status}:\n{}", self.log());
            }
            self.log().contains(&needle)
        });
    }

    /// `vhost-rng status --json` against this daemon (null if it did not
    /// answer).
    pub fn status_json(&self) -> serde_json::Value {
        let output = run_cli([
            "status".as_ref(),
            "--json".as_ref(),
            "--control".as_ref(),
            self.control().as_os_str(),
        ]);
        serde_json::from_slice(&output.stdout).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log holds `needle` at least `count` times.
    pub fn wait_for_log(&self, needle: &str, count: usize) {
        wait_until(&format!("{count} x '{needle}' in the daemon log"), || {
            self.log().matches(needle).count() >= count
        });
    }

    /// [`Daemon::wait_for_log`] for a daemon that must stay up meanwhile:
    /// fails at once, with the log, if it exits instead.
    pub fn wait_for_log_while_running(&mut self, needle: &str, count: usize) {
        wait_until(&format!("{count} x '{needle}' in the daemon log"), || {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("vhost-rng exited with {status}:\n{}", self.log());
            }
            self.log().matches(needle).count() >= count
        });
    }

    /// The top process: `vhost-rng serve` as started (signals go here).
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// The serving process (the top process's child), which maps guest
    /// memory and holds the guests' threads; waits until there is one.
    ///
    /// Waits for the first serving process's READY as well: one that dies
    /// before it is ready stops the daemon (a start that cannot finish),
    /// which is not what a test killing it means to exercise.
    pub fn serving_pid(&self) -> Pid {
        self.wait_for_log("serving process ready", 1);
        let children = format!("/proc/{0}/task/{0}/children", self.child.id());
        let mut pid = None;
        wait_until("the serving process to start", || {
            pid = fs::read_to_string(&children)
                .ok()
                .and_then(|list| list.split_whitespace().next()?.parse().ok());
            pid.is_some()
        });
        Pid::from_raw(pid.unwrap_or_default())
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends `sig` and waits for the process to exit.
    pub fn stop_with(mut self, sig: Signal) -> ExitStatus {
        signal::kill(self.pid(), sig).unwrap();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "vhost-rng ignored {sig}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a daemon that is expected to exit by itself.
    pub fn wait_exit(mut self) -> (ExitStatus, String) {
        let mut status = None;
        wait_until("vhost-rng to exit", || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        (status.unwrap(), self.log())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `vhost-rng guest list --json` against the daemon at `control`; what the
/// command said if it did not answer.
pub fn guests_at(control: &Path) -> Result<Vec<vhost_rng::service::status::GuestStatus>, String> {
    let output = run_cli([
        "guest".as_ref(),
        "list".as_ref(),
        "--json".as_ref(),
        "--control".as_ref(),
        control.as_os_str(),
    ]);
    if !output.status.success() {
        return Err(format!("{output:?}"));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| format!("{e}: {output:?}"))
}

/// Runs `vhost-rng` with `args` to completion (for commands that must exit).
pub fn run_cli<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_vhost-rng"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vhost-rng")
}

/// False when the QEMU tests are explicitly skipped with
/// VHOST_RNG_SKIP_QEMU=1.
fn qemu_tests_wanted() -> bool {
    if std::env::var_os("VHOST_RNG_SKIP_QEMU").is_some_and(|v| v == "1") {
        eprintln!("VHOST_RNG_SKIP_QEMU=1: skipping a real-guest test");
        return false;
    }
    true
}

/// The QEMU qemu/run-guest.sh runs: the system's, or the one unpacked under
/// `$VHOST_RNG_QEMU` (qemu/fetch-qemu10.sh).
fn qemu_binary() -> PathBuf {
    match std::env::var_os("VHOST_RNG_QEMU") {
        Some(dir) => PathBuf::from(dir).join("usr/bin/qemu-system-x86_64"),
        None => PathBuf::from("qemu-system-x86_64"),
    }
}

fn have_qemu() -> bool {
    Command::new(qemu_binary())
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The built test guest (qemu/build-guest.sh), or `None` when the QEMU tests
/// are explicitly skipped with VHOST_RNG_SKIP_QEMU=1. Anything else missing is
/// a test failure: CI must run these tests, not skip them.
pub fn test_guest() -> Option<PathBuf> {
    if !qemu_tests_wanted() {
        return None;
    }
    let dir = std::env::var_os("VHOST_RNG_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/qemu-guest"));
    assert!(
        have_qemu() && dir.join("bzImage").exists() && dir.join("initramfs.cpio.gz").exists(),
        "real-guest tests need qemu-system-x86_64 and a test guest in {}: run \
         tests/run-all.sh (or qemu/build-guest.sh), or set VHOST_RNG_SKIP_QEMU=1",
        dir.display()
    );
    Some(dir)
}

/// The statically linked agent for the agent guest, or `None` when the
/// QEMU tests are skipped; as for [`test_guest`], anything missing is a
/// failure.
pub fn static_agent() -> Option<PathBuf> {
    if !qemu_tests_wanted() {
        return None;
    }
    let agent = repo_root().join(STATIC_AGENT);
    assert!(
        have_qemu() && agent.exists(),
        "agent guest tests need qemu-system-x86_64 and a static agent in {}: run \
         tests/run-all.sh, or set VHOST_RNG_SKIP_QEMU=1",
        agent.display()
    );
    Some(agent)
}

/// What one boot of the test guest reported.
#[derive(Debug)]
pub struct GuestReport {
    pub status: ExitStatus,
    /// `VRNG key=value` lines, by key (later lines win).
    pub values: HashMap<String, String>,
    pub console: String,
}

impl GuestReport {
    pub fn get(&self, key: &str) -> &str {
        self.values
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("guest did not report {key}:\n{}", self.console))
    }

    /// Asserts the guest read `bytes` bytes through virtio-rng and finished cleanly.
    pub fn assert_read(&self, bytes: usize) {
        assert!(
            self.status.success(),
            "QEMU failed: {}\n{}",
            self.status,
            self.console
        );
        assert_eq!(self.get("rng_current"), "virtio_rng.0", "{}", self.console);
        assert_eq!(
            self.get("read_bytes"),
            bytes.to_string(),
            "{}",
            self.console
        );
        assert_eq!(self.get("done"), "status=ok", "{}", self.console);
    }
}

fn parse_report(status: ExitStatus, console: String) -> GuestReport {
    let mut values = HashMap::new();
    for line in console.lines() {
        let Some(rest) = line.trim_end().strip_prefix("VRNG ") else {
            continue;
        };
        // `done status=ok` is keyed "done"; `read_bytes=N elapsed_ms=M`
        // yields both keys.
        if let Some(done) = rest.strip_prefix("done ") {
            values.insert("done".to_owned(), done.to_owned());
            continue;
        }
        for pair in rest.split_whitespace() {
            if let Some((key, value)) = pair.split_once('=') {
                values.insert(key.to_owned(), value.to_owned());
            }
        }
    }
    GuestReport {
        status,
        values,
        console,
    }
}

fn guest_command(guest_dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(repo_root().join("qemu/run-guest.sh"));
    command
        .arg("--guest-dir")
        .arg(guest_dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Boots the test guest once with `args` for qemu/run-guest.sh and returns
/// what it reported.
pub fn boot_guest(guest_dir: &Path, args: &[&str]) -> GuestReport {
    let output = guest_command(guest_dir, args)
        .output()
        .expect("run qemu/run-guest.sh");
    finish_report(output)
}

/// Starts a guest boot without waiting (for QEMU in server mode, which
/// waits for the daemon before the guest starts).
pub fn spawn_guest(guest_dir: &Path, args: &[&str]) -> Child {
    guest_command(guest_dir, args)
        .spawn()
        .expect("run qemu/run-guest.sh")
}

pub fn wait_guest(child: Child) -> GuestReport {
    finish_report(child.wait_with_output().expect("wait for QEMU"))
}

fn finish_report(output: Output) -> GuestReport {
    let mut console = String::from_utf8_lossy(&output.stdout).into_owned();
    console.push_str(&String::from_utf8_lossy(&output.stderr));
    parse_report(output.status, console)
}

/// SHA-256 of a file's first `len` bytes, via coreutils (the guest reports
/// its own with busybox sha256sum).
pub fn sha256_prefix(path: &Path, len: usize) -> String {
    let bytes = fs::read(path).unwrap();
    let prefix = tempfile::NamedTempFile::new().unwrap();
    fs::write(prefix.path(), &bytes[..len]).unwrap();
    let output = Command::new("sha256sum")
        .arg(prefix.path())
        .output()
        .unwrap();
    String::from_utf8(output.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Where tests/run-all.sh builds the statically linked agent.
pub const STATIC_AGENT: &str = "target/x86_64-unknown-linux-gnu/release/vhost-rng-agent";
/// The guest built with that agent inside (qemu/build-guest.sh --agent).
pub const AGENT_GUEST: &str = "target/qemu-guest-agent";

/// Builds (or finds up to date) the test guest with `agent` in it as
/// /bin/vhost-rng, in [`AGENT_GUEST`].
pub fn build_agent_guest(agent: &Path) -> PathBuf {
    let dir = repo_root().join(AGENT_GUEST);
    let output = Command::new(repo_root().join("qemu/build-guest.sh"))
        .arg("--out")
        .arg(&dir)
        .arg("--agent")
        .arg(agent)
        .stdin(Stdio::null())
        .output()
        .expect("run qemu/build-guest.sh");
    assert!(
        output.status.success(),
        "qemu/build-guest.sh --agent failed: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    dir
}

/// Writes a new pre-shared key to `dir/NAME.psk` with `vhost-rng psk new`.
pub fn new_psk(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.psk"));
    let output = run_cli(["psk".as_ref(), "new".as_ref(), path.as_os_str()]);
    assert!(output.status.success(), "{output:?}");
    path
}

impl Daemon {
    /// The address the daemon logged for its `--listen-tcp` listener
    /// (`listening on TCP ADDR ...`), once it has.
    pub fn tcp_addr(&mut self) -> std::net::SocketAddr {
        const NEEDLE: &str = "listening on TCP ";
        wait_until("the daemon to listen on TCP", || {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("vhost-rng exited with {status}:\n{}", self.log());
            }
            self.log().contains(NEEDLE)
        });
        let log = self.log();
        let rest = &log[log.find(NEEDLE).unwrap() + NEEDLE.len()..];
        let addr = rest.split_whitespace().next().unwrap_or_default();
        addr.parse()
            .unwrap_or_else(|e| panic!("'{addr}' in the daemon log: {e}\n{log}"))
    }
}

/// Writes deterministic, uniformly distributed bytes (splitmix64, which the
/// health tests accept) into the FIFO at `path` until its reader is gone:
/// a `--source file=FIFO` that has data from now on.
pub fn feed_uniform_bytes(path: std::path::PathBuf) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use std::io::Write;
        let mut fifo = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut state = 42u64;
        let mut chunk = [0u8; 4096];
        loop {
            for word in chunk.chunks_mut(8) {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
            }
            if fifo.write_all(&chunk).is_err() {
                return;
            }
        }
    })
}

/// A 64-byte request posted while the daemon's only source (the FIFO at
/// `fifo`, `--mode raw`) has nothing: not answered for 2 s, then, once the
/// FIFO is fed (no further kick), answered within `patience` with 1 to 64
/// bytes (raw mode may answer part of a request, as virtio-rng allows).
/// `log` is shown if it is not. Returns the feeder, which ends when the
/// daemon is gone.
pub fn starved_request_is_answered_once_fed(
    vmm: &mut vhost_rng_testing::TestVmm,
    fifo: PathBuf,
    patience: Duration,
    log: impl Fn() -> String,
) -> thread::JoinHandle<()> {
    let head = vmm
        .post(&[vhost_rng_testing::Buffer::writable(64)])
        .unwrap();
    vmm.kick().unwrap();
    assert!(
        vmm.wait_used(1, Duration::from_secs(2)).is_err(),
        "served with no source data"
    );
    let writer = feed_uniform_bytes(fifo);
    let used = vmm
        .wait_used(1, patience)
        .unwrap_or_else(|e| panic!("{e}\n{}", log()));
    assert_eq!(used[0].head, head);
    assert!(used[0].len > 0 && used[0].len <= 64, "{:?}", used[0]);
    writer
}

/// Run time (ns) and context switches of the serving process's event-loop
/// threads (`vhost-user-*`), summed.
pub fn event_loop_cost(daemon: &Daemon) -> (u64, u64) {
    let pid = daemon.serving_pid();
    let mut cost = (0, 0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let Ok(name) = std::fs::read_to_string(task.join("comm")) else {
            continue;
        };
        if !name.starts_with("vhost-user") {
            continue;
        }
        let schedstat = std::fs::read_to_string(task.join("schedstat")).unwrap();
        cost.0 += schedstat
            .split_whitespace()
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap();
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        for line in status.lines() {
            if line.starts_with("voluntary_ctxt_switches")
                || line.starts_with("nonvoluntary_ctxt_switches")
            {
                cost.1 += line
                    .split_whitespace()
                    .last()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap();
            }
        }
    }
    cost
}

/// Most context switches the event loops may make while a guest waits for
/// one throttle period or for the pool: a handful of wake-ups, where a loop
/// that polled would make hundreds.
pub const WAITING_SWITCHES: u64 = 40;
/// Most run time (ns) of the event loops over such a wait: a few
/// milliseconds of work, where a loop that spun would run for most of it.
pub const WAITING_RUN_TIME: u64 = 250_000_000;

/// Asserts that the event loops, since [`event_loop_cost`] gave `before`,
/// only waited: at most [`WAITING_SWITCHES`] context switches and
/// [`WAITING_RUN_TIME`] of run time.
pub fn assert_event_loops_waited(daemon: &Daemon, before: (u64, u64)) {
    let after = event_loop_cost(daemon);
    let (run, switches) = (after.0 - before.0, after.1 - before.1);
    eprintln!("event loops: {run} ns, {switches} context switches");
    assert!(switches <= WAITING_SWITCHES, "{switches} context switches");
    assert!(run <= WAITING_RUN_TIME, "{run} ns of run time");
}
