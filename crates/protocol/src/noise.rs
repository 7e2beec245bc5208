// SPDX-License-Identifier: Apache-2.0
//! The encrypted TCP transport of the entropy protocol, for guests that
//! have no vsock (Xen guests above all): a Noise `NNpsk0` handshake keyed by
//! a per-guest pre-shared key, then an encrypted byte stream on which the
//! ordinary 12-byte-header protocol of [`crate::wire`] runs unchanged.
//!
//! Over vsock or a Unix socket the transport itself tells the daemon which
//! guest is at the other end. Over TCP anyone on the network can connect,
//! so the guest names itself in a short hello and proves the name with the
//! key both sides hold; the same key encrypts everything that follows, so
//! no one on the path can read or alter the entropy. There is no plaintext
//! mode.
//!
//! ```text
//! client -> server  "VRNS" | version u8 = 1 | identity length u8 | identity
//! client -> server  frame: Noise handshake message 1 (empty payload)
//! server -> client  frame: Noise handshake message 2 (empty payload)
//! both ways         frames: Noise transport messages carrying the stream
//! frame             length u16 BE | length bytes of Noise message
//! ```
//!
//! The hello bytes are the Noise prologue on both sides, so a hello altered
//! in transit makes the handshake fail. docs/protocol.md ("TCP transport
//! (Noise)") is the full description.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver, FallbackResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use snow::{Builder, HandshakeState, TransportState};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// The Noise protocol name: no static keys (`NN`), the pre-shared key mixed
/// in before the first message (`psk0`), so message 1 already proves the
/// client holds it.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// The first four bytes a client sends. Not "VRNG", so that a plaintext
/// client of the entropy protocol pointed at this port is told apart at once.
pub const HELLO_MAGIC: [u8; 4] = *b"VRNS";
/// The version of the hello and of everything after it.
pub const HELLO_VERSION: u8 = 1;
/// Longest identity (guest name) a hello may carry.
pub const MAX_IDENTITY: usize = 64;
/// Bytes in a pre-shared key.
pub const PSK_LEN: usize = 32;
/// Hexadecimal digits in a key file.
pub const PSK_HEX_LEN: usize = 2 * PSK_LEN;
/// The most bytes a frame's Noise message may have: what its u16 length
/// field can say, which is also the Noise limit on a message.
pub const MAX_FRAME: usize = 65535;
/// The Poly1305 tag every encrypted Noise message ends with.
const TAG_LEN: usize = 16;
/// The most plaintext one transport frame carries.
pub const MAX_FRAME_PLAINTEXT: usize = MAX_FRAME - TAG_LEN;
/// Both handshake messages are an ephemeral X25519 key and the tag of an
/// empty payload; anything else is not this protocol.
const HANDSHAKE_MESSAGE_LEN: usize = 32 + TAG_LEN;
/// Bytes of the hello before the identity.
const HELLO_HEADER_LEN: usize = 6;
/// A key file is a line of hex; anything much longer is not a key file, and
/// is not read into memory whole.
const MAX_KEY_FILE: u64 = 1024;

/// A 32-byte pre-shared key, one per guest. Its `Debug` output does not show
/// the key, and it is overwritten with zeros when dropped (copies the
/// compiler makes when a `Psk` is moved are beyond reach).
#[derive(Clone)]
pub struct Psk([u8; PSK_LEN]);

/// Why a pre-shared key could not be parsed, read, made or written.
#[derive(Debug, thiserror::Error)]
pub enum PskError {
    /// The text is not [`PSK_HEX_LEN`] characters long (its length is given).
    #[error("a pre-shared key is {PSK_HEX_LEN} hexadecimal digits (32 bytes), not {0} characters")]
    WrongLength(usize),
    /// A character is not a hexadecimal digit (its 1-based position is given).
    #[error(
        "a pre-shared key is {PSK_HEX_LEN} hexadecimal digits (32 bytes); character {0} is not a hexadecimal digit"
    )]
    NotHex(usize),
    /// The key file could not be opened or read.
    #[error("cannot read the pre-shared key file {}: {source}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// The error from the operating system.
        #[source]
        source: io::Error,
    },
    /// The key file is a directory, device or other non-regular file.
    #[error("the pre-shared key file {} is not a regular file", path.display())]
    NotAFile {
        /// The key file.
        path: PathBuf,
    },
    /// The key file's group or others may read or write it, so the key is
    /// refused: anyone who can read it can pose as the guest.
    #[error(
        "the pre-shared key file {} can be read or written by other users (mode {mode:04o}); \
         it must be private to its owner: run `chmod 600 {}` (and, as the key may have been \
         seen, consider replacing it)",
        path.display(),
        path.display()
    )]
    Insecure {
        /// The key file.
        path: PathBuf,
        /// Its permission bits (`st_mode & 0o7777`).
        mode: u32,
    },
    /// The key file was read but its contents are not a key.
    #[error("the pre-shared key file {} does not hold a key: {error}", path.display())]
    BadFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong with its contents ([`PskError::WrongLength`] or
        /// [`PskError::NotHex`]).
        #[source]
        error: Box<PskError>,
    },
    /// `psk new` was asked to write a key to a path that already exists.
    #[error(
        "{} already exists; a new key never overwrites a file (remove it first to replace the key)",
        path.display()
    )]
    Exists {
        /// The existing file, left untouched.
        path: PathBuf,
    },
    /// The new key file could not be created, written or synced; a partly
    /// written file is removed.
    #[error("cannot write the pre-shared key file {}: {source}", path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// The error from the operating system.
        #[source]
        source: io::Error,
    },
    /// getrandom(2) failed, so no key was made.
    #[error("cannot get random bytes from the operating system for a new key: {0}")]
    Random(#[source] io::Error),
}

impl Psk {
    /// Parses exactly [`PSK_HEX_LEN`] hexadecimal digits (either case),
    /// ignoring whitespace around them.
    pub fn from_hex(text: &str) -> Result<Psk, PskError> {
        let digits = text.trim().as_bytes();
        if digits.len() != PSK_HEX_LEN {
            return Err(PskError::WrongLength(text.trim().chars().count()));
        }
        let mut key = Psk([0; PSK_LEN]);
        for (i, pair) in digits.chunks_exact(2).enumerate() {
            let high = hex_value(pair[0]).ok_or(PskError::NotHex(2 * i + 1))?;
            let low = hex_value(pair[1]).ok_or(PskError::NotHex(2 * i + 2))?;
            key.0[i] = high << 4 | low;
        }
        Ok(key)
    }

