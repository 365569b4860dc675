//! The least HTTP/1.1 the key-broker protocol needs, both ends: one request per connection
//! (`Connection: close`), bounded sizes. Plain TCP; TLS wraps the same stream where the
//! configuration pins a certificate.
//!
//! Hand-written rather than a client crate: the init already carries rustls and needs one
//! exchange per connection, and a general client (hyper, ureq) would add far more code to the
//! static PID 1 than these framing rules do; `httparse` would only parse the head and the
//! chunk-size line, leaving the framing decisions below to this module anyway. The framing is
//! strict, since a proxy or the host may sit between the node and the broker:
//!
//! - a body is delimited by `Content-Length` (decimal digits only, one value) or by
//!   `Transfer-Encoding: chunked` (the only coding accepted); a message carrying both is
//!   refused (RFC 9112 §6.1: a sign of request smuggling), as is any other transfer coding;
//! - chunk sizes are 1 to 16 hexadecimal digits, summed with overflow checks; chunk
//!   extensions are skipped, trailer fields are read (bounded, with the head's limit) and
//!   dropped; every chunk must end in CRLF;
//! - a response with neither header runs until the connection closes (RFC 9112 §6.3; the
//!   broker closes after each answer); over TLS a close without close_notify is an error, so a
//!   truncated body is not taken for a whole one. A request with neither has no body;
//! - the decoded body, however framed, is capped at 1 MiB.

use std::io::{BufRead, BufReader, Read, Write};

/// Largest head and body accepted.
const MAX_HEAD: usize = 16 << 10;
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connection error")]
    Io(#[from] std::io::Error),
    #[error("malformed HTTP message: {0}")]
    Malformed(String),
    #[error("HTTP message too large: {0}")]
    TooLarge(&'static str),
    #[error("the message has both Content-Length and Transfer-Encoding: refused")]
    AmbiguousLength,
    #[error("unsupported Transfer-Encoding {0:?}: only chunked is accepted")]
    TransferCoding(String),
    #[error("malformed chunk size line {0:?}: expected 1 to 16 hexadecimal digits and CRLF")]
    ChunkSize(String),
    #[error("a chunk does not end in CRLF")]
    ChunkEnd,
    #[error("the connection closed inside a chunked body")]
    ChunkTruncated,
}

/// A parsed message: the start line, headers (names lower-cased), the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub start: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of cookie `name` from the Cookie header.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.header("cookie")?.split(';').find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name).then_some(v)
        })
    }
}

/// How the body of a message is delimited.
enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

