//! Command-line entry to the harness for `make run` and `make bench`:
//!   cvm-harness image <dir> [config.toml]   build initrd.cpio and disk.raw, print the root hash
//!   cvm-harness bench <release cvm-init> <release cvm-measure>   boot and print the figures
//!   cvm-harness demo <config.toml> [--tee snp|tdx]   boot a node (containerd, kubelet
//!                                    stand-in, a fresh state disk and vTPM in target/demo) on
//!                                    this terminal; with --tee a measured direct boot on SNP
//!                                    or TDX hardware instead (DRY_RUN=1: print the QEMU
//!                                    command line and the predicted measurement only)
//!   cvm-harness bench-state <release cvm-init>   only the state-disk figures
//!   cvm-harness bench-node <release cvm-init>    only containerd + kubelet stand-in figures
//!   cvm-harness bench-snp <release cvm-measure>  only the SNP launch digest vs sev-snp-measure
//!   cvm-harness bench-compare    the node image against the systemd comparison image (both
//!                                booted through OVMF; CVM_COMPARE_BOOTS boots each, default 3)
//!
//! The boot benches draw one boot of each kind (`cvm-measure timeline`'s picture) into
//! `target/bench/boot-<kind>.svg`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use cvm_measure::launch::{Launch, Tee};
use qemu_tests::support::sparse_disk;
use qemu_tests::{broker, kernel_time_of, Artifacts, Guest, RunningGuest};

/// The QEMU harness's command line, for `make run` and `make bench`
#[derive(Debug, clap::Parser)]
#[command(name = "cvm-harness", version, arg_required_else_help = false)]
struct Cli {
    #[command(subcommand)]
    command: Harness,
}

#[derive(Debug, clap::Subcommand)]
enum Harness {
    /// Build initrd.cpio and disk.raw in DIR, print the root hash
    Image {
        dir: PathBuf,
        /// The node's configuration (default: the tests')
        config: Option<PathBuf>,
    },
    /// Boot the release binaries and print the figures (size, time to ready, RSS, digests)
    Bench { init: PathBuf, measure: PathBuf },
    /// Boot a node (containerd, kubelet stand-in, a fresh state disk and vTPM in target/demo)
    /// on this terminal; with --tee a measured direct boot on SNP or TDX hardware instead
    /// (DRY_RUN=1: print the QEMU command line and the predicted measurement only)
    Demo {
        config: PathBuf,
        /// snp or tdx
        #[arg(long, value_name = "TEE")]
        tee: Option<String>,
    },
    /// Only the state-disk figures
    BenchState {
        init: PathBuf,
        /// Only the default option (integrity, no wipe), without the throughput runs
        #[arg(long)]
        default_only: bool,
    },
    /// Only the containerd + kubelet stand-in figures
    BenchNode { init: PathBuf },
    /// Only the SNP launch digest against sev-snp-measure
    BenchSnp { measure: PathBuf },
    /// The node image (`make image`) against the systemd comparison image (`make
    /// image-systemd`): QEMU start and kernel start to containerd ready, medians and ratios
    BenchCompare,
    /// Join stdin/stdout to HOST:PORT (QEMU's guestfwd runs this per connection)
    Forward { address: String },
}

fn main() -> ExitCode {
    let cli = <Cli as clap::Parser>::parse();
    let result = match cli.command {
        Harness::Image { dir, config } => image(&dir, config.as_deref()),
        Harness::Bench { init, measure } => bench(&init, &measure),
        Harness::Demo { config, tee: None } => demo(&config, None),
        Harness::Demo {
            config,
            tee: Some(tee),
        } => match Tee::from_name(&tee) {
            Some(tee) => demo(&config, Some(tee)),
            None => Err(format!("--tee {tee:?}: expected snp or tdx")),
        },
        Harness::BenchSnp { measure } => snp_bench(&measure),
        Harness::BenchCompare => compare_bench(),
        Harness::Forward { address } => forward(&address),
        Harness::BenchState { init, default_only } => {
            let mut artifacts = Artifacts::get();
            artifacts.init = init;
            state_disk_bench(&artifacts, default_only)
        }
        Harness::BenchNode { init } => {
            let mut artifacts = Artifacts::get();
            artifacts.init = init;
            workload_bench(&artifacts)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cvm-harness: {e}");
            ExitCode::FAILURE
        }
    }
}

fn image(dir: &Path, config: Option<&Path>) -> Result<(), String> {
    let text = match config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        ),
        None => None,
    };
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let image = Artifacts::get().image(dir, text.as_deref());
    println!("{}", image.root.root_hash_hex());
    Ok(())
}

/// Where the demo's key broker listens (forwarded to the guest as 10.0.2.100:18080, the
/// address the demo configuration names).
const DEMO_BROKER: &str = "127.0.0.1:18080";
/// The CA the demo configuration pins for the broker (`kbs.ca`).
const DEMO_BROKER_CA: &str = "etc/cvm/kbs-ca.pem";

