//! The firmware `make ovmf` builds boots the node: the AmdSev build (SEV metadata with the
//! kernel-hashes page) under TCG, without SEV, with a direct boot of the test image's kernel,
//! initrd and command line, to `cvm-init: ready`. Not in `make test` (the firmware takes a
//! few minutes to build): `make ovmf-test`.
//!
//! Without SEV nobody fills the kernel-hashes page, and the AmdSev firmware then refuses to
//! run the kernel QEMU hands it (its blob verifier finds no table: fail closed). So the test
//! does what QEMU's `kernel-hashes=on` does on SNP hardware: it writes the table
//! `cvm-measure` computes (`snp::launch::kernel_hashes_table`) at the address the firmware's
//! metadata names, with QEMU's `loader` device. The firmware verifying the kernel, initrd and
//! command line against it is the check that our table is the one it expects; a table with
//! one wrong hash must stop the boot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cvm_measure::snp::launch::{kernel_hashes_table, Ovmf};
use qemu_tests::support::{must, power_down, prepare, Prepared, BOOT};
use qemu_tests::Guest;
use sha2::{Digest, Sha256};

fn firmware() -> PathBuf {
    let firmware = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ovmf/OVMF.amdsev.fd");
    assert!(
        firmware.exists(),
        "{}: missing; `make ovmf` builds it (`make ovmf-test` runs both)",
        firmware.display()
    );
    firmware
}

/// A guest booting through the AmdSev firmware with this kernel-hashes table in memory.
fn guest(prepared: &Prepared, name: &str, corrupt: bool) -> (Guest, u64) {
    let firmware = firmware();
    let guest = Guest::new(
        name,
        &prepared.artifacts.kernel.vmlinuz,
        &prepared.image.initrd,
    )
    .disk(&prepared.image.root.disk)
    .cmdline(&prepared.image.roothash_option())
    .bios(&firmware)
    .memory_mib(1024);
    let ovmf = Ovmf::parse(&std::fs::read(&firmware).unwrap()).expect("an AmdSev build");
    let (address, size) = ovmf.hash_table.expect("a kernel-hashes section");
    assert!(size >= 176, "the firmware's table has {size} bytes");
    let sha = |path: &Path| -> [u8; 32] { Sha256::digest(std::fs::read(path).unwrap()).into() };
    let mut initrd = sha(&prepared.image.initrd);
    if corrupt {
        initrd[0] ^= 1;
    }
    let table = kernel_hashes_table(
        &sha(&prepared.artifacts.kernel.vmlinuz),
        Some(&initrd),
        Some(guest.kernel_cmdline()),
    );
    let file = prepared.dir.path().join(format!("{name}-hashes.bin"));
    std::fs::write(&file, table).unwrap();
    let guest = guest.qemu_arg("-device").qemu_arg(&format!(
        "loader,file={},addr={address:#x},force-raw=on",
        file.display()
    ));
    (guest, std::fs::metadata(&firmware).unwrap().len())
}

#[test]
fn the_amdsev_build_boots_the_test_image_to_ready() {
    let prepared = prepare(None);
    let (guest, firmware_size) = guest(&prepared, "ovmf-amdsev", false);
    let start = Instant::now();
    let mut guest = guest.start();
    must(guest.wait_for("cvm-init: ready", BOOT));
    eprintln!(
        "AmdSev OVMF ({firmware_size} bytes) under TCG, the kernel, initrd and command line verified against cvm-measure's table: QEMU start to `cvm-init: ready` in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    power_down(&mut guest);
}

#[test]
fn a_table_with_another_initrd_hash_stops_the_boot() {
    let prepared = prepare(None);
    let (guest, _) = guest(&prepared, "ovmf-amdsev-wrong", true);
    let mut guest = guest.start();
    // The firmware stops in a dead loop before the kernel runs: no kernel line, ever.
    let seen = guest.wait_for("Linux version", Duration::from_secs(45));
    assert!(
        seen.is_err(),
        "the kernel started with a hash that does not match:\n{}",
        guest.serial_log()
    );
    assert!(!guest.serial_log().contains("cvm-init"));
}
