// SPDX-License-Identifier: Apache-2.0
//! The event loops that serve every vhost-user guest: a small fixed number
//! of threads, however many guests there are.
//!
//! Guests that listen (`socket=`) are dealt out in turn to one loop per
//! CPU, at most [`MAX_LOOPS`], all started with the first guest (threads
//! named `vhost-user-N`); guests the daemon dials (`connect=`) share one more,
//! `vhost-user-dial`, the only one whose sandbox filter lets it open
//! sockets. Each loop waits in `epoll` on, per guest, its listening socket
//! (while no VMM is connected), its VMM connection and its kick eventfd,
//! and on three descriptors of its own:
//! - a control eventfd: the daemon's commands (add, stop, freeze, thaw);
//! - a wake-up eventfd: the pool wakes a starved guest by setting its flag
//!   ([`super::device::Wake`]) and, the first time, queuing it here;
//! - one timerfd, armed for the earliest deadline of all its guests: a
//!   throttled guest's tokens, a connection's set-up and message deadlines
//!   ([`VhostUserLimits::timeout`](super::VhostUserLimits)), a `connect=`
//!   guest's next dial, a retry after a failed accept.
//!
//! Nothing a VMM does can block a loop: a connection is non-blocking and
//! edge-triggered, a message is read only once it has arrived whole and
//! handled alone (`server::handle_message`), replies are written
//! without waiting, and a VMM that has sent part of a message has until its
//! deadline to send the rest while the loop serves everyone else. A loop
//! handles at most [`MESSAGE_BUDGET`] messages of one connection, and a pass
//! over a guest's queue answers at most 1024 requests or 1 MiB
//! ([`super::device`]), before it turns to the others.
//!
//! A loop that panics ends the serving process (abort): the top process
//! starts another, which takes every guest's connection over, rather than
//! leaving that loop's guests unserved.
//!
//! A descriptor is taken out of the epoll set before it is closed (or
//! before the message that may replace it is handled): the top process
//! holds duplicates of them, and epoll forgets a descriptor only when every
//! duplicate is closed.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use log::{Level, debug, info, warn};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use vhost_rng_protocol::log_limited;
use vmm_sys_util::eventfd::EventFd;

use super::connection::{self, Arrival};
use super::handler::Handler;
use super::server::{Ended, Endpoint, Frozen, GuestServer, Resumed, capture, handle_message};

/// Most loops for listening guests, whatever the number of CPUs.
pub const MAX_LOOPS: usize = 4;
/// Most messages of one connection handled before the loop turns to the
/// others (the rest are handled on its next turn).
pub const MESSAGE_BUDGET: usize = 16;
/// Retry delays while a VMM is not there to connect to: short at first, so
/// a VM that is starting is served quickly, capped so the wait stays cheap.
const CONNECT_RETRY_FIRST: Duration = Duration::from_millis(50);
const CONNECT_RETRY_MAX: Duration = Duration::from_secs(1);
/// Pause after a failure to accept or set up a connection, so a persistent
/// failure (e.g. out of file descriptors) does not spin.
const SETUP_RETRY: Duration = Duration::from_millis(500);

// epoll tokens: a guest's slot number times 4 plus what is ready; slot 0 is
// the loop's own descriptors.
const CONTROL: u64 = 0;
const WAKE: u64 = 1;
const TIMER: u64 = 2;
/// In a guest process: the entropy link's wake eventfd (the main serving
/// process can serve the starved guest again).
const REMOTE_WAKE: u64 = 3;
const LISTENER: u64 = 1;
const CONNECTION: u64 = 2;
const KICK: u64 = 3;

fn token(slot: u64, kind: u64) -> u64 {
    (slot << 2) | kind
}

/// What the daemon asks of a loop.
pub enum Command {
    /// Serve this guest (a connection handed over first, if any).
    Add(Arc<GuestServer>, Option<Box<Resumed>>),
    /// Stop serving the guest in this slot.
    Stop(u64),
    /// Park the guest in this slot and say what it hands over.
    Freeze(u64, mpsc::Sender<Frozen>),
    /// Let a parked guest go on.
    Thaw(u64),
}

