//! Files PID 1 writes under trees that are not the verified root (/run, the state disk, where a
//! workload or whoever wrote the disk can plant links) are reached one component at a time from
//! `/`, each directory opened with O_NOFOLLOW|O_DIRECTORY and the file itself with O_NOFOLLOW:
//! a symbolic link anywhere on the way is refused by name, and nothing is written through it.
//! (openat2's RESOLVE_NO_SYMLINKS would do the lookup in one call, but missing directories are
//! created on the way anyway, which needs the walk; the walk works on every kernel.)

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode, SFlag};

/// A component of the path is a symbolic link (or `..`), which the init does not follow.
#[derive(Debug, thiserror::Error)]
#[error("{component} in {path} is a symbolic link, not followed")]
pub struct LinkRefused {
    pub path: PathBuf,
    pub component: PathBuf,
}

/// A directory opened without following links, and the name of a file in it.
pub struct Parent {
    pub dir: OwnedFd,
    pub name: PathBuf,
    /// The whole path, for errors.
    path: PathBuf,
}

fn refused(path: &Path, upto: &Path) -> io::Error {
    io::Error::other(LinkRefused {
        path: path.to_path_buf(),
        component: upto.to_path_buf(),
    })
}

/// Whether `name` in `dir` is a symbolic link (not following it).
fn is_link(dir: impl AsFd, name: &Path) -> bool {
    fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK)
}

/// Opens the directory `path` (absolute) from `/`, no component a link; missing directories
/// are created with `create` as their mode when it is given.
pub fn open_dir(path: &Path, create: Option<u32>) -> io::Result<OwnedFd> {
    walk(path, path, create)
}

/// [`open_dir`] of `path`, naming `whole` (a file in it) in errors.
fn walk(path: &Path, whole: &Path, create: Option<u32>) -> io::Result<OwnedFd> {
    if !path.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not an absolute path", path.display()),
        ));
    }
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    let mut dir = openat(nix::fcntl::AT_FDCWD, "/", flags, Mode::empty())?;
    let mut walked = PathBuf::from("/");
    for component in path.components() {
        let name = match component {
            Component::RootDir | Component::CurDir => continue,
            Component::Normal(name) => Path::new(name),
            // `..` could lead out of the tree the caller checked.
            Component::ParentDir | Component::Prefix(_) => return Err(refused(whole, path)),
        };
        walked.push(name);
        let next = match openat(&dir, name, flags, Mode::empty()) {
            Err(Errno::ENOENT) if create.is_some() => {
                let mode = Mode::from_bits_truncate(create.unwrap_or(0o755));
                match mkdirat(&dir, name, mode) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                openat(&dir, name, flags, Mode::empty())
            }
            other => other,
        };
        dir = match next {
            Ok(fd) => fd,
            Err(_) if is_link(&dir, name) => return Err(refused(whole, &walked)),
            Err(e) => return Err(e.into()),
        };
    }
    Ok(dir)
}

/// Opens the parent directory of `path` (see [`open_dir`]) and returns it with the file name.
pub fn open_parent(path: &Path, create: Option<u32>) -> io::Result<Parent> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        ));
    };
    Ok(Parent {
        dir: walk(parent, path, create)?,
        name: PathBuf::from(name),
        path: path.to_path_buf(),
    })
}

impl Parent {
    /// Opens `name` (or, with `other`, another file in the same directory) with `flags`
    /// (O_NOFOLLOW and O_CLOEXEC added) and `mode` for a new file.
    pub fn open(&self, other: Option<&Path>, flags: OFlag, mode: u32) -> io::Result<File> {
        let name = other.unwrap_or(&self.name);
        let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match openat(&self.dir, name, flags, Mode::from_bits_truncate(mode)) {
            Ok(fd) => Ok(File::from(fd)),
            Err(_) if is_link(&self.dir, name) => {
                let whole = self.path.with_file_name(name);
                Err(refused(&whole, &whole))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Renames `from` to `to`, both in this directory (a link at `to` is replaced, not
    /// followed).
    pub fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        Ok(renameat(&self.dir, from, &self.dir, to)?)
    }
}

/// Opens `path` for writing: created (mode `mode`) or truncated, parents created 0755.
pub fn create(path: &Path, mode: u32) -> io::Result<File> {
    open_parent(path, Some(0o755))?.open(
        None,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC,
        mode,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("victim"), "untouched").unwrap();
        let tree = dir.path().join("run");
        std::fs::create_dir(&tree).unwrap();
        (dir, target, tree)
    }

    #[test]
    fn writes_a_file_and_creates_missing_directories() {
        let (_d, _target, tree) = setup();
        let path = tree.join("a/b/file");
        use std::io::Write;
        create(&path, 0o600).unwrap().write_all(b"written").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "written");
    }

    #[test]
    fn a_link_at_the_final_component_is_refused_by_name() {
        let (_d, target, tree) = setup();
        symlink(target.join("victim"), tree.join("file")).unwrap();
        let e = create(&tree.join("file"), 0o600).unwrap_err();
        assert!(e.to_string().contains("file is a symbolic link"), "{e}");
        assert_eq!(
            std::fs::read_to_string(target.join("victim")).unwrap(),
            "untouched"
        );
    }

    #[test]
    fn a_link_at_an_intermediate_component_is_refused_by_name() {
        let (_d, target, tree) = setup();
        symlink(&target, tree.join("dir")).unwrap();
        let path = tree.join("dir/victim");
        let e = create(&path, 0o600).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "{} in {}",
                tree.join("dir").display(),
                path.display()
            )),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(target.join("victim")).unwrap(),
            "untouched"
        );
        // Not even a missing directory is created through it.
        assert!(create(&tree.join("dir/new/file"), 0o600).is_err());
        assert!(!target.join("new").exists());
        assert!(open_dir(&tree.join("../run"), None).is_err());
    }
}
