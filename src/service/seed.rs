// SPDX-License-Identifier: Apache-2.0
//! `vhost-rng seed`: random bytes for a guest that has no RNG device at
//! all, or for its first-boot key generation, handed in with its boot data
//! (cloud-init user-data).
//!
//! The bytes come from the running daemon's pool over the control socket
//! (`{"command":"seed","bytes":N}`), or, when no daemon answers there, from
//! the entropy sources directly, through the same health tests and
//! conditioning. Either way, in drbg mode they are the output of a DRBG
//! keyed with one fresh full-entropy seed (256 bits, what a guest's own
//! DRBG is keyed with); in raw mode (daemon only) full-entropy bytes.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::entropy::drbg::ReseedPolicy;
use crate::entropy::pool::{Mode, Pool, PoolConfig, PoolError};
use crate::entropy::source::SourceSpec;
use crate::service::control::{self, ControlError, Request, Response};

mod format;

pub use format::{DEFAULT_SEED_BYTES, MAX_SEED_BYTES, SeedFormat};

/// How long the daemon waits for a seed in its pool before refusing: well
/// inside the client's wait for an answer ([`control::CLIENT_TIMEOUT`]
/// twice).
pub const DAEMON_WAIT: Duration = Duration::from_secs(5);

/// What cloud-init runs once it has written the seed: replaces the seed
/// file systemd keeps for the next boot (every clone of an image boots with
/// the one the image was made with) by bytes read after ours went in.
pub const CLOUD_INIT_COMMAND: &str = "umask 077; if [ -d /var/lib/systemd ]; then \
     head -c 512 /dev/urandom > /var/lib/systemd/random-seed; fi";

/// Why no seed was printed.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// More bytes were asked for than one request may take.
    #[error("{asked} bytes asked for: a seed is at most {MAX_SEED_BYTES} bytes")]
    TooLarge {
        /// The bytes asked for.
        asked: usize,
    },
    /// Zero bytes were asked for.
    #[error("0 bytes asked for: give --bytes 1 or more")]
    Empty,
    /// The pool had no full-entropy seed within the wait.
    #[error(
        "no entropy within {}s: no source is healthy (see vhost-rng status or vhost-rng check)",
        .0.as_secs()
    )]
    Starved(Duration),
    /// The daemon refused or could not be understood.
    #[error("{0}")]
    Daemon(ControlError),
    /// The daemon answered something other than a seed.
    #[error("the daemon's answer is not a seed: {0}")]
    Answer(String),
    /// With no daemon, the sources could not be started.
    #[error("no daemon at {control} ({reason}), and the sources cannot be read: {error}")]
    Sources {
        /// The control socket tried.
        control: PathBuf,
        /// Why it could not be reached.
        reason: String,
        /// Why the sources could not start.
        #[source]
        error: PoolError,
    },
    /// Printing failed (a closed pipe).
    #[error("cannot write the seed: {0}")]
    Write(#[source] std::io::Error),
}

/// Where the bytes came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The daemon at this control socket.
    Daemon(PathBuf),
    /// The sources, read by this process (no daemon answered).
    Sources(Vec<String>),
}

fn check_size(bytes: usize) -> Result<(), SeedError> {
    match bytes {
        0 => Err(SeedError::Empty),
        n if n > MAX_SEED_BYTES => Err(SeedError::TooLarge { asked: n }),
        _ => Ok(()),
    }
}

/// `bytes` bytes from `pool`, waiting at most [`DAEMON_WAIT`].
pub fn from_pool(pool: &Pool, bytes: usize) -> Result<Zeroizing<Vec<u8>>, SeedError> {
    from_pool_within(pool, bytes, DAEMON_WAIT)
}

fn from_pool_within(
    pool: &Pool,
    bytes: usize,
    wait: Duration,
) -> Result<Zeroizing<Vec<u8>>, SeedError> {
    check_size(bytes)?;
    let mut out = Zeroizing::new(vec![0u8; bytes]);
    if pool.draw_seed(&mut out, wait) {
        Ok(out)
    } else {
        Err(SeedError::Starved(wait))
    }
}

