//! The `cvm-measure` command line: clap (derive) for parsing, help, completions and the man
//! page; one module per subcommand. Usage errors (exit 2) are one line and a hint; a failure
//! of the work (exit 1) is one line naming the input.

use std::path::Path;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod assets;
mod digest;
mod evidence;
mod kbs_serve;
mod launch;
mod output;
mod predict;
mod replay;
mod sign_pcr_policy;
mod snp;
mod tdx;
mod timeline;
mod verify;
mod verity;

/// Predicts and verifies the measurements of a cvm-init node.
#[derive(Debug, Parser)]
#[command(
    name = "cvm-measure",
    version = cvm_measure::VERSION,
    about = "Predicts and verifies the measurements of a cvm-init node",
    long_about = "Predicts and verifies the measurements of a cvm-init node: the registers a \
                  node reaches (PCR 11, PCR 15, RTMRs), the SEV-SNP launch digest and the TDX \
                  MRTD of a launch, the replay of event logs, the offline verification of SNP \
                  reports and TDX quotes, and a reference key broker.\n\n\
                  Exit status: 0 on success, 1 when the work fails (the message names the \
                  input), 2 on a usage error.",
    propagate_version = true,
    arg_required_else_help = false
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Digest(digest::Args),
    Verity(verity::Args),
    Predict(predict::Args),
    Replay(replay::Args),
    SignPcrPolicy(sign_pcr_policy::Args),
    Evidence(evidence::Args),
    Snp(snp::Args),
    Tdx(tdx::Args),
    Timeline(timeline::Args),
    Launch(launch::Args),
    Verify(verify::Args),
    KbsServe(kbs_serve::Args),
    #[command(hide = true)]
    GenerateAssets(assets::Args),
}

impl Command {
    /// The words that name the subcommand, for the hint after a usage error.
    fn path(&self) -> String {
        let sub = match self {
            Command::Digest(_) => "digest",
            Command::Verity(_) => "verity format",
            Command::Predict(_) => "predict",
            Command::Replay(_) => "replay",
            Command::SignPcrPolicy(_) => "sign-pcr-policy",
            Command::Evidence(_) => "evidence",
            Command::Snp(_) => "snp",
            Command::Tdx(_) => "tdx",
            Command::Timeline(_) => "timeline",
            Command::Launch(a) => return format!("launch {}", a.name()),
            Command::Verify(a) => return format!("verify {}", a.name()),
            Command::KbsServe(_) => "kbs-serve",
            Command::GenerateAssets(_) => "generate-assets",
        };
        sub.to_string()
    }

    fn run(self) -> Result<(), Failure> {
        match self {
            Command::Digest(a) => digest::run(a),
            Command::Verity(a) => verity::run(a),
            Command::Predict(a) => predict::run(a),
            Command::Replay(a) => replay::run(a),
            Command::SignPcrPolicy(a) => sign_pcr_policy::run(a),
            Command::Evidence(a) => evidence::run(a),
            Command::Snp(a) => snp::run(a),
            Command::Tdx(a) => tdx::run(a),
            Command::Timeline(a) => timeline::run(a),
            Command::Launch(a) => launch::run(a),
            Command::Verify(a) => verify::run(a),
            Command::KbsServe(a) => kbs_serve::run(a),
            Command::GenerateAssets(a) => assets::run(a),
        }
    }
}

/// The clap definition, for the man pages and completions.
pub fn command() -> clap::Command {
    Cli::command()
}

/// Why a command failed: a usage error (exit 2, with a hint) or a failure of the work (exit 1).
#[derive(Debug)]
pub enum Failure {
    Usage(String),
    Work(String),
}

fn usage(message: impl Into<String>) -> Failure {
    Failure::Usage(message.into())
}

fn work(message: impl Into<String>) -> Failure {
    Failure::Work(message.into())
}

