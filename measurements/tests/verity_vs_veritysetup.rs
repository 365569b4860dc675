//! `cvm-measure verity format` gives the same root hash and the same hash-device bytes as
//! `veritysetup format` (cryptsetup-bin, installed by `make deps`).

use std::path::Path;
use std::process::Command;

use cvm_formats::verity::{format, VerityParams};

const SALT: &str = "6b1d2e5c0a4f3b8e9d7c6a5b4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e";
const UUID: &str = "3f2504e0-4f89-41d3-9a0c-0305e82c3301";

/// Deterministic, non-repeating content so that every block hashes differently.
fn write_data(path: &Path, len: usize) {
    let mut state = 0x9e3779b97f4a7c15u64;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(path, bytes).unwrap();
}

fn veritysetup(data: &Path, hash: &Path, data_block: u32, hash_block: u32) -> String {
    let out = Command::new("veritysetup")
        .arg("format")
        .arg(data)
        .arg(hash)
        .arg(format!("--salt={SALT}"))
        .arg(format!("--uuid={UUID}"))
        .arg(format!("--data-block-size={data_block}"))
        .arg(format!("--hash-block-size={hash_block}"))
        .output()
        .expect("veritysetup is installed by make deps (cryptsetup-bin)");
    assert!(
        out.status.success(),
        "veritysetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .expect("veritysetup prints the root hash")
        .trim()
        .to_string()
}

#[test]
fn same_root_hash_and_bytes_as_veritysetup() {
    let dir = tempfile::tempdir().unwrap();
    // (data block size, hash block size, data blocks): one block, exactly one hash block's
    // worth, one more, several levels, and sizes that are no multiple of the fan-out.
    let cases: &[(u32, u32, usize)] = &[
        (4096, 4096, 1),
        (4096, 4096, 127),
        (4096, 4096, 128),
        (4096, 4096, 129),
        (4096, 4096, 1000),
        (4096, 4096, 128 * 128 + 3),
        (512, 512, 1),
        (512, 512, 17),
        (512, 512, 16 * 16 * 16 + 5),
        (4096, 512, 300),
        (512, 4096, 4099),
    ];
    for &(data_block, hash_block, blocks) in cases {
        let data = dir.path().join("data");
        write_data(&data, blocks * data_block as usize);
        // veritysetup does not truncate an existing file: a fresh name per case.
        let theirs = dir.path().join(format!(
            "hash.veritysetup.{data_block}.{hash_block}.{blocks}"
        ));
        let ours = dir
            .path()
            .join(format!("hash.ours.{data_block}.{hash_block}.{blocks}"));
        let expected_root = veritysetup(&data, &theirs, data_block, hash_block);
        let params = VerityParams {
            data_block_size: data_block,
            hash_block_size: hash_block,
            salt: cvm_formats::verity::parse_hex(SALT).unwrap(),
            uuid: cvm_formats::verity::parse_uuid(UUID).unwrap(),
        };
        let tree = format(&data, &ours, &params).unwrap();
        let case = format!("{blocks} blocks of {data_block}, hash blocks of {hash_block}");
        assert_eq!(
            cvm_formats::hex(&tree.root_hash),
            expected_root,
            "root hash, {case}"
        );
        let (a, b) = (
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
        );
        assert_eq!(a.len(), b.len(), "hash device size, {case}");
        assert!(a == b, "hash device bytes differ, {case}");
    }
}

#[test]
fn cli_prints_the_root_hash_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_data(&data, 200 * 4096);
    let hash = dir.path().join("hash");
    let expected = veritysetup(&data, &dir.path().join("hash.vs"), 4096, 4096);
    let bin = env!("CARGO_BIN_EXE_cvm-measure");
    let out = Command::new(bin)
        .args(["verity", "format"])
        .arg(&data)
        .arg(&hash)
        .args(["--salt", SALT, "--uuid", UUID])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
    let out = Command::new(bin)
        .args(["verity", "format"])
        .arg(&data)
        .arg(&hash)
        .args(["--salt", SALT, "--json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["root_hash"], expected);
    assert_eq!(json["data_blocks"], 200);
    assert_eq!(json["hash_blocks"], 4);
    // Bad input: named, non-zero exit, nothing written over.
    let out = Command::new(bin)
        .args(["verity", "format"])
        .arg(&data)
        .arg(&hash)
        .args(["--salt", "xyz"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--salt \"xyz\""));
    let odd = dir.path().join("odd");
    std::fs::write(&odd, [1u8; 1000]).unwrap();
    let out = Command::new(bin)
        .args(["verity", "format"])
        .arg(&odd)
        .arg(&hash)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is 1000 bytes"));
}
