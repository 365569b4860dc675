//! The encrypted state disk in QEMU with swtpm: data survives a reboot, never appears in
//! plaintext on the disk, and a disk the node must not open is refused and left untouched.

use std::path::Path;

use qemu_tests::support::{
    assert_fatal_before_workload, must, power_down, prepare, press_ctrl_alt_del, BOOT,
};
use serde_json::json;

const CONFIG: &str = r#"
[state]
serial = "cvm-state"
key = "tpm"
binds = ["/var/lib/kubelet", "/var/log"]

[[service]]
name = "app"
path = "/bin/payload"
args = ["state-probe"]
"#;

const MARKER: &[u8] = b"plaintext-marker-7f3a9c21e5";

fn blank_disk(dir: &Path) -> std::path::PathBuf {
    qemu_tests::support::blank_state_disk(dir)
}

fn sha256(path: &Path) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

#[test]
fn state_persists_encrypted_and_only_for_the_same_image_and_tpm() {
    let prepared = prepare(Some(CONFIG));
    let work = tempfile::tempdir().unwrap();
    let disk = blank_disk(work.path());
    let tpm = work.path().join("tpm");
    std::fs::create_dir_all(&tpm).unwrap();

    // a. First boot formats and writes the marker; after a reboot the marker is there.
    let mut guest = prepared.boot("state-first", "", |g| {
        g.state_disk(&disk, "cvm-state")
            .tpm_state(&tpm)
            .allow_reboot(true)
    });
    must(guest.wait_for("app: payload: marker written", BOOT));
    let log = guest.serial_log();
    assert!(
        log.contains("formatted on this boot"),
        "no first-boot format"
    );
    press_ctrl_alt_del(&mut guest);
    must(guest.wait_for(
        "app: payload: marker found plaintext-marker-7f3a9c21e5",
        BOOT,
    ));
    let log = guest.serial_log();
    assert_eq!(
        log.matches("formatted on this boot").count(),
        1,
        "the second boot formatted again"
    );
    // Nobody named the node: both boots take the name the disk's key gives, the same one.
    let names: Vec<&str> = log
        .lines()
        .filter_map(|l| {
            l.split("cvm-init: node name ")
                .nth(1)?
                .trim_end()
                .strip_suffix(" (from the state disk's key)")
        })
        .collect();
    assert!(
        names.len() == 2 && names[0] == names[1] && names[0].starts_with("node-"),
        "names {names:?}"
    );
    power_down(&mut guest);
    drop(guest);

    // b. The marker's plaintext is nowhere on the disk.
    let bytes = std::fs::read(&disk).unwrap();
    assert!(
        !bytes.windows(MARKER.len()).any(|w| w == MARKER),
        "plaintext on the disk"
    );
    assert!(bytes.starts_with(b"LUKS\xba\xbe"), "no LUKS2 header");

    // c. Another root image (another root hash): unsealing is refused, the disk is unchanged.
    let before = sha256(&disk);
    let other = prepare(Some(&format!("{CONFIG}# another image\n")));
    let mut guest = other.boot("state-other-image", "", |g| {
        g.state_disk(&disk, "cvm-state").tpm_state(&tpm)
    });
    assert_fatal_before_workload(
        &mut guest,
        "cannot get the state-disk key from the tpm key source",
        "app: payload:",
    );
    drop(guest);
    assert_eq!(sha256(&disk), before, "the disk changed");

    // e. A forged header on our own disk (the segment cipher set to cipher_null, checksums
    // recomputed, as the 2025 attacks do): refused, the disk unchanged.
    let forged = work.path().join("forged.img");
    std::fs::copy(&disk, &forged).unwrap();
    forge_null_cipher(&forged);
    let forged_before = sha256(&forged);
    let mut guest = prepared.boot("state-forged", "", |g| {
        g.state_disk(&forged, "cvm-state").tpm_state(&tpm)
    });
    assert_fatal_before_workload(&mut guest, "a LUKS2 header that fails validation: the header field segments.0.encryption is cipher_null-ecb", "app: payload:");
    drop(guest);
    assert_eq!(sha256(&forged), forged_before, "the forged disk changed");

    // The integrity superblock of a committed disk zeroed: refused rather than re-created
    // (the kernel would format the integrity device over the data), the disk unchanged.
    let no_integrity_sb = work.path().join("no-integrity-sb.img");
    std::fs::copy(&disk, &no_integrity_sb).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&no_integrity_sb)
            .unwrap();
        f.write_all_at(&[0u8; 4096], 16 << 20).unwrap();
    }
    let zeroed_before = sha256(&no_integrity_sb);
    let mut guest = prepared.boot("state-no-integrity-sb", "", |g| {
        g.state_disk(&no_integrity_sb, "cvm-state").tpm_state(&tpm)
    });
    assert_fatal_before_workload(
        &mut guest,
        "no dm-integrity superblock at the data segment",
        "app: payload:",
    );
    drop(guest);
    assert_eq!(
        sha256(&no_integrity_sb),
        zeroed_before,
        "the disk without an integrity superblock changed"
    );

    // d. A reset vTPM (fresh state): the same.
    let fresh = work.path().join("fresh-tpm");
    std::fs::create_dir_all(&fresh).unwrap();
    let mut guest = prepared.boot("state-fresh-tpm", "", |g| {
        g.state_disk(&disk, "cvm-state").tpm_state(&fresh)
    });
    assert_fatal_before_workload(
        &mut guest,
        "cannot get the state-disk key from the tpm key source",
        "app: payload:",
    );
    drop(guest);
    assert_eq!(sha256(&disk), before, "the disk changed");
}

