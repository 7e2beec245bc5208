// SPDX-License-Identifier: Apache-2.0
//! The daemon attacked by a hostile VMM: raw vhost-user messages written by
//! hand (not the in-tree test VMM, which only sends what a good VMM sends),
//! with memfds, pipes and eventfds passed over `SCM_RIGHTS`.
//!
//! Every attack checks the same outcome: the daemon lives, the attacked
//! guest's next (honest) connection is served, another guest is served, and
//! the daemon's descriptors, threads and address space return to where they
//! were before the attack.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, wait_until};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use vhost_rng_testing::{Buffer, TestVmm, TestVmmConfig};

// vhost-user request codes (QEMU docs/interop/vhost-user.rst).
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_MAX_MEM_SLOTS: u32 = 36;
const ADD_MEM_REG: u32 = 37;

const VERSION_1: u64 = 1 << 32;
const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
const VRING_DESC_F_WRITE: u16 = 2;

/// Where the test places the ring in guest memory, and the VMM address it
/// pretends guest memory has.
const VMM_BASE: u64 = 0x7f00_0000_0000;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUFFER: u64 = 0x4000;
const MEMORY_SIZE: u64 = 64 * 1024;
const QUEUE_SIZE: u32 = 8;

/// A vhost-user frontend that sends whatever it is told to.
struct RawVmm {
    stream: UnixStream,
}

impl RawVmm {
    fn connect(path: &Path) -> RawVmm {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        RawVmm { stream }
    }

    /// Sends one message (version 1, no reply asked) with `fds` attached.
    fn send(&self, code: u32, payload: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let mut message = Vec::with_capacity(12 + payload.len());
        message.extend_from_slice(&code.to_le_bytes());
        message.extend_from_slice(&1u32.to_le_bytes());
        message.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        message.extend_from_slice(payload);
        let iov = [std::io::IoSlice::new(&message)];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        let sent = sendmsg::<()>(
            self.stream.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::empty(),
            None,
        )?;
        assert_eq!(sent, message.len());
        Ok(())
    }

    fn send_u64(&self, code: u32, value: u64, fds: &[RawFd]) {
        self.send(code, &value.to_le_bytes(), fds).unwrap();
    }

    /// Sends a request that has a u64 reply and returns it.
    fn get_u64(&mut self, code: u32) -> u64 {
        self.send(code, &[], &[]).unwrap();
        let mut reply = [0u8; 20];
        self.stream.read_exact(&mut reply).unwrap();
        assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), code);
        u64::from_le_bytes(reply[12..20].try_into().unwrap())
    }

    /// Waits until every message sent so far was handled: requests are
    /// handled in order, so the reply to GET_FEATURES comes after them.
    fn sync(&mut self) {
        assert_ne!(self.get_u64(GET_FEATURES), 0);
    }

    /// True once the daemon has closed the connection.
    fn closed_by_daemon(&mut self) -> bool {
        let mut byte = [0u8; 64];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return true,
                // Replies still in flight.
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("the daemon neither answered nor closed: {e}"),
            }
        }
    }

    /// GET_FEATURES, SET_OWNER, the features and protocol features a
    /// memory-slots VMM uses.
    fn claim(&mut self) {
        let offered = self.get_u64(GET_FEATURES);
        assert_ne!(offered & VERSION_1, 0);
        let protocol = self.get_u64(GET_PROTOCOL_FEATURES);
        assert_ne!(protocol & CONFIGURE_MEM_SLOTS, 0);
        self.send_u64(SET_PROTOCOL_FEATURES, CONFIGURE_MEM_SLOTS, &[]);
        self.send(SET_OWNER, &[], &[]).unwrap();
        // Without PROTOCOL_FEATURES the ring is enabled from the start.
        self.send_u64(SET_FEATURES, VERSION_1, &[]);
    }

    fn set_mem_table(&self, regions: &[(u64, u64, u64, u64)], fds: &[RawFd]) {
        let mut payload = Vec::new();
        payload.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        payload.extend_from_slice(&0u32.to_le_bytes());
        for &(gpa, size, vmm, offset) in regions {
            for value in [gpa, size, vmm, offset] {
                payload.extend_from_slice(&value.to_le_bytes());
            }
        }
        self.send(SET_MEM_TABLE, &payload, fds).unwrap();
    }

    fn add_mem_reg(&self, gpa: u64, size: u64, vmm: u64, fd: RawFd) -> std::io::Result<()> {
        let mut payload = 0u64.to_le_bytes().to_vec();
        for value in [gpa, size, vmm, 0] {
            payload.extend_from_slice(&value.to_le_bytes());
        }
        self.send(ADD_MEM_REG, &payload, &[fd])
    }

    fn vring_state(&self, code: u32, num: u32) {
        let mut payload = 0u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&num.to_le_bytes());
        self.send(code, &payload, &[]).unwrap();
    }

    /// Ring size and addresses for the layout of [`GuestMemory`].
    fn set_up_ring(&self) {
        self.vring_state(SET_VRING_NUM, QUEUE_SIZE);
        let mut payload = vec![0u8; 8];
        for address in [VMM_BASE + DESC, VMM_BASE + USED, VMM_BASE + AVAIL, 0] {
            payload.extend_from_slice(&address.to_le_bytes());
        }
        self.send(SET_VRING_ADDR, &payload, &[]).unwrap();
        self.vring_state(SET_VRING_BASE, 0);
    }
}

