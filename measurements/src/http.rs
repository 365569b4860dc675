//! The least HTTP/1.1 the key-broker protocol needs, both ends: one request per connection
//! (`Connection: close`), bodies by Content-Length, bounded sizes. Plain TCP; TLS wraps the
//! same stream where the configuration pins a certificate.

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

/// Reads one message (request or response) from `stream`.
pub fn read_message(stream: &mut impl Read) -> Result<Message, HttpError> {
    let mut reader = BufReader::new(stream);
    let mut head_len = 0;
    let mut line = String::new();
    let mut read_line = |line: &mut String| -> Result<(), HttpError> {
        line.clear();
        let n = (&mut reader)
            .take((MAX_HEAD - head_len + 1) as u64)
            .read_line(line)?;
        head_len += n;
        if head_len > MAX_HEAD {
            return Err(HttpError::TooLarge("head"));
        }
        if n == 0 {
            return Err(HttpError::Malformed("connection closed in the head".into()));
        }
        Ok(())
    };
    read_line(&mut line)?;
    let start = line.trim_end().to_string();
    let mut headers = Vec::new();
    loop {
        read_line(&mut line)?;
        let text = line.trim_end();
        if text.is_empty() {
            break;
        }
        let (name, value) = text
            .split_once(':')
            .ok_or_else(|| HttpError::Malformed(format!("header line {text:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let length = match headers.iter().find(|(n, _)| n == "content-length") {
        Some((_, v)) => v
            .parse::<usize>()
            .map_err(|_| HttpError::Malformed(format!("Content-Length {v:?}")))?,
        None => 0,
    };
    if length > MAX_BODY {
        return Err(HttpError::TooLarge("body"));
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok(Message {
        start,
        headers,
        body,
    })
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

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = read_message(&mut bytes.as_slice());
        }
    }
}
