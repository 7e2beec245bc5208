// SPDX-License-Identifier: Apache-2.0
//! Support code shared by the `harness = false` benchmarks in `benches/`
//! (`throughput`, `scale`, `ratelimit` and `fallbacks`): a backend daemon run
//! as a child process with its stderr logged to a file and stopped on drop,
//! and the small helpers that describe the machine and the processes
//! measured.
//!
//! Each benchmark includes this file with
//! `#[path = "support/mod.rs"] mod support;`; cargo does not build
//! subdirectories of `benches/` as benchmarks of their own.

// Each benchmark compiles this module separately and uses only part of it.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub type Result<T> = std::result::Result<T, String>;

/// A backend daemon running as a child process, its stderr logged to a file.
/// Dropping it stops the process (SIGTERM, then SIGKILL), so no error path
/// leaves one behind.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    /// Longest wait for the process to come up or go away.
    timeout: Duration,
    /// Show only this many last lines of the log in failure messages.
    log_tail: Option<usize>,
    stopped: bool,
}

impl Process {
    /// Spawns `command` with stdin and stdout null and stderr into `log`.
    pub fn spawn(
        name: impl Into<String>,
        mut command: Command,
        log: PathBuf,
        timeout: Duration,
    ) -> Result<Self> {
        let name = name.into();
        let stderr =
            File::create(&log).map_err(|e| format!("{name}: creating {}: {e}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("{name}: starting {:?}: {e}", command.get_program()))?;
        Ok(Process {
            name,
            child,
            log,
            timeout,
            log_tail: None,
            stopped: false,
        })
    }

    /// Failure messages show only the last `lines` lines of the log.
    pub fn with_log_tail(mut self, lines: usize) -> Self {
        self.log_tail = Some(lines);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The longest wait for the process to come up or go away.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.stopped = true;
                Err(self.failure(&format!("exited early ({status})")))
            }
            Err(e) => Err(self.failure(&format!("cannot check the process: {e}"))),
        }
    }

    /// An error message with the process's log (or the end of it).
    pub fn failure(&self, what: &str) -> String {
        let log = self.log_text();
        match self.log_tail {
            None => format!(
                "{} {what}; its log ({}):\n{log}",
                self.name,
                self.log.display()
            ),
            Some(n) => {
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(n)..].join("\n");
                format!(
                    "{} {what}; the end of its log ({}):\n{tail}",
                    self.name,
                    self.log.display()
                )
            }
        }
    }

    /// Waits until the log contains `needle`, polling every `poll`, and
    /// returns the log as it was then.
    pub fn wait_for_log(&mut self, needle: &str, poll: Duration) -> Result<String> {
        let started = Instant::now();
        loop {
            let log = self.log_text();
            if log.contains(needle) {
                return Ok(log);
            }
            self.check_alive()?;
            if started.elapsed() > self.timeout {
                return Err(self.failure(&format!("did not log \"{needle}\" in time")));
            }
            std::thread::sleep(poll);
        }
    }

    /// SIGTERM, then SIGKILL if the process is still there after a while.
    pub fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let pid = Pid::from_raw(self.child.id() as i32);
        if let Err(e) = kill(pid, Signal::SIGTERM) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return Err(format!("{}: sending SIGTERM: {e}", self.name));
        }
        let started = Instant::now();
        while started.elapsed() < self.timeout {
            match self.child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => {
                    let _ = self.child.kill();
                    return Err(format!("{}: waiting for exit: {e}", self.name));
                }
            }
        }
        eprintln!(
            "{} ignored SIGTERM for {} s; killing it",
            self.name,
            self.timeout.as_secs()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.stop();
        }
    }
}

/// `BINARY --version`, trimmed ("unknown version" if it says nothing).
pub fn peer_version(binary: &Path) -> String {
    Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|text| text.trim().to_owned())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "unknown version".into())
}

/// Clock ticks per second, the unit of the CPU times in `/proc`.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// The number of CPUs this process may use (0 if unknown).
pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// The first "model name" in `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "model name").then(|| value.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The kernel release, from `/proc/sys/kernel/osrelease`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The output of `date -u`.
pub fn utc_date() -> String {
    Command::new("date")
        .arg("-u")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// Prints `machine: nproc N, CPU MODEL, kernel RELEASE`.
pub fn print_machine() {
    println!(
        "machine: nproc {}, CPU {}, kernel {}",
        nproc(),
        cpu_model(),
        kernel_release()
    );
}

/// Prints `date: ` and the output of `date -u`.
pub fn print_date() {
    println!("date: {}", utc_date());
}

/// User plus system CPU time of a process so far, from its `/proc/PID/stat`
/// (`/proc/self/stat` for this one), in seconds (0 if unknown).
/// CPU time of process `pid` and of every descendant it has now (vhost-rng
/// serves guests in a child of the process the benchmark starts).
#[allow(dead_code)]
pub fn tree_cpu_seconds(pid: u32) -> f64 {
    let mut total = cpu_seconds(&format!("/proc/{pid}/stat"));
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return total;
    };
    for task in tasks.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            total += tree_cpu_seconds(child);
        }
    }
    total
}

pub fn cpu_seconds(stat_path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(stat_path) else {
        return 0.0;
    };
    // Fields after the parenthesised command name start with field 3 (state);
    // utime and stime are fields 14 and 15.
    let Some((_, after_name)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => (user + system) / ticks_per_second(),
        _ => 0.0,
    }
}

/// Busy CPU time of all CPUs together since boot, in seconds (0 if unknown).
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|line| line.starts_with("cpu ")) else {
        return 0.0;
    };
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|field| field.parse().ok())
        .collect();
    if ticks.len() < 8 {
        return 0.0;
    }
    (ticks.iter().sum::<f64>() - ticks[3] - ticks[4]) / ticks_per_second()
}

/// The median of `values` (NaN if there are none).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().collect();
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}