/// Rewrites both header copies with the data segment's cipher set to cipher_null-ecb.
fn forge_null_cipher(path: &Path) {
    forge_segment_encryption(path, "cipher_null-ecb");
}

/// Rewrites both header copies with the data segment's `encryption` set to `json_string` (the
/// inside of a JSON string literal, escapes allowed), checksums recomputed.
fn forge_segment_encryption(path: &Path, json_string: &str) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    for offset in [0u64, 16384] {
        let mut copy = vec![0u8; 16384];
        f.read_exact_at(&mut copy, offset).unwrap();
        let end = copy[4096..].iter().position(|&b| b == 0).unwrap();
        let original = std::str::from_utf8(&copy[4096..4096 + end]).unwrap();
        let json = original.replacen(
            "\"encryption\":\"aes-xts-plain64\",\"sector_size\"",
            &format!("\"encryption\":\"{json_string}\",\"sector_size\""),
            1,
        );
        assert_ne!(json, original, "no segment cipher to forge");
        copy[4096..].fill(0);
        copy[4096..4096 + json.len()].copy_from_slice(json.as_bytes());
        let sum = cvm_init::disk::luks2::checksum(&copy);
        copy[0x1c0..0x1e0].copy_from_slice(&sum);
        f.write_all_at(&copy, offset).unwrap();
    }
}

