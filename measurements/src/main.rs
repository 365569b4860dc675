//! The `cvm-measure` command line.

use std::path::Path;
use std::process::ExitCode;

use cvm_formats::verity::{self, VerityParams};
use cvm_measure::snp::VerifyReport;
use cvm_measure::tdx::VerifyQuote;

const USAGE: &str = "\
usage: cvm-measure <command>

commands:
  digest <file>...   print the SHA-256 of each file (the digest workload events carry)
  verity format <data> <hash-out> [--salt HEX] [--uuid UUID]
                [--data-block-size N] [--hash-block-size N] [--json]
                     build the dm-verity hash tree of <data> (format 1, sha256, with the
                     veritysetup superblock) into <hash-out>; print the root hash, or with
                     --json every parameter. Salt and UUID are random unless given.
  predict --root-hash HEX [--cmdline TEXT] [--config FILE] [--root-tree DIR]
          [--uki FILE | --linux FILE [--initrd FILE] [--osrel FILE] [--uname TEXT]]
          [--at ready|key-release] [--json]
                     the registers a node reaches at ready (or when it asks a key broker
                     for its disk key, --at key-release): PCR 11 (UKI sections as
                     systemd-stub measures them, then the boot phases), PCR 15 (cvm-init's
                     identity events) and RTMR2. Workload digests come from the services of
                     the config file, read inside --root-tree. Without --uki or --linux: a
                     direct kernel boot, where nothing measures the kernel into PCR 11.
  replay <log> [--ccel] [--json] [--events]
                     the registers a log produces: systemd's JSON-seq tpm2-measure.log, a
                     TCG binary log (PCRs), or with --ccel a TDX CC event log (RTMRs);
                     --events lists a binary log's events instead (register, type, digest,
                     printable data)
  evidence <file> [--vcek CERT] [--ccel LOG]
                     parse an SEV-SNP report (raw or hex) or a TDX quote strictly and print
                     what a verifier compares; with --vcek check the report's signature and
                     the certificate up to AMD's built-in roots; with --ccel check the quote's
                     RTMRs against the replay of that CC event log. TDX quote signatures
                     need Intel's collateral and are not checked here.
  snp --ovmf FILE --vcpus N (--vcpu-type MODEL | --vcpu-sig HEX) [--vmm-type QEMU|ec2|gce]
      [--guest-features HEX] [--kernel FILE [--initrd FILE] [--append TEXT]]
      [--ovmf-hash HEX] [--mode snp|seves] [--json]
  snp --ovmf FILE --firmware-digest
                     the SEV-SNP launch digest (the report's MEASUREMENT) of a launch of that
                     firmware: its pages, its SEV metadata sections (the kernel-hashes page
                     with --kernel, which needs an AmdSev build), one VMSA per vCPU. Models:
                     EPYC(-v1..v4), EPYC-Rome, EPYC-Milan, EPYC-Genoa, EPYC-Turin. Guest
                     features (the VMSA's SEV_FEATURES) are the host's choice: default 0x1.
                     --ovmf-hash seeds the digest with a precomputed firmware digest, which
                     --firmware-digest prints. --mode seves: the SEV-ES digest (SHA-256).
  tdx --ovmf FILE [--two-pass] [--json]
      [--kernel FILE --memory MIB [--initrd FILE] [--append TEXT] [--kernel-unpatched]]
      [--uki FILE --disk RAW [--returned-boot-options N]]
                     the TDX MRTD of a launch of that firmware (the unified OVMF.fd with TDVF
                     metadata): pages added, MR_EXTEND sections measured; --two-pass for QEMU
                     versions that add a section's pages before extending them. With
                     --kernel (a direct boot) or --uki (booted from the GPT disk RAW): RTMR 1
                     (the kernel or UKI and its kernel by Authenticode, ReadyToBoot, the
                     separator, the GPT, ExitBootServices) and the boot's part of RTMR 2 (the
                     EFI stub's load options and initrd; cvm-init's events follow, see
                     predict). A direct boot's kernel is measured as QEMU patches it (OVMF up
                     to 2025.02), whose initrd address depends on --memory;
                     --kernel-unpatched for later OVMF. A UKI's RTMR 2 part: its load
                     options and the initrd systemd-stub 257 serves (.initrd with its own
                     cpio of .osrel and the like); N boot options the firmware tries and
                     returns from before the disk each add two actions. RTMR 0 (ACPI
                     tables of the exact QEMU) is not predicted.
  launch qemu <launch.toml>
                     the QEMU arguments of a measured direct-boot launch on SEV-SNP or TDX
                     (one per line), from the same description `predict --launch` reads
  launch check <launch.toml>
                     what this host lacks to run that launch (KVM, SNP or TDX in KVM, the
                     QEMU version); exit 1 naming each missing thing
  predict --launch <launch.toml>
                     what the hardware will measure for that launch, as reference values
                     (JSON): the SNP launch digest with the policy and guest features it
                     assumes, or the TDX MRTD, RTMR 1 and RTMR 2 up to cvm-init; also in
                     Trustee's reference-value names
  verify snp-report <report> --vcek CERT [--chain PEM] [--measurement HEX]...
      [--report-data HEX] [--host-data HEX]
      (--min-tcb bootloader=N,tee=N,snp=N,microcode=N | --waive-min-tcb)
      [--allow-debug] [--allow-migration-agent] [--no-smt] [--min-abi MAJOR.MINOR]
                     an SNP report (raw or hex) offline: its signature with the VCEK/VLEK,
                     the certificate up to AMD's built-in roots (or the ASK+ARK of --chain),
                     and the checks kbs-serve makes: VMPL 0, no debugging and no migration
                     agent unless allowed, SMT and the ABI as required, the reported and
                     launch TCB at least the minimum (required unless waived) and the
                     reported TCB not below the committed one; prints the claims (policy
                     and TCB decoded) as JSON; exit 1 naming the check if not
  verify tdx-quote <quote> [--mrtd HEX]... [--report-data HEX] [--ccel LOG]
                     a TDX quote (v4/v5): its signature chain as far as the quote allows (to
                     the Intel SGX Root CA; TCB status, QE identity and revocation need
                     Intel's collateral and are reported as not checked), no debug TD, the
                     expectations, RTMRs against the CC event log; claims as JSON
  kbs-serve --listen ADDR:PORT --resources DIR --reference FILE
            [--ek-ca PEM] [--attestation-keys FILE] [--snp-chain PEM] [--tls-cert PEM --tls-key PEM]
                     the reference key broker (Trustee KBS protocol 0.4.0; HTTPS with the
                     certificate chain and key given, else plain HTTP):
                     resources are files DIR/<repository>/<type>/<tag>, released as JWE to a
                     node whose vTPM quote (by an attestation key in the same TPM as an EK
                     whose certificate chains to the CAs of --ek-ca, proven by credential
                     activation; when a keys FILE is given, also one of its keys, 128 hex
                     digits a line) covers the PCR values of the reference FILE (`predict --at
                     key-release --json`), or whose SNP report (Trustee's evidence shape,
                     with its VCEK/VLEK) chains to AMD's roots or to the ASK+ARK in PEM,
                     carries one of the reference's snp_measurements and passes the checks
                     of verify snp-report (snp_min_tcb, required or waived;
                     snp_policy_required), or whose TDX quote (from Intel's TD QE)
                     (signature chain to the Intel root; no collateral checks) carries one of
                     tdx_mrtds, the tdx_rtmrs values, and logs replaying to its RTMRs with
                     cvm-init's part equal to tdx_init_rtmr2 (and the boot's RTMR 2 part to
                     tdx_rtmr2_before_init when given)
  --version          print the version
  --help             print this text
";

/// A command-line failure: the message and the exit code (2 for usage, 1 otherwise).
struct Failure(String, u8);

fn usage(message: String) -> Failure {
    Failure(format!("{message}\n{USAGE}"), 2)
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message, code)) => {
            eprintln!("cvm-measure: {message}");
            ExitCode::from(code)
        }
    }
}

