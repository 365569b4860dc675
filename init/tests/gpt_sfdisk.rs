//! The strict GPT reader against tables written by sfdisk (util-linux), an independent
//! implementation, installed by `make deps`.

use std::process::{Command, Stdio};

use cvm_init::disk::gpt::{read_gpt, GptError, Guid, ROOT_VERITY_X86_64, ROOT_X86_64};

const SCRIPT: &str = "label: gpt
label-id: 0DDBA11A-5EED-4B0B-8A11-C0FFEE000001
start=2048, size=4096, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=00112233-4455-6677-8899-AABBCCDDEEFF, name=\"root-x86-64\"
start=6144, size=2048, type=2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5, uuid=FFEEDDCC-BBAA-9988-7766-554433221100, name=\"root-x86-64-verity\"
";

fn disk_with_sfdisk() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(5 << 20)
        .unwrap();
    let mut child = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("sfdisk is installed by make deps (fdisk)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(SCRIPT.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    (dir, path)
}

fn corrupt(path: &std::path::Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], offset).unwrap();
}

#[test]
fn reads_what_sfdisk_writes() {
    let (_dir, path) = disk_with_sfdisk();
    let gpt = read_gpt(&std::fs::File::open(&path).unwrap(), 512).unwrap();
    assert!(gpt.warnings.is_empty(), "{:?}", gpt.warnings);
    assert!(!gpt.from_backup);
    assert_eq!(
        gpt.disk_guid.to_string(),
        "0ddba11a-5eed-4b0b-8a11-c0ffee000001"
    );
    assert_eq!(gpt.partitions.len(), 2);
    let root = &gpt.partitions[0];
    assert_eq!(root.number, 1);
    assert_eq!(root.type_guid, Guid::parse(ROOT_X86_64).unwrap());
    assert_eq!(
        root.unique_guid.to_string(),
        "00112233-4455-6677-8899-aabbccddeeff"
    );
    assert_eq!((root.first_lba, root.last_lba), (2048, 6143));
    assert_eq!(root.name, "root-x86-64");
    let verity = &gpt.partitions[1];
    assert_eq!(verity.type_guid, Guid::parse(ROOT_VERITY_X86_64).unwrap());
    assert_eq!(verity.sectors(), 2048);
}

#[test]
fn damaged_primary_falls_back_to_the_backup_and_says_so() {
    let (_dir, path) = disk_with_sfdisk();
    corrupt(&path, 512 + 60); // inside the disk GUID, covered by the header CRC
    let gpt = read_gpt(&std::fs::File::open(&path).unwrap(), 512).unwrap();
    assert!(gpt.from_backup);
    assert_eq!(gpt.partitions.len(), 2);
    assert!(
        gpt.warnings[0].contains("primary GPT header (LBA 1) is damaged: header CRC"),
        "{:?}",
        gpt.warnings
    );
}

#[test]
fn damaged_entries_fall_back_too() {
    let (_dir, path) = disk_with_sfdisk();
    corrupt(&path, 1024 + 100); // inside the primary entry array
    let gpt = read_gpt(&std::fs::File::open(&path).unwrap(), 512).unwrap();
    assert!(gpt.from_backup);
    assert!(
        gpt.warnings[0].contains("entry array CRC"),
        "{:?}",
        gpt.warnings
    );
}

#[test]
fn damaged_backup_is_reported_and_the_primary_used() {
    let (_dir, path) = disk_with_sfdisk();
    let size = std::fs::metadata(&path).unwrap().len();
    corrupt(&path, size - 512 + 3);
    let gpt = read_gpt(&std::fs::File::open(&path).unwrap(), 512).unwrap();
    assert!(!gpt.from_backup);
    assert!(
        gpt.warnings[0].contains("backup GPT header"),
        "{:?}",
        gpt.warnings
    );
}

#[test]
fn both_damaged_is_an_error_naming_both() {
    let (_dir, path) = disk_with_sfdisk();
    let size = std::fs::metadata(&path).unwrap().len();
    corrupt(&path, 512 + 2);
    corrupt(&path, size - 512 + 2);
    let err = read_gpt(&std::fs::File::open(&path).unwrap(), 512).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, GptError::BothDamaged { .. }));
    assert!(text.contains("primary (LBA 1): bad signature"), "{text}");
    assert!(
        text.contains(&format!("backup (LBA {}): bad signature", size / 512 - 1)),
        "{text}"
    );
}

#[test]
fn a_missing_protective_mbr_is_an_error() {
    let (_dir, path) = disk_with_sfdisk();
    corrupt(&path, 510);
    let err = read_gpt(&std::fs::File::open(&path).unwrap(), 512).unwrap_err();
    assert!(err.to_string().contains("no protective MBR"), "{err}");
}
