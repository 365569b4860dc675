//! `cvm-image`: the image tooling `scripts/image.sh` runs.

use std::path::Path;
use std::process::ExitCode;

use cvm_image::initramfs::{self, InitramfsSpec, Kernel};

const USAGE: &str =
    "usage: cvm-image initramfs <kernel dir> <cvm-init> <out.cpio> | check-root <tree> [--report-only]";

const HELP: &str = "cvm-image: builds the parts of a cvm-init node image

usage:
  cvm-image initramfs <kernel dir> <cvm-init> <out.cpio>
      the production initramfs: cvm-init as /init and the modules it loads, taken from an
      unpacked kernel (vmlinuz, modules/ with modules.dep and modules.alias, ready with the
      release), written as one zstd frame; the same inputs give the same bytes
  cvm-image check-root <tree> [--report-only]
      what a root tree holds (regular files, their bytes, the ten largest) and whether it holds
      a shell, an interpreter, a package manager or a setuid/setgid file: each is named, and
      the exit status is 1 (0 with --report-only)
  cvm-image -h | --help
  cvm-image -V | --version";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["-h"] | ["--help"] | ["help"] => {
            println!("{HELP}");
            Ok(())
        }
        ["-V"] | ["--version"] => {
            println!("cvm-image {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        ["initramfs", kernel, init, out] => {
            build_initramfs(Path::new(kernel), Path::new(init), Path::new(out))
        }
        ["check-root", tree] => check_root(Path::new(tree), false),
        ["check-root", tree, "--report-only"] => check_root(Path::new(tree), true),
        _ => Err(format!("{USAGE} (cvm-image --help for more)")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cvm-image: {e}");
            ExitCode::FAILURE
        }
    }
}

fn build_initramfs(kernel: &Path, init: &Path, out: &Path) -> Result<(), String> {
    let kernel = Kernel::open(kernel).map_err(|e| {
        format!(
            "{}: not an unpacked kernel (vmlinuz, modules/, ready): {e}",
            kernel.display()
        )
    })?;
    let spec = InitramfsSpec {
        init: init.to_path_buf(),
        zstd: true,
        ..Default::default()
    };
    initramfs::build(&spec, &kernel, out).map_err(|e| cvm_init::logger::chain(&e))?;
    let size = std::fs::metadata(out)
        .map_err(|e| format!("{}: {e}", out.display()))?
        .len();
    println!(
        "initramfs {} ({size} bytes, kernel {})",
        out.display(),
        kernel.release
    );
    Ok(())
}

fn check_root(tree: &Path, report_only: bool) -> Result<(), String> {
    let report = cvm_image::root_check::check(tree).map_err(|e| cvm_init::logger::chain(&e))?;
    println!(
        "root {}: {} files, {} bytes uncompressed",
        tree.display(),
        report.files,
        report.bytes
    );
    for (path, bytes) in &report.largest {
        println!("  {bytes:>12}  {}", path.display());
    }
    for finding in &report.findings {
        println!("  not allowed in the root: {finding}");
    }
    match report.findings.len() {
        0 => {
            println!("root: no shell, interpreter, package manager or setuid/setgid file");
            Ok(())
        }
        n if report_only => {
            println!("root: {n} files that should not be there (reported only)");
            Ok(())
        }
        n => Err(format!(
            "{}: {n} files that must not be in the root (a shell, an interpreter, a package manager or a setuid/setgid file)",
            tree.display()
        )),
    }
}
