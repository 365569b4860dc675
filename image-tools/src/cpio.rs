//! A writer for the `newc` cpio format the kernel unpacks as an initramfs. Entries carry fixed
//! owners and times, so the same inputs give the same archive byte for byte.

use std::io::{self, Write};

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_inode: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_inode: 1,
        }
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | mode, 2, (0, 0), &[])
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | mode, 1, (0, 0), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | mode, 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        // The kernel reads archives in 512-byte blocks; pad like cpio(1) does.
        let pad = (512 - self.written % 512) % 512;
        self.out.write_all(&vec![0u8; pad as usize])?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        let inode = if name == "TRAILER!!!" {
            0
        } else {
            self.next_inode
        };
        self.next_inode += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            inode,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed for reproducibility
            data.len(),
            0,
            0, // device of the archive entry
            rdev.0,
            rdev.1,
            name.len() + 1,
            0, // checksum (unused by newc)
        );
        self.write_padded(&[header.as_bytes(), name.as_bytes(), &[0]].concat())?;
        self.write_padded(data)
    }

    fn write_padded(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        let pad = (4 - self.written % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad as usize])?;
        self.written += pad;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn gnu_cpio_reads_what_we_write() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/etc", 0o755).unwrap();
        w.file("/etc/hello", 0o644, b"hello world\n").unwrap();
        w.symlink("/etc/link", "hello").unwrap();
        w.char_device("/console", 0o600, 5, 1).unwrap();
        let archive = w.finish().unwrap();
        assert_eq!(archive.len() % 512, 0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cpio");
        std::fs::write(&path, &archive).unwrap();
        // cpio is installed by `make deps`; its listing is the independent check.
        let out = Command::new("cpio")
            .args(["-t", "-v", "--quiet", "-F"])
            .arg(&path)
            .output()
            .expect("cpio(1) is installed by make deps");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("drwxr-xr-x"), "{listing}");
        assert!(listing.contains("etc/hello"), "{listing}");
        assert!(listing.contains("etc/link -> hello"), "{listing}");
        assert!(listing.contains("crw-------"), "{listing}");
        assert!(listing.contains("5,"), "{listing}");
        let extract = dir.path().join("x");
        std::fs::create_dir(&extract).unwrap();
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd {} && cpio -i -d --quiet --no-absolute-filenames -F {} etc/hello",
                extract.display(),
                path.display()
            ))
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(
            std::fs::read(extract.join("etc/hello")).unwrap(),
            b"hello world\n"
        );
    }
}