    /// The key as [`PSK_HEX_LEN`] lowercase hexadecimal digits, as a key
    /// file holds it.
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = String::with_capacity(PSK_HEX_LEN);
        for byte in self.0 {
            text.push(char::from(DIGITS[usize::from(byte >> 4)]));
            text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
        }
        text
    }

    /// A new random key from the operating system's CSPRNG (the getrandom
    /// system call), never from the daemon's own pool: a key must not depend
    /// on anything a guest could have influenced or seen.
    pub fn generate() -> Result<Psk, PskError> {
        let mut key = Psk([0; PSK_LEN]);
        kernel_random(&mut key.0).map_err(PskError::Random)?;
        Ok(key)
    }

    /// Reads a key file: the hex key, optionally followed by a newline.
    /// Refuses a file that its group or others may read or write, as anyone
    /// who can read the key can pose as the guest, and anyone who can
    /// write it can lock the guest out.
    pub fn load(path: &Path) -> Result<Psk, PskError> {
        let read_error = |source| PskError::Read {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(read_error)?;
        // The checks look at the open file, not the path, so the file
        // cannot be swapped between the check and the read.
        let metadata = file.metadata().map_err(read_error)?;
        if !metadata.is_file() {
            return Err(PskError::NotAFile {
                path: path.to_owned(),
            });
        }
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(PskError::Insecure {
                path: path.to_owned(),
                mode,
            });
        }
        // Wiped when dropped, on every path out of here: it holds the key.
        let mut bytes = Zeroizing::new(Vec::with_capacity(PSK_HEX_LEN + 1));
        file.take(MAX_KEY_FILE)
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        let parsed = match std::str::from_utf8(&bytes) {
            Ok(text) => Psk::from_hex(text),
            // Report the first byte that is not ASCII as a bad digit.
            Err(e) => Err(PskError::NotHex(e.valid_up_to() + 1)),
        };
        parsed.map_err(|error| PskError::BadFile {
            path: path.to_owned(),
            error: Box::new(error),
        })
    }

    fn as_bytes(&self) -> &[u8; PSK_LEN] {
        &self.0
    }
}

/// Compares in constant time, so that comparing keys tells nothing about
/// where they differ.
impl PartialEq for Psk {
    fn eq(&self, other: &Psk) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Psk {}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<secret>)")
    }
}

impl Drop for Psk {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// The `Drop` above wipes the key; this marker says so to code that asks.
impl ZeroizeOnDrop for Psk {}

/// Writes a new random key to `path` (created with mode 0600) and returns
/// it. Never overwrites: an existing file is [`PskError::Exists`], as
/// replacing a key silently would lock out the guest that holds the old one.
pub fn write_new_psk(path: &Path) -> Result<Psk, PskError> {
    let key = Psk::generate()?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => PskError::Exists {
                path: path.to_owned(),
            },
            _ => PskError::Write {
                path: path.to_owned(),
                source,
            },
        })?;
    let mut line = Zeroizing::new(key.to_hex().into_bytes());
    line.push(b'\n');
    let written = file.write_all(&line).and_then(|()| file.sync_all());
    if let Err(source) = written {
        // The file is ours (create_new) and holds no usable key; leaving it
        // would make the next attempt fail with Exists.
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(PskError::Write {
            path: path.to_owned(),
            source,
        });
    }
    Ok(key)
}

/// Why an encrypted TCP connection could not be set up. The server logs it
/// and closes the connection without an answer; the client reports it.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading or writing the socket failed (timeouts included).
    #[error("connection error during the handshake: {0}")]
    Io(#[from] io::Error),
    /// The peer's first bytes are not a "VRNS" hello of [`HELLO_VERSION`]: a
    /// plaintext client, a port scanner, another protocol.
    #[error(
        "the peer does not speak the vhost-rng encrypted transport (no \"VRNS\" hello of version {HELLO_VERSION})"
    )]
    NotOurProtocol,
    /// The name in the hello is empty, too long, or has characters outside
    /// `[A-Za-z0-9._-]` (see [`is_valid_identity`]); on the client side, the
    /// name it was given to send.
    #[error(
        "the hello carries no valid guest name (1 to {MAX_IDENTITY} letters, digits, '.', '_' or '-')"
    )]
    BadIdentity,
    /// Server side: the hello names a guest that has no pre-shared key
    /// configured (the name is given).
    #[error("no pre-shared key is configured for a guest named '{0}'")]
    UnknownIdentity(String),
    /// Server side: handshake message 1 does not decrypt under the named
    /// guest's key, so the client holds another key or the hello was altered
    /// (the name is given).
    #[error(
        "'{0}' did not prove it holds its pre-shared key (a different key, or a hello altered in transit)"
    )]
    WrongCredential(String),
    /// Client side: the server read the hello and message 1, then closed the
    /// connection without answering; that is how it refuses an unknown name
    /// or a wrong key, without saying which.
    #[error(
        "the host closed the connection during the handshake: it does not accept this guest's name or pre-shared key"
    )]
    Refused,
    /// Client side: the server reset the connection without reading the
    /// handshake, as it does when too many handshakes are in progress; not a
    /// verdict on the name or key.
    #[error(
        "the host closed the connection without reading the handshake: it may be busy (too many connections in their handshake at once); this says nothing about the guest's name or key"
    )]
    Dropped,
    /// Any other failure of the Noise state machine, or a handshake frame of
    /// the wrong size; the text says what.
    #[error("Noise handshake failed: {0}")]
    Noise(String),
}

