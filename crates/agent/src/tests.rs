// SPDX-License-Identifier: Apache-2.0
//! The agent against a fake daemon and a fake kernel.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread::{self, JoinHandle};

use clap::Parser;

use super::*;
use vhost_rng_protocol::noise::{SecureStream, accept_handshake};
use vhost_rng_protocol::wire::{
    REQUEST_LEN, Request, ResponseHeader, decode_request, encode_response_header,
};

/// What the fake kernel was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KernelCall {
    Add { bytes: Vec<u8>, credit_bits: u32 },
    Reseed,
}

/// Records calls; can be told to fail them as a real kernel would.
#[derive(Default)]
struct FakeKernel {
    calls: Vec<KernelCall>,
    add_fails_with: Option<fn() -> AgentError>,
    reseed_fails_with: Option<fn() -> AgentError>,
}

impl KernelEntropy for FakeKernel {
    fn add_entropy(&mut self, bytes: &[u8], credit_bits: u32) -> Result<(), AgentError> {
        self.calls.push(KernelCall::Add {
            bytes: bytes.to_vec(),
            credit_bits,
        });
        self.add_fails_with.map_or(Ok(()), |error| Err(error()))
    }

    fn reseed(&mut self) -> Result<(), AgentError> {
        self.calls.push(KernelCall::Reseed);
        self.reseed_fails_with.map_or(Ok(()), |error| Err(error()))
    }
}

/// How the fake daemon answers one request.
#[derive(Debug, Clone)]
enum Answer {
    Data(Vec<u8>),
    Error(Status),
}

/// Answers requests on `stream` from `script`, then closes it; returns the
/// requests it saw.
fn serve(mut stream: impl Read + Write, script: Vec<Answer>) -> Vec<Request> {
    let mut seen = Vec::new();
    for answer in script {
        let mut request = [0; REQUEST_LEN];
        if stream.read_exact(&mut request).is_err() {
            break;
        }
        seen.push(decode_request(&request).expect("the agent sends valid requests"));
        let reply = match answer {
            Answer::Data(data) => {
                let length = u32::try_from(data.len()).expect("test data fits u32");
                let mut reply = encode_response_header(&ResponseHeader::ok(length)).to_vec();
                reply.extend(data);
                reply
            }
            Answer::Error(status) => {
                encode_response_header(&ResponseHeader::error(status)).to_vec()
            }
        };
        if stream.write_all(&reply).is_err() {
            break;
        }
    }
    seen
}

/// A daemon on a socket pair, serving one connection.
fn fake_daemon(script: Vec<Answer>) -> (UnixStream, JoinHandle<Vec<Request>>) {
    let (agent_end, daemon_end) = UnixStream::pair().unwrap();
    agent_end.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let daemon = thread::spawn(move || serve(daemon_end, script));
    (agent_end, daemon)
}

/// A daemon listening at `path`, serving one script per connection it accepts.
fn listening_daemon(path: &Path, scripts: Vec<Vec<Answer>>) -> JoinHandle<Vec<Vec<Request>>> {
    let listener = UnixListener::bind(path).unwrap();
    thread::spawn(move || {
        scripts
            .into_iter()
            .map(|script| serve(listener.accept().unwrap().0, script))
            .collect()
    })
}

fn config(endpoint: Endpoint) -> AgentConfig {
    AgentConfig {
        endpoint,
        bytes: DEFAULT_BYTES,
        interval: Duration::from_secs(DEFAULT_INTERVAL_SECS),
        credit_bits_per_byte: DEFAULT_CREDIT_BITS_PER_BYTE,
        once: true,
        credentials: None,
    }
}

/// The guest name the TCP tests use.
const GUEST: &str = "vm1";

/// A key made of one repeated byte.
fn psk(byte: u8) -> Psk {
    Psk::from_hex(&format!("{byte:02x}").repeat(32)).unwrap()
}

/// How the fake TCP daemon answers one connection: with the key it holds
/// for [`GUEST`], and the answers once the handshake is done.
struct TcpConnection {
    key: Psk,
    script: Vec<Answer>,
}

