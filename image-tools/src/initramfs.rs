//! Initramfs images (the production one and the boot tests'): cvm-init as /init, for tests the
//! payload and a configuration file, and the kernel modules the init will load (with filtered
//! modules.dep/.alias and the full modules.builtin/.softdep, so the init resolves them exactly
//! as on a real image). The modules are stored unpacked, so cvm-init never unpacks xz (which was
//! most of the `modules` phase); the node image's archive is one zstd frame, which the kernel
//! unpacks once (docs/benchmarks.md).

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use cvm_init::modules::{
    ModuleIndex, HARDWARE, OPTIONAL_AFTER_ROOT, OPTIONAL_BEFORE_ROOT, REQUIRED_AFTER_ROOT,
    REQUIRED_BEFORE_ROOT,
};
use cvm_init::sys::Linux;

use crate::cpio::CpioWriter;

/// The cached Debian kernel that `make deps` unpacked.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
    pub release: String,
}

impl Kernel {
    /// Opens a kernel cache directory (`vmlinuz`, `modules/` and `ready` with the release).
    pub fn open(cache: &Path) -> io::Result<Kernel> {
        let release = fs::read_to_string(cache.join("ready"))?.trim().to_string();
        Ok(Kernel {
            vmlinuz: cache.join("vmlinuz"),
            modules_dir: cache.join("modules"),
            release,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot resolve modules")]
    Modules(#[from] cvm_init::modules::ModuleError),
    #[error("cannot write the archive")]
    Write(#[from] io::Error),
    #[error("cannot unpack the module {path}")]
    Unpack {
        path: PathBuf,
        #[source]
        source: lzma_rs::error::Error,
    },
}

/// The path a module has in the archive: `.ko.xz` unpacked to `.ko`.
fn unpacked_path(rel: &str) -> &str {
    rel.strip_suffix(".xz").unwrap_or(rel)
}

/// The module's bytes as the archive holds them (an xz module unpacked).
fn module_bytes(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    let bytes = read(path)?;
    if path.extension().is_some_and(|e| e == "xz") {
        let mut out = Vec::with_capacity(bytes.len() * 4);
        lzma_rs::xz_decompress(&mut io::BufReader::new(&bytes[..]), &mut out).map_err(
            |source| InitramfsError::Unpack {
                path: path.to_path_buf(),
                source,
            },
        )?;
        return Ok(out);
    }
    Ok(bytes)
}

/// What goes into a test initramfs.
#[derive(Debug, Clone, Default)]
pub struct InitramfsSpec {
    pub init: PathBuf,
    pub payload: Option<PathBuf>,
    /// The text of /etc/cvm-init/config.toml, if any.
    pub config: Option<String>,
    /// Modules beyond the ones the init always loads.
    pub extra_modules: Vec<String>,
    /// The archive as one zstd frame (the kernel unpacks it once, at native speed): the node
    /// image's firmware reads, hashes and measures the UKI's initramfs three times, and a third
    /// of the bytes costs each of those a third of the time. The boot tests' initramfs is
    /// loaded by QEMU directly and stays a plain archive.
    pub zstd: bool,
}

/// The zstd level of a compressed initramfs: the highest of the levels that need no `--ultra`
/// (those ask the decompressor for larger windows). Decompression costs about the same at any
/// level.
pub const ZSTD_LEVEL: i32 = 19;

fn read(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    fs::read(path).map_err(|source| InitramfsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Builds the archive and writes it to `out`.
pub fn build(spec: &InitramfsSpec, kernel: &Kernel, out: &Path) -> Result<(), InitramfsError> {
    let mut w = CpioWriter::new(Vec::new());
    for dir in [
        "/bin",
        "/dev",
        "/etc",
        "/etc/cvm-init",
        "/lib",
        "/proc",
        "/run",
        "/sys",
        "/tmp",
    ] {
        w.dir(dir, 0o755)?;
    }
    // The kernel opens /dev/console for PID 1's stdio before anything is mounted.
    w.char_device("/dev/console", 0o600, 5, 1)?;
    w.file("/init", 0o755, &read(&spec.init)?)?;
    if let Some(payload) = &spec.payload {
        w.file("/bin/payload", 0o755, &read(payload)?)?;
    }
    if let Some(config) = &spec.config {
        w.file("/etc/cvm-init/config.toml", 0o644, config.as_bytes())?;
    }
    add_modules(&mut w, spec, kernel)?;
    fs::write(out, encode(w.finish()?, spec.zstd)?)?;
    Ok(())
}

/// The archive as written: plain, or one zstd frame (the same bytes for the same archive).
fn encode(archive: Vec<u8>, zstd: bool) -> io::Result<Vec<u8>> {
    if zstd {
        zstd::encode_all(&archive[..], ZSTD_LEVEL)
    } else {
        Ok(archive)
    }
}

fn add_modules(
    w: &mut CpioWriter<Vec<u8>>,
    spec: &InitramfsSpec,
    kernel: &Kernel,
) -> Result<(), InitramfsError> {
    let index = ModuleIndex::load(&Linux, &kernel.modules_dir, &kernel.release)?;
    let mut wanted: Vec<String> = REQUIRED_BEFORE_ROOT
        .iter()
        .chain(REQUIRED_AFTER_ROOT)
        .chain(OPTIONAL_BEFORE_ROOT)
        .chain(OPTIONAL_AFTER_ROOT)
        .chain(HARDWARE)
        .map(|m| m.to_string())
        .collect();
    wanted.extend(spec.extra_modules.iter().cloned());
    let order = index.resolve(&wanted)?;
    let base = format!("/lib/modules/{}", kernel.release);
    w.dir("/lib/modules", 0o755)?;
    w.dir(&base, 0o755)?;
    let mut dirs = BTreeSet::new();
    let mut dep = String::new();
    for name in &order {
        let rel = index
            .relative_path(name)
            .expect("resolved modules have paths");
        let mut parent = String::new();
        for part in rel.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            parent = format!("{parent}/{part}");
            if dirs.insert(parent.clone()) {
                w.dir(&format!("{base}{parent}"), 0o755)?;
            }
        }
        w.file(
            &format!("{base}/{}", unpacked_path(rel)),
            0o644,
            &module_bytes(&kernel.modules_dir.join(rel))?,
        )?;
        let deps: Vec<&str> = index
            .dependencies(name)
            .iter()
            .filter_map(|d| index.relative_path(d))
            .map(unpacked_path)
            .collect();
        dep.push_str(&format!("{}: {}\n", unpacked_path(rel), deps.join(" ")));
    }
    w.file(&format!("{base}/modules.dep"), 0o644, dep.as_bytes())?;
    for file in ["modules.builtin", "modules.softdep"] {
        w.file(
            &format!("{base}/{file}"),
            0o644,
            &read(&kernel.modules_dir.join(file))?,
        )?;
    }
    let included: BTreeSet<&str> = order.iter().map(String::as_str).collect();
    let alias_text =
        String::from_utf8_lossy(&read(&kernel.modules_dir.join("modules.alias"))?).into_owned();
    let aliases: String = alias_text
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(2)
                .is_some_and(|m| included.contains(cvm_init::modules::normalize(m).as_str()))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    w.file(&format!("{base}/modules.alias"), 0o644, aliases.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compressed_archive_is_one_reproducible_zstd_frame_of_the_plain_one() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/etc", 0o755).unwrap();
        w.file("/init", 0o755, &b"\x7fELF cvm-init".repeat(5000))
            .unwrap();
        let archive = w.finish().unwrap();
        let packed = encode(archive.clone(), true).unwrap();
        assert_eq!(&packed[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd frame magic");
        assert!(packed.len() < archive.len() / 10);
        assert_eq!(encode(archive.clone(), true).unwrap(), packed);
        assert_eq!(zstd::decode_all(&packed[..]).unwrap(), archive);
        // The same bytes as every other build: a different libzstd (zstd-sys links the
        // system's when ZSTD_SYS_USE_PKG_CONFIG is set) would change the UKI and its PCRs.
        use sha2::Digest;
        assert_eq!(
            format!("{:x}", sha2::Sha256::digest(&packed)),
            "20647bb88be4293b72a340690e74453e6a02752f0c932e7f64f5874d90c7f0fb",
            "zstd wrote other bytes for the same archive"
        );
        assert_eq!(encode(archive.clone(), false).unwrap(), archive);
    }

    #[test]
    fn xz_modules_are_stored_unpacked_under_their_ko_name() {
        let dir = tempfile::tempdir().unwrap();
        let module = b"\x7fELF a module's bytes".repeat(100);
        let mut packed = Vec::new();
        lzma_rs::xz_compress(&mut &module[..], &mut packed).unwrap();
        let path = dir.path().join("dm-verity.ko.xz");
        fs::write(&path, &packed).unwrap();
        assert_eq!(module_bytes(&path).unwrap(), module);
        assert_eq!(
            unpacked_path("kernel/drivers/md/dm-verity.ko.xz"),
            "kernel/drivers/md/dm-verity.ko"
        );
        // An unpacked module is taken as it is.
        let plain = dir.path().join("erofs.ko");
        fs::write(&plain, &module).unwrap();
        assert_eq!(module_bytes(&plain).unwrap(), module);
        assert_eq!(
            unpacked_path("kernel/fs/erofs/erofs.ko"),
            "kernel/fs/erofs/erofs.ko"
        );
        // A damaged one is an error naming it, not a module the kernel would refuse at boot.
        let damaged = dir.path().join("ext4.ko.xz");
        fs::write(&damaged, &packed[..packed.len() / 2]).unwrap();
        let e = module_bytes(&damaged).unwrap_err();
        assert!(e.to_string().contains("ext4.ko.xz"), "{e}");
    }
}
