//! The node's workloads in QEMU: containerd from the verified root with its state on the
//! encrypted disk, the kubelet stand-in after containerd's socket accepts, a container run
//! from a local OCI image, a containerd crash, broken services, and the stop order.

use std::path::Path;

use qemu_tests::runtime::NODE_CONFIG;
use qemu_tests::support::{must, power_down, prepare, prepare_with_runtime, BOOT};
use serde_json::json;

/// The node, and a scenario service that drives containerd from inside the guest.
fn config() -> String {
    format!(
        "{NODE_CONFIG}{}",
        r#"
[[service]]
name = "scenario"
path = "/bin/payload"
args = ["container-probe"]
after = ["containerd"]
restart = "never"
"#
    )
}

/// What the container writes into its own root (computed by its shell, so the command line
/// itself does not hold the plaintext).
const CONTAINER_MARKER: &str = "container-42-marker-5e1f9a";

fn blank_disk(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
}

fn position(log: &str, marker: &str) -> usize {
    log.find(marker)
        .unwrap_or_else(|| panic!("{marker:?} is not on the console"))
}

/// a. containerd answers, the stand-in reaches it, `ready` follows; b. a container from a local
/// OCI image runs with its snapshot on the encrypted disk; c. containerd SIGKILLed is restarted
/// and the stand-in reconnects; e. power off stops kubelet before containerd and unmounts the
/// state disk cleanly, which the next boot reports.
#[test]
fn containerd_and_kubelet_run_from_the_verified_root() {
    let prepared = prepare_with_runtime(&config());
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("state.img");
    blank_disk(&disk);
    let tpm = work.path().join("tpm");
    std::fs::create_dir_all(&tpm).unwrap();
    let boot = |name: &str| {
        prepared.boot(name, "", |g| {
            g.state_disk(&disk, "cvm-state")
                .tpm_state(&tpm)
                .memory_mib(1024)
        })
    };
    let mut guest = boot("workloads-first");

    // a.
    must(guest.wait_for("kubelet-standin: reached the container runtime", BOOT));
    must(guest.wait_for("cvm-init: ready", BOOT));
    let log = guest.serial_log();
    assert!(
        position(
            &log,
            "service containerd ready: /run/containerd/containerd.sock accepts"
        ) < position(&log, "service kubelet started"),
        "kubelet started before containerd was ready"
    );
    assert!(
        position(&log, "service containerd ready") < position(&log, "cvm-init: ready"),
        "ready before containerd"
    );
    assert!(
        log.contains("this is a stand-in, not a kubelet; arguments: --container-runtime-endpoint=")
    );

    // b.
    must(guest.wait_for(&format!("payload: container said {CONTAINER_MARKER}"), BOOT));
    // The probe reports the log files after the container's line: wait for the last one.
    must(guest.wait_for("payload: service log /var/log/cvm/kubelet.log bytes=", BOOT));
    let log = guest.serial_log();
    assert!(
        log.contains("payload: service log /var/log/cvm/containerd.log bytes=")
            && !log.contains("containerd.log bytes=0"),
        "no containerd log on the state disk"
    );

    // Its own cgroup, OOM bias and file limit, as configured.
    must(guest.wait_for(
        "payload: containerd cgroup=0::/containerd oom_score_adj=-999 nofile=1048576",
        BOOT,
    ));

    // c.
    must(guest.wait_for("payload: killed containerd pid", BOOT));
    must(guest.wait_for("service containerd exited: signal SIGKILL", BOOT));
    must(guest.wait_for_count("service containerd ready", 2, BOOT));
    must(guest.wait_for_count("kubelet-standin: reached the container runtime", 2, BOOT));

    // e.
    power_down(&mut guest);
    let log = guest.serial_log();
    let kubelet = position(&log, "stopping service kubelet");
    let containerd = position(&log, "stopping service containerd");
    assert!(kubelet < containerd, "containerd stopped before kubelet");
    assert!(
        position(&log, "service kubelet stopped") < containerd,
        "containerd was stopped before kubelet had exited"
    );
    assert!(log.contains("removed device-mapper devices: cvm-state"));
    drop(guest);

    // b. The container's marker is nowhere on the disk in plaintext.
    let bytes = std::fs::read(&disk).unwrap();
    assert!(
        !bytes
            .windows(CONTAINER_MARKER.len())
            .any(|w| w == CONTAINER_MARKER.as_bytes()),
        "the container's data is on the disk in plaintext"
    );

    // e. The next boot finds the file system clean, and the image still there.
    let mut guest = boot("workloads-second");
    must(guest.wait_for("kubelet-standin: reached the container runtime", BOOT));
    let log = guest.serial_log();
    assert!(
        log.contains("unmounted cleanly by the last boot"),
        "the state file system was not clean"
    );
}

/// d. Services whose binary is missing or not executable: a clear error naming each, their
/// policy applies, PID 1 carries on and the other service runs.
#[test]
fn broken_services_are_named_and_do_not_stop_the_node() {
    let config = r#"
[[service]]
name = "ghost"
path = "/usr/bin/missing"
restart = "on-failure"

[[service]]
name = "not-exec"
path = "/usr/share/cvm-test/ballast"
restart = "never"

[[service]]
name = "app"
path = "/bin/payload"
args = ["serve"]
"#;
    let prepared = prepare(Some(config));
    let mut guest = prepared.boot("workloads-broken", "", |g| g);
    must(guest.wait_for("app: payload: state", BOOT));
    must(guest.wait_for_count("cannot measure service ghost (/usr/bin/missing)", 2, BOOT));
    let log = guest.serial_log();
    assert!(
        log.contains("No such file or directory"),
        "ENOENT not named"
    );
    assert!(
        log.contains(
            "cannot start service not-exec (/usr/share/cvm-test/ballast): Permission denied"
        ),
        "the non-executable binary is not named"
    );
    assert!(
        log.contains("service not-exec failed to start after 0ms; not restarted (Never policy)")
    );
    assert!(log.contains("service ghost failed to start after 0ms; restart"));
    // PID 1 is alive and still answers: a clean power-off.
    guest.qmp().execute("system_powerdown", json!({})).unwrap();
    must(guest.wait_for("cvm-init: powering off", BOOT));
}

/// §3c. A service whose path is a copy of a good binary on /run (writable, so it could be
/// swapped after it was measured) is refused by name at exec, by the device of the opened
/// file; the others still run.
#[test]
fn a_service_binary_off_the_verified_root_is_refused() {
    let config = r#"
[[service]]
name = "copier"
path = "/bin/payload"
args = ["copy-self", "/run/payload-copy"]

[[service]]
name = "copied"
path = "/run/payload-copy"
args = ["serve"]

[[service]]
name = "app"
path = "/bin/payload"
args = ["serve"]
"#;
    let prepared = prepare(Some(config));
    let mut guest = prepared.boot("workloads-off-root", "", |g| g);
    must(guest.wait_for("app: payload: state", BOOT));
    must(guest.wait_for("copier: payload: copied to /run/payload-copy", BOOT));
    must(guest.wait_for(
        "cannot start service copied (/run/payload-copy): /run/payload-copy is not on the verified root",
        BOOT,
    ));
    let log = guest.serial_log();
    assert!(!log.contains("copied: payload:"), "the binary on /run ran");
    assert!(log.contains("copier: payload: state"), "the copier stopped");
    guest.qmp().execute("system_powerdown", json!({})).unwrap();
    must(guest.wait_for("cvm-init: powering off", BOOT));
}
