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

/// The trailer of a signed module (the kernel's `MODULE_SIG_STRING`), after a 12-byte
/// `struct module_signature` whose last field is the signature's length (big-endian).
const SIGNATURE_MAGIC: &[u8] = b"~Module signature appended~\n";

/// Cleared when the kernel refuses a module without its signature (`module.sig_enforce`, or
/// lockdown under Secure Boot): from then on every module is loaded with it.
static UNSIGNED_ACCEPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Opens `path` for reading without waiting and keeps it only if it is a regular file: a FIFO
/// (bound over a service's binary by a service that ran first) must not block PID 1 in the
/// open, a device such as /dev/zero must not keep it reading, and no terminal becomes its
/// controlling one.
pub fn open_regular_file(path: &Path) -> io::Result<(fs::File, fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOCTTY).bits())
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok((file, meta))
}

/// The module without its appended signature, if it has a well-formed one.
pub fn without_signature(module: &[u8]) -> Option<&[u8]> {
    let body = module.strip_suffix(SIGNATURE_MAGIC)?;
    let header = body.len().checked_sub(12)?;
    let length = u32::from_be_bytes(body[header + 8..].try_into().ok()?) as usize;
    let start = header.checked_sub(length)?;
    Some(&module[..start])
}

/// Loads an open module file (`path` names it: its extension tells whether the kernel must
/// decompress it). A module already loaded counts as loaded.
///
/// An uncompressed module is handed over without its signature while the kernel accepts that:
/// checking the signature is an RSA verification per module, most of the time modules took
/// (docs/benchmarks.md), and it adds nothing here, because every module this init loads comes
/// from the measured initramfs or the dm-verity root, whose contents the measurements already
/// cover. A kernel that requires signatures gets them.
pub fn load_module_file(file: &fs::File, path: &Path) -> Result<(), ModuleLoadError> {
    use std::io::Read as _;
    use std::sync::atomic::Ordering;
    let compressed = path
        .extension()
        .is_some_and(|e| e == "xz" || e == "zst" || e == "gz");
    let done = |result: nix::Result<()>| match result {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(ModuleLoadError::Kernel(e)),
    };
    if compressed {
        let flags = ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE as _);
        return done(finit_module(file.as_fd(), c"", flags));
    }
    let mut module = Vec::new();
    (&*file)
        .read_to_end(&mut module)
        .map_err(ModuleLoadError::Open)?;
    if UNSIGNED_ACCEPTED.load(Ordering::Relaxed) {
        if let Some(body) = without_signature(&module) {
            match nix::kmod::init_module(body, c"") {
                // Refused as unsigned (sig_enforce, lockdown), or refused as a load from memory
                // (IMA appraisal, LoadPin): from now on the file itself, signed.
                Err(Errno::EKEYREJECTED | Errno::ENOKEY | Errno::EPERM | Errno::EACCES) => {
                    UNSIGNED_ACCEPTED.store(false, Ordering::Relaxed);
                    log::info!(
                        "modules: the kernel requires their signatures (module.sig_enforce or lockdown); loading them signed"
                    );
                }
                result => return done(result),
            }
        }
    }
    done(finit_module(file.as_fd(), c"", ModuleInitFlags::empty()))
}

/// For tests of what must not block: `f`'s result, or a panic naming `what` when it has not
/// returned after 5 s.
#[cfg(test)]
pub fn returns_promptly<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("{what}: still waiting after 5 s"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(body: &[u8], signature: &[u8]) -> Vec<u8> {
        let mut module = body.to_vec();
        module.extend_from_slice(signature);
        // algo, hash, id_type (PKCS#7), signer_len, key_id_len, pad[3], sig_len.
        module.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        module.extend_from_slice(&(signature.len() as u32).to_be_bytes());
        module.extend_from_slice(SIGNATURE_MAGIC);
        module
    }

    #[test]
    fn the_signature_is_cut_only_from_a_well_formed_trailer() {
        let body = b"\x7fELF the module";
        assert_eq!(
            without_signature(&signed(body, &[0x30; 40])),
            Some(&body[..])
        );
        assert_eq!(without_signature(&signed(b"", &[0x30; 4])), Some(&b""[..]));
        // Unsigned, a length beyond the file, a trailer too short for its header.
        assert_eq!(without_signature(body), None);
        let mut long = signed(body, &[0x30; 40]);
        let at = long.len() - SIGNATURE_MAGIC.len() - 4;
        long[at..at + 4].copy_from_slice(&1000u32.to_be_bytes());
        assert_eq!(without_signature(&long), None);
        let mut short = vec![0u8; 5];
        short.extend_from_slice(SIGNATURE_MAGIC);
        assert_eq!(without_signature(&short), None);
        assert_eq!(without_signature(SIGNATURE_MAGIC), None);
    }
}