/// Reads one message (request or response) from `stream`.
pub fn read_message(stream: &mut impl Read) -> Result<Message, HttpError> {
    let mut reader = BufReader::new(stream);
    let mut head_len = 0;
    let mut line = String::new();
    read_head_line(&mut reader, &mut head_len, &mut line)?;
    let start = line.trim_end().to_string();
    let mut headers = Vec::new();
    loop {
        read_head_line(&mut reader, &mut head_len, &mut line)?;
        let text = line.trim_end();
        if text.is_empty() {
            break;
        }
        let (name, value) = text
            .split_once(':')
            .ok_or_else(|| HttpError::Malformed(format!("header line {text:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let body = match framing(&start, &headers)? {
        Framing::None => Vec::new(),
        Framing::Length(length) => {
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body)?;
            body
        }
        Framing::Chunked => read_chunked(&mut reader, &mut head_len)?,
        Framing::UntilClose => {
            let mut body = Vec::new();
            (&mut reader)
                .take(MAX_BODY as u64 + 1)
                .read_to_end(&mut body)?;
            if body.len() > MAX_BODY {
                return Err(HttpError::TooLarge("body"));
            }
            body
        }
    };
    Ok(Message {
        start,
        headers,
        body,
    })
}

/// One line of the head (or of a chunked body's trailer), counted against `MAX_HEAD`.
fn read_head_line(
    reader: &mut impl BufRead,
    head_len: &mut usize,
    line: &mut String,
) -> Result<(), HttpError> {
    line.clear();
    let n = reader
        .take((MAX_HEAD - *head_len + 1) as u64)
        .read_line(line)?;
    *head_len += n;
    if *head_len > MAX_HEAD {
        return Err(HttpError::TooLarge("head"));
    }
    if n == 0 {
        return Err(HttpError::Malformed("connection closed in the head".into()));
    }
    Ok(())
}

/// The body's framing from the start line and headers (RFC 9112 §6.3, strictly).
fn framing(start: &str, headers: &[(String, String)]) -> Result<Framing, HttpError> {
    let values = |name: &str| -> Vec<&str> {
        headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let lengths = values("content-length");
    let codings = values("transfer-encoding");
    if !lengths.is_empty() && !codings.is_empty() {
        return Err(HttpError::AmbiguousLength);
    }
    // A response's status decides whether it has a body at all.
    let status = start
        .strip_prefix("HTTP/")
        .and_then(|rest| rest.split_whitespace().nth(1));
    if let Some(status) = status {
        if status.starts_with('1') || status == "204" || status == "304" {
            return Ok(Framing::None);
        }
    }
    match (lengths.as_slice(), codings.as_slice()) {
        ([], []) if status.is_some() => Ok(Framing::UntilClose),
        ([], []) => Ok(Framing::None),
        ([length], []) => {
            if length.is_empty() || !length.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::Malformed(format!("Content-Length {length:?}")));
            }
            let length: usize = length.parse().map_err(|_| HttpError::TooLarge("body"))?;
            if length > MAX_BODY {
                return Err(HttpError::TooLarge("body"));
            }
            Ok(Framing::Length(length))
        }
        (_, []) => Err(HttpError::Malformed(
            "more than one Content-Length header".into(),
        )),
        ([], [coding]) if coding.eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
        ([], codings) => Err(HttpError::TransferCoding(codings.join(", "))),
        _ => unreachable!("both headers were refused above"),
    }
}

/// A chunked body (RFC 9112 §7.1): the chunks' data joined, the trailer dropped.
fn read_chunked(reader: &mut impl BufRead, head_len: &mut usize) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    loop {
        let size = read_chunk_size(reader)?;
        if size == 0 {
            break;
        }
        let total = body
            .len()
            .checked_add(size)
            .filter(|&t| t <= MAX_BODY)
            .ok_or(HttpError::TooLarge("body"))?;
        let at = body.len();
        body.resize(total, 0);
        reader
            .read_exact(&mut body[at..])
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => HttpError::ChunkTruncated,
                _ => HttpError::Io(e),
            })?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => HttpError::ChunkTruncated,
            _ => HttpError::Io(e),
        })?;
        if &crlf != b"\r\n" {
            return Err(HttpError::ChunkEnd);
        }
    }
    // The trailer section: field lines up to an empty line, bounded with the head.
    let mut line = String::new();
    loop {
        read_head_line(reader, head_len, &mut line).map_err(|e| match e {
            HttpError::Malformed(_) => HttpError::ChunkTruncated,
            other => other,
        })?;
        let text = line.trim_end();
        if text.is_empty() {
            return Ok(body);
        }
        if !text.contains(':') {
            return Err(HttpError::Malformed(format!("trailer line {text:?}")));
        }
    }
}

/// Longest chunk-size line accepted, extensions included.
const MAX_CHUNK_LINE: usize = 1024;

/// `chunk-size [ chunk-ext ] CRLF`: at most 16 hex digits (a usize on 64-bit), checked.
fn read_chunk_size(reader: &mut impl BufRead) -> Result<usize, HttpError> {
    let mut line = Vec::new();
    let n = reader
        .take(MAX_CHUNK_LINE as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(HttpError::ChunkTruncated);
    }
    let shown = || HttpError::ChunkSize(String::from_utf8_lossy(&line).into_owned());
    if n > MAX_CHUNK_LINE {
        return Err(HttpError::TooLarge("chunk size line"));
    }
    let Some(text) = line.strip_suffix(b"\r\n") else {
        return Err(if line.ends_with(b"\n") {
            shown()
        } else {
            HttpError::ChunkTruncated
        });
    };
    let digits = match text.iter().position(|&b| b == b';') {
        // Whitespace may precede an extension (BWS), never the size itself.
        Some(at) => text[..at].trim_ascii_end(),
        None => text,
    };
    if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(shown());
    }
    let mut size: usize = 0;
    for &digit in digits {
        let value = (digit as char).to_digit(16).expect("a hex digit") as usize;
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(value))
            .ok_or_else(shown)?;
    }
    if size > MAX_BODY {
        return Err(HttpError::TooLarge("body"));
    }
    Ok(size)
}

