//! Finding partitions: every disk's GPT is read with the strict parser, partitions are matched
//! by unique GUID and checked against their expected type, and the kernel's view of each
//! partition (its start and size in sysfs) must agree with the table.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::gpt::{read_gpt, Gpt, GptError, Guid, Partition};

/// Where the kernel shows block devices and their nodes; a temporary tree in tests.
#[derive(Debug, Clone)]
pub struct Roots {
    pub sys_block: PathBuf,
    pub dev: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            sys_block: "/sys/block".into(),
            dev: "/dev".into(),
        }
    }
}

/// A partition found on a disk, with its kernel device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundPartition {
    /// Kernel name, such as `vda2`.
    pub name: String,
    pub disk: String,
    pub major: u32,
    pub minor: u32,
    pub size_bytes: u64,
    pub entry: Partition,
}

impl FoundPartition {
    pub fn node(&self, roots: &Roots) -> PathBuf {
        roots.dev.join(&self.name)
    }
}

/// What one scan saw on one disk.
#[derive(Debug)]
pub struct DiskView {
    pub name: String,
    pub gpt: Result<Gpt, GptError>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiscoverError {
    #[error("no {role} partition with PARTUUID {uuid} ({origin}); seen: {seen}")]
    Missing {
        role: &'static str,
        uuid: Guid,
        origin: &'static str,
        seen: String,
    },
    #[error("{role} partition {name} (PARTUUID {uuid}) has type {found}, expected {expected}")]
    WrongType {
        role: &'static str,
        name: String,
        uuid: Guid,
        found: Guid,
        expected: Guid,
    },
    #[error("PARTUUID {uuid} of the {role} partition appears on more than one disk: {disks}")]
    Ambiguous {
        role: &'static str,
        uuid: Guid,
        disks: String,
    },
    #[error("the kernel's partition {name} disagrees with the GPT: {detail}")]
    KernelMismatch { name: String, detail: String },
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn parse_dev(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Reads the partition table of every disk (not loop, ram, dm or optical devices).
pub fn scan(roots: &Roots) -> Vec<DiskView> {
    let mut names: Vec<String> = std::fs::read_dir(&roots.sys_block)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.retain(|n| {
        !["loop", "ram", "dm-", "sr", "zram", "md"]
            .iter()
            .any(|p| n.starts_with(p))
    });
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let sector =
                read_trimmed(&roots.sys_block.join(&name).join("queue/logical_block_size"))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(512);
            let gpt = match File::open(roots.dev.join(&name)) {
                Ok(file) => read_gpt(&file, sector),
                Err(e) => Err(GptError::Mbr(format!(
                    "cannot open {}: {e}",
                    roots.dev.join(&name).display()
                ))),
            };
            DiskView { name, gpt }
        })
        .collect()
}

/// A one-line summary of a scan, for error messages.
pub fn describe(views: &[DiskView]) -> String {
    if views.is_empty() {
        return "no disks".into();
    }
    views
        .iter()
        .map(|v| match &v.gpt {
            Ok(gpt) if gpt.partitions.is_empty() => format!("{}: GPT without partitions", v.name),
            Ok(gpt) => format!(
                "{}: {}",
                v.name,
                gpt.partitions
                    .iter()
                    .map(|p| format!(
                        "#{} {:?} type {} PARTUUID {}",
                        p.number, p.name, p.type_guid, p.unique_guid
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(e) => format!("{}: {e}", v.name),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Finds the partition with this unique GUID, which must have `type_guid`, on exactly one disk.
pub fn find(
    views: &[DiskView],
    roots: &Roots,
    role: &'static str,
    origin: &'static str,
    uuid: Guid,
    type_guid: Guid,
) -> Result<FoundPartition, DiscoverError> {
    let hits: Vec<(&DiskView, &Gpt, &Partition)> = views
        .iter()
        .filter_map(|v| Some((v, v.gpt.as_ref().ok()?)))
        .flat_map(|(v, gpt)| {
            gpt.partitions
                .iter()
                .filter(move |p| p.unique_guid == uuid)
                .map(move |p| (v, gpt, p))
        })
        .collect();
    let (view, gpt, entry) = match hits.as_slice() {
        [] => {
            return Err(DiscoverError::Missing {
                role,
                uuid,
                origin,
                seen: describe(views),
            })
        }
        [one] => *one,
        many => {
            return Err(DiscoverError::Ambiguous {
                role,
                uuid,
                disks: many
                    .iter()
                    .map(|(v, _, p)| format!("{} #{}", v.name, p.number))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    };
    let name = kernel_partition_name(roots, &view.name, entry.number).ok_or_else(|| {
        DiscoverError::KernelMismatch {
            name: format!("{} #{}", view.name, entry.number),
            detail: "the kernel shows no such partition".into(),
        }
    })?;
    if entry.type_guid != type_guid {
        return Err(DiscoverError::WrongType {
            role,
            name,
            uuid,
            found: entry.type_guid,
            expected: type_guid,
        });
    }
    let dir = roots.sys_block.join(&view.name).join(&name);
    let mismatch = |detail: String| DiscoverError::KernelMismatch {
        name: name.clone(),
        detail,
    };
    let (major, minor) = read_trimmed(&dir.join("dev"))
        .and_then(|d| parse_dev(&d))
        .ok_or_else(|| mismatch("no device number in sysfs".into()))?;
    // sysfs counts in 512-byte sectors whatever the logical block size.
    let start = read_trimmed(&dir.join("start")).and_then(|s| s.parse::<u64>().ok());
    let size = read_trimmed(&dir.join("size")).and_then(|s| s.parse::<u64>().ok());
    let expected_start = entry.first_lba * gpt.sector_size;
    let expected_size = entry.sectors() * gpt.sector_size;
    if start.and_then(|s| s.checked_mul(512)) != Some(expected_start)
        || size.and_then(|s| s.checked_mul(512)) != Some(expected_size)
    {
        return Err(mismatch(format!(
            "kernel start {start:?} size {size:?} (512-byte sectors), GPT start {expected_start} size {expected_size} (bytes)"
        )));
    }
    Ok(FoundPartition {
        name,
        disk: view.name.clone(),
        major,
        minor,
        size_bytes: expected_size,
        entry: entry.clone(),
    })
}

/// `struct blkpg_partition` and `struct blkpg_ioctl_arg` of linux/blkpg.h.
#[repr(C)]
struct BlkpgPartition {
    start: i64,
    length: i64,
    pno: i32,
    devname: [u8; 64],
    volname: [u8; 64],
}

#[repr(C)]
struct BlkpgIoctlArg {
    op: i32,
    flags: i32,
    datalen: i32,
    data: *mut BlkpgPartition,
}

const BLKPG_ADD_PARTITION: i32 = 1;
// BLKPG is _IO(0x12, 105).
nix::ioctl_write_ptr_bad!(blkpg_ioctl, 0x1269, BlkpgIoctlArg);

/// Announces the partitions of tables read from the backup GPT that the kernel does not show
/// (it ignores the backup unless booted with `gpt`). Returns what was added, or why not.
pub fn announce_backup_partitions(
    views: &[DiskView],
    roots: &Roots,
) -> Vec<Result<String, String>> {
    let mut results = Vec::new();
    for view in views {
        let Ok(gpt) = &view.gpt else { continue };
        if !gpt.from_backup {
            continue;
        }
        let disk = match File::open(roots.dev.join(&view.name)) {
            Ok(f) => f,
            Err(e) => {
                results.push(Err(format!("cannot open {}: {e}", view.name)));
                continue;
            }
        };
        for p in &gpt.partitions {
            if kernel_partition_name(roots, &view.name, p.number).is_some() {
                continue;
            }
            let mut part = BlkpgPartition {
                start: (p.first_lba * gpt.sector_size) as i64,
                length: (p.sectors() * gpt.sector_size) as i64,
                pno: p.number as i32,
                devname: [0; 64],
                volname: [0; 64],
            };
            let arg = BlkpgIoctlArg {
                op: BLKPG_ADD_PARTITION,
                flags: 0,
                datalen: std::mem::size_of::<BlkpgPartition>() as i32,
                data: &mut part,
            };
            // SAFETY: `arg` and the partition it points to live across the call, with the
            // layout linux/blkpg.h defines; the kernel only reads them.
            let result = unsafe { blkpg_ioctl(std::os::fd::AsRawFd::as_raw_fd(&disk), &arg) };
            results.push(match result {
                Ok(_) => Ok(format!("{} #{}", view.name, p.number)),
                Err(e) => Err(format!(
                    "cannot add {} #{} to the kernel: {e}",
                    view.name, p.number
                )),
            });
        }
    }
    results
}

/// The kernel's name of partition `number` of `disk` (`vda2`, `nvme0n1p2`).
fn kernel_partition_name(roots: &Roots, disk: &str, number: u32) -> Option<String> {
    std::fs::read_dir(roots.sys_block.join(disk))
        .ok()?
        .filter_map(|e| e.ok())
        .find(|e| {
            read_trimmed(&e.path().join("partition")).and_then(|p| p.parse::<u32>().ok())
                == Some(number)
        })
        .and_then(|e| e.file_name().into_string().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sysfs giving a start that overflows when counted in bytes: refused as a mismatch (it
    /// panicked in debug builds and wrapped in release).
    #[test]
    fn a_kernel_start_that_overflows_is_a_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let roots = Roots {
            sys_block: dir.path().join("sys"),
            dev: dir.path().join("dev"),
        };
        let part = roots.sys_block.join("vda/vda1");
        std::fs::create_dir_all(&part).unwrap();
        for (file, text) in [
            ("partition", "1"),
            ("dev", "254:1"),
            ("start", "18446744073709551615"),
            ("size", "2048"),
        ] {
            std::fs::write(part.join(file), text).unwrap();
        }
        let uuid = Guid([7; 16]);
        let type_guid = Guid([9; 16]);
        let views = [DiskView {
            name: "vda".into(),
            gpt: Ok(Gpt {
                sector_size: 512,
                disk_guid: Guid([1; 16]),
                partitions: vec![Partition {
                    number: 1,
                    type_guid,
                    unique_guid: uuid,
                    first_lba: 2048,
                    last_lba: 4095,
                    attributes: 0,
                    name: "root".into(),
                }],
                warnings: vec![],
                from_backup: false,
            }),
        }];
        match find(&views, &roots, "root", "test", uuid, type_guid) {
            Err(DiscoverError::KernelMismatch { name, detail }) => {
                assert_eq!(name, "vda1");
                assert!(detail.contains("18446744073709551615"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn device_numbers_parse() {
        assert_eq!(parse_dev("254:2"), Some((254, 2)));
        assert_eq!(parse_dev("254"), None);
        assert_eq!(parse_dev("a:b"), None);
    }
}
