//! The SHA-256 a service's binary is measured with before its first exec. Reading and hashing
//! the binary through dm-verity (46 MB for containerd) was most of the `services` phase; the
//! verified root carries a manifest of its programs' digests ([`cvm_formats::digests`]), as
//! trustworthy as the binaries because the root hash is measured. The event is the same either
//! way, so `cvm-measure predict` still agrees.
//!
//! The manifest answers only for a binary that is a file of the verified root, and only while
//! the path still leads to the file it led to when the services phase began (same device and
//! inode): a mount over the path since then (by a service that ran first) makes the node read
//! and hash what is there now, as it would without a manifest.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cvm_formats::digests::{Manifest, MAX_LEN, PATH};

use crate::supervise::FileIdentity;

/// Where a digest came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Manifest,
    Read,
}

/// The digests of the services' binaries that the root's manifest vouches for.
#[derive(Debug, Default)]
pub struct ServiceDigests {
    /// Configured path, (device, inode) when the phase began, and the manifest's digest (a
    /// handful of services: a vector costs the static init less code than a map).
    known: Vec<(PathBuf, FileIdentity, [u8; 32])>,
}

impl ServiceDigests {
    /// Looks up `paths` in the manifest of the root mounted at `root` (`/` on the node). A
    /// manifest that is missing, not on the root's file system or malformed vouches for
    /// nothing (said once); a binary it does not list, or that is not a file of the root, is
    /// read at its exec.
    pub fn load<'a>(root: &Path, paths: impl IntoIterator<Item = &'a Path>) -> ServiceDigests {
        let mut known = Vec::new();
        let Ok(root_dev) = std::fs::metadata(root).map(|m| m.dev()) else {
            return ServiceDigests { known };
        };
        let manifest_path = root.join(PATH.trim_start_matches('/'));
        let manifest = match read_manifest(&manifest_path, root_dev) {
            Ok(Some(m)) => m,
            Ok(None) => return ServiceDigests { known },
            Err(why) => {
                log::warn!(
                    "services: the digest manifest {PATH} is not used ({why}): binaries are read and hashed"
                );
                return ServiceDigests { known };
            }
        };
        for path in paths {
            let Ok(real) = std::fs::canonicalize(path) else {
                continue;
            };
            let Ok(meta) = std::fs::metadata(&real) else {
                continue;
            };
            if !meta.is_file() || meta.dev() != root_dev {
                continue;
            }
            let Ok(inside) = real.strip_prefix(root) else {
                continue;
            };
            let key = Path::new("/").join(inside);
            if let Some(digest) = manifest.get(&key.to_string_lossy()) {
                known.push((path.to_path_buf(), (meta.dev(), meta.ino()), digest));
            }
        }
        ServiceDigests { known }
    }

    /// The SHA-256 of the binary at `path`, where it came from, and the file it is of (device
    /// and inode of the file opened here): the supervisor runs the service only from that file.
    pub fn sha256(
        &self,
        path: &Path,
    ) -> Result<([u8; 32], Source, FileIdentity), cvm_formats::DigestError> {
        let err = |source| cvm_formats::DigestError::Read {
            path: path.display().to_string(),
            source,
        };
        let (file, meta) = crate::sys::open_regular_file(path).map_err(err)?;
        let opened = (meta.dev(), meta.ino());
        if let Some((_, identity, digest)) = self.known.iter().find(|(p, ..)| p == path) {
            if opened == *identity {
                return Ok((*digest, Source::Manifest, opened));
            }
        }
        Ok((
            cvm_formats::sha256_open_file(file, path)?,
            Source::Read,
            opened,
        ))
    }

    /// How many binaries the manifest vouches for.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

