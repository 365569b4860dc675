//! `cvm-image`: the image tooling `scripts/image.sh` runs.

use std::path::Path;
use std::process::ExitCode;

use cvm_image::initramfs::{self, InitramfsSpec, Kernel};

const USAGE: &str = "usage: cvm-image initramfs <kernel dir> <cvm-init> <out.cpio>";

const HELP: &str = "cvm-image: builds the parts of a cvm-init node image

usage:
  cvm-image initramfs <kernel dir> <cvm-init> <out.cpio>
      the production initramfs: cvm-init as /init and the modules it loads, taken from an
      unpacked kernel (vmlinuz, modules/ with modules.dep and modules.alias, ready with the
      release), written as one zstd frame; the same inputs give the same bytes
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