/// What a loop shares with the threads that talk to it.
struct Shared {
    control: EventFd,
    commands: Mutex<Vec<Command>>,
    wake: EventFd,
    /// Slots the pool woke since the loop last looked.
    woken: Mutex<Vec<u64>>,
}

/// A handle on one running loop.
#[derive(Clone)]
pub struct LoopHandle {
    shared: Arc<Shared>,
}

impl LoopHandle {
    /// Queues `command` and wakes the loop.
    pub fn send(&self, command: Command) -> io::Result<()> {
        self.shared
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(command);
        self.shared.control.write(1)
    }
}

/// The loops of this process, started as guests need them.
struct Loops {
    listen: Vec<LoopHandle>,
    dial: Option<LoopHandle>,
    next: usize,
}

static LOOPS: Mutex<Loops> = Mutex::new(Loops {
    listen: Vec::new(),
    dial: None,
    next: 0,
});
static NEXT_SLOT: AtomicU64 = AtomicU64::new(1);

/// How many loops serve listening guests: one per CPU, at most
/// [`MAX_LOOPS`]; one in a guest process, which serves one guest.
fn listen_loops() -> usize {
    if super::remote_supply::installed().is_some() {
        return 1;
    }
    thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_LOOPS)
}

/// A slot number and the loop for a new guest (`dials` for a `connect=`
/// guest), starting the loop if it is not running yet.
pub fn assign(dials: bool) -> io::Result<(u64, LoopHandle)> {
    let slot = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
    let mut loops = LOOPS.lock().unwrap_or_else(|e| e.into_inner());
    let handle = if dials {
        match &loops.dial {
            Some(handle) => handle.clone(),
            None => {
                let handle = start("vhost-user-dial".into(), true)?;
                loops.dial = Some(handle.clone());
                handle
            }
        }
    } else {
        // All of them with the first guest: a fixed pool from then on.
        while loops.listen.len() < listen_loops() {
            let handle = start(format!("vhost-user-{}", loops.listen.len()), false)?;
            loops.listen.push(handle);
        }
        let index = loops.next % loops.listen.len();
        loops.next = loops.next.wrapping_add(1);
        loops.listen[index].clone()
    };
    Ok((slot, handle))
}

/// Starts a loop in a thread named `name`.
fn start(name: String, dials: bool) -> io::Result<LoopHandle> {
    let shared = Arc::new(Shared {
        control: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        commands: Mutex::new(Vec::new()),
        wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        woken: Mutex::new(Vec::new()),
    });
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let timer = TimerFd::new(
        ClockId::CLOCK_MONOTONIC,
        TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
    )?;
    let readable = EpollFlags::EPOLLIN;
    epoll.add(
        // SAFETY: the eventfd lives in `shared`, which the loop keeps for
        // as long as the epoll instance.
        unsafe { BorrowedFd::borrow_raw(shared.control.as_raw_fd()) },
        EpollEvent::new(readable, CONTROL),
    )?;
    epoll.add(
        // SAFETY: as above.
        unsafe { BorrowedFd::borrow_raw(shared.wake.as_raw_fd()) },
        EpollEvent::new(readable, WAKE),
    )?;
    epoll.add(timer.as_fd(), EpollEvent::new(readable, TIMER))?;
    if let Some(link) = super::remote_supply::installed() {
        epoll.add(link.wake_fd(), EpollEvent::new(readable, REMOTE_WAKE))?;
    }
    let mut event_loop = EventLoop {
        shared: Arc::clone(&shared),
        epoll,
        timer,
        armed: None,
        slots: HashMap::new(),
        deadlines: BinaryHeap::new(),
        again: VecDeque::new(),
    };
    thread::Builder::new().name(name).spawn(move || {
        // Nothing from a VMM is read before the process has dropped root
        // and installed its filter.
        crate::service::sandbox::enter(crate::service::sandbox::ThreadRole::Vring { dials });
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| event_loop.run()));
        if run.is_err() {
            // Its guests would go unserved, unseen: a new serving process
            // takes them over instead (the top process restarts it with
            // every guest's connection, as after any crash).
            log::error!(
                "a vhost-user event loop failed; ending the serving process for another to take \
                 its guests over"
            );
            std::process::abort();
        }
    })?;
    Ok(LoopHandle { shared })
}

