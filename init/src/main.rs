//! The PID 1 binary. Run as anything but PID 1 it only answers `--version` and `--help`.

use std::process::ExitCode;

const HELP: &str = "\
cvm-init: PID 1 of a confidential Kubernetes node.

It runs only as the first process of a machine (from the initramfs of a measured UKI) and
takes its configuration from the kernel command line (cvm.* options) and from
/etc/cvm-init/config.toml inside the measured image.

Usage:
  cvm-init --version   print the version
  cvm-init --help      print this text

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
                "cvm-init: unknown arguments {args:?}: expected --version or --help \
                 (as a normal process it does nothing else)"
            );
            ExitCode::from(2)
        }
    }
}
