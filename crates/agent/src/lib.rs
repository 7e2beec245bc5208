// SPDX-License-Identifier: Apache-2.0
//! `vhost-rng agent`: the in-guest side of the entropy protocol, for guests
//! that cannot have a vhost-user virtio-rng device (Xen guests, VMMs
//! without vhost-user).
//!
//! Each round the agent asks the host daemon for a few bytes over vsock (a
//! Unix socket, or TCP encrypted with the guest's pre-shared key, see
//! [`vhost_rng_protocol::noise`]), mixes them into the guest kernel's pool with
//! RNDADDENTROPY, crediting them conservatively, and has the kernel CRNG
//! reseed at once with RNDRESEEDCRNG. Then it sleeps and does it again,
//! reconnecting with exponential backoff whenever the host cannot be
//! reached. See docs/protocol.md.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod endpoint;
mod kernel;

use std::fmt;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use log::{Level, error, info};

use vhost_rng_protocol::log_limit::RateLimitedLog;
use vhost_rng_protocol::log_limited;
use vhost_rng_protocol::noise::{self, HandshakeError, MAX_IDENTITY, Psk, PskError};
use vhost_rng_protocol::wire::{self, IDLE_TIMEOUT, MAX_REQUEST, ProtocolError, Status};
use zeroize::Zeroizing;

pub use endpoint::{Connection, Endpoint, EndpointError, HOST_CID, connect_tcp};
pub use kernel::{DEV_RANDOM, DevRandom, KernelEntropy, RNDADDENTROPY, RNDRESEEDCRNG};
pub use vhost_rng_protocol::vsock::VsockStream;

/// Bytes asked for each round: twice the 32-byte seed of the kernel CRNG,
/// so that even a conservative credit fully seeds it.
pub const DEFAULT_BYTES: u32 = 64;
/// Bits of entropy credited per byte received unless told otherwise: half
/// of what the bytes could carry, because the guest cannot check them.
pub const DEFAULT_CREDIT_BITS_PER_BYTE: u32 = 4;
/// Seconds between rounds unless told otherwise.
pub const DEFAULT_INTERVAL_SECS: u64 = 60;
/// Each read from and write to the daemon gives up after this long.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The first wait after a failed round; it doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between rounds after failures: the backoff stops
/// doubling here.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The first word of the line `--once` prints on stdout for scripts and tests.
pub const REPORT_PREFIX: &str = "VRNG-AGENT";

/// The `agent` subcommand's options.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The host daemon: vsock:CID:PORT (CID 2 is the host; the daemon's
    /// default port is 5564), unix:PATH, or tcp:HOST:PORT for a guest
    /// without vsock (HOST a name, an IPv4 address or [IPv6]; encrypted,
    /// and needs --psk-file and --name).
    #[allow(rustdoc::broken_intra_doc_links)] // the brackets are clap help text, not links
    #[arg(long, value_name = "ENDPOINT")]
    pub connect: Endpoint,

    /// For tcp: only. The file holding this guest's pre-shared key: 64 hex
    /// digits, the same key the host has for the guest, readable by its
    /// owner only (chmod 600).
    #[arg(long, value_name = "PATH")]
    pub psk_file: Option<PathBuf>,

    /// For tcp: only. This guest's name on the host, which tells the host
    /// whose key to check.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Bytes to ask for each round (1 to 65536).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BYTES,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_REQUEST)))]
    pub bytes: u32,

    /// Seconds to wait between rounds.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_INTERVAL_SECS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub interval: u64,

    /// Bits of entropy to credit the kernel for each byte received (0 to 8).
    #[arg(long, value_name = "B", default_value_t = DEFAULT_CREDIT_BITS_PER_BYTE,
          value_parser = clap::value_parser!(u32).range(0..=8))]
    pub credit_bits_per_byte: u32,

    /// Do one round, print a VRNG-AGENT line on stdout and exit: 0 on
    /// success, 1 on failure.
    #[arg(long)]
    pub once: bool,
}