/// Per connection: the handshake's outcome and the requests seen.
type TcpDaemon = JoinHandle<Vec<Result<Vec<Request>, noise::HandshakeError>>>;

/// A daemon on 127.0.0.1 speaking the encrypted transport, serving one
/// connection per entry of `connections`; returns its port.
fn tcp_daemon(connections: Vec<TcpConnection>) -> (u16, TcpDaemon) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let daemon = thread::spawn(move || {
        connections
            .into_iter()
            .map(|TcpConnection { key, script }| {
                let stream = listener.accept().unwrap().0;
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                let secure: SecureStream<_> =
                    accept_handshake(stream, |name| (name == GUEST).then_some(key))?;
                assert_eq!(secure.identity(), GUEST);
                Ok(serve(secure, script))
            })
            .collect()
    });
    (port, daemon)
}

/// A TCP config holding `key` as if read from a key file that does not
/// exist, so that reading it again after a refusal keeps `key`.
fn tcp_config(port: u16, key: Psk) -> AgentConfig {
    AgentConfig {
        credentials: Some(Credentials {
            name: GUEST.to_owned(),
            psk: key,
            path: PathBuf::from("/nonexistent/vhost-rng-test/vm1.key"),
        }),
        ..config(Endpoint::Tcp {
            host: "127.0.0.1".to_owned(),
            port,
        })
    }
}

