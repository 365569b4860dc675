//! `cvm-measure verify`: SNP reports and TDX quotes offline, with the checks the broker makes.

use cvm_measure::snp::VerifyReport;
use cvm_measure::tdx::VerifyQuote;
use std::path::PathBuf;

use cvm_formats::verity::parse_hex;

use super::{expected_hex, read, read_evidence_file, snp_chain, usage, work, Failure};

/// Verify evidence offline; print its claims as JSON, or exit 1 naming the failed check
#[derive(Debug, clap::Args)]
#[command(arg_required_else_help = false)]
pub struct Args {
    #[command(subcommand)]
    command: Verify,
}

#[derive(Debug, clap::Subcommand)]
enum Verify {
    SnpReport(SnpReport),
    TdxQuote(TdxQuote),
}

impl Args {
    pub fn name(&self) -> &'static str {
        match self.command {
            Verify::SnpReport(_) => "snp-report",
            Verify::TdxQuote(_) => "tdx-quote",
        }
    }
}

/// An SNP report (raw or hex): its signature with the VCEK/VLEK, the certificate up to AMD's
/// built-in roots (or the ASK+ARK of --chain), and the checks kbs-serve makes
///
/// VMPL 0, no debugging and no migration agent unless allowed, SMT and the ABI as required,
/// the reported and launch TCB at least the minimum (required unless waived) and the
/// reported TCB not below the committed one; prints the claims (policy and TCB decoded).
#[derive(Debug, clap::Args)]
struct SnpReport {
    /// The report (raw bytes or hex text)
    report: PathBuf,
    /// The VCEK or VLEK certificate (DER or PEM)
    #[arg(long, value_name = "CERT")]
    vcek: PathBuf,
    /// An ASK then its ARK (PEM), trusted beside AMD's built-in roots
    #[arg(long, value_name = "PEM")]
    chain: Option<PathBuf>,
    /// An accepted launch digest (repeatable: any of them)
    #[arg(long, value_name = "HEX")]
    measurement: Vec<String>,
    /// The expected report data (at most 128 hex digits, zero-padded)
    #[arg(long, value_name = "HEX")]
    report_data: Option<String>,
    /// The expected host data (at most 64 hex digits, zero-padded)
    #[arg(long, value_name = "HEX")]
    host_data: Option<String>,
    /// The minimum TCB, as bootloader=N,tee=N,snp=N,microcode=N
    #[arg(long, value_name = "TCB", conflicts_with = "waive_min_tcb")]
    min_tcb: Option<String>,
    /// Accept any TCB (one of --min-tcb or this is required)
    #[arg(long)]
    waive_min_tcb: bool,
    /// Accept a guest policy that allows debugging
    #[arg(long)]
    allow_debug: bool,
    /// Accept a guest policy that allows a migration agent
    #[arg(long)]
    allow_migration_agent: bool,
    /// Refuse a guest policy that allows SMT
    #[arg(long)]
    no_smt: bool,
    /// The minimum ABI the policy requires, as MAJOR.MINOR
    #[arg(long, value_name = "MAJOR.MINOR")]
    min_abi: Option<String>,
}

/// A TDX quote (v4/v5): its signature chain as far as the quote allows (to the Intel SGX
/// Root CA), Intel's TD quoting enclave, the TD's attributes and the expectations
///
/// TCB status and revocation need Intel's collateral and are reported as not checked. The TD
/// must not be debuggable; without --td-attributes it must also have SEPT_VE_DISABLE set and
/// not be migratable (as kbs-serve requires); RTMRs are checked against the CC event log.
#[derive(Debug, clap::Args)]
struct TdxQuote {
    /// The quote (raw bytes or hex text)
    quote: PathBuf,
    /// An accepted MRTD (repeatable: any of them)
    #[arg(long, value_name = "HEX")]
    mrtd: Vec<String>,
    /// The expected report data (at most 128 hex digits, zero-padded)
    #[arg(long, value_name = "HEX")]
    report_data: Option<String>,
    /// The CC event log the RTMRs must replay from
    #[arg(long, value_name = "LOG")]
    ccel: Option<PathBuf>,
    /// The exact TD attributes, as a hexadecimal number (e.g. 0x10000000)
    #[arg(long, value_name = "HEX")]
    td_attributes: Option<String>,
    /// The exact XFAM, as a hexadecimal number
    #[arg(long, value_name = "HEX")]
    xfam: Option<String>,
    /// The exact MRCONFIGID (96 hex digits)
    #[arg(long, value_name = "HEX")]
    mrconfigid: Option<String>,
    /// The exact MROWNER (96 hex digits)
    #[arg(long, value_name = "HEX")]
    mrowner: Option<String>,
    /// The exact MROWNERCONFIG (96 hex digits)
    #[arg(long, value_name = "HEX")]
    mrownerconfig: Option<String>,
    /// The lowest ISVSVN of the quoting enclave accepted
    #[arg(long, value_name = "N", default_value_t = cvm_measure::tdx::INTEL_TD_QE_MIN_ISVSVN)]
    qe_min_isvsvn: u16,
}

