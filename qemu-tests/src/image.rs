//! Verified root disks for tests and `make run`: a root tree → erofs (mkfs.erofs) → dm-verity
//! tree (cvm-measure) → a GPT disk (sfdisk) with root-x86-64 and root-x86-64-verity partitions
//! whose UUIDs are the two halves of the root hash, as systemd-repart and mkosi make them.
//! Fixed salt, UUIDs and timestamps: the same tree gives the same disk.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cvm_formats::verity::{self, VerityParams, VerityTree};

pub const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
pub const VERITY_TYPE: &str = "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5";
const MIB: u64 = 1 << 20;
const SALT: [u8; 32] = *b"cvm-init test image verity salt!";
const VERITY_UUID: [u8; 16] = *b"cvm-test-verity!";
const FS_UUID: &str = "6f1d3c2a-1b2c-4d5e-8f90-a1b2c3d4e5f6";
const DISK_GUID: &str = "0ddba11a-5eed-4b0b-8a11-c0ffee000001";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot run {tool} (installed by make deps)")]
    Spawn {
        tool: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{tool} failed: {stderr}")]
    Tool { tool: &'static str, stderr: String },
    #[error("cannot build the verity tree")]
    Verity(#[from] verity::VerityError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where things are on the disk, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub root_offset: u64,
    pub root_size: u64,
    pub verity_offset: u64,
    pub verity_size: u64,
    pub disk_size: u64,
}

#[derive(Debug, Clone)]
pub struct RootDisk {
    pub disk: PathBuf,
    pub erofs: PathBuf,
    pub tree: VerityTree,
    pub layout: Layout,
}

impl RootDisk {
    pub fn root_hash_hex(&self) -> String {
        cvm_formats::hex(&self.tree.root_hash)
    }

    /// The partition UUIDs derived from the root hash (8-4-4-4-12).
    pub fn partuuids(&self) -> (String, String) {
        let h = &self.tree.root_hash;
        (
            verity::format_uuid(h[..16].try_into().unwrap()),
            verity::format_uuid(h[16..].try_into().unwrap()),
        )
    }

    /// Byte offset on the disk of the first occurrence of `needle` in the root file system.
    pub fn find_in_root(&self, needle: &[u8]) -> Option<u64> {
        let fs = fs::read(&self.erofs).ok()?;
        let at = fs.windows(needle.len()).position(|w| w == needle)?;
        Some(self.layout.root_offset + at as u64)
    }

    /// Byte offset on the disk of the level-0 digest that covers the data block holding
    /// `disk_offset` (inside the root partition).
    pub fn digest_offset_for(&self, disk_offset: u64) -> u64 {
        let block =
            (disk_offset - self.layout.root_offset) / self.tree.params.data_block_size as u64;
        let hash_block = self.tree.params.hash_block_size as u64;
        let per_block = hash_block / verity::DIGEST_SIZE as u64;
        // Superblock, then the levels top first; level 0 is the last.
        let above: u64 = self.tree.level_blocks[..self.tree.level_blocks.len() - 1]
            .iter()
            .sum();
        let level0_start = (1 + above) * hash_block;
        self.layout.verity_offset
            + level0_start
            + (block / per_block) * hash_block
            + (block % per_block) * verity::DIGEST_SIZE as u64
    }
}

fn run(tool: &'static str, cmd: &mut Command, stdin: Option<&str>) -> Result<(), ImageError> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|source| ImageError::Spawn { tool, source })?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .map_err(|source| ImageError::Spawn { tool, source })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| ImageError::Spawn { tool, source })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            tool,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn align(n: u64) -> u64 {
    n.div_ceil(MIB).max(1) * MIB
}

fn uuid_text(bytes: &[u8]) -> String {
    verity::format_uuid(bytes.try_into().unwrap())
}

/// Builds the disk for the tree at `tree` into `work`.
pub fn build_root_disk(tree: &Path, work: &Path) -> Result<RootDisk, ImageError> {
    let erofs = work.join("root.erofs");
    let hash = work.join("root.verity");
    let disk = work.join("disk.raw");
    run(
        "mkfs.erofs",
        Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg("-T0")
            .arg(format!("-U{FS_UUID}"))
            .arg("--all-root")
            .arg(&erofs)
            .arg(tree),
        None,
    )?;
    let params = VerityParams {
        data_block_size: 4096,
        hash_block_size: 4096,
        salt: SALT.to_vec(),
        uuid: VERITY_UUID,
    };
    let verity_tree = verity::format(&erofs, &hash, &params)?;
    let root_len = fs::metadata(&erofs)
        .map_err(|source| ImageError::Write {
            path: erofs.clone(),
            source,
        })?
        .len();
    let hash_len = fs::metadata(&hash)
        .map_err(|source| ImageError::Write {
            path: hash.clone(),
            source,
        })?
        .len();
    let layout = Layout {
        root_offset: MIB,
        root_size: align(root_len),
        verity_offset: MIB + align(root_len),
        verity_size: align(hash_len),
        disk_size: MIB + align(root_len) + align(hash_len) + MIB,
    };
    let write_err = |source| ImageError::Write {
        path: disk.clone(),
        source,
    };
    let file = File::create(&disk).map_err(write_err)?;
    file.set_len(layout.disk_size).map_err(write_err)?;
    drop(file);
    let root_hash = &verity_tree.root_hash;
    let script = format!(
        "label: gpt\nlabel-id: {DISK_GUID}\n\
         start={}, size={}, type={ROOT_TYPE}, uuid={}, name=\"root-x86-64\", attrs=\"GUID:60\"\n\
         start={}, size={}, type={VERITY_TYPE}, uuid={}, name=\"root-x86-64-verity\", attrs=\"GUID:60\"\n",
        layout.root_offset / 512,
        layout.root_size / 512,
        uuid_text(&root_hash[..16]),
        layout.verity_offset / 512,
        layout.verity_size / 512,
        uuid_text(&root_hash[16..]),
    );
    run(
        "sfdisk",
        Command::new("sfdisk")
            .args(["-q", "--no-reread", "--no-tell-kernel"])
            .arg(&disk),
        Some(&script),
    )?;
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .map_err(write_err)?;
    for (src, offset) in [(&erofs, layout.root_offset), (&hash, layout.verity_offset)] {
        let bytes = fs::read(src).map_err(|source| ImageError::Write {
            path: src.clone(),
            source,
        })?;
        file.write_all_at(&bytes, offset).map_err(write_err)?;
    }
    Ok(RootDisk {
        disk,
        erofs,
        tree: verity_tree,
        layout,
    })
}

/// Flips every bit of one byte of a file (a host tampering with a disk).
pub fn flip_byte(path: &Path, offset: u64) -> io::Result<()> {
    let file = fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, offset)?;
    b[0] ^= 0xff;
    file.write_all_at(&b, offset)
}