/// Asks the daemon at `control` for `bytes` bytes; when nothing listens
/// there, starts `sources` in this process (drbg mode) and waits at most
/// `wait` for them.
pub fn fetch(
    control: &std::path::Path,
    sources: &[SourceSpec],
    bytes: usize,
    wait: Duration,
) -> Result<(Zeroizing<Vec<u8>>, Origin), SeedError> {
    check_size(bytes)?;
    match control::request(control, &Request::Seed { bytes }) {
        Ok(Response::Seed { data }) => {
            let decoded = Zeroizing::new(
                decode_base64(&data).ok_or_else(|| SeedError::Answer("bad base64".into()))?,
            );
            if decoded.len() != bytes {
                return Err(SeedError::Answer(format!(
                    "{} bytes instead of {bytes}",
                    decoded.len()
                )));
            }
            Ok((decoded, Origin::Daemon(control.to_owned())))
        }
        Ok(other) => Err(SeedError::Answer(format!("{other:?}"))),
        Err(ControlError::Connect { error, .. }) => {
            let pool = Pool::start(PoolConfig {
                sources: sources.to_vec(),
                mode: Mode::Drbg,
                reseed: ReseedPolicy::default(),
            })
            .map_err(|pool_error| SeedError::Sources {
                control: control.to_owned(),
                reason: error.to_string(),
                error: pool_error,
            })?;
            let out = from_pool_within(&pool, bytes, wait)?;
            let names = sources.iter().map(SourceSpec::label).collect();
            Ok((out, Origin::Sources(names)))
        }
        Err(e) => Err(SeedError::Daemon(e)),
    }
}

/// `bytes` printed in `format`.
pub fn render(format: SeedFormat, bytes: &[u8]) -> Zeroizing<Vec<u8>> {
    let text = match format {
        SeedFormat::Raw => return Zeroizing::new(bytes.to_vec()),
        SeedFormat::Base64 => format!("{}\n", base64(bytes)),
        SeedFormat::CloudInit => format!(
            "#cloud-config\n\
             # {} random bytes from vhost-rng, for this one VM: never reuse them.\n\
             random_seed:\n  \
               file: /dev/urandom\n  \
               encoding: b64\n  \
               data: {}\n  \
               command: [\"sh\", \"-c\", \"{}\"]\n  \
               command_required: false\n",
            bytes.len(),
            base64(bytes),
            CLOUD_INIT_COMMAND
        ),
    };
    Zeroizing::new(text.into_bytes())
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (RFC 4648, with padding).
pub fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard padded base64; `None` if `text` is not that.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let text = text.as_bytes();
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let value = |c: u8| ALPHABET.iter().position(|&a| a == c).map(|v| v as u32);
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    for (i, quad) in text.chunks(4).enumerate() {
        let last = i == text.len() / 4 - 1;
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// Runs `vhost-rng seed`: prints the seed on stdout, says on stderr where
/// it came from when no daemon answered.
pub fn run(
    control: &std::path::Path,
    sources: &[SourceSpec],
    bytes: usize,
    format: SeedFormat,
    wait: Duration,
) -> ExitCode {
    let result = fetch(control, sources, bytes, wait).and_then(|(seed, origin)| {
        if let Origin::Sources(names) = &origin {
            eprintln!(
                "vhost-rng seed: no daemon at {}; drew from the sources directly ({})",
                control.display(),
                names.join(", ")
            );
        }
        let mut out = std::io::stdout().lock();
        out.write_all(&render(format, &seed))
            .and_then(|()| out.flush())
            .map_err(SeedError::Write)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-rng seed: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_rfc_4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
            assert_eq!(decode_base64(encoded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decode_base64(&base64(&all)).unwrap(), all);
        for bad in ["Zg=", "Z===", "Zg==Zg==", "Zm9*"] {
            assert_eq!(decode_base64(bad), None, "{bad}");
        }
    }

    #[test]
    fn sizes_are_bounded() {
        assert!(matches!(check_size(0), Err(SeedError::Empty)));
        assert!(check_size(1).is_ok());
        assert!(check_size(MAX_SEED_BYTES).is_ok());
        let err = check_size(MAX_SEED_BYTES + 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "4097 bytes asked for: a seed is at most 4096 bytes"
        );
    }

    #[test]
    fn cloud_init_block_carries_the_bytes() {
        let text = render(SeedFormat::CloudInit, b"foobar");
        let text = std::str::from_utf8(&text).unwrap();
        assert!(text.starts_with("#cloud-config\n"), "{text}");
        assert!(text.contains("\nrandom_seed:\n"), "{text}");
        assert!(text.contains("\n  encoding: b64\n"), "{text}");
        assert!(text.contains("\n  data: Zm9vYmFy\n"), "{text}");
        assert!(
            text.contains("\n  command: [\"sh\", \"-c\", \"umask 077;"),
            "{text}"
        );
        assert_eq!(&*render(SeedFormat::Raw, b"\x00\xff"), b"\x00\xff");
        assert_eq!(&*render(SeedFormat::Base64, b"fo"), b"Zm8=\n");
    }

    #[test]
    fn the_pool_gives_distinct_seeds_of_the_size_asked() {
        let pool = crate::entropy::pool::os_pool();
        let a = from_pool(&pool, 64).unwrap();
        let b = from_pool(&pool, 64).unwrap();
        assert_eq!((a.len(), b.len()), (64, 64));
        assert_ne!(*a, *b);
        assert_eq!(from_pool(&pool, MAX_SEED_BYTES).unwrap().len(), 4096);
    }
}