pub fn run(args: Args) -> Result<(), Failure> {
    match args.command {
        Verify::SnpReport(a) => snp_report(a),
        Verify::TdxQuote(a) => tdx_quote(a),
    }
}

fn snp_report(a: SnpReport) -> Result<(), Failure> {
    use cvm_measure::snp;
    let path = a.report.display().to_string();
    let refuse = |why: String| work(format!("{path}: {why}"));
    let report =
        snp::Report::parse(&read_evidence_file(&a.report)?).map_err(|e| refuse(e.to_string()))?;
    let vcek_path = a.vcek.display();
    let vcek = snp::certificate(&read(&a.vcek, "the endorsement key certificate")?)
        .map_err(|e| work(format!("{vcek_path}: {e}")))?;
    let extra = match &a.chain {
        Some(p) => vec![snp_chain("--chain", p)?],
        None => Vec::new(),
    };
    let product =
        snp::verify_chain_with(&vcek, &extra).map_err(|e| work(format!("{vcek_path}: {e}")))?;
    report
        .verify_signature(&vcek)
        .map_err(|e| refuse(e.to_string()))?;
    let min_tcb = match (&a.min_tcb, a.waive_min_tcb) {
        (Some(min), _) => snp::MinimumTcb::At(
            snp::Tcb::parse_minimum(min).map_err(|e| usage(format!("--min-tcb {min:?}: {e}")))?,
        ),
        (None, true) => snp::MinimumTcb::Waived,
        (None, false) => snp::MinimumTcb::Missing,
    };
    let min_abi = match &a.min_abi {
        None => (0, 0),
        Some(v) => v
            .split_once('.')
            .and_then(|(x, y)| Some((x.parse().ok()?, y.parse().ok()?)))
            .ok_or_else(|| usage(format!("--min-abi {v:?}: expected MAJOR.MINOR")))?,
    };
    let required = snp::Requirements {
        min_tcb,
        allow_debug: a.allow_debug,
        allow_migration_agent: a.allow_migration_agent,
        allow_smt: !a.no_smt,
        min_abi,
    };
    snp::check_requirements(&report, product, &required).map_err(|r| {
        refuse(match r.check {
            "min_tcb" => format!("{r} (--min-tcb or --waive-min-tcb)"),
            _ => r.to_string(),
        })
    })?;
    if !a.measurement.is_empty()
        && !a
            .measurement
            .iter()
            .any(|m| parse_hex(m).as_deref() == Some(report.measurement()))
    {
        return Err(refuse(format!(
            "measurement {} is none of the {} expected",
            cvm_formats::hex(report.measurement()),
            a.measurement.len()
        )));
    }
    if let Some(data) = expected_hex("--report-data", a.report_data.as_deref(), 64)? {
        if data != report.report_data() {
            return Err(refuse("the report data is not the expected one".into()));
        }
    }
    if let Some(data) = expected_hex("--host-data", a.host_data.as_deref(), 32)? {
        if data != report.host_data() {
            return Err(refuse("the host data is not the expected one".into()));
        }
    }
    let mut claims = report.claims(product);
    claims["verified"] = serde_json::json!({
        "signature": true,
        "chain": format!("{product} (AMD root{})", if product == "configured" { " given by --chain" } else { ", built in" }),
    });
    super::print_json(&claims);
    Ok(())
}

/// A hexadecimal number (`0x` optional).
fn hex_u64(flag: &str, v: Option<&str>) -> Result<Option<u64>, Failure> {
    v.map(|v| {
        u64::from_str_radix(v.trim_start_matches("0x"), 16).map_err(|_| {
            usage(format!(
                "{flag} {v:?}: expected a hexadecimal number such as 0x10000000"
            ))
        })
    })
    .transpose()
}

