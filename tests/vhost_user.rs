// SPDX-License-Identifier: Apache-2.0
//! The daemon over real vhost-user sockets and real shared memory, driven by
//! the in-tree test VMM (`vhost_rng_testing`) the way QEMU and
//! cloud-hypervisor drive it.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use common::Daemon;
use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost::vhost_user::message::FrontendReq;
use vhost_rng_testing::{Buffer, MemoryRegistration, TestVmm, TestVmmConfig, UsedElem};

const TIMEOUT: Duration = Duration::from_secs(10);
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VRING_DESC_F_WRITE: u16 = 2;
const MAX_REQUEST: u32 = 64 * 1024;

fn socket_in(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
    dir.path().join(name)
}

/// Posts one request made of `buffers`, kicks, and returns its used element.
fn request(vmm: &mut TestVmm, buffers: &[Buffer]) -> (u16, UsedElem) {
    let head = vmm.post(buffers).unwrap();
    vmm.kick().unwrap();
    let used = vmm.wait_used(1, TIMEOUT).unwrap();
    assert_eq!(used[0].head, head);
    (head, used[0])
}

/// Asserts the buffer looks random: not a constant fill.
fn assert_random(bytes: &[u8]) {
    assert!(bytes.len() >= 16);
    let distinct = bytes.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(
        distinct > bytes.len().min(256) / 4,
        "{distinct} distinct values in {bytes:02x?}"
    );
}

fn serve_and_connect(config: TestVmmConfig) -> (Daemon, TestVmm, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir, "guest.sock");
    let daemon = Daemon::serve(&[&socket]);
    let vmm = TestVmm::connect(&socket, config).unwrap();
    (daemon, vmm, dir)
}

fn check_fills_4k_and_64_byte_requests(vmm: &mut TestVmm) {
    let (big, used) = request(vmm, &[Buffer::writable(4096)]);
    assert_eq!(used.len, 4096);
    let first = vmm.read_buffer(big, 0).unwrap();
    assert_random(&first);

    let mut seen = vec![first[..64].to_vec()];
    for _ in 0..8 {
        let (head, used) = request(vmm, &[Buffer::writable(64)]);
        assert_eq!(used.len, 64);
        let bytes = vmm.read_buffer(head, 0).unwrap();
        assert_random(&bytes);
        assert!(!seen.contains(&bytes), "a request repeated earlier bytes");
        seen.push(bytes);
    }
}

#[test]
fn qemu_profile_negotiates_our_features_and_gets_random_bytes() {
    let (_daemon, mut vmm, _dir) = serve_and_connect(TestVmmConfig::qemu());

    let features = vmm.negotiated_features();
    for (name, bit) in [
        ("VERSION_1", VIRTIO_F_VERSION_1),
        ("EVENT_IDX", VIRTIO_RING_F_EVENT_IDX),
        ("INDIRECT_DESC", VIRTIO_RING_F_INDIRECT_DESC),
    ] {
        assert_ne!(features & bit, 0, "{name} not negotiated");
    }
    let protocol = vmm.negotiated_protocol_features();
    assert!(protocol.contains(
        VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    ));
    assert_eq!(vmm.queue_num(), Some(1));
    // QEMU registers memory slot by slot once CONFIGURE_MEM_SLOTS is agreed.
    assert!(vmm.sent_requests().contains(&FrontendReq::ADD_MEM_REG));

    check_fills_4k_and_64_byte_requests(&mut vmm);
}

