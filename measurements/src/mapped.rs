//! Input files read where the page cache holds them. Copying a 12 MB kernel into a fresh
//! buffer costs more than a millisecond of page faults and copies before the first byte is
//! hashed; a mapping avoids both. Its pages are mapped as they are first read, not up front
//! with `MAP_POPULATE`: populating holds the address space's lock for the whole file, and
//! another thread's allocations wait on it (0.8 ms for the kernel in `cvm-measure snp`, whose
//! run took 1.2 ms longer that way). For the command-line tools only: a mapped file that
//! shrinks or fails to read while it is used raises SIGBUS rather than an error, so PID 1
//! reads its files with `read`.

use std::os::fd::AsRawFd;
use std::path::Path;

/// A whole file's bytes: mapped, or read when the file cannot be mapped (empty, a pipe).
pub struct FileBytes {
    mapping: Option<(std::ptr::NonNull<u8>, usize)>,
    read: Vec<u8>,
}

impl FileBytes {
    pub fn open(path: &Path) -> std::io::Result<FileBytes> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let Some(len) = usize::try_from(len).ok().filter(|&len| len > 0) else {
            return Self::read(path);
        };
        // SAFETY: a fresh read-only private mapping of a file held open; the kernel picks the
        // address, and the result is checked before use.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        match std::ptr::NonNull::new(map.cast::<u8>()) {
            Some(ptr) if map != libc::MAP_FAILED => Ok(FileBytes {
                mapping: Some((ptr, len)),
                read: Vec::new(),
            }),
            _ => Self::read(path),
        }
    }

    fn read(path: &Path) -> std::io::Result<FileBytes> {
        Ok(FileBytes {
            mapping: None,
            read: std::fs::read(path)?,
        })
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self.mapping {
            // SAFETY: the mapping is `len` readable bytes and lives until drop.
            Some((ptr, len)) => unsafe { std::slice::from_raw_parts(ptr.as_ptr(), len) },
            None => &self.read,
        }
    }
}

impl Drop for FileBytes {
    fn drop(&mut self) {
        if let Some((ptr, len)) = self.mapping {
            // SAFETY: unmaps exactly the mapping `open` made; no slice of it outlives `self`.
            unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_and_read_files_give_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&file, &bytes).unwrap();
        let mapped = FileBytes::open(&file).unwrap();
        assert!(mapped.mapping.is_some());
        assert_eq!(&*mapped, &bytes[..]);
        std::fs::write(&file, b"").unwrap();
        assert!(FileBytes::open(&file).unwrap().is_empty());
        assert_eq!(
            FileBytes::open(&dir.path().join("missing"))
                .err()
                .unwrap()
                .kind(),
            std::io::ErrorKind::NotFound
        );
    }
}
