// SPDX-License-Identifier: Apache-2.0
//! The VMM end of one vhost-user connection: a minimal stand-in for QEMU or
//! cloud-hypervisor driving a virtio-rng backend.
//!
//! [`TestVmm`] connects to a backend (or accepts the backend's connection),
//! negotiates features and sets up guest memory and the single request queue
//! with the same messages, in the same order, as the VMM named by its
//! [`FrontendProfile`]. Then it acts as the guest driver: posts requests,
//! kicks, waits for used elements on the call eventfd and reads back what the
//! backend wrote.
//!
//! Each instance is self-contained (no threads, a few file descriptors,
//! 4 MiB of lazily allocated guest RAM by default), so hundreds can run in one
//! process; see [`raise_fd_limit`].

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::error::{Error, Result};
use super::guest_memory::MemfdGuestMemory;
use super::split_ring::{Buffer, SplitRingDriver, UsedElem};

/// The one queue of virtio-rng: `requestq`.
const REQUEST_QUEUE: usize = 0;

/// Protocol features QEMU's vhost-user-rng asks for, intersected with the
/// backend's offer.
///
/// QEMU (7.2 up to current) acks every protocol feature it knows that the
/// backend offers, except `CONFIG` for devices without a config-change
/// notifier, which vhost-user-rng is. Three more are left out here because
/// this harness cannot honour them: `STATUS` (the vhost crate's frontend has
/// no SET_STATUS), `HOST_NOTIFIER` (nobody serves the backend channel) and the
/// Xen / shared-object / device-state features QEMU's rng never uses.
pub const QEMU_PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::from_bits_retain(
        VhostUserProtocolFeatures::MQ.bits()
            | VhostUserProtocolFeatures::LOG_SHMFD.bits()
            | VhostUserProtocolFeatures::RARP.bits()
            | VhostUserProtocolFeatures::REPLY_ACK.bits()
            | VhostUserProtocolFeatures::MTU.bits()
            | VhostUserProtocolFeatures::BACKEND_REQ.bits()
            | VhostUserProtocolFeatures::CROSS_ENDIAN.bits()
            | VhostUserProtocolFeatures::CRYPTO_SESSION.bits()
            | VhostUserProtocolFeatures::PAGEFAULT.bits()
            | VhostUserProtocolFeatures::BACKEND_SEND_FD.bits()
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits()
            | VhostUserProtocolFeatures::RESET_DEVICE.bits()
            | VhostUserProtocolFeatures::INBAND_NOTIFICATIONS.bits()
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS.bits(),
    );

/// Protocol features cloud-hypervisor's generic vhost-user device
/// (`--generic-vhost-user`, virtio-devices/src/vhost_user/generic_vhost_user.rs)
/// asks for, intersected with the backend's offer: CONFIG, MQ,
/// CONFIGURE_MEM_SLOTS, REPLY_ACK, INFLIGHT_SHMFD, LOG_SHMFD, DEVICE_STATE
/// and BACKEND_REQ, less the three whose messages this test VMM does not
/// send (CONFIG: GET_CONFIG when the guest reads config space;
/// INFLIGHT_SHMFD: GET/SET_INFLIGHT_FD; DEVICE_STATE: only for snapshots).
/// vhost-rng offers none of those three, so the set negotiated with it is
/// the one cloud-hypervisor negotiates.
pub const CLOUD_HYPERVISOR_PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::from_bits_retain(
        VhostUserProtocolFeatures::MQ.bits()
            | VhostUserProtocolFeatures::REPLY_ACK.bits()
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS.bits()
            | VhostUserProtocolFeatures::LOG_SHMFD.bits()
            | VhostUserProtocolFeatures::BACKEND_REQ.bits(),
    );

/// The protocol features cloud-hypervisor's generic vhost-user device asks
/// for that [`CLOUD_HYPERVISOR_PROTOCOL_FEATURES`] leaves out, because this
/// test VMM does not implement their messages. A backend offering one of
/// them is not driven exactly as cloud-hypervisor would drive it.
pub const CLOUD_HYPERVISOR_UNIMPLEMENTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::from_bits_retain(
        VhostUserProtocolFeatures::CONFIG.bits()
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits()
            | VhostUserProtocolFeatures::DEVICE_STATE.bits(),
    );

/// Which VMM's vhost-user behaviour to reproduce.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FrontendProfile {
    /// QEMU's `vhost-user-rng` device (hw/virtio/vhost-user.c, vhost.c):
    ///
    /// GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
    /// GET_QUEUE_NUM (if MQ), GET_MAX_MEM_SLOTS (if CONFIGURE_MEM_SLOTS),
    /// SET_BACKEND_REQ_FD (if BACKEND_REQ), SET_OWNER, GET_FEATURES,
    /// SET_VRING_CALL (a placeholder eventfd, QEMU's masked notifier), then at
    /// driver start SET_FEATURES, ADD_MEM_REG (if CONFIGURE_MEM_SLOTS) or
    /// SET_MEM_TABLE, SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR,
    /// SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ENABLE.
    ///
    /// With REPLY_ACK, NEED_REPLY is set on the memory messages,
    /// SET_BACKEND_REQ_FD and SET_VRING_ENABLE. SET_VRING_ENABLE is
    /// synchronous as in QEMU 8.2 and later: without REPLY_ACK a GET_FEATURES
    /// follows it, so the ring is enabled before the first kick.
    #[default]
    Qemu,
    /// cloud-hypervisor's generic vhost-user device (`--generic-vhost-user`;
    /// virtio-devices/src/vhost_user/generic_vhost_user.rs and
    /// vu_common_ctrl.rs, checked against its main branch of 2026-08-22,
    /// commit ae44c2971c83):
    ///
    /// SET_OWNER, GET_FEATURES (connect_vhost_user), GET_PROTOCOL_FEATURES,
    /// SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (if MQ), then at activation
    /// (setup_vhost_user) SET_FEATURES, SET_MEM_TABLE (cloud-hypervisor uses
    /// ADD_MEM_REG only for hot-plugged memory), SET_VRING_NUM (every queue
    /// first), then per queue SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_CALL,
    /// SET_VRING_KICK, then SET_VRING_ENABLE, and SET_BACKEND_REQ_FD last
    /// (if BACKEND_REQ). A device reset (reset_vhost_user) sends
    /// SET_VRING_ENABLE 0 and GET_VRING_BASE per queue.
    ///
    /// With REPLY_ACK, NEED_REPLY is set on every message after protocol
    /// negotiation. Without it a GET_FEATURES follows SET_VRING_ENABLE; real
    /// cloud-hypervisor sends none, and a backend that drops kicks on a
    /// not-yet-enabled ring would make tests flaky.
    CloudHypervisor,
}

