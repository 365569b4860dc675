//! `cvm-measure kbs-serve`: the reference key broker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cvm_measure::broker::set::{self, Named, Shared, Sources};
use cvm_measure::broker::{serve_with, Broker, Limits};

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
///
/// Several references may be loaded at once (the old and the new image during a rolling
/// upgrade): a node is released its resources when its evidence matches any one of them
/// whole. They are re-read on SIGHUP and when a file changes; a reload that fails keeps the
/// references loaded before.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The address to listen on
    #[arg(long, value_name = "ADDR:PORT")]
    listen: String,
    /// The resources, as DIR/<repository>/<type>/<tag>
    #[arg(long, value_name = "DIR")]
    resources: PathBuf,
    /// The reference values (JSON, as predict, snp and tdx print them), or a directory whose
    /// *.json files are each one (repeatable; each reference is named by its file's name)
    #[arg(long, value_name = "FILE|DIR", required = true)]
    reference: Vec<PathBuf>,
    /// Seconds between looks at the reference files (a changed one reloads them all)
    #[arg(long, value_name = "SECONDS", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    reload_every: u64,
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

/// What the broker is given: where its references come from (with what the flags add to
/// each), the references as they are now, and limits.
fn configure(args: &Args) -> Result<(Sources, Vec<Named>, set::Fingerprint, Limits), Failure> {
    let mut shared = Shared::default();
    if let Some(path) = &args.snp_chain {
        shared.snp_chains.push(snp_chain("--snp-chain", path)?);
    }
    if let Some(path) = &args.ek_ca {
        shared
            .ek_cas
            .extend(pem_certificates("--ek-ca", path, "the EK CA certificates")?);
    }
    for path in &args.tdx_root {
        shared
            .tdx_roots
            .extend(pem_certificates("--tdx-root", path, "the TDX root")?);
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
            shared
                .attestation_keys
                .push((point[..32].to_vec(), point[32..].to_vec()));
        }
    }
    let sources = Sources {
        paths: args.reference.clone(),
        shared,
    };
    let (references, fingerprint) = sources
        .load()
        .map_err(|e| work(format!("--reference {e}")))?;
    let limits = Limits {
        max_sessions: args.max_sessions as usize,
        session_age: Duration::from_secs(args.session_age),
        max_connections: args.max_connections as usize,
        connection_age: Duration::from_secs(args.connection_age),
    };
    Ok((sources, references, fingerprint, limits))
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
    // SIGHUP (a reload) is taken by one thread with sigwait: blocked here, before any thread
    // starts, so that every thread inherits the mask and none is killed by it.
    let mut hangup = nix::sys::signal::SigSet::empty();
    hangup.add(nix::sys::signal::Signal::SIGHUP);
    hangup
        .thread_block()
        .map_err(|e| work(format!("cannot block SIGHUP: {e}")))?;
    let (sources, references, fingerprint, limits) = configure(&args)?;
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
        "cvm-measure kbs-serve: listening on {listen} ({}); {} references, {} EK CA certificates, {} attestation keys, {} extra TDX roots, at most {} sessions of {} s and {} connections of {} s, resources in {}",
        if tls.is_some() { "https" } else { "plain http" },
        references.len(),
        sources.shared.ek_cas.len(),
        sources.shared.attestation_keys.len(),
        sources.shared.tdx_roots.len(),
        limits.max_sessions,
        limits.session_age.as_secs(),
        limits.max_connections,
        limits.connection_age.as_secs(),
        args.resources.display()
    );
    eprintln!(
        "kbs-serve: loaded {} references: {}",
        references.len(),
        set::describe(&references)
    );
    let broker = std::sync::Arc::new(
        Broker::with_references(args.resources.clone(), references).with_limits(limits),
    );
    let (signalled, signals) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        while hangup.wait().is_ok() {
            if signalled.send(()).is_err() {
                break;
            }
        }
    });
    set::watch(
        broker.clone(),
        sources,
        fingerprint,
        Duration::from_secs(args.reload_every),
        signals,
    );
    serve_with(listener, broker, tls);
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
        let (_, r, _, limits) = parse(&[]).unwrap().unwrap();
        assert_eq!(limits, Limits::default());
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].name, "reference.json");
        assert!(r[0].reference.tdx_trust.extra_roots.is_empty());
        let (_, r, _, limits) = parse(&[
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
        let r = &r[0].reference;
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