fn run(args: &[String]) -> Result<(), Failure> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["--version"] => {
            println!("cvm-measure {}", cvm_measure::VERSION);
            Ok(())
        }
        ["--help"] => {
            print!("{USAGE}");
            Ok(())
        }
        ["digest", files @ ..] if !files.is_empty() => {
            for file in files {
                let d =
                    cvm_measure::sha256_file_mapped(Path::new(file)).map_err(|e| Failure(chain(&e), 1))?;
                println!("{}  {file}", cvm_formats::hex(&d));
            }
            Ok(())
        }
        ["digest"] => Err(usage("digest needs at least one file".into())),
        ["verity", "format", rest @ ..] => verity_format(rest),
        ["predict", "--launch", file] => launch_predict(file),
        ["predict", rest @ ..] => predict(rest),
        ["launch", "qemu", file] => launch_qemu(file),
        ["launch", "check", file] => launch_check(file),
        ["launch", ..] => Err(usage(
            "launch takes qemu FILE or check FILE (a launch description)".into(),
        )),
        ["replay", rest @ ..] => replay(rest),
        ["evidence", rest @ ..] => evidence(rest),
        ["kbs-serve", rest @ ..] => kbs_serve(rest),
        ["snp", rest @ ..] => snp(rest),
        ["tdx", rest @ ..] => tdx(rest),
        ["verify", "snp-report", rest @ ..] => verify_snp_report(rest),
        ["verify", "tdx-quote", rest @ ..] => verify_tdx_quote(rest),
        [other, ..] => Err(usage(format!(
            "unknown command {other:?}: expected digest, verity, predict, replay, evidence, snp, tdx, launch, verify, kbs-serve, --version or --help"
        ))),
        [] => Err(usage("a command is needed".into())),
    }
}

fn verity_format(args: &[&str]) -> Result<(), Failure> {
    let mut positional = Vec::new();
    let mut salt = None;
    let mut uuid = None;
    let mut data_block_size = 4096u32;
    let mut hash_block_size = 4096u32;
    let mut json = false;
    let mut i = 0;
    while i < args.len() {
        let value = |i: usize| -> Result<&str, Failure> {
            args.get(i + 1)
                .copied()
                .ok_or_else(|| usage(format!("{} needs a value", args[i])))
        };
        match args[i] {
            "--salt" => {
                let v = value(i)?;
                // "-" is veritysetup's spelling of an empty salt.
                salt = Some(if v == "-" {
                    Vec::new()
                } else {
                    verity::parse_hex(v)
                        .ok_or_else(|| usage(format!("--salt {v:?} is not hex bytes")))?
                });
                i += 2;
            }
            "--uuid" => {
                let v = value(i)?;
                uuid = Some(verity::parse_uuid(v).ok_or_else(|| {
                    usage(format!(
                        "--uuid {v:?} is not a UUID (8-4-4-4-12 hex digits)"
                    ))
                })?);
                i += 2;
            }
            "--data-block-size" | "--hash-block-size" => {
                let v = value(i)?;
                let n: u32 = v
                    .parse()
                    .map_err(|_| usage(format!("{} {v:?} is not a number", args[i])))?;
                if args[i] == "--data-block-size" {
                    data_block_size = n;
                } else {
                    hash_block_size = n;
                }
                i += 2;
            }
            "--json" => {
                json = true;
                i += 1;
            }
            flag if flag.starts_with("--") => {
                return Err(usage(format!("unknown option {flag:?} for verity format")))
            }
            path => {
                positional.push(path);
                i += 1;
            }
        }
    }
    let [data, hash_out] = positional[..] else {
        return Err(usage(format!(
            "verity format needs <data> and <hash-out>, got {} path(s)",
            positional.len()
        )));
    };
    let random = |n| {
        verity::random_bytes(n).map_err(|e| Failure(format!("cannot read /dev/urandom: {e}"), 1))
    };
    let salt = match salt {
        Some(s) => s,
        None => random(32)?,
    };
    let uuid = match uuid {
        Some(u) => u,
        None => verity::random_uuid_v4()
            .map_err(|e| Failure(format!("cannot read /dev/urandom: {e}"), 1))?,
    };
    let params = VerityParams {
        data_block_size,
        hash_block_size,
        salt,
        uuid,
    };
    let tree = verity::format(Path::new(data), Path::new(hash_out), &params)
        .map_err(|e| Failure(chain(&e), 1))?;
    let root = cvm_formats::hex(&tree.root_hash);
    if json {
        let value = serde_json::json!({
            "root_hash": root,
            "hash_algorithm": "sha256",
            "format": 1,
            "salt": cvm_formats::hex(&tree.params.salt),
            "uuid": verity::format_uuid(&tree.params.uuid),
            "data_block_size": tree.params.data_block_size,
            "hash_block_size": tree.params.hash_block_size,
            "data_blocks": tree.data_blocks,
            "hash_blocks": tree.hash_device_blocks(),
            "hash_start_block": 1,
            "levels": tree.level_blocks,
        });
        println!("{}", serde_json::to_string_pretty(&value).unwrap());
    } else {
        println!("{root}");
    }
    Ok(())
}

