//! The `vhost-rng` binary: parses the command line and runs the daemon.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use log::error;
use vhost_rng::check;
use vhost_rng::cli::{Cli, Command};
use vhost_rng::daemon::{self, ServeConfig};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    match cli.command {
        Command::Serve(args) => {
            if let Err(message) = args.validate() {
                Cli::command()
                    .error(clap::error::ErrorKind::ArgumentConflict, message)
                    .exit();
            }
            let config = ServeConfig {
                access: args.socket_access(),
                pool: args.pool_config(),
                listen: args.sockets,
                connect: args.connects,
            };
            match daemon::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check(args) => check::run(&args),
    }
}
