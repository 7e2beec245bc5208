// SPDX-License-Identifier: Apache-2.0
//! The entropy protocol: how a guest that has no virtio-rng device (Xen
//! guests, VMMs without vhost-user) asks the host daemon for random bytes
//! over a stream socket (AF_VSOCK, hybrid vsock over Unix, a Unix socket).
//!
//! It is deliberately small and read-only: a client can ask for bytes and
//! nothing else, so there is no way to push data into the daemon's pool.
//! Every message starts with a fixed 12-byte header:
//!
//! ```text
//! request:  "VRNG" | version u8 | type u8   | reserved u16 = 0 | length u32 BE
//! response: "VRNG" | version u8 | status u8 | reserved u16 = 0 | length u32 BE | length bytes
//! ```
//!
//! This module encodes and decodes both headers and holds the blocking
//! client ([`fetch`]); the daemon's server loop builds on the same encoders.
//! docs/protocol.md is the full description, with timeouts and transports.

use std::fmt;
use std::io::{self, Read, Write};
use std::time::Duration;

/// The first four bytes of every request and response.
pub const MAGIC: [u8; 4] = *b"VRNG";
/// The protocol version this side speaks.
pub const VERSION: u8 = 1;
/// Bytes in a request.
pub const REQUEST_LEN: usize = 12;
/// Bytes in a response header (the entropy follows it).
pub const RESPONSE_HEADER_LEN: usize = 12;
/// The most bytes one request may ask for; larger requests are answered
/// with [`Status::BadRequest`].
pub const MAX_REQUEST: u32 = 65536;
/// Request type: give me entropy. The only type in version 1; every other
/// value is reserved and answered with [`Status::BadRequest`].
pub const REQUEST_GET: u8 = 1;
/// The vsock port (and, over hybrid vsock, the `_PORT` suffix of the host
/// socket path) the daemon listens on unless told otherwise.
pub const DEFAULT_PORT: u32 = 5564;
/// The server closes a connection that has not started a request for this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The server closes a connection whose request has started but not
/// arrived in full within this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A client's request: `length` bytes of entropy, 1..=[`MAX_REQUEST`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Bytes of entropy asked for, 1..=[`MAX_REQUEST`] in a valid request.
    pub length: u32,
}

/// The second field of a response: whether the server answered, and if
/// not, why. Every status but `Ok` comes with no data and is followed by
/// the server closing the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// The entropy follows the header.
    Ok,
    /// The request was malformed: wrong magic, unknown version or type,
    /// reserved bits set, a length of 0 or over [`MAX_REQUEST`].
    BadRequest,
    /// No healthy entropy right now; try again later. The server normally
    /// waits for its sources instead of answering this.
    Unavailable,
    /// The server does not serve this client (unknown peer, bad credentials).
    Refused,
    /// The client asked too much too often and the server could not make
    /// it wait.
    RateLimited,
    /// The server is stopping.
    ShuttingDown,
}

impl Status {
    /// The status's byte on the wire.
    pub const fn code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::BadRequest => 1,
            Status::Unavailable => 2,
            Status::Refused => 3,
            Status::RateLimited => 4,
            Status::ShuttingDown => 5,
        }
    }

    /// The status a wire byte stands for, or `None` for a value this
    /// version does not define.
    pub const fn from_code(code: u8) -> Option<Status> {
        match code {
            0 => Some(Status::Ok),
            1 => Some(Status::BadRequest),
            2 => Some(Status::Unavailable),
            3 => Some(Status::Refused),
            4 => Some(Status::RateLimited),
            5 => Some(Status::ShuttingDown),
            _ => None,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Ok => "ok",
            Status::BadRequest => "bad request (the server did not accept the request)",
            Status::Unavailable => "unavailable (the server has no healthy entropy right now)",
            Status::Refused => "refused (the server does not serve this client)",
            Status::RateLimited => "rate limited (this client asked for too much too often)",
            Status::ShuttingDown => "shutting down (the server is stopping)",
        })
    }
}

/// A response header: `length` bytes of entropy follow when `status` is
/// [`Status::Ok`]; with any other status `length` is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    /// Whether the server answered, and if not, why.
    pub status: Status,
    /// Bytes of entropy after the header: 1..=[`MAX_REQUEST`] with
    /// [`Status::Ok`], 0 otherwise.
    pub length: u32,
}

impl ResponseHeader {
    /// The header of a successful answer carrying `length` bytes.
    pub const fn ok(length: u32) -> Self {
        ResponseHeader {
            status: Status::Ok,
            length,
        }
    }