/// `--flag value` options and positional arguments; flags without a value are listed in `bare`.
fn options<'a>(
    args: &[&'a str],
    with_value: &[&str],
    bare: &[&str],
) -> Result<(std::collections::BTreeMap<String, &'a str>, Vec<&'a str>), Failure> {
    let mut map = std::collections::BTreeMap::new();
    let mut positional = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i];
        if with_value.contains(&a) {
            let v = args
                .get(i + 1)
                .ok_or_else(|| usage(format!("{a} needs a value")))?;
            if map.insert(a.to_string(), *v).is_some() {
                return Err(usage(format!("{a} given twice")));
            }
            i += 2;
        } else if bare.contains(&a) {
            map.insert(a.to_string(), "");
            i += 1;
        } else if a.starts_with("--") {
            return Err(usage(format!("unknown option {a:?}")));
        } else {
            positional.push(a);
            i += 1;
        }
    }
    Ok((map, positional))
}

fn read(path: &str, what: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure(format!("cannot read {what} {path}: {e}"), 1))
}

fn launch_description(file: &str) -> Result<cvm_measure::launch::Launch, Failure> {
    cvm_measure::launch::Launch::from_file(Path::new(file)).map_err(|e| Failure(chain(&e), 1))
}

fn launch_predict(file: &str) -> Result<(), Failure> {
    let values = launch_description(file)?
        .predict()
        .map_err(|e| Failure(chain(&e), 1))?;
    println!("{}", serde_json::to_string_pretty(&values).unwrap());
    Ok(())
}

fn launch_qemu(file: &str) -> Result<(), Failure> {
    for arg in launch_description(file)?.qemu_args() {
        println!("{arg}");
    }
    Ok(())
}

fn launch_check(file: &str) -> Result<(), Failure> {
    let launch = launch_description(file)?;
    let missing = cvm_measure::launch::missing_on_this_host(launch.tee);
    if missing.is_empty() {
        println!(
            "this host can run the {} launch of {file}",
            launch.tee.name()
        );
        return Ok(());
    }
    Err(Failure(
        format!(
            "this host cannot run the {} launch of {file}; missing:\n  {}",
            launch.tee.name(),
            missing.join("\n  ")
        ),
        1,
    ))
}

fn predict(args: &[&str]) -> Result<(), Failure> {
    use cvm_measure::predict::{pe_sections, predict, services_of_config, Inputs};
    let (o, positional) = options(
        args,
        &[
            "--root-hash",
            "--cmdline",
            "--config",
            "--root-tree",
            "--uki",
            "--linux",
            "--initrd",
            "--osrel",
            "--uname",
            "--at",
        ],
        &["--json"],
    )?;
    if let Some(p) = positional.first() {
        return Err(usage(format!(
            "predict takes no positional argument, got {p:?}"
        )));
    }
    let at_key_release = match o.get("--at").copied() {
        None | Some("ready") => false,
        Some("key-release") => true,
        Some(other) => {
            return Err(usage(format!(
                "--at {other:?}: expected ready or key-release"
            )))
        }
    };
    let hash = o
        .get("--root-hash")
        .ok_or_else(|| usage("predict needs --root-hash".into()))?;
    let root_hash: [u8; 32] = verity::parse_hex(hash)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| usage(format!("--root-hash {hash:?} is not 64 hex digits")))?;
    let mut inputs = Inputs {
        root_hash,
        ..Default::default()
    };
    if let Some(uki) = o.get("--uki") {
        if o.contains_key("--linux") {
            return Err(usage("--uki and --linux exclude each other".into()));
        }
        let image = read(uki, "the UKI")?;
        inputs.sections = pe_sections(&image).map_err(|e| Failure(format!("{uki}: {e}"), 1))?;
        if let Some(cmdline) = cvm_measure::predict::section(&inputs.sections, ".cmdline") {
            inputs.cmdline = cmdline.iter().copied().take_while(|&b| b != 0).collect();
        }
    } else if let Some(linux) = o.get("--linux") {
        inputs
            .sections
            .push((".linux".into(), read(linux, "the kernel")?));
        if let Some(f) = o.get("--osrel") {
            inputs
                .sections
                .push((".osrel".into(), read(f, "the os-release")?));
        }
        if let Some(c) = o.get("--cmdline") {
            inputs
                .sections
                .push((".cmdline".into(), c.as_bytes().to_vec()));
        }
        if let Some(f) = o.get("--initrd") {
            inputs
                .sections
                .push((".initrd".into(), read(f, "the initrd")?));
        }
        if let Some(u) = o.get("--uname") {
            inputs
                .sections
                .push((".uname".into(), u.as_bytes().to_vec()));
        }
    }
    if let Some(c) = o.get("--cmdline") {
        if o.contains_key("--uki") {
            return Err(usage(
                "--cmdline comes from the UKI's .cmdline section with --uki".into(),
            ));
        }
        inputs.cmdline = c.as_bytes().to_vec();
    }
    if let Some(config) = o.get("--config") {
        let bytes = read(config, "the configuration file")?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let services =
            services_of_config(&text).map_err(|e| Failure(format!("{config}: {e}"), 1))?;
        if !services.is_empty() && !o.contains_key("--root-tree") {
            return Err(usage(format!(
                "{config} has services: --root-tree is needed to find their binaries"
            )));
        }
        for (name, path) in services {
            let on_host = Path::new(o["--root-tree"]).join(path.trim_start_matches('/'));
            let digest = cvm_formats::sha256_file(&on_host).map_err(|e| Failure(chain(&e), 1))?;
            inputs.workloads.push((name, path, digest));
        }
        inputs.config_file = Some(bytes);
    }
    let (regs, extra) = if at_key_release {
        let regs = cvm_measure::predict::predict_key_release(&inputs);
        // The RTMRs predicted are cvm-init's part alone (the firmware's is in the CC log).
        let init_rtmr2 = cvm_formats::hex(&regs.rtmr[2]);
        (regs, vec![("tdx_init_rtmr2", init_rtmr2)])
    } else {
        (predict(&inputs), Vec::new())
    };
    print_registers_with(&regs, &[11, 15], o.contains_key("--json"), true, &extra);
    Ok(())
}

/// A report or quote file: raw bytes, or hex text.
fn read_evidence_file(path: &str) -> Result<Vec<u8>, Failure> {
    let bytes = read(path, "the evidence")?;
    let text = String::from_utf8_lossy(&bytes);
    let digits: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if !digits.is_empty() && digits.len() % 2 == 0 && digits.chars().all(|c| c.is_ascii_hexdigit())
    {
        if let Some(raw) = verity::parse_hex(&digits) {
            return Ok(raw);
        }
    }
    Ok(bytes)
}

