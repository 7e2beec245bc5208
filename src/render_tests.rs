// SPDX-License-Identifier: Apache-2.0
//! The files build.rs staged for the package are those of the daemon's
//! own definitions: man pages and completions from `Cli::command()`, the
//! config page and default file from `config::EXAMPLE`.

use std::path::PathBuf;

use clap::CommandFactory;

use crate::cli::Cli;
use crate::config::{self, FILE_KEYS, GuestKey};
use crate::render;

fn staged(path: &str) -> Vec<u8> {
    let file = PathBuf::from(env!("VHOST_RNG_ASSETS"))
        .join("root")
        .join(path);
    std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// A page as the package installs it: gzipped, and the same as the plain
/// copy build.rs leaves in vhost-rng-assets/man/.
fn installed_page(section: &str, name: &str) -> Vec<u8> {
    use std::io::Read;
    let gz = staged(&format!("usr/share/man/man{section}/{name}.gz"));
    let mut page = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut page)
        .unwrap();
    let plain = PathBuf::from(env!("VHOST_RNG_ASSETS"))
        .join("man")
        .join(name);
    assert!(
        std::fs::read(&plain).unwrap() == page,
        "{}",
        plain.display()
    );
    page
}

fn built() -> clap::Command {
    let mut cmd = Cli::command();
    cmd.build();
    cmd
}

#[test]
fn man_pages_are_the_daemons_own() {
    let pages = render::man_pages(&built(), crate::LONG_VERSION).unwrap();
    let names: Vec<&str> = pages.iter().map(|(name, _)| name.as_str()).collect();
    for expected in [
        "vhost-rng.8",
        "vhost-rng-serve.8",
        "vhost-rng-check.8",
        "vhost-rng-guest.8",
        "vhost-rng-guest-add.8",
        "vhost-rng-status.8",
        "vhost-rng-agent.8",
        "vhost-rng-psk-new.8",
        "vhost-rng-upgrade.8",
        "vhost-rng-seed.8",
        "vhost-rng-libvirt-hook.8",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(!names.iter().any(|n| n.contains("upgrade-state-version")));
    let dir = PathBuf::from(env!("VHOST_RNG_ASSETS")).join("root/usr/share/man/man8");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_suffix(".gz").unwrap().to_owned()
        })
        .collect();
    on_disk.sort();
    let mut rendered: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    rendered.sort();
    assert_eq!(on_disk, rendered);
    for (name, page) in &pages {
        assert!(
            installed_page("8", name) == *page,
            "{name}: build.rs rendered another page than Cli::command() gives"
        );
    }
    let serve = String::from_utf8(installed_page("8", "vhost-rng-serve.8")).unwrap();
    assert!(serve.contains("check\\-config"), "{serve}");
    assert!(serve.contains(env!("VHOST_RNG_COMMIT")));
}

#[test]
fn completions_are_the_daemons_own() {
    for (path, script) in render::completions(&built()) {
        assert!(staged(path) == script, "{path}");
        assert!(String::from_utf8_lossy(&script).contains("check-config"));
    }
}

#[test]
fn the_example_is_found_in_the_source() {
    assert_eq!(
        render::example_in(include_str!("config/mod.rs")),
        Some(config::EXAMPLE)
    );
}

#[test]
fn config_page_names_every_key() {
    let page = String::from_utf8(installed_page("5", "vhost-rng.toml.5")).unwrap();
    assert_eq!(page, render::config_page(config::EXAMPLE, &page_version()));
    let plain = page.replace("\\-", "-");
    for key in FILE_KEYS {
        assert!(
            plain.contains(&format!("\\fB{key}\\fR")) || key == "guest" || key == "defaults",
            "{key}"
        );
    }
    assert!(plain.contains("[defaults]") && plain.contains("[[guest]]"));
    for key in GuestKey::ALL {
        assert!(plain.contains(key.as_str()), "{}", key.as_str());
    }
}

fn page_version() -> String {
    crate::LONG_VERSION.to_owned()
}

#[test]
fn default_config_serves_nothing_and_is_accepted() {
    let text = String::from_utf8(staged("etc/vhost-rng/config.toml")).unwrap();
    assert_eq!(text, render::default_config(config::EXAMPLE));
    let file = config::parse(&text, std::path::Path::new("config.toml")).unwrap();
    assert!(file.guests.is_empty());
    assert!(file.guests_declared);
    // Every setting is commented out: nothing but the no-guests line is set.
    let mut expected = config::parse("guest = []\n", std::path::Path::new("config.toml")).unwrap();
    expected.origin = file.origin.clone();
    assert_eq!(file, expected);
}
