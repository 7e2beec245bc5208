// SPDX-License-Identifier: Apache-2.0
//! The fuzz targets' input handling, one module per target, each a plain
//! `run(&[u8])` that must not panic on any input. The libFuzzer binaries in
//! `fuzz_targets/` only call these, so the same inputs also replay as an
//! ordinary `cargo test` (tests/corpus.rs) on a toolchain without
//! libFuzzer's instrumentation, and `examples/seeds.rs` writes each
//! target's seed corpus from the `seeds()` its module builds.
//!
//! Every target drives the daemon's own parsing and state code, never a
//! copy of it; where a check beyond "no panic" is cheap, a target also
//! checks what the daemon answered (an answer of the announced length, a
//! form that parses back to what it came from).

#![allow(clippy::expect_used)] // set-up failures must stop the fuzzer loudly

pub mod agent_protocol;
pub mod config;
pub mod control;
pub mod daemon;
pub mod descriptor_chain;
pub mod egd;
pub mod entropy_link;
pub mod input;
pub mod metrics_http;
pub mod stream;
pub mod vhost_user;

/// A target: its name (a binary in `fuzz_targets/`, a folder in
/// `corpus/`), its input handler and its seed inputs.
pub struct Target {
    /// The target's name.
    pub name: &'static str,
    /// Runs one input.
    pub run: fn(&[u8]),
    /// Small real inputs to start fuzzing from, named.
    pub seeds: fn() -> Vec<(&'static str, Vec<u8>)>,
}

/// Every target, in the order `fuzz/run.sh` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "descriptor_chain",
        run: descriptor_chain::run,
        seeds: descriptor_chain::seeds,
    },
    Target {
        name: "vhost_user",
        run: vhost_user::run,
        seeds: vhost_user::seeds,
    },
    Target {
        name: "egd",
        run: egd::run,
        seeds: egd::seeds,
    },
    Target {
        name: "agent_protocol",
        run: agent_protocol::run,
        seeds: agent_protocol::seeds,
    },
    Target {
        name: "config",
        run: config::run,
        seeds: config::seeds,
    },
    Target {
        name: "control",
        run: control::run,
        seeds: control::seeds,
    },
    Target {
        name: "metrics_http",
        run: metrics_http::run,
        seeds: metrics_http::seeds,
    },
    Target {
        name: "entropy_link",
        run: entropy_link::run,
        seeds: entropy_link::seeds,
    },
];