/// What the agent does, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// The host daemon's address (`--connect`).
    pub endpoint: Endpoint,
    /// Bytes to ask for each round, 1..=[`MAX_REQUEST`].
    pub bytes: u32,
    /// Time between rounds (`--interval`, at least a second).
    pub interval: Duration,
    /// 0..=8; more is treated as 8.
    pub credit_bits_per_byte: u32,
    /// Do one round and exit instead of running until a fatal error
    /// (`--once`).
    pub once: bool,
    /// Who this guest is to the host, for a `tcp:` endpoint (and only then).
    pub credentials: Option<Credentials>,
}

/// A guest's name on the host and the key that proves it, for the
/// encrypted TCP transport. `Debug` does not show the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// This guest's name on the host (`--name`), a valid hello identity.
    pub name: String,
    /// The guest's pre-shared key, as loaded from `path`.
    pub psk: Psk,
    /// The `--psk-file` the key came from, read again after the host
    /// refuses the key, so that a rotated key is picked up without a restart.
    pub path: PathBuf,
}

/// Checks the options against each other and loads the pre-shared key, so
/// that a mistake in them stops the agent at start-up rather than failing
/// every round.
impl TryFrom<&AgentArgs> for AgentConfig {
    type Error = AgentError;

    fn try_from(args: &AgentArgs) -> Result<Self, AgentError> {
        let credentials = match (&args.connect, &args.psk_file, &args.name) {
            (Endpoint::Tcp { .. }, Some(psk_file), Some(name)) => {
                if !noise::is_valid_identity(name) {
                    return Err(AgentError::InvalidConfig(format!(
                        "--name '{name}' is not a guest name: use 1 to {MAX_IDENTITY} letters, digits, '.', '_' or '-', as the host's configuration names the guest"
                    )));
                }
                Some(Credentials {
                    name: name.clone(),
                    psk: Psk::load(psk_file).map_err(AgentError::Key)?,
                    path: psk_file.clone(),
                })
            }
            (Endpoint::Tcp { .. }, psk_file, name) => {
                let missing = match (psk_file, name) {
                    (None, None) => "--psk-file PATH and --name NAME",
                    (None, _) => "--psk-file PATH",
                    _ => "--name NAME",
                };
                return Err(AgentError::InvalidConfig(format!(
                    "{} is encrypted and needs {missing}: --psk-file is the file with this guest's pre-shared key, --name the guest's name on the host",
                    args.connect
                )));
            }
            (_, None, None) => None,
            (endpoint, _, _) => {
                return Err(AgentError::InvalidConfig(format!(
                    "--psk-file and --name are for tcp:HOST:PORT endpoints only; {endpoint} does not use them (the host knows the guest by its vsock CID or socket)"
                )));
            }
        };
        Ok(AgentConfig {
            endpoint: args.connect.clone(),
            bytes: args.bytes,
            interval: Duration::from_secs(args.interval),
            credit_bits_per_byte: args.credit_bits_per_byte,
            once: args.once,
            credentials,
        })
    }
}

/// What one round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentReport {
    /// Bytes received and added to the kernel pool (the host may send fewer
    /// than asked for).
    pub bytes: usize,
    /// Bits of entropy credited for them.
    pub credited_bits: u32,
    /// Whether the kernel CRNG reseeded (not when it is still unseeded, or
    /// too old to be asked).
    pub reseeded: bool,
}

impl AgentReport {
    /// The `--once` line: `VRNG-AGENT ok bytes=N credited_bits=M`.
    pub fn report_line(&self) -> String {
        format!(
            "{REPORT_PREFIX} ok bytes={} credited_bits={}",
            self.bytes, self.credited_bits
        )
    }
}

