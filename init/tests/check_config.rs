//! `cvm-init check-config` against the boot: every rejection the boot performs on a
//! configuration file or a command line has a case here, and the command prints the message
//! the boot's own code produces for it (computed here through the library, as the boot does).

use std::path::Path;
use std::process::Command;

use cvm_init::boot::ConfigError;
use cvm_init::config::{parse_cmdline, parse_config_bytes};
use cvm_init::logger::chain;

const SERVICE: &str = "[[service]]\nname = \"app\"\npath = \"/usr/bin/app\"\n";
const STATE_TPM: &str = "[state]\nserial = \"cvm-state\"\nkey = \"tpm\"\n";
const KBS_STATE: &str = "[state]\nserial = \"cvm-state\"\nkey = \"kbs\"\n";
const PIN: &str =
    "public_key_sha256 = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n";

fn run(file: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cvm-init"))
        .arg("check-config")
        .arg(file)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Path, text: &str) -> std::path::PathBuf {
    let file = dir.join("config.toml");
    std::fs::write(&file, text).unwrap();
    file
}

/// The message the boot puts on the console for this file and command line (the `config` or
/// `config-file` phase), through the same functions the boot calls.
fn boot_message(file: &Path, text: &str, cmdline: &str) -> String {
    if let Err(e) = parse_cmdline(cmdline.as_bytes()) {
        return format!("phase config failed: {}", chain(&ConfigError::from(e)));
    }
    match parse_config_bytes(file, Some(text.as_bytes())) {
        Err(e) => format!("phase config-file failed: {}", chain(&ConfigError::from(e))),
        Ok(_) => panic!("the boot accepts {text:?} with {cmdline:?}"),
    }
}