fn expected_hex(
    o: &std::collections::BTreeMap<String, &str>,
    name: &str,
    len: usize,
) -> Result<Option<Vec<u8>>, Failure> {
    match o.get(name) {
        None => Ok(None),
        Some(v) => verity::parse_hex(v)
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

/// `verify snp-report`.
fn verify_snp_report(args: &[&str]) -> Result<(), Failure> {
    use cvm_measure::snp;
    let (o, positional) = options(
        args,
        &[
            "--vcek",
            "--chain",
            "--measurement",
            "--report-data",
            "--host-data",
            "--min-tcb",
            "--min-abi",
        ],
        &[
            "--allow-debug",
            "--allow-migration-agent",
            "--no-smt",
            "--waive-min-tcb",
        ],
    )?;
    let [path] = positional[..] else {
        return Err(usage("verify snp-report takes one report file".into()));
    };
    let report = snp::Report::parse(&read_evidence_file(path)?)
        .map_err(|e| Failure(format!("{path}: {e}"), 1))?;
    let vcek_path = o
        .get("--vcek")
        .ok_or_else(|| usage("verify snp-report needs --vcek CERT".into()))?;
    let vcek = snp::certificate(&read(vcek_path, "the endorsement key certificate")?)
        .map_err(|e| Failure(format!("{vcek_path}: {e}"), 1))?;
    let extra = match o.get("--chain") {
        Some(p) => vec![snp_chain(p)?],
        None => Vec::new(),
    };
    let product = snp::verify_chain_with(&vcek, &extra)
        .map_err(|e| Failure(format!("{vcek_path}: {e}"), 1))?;
    report
        .verify_signature(&vcek)
        .map_err(|e| Failure(format!("{path}: {e}"), 1))?;
    let refuse = |why: String| Failure(format!("{path}: {why}"), 1);
    let min_tcb = match (o.get("--min-tcb"), o.contains_key("--waive-min-tcb")) {
        (Some(_), true) => {
            return Err(usage(
                "--min-tcb and --waive-min-tcb exclude each other".into(),
            ))
        }
        (Some(min), false) => snp::MinimumTcb::At(
            snp::Tcb::parse_minimum(min).map_err(|e| usage(format!("--min-tcb {min:?}: {e}")))?,
        ),
        (None, true) => snp::MinimumTcb::Waived,
        (None, false) => snp::MinimumTcb::Missing,
    };
    let min_abi = match o.get("--min-abi") {
        None => (0, 0),
        Some(v) => v
            .split_once('.')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .ok_or_else(|| usage(format!("--min-abi {v:?}: expected MAJOR.MINOR")))?,
    };
    let required = snp::Requirements {
        min_tcb,
        allow_debug: o.contains_key("--allow-debug"),
        allow_migration_agent: o.contains_key("--allow-migration-agent"),
        allow_smt: !o.contains_key("--no-smt"),
        min_abi,
    };
    snp::check_requirements(&report, product, &required).map_err(|r| {
        refuse(match r.check {
            "min_tcb" => format!("{r} (--min-tcb or --waive-min-tcb)"),
            _ => r.to_string(),
        })
    })?;
    let measurements: Vec<&str> = args
        .windows(2)
        .filter(|w| w[0] == "--measurement")
        .map(|w| w[1])
        .collect();
    if !measurements.is_empty()
        && !measurements
            .iter()
            .any(|m| verity::parse_hex(m).as_deref() == Some(report.measurement()))
    {
        return Err(refuse(format!(
            "measurement {} is none of the {} expected",
            cvm_formats::hex(report.measurement()),
            measurements.len()
        )));
    }
    if let Some(data) = expected_hex(&o, "--report-data", 64)? {
        if data != report.report_data() {
            return Err(refuse("the report data is not the expected one".into()));
        }
    }
    if let Some(data) = expected_hex(&o, "--host-data", 32)? {
        if data != report.host_data() {
            return Err(refuse("the host data is not the expected one".into()));
        }
    }
    let mut claims = report.claims(product);
    claims["verified"] = serde_json::json!({
        "signature": true,
        "chain": format!("{product} (AMD root{})", if product == "configured" { " given by --chain" } else { ", built in" }),
    });
    println!("{}", serde_json::to_string_pretty(&claims).unwrap());
    Ok(())
}

/// `replay --events`: one line (or JSON object) per event, in log order.
fn print_events(log: &cvm_measure::uefi::tcglog::EventLog, ccel: bool, json: bool) {
    use cvm_measure::uefi::tcglog::event_type_name;
    let register = |index: u32| match (ccel, index) {
        (true, 0) => "MRTD".to_string(),
        (true, 1..=4) => format!("RTMR{}", index - 1),
        (true, _) => format!("MR{index}"),
        (false, _) => format!("PCR{index}"),
    };
    let printable = |data: &[u8]| {
        let text: String = data
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            })
            .take(64)
            .collect();
        text
    };
    let mut rows = Vec::new();
    for e in &log.events {
        let digests: serde_json::Map<String, serde_json::Value> = e
            .digests
            .iter()
            .map(|(id, d)| (format!("{id:#06x}"), serde_json::json!(cvm_formats::hex(d))))
            .collect();
        if json {
            rows.push(serde_json::json!({
                "register": register(e.index),
                "type": event_type_name(e.event_type),
                "type_value": e.event_type,
                "digests": digests,
                "data": cvm_formats::hex(&e.data),
            }));
        } else {
            let first = e
                .digests
                .first()
                .map(|(_, d)| cvm_formats::hex(d))
                .unwrap_or_default();
            println!(
                "{:<6} {:<34} {} {:?}",
                register(e.index),
                event_type_name(e.event_type),
                first,
                printable(&e.data)
            );
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).unwrap());
    }
}

