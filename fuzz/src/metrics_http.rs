// SPDX-License-Identifier: Apache-2.0
//! Target `metrics_http`: a client of the metrics endpoint
//! (src/metrics/mod.rs). The input (after its first byte, which splits it
//! into reads) is what the client sends; the daemon's [`answer`] reads the
//! request head and makes the response, with a status snapshot of a
//! registry of no guests for `/metrics`. A first byte of 0xf0 or more
//! instead makes the rest a JSON status snapshot, which [`encode`] turns
//! into the exposition (names and labels as odd as JSON allows).
//!
//! Checked besides "no panic": every response is an HTTP/1.1 status line
//! and head, and its body is as long as its Content-Length says (or empty,
//! for HEAD).
//!
//! [`answer`]: vhost_rng::metrics::answer
//! [`encode`]: vhost_rng::metrics::encode

use std::sync::OnceLock;
use std::time::Duration;

use vhost_rng::metrics::{answer, encode};
use vhost_rng::service::status::DaemonStatus;
use vhost_rng_protocol::log_limit::RateLimitedLog;

use crate::daemon;
use crate::stream::Client;

/// First bytes from this one on select a JSON status snapshot.
const STATUS_MODE: u8 = 0xf0;

/// Runs one input.
pub fn run(data: &[u8]) {
    match data.split_first() {
        Some((&first, rest)) if first >= STATUS_MODE => {
            if let Ok(status) = serde_json::from_slice::<DaemonStatus>(rest) {
                let _ = encode(&status);
            }
        }
        _ => http(data),
    }
}

fn http(data: &[u8]) {
    static FAILURES: OnceLock<RateLimitedLog> = OnceLock::new();
    let failures = FAILURES.get_or_init(|| RateLimitedLog::per_minute(1));
    let registry = daemon::registry();
    let snapshot = move || registry.status();
    let mut client = Client::scripted(data);
    if let Ok(Some(response)) = answer(&mut client, &snapshot, failures, Duration::from_secs(3600))
    {
        check(&response);
    }
}

fn check(response: &[u8]) {
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = std::str::from_utf8(&response[..end]).expect("an ASCII head");
    let body = &response[end + 4..];
    assert!(head.starts_with("HTTP/1.1 "), "{head}");
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("Content-Length: "))
        .and_then(|value| value.parse().ok())
        .expect("a Content-Length");
    assert!(body.len() == length || body.is_empty(), "{head}");
}

/// Seed inputs: scrapes, other paths and methods, broken heads, a status.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let request = |piece: u8, text: &str| {
        let mut bytes = vec![piece];
        bytes.extend_from_slice(text.as_bytes());
        bytes
    };
    let mut status = vec![STATUS_MODE];
    status.extend_from_slice(
        &serde_json::to_vec(&daemon::registry().status()).expect("a status serializes"),
    );
    vec![
        (
            "scrape",
            request(
                0,
                "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9564\r\nAccept: */*\r\n\r\n",
            ),
        ),
        ("head-index", request(5, "\r\nHEAD / HTTP/1.0\r\n\r\n")),
        (
            "absolute-form",
            request(0, "GET http://host:9564/metrics?x=1 HTTP/1.1\n\n"),
        ),
        ("post", request(1, "POST /metrics HTTP/1.1\r\n\r\n")),
        (
            "not-found",
            request(0, "GET /nothing#here HTTP/1.1\r\n\r\n"),
        ),
        ("malformed", request(0, "GET  /metrics HTTP/2\r\n\r\n")),
        ("truncated", request(0, "GET /metrics HTTP/1.1\r\nHost: x")),
        ("status", status),
    ]
}
