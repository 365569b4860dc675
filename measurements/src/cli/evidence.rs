//! `cvm-measure evidence`: an SNP report or a TDX quote, parsed strictly and shown.

use cvm_measure::snp::VerifyReport;
use std::path::PathBuf;

use super::{chain, read, usage, work, Failure};

/// Parse an SEV-SNP report (raw or hex) or a TDX quote strictly and print what a verifier
/// compares
///
/// With --vcek, check the report's signature and the certificate up to AMD's built-in roots;
/// with --ccel, check the quote's RTMRs against the replay of that CC event log. TDX quote
/// signatures need Intel's collateral and are not checked here (see verify tdx-quote).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The report or quote (raw bytes or hex text)
    file: PathBuf,
    /// The VCEK or VLEK certificate (DER or PEM) of an SNP report
    #[arg(long, value_name = "CERT")]
    vcek: Option<PathBuf>,
    /// The CC event log of a TDX quote
    #[arg(long, value_name = "LOG")]
    ccel: Option<PathBuf>,
}

/// Raw bytes, or the bytes a file of hex digits (and whitespace) spells.
fn raw_or_hex(bytes: Vec<u8>) -> Vec<u8> {
    let text = match std::str::from_utf8(&bytes) {
        Ok(t)
            if t.chars()
                .all(|c| c.is_ascii_hexdigit() || c.is_ascii_whitespace()) =>
        {
            t
        }
        _ => return bytes,
    };
    let digits: String = text.chars().filter(char::is_ascii_hexdigit).collect();
    cvm_formats::verity::parse_hex(&digits).unwrap_or(bytes)
}

pub fn run(args: Args) -> Result<(), Failure> {
    use cvm_formats::hex;
    let bytes = raw_or_hex(read(&args.file, "the evidence")?);
    let path = args.file.display();
    let fail = |e: &dyn std::error::Error| work(format!("{path}: {}", chain(e)));
    if bytes.len() == cvm_formats::snp::REPORT_LEN {
        let report = cvm_formats::snp::Report::parse(&bytes).map_err(|e| fail(&e))?;
        println!("SEV-SNP report version {}", report.version());
        println!("measurement  {}", hex(report.measurement()));
        println!("report_data  {}", hex(report.report_data()));
        println!("host_data    {}", hex(report.host_data()));
        println!(
            "policy       {:#x}{}",
            report.policy(),
            if report.debug_allowed() {
                " (DEBUG allowed)"
            } else {
                ""
            }
        );
        println!("vmpl         {}", report.vmpl());
        println!("reported_tcb {:#018x}", report.reported_tcb());
        println!("chip_id      {}", hex(report.chip_id()));
        if let Some(cert) = &args.vcek {
            let cert = cvm_measure::snp::certificate(&read(cert, "the certificate")?)
                .map_err(|e| fail(&e))?;
            report.verify_signature(&cert).map_err(|e| fail(&e))?;
            let product = cvm_measure::snp::verify_chain(&cert).map_err(|e| fail(&e))?;
            println!("signature    ok (endorsement key chains to the AMD {product} root)");
        } else {
            println!("signature    not checked (no --vcek)");
        }
        return Ok(());
    }
    if args.vcek.is_some() {
        return Err(usage(format!(
            "--vcek is for SEV-SNP reports ({} bytes); {path} is {} bytes",
            cvm_formats::snp::REPORT_LEN,
            bytes.len()
        )));
    }
    let quote = cvm_measure::tdx::Quote::parse(&bytes).map_err(|e| fail(&e))?;
    println!(
        "TDX quote version {} (TD {} body)",
        quote.version,
        if quote.body_type == 3 { "1.5" } else { "1.0" }
    );
    println!("mrtd         {}", hex(&quote.td.mrtd));
    for (i, rtmr) in quote.td.rtmr.iter().enumerate() {
        println!("rtmr{i}        {}", hex(rtmr));
    }
    println!("report_data  {}", hex(&quote.td.report_data));
    println!(
        "td_attributes {:#018x}{}",
        quote.td.td_attributes,
        if quote.td.debug() { " (DEBUG)" } else { "" }
    );
    println!("signature    not checked (needs Intel's PCK collateral)");
    if let Some(ccel) = &args.ccel {
        let log = cvm_measure::uefi::tcglog::parse(&read(ccel, "the CC event log")?)
            .map_err(|e| work(format!("{}: {e}", ccel.display())))?;
        let regs = log
            .replay_ccel()
            .map_err(|e| work(format!("{}: {e}", ccel.display())))?;
        for i in 0..4 {
            if regs.rtmr[i] != quote.td.rtmr[i] {
                return Err(work(format!(
                    "RTMR{i} of the quote is {} but the replay of {} gives {}",
                    hex(&quote.td.rtmr[i]),
                    ccel.display(),
                    hex(&regs.rtmr[i])
                )));
            }
        }
        println!("rtmrs        equal the replay of {}", ccel.display());
    }
    Ok(())
}