/// `make run`: a fresh 8 GiB state disk and vTPM each time (the image may differ from the
/// last run's); the disk key comes from the reference key broker, which runs in this process
/// with the image's predicted reference values and the vTPM's attestation key registered
/// before the first boot. Reboots within the run keep the disk.
fn demo(config: &Path, tee: Option<Tee>) -> Result<(), String> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| format!("cannot read {}: {e}", config.display()))?;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/demo");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
    }
    let tpm = dir.join("tpm");
    std::fs::create_dir_all(&tpm).map_err(|e| e.to_string())?;
    let artifacts = Artifacts::get();
    // The broker's TLS identity, made for this run; the image pins its CA.
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).map_err(|e| e.to_string())?;
    let (ca, chain, key) = broker::tls_test_pki(&pki, qemu_tests::guest::FORWARD_ADDRESS);
    let image = artifacts.image_with_runtime_and_files(&dir, &text, &[(DEMO_BROKER_CA, ca)]);
    let disk = dir.join("state.img");
    sparse_disk(&disk, 8)?;
    let mut guest = Guest::new("demo", &artifacts.kernel.vmlinuz, &image.initrd)
        .disk(&image.root.disk)
        .state_disk(&disk, "cvm-state")
        .forward(18080, 18080)
        .memory_mib(1024)
        .allow_reboot(true)
        .interactive(true)
        .cmdline(&image.roothash_option());
    let mut reference = broker::key_release_reference(&image, &text);
    match tee {
        None => {
            guest = guest.tpm_state(&tpm);
            reference.ek_cas = broker::certified_tpm(&tpm, &dir.join("ek-ca"))?;
            reference
                .attestation_keys
                .push(broker::attestation_key(&tpm)?);
        }
        Some(tee) => {
            guest = guest.tpm(false).confidential(confidential_launch(tee)?);
            if !confidential_reference(&guest, &dir, &mut reference)? {
                return Ok(());
            }
        }
    }
    let listener = std::net::TcpListener::bind(DEMO_BROKER)
        .map_err(|e| format!("cannot listen on {DEMO_BROKER} for the demo's key broker: {e}"))?;
    let mut secret = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut secret);
    let tls = cvm_kbs::tls::server_config(&chain, &key).map_err(|e| qemu_tests::chain(&e))?;
    broker::start_with(listener, &dir.join("kbs"), reference, &secret, Some(tls));
    println!(
        "demo: root hash {}; key broker on https://{DEMO_BROKER}; console below (ctrl-a x quits, ctrl-a c then system_powerdown powers off)",
        image.root.root_hash_hex()
    );
    let mut guest = guest.start();
    guest.wait_exit(Duration::from_secs(24 * 3600)).map(|_| ())
}

/// The firmware, vCPUs and memory of `make run TEE=...`; the firmware is `make ovmf`'s (or
/// OVMF_SNP / OVMF_TDX).
fn confidential_launch(tee: Tee) -> Result<Launch, String> {
    let (variable, built) = match tee {
        Tee::Snp => ("OVMF_SNP", "OVMF.amdsev.fd"),
        Tee::Tdx => ("OVMF_TDX", "OVMF.inteltdx.fd"),
    };
    let firmware = std::env::var_os(variable)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/ovmf")
                .join(built)
        });
    if !firmware.exists() {
        return Err(format!(
            "{}: no such firmware ({variable} names another; `make ovmf` builds it)",
            firmware.display()
        ));
    }
    let launch = Launch {
        tee,
        vcpus: 2,
        memory_mib: 2048,
        firmware,
        kernel: Default::default(),
        initrd: None,
        cmdline: String::new(),
        snp: Default::default(),
        tdx: Default::default(),
    };
    launch.check()?;
    Ok(launch)
}

/// Writes the launch description and what it will measure into `dir`, loads the prediction
/// into the broker's reference, and says whether to go on: false after a dry run; an error
/// naming what this host lacks.
fn confidential_reference(
    guest: &Guest,
    dir: &Path,
    reference: &mut cvm_measure::broker::Reference,
) -> Result<bool, String> {
    let launch = guest.launch_description().expect("a confidential guest");
    let name = launch.tee.name();
    let description = dir.join(format!("launch-{name}.toml"));
    std::fs::write(&description, launch.to_toml()).map_err(|e| e.to_string())?;
    let predicted = launch.predict().map_err(|e| qemu_tests::chain(&e))?;
    let values = dir.join(format!("reference-{name}.json"));
    std::fs::write(&values, serde_json::to_string_pretty(&predicted).unwrap())
        .map_err(|e| e.to_string())?;
    // The broker takes the launch's values; cvm-init's own part of RTMR 2 when it asks for
    // the key comes from the image and its config, as the vTPM's PCRs do.
    let mut merged = predicted.clone();
    merged["pcr"] = serde_json::json!({});
    // The harness checks what this image measures, not the platform's firmware level: the
    // minimum TCB is the operator's to set in a real reference.
    if merged.get("snp_measurements").is_some() && merged.get("snp_min_tcb").is_none() {
        merged["snp_min_tcb"] = serde_json::json!("waived");
    }
    let mut loaded = cvm_measure::broker::Reference::from_prediction(&merged)?;
    loaded.tdx_init_rtmr2 = reference.tdx_init_rtmr2.take();
    *reference = loaded;
    let missing = cvm_measure::launch::missing_on_this_host(launch.tee);
    if std::env::var_os("DRY_RUN").is_some_and(|v| v == "1") {
        let line = guest.command_line(&dir.join("run"));
        println!("{}", shell_words(&line));
        println!(
            "# launch description: {}\n# predicted measurement: {}",
            description.display(),
            values.display()
        );
        println!("{}", serde_json::to_string_pretty(&predicted).unwrap());
        for thing in &missing {
            println!("# this host lacks: {thing}");
        }
        return Ok(false);
    }
    if !missing.is_empty() {
        return Err(format!(
            "this host cannot launch on {name}; missing:\n  {}\n(DRY_RUN=1 prints the command line and the predicted measurement)",
            missing.join("\n  ")
        ));
    }
    Ok(true)
}