#[test]
fn cloud_hypervisor_profile_is_served() {
    let (_daemon, mut vmm, _dir) = serve_and_connect(TestVmmConfig::cloud_hypervisor());
    assert!(vmm.negotiated_protocol_features().contains(
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    ));
    assert!(vmm.sent_requests().contains(&FrontendReq::SET_MEM_TABLE));
    // The profile leaves out what cloud-hypervisor asks for and the test
    // VMM cannot do; the daemon offers none of it, so cloud-hypervisor
    // negotiates the same set as the profile.
    assert!(
        !vhost_rng::frontend::vhost_user::device::protocol_features()
            .intersects(vhost_rng_testing::CLOUD_HYPERVISOR_UNIMPLEMENTED_PROTOCOL_FEATURES)
    );
    // cloud-hypervisor's order (vu_common_ctrl.rs setup_vhost_user).
    let order: Vec<FrontendReq> = vmm.sent_requests().to_vec();
    let expected = [
        FrontendReq::SET_OWNER,
        FrontendReq::GET_FEATURES,
        FrontendReq::GET_PROTOCOL_FEATURES,
        FrontendReq::SET_PROTOCOL_FEATURES,
        FrontendReq::GET_QUEUE_NUM,
        FrontendReq::SET_FEATURES,
        FrontendReq::SET_MEM_TABLE,
        FrontendReq::SET_VRING_NUM,
        FrontendReq::SET_VRING_ADDR,
        FrontendReq::SET_VRING_BASE,
        FrontendReq::SET_VRING_CALL,
        FrontendReq::SET_VRING_KICK,
        FrontendReq::SET_VRING_ENABLE,
    ];
    assert_eq!(&order[..expected.len()], expected, "{order:?}");
    check_fills_4k_and_64_byte_requests(&mut vmm);
}

#[test]
fn both_memory_registrations_and_no_event_idx_work() {
    for registration in [
        MemoryRegistration::SetMemTable,
        MemoryRegistration::AddMemReg,
    ] {
        let config = TestVmmConfig {
            memory_registration: registration,
            event_idx: false,
            indirect: false,
            ..TestVmmConfig::qemu()
        };
        let (_daemon, mut vmm, _dir) = serve_and_connect(config);
        assert_eq!(vmm.negotiated_features() & VIRTIO_RING_F_EVENT_IDX, 0);
        check_fills_4k_and_64_byte_requests(&mut vmm);
    }
}

#[test]
fn every_descriptor_of_direct_and_indirect_chains_is_filled() {
    let (_daemon, mut vmm, _dir) = serve_and_connect(TestVmmConfig::qemu());
    let lengths = [100u32, 28, 1, 4000];
    let buffers: Vec<Buffer> = lengths.iter().map(|&len| Buffer::writable(len)).collect();
    let total: u32 = lengths.iter().sum();

    let (head, used) = request(&mut vmm, &buffers);
    assert_eq!(used.len, total);
    for (i, &len) in lengths.iter().enumerate() {
        let bytes = vmm.read_buffer(head, i).unwrap();
        assert_eq!(bytes.len(), len as usize);
        if len >= 16 {
            assert_random(&bytes);
        }
    }

    let head = vmm.post_indirect(&buffers).unwrap();
    vmm.kick().unwrap();
    let used = vmm.wait_used(1, TIMEOUT).unwrap();
    assert_eq!((used[0].head, used[0].len), (head, total));
    assert_random(&vmm.read_buffer(head, 3).unwrap());
}

#[test]
fn one_request_gets_at_most_64_kib() {
    let config = TestVmmConfig {
        queue_size: 16,
        memory_size: 8 << 20,
        ..TestVmmConfig::qemu()
    };
    let (_daemon, mut vmm, _dir) = serve_and_connect(config);

    let (head, used) = request(
        &mut vmm,
        &[Buffer::writable(48 * 1024), Buffer::writable(48 * 1024)],
    );

    assert_eq!(used.len, MAX_REQUEST);
    let second = vmm.read_buffer(head, 1).unwrap();
    assert_random(&second[..16 * 1024]);
    // Beyond the cap the buffer is left as posted (zeroed by the test VMM).
    assert!(second[16 * 1024..].iter().all(|&b| b == 0));
}

