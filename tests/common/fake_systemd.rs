// SPDX-License-Identifier: Apache-2.0
//! systemd as a `Type=notify` service with a file descriptor store sees
//! it, for tests (no systemd runs as PID 1 on the test machines): a thread
//! reads the notification socket continuously, as systemd does, keeps the
//! store from `FDSTORE=1` / `FDSTOREREMOVE=1` messages (one copy per open
//! file, `FDNAME=` as given) and the other notifications in order.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

#[derive(Default)]
struct Received {
    store: Vec<(String, OwnedFd)>,
    messages: Vec<String>,
}

pub struct FakeSystemd {
    _dir: tempfile::TempDir,
    /// The notification socket (`NOTIFY_SOCKET`).
    pub path: std::path::PathBuf,
    received: Arc<Mutex<Received>>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl FakeSystemd {
    pub fn new() -> FakeSystemd {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let received = Arc::new(Mutex::new(Received::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    receive(&socket, &received);
                }
            })
        };
        FakeSystemd {
            _dir: dir,
            path,
            received,
            stop,
            reader: Some(reader),
        }
    }

    /// Waits for a notification equal to `message`, taking it and every one
    /// before it.
    pub fn wait_for(&mut self, message: &str) {
        super::wait_until(&format!("{message:?} from the daemon"), || {
            let mut received = self.received.lock().unwrap();
            match received.messages.iter().position(|m| m == message) {
                Some(at) => {
                    received.messages.drain(..=at);
                    true
                }
                None => false,
            }
        });
    }

    /// Returns once every notification sent so far has been taken (a
    /// marker sent now has come through the queue).
    pub fn sync(&mut self) {
        let marker = format!("TEST-SYNC={:?}", std::time::Instant::now());
        UnixDatagram::unbound()
            .unwrap()
            .send_to(marker.as_bytes(), &self.path)
            .unwrap();
        self.wait_for(&marker);
    }

    /// The stored descriptors as the next start gets them (copies).
    pub fn passed(&self) -> Vec<(String, OwnedFd)> {
        self.received
            .lock()
            .unwrap()
            .store
            .iter()
            .map(|(name, fd)| (name.clone(), fd.try_clone().unwrap()))
            .collect()
    }

    /// The names of the stored descriptors.
    pub fn names(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap()
            .store
            .iter()
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// How many descriptors the store holds.
    pub fn stored(&self) -> usize {
        self.received.lock().unwrap().store.len()
    }

    /// Empties the store, as systemd does when the unit stops.
    pub fn clear(&self) {
        self.received.lock().unwrap().store.clear();
    }

    /// The newest stored record of `guest`, parsed.
    pub fn record(&self, guest: &str) -> Option<serde_json::Value> {
        let prefix = format!("guest.{guest}.state");
        let received = self.received.lock().unwrap();
        let (_, fd) = received
            .store
            .iter()
            .filter_map(|(name, fd)| Some((name.strip_prefix(&prefix)?.parse::<u64>().ok()?, fd)))
            .max_by_key(|(generation, _)| *generation)?;
        // Read at offsets: the file position is shared with the daemon's
        // copy.
        let file = std::fs::File::from(fd.try_clone().unwrap());
        let mut json = vec![0u8; 1 << 20];
        let n = std::os::unix::fs::FileExt::read_at(&file, &mut json, 0).unwrap();
        serde_json::from_slice(&json[..n]).ok()
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Takes one notification, if one comes within the socket's timeout.
fn receive(socket: &UnixDatagram, received: &Mutex<Received>) {
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 64]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let Ok(message) = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    ) else {
        return;
    };
    let mut fds = Vec::new();
    for control in message.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(raw) = control {
            // SAFETY: the kernel installed these for this process just
            // now; nothing else owns them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let bytes = message.bytes;
    let text = String::from_utf8_lossy(&buf[..bytes]).into_owned();
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::to_owned)
    };
    let name = field("FDNAME=").unwrap_or_else(|| "stored".into());
    let mut received = received.lock().unwrap();
    if field("FDSTORE=").as_deref() == Some("1") {
        for fd in fds {
            if !received.store.iter().any(|(_, held)| same_file(held, &fd)) {
                received.store.push((name.clone(), fd));
            }
        }
    } else if field("FDSTOREREMOVE=").as_deref() == Some("1") {
        received.store.retain(|(held, _)| *held != name);
    } else {
        received.messages.push(text);
    }
}

fn same_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    use std::os::fd::AsFd;
    vhost_rng::kcmp::same_file(a.as_fd(), b.as_fd())
}