/// Why the agent could not add entropy, or could not get it from the host.
/// [`AgentError::is_fatal`] tells which ones stop it.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// An ioctl on /dev/random failed with EPERM: the agent lacks
    /// CAP_SYS_ADMIN.
    #[error("the agent needs CAP_SYS_ADMIN (run as root) to add entropy to the kernel")]
    NotPermitted,
    /// /dev/random could not be opened for writing.
    #[error("cannot open {DEV_RANDOM} for writing: {0}")]
    OpenDevRandom(#[source] io::Error),
    /// An ioctl on /dev/random failed for a reason other than the ones with
    /// their own variant.
    #[error("the kernel refused to {action}: {error}")]
    Kernel {
        /// What was asked of the kernel ("add entropy", "reseed the CRNG").
        action: &'static str,
        /// The errno, or what was wrong with the request.
        #[source]
        error: io::Error,
    },
    /// RNDRESEEDCRNG failed with ENODATA: Linux 5.18+ does not reseed a CRNG
    /// that was never seeded (it seeds itself once enough entropy is credited).
    #[error("the kernel CRNG is not seeded yet, so it cannot be reseeded")]
    CrngNotReady,
    /// RNDRESEEDCRNG is unknown to this kernel (before Linux 4.17).
    #[error(
        "this kernel cannot be asked to reseed its CRNG (RNDRESEEDCRNG needs Linux 4.17 or later)"
    )]
    ReseedUnsupported,
    /// The options contradict each other or name an invalid guest; the text
    /// says what to change.
    #[error("invalid agent configuration: {0}")]
    InvalidConfig(String),
    /// The `--psk-file` could not be read or holds no key.
    #[error("{0}")]
    Key(#[source] PskError),
    /// Connecting to the daemon failed.
    #[error("cannot connect to {endpoint}: {error}{hint}")]
    Connect {
        /// The endpoint the agent tried.
        endpoint: Endpoint,
        /// The error from connecting.
        #[source]
        error: io::Error,
        /// A hint for the operator about the likely cause, or "".
        hint: &'static str,
    },
    /// The daemon closed the connection during the handshake: it does not
    /// accept this name with this key ([`HandshakeError::Refused`]).
    #[error(
        "{endpoint} refused this guest's credentials: the key in --psk-file is not the one the host has for --name '{name}', or the host knows no guest of that name"
    )]
    CredentialsRefused {
        /// The `tcp:` endpoint that refused.
        endpoint: Endpoint,
        /// The `--name` the agent sent.
        name: String,
    },
    /// The encrypted handshake failed for another reason than a refusal.
    #[error("encrypted handshake with {endpoint} failed: {error}")]
    Handshake {
        /// The `tcp:` endpoint of the handshake.
        endpoint: Endpoint,
        /// What went wrong.
        #[source]
        error: HandshakeError,
    },
    /// The daemon's answer was an error status or not the protocol, or the
    /// connection failed mid-exchange.
    #[error("asking {endpoint} for entropy: {error}")]
    Protocol {
        /// The endpoint asked.
        endpoint: Endpoint,
        /// What went wrong.
        #[source]
        error: ProtocolError,
    },
}

impl AgentError {
    /// True for errors that waiting will not cure: they are about this
    /// guest's kernel, privileges or configuration, not the host or the
    /// connection. A refused key is not among them: the fix may well be on
    /// the host, and the agent should pick it up without a restart.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            AgentError::NotPermitted
                | AgentError::OpenDevRandom(_)
                | AgentError::Kernel { .. }
                | AgentError::InvalidConfig(_)
                | AgentError::Key(_)
                | AgentError::Handshake {
                    error: HandshakeError::BadIdentity,
                    ..
                }
        )
    }

    /// A short word for the `--once` error line, stable for scripts.
    pub fn reason(&self) -> &'static str {
        match self {
            AgentError::NotPermitted => "not-permitted",
            AgentError::OpenDevRandom(_) => "open-dev-random",
            AgentError::Kernel { .. } => "kernel",
            AgentError::CrngNotReady => "crng-not-ready",
            AgentError::ReseedUnsupported => "reseed-unsupported",
            AgentError::InvalidConfig(_) => "config",
            AgentError::Key(_) => "key",
            AgentError::Connect { .. } => "connect",
            AgentError::CredentialsRefused { .. } => "credentials-refused",
            AgentError::Handshake {
                error: HandshakeError::Io(e),
                ..
            } if is_timeout(e) => "timeout",
            // Not "credentials-refused": a busy host says nothing about
            // the key.
            AgentError::Handshake {
                error: HandshakeError::Dropped,
                ..
            } => "connection-closed",
            AgentError::Handshake { .. } => "handshake",
            AgentError::Protocol { error, .. } => match error {
                ProtocolError::Server(Status::BadRequest) => "server-bad-request",
                ProtocolError::Server(Status::Unavailable) => "server-unavailable",
                ProtocolError::Server(Status::Refused) => "server-refused",
                ProtocolError::Server(Status::RateLimited) => "server-rate-limited",
                ProtocolError::Server(Status::ShuttingDown) => "server-shutting-down",
                ProtocolError::TimedOut => "timeout",
                error if closed_before_answer(error) => "connection-closed",
                ProtocolError::Truncated { .. } => "connection-closed",
                ProtocolError::Io(_) => "io",
                _ => "protocol",
            },
        }
    }

    /// The `--once` line: `VRNG-AGENT error reason=WORD`.
    pub fn report_line(&self) -> String {
        format!("{REPORT_PREFIX} error reason={}", self.reason())
    }
}