/// A command line a POSIX shell reads back as these words.
fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            if !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

const BENCH_CONFIG: &str = r#"
[[service]]
name = "probe"
path = "/bin/payload"
args = ["rss-probe"]
restart = "never"
"#;

fn bench(release_init: &Path, release_measure: &Path) -> Result<(), String> {
    let size = std::fs::metadata(release_init)
        .map_err(|e| format!("cannot stat {}: {e}", release_init.display()))?
        .len();
    println!(
        "cvm-init release binary: {size} bytes ({:.2} MiB) at {}",
        size as f64 / 1048576.0,
        release_init.display()
    );
    verity_format_bench(release_measure)?;
    snp_bench(release_measure)?;
    let mut artifacts = Artifacts::get();
    artifacts.init = release_init.to_path_buf();
    let runs = 3;
    let mut times = Vec::new();
    for run in 1..=runs {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let image = artifacts.image(dir.path(), Some(BENCH_CONFIG));
        // No quiet: the kernel echoes the ready line with its timestamp.
        let mut guest = Guest::new("bench", &artifacts.kernel.vmlinuz, &image.initrd)
            .disk(&image.root.disk)
            .cmdline(&image.roothash_option())
            .cmdline("loglevel=7")
            .start();
        guest.wait_for("probe: payload: pid1-rss-kib=", Duration::from_secs(120))?;
        if run == runs {
            draw_boot(&guest, "bench");
        }
        let log = guest.serial_log();
        let ready = kernel_time_of(&log, "cvm-init: ready").ok_or("no timestamped ready line")?;
        // The kernel's own line for the start of PID 1.
        let started = kernel_time_of(&log, "Run /init as init process")
            .ok_or("no timestamped line for the start of /init")?;
        let rss = log
            .lines()
            .find_map(|l| {
                l.split("pid1-rss-kib=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .ok_or("no RSS line")?;
        let phase_ms = |name: &str| phase_ms(&log, name);
        println!(
            "run {run}: kernel start -> cvm-init: ready {ready:.3} s (PID 1 start at {started:.3} s, PID 1 work {:.0} ms); \
             phases verity-root {} ms, mount-root {} ms, switch-root {} ms; PID 1 RSS at ready {rss} KiB",
            (ready - started) * 1000.0,
            phase_ms("verity-root").map_or("?".into(), |v| v.to_string()),
            phase_ms("mount-root").map_or("?".into(), |v| v.to_string()),
            phase_ms("switch-root").map_or("?".into(), |v| v.to_string()),
        );
        times.push(ready);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "median kernel start -> ready over {runs} TCG boots: {:.3} s",
        times[runs / 2]
    );
    workload_bench(&artifacts)?;
    state_disk_bench(&artifacts, false)?;
    compare_bench()?;
    Ok(())
}

/// The node, plus a probe for PID 1's resident set once containerd and kubelet run.
fn node_bench_config() -> String {
    format!(
        "{}{}",
        qemu_tests::runtime::NODE_CONFIG,
        r#"
[[service]]
name = "probe"
path = "/bin/payload"
args = ["rss-probe"]
after = ["containerd"]
restart = "never"
"#
    )
}

/// Kernel start to containerd's socket accepting and to `ready`, first boot (the state disk
/// formatted) and second boot; PID 1's RSS with both services running.
fn workload_bench(artifacts: &Artifacts) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let image = artifacts.image_with_runtime(dir.path(), &node_bench_config());
    let disk = dir.path().join("state.img");
    sparse_disk(&disk, 8)?;
    let tpm = dir.path().join("tpm");
    std::fs::create_dir_all(&tpm).map_err(|e| e.to_string())?;
    for boot in ["first", "second"] {
        let mut guest = Guest::new(
            &format!("bench-node-{boot}"),
            &artifacts.kernel.vmlinuz,
            &image.initrd,
        )
        .disk(&image.root.disk)
        .state_disk(&disk, "cvm-state")
        .tpm_state(&tpm)
        .memory_mib(1024)
        .cmdline(&image.roothash_option())
        .cmdline("loglevel=7")
        .start();
        guest.wait_for("probe: payload: pid1-rss-kib=", Duration::from_secs(300))?;
        guest.wait_for("kubelet-standin: reached", Duration::from_secs(60))?;
        draw_boot(&guest, &format!("node-{boot}"));
        let log = guest.serial_log();
        let at = |marker: &str| {
            kernel_time_of(&log, marker).ok_or(format!("no timestamped line for {marker:?}"))
        };
        let socket = at("service containerd ready")?;
        let ready = at("cvm-init: ready")?;
        let rss = log
            .lines()
            .find_map(|l| l.split("pid1-rss-kib=").nth(1))
            .map_or("?".to_string(), |v| {
                let mut parts = v.split_whitespace();
                let total = parts.next().unwrap_or("?");
                let rest: Vec<String> = parts.map(|p| p.replace('=', " ")).collect();
                format!("{total} KiB ({})", rest.join(", "))
            });
        match pid1_work(&guest.timed_serial_log()) {
            Ok(summary) => println!("node ({boot} boot): {summary}"),
            Err(e) => println!("node ({boot} boot): cannot split PID 1's work: {e}"),
        }
        println!(
            "node ({boot} boot, 8 GiB state disk{}): kernel start -> containerd socket accepts {socket:.3} s, -> cvm-init: ready {ready:.3} s; state phase {} ms; PID 1 RSS with containerd and kubelet running {rss}",
            if boot == "first" { ", formatted" } else { "" },
            phase_ms(&log, "state").map_or("?".into(), |v| v.to_string()),
        );
    }
    Ok(())
}

const STATE_CONFIG: &str = r#"
[state]
serial = "cvm-state"
key = "tpm"
binds = ["/var/lib/kubelet"]
"#;

/// The state-disk options compared: (name, extra `[state]` lines, disk sizes in GiB).
const STATE_OPTIONS: [(&str, &str, &[u64]); 3] = [
    ("xts, no integrity", "integrity = \"none\"\n", &[1, 8, 32]),
    ("xts + hmac-sha256, no wipe (default)", "", &[1, 8, 32]),
    ("xts + hmac-sha256, full wipe", "wipe = true\n", &[1, 8]),
];

/// Draws the boot `guest` made from its timed console into `target/bench/boot-<kind>.svg`,
/// the console beside it (`boot-<kind>.timed.log`, for `cvm-measure timeline`). A log the
/// timeline cannot read is reported, and the figures go on.
fn draw_boot(guest: &RunningGuest, kind: &str) {
    let dir = bench_dir();
    let path = dir.join(format!("boot-{kind}.svg"));
    let log = guest.timed_serial_log();
    let drawn = write_console(&log, kind)
        .map_err(|e| format!("cannot write the console to {}: {e}", dir.display()))
        .and_then(|_| {
            cvm_measure::timeline::svg_from_log(&log, &format!("{kind} boot"))
                .map_err(|e| e.to_string())
        })
        .and_then(|svg| {
            std::fs::write(&path, svg).map_err(|e| format!("cannot write {}: {e}", path.display()))
        });
    match drawn {
        Ok(()) => println!("timeline of the {kind} boot: {}", path.display()),
        Err(e) => println!("cannot draw the timeline of the {kind} boot: {e}"),
    }
}

/// PID 1's own work in a boot (issue 22's figure): from cvm-init's first line to containerd's
/// exec, which is the time to `service containerd ready` minus containerd's own start-up, with
/// each phase's share and the goals beside them.
fn pid1_work(timed_log: &[u8]) -> Result<String, String> {
    use cvm_measure::timeline::{parse, Kind};
    let timeline = parse(timed_log).map_err(|e| e.to_string())?;
    let init = timeline
        .bars
        .iter()
        .find(|b| b.kind == Kind::Init)
        .ok_or("no cvm-init bar")?;
    let containerd = timeline
        .bars
        .iter()
        .find(|b| b.kind == Kind::Service && b.name == "containerd")
        .ok_or("no containerd service")?;
    let work_ms = (containerd.start - init.start) * 1000.0;
    let shares: Vec<String> = timeline
        .bars
        .iter()
        .filter(|b| b.kind == Kind::Phase && b.start < containerd.start)
        .filter(|b| b.label_ms >= 1.0)
        .map(|b| format!("{} {:.0}", b.name, b.label_ms))
        .collect();
    let modules = timeline
        .bars
        .iter()
        .find(|b| b.kind == Kind::Phase && b.name == "modules")
        .map_or(f64::NAN, |b| b.label_ms);
    Ok(format!(
        "PID 1's own work (cvm-init's first line -> containerd's exec) {work_ms:.0} ms (goal <= 1500 ms); phases (ms): {}; modules phase {modules:.0} ms (goal <= 300 ms); containerd's own start-up {:.0} ms",
        shares.join(", "),
        (containerd.end - containerd.start) * 1000.0
    ))
}

fn phase_ms(log: &str, name: &str) -> Option<u64> {
    log.lines().find_map(|l| {
        l.split(&format!("cvm-init: phase {name} ok "))
            .nth(1)?
            .strip_suffix("ms")?
            .parse::<u64>()
            .ok()
    })
}

/// For each state-disk option: first-boot setup (phase `state`: format, seal, dm-integrity,
/// dm-crypt, wipe if any, mkfs, commit, mount) on sparse disks of several sizes, the second
/// boot that only opens it, and sequential throughput against the same kind of disk
/// unencrypted, from one guest run.
fn state_disk_bench(artifacts: &Artifacts, default_only: bool) -> Result<(), String> {
    for (option, extra, sizes) in STATE_OPTIONS {
        if default_only && !extra.is_empty() {
            continue;
        }
        let config = STATE_CONFIG.replace("key = \"tpm\"\n", &format!("key = \"tpm\"\n{extra}"));
        for &gib in sizes {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            let image = artifacts.image(dir.path(), Some(&config));
            let disk = dir.path().join("state.img");
            sparse_disk(&disk, gib)?;
            let tpm = dir.path().join("tpm");
            std::fs::create_dir_all(&tpm).map_err(|e| e.to_string())?;
            let mut phase_times = Vec::new();
            for boot in ["first", "second"] {
                let mut guest = Guest::new(
                    &format!("bench-state-{gib}g-{boot}"),
                    &artifacts.kernel.vmlinuz,
                    &image.initrd,
                )
                .disk(&image.root.disk)
                .state_disk(&disk, "cvm-state")
                .tpm_state(&tpm)
                .cmdline(&image.roothash_option())
                .start();
                guest.wait_for("cvm-init: ready", Duration::from_secs(3600))?;
                if extra.is_empty() {
                    draw_boot(&guest, &format!("state-{gib}g-{boot}"));
                }
                phase_times
                    .push(phase_ms(&guest.serial_log(), "state").ok_or("no state phase time")?);
            }
            println!(
                "state disk [{option}] {gib} GiB (sparse): first boot phase state {} ms, second boot {} ms; {} MiB written to the disk",
                phase_times[0],
                phase_times[1],
                allocated_kib(&disk) / 1024
            );
        }
        if !default_only {
            throughput_bench(artifacts, option, &config)?;
        }
    }
    Ok(())
}

/// The bytes a sparse file really holds, in KiB.
fn allocated_kib(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() / 2)
}

/// One guest, a 2 GiB state disk and a 2 GiB plain disk: the payload writes and reads the
/// same file on each; the ratios say what encryption (and integrity) cost.
fn throughput_bench(artifacts: &Artifacts, option: &str, config: &str) -> Result<(), String> {
    const MIB: u64 = 256;
    let config = format!(
        "{config}\n[[service]]\nname = \"io\"\npath = \"/bin/payload\"\nargs = [\"throughput\", \"{MIB}\"]\nrestart = \"never\"\n"
    );
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let image = artifacts.image(dir.path(), Some(&config));
    let (state, plain) = (dir.path().join("state.img"), dir.path().join("plain.img"));
    sparse_disk(&state, 2)?;
    sparse_disk(&plain, 2)?;
    let tpm = dir.path().join("tpm");
    std::fs::create_dir_all(&tpm).map_err(|e| e.to_string())?;
    let mut guest = Guest::new("bench-throughput", &artifacts.kernel.vmlinuz, &image.initrd)
        .disk(&image.root.disk)
        .state_disk(&state, "cvm-state")
        .state_disk(&plain, "cvm-plain")
        .tpm_state(&tpm)
        .cmdline(&image.roothash_option())
        .start();
    guest.wait_for("payload: throughput plain", Duration::from_secs(3600))?;
    let log = guest.serial_log();
    let figures = |label: &str| -> Result<(f64, f64), String> {
        let line = log
            .lines()
            .find_map(|l| l.split(&format!("payload: throughput {label} ")).nth(1))
            .ok_or(format!("no {label} throughput line"))?;
        let value = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.parse::<f64>().ok())
                .ok_or(format!("no {key} in {line:?}"))
        };
        Ok((value("write=")?, value("read=")?))
    };
    let (sw, sr) = figures("state")?;
    let (pw, pr) = figures("plain")?;
    println!(
        "throughput [{option}], {MIB} MiB sequential through ext4: state disk write {sw:.1} MiB/s, read {sr:.1} MiB/s; \
         plain disk write {pw:.1} MiB/s, read {pr:.1} MiB/s; ratio encrypted/plain write {:.2}, read {:.2}",
        sw / pw,
        sr / pr
    );
    Ok(())
}