/// A memfd the test shares as guest memory, mapped here too.
struct GuestMemory {
    file: File,
    base: *mut u8,
    len: usize,
}

impl GuestMemory {
    fn new(len: u64) -> GuestMemory {
        let fd = nix::sys::memfd::memfd_create(c"hostile", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .unwrap();
        let file = File::from(fd);
        file.set_len(len).unwrap();
        let len = len as usize;
        // SAFETY: a fresh shared mapping of our own memfd.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        GuestMemory {
            file,
            base: base.cast(),
            len,
        }
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn write<const N: usize>(&self, offset: u64, bytes: [u8; N]) {
        assert!(offset as usize + N <= self.len);
        for (i, byte) in bytes.into_iter().enumerate() {
            // SAFETY: inside the mapping (checked above).
            unsafe { self.base.add(offset as usize + i).write_volatile(byte) };
        }
    }

    fn read_u16(&self, offset: u64) -> u16 {
        // SAFETY: inside the mapping.
        let bytes = unsafe {
            [
                self.base.add(offset as usize).read_volatile(),
                self.base.add(offset as usize + 1).read_volatile(),
            ]
        };
        u16::from_le_bytes(bytes)
    }

    /// Posts request number `n` (0-based): one 64-byte writable buffer.
    fn post(&self, n: u16) {
        let slot = u64::from(n % QUEUE_SIZE as u16);
        let desc = DESC + 16 * slot;
        self.write(desc, (BUFFER + 64 * slot).to_le_bytes());
        self.write(desc + 8, 64u32.to_le_bytes());
        self.write(desc + 12, VRING_DESC_F_WRITE.to_le_bytes());
        self.write(desc + 14, 0u16.to_le_bytes());
        self.write(AVAIL + 4 + 2 * slot, (slot as u16).to_le_bytes());
        self.write(AVAIL + 2, (n + 1).to_le_bytes());
    }

    fn used_idx(&self) -> u16 {
        self.read_u16(USED + 2)
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

fn eventfd(initial: u64) -> OwnedFd {
    let fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC).unwrap();
    if initial > 0 {
        fd.write(initial).unwrap();
    }
    // SAFETY: the EventFd gives up its fd to the OwnedFd.
    unsafe {
        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd))
    }
}

fn kick(fd: &OwnedFd) {
    nix::unistd::write(fd, &1u64.to_le_bytes()).unwrap();
}

/// A daemon serving a guest to attack and a bystander guest.
struct Target {
    daemon: Daemon,
    victim: PathBuf,
    bystander: PathBuf,
    baseline: Usage,
    _dir: tempfile::TempDir,
}