/// `verify tdx-quote`.
fn verify_tdx_quote(args: &[&str]) -> Result<(), Failure> {
    use cvm_measure::tdx::{Quote, SignatureChecked};
    let (o, positional) = options(args, &["--mrtd", "--report-data", "--ccel"], &[])?;
    let [path] = positional[..] else {
        return Err(usage("verify tdx-quote takes one quote file".into()));
    };
    let refuse = |why: String| Failure(format!("{path}: {why}"), 1);
    let quote = Quote::parse(&read_evidence_file(path)?).map_err(|e| refuse(e.to_string()))?;
    let checked = quote
        .verify_signature()
        .map_err(|e| refuse(e.to_string()))?;
    if quote.td.debug() {
        return Err(refuse("the TD is debuggable (TD attribute bit 0)".into()));
    }
    let mrtds: Vec<&str> = args
        .windows(2)
        .filter(|w| w[0] == "--mrtd")
        .map(|w| w[1])
        .collect();
    if !mrtds.is_empty()
        && !mrtds
            .iter()
            .any(|m| verity::parse_hex(m).as_deref() == Some(&quote.td.mrtd[..]))
    {
        return Err(refuse(format!(
            "MRTD {} is none of the {} expected",
            cvm_formats::hex(&quote.td.mrtd),
            mrtds.len()
        )));
    }
    if let Some(data) = expected_hex(&o, "--report-data", 64)? {
        if data[..] != quote.td.report_data {
            return Err(refuse("the report data is not the expected one".into()));
        }
    }
    let ccel = match o.get("--ccel") {
        None => serde_json::Value::Null,
        Some(log_path) => {
            let log = cvm_measure::uefi::tcglog::parse(&read(log_path, "the CC event log")?)
                .map_err(|e| Failure(format!("{log_path}: {e}"), 1))?;
            let replayed = log
                .replay_ccel()
                .map_err(|e| Failure(format!("{log_path}: {e}"), 1))?;
            for i in 0..4 {
                if replayed.rtmr[i][..] != quote.td.rtmr[i] {
                    return Err(refuse(format!(
                        "RTMR {i} is not what {log_path} replays to"
                    )));
                }
            }
            serde_json::json!("all four RTMRs equal its replay")
        }
    };
    let td = &quote.td;
    let claims = serde_json::json!({
        "version": quote.version,
        "body": if quote.body_type == 3 { "TD 1.5" } else { "TD 1.0" },
        "mrtd": cvm_formats::hex(&td.mrtd),
        "rtmr": td.rtmr.iter().map(|r| cvm_formats::hex(r)).collect::<Vec<_>>(),
        "mrconfigid": cvm_formats::hex(&td.mrconfigid),
        "mrowner": cvm_formats::hex(&td.mrowner),
        "mrownerconfig": cvm_formats::hex(&td.mrownerconfig),
        "report_data": cvm_formats::hex(&td.report_data),
        "td_attributes": format!("{:#x}", td.td_attributes),
        "xfam": format!("{:#x}", td.xfam),
        "tee_tcb_svn": cvm_formats::hex(&quote.tee_tcb_svn()),
        "verified": {
            "signature_chain": format!("attestation key, QE report, PCK certificate ({}), Intel SGX Root CA", checked.pck_subject),
            "not_checked": SignatureChecked::NOT_CHECKED,
            "ccel": ccel,
        },
    });
    println!("{}", serde_json::to_string_pretty(&claims).unwrap());
    Ok(())
}

/// `cvm-measure tdx`: MRTD.
fn tdx(args: &[&str]) -> Result<(), Failure> {
    use cvm_measure::tdx::launch::{mrtd, PageAddOrder};
    use cvm_measure::tdx::rtmr::{self as tdx_rtmr, DirectBoot, KernelAsMeasured, Predicted};
    use sha2::Sha384;
    let (o, positional) = options(
        args,
        &[
            "--ovmf",
            "--kernel",
            "--initrd",
            "--append",
            "--memory",
            "--uki",
            "--disk",
            "--returned-boot-options",
        ],
        &["--two-pass", "--json", "--kernel-unpatched"],
    )?;
    if let Some(p) = positional.first() {
        return Err(usage(format!(
            "tdx takes no positional argument, got {p:?}"
        )));
    }
    let path = o
        .get("--ovmf")
        .copied()
        .ok_or_else(|| usage("tdx needs --ovmf FILE".into()))?;
    let order = if o.contains_key("--two-pass") {
        PageAddOrder::TwoPass
    } else {
        PageAddOrder::SinglePass
    };
    let digest = mrtd(&read(path, "the firmware")?, order)
        .map_err(|e| Failure(format!("{path}: {e}"), 1))?;
    // RTMR 1 and the boot's part of RTMR 2, for a direct boot or a UKI from a disk.
    fn in_file(file: &str) -> impl Fn(tdx_rtmr::ImageError) -> Failure + '_ {
        move |e| Failure(format!("{file}: {e}"), 1)
    }
    let events: Option<(Vec<Predicted>, Vec<Predicted>)> = match (o.get("--kernel"), o.get("--uki"))
    {
        (Some(_), Some(_)) => return Err(usage("tdx takes --kernel or --uki, not both".into())),
        (Some(&kernel_path), None) => {
            let memory = o
                .get("--memory")
                .ok_or_else(|| {
                    usage("tdx --kernel needs --memory MIB (QEMU places the initrd by it)".into())
                })?
                .parse::<u64>()
                .ok()
                .filter(|m| (1..=16 << 20).contains(m))
                .ok_or_else(|| {
                    usage(format!(
                        "--memory {:?}: expected MiB, 1 to 16777216",
                        o["--memory"]
                    ))
                })?;
            let kernel = read(kernel_path, "the kernel")?;
            let initrd = o
                .get("--initrd")
                .map(|p| read(p, "the initrd"))
                .transpose()?;
            let boot = DirectBoot {
                kernel: &kernel,
                initrd: initrd.as_deref(),
                cmdline: o.get("--append").copied().unwrap_or(""),
                memory_bytes: memory << 20,
                kernel_as_measured: if o.contains_key("--kernel-unpatched") {
                    KernelAsMeasured::Unpatched
                } else {
                    KernelAsMeasured::QemuPatched
                },
            };
            Some((
                boot.rtmr1_events::<Sha384>()
                    .map_err(in_file(kernel_path))?,
                boot.rtmr2_events::<Sha384>(),
            ))
        }
        (None, Some(&uki_path)) => {
            let disk_path = o
                .get("--disk")
                .copied()
                .ok_or_else(|| usage("tdx --uki needs --disk RAW (its GPT is measured)".into()))?;
            let uki = read(uki_path, "the UKI")?;
            let sections = cvm_measure::predict::pe_sections(&uki)
                .map_err(|e| Failure(format!("{uki_path}: {e}"), 1))?;
            let linux = cvm_measure::predict::section(&sections, ".linux")
                .ok_or_else(|| Failure(format!("{uki_path}: no .linux section: not a UKI"), 1))?;
            let gpt = tdx_rtmr::gpt_event(&read(disk_path, "the disk image")?, 512)
                .map_err(in_file(disk_path))?;
            let returned = match o.get("--returned-boot-options") {
                None => 0,
                Some(n) => n
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n <= 16)
                    .ok_or_else(|| {
                        usage(format!("--returned-boot-options {n:?}: expected 0 to 16"))
                    })?,
            };
            Some((
                tdx_rtmr::uki_rtmr1_events::<Sha384>(&gpt, &uki, linux, returned)
                    .map_err(in_file(uki_path))?,
                tdx_rtmr::uki_rtmr2_events::<Sha384>(&sections),
            ))
        }
        (None, None) => None,
    };
    for flag in ["--initrd", "--append", "--memory", "--kernel-unpatched"] {
        if o.contains_key(flag) && !o.contains_key("--kernel") {
            return Err(usage(format!("{flag} goes with --kernel")));
        }
    }
    for flag in ["--disk", "--returned-boot-options"] {
        if o.contains_key(flag) && !o.contains_key("--uki") {
            return Err(usage(format!("{flag} goes with --uki")));
        }
    }
    let list = |events: &[Predicted]| -> Vec<serde_json::Value> {
        events
            .iter()
            .map(|e| serde_json::json!({ "event": e.what, "digest": cvm_formats::hex(&e.digest) }))
            .collect()
    };
    if o.contains_key("--json") {
        let mut out = serde_json::json!({
            "tdx_mrtds": [cvm_formats::hex(&digest)],
            "page_add_order": format!("{order:?}"),
        });
        if let Some((rtmr1, rtmr2)) = &events {
            // RTMR 1 is whole at boot: a reference value. RTMR 2 continues with cvm-init's
            // events (`tdx_init_rtmr2`), so only the boot's part is shown.
            out["tdx_rtmrs"] =
                serde_json::json!({ "1": cvm_formats::hex(&tdx_rtmr::fold::<Sha384>(rtmr1)) });
            out["tdx_rtmr2_before_init"] =
                serde_json::json!(cvm_formats::hex(&tdx_rtmr::fold::<Sha384>(rtmr2)));
            out["rtmr1_events"] = serde_json::json!(list(rtmr1));
            out["rtmr2_events"] = serde_json::json!(list(rtmr2));
        }
        println!("{}", serde_json::to_string_pretty(&out).unwrap());
    } else if let Some((rtmr1, rtmr2)) = &events {
        println!("mrtd {}", cvm_formats::hex(&digest));
        println!(
            "rtmr1 {}",
            cvm_formats::hex(&tdx_rtmr::fold::<Sha384>(rtmr1))
        );
        println!(
            "rtmr2-before-init {}",
            cvm_formats::hex(&tdx_rtmr::fold::<Sha384>(rtmr2))
        );
    } else {
        println!("{}", cvm_formats::hex(&digest));
    }
    Ok(())
}