#[test]
fn defective_requests_get_zero_bytes_and_the_guest_keeps_being_served() {
    let config = TestVmmConfig::qemu();
    let beyond_memory = config.guest_base + config.memory_size as u64;
    let (daemon, mut vmm, _dir) = serve_and_connect(config);

    let (_, used) = request(&mut vmm, &[Buffer::writable(32), Buffer::readable(32)]);
    assert_eq!(used.len, 0, "a chain with a device-readable buffer");
    let (_, used) = request(
        &mut vmm,
        &[Buffer::raw(beyond_memory, 64, VRING_DESC_F_WRITE)],
    );
    assert_eq!(used.len, 0, "a buffer outside guest memory");
    let (_, used) = request(&mut vmm, &[Buffer::writable(0)]);
    assert_eq!(used.len, 0, "a zero-length buffer");

    // A guest hammering the queue with bad requests does not flood the log.
    for _ in 0..200 {
        request(&mut vmm, &[Buffer::readable(8)]);
    }
    let (head, used) = request(&mut vmm, &[Buffer::writable(64)]);
    assert_eq!(used.len, 64);
    assert_random(&vmm.read_buffer(head, 0).unwrap());

    let log = daemon.log();
    assert!(log.contains("device-readable"), "{log}");
    assert!(log.contains("outside guest memory"), "{log}");
    let logged = log.matches("answered with 0 bytes").count();
    assert!(
        (2..=10).contains(&logged),
        "{logged} defect lines logged:\n{log}"
    );
}

#[test]
fn a_corrupt_queue_does_not_affect_other_guests_or_the_next_connection() {
    let dir = tempfile::tempdir().unwrap();
    let bad_socket = socket_in(&dir, "bad.sock");
    let good_socket = socket_in(&dir, "good.sock");
    let daemon = Daemon::serve(&[&bad_socket, &good_socket]);
    let mut bad = TestVmm::connect(&bad_socket, TestVmmConfig::qemu()).unwrap();
    let mut good = TestVmm::connect(&good_socket, TestVmmConfig::cloud_hypervisor()).unwrap();

    // An avail index far beyond the queue size cannot happen in a sane driver.
    bad.driver_mut().store_avail_idx(40_000).unwrap();
    bad.kick().unwrap();
    daemon.wait_for_log("request queue unusable", 1);

    check_fills_4k_and_64_byte_requests(&mut good);
    drop(bad); // the VM "crashes"
    daemon.wait_for_log("guest bad: VMM disconnected", 1);
    let mut rebooted = TestVmm::connect(&bad_socket, TestVmmConfig::qemu()).unwrap();
    check_fills_4k_and_64_byte_requests(&mut rebooted);
}

#[test]
fn the_frontend_can_disconnect_crash_and_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir, "cycle.sock");
    let daemon = Daemon::serve(&[&socket]);

    for round in 1..=3 {
        let mut vmm = TestVmm::connect(&socket, TestVmmConfig::qemu()).unwrap();
        check_fills_4k_and_64_byte_requests(&mut vmm);
        if round == 2 {
            // Requests in flight when the VMM vanishes.
            for _ in 0..8 {
                vmm.post(&[Buffer::writable(4096)]).unwrap();
            }
            vmm.kick().unwrap();
            drop(vmm);
        } else {
            vmm.disconnect().unwrap();
        }
        daemon.wait_for_log("guest cycle: VMM disconnected from", round);
    }
}