/// §3a. A header string the host chose, holding a newline, a would-be marker and ANSI escapes,
/// reaches the console only escaped inside the refusal: no forged `cvm-init: ready` line, no
/// escape sequence that could hide the reason, and the node powers off through the fatal path.
#[test]
fn a_header_field_cannot_forge_console_lines() {
    use std::os::unix::fs::FileExt;
    let config = CONFIG.replace("key = \"tpm\"", "key = \"ephemeral\"");
    let prepared = prepare(Some(&config));
    let work = tempfile::tempdir().unwrap();
    let disk = blank_disk(work.path());
    let mut n = 0u8;
    let mut random = |buf: &mut [u8]| {
        for b in buf {
            n = n.wrapping_add(71);
            *b = n;
        }
    };
    let head = cvm_init::disk::luks2::format(cvm_init::disk::luks2::FormatInput {
        policy: cvm_init::disk::luks2::Policy {
            integrity: true,
            kdf: cvm_init::disk::luks2::KdfPolicy::Pbkdf2 { iterations: 1000 },
        },
        uuid: "3f1c2b7a-0d4e-4c55-9a61-2b8e5f0c9d17",
        secret: b"not the node's",
        volume_key: &[7u8; 96],
        label: cvm_init::disk::state::COMMITTED,
        token: None,
        random: &mut random,
    })
    .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(&head, 0)
        .unwrap();
    // Newlines before `ready` and a phase marker (the logger's prefix would complete them), an
    // erase-line and a conceal escape, a C1 CSI (clear screen).
    forge_segment_encryption(
        &disk,
        "x\\nready\\nphase state ok 1ms\\r\\u001b[2K\\u001b[8mhidden\\u009b2J",
    );
    let before = sha256(&disk);
    let mut guest = prepared.boot("state-forged-console", "", |g| {
        g.state_disk(&disk, "cvm-state")
    });
    let log = assert_fatal_before_workload(
        &mut guest,
        r"the header field segments.0.encryption is x\nready\nphase state ok 1ms\r\x1b[2K\x1b[8mhidden\x9b2J",
        "app: payload:",
    );
    drop(guest);
    for line in qemu_tests::console_lines(&log) {
        assert!(
            !line.starts_with("cvm-init: ready")
                && !line.starts_with("cvm-init: phase state ok")
                && !line.starts_with("phase state"),
            "a forged line: {line:?}"
        );
        if line.starts_with("cvm-init:") {
            assert!(
                !line.chars().any(|c| c.is_control()),
                "a control character on the console: {line:?}"
            );
        }
    }
    assert!(
        !log.contains("\u{1b}[8mhidden"),
        "the forged escape sequence reached the console"
    );
    assert_eq!(sha256(&disk), before, "the disk changed");
}

/// g. Power cut (QMP quit) in the middle of first-boot setup: the next boot completes it and
/// the data written afterwards persists.
#[test]
fn an_interrupted_first_boot_is_completed_next_time() {
    let prepared = prepare(Some(CONFIG));
    let work = tempfile::tempdir().unwrap();
    let disk = blank_disk(work.path());
    let tpm = work.path().join("tpm");
    std::fs::create_dir_all(&tpm).unwrap();
    let mut guest = prepared.boot("state-cut", "", |g| {
        g.state_disk(&disk, "cvm-state").tpm_state(&tpm)
    });
    // The header is written; the file system and the commit are still to come.
    must(guest.wait_for("formatted LUKS2", BOOT));
    let _ = guest.qmp().execute("quit", json!({}));
    let _ = guest.wait_exit(BOOT);
    drop(guest);
    assert!(
        std::fs::read(&disk).unwrap().starts_with(b"LUKS\xba\xbe"),
        "the cut came before the header"
    );

    let mut guest = prepared.boot("state-after-cut", "", |g| {
        g.state_disk(&disk, "cvm-state")
            .tpm_state(&tpm)
            .allow_reboot(true)
    });
    must(guest.wait_for("app: payload: marker written", BOOT));
    // Usually the cut lands before the commit and this boot redoes the format; when it lands
    // after, this boot simply opens the disk. Either way nothing is lost.
    let redone = guest.serial_log().contains("formatted on this boot");
    eprintln!(
        "after the power cut the format was {}",
        if redone {
            "redone"
        } else {
            "already committed"
        }
    );
    press_ctrl_alt_del(&mut guest);
    must(guest.wait_for(
        "app: payload: marker found plaintext-marker-7f3a9c21e5",
        BOOT,
    ));
}