/// `cvm-measure verity format` against `veritysetup format` on the same 1 GiB file.
/// Runs a command: (seconds, stdout), or its stderr if it failed.
fn timed(cmd: &mut Command) -> Result<(f64, String), String> {
    let start = Instant::now();
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok((
        start.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// QEMU's `guestfwd=...-cmd:` runs this once for each connection the guest opens, on the
/// connection's socket as stdin and stdout: it joins that to a server on the host's loopback.
fn forward(address: &str) -> Result<(), String> {
    let server = std::net::TcpStream::connect(address).map_err(|e| format!("{address}: {e}"))?;
    let mut upstream = server.try_clone().map_err(|e| e.to_string())?;
    let to_server = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut upstream);
        let _ = upstream.shutdown(std::net::Shutdown::Write);
    });
    // Each chunk is flushed at once: stdout buffers by line, and TLS has no lines.
    let mut downstream = server;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match std::io::Read::read(&mut downstream, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if std::io::Write::write_all(&mut out, &buf[..n])
                    .and_then(|()| std::io::Write::flush(&mut out))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    let _ = to_server.join();
    Ok(())
}

/// `cvm-measure snp` against sev-snp-measure on one launch (a 2 MiB AmdSev-layout firmware,
/// 4 vCPUs, the test kernel and an initrd), the median of five runs each; sev-snp-measure is
/// installed from PyPI into `.cache` (as the agreement test does).
fn snp_bench(measure: &Path) -> Result<(), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join(".cache/sev-snp-measure-0.0.13");
    let tool = venv.join("bin/sev-snp-measure");
    if !tool.exists() {
        timed(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        timed(Command::new(venv.join("bin/pip")).args([
            "install",
            "-q",
            "sev-snp-measure==0.0.13",
        ]))
        .map_err(|e| format!("cannot install sev-snp-measure: {e}"))?;
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    // Debian's OVMF.fd with its last page replaced by the AmdSev fixture's: the footer and the
    // metadata are addressed from the end, so this is a valid firmware image with a
    // kernel-hashes section, and its other pages are real firmware (not erased flash, whose
    // identical pages cost almost nothing to measure).
    let suffix = std::fs::read(root.join("testdata/ovmf/ovmf_AmdSev_suffix.bin"))
        .map_err(|e| format!("the AmdSev fixture: {e}"))?;
    let mut firmware = std::fs::read("/usr/share/ovmf/OVMF.fd")
        .map_err(|e| format!("/usr/share/ovmf/OVMF.fd (package ovmf): {e}"))?;
    let keep = firmware.len() - suffix.len();
    firmware.truncate(keep);
    firmware.extend(suffix);
    std::fs::write(dir.path().join("ovmf.fd"), &firmware).map_err(|e| e.to_string())?;
    let kernel = Artifacts::get().kernel.vmlinuz;
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, qemu_tests::pseudo_random_bytes(8 << 20, 0x51a7e))
        .map_err(|e| e.to_string())?;
    let args = |cmd: &mut Command| {
        cmd.arg("--ovmf")
            .arg(dir.path().join("ovmf.fd"))
            .args([
                "--vcpus",
                "4",
                "--vcpu-type",
                "EPYC-Milan",
                "--guest-features",
                "0x1",
                "--kernel",
            ])
            .arg(&kernel)
            .arg("--initrd")
            .arg(&initrd)
            .args(["--append", "console=ttyS0 roothash=00"]);
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (mut ours, mut theirs, mut kernel_alone) = (Vec::new(), Vec::new(), Vec::new());
    let (mut our_digest, mut their_digest) = (String::new(), String::new());
    for _ in 0..5 {
        let mut cmd = Command::new(measure);
        cmd.arg("snp");
        args(&mut cmd);
        let (t, out) = timed(&mut cmd)?;
        ours.push(t);
        our_digest = out.trim().to_string();
        let mut cmd = Command::new(&tool);
        cmd.args(["--mode", "snp", "--output-format", "hex"]);
        args(&mut cmd);
        let (t, out) = timed(&mut cmd)?;
        theirs.push(t);
        their_digest = out.trim().lines().last().unwrap_or("").to_string();
        // The floor for any tool: the digest needs the kernel's SHA-256, one chain of rounds.
        kernel_alone.push(timed(Command::new(measure).arg("digest").arg(&kernel))?.0);
    }
    if our_digest != their_digest {
        return Err(format!(
            "the digests differ: cvm-measure {our_digest}, sev-snp-measure {their_digest}"
        ));
    }
    let (ours, theirs, kernel_alone) = (median(ours), median(theirs), median(kernel_alone));
    println!(
        "snp launch digest (Debian's 2 MiB OVMF.fd with an AmdSev metadata page, 4 vCPUs, {} MB kernel, 8 MB initrd; median of 5): cvm-measure {:.1} ms, sev-snp-measure {:.1} ms: {:.1}x faster (same digest {}…)",
        std::fs::metadata(&kernel).map(|m| m.len() / 1_000_000).unwrap_or(0),
        ours * 1000.0,
        theirs * 1000.0,
        theirs / ours,
        &our_digest[..16]
    );
    println!(
        "  floor: the kernel's SHA-256 alone in one process (cvm-measure digest) {:.1} ms, so no tool that hashes at this CPU's rate is more than {:.1}x faster than sev-snp-measure here; the whole digest costs {:.1} ms more",
        kernel_alone * 1000.0,
        theirs / kernel_alone,
        (ours - kernel_alone) * 1000.0
    );
    Ok(())
}

fn verity_format_bench(measure: &Path) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let data = dir.path().join("data");
    // Pseudo-random content, written once (1 GiB).
    {
        use std::io::Write;
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(&data).map_err(|e| e.to_string())?);
        let mut state = 0x243f6a8885a308d3u64;
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            for b in chunk.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                b.copy_from_slice(&state.to_le_bytes());
            }
            f.write_all(&chunk).map_err(|e| e.to_string())?;
        }
    }
    let salt = "5a".repeat(32);
    let time = timed;
    let (theirs, vs_out) = time(
        Command::new("veritysetup")
            .arg("format")
            .arg(&data)
            .arg(dir.path().join("hash.vs"))
            .arg(format!("--salt={salt}")),
    )?;
    let (ours, our_out) = time(
        Command::new(measure)
            .args(["verity", "format"])
            .arg(&data)
            .arg(dir.path().join("hash.ours"))
            .args(["--salt", &salt]),
    )?;
    let same = vs_out.contains(our_out.trim());
    println!(
        "verity format of 1 GiB: veritysetup {theirs:.3} s, cvm-measure {ours:.3} s, ratio {:.2}x (>1: cvm-measure faster); same root hash: {same}",
        theirs / ours
    );
    if !same {
        return Err("cvm-measure and veritysetup disagree on the root hash".into());
    }
    Ok(())
}