#[test]
fn connect_mode_dials_the_listening_vmm_and_dials_again() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir, "vmm.sock");
    // The daemon starts first and waits for the VMM's socket to appear.
    let daemon = Daemon::start(["serve", "--connect", socket.to_str().unwrap()]);
    daemon.wait_for_log("waiting for the VMM to listen", 1);
    let listener = UnixListener::bind(&socket).unwrap();

    for round in 1..=2 {
        let config = TestVmmConfig {
            connect_timeout: Duration::from_secs(30),
            ..TestVmmConfig::cloud_hypervisor()
        };
        let mut vmm = TestVmm::accept(&listener, config).unwrap();
        check_fills_4k_and_64_byte_requests(&mut vmm);
        vmm.disconnect().unwrap();
        daemon.wait_for_log("guest vmm: VMM disconnected from", round);
    }
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
    let (_daemon, mut vmm, _dir) = serve_and_connect(TestVmmConfig::qemu());
    let before = vmm.notifications().unwrap();
    // Ask for an interrupt only after the 100th completion.
    let used_event = vmm.driver().last_used_idx().wrapping_add(99);
    vmm.set_used_event(used_event).unwrap();
    for _ in 0..4 {
        vmm.post(&[Buffer::writable(64)]).unwrap();
    }
    vmm.kick().unwrap();
    let used = vmm.poll_used(4, TIMEOUT).unwrap();
    assert!(used.iter().all(|u| u.len == 64));
    assert_eq!(
        vmm.notifications().unwrap(),
        before,
        "interrupt sent although not asked for"
    );

    // `wait_used` asks for an interrupt at the next completion and sleeps on it.
    let (_, used) = request(&mut vmm, &[Buffer::writable(64)]);
    assert_eq!(used.len, 64);
    assert!(vmm.notifications().unwrap() > before);
}

#[test]
fn many_guests_are_served_concurrently_by_one_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let sockets: Vec<_> = (0..16)
        .map(|i| socket_in(&dir, &format!("vm{i}.sock")))
        .collect();
    let refs: Vec<&Path> = sockets.iter().map(|p| p.as_path()).collect();
    let _daemon = Daemon::serve(&refs);

    let handles: Vec<_> = sockets
        .into_iter()
        .map(|socket| {
            std::thread::spawn(move || {
                let mut vmm = TestVmm::connect(&socket, TestVmmConfig::qemu()).unwrap();
                for _ in 0..50 {
                    let (_, used) = request(&mut vmm, &[Buffer::writable(256)]);
                    assert_eq!(used.len, 256);
                }
                vmm.read_buffer(0, 0).unwrap()
            })
        })
        .collect();
    let mut outputs: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    outputs.sort();
    outputs.dedup();
    assert_eq!(outputs.len(), 16, "two guests received the same bytes");
}

fn open_fds(daemon: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", daemon.serving_pid()))
        .unwrap()
        .count()
}

#[test]
fn reconnects_leave_no_descriptors_or_threads_behind() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir, "cycle.sock");
    let daemon = Daemon::serve(&[&socket]);
    // One connection first, so lazily created state is there before counting.
    TestVmm::connect(&socket, TestVmmConfig::qemu())
        .unwrap()
        .disconnect()
        .unwrap();
    daemon.wait_for_log("VMM disconnected", 1);
    let fds = open_fds(&daemon);
    let threads = std::fs::read_dir(format!("/proc/{}/task", daemon.serving_pid()))
        .unwrap()
        .count();

    for round in 2..=11 {
        let mut vmm = TestVmm::connect(&socket, TestVmmConfig::qemu()).unwrap();
        check_fills_4k_and_64_byte_requests(&mut vmm);
        drop(vmm);
        daemon.wait_for_log("VMM disconnected", round);
    }

    common::wait_until("descriptors back to the baseline", || {
        open_fds(&daemon) <= fds
    });
    let after = std::fs::read_dir(format!("/proc/{}/task", daemon.serving_pid()))
        .unwrap()
        .count();
    assert!(after <= threads, "{threads} threads before, {after} after");
}

/// Entries of /proc/PID/`what` (`fd` or `task`).
fn proc_entries(pid: nix::unistd::Pid, what: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{what}"))
        .unwrap()
        .count()
}

/// The names of the process's threads but those that serve one control
/// request each (`control-client`, started by the status queries below),
/// sorted.
fn threads_but_control(pid: nix::unistd::Pid) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
        .map(|name| name.trim_end().to_owned())
        .filter(|name| !name.starts_with("control-client"))
        .collect();
    names.sort();
    names
}