/// How guest memory is given to the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryRegistration {
    /// Whatever the profile's VMM does: QEMU uses GET_MAX_MEM_SLOTS plus
    /// ADD_MEM_REG when CONFIGURE_MEM_SLOTS is negotiated and SET_MEM_TABLE
    /// otherwise; cloud-hypervisor always uses SET_MEM_TABLE at boot.
    #[default]
    ProfileDefault,
    /// Always SET_MEM_TABLE.
    SetMemTable,
    /// Always GET_MAX_MEM_SLOTS plus ADD_MEM_REG (fails unless
    /// CONFIGURE_MEM_SLOTS was negotiated), like cloud-hypervisor's memory
    /// hot-plug path.
    AddMemReg,
}

/// How to build a [`TestVmm`]. Start from [`TestVmmConfig::qemu`],
/// [`TestVmmConfig::cloud_hypervisor`] or `Default` and adjust fields.
#[derive(Clone, Debug)]
pub struct TestVmmConfig {
    /// Which VMM's message sequence to reproduce.
    pub profile: FrontendProfile,
    /// Descriptors in the request queue (power of two). Default 256.
    pub queue_size: u16,
    /// Bytes of guest RAM (page multiple). Default 4 MiB, which leaves each
    /// chain head about 16 KiB of buffer space with 256 descriptors. Pages are
    /// allocated only when touched.
    pub memory_size: usize,
    /// Guest physical address where RAM starts. Default 1 GiB (as on arm64
    /// `virt` machines) rather than 0, so a backend that confuses guest
    /// addresses with offsets into the mapping fails loudly.
    pub guest_base: u64,
    /// Ack `VIRTIO_RING_F_EVENT_IDX` if offered. Default true, as a Linux guest does.
    pub event_idx: bool,
    /// Ack `VIRTIO_RING_F_INDIRECT_DESC` if offered. Default true, as a Linux guest does.
    pub indirect: bool,
    /// Protocol features the frontend is willing to ack; the profile's set
    /// ([`QEMU_PROTOCOL_FEATURES`], [`CLOUD_HYPERVISOR_PROTOCOL_FEATURES`])
    /// when `None`. Always intersected with what the backend offers.
    pub protocol_features: Option<VhostUserProtocolFeatures>,
    /// SET_MEM_TABLE or ADD_MEM_REG.
    pub memory_registration: MemoryRegistration,
    /// Zero device-writable buffers when posting them, so stale bytes cannot
    /// pass for fresh output. Default true; benchmarks may turn it off.
    pub clear_buffers: bool,
    /// How long `connect` retries a missing or refusing socket and how long
    /// `accept` waits for the backend. Default 5 s.
    pub connect_timeout: Duration,
    /// How long bringing the device up, `stop_ring` or `disconnect` may
    /// take before the connection is shut down and the call fails, so a
    /// backend that never answers fails a test instead of hanging it.
    /// Default 10 s.
    pub reply_timeout: Duration,
}

impl Default for TestVmmConfig {
    fn default() -> Self {
        Self::qemu()
    }
}

impl TestVmmConfig {
    /// Defaults with the QEMU profile.
    pub fn qemu() -> Self {
        Self {
            profile: FrontendProfile::Qemu,
            queue_size: 256,
            memory_size: 4 << 20,
            guest_base: 0x4000_0000,
            event_idx: true,
            indirect: true,
            protocol_features: None,
            memory_registration: MemoryRegistration::ProfileDefault,
            clear_buffers: true,
            connect_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(10),
        }
    }

    /// Defaults with the cloud-hypervisor profile.
    pub fn cloud_hypervisor() -> Self {
        Self {
            profile: FrontendProfile::CloudHypervisor,
            ..Self::qemu()
        }
    }

    /// The same configuration with another profile.
    pub fn with_profile(self, profile: FrontendProfile) -> Self {
        Self { profile, ..self }
    }

    fn wanted_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features.unwrap_or(match self.profile {
            FrontendProfile::Qemu => QEMU_PROTOCOL_FEATURES,
            FrontendProfile::CloudHypervisor => CLOUD_HYPERVISOR_PROTOCOL_FEATURES,
        })
    }

    /// Virtio feature bits the guest driver would ack if the backend offers them.
    fn wanted_features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1;
        if self.event_idx {
            features |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if self.indirect {
            features |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
        }
        features
    }
}

/// The VMM side of one vhost-user virtio-rng device, with its guest driver.
pub struct TestVmm {
    frontend: Frontend,
    profile: FrontendProfile,
    memory: MemfdGuestMemory,
    ring: SplitRingDriver,
    kick: EventFd,
    call: EventFd,
    backend_features: u64,
    features: u64,
    backend_protocol_features: VhostUserProtocolFeatures,
    protocol_features: VhostUserProtocolFeatures,
    queue_num: Option<u64>,
    max_mem_slots: Option<u64>,
    /// Our end of the backend-initiated channel (BACKEND_REQ); kept open so
    /// the backend's end stays valid. Nothing reads it.
    backend_channel: Option<UnixStream>,
    /// A duplicate of the connection, shut down when a backend overruns `reply_timeout`.
    watchdog_socket: UnixStream,
    reply_timeout: Duration,
    sent: Vec<FrontendReq>,
    notifications: u64,
    kicks: u64,
}

impl std::fmt::Debug for TestVmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The vhost crate's Frontend has no Debug; show what tests care about.
        f.debug_struct("TestVmm")
            .field("profile", &self.profile)
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol_features", &self.protocol_features)
            .field("ring", &self.ring.layout())
            .field("in_flight", &self.ring.in_flight())
            .field("kicks", &self.kicks)
            .field("notifications", &self.notifications)
            .finish_non_exhaustive()
    }
}

