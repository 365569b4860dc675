//! SEV-SNP attestation reports: a strict parser over the raw 1184 bytes, the report signature
//! checked over exactly the bytes the firmware signed (never a re-encoding of parsed fields),
//! and the VCEK/VLEK certificate checked up to AMD's built-in roots.
//!
//! On the wire (Trustee's `snp` evidence) the report travels as the serde form of the `sev`
//! crate's `AttestationReport`; the broker encodes it back to the 1184 bytes and checks the
//! signature over those. A re-encoding that differs from what the firmware signed can only fail
//! the signature, never pass it.

use p384::ecdsa::signature::Verifier;
use sev::certs::snp::{builtin, ca, Certificate, Chain, Verifiable};

pub use cvm_formats::snp::*;

pub mod launch;
pub mod page_sha384;

/// The report signature check, beside the layout (`cvm_formats::snp::Report`) it reads.
pub trait VerifyReport {
    /// Checks the ECDSA P-384 signature over the signed bytes with the endorsement key (VCEK
    /// or VLEK) in `certificate`.
    fn verify_signature(&self, certificate: &Certificate) -> Result<(), SnpError>;
    /// The same with the endorsement key itself.
    fn verify_signature_with(&self, key: &p384::ecdsa::VerifyingKey) -> Result<(), SnpError>;
}

impl VerifyReport for Report {
    /// Checks the ECDSA P-384 signature over the signed bytes with the endorsement key (VCEK
    /// or VLEK) in `certificate`.
    fn verify_signature(&self, certificate: &Certificate) -> Result<(), SnpError> {
        self.verify_signature_with(&endorsement_key(certificate)?)
    }

    /// The same with the endorsement key itself.
    fn verify_signature_with(&self, key: &p384::ecdsa::VerifyingKey) -> Result<(), SnpError> {
        let component = |at: usize| {
            let mut be = [0u8; COMPONENT_LEN];
            be.copy_from_slice(&self.bytes()[at..at + COMPONENT_LEN]);
            be.reverse();
            be
        };
        let r = component(SIGNED_LEN);
        let s = component(SIGNED_LEN + COMPONENT_FIELD);
        let signature =
            p384::ecdsa::Signature::from_scalars(r, s).map_err(|_| SnpError::Signature)?;
        key.verify(&self.bytes()[..SIGNED_LEN], &signature)
            .map_err(|_| SnpError::Signature)
    }
}

/// The P-384 public key an endorsement key certificate certifies.
pub fn endorsement_key(certificate: &Certificate) -> Result<p384::ecdsa::VerifyingKey, SnpError> {
    p384::ecdsa::VerifyingKey::from_sec1_bytes(certificate.public_key_sec1())
        .map_err(|e| SnpError::Certificate(format!("not a P-384 public key: {e}")))
}

/// What a verifier requires of a report beyond its signature.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    /// Launch digests of the images allowed to run (`cvm-measure`'s SNP prediction).
    pub measurements: Vec<Vec<u8>>,
    /// The binding the report must carry.
    pub report_data: Vec<u8>,
    /// Policy and TCB (`check_requirements`).
    pub requirements: Requirements,
}

/// Checks a signed report's contents: an allowed launch digest, the operator's requirements
/// (`check_requirements`: VMPL 0, policy, TCB), the binding. (The signature and the chain
/// are checked before; `product` is the chain's.)
pub fn appraise(report: &Report, product: &str, expected: &Expectations) -> Result<(), String> {
    if !expected
        .measurements
        .iter()
        .any(|m| m.as_slice() == report.measurement())
    {
        return Err(format!(
            "launch digest {} is not one of the {} allowed",
            cvm_formats::hex(report.measurement()),
            expected.measurements.len()
        ));
    }
    check_requirements(report, product, &expected.requirements).map_err(|r| r.to_string())?;
    if report.report_data() != expected.report_data.as_slice() {
        return Err("the report data is not this session's binding (replayed evidence)".into());
    }
    Ok(())
}

/// layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
}