/// `cvm-measure snp`: the SEV-SNP launch digest.
fn snp(args: &[&str]) -> Result<(), Failure> {
    use cvm_measure::snp::launch::{
        firmware_digest, launch_digest, vcpu_signature, LaunchInputs, Vmm,
    };
    let (o, positional) = options(
        args,
        &[
            "--ovmf",
            "--vcpus",
            "--vcpu-type",
            "--vcpu-sig",
            "--vmm-type",
            "--guest-features",
            "--kernel",
            "--initrd",
            "--append",
            "--ovmf-hash",
            "--mode",
        ],
        &["--json", "--firmware-digest"],
    )?;
    if let Some(p) = positional.first() {
        return Err(usage(format!(
            "snp takes no positional argument, got {p:?}"
        )));
    }
    // The kernel is the largest input, and SHA-256 is one chain: it gets a thread (and a CPU)
    // of its own from the start, and the firmware, then the initrd, are measured on this one
    // meanwhile.
    let kernel = match o.get("--kernel") {
        Some(p) if !o.contains_key("--firmware-digest") => {
            let path = std::path::PathBuf::from(p);
            Some(cvm_measure::elsewhere::spawn_on_another_cpu(move || {
                cvm_measure::sha256_file_mapped(&path)
            }))
        }
        _ => None,
    };
    let ovmf_path = o
        .get("--ovmf")
        .copied()
        .ok_or_else(|| usage("snp needs --ovmf FILE".into()))?;
    let firmware = cvm_measure::mapped::FileBytes::open(Path::new(ovmf_path))
        .map_err(|e| Failure(format!("cannot read the firmware {ovmf_path}: {e}"), 1))?;
    let fail = |e: cvm_measure::snp::launch::LaunchError| Failure(format!("{ovmf_path}: {e}"), 1);
    if o.contains_key("--firmware-digest") {
        println!(
            "{}",
            cvm_formats::hex(&firmware_digest(&firmware).map_err(fail)?)
        );
        return Ok(());
    }
    let hex_number = |name: &str, v: &str| {
        u64::from_str_radix(v.trim_start_matches("0x"), 16)
            .map_err(|_| usage(format!("{name} {v:?} is not a hexadecimal number")))
    };
    let vcpus: u32 = o
        .get("--vcpus")
        .ok_or_else(|| usage("snp needs --vcpus N".into()))?
        .parse()
        .map_err(|_| usage(format!("--vcpus {:?} is not a number", o["--vcpus"])))?;
    let signature = match (o.get("--vcpu-type"), o.get("--vcpu-sig")) {
        (Some(model), None) => vcpu_signature(model).ok_or_else(|| {
            usage(format!("--vcpu-type {model:?}: expected EPYC, EPYC-v1..v4, EPYC-Rome, EPYC-Milan, EPYC-Genoa or EPYC-Turin"))
        })?,
        (None, Some(sig)) => u32::try_from(hex_number("--vcpu-sig", sig)?)
            .map_err(|_| usage(format!("--vcpu-sig {sig}: more than 32 bits")))?,
        _ => return Err(usage("snp needs exactly one of --vcpu-type or --vcpu-sig".into())),
    };
    let vmm = match o.get("--vmm-type") {
        None => Vmm::Qemu,
        Some(name) => Vmm::from_name(name)
            .ok_or_else(|| usage(format!("--vmm-type {name:?}: expected QEMU, ec2 or gce")))?,
    };
    let guest_features = match o.get("--guest-features") {
        None => 0x1,
        Some(v) => hex_number("--guest-features", v)?,
    };
    let firmware_seed = match o.get("--ovmf-hash") {
        None => None,
        Some(v) => Some(
            verity::parse_hex(v)
                .and_then(|d| d.try_into().ok())
                .ok_or_else(|| usage(format!("--ovmf-hash {v:?}: expected 96 hex digits")))?,
        ),
    };
    let seed = match firmware_seed {
        Some(seed) => seed,
        None => firmware_digest(&firmware).map_err(fail)?,
    };
    let hashed = |digest: Result<[u8; 32], cvm_formats::DigestError>| {
        digest.map_err(|e| Failure(chain(&e), 1))
    };
    let initrd = o
        .get("--initrd")
        .map(|p| hashed(cvm_measure::sha256_file_mapped(Path::new(p))))
        .transpose()?;
    let kernel = kernel
        .map(|h| hashed(h.join().expect("the kernel's hashing thread")))
        .transpose()?;
    let inputs = LaunchInputs {
        firmware: &firmware,
        firmware_digest: Some(seed),
        vcpus,
        vcpu_signature: signature,
        vmm,
        guest_features,
        kernel,
        initrd,
        append: o.get("--append").copied(),
    };
    let digest = match o.get("--mode").copied() {
        None | Some("snp") => cvm_formats::hex(&launch_digest(&inputs).map_err(fail)?),
        Some("seves") => {
            if o.contains_key("--ovmf-hash") || o.contains_key("--guest-features") {
                return Err(usage(
                    "--mode seves takes neither --ovmf-hash nor --guest-features".into(),
                ));
            }
            cvm_formats::hex(&cvm_measure::snp::launch::seves_launch_digest(&inputs).map_err(fail)?)
        }
        Some(other) => return Err(usage(format!("--mode {other:?}: expected snp or seves"))),
    };
    if o.contains_key("--json") {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "snp_measurements": [digest],
                "launch": {
                    "firmware_sha256": cvm_formats::hex(&sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&*firmware))),
                    "vcpus": vcpus,
                    "vcpu_signature": format!("{signature:#010x}"),
                    "vmm_type": format!("{vmm:?}"),
                    "guest_features": format!("{guest_features:#x}"),
                    "kernel_sha256": kernel.as_ref().map(|k| cvm_formats::hex(k)),
                    "initrd_sha256": initrd.as_ref().map(|k| cvm_formats::hex(k)),
                },
            }))
            .unwrap()
        );
    } else {
        println!("{digest}");
    }
    Ok(())
}

