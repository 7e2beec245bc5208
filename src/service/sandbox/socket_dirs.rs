// SPDX-License-Identifier: Apache-2.0
//! The `--socket-dir` directories (`socket-dirs`) made ready for guests
//! added later: those socket files and FIFOs are made by the serving
//! process after it has given up root (`--user`), so a directory it cannot
//! write makes every such addition fail with "Permission denied". Done as
//! root, before Landlock and the privilege drop: a missing directory is
//! made, owned by the user; an existing one is never changed (it may be
//! another program's), and one the user cannot write is named in a warning
//! at start instead of at the first `vhost-rng guest add`.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use log::{info, warn};
use nix::unistd::{Gid, Uid};

use super::RunAs;

/// Whether the user `uid`, with `gid` as its only group (the privilege
/// drop clears supplementary groups), may make files in a directory with
/// this owner and mode.
fn writable_by(uid: Uid, gid: Gid, meta: &fs::Metadata) -> bool {
    let mode = meta.mode();
    if meta.uid() == uid.as_raw() {
        mode & 0o300 == 0o300
    } else if meta.gid() == gid.as_raw() {
        mode & 0o030 == 0o030
    } else {
        mode & 0o003 == 0o003
    }
}

/// Makes each of `dirs` that is missing (mode 0755 with any missing
/// parents, the directory itself owned by `run_as`'s user and group) and
/// warns about each that `run_as` cannot write. Nothing here stops the
/// start: guests named at start do not need these directories.
pub fn prepare(dirs: &[impl AsRef<Path>], run_as: Option<&RunAs>) {
    for dir in dirs {
        let dir = dir.as_ref();
        // A symbolic link to a directory is that directory, for Landlock
        // too.
        match fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => warn!(
                "--socket-dir {}: not a directory; guests added later cannot have their \
                 sockets there",
                dir.display()
            ),
            Ok(meta) => {
                if let Some(run_as) = run_as
                    && !writable_by(run_as.uid, run_as.gid, &meta)
                {
                    warn!(
                        "--socket-dir {}: the serving process runs as {} and cannot make \
                         files there (owner uid {}, gid {}, mode {:04o}): guests added later \
                         with sockets or FIFOs there will fail with \"Permission denied\"; \
                         give the directory to that user or group (e.g. chgrp {} {} && chmod \
                         1775 {})",
                        dir.display(),
                        run_as.describe(),
                        meta.uid(),
                        meta.gid(),
                        meta.mode() & 0o7777,
                        run_as.gid,
                        dir.display(),
                        dir.display()
                    );
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => match make(dir, run_as) {
                Ok(()) => info!(
                    "--socket-dir {}: made{}",
                    dir.display(),
                    run_as.map_or(String::new(), |r| format!(", owned by {}", r.describe()))
                ),
                Err(e) => warn!("--socket-dir {}: cannot make it: {e}", dir.display()),
            },
            Err(e) => warn!("--socket-dir {}: {e}", dir.display()),
        }
    }
}

/// Makes `dir` and its missing parents, mode 0755 each (the umask, 077,
/// would leave them closed to the user), and gives `dir` to `run_as`.
fn make(dir: &Path, run_as: Option<&RunAs>) -> io::Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|path| !path.as_os_str().is_empty() && fs::symlink_metadata(path).is_err())
        .collect();
    for path in missing.into_iter().rev() {
        fs::DirBuilder::new().mode(0o755).create(path)?;
        fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    if let Some(run_as) = run_as {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            dir,
            Some(run_as.uid),
            Some(run_as.gid),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io::Error::from)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn meta_with(mode: u32) -> (tempfile::TempDir, fs::Metadata) {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
        let meta = fs::metadata(dir.path()).unwrap();
        (dir, meta)
    }

    #[test]
    fn the_owner_group_and_others_bits_are_read_for_the_right_user() {
        let (_dir, meta) = meta_with(0o755);
        let (owner, group) = (Uid::from_raw(meta.uid()), Gid::from_raw(meta.gid()));
        let stranger = (
            Uid::from_raw(meta.uid() + 4242),
            Gid::from_raw(meta.gid() + 4242),
        );
        assert!(writable_by(owner, group, &meta));
        assert!(!writable_by(stranger.0, group, &meta), "group r-x only");
        assert!(!writable_by(stranger.0, stranger.1, &meta));
        let (_dir, meta) = meta_with(0o1775);
        assert!(writable_by(stranger.0, group, &meta), "group rwx, sticky");
        assert!(!writable_by(stranger.0, stranger.1, &meta));
        let (_dir, meta) = meta_with(0o1777);
        assert!(writable_by(stranger.0, stranger.1, &meta));
        let (_dir, meta) = meta_with(0o577);
        assert!(
            !writable_by(owner, stranger.1, &meta),
            "the owner's bits win"
        );
    }

    #[test]
    fn a_missing_directory_is_made_with_its_parents_and_an_existing_one_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let missing = root.path().join("a/b");
        let existing = root.path().join("kept");
        fs::create_dir(&existing).unwrap();
        fs::set_permissions(&existing, fs::Permissions::from_mode(0o700)).unwrap();
        prepare(&[&missing, &existing], None);
        for made in [&missing, &root.path().join("a")] {
            let made = fs::metadata(made).unwrap();
            assert!(made.is_dir());
            assert_eq!(made.mode() & 0o7777, 0o755);
        }
        assert_eq!(fs::metadata(&existing).unwrap().mode() & 0o7777, 0o700);
    }
}
