//! The system calls that change machine state, behind a small trait so that the phase logic
//! (mount tables, module order, the unmount fixpoint) is unit-tested without root.

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// `MODULE_INIT_COMPRESSED_FILE`: the kernel decompresses the module itself
/// (CONFIG_MODULE_DECOMPRESS). Neither libc nor nix defines it.
const MODULE_INIT_COMPRESSED_FILE: i32 = 4;

/// What the init asks of the kernel. `Linux` is the real thing; tests use a recording fake.
pub trait System {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno>;
    fn umount(&self, target: &Path, flags: MntFlags) -> Result<(), Errno>;
    fn mkdir_all(&self, path: &Path) -> io::Result<()>;
    fn read_to_string(&self, path: &Path) -> io::Result<String>;
    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    fn load_module(&self, path: &Path) -> Result<(), ModuleLoadError>;
}

/// Why `finit_module` failed: opening the file, or the kernel refusing it.
#[derive(Debug, thiserror::Error)]
pub enum ModuleLoadError {
    #[error("cannot open the module file")]
    Open(#[source] io::Error),
    #[error("the kernel refused the module")]
    Kernel(#[source] Errno),
}

/// The running kernel.
pub struct Linux;

impl System for Linux {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno> {
        mount(Some(source), target, Some(fstype), flags, data)
    }

    fn umount(&self, target: &Path, flags: MntFlags) -> Result<(), Errno> {
        umount2(target, flags)
    }

    fn mkdir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn read_to_string(&self, path: &Path) -> io::Result<String> {
        fs::read_to_string(path)
    }

    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        fs::write(path, data)
    }

    fn load_module(&self, path: &Path) -> Result<(), ModuleLoadError> {
        let file = fs::File::open(path).map_err(ModuleLoadError::Open)?;
        load_module_file(&file, path)
    }
}

/// Loads an open module file (`path` names it: its extension tells whether the kernel must
/// decompress it). A module already loaded counts as loaded.
pub fn load_module_file(file: &fs::File, path: &Path) -> Result<(), ModuleLoadError> {
    let compressed = path
        .extension()
        .is_some_and(|e| e == "xz" || e == "zst" || e == "gz");
    let flags = if compressed {
        ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE as _)
    } else {
        ModuleInitFlags::empty()
    };
    match finit_module(file.as_fd(), c"", flags) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(ModuleLoadError::Kernel(e)),
    }
}

#[cfg(test)]
pub mod fake {
    //! A recording fake of [`System`] for unit tests.
    use super::*;
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::PathBuf;

    #[derive(Default)]
    pub struct FakeSystem {
        pub calls: RefCell<Vec<String>>,
        pub files: RefCell<BTreeMap<PathBuf, String>>,
        /// Mount targets whose mount (or unmount) fails with the given errno.
        pub fail_mount: BTreeMap<PathBuf, Errno>,
        pub fail_umount: RefCell<BTreeMap<PathBuf, Errno>>,
        pub refuse_modules: BTreeSet<String>,
    }

    impl System for FakeSystem {
        fn mount(
            &self,
            source: &str,
            target: &Path,
            fstype: &str,
            flags: MsFlags,
            data: Option<&str>,
        ) -> Result<(), Errno> {
            self.calls.borrow_mut().push(format!(
                "mount {source} {} {fstype} {:#x} {}",
                target.display(),
                flags.bits(),
                data.unwrap_or("-")
            ));
            match self.fail_mount.get(target) {
                Some(e) => Err(*e),
                None => Ok(()),
            }
        }
        fn umount(&self, target: &Path, flags: MntFlags) -> Result<(), Errno> {
            self.calls.borrow_mut().push(format!(
                "umount {} {:#x}",
                target.display(),
                flags.bits()
            ));
            match self.fail_umount.borrow().get(target) {
                Some(e) => Err(*e),
                None => Ok(()),
            }
        }
        fn mkdir_all(&self, path: &Path) -> io::Result<()> {
            self.calls
                .borrow_mut()
                .push(format!("mkdir {}", path.display()));
            Ok(())
        }
        fn read_to_string(&self, path: &Path) -> io::Result<String> {
            self.files
                .borrow()
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
        fn write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
            self.calls.borrow_mut().push(format!(
                "write {} {}",
                path.display(),
                String::from_utf8_lossy(data)
            ));
            Ok(())
        }
        fn load_module(&self, path: &Path) -> Result<(), ModuleLoadError> {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            self.calls.borrow_mut().push(format!("load {name}"));
            if self.refuse_modules.contains(&name) {
                return Err(ModuleLoadError::Kernel(Errno::ENOEXEC));
            }
            Ok(())
        }
    }
}