impl Tcb {
    /// Decodes a TCB_VERSION for `product` (Turin moved the fields; a configured chain is read
    /// as Milan and Genoa lay it out).
    pub fn decode(tcb: u64, product: &str) -> Tcb {
        let b = tcb.to_le_bytes();
        if product == "Turin" {
            Tcb {
                bootloader: b[1],
                tee: b[2],
                snp: b[3],
                microcode: b[7],
            }
        } else {
            Tcb {
                bootloader: b[0],
                tee: b[1],
                snp: b[6],
                microcode: b[7],
            }
        }
    }

    fn components(&self) -> [(&'static str, u8); 4] {
        [
            ("bootloader", self.bootloader),
            ("tee", self.tee),
            ("snp", self.snp),
            ("microcode", self.microcode),
        ]
    }

    /// The first component of `self` below `minimum`'s: (name, got, minimum).
    pub fn first_below(&self, minimum: &Tcb) -> Option<(&'static str, u8, u8)> {
        self.components()
            .into_iter()
            .zip(minimum.components())
            .find(|((_, got), (_, min))| got < min)
            .map(|((name, got), (_, min))| (name, got, min))
    }

    /// Reads `bootloader=N,tee=N,snp=N,microcode=N` (all four: an omitted component would be
    /// one not checked).
    pub fn parse_minimum(text: &str) -> Result<Tcb, String> {
        let mut fields: std::collections::BTreeMap<&str, u8> = Default::default();
        for part in text.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or(format!("{part:?} is not field=N"))?;
            let v: u8 = v
                .parse()
                .map_err(|_| format!("{k}={v:?}: expected 0 to 255"))?;
            if !["bootloader", "tee", "snp", "microcode"].contains(&k) {
                return Err(format!(
                    "{k:?} is not a TCB component (bootloader, tee, snp, microcode)"
                ));
            }
            fields.insert(k, v);
        }
        let get = |k: &str| {
            fields.get(k).copied().ok_or(format!(
                "the minimum TCB names no {k} (all of bootloader, tee, snp, microcode are needed)"
            ))
        };
        Ok(Tcb {
            bootloader: get("bootloader")?,
            tee: get("tee")?,
            snp: get("snp")?,
            microcode: get("microcode")?,
        })
    }
}

impl std::fmt::Display for Tcb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bootloader={},tee={},snp={},microcode={}",
            self.bootloader, self.tee, self.snp, self.microcode
        )
    }
}

/// The minimum TCB an operator requires: absent is refused, so a reference must name one or
/// waive it by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MinimumTcb {
    #[default]
    Missing,
    Waived,
    At(Tcb),
}

/// What the operator requires of an SNP guest beyond its launch digest: the guest policy is
/// the host's choice and not part of the digest, and the TCB says which firmware signed.
/// The defaults fail closed: no debugging, no migration agent, a minimum TCB required. SMT is
/// allowed unless refused (nearly every host runs with it), any ABI unless a minimum is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirements {
    pub min_tcb: MinimumTcb,
    pub allow_debug: bool,
    pub allow_migration_agent: bool,
    pub allow_smt: bool,
    /// (major, minor) of the guest policy's minimum ABI.
    pub min_abi: (u8, u8),
}

impl Default for Requirements {
    fn default() -> Requirements {
        Requirements {
            min_tcb: MinimumTcb::Missing,
            allow_debug: false,
            allow_migration_agent: false,
            allow_smt: true,
            min_abi: (0, 0),
        }
    }
}

/// Why a report is refused: the check's name, what was expected and what the report holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{check}: expected {expected}, the report has {found}")]
pub struct Refusal {
    pub check: &'static str,
    pub expected: String,
    pub found: String,
}

fn refuse(check: &'static str, expected: impl ToString, found: impl ToString) -> Refusal {
    Refusal {
        check,
        expected: expected.to_string(),
        found: found.to_string(),
    }
}

