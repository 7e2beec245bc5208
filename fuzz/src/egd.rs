// SPDX-License-Identifier: Apache-2.0
//! Target `egd`: a client of the EGD frontend (src/frontend/egd.rs), served
//! by the daemon's own session through [`Clients::serve`] as a connection
//! on a guest's EGD socket is. The first input byte splits what the client
//! sends into reads of that size; the rest is the byte stream of commands.
//!
//! Checked besides "no panic": the answers are exactly what EGD defines for
//! the complete commands sent, no more and no less: 4 bytes for 0x00, a
//! count of at most N then that many bytes for 0x01 N, N bytes for 0x02 N,
//! nothing for a refused 0x03 write, a length and that many digits for
//! 0x04; after an unknown command, nothing.
//!
//! [`Clients::serve`]: vhost_rng::frontend::stream::Clients::serve

use vhost_rng::frontend::egd::PROTOCOL;

use crate::daemon;
use crate::stream::Client;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut client = Client::scripted(data);
    daemon::clients().serve(&PROTOCOL, "in a fuzz target", &mut client);
    let sent = data.get(1..).unwrap_or_default();
    check(sent, &client.output, client.full);
}

/// Walks the commands in `sent` and the answers in `answered` side by side;
/// with `full`, the client stopped taking answers, so the last may be short.
fn check(mut sent: &[u8], mut answered: &[u8], full: bool) {
    let mut take = |n: usize, what: &str| -> Option<Vec<u8>> {
        if full && answered.len() < n {
            return None;
        }
        assert!(
            answered.len() >= n,
            "{what}: {n} bytes due, {} answered",
            answered.len()
        );
        let (head, rest) = answered.split_at(n);
        answered = rest;
        Some(head.to_vec())
    };
    while let Some((&command, rest)) = sent.split_first() {
        sent = rest;
        match command {
            0x00 => {
                if take(4, "entropy level").is_none() {
                    return;
                }
            }
            0x01 | 0x02 => {
                let Some((&wanted, rest)) = sent.split_first() else {
                    break;
                };
                sent = rest;
                let answer = if command == 0x01 {
                    take(1, "read count").and_then(|count| {
                        assert!(count[0] <= wanted, "{count:?} bytes for a read of {wanted}");
                        take(usize::from(count[0]), "non-blocking read")
                    })
                } else {
                    take(usize::from(wanted), "blocking read")
                };
                if answer.is_none() {
                    return;
                }
            }
            0x03 => {
                let Some(length) = sent.get(2) else {
                    break;
                };
                let whole = 3 + usize::from(*length);
                if sent.len() < whole {
                    break;
                }
                sent = &sent[whole..];
            }
            0x04 => {
                let Some(pid) =
                    take(1, "pid length").and_then(|length| take(usize::from(length[0]), "pid"))
                else {
                    return;
                };
                assert!(!pid.is_empty() && pid.iter().all(u8::is_ascii_digit));
            }
            _ => break,
        }
    }
    assert!(
        answered.is_empty(),
        "{} bytes answered to no command",
        answered.len()
    );
}

/// Seed inputs: each command, whole and split across reads.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("level-and-reads", vec![0, 0x00, 0x01, 16, 0x02, 32, 0x04]),
        ("one-byte-reads", vec![1, 0x02, 64, 0x01, 255, 0x00]),
        (
            "refused-write",
            vec![3, 0x03, 0, 64, 4, 1, 2, 3, 4, 0x02, 8],
        ),
        ("unknown-command", vec![0, 0x04, 0x09, 0x00]),
        ("torn-command", vec![0, 0x00, 0x02]),
    ]
}
