//! Configuration from measured inputs only: the kernel command line (part of the UKI) and the
//! configuration file in the measured image. Every `cvm.*` option is validated; an unknown or
//! malformed one stops the boot with an error that names it.
//!
//! One module per part: `cmdline` (the `cvm.*` options), and the file's sections `service`,
//! `state`, `kbs` and `network`, each with its own `validate`; `ConfigFile::validate` calls
//! them, from the one place the file is parsed.

mod cmdline;
mod kbs;
mod network;
mod service;
mod state;

pub use cmdline::*;
pub use kbs::*;
pub use service::*;
pub use state::*;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the init reads its configuration file (inside the measured image).
pub const CONFIG_PATH: &str = "/etc/cvm-init/config.toml";

/// A field the configuration refuses: its name, the value found and what was expected.
#[derive(Debug)]
pub struct Invalid {
    pub field: String,
    pub value: String,
    pub expected: &'static str,
}

fn invalid(field: String, value: &str, expected: &'static str) -> Invalid {
    Invalid {
        field,
        value: value.to_string(),
        expected,
    }
}

/// The configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Extra kernel modules to load.
    #[serde(default)]
    pub modules: Vec<String>,
    /// The services, started in this order and stopped in reverse.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// The encrypted state disk; without it the node keeps no state.
    #[serde(default)]
    pub state: Option<StateConfig>,
    /// The node's network (DHCP, or a static address); without it, loopback only.
    #[serde(default)]
    pub network: Option<crate::net::NetworkConfig>,
    /// The key broker of the `kbs` key source.
    #[serde(default)]
    pub kbs: Option<KbsConfig>,
    /// Where each service's output is also written, as `<name>.log` (a directory on the
    /// state disk, such as /var/log/cvm); without it, output goes to the console only.
    #[serde(default)]
    pub service_log_dir: Option<PathBuf>,
    /// A service log is rotated (one previous generation kept) when it reaches this size.
    #[serde(default = "default_service_log_max_bytes")]
    pub service_log_max_bytes: u64,
}

fn default_service_log_max_bytes() -> u64 {
    4 << 20
}

impl ConfigFile {
    /// The file's checks, in one place: its own fields, then each section's `validate`.
    pub fn validate(&self) -> Result<(), Invalid> {
        let config = self;
        for module in &config.modules {
            if !cmdline::is_module_name(module) {
                return Err(invalid(
                    "modules".into(),
                    module,
                    "module names of [A-Za-z0-9_-]",
                ));
            }
        }
        for (i, service) in config.services.iter().enumerate() {
            service.validate(i, &config.services[..i])?;
        }
        if let Some(dir) = config.service_log_dir.as_ref().filter(|d| !d.is_absolute()) {
            return Err(invalid(
                "service_log_dir".into(),
                &dir.to_string_lossy(),
                "an absolute path",
            ));
        }
        if config.service_log_max_bytes < 4096 {
            return Err(invalid(
                "service_log_max_bytes".into(),
                &config.service_log_max_bytes.to_string(),
                "at least 4096",
            ));
        }
        if let Some(state) = &config.state {
            state.validate(config.kbs.is_some())?;
        }
        if let Some(kbs) = &config.kbs {
            let kbs_key = config
                .state
                .as_ref()
                .is_some_and(|s| s.key == KeySourceChoice::Kbs);
            kbs.validate(kbs_key)?;
        }
        if let Some(network) = &config.network {
            network::validate(network)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid configuration: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {field} = {value:?} is invalid: expected {expected}")]
    Invalid {
        path: PathBuf,
        field: String,
        value: String,
        expected: &'static str,
    },
}

/// Reads the configuration file's bytes; `None` when there is none.
pub fn read_config_bytes(path: &Path) -> Result<Option<Vec<u8>>, ConfigFileError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConfigFileError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Parses the bytes read by [`read_config_bytes`]: no file means no services and no extra
/// modules.
pub fn parse_config_bytes(
    path: &Path,
    bytes: Option<&[u8]>,
) -> Result<ConfigFile, ConfigFileError> {
    let Some(bytes) = bytes else {
        return Ok(ConfigFile::default());
    };
    let text = std::str::from_utf8(bytes).map_err(|e| ConfigFileError::Syntax {
        path: path.to_path_buf(),
        message: format!("not UTF-8: {e}"),
    })?;
    parse_config_file(path, text)
}

pub fn parse_config_file(path: &Path, text: &str) -> Result<ConfigFile, ConfigFileError> {
    let config: ConfigFile = toml::from_str(text).map_err(|e| ConfigFileError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().replace('\n', " "),
    })?;
    config.validate().map_err(|e| ConfigFileError::Invalid {
        path: path.to_path_buf(),
        field: e.field,
        value: e.value,
        expected: e.expected,
    })?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::LevelFilter;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<BootOptions, CmdlineError> {
        parse_cmdline(s.as_bytes())
    }

    #[test]
    fn kernel_parameters_are_ignored() {
        let o = parse("console=ttyS0 quiet root=/dev/vda rootflags=ro \"foo=bar baz\"").unwrap();
        assert_eq!(o, BootOptions::default());
    }

    #[test]
    fn known_options_are_typed() {
        let o = parse("cvm.debug cvm.loglevel=debug cvm.modules=button,evdev").unwrap();
        assert!(o.debug);
        assert_eq!(o.log_level, LevelFilter::Debug);
        assert_eq!(o.modules, vec!["button", "evdev"]);
    }

    #[test]
    fn quoted_values_are_unquoted() {
        let o = parse("cvm.modules=\"a,b\"").unwrap();
        assert_eq!(o.modules, vec!["a", "b"]);
    }

    #[test]
    fn unknown_option_is_named() {
        let e = parse("quiet cvm.frobnicate=1").unwrap_err();
        assert_eq!(e.key(), "cvm.frobnicate");
        assert!(e.to_string().contains("cvm.frobnicate"), "{e}");
    }

    #[test]
    fn drivers_are_narrowed_only_to_known_ones() {
        assert_eq!(
            parse("").unwrap().drivers.len(),
            crate::modules::HARDWARE.len()
        );
        assert_eq!(
            parse("cvm.drivers=nvme,gve").unwrap().drivers,
            ["nvme", "gve"]
        );
        for bad in [
            "cvm.drivers=nvme,e1000",
            "cvm.drivers=",
            "cvm.drivers=nvme,,gve",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.key(), "cvm.drivers", "{bad}");
            assert!(e.to_string().contains("one of virtio_blk"), "{e}");
        }
        // The form the error names is written out by hand: it must list every driver.
        let (_, form) = OPTIONS.iter().find(|(k, _)| *k == "cvm.drivers").unwrap();
        for driver in crate::modules::HARDWARE {
            assert!(form.contains(driver), "{driver} missing from {form:?}");
        }
    }