/// An established, encrypted stream: plaintext written to it goes out in
/// frames of at most [`MAX_FRAME_PLAINTEXT`] bytes each, and reads hand out
/// the plaintext of the frames received.
///
/// A read or write interrupted by a socket timeout can be retried: a frame
/// half received or half sent is kept and resumed. Like a `BufWriter`, a
/// write that has encrypted its data reports success even if sending it
/// failed; the frame stays pending and the error comes from the next
/// `write`, `flush` or `read`, each of which first sends what is pending.
/// Call `flush` after a message to see its errors at once.
///
/// A frame that fails to decrypt ends the stream: that read and every
/// later one fail with [`io::ErrorKind::InvalidData`].
pub struct SecureStream<S> {
    stream: S,
    transport: TransportState,
    identity: String,
    /// The frame being received: its 2 length bytes, then its message.
    rx: Vec<u8>,
    /// The plaintext of the last frame; `plain[plain_pos..]` is not yet read.
    plain: Vec<u8>,
    plain_pos: usize,
    /// A frame accepted by `write` but not yet sent in full: `tx[tx_pos..]`.
    tx: Vec<u8>,
    tx_pos: usize,
    /// Set once a frame failed to authenticate; nothing after it is trusted.
    poisoned: bool,
}

impl<S> SecureStream<S> {
    fn new(stream: S, transport: TransportState, identity: &str) -> Self {
        SecureStream {
            stream,
            transport,
            identity: identity.to_owned(),
            rx: Vec::new(),
            plain: Vec::new(),
            plain_pos: 0,
            tx: Vec::new(),
            tx_pos: 0,
            poisoned: false,
        }
    }

    /// The underlying stream (for its address or to set timeouts). Reading
    /// or writing it directly would corrupt the encrypted stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The guest name the handshake authenticated: the peer's on the
    /// server, this side's own on the client.
    pub fn identity(&self) -> &str {
        &self.identity
    }
}

impl<S: Read> SecureStream<S> {
    /// Receives and decrypts the next frame into `plain`. `Ok(false)` when
    /// the peer closed the connection between frames.
    fn receive_frame(&mut self) -> io::Result<bool> {
        if self.poisoned {
            return Err(invalid_data(
                "an earlier frame failed to authenticate; nothing more is read from this connection",
            ));
        }
        loop {
            let need = match *self.rx.as_slice() {
                [high, low, ..] => 2 + usize::from(u16::from_be_bytes([high, low])),
                _ => 2,
            };
            if need == 2 && self.rx.len() == 2 {
                self.poisoned = true;
                return Err(invalid_data(
                    "received an empty frame, which no sender produces",
                ));
            }
            let start = self.rx.len();
            if start == need {
                break;
            }
            self.rx.resize(need, 0);
            let result = self.stream.read(&mut self.rx[start..]);
            self.rx.truncate(start + *result.as_ref().unwrap_or(&0));
            match result {
                Ok(0) if start == 0 => return Ok(false),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection in the middle of an encrypted frame",
                    ));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The partial frame stays in `rx`; a retry carries on.
                Err(e) => return Err(e),
            }
        }
        let message = &self.rx[2..];
        self.plain.resize(message.len().saturating_sub(TAG_LEN), 0);
        let decrypted = self.transport.read_message(message, &mut self.plain);
        self.rx.clear();
        match decrypted {
            Ok(len) => {
                self.plain.truncate(len);
                self.plain_pos = 0;
                Ok(true)
            }
            Err(_) => {
                self.poisoned = true;
                // Wipes the whole buffer, spare capacity included, and
                // empties it.
                self.plain.zeroize();
                Err(invalid_data(
                    "an encrypted frame failed to authenticate: it was altered in transit or does not come from the peer of the handshake",
                ))
            }
        }
    }
}

impl<S: Read + Write> Read for SecureStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // A frame that a write could not finish sending (a write timeout)
        // goes out before waiting for the peer, who may be waiting for it.
        self.send_pending()?;
        // A frame may carry no plaintext (Noise allows it, this side never
        // sends one): read on rather than return 0, which means the end.
        while self.plain_pos == self.plain.len() {
            if !self.receive_frame()? {
                return Ok(0);
            }
        }
        let available = &self.plain[self.plain_pos..];
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.plain_pos += n;
        if self.plain_pos == self.plain.len() {
            // What passes through here is entropy for a guest's kernel;
            // keep no copy once it has been handed on. This wipes the whole
            // buffer, spare capacity included, and empties it.
            self.plain.zeroize();
            self.plain_pos = 0;
        }
        Ok(n)
    }
}

impl<S: Write> SecureStream<S> {
    /// Sends what is left of the pending frame.
    fn send_pending(&mut self) -> io::Result<()> {
        while self.tx_pos < self.tx.len() {
            match self.stream.write(&self.tx[self.tx_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.tx_pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.tx.clear();
        self.tx_pos = 0;
        Ok(())
    }
}

impl<S: Write> Write for SecureStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // One frame is pending at most: it must be out before the next is
        // made, or an error would let them pile up.
        self.send_pending()?;
        if buf.is_empty() {
            return Ok(0);
        }
        let chunk = &buf[..buf.len().min(MAX_FRAME_PLAINTEXT)];
        self.tx.resize(2 + chunk.len() + TAG_LEN, 0);
        let len = match self.transport.write_message(chunk, &mut self.tx[2..]) {
            Ok(len) => len,
            Err(e) => {
                self.tx.clear();
                return Err(io::Error::other(format!("cannot encrypt a frame: {e}")));
            }
        };
        let Ok(length_field) = u16::try_from(len) else {
            self.tx.clear();
            return Err(io::Error::other(
                "an encrypted frame outgrew its length field",
            ));
        };
        self.tx[..2].copy_from_slice(&length_field.to_be_bytes());
        self.tx.truncate(2 + len);
        // The chunk is encrypted under a nonce now and must go out exactly
        // once, so it counts as written whatever happens next. If sending
        // fails, the frame stays pending and the next write or flush retries
        // it and reports the error.
        let _ = self.send_pending();
        Ok(chunk.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_pending()?;
        self.stream.flush()
    }
}

impl<S> Drop for SecureStream<S> {
    fn drop(&mut self) {
        self.plain.zeroize();
    }
}

impl<S: crate::deadline::TimedStream> crate::deadline::TimedStream for SecureStream<S> {
    fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        self.get_ref().set_read_timeout(timeout)
    }
    fn set_write_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        self.get_ref().set_write_timeout(timeout)
    }
}

impl<S: fmt::Debug> fmt::Debug for SecureStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureStream")
            .field("stream", &self.stream)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Client side: sends the hello naming `identity` and Noise message 1, then