/// What the daemon holds: descriptors, threads, address space (KiB).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Usage {
    fds: usize,
    threads: usize,
    vm_kib: u64,
}

fn usage(daemon: &Daemon) -> Usage {
    let proc = PathBuf::from(format!("/proc/{}", daemon.serving_pid()));
    let count = |dir: &str| std::fs::read_dir(proc.join(dir)).unwrap().count();
    let status = std::fs::read_to_string(proc.join("status")).unwrap();
    let vm_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    Usage {
        fds: count("fd"),
        threads: count("task"),
        vm_kib,
    }
}

impl Target {
    fn start(extra: &[&str]) -> Target {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.sock");
        let bystander = dir.path().join("bystander.sock");
        let mut args = vec!["serve".to_owned()];
        for socket in [&victim, &bystander] {
            args.push("--socket".into());
            args.push(socket.display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut daemon = Daemon::start(args);
        daemon.wait_for_socket(&victim);
        daemon.wait_for_socket(&bystander);
        // Both guests once, so lazily created state (the pool's streams,
        // thread-local buffers) is in the baseline.
        serve_one_request(&victim);
        serve_one_request(&bystander);
        let mut target = Target {
            baseline: usage(&daemon),
            daemon,
            victim,
            bystander,
            _dir: dir,
        };
        target.wait_settled();
        target.baseline = usage(&target.daemon);
        target
    }

    /// Waits until the daemon has closed what the last connection used.
    fn wait_settled(&mut self) {
        let mut last = usage(&self.daemon);
        let mut stable_since = Instant::now();
        wait_until("the daemon's usage to settle", || {
            let now = usage(&self.daemon);
            if now != last {
                last = now;
                stable_since = Instant::now();
            }
            stable_since.elapsed() > Duration::from_millis(300)
        });
    }

    /// The daemon lives, both guests are served by honest VMMs, and what it
    /// holds comes back to the baseline.
    fn assert_recovered(&mut self) {
        assert!(
            self.daemon.is_running(),
            "the daemon died:\n{}",
            self.daemon.log()
        );
        serve_one_request(&self.victim);
        serve_one_request(&self.bystander);
        let baseline = self.baseline;
        let mut now = usage(&self.daemon);
        let recovered = |now: &Usage| {
            now.fds == baseline.fds
                && now.threads == baseline.threads
                // Freed memory may stay in the allocator; mappings may not.
                && now.vm_kib <= baseline.vm_kib + 64 * 1024
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !recovered(&now) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
            now = usage(&self.daemon);
        }
        assert!(
            recovered(&now),
            "the daemon holds {now:?}, was {baseline:?}"
        );
    }
}

/// An honest VMM connects, gets one 64-byte request served and leaves.
fn serve_one_request(socket: &Path) {
    let mut vmm = TestVmm::connect(socket, TestVmmConfig::qemu()).unwrap();
    vmm.post(&[Buffer::writable(64)]).unwrap();
    vmm.kick().unwrap();
    let used = vmm.wait_used(1, Duration::from_secs(20)).unwrap();
    assert_eq!(used[0].len, 64);
    vmm.disconnect().unwrap();
}

/// A VMM that has claimed the device and set up a working ring.
fn working_ring(target: &Target) -> (RawVmm, GuestMemory, OwnedFd) {
    let mut vmm = RawVmm::connect(&target.victim);
    vmm.claim();
    let memory = GuestMemory::new(MEMORY_SIZE);
    vmm.set_mem_table(&[(0, MEMORY_SIZE, VMM_BASE, 0)], &[memory.fd()]);
    vmm.set_up_ring();
    let call = eventfd(0);
    vmm.send_u64(SET_VRING_CALL, 0, &[call.as_raw_fd()]);
    let kick_fd = eventfd(0);
    vmm.send_u64(SET_VRING_KICK, 0, &[kick_fd.as_raw_fd()]);
    vmm.sync();
    memory.post(0);
    kick(&kick_fd);
    wait_until("the first request to be served", || memory.used_idx() == 1);
    (vmm, memory, kick_fd)
}

#[test]
fn a_region_longer_than_its_file_is_refused_and_the_daemon_lives() {
    let mut target = Target::start(&[]);
    let mut vmm = RawVmm::connect(&target.victim);
    vmm.claim();
    // 4 KiB of file described as 1 MiB of guest memory.
    let memory = GuestMemory::new(4096);
    vmm.set_mem_table(&[(0, 1 << 20, VMM_BASE, 0)], &[memory.fd()]);
    assert!(vmm.closed_by_daemon());
    target.daemon.wait_for_log(
        "needs bytes up to 0x100000 of its file, which holds only 0x1000",
        1,
    );
    target.assert_recovered();
}

#[test]
fn a_memory_file_truncated_under_the_daemon_costs_only_that_connection() {
    let mut target = Target::start(&[]);
    let (mut vmm, memory, kick_fd) = working_ring(&target);
    // The request ring and everything else is now past the end of the file.
    memory.file.set_len(0).unwrap();
    kick(&kick_fd);
    assert!(vmm.closed_by_daemon());
    target
        .daemon
        .wait_for_log("guest memory file shrank under the daemon", 1);
    target.assert_recovered();
    // And once more, on the same socket.
    let (mut vmm, memory, kick_fd) = working_ring(&target);
    memory.file.set_len(4096).unwrap();
    kick(&kick_fd);
    assert!(vmm.closed_by_daemon());
    target.assert_recovered();
}

#[test]
fn guest_memory_is_kept_out_of_core_dumps() {
    let target = Target::start(&[]);
    let (_vmm, _memory, _kick) = working_ring(&target);
    let smaps =
        std::fs::read_to_string(format!("/proc/{}/smaps", target.daemon.serving_pid())).unwrap();
    let mapping = smaps
        .split("\n")
        .collect::<Vec<_>>()
        .windows(30)
        .find(|lines| lines[0].contains("/memfd:hostile"))
        .map(|lines| lines.join("\n"))
        .expect("the guest memory is mapped in the daemon");
    let flags = mapping
        .lines()
        .find(|l| l.starts_with("VmFlags:"))
        .unwrap()
        .to_owned();
    assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
}

#[test]
fn memory_regions_stop_at_the_slots_the_daemon_offers() {
    let mut target = Target::start(&[]);
    let mut vmm = RawVmm::connect(&target.victim);
    vmm.claim();
    let slots = vmm.get_u64(GET_MAX_MEM_SLOTS);
    assert_eq!(slots, 509);
    let memory = GuestMemory::new(4096);
    for n in 0..slots {
        vmm.add_mem_reg(n << 20, 4096, VMM_BASE + (n << 20), memory.fd())
            .unwrap();
    }
    vmm.sync();
    let full = usage(&target.daemon);
    assert!(full.fds >= target.baseline.fds + 509, "{full:?}");
    // One more than offered.
    let _ = vmm.add_mem_reg(slots << 20, 4096, VMM_BASE + (slots << 20), memory.fd());
    assert!(vmm.closed_by_daemon());
    target.daemon.wait_for_log(
        "510 regions; this daemon allows at most 509 per connection",
        1,
    );
    target.assert_recovered();
}

#[test]
fn huge_sparse_regions_stop_at_the_byte_limit() {
    let mut target = Target::start(&["--vhost-user-max-memory", "268435456"]);
    let mut vmm = RawVmm::connect(&target.victim);
    vmm.claim();
    // A 512 GiB file costs nothing until touched; mapping many of them used
    // up the daemon's address space.
    let memory = GuestMemory::new(4096);
    memory.file.set_len(512 << 30).unwrap();
    let _ = vmm.add_mem_reg(0, 512 << 30, VMM_BASE, memory.fd());
    assert!(vmm.closed_by_daemon());
    target
        .daemon
        .wait_for_log("this daemon maps at most 268435456", 1);
    target.assert_recovered();
}

#[test]
fn a_pipe_is_refused_as_kick_call_or_error_fd() {
    let mut target = Target::start(&[]);
    for code in [SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR] {
        let mut vmm = RawVmm::connect(&target.victim);
        vmm.claim();
        let memory = GuestMemory::new(MEMORY_SIZE);
        vmm.set_mem_table(&[(0, MEMORY_SIZE, VMM_BASE, 0)], &[memory.fd()]);
        vmm.set_up_ring();
        // A pipe holding one byte, its write end handed over too: a worker
        // that read it as an eventfd blocked forever.
        let (read, write) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&write, b"x").unwrap();
        vmm.send_u64(SET_VRING_ERR, 0, &[write.as_raw_fd()]);
        vmm.send_u64(code, 0, &[read.as_raw_fd()]);
        assert!(vmm.closed_by_daemon(), "{code}");
        target.daemon.wait_for_log("is not an eventfd", 1);
    }
    target.assert_recovered();
}

/// A victim connection whose ring runs on `call` and `kick`, in memory of
/// its own.
fn running_ring(target: &Target, call: RawFd, kick: RawFd) -> (RawVmm, GuestMemory) {
    let mut vmm = RawVmm::connect(&target.victim);
    vmm.claim();
    let memory = GuestMemory::new(MEMORY_SIZE);
    vmm.set_mem_table(&[(0, MEMORY_SIZE, VMM_BASE, 0)], &[memory.fd()]);
    vmm.set_up_ring();
    vmm.send_u64(SET_VRING_CALL, 0, &[call]);
    vmm.send_u64(SET_VRING_KICK, 0, &[kick]);
    vmm.sync();
    (vmm, memory)
}

#[test]
fn a_call_eventfd_at_its_maximum_does_not_block_the_guest() {
    let mut target = Target::start(&[]);
    // A blocking write of 1 to this call counter would wait forever.
    let call = eventfd(u64::MAX - 1);
    let kick_fd = eventfd(0);
    let (mut vmm, memory) = running_ring(&target, call.as_raw_fd(), kick_fd.as_raw_fd());
    for n in 0..3 {
        memory.post(n);
        kick(&kick_fd);
        wait_until("the request to be served", || memory.used_idx() == n + 1);
    }
    // The connection still answers.
    vmm.sync();
    drop(vmm);
    target.assert_recovered();
}

#[test]
fn a_kick_eventfd_that_stays_readable_does_not_make_the_loop_spin() {
    let mut target = Target::start(&[]);
    // A semaphore eventfd gives 1 per read: with 2^40 in it, a loop that
    // read one count per wake-up would find it readable forever.
    let kick_fd =
        vmm_sys_util::eventfd::EventFd::new(libc::EFD_SEMAPHORE | libc::EFD_CLOEXEC).unwrap();
    kick_fd.write(1 << 40).unwrap();
    let call = eventfd(0);
    let (vmm, memory) = running_ring(&target, call.as_raw_fd(), kick_fd.as_raw_fd());
    let before = common::event_loop_cost(&target.daemon);
    thread::sleep(Duration::from_secs(1));
    common::assert_event_loops_waited(&target.daemon, before);
    // Each kick is still a wake-up.
    for n in 0..3 {
        memory.post(n);
        kick_fd.write(1).unwrap();
        wait_until("the request to be served", || memory.used_idx() == n + 1);
    }
    serve_one_request(&target.bystander);
    drop(vmm);
    target.assert_recovered();
}

#[test]
fn messages_before_set_owner_close_the_connection() {
    let mut target = Target::start(&[]);
    let mut vmm = RawVmm::connect(&target.victim);
    let memory = GuestMemory::new(MEMORY_SIZE);
    vmm.set_mem_table(&[(0, MEMORY_SIZE, VMM_BASE, 0)], &[memory.fd()]);
    assert!(vmm.closed_by_daemon());
    target
        .daemon
        .wait_for_log("SET_MEM_TABLE before SET_OWNER", 1);

    let mut vmm = RawVmm::connect(&target.victim);
    vmm.send(SET_OWNER, &[], &[]).unwrap();
    vmm.send(SET_OWNER, &[], &[]).unwrap();
    assert!(vmm.closed_by_daemon());
    target.daemon.wait_for_log("a second SET_OWNER", 1);
    target.assert_recovered();
}

#[test]
fn a_silent_connection_makes_way_for_the_real_vmm() {
    let mut target = Target::start(&["--vhost-user-setup-timeout", "1"]);
    let mut silent = RawVmm::connect(&target.victim);
    // The real VMM arrives while the silent one holds the socket; it waits
    // in the listen backlog and is served once the silent one is closed.
    let victim = target.victim.clone();
    let honest = thread::spawn(move || serve_one_request(&victim));
    assert!(silent.closed_by_daemon());
    honest.join().unwrap();
    target
        .daemon
        .wait_for_log("took longer than 1s to claim the device (SET_OWNER)", 1);
    target.assert_recovered();
}

#[test]
fn a_message_begun_and_never_finished_is_dropped() {
    let mut target = Target::start(&["--vhost-user-setup-timeout", "1"]);
    let mut vmm = RawVmm::connect(&target.victim);
    vmm.claim();
    vmm.sync();
    // Half a header, then nothing: the daemon must not wait for the rest
    // for longer than its timeout.
    vmm.stream
        .write_all(&GET_FEATURES.to_le_bytes()[..3])
        .unwrap();
    assert!(vmm.closed_by_daemon());
    target
        .daemon
        .wait_for_log("took longer than 1s to finish a message", 1);
    // A header whose payload never comes.
    let mut vmm = RawVmm::connect(&target.victim);
    vmm.claim();
    vmm.sync();
    let mut header = SET_FEATURES.to_le_bytes().to_vec();
    header.extend_from_slice(&1u32.to_le_bytes());
    header.extend_from_slice(&8u32.to_le_bytes());
    vmm.stream.write_all(&header).unwrap();
    assert!(vmm.closed_by_daemon());
    target
        .daemon
        .wait_for_log("took longer than 1s to finish a message", 2);
    target.assert_recovered();
}

#[test]
fn a_vmm_that_never_reads_its_replies_is_closed() {
    let mut target = Target::start(&[]);
    let mut vmm = RawVmm::connect(&target.victim);
    vmm.claim();
    vmm.sync();
    // 20 bytes of reply each; the daemon would block writing once the
    // socket filled.
    vmm.stream.set_nonblocking(true).unwrap();
    let mut sent = 0;
    while sent < 100_000 {
        match vmm.send(GET_FEATURES, &[], &[]) {
            Ok(()) => sent += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(1));
            }
            // The daemon closed the connection.
            Err(_) => break,
        }
    }
    target.daemon.wait_for_log("bytes of replies unread", 1);
    target.assert_recovered();
}

