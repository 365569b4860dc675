//! The verified root under attack: each scenario boots a real dm-verity disk in QEMU and checks
//! that tampered bytes are never returned and that every failure stops on the fatal path
//! before a workload runs. Run them with `make test`.

use qemu_tests::image::flip_byte;
use qemu_tests::support::{assert_fatal_before_workload, field, must, prepare, BOOT};

/// The workload reports what it sees of the root. The configuration file is longer than a
/// block, so that its first bytes sit in a data block of their own (erofs keeps the tails of
/// small files inline with the metadata).
fn probe_config() -> String {
    let padding = "# padding, so the file spans more than one 4 KiB block\n".repeat(100);
    format!(
        "[[service]]\nname = \"web\"\npath = \"/bin/payload\"\nargs = [\"root-probe\"]\n{padding}"
    )
}

/// The workload's marker: present only when it ran.
const RAN: &str = "web: payload:";

/// a. A verified root boots to ready; the root is erofs on the dm-verity device, read-only.
#[test]
fn a_verified_root_boots_read_only() {
    let prepared = prepare(Some(&probe_config()));
    let mut guest = prepared.boot("verity-ok", "", |g| g);
    must(guest.wait_for("cvm-init: ready", BOOT));
    must(guest.wait_for("web: payload: root-mount=", BOOT));
    let log = guest.serial_log();
    let write = field(&log, "web: payload: root-write=", "root-write");
    assert!(
        write.contains("Read-only"),
        "a write to the root did not fail as read-only: {write}"
    );
    let mount = log
        .lines()
        .find_map(|l| l.split("web: payload: root-mount=").nth(1))
        .unwrap();
    assert!(
        mount.starts_with("\"erofs /dev/dm-0 ro"),
        "root mount: {mount}"
    );
    assert!(log.contains("cvm-init: dm-verity cvm-root is /dev/dm-0"));
    assert!(log.contains("corruption policy eio"));
}

/// b. One byte flipped in a data block the boot reads (the configuration file): the read
/// fails, the boot stops before any workload runs.
#[test]
fn b_flipped_data_byte_stops_the_boot() {
    let prepared = prepare(Some(&probe_config()));
    let root = &prepared.image.root;
    let at = root
        .find_in_root(b"name = \"web\"")
        .expect("the config file's bytes are in the root file system");
    flip_byte(&root.disk, at).unwrap();
    let mut guest = prepared.boot("verity-data", "", |g| g);
    let log = assert_fatal_before_workload(
        &mut guest,
        "phase config-file failed: cannot read /etc/cvm-init/config.toml: I/O error",
        RAN,
    );
    // The kernel names the corrupted block: dm-verity, not a file-system error, refused it.
    assert!(
        log.contains("device-mapper: verity:") && log.contains("is corrupted"),
        "no dm-verity corruption report"
    );
}

/// b'. One byte flipped in the file system's own first block (its superblock): the mount
/// fails, the boot stops before any workload runs.
#[test]
fn b_flipped_superblock_byte_stops_the_mount() {
    let prepared = prepare(Some(&probe_config()));
    let root = &prepared.image.root;
    // The erofs superblock sits 1024 bytes into the file system.
    flip_byte(&root.disk, root.layout.root_offset + 1024 + 8).unwrap();
    let mut guest = prepared.boot("verity-superblock", "", |g| g);
    let log = assert_fatal_before_workload(
        &mut guest,
        "phase mount-root failed: cannot mount the verified root /dev/dm-0 (erofs, read-only) on /newroot: EIO",
        RAN,
    );
    assert!(
        log.contains("data block 0 is corrupted"),
        "no dm-verity corruption report"
    );
}

/// b''. One byte flipped in the workload's binary: the boot completes, but exec of the file
/// fails with an I/O error; the tampered program never runs.
#[test]
fn b_flipped_binary_byte_is_never_run() {
    let prepared = prepare(Some(&probe_config()));
    let root = &prepared.image.root;
    let payload = std::fs::read(&prepared.artifacts.payload).unwrap();
    let at = root
        .find_in_root(&payload[..256])
        .expect("the payload's first bytes are in the root file system");
    flip_byte(&root.disk, at + 24).unwrap();
    let mut guest = prepared.boot("verity-binary", "", |g| g);
    must(guest.wait_for("cvm-init: ready", BOOT));
    // The digest comes from the root's manifest (the genuine binary's), so nothing reads the
    // binary before its exec: the exec itself reads the flipped block and fails, every time.
    must(guest.wait_for(
        "cvm-init: services: the digests of 1 of 1 binaries from the verified root's manifest",
        BOOT,
    ));
    must(guest.wait_for("cannot start service web (/bin/payload): I/O error", BOOT));
    must(guest.wait_for("restart 2 in", BOOT));
    let log = guest.serial_log();
    assert!(!log.contains(RAN), "the tampered payload ran");
    assert!(
        log.contains("is corrupted"),
        "no dm-verity corruption report"
    );
}