/// A key file holding `key`, with permissions `mode`.
fn key_file(dir: &Path, key: &Psk, mode: u32) -> PathBuf {
    let path = dir.join("vm1.key");
    std::fs::write(&path, format!("{}\n", key.to_hex())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn pair_config() -> AgentConfig {
    config("unix:/socket-pair".parse().unwrap())
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn credit_is_bytes_times_bits_per_byte_capped_at_8() {
    assert_eq!(credit_bits(64, 4), 256);
    assert_eq!(credit_bits(64, 8), 512);
    assert_eq!(credit_bits(64, 0), 0);
    assert_eq!(credit_bits(10, 4), 40);
    assert_eq!(credit_bits(0, 4), 0);
    assert_eq!(
        credit_bits(64, 9),
        512,
        "a byte never carries more than 8 bits"
    );
    assert_eq!(credit_bits(64, u32::MAX), 512);
    assert_eq!(credit_bits(65536, 8), 524_288);
    assert_eq!(
        credit_bits(usize::MAX, 8),
        i32::MAX as u32,
        "the kernel takes a C int"
    );
}

#[test]
fn a_round_injects_what_the_daemon_sends_then_reseeds() {
    let data = pattern(64);
    let (mut stream, daemon) = fake_daemon(vec![Answer::Data(data.clone())]);
    let mut kernel = FakeKernel::default();

    let report = fetch_and_inject(&mut stream, &pair_config(), &mut kernel).unwrap();

    assert_eq!(
        report,
        AgentReport {
            bytes: 64,
            credited_bits: 256,
            reseeded: true
        }
    );
    assert_eq!(
        kernel.calls,
        [
            KernelCall::Add {
                bytes: data,
                credit_bits: 256
            },
            KernelCall::Reseed
        ]
    );
    drop(stream);
    assert_eq!(daemon.join().unwrap(), [Request { length: 64 }]);
}

#[test]
fn a_round_asks_for_the_configured_size_and_credit() {
    let (mut stream, daemon) = fake_daemon(vec![Answer::Data(pattern(32))]);
    let mut kernel = FakeKernel::default();
    let config = AgentConfig {
        bytes: 32,
        credit_bits_per_byte: 0,
        ..pair_config()
    };
    let report = fetch_and_inject(&mut stream, &config, &mut kernel).unwrap();
    assert_eq!((report.bytes, report.credited_bits), (32, 0));
    assert!(matches!(
        kernel.calls[0],
        KernelCall::Add { credit_bits: 0, .. }
    ));
    drop(stream);
    assert_eq!(daemon.join().unwrap(), [Request { length: 32 }]);
}

#[test]
fn a_short_answer_is_injected_and_credited_as_received() {
    let data = pattern(10);
    let (mut stream, _daemon) = fake_daemon(vec![Answer::Data(data.clone())]);
    let mut kernel = FakeKernel::default();

    let report = fetch_and_inject(&mut stream, &pair_config(), &mut kernel).unwrap();

    assert_eq!((report.bytes, report.credited_bits), (10, 40));
    assert_eq!(
        kernel.calls,
        [
            KernelCall::Add {
                bytes: data,
                credit_bits: 40
            },
            KernelCall::Reseed
        ]
    );
}

#[test]
fn permission_denied_is_fatal_and_explained() {
    let (mut stream, _daemon) = fake_daemon(vec![Answer::Data(pattern(64))]);
    let mut kernel = FakeKernel {
        add_fails_with: Some(|| AgentError::NotPermitted),
        ..FakeKernel::default()
    };

    let err = fetch_and_inject(&mut stream, &pair_config(), &mut kernel).unwrap_err();

    assert!(matches!(err, AgentError::NotPermitted), "{err}");
    assert!(err.is_fatal());
    assert_eq!(
        err.to_string(),
        "the agent needs CAP_SYS_ADMIN (run as root) to add entropy to the kernel"
    );
    assert_eq!(err.report_line(), "VRNG-AGENT error reason=not-permitted");
    assert_eq!(kernel.calls.len(), 1, "no reseed after a failed add");
}

#[test]
fn run_forever_stops_at_once_on_permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rng.sock");
    let daemon = listening_daemon(&path, vec![vec![Answer::Data(pattern(64))]]);
    let mut kernel = FakeKernel {
        add_fails_with: Some(|| AgentError::NotPermitted),
        ..FakeKernel::default()
    };
    let config = config(Endpoint::Unix(path));

    let err = run_forever(&config, &mut kernel);

    assert!(matches!(err, AgentError::NotPermitted), "{err}");
    assert_eq!(daemon.join().unwrap().len(), 1);
}

#[test]
fn run_forever_retries_after_a_server_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rng.sock");
    let daemon = listening_daemon(
        &path,
        vec![
            vec![Answer::Error(Status::Unavailable)],
            vec![Answer::Data(pattern(64))],
        ],
    );
    // The second round's add fails fatally, which is the only way out.
    let mut kernel = FakeKernel {
        add_fails_with: Some(|| AgentError::NotPermitted),
        ..FakeKernel::default()
    };
    let config = config(Endpoint::Unix(path));

    let err = run_forever(&config, &mut kernel);

    assert!(matches!(err, AgentError::NotPermitted), "{err}");
    let connections = daemon.join().unwrap();
    assert_eq!(connections.len(), 2, "reconnected after the error answer");
    assert_eq!(
        kernel.calls.len(),
        1,
        "nothing injected from the error answer"
    );
}

#[test]
fn other_kernel_failures_are_fatal_but_an_unseeded_crng_is_not() {
    let kernel_error = || AgentError::Kernel {
        action: "add entropy",
        error: io::Error::from_raw_os_error(libc::EINVAL),
    };
    let (mut stream, _daemon) = fake_daemon(vec![Answer::Data(pattern(64))]);
    let mut kernel = FakeKernel {
        add_fails_with: Some(kernel_error),
        ..FakeKernel::default()
    };
    let err = fetch_and_inject(&mut stream, &pair_config(), &mut kernel).unwrap_err();
    assert!(err.is_fatal());
    assert_eq!(err.reason(), "kernel");

    for reseed_error in [(|| AgentError::CrngNotReady) as fn() -> AgentError, || {
        AgentError::ReseedUnsupported
    }] {
        let (mut stream, _daemon) = fake_daemon(vec![Answer::Data(pattern(64))]);
        let mut kernel = FakeKernel {
            reseed_fails_with: Some(reseed_error),
            ..FakeKernel::default()
        };
        let report = fetch_and_inject(&mut stream, &pair_config(), &mut kernel).unwrap();
        assert_eq!((report.bytes, report.reseeded), (64, false));
    }
}

#[test]
fn server_error_statuses_inject_nothing_and_are_retried() {
    for (status, reason) in [
        (Status::BadRequest, "server-bad-request"),
        (Status::Unavailable, "server-unavailable"),
        (Status::Refused, "server-refused"),
        (Status::RateLimited, "server-rate-limited"),
        (Status::ShuttingDown, "server-shutting-down"),
    ] {
        let (mut stream, _daemon) = fake_daemon(vec![Answer::Error(status)]);
        let mut kernel = FakeKernel::default();
        let err = fetch_and_inject(&mut stream, &pair_config(), &mut kernel).unwrap_err();
        assert!(
            matches!(
                &err,
                AgentError::Protocol { error: ProtocolError::Server(s), .. } if *s == status
            ),
            "{err}"
        );
        assert!(!err.is_fatal(), "{status:?}");
        assert_eq!(err.reason(), reason);
        assert!(kernel.calls.is_empty(), "{status:?}");
        assert!(err.to_string().contains("unix:/socket-pair"), "{err}");
    }
}

#[test]
fn a_bad_request_size_is_a_fatal_configuration_error() {
    for bytes in [0, MAX_REQUEST + 1] {
        let (mut stream, _daemon) = fake_daemon(vec![]);
        let config = AgentConfig {
            bytes,
            ..pair_config()
        };
        let err = fetch_and_inject(&mut stream, &config, &mut FakeKernel::default()).unwrap_err();
        assert!(err.is_fatal(), "{err}");
        assert_eq!(err.reason(), "config");
    }
}

#[test]
fn a_daemon_that_hangs_up_is_a_retryable_error() {
    let (mut stream, _daemon) = fake_daemon(vec![]);
    let mut kernel = FakeKernel::default();
    let err = fetch_and_inject(&mut stream, &pair_config(), &mut kernel).unwrap_err();
    assert_eq!(err.reason(), "connection-closed", "{err}");
    assert!(!err.is_fatal());
    assert!(kernel.calls.is_empty());
}

#[test]
fn run_does_one_round_on_a_fresh_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rng.sock");
    let daemon = listening_daemon(&path, vec![vec![Answer::Data(pattern(64))]]);
    let mut kernel = FakeKernel::default();

    let report = run(&config(Endpoint::Unix(path)), &mut kernel).unwrap();

    assert_eq!(
        report.report_line(),
        "VRNG-AGENT ok bytes=64 credited_bits=256"
    );
    assert_eq!(daemon.join().unwrap(), [vec![Request { length: 64 }]]);
}