/// One guest as its loop serves it.
struct Slot {
    server: Arc<GuestServer>,
    /// Its listening socket is in the epoll set.
    listening: bool,
    connection: Option<Connection>,
    /// Parked by a freeze: nothing of it is watched.
    frozen: bool,
    /// When to dial again, or to accept again after a failure.
    retry_at: Option<Instant>,
    /// The next dial's delay after this one fails.
    dial_delay: Duration,
    /// A failed dial was logged at info level (later ones at debug).
    waiting_logged: bool,
    /// The deadline last queued for it.
    queued: Option<Instant>,
}

/// One VMM connection.
struct Connection {
    stream: UnixStream,
    handler: Handler,
    /// From accepting it to its SET_OWNER.
    setup_deadline: Instant,
    /// Set when part of a message has arrived: the rest must follow by then.
    message_deadline: Option<Instant>,
    /// The kick eventfd in the epoll set (the handler holds it).
    kick: Option<RawFd>,
}

struct EventLoop {
    shared: Arc<Shared>,
    epoll: Epoll,
    timer: TimerFd,
    /// What the timer is armed for.
    armed: Option<Instant>,
    slots: HashMap<u64, Slot>,
    /// Each guest's next deadline (stale entries are checked and skipped).
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Connections with messages possibly left after their budget.
    again: VecDeque<u64>,
}