/// The checks `verify snp-report` and `kbs-serve` share, on a report whose signature and
/// chain verified (`product` from the chain decodes the TCB): VMPL 0, the guest policy's
/// bits, and the TCB. The minimum applies to the reported TCB (the one the VCEK certifies:
/// firmware can derive keys for its own TCB and older only) and to the launch TCB (the
/// firmware the guest's memory was set up under); the reported TCB must not be below the
/// committed one (the host may lower what it reports, to keep using an older VCEK, which
/// would hide that the platform committed to newer firmware).
pub fn check_requirements(
    report: &Report,
    product: &str,
    required: &Requirements,
) -> Result<(), Refusal> {
    if report.vmpl() != 0 {
        return Err(refuse("vmpl", 0, report.vmpl()));
    }
    let policy = report.policy();
    if policy & (1 << 19) != 0 && !required.allow_debug {
        return Err(refuse(
            "policy.debug",
            "debugging not allowed (the host could read the guest's memory)",
            format!("policy {policy:#x} allowing it"),
        ));
    }
    if policy & (1 << 18) != 0 && !required.allow_migration_agent {
        return Err(refuse(
            "policy.migrate_ma",
            "no migration agent",
            format!("policy {policy:#x} allowing one"),
        ));
    }
    if policy & (1 << 16) != 0 && !required.allow_smt {
        return Err(refuse(
            "policy.smt",
            "SMT not allowed",
            format!("policy {policy:#x} allowing it"),
        ));
    }
    let abi = (((policy >> 8) & 0xff) as u8, (policy & 0xff) as u8);
    if abi < required.min_abi {
        return Err(refuse(
            "policy.abi",
            format!(
                "a minimum ABI of at least {}.{}",
                required.min_abi.0, required.min_abi.1
            ),
            format!("{}.{}", abi.0, abi.1),
        ));
    }
    let reported = Tcb::decode(report.reported_tcb(), product);
    let committed = Tcb::decode(report.committed_tcb(), product);
    if let Some((name, got, min)) = reported.first_below(&committed) {
        return Err(refuse(
            "reported_tcb",
            format!("not below the committed TCB ({name} {min}, {committed})"),
            format!("{name} {got} ({reported})"),
        ));
    }
    match required.min_tcb {
        MinimumTcb::Missing => Err(refuse(
            "min_tcb",
            "a minimum TCB in the reference (or one waived by name)",
            format!("the reported TCB {reported} and no minimum to compare it with"),
        )),
        MinimumTcb::Waived => Ok(()),
        MinimumTcb::At(minimum) => {
            let launch = Tcb::decode(report.launch_tcb(), product);
            for (check, tcb) in [("reported_tcb", reported), ("launch_tcb", launch)] {
                if let Some((name, got, min)) = tcb.first_below(&minimum) {
                    return Err(refuse(
                        check,
                        format!("{name} at least {min} (minimum {minimum})"),
                        format!("{name} {got} ({tcb})"),
                    ));
                }
            }
            Ok(())
        }
    }
}

/// Reads an endorsement key certificate (DER or PEM).
pub fn certificate(bytes: &[u8]) -> Result<Certificate, SnpError> {
    let parsed = if bytes.starts_with(b"-----BEGIN") {
        Certificate::from_pem(bytes)
    } else {
        Certificate::from_der(bytes)
    };
    parsed.map_err(|e| SnpError::Certificate(e.to_string()))
}

type CertLoader = fn() -> std::io::Result<Certificate>;

/// Checks that the endorsement key is signed by the ASK of one of AMD's product lines, itself
/// signed by that line's self-signed ARK (built in); returns the product line.
pub fn verify_chain(endorsement: &Certificate) -> Result<&'static str, SnpError> {
    verify_chain_with(endorsement, &[])
}

/// An ARK and ASK pair trusted beside AMD's built-in ones (an offline store, or a test chain).
#[derive(Debug, Clone)]
pub struct TrustedChain {
    pub ark: Certificate,
    pub ask: Certificate,
}

