//! The pseudo file systems PID 1 mounts first, and the unmount fixpoint at shutdown.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use crate::sys::System;

/// One early mount.
pub struct EarlyMount {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// In order: each target's parent is mounted before it.
pub const EARLY_MOUNTS: &[EarlyMount] = &[
    EarlyMount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    EarlyMount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    EarlyMount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    EarlyMount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    EarlyMount {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    EarlyMount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    // A writable /tmp on a read-only root (containerd's clients mount image layers there).
    EarlyMount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    EarlyMount {
        source: "securityfs",
        target: "/sys/kernel/security",
        fstype: "securityfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    EarlyMount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
];

/// configfs (where configfs-tsm lives) is a module in Debian's kernel: mounted after the
/// modules are loaded. sysfs creates its mount point when the module registers.
pub const CONFIGFS: EarlyMount = EarlyMount {
    source: "configfs",
    target: "/sys/kernel/config",
    fstype: "configfs",
    flags: NOSUID_NODEV_NOEXEC,
    data: None,
};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot create mount point {path}")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: Errno,
    },
    #[error("cannot enable the cgroup controllers {controllers:?} for children")]
    Controllers {
        controllers: String,
        #[source]
        source: std::io::Error,
    },
}

/// Mounts the pseudo file systems, then enables every available cgroup controller for child
/// cgroups. Already-mounted targets (EBUSY) are accepted, so the init can start over a
/// prepared root.
pub fn mount_early(sys: &dyn System) -> Result<(), MountError> {
    for m in EARLY_MOUNTS {
        mount_one(sys, m)?;
    }
    enable_cgroup_controllers(sys)?;
    Ok(())
}

/// Mounts one entry; mount points in /proc and /sys are the kernel's to create.
pub fn mount_one(sys: &dyn System, m: &EarlyMount) -> Result<(), MountError> {
    if !m.target.starts_with("/sys/") && !m.target.starts_with("/proc/") {
        sys.mkdir_all(Path::new(m.target))
            .map_err(|source| MountError::MountPoint {
                path: m.target.into(),
                source,
            })?;
    }
    match sys.mount(m.source, Path::new(m.target), m.fstype, m.flags, m.data) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(source) => Err(MountError::Mount {
            fstype: m.fstype,
            target: m.target,
            source,
        }),
    }
}

fn enable_cgroup_controllers(sys: &dyn System) -> Result<(), MountError> {
    let root = Path::new("/sys/fs/cgroup");
    let available = sys
        .read_to_string(&root.join("cgroup.controllers"))
        .map_err(|source| MountError::Controllers {
            controllers: String::new(),
            source,
        })?;
    let request: Vec<String> = available
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect();
    if request.is_empty() {
        return Ok(());
    }
    let request = request.join(" ");
    sys.write(&root.join("cgroup.subtree_control"), request.as_bytes())
        .map_err(|source| MountError::Controllers {
            controllers: request.clone(),
            source,
        })
}

/// One line of /proc/self/mountinfo, the fields the unmount loop needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub target: PathBuf,
    pub fstype: String,
}

