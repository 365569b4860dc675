//! `cvm-measure kbs-serve`: the reference key broker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cvm_measure::broker::{serve_with, Broker, Limits, Reference};

use super::{chain, read, snp_chain, usage, work, Failure};

/// The reference key broker (Trustee KBS protocol 0.4.0; HTTPS with the certificate chain and
/// key given, else plain HTTP)
///
/// Resources are files DIR/<repository>/<type>/<tag>, released as JWE to a node whose vTPM
/// quote (by an attestation key in the same TPM as an EK whose certificate chains to the CAs
/// of --ek-ca, proven by credential activation; with --attestation-keys, also one of those
/// keys) covers the PCR values of the reference FILE (`predict --at key-release --json`), or
/// whose SNP report chains to AMD's roots (or an ASK+ARK of --snp-chain), carries one of the
/// reference's snp_measurements and passes the checks of verify snp-report, or whose TDX
/// quote chains to the Intel root (or a --tdx-root), carries one of tdx_mrtds, the tdx_rtmrs
/// values, and logs replaying to its RTMRs with cvm-init's part equal to tdx_init_rtmr2.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The address to listen on
    #[arg(long, value_name = "ADDR:PORT")]
    listen: String,
    /// The resources, as DIR/<repository>/<type>/<tag>
    #[arg(long, value_name = "DIR")]
    resources: PathBuf,
    /// The reference values (JSON, as predict, snp and tdx print them)
    #[arg(long, value_name = "FILE")]
    reference: PathBuf,
    /// CA certificates (PEM) that vTPM EK certificates must chain to
    #[arg(long, value_name = "PEM")]
    ek_ca: Option<PathBuf>,
    /// The only attestation keys allowed (128 hex digits a line: x then y of a P-256 key)
    #[arg(long, value_name = "FILE")]
    attestation_keys: Option<PathBuf>,
    /// An ASK then its ARK (PEM), trusted beside AMD's built-in roots
    #[arg(long, value_name = "PEM")]
    snp_chain: Option<PathBuf>,
    /// A root certificate (PEM) trusted beside Intel's for TDX PCK chains, for tests and
    /// offline stores (repeatable; a file may hold several)
    #[arg(long, value_name = "PEM")]
    tdx_root: Vec<PathBuf>,
    /// The TLS certificate chain (PEM), with --tls-key
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM), with --tls-cert
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Sessions held at once (attestations in progress or done); more are refused with 503
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_sessions as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_sessions: u32,
    /// Seconds a session lives after its challenge
    #[arg(long, value_name = "SECONDS", default_value_t = Limits::default().session_age.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    session_age: u64,
    /// Connections served at once; more are closed at accept
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_connections as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Seconds from accept to the answer written, however slowly the peer sends
    #[arg(long, value_name = "SECONDS", default_value_t = Limits::default().connection_age.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    connection_age: u64,
}

/// What the broker is given: its reference values and limits.
fn configure(args: &Args) -> Result<(Reference, Limits), Failure> {
    let json: serde_json::Value =
        serde_json::from_slice(&read(&args.reference, "the reference values")?)
            .map_err(|e| work(format!("{}: {e}", args.reference.display())))?;
    let mut reference = Reference::from_prediction(&json)
        .map_err(|e| work(format!("{}: {e}", args.reference.display())))?;
    if let Some(path) = &args.snp_chain {
        reference.snp_chains.push(snp_chain("--snp-chain", path)?);
    }
    if let Some(path) = &args.ek_ca {
        reference
            .ek_cas
            .extend(pem_certificates("--ek-ca", path, "the EK CA certificates")?);
    }
    for path in &args.tdx_root {
        reference.tdx_trust.extra_roots.extend(pem_certificates(
            "--tdx-root",
            path,
            "the TDX root",
        )?);
    }
    if let Some(path) = &args.attestation_keys {
        let keys = String::from_utf8_lossy(&read(path, "the attestation keys")?).into_owned();
        for (n, line) in keys.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let point = cvm_formats::verity::parse_hex(line)
                .filter(|p| p.len() == 64)
                .ok_or_else(|| {
                    work(format!(
                        "{}:{}: expected 128 hex digits (x then y of a P-256 attestation key)",
                        path.display(),
                        n + 1
                    ))
                })?;
            reference
                .attestation_keys
                .push((point[..32].to_vec(), point[32..].to_vec()));
        }
    }
    let limits = Limits {
        max_sessions: args.max_sessions as usize,
        session_age: Duration::from_secs(args.session_age),
        max_connections: args.max_connections as usize,
        connection_age: Duration::from_secs(args.connection_age),
    };
    Ok((reference, limits))
}