    /// The header of an error answer (no data follows).
    pub const fn error(status: Status) -> Self {
        ResponseHeader { status, length: 0 }
    }
}

/// Why a message could not be read as this protocol, or why a [`fetch`]
/// failed. A server answers a malformed request with
/// [`Status::BadRequest`]; a client drops the connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The first four bytes are not [`MAGIC`] (they are given).
    #[error(
        "the message does not start with \"VRNG\" (got {0:02x?}); the peer does not speak this protocol"
    )]
    BadMagic([u8; 4]),
    /// The version byte is not [`VERSION`] (it is given).
    #[error("protocol version {0} is not supported (this side speaks version {VERSION})")]
    UnsupportedVersion(u8),
    /// A request's type byte is not [`REQUEST_GET`] (it is given).
    #[error("request type {0} is not supported (only {REQUEST_GET}, GET, is defined)")]
    UnknownRequestType(u8),
    /// A response's status byte is not one this version defines (it is given).
    #[error("response status {0} is not defined in protocol version {VERSION}")]
    UnknownStatus(u8),
    /// The reserved 16 bits of a header are not 0 (their value is given).
    #[error("the reserved field is {0:#06x}; it must be 0")]
    ReservedNotZero(u16),
    /// A request asks for 0 bytes or more than [`MAX_REQUEST`] (the length
    /// asked for is given).
    #[error("a request must ask for 1 to {MAX_REQUEST} bytes, not {0}")]
    BadRequestLength(u32),
    /// The server sent an error status with a non-zero length: only
    /// [`Status::Ok`] carries data.
    #[error(
        "the server answered {status} with {length} bytes of data; only an ok answer carries data"
    )]
    DataWithError {
        /// The error status the server sent.
        status: Status,
        /// The length field of that header, in bytes.
        length: u32,
    },
    /// The server answered ok with 0 bytes, or more than the limit.
    #[error("the server answered ok with {length} bytes of data, outside the 1 to {limit} allowed")]
    BadResponseLength {
        /// The length of the answer, in bytes.
        length: u32,
        /// The most it could have been: what the client asked for, never
        /// more than [`MAX_REQUEST`].
        limit: u32,
    },
    /// The server answered with an error status instead of entropy.
    #[error("the server answered: {0}")]
    Server(Status),
    /// The peer closed the connection before sending any of a message.
    #[error("the connection was closed before the {what} began")]
    Closed {
        /// Which message was expected ("response header", "response data").
        what: &'static str,
    },
    /// The peer closed the connection partway through a message.
    #[error("the connection was closed after {got} of the {expected} bytes of the {what}")]
    Truncated {
        /// Which message was cut short ("response header", "response data").
        what: &'static str,
        /// Bytes of it that did arrive.
        got: usize,
        /// Bytes it should have had.
        expected: usize,
    },
    /// A read or write on the stream hit its timeout (`WouldBlock` or
    /// `TimedOut`).
    #[error("timed out waiting for the server")]
    TimedOut,
    /// Any other I/O error on the connection.
    #[error("connection error: {0}")]
    Io(#[source] io::Error),
}

/// The 12 bytes of a request for `request.length` bytes. Encodes whatever
/// length it is given, so that tests can build invalid requests; [`fetch`]
/// checks the length before sending.
pub fn encode_request(request: &Request) -> [u8; REQUEST_LEN] {
    let mut bytes = [0; REQUEST_LEN];
    bytes[..4].copy_from_slice(&MAGIC);
    bytes[4] = VERSION;
    bytes[5] = REQUEST_GET;
    // bytes[6..8] are the reserved field, 0.
    bytes[8..].copy_from_slice(&request.length.to_be_bytes());
    bytes
}

/// The server's reading of a request. Every error is answered with
/// [`Status::BadRequest`] (see [`encode_response_header`]).
pub fn decode_request(bytes: &[u8; REQUEST_LEN]) -> Result<Request, ProtocolError> {
    let fields = split_header(bytes)?;
    if fields.kind != REQUEST_GET {
        return Err(ProtocolError::UnknownRequestType(fields.kind));
    }
    if fields.reserved != 0 {
        return Err(ProtocolError::ReservedNotZero(fields.reserved));
    }
    if fields.length == 0 || fields.length > MAX_REQUEST {
        return Err(ProtocolError::BadRequestLength(fields.length));
    }
    Ok(Request {
        length: fields.length,
    })
}