    #[test]
    fn malformed_values_name_key_value_and_form() {
        let e = parse("cvm.loglevel=loud").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("cvm.loglevel=\"loud\""), "{text}");
        assert!(text.contains("one of error, warn, info, debug"), "{text}");
        assert_eq!(parse("cvm.debug=1").unwrap_err().key(), "cvm.debug");
        assert_eq!(parse("cvm.loglevel").unwrap_err().key(), "cvm.loglevel");
        assert_eq!(parse("cvm.modules=a,,b").unwrap_err().key(), "cvm.modules");
        assert_eq!(parse("cvm.modules=a/b").unwrap_err().key(), "cvm.modules");
    }

    #[test]
    fn root_options_are_typed() {
        let hash = "ab".repeat(32);
        let o = parse(&format!(
            "roothash={hash} cvm.root-partuuid=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709 cvm.verity-corruption=panic"
        ))
        .unwrap();
        assert_eq!(o.root_hash, Some([0xab; 32]));
        assert_eq!(
            o.root_partuuid.unwrap().to_string(),
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
        );
        assert_eq!(o.verity_corruption, CorruptionPolicy::Panic);
        assert_eq!(parse("roothash=abcd").unwrap_err().key(), "roothash");
        assert_eq!(
            parse(&format!("roothash={}", "zz".repeat(32)))
                .unwrap_err()
                .key(),
            "roothash"
        );
        assert_eq!(
            parse("cvm.root-partuuid=nope").unwrap_err().key(),
            "cvm.root-partuuid"
        );
        assert_eq!(
            parse("cvm.verity-corruption=ignore").unwrap_err().key(),
            "cvm.verity-corruption"
        );
    }

    #[test]
    fn duplicates_are_rejected() {
        let e = parse("cvm.debug cvm.debug").unwrap_err();
        assert_eq!(
            e,
            CmdlineError::Duplicate {
                key: "cvm.debug".into()
            }
        );
    }

    #[test]
    fn parameters_after_double_dash_belong_to_init() {
        assert_eq!(
            parse("quiet -- cvm.nonsense").unwrap(),
            BootOptions::default()
        );
    }

    #[test]
    fn debug_is_found_on_a_malformed_line() {
        assert!(cmdline_has_debug(b"cvm.bogus cvm.debug"));
        assert!(!cmdline_has_debug(b"cvm.debug=0"));
    }

    #[cfg(not(feature = "test-hooks"))]
    #[test]
    fn test_hooks_are_unknown_in_release_builds() {
        assert_eq!(
            parse("cvm.test-panic=modules").unwrap_err().key(),
            "cvm.test-panic"
        );
    }

    proptest! {
        /// Arbitrary bytes never panic; a rejection always names a `cvm.` option.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Err(e) = parse_cmdline(&bytes) {
                prop_assert!(e.key().starts_with("cvm.") || e.key() == "roothash");
                prop_assert!(e.to_string().contains(e.key()));
            }
        }

        /// Text shaped like a command line: every bad `cvm.` option is named in the error.
        #[test]
        fn bad_option_is_always_named(
            before in "[a-z=. ]{0,40}",
            name in "[a-z]{1,12}",
            value in "[ -~]{0,16}",
            after in "[a-z=. ]{0,40}",
        ) {
            let key = format!("cvm.x{name}");
            let line = format!("{before} {key}={value} {after}");
            let e = parse(&line).unwrap_err();
            prop_assert!(e.to_string().contains(e.key()));
            // Only the injected option or a cvm.* token from `before` can be at fault.
            prop_assert!(e.key() == key || before.contains(e.key()));
        }
    }

    const GOOD: &str = r#"