/// The two images `bench-compare` boots, as `scripts/image.sh` and `scripts/image-systemd.sh`
/// write them: (what, disk, the console line that means containerd's socket accepts, the make
/// target that builds it).
fn compare_images() -> [(&'static str, PathBuf, &'static str, &'static str); 2] {
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/image");
    [
        (
            "node",
            images.join("out/cvm.raw"),
            "service containerd ready",
            "make image",
        ),
        (
            "systemd",
            images.join("systemd-out/systemd-compare.raw"),
            "systemd-compare: containerd ready",
            "make image-systemd",
        ),
    ]
}

/// The goal of issue 22 for both ratios (node / systemd).
const COMPARE_GOAL: f64 = 0.1;

/// The node image against the systemd comparison image, booted alike (`make image-test`'s
/// machine: OVMF + swtpm, TCG, 1 vCPU, 1 GiB, user network), in alternation: QEMU start →
/// containerd's socket accepting, and the kernel's start → the same line, medians of
/// CVM_COMPARE_BOOTS boots each (default 3). The node boots with a state disk a first (untimed)
/// boot formatted: the node's every later boot, and the systemd image keeps containerd's state
/// in memory. Skipped, naming what is missing, when an image is not built.
fn compare_bench() -> Result<(), String> {
    const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
    const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
    const BOOT: Duration = Duration::from_secs(600);
    let images = compare_images();
    for (what, disk, _, target) in &images {
        if !disk.exists() {
            println!(
                "comparison with systemd: skipped, the {what} image {} is missing (`{target}` builds it)",
                disk.display()
            );
            return Ok(());
        }
    }
    let boots = match std::env::var("CVM_COMPARE_BOOTS") {
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(format!(
                    "CVM_COMPARE_BOOTS={v:?}: expected a number of boots, at least 1"
                ))
            }
        },
        Err(_) => 3,
    };
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let state = qemu_tests::support::blank_state_disk(work.path());
    let tpm = work.path().join("tpm");
    std::fs::create_dir_all(&tpm).map_err(|e| e.to_string())?;
    let boot = |what: &str, disk: &Path| {
        let guest = Guest::uefi(
            &format!("compare-{what}"),
            Path::new(OVMF_CODE),
            Path::new(OVMF_VARS),
            disk,
        )
        .network(true)
        .memory_mib(1024);
        if what == "node" {
            guest.state_disk(&state, "cvm-state").tpm_state(&tpm)
        } else {
            guest
        }
        .start()
    };
    // The node's state disk, formatted and sealed once, as on its first boot.
    {
        let (_, disk, marker, _) = &images[0];
        let mut guest = boot("node", disk);
        guest.wait_for(marker, BOOT)?;
        qemu_tests::support::power_down(&mut guest);
    }
    // (QEMU start, kernel start) → containerd ready, per image.
    let mut figures: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for run in 1..=boots {
        for (i, (what, disk, marker, _)) in images.iter().enumerate() {
            let mut guest = boot(what, disk);
            guest.wait_for(marker, BOOT)?;
            let timed = guest.timed_serial_log();
            if run == boots {
                if *what == "node" {
                    draw_boot(&guest, "compare-node");
                } else {
                    // The timeline draws cvm-init boots only; the console is kept to read.
                    keep_console(&timed, "compare-systemd");
                }
            }
            drop(guest);
            let (qemu, kernel) = time_to_marker(&String::from_utf8_lossy(&timed), marker)
                .map_err(|e| format!("{what} boot {run}: {e}"))?;
            println!(
                "compare boot {run}, {what}: QEMU start -> containerd ready {qemu:.1} s, kernel start -> containerd ready {kernel:.1} s"
            );
            figures[i].push((qemu, kernel));
        }
    }
    let median = |values: &mut Vec<f64>| {
        values.sort_by(|a, b| a.total_cmp(b));
        values[values.len() / 2]
    };
    let mut medians = [(0.0, 0.0); 2];
    for (i, (what, _, marker, _)) in images.iter().enumerate() {
        let qemu = median(&mut figures[i].iter().map(|f| f.0).collect());
        let kernel = median(&mut figures[i].iter().map(|f| f.1).collect());
        println!(
            "{what} image ({marker:?}), median of {boots}: QEMU start -> containerd ready {qemu:.1} s, kernel start -> containerd ready {kernel:.1} s"
        );
        medians[i] = (qemu, kernel);
    }
    let verdict = |ratio: f64| {
        if ratio <= COMPARE_GOAL {
            "met"
        } else {
            "not met"
        }
    };
    let (node, systemd) = (medians[0], medians[1]);
    for (figure, ratio) in [
        ("kernel start -> containerd ready", node.1 / systemd.1),
        ("QEMU start -> containerd ready", node.0 / systemd.0),
    ] {
        println!(
            "node / systemd, {figure}: {ratio:.3} (goal <= {COMPARE_GOAL}: {})",
            verdict(ratio)
        );
    }
    Ok(())
}