/// The 12 bytes of a response header. The version field is always this
/// side's [`VERSION`], which is what a server must send back to a client
/// that asked in a version it does not speak.
pub const fn encode_response_header(header: &ResponseHeader) -> [u8; RESPONSE_HEADER_LEN] {
    let length = header.length.to_be_bytes();
    [
        MAGIC[0],
        MAGIC[1],
        MAGIC[2],
        MAGIC[3],
        VERSION,
        header.status.code(),
        0,
        0,
        length[0],
        length[1],
        length[2],
        length[3],
    ]
}

/// The client's reading of a response header. It checks the header on its
/// own; whether the length fits the request is [`fetch`]'s business.
pub fn decode_response_header(
    bytes: &[u8; RESPONSE_HEADER_LEN],
) -> Result<ResponseHeader, ProtocolError> {
    let fields = split_header(bytes)?;
    let status = Status::from_code(fields.kind).ok_or(ProtocolError::UnknownStatus(fields.kind))?;
    if fields.reserved != 0 {
        return Err(ProtocolError::ReservedNotZero(fields.reserved));
    }
    let length = fields.length;
    match status {
        Status::Ok if length == 0 || length > MAX_REQUEST => {
            Err(ProtocolError::BadResponseLength {
                length,
                limit: MAX_REQUEST,
            })
        }
        Status::Ok => Ok(ResponseHeader::ok(length)),
        _ if length != 0 => Err(ProtocolError::DataWithError { status, length }),
        _ => Ok(ResponseHeader::error(status)),
    }
}

/// The fields both headers share, the second byte (request type or
/// response status) left for the caller to interpret.
struct HeaderFields {
    kind: u8,
    reserved: u16,
    length: u32,
}

fn split_header(bytes: &[u8; 12]) -> Result<HeaderFields, ProtocolError> {
    let [m0, m1, m2, m3, version, kind, r0, r1, l0, l1, l2, l3] = *bytes;
    let magic = [m0, m1, m2, m3];
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    if version != VERSION {
        return Err(ProtocolError::UnsupportedVersion(version));
    }
    Ok(HeaderFields {
        kind,
        reserved: u16::from_be_bytes([r0, r1]),
        length: u32::from_be_bytes([l0, l1, l2, l3]),
    })
}

/// Asks the server at the other end of `stream` for `length` bytes and
/// appends its answer to `out`; returns how many bytes were appended, which
/// may be fewer than asked for (never 0). On error `out` is left as it was
/// and the connection should be dropped: the server closes it after an
/// error answer, and after a partial message the two sides are out of step.
///
/// Blocks until the server answers; set read and write timeouts on the
/// stream to bound the wait (an expired timeout is [`ProtocolError::TimedOut`]).
pub fn fetch(
    stream: &mut (impl Read + Write),
    length: u32,
    out: &mut Vec<u8>,
) -> Result<usize, ProtocolError> {
    if length == 0 || length > MAX_REQUEST {
        return Err(ProtocolError::BadRequestLength(length));
    }
    let sent = stream
        .write_all(&encode_request(&Request { length }))
        .and_then(|()| stream.flush());
    if let Err(e) = sent {
        // A server that refuses a client (too many clients, unknown peer)
        // answers and closes without waiting for the request; the answer
        // may still be waiting to be read, and says more than the error.
        return Err(early_answer(stream).unwrap_or_else(|| io_error(e)));
    }

    let mut header = [0; RESPONSE_HEADER_LEN];
    read_full(stream, &mut header, "response header")?;
    let header = decode_response_header(&header)?;
    if header.status != Status::Ok {
        return Err(ProtocolError::Server(header.status));
    }
    if header.length > length {
        return Err(ProtocolError::BadResponseLength {
            length: header.length,
            limit: length,
        });
    }

    let start = out.len();
    // The length was checked against MAX_REQUEST, so this fits any usize
    // of 32 bits or more.
    let body_len = header.length as usize;
    out.resize(start + body_len, 0);
    let read = read_full(stream, &mut out[start..], "response data");
    if let Err(e) = read {
        out.truncate(start);
        return Err(e);
    }
    Ok(body_len)
}

/// The error answer a server sent before it closed, if one is there to read.
fn early_answer(stream: &mut impl Read) -> Option<ProtocolError> {
    let mut header = [0; RESPONSE_HEADER_LEN];
    read_full(stream, &mut header, "response header").ok()?;
    match decode_response_header(&header) {
        Ok(header) if header.status != Status::Ok => Some(ProtocolError::Server(header.status)),
        _ => None,
    }
}