#[test]
fn file_descriptors_attached_where_none_belong_are_closed() {
    let mut target = Target::start(&[]);
    let mut vmm = RawVmm::connect(&target.victim);
    vmm.claim();
    vmm.sync();
    let memory: Vec<GuestMemory> = (0..16).map(|_| GuestMemory::new(4096)).collect();
    let fds: Vec<RawFd> = memory.iter().map(GuestMemory::fd).collect();
    vmm.send(GET_FEATURES, &[], &fds).unwrap();
    assert!(vmm.closed_by_daemon());
    target.assert_recovered();
}

/// A message that takes descriptors sent without them, the next message's
/// right behind it: a peek of the first can pass the second's descriptor
/// (the kernel goes on to the next message), so the daemon checks what the
/// first really carried as it takes it off. The connection is closed, the
/// memory the borrowed descriptor mapped is let go, the daemon lives.
#[test]
fn a_message_missing_its_descriptors_cannot_borrow_the_next_ones() {
    let mut target = Target::start(&[]);
    let mut vmm = RawVmm::connect(&target.victim);
    vmm.claim();
    vmm.sync();
    let memory = GuestMemory::new(MEMORY_SIZE);
    vmm.set_mem_table(&[(0, MEMORY_SIZE, VMM_BASE, 0)], &[]);
    let _ = vmm.add_mem_reg(0, MEMORY_SIZE, VMM_BASE, memory.fd());
    assert!(vmm.closed_by_daemon());
    target.assert_recovered();
}
