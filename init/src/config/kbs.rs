//! The `[kbs]` section: the key broker of the `kbs` key source, and its checks.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{invalid, Invalid};

/// The key broker the `kbs` key source asks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KbsConfig {
    /// `https://host:port` (trusted by `ca` or `public_key_sha256` only), or `http://host:port`
    /// with `plain_http = true`.
    pub url: String,
    /// The state-disk secret: `<repository>/<type>/<tag>`.
    pub resource: String,
    /// Test builds only (the `test-hooks` feature): must be true for an http:// URL. A release
    /// build refuses it by name, because over plain http anyone on the path can pose as the
    /// broker: the node's ephemeral key travels in clear, so anyone can encrypt a disk key of
    /// its own choosing to it (and choose the released files).
    #[serde(default)]
    pub plain_http: bool,
    /// https: the CA certificate(s) (PEM file in the verified root) the broker's certificate
    /// must chain to, for the URL's host.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// https: the sha256 (64 hex digits) of the broker certificate's SubjectPublicKeyInfo;
    /// any other key is refused.
    #[serde(default)]
    pub public_key_sha256: Option<String>,
    /// Further resources released in the same session, written to files on a tmpfs.
    #[serde(default, rename = "file")]
    pub files: Vec<KbsFile>,
}

/// A resource written to a file (for example a kubelet bootstrap kubeconfig).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KbsFile {
    /// `<repository>/<type>/<tag>`.
    pub resource: String,
    /// Under /run or /tmp (memory only: a secret never reaches a disk unencrypted).
    pub path: PathBuf,
    /// Permission bits, 0600 unless given.
    #[serde(default = "default_secret_mode")]
    pub mode: u32,
}

fn default_secret_mode() -> u32 {
    0o600
}

/// `<repository>/<type>/<tag>`, each part of letters, digits, `._-`, not starting with a dot.
fn is_resource_path(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

impl KbsConfig {
    /// `host:port` of the URL.
    pub fn address(&self) -> Option<&str> {
        let rest = self
            .url
            .strip_prefix("http://")
            .or_else(|| self.url.strip_prefix("https://"))?;
        let address = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = address.rsplit_once(':')?;
        let valid = !host.is_empty()
            && !address.contains('/')
            && !address.contains('@')
            && port.parse::<u16>().is_ok_and(|p| p != 0);
        valid.then_some(address)
    }

    pub fn https(&self) -> bool {
        self.url.starts_with("https://")
    }
}

impl KbsConfig {
    /// The `[kbs]` checks; `kbs_key` says whether the state disk's key comes from it.
    pub fn validate(&self, kbs_key: bool) -> Result<(), Invalid> {
        let kbs = self;
        if !kbs.files.is_empty() && !kbs_key {
            return Err(invalid(
                "kbs.file".into(),
                &format!("{} file(s)", kbs.files.len()),
                "state.key = \"kbs\" (files come in the session that releases the disk key)",
            ));
        }
        if kbs.address().is_none() {
            return Err(invalid(
                "kbs.url".into(),
                &kbs.url,
                "https://host:port or http://host:port",
            ));
        }
        #[cfg(not(feature = "test-hooks"))]
        if kbs.plain_http {
            return Err(invalid(
                "kbs.plain_http".into(),
                "true",
                "absent: a release build has no plain http, since over it anyone on the path can \
                 pose as the key broker and choose the disk key (the node's ephemeral key travels \
                 in clear); use an https:// url with kbs.ca or kbs.public_key_sha256",
            ));
        }
        if kbs.https() {
            if kbs.plain_http {
                return Err(invalid(
                    "kbs.plain_http".into(),
                    "true",
                    "false (or absent) for an https:// key broker",
                ));
            }
            match (&kbs.ca, &kbs.public_key_sha256) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(invalid(
                        "kbs.ca".into(),
                        if kbs.ca.is_some() { "set with kbs.public_key_sha256" } else { "absent, as is kbs.public_key_sha256" },
                        "exactly one of kbs.ca (a PEM file) or kbs.public_key_sha256 for an https:// key broker",
                    ))
                }
                (Some(ca), None) if !ca.is_absolute() => {
                    return Err(invalid(
                        "kbs.ca".into(),
                        &ca.to_string_lossy(),
                        "an absolute path in the root image",
                    ))
                }
                (None, Some(pin))
                    if cvm_formats::verity::parse_hex(pin).is_none_or(|b| b.len() != 32) =>
                {
                    return Err(invalid(
                        "kbs.public_key_sha256".into(),
                        pin,
                        "64 hex digits (sha256 of the broker's SubjectPublicKeyInfo)",
                    ))
                }
                _ => {}
            }
        } else if cfg!(not(feature = "test-hooks")) {
            return Err(invalid(
                "kbs.url".into(),
                &kbs.url,
                "https://host:port with kbs.ca or kbs.public_key_sha256 (a release build has no \
                 plain http: anyone on the path could pose as the key broker)",
            ));
        } else {
            if !kbs.plain_http {
                return Err(invalid(
                    "kbs.plain_http".into(),
                    "false",
                    "true for an http:// key broker (say so explicitly; test builds only)",
                ));
            }
            if kbs.ca.is_some() || kbs.public_key_sha256.is_some() {
                return Err(invalid(
                    "kbs.url".into(),
                    &kbs.url,
                    "https:// when kbs.ca or kbs.public_key_sha256 is set",
                ));
            }
        }
        if !is_resource_path(&kbs.resource) {
            return Err(invalid(
                "kbs.resource".into(),
                &kbs.resource,
                "<repository>/<type>/<tag>",
            ));
        }
        let mut seen = Vec::new();
        for (i, file) in kbs.files.iter().enumerate() {
            if !is_resource_path(&file.resource) {
                return Err(invalid(
                    format!("kbs.file[{i}].resource"),
                    &file.resource,
                    "<repository>/<type>/<tag>",
                ));
            }
            let in_memory = ["/run/", "/tmp/"].iter().any(|m| {
                file.path.starts_with(m) && file.path != Path::new(m.trim_end_matches('/'))
            });
            let plain = file.path.components().all(|c| {
                matches!(
                    c,
                    std::path::Component::RootDir | std::path::Component::Normal(_)
                )
            });
            if !in_memory || !plain || seen.contains(&&file.path) {
                return Err(invalid(
                    format!("kbs.file[{i}].path"),
                    &file.path.to_string_lossy(),
                    "a new file under /run or /tmp (memory only), without . or ..",
                ));
            }
            seen.push(&file.path);
            if file.mode & !0o777 != 0 || file.mode & 0o007 != 0 {
                return Err(invalid(
                    format!("kbs.file[{i}].mode"),
                    &format!("{:o}", file.mode),
                    "permission bits without access for others (at most 0770)",
                ));
            }
        }
        Ok(())
    }
}