#[test]
fn run_reports_a_missing_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::Unix(dir.path().join("nobody.sock"));
    let err = run(&config(endpoint), &mut FakeKernel::default()).unwrap_err();
    assert_eq!(err.report_line(), "VRNG-AGENT error reason=connect");
    assert!(!err.is_fatal());
    let message = err.to_string();
    assert!(message.starts_with("cannot connect to unix:"), "{message}");
    assert!(message.ends_with("(no socket at this path)"), "{message}");
}

#[test]
fn frequent_rounds_share_a_connection_and_reconnect_when_it_drops() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rng.sock");
    // The first connection serves two rounds and closes; the third round
    // finds it closed and opens another without reporting a failure.
    let daemon = listening_daemon(
        &path,
        vec![
            vec![Answer::Data(pattern(64)), Answer::Data(pattern(64))],
            vec![Answer::Data(pattern(64))],
        ],
    );
    let config = AgentConfig {
        interval: Duration::from_secs(1),
        ..config(Endpoint::Unix(path))
    };
    let mut session = Session::new(&config);
    let mut kernel = FakeKernel::default();
    for round in 0..3 {
        let report = session.round(&mut kernel);
        assert!(report.is_ok(), "round {round}: {report:?}");
        assert!(session.connection.is_some(), "the connection is kept");
    }
    let connections = daemon.join().unwrap();
    assert_eq!(connections.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
}

