// SPDX-License-Identifier: Apache-2.0
//! Socket files the serving process could not remove: after `--user` it
//! may not write the directories its sockets were made in as root (a
//! root-owned /run/vhost-rng, say). When a guest is first reported with a
//! listening socket (just made, or kept across a restart or upgrade), the
//! top process notes the socket file (device and inode) at its path; when
//! the daemon stops, once the serving process has ended, it removes each
//! one still there unchanged, and nothing else.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;

use log::{info, warn};

use super::Top;
use crate::config::{GuestEndpoint, GuestSpec};
use crate::frontend::channel;
use vhost_rng_protocol::wire;

/// A socket file and the identity of the socket bound there.
pub(super) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Whether the file at the path is still that socket.
    fn unchanged(&self) -> bool {
        std::fs::symlink_metadata(&self.path).is_ok_and(|there| {
            there.file_type().is_socket() && there.dev() == self.dev && there.ino() == self.ino
        })
    }
}

/// The key of the control socket among the guests' files.
const CONTROL: &str = "\0control";

impl Top {
    /// Notes the control socket's file.
    pub(super) fn note_control_socket(&mut self, path: PathBuf) {
        if let Ok(there) = std::fs::symlink_metadata(&path)
            && there.file_type().is_socket()
        {
            let file = SocketFile {
                path,
                dev: there.dev(),
                ino: there.ino(),
            };
            self.leftovers.insert(CONTROL.into(), file);
        }
    }

    /// Notes the socket file of guest `name` when it is first reported
    /// with a listening socket (just made, or kept across a restart).
    pub(super) fn note_socket_file(&mut self, name: &str) {
        if self.leftovers.contains_key(name) {
            return;
        }
        let Some(held) = self.held.get(name) else {
            return;
        };
        if held.state.listener.is_none() {
            return;
        }
        let Ok(spec) = held.state.spec.parse::<GuestSpec>() else {
            return;
        };
        let path = match &spec.endpoint {
            GuestEndpoint::Socket(path) | GuestEndpoint::Egd(path) => path.clone(),
            GuestEndpoint::VsockUds(path) => channel::uds_path(path, wire::DEFAULT_PORT),
            _ => return,
        };
        // A socket someone else made and passed (socket activation, --fd)
        // is bound at its path; its file is theirs.
        let listener = usize::try_from(held.state.listener.unwrap_or(-1))
            .ok()
            .and_then(|i| held.fds.get(i));
        if listener.is_some_and(|fd| crate::service::activation::bound_at(fd, &path)) {
            return;
        }
        if let Ok(there) = std::fs::symlink_metadata(&path)
            && there.file_type().is_socket()
        {
            self.leftovers.insert(
                name.to_owned(),
                SocketFile {
                    path,
                    dev: there.dev(),
                    ino: there.ino(),
                },
            );
        }
    }
}

/// Removes the files of `files` that are still the sockets they were.
pub(super) fn remove<'a>(files: impl Iterator<Item = &'a SocketFile>) {
    for file in files.filter(|file| file.unchanged()) {
        match std::fs::remove_file(&file.path) {
            Ok(()) => info!(
                "removed {}, which the serving process could not",
                file.path.display()
            ),
            Err(e) => warn!("{}: cannot remove socket file: {e}", file.path.display()),
        }
    }
}