/// Bits to credit for `bytes` bytes at `bits_per_byte` each; a byte never
/// carries more than 8, and the kernel takes the count as a C int.
pub fn credit_bits(bytes: usize, bits_per_byte: u32) -> u32 {
    let bits = (bytes as u64).saturating_mul(u64::from(bits_per_byte.min(8)));
    let kernel_max = libc::c_int::MAX.unsigned_abs();
    u32::try_from(bits).map_or(kernel_max, |bits| bits.min(kernel_max))
}

/// One round over an open connection: asks for `config.bytes`, adds what
/// arrives to the kernel pool with its credit, and reseeds the CRNG.
pub fn fetch_and_inject(
    stream: &mut (impl Read + Write),
    config: &AgentConfig,
    kernel: &mut dyn KernelEntropy,
) -> Result<AgentReport, AgentError> {
    // Checked here rather than left to the protocol layer, whose error
    // would look like the host's fault and be retried forever.
    if config.bytes == 0 || config.bytes > MAX_REQUEST {
        return Err(AgentError::InvalidConfig(format!(
            "bytes per round must be 1 to {MAX_REQUEST}, not {}",
            config.bytes
        )));
    }
    // Wiped when dropped, on every way out of here: once the bytes are in
    // the kernel pool (or lost), no copy of them stays in the agent.
    let mut entropy = Zeroizing::new(Vec::with_capacity(config.bytes as usize));
    wire::fetch(stream, config.bytes, &mut entropy).map_err(|error| AgentError::Protocol {
        endpoint: config.endpoint.clone(),
        error,
    })?;
    let credited_bits = credit_bits(entropy.len(), config.credit_bits_per_byte);
    kernel.add_entropy(&entropy, credited_bits)?;
    let reseeded = match kernel.reseed() {
        Ok(()) => true,
        // Neither is a failure of the round: the bytes are in the pool and
        // the kernel reseeds from it on its own schedule.
        Err(AgentError::CrngNotReady | AgentError::ReseedUnsupported) => false,
        Err(e) => return Err(e),
    };
    Ok(AgentReport {
        bytes: entropy.len(),
        credited_bits,
        reseeded,
    })
}

/// One round on a connection of its own: connect, fetch, inject.
pub fn run(
    config: &AgentConfig,
    kernel: &mut dyn KernelEntropy,
) -> Result<AgentReport, AgentError> {
    let mut connection = connect(&config.endpoint, config.credentials.as_ref())?;
    let report = fetch_and_inject(&mut connection, config, kernel)?;
    log_round(&report, &config.endpoint);
    Ok(report)
}