/// The same, also accepting the chains in `extra` (named "configured").
pub fn verify_chain_with(
    endorsement: &Certificate,
    extra: &[TrustedChain],
) -> Result<&'static str, SnpError> {
    for trusted in extra {
        let chain = Chain {
            ca: ca::Chain {
                ark: trusted.ark.clone(),
                ask: trusted.ask.clone(),
            },
            vek: endorsement.clone(),
        };
        if (&chain).verify().is_ok() {
            return Ok("configured");
        }
    }
    let roots = [
        (
            "Milan",
            builtin::milan::ark as CertLoader,
            builtin::milan::ask as CertLoader,
        ),
        ("Genoa", builtin::genoa::ark, builtin::genoa::ask),
        ("Turin", builtin::turin::ark, builtin::turin::ask),
    ];
    for (product, ark, ask) in roots {
        let (Ok(ark), Ok(ask)) = (ark(), ask()) else {
            continue;
        };
        let chain = Chain {
            ca: ca::Chain { ark, ask },
            vek: endorsement.clone(),
        };
        if (&chain).verify().is_ok() {
            return Ok(product);
        }
    }
    Err(SnpError::Chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn testdata(path: &str) -> Vec<u8> {
        crate::testdata::read(path)
    }

    fn hex_file(path: &str) -> Vec<u8> {
        let text = String::from_utf8(testdata(path)).unwrap();
        let digits: String = text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        cvm_formats::verity::parse_hex(&digits).unwrap()
    }

    /// (report, its VCEK) from real Milan machines.
    fn real_reports() -> Vec<(Vec<u8>, Certificate)> {
        vec![
            (
                testdata("snp/gsg_attestation.bin"),
                certificate(&testdata("snp/gsg_vcek.der")).unwrap(),
            ),
            (
                hex_file("snp/virtee_report_milan.hex"),
                certificate(&testdata("snp/virtee_vcek_milan.der")).unwrap(),
            ),
        ]
    }

    #[test]
    fn real_reports_verify_up_to_the_amd_root() {
        for (raw, vcek) in real_reports() {
            let report = Report::parse(&raw).unwrap();
            report.verify_signature(&vcek).unwrap();
            assert_eq!(verify_chain(&vcek).unwrap(), "Milan");
            assert_eq!(report.signing_key(), 0);
        }
        let gsg = Report::parse(&real_reports()[0].0).unwrap();
        assert_eq!(gsg.version(), 2);
        assert_eq!(gsg.policy(), 0xb0000);
        assert!(gsg.debug_allowed());
        assert_eq!(&gsg.report_data()[..5], &[1, 2, 3, 4, 5]);
        assert!(cvm_formats::hex(gsg.measurement()).starts_with("b07af962"));
    }

    #[test]
    fn every_changed_byte_is_refused() {
        for (raw, vcek) in real_reports() {
            for at in 0..REPORT_LEN {
                let mut changed = raw.clone();
                changed[at] ^= 0x01;
                let verdict = Report::parse(&changed).and_then(|r| r.verify_signature(&vcek));
                assert!(verdict.is_err(), "byte {at:#x} changed, still accepted");
            }
        }
    }

    #[test]
    fn another_vcek_does_not_verify() {
        let reports = real_reports();
        let report = Report::parse(&reports[0].0).unwrap();
        assert_eq!(
            report.verify_signature(&reports[1].1),
            Err(SnpError::Signature)
        );
    }

    #[test]
    fn structure_errors_are_named() {
        let raw = real_reports().remove(0).0;
        assert_eq!(Report::parse(&raw[..100]), Err(SnpError::Length(100)));
        let mut bad = raw.clone();
        bad[0] = 9;
        assert!(matches!(
            Report::parse(&bad),
            Err(SnpError::Field {
                field: "version",
                ..
            })
        ));
        let mut bad = raw.clone();
        bad[0x34] = 2;
        assert!(matches!(
            Report::parse(&bad),
            Err(SnpError::Field {
                field: "signature_algo",
                ..
            })
        ));
    }

    /// A report signed by a test key, as the SNP firmware lays it out.
    fn signed_report(
        key: &p384::ecdsa::SigningKey,
        measurement: &[u8; 48],
        report_data: &[u8; 64],
        policy: u64,
    ) -> Report {
        Report::parse(&test_report(key, measurement, report_data, policy)).unwrap()
    }

    /// A zero-TCB test report whose policy and TCB fields are set, signed again.
    fn report_with(key: &p384::ecdsa::SigningKey, policy: u64, tcbs: &[(usize, u64)]) -> Report {
        let mut raw = test_report(key, &[0x11; 48], &[0x22; 64], policy);
        for (at, tcb) in tcbs {
            raw[*at..*at + 8].copy_from_slice(&tcb.to_le_bytes());
        }
        sign_test_report(key, &mut raw);
        Report::parse(&raw).unwrap()
    }

    /// A Milan TCB_VERSION: bootloader, tee, snp, microcode.
    fn milan_tcb(bootloader: u8, tee: u8, snp: u8, microcode: u8) -> u64 {
        u64::from_le_bytes([bootloader, tee, 0, 0, 0, 0, snp, microcode])
    }

    const REPORTED: usize = 0x180;
    const COMMITTED: usize = 0x1e0;
    const LAUNCH: usize = 0x1f0;

    #[test]
    fn appraisal_checks_digest_binding_and_policy() {
        let key = p384::ecdsa::SigningKey::random(&mut rand_core::OsRng);
        let digest = [0x11u8; 48];
        let binding = [0x22u8; 64];
        let expected = Expectations {
            measurements: vec![digest.to_vec()],
            report_data: binding.to_vec(),
            requirements: Requirements {
                min_tcb: MinimumTcb::Waived,
                ..Default::default()
            },
        };
        let good = signed_report(&key, &digest, &binding, 0x30000);
        good.verify_signature_with(key.verifying_key()).unwrap();
        appraise(&good, "Milan", &expected).unwrap();
        let other_image = signed_report(&key, &[0x33; 48], &binding, 0x30000);
        assert!(appraise(&other_image, "Milan", &expected)
            .unwrap_err()
            .contains("launch digest"));
        let replayed = signed_report(&key, &digest, &[0; 64], 0x30000);
        assert!(appraise(&replayed, "Milan", &expected)
            .unwrap_err()
            .contains("replayed"));
        let debug = signed_report(&key, &digest, &binding, 0x30000 | 1 << 19);
        assert!(appraise(&debug, "Milan", &expected)
            .unwrap_err()
            .contains("policy.debug"));
        // Signed by another key.
        let other_key = p384::ecdsa::SigningKey::random(&mut rand_core::OsRng);
        assert_eq!(
            good.verify_signature_with(other_key.verifying_key()),
            Err(SnpError::Signature)
        );
    }

    #[test]
    fn the_minimum_tcb_is_required_by_default_and_each_component_below_it_is_named() {
        let key = p384::ecdsa::SigningKey::random(&mut rand_core::OsRng);
        let at = |b, t, s, m| milan_tcb(b, t, s, m);
        let current = at(3, 0, 8, 115);
        let all = |tcb| [(REPORTED, tcb), (COMMITTED, tcb), (LAUNCH, tcb)];
        let minimum = Requirements {
            min_tcb: MinimumTcb::At(Tcb {
                bootloader: 3,
                tee: 0,
                snp: 8,
                microcode: 115,
            }),
            ..Default::default()
        };
        let good = report_with(&key, 0x30000, &all(current));
        check_requirements(&good, "Milan", &minimum).unwrap();
        // No minimum configured: refused by name, not waved through.
        let why = check_requirements(&good, "Milan", &Requirements::default()).unwrap_err();
        assert_eq!(why.check, "min_tcb", "{why}");
        let waived = Requirements {
            min_tcb: MinimumTcb::Waived,
            ..Default::default()
        };
        check_requirements(&good, "Milan", &waived).unwrap();
        for (tcb, component) in [
            (at(2, 0, 8, 115), "bootloader"),
            (at(3, 0, 7, 115), "snp"),
            (at(3, 0, 8, 114), "microcode"),
        ] {
            let low = report_with(&key, 0x30000, &all(tcb));
            let why = check_requirements(&low, "Milan", &minimum).unwrap_err();
            assert_eq!(why.check, "reported_tcb", "{why}");
            assert!(why.expected.starts_with(component), "{why}");
            assert!(why.found.starts_with(component), "{why}");
        }
        let tee_minimum = Requirements {
            min_tcb: MinimumTcb::At(Tcb {
                tee: 1,
                ..Tcb::decode(current, "Milan")
            }),
            ..Default::default()
        };
        let why = check_requirements(&good, "Milan", &tee_minimum).unwrap_err();
        assert!(why.to_string().contains("tee at least 1"), "{why}");
        // Launched under older firmware, updated since.
        let old_launch = report_with(
            &key,
            0x30000,
            &[
                (REPORTED, current),
                (COMMITTED, current),
                (LAUNCH, at(3, 0, 7, 115)),
            ],
        );
        let why = check_requirements(&old_launch, "Milan", &minimum).unwrap_err();
        assert_eq!(why.check, "launch_tcb", "{why}");
        // A reported TCB below the committed one, even with the minimum waived.
        let lowered = report_with(
            &key,
            0x30000,
            &[
                (REPORTED, at(3, 0, 7, 115)),
                (COMMITTED, current),
                (LAUNCH, current),
            ],
        );
        let why = check_requirements(&lowered, "Milan", &waived).unwrap_err();
        assert_eq!(why.check, "reported_tcb", "{why}");
        assert!(why.expected.contains("committed"), "{why}");
        // Turin's layout: the same value decodes to other components.
        let turin = Tcb::decode(u64::from_le_bytes([1, 2, 3, 4, 0, 0, 0, 5]), "Turin");
        assert_eq!(
            (turin.bootloader, turin.tee, turin.snp, turin.microcode),
            (2, 3, 4, 5)
        );
    }

    #[test]
    fn each_forbidden_policy_bit_is_refused_by_name() {
        let key = p384::ecdsa::SigningKey::random(&mut rand_core::OsRng);
        let waived = Requirements {
            min_tcb: MinimumTcb::Waived,
            ..Default::default()
        };
        for (bit, check) in [(19, "policy.debug"), (18, "policy.migrate_ma")] {
            let report = report_with(&key, 0x30000 | 1 << bit, &[]);
            let why = check_requirements(&report, "Milan", &waived).unwrap_err();
            assert_eq!(why.check, check, "{why}");
        }
        let allowed = Requirements {
            allow_debug: true,
            allow_migration_agent: true,
            ..waived.clone()
        };
        check_requirements(&report_with(&key, 0xf0000, &[]), "Milan", &allowed).unwrap();
        // SMT (bit 16) when the operator refuses it.
        let no_smt = Requirements {
            allow_smt: false,
            ..waived.clone()
        };
        let why =
            check_requirements(&report_with(&key, 0x30000, &[]), "Milan", &no_smt).unwrap_err();
        assert_eq!(why.check, "policy.smt", "{why}");
        check_requirements(&report_with(&key, 0x20000, &[]), "Milan", &no_smt).unwrap();
        // The minimum ABI: 1.51 required, 1.50 and 0.255 refused, 1.51 and 2.0 pass.
        let abi = Requirements {
            min_abi: (1, 51),
            ..waived
        };
        for (policy, ok) in [
            (0x30132, false),
            (0x300ff, false),
            (0x30133, true),
            (0x30200, true),
        ] {
            let verdict = check_requirements(&report_with(&key, policy, &[]), "Milan", &abi);
            match verdict {
                Ok(()) => assert!(ok, "{policy:#x} passed"),
                Err(why) => {
                    assert!(!ok, "{policy:#x}: {why}");
                    assert_eq!(why.check, "policy.abi");
                }
            }
        }
    }

    #[test]
    fn real_reports_pass_a_reference_that_matches_them() {
        for (raw, vcek) in real_reports() {
            let report = Report::parse(&raw).unwrap();
            let product = verify_chain(&vcek).unwrap();
            let reported = Tcb::decode(report.reported_tcb(), product);
            let matching = Requirements {
                min_tcb: MinimumTcb::At(reported),
                allow_debug: report.debug_allowed(),
                ..Default::default()
            };
            check_requirements(&report, product, &matching).unwrap();
            // One more than the report in any component is refused.
            let newer = Tcb {
                microcode: reported.microcode + 1,
                ..reported
            };
            let why = check_requirements(
                &report,
                product,
                &Requirements {
                    min_tcb: MinimumTcb::At(newer),
                    ..matching
                },
            )
            .unwrap_err();
            assert_eq!(why.check, "reported_tcb");
        }
        assert_eq!(
            Tcb::parse_minimum("bootloader=2,tee=0,snp=5,microcode=68").unwrap(),
            Tcb {
                bootloader: 2,
                tee: 0,
                snp: 5,
                microcode: 68
            }
        );
        assert!(Tcb::parse_minimum("bootloader=2,snp=5,microcode=68")
            .unwrap_err()
            .contains("no tee"));
        assert!(Tcb::parse_minimum("fmc=1").unwrap_err().contains("fmc"));
    }

    #[test]
    fn trustee_evidence_carries_the_exact_report() {
        for (raw, vcek) in real_reports() {
            let report = Report::parse(&raw).unwrap();
            let chain = vec![CertTableEntry {
                cert_type: CertType::VCEK,
                data: testdata("snp/gsg_vcek.der"),
            }];
            let evidence = trustee_evidence(&report, Some(chain.clone())).unwrap();
            let text = serde_json::to_string(&evidence).unwrap();
            let (back, certs) =
                from_trustee_evidence(&serde_json::from_str(&text).unwrap()).unwrap();
            assert_eq!(back.bytes(), &raw[..], "the report survives the serde form");
            back.verify_signature(&vcek).unwrap();
            assert_eq!(certs, chain);
            assert!(evidence["cert_chain"][0]["cert_type"] == "VCEK");
        }
        let mut evidence =
            trustee_evidence(&Report::parse(&real_reports()[0].0).unwrap(), None).unwrap();
        evidence["attestation_report"]["vmpl"] = 1.into();
        let (changed, _) = from_trustee_evidence(&evidence).unwrap();
        let vcek = certificate(&testdata("snp/gsg_vcek.der")).unwrap();
        assert_eq!(changed.verify_signature(&vcek), Err(SnpError::Signature));
        evidence["extra"] = 1.into();
        assert!(matches!(
            from_trustee_evidence(&evidence),
            Err(SnpError::Evidence(_))
        ));
    }

    #[test]
    fn certificate_tables_round_trip_and_bad_ones_are_named() {
        let entries = vec![
            CertTableEntry {
                cert_type: CertType::VCEK,
                data: vec![1; 100],
            },
            CertTableEntry {
                cert_type: CertType::ASK,
                data: vec![2; 10],
            },
            CertTableEntry {
                cert_type: CertType::OTHER(uuid::Uuid::from_bytes([7; 16])),
                data: vec![3; 5],
            },
        ];
        let table = encode_cert_table(&entries);
        assert_eq!(parse_cert_table(&table).unwrap(), entries);
        // The VCEK GUID as go-sev-guest and the kernel lay it out.
        assert_eq!(
            cvm_formats::hex(&table[..16]),
            "63da758de6644564adc5f4b93be8accd"
        );
        let err = |t: &[u8]| parse_cert_table(t).unwrap_err().to_string();
        let mut unterminated = vec![1u8; 16];
        unterminated.extend([0u8; 8]);
        assert!(err(&unterminated).contains("no terminating"));
        let mut past = table.clone();
        past[20..24].copy_from_slice(&10_000u32.to_le_bytes());
        assert!(err(&past).contains("past the table"));
        let mut overlap = table.clone();
        overlap[16..20].copy_from_slice(&0u32.to_le_bytes());
        assert!(err(&overlap).contains("overlaps"));
        assert_eq!(parse_cert_table(&[0; 24]).unwrap(), vec![]);
    }

    #[test]
    fn a_configured_chain_is_trusted_only_when_given() {
        let vcek = certificate(&testdata("snp/gsg_vcek.der")).unwrap();
        let pems = testdata("snp/ask_ark_milan.pem");
        let text = String::from_utf8(pems).unwrap();
        let blocks: Vec<&str> = text
            .split_inclusive("-----END CERTIFICATE-----")
            .filter(|b| b.contains("BEGIN"))
            .collect();
        let ask = certificate(blocks[0].trim_start().as_bytes()).unwrap();
        let ark = certificate(blocks[1].trim_start().as_bytes()).unwrap();
        let milan = TrustedChain { ark, ask };
        assert_eq!(verify_chain_with(&vcek, &[milan]).unwrap(), "configured");
        let other = certificate(&testdata("snp/virtee_vcek_milan.der")).unwrap();
        assert_eq!(verify_chain(&other).unwrap(), "Milan");
    }

    proptest! {
        #[test]
        fn arbitrary_cert_tables_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(entries) = parse_cert_table(&bytes) {
                for e in entries {
                    prop_assert!(e.data.len() <= bytes.len());
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1300)) {
            let _ = Report::parse(&bytes);
        }

        #[test]
        fn arbitrary_reports_of_the_right_length_do_not_verify(
            bytes in proptest::collection::vec(any::<u8>(), REPORT_LEN)) {
            let vcek = certificate(&testdata("snp/gsg_vcek.der")).unwrap();
            if let Ok(report) = Report::parse(&bytes) {
                prop_assert!(report.verify_signature(&vcek).is_err());
            }
        }
    }
}