#[test]
fn rare_rounds_open_a_connection_each() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rng.sock");
    let one_round = || vec![Answer::Data(pattern(64))];
    let daemon = listening_daemon(&path, vec![one_round(), one_round()]);
    // At 60 s the daemon's 30 s idle timeout would close a kept connection.
    let config = config(Endpoint::Unix(path));
    let mut session = Session::new(&config);
    let mut kernel = FakeKernel::default();
    for _ in 0..2 {
        session.round(&mut kernel).unwrap();
        assert!(session.connection.is_none(), "the connection is not kept");
    }
    let connections = daemon.join().unwrap();
    assert_eq!(connections.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1]);
}

#[test]
fn backoff_doubles_from_1_to_60_seconds_and_resets() {
    let mut backoff = Backoff::new();
    let delays: Vec<u64> = (0..9).map(|_| backoff.next_delay().as_secs()).collect();
    assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    backoff.reset();
    assert_eq!(backoff.next_delay(), FIRST_BACKOFF);
}

#[derive(Debug, Parser)]
struct AgentCli {
    #[command(flatten)]
    args: AgentArgs,
}

fn parse_args(args: &[&str]) -> Result<AgentArgs, clap::Error> {
    AgentCli::try_parse_from(std::iter::once("agent").chain(args.iter().copied()))
        .map(|cli| cli.args)
}

#[test]
fn command_line_defaults() {
    <AgentCli as clap::CommandFactory>::command().debug_assert();
    let args = parse_args(&["--connect", "vsock:2:5564"]).unwrap();
    assert_eq!(
        AgentConfig::try_from(&args).unwrap(),
        AgentConfig {
            endpoint: Endpoint::Vsock { cid: 2, port: 5564 },
            bytes: 64,
            interval: Duration::from_secs(60),
            credit_bits_per_byte: 4,
            once: false,
            credentials: None,
        }
    );
}

#[test]
fn command_line_options_and_their_limits() {
    let args = parse_args(&[
        "--connect",
        "unix:/run/rng.sock",
        "--bytes",
        "65536",
        "--interval",
        "5",
        "--credit-bits-per-byte",
        "0",
        "--once",
    ])
    .unwrap();
    let config = AgentConfig::try_from(&args).unwrap();
    assert_eq!(config.bytes, MAX_REQUEST);
    assert_eq!(config.interval, Duration::from_secs(5));
    assert_eq!(config.credit_bits_per_byte, 0);
    assert!(config.once);

    for bad in [
        &[][..],
        &["--connect", "udp:1.2.3.4:5"],
        &["--connect", "tcp:1.2.3.4"],
        &["--connect", "tcp:1.2.3.4:0"],
        &["--connect", "tcp:1.2.3.4:5", "--psk-file"],
        &["--connect", "vsock:2:5564", "--bytes", "0"],
        &["--connect", "vsock:2:5564", "--bytes", "65537"],
        &["--connect", "vsock:2:5564", "--interval", "0"],
        &["--connect", "vsock:2:5564", "--credit-bits-per-byte", "9"],
        &["--connect", "vsock:2:5564", "--credit-bits-per-byte", "-1"],
    ] {
        assert_eq!(parse_args(bad).unwrap_err().exit_code(), 2, "{bad:?}");
    }
}