/// Runs rounds every `config.interval` until an error that waiting cannot
/// cure ([`AgentError::is_fatal`]), which it returns. Failures to reach or
/// get an answer from the host are logged at a limited rate and retried
/// after 1 s, 2 s, 4 s ... up to 60 s. After the host refuses the key, the
/// key file is read again before the next attempt (see `Session`).
pub fn run_forever(config: &AgentConfig, kernel: &mut dyn KernelEntropy) -> AgentError {
    let mut session = Session::new(config);
    let mut backoff = Backoff::new();
    let failures = RateLimitedLog::per_minute(4);
    loop {
        let delay = match session.round(kernel) {
            Ok(report) => {
                log_round(&report, &config.endpoint);
                backoff.reset();
                config.interval
            }
            Err(e) if e.is_fatal() => return e,
            Err(e) => {
                let delay = backoff.next_delay();
                log_limited!(
                    failures,
                    Level::Warn,
                    "{e}; trying again in {} s",
                    delay.as_secs()
                );
                delay
            }
        };
        thread::sleep(delay);
    }
}

/// The `agent` subcommand: opens /dev/random, checks the agent may add
/// entropy, then does one round (`--once`) or runs until a fatal error.
/// Exit status 0 only after a successful `--once` round.
pub fn run_command(args: &AgentArgs) -> ExitCode {
    let config = match AgentConfig::try_from(args) {
        Ok(config) => config,
        Err(e) => {
            error!("{e}");
            if args.once {
                println!("{}", e.report_line());
            }
            return ExitCode::FAILURE;
        }
    };
    let result = DevRandom::open().and_then(|mut kernel| {
        kernel.check_permission()?;
        if config.once {
            run(&config, &mut kernel)
        } else {
            info!("seeding the kernel with {config}");
            Err(run_forever(&config, &mut kernel))
        }
    });
    match result {
        Ok(report) => {
            println!("{}", report.report_line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("{e}");
            if config.once {
                println!("{}", e.report_line());
            }
            ExitCode::FAILURE
        }
    }
}

/// Connects to `endpoint`, over TCP proving who this guest is with
/// `credentials`.
fn connect(
    endpoint: &Endpoint,
    credentials: Option<&Credentials>,
) -> Result<Connection, AgentError> {
    let connect_error = |error: io::Error| AgentError::Connect {
        hint: endpoint.connect_hint(&error),
        endpoint: endpoint.clone(),
        error,
    };
    let Endpoint::Tcp { host, port } = endpoint else {
        return endpoint.connect(IO_TIMEOUT).map_err(connect_error);
    };
    // AgentConfig::try_from makes sure a tcp: endpoint has credentials;
    // a config built by hand might not.
    let Some(credentials) = credentials else {
        return Err(AgentError::InvalidConfig(format!(
            "{endpoint} needs the guest's name and pre-shared key"
        )));
    };
    let stream = match connect_tcp(host, *port, IO_TIMEOUT) {
        Ok(stream) => stream,
        // Connected, then reset (a port nobody listens on refuses the
        // connection instead): the daemon closing a connection over its
        // handshake limits as soon as it accepts it, quicker than
        // connect_tcp could see the connection up.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
            return Err(AgentError::Handshake {
                endpoint: endpoint.clone(),
                error: HandshakeError::Dropped,
            });
        }
        Err(e) => return Err(connect_error(e)),
    };
    // The socket's timeouts bound each step of the handshake too.
    match noise::connect_handshake(stream, &credentials.name, &credentials.psk) {
        Ok(stream) => Ok(Connection::Tcp(Box::new(stream))),
        Err(HandshakeError::Refused) => Err(AgentError::CredentialsRefused {
            endpoint: endpoint.clone(),
            name: credentials.name.clone(),
        }),
        Err(error) => Err(AgentError::Handshake {
            endpoint: endpoint.clone(),
            error,
        }),
    }
}

/// A socket read or write timeout (EAGAIN on Linux) or a timed-out connect.
fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn log_round(report: &AgentReport, endpoint: &Endpoint) {
    let reseed = if report.reseeded {
        "kernel CRNG reseeded"
    } else {
        "kernel CRNG not reseeded (it reseeds on its own schedule)"
    };
    info!(
        "added {} bytes (credited {} bits) from {endpoint}; {reseed}",
        report.bytes, report.credited_bits
    );
}

