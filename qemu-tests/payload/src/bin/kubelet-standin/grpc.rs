//! STAND-IN: the least of a gRPC client that the stand-in's unary CRI calls need, over HTTP/2
//! on the runtime's unix socket: the preface, an empty SETTINGS, one HEADERS frame (HPACK
//! literals, no Huffman, no dynamic table) and one DATA frame; in the answer only DATA frames
//! are decoded. Requests fit one frame (16 KiB), answers are read whole. Messages are built and
//! read by [`Msg`] and [`fields`], which know protobuf's wire format and nothing of the schema.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// One unary call: the answer's protobuf message, or why there is none.
pub fn unary(
    socket: &str,
    path: &str,
    request: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    let mut headers = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
    literal_indexed_name(&mut headers, 4, path); // :path
    literal_indexed_name(&mut headers, 1, "localhost"); // :authority
    literal_new_name(&mut headers, "content-type", "application/grpc");
    literal_new_name(&mut headers, "te", "trailers");
    frame(&mut out, 0x1, 0x4, 1, &headers); // HEADERS, END_HEADERS
    let mut message = vec![0u8]; // one uncompressed gRPC message
    message.extend_from_slice(&(request.len() as u32).to_be_bytes());
    message.extend_from_slice(request);
    if message.len() > 16384 {
        return Err(format!(
            "a request of {} bytes (one frame only)",
            message.len()
        ));
    }
    frame(&mut out, 0x0, 0x1, 1, &message); // DATA, END_STREAM
    stream.write_all(&out).map_err(|e| format!("write: {e}"))?;

    let mut body = Vec::new();
    loop {
        let mut head = [0u8; 9];
        stream
            .read_exact(&mut head)
            .map_err(|e| format!("read: {e}"))?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if len > 1 << 20 {
            return Err(format!("frame of {len} bytes"));
        }
        let mut payload = vec![0u8; len];
        stream
            .read_exact(&mut payload)
            .map_err(|e| format!("read: {e}"))?;
        match kind {
            0x0 if stream_id == 1 => {
                let data = if flags & 0x8 != 0 {
                    let pad = *payload.first().unwrap_or(&0) as usize;
                    payload
                        .get(1..payload.len().saturating_sub(pad))
                        .unwrap_or(&[])
                        .to_vec()
                } else {
                    payload
                };
                body.extend_from_slice(&data);
                if flags & 0x1 != 0 {
                    break;
                }
            }
            // HEADERS on our stream that end it: the trailers.
            0x1 if stream_id == 1 && flags & 0x1 != 0 => break,
            // SETTINGS (not an ACK): acknowledge.
            0x4 if flags & 0x1 == 0 => {
                let mut ack = Vec::new();
                frame(&mut ack, 0x4, 0x1, 0, &[]);
                stream.write_all(&ack).map_err(|e| e.to_string())?;
            }
            // PING: answer.
            0x6 if flags & 0x1 == 0 => {
                let mut pong = Vec::new();
                frame(&mut pong, 0x6, 0x1, 0, &payload);
                stream.write_all(&pong).map_err(|e| e.to_string())?;
            }
            0x3 => return Err("the runtime reset the stream".into()),
            0x7 => return Err("the runtime sent GOAWAY".into()),
            _ => {}
        }
    }
    if body.len() < 5 {
        // An error's status and message are in the trailers, which this client does not decode;
        // containerd logs the failed call on the console.
        return Err("no answer message: the runtime refused the call (its log says why)".into());
    }
    Ok(body[5..].to_vec())
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

fn hpack_string(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 127, "short strings only");
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// "Literal header field without indexing", name from the static table.
fn literal_indexed_name(out: &mut Vec<u8>, index: u8, value: &str) {
    out.push(index);
    hpack_string(out, value);
}

/// "Literal header field without indexing", new name.
fn literal_new_name(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    hpack_string(out, name);
    hpack_string(out, value);
}

/// A protobuf message being built, field by field (proto3: every field given is written).
#[derive(Default)]
pub struct Msg(Vec<u8>);

impl Msg {
    pub fn new() -> Self {
        Self::default()
    }

    fn key(&mut self, field: u64, wire: u64) {
        put_varint(&mut self.0, field << 3 | wire);
    }

    pub fn varint(mut self, field: u64, value: u64) -> Self {
        self.key(field, 0);
        put_varint(&mut self.0, value);
        self
    }

    pub fn bytes(mut self, field: u64, value: &[u8]) -> Self {
        self.key(field, 2);
        put_varint(&mut self.0, value.len() as u64);
        self.0.extend_from_slice(value);
        self
    }

    pub fn string(self, field: u64, value: &str) -> Self {
        self.bytes(field, value.as_bytes())
    }

    pub fn message(self, field: u64, value: Msg) -> Self {
        self.bytes(field, &value.0)
    }

    pub fn encode(self) -> Vec<u8> {
        self.0
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A decoded field: a varint's value, or a length-delimited field's bytes.
#[derive(Debug, PartialEq)]
pub enum Field {
    Varint(u64),
    Bytes(Vec<u8>),
}

/// The fields of a protobuf message as (number, value), in order; 64- and 32-bit fields are
/// skipped; decoding stops at the first malformed byte.
pub fn fields(mut bytes: &[u8]) -> Vec<(u64, Field)> {
    fn varint(bytes: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = bytes.split_first()?;
            *bytes = rest;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    let mut out = Vec::new();
    while let Some(key) = varint(&mut bytes) {
        let value = match key & 7 {
            0 => match varint(&mut bytes) {
                Some(v) => Field::Varint(v),
                None => break,
            },
            1 | 5 => {
                let width = if key & 7 == 1 { 8 } else { 4 };
                let Some(rest) = bytes.get(width..) else {
                    break;
                };
                bytes = rest;
                continue;
            }
            2 => {
                let Some(len) = varint(&mut bytes) else { break };
                let Some(value) = bytes.get(..len as usize) else {
                    break;
                };
                bytes = &bytes[len as usize..];
                Field::Bytes(value.to_vec())
            }
            _ => break,
        };
        out.push((key >> 3, value));
    }
    out
}

/// The first length-delimited field `number` (a string, bytes or a message), or nothing.
pub fn bytes_field(message: &[u8], number: u64) -> Vec<u8> {
    fields(message)
        .into_iter()
        .find_map(|(n, f)| match f {
            Field::Bytes(b) if n == number => Some(b),
            _ => None,
        })
        .unwrap_or_default()
}

/// The first length-delimited field `number`, as UTF-8 (lossy), or "".
pub fn string_field(message: &[u8], number: u64) -> String {
    String::from_utf8_lossy(&bytes_field(message, number)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_message_decodes_to_its_fields() {
        let inner = Msg::new().string(1, "pause").varint(4, 300);
        let bytes = Msg::new()
            .message(1, inner)
            .string(2, "x")
            .varint(3, 2)
            .encode();
        let f = fields(&bytes);
        assert_eq!(f.len(), 3);
        let Field::Bytes(inner) = &f[0].1 else {
            panic!("{f:?}")
        };
        assert_eq!(string_field(inner, 1), "pause");
        assert_eq!(fields(inner)[1], (4, Field::Varint(300)));
        assert_eq!(string_field(&bytes, 2), "x");
        assert_eq!(f[2], (3, Field::Varint(2)));
        // The bytes protobuf's own encoder gives for field 3 = 2 and field 4 = 300.
        assert_eq!(Msg::new().varint(3, 2).encode(), [0x18, 0x02]);
        assert_eq!(Msg::new().varint(4, 300).encode(), [0x20, 0xac, 0x02]);
    }
}