#[test]
fn a_tcp_endpoint_needs_a_key_file_and_a_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = key_file(dir.path(), &psk(7), 0o600);
    let path = path.to_str().unwrap();

    let args = parse_args(&[
        "--connect",
        "tcp:[::1]:5564",
        "--psk-file",
        path,
        "--name",
        GUEST,
    ])
    .unwrap();
    let config = AgentConfig::try_from(&args).unwrap();
    assert_eq!(
        config.credentials,
        Some(Credentials {
            name: GUEST.to_owned(),
            psk: psk(7),
            path: PathBuf::from(path),
        })
    );
    assert_eq!(
        config.to_string(),
        "64 bytes from tcp:[::1]:5564 as 'vm1' (encrypted) every 60 s, crediting 4 bits per byte"
    );
    assert!(
        !format!("{config:?}").contains(&psk(7).to_hex()),
        "no key in Debug"
    );

    for (args, missing) in [
        (
            &["--connect", "tcp:h:1"][..],
            "needs --psk-file PATH and --name NAME:",
        ),
        (
            &["--connect", "tcp:h:1", "--name", GUEST],
            "needs --psk-file PATH:",
        ),
        (
            &["--connect", "tcp:h:1", "--psk-file", path],
            "needs --name NAME:",
        ),
    ] {
        let err = AgentConfig::try_from(&parse_args(args).unwrap()).unwrap_err();
        assert!(matches!(err, AgentError::InvalidConfig(_)), "{err}");
        assert!(err.is_fatal());
        assert_eq!(err.reason(), "config");
        assert!(err.to_string().contains(missing), "{args:?}: {err}");
        assert!(err.to_string().contains("tcp:h:1 is encrypted"), "{err}");
    }

    for name in ["", "vm/1", "vm 1", &"a".repeat(65)] {
        let args =
            parse_args(&["--connect", "tcp:h:1", "--psk-file", path, "--name", name]).unwrap();
        let err = AgentConfig::try_from(&args).unwrap_err();
        assert!(
            matches!(err, AgentError::InvalidConfig(_)),
            "{name:?}: {err}"
        );
        assert!(err.to_string().contains("is not a guest name"), "{err}");
    }
}

#[test]
fn vsock_and_unix_endpoints_take_no_key_or_name() {
    for endpoint in ["vsock:2:5564", "unix:/run/rng.sock"] {
        for extra in [
            &["--psk-file", "/etc/vhost-rng/vm1.key"][..],
            &["--name", GUEST],
            &["--psk-file", "/etc/vhost-rng/vm1.key", "--name", GUEST],
        ] {
            let mut args = vec!["--connect", endpoint];
            args.extend_from_slice(extra);
            let err = AgentConfig::try_from(&parse_args(&args).unwrap()).unwrap_err();
            assert!(
                matches!(err, AgentError::InvalidConfig(_)),
                "{args:?}: {err}"
            );
            let message = err.to_string();
            assert!(
                message.contains("for tcp:HOST:PORT endpoints only") && message.contains(endpoint),
                "{message}"
            );
        }
    }
}

#[test]
fn an_unusable_key_file_is_fatal_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let shared = key_file(dir.path(), &psk(7), 0o644);
    let missing = dir.path().join("missing.key");
    for (path, expected) in [
        (&shared, format!("chmod 600 {}", shared.display())),
        (&missing, missing.display().to_string()),
    ] {
        let args = parse_args(&[
            "--connect",
            "tcp:h:1",
            "--psk-file",
            path.to_str().unwrap(),
            "--name",
            GUEST,
        ])
        .unwrap();
        let err = AgentConfig::try_from(&args).unwrap_err();
        assert!(matches!(err, AgentError::Key(_)), "{err}");
        assert!(err.is_fatal());
        assert_eq!(err.report_line(), "VRNG-AGENT error reason=key");
        assert!(err.to_string().contains(&expected), "{err}");
    }
}

#[test]
fn a_bad_configuration_fails_the_command_without_panicking() {
    let args = parse_args(&["--connect", "tcp:127.0.0.1:1", "--once"]).unwrap();
    assert_eq!(run_command(&args), ExitCode::FAILURE);
}

