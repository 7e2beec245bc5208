// SPDX-License-Identifier: Apache-2.0
//! Target `config`: what an operator writes (src/config/). The first input
//! byte picks what the rest (as UTF-8) is:
//!
//! - 0: a configuration file, through [`config::parse`] as `--config` and a
//!   reload read it; its error must format, and its guests merge;
//! - 1: one `--guest` spec ([`GuestSpec`]'s `FromStr`), and the limits
//!   the daemon makes of it;
//! - 2: several specs, one a line, merged as the command line's guests;
//! - 3: a guest name ([`validate_name`]), a `--source` spec, and the names
//!   the `--socket PATH` shorthand derives from paths, one a line.
//!
//! Checked besides "no panic": a spec that parses prints in the canonical
//! form that parses back to the same spec (its Display's promise; a path
//! with a comma is the one exception it states).
//!
//! [`config::parse`]: vhost_rng::config::parse

use std::path::Path;

use vhost_rng::config::{self, GuestSpec, merge_guests, shorthand_names, validate_name};
use vhost_rng::entropy::source::SourceSpec;
use vhost_rng::service::registry::limits_of;

/// Where the fuzzed file says it was read from, for its error messages.
const ORIGIN: &str = "/etc/vhost-rng/fuzz.toml";

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match mode % 4 {
        0 => file(text),
        1 => {
            if let Ok(spec) = spec(text) {
                let _ = limits_of(&spec).map_err(|e| e.to_string());
            }
        }
        2 => {
            let specs: Vec<GuestSpec> = text.lines().filter_map(|line| spec(line).ok()).collect();
            if let Err(e) = merge_guests(specs, Vec::new()) {
                let _ = e.to_string();
            }
        }
        _ => {
            let _ = validate_name(text).map_err(|e| e.to_string());
            let _ = text.parse::<SourceSpec>();
            let _ = shorthand_names(text.lines().map(Path::new));
        }
    }
}

fn file(text: &str) {
    match config::parse(text, Path::new(ORIGIN)) {
        Ok(file) => {
            for spec in &file.guests {
                round_trip(spec);
            }
            if let Err(e) = merge_guests(Vec::new(), file.guests) {
                let _ = e.to_string();
            }
        }
        Err(e) => {
            let _ = (e.to_string(), e.line(), e.key());
        }
    }
}

fn spec(text: &str) -> Result<GuestSpec, ()> {
    match text.parse::<GuestSpec>() {
        Ok(spec) => {
            round_trip(&spec);
            Ok(spec)
        }
        Err(e) => {
            let _ = (e.to_string(), e.key());
            Err(())
        }
    }
}

/// A spec's canonical form parses back to the spec.
fn round_trip(spec: &GuestSpec) {
    if spec.endpoint.value().contains(',') {
        return;
    }
    let text = spec.to_string();
    match text.parse::<GuestSpec>() {
        Ok(back) => assert_eq!(&back, spec, "{text:?} parses back to another spec"),
        Err(e) => panic!("{text:?}, the canonical form of {spec:?}, does not parse: {e}"),
    }
}

/// Seed inputs: the documented example file and specs of every endpoint.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with_mode = |mode: u8, text: &str| {
        let mut bytes = vec![mode];
        bytes.extend_from_slice(text.as_bytes());
        bytes
    };
    vec![
        ("example-file", with_mode(0, config::EXAMPLE)),
        (
            "small-file",
            with_mode(
                0,
                "mode = \"raw\"\n[defaults]\nrate-bytes = 4096\n\n[[guest]]\nname = \"vm1\"\n\
                 socket = \"/run/vm1.sock\"\nweight = 3\n\n[[guest]]\nname = \"vm2\"\ncid = 7\n",
            ),
        ),
        (
            "bad-file",
            with_mode(0, "sources = [\"hwrng\"\n[[guest]]\nname = 3\n"),
        ),
        (
            "spec",
            with_mode(
                1,
                "name=vm1,socket=/run/vm1.sock,rate-bytes=16384,rate-period=500,burst=32768,weight=4",
            ),
        ),
        ("spec-egd", with_mode(1, "name=legacy,egd=/run/egd.sock")),
        (
            "specs",
            with_mode(
                2,
                "name=a,vsock-uds=/run/a.vsock\nname=b,cid=3\nname=c,tcp-psk=/etc/c.psk\n\
                 name=a,connect=/run/a.sock",
            ),
        ),
        (
            "names",
            with_mode(3, "/run/vm-1.sock\nfile=/dev/hwrng,min-entropy=6"),
        ),
    ]
}
