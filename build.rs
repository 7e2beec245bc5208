// SPDX-License-Identifier: Apache-2.0
//! Build script of vhost-rng.
//!
//! 1. `--version` names the commit: `VHOST_RNG_COMMIT` from the environment,
//!    else `git rev-parse`, else "unknown" (a source tarball).
//! 2. The files the Debian package holds besides the binary are staged in
//!    `<target>/<profile>/vhost-rng-assets/root/`, laid out as they are
//!    installed, so that plain `cargo deb -p vhost-rng` finds them (its
//!    assets name `target/release/vhost-rng-assets/root/**/*`): man pages
//!    rendered from the clap definitions (src/cli.rs, compiled here too, see
//!    below), completions, vhost-rng.toml(5) and the default config file
//!    from the commented example in src/config/mod.rs. (The files kept in
//!    contrib/ are named in Cargo.toml's assets directly.)
//!
//! src/cli.rs is compiled into this script with its real value enums
//! (src/entropy/pool/mode.rs, src/service/sandbox/mode.rs) and the agent's
//! real options (a build dependency); the types whose parsing has no
//! bearing on the pages are stand-ins below. The impl blocks of cli.rs are
//! left out (`cfg(vhost_rng_lib)`, set here for the library only). A unit
//! test of the library (`render::tests`) checks that the pages written
//! here are byte for byte those of the daemon's own `Cli::command()`.

use std::error::Error;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "build/render.rs"]
mod render;

#[path = "src/entropy/pool/mode.rs"]
#[allow(dead_code)]
mod pool_mode;
#[path = "src/service/sandbox/mode.rs"]
#[allow(dead_code)]
mod seccomp_mode;
#[path = "src/service/seed/format.rs"]
#[allow(dead_code)]
mod seed_format;

/// The version clap prints; replaced with the one naming the commit
/// before pages are rendered.
const LONG_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Stand-ins for the library's modules that src/cli.rs names.
mod config {
    use std::str::FromStr;

    /// Parsed by the library; only its help text matters here.
    #[derive(Debug, Clone)]
    pub struct GuestSpec;

    impl FromStr for GuestSpec {
        type Err = String;
        fn from_str(_: &str) -> Result<Self, String> {
            Ok(GuestSpec)
        }
    }

    /// Named by cli.rs's impl blocks only.
    pub enum GuestEndpoint {}
}

mod entropy {
    pub mod pool {
        pub use crate::pool_mode::Mode;
    }
    pub mod source {
        use std::str::FromStr;

        /// Parsed by the library; only its help text matters here.
        #[derive(Debug, Clone)]
        pub struct SourceSpec;

        impl FromStr for SourceSpec {
            type Err = String;
            fn from_str(_: &str) -> Result<Self, String> {
                Ok(SourceSpec)
            }
        }
    }
}

mod service {
    pub mod control {
        /// Shown as a default in the pages; `render::tests` checks it
        /// against the library's.
        pub const DEFAULT_CONTROL_PATH: &str = "/run/vhost-rng/control.sock";
    }
    pub mod daemon {
        /// Named by cli.rs's impl blocks only.
        pub struct Settings;
    }
    pub mod sandbox {
        pub use crate::seccomp_mode::{Isolation, SeccompMode};
    }
    pub mod seed {
        pub use crate::seed_format::*;
    }
}

#[path = "src/cli.rs"]
#[allow(dead_code, unused_imports, missing_docs)]
mod cli;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo::rustc-cfg=vhost_rng_lib");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=build/render.rs");
    println!("cargo::rerun-if-changed=src/cli.rs");
    println!("cargo::rerun-if-changed=src/config/mod.rs");

    let commit = commit();
    println!("cargo::rustc-env=VHOST_RNG_COMMIT={commit}");
    // Leaked: clap keeps &'static str, and this process ends soon.
    let version: &'static str = format!("{} (commit {commit})", env!("CARGO_PKG_VERSION")).leak();

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // OUT_DIR is <target>/<profile>/build/vhost-rng-<hash>/out.
    let profile_dir = out_dir
        .ancestors()
        .nth(3)
        .ok_or("OUT_DIR is not <target>/<profile>/build/<pkg>/out")?;
    let assets = profile_dir.join("vhost-rng-assets");
    println!("cargo::rustc-env=VHOST_RNG_ASSETS={}", assets.display());
    let root = assets.join("root");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }

    let mut cmd = <cli::Cli as clap::CommandFactory>::command().version(version);
    cmd.build();
    // Each page twice: as rendered in man/ (for reading from a source
    // tree, and for the test), and gzipped where the package installs it
    // (Debian policy; cargo-deb compresses no file it takes from target/).
    let plain = assets.join("man");
    if plain.exists() {
        fs::remove_dir_all(&plain)?;
    }
    for (name, page) in render::man_pages(&cmd, version)? {
        write(&plain.join(&name), &page, 0o644)?;
        let dest = root.join(format!("usr/share/man/man8/{name}.gz"));
        write(&dest, &gzip(&page)?, 0o644)?;
    }
    for (path, script) in render::completions(&cmd) {
        write(&root.join(path), &script, 0o644)?;
    }

    let mod_rs = fs::read_to_string("src/config/mod.rs")?;
    let example = render::example_in(&mod_rs).ok_or("no EXAMPLE in src/config/mod.rs")?;
    let config_page = render::config_page(example, version);
    write(
        &plain.join("vhost-rng.toml.5"),
        config_page.as_bytes(),
        0o644,
    )?;
    write(
        &root.join("usr/share/man/man5/vhost-rng.toml.5.gz"),
        &gzip(config_page.as_bytes())?,
        0o644,
    )?;
    write(
        &root.join("etc/vhost-rng/config.toml"),
        render::default_config(example).as_bytes(),
        0o644,
    )?;
    Ok(())
}

/// `bytes` gzipped at the best compression, with no name and no time in
/// the header, so that a build is reproducible.
fn gzip(bytes: &[u8]) -> Result<Vec<u8>, Box<dyn Error>> {
    use std::io::Write;
    let mut encoder = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Box<dyn Error>> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(path, bytes)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The commit the binary is built from, for `--version`.
fn commit() -> String {
    println!("cargo::rerun-if-env-changed=VHOST_RNG_COMMIT");
    if let Ok(commit) = std::env::var("VHOST_RNG_COMMIT") {
        return commit;
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    // Rebuilt when HEAD moves: a commit, a checkout (each writes the reflog).
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let dir = Path::new(&git_dir);
        for watched in [dir.join("HEAD"), dir.join("logs/HEAD")] {
            if watched.exists() {
                println!("cargo::rerun-if-changed={}", watched.display());
            }
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
}