#[test]
fn a_round_over_tcp_injects_what_the_host_sends() {
    let data = pattern(64);
    let (port, daemon) = tcp_daemon(vec![TcpConnection {
        key: psk(7),
        script: vec![Answer::Data(data.clone())],
    }]);
    let mut kernel = FakeKernel::default();

    let report = run(&tcp_config(port, psk(7)), &mut kernel).unwrap();

    assert_eq!(
        report.report_line(),
        "VRNG-AGENT ok bytes=64 credited_bits=256"
    );
    assert_eq!(
        kernel.calls,
        [
            KernelCall::Add {
                bytes: data,
                credit_bits: 256
            },
            KernelCall::Reseed
        ]
    );
    let connections = daemon.join().unwrap();
    assert_eq!(connections.len(), 1);
    assert_eq!(connections[0].as_ref().unwrap(), &[Request { length: 64 }]);
}

#[test]
fn a_wrong_key_over_tcp_is_refused_credentials_and_retried() {
    let (port, daemon) = tcp_daemon(vec![TcpConnection {
        key: psk(7),
        script: vec![Answer::Data(pattern(64))],
    }]);
    let mut kernel = FakeKernel::default();

    let err = run(&tcp_config(port, psk(8)), &mut kernel).unwrap_err();

    assert!(
        matches!(&err, AgentError::CredentialsRefused { name, .. } if name == GUEST),
        "{err}"
    );
    assert!(!err.is_fatal(), "the host's configuration may be fixed");
    assert_eq!(
        err.report_line(),
        "VRNG-AGENT error reason=credentials-refused"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "tcp:127.0.0.1:{port} refused this guest's credentials: the key in --psk-file is not \
             the one the host has for --name 'vm1', or the host knows no guest of that name"
        )
    );
    assert!(kernel.calls.is_empty());
    let connections = daemon.join().unwrap();
    assert!(
        matches!(&connections[..], [Err(noise::HandshakeError::WrongCredential(name))] if name == GUEST),
        "{connections:?}"
    );
}

#[test]
fn run_forever_retries_after_refused_credentials() {
    // The host first holds another key for the guest, then the right one.
    let (port, daemon) = tcp_daemon(vec![
        TcpConnection {
            key: psk(9),
            script: vec![],
        },
        TcpConnection {
            key: psk(7),
            script: vec![Answer::Data(pattern(64))],
        },
    ]);
    // The second round's add fails fatally, which is the only way out.
    let mut kernel = FakeKernel {
        add_fails_with: Some(|| AgentError::NotPermitted),
        ..FakeKernel::default()
    };

    let err = run_forever(&tcp_config(port, psk(7)), &mut kernel);

    assert!(matches!(err, AgentError::NotPermitted), "{err}");
    let connections = daemon.join().unwrap();
    assert!(
        matches!(
            &connections[..],
            [Err(noise::HandshakeError::WrongCredential(_)), Ok(requests)] if requests.len() == 1
        ),
        "{connections:?}"
    );
}

#[test]
fn frequent_rounds_over_tcp_share_a_connection_and_reconnect_when_it_drops() {
    let (port, daemon) = tcp_daemon(vec![
        TcpConnection {
            key: psk(7),
            script: vec![Answer::Data(pattern(64)), Answer::Data(pattern(64))],
        },
        TcpConnection {
            key: psk(7),
            script: vec![Answer::Data(pattern(64))],
        },
    ]);
    let config = AgentConfig {
        interval: Duration::from_secs(1),
        ..tcp_config(port, psk(7))
    };
    let mut session = Session::new(&config);
    let mut kernel = FakeKernel::default();
    for round in 0..3 {
        let report = session.round(&mut kernel);
        assert!(report.is_ok(), "round {round}: {report:?}");
    }
    let connections = daemon.join().unwrap();
    let served: Vec<usize> = connections
        .iter()
        .map(|c| c.as_ref().map_or(0, Vec::len))
        .collect();
    assert_eq!(served, [2, 1]);
}

/// A TCP config whose key comes from the key file at `path`, as
/// `--psk-file` would load it.
fn tcp_config_from_file(port: u16, path: &Path) -> AgentConfig {
    AgentConfig {
        credentials: Some(Credentials {
            name: GUEST.to_owned(),
            psk: Psk::load(path).unwrap(),
            path: path.to_owned(),
        }),
        ..tcp_config(port, psk(0))
    }
}

