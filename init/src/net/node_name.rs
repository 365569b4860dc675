//! The node's name when neither the command line nor the configuration names it. The host
//! chooses MAC addresses and answers DHCP; a name taken from either would let it choose
//! which Kubernetes node this one claims to be (and, with automatic CSR approval, obtain
//! that node's credentials). So the node generates its own name and keeps it on the
//! encrypted state disk, where the kubelet's credentials for that name also live.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;

/// Where the name is kept, under the state file system's mount point.
pub const FILE: &str = "cvm-init/node-name";

/// The longest file read back: a name is at most 63 characters and a newline.
const MAX_LEN: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum NodeNameError {
    #[error("cannot read the node name kept in {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the node name kept in {path} is {value:?}: expected one DNS label of 1 to 63 characters of [a-z0-9-] (remove the file to have a new name generated, or set cvm.hostname=)")]
    Invalid { path: PathBuf, value: String },
    #[error("cannot keep the node name in {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Files(#[from] super::files::FilesError),
}

/// A name for a node nobody named: `node-` and 12 random hexadecimal digits (48 bits: two
/// nodes of a 10,000-node cluster share one with a chance of about 1 in 5 million).
pub fn generate() -> String {
    let mut bytes = [0u8; 6];
    crate::disk::luks2::kernel_random(&mut bytes);
    format!("node-{}", cvm_formats::hex(&bytes))
}

/// Whether `name` is a name this module writes or accepts back: a single lower-case DNS label,
/// which is also a valid Kubernetes node name.
fn valid(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Where the name was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// Read back from the state disk (a later boot).
    Found(String),
    /// `generated` was written to the state disk (its first boot).
    Stored(String),
}

impl Kept {
    pub fn name(&self) -> &str {
        match self {
            Kept::Found(n) | Kept::Stored(n) => n,
        }
    }
}

/// The name kept under `mount`, or `generated` stored there when none is. A file that is not a
/// valid name is refused (the disk is the node's own, so it is damaged or was written by a
/// workload): the boot stops rather than take another node's identity or a new one.
pub fn keep(mount: &Path, generated: &str) -> Result<Kept, NodeNameError> {
    let path = mount.join(FILE);
    let parent = crate::nofollow::open_parent(&path, Some(0o700)).map_err(|source| {
        NodeNameError::Write {
            path: path.clone(),
            source,
        }
    })?;
    match parent.open(None, OFlag::O_RDONLY, 0) {
        Ok(file) => {
            let mut text = String::new();
            file.take(MAX_LEN + 1)
                .read_to_string(&mut text)
                .map_err(|source| NodeNameError::Read {
                    path: path.clone(),
                    source,
                })?;
            let name = text.strip_suffix('\n').unwrap_or(&text);
            if text.len() as u64 > MAX_LEN || !valid(name) {
                return Err(NodeNameError::Invalid {
                    path,
                    value: text.chars().take(MAX_LEN as usize).collect(),
                });
            }
            Ok(Kept::Found(name.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let fail = |source| NodeNameError::Write {
                path: path.clone(),
                source,
            };
            let tmp = parent.name.with_extension("new");
            let mut file = parent
                .open(
                    Some(&tmp),
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC,
                    0o600,
                )
                .map_err(fail)?;
            file.write_all(format!("{generated}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(fail)?;
            parent.rename(&tmp, &parent.name).map_err(fail)?;
            parent.sync().map_err(fail)?;
            Ok(Kept::Stored(generated.to_string()))
        }
        Err(source) => Err(NodeNameError::Read { path, source }),
    }
}

/// [`keep`], then the kernel's host name and hosts renamed when the kept name differs.
pub fn settle(mount: &Path, generated: &str) -> Result<Kept, NodeNameError> {
    let kept = keep(mount, generated)?;
    if kept.name() != generated {
        super::files::rename(kept.name())?;
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_are_valid_and_differ() {
        let a = generate();
        assert!(valid(&a), "{a}");
        assert_eq!(a.len(), "node-".len() + 12);
        assert_ne!(a, generate());
    }

    #[test]
    fn the_first_boot_stores_the_name_and_later_boots_find_it() {
        let mount = tempfile::tempdir().unwrap();
        let mount = mount.path().canonicalize().unwrap();
        assert_eq!(
            keep(&mount, "node-aaaaaaaaaaaa").unwrap(),
            Kept::Stored("node-aaaaaaaaaaaa".into())
        );
        assert_eq!(
            std::fs::read_to_string(mount.join(FILE)).unwrap(),
            "node-aaaaaaaaaaaa\n"
        );
        assert_eq!(
            keep(&mount, "node-bbbbbbbbbbbb").unwrap(),
            Kept::Found("node-aaaaaaaaaaaa".into())
        );
    }

    #[test]
    fn a_damaged_or_foreign_name_is_refused_by_name_and_left_alone() {
        let mount = tempfile::tempdir().unwrap();
        let mount = mount.path().canonicalize().unwrap();
        std::fs::create_dir_all(mount.join("cvm-init")).unwrap();
        for bad in [
            "".to_string(),
            "\n".into(),
            "Node-A\n".into(),
            "a.b\n".into(),
            "-a\n".into(),
            "a\n\n".into(),
            "node\u{1b}[2J\n".into(),
            "a".repeat(64),
            "a".repeat(200),
        ] {
            std::fs::write(mount.join(FILE), &bad).unwrap();
            let e = keep(&mount, "node-aaaaaaaaaaaa").unwrap_err();
            assert!(
                matches!(&e, NodeNameError::Invalid { path, .. } if path == &mount.join(FILE)),
                "{bad:?}: {e:?}"
            );
            assert!(e.to_string().contains("expected one DNS label"), "{e}");
            assert_eq!(std::fs::read_to_string(mount.join(FILE)).unwrap(), bad);
        }
    }

    #[test]
    fn a_link_in_place_of_the_name_is_not_followed() {
        let mount = tempfile::tempdir().unwrap();
        let mount = mount.path().canonicalize().unwrap();
        let elsewhere = mount.join("elsewhere");
        std::fs::write(&elsewhere, "node-cccccccccccc\n").unwrap();
        std::fs::create_dir_all(mount.join("cvm-init")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, mount.join(FILE)).unwrap();
        assert!(keep(&mount, "node-aaaaaaaaaaaa").is_err());
        assert_eq!(
            std::fs::read_to_string(&elsewhere).unwrap(),
            "node-cccccccccccc\n"
        );
    }
}
