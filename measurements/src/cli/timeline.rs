//! `cvm-measure timeline`.

use std::path::PathBuf;

use super::{chain, read, work, Failure};

/// Draw one boot as an SVG from its serial console: firmware, kernel, each cvm-init phase and
/// each service until ready, on one time axis
///
/// The log is the harness's timed copy of the console (`serial.timed.log`: `<seconds since
/// QEMU start> <line>` per line) or a plain console log whose cvm-init lines carry the kernel's
/// timestamps (a boot with `loglevel=7`). A malformed log is refused with the line it fails at.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The console log
    #[arg(value_name = "LOG")]
    log: PathBuf,
    /// Where to write the SVG (default: standard output)
    #[arg(short, long, value_name = "OUT.svg")]
    output: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let bytes = read(&args.log, "the console log")?;
    let caption = args
        .log
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let svg = cvm_measure::timeline::svg_from_log(&bytes, &caption)
        .map_err(|e| work(format!("{}: {}", args.log.display(), chain(&e))))?;
    match args.output {
        Some(path) => std::fs::write(&path, svg)
            .map_err(|e| work(format!("cannot write {}: {e}", path.display()))),
        None => {
            use std::io::Write;
            std::io::stdout()
                .write_all(svg.as_bytes())
                .map_err(|e| work(format!("cannot write the SVG to standard output: {e}")))
        }
    }
}