#[test]
fn foreign_disks_are_refused_and_untouched() {
    let prepared = prepare(Some(CONFIG));
    let work = tempfile::tempdir().unwrap();
    // f. Random bytes, and an ext4 file system.
    let random = work.path().join("random.img");
    std::fs::write(
        &random,
        qemu_tests::pseudo_random_bytes(40 << 20, 0x9e3779b97f4a7c15),
    )
    .unwrap();
    let ext4 = work.path().join("ext4.img");
    std::fs::File::create(&ext4)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    let out = std::process::Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-F"])
        .arg(&ext4)
        .output()
        .unwrap();
    assert!(out.status.success());
    for (name, disk, what) in [
        ("state-random", &random, "unknown data"),
        ("state-ext4", &ext4, "an ext2/3/4 file system"),
    ] {
        let before = sha256(disk);
        let mut guest = prepared.boot(name, "", |g| g.state_disk(disk, "cvm-state"));
        assert_fatal_before_workload(
            &mut guest,
            &format!("is refused, and nothing was written to it: it holds {what}"),
            "app: payload:",
        );
        drop(guest);
        assert_eq!(sha256(disk), before, "{name}: the disk changed");
    }
}

/// Two disks carry the configured serial (the host added a blank decoy beside the blank real
/// one): the boot stops on the fatal path naming both, and neither disk was written.
#[test]
fn two_disks_with_the_state_serial_are_refused_and_untouched() {
    use std::os::unix::fs::MetadataExt;
    let prepared = prepare(Some(CONFIG));
    let work = tempfile::tempdir().unwrap();
    let disks: Vec<_> = ["real", "decoy"]
        .iter()
        .map(|name| {
            let dir = work.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            blank_disk(&dir)
        })
        .collect();
    let blocks: Vec<u64> = disks
        .iter()
        .map(|d| std::fs::metadata(d).unwrap().blocks())
        .collect();
    let mut guest = prepared.boot("state-duplicate-serial", "", |g| {
        g.state_disk(&disks[0], "cvm-state")
            .state_disk(&disks[1], "cvm-state")
    });
    let log = assert_fatal_before_workload(
        &mut guest,
        "more than one disk has the serial \"cvm-state\"",
        "app: payload:",
    );
    drop(guest);
    let line = log
        .lines()
        .find(|l| l.contains("more than one disk has the serial"))
        .unwrap();
    assert!(
        line.contains("(vda, vdb)"),
        "both disks are not named: {line}"
    );
    for (disk, before) in disks.iter().zip(blocks) {
        let after = std::fs::metadata(disk).unwrap().blocks();
        assert_eq!(after, before, "{} was written", disk.display());
        let mut head = vec![0u8; 32 << 20];
        std::io::Read::read_exact(&mut std::fs::File::open(disk).unwrap(), &mut head).unwrap();
        assert!(
            head.iter().all(|&b| b == 0),
            "{} is no longer blank",
            disk.display()
        );
    }
}

/// `key = "ephemeral"`: a new key and a new file system every boot, so nothing written
/// survives a reboot — and a foreign disk is still refused.
#[test]
fn an_ephemeral_state_disk_is_recreated_every_boot() {
    let config = CONFIG.replace("key = \"tpm\"", "key = \"ephemeral\"");
    let prepared = prepare(Some(&config));
    let work = tempfile::tempdir().unwrap();
    let disk = blank_disk(work.path());
    let mut guest = prepared.boot("state-ephemeral", "", |g| {
        g.state_disk(&disk, "cvm-state").allow_reboot(true)
    });
    must(guest.wait_for("app: payload: marker written", BOOT));
    press_ctrl_alt_del(&mut guest);
    must(guest.wait_for_count("app: payload: marker written", 2, BOOT));
    let log = guest.serial_log();
    assert_eq!(
        log.matches("formatted on this boot").count(),
        2,
        "not re-created on the second boot"
    );
    assert!(
        !log.contains("marker found"),
        "data survived an ephemeral disk"
    );
    assert!(log.contains("(key source ephemeral)"));
}