/// The certificates (DER) of a PEM file; at least one.
fn pem_certificates(flag: &str, path: &Path, what: &str) -> Result<Vec<Vec<u8>>, Failure> {
    let certs = cvm_measure::x509::pem_chain(&read(path, what)?)
        .map_err(|e| work(format!("{flag} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(work(format!("{flag} {}: no certificate", path.display())));
    }
    Ok(certs.iter().map(|c| c.der().to_vec()).collect())
}

pub fn run(args: Args) -> Result<(), Failure> {
    if !args.resources.is_dir() {
        return Err(work(format!(
            "--resources {}: not a directory",
            args.resources.display()
        )));
    }
    let (reference, limits) = configure(&args)?;
    let listen = &args.listen;
    let listener = std::net::TcpListener::bind(listen)
        .map_err(|e| work(format!("cannot listen on {listen}: {e}")))?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            cvm_kbs::tls::server_config(
                &read(cert, "the TLS certificate chain")?,
                &read(key, "the TLS private key")?,
            )
            .map_err(|e| {
                work(format!(
                    "--tls-cert {} --tls-key {}: {}",
                    cert.display(),
                    key.display(),
                    chain(&e)
                ))
            })?,
        ),
        (None, None) => None,
        _ => return Err(usage("--tls-cert and --tls-key go together")),
    };
    eprintln!(
        "cvm-measure kbs-serve: listening on {listen} ({}); {} reference PCRs, {} EK CA certificates, {} attestation keys, {} SNP launch digests, {} extra TDX roots, at most {} sessions of {} s and {} connections of {} s, resources in {}",
        if tls.is_some() { "https" } else { "plain http" },
        reference.pcrs.len(),
        reference.ek_cas.len(),
        reference.attestation_keys.len(),
        reference.snp_measurements.len(),
        reference.tdx_trust.extra_roots.len(),
        limits.max_sessions,
        limits.session_age.as_secs(),
        limits.max_connections,
        limits.connection_age.as_secs(),
        args.resources.display()
    );
    serve_with(
        listener,
        std::sync::Arc::new(Broker::new(args.resources.clone(), reference).with_limits(limits)),
        tls,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: Args,
    }

    fn testdata(path: &str) -> String {
        format!("{}/../testdata/{path}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn limits_and_tdx_roots_reach_the_broker() {
        let dir = tempfile::tempdir().unwrap();
        let reference = dir.path().join("reference.json");
        std::fs::write(
            &reference,
            format!(
                r#"{{"pcr": {{"11": {{"sha256": "{}"}}}}}}"#,
                "00".repeat(32)
            ),
        )
        .unwrap();
        let reference = reference.to_str().unwrap();
        let base = [
            "kbs-serve",
            "--listen",
            "127.0.0.1:0",
            "--resources",
            "/",
            "--reference",
            reference,
        ];
        let parse = |extra: &[&str]| {
            Wrapper::try_parse_from(base.iter().chain(extra)).map(|w| configure(&w.args))
        };
        // Defaults unchanged.
        let (r, limits) = parse(&[]).unwrap().unwrap();
        assert_eq!(limits, Limits::default());
        assert!(r.tdx_trust.extra_roots.is_empty());
        let (r, limits) = parse(&[
            "--max-sessions",
            "3",
            "--session-age=7",
            "--max-connections",
            "2",
            "--connection-age",
            "5",
            "--tdx-root",
            &testdata("snp/ask_ark_milan.pem"),
            "--tdx-root",
            &testdata("snp/gsg_vcek.pem"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            limits,
            Limits {
                max_sessions: 3,
                session_age: Duration::from_secs(7),
                max_connections: 2,
                connection_age: Duration::from_secs(5),
            }
        );
        // Two certificates in the first file, one in the second, in order.
        let ask_ark = cvm_measure::x509::pem_chain(
            &std::fs::read(testdata("snp/ask_ark_milan.pem")).unwrap(),
        )
        .unwrap();
        assert_eq!(r.tdx_trust.extra_roots.len(), 3);
        assert_eq!(r.tdx_trust.extra_roots[0], ask_ark[0].der());
        // Zero and nonsense are usage errors; a file without a certificate is named.
        assert!(parse(&["--max-sessions", "0"]).is_err());
        assert!(parse(&["--session-age", "forever"]).is_err());
        let Err(Failure::Work(why)) = parse(&["--tdx-root", reference]).unwrap() else {
            panic!("a JSON file taken as a PEM root");
        };
        assert!(
            why.contains("--tdx-root") && why.contains("reference.json"),
            "{why}"
        );
    }
}
