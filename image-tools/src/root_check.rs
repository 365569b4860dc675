//! What a root tree holds, and what it must not: a shell, an interpreter, a package manager or
//! a setuid/setgid file is something a workload that escapes its container could use, and
//! nothing the node runs needs one. The check is by name (any executable file or link of that
//! name, in any directory) and by mode; the build runs it on the tree it extracted from the
//! image, and the image test's privileged container on the node's root as it sees it (the test
//! image's kubelet stand-in includes this file, so both run the same check).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Names of shells, whatever directory they are in.
const SHELLS: &[&str] = &[
    "sh", "bash", "rbash", "dash", "ash", "ksh", "ksh93", "mksh", "pdksh", "zsh", "csh", "tcsh",
    "fish", "busybox", "toybox", "yash", "posh",
];

/// Names (or name prefixes ending in a version) of interpreters.
const INTERPRETERS: &[&str] = &[
    "perl",
    "python",
    "ruby",
    "lua",
    "luajit",
    "tclsh",
    "wish",
    "node",
    "nodejs",
    "php",
    "awk",
    "gawk",
    "mawk",
    "nawk",
    "original-awk",
    "guile",
    "expect",
    "pwsh",
    "irb",
    "jrunscript",
    "jshell",
];

/// Names of package managers and their back ends.
const PACKAGE_MANAGERS: &[&str] = &[
    "dpkg",
    "dpkg-deb",
    "dpkg-query",
    "dpkg-divert",
    "dpkg-trigger",
    "apt",
    "apt-get",
    "apt-cache",
    "apt-config",
    "apt-key",
    "aptitude",
    "rpm",
    "yum",
    "dnf",
    "microdnf",
    "zypper",
    "apk",
    "opkg",
    "pip",
    "pip3",
    "snap",
    "flatpak",
];

/// Why a file must not be in the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    Shell(PathBuf),
    Interpreter(PathBuf),
    PackageManager(PathBuf),
    /// Setuid or setgid (the mode's 0o6000 bits).
    SetId(PathBuf, u32),
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Shell(p) => write!(f, "{}: a shell", p.display()),
            Finding::Interpreter(p) => write!(f, "{}: an interpreter", p.display()),
            Finding::PackageManager(p) => write!(f, "{}: a package manager", p.display()),
            Finding::SetId(p, mode) => write!(f, "{}: setuid/setgid (mode {mode:o})", p.display()),
        }
    }
}

/// What the tree holds.
#[derive(Debug, Default)]
pub struct Report {
    /// Regular files.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The largest regular files, largest first (path in the root, bytes).
    pub largest: Vec<(PathBuf, u64)>,
    pub findings: Vec<Finding>,
    /// Directories that are another file system's mount point, not descended into
    /// ([`check_one_filesystem`] only).
    pub other_filesystems: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}")]
pub struct CheckError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// How many of the largest files a report keeps.
pub const LARGEST: usize = 10;

/// Walks `root` without following links.
pub fn check(root: &Path) -> Result<Report, CheckError> {
    walk_from(root, None)
}

/// Walks `root` without following links or entering another file system: on a running node,
/// the root file system alone, without /proc, /sys or what the state disk and the container
/// runtime mounted (their mount points are listed in the report).
pub fn check_one_filesystem(root: &Path) -> Result<Report, CheckError> {
    let device = fs::symlink_metadata(root)
        .map_err(|source| CheckError {
            path: root.to_path_buf(),
            source,
        })?
        .dev();
    walk_from(root, Some(device))
}

fn walk_from(root: &Path, device: Option<u64>) -> Result<Report, CheckError> {
    let mut report = Report::default();
    let mut all = Vec::new();
    walk(root, root, device, &mut report, &mut all)?;
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(LARGEST);
    report.largest = all;
    report.findings.sort_by_key(|f| f.to_string());
    Ok(report)
}

