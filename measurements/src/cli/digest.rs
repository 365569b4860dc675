//! `cvm-measure digest`.

use std::path::PathBuf;

use super::{chain, work, Failure};

/// Print the SHA-256 of each file (the digest workload events carry)
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The files to hash
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

pub fn run(args: Args) -> Result<(), Failure> {
    for file in &args.files {
        let d = cvm_measure::sha256_file_mapped(file).map_err(|e| work(chain(&e)))?;
        println!("{}  {}", cvm_formats::hex(&d), file.display());
    }
    Ok(())
}