/// The manifest, if the root has one on its own file system; an error says why it is unusable.
fn read_manifest(path: &Path, root_dev: u64) -> Result<Option<Manifest>, String> {
    use std::io::Read as _;
    let (file, meta) = match crate::sys::open_regular_file(path) {
        Ok(opened) => opened,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open it: {e}")),
    };
    if meta.dev() != root_dev {
        return Err("it is not on the verified root's file system".into());
    }
    let mut bytes = Vec::new();
    file.take(MAX_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {e}"))?;
    Manifest::parse(&bytes).map(Some).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_with(manifest: &str) -> tempfile::TempDir {
        let tree = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tree.path().join("usr/bin")).unwrap();
        std::fs::create_dir_all(tree.path().join("usr/lib/cvm-init")).unwrap();
        std::fs::write(tree.path().join("usr/bin/containerd"), b"abc").unwrap();
        std::fs::write(tree.path().join("usr/bin/kubelet"), b"kubelet").unwrap();
        std::fs::write(tree.path().join(PATH.trim_start_matches('/')), manifest).unwrap();
        tree
    }

    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    /// A digest that is not the file's: proves the manifest, not the file, answered.
    const LISTED: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn listed_binaries_of_the_root_come_from_the_manifest_and_others_are_read() {
        let tree = tree_with(&format!("{LISTED}  /usr/bin/containerd\n"));
        let root = tree.path().canonicalize().unwrap();
        let containerd = root.join("usr/bin/containerd");
        let kubelet = root.join("usr/bin/kubelet");
        let digests = ServiceDigests::load(&root, [containerd.as_path(), kubelet.as_path()]);
        assert_eq!(digests.len(), 1);
        let (digest, source, _) = digests.sha256(&containerd).unwrap();
        assert_eq!(
            (cvm_formats::hex(&digest).as_str(), source),
            (LISTED, Source::Manifest)
        );
        let (digest, source, identity) = digests.sha256(&kubelet).unwrap();
        assert_eq!(source, Source::Read);
        let meta = std::fs::metadata(&kubelet).unwrap();
        assert_eq!(
            identity,
            (meta.dev(), meta.ino()),
            "the file that was hashed"
        );
        assert_eq!(digest, cvm_formats::sha256_file(&kubelet).unwrap());
    }

    #[test]
    fn a_path_that_leads_elsewhere_since_the_phase_began_is_read() {
        let tree = tree_with(&format!("{LISTED}  /usr/bin/containerd\n"));
        let root = tree.path().canonicalize().unwrap();
        let containerd = root.join("usr/bin/containerd");
        let digests = ServiceDigests::load(&root, [containerd.as_path()]);
        // Replaced by another file (another inode), as a mount over the path would.
        let other = root.join("usr/bin/other");
        std::fs::write(&other, b"abc").unwrap();
        std::fs::rename(&other, &containerd).unwrap();
        let (digest, source, _) = digests.sha256(&containerd).unwrap();
        assert_eq!(
            (cvm_formats::hex(&digest).as_str(), source),
            (ABC, Source::Read)
        );
    }

    #[test]
    fn a_malformed_or_missing_manifest_vouches_for_nothing() {
        for manifest in [format!("{LISTED} /usr/bin/containerd\n"), String::new()] {
            let tree = tree_with(&manifest);
            let root = tree.path().canonicalize().unwrap();
            let containerd = root.join("usr/bin/containerd");
            let digests = ServiceDigests::load(&root, [containerd.as_path()]);
            assert!(digests.is_empty());
            let (digest, source, _) = digests.sha256(&containerd).unwrap();
            assert_eq!(
                (cvm_formats::hex(&digest).as_str(), source),
                (ABC, Source::Read)
            );
        }
        let tree = tree_with("");
        let root = tree.path().canonicalize().unwrap();
        std::fs::remove_file(root.join(PATH.trim_start_matches('/'))).unwrap();
        let containerd = root.join("usr/bin/containerd");
        assert!(ServiceDigests::load(&root, [containerd.as_path()]).is_empty());
    }

    #[test]
    fn a_fifo_or_a_device_at_a_binary_path_is_refused_without_blocking() {
        let tree = tree_with("");
        let fifo = tree.path().join("usr/bin/fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        for path in [fifo, PathBuf::from("/dev/zero")] {
            let shown = path.display().to_string();
            let result = crate::sys::returns_promptly(&shown, move || {
                ServiceDigests::default().sha256(&path).map(|_| ())
            });
            let e = result.expect_err("not a binary");
            assert!(
                format!("{:?}", e).contains("not a regular file"),
                "{shown}: {e:?}"
            );
        }
    }

    #[test]
    fn a_link_is_looked_up_by_the_file_it_leads_to() {
        let tree = tree_with(&format!("{LISTED}  /usr/bin/containerd\n"));
        let root = tree.path().canonicalize().unwrap();
        let link = root.join("usr/bin/link");
        std::os::unix::fs::symlink("containerd", &link).unwrap();
        let digests = ServiceDigests::load(&root, [link.as_path()]);
        assert_eq!(digests.sha256(&link).unwrap().1, Source::Manifest);
    }
}