/// Writes a timed console to `target/bench/boot-<kind>.timed.log`, where `draw_boot` puts its.
fn keep_console(timed: &[u8], kind: &str) {
    match write_console(timed, kind) {
        Ok(path) => println!("console of the {kind} boot: {}", path.display()),
        Err(e) => println!(
            "cannot write the console to {}: {e}",
            bench_dir().join(format!("boot-{kind}.timed.log")).display()
        ),
    }
}

/// Where the benches put their pictures and consoles: `target/bench`.
fn bench_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("bench")
}

/// `target/bench/boot-<kind>.timed.log`, written; its path.
fn write_console(timed: &[u8], kind: &str) -> std::io::Result<PathBuf> {
    let dir = bench_dir();
    let path = dir.join(format!("boot-{kind}.timed.log"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(&path, timed)?;
    Ok(path)
}

/// The kernel's first console line on a UEFI boot: its EFI stub, which runs once the firmware
/// (and systemd-stub) handed over and before the kernel decompresses itself. Neither image's
/// kernel prints stamped lines at `loglevel=4`, so this line is the kernel's start on both.
const KERNEL_FIRST_LINE: &str = "EFI stub: ";

/// From a timed console (`serial.timed.log`: `<seconds since QEMU's start> <line>`): when the
/// first line holding `marker` arrived (seconds since QEMU's start), and that less the arrival
/// of the kernel's first line ([`KERNEL_FIRST_LINE`]).
fn time_to_marker(timed: &str, marker: &str) -> Result<(f64, f64), String> {
    let mut kernel_start: Option<f64> = None;
    for (number, line) in timed.lines().enumerate() {
        let (arrival, text) = line
            .split_once(' ')
            .and_then(|(at, text)| Some((at.parse::<f64>().ok()?, text)))
            .ok_or_else(|| {
                format!(
                    "timed console line {}: expected `<seconds> <console line>`",
                    number + 1
                )
            })?;
        if kernel_start.is_none() && text.contains(KERNEL_FIRST_LINE) {
            kernel_start = Some(arrival);
        }
        if text.contains(marker) {
            let start = kernel_start.ok_or_else(|| {
                format!(
                    "no {KERNEL_FIRST_LINE:?} line before {marker:?}: cannot tell the kernel's start"
                )
            })?;
            return Ok((arrival, arrival - start));
        }
    }
    Err(format!("no console line holds {marker:?}"))
}

#[cfg(test)]
mod tests {
    use super::time_to_marker;

    #[test]
    fn the_kernel_starts_at_its_efi_stub_line() {
        let timed = "9.000 BdsDxe: loading Boot0001\n\
                     10.000 EFI stub: Loaded initrd from LINUX_EFI_INITRD_MEDIA_GUID device path\r\n\
                     10.500 EFI stub: a second line\n\
                     20.000 service containerd ready\n\
                     21.000 service containerd ready\n";
        let (qemu, kernel) = time_to_marker(timed, "service containerd ready").unwrap();
        assert_eq!(qemu, 20.0);
        assert!((kernel - 10.0).abs() < 1e-9, "{kernel}");
    }

    #[test]
    fn a_console_without_the_marker_or_the_kernel_is_refused() {
        let err = time_to_marker("1.000 hello\n", "ready").unwrap_err();
        assert!(err.contains("no console line holds \"ready\""), "{err}");
        let err = time_to_marker("1.000 ready\n", "ready").unwrap_err();
        assert!(err.contains("no \"EFI stub: \" line before"), "{err}");
        let err = time_to_marker("x ready\n", "ready").unwrap_err();
        assert!(err.contains("timed console line 1"), "{err}");
    }
}