impl EventLoop {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            let timeout = if self.again.is_empty() {
                EpollTimeout::NONE
            } else {
                EpollTimeout::ZERO
            };
            let ready = match self.epoll.wait(&mut events, timeout) {
                Ok(ready) => ready,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => {
                    // Not expected with valid arguments; do not spin.
                    warn!("vhost-user event loop: waiting for events: {e}");
                    thread::sleep(SETUP_RETRY);
                    0
                }
            };
            let again: Vec<u64> = self.again.drain(..).collect();
            for event in &events[..ready] {
                self.on_event(event.data());
            }
            for slot in again {
                self.on_readable(slot);
            }
            self.run_deadlines();
            self.arm_timer();
        }
    }

    fn on_event(&mut self, token: u64) {
        match token {
            CONTROL => {
                let _ = self.shared.control.read();
                let commands = std::mem::take(
                    &mut *self
                        .shared
                        .commands
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()),
                );
                for command in commands {
                    self.on_command(command);
                }
            }
            WAKE => {
                let _ = self.shared.wake.read();
                let woken = std::mem::take(
                    &mut *self.shared.woken.lock().unwrap_or_else(|e| e.into_inner()),
                );
                for slot in woken {
                    self.with_connection(slot, |connection| connection.handler.on_wake());
                }
            }
            REMOTE_WAKE => {
                if let Some(link) = super::remote_supply::installed() {
                    link.take_wake();
                }
                // Through each device's own flag, as the pool wakes it: a
                // frozen guest finds the flag set when it is thawed.
                for entry in self.slots.values() {
                    if let Some(connection) = &entry.connection {
                        connection.handler.wake().signal();
                    }
                }
            }
            TIMER => {
                // Non-blocking: nothing to read after a re-arm.
                let _ = self.timer.wait();
                self.armed = None;
            }
            _ => {
                let slot = token >> 2;
                match token & 3 {
                    LISTENER => self.accept(slot),
                    CONNECTION => self.on_readable(slot),
                    KICK => self.with_connection(slot, |connection| connection.handler.on_kick()),
                    _ => {}
                }
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Add(server, resumed) => self.add(server, resumed),
            Command::Stop(slot) => self.stop(slot),
            Command::Freeze(slot, sender) => {
                let frozen = self.freeze(slot);
                let _ = sender.send(frozen);
            }
            Command::Thaw(slot) => self.thaw(slot),
        }
    }

    fn add(&mut self, server: Arc<GuestServer>, resumed: Option<Box<Resumed>>) {
        let slot = server.slot();
        let dials = matches!(server.endpoint(), Endpoint::Connect(_));
        self.slots.insert(
            slot,
            Slot {
                server,
                listening: false,
                connection: None,
                frozen: false,
                retry_at: None,
                dial_delay: CONNECT_RETRY_FIRST,
                waiting_logged: false,
                queued: None,
            },
        );
        match resumed {
            Some(resumed) => {
                let Resumed { stream, handler } = *resumed;
                self.connect(slot, stream, handler, true);
            }
            None => {
                if let Some(entry) = self.slots.get(&slot) {
                    entry.server.report(None);
                }
                if dials {
                    self.dial(slot);
                } else {
                    self.listen(slot);
                }
            }
        }
        self.queue_deadline(slot);
    }

    /// Puts the slot's listening socket in the epoll set.
    fn listen(&mut self, slot: u64) {
        let Some(entry) = self.slots.get_mut(&slot) else {
            return;
        };
        let Endpoint::Listen(socket) = entry.server.endpoint() else {
            return;
        };
        if entry.listening || entry.frozen || entry.connection.is_some() {
            return;
        }
        let event = EpollEvent::new(EpollFlags::EPOLLIN, token(slot, LISTENER));
        // Non-blocking: a connection taken by another holder of the socket
        // (or given up) between epoll and accept must not hold the loop.
        let added = socket
            .listener()
            .set_nonblocking(true)
            .and_then(|()| Ok(self.epoll.add(socket.listener().as_fd(), event)?));
        match added {
            Ok(()) => entry.listening = true,
            Err(e) => {
                warn!(
                    "guest {}: cannot wait for its VMM on {}: {e}",
                    entry.server.guest().name(),
                    socket.path().display()
                );
                entry.retry_at = Some(Instant::now() + SETUP_RETRY);
            }
        }
    }

    /// Takes the slot's listening socket out of the epoll set.
    fn unlisten(&mut self, slot: u64) {
        let Some(entry) = self.slots.get_mut(&slot) else {
            return;
        };
        if let (true, Endpoint::Listen(socket)) = (entry.listening, entry.server.endpoint()) {
            let _ = self.epoll.delete(socket.listener().as_fd());
            entry.listening = false;
        }
    }

    fn accept(&mut self, slot: u64) {
        let Some(entry) = self.slots.get_mut(&slot) else {
            return;
        };
        let Endpoint::Listen(socket) = entry.server.endpoint() else {
            return;
        };
        match socket.listener().accept() {
            Ok((stream, _)) => self.setup(slot, stream),
            // A VMM that gave up between epoll and accept leaves nothing.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                warn!(
                    "guest {}: accepting on {}: {e}",
                    entry.server.guest().name(),
                    socket.path().display()
                );
                self.retry_later(slot);
            }
        }
    }

    fn dial(&mut self, slot: u64) {
        let Some(entry) = self.slots.get_mut(&slot) else {
            return;
        };
        if entry.frozen || entry.connection.is_some() || entry.server.is_stopping() {
            return;
        }
        let path = entry.server.path().to_owned();
        match dial_nonblocking(&path) {
            Ok(stream) => {
                entry.dial_delay = CONNECT_RETRY_FIRST;
                entry.waiting_logged = false;
                self.setup(slot, stream);
            }
            Err(e) => {
                let name = entry.server.guest().name();
                if !entry.waiting_logged {
                    info!(
                        "guest {name}: waiting for the VMM to listen on {}: {e}",
                        path.display()
                    );
                    entry.waiting_logged = true;
                } else {
                    debug!("guest {name}: connect to {}: {e}", path.display());
                }
                entry.retry_at = Some(Instant::now() + entry.dial_delay);
                entry.dial_delay = (entry.dial_delay * 2).min(CONNECT_RETRY_MAX);
                self.queue_deadline(slot);
            }
        }
    }

    /// A new connection: a handler for it, then served.
    fn setup(&mut self, slot: u64, stream: UnixStream) {
        let Some(entry) = self.slots.get_mut(&slot) else {
            return;
        };
        let server = Arc::clone(&entry.server);
        match Handler::new(Arc::clone(server.guest()), server.limits().memory) {
            Ok(handler) => self.connect(slot, stream, handler, false),
            Err(e) => {
                warn!(
                    "guest {}: cannot set up a connection on {}: {e}",
                    server.guest().name(),
                    server.path().display()
                );
                self.retry_later(slot);
            }
        }
    }

    fn retry_later(&mut self, slot: u64) {
        if let Some(entry) = self.slots.get_mut(&slot) {
            entry.retry_at = Some(Instant::now() + SETUP_RETRY);
        }
        self.unlisten(slot);
        self.queue_deadline(slot);
    }

    /// Serves `stream` with `handler`; `resumed` for a connection a previous
    /// daemon handed over.
    fn connect(&mut self, slot: u64, stream: UnixStream, handler: Handler, resumed: bool) {
        let Some(entry) = self.slots.get(&slot) else {
            return;
        };
        let server = Arc::clone(&entry.server);
        let name = server.guest().name();
        let path = server.path().display();
        if let Err(e) = stream.set_nonblocking(true) {
            warn!("guest {name}: cannot set up a connection on {path}: {e}");
            self.retry_later(slot);
            return;
        }
        if server.is_stopping() {
            return;
        }
        self.unlisten(slot);
        let stats = &server.guest().stats;
        if !resumed {
            stats.connections.fetch_add(1, Ordering::Relaxed);
        }
        stats.connected.store(true, Ordering::Relaxed);
        if resumed {
            info!("guest {name}: VMM connection on {path} taken over from the previous daemon");
        } else {
            info!("guest {name}: VMM connected on {path}");
        }
        server.report(Some((&stream, &handler)));
        let shared = Arc::clone(&self.shared);
        handler.wake().bind(Arc::new(move || {
            shared
                .woken
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(slot);
            if let Err(e) = shared.wake.write(1) {
                warn!("cannot wake a vhost-user event loop: {e}");
            }
        }));
        let limit = server.limits().timeout;
        let Some(entry) = self.slots.get_mut(&slot) else {
            return;
        };
        entry.connection = Some(Connection {
            stream,
            handler,
            setup_deadline: Instant::now() + limit,
            message_deadline: None,
            kick: None,
        });
        self.watch(slot);
        self.with_connection(slot, |connection| {
            if resumed {
                connection.handler.serve_pending();
            }
            // A wake-up that came before the binding.
            connection.handler.on_wake();
        });
        // Whatever the VMM sent already.
        self.again.push_back(slot);
    }

    /// Puts the slot's connection and kick in the epoll set; ends the
    /// connection if they cannot be.
    fn watch(&mut self, slot: u64) {
        let Some(connection) = self
            .slots
            .get_mut(&slot)
            .and_then(|entry| entry.connection.as_mut())
        else {
            return;
        };
        // Edge-triggered: a part of a message stays readable, and is looked
        // at again when more arrives (or at its deadline).
        let event = EpollEvent::new(
            EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET,
            token(slot, CONNECTION),
        );
        let watched = self
            .epoll
            .add(connection.stream.as_fd(), event)
            .map_err(|e| format!("cannot wait on the connection: {e}"))
            .and_then(|()| watch_kick(&self.epoll, slot, connection));
        if let Err(reason) = watched {
            self.end(slot, Ended::Closed(reason));
        }
    }

    /// Takes the slot's connection and kick out of the epoll set.
    fn unwatch(&mut self, slot: u64) {
        let Some(connection) = self
            .slots
            .get_mut(&slot)
            .and_then(|entry| entry.connection.as_mut())
        else {
            return;
        };
        let _ = self.epoll.delete(connection.stream.as_fd());
        unwatch_kick(&self.epoll, connection);
    }

    /// Runs `serve` on the slot's connection (unless parked), then closes
    /// it if the guest's memory turned out unusable.
    fn with_connection(&mut self, slot: u64, serve: impl FnOnce(&mut Connection)) {
        let Some(entry) = self.slots.get_mut(&slot) else {
            return;
        };
        if entry.frozen {
            return;
        }
        let Some(connection) = entry.connection.as_mut() else {
            return;
        };
        serve(connection);
        if let Some(refusal) = connection.handler.take_fatal() {
            self.end(
                slot,
                Ended::Closed(format!("the VMM's guest memory is unusable: {refusal}")),
            );
        } else {
            self.queue_deadline(slot);
        }
    }

    /// Handles the messages waiting on the slot's connection, up to the
    /// budget.
    fn on_readable(&mut self, slot: u64) {
        let Some(entry) = self.slots.get_mut(&slot) else {
            return;
        };
        if entry.frozen {
            return;
        }
        let server = Arc::clone(&entry.server);
        let Some(connection) = entry.connection.as_mut() else {
            return;
        };
        let limit = server.limits().timeout;
        let mut ended = None;
        let mut handled = 0;
        while ended.is_none() {
            if handled == MESSAGE_BUDGET {
                self.again.push_back(slot);
                break;
            }
            match connection::peek_message(&connection.stream) {
                Ok(Arrival::Message(message)) => {
                    handled += 1;
                    connection.message_deadline = None;
                    // The message may replace or drop the kick eventfd.
                    unwatch_kick(&self.epoll, connection);
                    let result = handle_message(
                        &connection.stream,
                        &mut connection.handler,
                        message,
                        &|stream, handler| server.report(Some((stream, handler))),
                    );
                    let result = result.and_then(|()| watch_kick(&self.epoll, slot, connection));
                    if let Err(reason) = result {
                        ended = Some(Ended::Closed(reason));
                    } else if let Some(refusal) = connection.handler.take_fatal() {
                        ended = Some(Ended::Closed(format!(
                            "the VMM's guest memory is unusable: {refusal}"
                        )));
                    }
                }
                Ok(Arrival::Empty) => break,
                Ok(Arrival::Partial) => {
                    connection
                        .message_deadline
                        .get_or_insert(Instant::now() + limit);
                    break;
                }
                Ok(Arrival::Closed) => ended = Some(Ended::Disconnected),
                Err(e) => ended = Some(Ended::Closed(format!("bad message from the VMM: {e}"))),
            }
        }
        match ended {
            Some(ended) => self.end(slot, ended),
            None => self.queue_deadline(slot),
        }
    }

    /// Ends the slot's connection: out of the epoll set, closed for the VMM
    /// too, its memory unmapped; then waits for the next one.
    fn end(&mut self, slot: u64, ended: Ended) {
        self.unwatch(slot);
        let Some(entry) = self.slots.get_mut(&slot) else {
            return;
        };
        let Some(connection) = entry.connection.take() else {
            return;
        };
        let server = Arc::clone(&entry.server);
        let guest = server.guest();
        let (name, path) = (guest.name(), server.path().display());
        // The top process holds a duplicate: shut it down for the VMM to
        // see the end.
        let _ = connection.stream.shutdown(std::net::Shutdown::Both);
        guest.stats.connected.store(false, Ordering::Relaxed);
        match ended {
            Ended::Disconnected => info!("guest {name}: VMM disconnected from {path}"),
            Ended::Stopped => info!("guest {name}: connection on {path} closed (guest stopped)"),
            Ended::Closed(reason) => {
                log_limited!(
                    guest.defect_log,
                    Level::Warn,
                    "guest {name}: connection on {path} closed: {reason}"
                );
            }
        }
        // Dropping the handler unmaps the guest's memory and closes every
        // fd the VMM sent.
        drop(connection);
        server.report(None);
        if server.is_stopping() {
            return;
        }
        if matches!(server.endpoint(), Endpoint::Connect(_)) {
            self.dial(slot);
        } else {
            self.listen(slot);
        }
        self.queue_deadline(slot);
    }

    fn stop(&mut self, slot: u64) {
        let frozen = self.slots.get(&slot).is_some_and(|entry| entry.frozen);
        if frozen {
            // Parked for a hand-over: its descriptors are out of the epoll
            // set already. Shut down, as a stopped guest's connection is,
            // but nothing more is reported.
            if let Some(entry) = self.slots.remove(&slot)
                && let Some(connection) = entry.connection
            {
                let _ = connection.stream.shutdown(std::net::Shutdown::Both);
            }
            return;
        }
        self.end(slot, Ended::Stopped);
        self.unlisten(slot);
        self.slots.remove(&slot);
    }

    fn freeze(&mut self, slot: u64) -> Frozen {
        let Some(entry) = self.slots.get(&slot) else {
            return Frozen::Failed("the guest is being stopped".into());
        };
        if entry.frozen {
            return Frozen::Failed("the guest is parked already".into());
        }
        self.unwatch(slot);
        self.unlisten(slot);
        let Some(entry) = self.slots.get_mut(&slot) else {
            return Frozen::Failed("the guest is being stopped".into());
        };
        entry.frozen = true;
        let captured = entry
            .connection
            .as_ref()
            .map(|connection| capture((&connection.stream, &connection.handler)))
            .transpose();
        match captured {
            Ok(None) => Frozen::Idle,
            Ok(Some(connection)) => Frozen::Connected(connection),
            Err(e) => Frozen::Failed(format!("cannot capture the connection: {e}")),
        }
    }

    fn thaw(&mut self, slot: u64) {
        let Some(entry) = self.slots.get_mut(&slot) else {
            return;
        };
        if !entry.frozen {
            return;
        }
        entry.frozen = false;
        let limit = entry.server.limits().timeout;
        let connected = match entry.connection.as_mut() {
            Some(connection) => {
                // Parked time does not count against the VMM.
                let now = Instant::now();
                connection.setup_deadline = now + limit;
                if connection.message_deadline.is_some() {
                    connection.message_deadline = Some(now + limit);
                }
                true
            }
            None => false,
        };
        if connected {
            self.watch(slot);
            self.with_connection(slot, |connection| connection.handler.on_wake());
            self.again.push_back(slot);
        } else if entry.retry_at.is_none() {
            if matches!(entry.server.endpoint(), Endpoint::Connect(_)) {
                self.dial(slot);
            } else {
                self.listen(slot);
            }
        }
        self.queue_deadline(slot);
    }

    /// The slot's earliest deadline, if it has one.
    fn next_deadline(entry: &Slot) -> Option<Instant> {
        if entry.frozen {
            return None;
        }
        let connection = entry.connection.as_ref();
        [
            entry.retry_at,
            connection.and_then(|c| c.handler.throttled_until()),
            connection.and_then(|c| c.message_deadline),
            connection
                .filter(|c| !c.handler.owned())
                .map(|c| c.setup_deadline),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn queue_deadline(&mut self, slot: u64) {
        let Some(entry) = self.slots.get_mut(&slot) else {
            return;
        };
        let next = Self::next_deadline(entry);
        if next != entry.queued {
            // An entry queued before is stale from now on (see `arm_timer`).
            entry.queued = next;
            if let Some(at) = next {
                self.deadlines.push(Reverse((at, slot)));
            }
        }
    }

    /// Does what is due.
    fn run_deadlines(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, slot))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            if let Some(entry) = self.slots.get_mut(&slot)
                && entry.queued == Some(at)
            {
                entry.queued = None;
                self.on_deadline(slot, now);
            }
        }
    }

    fn on_deadline(&mut self, slot: u64, now: Instant) {
        let Some(entry) = self.slots.get_mut(&slot) else {
            return;
        };
        if entry.frozen {
            return;
        }
        if entry.retry_at.is_some_and(|at| at <= now) {
            entry.retry_at = None;
            if matches!(entry.server.endpoint(), Endpoint::Connect(_)) {
                self.dial(slot);
            } else {
                self.listen(slot);
            }
        }
        let Some(entry) = self.slots.get_mut(&slot) else {
            return;
        };
        let limit = entry.server.limits().timeout;
        if let Some(connection) = entry.connection.as_ref() {
            let late = if connection.message_deadline.is_some_and(|at| at <= now) {
                Some("to finish a message")
            } else if !connection.handler.owned() && connection.setup_deadline <= now {
                Some("to claim the device (SET_OWNER)")
            } else {
                None
            };
            if let Some(what) = late {
                self.end(
                    slot,
                    Ended::Closed(format!("the VMM took longer than {limit:?} {what}")),
                );
                return;
            }
            if connection
                .handler
                .throttled_until()
                .is_some_and(|at| at <= now)
            {
                self.with_connection(slot, |connection| connection.handler.on_timer());
            }
        }
        self.queue_deadline(slot);
    }

    /// Arms the timer for the earliest deadline queued, dropping stale
    /// entries first (a set-up deadline the VMM met, a guest gone): the
    /// timer fires only for something to do.
    fn arm_timer(&mut self) {
        while let Some(Reverse((at, slot))) = self.deadlines.peek().copied() {
            let current = self
                .slots
                .get(&slot)
                .is_some_and(|entry| entry.queued == Some(at));
            if current {
                break;
            }
            self.deadlines.pop();
        }
        let next = self.deadlines.peek().map(|Reverse((at, _))| *at);
        if next == self.armed {
            return;
        }
        let result = match next {
            Some(at) => {
                // A zero expiration would disarm the timer instead.
                let wait = at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1));
                self.timer.set(
                    Expiration::OneShot(TimeSpec::from_duration(wait)),
                    TimerSetTimeFlags::empty(),
                )
            }
            None => self.timer.unset(),
        };
        match result {
            Ok(()) => self.armed = next,
            Err(e) => warn!("vhost-user event loop: cannot arm its timer: {e}"),
        }
    }
}

