//! resolv.conf and hosts for containerd, the kubelet and the workloads, and the host name. The
//! root is read-only, so the files are written under /run/cvm-init and reached from /etc: the
//! image links /etc/resolv.conf and /etc/hosts there (the production and test images do); an
//! image with regular files gets them bind-mounted over, and one without them is told so.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Where the files are written (tmpfs).
pub const DIR: &str = "/run/cvm-init";

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind {from} over {to}")]
    Bind {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("host name {0:?} is not 1 to 64 characters of DNS labels")]
    HostName(String),
    #[error("cannot set the host name")]
    SetHostName(#[source] nix::Error),
}

/// What resolv.conf says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolver {
    pub nameservers: Vec<Ipv4Addr>,
    pub search: Vec<String>,
    /// Where the values came from, for the file's comment.
    pub source: String,
}

pub fn resolv_conf(r: &Resolver) -> String {
    let mut text = String::from("# written by cvm-init");
    if !r.source.is_empty() {
        text.push_str(" from ");
        text.push_str(&r.source);
    }
    text.push('\n');
    for ns in r.nameservers.iter().take(super::dhcp::MAX_DNS) {
        text.push_str(&format!("nameserver {ns}\n"));
    }
    if !r.search.is_empty() {
        text.push_str(&format!("search {}\n", r.search.join(" ")));
    }
    text
}

pub fn hosts(hostname: &str, address: Option<Ipv4Addr>) -> String {
    let mut text = String::from(
        "# written by cvm-init\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    match address {
        Some(a) => text.push_str(&format!("{a}\t{hostname}\n")),
        None => text.push_str(&format!("127.0.1.1\t{hostname}\n")),
    }
    text
}

/// Sets the kernel's host name (what the kubelet takes as the node's name).
pub fn set_hostname(name: &str) -> Result<(), FilesError> {
    if name.len() > 64 || !super::dhcp::valid_dns_name(name) {
        return Err(FilesError::HostName(name.to_string()));
    }
    nix::unistd::sethostname(name).map_err(FilesError::SetHostName)
}

/// Writes under /run, which workloads can write too: no link is followed on the way (see
/// [`crate::nofollow`]).
fn write_file(path: &Path, text: &str, atomically: bool) -> Result<(), FilesError> {
    use nix::fcntl::OFlag;
    let fail = |source| FilesError::Write {
        path: path.to_path_buf(),
        source,
    };
    let parent = crate::nofollow::open_parent(path, Some(0o755)).map_err(fail)?;
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC;
    if atomically {
        let tmp = parent.name.with_extension("new");
        parent
            .open(Some(&tmp), flags, 0o644)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(fail)?;
        parent.rename(&tmp, &parent.name).map_err(fail)
    } else {
        // Bind-mounted files keep their inode: rewritten in place, in one write.
        let mut f = parent.open(None, flags, 0o644).map_err(fail)?;
        f.write_all(text.as_bytes()).map_err(fail)
    }
}

/// How `/etc/<name>` in the root reaches our file.
#[derive(Debug, PartialEq, Eq)]
enum Reach {
    /// A symlink to our file: written where it points.
    Link(PathBuf),
    /// A symlink elsewhere under /run: our file is written there too.
    Elsewhere(PathBuf),
    /// A regular file in the read-only root: our file is bound over it.
    Bind,
    /// Nothing (or something else): the workloads will not see the file.
    Unreachable(String),
}

fn reach(root: &Path, name: &str) -> Reach {
    let etc = root.join("etc").join(name);
    match std::fs::symlink_metadata(&etc) {
        Ok(m) if m.file_type().is_symlink() => {
            let target = std::fs::read_link(&etc).unwrap_or_default();
            let absolute = if target.is_absolute() {
                target.clone()
            } else {
                Path::new("/etc").join(&target)
            };
            let normal: PathBuf = absolute.components().fold(PathBuf::new(), |mut p, c| {
                match c {
                    std::path::Component::ParentDir => {
                        p.pop();
                    }
                    std::path::Component::CurDir => {}
                    other => p.push(other),
                }
                p
            });
            if normal == Path::new(DIR).join(name) {
                Reach::Link(normal)
            } else if normal.starts_with("/run") {
                Reach::Elsewhere(normal)
            } else {
                Reach::Unreachable(format!("it links to {} (not under /run)", target.display()))
            }
        }
        Ok(m) if m.file_type().is_file() => Reach::Bind,
        Ok(_) => Reach::Unreachable("it is not a file or a link".into()),
        Err(_) => Reach::Unreachable("the root has none".into()),
    }
}

