//! The `cvm-measure` command line.

use std::path::Path;
use std::process::ExitCode;

const USAGE: &str = "\
usage: cvm-measure <command>

commands:
  digest <file>...   print the SHA-256 of each file (the digest workload events carry)
  --version          print the version
  --help             print this text
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version") => {
            println!("cvm-measure {}", cvm_measure::VERSION);
            ExitCode::SUCCESS
        }
        Some("--help") => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("digest") if args.len() > 1 => {
            for file in &args[1..] {
                match cvm_measure::sha256_file(Path::new(file)) {
                    Ok(d) => println!("{}  {file}", cvm_measure::hex(&d)),
                    Err(e) => {
                        let mut text = e.to_string();
                        let mut source = std::error::Error::source(&e);
                        while let Some(s) = source {
                            text.push_str(&format!(": {s}"));
                            source = s.source();
                        }
                        eprintln!("cvm-measure: {text}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Some("digest") => {
            eprintln!("cvm-measure: digest needs at least one file\n{USAGE}");
            ExitCode::from(2)
        }
        Some(other) => {
            eprintln!("cvm-measure: unknown command {other:?}: expected digest, --version or --help\n{USAGE}");
            ExitCode::from(2)
        }
        None => {
            eprintln!("cvm-measure: a command is needed\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