/// The key the session will use for its next connection.
fn session_key(session: &Session<'_>) -> Psk {
    session.credentials.as_ref().unwrap().psk.clone()
}

#[test]
fn a_rotated_key_is_read_from_the_key_file_after_a_refusal() {
    // The host has key 8 for the guest; the guest's file still holds 7.
    let (port, daemon) = tcp_daemon(vec![
        TcpConnection {
            key: psk(8),
            script: vec![],
        },
        TcpConnection {
            key: psk(8),
            script: vec![Answer::Data(pattern(64))],
        },
        TcpConnection {
            key: psk(8),
            script: vec![Answer::Data(pattern(64))],
        },
    ]);
    let dir = tempfile::tempdir().unwrap();
    let path = key_file(dir.path(), &psk(7), 0o600);
    let config = tcp_config_from_file(port, &path);
    let mut session = Session::new(&config);
    let mut kernel = FakeKernel::default();

    let err = session.round(&mut kernel).unwrap_err();
    assert!(
        matches!(err, AgentError::CredentialsRefused { .. }),
        "{err}"
    );
    assert!(!err.is_fatal());

    // The operator writes the new key into the guest's file.
    key_file(dir.path(), &psk(8), 0o600);
    let report = session.round(&mut kernel);
    assert!(report.is_ok(), "{report:?}");
    assert!(session_key(&session) == psk(8), "the new key is kept");

    // A round that is not refused does not read the file: a key written
    // now is not used.
    key_file(dir.path(), &psk(9), 0o600);
    let report = session.round(&mut kernel);
    assert!(report.is_ok(), "{report:?}");
    assert!(session_key(&session) == psk(8));

    let connections = daemon.join().unwrap();
    assert!(
        matches!(
            &connections[..],
            [Err(noise::HandshakeError::WrongCredential(_)), Ok(first), Ok(second)]
                if first.len() == 1 && second.len() == 1
        ),
        "{connections:?}"
    );
}

#[test]
fn an_unusable_key_file_after_a_refusal_keeps_the_old_key_and_is_not_fatal() {
    // The host refuses key 7 twice (the operator is mid-rotation), then
    // has it again.
    let (port, daemon) = tcp_daemon(vec![
        TcpConnection {
            key: psk(8),
            script: vec![],
        },
        TcpConnection {
            key: psk(8),
            script: vec![],
        },
        TcpConnection {
            key: psk(7),
            script: vec![Answer::Data(pattern(64))],
        },
    ]);
    let dir = tempfile::tempdir().unwrap();
    let path = key_file(dir.path(), &psk(7), 0o600);
    let config = tcp_config_from_file(port, &path);
    let mut session = Session::new(&config);
    let mut kernel = FakeKernel::default();

    let err = session.round(&mut kernel).unwrap_err();
    assert!(
        matches!(err, AgentError::CredentialsRefused { .. }),
        "{err}"
    );

    // Too open (the tests may run as root, who reads any mode): the file is
    // not used, and the round goes ahead with the old key.
    key_file(dir.path(), &psk(8), 0o644);
    assert!(Psk::load(&path).is_err());
    let err = session.round(&mut kernel).unwrap_err();
    assert!(
        matches!(err, AgentError::CredentialsRefused { .. }),
        "{err}"
    );
    assert!(!err.is_fatal());
    assert!(session_key(&session) == psk(7), "the old key is kept");

    // Gone altogether: the same.
    std::fs::remove_file(&path).unwrap();
    let report = session.round(&mut kernel);
    assert!(report.is_ok(), "{report:?}");
    assert!(session_key(&session) == psk(7));

    let connections = daemon.join().unwrap();
    assert!(
        matches!(
            &connections[..],
            [
                Err(noise::HandshakeError::WrongCredential(_)),
                Err(noise::HandshakeError::WrongCredential(_)),
                Ok(requests),
            ] if requests.len() == 1
        ),
        "{connections:?}"
    );
}
