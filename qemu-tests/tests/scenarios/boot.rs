//! Boot scenarios: each boots cvm-init in QEMU (TCG) and checks its PID 1 duties from the
//! serial console and QMP. Run them with `make test` (which builds the artifacts first).

use std::time::{Duration, Instant};

use qemu_tests::console_lines;
use qemu_tests::support::{boot, field, must, press_ctrl_alt_del, BOOT};
use serde_json::json;

const SERVE: &str = r#"
[[service]]
name = "web"
path = "/bin/payload"
args = ["serve"]
env = { GREETING = "hello" }
"#;

/// a. Boots to ready; the configured workload runs in a clean state.
#[test]
fn a_boots_to_ready_and_runs_the_workload() {
    let (mut guest, _dir) = boot("ready", Some(SERVE), "", |g| g.tpm(true));
    must(guest.wait_for("cvm-init: ready", BOOT));
    must(guest.wait_for("web: payload: serving (stderr)", BOOT));
    let log = guest.serial_log();
    let lines = console_lines(&log);
    for phase in [
        "mounts",
        "config",
        "modules",
        "devices",
        "configfs",
        "verity-root",
        "mount-root",
        "switch-root",
        "config-file",
        "power-button",
        "services",
    ] {
        assert!(
            log.contains(&format!("cvm-init: phase {phase} start")),
            "phase {phase} start missing"
        );
        let ok = lines
            .iter()
            .any(|l| l.starts_with(&format!("cvm-init: phase {phase} ok ")) && l.ends_with("ms"));
        assert!(ok, "phase {phase} ok line missing");
    }
    // What the root needs in the `modules` phase; the rest loaded meanwhile, before `state`.
    let line = |start: &str| {
        let found = lines
            .iter()
            .position(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line {start}"));
        (found, lines[found].to_string())
    };
    let (_, loaded) = line("cvm-init: modules loaded: ");
    for module in ["configfs", "dm_mod", "dm_verity", "erofs"] {
        assert!(
            loaded.split_whitespace().any(|m| m == module),
            "module {module} not loaded: {loaded}"
        );
    }
    let (at, meanwhile) = line("cvm-init: modules loaded meanwhile: ");
    for module in [
        "button",
        "evdev",
        "dm_crypt",
        "dm_integrity",
        "ext4",
        "overlay",
    ] {
        assert!(
            meanwhile.split_whitespace().any(|m| m == module),
            "module {module} not loaded meanwhile: {meanwhile}"
        );
    }
    let (state, _) = line("cvm-init: phase state start");
    assert!(
        state < at,
        "the state phase did not wait for the modules loaded meanwhile"
    );
    // The disk's driver came because the disk asked for it, and nothing else did.
    let drivers = lines
        .iter()
        .find(|l| l.starts_with("cvm-init: device drivers:"))
        .expect("device drivers line");
    assert!(
        drivers.contains("virtio_blk for virtio/virtio"),
        "no virtio_blk: {drivers}"
    );
    for absent in ["nvme", "virtio_scsi", "gve", "ena", "hv_", "mana"] {
        assert!(
            !drivers.contains(absent),
            "{absent} for no device: {drivers}"
        );
    }
    assert!(
        log.contains("cvm-init: listening for the power key on: Power Button"),
        "power button"
    );
    // The child started clean: nothing blocked, SIGPIPE default, only stdio open, own session,
    // environment from the configuration.
    assert_eq!(field(&log, "web: payload: state", "blocked"), "[]");
    assert_eq!(field(&log, "web: payload: state", "sigpipe"), "default");
    assert_eq!(field(&log, "web: payload: state", "fds"), "3");
    assert_eq!(field(&log, "web: payload: state", "session-leader"), "true");
    assert_eq!(field(&log, "web: payload: state", "greeting"), "hello");
    // The harness's swtpm reached the guest.
    assert_eq!(field(&log, "web: payload: state", "tpm"), "true");
    assert!(!log.contains("failed"), "a phase failed");
    // The workload's digest came from the verified root's manifest, not from reading it.
    assert!(
        log.contains(
            "cvm-init: services: the digests of 1 of 1 binaries from the verified root's manifest"
        ),
        "the manifest was not used"
    );
}

/// b. The ACPI power button: TERM to services, unmount, power off within 10 s.
#[test]
fn b_power_button_powers_off_cleanly() {
    let (mut guest, _dir) = boot("powerdown", Some(SERVE), "", |g| g);
    must(guest.wait_for("cvm-init: ready", BOOT));
    must(guest.wait_for("web: payload: serving", BOOT));
    let pressed = Instant::now();
    guest.qmp().execute("system_powerdown", json!({})).unwrap();
    let status = guest
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let took = pressed.elapsed();
    let log = guest.serial_log();
    assert!(status.success(), "qemu exit status {status}");
    let order = [
        "cvm-init: power button pressed",
        "cvm-init: stopping service web",
        "web: payload: got SIGTERM, exiting",
        "cvm-init: service web stopped: exit status 0",
        "cvm-init: unmounted /sys/fs/cgroup",
        "cvm-init: unmounted /run",
        "cvm-init: unmounted /dev/pts",
        "cvm-init: unmounted /proc",
        "cvm-init: powering off",
    ];
    let mut at = 0;
    for marker in order {
        let found = log[at..]
            .find(marker)
            .unwrap_or_else(|| panic!("{marker:?} missing or out of order"));
        at += found + marker.len();
    }
    let event = guest.qmp().wait_event("SHUTDOWN", Duration::from_secs(5));
    if let Ok(event) = event {
        assert_eq!(event["data"]["reason"], "guest-shutdown", "{event}");
    }
    eprintln!(
        "power-off took {}ms after system_powerdown",
        took.as_millis()
    );
}

/// c. ctrl-alt-del reboots the guest (in place: QEMU keeps running and boots again).
#[test]
fn c_ctrl_alt_del_reboots() {
    let (mut guest, _dir) = boot("cad", Some(SERVE), "", |g| g.allow_reboot(true));
    must(guest.wait_for("cvm-init: ready", BOOT));
    must(guest.wait_for("web: payload: serving", BOOT));
    press_ctrl_alt_del(&mut guest);
    must(guest.wait_for("cvm-init: received SIGINT", Duration::from_secs(30)));
    must(guest.wait_for("cvm-init: rebooting", Duration::from_secs(30)));
    must(guest.wait_for_count("cvm-init: ready", 2, BOOT));
    let log = guest.serial_log();
    assert!(
        log.contains("web: payload: got SIGTERM"),
        "service not stopped before reboot"
    );
    let reset = guest
        .qmp()
        .wait_event("RESET", Duration::from_secs(5))
        .unwrap();
    assert_eq!(reset["data"]["reason"], "guest-reset", "{reset}");
}

/// d. 1000 orphans: PID 1 reaps every one.
#[test]
fn d_orphans_are_reaped() {
    let config = r#"
[[service]]
name = "forker"
path = "/bin/payload"
args = ["orphans", "1000"]
"#;
    let (mut guest, _dir) = boot("orphans", Some(config), "", |g| g);
    must(guest.wait_for(
        "forker: payload: orphans=1000 zombies=",
        Duration::from_secs(240),
    ));
    let log = guest.serial_log();
    assert_eq!(field(&log, "payload: orphans=1000", "zombies"), "0");
    guest.qmp().execute("system_powerdown", json!({})).unwrap();
    guest.wait_exit(Duration::from_secs(15)).unwrap();
    let log = guest.serial_log();
    let reaped: u64 = log
        .lines()
        .find_map(|l| l.split("reaped ").nth(1)?.split(' ').next()?.parse().ok())
        .expect("reaped count line");
    assert!(reaped >= 1000, "reaped only {reaped} orphans");
}

/// e. Crashing workloads restart with backoff; a crash loop does not spin PID 1.
#[test]
fn e_crash_loops_back_off() {
    let config = r#"
[[service]]
name = "crasher"
path = "/bin/payload"
args = ["crash"]
restart = "always"

[[service]]
name = "once"
path = "/bin/payload"
args = ["crash-once"]
restart = "on-failure"

[[service]]
name = "probe"
path = "/bin/payload"
args = ["cpu-probe"]
"#;
    let (mut guest, _dir) = boot("crash", Some(config), "", |g| g);
    must(guest.wait_for("cvm-init: ready", BOOT));
    must(guest.wait_for("probe: payload: pid1-cpu-ticks=", Duration::from_secs(120)));
    let log = guest.serial_log();
    // on-failure: restarted once, then it runs.
    assert!(log.contains("once: payload: first start, crashing"));
    assert!(log.contains("once: payload: second start"));
    // always: the delays double.
    for delay in ["in 250ms", "in 500ms", "in 1000ms", "in 2000ms"] {
        assert!(
            log.lines()
                .any(|l| l.contains("service crasher exited: exit status 3") && l.contains(delay)),
            "no restart {delay}"
        );
    }
    assert!(log.contains("cvm-init: error: service crasher is crash-looping"));
    // Within the probe's window (about 12 s after start) backoff allows at most 7 starts.
    let starts = log.matches("crasher: payload: crashing").count();
    assert!((4..=8).contains(&starts), "crasher started {starts} times");
    let ticks: u64 = field(&log, "payload: pid1-cpu-ticks", "pid1-cpu-ticks")
        .parse()
        .unwrap();
    // 100 ticks = 1 s of CPU in a 10 s window; a spinning PID 1 would use nearly all of it.
    assert!(ticks < 100, "PID 1 used {ticks} ticks of CPU in 10 s");
    eprintln!("PID 1 used {ticks} clock ticks in 10 s while a service crash-looped");
}

/// f. A malformed or unknown cvm.* option: named on the console, then power-off.
/// e. A service restarts only from the file measured before its first start: another file of
/// the verified root bound over its path by a service that ran after it is refused by name.
#[test]
fn e_a_restart_runs_only_the_measured_binary() {
    let config = r#"
[[service]]
name = "victim"
path = "/bin/victim"
args = ["exit-after", "/run/bound"]
restart = "on-failure"

[[service]]
name = "binder"
path = "/bin/payload"
args = ["bind-over", "/bin/other", "/bin/victim", "/run/bound"]
restart = "never"
"#;
    let payload = std::fs::read(&qemu_tests::Artifacts::get().payload).unwrap();
    // The same bytes at another path: the refusal is by the file, not by its contents.
    let prepared = qemu_tests::support::prepare_with_files(
        config,
        &[("/bin/victim", payload.clone()), ("/bin/other", payload)],
    );
    let mut guest = prepared.boot("measured-restart", "", |g| g);
    must(guest.wait_for("binder: payload: bound /bin/other over /bin/victim", BOOT));
    must(guest.wait_for(
        "cvm-init: error: cannot start service victim",
        Duration::from_secs(60),
    ));
    let log = guest.serial_log();
    assert!(
        log.contains("/bin/victim is not the file measured before the service's first start"),
        "the refusal does not name the replaced binary"
    );
    assert_eq!(
        log.matches("victim: payload: started, waiting for").count(),
        1,
        "the victim ran again from the bound file"
    );
    assert_eq!(log.matches("measured workload victim").count(), 1);
}

#[test]
fn f_bad_option_is_named_then_power_off() {
    for (name, option, expect) in [
        ("unknown", "cvm.bogus=1", "unknown option cvm.bogus"),
        (
            "malformed",
            "cvm.loglevel=loud",
            "option cvm.loglevel=\"loud\" on the kernel command line is malformed: expected one of error, warn, info, debug",
        ),
        ("module", "cvm.modules=nosuch_module", "module nosuch_module is neither in /lib/modules/"),
    ] {
        let (mut guest, _dir) = boot(name, Some(SERVE), option, |g| g);
        guest.wait_exit(BOOT).unwrap_or_else(|e| panic!("{e}"));
        let log = guest.serial_log();
        let phase = if name == "module" { "modules" } else { "config" };
        assert!(log.contains(&format!("cvm-init: error: phase {phase} failed: ")), "{name}: no failed phase");
        assert!(log.contains(expect), "{name}: {expect:?} missing");
        assert!(log.contains("cvm-init: powering off in 5 s"), "{name}: no countdown");
        assert!(!log.contains("cvm-init: ready"), "{name}: booted anyway");
        assert!(!log.contains("payload:"), "{name}: the workload ran");
        let lines = console_lines(&log);
        let tail: Vec<&str> = lines.iter().filter(|l| l.starts_with("cvm-init:")).rev().take(2).copied().collect();
        assert_eq!(tail[0], "cvm-init: powering off", "{name}");
        assert!(tail[1].contains(expect), "{name}: the reason is not the last word: {tail:?}");
    }
}

/// h. Modules are loaded without their signatures only while the kernel accepts that: a kernel
/// that enforces them (`module.sig_enforce=1`, as lockdown does under Secure Boot) refuses the
/// first, and every module is then loaded signed; the node boots either way.
#[test]
fn h_a_kernel_that_enforces_module_signatures_gets_them() {
    let (mut guest, _dir) = boot("sig-enforce", Some(SERVE), "module.sig_enforce=1", |g| g);
    must(guest.wait_for("web: payload: serving", BOOT));
    let log = guest.serial_log();
    assert!(
        log.contains("cvm-init: modules: the kernel requires their signatures"),
        "the refusal of an unsigned module was not taken as the kernel's rule"
    );
    assert!(log.contains("cvm-init: ready"));
    assert!(
        !log.contains("optional module sha256_ssse3 not loaded")
            && !log.contains("optional module aesni_intel not loaded"),
        "a module was left out instead of loaded signed"
    );
}

/// f'. With cvm.debug the same failure holds the machine instead.
#[test]
fn f_debug_holds_instead_of_power_off() {
    let (mut guest, _dir) = boot("hold", Some(SERVE), "cvm.debug cvm.bogus", |g| g);
    must(guest.wait_for("cvm-init: holding (cvm.debug)", BOOT));
    assert!(
        guest.wait_exit(Duration::from_secs(8)).is_err(),
        "the guest did not hold"
    );
    assert!(!guest.serial_log().contains("powering off in"));
}

/// g. A panic inside the init goes through the fatal path; the kernel never sees PID 1 die.
#[test]
fn g_panic_goes_through_the_fatal_path() {
    let (mut guest, _dir) = boot("panic", Some(SERVE), "cvm.test-panic=services", |g| g);
    guest.wait_exit(BOOT).unwrap_or_else(|e| panic!("{e}"));
    let log = guest.serial_log();
    assert!(log.contains("cvm-init: phase services start"));
    assert!(log.contains("cvm-init: fatal: panic: "), "no fatal line");
    assert!(
        log.contains("test hook: cvm.test-panic=services"),
        "panic message missing"
    );
    assert!(
        log.contains("cvm-init: powering off in 1 s"),
        "no countdown"
    );
    let last = console_lines(&log)
        .into_iter()
        .rfind(|l| l.starts_with("cvm-init:"));
    assert_eq!(last, Some("cvm-init: powering off"));
    assert!(!log.contains("Attempted to kill init"), "PID 1 died");
    assert!(!log.contains("Kernel panic"), "kernel panic");
}

/// The root's /lib/modules for the test kernel, holding `veth` and `dummy` with their index
/// lines (as the node image's trim-root.py leaves the modules its configuration names).
fn root_modules() -> Vec<(String, Vec<u8>)> {
    let kernel = &qemu_tests::Artifacts::get().kernel;
    let dir = format!("lib/modules/{}", kernel.release);
    let mut files = Vec::new();
    let mut dep = String::new();
    for module in ["veth", "dummy"] {
        let path = format!("kernel/drivers/net/{module}.ko.xz");
        let bytes = std::fs::read(kernel.modules_dir.join(&path))
            .unwrap_or_else(|e| panic!("the test kernel's {path}: {e}"));
        files.push((format!("{dir}/{path}"), bytes));
        dep.push_str(&format!("{path}:\n"));
    }
    files.push((format!("{dir}/modules.dep"), dep.into_bytes()));
    files.push((
        format!("{dir}/modules.alias"),
        b"alias rtnl-link-veth veth\nalias rtnl-link-dummy dummy\n".to_vec(),
    ));
    files
}

/// i. The configuration's modules come from the verified root: opened in `modules-late`
/// (before the network), loaded by a thread while the network and the state disk are set up,
/// and waited for in `modules-late-wait`, before the first service starts. A module named by
/// an alias is refused there by name, before any workload: it would load as optional.
#[test]
fn i_the_configurations_modules_load_beside_network_and_state() {
    let files = root_modules();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(p, b)| (p.as_str(), b.clone())).collect();
    let config = format!("modules = [\"veth\", \"dummy\"]\n{SERVE}");
    let prepared = qemu_tests::support::prepare_with_files(&config, &files);
    let mut guest = prepared.boot("modules-late", "", |g| g);
    must(guest.wait_for("web: payload: serving", BOOT));
    let log = guest.serial_log();
    let lines = console_lines(&log);
    let at = |start: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line {start:?}"))
    };
    let opened = at("cvm-init: phase modules-late ok");
    let network = at("cvm-init: phase network start");
    let state = at("cvm-init: phase state ok");
    let waited = at("cvm-init: phase modules-late-wait ok");
    let services = at("cvm-init: phase services start");
    assert!(opened < network && network < state && state < waited && waited < services);
    assert!(
        lines.contains(&"cvm-init: modules loading meanwhile: veth dummy"),
        "the modules were not opened for the thread"
    );
    let loaded = lines[..services]
        .iter()
        .rfind(|l| l.starts_with("cvm-init: modules loaded meanwhile: "))
        .expect("no line for the modules loaded meanwhile");
    assert_eq!(*loaded, "cvm-init: modules loaded meanwhile: veth dummy");
    drop(guest);

    let config = format!("modules = [\"rtnl-link-veth\"]\n{SERVE}");
    let prepared = qemu_tests::support::prepare_with_files(&config, &files);
    let mut guest = prepared.boot("modules-alias", "", |g| g);
    let log = qemu_tests::support::assert_fatal_before_workload(
        &mut guest,
        "module rtnl-link-veth is an alias of veth in /lib/modules/",
        "web: payload: serving",
    );
    assert!(log.contains("cvm-init: error: phase modules-late failed: "));
}
