//! Command-line entry to the harness for `make run` and `make bench`:
//!   cvm-harness initrd <out> [config.toml]   build a test initramfs
//!   cvm-harness bench                          boot and print the figures

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use qemu_tests::{kernel_time_of, Artifacts, Guest};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["initrd", out] => initrd(Path::new(out), None),
        ["initrd", out, config] => initrd(Path::new(out), Some(Path::new(config))),
        ["bench", release_init] => bench(Path::new(release_init)),
        _ => Err(
            "usage: cvm-harness initrd <out> [config.toml] | cvm-harness bench <release cvm-init>"
                .to_string(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cvm-harness: {e}");
            ExitCode::FAILURE
        }
    }
}

fn initrd(out: &Path, config: Option<&Path>) -> Result<(), String> {
    let text = match config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let artifacts = Artifacts::get();
    let dir = out.parent().unwrap_or(Path::new("."));
    let built = artifacts.initramfs(dir, text.as_deref());
    if built != out {
        std::fs::rename(&built, out).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    }
    Ok(())
}

const BENCH_CONFIG: &str = r#"
[[service]]
name = "probe"
path = "/bin/payload"
args = ["rss-probe"]
restart = "never"
"#;

fn bench(release_init: &Path) -> Result<(), String> {
    let size = std::fs::metadata(release_init)
        .map_err(|e| format!("cannot stat {}: {e}", release_init.display()))?
        .len();
    println!(
        "cvm-init release binary: {size} bytes ({:.2} MiB) at {}",
        size as f64 / 1048576.0,
        release_init.display()
    );
    let mut artifacts = Artifacts::get();
    artifacts.init = PathBuf::from(release_init);
    let runs = 3;
    let mut times = Vec::new();
    for run in 1..=runs {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let initrd = artifacts.initramfs(dir.path(), Some(BENCH_CONFIG));
        // No quiet: the kernel echoes the ready line with its timestamp.
        let mut guest = Guest::new("bench", &artifacts.kernel.vmlinuz, &initrd)
            .cmdline("loglevel=7")
            .start();
        guest.wait_for("probe: payload: pid1-rss-kib=", Duration::from_secs(120))?;
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
        println!(
            "run {run}: kernel start -> cvm-init: ready {ready:.3} s (PID 1 start at {started:.3} s, PID 1 work {:.0} ms); PID 1 RSS at ready {rss} KiB",
            (ready - started) * 1000.0
        );
        times.push(ready);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "median kernel start -> ready over {runs} TCG boots: {:.3} s",
        times[runs / 2]
    );
    Ok(())
}