/// Writes resolv.conf and hosts under `root`'s /run/cvm-init and makes `root`'s /etc show
/// them.
pub fn write_in(
    root: &Path,
    resolver: &Resolver,
    hostname: &str,
    address: Option<Ipv4Addr>,
) -> Result<(), FilesError> {
    let ours = |name: &str| root.join(DIR.trim_start_matches('/')).join(name);
    for (name, text) in [
        ("resolv.conf", resolv_conf(resolver)),
        ("hosts", hosts(hostname, address)),
    ] {
        match reach(root, name) {
            Reach::Link(_) => write_file(&ours(name), &text, true)?,
            Reach::Elsewhere(target) => {
                write_file(&ours(name), &text, true)?;
                write_file(
                    &root.join(target.strip_prefix("/").unwrap_or(&target)),
                    &text,
                    true,
                )?;
            }
            Reach::Bind => {
                let file = ours(name);
                let fresh = !file.exists();
                write_file(&file, &text, false)?;
                if fresh {
                    let target = root.join("etc").join(name);
                    nix::mount::mount(
                        Some(&file),
                        &target,
                        None::<&str>,
                        nix::mount::MsFlags::MS_BIND,
                        None::<&str>,
                    )
                    .map_err(|source| FilesError::Bind {
                        from: file.clone(),
                        to: target,
                        source,
                    })?;
                }
            }
            Reach::Unreachable(why) => {
                write_file(&ours(name), &text, true)?;
                log::warn!(
                    "network: /etc/{name} cannot show {}: {why} (the image should link it there)",
                    ours(name).display()
                );
            }
        }
    }
    Ok(())
}

/// What the files under / were last written from: a rename rewrites hosts with them.
static WRITTEN: std::sync::Mutex<Option<(Resolver, Option<Ipv4Addr>)>> =
    std::sync::Mutex::new(None);

/// Writes resolv.conf and hosts under / with the kernel's host name: the DHCP thread's
/// rewrites and [`rename`] hold one lock, so hosts always names the node as the kernel does.
pub fn write(resolver: &Resolver, address: Option<Ipv4Addr>) -> Result<(), FilesError> {
    let mut written = WRITTEN.lock().unwrap_or_else(|e| e.into_inner());
    write_in(Path::new("/"), resolver, &hostname(), address)?;
    *written = Some((resolver.clone(), address));
    Ok(())
}

/// Renames the node: the kernel's host name, and hosts if it was written.
pub fn rename(name: &str) -> Result<(), FilesError> {
    let written = WRITTEN.lock().unwrap_or_else(|e| e.into_inner());
    set_hostname(name)?;
    if let Some((resolver, address)) = written.as_ref() {
        write_in(Path::new("/"), resolver, name, *address)?;
    }
    Ok(())
}