impl TestVmm {
    /// Connects to a backend listening at `path` (the daemon in server mode)
    /// and brings the device up as `cfg.profile` would. Retries for up to
    /// `cfg.connect_timeout` while the socket is missing or refuses.
    pub fn connect(path: &Path, cfg: TestVmmConfig) -> Result<Self> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) && started.elapsed() < cfg.connect_timeout =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(Error::Connect {
                        path: path.to_owned(),
                        source,
                    });
                }
            }
        };
        Self::from_stream(stream, cfg)
    }

    /// Accepts one connection from a backend that connects to us (the daemon
    /// in `--connect` mode), like QEMU with `-chardev socket,server=on`, and
    /// brings the device up. Waits up to `cfg.connect_timeout`.
    pub fn accept(listener: &UnixListener, cfg: TestVmmConfig) -> Result<Self> {
        if !wait_readable(listener.as_fd(), cfg.connect_timeout)? {
            return Err(Error::Accept(std::io::ErrorKind::TimedOut.into()));
        }
        let (stream, _) = listener.accept().map_err(Error::Accept)?;
        stream.set_nonblocking(false).map_err(Error::Accept)?;
        Self::from_stream(stream, cfg)
    }

    /// Brings the device up over an already connected socket (for example one
    /// end of `UnixStream::pair()` whose other end an in-process backend serves).
    pub fn from_stream(stream: UnixStream, cfg: TestVmmConfig) -> Result<Self> {
        // The vhost crate retries reads that time out, so a socket timeout
        // cannot bound a request; a watchdog shuts this duplicate down instead.
        let watchdog_socket = stream
            .try_clone()
            .map_err(Error::os("duplicating the vhost-user socket"))?;
        let memory = MemfdGuestMemory::new(GuestAddress(cfg.guest_base), cfg.memory_size)?;
        let mut ring = SplitRingDriver::new(
            memory.memory().clone(),
            memory.base(),
            memory.size(),
            cfg.queue_size,
        )?;
        ring.set_clear_buffers(cfg.clear_buffers);
        let new_eventfd = || EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC);

        let mut vmm = Self {
            frontend: Frontend::from_stream(stream, 1),
            profile: cfg.profile,
            memory,
            ring,
            kick: new_eventfd().map_err(Error::EventFd)?,
            call: new_eventfd().map_err(Error::EventFd)?,
            backend_features: 0,
            features: 0,
            backend_protocol_features: VhostUserProtocolFeatures::empty(),
            protocol_features: VhostUserProtocolFeatures::empty(),
            queue_num: None,
            max_mem_slots: None,
            backend_channel: None,
            watchdog_socket,
            reply_timeout: cfg.reply_timeout,
            sent: Vec::with_capacity(24),
            notifications: 0,
            kicks: 0,
        };
        vmm.within_reply_timeout(|vmm| match cfg.profile {
            FrontendProfile::Qemu => vmm.start_like_qemu(&cfg),
            FrontendProfile::CloudHypervisor => vmm.start_like_cloud_hypervisor(&cfg),
        })?;
        vmm.ring
            .set_event_idx(vmm.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        Ok(vmm)
    }

    /// QEMU: vhost_user_backend_init(), vhost_dev_init(), vhost_dev_start().
    fn start_like_qemu(&mut self, cfg: &TestVmmConfig) -> Result<()> {
        self.backend_features = self.request(FrontendReq::GET_FEATURES, |f| f.get_features())?;
        if self.offers_protocol_features() {
            self.negotiate_protocol_features(cfg)?;
            self.query_queue_num()?;
            if self.negotiated(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
                self.query_max_mem_slots()?;
            }
            if self.negotiated(VhostUserProtocolFeatures::BACKEND_REQ) {
                self.open_backend_channel()?;
            }
        }

        self.request(FrontendReq::SET_OWNER, |f| f.set_owner())?;
        self.request(FrontendReq::GET_FEATURES, |f| f.get_features())?;
        // QEMU first points the call fd at its masked notifier and swaps in
        // the guest's interrupt at start: the backend must follow the swap.
        let placeholder = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::EventFd)?;
        self.request(FrontendReq::SET_VRING_CALL, |f| {
            f.set_vring_call(REQUEST_QUEUE, &placeholder)
        })?;

        self.set_features(cfg)?;
        let add_mem_reg = match cfg.memory_registration {
            MemoryRegistration::ProfileDefault => {
                self.negotiated(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
            }
            MemoryRegistration::SetMemTable => false,
            MemoryRegistration::AddMemReg => true,
        };
        self.with_reply_ack(|vmm| vmm.register_memory(add_mem_reg))?;

        let vring = self.vring_config()?;
        let queue_size = cfg.queue_size;
        self.request(FrontendReq::SET_VRING_NUM, |f| {
            f.set_vring_num(REQUEST_QUEUE, queue_size)
        })?;
        self.request(FrontendReq::SET_VRING_BASE, |f| {
            f.set_vring_base(REQUEST_QUEUE, 0)
        })?;
        self.request(FrontendReq::SET_VRING_ADDR, |f| {
            f.set_vring_addr(REQUEST_QUEUE, &vring)
        })?;
        self.send_kick_fd()?;
        self.send_call_fd()?;
        self.enable_ring(true)
    }

    /// cloud-hypervisor: negotiate_features_vhost_user(), setup_vhost_user().
    fn start_like_cloud_hypervisor(&mut self, cfg: &TestVmmConfig) -> Result<()> {
        self.request(FrontendReq::SET_OWNER, |f| f.set_owner())?;
        self.backend_features = self.request(FrontendReq::GET_FEATURES, |f| f.get_features())?;
        if self.offers_protocol_features() {
            self.negotiate_protocol_features(cfg)?;
            if self.negotiated(VhostUserProtocolFeatures::REPLY_ACK) {
                // From here on every message asks for an ack.
                self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            self.query_queue_num()?;
        }

        self.set_features(cfg)?;
        let add_mem_reg = cfg.memory_registration == MemoryRegistration::AddMemReg;
        if add_mem_reg && self.max_mem_slots.is_none() {
            self.query_max_mem_slots()?;
        }
        self.register_memory(add_mem_reg)?;

        let vring = self.vring_config()?;
        let queue_size = cfg.queue_size;
        self.request(FrontendReq::SET_VRING_NUM, |f| {
            f.set_vring_num(REQUEST_QUEUE, queue_size)
        })?;
        self.request(FrontendReq::SET_VRING_ADDR, |f| {
            f.set_vring_addr(REQUEST_QUEUE, &vring)
        })?;
        self.request(FrontendReq::SET_VRING_BASE, |f| {
            f.set_vring_base(REQUEST_QUEUE, 0)
        })?;
        self.send_call_fd()?;
        self.send_kick_fd()?;
        self.enable_ring(true)?;
        if self.negotiated(VhostUserProtocolFeatures::BACKEND_REQ) {
            self.open_backend_channel()?;
        }
        Ok(())
    }

    fn offers_protocol_features(&self) -> bool {
        self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn negotiated(&self, feature: VhostUserProtocolFeatures) -> bool {
        self.protocol_features.contains(feature)
    }

    fn negotiate_protocol_features(&mut self, cfg: &TestVmmConfig) -> Result<()> {
        self.backend_protocol_features = self.request(FrontendReq::GET_PROTOCOL_FEATURES, |f| {
            f.get_protocol_features()
        })?;
        let acked = self.backend_protocol_features & cfg.wanted_protocol_features();
        self.request(FrontendReq::SET_PROTOCOL_FEATURES, |f| {
            f.set_protocol_features(acked)
        })?;
        self.protocol_features = acked;
        Ok(())
    }

    fn query_queue_num(&mut self) -> Result<()> {
        if !self.negotiated(VhostUserProtocolFeatures::MQ) {
            return Ok(());
        }
        let queues = self.request(FrontendReq::GET_QUEUE_NUM, |f| f.get_queue_num())?;
        self.queue_num = Some(queues);
        if queues < 1 {
            return Err(Error::QueueCount(queues));
        }
        Ok(())
    }

    fn query_max_mem_slots(&mut self) -> Result<()> {
        let slots = self.request(FrontendReq::GET_MAX_MEM_SLOTS, |f| f.get_max_mem_slots())?;
        self.max_mem_slots = Some(slots);
        Ok(())
    }

    fn open_backend_channel(&mut self) -> Result<()> {
        let (ours, theirs) =
            UnixStream::pair().map_err(Error::os("creating the backend channel"))?;
        self.with_reply_ack(|vmm| {
            vmm.request(FrontendReq::SET_BACKEND_REQ_FD, |f| {
                f.set_backend_request_fd(&theirs)
            })
        })?;
        self.backend_channel = Some(ours);
        Ok(())
    }

    /// SET_FEATURES with what a Linux virtio-rng driver acks, limited to the offer.
    fn set_features(&mut self, cfg: &TestVmmConfig) -> Result<()> {
        if self.backend_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(Error::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        let mut features = cfg.wanted_features() & self.backend_features;
        if self.offers_protocol_features() {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.request(FrontendReq::SET_FEATURES, |f| f.set_features(features))?;
        self.features = features;
        Ok(())
    }

    fn register_memory(&mut self, add_mem_reg: bool) -> Result<()> {
        let region = self.memory.region_info()?;
        if add_mem_reg {
            if !self.negotiated(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
                return Err(Error::FeatureNotNegotiated(
                    "VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS",
                ));
            }
            if self.max_mem_slots.is_none() {
                self.query_max_mem_slots()?;
            }
            self.request(FrontendReq::ADD_MEM_REG, |f| f.add_mem_region(&region))?;
        } else {
            self.request(FrontendReq::SET_MEM_TABLE, |f| f.set_mem_table(&[region]))?;
        }
        Ok(())
    }

    /// Ring addresses as SET_VRING_ADDR wants them: in our address space.
    fn vring_config(&self) -> Result<VringConfigData> {
        let layout = *self.ring.layout();
        Ok(VringConfigData {
            queue_max_size: layout.queue_size,
            queue_size: layout.queue_size,
            flags: 0,
            desc_table_addr: self
                .memory
                .host_address(layout.desc_table, layout.desc_table_len())?,
            used_ring_addr: self
                .memory
                .host_address(layout.used_ring, layout.used_ring_len())?,
            avail_ring_addr: self
                .memory
                .host_address(layout.avail_ring, layout.avail_ring_len())?,
            log_addr: None,
        })
    }

    fn send_kick_fd(&mut self) -> Result<()> {
        let kick = self.kick.try_clone().map_err(Error::EventFd)?;
        self.request(FrontendReq::SET_VRING_KICK, |f| {
            f.set_vring_kick(REQUEST_QUEUE, &kick)
        })
    }

    fn send_call_fd(&mut self) -> Result<()> {
        let call = self.call.try_clone().map_err(Error::EventFd)?;
        self.request(FrontendReq::SET_VRING_CALL, |f| {
            f.set_vring_call(REQUEST_QUEUE, &call)
        })
    }

    /// SET_VRING_ENABLE, returning only once the backend has processed it.
    fn enable_ring(&mut self, enable: bool) -> Result<()> {
        let acked = self.negotiated(VhostUserProtocolFeatures::REPLY_ACK);
        self.with_reply_ack(|vmm| {
            vmm.request(FrontendReq::SET_VRING_ENABLE, |f| {
                f.set_vring_enable(REQUEST_QUEUE, enable)
            })
        })?;
        if !acked {
            // Any reply proves the backend read everything sent before it.
            self.request(FrontendReq::GET_FEATURES, |f| f.get_features())?;
        }
        Ok(())
    }

    /// Runs `op` with NEED_REPLY set when REPLY_ACK is negotiated, as QEMU does
    /// for selected messages. (The cloud-hypervisor profile already sets it on
    /// every message.)
    fn with_reply_ack<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let per_message = self.profile == FrontendProfile::Qemu
            && self.negotiated(VhostUserProtocolFeatures::REPLY_ACK);
        if per_message {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let result = op(self);
        if per_message {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        }
        result
    }

    /// Sends one request through the vhost crate, recording it.
    fn request<T>(
        &mut self,
        request: FrontendReq,
        op: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T> {
        self.sent.push(request);
        op(&mut self.frontend).map_err(|source| Error::VhostUser { request, source })
    }

    /// Virtio features acked with SET_FEATURES (includes
    /// `VHOST_USER_F_PROTOCOL_FEATURES` when it was offered).
    pub fn negotiated_features(&self) -> u64 {
        self.features
    }

    /// Virtio features the backend offered in GET_FEATURES.
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// Protocol features acked with SET_PROTOCOL_FEATURES.
    pub fn negotiated_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// Protocol features the backend offered in GET_PROTOCOL_FEATURES.
    pub fn backend_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.backend_protocol_features
    }

    /// The GET_QUEUE_NUM answer, if MQ was negotiated.
    pub fn queue_num(&self) -> Option<u64> {
        self.queue_num
    }

    /// The GET_MAX_MEM_SLOTS answer, if it was asked.
    pub fn max_mem_slots(&self) -> Option<u64> {
        self.max_mem_slots
    }

    /// Every request sent on the connection so far, in order.
    pub fn sent_requests(&self) -> &[FrontendReq] {
        &self.sent
    }

    /// The profile this VMM follows.
    pub fn profile(&self) -> FrontendProfile {
        self.profile
    }

    /// Guest RAM.
    pub fn memory(&self) -> &MemfdGuestMemory {
        &self.memory
    }

    /// The guest driver's view of the request queue.
    pub fn driver(&self) -> &SplitRingDriver {
        &self.ring
    }

    /// The guest driver, for hand-crafted descriptors and ring indices.
    pub fn driver_mut(&mut self) -> &mut SplitRingDriver {
        &mut self.ring
    }

    /// The vhost-user connection, for requests this type does not send itself
    /// (GET_CONFIG, RESET_DEVICE, a second SET_MEM_TABLE, ...).
    pub fn frontend_mut(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Posts one request: a chain of direct descriptors. Returns its head.
    /// Call [`Self::kick`] to tell the backend.
    pub fn post(&mut self, buffers: &[Buffer]) -> Result<u16> {
        self.ring.post(buffers)
    }

    /// Posts one request through an indirect descriptor table. Returns its
    /// head. Needs `VIRTIO_RING_F_INDIRECT_DESC`; to violate that on purpose,
    /// use `driver_mut().post_indirect()`.
    pub fn post_indirect(&mut self, buffers: &[Buffer]) -> Result<u16> {
        if self.features & (1 << VIRTIO_RING_F_INDIRECT_DESC) == 0 {
            return Err(Error::FeatureNotNegotiated("VIRTIO_RING_F_INDIRECT_DESC"));
        }
        self.ring.post_indirect(buffers)
    }

    /// Notifies the backend (writes the kick eventfd), whatever the ring's
    /// suppression state says.
    pub fn kick(&mut self) -> Result<()> {
        self.kick.write(1).map_err(Error::EventFd)?;
        self.kicks += 1;
        Ok(())
    }

    /// Notifies the backend only if it asked for it (`avail_event` with
    /// EVENT_IDX, `VRING_USED_F_NO_NOTIFY` without), as a guest driver does.
    /// Returns whether it kicked.
    pub fn kick_if_needed(&mut self) -> Result<bool> {
        let needed = self.ring.needs_kick()?;
        if needed {
            self.kick()?;
        }
        Ok(needed)
    }

    /// Kicks sent so far.
    pub fn kicks(&self) -> u64 {
        self.kicks
    }

    /// Call-eventfd notifications received so far (each backend signal counts
    /// once; signals are collected whenever this VMM waits or is asked).
    pub fn notifications(&mut self) -> Result<u64> {
        self.drain_call()?;
        Ok(self.notifications)
    }

    /// Writes `used_event` (with EVENT_IDX): the backend should signal only
    /// once its used index passes `idx`. `wait_used` overwrites it; use
    /// [`Self::poll_used`] to observe the effect.
    pub fn set_used_event(&mut self, idx: u16) -> Result<()> {
        self.ring.set_used_event(idx)
    }

    /// Sets or clears `VRING_AVAIL_F_NO_INTERRUPT` (suppression without EVENT_IDX).
    pub fn set_no_interrupt(&mut self, suppress: bool) -> Result<()> {
        self.ring.set_no_interrupt(suppress)
    }

    /// Waits until `n` used elements are available, sleeping on the call
    /// eventfd as a guest sleeps on its interrupt, and returns exactly `n`
    /// of them in used-ring order (later ones stay for the next call).
    ///
    /// With EVENT_IDX it sets `used_event` so that the backend signals when
    /// the `n`-th element arrives. A backend that completes requests without
    /// signalling when it should makes this time out.
    pub fn wait_used(&mut self, n: usize, timeout: Duration) -> Result<Vec<UsedElem>> {
        let mut used = Vec::with_capacity(n);
        self.wait_used_into(n, timeout, &mut used)?;
        Ok(used)
    }

    /// [`Self::wait_used`] appending to a caller-owned vector, so loops need
    /// not allocate.
    pub fn wait_used_into(
        &mut self,
        n: usize,
        timeout: Duration,
        out: &mut Vec<UsedElem>,
    ) -> Result<()> {
        self.wait_for_used(n, timeout, out, true)
    }

    /// Like [`Self::wait_used`] but checks the used ring every millisecond
    /// instead of relying on notifications, and leaves `used_event` alone
    /// until it reaps: for tests of notification suppression.
    pub fn poll_used(&mut self, n: usize, timeout: Duration) -> Result<Vec<UsedElem>> {
        let mut used = Vec::with_capacity(n);
        self.wait_for_used(n, timeout, &mut used, false)?;
        Ok(used)
    }

    fn wait_for_used(
        &mut self,
        n: usize,
        timeout: Duration,
        out: &mut Vec<UsedElem>,
        sleep_on_call: bool,
    ) -> Result<()> {
        let started = Instant::now();
        loop {
            self.drain_call()?;
            let pending = usize::from(self.ring.used_pending()?);
            if pending >= n {
                self.ring.reap(n, out)?;
                return Ok(());
            }
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(Error::Timeout {
                    waited,
                    wanted: n,
                    available: pending,
                });
            }
            let mut nap = timeout - waited;
            if sleep_on_call {
                if self.ring.event_idx() {
                    // Ask for a signal when the n-th element lands, then look
                    // again in case it landed before the request was visible.
                    let wanted_idx = self.ring.last_used_idx().wrapping_add(n as u16);
                    self.ring.set_used_event(wanted_idx.wrapping_sub(1))?;
                    if usize::from(self.ring.used_pending()?) >= n {
                        continue;
                    }
                }
            } else {
                nap = nap.min(Duration::from_millis(1));
            }
            // vmm-sys-util's EventFd has no `as_fd`.
            // SAFETY: the descriptor belongs to `self.call`, which stays open
            // for the whole call.
            let call = unsafe { BorrowedFd::borrow_raw(self.call.as_raw_fd()) };
            wait_readable(call, nap)?;
        }
    }

    /// Reaps every used element available now, without waiting. Returns how
    /// many were appended to `out`.
    pub fn reap(&mut self, out: &mut Vec<UsedElem>) -> Result<usize> {
        self.drain_call()?;
        self.ring.reap(usize::MAX, out)
    }

    /// Bytes of buffer `index` of the chain with head `head`, as the backend
    /// left them. Valid until the head is reused by a later post.
    pub fn read_buffer(&self, head: u16, index: usize) -> Result<Vec<u8>> {
        self.ring.read_buffer(head, index)
    }

    /// Stops the ring as a VMM stopping the device does: SET_VRING_ENABLE 0,
    /// then GET_VRING_BASE, whose answer (the backend's next available index)
    /// is returned. The connection stays open.
    pub fn stop_ring(&mut self) -> Result<u16> {
        self.within_reply_timeout(|vmm| {
            vmm.enable_ring(false)?;
            let base = vmm.request(FrontendReq::GET_VRING_BASE, |f| {
                f.get_vring_base(REQUEST_QUEUE)
            })?;
            // The base is a 16-bit ring index carried in a 32-bit field.
            Ok(base as u16)
        })
    }

    /// Shuts the device down as the profile's VMM does on guest shutdown and
    /// closes the connection: both disable the ring and fetch its base
    /// (QEMU's vhost_dev_stop, cloud-hypervisor's reset_vhost_user).
    ///
    /// Dropping a `TestVmm` instead closes the socket with no goodbye, like a
    /// VMM that crashed or was killed.
    pub fn disconnect(mut self) -> Result<()> {
        self.stop_ring().map(drop)
    }

    /// Runs `op`, shutting the connection down if it takes longer than the
    /// reply timeout; the blocked request then fails and `op` returns.
    fn within_reply_timeout<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let socket = self
            .watchdog_socket
            .try_clone()
            .map_err(Error::os("duplicating the vhost-user socket"))?;
        let timeout = self.reply_timeout;
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let expired = matches!(
                finished.recv_timeout(timeout),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
            if expired {
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
            expired
        });
        let result = op(self);
        drop(done);
        // A watchdog that panicked cannot have fired.
        let expired = watchdog.join().unwrap_or(false);
        if expired {
            return Err(Error::ReplyTimeout(timeout));
        }
        result
    }

    /// Adds pending call-eventfd signals to the notification count.
    fn drain_call(&mut self) -> Result<()> {
        match self.call.read() {
            Ok(count) => {
                self.notifications += count;
                Ok(())
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(error) => Err(Error::EventFd(error)),
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes. Returns whether it is readable.
fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> Result<bool> {
    let started = Instant::now();
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        // Round up so a sub-millisecond remainder still sleeps.
        let millis = left.as_micros().div_ceil(1000);
        let millis = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
        match poll(&mut [PollFd::new(fd, PollFlags::POLLIN)], millis) {
            Ok(ready) => return Ok(ready > 0),
            Err(Errno::EINTR) => {}
            Err(errno) => {
                return Err(Error::Os {
                    what: "polling",
                    source: errno.into(),
                });
            }
        }
    }
}

/// Raises this process's soft open-file limit to its hard limit and returns
/// the new soft limit. Each `TestVmm` holds about five descriptors (socket,
/// memfd, kick, call, backend channel) and an in-process backend as many
/// again, so runs with hundreds of guests exceed the usual 1024.
pub fn raise_fd_limit() -> Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|errno| Error::os("reading RLIMIT_NOFILE")(errno.into()))?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .map_err(|errno| Error::os("raising RLIMIT_NOFILE")(errno.into()))?;
        return Ok(hard);
    }
    Ok(soft)
}

#[cfg(test)]
mod tests {
    //! Runs the test VMM against an in-process backend built on
    //! vhost-user-backend, so both connection directions and the protocol
    //! features the external peer lacks (REPLY_ACK, CONFIGURE_MEM_SLOTS,
    //! BACKEND_REQ) are exercised without any daemon.

    use super::*;
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
    use virtio_queue::QueueOwnedT;
    use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::event::{
        EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
    };

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// A virtio-rng-like device that fills every writable buffer with a
    /// running byte counter, so tests can tell requests apart.
    struct CountingRng {
        protocol_features: VhostUserProtocolFeatures,
        event_idx: bool,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
        next_byte: u8,
    }

    impl VhostUserBackendMut for CountingRng {
        type Bitmap = ();
        type Vring = VringRwLock;

        fn num_queues(&self) -> usize {
            1
        }

        fn max_queue_size(&self) -> usize {
            1024
        }

        fn features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1)
                | (1 << VIRTIO_RING_F_EVENT_IDX)
                | (1 << VIRTIO_RING_F_INDIRECT_DESC)
                | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        }

        fn protocol_features(&self) -> VhostUserProtocolFeatures {
            self.protocol_features
        }

        fn set_event_idx(&mut self, enabled: bool) {
            self.event_idx = enabled;
        }

        fn update_memory(
            &mut self,
            memory: GuestMemoryAtomic<GuestMemoryMmap>,
        ) -> std::io::Result<()> {
            self.memory = memory;
            Ok(())
        }

        fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
            new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
        }

        fn handle_event(
            &mut self,
            _device_event: u16,
            _evset: EventSet,
            vrings: &[VringRwLock],
            _thread_id: usize,
        ) -> std::io::Result<()> {
            let vring = &vrings[0];
            loop {
                if self.event_idx {
                    vring
                        .disable_notification()
                        .map_err(std::io::Error::other)?;
                }
                let memory = self.memory.memory();
                let chains: Vec<_> = vring
                    .get_mut()
                    .get_queue_mut()
                    .iter(memory.clone())
                    .map_err(std::io::Error::other)?
                    .collect();
                for chain in chains {
                    let head = chain.head_index();
                    let mut written = 0;
                    for descriptor in chain.clone() {
                        if descriptor.is_write_only() {
                            let bytes = vec![self.next_byte; descriptor.len() as usize];
                            memory
                                .write_slice(&bytes, descriptor.addr())
                                .map_err(std::io::Error::other)?;
                            written += descriptor.len();
                        }
                    }
                    self.next_byte = self.next_byte.wrapping_add(1).max(1);
                    vring
                        .add_used(head, written)
                        .map_err(std::io::Error::other)?;
                }
                if vring.needs_notification().map_err(std::io::Error::other)? {
                    vring.signal_used_queue()?;
                }
                if !self.event_idx || !vring.enable_notification().map_err(std::io::Error::other)? {
                    return Ok(());
                }
            }
        }
    }

    fn new_daemon(
        protocol_features: VhostUserProtocolFeatures,
    ) -> VhostUserDaemon<Arc<Mutex<CountingRng>>> {
        let backend = CountingRng {
            protocol_features,
            event_idx: false,
            memory: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            next_byte: 1,
        };
        VhostUserDaemon::new(
            "counting-rng".into(),
            Arc::new(Mutex::new(backend)),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .unwrap()
    }

    /// The backend connects to `path` (daemon `--connect` mode).
    fn backend_connecting(
        path: std::path::PathBuf,
        protocol_features: VhostUserProtocolFeatures,
    ) -> JoinHandle<()> {
        std::thread::spawn(move || {
            let mut daemon = new_daemon(protocol_features);
            daemon.start_client(path.to_str().unwrap()).unwrap();
            let _ = daemon.wait();
        })
    }

    /// The backend listens at `path` (daemon server mode).
    fn backend_listening(
        path: std::path::PathBuf,
        protocol_features: VhostUserProtocolFeatures,
    ) -> JoinHandle<()> {
        std::thread::spawn(move || {
            let mut daemon = new_daemon(protocol_features);
            let _ = daemon.serve(path);
        })
    }

    /// Posts `count` requests of `len` bytes, kicks once, and checks every
    /// one came back full and with its own fill byte.
    fn exchange(vmm: &mut TestVmm, count: usize, len: u32) {
        let heads: Vec<u16> = (0..count)
            .map(|_| vmm.post(&[Buffer::writable(len)]).unwrap())
            .collect();
        vmm.kick().unwrap();
        let used = vmm.wait_used(count, TIMEOUT).unwrap();
        let used_heads: Vec<u16> = used.iter().map(|elem| elem.head).collect();
        assert_eq!(used_heads, heads);
        let mut fills = Vec::new();
        for elem in &used {
            assert_eq!(elem.len, len);
            let bytes = vmm.read_buffer(elem.head, 0).unwrap();
            assert!(bytes.iter().all(|&b| b == bytes[0] && b != 0));
            fills.push(bytes[0]);
        }
        fills.dedup();
        assert_eq!(fills.len(), count.min(255));
    }

    #[test]
    fn qemu_profile_accepts_a_connecting_backend_and_adds_memory_region() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let offered = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::CONFIG;
        let backend = backend_connecting(path.clone(), offered);

        let mut vmm = TestVmm::accept(&listener, TestVmmConfig::qemu()).unwrap();
        // The vhost crate's backend side always adds REPLY_ACK; QEMU drops CONFIG.
        assert_eq!(
            vmm.negotiated_protocol_features(),
            (offered - VhostUserProtocolFeatures::CONFIG) | VhostUserProtocolFeatures::REPLY_ACK
        );
        assert_eq!(vmm.queue_num(), Some(1));
        assert!(vmm.max_mem_slots().unwrap() >= 1);
        use FrontendReq as R;
        assert_eq!(
            vmm.sent_requests(),
            [
                R::GET_FEATURES,
                R::GET_PROTOCOL_FEATURES,
                R::SET_PROTOCOL_FEATURES,
                R::GET_QUEUE_NUM,
                R::GET_MAX_MEM_SLOTS,
                R::SET_BACKEND_REQ_FD,
                R::SET_OWNER,
                R::GET_FEATURES,
                R::SET_VRING_CALL,
                R::SET_FEATURES,
                R::ADD_MEM_REG,
                R::SET_VRING_NUM,
                R::SET_VRING_BASE,
                R::SET_VRING_ADDR,
                R::SET_VRING_KICK,
                R::SET_VRING_CALL,
                R::SET_VRING_ENABLE,
            ]
        );

        exchange(&mut vmm, 1, 4096);
        exchange(&mut vmm, 64, 64);
        let head = vmm
            .post_indirect(&[Buffer::writable(16), Buffer::writable(48)])
            .unwrap();
        vmm.kick().unwrap();
        assert_eq!(vmm.wait_used(1, TIMEOUT).unwrap()[0].len, 64);
        assert_ne!(vmm.read_buffer(head, 1).unwrap(), vec![0; 48]);

        assert_eq!(vmm.stop_ring().unwrap(), 66);
        vmm.disconnect().unwrap();
        backend.join().unwrap();
    }

    #[test]
    fn cloud_hypervisor_profile_connects_and_sets_mem_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backend.sock");
        let offered =
            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        let backend = backend_listening(path.clone(), offered);

        let mut vmm = TestVmm::connect(&path, TestVmmConfig::cloud_hypervisor()).unwrap();
        use FrontendReq as R;
        assert_eq!(
            vmm.sent_requests(),
            [
                R::SET_OWNER,
                R::GET_FEATURES,
                R::GET_PROTOCOL_FEATURES,
                R::SET_PROTOCOL_FEATURES,
                R::GET_QUEUE_NUM,
                R::SET_FEATURES,
                R::SET_MEM_TABLE,
                R::SET_VRING_NUM,
                R::SET_VRING_ADDR,
                R::SET_VRING_BASE,
                R::SET_VRING_CALL,
                R::SET_VRING_KICK,
                R::SET_VRING_ENABLE,
            ]
        );
        exchange(&mut vmm, 8, 4096);
        vmm.disconnect().unwrap();
        backend.join().unwrap();
    }

    #[test]
    fn memory_registration_can_be_forced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backend.sock");
        let backend =
            backend_listening(path.clone(), VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
        let cfg = TestVmmConfig {
            memory_registration: MemoryRegistration::AddMemReg,
            ..TestVmmConfig::cloud_hypervisor()
        };
        let mut vmm = TestVmm::connect(&path, cfg).unwrap();
        assert!(
            vmm.sent_requests()
                .contains(&FrontendReq::GET_MAX_MEM_SLOTS)
        );
        assert!(vmm.sent_requests().contains(&FrontendReq::ADD_MEM_REG));
        exchange(&mut vmm, 4, 64);
        drop(vmm);
        backend.join().unwrap();

        let backend =
            backend_listening(path.clone(), VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
        let cfg = TestVmmConfig {
            memory_registration: MemoryRegistration::SetMemTable,
            ..TestVmmConfig::qemu()
        };
        let mut vmm = TestVmm::connect(&path, cfg).unwrap();
        assert!(vmm.sent_requests().contains(&FrontendReq::SET_MEM_TABLE));
        assert!(!vmm.sent_requests().contains(&FrontendReq::ADD_MEM_REG));
        exchange(&mut vmm, 4, 64);
        vmm.disconnect().unwrap();
        backend.join().unwrap();
    }

    #[test]
    fn event_idx_suppresses_and_requests_notifications() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backend.sock");
        let backend = backend_listening(path.clone(), VhostUserProtocolFeatures::MQ);
        let mut vmm = TestVmm::connect(&path, TestVmmConfig::qemu()).unwrap();
        assert!(vmm.driver().event_idx());

        // Ask for a signal only after the used index passes last + 100.
        let before = vmm.notifications().unwrap();
        let last = vmm.driver().last_used_idx();
        vmm.set_used_event(last.wrapping_add(100)).unwrap();
        for _ in 0..3 {
            vmm.post(&[Buffer::writable(64)]).unwrap();
        }
        assert!(vmm.kick_if_needed().unwrap());
        assert_eq!(vmm.poll_used(3, TIMEOUT).unwrap().len(), 3);
        assert_eq!(vmm.notifications().unwrap(), before);

        // wait_used asks for the signal it needs.
        exchange(&mut vmm, 5, 64);
        assert!(vmm.notifications().unwrap() > before);
        vmm.disconnect().unwrap();
        backend.join().unwrap();
    }

    #[test]
    fn features_follow_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backend.sock");
        let backend = backend_listening(path.clone(), VhostUserProtocolFeatures::empty());
        let cfg = TestVmmConfig {
            event_idx: false,
            indirect: false,
            protocol_features: Some(VhostUserProtocolFeatures::empty()),
            queue_size: 16,
            memory_size: 1 << 20,
            ..TestVmmConfig::qemu()
        };
        let mut vmm = TestVmm::connect(&path, cfg).unwrap();
        assert_eq!(
            vmm.negotiated_features(),
            (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        );
        assert!(vmm.negotiated_protocol_features().is_empty());
        assert!(matches!(
            vmm.post_indirect(&[Buffer::writable(8)]),
            Err(Error::FeatureNotNegotiated(_))
        ));
        // Without REPLY_ACK the enable is followed by a GET_FEATURES barrier.
        assert_eq!(
            vmm.sent_requests()[vmm.sent_requests().len() - 2..],
            [FrontendReq::SET_VRING_ENABLE, FrontendReq::GET_FEATURES]
        );
        exchange(&mut vmm, 16, 1024);
        let result = vmm.wait_used(1, Duration::from_millis(50));
        assert!(matches!(result, Err(Error::Timeout { available: 0, .. })));
        vmm.disconnect().unwrap();
        backend.join().unwrap();
    }

    #[test]
    fn silent_backend_times_out_instead_of_hanging() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let cfg = TestVmmConfig {
            reply_timeout: Duration::from_millis(100),
            ..TestVmmConfig::qemu()
        };
        let started = Instant::now();
        let result = TestVmm::from_stream(ours, cfg);
        assert!(matches!(result, Err(Error::ReplyTimeout(_))), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn fd_limit_can_be_raised() {
        assert!(raise_fd_limit().unwrap() > 0);
    }

    #[test]
    fn many_guests_share_one_process() {
        // Each guest gets its own backend thread pair here; the point is that
        // VMMs stay independent (own memfd, eventfds, rings) in one process.
        let guests: usize = std::env::var("TEST_VMM_GUESTS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(32);
        raise_fd_limit().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut backends = Vec::new();
        let mut vmms = Vec::new();
        for i in 0..guests {
            let path = dir.path().join(format!("guest{i}.sock"));
            backends.push(backend_listening(
                path.clone(),
                VhostUserProtocolFeatures::MQ,
            ));
            let cfg = TestVmmConfig {
                memory_size: 1 << 20,
                queue_size: 64,
                ..TestVmmConfig::qemu()
            };
            vmms.push(TestVmm::connect(&path, cfg).unwrap());
        }
        for vmm in &mut vmms {
            vmm.post(&[Buffer::writable(4096)]).unwrap();
            vmm.kick().unwrap();
        }
        for vmm in &mut vmms {
            let used = vmm.wait_used(1, TIMEOUT).unwrap();
            assert_eq!(used[0].len, 4096);
            assert_eq!(vmm.read_buffer(used[0].head, 0).unwrap(), vec![1; 4096]);
        }
        for vmm in vmms {
            vmm.disconnect().unwrap();
        }
        for backend in backends {
            backend.join().unwrap();
        }
    }
}