/// An ASK then its ARK, PEM, as AMD publishes them (`ask_ark_<product>.pem`).
fn snp_chain(path: &str) -> Result<cvm_measure::snp::TrustedChain, Failure> {
    let text = String::from_utf8_lossy(&read(path, "the SNP certificate chain")?).into_owned();
    let blocks: Vec<&str> = text
        .split_inclusive("-----END CERTIFICATE-----")
        .map(str::trim_start)
        .filter(|b| b.starts_with("-----BEGIN CERTIFICATE-----"))
        .collect();
    let [ask, ark] = blocks[..] else {
        return Err(Failure(
            format!(
                "--snp-chain {path}: expected two PEM certificates (the ASK, then the ARK), found {}",
                blocks.len()
            ),
            1,
        ));
    };
    let cert = |pem: &str, what: &str| {
        cvm_measure::snp::certificate(pem.as_bytes())
            .map_err(|e| Failure(format!("--snp-chain {path}: the {what}: {e}"), 1))
    };
    Ok(cvm_measure::snp::TrustedChain {
        ask: cert(ask, "ASK")?,
        ark: cert(ark, "ARK")?,
    })
}

/// The reference key broker.
fn kbs_serve(args: &[&str]) -> Result<(), Failure> {
    use cvm_measure::broker::{serve_with, Broker, Reference};
    let (o, positional) = options(
        args,
        &[
            "--listen",
            "--resources",
            "--reference",
            "--attestation-keys",
            "--ek-ca",
            "--snp-chain",
            "--tls-cert",
            "--tls-key",
        ],
        &[],
    )?;
    if let Some(p) = positional.first() {
        return Err(usage(format!(
            "kbs-serve takes no positional argument, got {p:?}"
        )));
    }
    let need = |name: &str| {
        o.get(name)
            .copied()
            .ok_or_else(|| usage(format!("kbs-serve needs {name}")))
    };
    let (listen, resources, reference) = (
        need("--listen")?,
        need("--resources")?,
        need("--reference")?,
    );
    if !Path::new(resources).is_dir() {
        return Err(Failure(
            format!("--resources {resources}: not a directory"),
            1,
        ));
    }
    let json: serde_json::Value = serde_json::from_slice(&read(reference, "the reference values")?)
        .map_err(|e| Failure(format!("{reference}: {e}"), 1))?;
    let mut reference_values =
        Reference::from_prediction(&json).map_err(|e| Failure(format!("{reference}: {e}"), 1))?;
    if let Some(path) = o.get("--snp-chain").copied() {
        reference_values.snp_chains.push(snp_chain(path)?);
    }
    if let Some(path) = o.get("--ek-ca").copied() {
        let cas = cvm_measure::x509::pem_chain(&read(path, "the EK CA certificates")?)
            .map_err(|e| Failure(format!("--ek-ca {path}: {e}"), 1))?;
        if cas.is_empty() {
            return Err(Failure(format!("--ek-ca {path}: no certificate"), 1));
        }
        reference_values
            .ek_cas
            .extend(cas.iter().map(|c| c.der().to_vec()));
    }
    let keys = match o.get("--attestation-keys").copied() {
        Some(path) => String::from_utf8_lossy(&read(path, "the attestation keys")?).into_owned(),
        None => String::new(),
    };
    let keys_path = o.get("--attestation-keys").copied().unwrap_or_default();
    for (n, line) in keys.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let point = verity::parse_hex(line)
            .filter(|p| p.len() == 64)
            .ok_or_else(|| {
                Failure(
                    format!(
                        "{keys_path}:{}: expected 128 hex digits (x then y of a P-256 attestation key)",
                        n + 1
                    ),
                    1,
                )
            })?;
        reference_values
            .attestation_keys
            .push((point[..32].to_vec(), point[32..].to_vec()));
    }
    let listener = std::net::TcpListener::bind(listen)
        .map_err(|e| Failure(format!("cannot listen on {listen}: {e}"), 1))?;
    let tls = match (o.get("--tls-cert").copied(), o.get("--tls-key").copied()) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(
            cvm_kbs::tls::server_config(
                &read(cert, "the TLS certificate chain")?,
                &read(key, "the TLS private key")?,
            )
            .map_err(|e| {
                Failure(
                    format!("--tls-cert {cert} --tls-key {key}: {}", chain(&e)),
                    1,
                )
            })?,
        ),
        _ => return Err(usage("--tls-cert and --tls-key go together".into())),
    };
    eprintln!(
        "cvm-measure kbs-serve: listening on {listen} ({}); {} reference PCRs, {} EK CA certificates, {} attestation keys, {} SNP launch digests, resources in {resources}",
        if tls.is_some() { "https" } else { "plain http" },
        reference_values.pcrs.len(),
        reference_values.ek_cas.len(),
        reference_values.attestation_keys.len(),
        reference_values.snp_measurements.len()
    );
    serve_with(
        listener,
        std::sync::Arc::new(Broker::new(resources.into(), reference_values)),
        tls,
    );
    Ok(())
}