/// The kernel's host name.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_contents() {
        let r = Resolver {
            nameservers: vec![Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(1, 1, 1, 1)],
            search: vec!["cluster.test".into()],
            source: "DHCP on eth0".into(),
        };
        assert_eq!(
            resolv_conf(&r),
            "# written by cvm-init from DHCP on eth0\nnameserver 10.0.2.3\nnameserver 1.1.1.1\nsearch cluster.test\n"
        );
        assert!(hosts("node-a", Some(Ipv4Addr::new(10, 0, 2, 15))).ends_with("10.0.2.15\tnode-a\n"));
        assert!(hosts("node-a", None).contains("127.0.1.1\tnode-a"));
    }

    #[test]
    fn files_reach_etc_through_links() {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::os::unix::fs::symlink("../run/cvm-init/resolv.conf", etc.join("resolv.conf")).unwrap();
        std::os::unix::fs::symlink("/run/other/hosts", etc.join("hosts")).unwrap();
        let r = Resolver {
            nameservers: vec![Ipv4Addr::new(10, 0, 2, 3)],
            ..Default::default()
        };
        write_in(root.path(), &r, "node-a", None).unwrap();
        let resolv = std::fs::read_to_string(root.path().join("run/cvm-init/resolv.conf")).unwrap();
        assert!(resolv.contains("nameserver 10.0.2.3"));
        assert!(std::fs::read_to_string(root.path().join("run/other/hosts"))
            .unwrap()
            .contains("node-a"));
        // A second write (a renewal) replaces the contents.
        let r2 = Resolver {
            nameservers: vec![Ipv4Addr::new(10, 0, 2, 4)],
            ..Default::default()
        };
        write_in(root.path(), &r2, "node-a", None).unwrap();
        let resolv = std::fs::read_to_string(etc.join("resolv.conf")).unwrap();
        assert!(resolv.contains("10.0.2.4") && !resolv.contains("10.0.2.3"));
        assert_eq!(
            reach(root.path(), "missing"),
            Reach::Unreachable("the root has none".into())
        );
        std::os::unix::fs::symlink("/usr/share/x", etc.join("odd")).unwrap();
        assert!(
            matches!(reach(root.path(), "odd"), Reach::Unreachable(w) if w.contains("not under /run"))
        );
    }

    /// A root whose /etc links to /run/cvm-init, and a directory outside it to aim links at.
    fn linked_root() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("victim"), "untouched").unwrap();
        for name in ["resolv.conf", "hosts"] {
            std::os::unix::fs::symlink(
                format!("../run/cvm-init/{name}"),
                root.join("etc").join(name),
            )
            .unwrap();
        }
        (dir, root, outside)
    }

    fn write_error(root: &Path) -> String {
        let e = write_in(root, &Resolver::default(), "node-a", None).unwrap_err();
        crate::logger::chain(&e)
    }

    #[test]
    fn a_link_on_the_way_to_run_is_refused_by_name_and_its_target_untouched() {
        // Intermediate: /run/cvm-init itself a link.
        let (_d, root, outside) = linked_root();
        std::fs::create_dir_all(root.join("run")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("run/cvm-init")).unwrap();
        let e = write_error(&root);
        assert!(
            e.contains(&format!(
                "{} in {}",
                root.join("run/cvm-init").display(),
                root.join("run/cvm-init/resolv.conf").display()
            )) && e.contains("is a symbolic link, not followed"),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
        // Final: the file (or the temporary one written before the rename) a link.
        for name in ["resolv.new", "hosts.new"] {
            let (_d, root, outside) = linked_root();
            let ours = root.join("run/cvm-init");
            std::fs::create_dir_all(&ours).unwrap();
            std::os::unix::fs::symlink(outside.join("victim"), ours.join(name)).unwrap();
            let e = write_error(&root);
            assert!(
                e.contains(&format!("{} is a symbolic link", ours.join(name).display())),
                "{e}"
            );
            assert_eq!(
                std::fs::read_to_string(outside.join("victim")).unwrap(),
                "untouched"
            );
        }
        // A bind-mounted file rewritten in place.
        let (_d, root, outside) = linked_root();
        std::fs::remove_file(root.join("etc/hosts")).unwrap();
        std::fs::write(root.join("etc/hosts"), "image's").unwrap();
        let ours = root.join("run/cvm-init");
        std::fs::create_dir_all(&ours).unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), ours.join("hosts")).unwrap();
        let e = write_error(&root);
        assert!(e.contains("hosts is a symbolic link"), "{e}");
        assert_eq!(
            std::fs::read_to_string(outside.join("victim")).unwrap(),
            "untouched"
        );
    }

    #[test]
    fn host_names_are_checked_before_the_kernel_sees_them() {
        assert!(matches!(
            set_hostname("bad_name"),
            Err(FilesError::HostName(_))
        ));
        assert!(matches!(
            set_hostname(&"a".repeat(65)),
            Err(FilesError::HostName(_))
        ));
    }
}
