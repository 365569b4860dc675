//! `cvm-measure launch`: QEMU arguments of a measured launch, and what this host lacks for it.

use std::path::{Path, PathBuf};

use super::{chain, work, Failure};

/// Measured direct-boot launches on SEV-SNP or TDX, from a launch description (TOML)
#[derive(Debug, clap::Args)]
#[command(arg_required_else_help = false)]
pub struct Args {
    #[command(subcommand)]
    command: Launch,
}

#[derive(Debug, clap::Subcommand)]
enum Launch {
    /// The QEMU arguments of the launch, one per line (the description `predict --launch`
    /// reads)
    Qemu {
        /// The launch description
        #[arg(value_name = "LAUNCH_TOML")]
        file: PathBuf,
    },
    /// What this host lacks to run the launch (KVM, SNP or TDX in KVM, the QEMU version);
    /// exit 1 naming each missing thing
    Check {
        /// The launch description
        #[arg(value_name = "LAUNCH_TOML")]
        file: PathBuf,
    },
}

impl Args {
    pub fn name(&self) -> &'static str {
        match self.command {
            Launch::Qemu { .. } => "qemu",
            Launch::Check { .. } => "check",
        }
    }
}

pub fn description(file: &Path) -> Result<cvm_measure::launch::Launch, Failure> {
    cvm_measure::launch::Launch::from_file(file).map_err(|e| work(chain(&e)))
}

pub fn run(args: Args) -> Result<(), Failure> {
    match args.command {
        Launch::Qemu { file } => {
            for arg in description(&file)?.qemu_args() {
                println!("{arg}");
            }
            Ok(())
        }
        Launch::Check { file } => {
            let launch = description(&file)?;
            let missing = cvm_measure::launch::missing_on_this_host(launch.tee);
            if missing.is_empty() {
                println!(
                    "this host can run the {} launch of {}",
                    launch.tee.name(),
                    file.display()
                );
                return Ok(());
            }
            Err(work(format!(
                "this host cannot run the {} launch of {}; missing: {}",
                launch.tee.name(),
                file.display(),
                missing.join("; ")
            )))
        }
    }
}