fn walk(
    root: &Path,
    dir: &Path,
    device: Option<u64>,
    report: &mut Report,
    all: &mut Vec<(PathBuf, u64)>,
) -> Result<(), CheckError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckError { path, source }
    };
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(err(dir))?
        .collect::<Result<_, _>>()
        .map_err(err(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(err(&path))?;
        let inside = Path::new("/").join(path.strip_prefix(root).unwrap_or(&path));
        if meta.is_dir() {
            if device.is_some_and(|d| d != meta.dev()) {
                report.other_filesystems.push(inside);
            } else {
                walk(root, &path, device, report, all)?;
            }
            continue;
        }
        // By name: links (what they lead to runs) and executable files; a configuration file
        // that shares a program's name (logrotate's `dpkg`) is not that program.
        if meta.file_type().is_symlink() || meta.mode() & 0o111 != 0 {
            if let Some(finding) = by_name(&inside) {
                report.findings.push(finding);
            }
        }
        if meta.is_file() {
            report.files += 1;
            report.bytes += meta.len();
            all.push((inside.clone(), meta.len()));
            if meta.mode() & 0o6000 != 0 {
                report
                    .findings
                    .push(Finding::SetId(inside, meta.mode() & 0o7777));
            }
        }
    }
    Ok(())
}

/// A shell, interpreter or package manager by its name (a version suffix such as `perl5.36.0`
/// or `python3.13` included).
fn by_name(path: &Path) -> Option<Finding> {
    let name = path.file_name()?.to_str()?;
    let base = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    let base = if base.is_empty() { name } else { base };
    let listed = |list: &[&str]| list.contains(&name) || list.contains(&base);
    if listed(SHELLS) {
        Some(Finding::Shell(path.to_path_buf()))
    } else if listed(INTERPRETERS) {
        Some(Finding::Interpreter(path.to_path_buf()))
    } else if listed(PACKAGE_MANAGERS) {
        Some(Finding::PackageManager(path.to_path_buf()))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// An executable file, as a package installs a program.
    fn exe(path: &Path, contents: impl AsRef<[u8]>) {
        fs::write(path, contents).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn a_wrong_tree_is_named_file_by_file() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        for dir in ["usr/bin", "usr/sbin", "usr/lib/x86_64-linux-gnu", "etc"] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        exe(&root.join("usr/bin/dash"), b"\x7fELF");
        std::os::unix::fs::symlink("dash", root.join("usr/bin/sh")).unwrap();
        exe(&root.join("usr/bin/perl5.40.1"), b"\x7fELF");
        exe(&root.join("usr/bin/python3.13"), b"\x7fELF");
        exe(&root.join("usr/bin/mawk"), b"\x7fELF");
        exe(&root.join("usr/bin/dpkg"), b"\x7fELF");
        exe(&root.join("usr/bin/apt-get"), b"\x7fELF");
        exe(&root.join("usr/bin/mount"), b"\x7fELF mount");
        fs::set_permissions(
            root.join("usr/bin/mount"),
            fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        fs::write(root.join("usr/bin/containerd"), vec![0u8; 4096]).unwrap();
        fs::write(root.join("etc/os-release"), b"ID=debian\n").unwrap();
        // A configuration file named like a program is not the program.
        fs::create_dir_all(root.join("etc/logrotate.d")).unwrap();
        fs::write(root.join("etc/logrotate.d/dpkg"), b"/var/log/dpkg.log {}\n").unwrap();
        let report = check(root).unwrap();
        let found: Vec<String> = report.findings.iter().map(|f| f.to_string()).collect();
        assert_eq!(
            found,
            vec![
                "/usr/bin/apt-get: a package manager",
                "/usr/bin/dash: a shell",
                "/usr/bin/dpkg: a package manager",
                "/usr/bin/mawk: an interpreter",
                "/usr/bin/mount: setuid/setgid (mode 4755)",
                "/usr/bin/perl5.40.1: an interpreter",
                "/usr/bin/python3.13: an interpreter",
                "/usr/bin/sh: a shell",
            ]
        );
        assert_eq!(report.files, 10);
        assert_eq!(
            report.largest[0],
            (PathBuf::from("/usr/bin/containerd"), 4096)
        );
    }

    #[test]
    fn a_tree_of_what_the_node_runs_passes() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::create_dir_all(root.join("usr/lib/x86_64-linux-gnu")).unwrap();
        for name in [
            "containerd",
            "containerd-shim-runc-v2",
            "runc",
            "kubelet",
            "mke2fs",
        ] {
            exe(&root.join("usr/bin").join(name), b"\x7fELF");
        }
        // Names that only start like a listed one are not it.
        fs::write(root.join("usr/lib/x86_64-linux-gnu/libshell.so.1"), b"").unwrap();
        exe(&root.join("usr/bin/shim"), b"");
        let report = check(root).unwrap();
        assert!(report.findings.is_empty(), "{:?}", report.findings);
        assert_eq!(report.files, 7);
        assert_eq!(report.largest.len(), 7);
    }
}