/// A 48-byte register in exactly 96 hex digits.
fn register48(flag: &str, v: Option<&str>) -> Result<Option<[u8; 48]>, Failure> {
    v.map(|v| {
        parse_hex(v)
            .and_then(|b| <[u8; 48]>::try_from(b).ok())
            .ok_or_else(|| usage(format!("{flag} {v:?}: expected 96 hex digits")))
    })
    .transpose()
}

fn tdx_quote(a: TdxQuote) -> Result<(), Failure> {
    use cvm_measure::tdx::{
        appraise_td, QeIdentity, Quote, SignatureChecked, TdRequirements, Trust,
    };
    let required = TdRequirements {
        td_attributes: hex_u64("--td-attributes", a.td_attributes.as_deref())?,
        xfam: hex_u64("--xfam", a.xfam.as_deref())?,
        mrconfigid: register48("--mrconfigid", a.mrconfigid.as_deref())?,
        mrowner: register48("--mrowner", a.mrowner.as_deref())?,
        mrownerconfig: register48("--mrownerconfig", a.mrownerconfig.as_deref())?,
    };
    let trust = Trust {
        extra_roots: Vec::new(),
        qe: QeIdentity {
            min_isvsvn: a.qe_min_isvsvn,
            ..QeIdentity::default()
        },
    };
    let path = a.quote.display().to_string();
    let refuse = |why: String| work(format!("{path}: {why}"));
    let quote = Quote::parse(&read_evidence_file(&a.quote)?).map_err(|e| refuse(e.to_string()))?;
    let checked = quote
        .verify_signature_with(&trust)
        .map_err(|e| refuse(e.to_string()))?;
    appraise_td(&quote.td, &required).map_err(|e| refuse(e.to_string()))?;
    if !a.mrtd.is_empty()
        && !a
            .mrtd
            .iter()
            .any(|m| parse_hex(m).as_deref() == Some(&quote.td.mrtd[..]))
    {
        return Err(refuse(format!(
            "MRTD {} is none of the {} expected",
            cvm_formats::hex(&quote.td.mrtd),
            a.mrtd.len()
        )));
    }
    if let Some(data) = expected_hex("--report-data", a.report_data.as_deref(), 64)? {
        if data[..] != quote.td.report_data {
            return Err(refuse("the report data is not the expected one".into()));
        }
    }
    let ccel = match &a.ccel {
        None => serde_json::Value::Null,
        Some(log_path) => {
            let shown = log_path.display();
            let log = cvm_measure::uefi::tcglog::parse(&read(log_path, "the CC event log")?)
                .map_err(|e| work(format!("{shown}: {e}")))?;
            let replayed = log
                .replay_ccel()
                .map_err(|e| work(format!("{shown}: {e}")))?;
            for i in 0..4 {
                if replayed.rtmr[i][..] != quote.td.rtmr[i] {
                    return Err(refuse(format!("RTMR {i} is not what {shown} replays to")));
                }
            }
            serde_json::json!("all four RTMRs equal its replay")
        }
    };
    let td = &quote.td;
    let hex = cvm_formats::hex;
    super::print_json(&serde_json::json!({
        "version": quote.version,
        "body": if quote.body_type == 3 { "TD 1.5" } else { "TD 1.0" },
        "mrtd": hex(&td.mrtd),
        "rtmr": td.rtmr.iter().map(|r| hex(r)).collect::<Vec<_>>(),
        "mrconfigid": hex(&td.mrconfigid),
        "mrowner": hex(&td.mrowner),
        "mrownerconfig": hex(&td.mrownerconfig),
        "report_data": hex(&td.report_data),
        "td_attributes": format!("{:#x}", td.td_attributes),
        "xfam": format!("{:#x}", td.xfam),
        "tee_tcb_svn": hex(&quote.tee_tcb_svn()),
        "verified": {
            "signature_chain": format!("attestation key, QE report, PCK certificate ({}), Intel SGX Root CA", checked.pck_subject),
            "quoting_enclave": format!("Intel's TD QE, ISVSVN at least {}", a.qe_min_isvsvn),
            "td": "no debug; attributes, XFAM and configuration registers as required",
            "not_checked": SignatureChecked::NOT_CHECKED,
            "ccel": ccel,
        },
    }));
    Ok(())
}