/// The host rewrites a block of a file on the state disk. With integrity (the default) the
/// file reads as an I/O error; without, the same rewrite comes back as silently different
/// data — which also shows that the rewrite hit the file.
#[test]
fn a_block_rewritten_by_the_host_is_an_error_with_integrity_and_garbage_without() {
    for (integrity, expected) in [
        ("hmac-sha256", "payload: probe read error"),
        ("none", "payload: probe read differs"),
    ] {
        let config = CONFIG
            .replace(
                "key = \"tpm\"",
                &format!("key = \"tpm\"\nintegrity = \"{integrity}\""),
            )
            .replace("state-probe", "integrity-probe");
        let prepared = prepare(Some(&config));
        let work = tempfile::tempdir().unwrap();
        let disk = blank_disk(work.path());
        let tpm = work.path().join("tpm");
        std::fs::create_dir_all(&tpm).unwrap();
        let boot = |name: &str, marker: &str| {
            let mut guest = prepared.boot(&format!("{name}-{integrity}"), "", |g| {
                g.state_disk(&disk, "cvm-state").tpm_state(&tpm)
            });
            must(guest.wait_for(marker, BOOT));
            power_down(&mut guest);
            guest.serial_log()
        };
        boot("state-probe-arm", "payload: probe armed");
        let before = std::fs::read(&disk).unwrap();
        boot("state-probe-write", "payload: probe written");
        let after = std::fs::read(&disk).unwrap();
        // The probe's 32 MiB are the longest run of changed blocks (the integrity journal
        // is 8 MiB on this disk; metadata changes are a few blocks).
        let (start, len) = longest_changed_run(&before, &after, 16 << 20);
        assert!(len >= 4 << 20, "{integrity}: no run of changed blocks");
        qemu_tests::image::flip_byte(&disk, (start + len / 2) as u64).unwrap();
        let log = boot("state-probe-read", "payload: probe read");
        assert!(
            log.contains(expected),
            "{integrity}: expected {expected:?} after the host rewrote a block"
        );
    }
}

/// The longest run of 4096-byte blocks that differ between two images, from `from` on.
fn longest_changed_run(before: &[u8], after: &[u8], from: usize) -> (usize, usize) {
    let (mut best, mut current) = ((0, 0), None::<usize>);
    for offset in (from..after.len()).step_by(4096) {
        let changed = before[offset..offset + 4096] != after[offset..offset + 4096];
        match (changed, current) {
            (true, None) => current = Some(offset),
            (false, Some(start)) => {
                if offset - start > best.1 {
                    best = (start, offset - start);
                }
                current = None;
            }
            _ => {}
        }
    }
    if let Some(start) = current {
        if after.len() - start > best.1 {
            best = (start, after.len() - start);
        }
    }
    best
}

/// A power cut while the node writes (QMP quit in the middle of 32 MiB of writes) on a disk
/// with integrity and no wipe: the next boot replays both journals (dm-integrity's and ext4's)
/// and mounts, and nothing reads as an I/O error — in particular the ext4 journal's recovery,
/// which reads the block after the last transaction.
#[test]
fn a_power_cut_while_writing_leaves_a_readable_disk() {
    let config = CONFIG.replace("state-probe", "integrity-probe");
    let prepared = prepare(Some(&config));
    let work = tempfile::tempdir().unwrap();
    let disk = blank_disk(work.path());
    let tpm = work.path().join("tpm");
    std::fs::create_dir_all(&tpm).unwrap();
    let start = |name: &str| {
        prepared.boot(name, "", |g| {
            g.state_disk(&disk, "cvm-state").tpm_state(&tpm)
        })
    };
    let mut guest = start("state-write-arm");
    must(guest.wait_for("payload: probe armed", BOOT));
    power_down(&mut guest);
    drop(guest);

    let mut guest = start("state-write-cut");
    // Cut once a few MiB are durable, while the rest are being written (a fixed wait raced
    // the writes once they got faster).
    must(guest.wait_for("payload: probe synced MiB 2", BOOT));
    let _ = guest.qmp().execute("quit", json!({}));
    let _ = guest.wait_exit(BOOT);
    let cut_log = guest.serial_log();
    drop(guest);
    assert!(
        !cut_log.contains("payload: probe written"),
        "the writes finished before the cut"
    );

    // The file holds what was synced before the cut: it reads short, never as an error.
    let mut guest = start("state-write-after-cut");
    must(guest.wait_for("payload: probe read short", BOOT));
    let log = guest.serial_log();
    for error in [
        "Input/output error",
        "INTEGRITY AEAD ERROR",
        "EXT4-fs error",
    ] {
        assert!(!log.contains(error), "{error} after the power cut");
    }
}