/// Each case: the file, the command line, and what the message must name.
fn file_and_cmdline_rejections() -> Vec<(String, &'static str, &'static str)> {
    let s = |t: &str| t.to_string();
    vec![
        // The file's syntax and shape.
        (s("this is not toml"), "", "is not valid configuration"),
        (s("frobnicate = 1\n"), "", "unknown field `frobnicate`"),
        (format!("{SERVICE}colour = \"red\"\n"), "", "unknown field `colour`"),
        // Top-level fields.
        (s("modules = [\"a/b\"]\n"), "", "modules = \"a/b\""),
        (s("service_log_dir = \"log\"\n"), "", "service_log_dir = \"log\""),
        (s("service_log_max_bytes = 100\n"), "", "service_log_max_bytes = \"100\""),
        // Services.
        (s("[[service]]\nname = \"Bad Name\"\npath = \"/x\"\n"), "", "service[0].name"),
        (format!("{SERVICE}{SERVICE}"), "", "a name no other service has"),
        (s("[[service]]\nname = \"app\"\npath = \"app\"\n"), "", "service[0].path"),
        (format!("{SERVICE}env = {{ \"1X\" = \"v\" }}\n"), "", "service[0].env"),
        (format!("{SERVICE}env = {{ \"X\" = \"a\\u0000b\" }}\n"), "", "service[0].env.X"),
        (format!("{SERVICE}args = [\"a\\u0000b\"]\n"), "", "service[0].args"),
        (format!("{SERVICE}stop_timeout_ms = 5\n"), "", "service[0].stop_timeout_ms"),
        (format!("{SERVICE}ready_timeout_ms = 5\n"), "", "service[0].ready_timeout_ms"),
        (format!("{SERVICE}workdir = \"rel\"\n"), "", "service[0].workdir"),
        (format!("{SERVICE}ready_socket = \"rel.sock\"\n"), "", "service[0].ready_socket"),
        (format!("{SERVICE}after = [\"later\"]\n"), "", "service[0].after"),
        (format!("{SERVICE}oom_score_adj = 5000\n"), "", "service[0].oom_score_adj"),
        (format!("{SERVICE}cgroup = {{ cpu_weight = 0 }}\n"), "", "service[0].cgroup.cpu_weight"),
        // The state disk.
        (s("[state]\nserial = \"\"\nkey = \"tpm\"\n"), "", "state.serial"),
        (format!("{STATE_TPM}serial2 = 1\n"), "", "unknown field `serial2`"),
        (s("[state]\nserial = \"s\"\nkey = \"magic\"\n"), "", "unknown variant `magic`"),
        (s("[state]\nserial = \"s\"\nkey = \"ephemeral\"\ntpm_in_tee = true\n"), "", "state.tpm_in_tee"),
        (format!("{STATE_TPM}integrity = \"none\"\nwipe = true\n"), "", "state.wipe"),
        (format!("{STATE_TPM}mount = \"/\"\n"), "", "state.mount"),
        (format!("{STATE_TPM}binds = [\"var/lib\"]\n"), "", "state.binds"),
        (format!("{STATE_TPM}mkfs = [\"mkfs.ext4\"]\n"), "", "state.mkfs"),
        (format!("{STATE_TPM}overlays = [\"/opt/a,b\"]\n"), "", "state.overlays"),
        (format!("{STATE_TPM}binds = [\"/opt/a\"]\noverlays = [\"/opt/a\"]\n"), "", "state.overlays"),
        (format!("{STATE_TPM}mkfs = [\"/sbin/mke2fs\", \"-E\", \"lazy_journal_init=1\"]\n"), "", "lazy_journal_init=1"),
        (s(KBS_STATE), "", "a [kbs] section naming the key broker"),
        // The key broker.
        (format!("{STATE_TPM}[kbs]\nurl = \"https://kbs:8080\"\nresource = \"a/b/c\"\n{PIN}[[kbs.file]]\nresource = \"a/b/d\"\npath = \"/run/f\"\n"), "", "kbs.file"),
        (format!("{KBS_STATE}[kbs]\nurl = \"ftp://kbs\"\nresource = \"a/b/c\"\n{PIN}"), "", "kbs.url"),
        (format!("{KBS_STATE}[kbs]\nurl = \"http://kbs:8080\"\nresource = \"a/b/c\"\nplain_http = true\n"), "", "kbs.plain_http"),
        (format!("{KBS_STATE}[kbs]\nurl = \"http://kbs:8080\"\nresource = \"a/b/c\"\n"), "", "kbs.url"),
        (format!("{KBS_STATE}[kbs]\nurl = \"https://kbs:8080\"\nresource = \"a/b/c\"\nplain_http = true\n{PIN}"), "", "kbs.plain_http"),
        (format!("{KBS_STATE}[kbs]\nurl = \"https://kbs:8080\"\nresource = \"a/b/c\"\n"), "", "kbs.ca"),
        (format!("{KBS_STATE}[kbs]\nurl = \"https://kbs:8080\"\nresource = \"a/b/c\"\nca = \"ca.pem\"\n"), "", "kbs.ca"),
        (format!("{KBS_STATE}[kbs]\nurl = \"https://kbs:8080\"\nresource = \"a/b/c\"\npublic_key_sha256 = \"abc\"\n"), "", "kbs.public_key_sha256"),
        (format!("{KBS_STATE}[kbs]\nurl = \"https://kbs:8080\"\nresource = \"a/b\"\n{PIN}"), "", "kbs.resource"),
        (format!("{KBS_STATE}[kbs]\nurl = \"https://kbs:8080\"\nresource = \"a/b/c\"\n{PIN}[[kbs.file]]\nresource = \"x\"\npath = \"/run/f\"\n"), "", "kbs.file[0].resource"),
        (format!("{KBS_STATE}[kbs]\nurl = \"https://kbs:8080\"\nresource = \"a/b/c\"\n{PIN}[[kbs.file]]\nresource = \"a/b/d\"\npath = \"/etc/f\"\n"), "", "kbs.file[0].path"),
        (format!("{KBS_STATE}[kbs]\nurl = \"https://kbs:8080\"\nresource = \"a/b/c\"\n{PIN}[[kbs.file]]\nresource = \"a/b/d\"\npath = \"/run/f\"\nmode = 0o644\n"), "", "kbs.file[0].mode"),
        // The network.
        (s("[network]\naddress = \"10.0.0.1\"\n"), "", "network.address"),
        (s("[network]\ngateway = \"10.0.0.1\"\n"), "", "network.gateway"),
        (s("[network]\ninterface = \"a-very-long-interface-name\"\n"), "", "network.interface"),
        (s("[network]\nhostname = \"bad_name!\"\n"), "", "network.hostname"),
        (s("[network]\nsearch = [\"bad domain\"]\n"), "", "network.search"),
        (s("[network]\ndns = [\"1.1.1.1\", \"1.1.1.2\", \"1.1.1.3\", \"1.1.1.4\"]\n"), "", "network.dns"),
        (s("[network]\nmtu = 100\n"), "", "network.mtu"),
        (s("[network]\nlink_timeout_s = 0\n"), "", "network.link_timeout_s"),
        (s("[network]\ndhcp_timeout_s = 99999\n"), "", "network.dhcp_timeout_s"),
        // The command line.
        (s(""), "quiet cvm.frobnicate=1", "unknown option cvm.frobnicate"),
        (s(""), "cvm.loglevel=loud", "cvm.loglevel=\"loud\""),
        (s(""), "cvm.debug cvm.debug", "cvm.debug appears twice"),
        (s(""), "cvm.tee=sgx", "cvm.tee"),
        (s(""), "cvm.drivers=e1000", "cvm.drivers"),
        (s(""), "roothash=abcd", "roothash"),
        (s(""), "cvm.root-partuuid=nope", "cvm.root-partuuid"),
        (s(""), "cvm.verity-corruption=ignore", "cvm.verity-corruption"),
        (s(""), "cvm.hostname=-bad-", "cvm.hostname"),
        (s(""), "cvm.modules=a/b", "cvm.modules"),
        (s(""), "cvm.verity-partuuid=nope", "cvm.verity-partuuid"),
        (s(""), "cvm.net.interface=", "cvm.net.interface"),
        (s(""), "cvm.test-panic=modules", "cvm.test-panic"),
    ]
}