#[test]
fn sixty_four_connected_guests_cost_no_thread_and_at_most_six_descriptors_each() {
    const GUESTS: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let sockets: Vec<_> = (0..GUESTS)
        .map(|i| socket_in(&dir, &format!("g{i}.sock")))
        .collect();
    let refs: Vec<&Path> = sockets.iter().map(|p| p.as_path()).collect();
    let daemon = Daemon::serve(&refs);
    let (serving, top) = (daemon.serving_pid(), daemon.pid());
    // Threads take their names as they start: counted once start-up is
    // over (only the main thread still named as the process).
    common::wait_until("the serving process's threads to start", || {
        let names = threads_but_control(serving);
        names.iter().filter(|name| *name == "vhost-rng").count() == 1
            && names.iter().any(|name| name == "control")
    });
    let threads = threads_but_control(serving);
    // The top process holds a duplicate of each listening socket once the
    // serving process has reported it.
    common::wait_until("the top process to hold every listening socket", || {
        proc_entries(top, "fd") >= GUESTS
    });
    // (and no more reports on their way: the count holds still)
    let mut top_fds = proc_entries(top, "fd");
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = proc_entries(top, "fd");
        if now == top_fds {
            break;
        }
        top_fds = now;
    }
    let serving_fds = proc_entries(serving, "fd");

    let mut vmms: Vec<TestVmm> = sockets
        .iter()
        .map(|socket| TestVmm::connect(socket, TestVmmConfig::qemu()).unwrap())
        .collect();
    for vmm in &mut vmms {
        let (head, used) = request(vmm, &[Buffer::writable(64)]);
        assert_eq!(used.len, 64);
        assert_random(&vmm.read_buffer(head, 0).unwrap());
    }
    // The top process takes each guest's descriptors from the reports the
    // serving process sends after every change: settled once every
    // connection's are there.
    let served = || {
        daemon
            .guests()
            .iter()
            .filter(|guest| guest.connected)
            .count()
    };
    common::wait_until("every guest connected", || served() == GUESTS);

    let threads_now = threads_but_control(serving);
    assert_eq!(
        threads_now, threads,
        "{GUESTS} connections changed the serving process's threads"
    );
    let threads = threads.len();
    assert!(
        threads < GUESTS,
        "{threads:?} for {GUESTS} guests: threads grow with guests"
    );
    // Each guest held its listening socket before: the connection adds at
    // most five (connection, kick, call, and its memory's file here).
    let serving_per_guest = (proc_entries(serving, "fd") - serving_fds) as f64 / GUESTS as f64;
    eprintln!(
        "serving process: {threads} threads, {serving_fds} fds idle, +{serving_per_guest} per connected guest"
    );
    assert!(
        serving_per_guest + 1.0 <= 6.0,
        "{serving_per_guest} more descriptors per connected guest"
    );
    // The top process keeps duplicates for crash survival: the connection,
    // the kick and call eventfds and the memory's file.
    common::wait_until("the top process to hold every connection", || {
        proc_entries(top, "fd") - top_fds >= 4 * GUESTS
    });
    let top_per_guest = (proc_entries(top, "fd") - top_fds) as f64 / GUESTS as f64;
    eprintln!("top process: {top_fds} fds idle, +{top_per_guest} per connected guest");
    assert!(
        top_per_guest <= 4.0,
        "the top process holds {top_per_guest} more per connected guest"
    );

    // And all of it goes when the VMMs do.
    for vmm in vmms {
        vmm.disconnect().unwrap();
    }
    daemon.wait_for_log("VMM disconnected", GUESTS);
    common::wait_until("descriptors back to the baseline", || {
        proc_entries(serving, "fd") <= serving_fds && proc_entries(top, "fd") <= top_fds
    });
    assert_eq!(threads_but_control(serving).len(), threads);
}

/// Sends `bytes` to the daemon on a raw connection.
fn send_raw(stream: &mut std::os::unix::net::UnixStream, bytes: &[u8]) {
    use std::io::Write;
    stream.write_all(bytes).unwrap();
}

