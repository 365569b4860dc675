//! dm-verity hash trees (format 1, sha256) with the veritysetup superblock: the same root hash
//! and the same hash-device bytes as `veritysetup format`.
//!
//! Layout of the hash device: one hash block holding the 512-byte superblock, then the tree
//! with its top level (a single block) first and the level that hashes the data blocks last;
//! every level starts on a hash block and is zero padded. Each digest is
//! `sha256(salt ‖ block)`; the root hash is the digest of the top block.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

pub const DIGEST_SIZE: usize = 32;
pub const SUPERBLOCK_SIZE: usize = 512;
pub const MAX_SALT: usize = 256;
const SIGNATURE: &[u8; 8] = b"verity\0\0";

/// The parameters of a hash tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityParams {
    pub data_block_size: u32,
    pub hash_block_size: u32,
    pub salt: Vec<u8>,
    pub uuid: [u8; 16],
}

/// What `format` produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityTree {
    pub params: VerityParams,
    pub data_blocks: u64,
    pub root_hash: [u8; DIGEST_SIZE],
    /// Blocks of each level, top level first.
    pub level_blocks: Vec<u64>,
}

impl VerityTree {
    /// Hash blocks on the hash device, superblock included.
    pub fn hash_device_blocks(&self) -> u64 {
        1 + self.level_blocks.iter().sum::<u64>()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    #[error("{what} {value} is invalid: expected a power of two from 512 to 65536")]
    BlockSize { what: &'static str, value: u32 },
    #[error("the salt is {len} bytes: at most 256 are allowed")]
    SaltTooLong { len: usize },
    #[error("{path} is {size} bytes: expected a non-zero multiple of the data block size {block}")]
    DataSize { path: String, size: u64, block: u32 },
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

fn check_block_size(what: &'static str, value: u32) -> Result<(), VerityError> {
    if value.is_power_of_two() && (512..=65536).contains(&value) {
        Ok(())
    } else {
        Err(VerityError::BlockSize { what, value })
    }
}

/// Hashes per hash block (digests are padded to a power of two; 32 already is one).
fn hashes_per_block(hash_block_size: u32) -> u64 {
    (hash_block_size as usize / DIGEST_SIZE) as u64
}

/// Blocks per level, top level first, as the kernel and veritysetup lay them out.
pub fn level_blocks(data_blocks: u64, hash_block_size: u32) -> Vec<u64> {
    let per_block = hashes_per_block(hash_block_size);
    let mut levels = Vec::new();
    let mut count = data_blocks;
    // Levels until a single hash covers everything below: a single data block has none.
    while count > 1 {
        count = count.div_ceil(per_block);
        levels.push(count);
    }
    levels.reverse();
    levels
}

fn salted(salt: &[u8]) -> Sha256 {
    let mut h = Sha256::new();
    h.update(salt);
    h
}

/// Digests of consecutive blocks of `data`, written into `out` (32 bytes each).
fn hash_blocks(base: &Sha256, data: &[u8], block: usize, out: &mut [u8]) {
    for (chunk, digest) in data.chunks(block).zip(out.chunks_mut(DIGEST_SIZE)) {
        let mut h = base.clone();
        h.update(chunk);
        digest.copy_from_slice(&h.finalize());
    }
}

/// Computes the level-0 digests of the data file, in parallel over the available cores.
fn data_digests(
    file: &File,
    path: &str,
    data_blocks: u64,
    block: usize,
    salt: &[u8],
) -> Result<Vec<u8>, VerityError> {
    let mut digests = vec![0u8; data_blocks as usize * DIGEST_SIZE];
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let per_thread = (data_blocks as usize).div_ceil(threads);
    let base = salted(salt);
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for (t, out) in digests
            .chunks_mut(per_thread.max(1) * DIGEST_SIZE)
            .enumerate()
        {
            let base = &base;
            handles.push(scope.spawn(move || -> io::Result<()> {
                let first = t * per_thread;
                let blocks = out.len() / DIGEST_SIZE;
                // Read in 4 MiB slices: large enough for throughput, small enough for memory.
                let slice_blocks = (4 << 20) / block;
                let mut buf = vec![0u8; slice_blocks.max(1) * block];
                let mut done = 0;
                while done < blocks {
                    let n = (blocks - done).min(slice_blocks.max(1));
                    let bytes = &mut buf[..n * block];
                    file.read_exact_at(bytes, ((first + done) * block) as u64)?;
                    hash_blocks(
                        base,
                        bytes,
                        block,
                        &mut out[done * DIGEST_SIZE..(done + n) * DIGEST_SIZE],
                    );
                    done += n;
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join()
                .expect("hashing thread")
                .map_err(|source| VerityError::Read {
                    path: path.to_string(),
                    source,
                })?;
        }
        Ok(())
    })?;
    Ok(digests)
}

/// Packs digests into zero-padded hash blocks.
fn pack(digests: &[u8], hash_block_size: usize) -> Vec<u8> {
    let per_block = hash_block_size / DIGEST_SIZE;
    let blocks = (digests.len() / DIGEST_SIZE).div_ceil(per_block);
    let mut out = vec![0u8; blocks * hash_block_size];
    for (i, d) in digests.chunks(DIGEST_SIZE).enumerate() {
        let offset = (i / per_block) * hash_block_size + (i % per_block) * DIGEST_SIZE;
        out[offset..offset + DIGEST_SIZE].copy_from_slice(d);
    }
    out
}

/// The veritysetup superblock.
pub fn superblock(params: &VerityParams, data_blocks: u64) -> [u8; SUPERBLOCK_SIZE] {
    let mut sb = [0u8; SUPERBLOCK_SIZE];
    sb[0..8].copy_from_slice(SIGNATURE);
    sb[8..12].copy_from_slice(&1u32.to_le_bytes());
    sb[12..16].copy_from_slice(&1u32.to_le_bytes());
    sb[16..32].copy_from_slice(&params.uuid);
    sb[32..38].copy_from_slice(b"sha256");
    sb[64..68].copy_from_slice(&params.data_block_size.to_le_bytes());
    sb[68..72].copy_from_slice(&params.hash_block_size.to_le_bytes());
    sb[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    sb[80..82].copy_from_slice(&(params.salt.len() as u16).to_le_bytes());
    sb[88..88 + params.salt.len()].copy_from_slice(&params.salt);
    sb
}

/// Builds the hash tree of `data` and writes the hash device (superblock and tree) to
/// `hash_out`.
pub fn format(
    data: &Path,
    hash_out: &Path,
    params: &VerityParams,
) -> Result<VerityTree, VerityError> {
    check_block_size("data block size", params.data_block_size)?;
    check_block_size("hash block size", params.hash_block_size)?;
    if params.salt.len() > MAX_SALT {
        return Err(VerityError::SaltTooLong {
            len: params.salt.len(),
        });
    }
    let path = data.display().to_string();
    let read_err = |source| VerityError::Read {
        path: path.clone(),
        source,
    };
    let file = File::open(data).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let block = params.data_block_size as u64;
    if size == 0 || size % block != 0 {
        return Err(VerityError::DataSize {
            path,
            size,
            block: params.data_block_size,
        });
    }
    let data_blocks = size / block;
    let hash_block = params.hash_block_size as usize;
    let base = salted(&params.salt);

    // Bottom up: level 0 hashes the data, each next level hashes the blocks of the one below,
    // until one digest is left: the root hash. A single data block needs no level at all.
    let mut digests = data_digests(&file, &path, data_blocks, block as usize, &params.salt)?;
    let mut levels_bottom_up = Vec::new();
    while digests.len() > DIGEST_SIZE {
        let level = pack(&digests, hash_block);
        digests = vec![0u8; level.len() / hash_block * DIGEST_SIZE];
        hash_blocks(&base, &level, hash_block, &mut digests);
        levels_bottom_up.push(level);
    }
    let root_hash: [u8; DIGEST_SIZE] = digests[..].try_into().expect("one digest left");

    let out_path = hash_out.display().to_string();
    let write_err = |source| VerityError::Write {
        path: out_path.clone(),
        source,
    };
    let mut out = io::BufWriter::new(File::create(hash_out).map_err(write_err)?);
    let mut first = vec![0u8; hash_block];
    first[..SUPERBLOCK_SIZE].copy_from_slice(&superblock(params, data_blocks));
    out.write_all(&first).map_err(write_err)?;
    for level in levels_bottom_up.iter().rev() {
        out.write_all(level).map_err(write_err)?;
    }
    out.flush().map_err(write_err)?;
    let level_blocks: Vec<u64> = levels_bottom_up
        .iter()
        .rev()
        .map(|l| (l.len() / hash_block) as u64)
        .collect();
    debug_assert_eq!(
        level_blocks,
        self::level_blocks(data_blocks, params.hash_block_size)
    );
    Ok(VerityTree {
        params: params.clone(),
        data_blocks,
        root_hash,
        level_blocks,
    })
}

/// The fields of a veritysetup superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub data_block_size: u32,
    pub hash_block_size: u32,
    pub data_blocks: u64,
    pub salt: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SuperblockError {
    #[error("{0} bytes: a verity superblock has 512")]
    Short(usize),
    #[error("no verity superblock: the signature is {0:02x?}, expected \"verity\\0\\0\"")]
    Signature([u8; 8]),
    #[error("superblock version {0}: expected 1")]
    Version(u32),
    #[error("hash type {0}: expected 1 (salt first, as Linux dm-verity)")]
    HashType(u32),
    #[error("hash algorithm {0:?}: expected \"sha256\"")]
    Algorithm(String),
    #[error("{what} {value}: expected a power of two from 512 to 4096")]
    BlockSize { what: &'static str, value: u32 },
    #[error("the superblock covers no data blocks")]
    NoData,
    #[error("salt size {0}: expected at most 256")]
    SaltSize(u16),
    #[error("bytes {0}.. of the superblock are not zero: unknown fields are not accepted")]
    Padding(usize),
}

/// Parses and checks a veritysetup superblock. Its content is untrusted: it only chooses the
/// parameters of a tree that the trusted root hash must then match.
pub fn parse_superblock(bytes: &[u8]) -> Result<Superblock, SuperblockError> {
    let sb: &[u8; SUPERBLOCK_SIZE] = bytes
        .get(..SUPERBLOCK_SIZE)
        .and_then(|b| b.try_into().ok())
        .ok_or(SuperblockError::Short(bytes.len()))?;
    let u32_at = |at: usize| u32::from_le_bytes(sb[at..at + 4].try_into().unwrap());
    let signature: [u8; 8] = sb[0..8].try_into().unwrap();
    if &signature != SIGNATURE {
        return Err(SuperblockError::Signature(signature));
    }
    match u32_at(8) {
        1 => {}
        v => return Err(SuperblockError::Version(v)),
    }
    match u32_at(12) {
        1 => {}
        t => return Err(SuperblockError::HashType(t)),
    }
    let algorithm = &sb[32..64];
    if &algorithm[..6] != b"sha256" || algorithm[6..].iter().any(|&b| b != 0) {
        let end = algorithm.iter().position(|&b| b == 0).unwrap_or(32);
        return Err(SuperblockError::Algorithm(
            String::from_utf8_lossy(&algorithm[..end]).into_owned(),
        ));
    }
    let data_block_size = u32_at(64);
    let hash_block_size = u32_at(68);
    for (what, value) in [
        ("data block size", data_block_size),
        ("hash block size", hash_block_size),
    ] {
        if !value.is_power_of_two() || !(512..=4096).contains(&value) {
            return Err(SuperblockError::BlockSize { what, value });
        }
    }
    let data_blocks = u64::from_le_bytes(sb[72..80].try_into().unwrap());
    if data_blocks == 0 {
        return Err(SuperblockError::NoData);
    }
    let salt_size = u16::from_le_bytes([sb[80], sb[81]]);
    if salt_size as usize > MAX_SALT {
        return Err(SuperblockError::SaltSize(salt_size));
    }
    let salt_end = 88 + salt_size as usize;
    for (start, end) in [(82, 88), (salt_end, SUPERBLOCK_SIZE)] {
        if let Some(i) = sb[start..end].iter().position(|&b| b != 0) {
            return Err(SuperblockError::Padding(start + i));
        }
    }
    Ok(Superblock {
        uuid: sb[16..32].try_into().unwrap(),
        data_block_size,
        hash_block_size,
        data_blocks,
        salt: sb[88..salt_end].to_vec(),
    })
}

/// The digest of one block: `sha256(salt ‖ block)`.
pub fn digest(salt: &[u8], block: &[u8]) -> [u8; DIGEST_SIZE] {
    let mut h = salted(salt);
    h.update(block);
    h.finalize().into()
}

/// Random bytes for salts and UUIDs.
pub fn random_bytes(len: usize) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0u8; len];
    File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// A random (version 4, RFC 4122 variant) UUID.
pub fn random_uuid_v4() -> io::Result<[u8; 16]> {
    let mut u: [u8; 16] = random_bytes(16)?.try_into().expect("16 bytes");
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

/// Parses hex (upper or lower case); `None` when it is not whole bytes of hex.
pub fn parse_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Parses a UUID in its 8-4-4-4-12 form into its 16 bytes in text order.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let groups: Vec<&str> = text.split('-').collect();
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    if lens != [8, 4, 4, 4, 12] {
        return None;
    }
    parse_hex(&groups.concat())?.try_into().ok()
}

pub fn format_uuid(bytes: &[u8; 16]) -> String {
    let h = crate::hex(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_match_the_kernel_rule() {
        assert!(level_blocks(1, 4096).is_empty());
        assert_eq!(level_blocks(128, 4096), vec![1]);
        assert_eq!(level_blocks(129, 4096), vec![1, 2]);
        assert_eq!(level_blocks(2048, 4096), vec![1, 16]);
        assert_eq!(level_blocks(128 * 128 + 1, 4096), vec![1, 2, 129]);
        assert_eq!(level_blocks(17, 512), vec![1, 2]);
    }

    #[test]
    fn hex_and_uuid() {
        assert_eq!(parse_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(parse_hex("0"), None);
        assert_eq!(parse_hex("zz"), None);
        assert_eq!(parse_hex("é1"), None);
        let u = parse_uuid("01234567-89ab-4cde-8f01-23456789abcd").unwrap();
        assert_eq!(format_uuid(&u), "01234567-89ab-4cde-8f01-23456789abcd");
        assert_eq!(parse_uuid("0123456789ab4cde8f0123456789abcd"), None);
    }

    #[test]
    fn bad_parameters_are_named() {
        let dir = tempdir();
        let data = dir.join("data");
        std::fs::write(&data, vec![0u8; 4097]).unwrap();
        let params = VerityParams {
            data_block_size: 4096,
            hash_block_size: 4096,
            salt: vec![],
            uuid: [0; 16],
        };
        let e = format(&data, &dir.join("hash"), &params).unwrap_err();
        assert!(e.to_string().contains("4097 bytes"), "{e}");
        let e = format(
            &data,
            &dir.join("hash"),
            &VerityParams {
                hash_block_size: 1000,
                ..params.clone()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("hash block size 1000"), "{e}");
        let e = format(
            &data,
            &dir.join("hash"),
            &VerityParams {
                salt: vec![0; 257],
                ..params
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("257 bytes"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn superblock_round_trip_and_strictness() {
        let params = VerityParams {
            data_block_size: 4096,
            hash_block_size: 4096,
            salt: vec![7; 32],
            uuid: [9; 16],
        };
        let sb = superblock(&params, 1234);
        let parsed = parse_superblock(&sb).unwrap();
        assert_eq!(
            parsed,
            Superblock {
                uuid: [9; 16],
                data_block_size: 4096,
                hash_block_size: 4096,
                data_blocks: 1234,
                salt: vec![7; 32]
            }
        );
        let mut bad = sb;
        bad[0] = b'X';
        assert!(matches!(
            parse_superblock(&bad),
            Err(SuperblockError::Signature(_))
        ));
        let mut bad = sb;
        bad[32..38].copy_from_slice(b"sha1\0\0");
        assert_eq!(
            parse_superblock(&bad),
            Err(SuperblockError::Algorithm("sha1".into()))
        );
        let mut bad = sb;
        bad[64..68].copy_from_slice(&8192u32.to_le_bytes());
        assert!(matches!(
            parse_superblock(&bad),
            Err(SuperblockError::BlockSize { value: 8192, .. })
        ));
        let mut bad = sb;
        bad[80] = 255;
        bad[81] = 1;
        assert_eq!(parse_superblock(&bad), Err(SuperblockError::SaltSize(511)));
        let mut bad = sb;
        bad[500] = 1;
        assert_eq!(parse_superblock(&bad), Err(SuperblockError::Padding(500)));
        assert_eq!(
            parse_superblock(&sb[..100]),
            Err(SuperblockError::Short(100))
        );
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic; with a valid signature they still never panic.
        #[test]
        fn superblock_parser_never_panics(mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), sign in proptest::prelude::any::<bool>()) {
            if sign && bytes.len() >= 8 {
                bytes[..8].copy_from_slice(SIGNATURE);
            }
            let _ = parse_superblock(&bytes);
        }
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "cvm-verity-unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