/// Writes a message with Content-Length and `Connection: close`.
pub fn write_message(
    stream: &mut impl Write,
    start: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(), HttpError> {
    let mut out = format!("{start}\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(out.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_message_round_trips() {
        let mut wire = Vec::new();
        write_message(
            &mut wire,
            "POST /kbs/v0/auth HTTP/1.1",
            &[("Cookie", "a=1; kbs-session-id=xyz")],
            b"{}",
        )
        .unwrap();
        let m = read_message(&mut wire.as_slice()).unwrap();
        assert_eq!(m.start, "POST /kbs/v0/auth HTTP/1.1");
        assert_eq!(m.cookie("kbs-session-id"), Some("xyz"));
        assert_eq!(m.body, b"{}");
    }

    #[test]
    fn oversized_messages_are_refused() {
        let wire = format!("GET / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert!(matches!(
            read_message(&mut wire.as_bytes()),
            Err(HttpError::TooLarge("body"))
        ));
        let wire = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(matches!(
            read_message(&mut wire.as_bytes()),
            Err(HttpError::TooLarge("head"))
        ));
    }

    fn read(wire: &[u8]) -> Result<Message, HttpError> {
        read_message(&mut &wire[..])
    }

    fn response(headers: &str, body: &[u8]) -> Vec<u8> {
        let mut wire = format!("HTTP/1.1 200 OK\r\n{headers}\r\n").into_bytes();
        wire.extend_from_slice(body);
        wire
    }

    /// What a proxy in front of Trustee sends: the body in chunks, with extensions and a
    /// trailer. Before chunked support this read as an empty body.
    #[test]
    fn a_chunked_reply_parses() {
        let wire = response(
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
            b"4\r\n{\"a\"\r\n5;name=value\r\n:\"b\"}\r\n000\r\nX-Trailer: t\r\n\r\n",
        );
        let m = read(&wire).unwrap();
        assert_eq!(m.body, br#"{"a":"b"}"#);
        // Upper-case hex, a coding name in another case, no trailer.
        let wire = response(
            "transfer-encoding: Chunked\r\n",
            format!("A\r\n{}\r\n0\r\n\r\n", "x".repeat(10)).as_bytes(),
        );
        assert_eq!(read(&wire).unwrap().body, b"xxxxxxxxxx");
    }

    #[test]
    fn malformed_chunk_sizes_are_refused() {
        for size in [
            "",
            "g",
            "-1",
            "+1",
            " 1",
            "0x1",
            "1 1",
            "1\t",
            "11111111111111111",
        ] {
            let wire = response(
                "Transfer-Encoding: chunked\r\n",
                format!("{size}\r\nx\r\n0\r\n\r\n").as_bytes(),
            );
            assert!(
                matches!(read(&wire), Err(HttpError::ChunkSize(_))),
                "{size:?}: {:?}",
                read(&wire)
            );
        }
        // A bare LF ends no chunk-size line.
        let wire = response("Transfer-Encoding: chunked\r\n", b"1\nx\r\n0\r\n\r\n");
        assert!(matches!(read(&wire), Err(HttpError::ChunkSize(_))));
        // BWS before an extension is allowed.
        let wire = response("Transfer-Encoding: chunked\r\n", b"1 ;a\r\nx\r\n0\r\n\r\n");
        assert_eq!(read(&wire).unwrap().body, b"x");
    }

    #[test]
    fn chunk_sizes_that_overflow_or_exceed_the_cap_are_refused() {
        for size in ["ffffffffffffffff", "100001", "7fffffffffffffff"] {
            let wire = response(
                "Transfer-Encoding: chunked\r\n",
                format!("{size}\r\nx\r\n0\r\n\r\n").as_bytes(),
            );
            assert!(
                matches!(read(&wire), Err(HttpError::TooLarge("body"))),
                "{size}"
            );
        }
        // Chunks each under the cap, together over it.
        let chunk = format!("{:x}\r\n{}\r\n", 1 << 19, "y".repeat(1 << 19));
        let wire = response(
            "Transfer-Encoding: chunked\r\n",
            format!("{chunk}{chunk}1\r\ny\r\n0\r\n\r\n").as_bytes(),
        );
        assert!(matches!(read(&wire), Err(HttpError::TooLarge("body"))));
        // Exactly the cap is fine.
        let wire = response(
            "Transfer-Encoding: chunked\r\n",
            format!("{chunk}{chunk}0\r\n\r\n").as_bytes(),
        );
        assert_eq!(read(&wire).unwrap().body.len(), MAX_BODY);
        // An endless chunk-size line.
        let wire = response("Transfer-Encoding: chunked\r\n", &[b'0'; 4096]);
        assert!(matches!(
            read(&wire),
            Err(HttpError::TooLarge("chunk size line"))
        ));
        // An endless trailer.
        let trailer = format!("0\r\nX: {}\r\n\r\n", "t".repeat(MAX_HEAD));
        let wire = response("Transfer-Encoding: chunked\r\n", trailer.as_bytes());
        assert!(matches!(read(&wire), Err(HttpError::TooLarge("head"))));
    }

    #[test]
    fn broken_chunk_framing_is_refused() {
        let te = "Transfer-Encoding: chunked\r\n";
        // Data longer than its size, i.e. no CRLF where the chunk ends.
        assert!(matches!(
            read(&response(te, b"1\r\nxy\r\n0\r\n\r\n")),
            Err(HttpError::ChunkEnd)
        ));
        // The connection closes in the data, before the last chunk, in the trailer.
        for body in [
            &b"5\r\nab"[..],
            b"1\r\nx\r\n",
            b"0\r\n",
            b"0\r\nX: t\r\n",
            b"",
        ] {
            assert!(
                matches!(read(&response(te, body)), Err(HttpError::ChunkTruncated)),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(matches!(
            read(&response(te, b"0\r\nno colon\r\n\r\n")),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn ambiguous_or_unsupported_framing_is_refused() {
        let both = "Content-Length: 1\r\nTransfer-Encoding: chunked\r\n";
        assert!(matches!(
            read(&response(both, b"1\r\nx\r\n0\r\n\r\n")),
            Err(HttpError::AmbiguousLength)
        ));
        for coding in ["gzip", "gzip, chunked", "chunked, chunked", "identity"] {
            let headers = format!("Transfer-Encoding: {coding}\r\n");
            assert!(
                matches!(
                    read(&response(&headers, b"0\r\n\r\n")),
                    Err(HttpError::TransferCoding(_))
                ),
                "{coding}"
            );
        }
        let twice = "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n";
        assert!(matches!(
            read(&response(twice, b"0\r\n\r\n")),
            Err(HttpError::TransferCoding(_))
        ));
        for length in ["+1", "-1", "1 1", "0x1", ""] {
            let headers = format!("Content-Length: {length}\r\n");
            assert!(
                matches!(
                    read(&response(&headers, b"x")),
                    Err(HttpError::Malformed(_))
                ),
                "{length:?}"
            );
        }
        let twice = "Content-Length: 1\r\nContent-Length: 1\r\n";
        assert!(matches!(
            read(&response(twice, b"x")),
            Err(HttpError::Malformed(_))
        ));
        let huge = "Content-Length: 99999999999999999999999\r\n";
        assert!(matches!(
            read(&response(huge, b"x")),
            Err(HttpError::TooLarge("body"))
        ));
    }

    /// Neither header: a response runs to the close (bounded), a request has no body.
    #[test]
    fn a_body_without_length_runs_to_the_close_in_responses_only() {
        assert_eq!(
            read(&response("", b"{\"a\":1}")).unwrap().body,
            b"{\"a\":1}"
        );
        let huge = vec![b'z'; MAX_BODY + 1];
        assert!(matches!(
            read(&response("", &huge)),
            Err(HttpError::TooLarge("body"))
        ));
        let request = b"POST /kbs/v0/auth HTTP/1.1\r\nHost: a\r\n\r\nignored";
        assert_eq!(read(request).unwrap().body, b"");
        let no_content = b"HTTP/1.1 204 No Content\r\n\r\nignored";
        assert_eq!(read(no_content).unwrap().body, b"");
    }

    proptest! {
        #[test]
        fn chunked_bodies_round_trip(
            body in proptest::collection::vec(any::<u8>(), 0..2000),
            cuts in proptest::collection::vec(1usize..300, 0..20),
        ) {
            let mut encoded = Vec::new();
            let mut rest = &body[..];
            let mut cuts = cuts.into_iter();
            while !rest.is_empty() {
                let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
                encoded.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                encoded.extend_from_slice(&rest[..n]);
                encoded.extend_from_slice(b"\r\n");
                rest = &rest[n..];
            }
            encoded.extend_from_slice(b"0\r\n\r\n");
            let wire = response("Transfer-Encoding: chunked\r\n", &encoded);
            prop_assert_eq!(read(&wire).unwrap().body, body);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = read_message(&mut bytes.as_slice());
        }
    }
}
