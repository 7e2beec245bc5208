// SPDX-License-Identifier: Apache-2.0
//! The `vhost-rng` binary: parses the command line and runs the daemon or
//! one of the client commands.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use log::error;
use vhost_rng::cli::{Cli, Command, ControlArgs, GuestCommand, PskCommand};
use vhost_rng::service::check;
use vhost_rng::service::control::{self, Request, Response};
use vhost_rng::service::daemon::{self, ServeConfig, Settings};
use vhost_rng::service::status;

fn main() -> ExitCode {
    // QEMU's backend program conventions: print and exit, whatever else
    // the command line says.
    if std::env::args_os()
        .skip(1)
        .any(|arg| arg == "--print-capabilities")
    {
        println!("{}", vhost_rng::cli::CAPABILITIES);
        return ExitCode::SUCCESS;
    }
    let command = match Cli::parse().into_command() {
        Ok(command) => command,
        Err(e) => e.exit(),
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    match command {
        Command::Serve(args) => {
            let handed = vhost_rng::service::supervisor::is_worker()
                || vhost_rng::service::supervisor::is_guest_process()
                || std::env::var_os("LISTEN_FDS").is_some();
            if let Err(message) = args.validate(handed) {
                Cli::command()
                    .error(clap::error::ErrorKind::ArgumentConflict, message)
                    .exit();
            }
            if args.check_config {
                let config = ServeConfig {
                    guests: args.command_line_guests(),
                    config_file: args.config.clone(),
                    settings: Settings::from(&*args),
                };
                return match daemon::check_config(&config) {
                    Ok(summary) => {
                        let what = args.config.as_deref().map_or_else(
                            || "the command line".to_owned(),
                            |path| path.display().to_string(),
                        );
                        println!("{what}: configuration OK: {summary}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("vhost-rng: configuration refused: {e}");
                        ExitCode::FAILURE
                    }
                };
            }
            if vhost_rng::service::supervisor::is_guest_process() {
                let config = ServeConfig {
                    guests: Vec::new(),
                    config_file: args.config.clone(),
                    settings: Settings::from(&*args),
                };
                // Every guest of the command line was parsed: a guest
                // process keeps none of them (it serves the one it is
                // handed), and 512 of them held a third of its memory.
                drop(args);
                return match daemon::run_guest_process(config) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        error!("{e}");
                        ExitCode::FAILURE
                    }
                };
            }
            if !vhost_rng::service::supervisor::is_worker() {
                if let Err(e) =
                    vhost_rng::service::sandbox::enter_top(args.seccomp, args.config.as_deref())
                {
                    error!("{e}");
                    return ExitCode::FAILURE;
                }
                return vhost_rng::service::supervisor::run(&args.fds);
            }
            let config = ServeConfig {
                guests: args.command_line_guests(),
                config_file: args.config.clone(),
                settings: Settings::from(&*args),
            };
            match daemon::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check(args) => check::run(
            &args.entropy.sources_or_defaults(),
            args.bytes,
            std::time::Duration::from_secs(args.timeout),
        ),
        Command::Guest(GuestCommand::Add { spec, control }) => ask(
            &control,
            Request::GuestAdd {
                spec: spec.to_string(),
            },
            false,
        ),
        Command::Guest(GuestCommand::Remove { name, control }) => {
            ask(&control, Request::GuestRemove { name }, false)
        }
        Command::Guest(GuestCommand::List { json, control }) => {
            ask(&control, Request::GuestList, json)
        }
        Command::Status(args) => ask(&args.control, Request::Status, args.json),
        Command::Agent(args) => vhost_rng_agent::run_command(&args),
        Command::Seed(args) => vhost_rng::service::seed::run(
            &args.control.control,
            &args.entropy.sources_or_defaults(),
            args.bytes,
            args.format,
            std::time::Duration::from_secs(args.timeout),
        ),
        Command::Upgrade(args) => upgrade(&args),
        Command::LibvirtHook(args) => {
            vhost_rng::service::libvirt_hook::run(&args.control.control, &args.operation)
        }
        Command::UpgradeStateVersion => {
            println!("{}", vhost_rng::service::upgrade::UPGRADE_STATE_VERSION);
            ExitCode::SUCCESS
        }
        Command::Psk(PskCommand::New { path }) => {
            match vhost_rng_protocol::noise::write_new_psk(&path) {
                Ok(_) => {
                    println!("wrote a new pre-shared key to {}", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vhost-rng: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Asks the daemon to upgrade, then follows its status until the new
/// version has taken over (its upgrade count went up) or the daemon says
/// why it did not.
fn upgrade(args: &vhost_rng::cli::UpgradeArgs) -> ExitCode {
    let path = &args.control.control;
    let status = |what: &str| match control::request(path, &Request::Status) {
        Ok(Response::Status { status }) => Ok(*status),
        Ok(other) => Err(format!("{what}: unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    };
    let before = match status("before the upgrade") {
        Ok(before) => before,
        Err(e) => {
            eprintln!("vhost-rng: {e}");
            return ExitCode::FAILURE;
        }
    };
    match control::request(path, &Request::Upgrade) {
        Ok(Response::Ok) => {}
        Ok(Response::Error { message }) => {
            eprintln!("vhost-rng: upgrade refused: {message}");
            return ExitCode::FAILURE;
        }
        Ok(other) => {
            eprintln!("vhost-rng: unexpected answer {other:?}");
            return ExitCode::FAILURE;
        }
        Err(control::ControlError::Refused(message)) => {
            eprintln!("vhost-rng: upgrade refused: {message}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("vhost-rng: {e}");
            return ExitCode::FAILURE;
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.timeout);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        // Between the old process going and the new one listening, the
        // control socket is briefly absent.
        let Ok(now) = status("after the upgrade") else {
            continue;
        };
        if now.upgrades > before.upgrades {
            println!(
                "upgraded: vhost-rng {} -> {} ({} guest(s) taken over)",
                before.version,
                now.version,
                now.guests.len()
            );
            return ExitCode::SUCCESS;
        }
        if now.upgrade_failures > before.upgrade_failures {
            eprintln!(
                "vhost-rng: upgrade failed, the daemon goes on as it was: {}",
                now.last_upgrade_error.unwrap_or_default()
            );
            return ExitCode::FAILURE;
        }
    }
    eprintln!(
        "vhost-rng: the daemon did not report the upgrade within {}s",
        args.timeout
    );
    ExitCode::FAILURE
}

/// Sends one request to the daemon and prints its answer.
fn ask(control: &ControlArgs, request: Request, json: bool) -> ExitCode {
    let response = match control::request(&control.control, &request) {
        Ok(response) => response,
        Err(e) => {
            eprintln!("vhost-rng: {e}");
            return ExitCode::FAILURE;
        }
    };
    let printed = match (&response, json) {
        (Response::Ok, _) => String::new(),
        (Response::Guests { guests }, true) => to_json(guests),
        (Response::Guests { guests }, false) => status::render_guests(guests),
        (Response::Status { status }, true) => to_json(status),
        (Response::Status { status }, false) => status.render(),
        (Response::Seed { data }, _) => format!("{data}\n"),
        (Response::Error { message }, _) => {
            eprintln!("vhost-rng: {message}");
            return ExitCode::FAILURE;
        }
    };
    print!("{printed}");
    ExitCode::SUCCESS
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}