/// Parses /proc/self/mountinfo (`id parent maj:min root target options ... - fstype source
/// super-options`), unescaping the octal escapes the kernel writes for spaces and the like.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let target = fields.nth(4)?;
            let fstype = fields.skip_while(|f| *f != "-").nth(1)?;
            Some(MountInfo {
                target: PathBuf::from(unescape(target)),
                fstype: fstype.to_string(),
            })
        })
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).ok();
            if let Some(v) = digits.and_then(|d| u8::from_str_radix(d, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the unmount fixpoint achieved.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UnmountReport {
    pub unmounted: Vec<PathBuf>,
    pub read_only: Vec<PathBuf>,
    pub detached: Vec<PathBuf>,
}

/// Pseudo file systems hold no data: a busy one may be detached lazily.
fn holds_no_data(fstype: &str) -> bool {
    matches!(
        fstype,
        "proc"
            | "sysfs"
            | "devtmpfs"
            | "devpts"
            | "tmpfs"
            | "securityfs"
            | "configfs"
            | "cgroup2"
            | "efivarfs"
            | "debugfs"
            | "tracefs"
            | "rootfs"
    )
}

/// Unmounts everything but `/`, newest first, until a round changes nothing (bounded rounds).
/// What will not unmount is remounted read-only when it holds data, detached when it does not.
/// /proc is unmounted last because every round reads the mount table from it.
pub fn unmount_all(sys: &dyn System) -> UnmountReport {
    let mut report = UnmountReport::default();
    let mut last_failures: Vec<MountInfo> = Vec::new();
    for _round in 0..8 {
        let table = match sys.read_to_string(Path::new("/proc/self/mountinfo")) {
            Ok(text) => parse_mountinfo(&text),
            Err(_) => break,
        };
        let mut changed = false;
        last_failures.clear();
        for m in table.iter().rev() {
            if m.target == Path::new("/") || m.target == Path::new("/proc") {
                continue;
            }
            match sys.umount(&m.target, MntFlags::empty()) {
                Ok(()) => {
                    changed = true;
                    report.unmounted.push(m.target.clone());
                }
                // Already gone with a parent, or not a mount point any more.
                Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
                Err(_) => last_failures.push(m.clone()),
            }
        }
        if !changed {
            break;
        }
    }
    for m in &last_failures {
        if holds_no_data(&m.fstype) {
            if sys.umount(&m.target, MntFlags::MNT_DETACH).is_ok() {
                report.detached.push(m.target.clone());
            }
        } else {
            let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            if sys.mount("", &m.target, "", flags, None).is_ok() {
                report.read_only.push(m.target.clone());
            }
        }
    }
    if sys.umount(Path::new("/proc"), MntFlags::empty()).is_ok()
        || sys.umount(Path::new("/proc"), MntFlags::MNT_DETACH).is_ok()
    {
        report.unmounted.push("/proc".into());
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::FakeSystem;

    #[test]
    fn early_mounts_in_order_with_controllers() {
        let sys = FakeSystem::default();
        sys.files.borrow_mut().insert(
            "/sys/fs/cgroup/cgroup.controllers".into(),
            "cpuset cpu io memory pids\n".into(),
        );
        mount_early(&sys).unwrap();
        let calls = sys.calls.borrow();
        let mounts: Vec<&String> = calls.iter().filter(|c| c.starts_with("mount")).collect();
        assert_eq!(mounts.len(), EARLY_MOUNTS.len());
        assert!(mounts[0].starts_with("mount proc /proc proc"));
        assert!(mounts[2].starts_with("mount devtmpfs /dev devtmpfs"));
        assert!(mounts[8].starts_with("mount cgroup2 /sys/fs/cgroup cgroup2"));
        assert!(mounts[6].starts_with("mount tmpfs /tmp tmpfs"));
        assert!(!calls.iter().any(|c| c.starts_with("mkdir /sys/")));
        assert_eq!(
            calls.last().unwrap(),
            "write /sys/fs/cgroup/cgroup.subtree_control +cpuset +cpu +io +memory +pids"
        );
    }

    #[test]
    fn a_failed_mount_names_target_and_type() {
        let mut sys = FakeSystem::default();
        sys.fail_mount.insert("/run".into(), Errno::ENODEV);
        let err = mount_early(&sys).unwrap_err();
        assert_eq!(
            crate::logger::chain(&err),
            "cannot mount tmpfs on /run: ENODEV: No such device"
        );
    }

    #[test]
    fn already_mounted_is_fine() {
        let mut sys = FakeSystem::default();
        sys.fail_mount.insert("/proc".into(), Errno::EBUSY);
        sys.files
            .borrow_mut()
            .insert("/sys/fs/cgroup/cgroup.controllers".into(), "".into());
        mount_early(&sys).unwrap();
    }

    const MOUNTINFO: &str = "\
1 0 0:2 / / rw - rootfs rootfs rw
20 1 0:20 / /proc rw,nosuid - proc proc rw
21 1 0:21 / /sys rw - sysfs sysfs rw
22 1 0:5 / /dev rw - devtmpfs devtmpfs rw
23 22 0:22 / /dev/pts rw - devpts devpts rw
24 1 254:1 / /var/lib/my\\040data rw - ext4 /dev/dm-1 rw
";

    #[test]
    fn mountinfo_is_parsed_and_unescaped() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 6);
        assert_eq!(m[5].target, PathBuf::from("/var/lib/my data"));
        assert_eq!(m[5].fstype, "ext4");
        assert_eq!(m[4].fstype, "devpts");
    }

    #[test]
    fn unmount_newest_first_and_fall_back_when_busy() {
        let sys = FakeSystem::default();
        sys.files
            .borrow_mut()
            .insert("/proc/self/mountinfo".into(), MOUNTINFO.into());
        sys.fail_umount
            .borrow_mut()
            .insert("/var/lib/my data".into(), Errno::EBUSY);
        sys.fail_umount
            .borrow_mut()
            .insert("/dev".into(), Errno::EBUSY);
        let report = unmount_all(&sys);
        // The fake's table never shrinks, so every round unmounts /sys and /dev/pts again; the
        // loop must still end.
        assert!(report.unmounted.contains(&PathBuf::from("/dev/pts")));
        assert_eq!(report.read_only, vec![PathBuf::from("/var/lib/my data")]);
        let calls = sys.calls.borrow();
        assert_eq!(calls[0], "umount /var/lib/my data 0x0");
        assert_eq!(calls[1], "umount /dev/pts 0x0");
        assert!(calls.iter().any(|c| c == "umount /dev 0x2"), "{calls:?}");
        assert_eq!(calls.last().unwrap(), "umount /proc 0x0");
        assert!(!calls.iter().any(|c| c.starts_with("umount / ")));
    }
}
