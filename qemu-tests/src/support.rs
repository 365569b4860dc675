//! Helpers the scenario files share: booting a prepared image, reading fields off the console.

use std::time::Duration;

use crate::{Artifacts, Guest, RunningGuest, TestImage};

/// Generous: a TCG boot takes about 5 s, but CI machines may be loaded.
pub const BOOT: Duration = Duration::from_secs(90);

/// An image in its own temporary directory, ready to be tampered with and booted.
pub struct Prepared {
    pub artifacts: Artifacts,
    pub image: TestImage,
    pub dir: tempfile::TempDir,
}

pub fn prepare(config: Option<&str>) -> Prepared {
    prepare_with(config, false)
}

/// An image whose root also holds containerd, runc, the kubelet stand-in and a busybox image.
pub fn prepare_with_runtime(config: &str) -> Prepared {
    prepare_with(Some(config), true)
}

/// An image whose root also holds `files` (path in the root, contents).
pub fn prepare_with_files(config: &str, files: &[(&str, Vec<u8>)]) -> Prepared {
    let artifacts = Artifacts::get();
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = artifacts.image_with_files(dir.path(), Some(config), files);
    Prepared {
        artifacts,
        image,
        dir,
    }
}

fn prepare_with(config: Option<&str>, runtime: bool) -> Prepared {
    let artifacts = Artifacts::get();
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = if runtime {
        artifacts.image_with_runtime(dir.path(), config.unwrap_or_default())
    } else {
        artifacts.image(dir.path(), config)
    };
    Prepared {
        artifacts,
        image,
        dir,
    }
}

impl Prepared {
    /// Boots the image with `roothash=` and extra options.
    pub fn boot(
        &self,
        name: &str,
        cmdline: &str,
        configure: impl FnOnce(Guest) -> Guest,
    ) -> RunningGuest {
        configure(
            Guest::new(name, &self.artifacts.kernel.vmlinuz, &self.image.initrd)
                .disk(&self.image.root.disk)
                .cmdline(&self.image.roothash_option())
                .cmdline(cmdline),
        )
        .start()
    }
}

/// Prepares and boots in one step; keep the returned directory alive with the guest.
pub fn boot(
    name: &str,
    config: Option<&str>,
    cmdline: &str,
    configure: impl FnOnce(Guest) -> Guest,
) -> (RunningGuest, tempfile::TempDir) {
    let prepared = prepare(config);
    let guest = prepared.boot(name, cmdline, configure);
    (guest, prepared.dir)
}

/// A sparse file of `gib` GiB (a state disk).
pub fn sparse_disk(path: &std::path::Path, gib: u64) -> Result<(), String> {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(gib << 30))
        .map_err(|e| format!("cannot create {}: {e}", path.display()))
}

/// A blank 1 GiB state disk `state.img` in `dir`.
pub fn blank_state_disk(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("state.img");
    sparse_disk(&path, 1).unwrap_or_else(|e| panic!("{e}"));
    path
}

pub fn must(result: Result<Duration, String>) -> Duration {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// The value after `key=` on the first line containing `prefix`.
pub fn field(log: &str, prefix: &str, key: &str) -> String {
    let line = log
        .lines()
        .find(|l| l.contains(prefix))
        .unwrap_or_else(|| panic!("no line with {prefix:?}"));
    let start = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        + key.len()
        + 1;
    line[start..]
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Asserts the guest ended on the fatal path before any workload ran: the fatal line and the
/// power-off are there, the workload's marker is not.
pub fn assert_fatal_before_workload(
    guest: &mut RunningGuest,
    expect: &str,
    workload_marker: &str,
) -> String {
    guest
        .wait_exit(BOOT)
        .unwrap_or_else(|e| panic!("the guest did not power off: {e}"));
    let log = guest.serial_log();
    assert!(log.contains("cvm-init: fatal: "), "no fatal line");
    assert!(log.contains(expect), "{expect:?} missing from the console");
    assert!(
        !log.contains(workload_marker),
        "the workload ran ({workload_marker:?} appeared)"
    );
    assert!(!log.contains("cvm-init: ready"), "the boot reached ready");
    let last = crate::console_lines(&log)
        .into_iter()
        .rfind(|l| l.starts_with("cvm-init:"));
    assert_eq!(
        last,
        Some("cvm-init: powering off"),
        "the guest did not power off through the fatal path"
    );
    log
}

/// Presses ctrl-alt-del on the guest's keyboard (QMP send-key).
pub fn press_ctrl_alt_del(guest: &mut RunningGuest) {
    let keys = serde_json::json!({ "keys": [
        { "type": "qcode", "data": "ctrl" },
        { "type": "qcode", "data": "alt" },
        { "type": "qcode", "data": "delete" }
    ]});
    guest
        .qmp()
        .execute("send-key", keys)
        .unwrap_or_else(|e| panic!("send-key: {e}"));
}

/// Presses the power button (ACPI) and waits for the guest to power off.
pub fn power_down(guest: &mut RunningGuest) {
    guest
        .qmp()
        .execute("system_powerdown", serde_json::json!({}))
        .unwrap_or_else(|e| panic!("system_powerdown: {e}"));
    guest.wait_exit(BOOT).unwrap_or_else(|e| panic!("{e}"));
}

/// A port of the host's loopback that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on the loopback")
}