/// The emulated SNP provider's files in a test image: the test VCEK and the launch digest.
fn snp_emulator_files(dir: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let chain = qemu_tests::broker::snp_test_chain(dir);
    vec![
        (
            "usr/lib/cvm-test/snp/vcek.key",
            cvm_formats::hex(&chain.vcek_scalar).into_bytes(),
        ),
        ("usr/lib/cvm-test/snp/vcek.der", chain.vcek_der.clone()),
        (
            "usr/lib/cvm-test/snp/measurement",
            cvm_formats::hex(&[0x5au8; 48]).into_bytes(),
        ),
    ]
}

const SNP_EMULATED: &str = "cvm.tee=snp cvm.test-snp-emulator=/usr/lib/cvm-test/snp";

/// `key = "tpm"` while measurements go to SEV-SNP (the emulated provider) with a vTPM
/// (swtpm) beside it: refused by name before any disk is written. With `tpm_in_tee = true`
/// the events also go to the vTPM's PCRs, so the seal binds to the image: another root image
/// with the same vTPM state and disk does not open it, and nothing is written.
#[test]
fn the_tpm_key_on_snp_is_refused_unless_the_vtpm_is_in_the_tee_and_then_bound_to_the_image() {
    let keys = tempfile::tempdir().unwrap();
    let files = snp_emulator_files(keys.path());
    let work = tempfile::tempdir().unwrap();
    let disk = blank_disk(work.path());
    let tpm = work.path().join("tpm");
    std::fs::create_dir_all(&tpm).unwrap();

    let refused = qemu_tests::support::prepare_with_files(CONFIG, &files);
    let before = sha256(&disk);
    let mut guest = refused.boot("state-tpm-on-snp", SNP_EMULATED, |g| {
        g.state_disk(&disk, "cvm-state").tpm_state(&tpm)
    });
    let log = assert_fatal_before_workload(
        &mut guest,
        "state.key = \"tpm\" is refused with cvm.tee=snp and nothing was written to any disk",
        "app: payload:",
    );
    assert!(log.contains("state.tpm_in_tee = true"), "no remedy named");
    drop(guest);
    assert_eq!(sha256(&disk), before, "the refused boot changed the disk");

    let stated = CONFIG.replace("key = \"tpm\"", "key = \"tpm\"\ntpm_in_tee = true");
    let prepared = qemu_tests::support::prepare_with_files(&stated, &files);
    let mut guest = prepared.boot("state-tpm-in-tee", SNP_EMULATED, |g| {
        g.state_disk(&disk, "cvm-state").tpm_state(&tpm)
    });
    must(guest.wait_for("app: payload: marker written", BOOT));
    let log = guest.serial_log();
    assert!(
        log.contains("formatted on this boot"),
        "no first-boot format"
    );
    assert!(
        log.contains("replayed into the tpm registers"),
        "the events did not go to the vTPM"
    );
    power_down(&mut guest);
    drop(guest);

    let before = sha256(&disk);
    let other =
        qemu_tests::support::prepare_with_files(&format!("{stated}# another image\n"), &files);
    let mut guest = other.boot("state-tpm-in-tee-other-image", SNP_EMULATED, |g| {
        g.state_disk(&disk, "cvm-state").tpm_state(&tpm)
    });
    assert_fatal_before_workload(
        &mut guest,
        "cannot get the state-disk key from the tpm key source",
        "app: payload:",
    );
    drop(guest);
    assert_eq!(sha256(&disk), before, "the other image changed the disk");
}
