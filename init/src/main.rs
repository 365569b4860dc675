//! The PID 1 binary. Run as anything but PID 1 it answers `--version` and `--help`, and checks
//! configurations (`check-config`) with the boot's own code.

use std::path::Path;
use std::process::ExitCode;

use cvm_init::check::{self, Machine};

const HELP: &str = "\
cvm-init: PID 1 of a confidential Kubernetes node.

It runs only as the first process of a machine (from the initramfs of a measured UKI) and
takes its configuration from the kernel command line (cvm.* options) and from
/etc/cvm-init/config.toml inside the measured image.

Usage:
  cvm-init --version   print the version
  cvm-init --help      print this text
  cvm-init check-config FILE [--cmdline TEXT] [--on MACHINE]... [--json]
                       run the boot's checks on a configuration file and a kernel command
                       line (default: none) before building an image: exit 1 with the
                       message the console would show, 0 with a one-line summary (or, with
                       --json, the configuration with its defaults). Decisions that depend on
                       the machine are made for each of snp, tdx, vtpm and bare; --on names
                       the machines the image must boot on (default: at least one of them)

Kernel command line options:
";

fn main() -> ExitCode {
    if nix::unistd::getpid().as_raw() == 1 {
        cvm_init::boot::run();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["--version"] | ["-V"] => {
            println!("cvm-init {}", cvm_init::VERSION);
            ExitCode::SUCCESS
        }
        ["--help"] | ["-h"] => {
            print!("{HELP}");
            for (name, form) in cvm_init::config::OPTIONS {
                println!("  {name:<16} {form}");
            }
            ExitCode::SUCCESS
        }
        ["check-config", ref rest @ ..] => match CheckArgs::parse(rest) {
            Ok(args) => check_config(&args),
            Err(usage) => {
                eprintln!("cvm-init: check-config: {usage} (try --help)");
                ExitCode::from(2)
            }
        },
        [] => {
            eprintln!(
                "cvm-init: refusing to run: this is pid {}, not 1; cvm-init is the init of a \
                 machine and starts only as its first process (try --help)",
                std::process::id()
            );
            ExitCode::from(2)
        }
        _ => {
            eprintln!(
                "cvm-init: unknown arguments {}: expected --version, --help or check-config \
                 (as a normal process it does nothing else)",
                cvm_formats::text::escape(&args.join(" "))
            );
            ExitCode::from(2)
        }
    }
}

struct CheckArgs {
    file: String,
    cmdline: String,
    on: Vec<Machine>,
    json: bool,
}

impl CheckArgs {
    fn parse(args: &[&str]) -> Result<CheckArgs, String> {
        let mut file = None;
        let mut cmdline = None;
        let mut on = Vec::new();
        let mut json = false;
        let mut args = args.iter();
        while let Some(&arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => (flag, Some(value)),
                _ => (arg, None),
            };
            let mut value = |name: &str| {
                inline
                    .or_else(|| args.next().copied())
                    .map(str::to_string)
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match flag {
                "--cmdline" if cmdline.is_some() => return Err("--cmdline given twice".into()),
                "--cmdline" => cmdline = Some(value("--cmdline")?),
                "--on" => {
                    let name = value("--on")?;
                    let machine = Machine::parse(&name).ok_or_else(|| {
                        format!(
                            "--on {}: expected one of {}",
                            cvm_formats::text::escape(&name),
                            Machine::NAMES
                        )
                    })?;
                    if !on.contains(&machine) {
                        on.push(machine);
                    }
                }
                "--json" if inline.is_none() => json = true,
                _ if flag.starts_with('-') => {
                    return Err(format!(
                        "unknown option {}: expected --cmdline, --on or --json",
                        cvm_formats::text::escape(arg)
                    ))
                }
                _ if file.is_some() => {
                    return Err(format!(
                        "a second file {}: expected one configuration file",
                        cvm_formats::text::escape(arg)
                    ))
                }
                _ => file = Some(arg.to_string()),
            }
        }
        Ok(CheckArgs {
            file: file.ok_or("no configuration file given: expected check-config FILE")?,
            cmdline: cmdline.unwrap_or_default(),
            on,
            json,
        })
    }
}

fn check_config(args: &CheckArgs) -> ExitCode {
    let path = Path::new(&args.file);
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!(
                "cvm-init: check-config: cannot read {}: {e}",
                path.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let checked = match check::check(path, Some(&bytes), args.cmdline.as_bytes(), &Machine::ALL) {
        Ok(checked) => checked,
        Err(refusal) => {
            eprintln!("cvm-init: check-config: {refusal}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for (machine, outcome) in &checked.machines {
        if let Err(refusal) = outcome {
            let required = args.on.contains(machine);
            failed |= required;
            eprintln!(
                "cvm-init: check-config: {} {} ({}): {refusal}",
                if required {
                    "refused on"
                } else {
                    "would not boot on"
                },
                machine.name(),
                machine.describe()
            );
        }
    }
    if checked.machines.iter().all(|(_, outcome)| outcome.is_err()) {
        eprintln!(
            "cvm-init: check-config: {} boots on no kind of machine",
            path.display()
        );
        failed = true;
    }
    if failed {
        return ExitCode::FAILURE;
    }
    if args.json {
        match serde_json::to_string_pretty(&checked.config) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("cvm-init: check-config: cannot print the configuration as JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        println!("{}: ok: {}", path.display(), checked.summary());
    }
    ExitCode::SUCCESS
}
