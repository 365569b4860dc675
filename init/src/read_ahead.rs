//! The services' binaries read into the page cache by a thread while the `network` and `state`
//! phases wait on the host (DHCP, the TPM, the disks). A binary's first exec otherwise pages it
//! in through dm-verity on the service's own clock; read ahead, those pages are verified while
//! PID 1 would be idle. The digest a service is measured with does not come from this read.
//!
//! Only regular files of the verified root are read, opened without blocking: a FIFO or a
//! device at a service's path (a bind from the state disk) is skipped, not waited on. A read
//! error ends that file's read ahead; the exec meets the same error and fails closed.

use std::io::Read as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Bytes per read: large enough for the kernel's read-ahead window, small enough for PID 1's
/// memory.
const CHUNK: usize = 128 * 1024;

/// What one pass read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub files: usize,
    pub bytes: u64,
    /// Paths not read: not a regular file of the root, or unreadable.
    pub skipped: usize,
}

/// Starts the thread that reads `paths` (resolved in the running root) ahead. The thread runs at
/// a low priority so that PID 1's own work, which waits for nothing it does, goes first. Not
/// starting it only costs time.
pub fn start(paths: Vec<PathBuf>) {
    let Ok(root_dev) = std::fs::metadata("/").map(|m| m.dev()) else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("read-ahead".into())
        .spawn(move || {
            lower_priority();
            let started = Instant::now();
            let summary = read_all(root_dev, &paths);
            log::debug!(
                "read ahead {} binaries ({} bytes, {} skipped) in {}ms",
                summary.files,
                summary.bytes,
                summary.skipped,
                started.elapsed().as_millis()
            );
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the thread that reads the services' binaries ahead: {e}");
    }
}

/// Reads each path that is a regular file on `root_dev` to its end, discarding the bytes.
pub fn read_all(root_dev: u64, paths: &[PathBuf]) -> Summary {
    let mut summary = Summary::default();
    let mut buffer = vec![0u8; CHUNK];
    for path in paths {
        match read_one(root_dev, path, &mut buffer) {
            Some(bytes) => {
                summary.files += 1;
                summary.bytes += bytes;
            }
            None => summary.skipped += 1,
        }
    }
    summary
}

fn read_one(root_dev: u64, path: &Path, buffer: &mut [u8]) -> Option<u64> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.dev() != root_dev {
        return None;
    }
    let mut total = 0u64;
    loop {
        match file.read(buffer) {
            Ok(0) => return Some(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// Nice 10 for the calling thread (on Linux a nice value is a thread's own).
fn lower_priority() {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { nix::libc::syscall(nix::libc::SYS_gettid) };
    // SAFETY: setpriority takes plain integers; a failure leaves the priority as it was.
    unsafe {
        nix::libc::setpriority(nix::libc::PRIO_PROCESS, tid as nix::libc::id_t, 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_of_the_root_are_read_and_others_skipped_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("containerd");
        std::fs::write(&big, vec![7u8; CHUNK * 2 + 5]).unwrap();
        let small = dir.path().join("kubelet");
        std::fs::write(&small, b"abc").unwrap();
        // A FIFO with no writer: a blocking open would never return.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let missing = dir.path().join("missing");
        let dev = std::fs::metadata(dir.path()).unwrap().dev();
        let paths = vec![big, fifo, missing, dir.path().to_path_buf(), small.clone()];
        assert_eq!(
            read_all(dev, &paths),
            Summary {
                files: 2,
                bytes: (CHUNK * 2 + 5 + 3) as u64,
                skipped: 3
            }
        );
        // A file of another file system (the state disk, a bind) is not read.
        assert_eq!(
            read_all(dev.wrapping_add(1), &[small]),
            Summary {
                files: 0,
                bytes: 0,
                skipped: 1
            }
        );
    }
}
