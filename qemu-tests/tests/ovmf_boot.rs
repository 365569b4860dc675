//! The firmware `make ovmf` builds boots the node: the AmdSev build (SEV metadata with the
//! kernel-hashes page) under TCG, without SEV, with a direct boot of the test image's kernel,
//! initrd and command line, to `cvm-init: ready`. Not in `make test` (the firmware takes a
//! while to build): `make ovmf-test`.

use std::path::Path;
use std::time::Instant;

use qemu_tests::support::{must, power_down, prepare, BOOT};

#[test]
fn the_amdsev_build_boots_the_test_image_to_ready() {
    let firmware = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ovmf/OVMF.amdsev.fd");
    assert!(
        firmware.exists(),
        "{}: missing; `make ovmf` builds it (`make ovmf-test` runs both)",
        firmware.display()
    );
    let prepared = prepare(None);
    let start = Instant::now();
    let mut guest = prepared.boot("ovmf-amdsev", "", |g| g.bios(&firmware).memory_mib(1024));
    must(guest.wait_for("cvm-init: ready", BOOT));
    let log = guest.serial_log();
    // The firmware, not QEMU's own loader, started this kernel: its banner is on the console.
    assert!(
        log.contains("EFI stub") || log.contains("efi:"),
        "no sign of a UEFI boot on the console:\n{log}"
    );
    eprintln!(
        "AmdSev OVMF ({} bytes) under TCG: QEMU start to `cvm-init: ready` in {:.1} s",
        std::fs::metadata(&firmware).unwrap().len(),
        start.elapsed().as_secs_f64()
    );
    power_down(&mut guest);
}