#[test]
fn a_vmm_stalled_mid_message_does_not_delay_other_guests() {
    // More stalled guests than the daemon has event loops (at most four),
    // dealt out in turn: every loop has a stalled connection.
    const STALLED: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let sockets: Vec<_> = (0..=STALLED)
        .map(|i| socket_in(&dir, &format!("s{i}.sock")))
        .collect();
    let refs: Vec<&Path> = sockets.iter().map(|p| p.as_path()).collect();
    let daemon = Daemon::serve(&refs);

    // GET_FEATURES: a header and no payload; half of it sent.
    let get_features: Vec<u8> = [1u32, 1, 0].iter().flat_map(|w| w.to_le_bytes()).collect();
    let mut stalled: Vec<_> = sockets[..STALLED]
        .iter()
        .map(|socket| {
            let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
            send_raw(&mut stream, &get_features[..6]);
            stream
        })
        .collect();
    daemon.wait_for_log("VMM connected", STALLED);

    // Another guest negotiates (a dozen messages with replies) and is
    // served, on every loop's turn, while the halves wait.
    let mut vmm = TestVmm::connect(&sockets[STALLED], TestVmmConfig::qemu()).unwrap();
    for _ in 0..20 {
        let (_, used) = request(&mut vmm, &[Buffer::writable(64)]);
        assert_eq!(used.len, 64);
    }

    // The rest of a half message arrives: answered, nothing lost.
    for stream in &mut stalled {
        use std::io::Read;
        send_raw(stream, &get_features[6..]);
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut reply = [0u8; 20];
        stream.read_exact(&mut reply).unwrap();
        assert_eq!(reply[..4], 1u32.to_le_bytes(), "a reply to GET_FEATURES");
        assert_eq!(reply[8..12], 8u32.to_le_bytes());
        assert_ne!(u64::from_le_bytes(reply[12..].try_into().unwrap()), 0);
    }
    assert!(
        !daemon.log().contains("closed:"),
        "a connection was closed: {}",
        daemon.log()
    );
}

#[test]
fn a_throttled_guest_is_woken_by_the_timer_without_polling() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir, "slow.sock");
    let spec = format!(
        "name=slow,socket={},rate-bytes=64,rate-period=1000",
        socket.display()
    );
    let mut daemon = Daemon::start(["serve", "--source", "os", "--guest", &spec]);
    daemon.wait_for_socket(&socket);
    let mut vmm = TestVmm::connect(&socket, TestVmmConfig::qemu()).unwrap();
    // 64 bytes a second: the first request waits for the bucket to fill
    // (it starts empty), the second for the next period.
    let before = common::event_loop_cost(&daemon);
    let first = vmm.post(&[Buffer::writable(64)]).unwrap();
    let second = vmm.post(&[Buffer::writable(64)]).unwrap();
    vmm.kick().unwrap();
    let used = vmm.wait_used(2, Duration::from_secs(30)).unwrap();
    assert_eq!(
        used.iter().map(|u| (u.head, u.len)).collect::<Vec<_>>(),
        [(first, 64), (second, 64)]
    );
    common::assert_event_loops_waited(&daemon, before);
}

#[test]
fn a_starved_guest_is_woken_by_the_pool_without_polling() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("entropy.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let socket = socket_in(&dir, "starved.sock");
    let source = format!("file={}", fifo.display());
    let mut daemon = Daemon::start([
        "serve",
        "--mode",
        "raw",
        "--source",
        &source,
        "--socket",
        socket.to_str().unwrap(),
    ]);
    daemon.wait_for_socket(&socket);
    let mut vmm = TestVmm::connect(&socket, TestVmmConfig::qemu()).unwrap();

    let before = common::event_loop_cost(&daemon);
    // Nothing to give: the request waits (and nothing in the loops runs);
    // the source delivers: answered without another kick.
    let writer = common::starved_request_is_answered_once_fed(
        &mut vmm,
        fifo,
        Duration::from_secs(30),
        || daemon.log(),
    );
    common::assert_event_loops_waited(&daemon, before);
    drop(vmm);
    drop(daemon);
    writer.join().unwrap();
}
