// SPDX-License-Identifier: Apache-2.0
//! The metrics endpoint as a scraper sees it, through the public API only:
//! every scrape takes a new snapshot, and every line of the exposition is
//! well-formed OpenMetrics text.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use vhost_rng::metrics::{CONTENT_TYPE, MetricsServer, SnapshotFn, encode};
use vhost_rng::service::status::{
    DaemonStatus, GuestStatus, ListenerStatus, PoolStatus, SourceStatus,
};

fn status(bytes: u64) -> DaemonStatus {
    DaemonStatus {
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_seconds: 3.5,
        started_at: 0,
        upgrades: 0,
        worker_restarts: 0,
        last_worker_exit: None,
        last_upgrade_error: None,
        upgrade_failures: 0,
        max_rate: None,
        guests: vec![GuestStatus {
            name: "vm1".into(),
            endpoint: "socket".into(),
            path: "/run/vm1.sock".into(),
            connected: true,
            connections: 1,
            requests: 2,
            bytes,
            defective_requests: 0,
            throttled_seconds: 0.25,
            current_rate: 0.0,
            rate_bytes: Some(1024),
            rate_period_ms: Some(1000),
            burst: None,
            weight: 1,
            refused_connections: 3,
            evicted_connections: 4,
            wrong_key_connections: 2,
            process: None,
        }],
        pool: PoolStatus {
            mode: "raw".into(),
            level: 32,
            capacity: 4096,
            sources: vec![SourceStatus {
                name: "os".into(),
                hardware: false,
                state: "starting".into(),
                min_entropy: 8.0,
                bytes_read: 512,
                bytes_contributed: 0,
                bytes_discarded: 0,
                rct_failures: 0,
                apt_failures: 0,
                read_errors: 0,
                retries: 0,
                rate: 0,
            }],
        },
        listeners: vec![
            ListenerStatus {
                kind: "vsock".into(),
                address: "5564".into(),
                connections: 9,
                refused: BTreeMap::from([("unknown_cid".into(), 4)]),
            },
            ListenerStatus {
                kind: "tcp".into(),
                address: "127.0.0.1:5565".into(),
                connections: 7,
                refused: BTreeMap::from([
                    ("handshake_incomplete".into(), 1),
                    ("not_protocol".into(), 0),
                    ("too_many_handshakes".into(), 0),
                    ("unknown_name".into(), 5),
                    ("wrong_key".into(), 2),
                ]),
            },
        ],
        sandbox: None,
        isolation: String::new(),
    }
}

fn scrape(addr: SocketAddr) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
    (head.to_owned(), body.to_owned())
}

/// Checks the OpenMetrics text grammar as far as this exposition uses it.
fn assert_well_formed(text: &str) {
    let body = text.strip_suffix("# EOF\n").expect("ends with # EOF");
    let mut family: Option<(String, String)> = None;
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(name.starts_with("vhost_rng_") && !help.is_empty(), "{line}");
            family = Some((name.to_owned(), String::new()));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            let current = family.as_mut().expect("TYPE after HELP");
            assert_eq!(current.0, name);
            assert!(kind == "counter" || kind == "gauge", "{line}");
            current.1 = kind.to_owned();
        } else {
            let (name, kind) = family.as_ref().expect("sample inside a family");
            let (series, value) = line.rsplit_once(' ').unwrap();
            let sample_name = series.split('{').next().unwrap();
            let expected = match kind.as_str() {
                "counter" => format!("{name}_total"),
                _ => name.clone(),
            };
            assert_eq!(sample_name, expected, "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
            if series.contains('{') {
                assert!(series.ends_with("\"}"), "{line}");
            }
        }
    }
}

#[test]
fn each_scrape_takes_a_new_snapshot() {
    let served = Arc::new(AtomicU64::new(0));
    let snapshot: SnapshotFn = {
        let served = Arc::clone(&served);
        Arc::new(move || status(served.fetch_add(100, Ordering::SeqCst) + 100))
    };
    let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), snapshot).unwrap();

    let (head, first) = scrape(server.local_addr());
    assert!(head.contains(&format!("\r\nContent-Type: {CONTENT_TYPE}\r\n")));
    assert_eq!(first, encode(&status(100)));
    assert_well_formed(&first);
    assert!(first.contains("vhost_rng_guest_bytes_total{guest=\"vm1\"} 100\n"));
    assert!(first.contains("vhost_rng_source_state{source=\"os\",state=\"starting\"} 1\n"));
    for family in [
        "guest_refused_connections",
        "guest_evicted_connections",
        "guest_wrong_key_connections",
        "listener_connections",
        "listener_refused",
    ] {
        assert!(
            first.contains(&format!("\n# TYPE vhost_rng_{family} counter\n")),
            "{family}: {first}"
        );
    }
    for sample in [
        "vhost_rng_guest_refused_connections_total{guest=\"vm1\"} 3\n",
        "vhost_rng_guest_evicted_connections_total{guest=\"vm1\"} 4\n",
        "vhost_rng_guest_wrong_key_connections_total{guest=\"vm1\"} 2\n",
        "vhost_rng_listener_connections_total{listener=\"vsock\"} 9\n",
        "vhost_rng_listener_connections_total{listener=\"tcp\"} 7\n",
        "vhost_rng_listener_refused_total{listener=\"vsock\",reason=\"unknown_cid\"} 4\n",
        "vhost_rng_listener_refused_total{listener=\"tcp\",reason=\"unknown_name\"} 5\n",
        "vhost_rng_listener_refused_total{listener=\"tcp\",reason=\"too_many_handshakes\"} 0\n",
    ] {
        assert!(first.contains(sample), "{sample}: {first}");
    }

    let (_, second) = scrape(server.local_addr());
    assert!(second.contains("vhost_rng_guest_bytes_total{guest=\"vm1\"} 200\n"));
    server.shutdown();
}