/// Fills `buf` from `stream`, telling a clean close before the first byte
/// apart from a close in the middle.
fn read_full(
    stream: &mut impl Read,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Err(ProtocolError::Closed { what }),
            Ok(0) => {
                return Err(ProtocolError::Truncated {
                    what,
                    got,
                    expected: buf.len(),
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e)),
        }
    }
    Ok(())
}

fn io_error(error: io::Error) -> ProtocolError {
    // A socket read timeout shows up as WouldBlock (EAGAIN) on Linux.
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ProtocolError::TimedOut,
        _ => ProtocolError::Io(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A stream whose reads come from a canned server answer and whose
    /// writes are recorded.
    struct FakeServer {
        answer: Cursor<Vec<u8>>,
        sent: Vec<u8>,
    }

    impl FakeServer {
        fn answering(answer: Vec<u8>) -> Self {
            FakeServer {
                answer: Cursor::new(answer),
                sent: Vec::new(),
            }
        }
    }

    impl Read for FakeServer {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.answer.read(buf)
        }
    }

    impl Write for FakeServer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn ok_answer(data: &[u8]) -> Vec<u8> {
        let length = u32::try_from(data.len()).expect("test data fits u32");
        let mut answer = encode_response_header(&ResponseHeader::ok(length)).to_vec();
        answer.extend_from_slice(data);
        answer
    }

    #[test]
    fn request_has_the_documented_layout() {
        let bytes = encode_request(&Request { length: 64 });
        assert_eq!(
            bytes,
            [b'V', b'R', b'N', b'G', 1, 1, 0, 0, 0, 0, 0, 0x40],
            "docs/protocol.md shows this example"
        );
        assert_eq!(
            encode_request(&Request {
                length: 0x0102_0304
            })[8..],
            [1, 2, 3, 4]
        );
    }

    #[test]
    fn request_round_trips() {
        for length in [1, 32, 64, 4096, MAX_REQUEST] {
            let request = Request { length };
            assert_eq!(decode_request(&encode_request(&request)).unwrap(), request);
        }
    }

    #[test]
    fn response_header_has_the_documented_layout() {
        assert_eq!(
            encode_response_header(&ResponseHeader::ok(64)),
            [b'V', b'R', b'N', b'G', 1, 0, 0, 0, 0, 0, 0, 0x40]
        );
        assert_eq!(
            encode_response_header(&ResponseHeader::error(Status::Refused)),
            [b'V', b'R', b'N', b'G', 1, 3, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn response_header_round_trips() {
        for header in [
            ResponseHeader::ok(1),
            ResponseHeader::ok(64),
            ResponseHeader::ok(MAX_REQUEST),
            ResponseHeader::error(Status::BadRequest),
            ResponseHeader::error(Status::Unavailable),
            ResponseHeader::error(Status::Refused),
            ResponseHeader::error(Status::RateLimited),
            ResponseHeader::error(Status::ShuttingDown),
        ] {
            let decoded = decode_response_header(&encode_response_header(&header)).unwrap();
            assert_eq!(decoded, header);
        }
    }

    #[test]
    fn status_codes_round_trip_and_unknown_codes_are_none() {
        for code in 0..=5 {
            let status = Status::from_code(code).unwrap();
            assert_eq!(status.code(), code);
        }
        for code in 6..=u8::MAX {
            assert_eq!(Status::from_code(code), None, "{code}");
        }
    }

    #[test]
    fn request_with_wrong_magic_is_rejected() {
        let mut bytes = encode_request(&Request { length: 64 });
        bytes[..4].copy_from_slice(b"GET ");
        let err = decode_request(&bytes).unwrap_err();
        assert!(
            matches!(err, ProtocolError::BadMagic(m) if &m == b"GET "),
            "{err}"
        );
        assert!(err.to_string().contains("does not speak this protocol"));
    }

    #[test]
    fn request_with_other_version_is_rejected() {
        for version in [0, 2, 255] {
            let mut bytes = encode_request(&Request { length: 64 });
            bytes[4] = version;
            let err = decode_request(&bytes).unwrap_err();
            assert!(
                matches!(err, ProtocolError::UnsupportedVersion(v) if v == version),
                "{err}"
            );
        }
    }

    #[test]
    fn request_of_reserved_type_is_rejected() {
        for kind in [0, 2, 0x80, 255] {
            let mut bytes = encode_request(&Request { length: 64 });
            bytes[5] = kind;
            let err = decode_request(&bytes).unwrap_err();
            assert!(
                matches!(err, ProtocolError::UnknownRequestType(k) if k == kind),
                "{err}"
            );
        }
    }

    #[test]
    fn request_with_reserved_bits_set_is_rejected() {
        for (byte, value, expected) in [(6, 1, 0x0100), (7, 1, 0x0001), (6, 0xff, 0xff00)] {
            let mut bytes = encode_request(&Request { length: 64 });
            bytes[byte] = value;
            let err = decode_request(&bytes).unwrap_err();
            assert!(
                matches!(err, ProtocolError::ReservedNotZero(r) if r == expected),
                "{err}"
            );
        }
    }

    #[test]
    fn request_length_must_be_between_1_and_max() {
        for length in [0, MAX_REQUEST + 1, u32::MAX] {
            let err = decode_request(&encode_request(&Request { length })).unwrap_err();
            assert!(
                matches!(err, ProtocolError::BadRequestLength(l) if l == length),
                "{err}"
            );
        }
    }

    #[test]
    fn response_header_with_wrong_magic_or_version_is_rejected() {
        let good = encode_response_header(&ResponseHeader::ok(64));
        let mut bytes = good;
        bytes[0] = b'X';
        assert!(matches!(
            decode_response_header(&bytes),
            Err(ProtocolError::BadMagic(_))
        ));
        // A server that does not speak our version answers BAD_REQUEST in
        // its own version; the client reports that version.
        let mut bytes = encode_response_header(&ResponseHeader::error(Status::BadRequest));
        bytes[4] = 2;
        let err = decode_response_header(&bytes).unwrap_err();
        assert!(matches!(err, ProtocolError::UnsupportedVersion(2)), "{err}");
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn response_header_with_unknown_status_or_reserved_bits_is_rejected() {
        let mut bytes = encode_response_header(&ResponseHeader::ok(64));
        bytes[5] = 6;
        assert!(matches!(
            decode_response_header(&bytes),
            Err(ProtocolError::UnknownStatus(6))
        ));
        let mut bytes = encode_response_header(&ResponseHeader::ok(64));
        bytes[7] = 2;
        assert!(matches!(
            decode_response_header(&bytes),
            Err(ProtocolError::ReservedNotZero(2))
        ));
    }

    #[test]
    fn response_header_lengths_are_checked() {
        for length in [0, MAX_REQUEST + 1] {
            let bytes = encode_response_header(&ResponseHeader::ok(length));
            assert!(
                matches!(
                    decode_response_header(&bytes),
                    Err(ProtocolError::BadResponseLength { length: l, .. }) if l == length
                ),
                "{length}"
            );
        }
        let bytes = encode_response_header(&ResponseHeader {
            status: Status::Unavailable,
            length: 8,
        });
        assert!(matches!(
            decode_response_header(&bytes),
            Err(ProtocolError::DataWithError {
                status: Status::Unavailable,
                length: 8
            })
        ));
    }

    #[test]
    fn fetch_sends_a_request_and_appends_the_answer() {
        let data: Vec<u8> = (0..64).collect();
        let mut server = FakeServer::answering(ok_answer(&data));
        let mut out = vec![0xaa];
        assert_eq!(fetch(&mut server, 64, &mut out).unwrap(), 64);
        assert_eq!(server.sent, encode_request(&Request { length: 64 }));
        assert_eq!(out[0], 0xaa);
        assert_eq!(out[1..], data[..]);
    }

    #[test]
    fn fetch_accepts_fewer_bytes_than_asked() {
        let mut server = FakeServer::answering(ok_answer(&[7; 10]));
        let mut out = Vec::new();
        assert_eq!(fetch(&mut server, 64, &mut out).unwrap(), 10);
        assert_eq!(out, [7; 10]);
    }

    #[test]
    fn fetch_carries_many_requests_on_one_connection() {
        let mut answers = ok_answer(&[1; 4]);
        answers.extend(ok_answer(&[2; 8]));
        let mut server = FakeServer::answering(answers);
        let mut out = Vec::new();
        assert_eq!(fetch(&mut server, 4, &mut out).unwrap(), 4);
        assert_eq!(fetch(&mut server, 8, &mut out).unwrap(), 8);
        assert_eq!(out, [[1; 4].as_slice(), &[2; 8]].concat());
        assert_eq!(server.sent.len(), 2 * REQUEST_LEN);
    }

    #[test]
    fn fetch_rejects_more_bytes_than_asked() {
        let mut server = FakeServer::answering(ok_answer(&[0; 65]));
        let mut out = Vec::new();
        let err = fetch(&mut server, 64, &mut out).unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::BadResponseLength {
                    length: 65,
                    limit: 64
                }
            ),
            "{err}"
        );
        assert!(out.is_empty());
    }

    #[test]
    fn fetch_refuses_to_send_a_bad_length() {
        for length in [0, MAX_REQUEST + 1] {
            let mut server = FakeServer::answering(Vec::new());
            let err = fetch(&mut server, length, &mut Vec::new()).unwrap_err();
            assert!(matches!(err, ProtocolError::BadRequestLength(_)), "{err}");
            assert!(server.sent.is_empty(), "nothing is sent");
        }
    }

    #[test]
    fn fetch_maps_error_statuses_to_server_errors() {
        for status in [
            Status::BadRequest,
            Status::Unavailable,
            Status::Refused,
            Status::RateLimited,
            Status::ShuttingDown,
        ] {
            let answer = encode_response_header(&ResponseHeader::error(status)).to_vec();
            let mut out = Vec::new();
            let err = fetch(&mut FakeServer::answering(answer), 64, &mut out).unwrap_err();
            assert!(
                matches!(err, ProtocolError::Server(s) if s == status),
                "{err}"
            );
            assert!(out.is_empty());
        }
    }

    #[test]
    fn fetch_tells_a_closed_connection_from_a_truncated_answer() {
        let err = fetch(&mut FakeServer::answering(Vec::new()), 64, &mut Vec::new()).unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::Closed {
                    what: "response header"
                }
            ),
            "{err}"
        );

        let header = ok_answer(&[]);
        let err = fetch(
            &mut FakeServer::answering(header[..5].to_vec()),
            64,
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::Truncated {
                    what: "response header",
                    got: 5,
                    expected: 12
                }
            ),
            "{err}"
        );

        // The header promises 64 bytes; 20 arrive before the close.
        let mut answer = encode_response_header(&ResponseHeader::ok(64)).to_vec();
        answer.extend_from_slice(&[9; 20]);
        let mut out = vec![1, 2, 3];
        let err = fetch(&mut FakeServer::answering(answer), 64, &mut out).unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::Truncated {
                    what: "response data",
                    got: 20,
                    expected: 64
                }
            ),
            "{err}"
        );
        assert_eq!(out, [1, 2, 3], "a partial answer is not kept");
    }

    #[test]
    fn fetch_reports_a_read_timeout_as_timed_out() {
        struct Silent;
        impl Read for Silent {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
        impl Write for Silent {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let err = fetch(&mut Silent, 64, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, ProtocolError::TimedOut), "{err}");
    }

    #[test]
    fn fetch_works_over_a_socket() {
        use std::os::unix::net::UnixStream;
        let (mut client, mut server) = UnixStream::pair().unwrap();
        let serving = std::thread::spawn(move || {
            let mut request = [0; REQUEST_LEN];
            server.read_exact(&mut request).unwrap();
            let request = decode_request(&request).unwrap();
            let data = vec![0x5a; request.length as usize / 2];
            server.write_all(&ok_answer(&data)).unwrap();
        });
        let mut out = Vec::new();
        assert_eq!(fetch(&mut client, 32, &mut out).unwrap(), 16);
        assert_eq!(out, [0x5a; 16]);
        serving.join().unwrap();
    }

    #[test]
    fn fetch_reads_a_refusal_sent_before_the_request() {
        use std::os::unix::net::UnixStream;
        // The server answers and closes before the client writes: the
        // write fails, and the answer waiting to be read says why.
        let (mut client, mut server) = UnixStream::pair().unwrap();
        server
            .write_all(&encode_response_header(&ResponseHeader::error(
                Status::Refused,
            )))
            .unwrap();
        drop(server);
        assert!(matches!(
            fetch(&mut client, 32, &mut Vec::new()),
            Err(ProtocolError::Server(Status::Refused))
        ));

        // With nothing to read, the write error is what is reported.
        let (mut client, server) = UnixStream::pair().unwrap();
        drop(server);
        match fetch(&mut client, 32, &mut Vec::new()) {
            Err(ProtocolError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::BrokenPipe),
            other => panic!("{other:?}"),
        }
    }
}