/// reads message 2. Timeouts are the caller's: set them on `stream` first.
///
/// [`HandshakeError::Refused`] means the server read the hello and message
/// 1 and then closed the connection instead of answering, which is what it
/// does for a wrong key or a name it does not know (it does not say
/// which). [`HandshakeError::Dropped`] means it reset the connection
/// without reading them, which is what it does when it has too many
/// handshakes in progress.
pub fn connect_handshake<S: Read + Write>(
    mut stream: S,
    identity: &str,
    psk: &Psk,
) -> Result<SecureStream<S>, HandshakeError> {
    let hello = encode_hello(identity)?;
    let mut noise = handshake_state(psk, &hello, Role::Initiator)?;
    let mut message = [0; HANDSHAKE_MESSAGE_LEN];
    let len = noise
        .write_message(&[], &mut message)
        .map_err(noise_error)?;
    // The hello and message 1 go out in one write, usually one segment.
    let mut first = hello;
    push_frame(&mut first, &message[..len]);
    // A reset (seen as such, or as a broken pipe once it has been) is a
    // close with what we sent unread.
    let reset = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
        )
    };
    if let Err(e) = stream.write_all(&first).and_then(|()| stream.flush()) {
        return Err(if reset(&e) {
            HandshakeError::Dropped
        } else {
            e.into()
        });
    }

    let reply = match read_handshake_frame(&mut stream, 2) {
        Ok(reply) => reply?,
        // The server reads all we sent before it refuses a name or a key,
        // so that refusal is an orderly close. Over its handshake limits it
        // closes at once with a reset, without reading: that is not a
        // verdict on the key, and must not send the operator looking for a
        // wrong one.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(HandshakeError::Refused);
        }
        Err(e) if reset(&e) => return Err(HandshakeError::Dropped),
        Err(e) => return Err(e.into()),
    };
    noise.read_message(&reply, &mut []).map_err(|e| match e {
        // The server proved the key in message 2 as the client did in
        // message 1; only a server without the key (or an attacker on
        // the path) fails that.
        snow::Error::Decrypt => HandshakeError::Noise(
            "the host's reply did not authenticate under this guest's key".to_owned(),
        ),
        e => noise_error(e),
    })?;
    let transport = noise.into_transport_mode().map_err(noise_error)?;
    Ok(SecureStream::new(stream, transport, identity))
}

/// Server side: reads the hello and message 1, asks `lookup` for the named
/// guest's key, checks message 1 against it and answers with message 2.
/// Timeouts are the caller's: set them on `stream` first.
///
/// On any error nothing is sent back: the caller logs it and closes the
/// connection. [`HandshakeError::WrongCredential`] and
/// [`HandshakeError::UnknownIdentity`] are the two a misconfigured (or
/// hostile) guest causes.
pub fn accept_handshake<S: Read + Write>(
    mut stream: S,
    lookup: impl FnOnce(&str) -> Option<Psk>,
) -> Result<SecureStream<S>, HandshakeError> {
    let mut hello = vec![0; HELLO_HEADER_LEN];
    stream.read_exact(&mut hello)?;
    if hello[..4] != HELLO_MAGIC || hello[4] != HELLO_VERSION {
        return Err(HandshakeError::NotOurProtocol);
    }
    let identity_len = usize::from(hello[5]);
    if identity_len == 0 || identity_len > MAX_IDENTITY {
        return Err(HandshakeError::BadIdentity);
    }
    hello.resize(HELLO_HEADER_LEN + identity_len, 0);
    stream.read_exact(&mut hello[HELLO_HEADER_LEN..])?;
    let identity = std::str::from_utf8(&hello[HELLO_HEADER_LEN..])
        .ok()
        .filter(|name| is_valid_identity(name))
        .ok_or(HandshakeError::BadIdentity)?
        .to_owned();
    // Message 1 is read before the lookup so that every refusal looks the
    // same to the client: all it sent was read, then the connection closed
    // (no reset from unread data that would tell an unknown name apart).
    let first = read_handshake_frame(&mut stream, 1)??;
    let psk = lookup(&identity).ok_or_else(|| HandshakeError::UnknownIdentity(identity.clone()))?;
    let mut noise = handshake_state(&psk, &hello, Role::Responder)?;
    drop(psk);
    noise.read_message(&first, &mut []).map_err(|e| match e {
        // The payload of message 1 is sealed with a key derived from the
        // PSK and the prologue: failing to open it means another key or
        // another hello.
        snow::Error::Decrypt => HandshakeError::WrongCredential(identity.clone()),
        e => noise_error(e),
    })?;
    let mut message = [0; HANDSHAKE_MESSAGE_LEN];
    let len = noise
        .write_message(&[], &mut message)
        .map_err(noise_error)?;
    let mut reply = Vec::with_capacity(2 + len);
    push_frame(&mut reply, &message[..len]);
    stream.write_all(&reply)?;
    stream.flush()?;
    let transport = noise.into_transport_mode().map_err(noise_error)?;
    Ok(SecureStream::new(stream, transport, &identity))
}

/// True for a name a hello may carry: 1 to [`MAX_IDENTITY`] characters
/// from `[A-Za-z0-9._-]`, the rule for guest names.
pub fn is_valid_identity(name: &str) -> bool {
    (1..=MAX_IDENTITY).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn encode_hello(identity: &str) -> Result<Vec<u8>, HandshakeError> {
    if !is_valid_identity(identity) {
        return Err(HandshakeError::BadIdentity);
    }
    let len = u8::try_from(identity.len()).map_err(|_| HandshakeError::BadIdentity)?;
    // Room for message 1's frame too: the two go out in one write.
    let mut hello =
        Vec::with_capacity(HELLO_HEADER_LEN + identity.len() + 2 + HANDSHAKE_MESSAGE_LEN);
    hello.extend_from_slice(&HELLO_MAGIC);
    hello.push(HELLO_VERSION);
    hello.push(len);
    hello.extend_from_slice(identity.as_bytes());
    Ok(hello)
}

enum Role {
    Initiator,
    Responder,
}

/// A handshake keyed by `psk` whose transcript starts with `prologue` (the
/// hello), so both sides must have seen the same hello to agree.
fn handshake_state(
    psk: &Psk,
    prologue: &[u8],
    role: Role,
) -> Result<HandshakeState, HandshakeError> {
    let params = NOISE_PARAMS.parse().map_err(noise_error)?;
    let resolver = FallbackResolver::new(Box::new(KernelRandomResolver), Box::new(DefaultResolver));
    let builder = Builder::with_resolver(params, Box::new(resolver))
        .psk(0, psk.as_bytes())
        .and_then(|builder| builder.prologue(prologue))
        .map_err(noise_error)?;
    match role {
        Role::Initiator => builder.build_initiator(),
        Role::Responder => builder.build_responder(),
    }
    .map_err(noise_error)
}

/// Fills `buf` from the kernel's `getrandom(2)`, waiting until the kernel
/// generator is seeded.
///
/// Not through the `getrandom` crate: in a statically linked binary (how
/// the agent ships) it cannot find the C library's `getrandom` and falls
/// back to polling `/dev/random`. Polling does not make the kernel seed its
/// generator, while a blocking `getrandom(2)` does (from CPU timing
/// jitter), so in a freshly booted guest with nothing else asking for
/// randomness, the agent that is there to seed the generator waited for it
/// forever.
pub fn kernel_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}

