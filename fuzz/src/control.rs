// SPDX-License-Identifier: Apache-2.0
//! Target `control`: a client of the control socket (src/service/control.rs).
//! The input (after its first byte, which splits it into reads) is what the
//! client sends: the daemon's [`read_request_line`] reads the request line,
//! [`parse_request`] reads the request, and it is answered as the daemon
//! does, save two requests with effects outside the process: `guest-add`
//! only parses its spec and makes its limits (adding the guest would bind a
//! socket wherever the spec says), and `upgrade` is not carried out (it
//! signals the daemon to re-execute itself). The rest go to
//! [`handle`] with a registry of no guests.
//!
//! Checked besides "no panic": the request line is bounded, a request that
//! parses serializes back to itself, and the answer is one JSON line that
//! the `vhost-rng` client reads back. The client's reading of arbitrary
//! bytes as an answer is fuzzed too.

use std::time::{Duration, Instant};

use vhost_rng::config::GuestSpec;
use vhost_rng::service::control::{Request, Response, handle, parse_request, read_request_line};
use vhost_rng::service::registry::limits_of;

use crate::daemon;
use crate::stream::Client;

/// The daemon's bound on a request line.
const MAX_REQUEST: usize = 64 * 1024;

/// Runs one input.
pub fn run(data: &[u8]) {
    // What the client reads as an answer, whatever it is.
    let _ = serde_json::from_slice::<Response>(data);

    let mut client = Client::scripted(data);
    let deadline = Instant::now() + Duration::from_secs(3600);
    let Ok(line) = read_request_line(&mut client, deadline) else {
        return;
    };
    assert!(line.len() <= MAX_REQUEST);
    let response = match parse_request(&line) {
        Ok(request) => {
            let text = serde_json::to_vec(&request).expect("a request serializes");
            assert_eq!(
                parse_request(&text).ok().as_ref(),
                Some(&request),
                "a request does not read back"
            );
            answer(request)
        }
        Err(e) => Response::Error {
            message: format!("bad request: {e}"),
        },
    };
    let mut line = serde_json::to_vec(&response).expect("an answer serializes");
    assert!(!line.contains(&b'\n'), "an answer of more than one line");
    line.push(b'\n');
    let back: Response = serde_json::from_slice(line.trim_ascii_end())
        .unwrap_or_else(|e| panic!("the client cannot read the answer: {e}"));
    if matches!(response, Response::Ok | Response::Error { .. }) {
        assert_eq!(back, response);
    }
}

fn answer(request: Request) -> Response {
    match request {
        Request::GuestAdd { spec } => match spec.parse::<GuestSpec>() {
            Ok(spec) => match limits_of(&spec) {
                Ok(_) => Response::Ok,
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        Request::Upgrade => Response::Ok,
        other => handle(&daemon::registry(), other),
    }
}

/// Seed inputs: each command, and broken lines.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let line = |piece: u8, text: &str| {
        let mut bytes = vec![piece];
        bytes.extend_from_slice(text.as_bytes());
        bytes
    };
    vec![
        ("guest-list", line(0, "{\"command\":\"guest-list\"}\n")),
        ("status", line(7, "{\"command\":\"status\"}\n")),
        (
            "guest-add",
            line(
                0,
                "{\"command\":\"guest-add\",\"spec\":\"name=vm1,socket=/run/vm1.sock,rate-bytes=16384\"}\n",
            ),
        ),
        (
            "guest-remove",
            line(3, "{\"command\":\"guest-remove\",\"name\":\"vm9\"}\r\n"),
        ),
        ("upgrade", line(0, "{\"command\":\"upgrade\"}")),
        (
            "bad-json",
            line(0, "{\"command\":\"guest-add\",\"spec\":1}\n{}"),
        ),
        (
            "answer",
            line(
                0,
                "{\"result\":\"error\",\"message\":\"no guest named vm9\"}\n",
            ),
        ),
    ]
}
