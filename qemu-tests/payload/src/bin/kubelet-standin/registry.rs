//! STAND-IN: a container image made on the node from the stand-in's own executable, and the
//! least of an OCI registry (the distribution API's manifest and blob reads, over HTTP/1.1 on
//! the loopback address) that containerd pulls it from. The test image's containerd
//! configuration names this registry as the mirror of `registry.k8s.io` (the pause image) and
//! of `cvm-test.invalid`; nothing leaves the node.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};

use sha2::{Digest, Sha256};

/// Where the executable is in the image, its entry point.
pub const ENTRYPOINT: &str = "/cvm-probe";
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// One image: its manifest and the blobs it names, by digest.
pub struct Image {
    manifest: Vec<u8>,
    pub manifest_digest: String,
    blobs: Vec<(String, Vec<u8>)>,
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// A tar archive (ustar) holding one executable file.
fn tar_one(name: &str, contents: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    let field = |header: &mut [u8; 512], at: usize, value: &[u8]| {
        header[at..at + value.len()].copy_from_slice(value);
    };
    field(&mut header, 0, name.as_bytes());
    field(&mut header, 100, b"0000755\0");
    field(&mut header, 108, b"0000000\0");
    field(&mut header, 116, b"0000000\0");
    field(
        &mut header,
        124,
        format!("{:011o}\0", contents.len()).as_bytes(),
    );
    field(&mut header, 136, b"00000000000\0");
    field(&mut header, 148, b"        ");
    header[156] = b'0';
    field(&mut header, 257, b"ustar\0");
    field(&mut header, 263, b"00");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    field(&mut header, 148, format!("{sum:06o}\0 ").as_bytes());
    let mut out = header.to_vec();
    out.extend_from_slice(contents);
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

impl Image {
    /// The image of `executable` at [`ENTRYPOINT`], whose default command is `pause` (what the
    /// pod's sandbox container runs).
    pub fn of_executable(executable: &[u8]) -> Image {
        let layer = tar_one(ENTRYPOINT.trim_start_matches('/'), executable);
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Entrypoint":["{ENTRYPOINT}"],"Cmd":["pause"]}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
            digest(&layer)
        )
        .into_bytes();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{MANIFEST_TYPE}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
            digest(&config),
            config.len(),
            digest(&layer),
            layer.len()
        )
        .into_bytes();
        Image {
            manifest_digest: digest(&manifest),
            manifest,
            blobs: vec![(digest(&config), config), (digest(&layer), layer)],
        }
    }

    /// The answer to one request line's method and path: (status, content type, body).
    fn answer(&self, path: &str) -> (u16, &'static str, &[u8]) {
        let path = path.split('?').next().unwrap_or_default();
        if path == "/v2/" || path == "/v2" {
            return (200, "application/json", b"{}");
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return (404, "text/plain", b"not found\n");
        };
        if rest.rsplit_once("/manifests/").is_some() {
            // Every repository and tag names the one image.
            return (200, MANIFEST_TYPE, &self.manifest);
        }
        if let Some((_, wanted)) = rest.rsplit_once("/blobs/") {
            if let Some((_, blob)) = self.blobs.iter().find(|(d, _)| d == wanted) {
                return (200, "application/octet-stream", blob);
            }
        }
        (404, "text/plain", b"not found\n")
    }
}

/// Answers requests on `listener` until the process ends, one connection at a time.
pub fn serve(listener: TcpListener, image: Image) {
    for connection in listener.incoming().flatten() {
        if let Err(e) = answer_one(connection, &image) {
            println!("kubelet-standin: test registry: {e}");
        }
    }
}

fn answer_one(connection: TcpStream, image: &Image) -> std::io::Result<()> {
    let mut reader = BufReader::new(connection.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut words = request.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, kind, body) = match method {
        "GET" | "HEAD" => image.answer(path),
        _ => (405, "text/plain", &b"method not allowed\n"[..]),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let mut out = connection;
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if kind == MANIFEST_TYPE {
        head.push_str(&format!(
            "Docker-Content-Digest: {}\r\n",
            image.manifest_digest
        ));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if method == "GET" {
        out.write_all(body)?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_names_its_blobs_and_the_layer_is_a_valid_tar() {
        let image = Image::of_executable(b"\x7fELF probe");
        let manifest = String::from_utf8(image.manifest.clone()).unwrap();
        for (digest, bytes) in &image.blobs {
            assert!(manifest.contains(digest), "{manifest}");
            assert!(manifest.contains(&format!("\"size\":{}", bytes.len())));
            assert_eq!(image.answer(&format!("/v2/probe/blobs/{digest}")).2, bytes);
        }
        let layer = &image.blobs[1].1;
        assert_eq!(layer.len() % 512, 0);
        assert_eq!(&layer[0..9], b"cvm-probe");
        assert_eq!(&layer[257..263], b"ustar\0");
        // The checksum: the header's bytes with the checksum field read as spaces.
        let mut sum = 0u32;
        for (i, &b) in layer[..512].iter().enumerate() {
            sum += if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            };
        }
        let stored = std::str::from_utf8(&layer[148..154]).unwrap();
        assert_eq!(u32::from_str_radix(stored, 8).unwrap(), sum);
        assert_eq!(&layer[512..522], b"\x7fELF probe");
        assert_eq!(
            image.answer("/v2/pause/manifests/3.9?ns=registry.k8s.io").0,
            200
        );
        assert_eq!(image.answer("/v2/pause/blobs/sha256:00").0, 404);
        assert_eq!(image.answer("/other").0, 404);
    }
}