/// Gives snow [`kernel_random`] for its ephemeral keys, and nothing else
/// (the other primitives come from its default resolver).
struct KernelRandomResolver;

struct KernelRandom;

impl Random for KernelRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        kernel_random(dest).map_err(|_| snow::Error::Rng)
    }
}

impl CryptoResolver for KernelRandomResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(KernelRandom))
    }

    fn resolve_dh(&self, _: &DHChoice) -> Option<Box<dyn Dh>> {
        None
    }

    fn resolve_hash(&self, _: &HashChoice) -> Option<Box<dyn Hash>> {
        None
    }

    fn resolve_cipher(&self, _: &CipherChoice) -> Option<Box<dyn Cipher>> {
        None
    }
}

/// Reads handshake message `number` in its frame. Both messages have one
/// fixed length, checked before the body is read, so a peer cannot make
/// the daemon allocate or wait for more. The outer error is the stream's,
/// the inner one a message of the wrong length.
fn read_handshake_frame(
    stream: &mut impl Read,
    number: u8,
) -> io::Result<Result<[u8; HANDSHAKE_MESSAGE_LEN], HandshakeError>> {
    let mut length = [0; 2];
    stream.read_exact(&mut length)?;
    let length = usize::from(u16::from_be_bytes(length));
    if length != HANDSHAKE_MESSAGE_LEN {
        return Ok(Err(HandshakeError::Noise(format!(
            "handshake message {number} is {length} bytes, not {HANDSHAKE_MESSAGE_LEN}"
        ))));
    }
    let mut message = [0; HANDSHAKE_MESSAGE_LEN];
    stream.read_exact(&mut message)?;
    Ok(Ok(message))
}

