//! KUBELET STAND-IN for test and demo images — not a kubelet. No kubelet package exists in
//! the registries this project can reach, so test images put this program at the kubelet's
//! path: it logs its arguments, asks the container runtime for its version over CRI
//! (`runtime.v1.RuntimeService/Version`, gRPC over HTTP/2 on the unix socket), says when it
//! reaches the runtime and when it loses it, and keeps running until SIGTERM.
//!
//! The HTTP/2 client is the least that one unary call needs: the preface, an empty SETTINGS,
//! one HEADERS frame (HPACK literals, no Huffman, no dynamic table) and one DATA frame; in the
//! answer only DATA frames are decoded.
//!
//! Before that it takes the first steps of joining a cluster (`join.rs`), as far as a test can
//! observe them.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

mod join;

const DEFAULT_ENDPOINT: &str = "/run/containerd/containerd.sock";
const VERSION_PATH: &str = "/runtime.v1.RuntimeService/Version";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!(
        "kubelet-standin: this is a stand-in, not a kubelet; arguments: {}",
        args.join(" ")
    );
    // A kubelet without --hostname-override registers the node under the kernel's host name.
    let node_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    println!("kubelet-standin: node name {}", node_name.trim_end());
    // The join steps beside the runtime's: neither waits for the other.
    let join_args = args.clone();
    std::thread::spawn(move || join::run(&join_args));
    let endpoint = args
        .iter()
        .find_map(|a| a.strip_prefix("--container-runtime-endpoint="))
        .map(|e| e.trim_start_matches("unix://").to_string())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    let mut reached = false;
    let mut last_error = String::new();
    loop {
        match runtime_version(&endpoint) {
            Ok(version) => {
                if !reached {
                    println!(
                        "kubelet-standin: reached the container runtime at {endpoint}: {version}"
                    );
                    reached = true;
                    last_error.clear();
                }
            }
            Err(e) => {
                if reached || e != last_error {
                    println!("kubelet-standin: container runtime at {endpoint} unreachable: {e}");
                }
                reached = false;
                last_error = e;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One CRI Version call; returns "name version (CRI api version)".
fn runtime_version(socket: &str) -> Result<String, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    let mut headers = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
    literal_indexed_name(&mut headers, 4, VERSION_PATH); // :path
    literal_indexed_name(&mut headers, 1, "localhost"); // :authority
    literal_new_name(&mut headers, "content-type", "application/grpc");
    literal_new_name(&mut headers, "te", "trailers");
    frame(&mut out, 0x1, 0x4, 1, &headers); // HEADERS, END_HEADERS
                                            // VersionRequest { version: "v1" }, as one uncompressed gRPC message.
    let request = [0x0a, 0x02, b'v', b'1'];
    let mut message = vec![0u8];
    message.extend_from_slice(&(request.len() as u32).to_be_bytes());
    message.extend_from_slice(&request);
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
        return Err("no response message (is the CRI plugin enabled?)".into());
    }
    let fields = protobuf_strings(&body[5..]);
    let field = |n: u64| {
        fields
            .iter()
            .find(|(k, _)| *k == n)
            .map_or("?", |(_, v)| v.as_str())
    };
    Ok(format!("{} {} (CRI {})", field(2), field(3), field(4)))
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

/// The length-delimited fields of a protobuf message, as (field number, UTF-8 lossy string).
fn protobuf_strings(mut bytes: &[u8]) -> Vec<(u64, String)> {
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
    let mut fields = Vec::new();
    while let Some(key) = varint(&mut bytes) {
        match key & 7 {
            0 => {
                varint(&mut bytes);
            }
            2 => {
                let Some(len) = varint(&mut bytes) else { break };
                let Some(value) = bytes.get(..len as usize) else {
                    break;
                };
                fields.push((key >> 3, String::from_utf8_lossy(value).into_owned()));
                bytes = &bytes[len as usize..];
            }
            _ => break,
        }
    }
    fields
}