/// c. One byte flipped in the hash partition (in the digest of the configuration file's
/// block, inside a level-0 hash block): the kernel rejects that hash block against the level
/// above, so every data block it covers fails to read. Which read fails first depends on the
/// layout: the file system's superblock when it shares the hash block (the mount fails), the
/// configuration file otherwise. Either way the boot stops before any workload runs.
#[test]
fn c_flipped_hash_byte_stops_the_boot() {
    let prepared = prepare(Some(&probe_config()));
    let root = &prepared.image.root;
    assert!(
        root.tree.level_blocks.len() >= 2,
        "the test image needs a two-level tree"
    );
    let data_at = root.find_in_root(b"name = \"web\"").unwrap();
    let config_block = (data_at - root.layout.root_offset) / 4096;
    flip_byte(&root.disk, root.digest_offset_for(data_at)).unwrap();
    let mut guest = prepared.boot("verity-hash", "", |g| g);
    // The hash block covers 128 data blocks: with the superblock the mount fails; else the
    // first of them the init reads fails (a directory the switch needs, or the config file),
    // always as an I/O error, never as wrong or missing data.
    let log = assert_fatal_before_workload(&mut guest, "cvm-init: fatal: phase ", RAN);
    let fatal = log
        .lines()
        .find(|l| l.starts_with("cvm-init: fatal: "))
        .unwrap()
        .to_string();
    let expected: &[&str] = if config_block < 128 {
        &["phase mount-root failed: cannot mount the verified root /dev/dm-0 (erofs, read-only) on /newroot: EIO"]
    } else {
        &[
            "phase switch-root failed: cannot read /proc in the verified root: I/O error",
            "phase switch-root failed: cannot read /sys in the verified root: I/O error",
            "phase switch-root failed: cannot read /dev in the verified root: I/O error",
            "phase switch-root failed: cannot read /run in the verified root: I/O error",
            "phase switch-root failed: cannot read /tmp in the verified root: I/O error",
            "phase config-file failed: cannot read /etc/cvm-init/config.toml: I/O error",
        ]
    };
    assert!(
        expected.iter().any(|e| fatal.contains(e)),
        "unexpected fatal line: {fatal}"
    );
    // The hash block itself, not a data block, is what dm-verity reports.
    assert!(
        log.contains("metadata block") && log.contains("is corrupted"),
        "no dm-verity report of the corrupted hash block"
    );
}

/// c'. One byte flipped in the top block of the tree: the init's own check of the tree
/// against roothash= stops the boot before anything is mounted.
#[test]
fn c_flipped_top_hash_block_is_a_root_hash_mismatch() {
    let prepared = prepare(Some(&probe_config()));
    let root = &prepared.image.root;
    assert!(
        root.tree.level_blocks.len() >= 2,
        "the test image needs a two-level tree"
    );
    // The top block follows the superblock block.
    flip_byte(&root.disk, root.layout.verity_offset + 4096 + 5).unwrap();
    let mut guest = prepared.boot("verity-top", "", |g| g);
    let log = assert_fatal_before_workload(
        &mut guest,
        &format!("root hash mismatch: roothash= is {}", root.root_hash_hex()),
        RAN,
    );
    assert!(
        !log.contains("phase mount-root start"),
        "mounting was attempted"
    );
}

/// d. A wrong roothash=: stopped before anything is mounted, whether the partitions are found
/// by the UUIDs it implies (they are not there) or named explicitly (the tree disagrees).
#[test]
fn d_wrong_root_hash_stops_before_mounting() {
    let prepared = prepare(Some(&probe_config()));
    let root = &prepared.image.root;
    let mut wrong = root.tree.root_hash;
    wrong[31] ^= 1;
    let wrong_hex: String = wrong.iter().map(|b| format!("{b:02x}")).collect();

    // Booted by hand: the harness would add the right roothash=.
    let artifacts = &prepared.artifacts;
    let boot = |name: &str, extra: &str| {
        qemu_tests::Guest::new(name, &artifacts.kernel.vmlinuz, &prepared.image.initrd)
            .disk(&root.disk)
            .cmdline(&format!("roothash={wrong_hex} {extra}"))
            .start()
    };
    // Only the last byte differs: the root partition (first half) is found, the verity
    // partition (second half) is not.
    let mut guest = boot("wrong-hash-derived", "");
    let wrong_verity_uuid = cvm_formats::verity::format_uuid(wrong[16..].try_into().unwrap());
    let log = assert_fatal_before_workload(
        &mut guest,
        &format!("no verity partition with PARTUUID {wrong_verity_uuid} (derived from roothash=)"),
        RAN,
    );
    assert!(
        log.contains(&format!("PARTUUID {}", root.partuuids().1)),
        "what was found is not listed"
    );
    assert!(
        !log.contains("phase mount-root start"),
        "mounting was attempted"
    );

    let (root_part, verity_part) = root.partuuids();
    let mut guest = boot(
        "wrong-hash-named",
        &format!("cvm.root-partuuid={root_part} cvm.verity-partuuid={verity_part}"),
    );
    let log = assert_fatal_before_workload(
        &mut guest,
        &format!(
            "root hash mismatch: roothash= is {wrong_hex}, the tree on /dev/vda2 gives {}",
            root.root_hash_hex()
        ),
        RAN,
    );
    assert!(
        !log.contains("phase mount-root start"),
        "mounting was attempted"
    );
}