/// The error and its sources, on one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// The only place that prints a failure.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    let path = cli.command.path();
    match cli.command.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Work(message)) => {
            eprintln!("cvm-measure: {}", one_line(&message));
            ExitCode::from(1)
        }
        Err(Failure::Usage(message)) => {
            eprintln!("cvm-measure {path}: {}", one_line(&message));
            eprintln!("For more information, try 'cvm-measure {path} --help'.");
            ExitCode::from(2)
        }
    }
}

fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Help and version go to stdout (exit 0); a usage error is its first line, clap's tip if it
/// has one, and the hint (exit 2), never the whole manual.
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let text = e.render().to_string();
    let mut lines = text.lines();
    let mut first = lines
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string();
    let rest: Vec<&str> = lines.collect();
    // "the following required arguments were not provided:" lists them on the next lines.
    if first.ends_with(':') {
        let listed: Vec<&str> = rest
            .iter()
            .take_while(|l| !l.trim().is_empty())
            .map(|l| l.trim())
            .collect();
        first = format!("{} {}", first, listed.join(", "));
    }
    let tip = rest
        .iter()
        .find_map(|l| l.trim().strip_prefix("tip: "))
        .map(|t| format!(" ({t})"))
        .unwrap_or_default();
    let hint = rest
        .iter()
        .rev()
        .find(|l| l.starts_with("For more information"))
        .copied()
        .unwrap_or("For more information, try '--help'.");
    eprintln!("cvm-measure: {first}{tip}");
    eprintln!("{hint}");
    ExitCode::from(2)
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| work(format!("cannot read {what} {}: {e}", path.display())))
}

/// A report or quote file: raw bytes, or hex text.
fn read_evidence_file(path: &Path) -> Result<Vec<u8>, Failure> {
    let bytes = read(path, "the evidence")?;
    let text = String::from_utf8_lossy(&bytes);
    let digits: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if !digits.is_empty() && digits.len() % 2 == 0 && digits.chars().all(|c| c.is_ascii_hexdigit())
    {
        if let Some(raw) = cvm_formats::verity::parse_hex(&digits) {
            return Ok(raw);
        }
    }
    Ok(bytes)
}

/// An expected value of at most `len` bytes in hex, zero-padded to `len`.
fn expected_hex(name: &str, value: Option<&str>, len: usize) -> Result<Option<Vec<u8>>, Failure> {
    match value {
        None => Ok(None),
        Some(v) => cvm_formats::verity::parse_hex(v)
            .filter(|b| b.len() <= len)
            .map(|mut b| {
                b.resize(len, 0);
                Some(b)
            })
            .ok_or_else(|| {
                usage(format!(
                    "{name} {v:?}: expected at most {} hex digits",
                    2 * len
                ))
            }),
    }
}

/// An ASK then its ARK, PEM, as AMD publishes them (`ask_ark_<product>.pem`).
fn snp_chain(flag: &str, path: &Path) -> Result<cvm_measure::snp::TrustedChain, Failure> {
    let text = String::from_utf8_lossy(&read(path, "the SNP certificate chain")?).into_owned();
    let path = path.display();
    let blocks: Vec<&str> = text
        .split_inclusive("-----END CERTIFICATE-----")
        .map(str::trim_start)
        .filter(|b| b.starts_with("-----BEGIN CERTIFICATE-----"))
        .collect();
    let [ask, ark] = blocks[..] else {
        return Err(work(format!(
            "{flag} {path}: expected two PEM certificates (the ASK, then the ARK), found {}",
            blocks.len()
        )));
    };
    let cert = |pem: &str, what: &str| {
        cvm_measure::snp::certificate(pem.as_bytes())
            .map_err(|e| work(format!("{flag} {path}: the {what}: {e}")))
    };
    Ok(cvm_measure::snp::TrustedChain {
        ask: cert(ask, "ASK")?,
        ark: cert(ark, "ARK")?,
    })
}

/// Pretty JSON on stdout.
fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("a JSON value serialises")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definition_is_consistent() {
        command().debug_assert();
    }
}
