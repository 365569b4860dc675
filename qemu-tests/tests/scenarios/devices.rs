//! Drivers chosen by the machine's devices: the root and the state disk behind NVMe and
//! virtio-scsi controllers (as AWS and GCE attach them), and a disk that appears after boot.

use std::time::Duration;

use qemu_tests::console_lines;
use qemu_tests::guest::DiskBus;
use qemu_tests::support::{assert_fatal_before_workload, must, prepare, BOOT};
use serde_json::json;

const CONFIG: &str = r#"
[state]
serial = "cvm-state"
key = "ephemeral"
binds = ["/var/lib/kubelet"]

[[service]]
name = "app"
path = "/bin/payload"
args = ["state-probe"]
"#;

/// The console's list of drivers loaded for devices at boot.
fn drivers_line(log: &str) -> String {
    console_lines(log)
        .into_iter()
        .find(|l| l.starts_with("cvm-init: device drivers:"))
        .unwrap_or_else(|| panic!("no device drivers line in:\n{log}"))
        .to_string()
}

fn boots_with_disks_on(bus: DiskBus, expected: &[&str], not_expected: &[&str]) {
    let prepared = prepare(Some(CONFIG));
    let work = tempfile::tempdir().unwrap();
    let disk = qemu_tests::support::blank_state_disk(work.path());
    let mut guest = prepared.boot(&format!("disks-{bus:?}"), "", |g| {
        g.disk_bus(bus).state_disk(&disk, "cvm-state")
    });
    must(guest.wait_for("app: payload: marker written", BOOT));
    let log = guest.serial_log();
    assert!(log.contains("cvm-init: ready"), "not ready");
    assert!(
        log.contains("formatted on this boot"),
        "the state disk was not set up"
    );
    let drivers = drivers_line(&log);
    let phase = console_lines(&log)
        .into_iter()
        .find(|l| l.starts_with("cvm-init: phase devices ok"))
        .unwrap_or("no devices phase line")
        .to_string();
    eprintln!("{bus:?}: {drivers} ({phase})");
    for driver in expected {
        assert!(drivers.contains(driver), "{driver} missing: {drivers}");
    }
    for driver in not_expected {
        assert!(
            !drivers.contains(driver),
            "{driver} for no device: {drivers}"
        );
    }
}

/// AWS and GCE's C3 machines: every disk is an NVMe namespace; the state disk is found by its
/// controller's serial.
#[test]
fn root_and_state_disk_on_nvme() {
    boots_with_disks_on(
        DiskBus::Nvme,
        &["nvme for pci/", "nvme_core for pci/"],
        &["virtio_blk", "virtio_scsi", "gve", "ena"],
    );
}

/// GCE's other machines: disks on a virtio-scsi adapter; the state disk is found by its SCSI
/// unit serial number, and the disk driver (sd) comes with the adapter's.
#[test]
fn root_and_state_disk_on_virtio_scsi() {
    boots_with_disks_on(
        DiskBus::Scsi,
        &["virtio_scsi for virtio/", "sd_mod for virtio/"],
        &["virtio_blk", "nvme", "gve", "ena"],
    );
}

/// The measured command line narrows the drivers a device may bring: an NVMe root with
/// `cvm.drivers=virtio_blk,virtio_net` gets no driver, and the boot stops at the root, saying why.
#[test]
fn a_driver_left_out_of_cvm_drivers_is_not_loaded() {
    let prepared = prepare(Some(CONFIG));
    let work = tempfile::tempdir().unwrap();
    let disk = qemu_tests::support::blank_state_disk(work.path());
    let mut guest = prepared.boot("disks-narrowed", "cvm.drivers=virtio_blk,virtio_net", |g| {
        g.disk_bus(DiskBus::Nvme).state_disk(&disk, "cvm-state")
    });
    let log = assert_fatal_before_workload(
        &mut guest,
        "phase verity-root failed: no root partition with PARTUUID",
        "app: payload",
    );
    assert!(
        log.contains("driver nvme for pci/0000:00:01.0 not loaded: not among cvm.drivers"),
        "the refusal is not named"
    );
    assert!(log.contains("cvm-init: device drivers: none loaded"));
}

/// A disk attached to the running node (as a cloud attaches a volume) gets its driver from the
/// uevent the kernel sends, after the initramfs is gone.
#[test]
fn a_disk_attached_after_boot_gets_its_driver() {
    let prepared = prepare(Some(CONFIG.split("[[service]]").next().unwrap()));
    let work = tempfile::tempdir().unwrap();
    let state = qemu_tests::support::blank_state_disk(work.path());
    let volume = work.path().join("volume.img");
    qemu_tests::support::sparse_disk(&volume, 1).unwrap();
    let mut guest = prepared.boot("disks-hotplug", "", |g| {
        g.state_disk(&state, "cvm-state")
            .qemu_arg("-device")
            .qemu_arg("pcie-root-port,id=port1,chassis=1,slot=1")
    });
    must(guest.wait_for("cvm-init: ready", BOOT));
    let at_boot = drivers_line(&guest.serial_log());
    assert!(
        !at_boot.contains("nvme"),
        "nvme before any NVMe device: {at_boot}"
    );
    let qmp = guest.qmp();
    qmp.execute(
        "blockdev-add",
        json!({
            "driver": "raw",
            "node-name": "volume",
            "file": { "driver": "file", "filename": volume.display().to_string() }
        }),
    )
    .unwrap();
    qmp.execute(
        "device_add",
        json!({ "driver": "nvme", "drive": "volume", "serial": "volume-1", "bus": "port1", "id": "volume-nvme" }),
    )
    .unwrap();
    let waited = must(guest.wait_for(
        "cvm-init: device drivers: nvme_auth nvme_core nvme for /devices/",
        Duration::from_secs(60),
    ));
    let log = guest.serial_log();
    let line = console_lines(&log)
        .into_iter()
        .find(|l| l.contains("nvme for /devices/"))
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "hot-added NVMe: {line} ({} ms after device_add)",
        waited.as_millis()
    );
}