fn print_registers(
    regs: &cvm_formats::registers::Registers,
    pcrs: &[usize],
    json: bool,
    rtmrs: bool,
) {
    print_registers_with(regs, pcrs, json, rtmrs, &[])
}

/// The same, with extra named values (JSON fields, or `name value` lines).
fn print_registers_with(
    regs: &cvm_formats::registers::Registers,
    pcrs: &[usize],
    json: bool,
    rtmrs: bool,
    extra: &[(&str, String)],
) {
    use cvm_formats::hex;
    use cvm_formats::registers::Bank;
    if json {
        let mut pcr_map = serde_json::Map::new();
        for &p in pcrs {
            pcr_map.insert(
                p.to_string(),
                serde_json::json!({ "sha256": hex(regs.pcr(Bank::Sha256, p)), "sha384": hex(regs.pcr(Bank::Sha384, p)) }),
            );
        }
        let mut value = serde_json::json!({ "pcr": pcr_map });
        if rtmrs {
            value["rtmr"] = serde_json::json!((0..4)
                .map(|i| (i.to_string(), serde_json::json!(hex(&regs.rtmr[i]))))
                .collect::<serde_json::Map<_, _>>());
        }
        for (name, v) in extra {
            value[*name] = serde_json::json!(v);
        }
        println!("{}", serde_json::to_string_pretty(&value).unwrap());
        return;
    }
    for (name, v) in extra {
        println!("{name} {v}");
    }
    for &p in pcrs {
        for bank in Bank::ALL {
            println!("pcr{p:<2} {:<6} {}", bank.name(), hex(regs.pcr(bank, p)));
        }
    }
    if rtmrs {
        for (i, r) in regs.rtmr.iter().enumerate() {
            println!("rtmr{i:<2}sha384 {}", hex(r));
        }
    }
}

fn replay(args: &[&str]) -> Result<(), Failure> {
    let (o, positional) = options(args, &[], &["--ccel", "--json", "--events"])?;
    let [path] = positional[..] else {
        return Err(usage(format!(
            "replay needs one log, got {}",
            positional.len()
        )));
    };
    let bytes = read(path, "the log")?;
    let json = o.contains_key("--json");
    if o.contains_key("--events") {
        if bytes.first() == Some(&0x1e) {
            return Err(usage(
                "replay --events lists the events of a TCG binary log or a CCEL".into(),
            ));
        }
        let log = cvm_measure::uefi::tcglog::parse(&bytes)
            .map_err(|e| Failure(format!("{path}: {e}"), 1))?;
        print_events(&log, o.contains_key("--ccel"), json);
        return Ok(());
    }
    if o.contains_key("--ccel") {
        let log = cvm_measure::uefi::tcglog::parse(&bytes)
            .map_err(|e| Failure(format!("{path}: {e}"), 1))?;
        let regs = log
            .replay_ccel()
            .map_err(|e| Failure(format!("{path}: {e}"), 1))?;
        print_registers(&regs, &[], json, true);
    } else if bytes.first() == Some(&0x1e) {
        let records =
            cvm_formats::jsonseq::parse(&bytes).map_err(|e| Failure(format!("{path}: {e}"), 1))?;
        let regs = cvm_formats::jsonseq::replay(&records);
        let mut pcrs: Vec<usize> = records.iter().map(|r| r.pcr as usize).collect();
        pcrs.sort();
        pcrs.dedup();
        print_registers(&regs, &pcrs, json, true);
    } else {
        let log = cvm_measure::uefi::tcglog::parse(&bytes)
            .map_err(|e| Failure(format!("{path}: {e}"), 1))?;
        let regs = log
            .replay_tpm()
            .map_err(|e| Failure(format!("{path}: {e}"), 1))?;
        let mut pcrs: Vec<usize> = log
            .events
            .iter()
            .filter(|e| e.event_type != cvm_measure::uefi::tcglog::EV_NO_ACTION)
            .map(|e| e.index as usize)
            .collect();
        pcrs.sort();
        pcrs.dedup();
        print_registers(&regs, &pcrs, json, false);
    }
    Ok(())
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
    verity::parse_hex(&digits).unwrap_or(bytes)
}

fn evidence(args: &[&str]) -> Result<(), Failure> {
    let (o, positional) = options(args, &["--vcek", "--ccel"], &[])?;
    let [path] = positional[..] else {
        return Err(usage(format!(
            "evidence needs one file, got {}",
            positional.len()
        )));
    };
    let bytes = raw_or_hex(read(path, "the evidence")?);
    let fail = |e: &dyn std::error::Error| Failure(format!("{path}: {}", chain(e)), 1);
    if bytes.len() == cvm_formats::snp::REPORT_LEN {
        let report = cvm_formats::snp::Report::parse(&bytes).map_err(|e| fail(&e))?;
        println!("SEV-SNP report version {}", report.version());
        println!("measurement  {}", cvm_formats::hex(report.measurement()));
        println!("report_data  {}", cvm_formats::hex(report.report_data()));
        println!("host_data    {}", cvm_formats::hex(report.host_data()));
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
        println!("chip_id      {}", cvm_formats::hex(report.chip_id()));
        if let Some(cert) = o.get("--vcek") {
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
    if o.contains_key("--vcek") {
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
    println!("mrtd         {}", cvm_formats::hex(&quote.td.mrtd));
    for (i, rtmr) in quote.td.rtmr.iter().enumerate() {
        println!("rtmr{i}        {}", cvm_formats::hex(rtmr));
    }
    println!("report_data  {}", cvm_formats::hex(&quote.td.report_data));
    println!(
        "td_attributes {:#018x}{}",
        quote.td.td_attributes,
        if quote.td.debug() { " (DEBUG)" } else { "" }
    );
    println!("signature    not checked (needs Intel's PCK collateral)");
    if let Some(ccel) = o.get("--ccel") {
        let log = cvm_measure::uefi::tcglog::parse(&read(ccel, "the CC event log")?)
            .map_err(|e| Failure(format!("{ccel}: {e}"), 1))?;
        let regs = log
            .replay_ccel()
            .map_err(|e| Failure(format!("{ccel}: {e}"), 1))?;
        for i in 0..4 {
            if regs.rtmr[i] != quote.td.rtmr[i] {
                return Err(Failure(
                    format!(
                        "RTMR{i} of the quote is {} but the replay of {ccel} gives {}",
                        cvm_formats::hex(&quote.td.rtmr[i]),
                        cvm_formats::hex(&regs.rtmr[i])
                    ),
                    1,
                ));
            }
        }
        println!("rtmrs        equal the replay of {ccel}");
    }
    Ok(())
}