/// Appends `message` to `out` as a frame. Handshake messages only; their
/// length is fixed and far below [`MAX_FRAME`].
fn push_frame(out: &mut Vec<u8>, message: &[u8]) {
    let len = u16::try_from(message.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
}

/// Reads one whole frame during the handshake. EOF anywhere in it is
/// `UnexpectedEof`.
fn noise_error(error: snow::Error) -> HandshakeError {
    HandshakeError::Noise(error.to_string())
}

fn invalid_data(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{REQUEST_LEN, Request, encode_request};
    use std::collections::HashSet;
    use std::fs;
    use std::net::Shutdown;
    use std::os::unix::net::UnixStream;
    use std::thread::{self, JoinHandle};
    use std::time::Duration;

    const GUEST: &str = "vm1";
    /// Long enough never to fire in a passing test, short enough that a
    /// broken one fails instead of hanging.
    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    fn key(byte: u8) -> Psk {
        Psk([byte; PSK_LEN])
    }

    fn timed(stream: UnixStream) -> UnixStream {
        stream.set_read_timeout(Some(TEST_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(TEST_TIMEOUT)).unwrap();
        stream
    }

    fn socket_pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (timed(a), timed(b))
    }

    /// Runs `accept_handshake` on `stream` in a thread, the server knowing
    /// only [`GUEST`], with `psk`.
    fn server(
        stream: UnixStream,
        psk: Psk,
    ) -> JoinHandle<Result<SecureStream<UnixStream>, HandshakeError>> {
        thread::spawn(move || accept_handshake(stream, |name| (name == GUEST).then(|| psk.clone())))
    }

    /// Copies bytes from `from` to `to` until `from` ends, passing each
    /// chunk to `edit` with its offset in the stream first, and returns
    /// what went through (after editing).
    fn relay(
        mut from: UnixStream,
        mut to: UnixStream,
        mut edit: impl FnMut(usize, &mut [u8]) + Send + 'static,
    ) -> JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = [0; 8192];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                edit(seen.len(), &mut buf[..n]);
                seen.extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
            seen
        })
    }

    /// A client end and a server end joined through a relay that lets
    /// `edit` change what the client sends, and records both directions.
    struct Wire {
        client: UnixStream,
        server: UnixStream,
        upstream: JoinHandle<Vec<u8>>,
        downstream: JoinHandle<Vec<u8>>,
    }

    fn wire(edit_upstream: impl FnMut(usize, &mut [u8]) + Send + 'static) -> Wire {
        let (client, relay_client) = socket_pair();
        let (relay_server, server) = socket_pair();
        let upstream = relay(
            relay_client.try_clone().unwrap(),
            relay_server.try_clone().unwrap(),
            edit_upstream,
        );
        let downstream = relay(relay_server, relay_client, |_, _| {});
        Wire {
            client,
            server,
            upstream,
            downstream,
        }
    }

    /// Deterministic bytes with no repeated 32-byte window.
    fn noise_bytes(len: usize) -> Vec<u8> {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[3]
            })
            .collect()
    }

    /// Where the client's first transport frame starts: after the hello
    /// for [`GUEST`] and the frame of message 1.
    fn first_transport_frame() -> usize {
        HELLO_HEADER_LEN + GUEST.len() + 2 + HANDSHAKE_MESSAGE_LEN
    }

    #[test]
    fn the_noise_parameters_are_supported() {
        let hello = encode_hello(GUEST).unwrap();
        handshake_state(&key(1), &hello, Role::Initiator).unwrap();
        handshake_state(&key(1), &hello, Role::Responder).unwrap();
    }

    #[test]
    fn round_trip_both_ways_including_200_kib() {
        let (client, server_end) = socket_pair();
        let serving = server(server_end, key(7));
        let mut client = connect_handshake(client, GUEST, &key(7)).unwrap();
        let mut server = serving.join().unwrap().unwrap();
        assert_eq!(client.identity(), GUEST);
        assert_eq!(server.identity(), GUEST);
        assert!(client.get_ref().peer_addr().is_ok());

        client.write_all(b"ping").unwrap();
        client.flush().unwrap();
        let mut buf = [0; 4];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").unwrap();
        server.flush().unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");

        // 200 KiB up, echoed back down: several full frames each way.
        let data = noise_bytes(200 * 1024);
        let len = data.len();
        let echo = thread::spawn(move || {
            let mut got = vec![0; len];
            server.read_exact(&mut got).unwrap();
            server.write_all(&got).unwrap();
            server.flush().unwrap();
            got
        });
        client.write_all(&data).unwrap();
        client.flush().unwrap();
        let mut back = vec![0; len];
        client.read_exact(&mut back).unwrap();
        assert!(
            echo.join().unwrap() == data,
            "the server got the data intact"
        );
        assert!(back == data, "the client got the echo intact");
    }

    #[test]
    fn a_clean_close_between_frames_is_the_end_of_the_stream() {
        let (client, server_end) = socket_pair();
        let serving = server(server_end, key(7));
        let mut client = connect_handshake(client, GUEST, &key(7)).unwrap();
        let mut server = serving.join().unwrap().unwrap();
        client.write_all(b"last words").unwrap();
        client.flush().unwrap();
        drop(client);
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"last words");
        assert_eq!(server.read(&mut [0; 8]).unwrap(), 0);
    }

    #[test]
    fn a_wrong_key_is_a_wrong_credential_to_the_server_and_refused_to_the_client() {
        let (client, server_end) = socket_pair();
        let serving = server(server_end, key(7));
        let err = connect_handshake(client, GUEST, &key(8)).unwrap_err();
        assert!(matches!(err, HandshakeError::Refused), "{err}");
        assert!(err.to_string().contains("does not accept"), "{err}");
        let err = serving.join().unwrap().unwrap_err();
        assert!(
            matches!(&err, HandshakeError::WrongCredential(name) if name == GUEST),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "'vm1' did not prove it holds its pre-shared key (a different key, or a hello altered in transit)"
        );
    }

    #[test]
    fn an_unknown_name_is_unknown_to_the_server_and_refused_to_the_client() {
        let (client, server_end) = socket_pair();
        let serving = server(server_end, key(7));
        let err = connect_handshake(client, "vm9", &key(7)).unwrap_err();
        assert!(matches!(err, HandshakeError::Refused), "{err}");
        let err = serving.join().unwrap().unwrap_err();
        assert!(
            matches!(&err, HandshakeError::UnknownIdentity(name) if name == "vm9"),
            "{err}"
        );
    }

    #[test]
    fn a_name_altered_in_transit_fails_the_handshake() {
        // Every name has the same key here, so only the prologue (the hello
        // bound into the handshake) can catch the change.
        let first_name_byte = HELLO_HEADER_LEN;
        let wire = wire(move |offset, chunk| {
            if let Some(byte) = first_name_byte
                .checked_sub(offset)
                .and_then(|i| chunk.get_mut(i))
            {
                *byte = b'w'; // "vm1" becomes "wm1"
            }
        });
        let serving = thread::spawn(move || accept_handshake(wire.server, |_| Some(key(7))));
        let err = connect_handshake(wire.client, GUEST, &key(7)).unwrap_err();
        assert!(matches!(err, HandshakeError::Refused), "{err}");
        let err = serving.join().unwrap().unwrap_err();
        assert!(
            matches!(&err, HandshakeError::WrongCredential(name) if name == "wm1"),
            "{err}"
        );
        wire.upstream.join().unwrap();
        wire.downstream.join().unwrap();
    }

    #[test]
    fn another_protocol_or_version_is_not_ours() {
        let entropy_request = encode_request(&Request { length: 64 });
        let mut other_version = encode_hello(GUEST).unwrap();
        other_version[4] = 2;
        for hello in [
            entropy_request.to_vec(),
            other_version,
            b"GET / HTTP/1.1\r\n".to_vec(),
        ] {
            let (mut client, server_end) = socket_pair();
            let serving = server(server_end, key(7));
            client.write_all(&hello).unwrap();
            let err = serving.join().unwrap().unwrap_err();
            assert!(matches!(err, HandshakeError::NotOurProtocol), "{err}");
        }
    }

    #[test]
    fn a_handshake_message_of_the_wrong_length_is_refused_before_its_body() {
        // A frame announcing 64 KiB, of which nothing follows: the server
        // must answer from the length alone rather than wait for the body.
        let (mut client, server_end) = socket_pair();
        let serving = server(server_end, key(7));
        let mut opening = encode_hello(GUEST).unwrap();
        opening.extend_from_slice(&u16::MAX.to_be_bytes());
        client.write_all(&opening).unwrap();
        let err = serving.join().unwrap().unwrap_err();
        assert!(
            err.to_string()
                .contains("handshake message 1 is 65535 bytes, not 48"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_name_is_rejected_on_both_sides() {
        let too_long = "a".repeat(MAX_IDENTITY + 1);
        for (len, name) in [
            (0, &b""[..]),
            (65, too_long.as_bytes()),
            (3, b"a/b"),
            (3, b"a b"),
            (2, "\u{e9}".as_bytes()),
            (2, &[0xff, 0xfe]),
        ] {
            let (mut client, server_end) = socket_pair();
            let serving = server(server_end, key(7));
            let mut hello = HELLO_MAGIC.to_vec();
            hello.extend([HELLO_VERSION, len]);
            hello.extend_from_slice(name);
            client.write_all(&hello).unwrap();
            let err = serving.join().unwrap().unwrap_err();
            assert!(
                matches!(err, HandshakeError::BadIdentity),
                "{name:?}: {err}"
            );
        }

        for name in ["", "a/b", "vm 1", too_long.as_str(), "\u{e9}t\u{e9}"] {
            let (client, mut server_end) = socket_pair();
            let err = connect_handshake(client, name, &key(7)).unwrap_err();
            assert!(
                matches!(err, HandshakeError::BadIdentity),
                "{name:?}: {err}"
            );
            assert_eq!(server_end.read(&mut [0; 16]).unwrap(), 0, "nothing sent");
        }
        assert!(is_valid_identity(&"a".repeat(MAX_IDENTITY)));
        assert!(is_valid_identity("Guest-01.example_a"));
    }

    #[test]
    fn the_wire_carries_no_plaintext() {
        let wire = wire(|_, _| {});
        let serving = server(wire.server, key(7));
        let mut client = connect_handshake(wire.client, GUEST, &key(7)).unwrap();
        let mut server = serving.join().unwrap().unwrap();

        let request = encode_request(&Request { length: 64 });
        let data = noise_bytes(200 * 1024);
        let len = data.len();
        let echo = thread::spawn(move || {
            let mut got = vec![0; REQUEST_LEN + len];
            server.read_exact(&mut got).unwrap();
            server.write_all(&got).unwrap();
            server.flush().unwrap();
        });
        client.write_all(&request).unwrap();
        client.write_all(&data).unwrap();
        client.flush().unwrap();
        let mut back = vec![0; REQUEST_LEN + len];
        client.read_exact(&mut back).unwrap();
        echo.join().unwrap();
        drop(client);
        let up = wire.upstream.join().unwrap();
        let down = wire.downstream.join().unwrap();

        for captured in [&up, &down] {
            assert!(
                !captured.windows(4).any(|w| w == b"VRNG"),
                "an entropy-protocol header went out in clear"
            );
            let windows: HashSet<&[u8]> = captured.windows(32).collect();
            assert!(
                !data.windows(32).any(|w| windows.contains(w)),
                "32 bytes of plaintext went out in clear"
            );
        }
        // The guest's name is the one thing sent in clear, by design.
        assert_eq!(&up[..HELLO_HEADER_LEN + GUEST.len()], b"VRNS\x01\x03vm1");

        // Upstream after the hello: message 1, then transport frames of at
        // most MAX_FRAME bytes each, tiling the capture exactly.
        let mut frames = Vec::new();
        let mut rest = &up[HELLO_HEADER_LEN + GUEST.len()..];
        while let [high, low, tail @ ..] = rest {
            let frame_len = usize::from(u16::from_be_bytes([*high, *low]));
            assert!(frame_len <= MAX_FRAME && frame_len <= tail.len());
            frames.push(frame_len);
            rest = &tail[frame_len..];
        }
        assert!(rest.is_empty());
        assert_eq!(frames[0], HANDSHAKE_MESSAGE_LEN);
        let transport = &frames[1..];
        assert_eq!(transport[0], REQUEST_LEN + TAG_LEN);
        assert_eq!(
            transport[1..],
            [
                MAX_FRAME,
                MAX_FRAME,
                MAX_FRAME,
                len - 3 * MAX_FRAME_PLAINTEXT + TAG_LEN
            ]
        );
    }

    #[test]
    fn an_altered_frame_is_invalid_data_and_ends_the_stream() {
        let target = first_transport_frame() + 2 + 3;
        let wire = wire(move |offset, chunk| {
            if let Some(byte) = target.checked_sub(offset).and_then(|i| chunk.get_mut(i)) {
                *byte ^= 0x01;
            }
        });
        let serving = server(wire.server, key(7));
        let mut client = connect_handshake(wire.client, GUEST, &key(7)).unwrap();
        let mut server = serving.join().unwrap().unwrap();
        client.write_all(b"altered on the way").unwrap();
        client.flush().unwrap();
        client.write_all(b"fine, but too late").unwrap();
        client.flush().unwrap();
        let mut buf = [0; 64];
        let err = server.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let err = server.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "still: {err}");
    }

    /// A handshake over a socket pair, with a second handle on the client's
    /// socket to write raw bytes behind the encryption's back.
    fn established() -> (
        UnixStream,
        SecureStream<UnixStream>,
        SecureStream<UnixStream>,
    ) {
        let (client, server_end) = socket_pair();
        let raw = client.try_clone().unwrap();
        let serving = server(server_end, key(7));
        let client = connect_handshake(client, GUEST, &key(7)).unwrap();
        (raw, client, serving.join().unwrap().unwrap())
    }

    #[test]
    fn an_empty_frame_is_invalid_data() {
        let (mut raw, _client, mut server) = established();
        raw.write_all(&[0, 0]).unwrap();
        let err = server.read(&mut [0; 8]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn a_frame_too_short_for_its_tag_is_invalid_data() {
        let (mut raw, _client, mut server) = established();
        raw.write_all(&[0, 3, 1, 2, 3]).unwrap();
        let err = server.read(&mut [0; 8]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn a_close_in_the_middle_of_a_frame_is_unexpected_eof() {
        for partial in [&[0][..], &[0, 40], &[0, 40, 1, 2, 3]] {
            let (mut raw, client, mut server) = established();
            raw.write_all(partial).unwrap();
            drop(client);
            drop(raw);
            let err = server.read(&mut [0; 8]).unwrap_err();
            assert_eq!(
                err.kind(),
                io::ErrorKind::UnexpectedEof,
                "{partial:?}: {err}"
            );
        }
    }

    #[test]
    fn a_read_timed_out_in_the_middle_of_a_frame_resumes() {
        // The client's frame reaches the server in two parts, the second
        // after the server's read timeout has fired once.
        let (client, relay_client) = socket_pair();
        let (mut relay_server, server_end) = socket_pair();
        let relay_back = relay(
            relay_server.try_clone().unwrap(),
            relay_client.try_clone().unwrap(),
            |_, _| {},
        );
        let (resume, resumed) = std::sync::mpsc::channel::<()>();
        let forward = thread::spawn(move || {
            let mut relay_client = relay_client;
            let mut handshake = vec![0; first_transport_frame()];
            relay_client.read_exact(&mut handshake).unwrap();
            relay_server.write_all(&handshake).unwrap();
            let mut frame = vec![0; 2 + b"hello".len() + TAG_LEN];
            relay_client.read_exact(&mut frame).unwrap();
            relay_server.write_all(&frame[..9]).unwrap();
            // The rest only once the server has given up waiting for it.
            resumed.recv().unwrap();
            relay_server.write_all(&frame[9..]).unwrap();
        });
        let serving = server(server_end, key(7));
        let mut client = connect_handshake(client, GUEST, &key(7)).unwrap();
        let mut server = serving.join().unwrap().unwrap();
        server
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        client.write_all(b"hello").unwrap();
        client.flush().unwrap();
        let mut buf = [0; 5];
        let err = server.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        server
            .get_ref()
            .set_read_timeout(Some(TEST_TIMEOUT))
            .unwrap();
        resume.send(()).unwrap();
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        forward.join().unwrap();
        drop(client);
        drop(server);
        relay_back.join().unwrap();
    }

    #[test]
    fn a_read_first_sends_what_a_timed_out_write_left_pending() {
        let (client, server_end) = socket_pair();
        let serving = server(server_end, key(7));
        let mut client = connect_handshake(client, GUEST, &key(7)).unwrap();
        let mut server = serving.join().unwrap().unwrap();
        // Nobody reads yet: writes fill the socket buffer until one times
        // out with a frame half sent.
        client
            .get_ref()
            .set_write_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let chunk = vec![0x42; MAX_FRAME_PLAINTEXT];
        let mut accepted = 0;
        let err = loop {
            match client.write(&chunk) {
                Ok(n) => accepted += n,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        assert!(client.tx_pos < client.tx.len(), "a frame is pending");
        client
            .get_ref()
            .set_write_timeout(Some(TEST_TIMEOUT))
            .unwrap();
        // The server answers only after everything accepted has arrived;
        // the client's read must push the rest of the pending frame first.
        let answering = thread::spawn(move || {
            let mut got = vec![0; accepted];
            server.read_exact(&mut got).unwrap();
            assert!(got.iter().all(|&b| b == 0x42));
            server.write_all(b"ok").unwrap();
            server.flush().unwrap();
        });
        let mut answer = [0; 2];
        client.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"ok");
        answering.join().unwrap();
    }

    #[test]
    fn psk_hex_round_trips() {
        let text = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
        let psk = Psk::from_hex(text).unwrap();
        assert_eq!(psk.0, std::array::from_fn::<u8, 32, _>(|i| i as u8));
        assert_eq!(psk.to_hex(), text);
        assert_eq!(
            Psk::from_hex(&format!("  {}\n", text.to_uppercase())).unwrap(),
            psk,
            "either case, whitespace around it ignored"
        );
        let random = Psk::generate().unwrap();
        assert_eq!(Psk::from_hex(&random.to_hex()).unwrap(), random);
        assert_ne!(random, Psk::generate().unwrap());
    }

    #[test]
    fn bad_hex_says_what_is_wrong() {
        let good = "ab".repeat(32);
        for (text, expected) in [
            (String::new(), "not 0 characters"),
            (good[..63].to_owned(), "not 63 characters"),
            (format!("{good}0"), "not 65 characters"),
            (format!("0x{}", &good[2..]), "character 2 is not"),
            (format!("{}g", &good[..63]), "character 64 is not"),
            (
                format!("{} {}", &good[..31], &good[32..]),
                "character 32 is not",
            ),
            (format!("{}\u{e9}", &good[..62]), "character 63 is not"),
        ] {
            let err = Psk::from_hex(&text).unwrap_err();
            assert!(err.to_string().contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn debug_does_not_show_the_key() {
        let psk = key(0xab);
        let shown = format!("{psk:?} {psk:#?}");
        assert!(!shown.contains("ab") && !shown.contains("171"), "{shown}");
        assert_eq!(format!("{psk:?}"), "Psk(<secret>)");
    }

    fn key_file(dir: &Path, contents: &str, mode: u32) -> PathBuf {
        let path = dir.join("vm1.key");
        fs::write(&path, contents).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn load_accepts_a_private_file_and_refuses_a_shared_one() {
        let dir = tempfile::tempdir().unwrap();
        let psk = key(0x5a);
        for mode in [0o600, 0o400] {
            let path = key_file(dir.path(), &format!("{}\n", psk.to_hex()), mode);
            assert_eq!(Psk::load(&path).unwrap(), psk, "{mode:o}");
        }
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602, 0o660] {
            let path = key_file(dir.path(), &psk.to_hex(), mode);
            let err = Psk::load(&path).unwrap_err();
            assert!(
                matches!(err, PskError::Insecure { mode: m, .. } if m == mode),
                "{mode:o}: {err}"
            );
            let message = err.to_string();
            assert!(
                message.contains(&format!("chmod 600 {}", path.display())),
                "{message}"
            );
            assert!(message.contains(&format!("{mode:04o}")), "{message}");
        }
    }

    #[test]
    fn load_names_the_file_in_its_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), "not a key\n", 0o600);
        let err = Psk::load(&path).unwrap_err();
        assert!(matches!(err, PskError::BadFile { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("64 hexadecimal digits"), "{message}");

        let path = key_file(dir.path(), &"0".repeat(5000), 0o600);
        assert!(matches!(Psk::load(&path), Err(PskError::BadFile { .. })));

        let missing = dir.path().join("missing.key");
        let err = Psk::load(&missing).unwrap_err();
        assert!(matches!(err, PskError::Read { .. }), "{err}");
        assert!(err.to_string().contains("missing.key"), "{err}");

        let sub = dir.path().join("dir");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o700)).unwrap();
        let err = Psk::load(&sub).unwrap_err();
        assert!(matches!(err, PskError::NotAFile { .. }), "{err}");
    }

    #[test]
    fn write_new_psk_makes_a_private_file_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm1.key");
        let psk = write_new_psk(&path).unwrap();
        let metadata = fs::metadata(&path).unwrap();
        assert_eq!(metadata.permissions().mode() & 0o077, 0);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{}\n", psk.to_hex())
        );
        assert_eq!(Psk::load(&path).unwrap(), psk);

        let err = write_new_psk(&path).unwrap_err();
        assert!(matches!(err, PskError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(Psk::load(&path).unwrap(), psk, "the old key is untouched");

        let err = write_new_psk(&dir.path().join("no/such/dir.key")).unwrap_err();
        assert!(matches!(err, PskError::Write { .. }), "{err}");
    }
}