#[test]
fn every_file_and_command_line_rejection_prints_the_boots_message() {
    let dir = tempfile::tempdir().unwrap();
    for (text, cmdline, names) in file_and_cmdline_rejections() {
        let file = write(dir.path(), &text);
        let expected = boot_message(&file, &text, cmdline);
        assert!(
            expected.contains(names),
            "{expected:?} does not name {names:?}"
        );
        let (code, out, err) = run(&file, &["--cmdline", cmdline]);
        assert_eq!(code, 1, "{text:?} {cmdline:?}: {err}");
        assert_eq!(out, "", "{text:?}");
        assert_eq!(
            err,
            format!("cvm-init: check-config: {expected}\n"),
            "{text:?} {cmdline:?}"
        );
    }
}

/// The decisions that depend on the machine: the TEE `cvm.tee` measures into there, and the
/// state disk's key source against it, with the state phase's messages.
#[test]
fn machine_dependent_refusals_name_the_machine_and_fail_where_required() {
    let dir = tempfile::tempdir().unwrap();
    let tpm = write(dir.path(), STATE_TPM);

    // key = "tpm" with auto: a vTPM VM boots; SNP and TDX refuse, a bare machine finds no TEE.
    let (code, out, err) = run(&tpm, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("vtpm (measuring into tpm)"), "{out}");
    assert!(
        err.contains("would not boot on snp (an SEV-SNP guest): phase state failed: state.key = \"tpm\" is refused with cvm.tee=snp"),
        "{err}"
    );
    assert!(err.contains("would not boot on tdx"), "{err}");
    assert!(
        err.contains("would not boot on bare (a machine with no TEE and no TPM): phase measure failed: no TEE found"),
        "{err}"
    );
    // Required on SNP: refused, exit 1.
    let (code, _, err) = run(&tpm, &["--on", "snp"]);
    assert_eq!(code, 1);
    assert!(err.contains("refused on snp"), "{err}");
    // cvm.tee=tpm does not make an SNP guest's vTPM any less the host's.
    let (code, _, err) = run(&tpm, &["--on=snp", "--cmdline", "cvm.tee=tpm"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("is refused with cvm.tee=tpm on a snp guest"),
        "{err}"
    );
    // Stated to be inside the TEE: SNP boots.
    let in_tee = write(dir.path(), &format!("{STATE_TPM}tpm_in_tee = true\n"));
    let (code, out, err) = run(&in_tee, &["--on", "snp", "--on", "tdx"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("snp (measuring into snp)"), "{out}");
    // cvm.tee=none with key = "tpm": the seal would bind to nothing; refused on every machine.
    let (code, _, err) = run(&tpm, &["--cmdline", "cvm.tee=none"]);
    assert_eq!(code, 1);
    assert!(err.contains("boots on no kind of machine"), "{err}");
    assert!(
        err.contains("this boot measures nothing into the vTPM's PCRs"),
        "{err}"
    );
    // A key broker needs evidence: cvm.tee=none has none.
    let kbs = write(
        dir.path(),
        &format!("{KBS_STATE}[kbs]\nurl = \"https://kbs:8080\"\nresource = \"a/b/c\"\n{PIN}"),
    );
    let (code, _, err) = run(&kbs, &["--cmdline", "cvm.tee=none", "--on", "vtpm"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("refused on vtpm") && err.contains("phase state failed"),
        "{err}"
    );
    let (code, out, err) = run(&kbs, &["--on", "snp", "--on", "tdx", "--on", "vtpm"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("key kbs"), "{out}");
}

#[test]
fn a_good_file_gets_a_summary_or_its_json_with_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let image = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/node.toml");
    let (code, out, err) = run(
        &image,
        &[
            "--cmdline",
            "console=ttyS0 panic=-1 loglevel=4 printk.devkmsg=on",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains(": ok: 2 service(s) [containerd, kubelet]"),
        "{out}"
    );

    // The configuration for joining a cluster boots wherever there is evidence for the broker.
    let join = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/join.toml");
    let (code, out, err) = run(&join, &["--on", "snp", "--on", "tdx", "--on", "vtpm"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("(key kbs, mounted at /var/lib/cvm-state)"),
        "{out}"
    );

    let file = write(dir.path(), &format!("{SERVICE}{STATE_TPM}"));
    let (code, out, err) = run(&file, &["--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    // Defaults filled in: the mount point, the integrity choice, the log size, the timeouts.
    assert_eq!(json["state"]["mount"], "/var/lib/cvm-state");
    assert_eq!(json["service_log_max_bytes"], 4 << 20);
    assert!(json["state"]["integrity"].is_string(), "{json}");
    assert!(json["service"][0]["stop_timeout_ms"].is_u64(), "{json}");
}

#[test]
fn usage_errors_exit_2_and_a_missing_file_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), SERVICE);
    for args in [
        vec!["--on", "sgx"],
        vec!["--frobnicate"],
        vec!["--cmdline"],
        vec!["--cmdline", "a", "--cmdline", "b"],
        vec!["second.toml"],
    ] {
        let (code, _, err) = run(&file, &args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.starts_with("cvm-init: check-config: "), "{err}");
    }
    let (code, _, err) = run(&dir.path().join("missing.toml"), &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot read") && err.contains("missing.toml"),
        "{err}"
    );
}

/// `make image` checks the configuration it bakes in first (`scripts/image.sh check`, which its
/// `build` runs before mkosi), with the image's kernel command line, and stops on a refusal.
#[test]
fn the_image_build_checks_its_configuration_first() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("scripts/image.sh");
    let text = std::fs::read_to_string(&script).unwrap();
    let build = text.find("\nbuild() {").expect("image.sh has build()");
    let body = &text[build..];
    assert!(
        body.find("check_config").unwrap() < body.find("mkosi_build").unwrap(),
        "build() must check the configuration before mkosi runs"
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "[state]\nserial = \"s\"\nkey = \"magic\"\n");
    let image = |config: &Path| {
        Command::new("bash")
            .arg(&script)
            .arg("check")
            .env("CONFIG", config)
            .env("INIT", env!("CARGO_BIN_EXE_cvm-init"))
            .output()
            .unwrap()
    };
    let out = image(&bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unknown variant `magic`"), "{err}");
    assert!(err.contains("nothing was built"), "{err}");
    let out = image(&root.join("image/node.toml"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("command line: console=ttyS0"), "{text}");
}

/// `make image PCR_KEY=`: a configuration with the signed policy needs the key (no boot of an
/// unsigned image could open its disk), and the key must be one a TPM verifies; both are
/// refused before anything is built.
#[test]
fn the_image_build_refuses_a_signed_policy_without_a_usable_key() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let signed = write(
        dir.path(),
        "[state]\nserial = \"s\"\nkey = \"tpm\"\ntpm_policy = \"signed\"\n",
    );
    let key = |name: &str, args: &[&str]| {
        let path = dir.path().join(name);
        let out = Command::new("openssl")
            .args(["genpkey", "-out"])
            .arg(&path)
            .args(args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "{out:?}");
        path
    };
    let p256 = key(
        "p256.pem",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let rsa1024 = key(
        "rsa1024.pem",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
    );
    let image = |config: &Path, pcr_key: Option<&Path>| {
        let mut command = Command::new("bash");
        command
            .arg(root.join("scripts/image.sh"))
            .arg("check")
            .env("CONFIG", config)
            .env("INIT", env!("CARGO_BIN_EXE_cvm-init"))
            .env_remove("PCR_KEY");
        if let Some(k) = pcr_key {
            command.env("PCR_KEY", k);
        }
        let out = command.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = image(&signed, None);
    assert!(!ok, "{text}");
    assert!(
        text.contains("sets state.tpm_policy = \"signed\" but no PCR_KEY was given")
            && text.contains("nothing was built"),
        "{text}"
    );
    let (ok, text) = image(&signed, Some(&rsa1024));
    assert!(!ok, "{text}");
    assert!(
        text.contains("(1024 bit, 2 primes): expected RSA-2048 or ECDSA P-256"),
        "{text}"
    );
    let not_a_key = dir.path().join("not-a-key.pem");
    std::fs::write(&not_a_key, "not a key\n").unwrap();
    let (ok, text) = image(&signed, Some(&not_a_key));
    assert!(!ok && text.contains("not a private key in PEM"), "{text}");
    let (ok, text) = image(&signed, Some(&p256));
    assert!(ok, "{text}");
    // The key without the policy: built, and the builder is told the node will not use it.
    let (ok, text) = image(&root.join("image/node.toml"), Some(&p256));
    assert!(ok, "{text}");
    assert!(text.contains("the node does not use it"), "{text}");
}