/// Connects to the Unix socket at `path` without waiting: a VMM whose
/// backlog is full is retried later like one that is not listening.
fn dial_nonblocking(path: &std::path::Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

/// Puts the connection's kick in the epoll set, while its ring runs.
fn watch_kick(epoll: &Epoll, slot: u64, connection: &mut Connection) -> Result<(), String> {
    if connection.kick.is_some() {
        return Ok(());
    }
    if let Some(kick) = connection.handler.kick_fd() {
        // Edge-triggered, and never read (see `Handler::on_kick`): every
        // write to an eventfd is an edge, so each kick wakes the loop once
        // and its counter need not be drained. That saves a read(2) per
        // kick, a third of the system calls of a request, and a kick the
        // VMM made stay readable (an `EFD_SEMAPHORE` eventfd holding a
        // large count, which one read per wake-up would never empty) cannot
        // make the shared loop spin.
        let event = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, token(slot, KICK));
        epoll
            .add(kick, event)
            .map_err(|e| format!("cannot wait on its kick eventfd: {e}"))?;
        connection.kick = Some(kick.as_raw_fd());
    }
    Ok(())
}

/// Takes the connection's kick out of the epoll set.
fn unwatch_kick(epoll: &Epoll, connection: &mut Connection) {
    if let Some(kick) = connection.kick.take() {
        // SAFETY: the handler still holds the kick it was given: a kick is
        // replaced or dropped only while a message is handled, and this
        // runs before each.
        let kick = unsafe { BorrowedFd::borrow_raw(kick) };
        let _ = epoll.delete(kick);
    }
}