/// e. A missing root partition, a missing verity partition, and a GPT with both headers
/// damaged: each named, each fatal.
#[test]
fn e_missing_partitions_and_broken_gpt_are_named() {
    let sfdisk = |disk: &std::path::Path, args: &[&str]| {
        let out = std::process::Command::new("sfdisk")
            .args(["-q", "--no-reread", "--no-tell-kernel"])
            .args(args.iter().take(1))
            .arg(disk)
            .args(args.iter().skip(1))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sfdisk: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // The root partition's UUID changed: no partition carries the derived one.
    let prepared = prepare(Some(&probe_config()));
    sfdisk(
        &prepared.image.root.disk,
        &["--part-uuid", "1", "11111111-2222-4333-8444-555555555555"],
    );
    let mut guest = prepared.boot("no-root", "", |g| g);
    let log = assert_fatal_before_workload(
        &mut guest,
        &format!(
            "no root partition with PARTUUID {}",
            prepared.image.root.partuuids().0
        ),
        RAN,
    );
    assert!(
        log.contains("PARTUUID 11111111-2222-4333-8444-555555555555"),
        "what was found is not listed"
    );

    // The verity partition deleted.
    let prepared = prepare(Some(&probe_config()));
    sfdisk(&prepared.image.root.disk, &["--delete", "2"]);
    let mut guest = prepared.boot("no-verity", "", |g| g);
    assert_fatal_before_workload(
        &mut guest,
        &format!(
            "no verity partition with PARTUUID {}",
            prepared.image.root.partuuids().1
        ),
        RAN,
    );

    // Both GPT headers damaged (one byte of each signature).
    let prepared = prepare(Some(&probe_config()));
    let disk = &prepared.image.root.disk;
    let size = std::fs::metadata(disk).unwrap().len();
    flip_byte(disk, 512).unwrap();
    flip_byte(disk, size - 512).unwrap();
    let mut guest = prepared.boot("broken-gpt", "", |g| g);
    assert_fatal_before_workload(
        &mut guest,
        "vda: both GPT headers are unusable: primary (LBA 1): bad signature (expected \"EFI PART\"); backup",
        RAN,
    );
}

/// e'. Only the primary GPT header damaged: the backup is used, and the console says so.
#[test]
fn e_damaged_primary_gpt_uses_the_backup() {
    let prepared = prepare(Some(&probe_config()));
    // A byte inside the primary header's CRC-covered fields.
    flip_byte(&prepared.image.root.disk, 512 + 40).unwrap();
    let mut guest = prepared.boot("primary-gpt", "", |g| g);
    must(guest.wait_for("cvm-init: ready", BOOT));
    let log = guest.serial_log();
    assert!(
        log.contains("vda: primary GPT header (LBA 1) is damaged: header CRC"),
        "the damaged primary was not reported"
    );
    assert!(log.contains("using the backup"));
}

/// f. After switch_root the initramfs is emptied and its memory given back.
#[test]
fn f_initramfs_is_freed() {
    let prepared = prepare(Some(&probe_config()));
    let mut guest = prepared.boot("freed", "", |g| g);
    must(guest.wait_for("cvm-init: ready", BOOT));
    let log = guest.serial_log();
    let line = log
        .lines()
        .find(|l| l.contains("cvm-init: initramfs freed: "))
        .expect("no initramfs line");
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    // files, KiB, Shmem before, Shmem after
    let [files, kib, before, after] = numbers[..] else {
        panic!("unexpected line {line:?}")
    };
    let init_kib = std::fs::metadata(&prepared.artifacts.init).unwrap().len() / 1024;
    assert!(files >= 10, "only {files} files freed");
    assert!(
        kib > init_kib,
        "freed {kib} KiB, less than the init alone ({init_kib} KiB)"
    );
    // The init's own pages stay mapped; the modules and everything else go.
    assert!(after < before, "Shmem did not drop: {before} → {after} KiB");
}