/// What lasts from one round to the next: the connection, and the key.
///
/// The connection is kept only when rounds come more often than the
/// server's idle timeout; otherwise the server would have closed it by the
/// next round anyway.
///
/// The key is the one loaded at start-up until the host refuses it. Then
/// the key file is read again before the next attempt, since the operator
/// may have rotated the key (written a new one into the file); a normal
/// round uses the key in memory. A key file that cannot be read then (or is
/// too open, or holds no key) is logged and the last good key kept: the
/// operator may be in the middle of the rotation.
struct Session<'a> {
    config: &'a AgentConfig,
    connection: Option<Connection>,
    /// The config's credentials, with the newest good key from the key file.
    credentials: Option<Credentials>,
    /// The host refused the key: read the key file before the next attempt.
    reread_key: bool,
    key_failures: RateLimitedLog,
}

impl<'a> Session<'a> {
    fn new(config: &'a AgentConfig) -> Self {
        Session {
            config,
            connection: None,
            credentials: config.credentials.clone(),
            reread_key: false,
            key_failures: RateLimitedLog::per_minute(4),
        }
    }

    fn round(&mut self, kernel: &mut dyn KernelEntropy) -> Result<AgentReport, AgentError> {
        if std::mem::take(&mut self.reread_key) {
            self.reread_key();
        }
        if let Some(mut connection) = self.connection.take() {
            match fetch_and_inject(&mut connection, self.config, kernel) {
                Ok(report) => {
                    self.keep(connection);
                    return Ok(report);
                }
                // The server closed the kept connection (restart, timeout):
                // not a failure, just open a new one.
                Err(e) if went_stale(&e) => {}
                Err(e) => return Err(e),
            }
        }
        let mut connection = match connect(&self.config.endpoint, self.credentials.as_ref()) {
            Ok(connection) => connection,
            Err(e) => {
                self.reread_key = matches!(e, AgentError::CredentialsRefused { .. });
                return Err(e);
            }
        };
        let report = fetch_and_inject(&mut connection, self.config, kernel)?;
        self.keep(connection);
        Ok(report)
    }

    /// Reads the key file again, keeping the key in memory if it fails.
    fn reread_key(&mut self) {
        let Some(credentials) = &mut self.credentials else {
            return;
        };
        match Psk::load(&credentials.path) {
            // Still the refused key: the host has yet to catch up.
            Ok(psk) if psk == credentials.psk => {}
            Ok(psk) => {
                info!(
                    "key file {} holds a new key; using it",
                    credentials.path.display()
                );
                credentials.psk = psk;
            }
            Err(e) => {
                log_limited!(
                    self.key_failures,
                    Level::Warn,
                    "{e}; keeping the key read before"
                );
            }
        }
    }

    fn keep(&mut self, connection: Connection) {
        if self.config.interval < IDLE_TIMEOUT {
            self.connection = Some(connection);
        }
    }
}

/// True when a kept connection turned out to be closed before the request.
fn went_stale(error: &AgentError) -> bool {
    matches!(error, AgentError::Protocol { error, .. } if closed_before_answer(error))
}

/// True when the daemon had hung up before answering: the request could
/// not be sent, or the answer never began.
fn closed_before_answer(error: &ProtocolError) -> bool {
    match error {
        ProtocolError::Closed { .. } => true,
        ProtocolError::Io(e) => matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ),
        _ => false,
    }
}

/// Waits between failed rounds: 1 s, doubling to 60 s.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: FIRST_BACKOFF,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(MAX_BACKOFF);
        delay
    }

    fn reset(&mut self) {
        self.next = FIRST_BACKOFF;
    }
}

impl fmt::Display for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes from {}", self.bytes, self.endpoint)?;
        if let Some(credentials) = &self.credentials {
            write!(f, " as '{}' (encrypted)", credentials.name)?;
        }
        write!(
            f,
            " every {} s, crediting {} bits per byte",
            self.interval.as_secs(),
            self.credit_bits_per_byte.min(8)
        )
    }
}

#[cfg(test)]
mod tests;