modules = ["evdev"]

[[service]]
name = "payload"
path = "/bin/payload"
args = ["serve"]
env = { GREETING = "hello" }
restart = "on-failure"
"#;

    #[test]
    fn config_file_parses() {
        let c = parse_config_file(Path::new("c.toml"), GOOD).unwrap();
        assert_eq!(c.modules, vec!["evdev"]);
        assert_eq!(c.services.len(), 1);
        let s = &c.services[0];
        assert_eq!(s.restart, RestartPolicy::OnFailure);
        assert_eq!(s.stop_timeout_ms, 5000);
        assert_eq!(s.env.get("GREETING").unwrap(), "hello");
    }

    #[test]
    fn config_file_rejects_unknown_fields_and_bad_values() {
        let p = Path::new("c.toml");
        let e = parse_config_file(
            p,
            "[[service]]\nname=\"a\"\npath=\"/a\"\nrestrat=\"always\"",
        )
        .unwrap_err();
        assert!(e.to_string().contains("restrat"), "{e}");
        let e = parse_config_file(p, "[[service]]\nname=\"A b\"\npath=\"/a\"").unwrap_err();
        assert!(e.to_string().contains("service[0].name"), "{e}");
        // Named like the init, a workload's forwarded lines would read as the init's markers.
        let e = parse_config_file(p, "[[service]]\nname=\"cvm-init\"\npath=\"/a\"").unwrap_err();
        assert!(e.to_string().contains("service[0].name"), "{e}");
        let e = parse_config_file(p, "[[service]]\nname=\"a\"\npath=\"rel\"").unwrap_err();
        assert!(e.to_string().contains("service[0].path"), "{e}");
        let two = "[[service]]\nname=\"a\"\npath=\"/a\"\n[[service]]\nname=\"a\"\npath=\"/b\"";
        let e = parse_config_file(p, two).unwrap_err();
        assert!(e.to_string().contains("service[1].name"), "{e}");
        let e = parse_config_file(
            p,
            "[[service]]\nname=\"a\"\npath=\"/a\"\nrestart=\"sometimes\"",
        )
        .unwrap_err();
        assert!(e.to_string().contains("sometimes"), "{e}");
    }

    #[test]
    fn network_sections_are_checked_by_field() {
        let p = Path::new("c.toml");
        let dhcp = parse_config_file(p, "[network]\n")
            .unwrap()
            .network
            .unwrap();
        assert_eq!(dhcp, crate::net::NetworkConfig::default());
        assert_eq!(dhcp.on_no_lease, crate::net::NoLease::Wait);
        let full = parse_config_file(
            p,
            "[network]\ninterface = \"eth1\"\nhostname = \"node-a\"\ndns = [\"10.0.0.53\"]\nsearch = [\"lan.test\"]\nmtu = 1400\non_no_lease = \"continue\"\ndhcp_timeout_s = 5\n",
        )
        .unwrap()
        .network
        .unwrap();
        assert_eq!(full.on_no_lease, crate::net::NoLease::Continue);
        assert_eq!(full.mtu, Some(1400));
        for (text, field) in [
            ("address = \"10.0.2.15\"", "network.address"),
            ("gateway = \"10.0.2.2\"", "network.gateway"),
            ("interface = \"eth/0\"", "network.interface"),
            ("hostname = \"node_a\"", "network.hostname"),
            ("search = [\"-bad\"]", "network.search"),
            (
                "dns = [\"1.1.1.1\", \"1.0.0.1\", \"8.8.8.8\", \"9.9.9.9\"]",
                "network.dns",
            ),
            ("mtu = 100", "network.mtu"),
            ("dhcp_timeout_s = 0", "network.dhcp_timeout_s"),
            ("link_timeout_s = 99999", "network.link_timeout_s"),
        ] {
            let e = parse_config_file(p, &format!("[network]\n{text}\n")).unwrap_err();
            assert_eq!(invalid_field(e), field, "{text}");
        }
        let e = parse_config_file(p, "[network]\non_no_lease = \"panic\"\n").unwrap_err();
        assert!(e.to_string().contains("panic"), "{e}");
        // A static address with its gateway is fine.
        parse_config_file(
            p,
            "[network]\naddress = \"10.0.2.15/24\"\ngateway = \"10.0.2.2\"\n",
        )
        .unwrap();
    }

    #[test]
    fn network_options_on_the_command_line() {
        let o = parse("cvm.hostname=node-a cvm.net.interface=ens3").unwrap();
        assert_eq!(o.net.hostname.as_deref(), Some("node-a"));
        assert_eq!(o.net.interface.as_deref(), Some("ens3"));
        for bad in [
            "cvm.hostname=node_a",
            "cvm.hostname=",
            "cvm.net.interface=a/b",
            "cvm.net.interface=averyveryverylongname",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.to_string().contains("malformed"), "{bad}: {e}");
        }
    }

    fn state(extra: &str) -> Result<ConfigFile, ConfigFileError> {
        parse_config_file(
            Path::new("/etc/cvm-init.toml"),
            &format!("[state]\nserial = \"cvm-state\"\nkey = \"tpm\"\n{extra}"),
        )
    }

    fn invalid_field(e: ConfigFileError) -> String {
        match e {
            ConfigFileError::Invalid { field, .. } => field,
            other => panic!("not an invalid field: {other}"),
        }
    }

    #[test]
    fn the_state_disk_defaults_to_integrity_without_wipe() {
        let cfg = state("").unwrap().state.unwrap();
        assert_eq!(cfg.integrity, IntegrityChoice::HmacSha256);
        assert!(!cfg.wipe);
        assert!(cfg.unwritten_blocks_fail());
        let mkfs = cfg.mkfs_command().join(" ");
        assert!(mkfs.contains("lazy_journal_init=0"), "{mkfs}");
        assert!(mkfs.contains("-J size=16"), "{mkfs}");
        let plain = state("integrity = \"none\"").unwrap().state.unwrap();
        assert!(!plain.unwritten_blocks_fail());
        assert!(plain
            .mkfs_command()
            .join(" ")
            .contains("lazy_journal_init=1"));
        let wiped = state("wipe = true").unwrap().state.unwrap();
        assert!(!wiped.unwritten_blocks_fail());
    }

    fn kbs(section: &str) -> Result<ConfigFile, ConfigFileError> {
        parse_config_file(
            Path::new("/etc/cvm-init.toml"),
            &format!("[state]\nserial = \"cvm-state\"\nkey = \"kbs\"\n\n[kbs]\nresource = \"r/t/k\"\n{section}"),
        )
    }

    #[test]
    fn key_broker_trust_and_files_are_checked() {
        let pin = "ab".repeat(32);
        kbs("url = \"https://kbs.example:8080\"\nca = \"/etc/cvm/ca.pem\"").unwrap();
        kbs(&format!(
            "url = \"https://10.0.0.1:8080\"\npublic_key_sha256 = \"{pin}\""
        ))
        .unwrap();
        let tls = "url = \"https://h:1\"\nca = \"/c.pem\"";
        let file = "[[kbs.file]]\nresource = \"default/kubelet/bootstrap\"";
        let ok = kbs(&format!(
            "{tls}\n{file}\npath = \"/run/kubelet/kubeconfig\""
        ))
        .unwrap();
        assert_eq!(ok.kbs.unwrap().files[0].mode, 0o600);
        for (section, field) in [
            ("url = \"https://h:1\"", "kbs.ca"),
            (
                &*format!("url = \"https://h:1\"\nca = \"/c.pem\"\npublic_key_sha256 = \"{pin}\""),
                "kbs.ca",
            ),
            ("url = \"https://h:1\"\nca = \"c.pem\"", "kbs.ca"),
            (
                "url = \"https://h:1\"\npublic_key_sha256 = \"abc\"",
                "kbs.public_key_sha256",
            ),
            (
                "url = \"https://h:1\"\nca = \"/c.pem\"\nplain_http = true",
                "kbs.plain_http",
            ),
            ("url = \"https://h\"\nca = \"/c.pem\"", "kbs.url"),
            ("url = \"https://user@h:1\"\nca = \"/c.pem\"", "kbs.url"),
            ("url = \"ftp://h:1\"", "kbs.url"),
            (
                &*format!("{tls}\n{file}\npath = \"/var/lib/k\""),
                "kbs.file[0].path",
            ),
            (
                &*format!("{tls}\n{file}\npath = \"/run/../etc/k\""),
                "kbs.file[0].path",
            ),
            (
                &*format!("{tls}\n{file}\npath = \"/run\""),
                "kbs.file[0].path",
            ),
            (
                &*format!("{tls}\n{file}\npath = \"/run/k\"\nmode = 0o644"),
                "kbs.file[0].mode",
            ),
            (
                &*format!("{tls}\n[[kbs.file]]\nresource = \"../x/y\"\npath = \"/run/k\""),
                "kbs.file[0].resource",
            ),
        ] {
            assert_eq!(invalid_field(kbs(section).unwrap_err()), field, "{section}");
        }
        // Files come only with the session that releases the disk key.
        let e = parse_config_file(
            Path::new("/c"),
            &format!("[state]\nserial = \"s\"\nkey = \"tpm\"\n[kbs]\n{tls}\nresource = \"r/t/k\"\n{file}\npath = \"/run/k\""),
        )
        .unwrap_err();
        assert_eq!(invalid_field(e), "kbs.file");
        // snp-derived is a key source of its own.
        let cfg = parse_config_file(
            Path::new("/c"),
            "[state]\nserial = \"s\"\nkey = \"snp-derived\"",
        )
        .unwrap();
        assert_eq!(cfg.state.unwrap().key, KeySourceChoice::SnpDerived);
    }

    /// Test builds keep plain http for the boot tests' broker, said explicitly.
    #[cfg(feature = "test-hooks")]
    #[test]
    fn a_test_build_accepts_plain_http_only_when_said() {
        kbs("url = \"http://10.0.0.1:8080\"\nplain_http = true").unwrap();
        for (section, field) in [
            ("url = \"http://h:1\"", "kbs.plain_http"),
            (
                "url = \"http://h:1\"\nplain_http = true\nca = \"/c.pem\"",
                "kbs.url",
            ),
        ] {
            assert_eq!(invalid_field(kbs(section).unwrap_err()), field, "{section}");
        }
    }

    /// A release build has no unauthenticated broker: `plain_http` and http:// are refused by
    /// name, saying why.
    #[cfg(not(feature = "test-hooks"))]
    #[test]
    fn a_release_build_refuses_plain_http_by_name() {
        for (section, field) in [
            (
                "url = \"http://10.0.0.1:8080\"\nplain_http = true",
                "kbs.plain_http",
            ),
            (
                "url = \"https://h:1\"\nca = \"/c.pem\"\nplain_http = true",
                "kbs.plain_http",
            ),
            ("url = \"http://10.0.0.1:8080\"", "kbs.url"),
        ] {
            let e = kbs(section).unwrap_err();
            let text = e.to_string();
            assert!(text.contains("pose as the key broker"), "{section}: {text}");
            assert_eq!(invalid_field(e), field, "{section}");
        }
    }

    #[test]
    fn state_options_that_cannot_work_are_refused() {
        for (extra, field) in [
            ("integrity = \"none\"\nwipe = true", "state.wipe"),
            (
                "mkfs = [\"/sbin/mke2fs\", \"-E\", \"lazy_journal_init=1\"]",
                "state.mkfs",
            ),
            ("mkfs = [\"/sbin/mke2fs\", \"-g\", \"8192\"]", "state.mkfs"),
            ("mkfs = [\"mke2fs\"]", "state.mkfs"),
            ("mount = \"relative\"", "state.mount"),
            ("binds = [\"/\"]", "state.binds"),
        ] {
            assert_eq!(invalid_field(state(extra).unwrap_err()), field, "{extra}");
        }
        assert!(matches!(
            state("integrity = \"hmac-sha512\""),
            Err(ConfigFileError::Syntax { .. })
        ));
        // With a wipe, every block has a valid tag: a lazy journal is fine.
        state("wipe = true\nmkfs = [\"/sbin/mke2fs\", \"-E\", \"lazy_journal_init=1\"]").unwrap();
        let e = parse_config_file(
            Path::new("/c"),
            "[state]\nserial = \"a-serial-longer-than-twenty\"\nkey = \"tpm\"",
        )
        .unwrap_err();
        assert_eq!(invalid_field(e), "state.serial");
    }
}
