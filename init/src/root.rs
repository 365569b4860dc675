//! The verified root: from the measured `roothash=` to a running, read-only root.
//!
//! 1. find the root and verity partitions by the UUIDs derived from the root hash (first and
//!    last 128 bits, the systemd/mkosi convention) or by explicit `cvm.*` UUIDs;
//! 2. read the verity superblock (untrusted: checked, and only the input of a tree that the
//!    trusted root hash must match), check the top of the tree against the root hash;
//! 3. load a read-only dm-verity table, mount the erofs root read-only;
//! 4. switch_root: move the pseudo file systems, free the initramfs, chroot.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use cvm_formats::verity::{self, level_blocks, parse_superblock, Superblock, SuperblockError};
use nix::errno::Errno;
use nix::mount::MsFlags;

use crate::config::{BootOptions, CorruptionPolicy};
use crate::disk::discover::{self, DiscoverError, FoundPartition, Roots};
use crate::disk::gpt::{Guid, ROOT_VERITY_X86_64, ROOT_X86_64};
use crate::dm::{self, DmError, MappedDevice};
use crate::sys::System;

/// Where the verified root is mounted before the switch.
pub const NEW_ROOT: &str = "/newroot";
/// The device-mapper name of the verified root.
pub const DM_NAME: &str = "cvm-root";
/// How long to wait for the root disks to appear.
const DISK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("no roothash= on the kernel command line: the root cannot be verified, and an unverified root is never used")]
    NoRootHash,
    #[error(transparent)]
    Discover(#[from] DiscoverError),
    #[error("cannot read {what} from {device}")]
    Read {
        what: &'static str,
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the verity partition {device} holds no usable superblock")]
    Superblock {
        device: String,
        #[source]
        source: SuperblockError,
    },
    #[error("the verity superblock of {device} says {detail}")]
    Geometry { device: String, detail: String },
    #[error("root hash mismatch: roothash= is {expected}, the tree on {device} gives {found}")]
    RootHashMismatch {
        expected: String,
        found: String,
        device: String,
    },
    #[error(transparent)]
    Dm(#[from] DmError),
    #[error("cannot mount the verified root {device} (erofs, read-only) on {target}")]
    Mount {
        device: String,
        target: String,
        #[source]
        source: Errno,
    },
    #[error(
        "the verified root lacks the directory {0}, needed to move a pseudo file system into it"
    )]
    MissingDir(String),
    #[error("cannot read {0} in the verified root")]
    Unreadable(String, #[source] std::io::Error),
    #[error("cannot {step}")]
    Switch {
        step: String,
        #[source]
        source: Errno,
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The partition UUIDs systemd derives from a root hash: the first 128 bits for the root,
/// the last 128 bits for its verity partition.
pub fn derived_uuids(root_hash: &[u8; 32]) -> (Guid, Guid) {
    (
        Guid::from_text_order(root_hash[..16].try_into().unwrap()),
        Guid::from_text_order(root_hash[16..].try_into().unwrap()),
    )
}

/// Checks a superblock against the partitions it describes.
pub fn check_geometry(sb: &Superblock, root_bytes: u64, verity_bytes: u64) -> Result<(), String> {
    let data_bytes = sb
        .data_blocks
        .checked_mul(sb.data_block_size as u64)
        .ok_or("a data size that overflows")?;
    if data_bytes > root_bytes {
        return Err(format!(
            "{} data blocks of {} bytes, more than the {root_bytes} bytes of the root partition",
            sb.data_blocks, sb.data_block_size
        ));
    }
    let tree_bytes = level_blocks(sb.data_blocks, sb.hash_block_size)
        .iter()
        .try_fold(1u64, |sum, &blocks| sum.checked_add(blocks))
        .and_then(|blocks| blocks.checked_mul(sb.hash_block_size as u64))
        .ok_or("a tree size that overflows")?;
    if tree_bytes > verity_bytes {
        return Err(format!(
            "a tree of {tree_bytes} bytes, more than the {verity_bytes} bytes of the verity partition"
        ));
    }
    Ok(())
}

/// The dm-verity table parameters (after `verity`).
pub fn verity_params(
    sb: &Superblock,
    data: &FoundPartition,
    hash: &FoundPartition,
    root_hash: &[u8; 32],
    policy: CorruptionPolicy,
) -> String {
    let salt = if sb.salt.is_empty() {
        "-".to_string()
    } else {
        hex(&sb.salt)
    };
    let mut params = format!(
        "1 {}:{} {}:{} {} {} {} 1 sha256 {} {}",
        data.major,
        data.minor,
        hash.major,
        hash.minor,
        sb.data_block_size,
        sb.hash_block_size,
        sb.data_blocks,
        hex(root_hash),
        salt
    );
    match policy {
        CorruptionPolicy::Eio => {}
        CorruptionPolicy::Panic => params.push_str(" 1 panic_on_corruption"),
        CorruptionPolicy::Restart => params.push_str(" 1 restart_on_corruption"),
    }
    params
}

/// What the verity phase produced.
pub struct VerifiedRoot {
    pub device: MappedDevice,
    pub data: FoundPartition,
    pub hash: FoundPartition,
}

/// Finds, checks and maps the verified root.
pub fn set_up_verity(options: &BootOptions, roots: &Roots) -> Result<VerifiedRoot, RootError> {
    let root_hash = options.root_hash.ok_or(RootError::NoRootHash)?;
    let (derived_root, derived_verity) = derived_uuids(&root_hash);
    let (root_uuid, root_origin) = match options.root_partuuid {
        Some(u) => (u, "from cvm.root-partuuid="),
        None => (derived_root, "derived from roothash="),
    };
    let (verity_uuid, verity_origin) = match options.verity_partuuid {
        Some(u) => (u, "from cvm.verity-partuuid="),
        None => (derived_verity, "derived from roothash="),
    };
    let root_type = Guid::parse(ROOT_X86_64).unwrap();
    let verity_type = Guid::parse(ROOT_VERITY_X86_64).unwrap();
    // Disks may still be probing: retry until both partitions are seen or the wait is over.
    let deadline = std::time::Instant::now() + DISK_WAIT;
    let (data, hash) = loop {
        let views = discover::scan(roots);
        for view in &views {
            if let Ok(gpt) = &view.gpt {
                for w in &gpt.warnings {
                    log::warn!("{}: {w}", view.name);
                }
            }
        }
        for result in discover::announce_backup_partitions(&views, roots) {
            match result {
                Ok(added) => {
                    log::info!("partition {added} from the backup GPT given to the kernel")
                }
                Err(e) => log::warn!("{e}"),
            }
        }
        let found = discover::find(&views, roots, "root", root_origin, root_uuid, root_type)
            .and_then(|d| {
                Ok((
                    d,
                    discover::find(
                        &views,
                        roots,
                        "verity",
                        verity_origin,
                        verity_uuid,
                        verity_type,
                    )?,
                ))
            });
        match found {
            Ok(pair) => break pair,
            Err(DiscoverError::Missing { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            Err(e) => return Err(e.into()),
        }
    };
    log::info!(
        "root partition {} ({}:{}), verity partition {} ({}:{})",
        data.name,
        data.major,
        data.minor,
        hash.name,
        hash.major,
        hash.minor
    );
    let hash_node = hash.node(roots);
    let hash_device = hash_node.display().to_string();
    let read_err = |what, device: &str| {
        let device = device.to_string();
        move |source| RootError::Read {
            what,
            device,
            source,
        }
    };
    let hash_file =
        File::open(&hash_node).map_err(read_err("the verity superblock", &hash_device))?;
    let mut sb_bytes = [0u8; verity::SUPERBLOCK_SIZE];
    hash_file
        .read_exact_at(&mut sb_bytes, 0)
        .map_err(read_err("the verity superblock", &hash_device))?;
    let sb = parse_superblock(&sb_bytes).map_err(|source| RootError::Superblock {
        device: hash_device.clone(),
        source,
    })?;
    check_geometry(&sb, data.size_bytes, hash.size_bytes).map_err(|detail| {
        RootError::Geometry {
            device: hash_device.clone(),
            detail,
        }
    })?;
    // The top of the tree (or the only data block) must hash to the root hash: a wrong
    // roothash= or a replaced tree stops here, before anything is mounted.
    let levels = level_blocks(sb.data_blocks, sb.hash_block_size);
    let top = if levels.is_empty() {
        let data_node = data.node(roots);
        let mut block = vec![0u8; sb.data_block_size as usize];
        File::open(&data_node)
            .and_then(|f| f.read_exact_at(&mut block, 0))
            .map_err(read_err(
                "the only data block",
                &data_node.display().to_string(),
            ))?;
        block
    } else {
        let mut block = vec![0u8; sb.hash_block_size as usize];
        hash_file
            .read_exact_at(&mut block, sb.hash_block_size as u64)
            .map_err(read_err("the top hash block", &hash_device))?;
        block
    };
    let found = verity::digest(&sb.salt, &top);
    if found != root_hash {
        return Err(RootError::RootHashMismatch {
            expected: hex(&root_hash),
            found: hex(&found),
            device: hash_device,
        });
    }
    let params = verity_params(&sb, &data, &hash, &root_hash, options.verity_corruption);
    let sectors = sb.data_blocks * sb.data_block_size as u64 / 512;
    let device = dm::create(DM_NAME, sectors, "verity", &params, true)?;
    log::info!(
        "dm-verity {} is {}: {} data blocks of {} bytes, corruption policy {}",
        DM_NAME,
        device.node(),
        sb.data_blocks,
        sb.data_block_size,
        options.verity_corruption
    );
    Ok(VerifiedRoot { device, data, hash })
}

/// Mounts the verified root read-only at [`NEW_ROOT`].
pub fn mount_root(sys: &dyn System, device: &MappedDevice) -> Result<(), RootError> {
    let node = device.node();
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NODEV;
    let _ = sys.mkdir_all(Path::new(NEW_ROOT));
    sys.mount(&node, Path::new(NEW_ROOT), "erofs", flags, None)
        .map_err(|source| RootError::Mount {
            device: node,
            target: NEW_ROOT.into(),
            source,
        })
}

/// Pseudo file systems moved into the new root, with everything mounted below them.
pub const MOVED: &[&str] = &["/dev", "/proc", "/sys", "/run", "/tmp"];

/// What freeing the initramfs removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Freed {
    pub files: u64,
    pub bytes: u64,
}

/// Removes everything on the initramfs (the file system of `root`), without crossing into other
/// mounts and leaving `keep` alone.
pub fn free_tree(root: &Path, keep: &Path) -> Freed {
    let mut freed = Freed::default();
    let Ok(root_dev) = std::fs::symlink_metadata(root).map(|m| m.dev()) else {
        return freed;
    };
    fn walk(dir: &Path, dev: u64, keep: &Path, freed: &mut Freed) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if path == keep || meta.dev() != dev {
                continue;
            }
            if meta.is_dir() {
                walk(&path, dev, keep, freed);
                if std::fs::remove_dir(&path).is_ok() {
                    freed.files += 1;
                }
            } else if std::fs::remove_file(&path).is_ok() {
                freed.files += 1;
                freed.bytes += meta.len();
            }
        }
    }
    walk(root, root_dev, keep, &mut freed);
    freed
}

fn shmem_kib(meminfo: &Path) -> Option<u64> {
    std::fs::read_to_string(meminfo)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Shmem:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Moves the pseudo file systems into the new root, frees the initramfs and makes the new root
/// `/`. PID 1 goes on running (from its deleted file, which the kernel keeps while mapped).
pub fn switch_root(sys: &dyn System) -> Result<Freed, RootError> {
    let new_root = Path::new(NEW_ROOT);
    for dir in MOVED {
        let target = new_root.join(dir.trim_start_matches('/'));
        let name = || target.display().to_string().replacen(NEW_ROOT, "", 1);
        // An I/O error (a block dm-verity refused) is reported as such, not as absence.
        match std::fs::metadata(&target) {
            Ok(m) if m.is_dir() => {}
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(RootError::Unreadable(name(), e))
            }
            _ => return Err(RootError::MissingDir(name())),
        }
    }
    let switch = |step: String| move |source| RootError::Switch { step, source };
    for dir in MOVED {
        let target = new_root.join(dir.trim_start_matches('/'));
        sys.mount(dir, &target, "", MsFlags::MS_MOVE, None)
            .map_err(switch(format!("move {dir} into the new root")))?;
    }
    // /proc has moved into the new root.
    let meminfo = new_root.join("proc/meminfo");
    let before = shmem_kib(&meminfo);
    // The initramfs is rootfs: it cannot be unmounted, only emptied.
    let freed = free_tree(Path::new("/"), new_root);
    let after = shmem_kib(&meminfo);
    nix::unistd::chdir(new_root).map_err(switch("chdir into the new root".into()))?;
    sys.mount(".", Path::new("/"), "", MsFlags::MS_MOVE, None)
        .map_err(switch("move the new root onto /".into()))?;
    nix::unistd::chroot(".").map_err(switch("chroot into the new root".into()))?;
    nix::unistd::chdir("/").map_err(switch("chdir to /".into()))?;
    log::info!(
        "initramfs freed: {} files, {} KiB (Shmem {} KiB before, {} KiB after)",
        freed.files,
        freed.bytes / 1024,
        before.map_or("?".into(), |v| v.to_string()),
        after.map_or("?".into(), |v| v.to_string()),
    );
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(major: u32, minor: u32) -> FoundPartition {
        FoundPartition {
            name: format!("vda{minor}"),
            disk: "vda".into(),
            major,
            minor,
            size_bytes: 1 << 20,
            entry: crate::disk::gpt::Partition {
                number: minor,
                type_guid: Guid::ZERO,
                unique_guid: Guid::ZERO,
                first_lba: 2048,
                last_lba: 4095,
                attributes: 0,
                name: String::new(),
            },
        }
    }

    #[test]
    fn uuids_come_from_the_two_halves_of_the_root_hash() {
        let mut hash = [0u8; 32];
        for (i, b) in hash.iter_mut().enumerate() {
            *b = i as u8;
        }
        let (root, verity) = derived_uuids(&hash);
        assert_eq!(root.to_string(), "00010203-0405-0607-0809-0a0b0c0d0e0f");
        assert_eq!(verity.to_string(), "10111213-1415-1617-1819-1a1b1c1d1e1f");
    }

    #[test]
    fn table_line_for_each_policy() {
        let sb = Superblock {
            uuid: [0; 16],
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks: 256,
            salt: vec![0xab, 0xcd],
        };
        let line = verity_params(
            &sb,
            &partition(254, 1),
            &partition(254, 2),
            &[0x11; 32],
            CorruptionPolicy::Eio,
        );
        assert_eq!(
            line,
            format!(
                "1 254:1 254:2 4096 4096 256 1 sha256 {} abcd",
                "11".repeat(32)
            )
        );
        let line = verity_params(
            &sb,
            &partition(254, 1),
            &partition(254, 2),
            &[0x11; 32],
            CorruptionPolicy::Panic,
        );
        assert!(line.ends_with(" abcd 1 panic_on_corruption"));
        let line = verity_params(
            &Superblock { salt: vec![], ..sb },
            &partition(254, 1),
            &partition(254, 2),
            &[0x11; 32],
            CorruptionPolicy::Restart,
        );
        assert!(line.ends_with(" - 1 restart_on_corruption"));
    }

    #[test]
    fn geometry_must_fit_the_partitions() {
        let sb = Superblock {
            uuid: [0; 16],
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks: 256,
            salt: vec![],
        };
        // 256 blocks: superblock, the top block, two level-0 blocks.
        assert!(check_geometry(&sb, 1 << 20, 4 * 4096).is_ok());
        assert!(check_geometry(&sb, (1 << 20) - 1, 4 * 4096)
            .unwrap_err()
            .contains("more than the 1048575 bytes"));
        assert!(check_geometry(&sb, 1 << 20, 3 * 4096)
            .unwrap_err()
            .contains("a tree of 16384 bytes"));
        let huge = Superblock {
            data_blocks: u64::MAX,
            ..sb
        };
        assert!(check_geometry(&huge, 1 << 20, 1 << 20).is_err());
    }

    #[test]
    fn free_tree_spares_what_it_must_keep() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/file"), b"12345").unwrap();
        std::fs::write(root.join("top"), b"1").unwrap();
        std::fs::create_dir_all(root.join("newroot/etc")).unwrap();
        std::fs::write(root.join("newroot/etc/keep"), b"k").unwrap();
        let freed = free_tree(root, &root.join("newroot"));
        assert_eq!(freed, Freed { files: 4, bytes: 6 });
        assert!(root.join("newroot/etc/keep").exists());
        assert!(!root.join("a").exists());
    }
}
