// SPDX-License-Identifier: Apache-2.0
//! `vhost-rng-agent`: runs in a guest, fetches entropy from the host's
//! vhost-rng daemon and adds it to the guest kernel's pool. The same as
//! `vhost-rng agent` on the host's binary, without the daemon linked in.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

use clap::Parser;

/// Fetch entropy from the host's vhost-rng daemon (over vsock, hybrid
/// vsock or encrypted TCP) and add it to this guest's kernel pool.
#[derive(Debug, Parser)]
#[command(name = "vhost-rng-agent", version)]
struct Cli {
    #[command(flatten)]
    agent: vhost_rng_agent::AgentArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    vhost_rng_agent::run_command(&cli.agent)
}
