//! Configuration from measured inputs only: the kernel command line (part of the UKI) and the
//! configuration file in the measured image. Every `cvm.*` option is validated; an unknown or
//! malformed one stops the boot with an error that names it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use log::LevelFilter;
use serde::Deserialize;

use crate::disk::gpt::Guid;

/// Where the init reads its configuration file (inside the measured image).
pub const CONFIG_PATH: &str = "/etc/cvm-init/config.toml";

/// The `cvm.*` options this build understands, with the form each expects.
pub const OPTIONS: &[(&str, &str)] = &[
    ("cvm.debug", "no value (a flag)"),
    ("cvm.loglevel", "one of error, warn, info, debug"),
    (
        "cvm.modules",
        "a comma-separated list of module names ([A-Za-z0-9_-])",
    ),
    (
        "cvm.drivers",
        "a comma-separated list of device drivers, each one of virtio_blk, virtio_net, virtio_scsi, nvme, sd_mod, gve, ena, hv_vmbus, hv_storvsc, hv_netvsc, mana",
    ),
    (
        "cvm.root-partuuid",
        "a partition UUID (8-4-4-4-12 hex digits)",
    ),
    (
        "cvm.verity-partuuid",
        "a partition UUID (8-4-4-4-12 hex digits)",
    ),
    ("cvm.verity-corruption", "one of eio, panic, restart"),
    ("cvm.tee", "one of auto, tdx, snp, tpm, none"),
    (
        "cvm.hostname",
        "a host name of DNS labels, at most 64 characters",
    ),
    (
        "cvm.net.interface",
        "an interface name (1 to 15 of [A-Za-z0-9_.-])",
    ),
    #[cfg(feature = "test-hooks")]
    ("cvm.test-dhcp-lease", "seconds, 4 to 86400"),
    #[cfg(feature = "test-hooks")]
    ("cvm.test-panic", "the name of a boot phase"),
    #[cfg(feature = "test-hooks")]
    ("cvm.test-snp-emulator", "an absolute path"),
];

/// `roothash=` as systemd and mkosi write it: the sha256 root of the verity tree.
pub const ROOTHASH: (&str, &str) = ("roothash", "64 hex digits (a sha256 root hash)");

/// Where measurements go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TeeChoice {
    /// TDX, else SEV-SNP, else a TPM; none found stops the boot.
    #[default]
    Auto,
    Tdx,
    Snp,
    Tpm,
    /// No measurements at all: only when asked for by name.
    None,
}

/// What dm-verity does when a block does not match its hash. None returns the bad bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CorruptionPolicy {
    /// The read fails with EIO (default): the init or the workload sees an error, the boot's
    /// fatal path explains it, and the host gets no reboot loop to retry its attack.
    #[default]
    Eio,
    /// The kernel panics.
    Panic,
    /// The machine restarts.
    Restart,
}

impl std::fmt::Display for CorruptionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CorruptionPolicy::Eio => "eio",
            CorruptionPolicy::Panic => "panic",
            CorruptionPolicy::Restart => "restart",
        })
    }
}

/// The typed options from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootOptions {
    /// Hold instead of powering off on a fatal error (the command line is measured, so a debug
    /// boot is visible in the measurements).
    pub debug: bool,
    pub log_level: LevelFilter,
    /// Modules to load in addition to those the init always needs.
    pub modules: Vec<String>,
    /// The device drivers a device may make the init load (`cvm.drivers=`): all of
    /// [`crate::modules::HARDWARE`] unless the measured command line narrows them.
    pub drivers: Vec<String>,
    /// The verity root hash from `roothash=`.
    pub root_hash: Option<[u8; 32]>,
    /// Partition UUIDs that override the ones derived from the root hash.
    pub root_partuuid: Option<Guid>,
    pub verity_partuuid: Option<Guid>,
    pub verity_corruption: CorruptionPolicy,
    pub tee: TeeChoice,
    /// The network's command-line part: interface, host name (and a test lease cap).
    pub net: crate::net::NetOptions,
    /// Test builds only: panic inside this phase, to exercise the fatal path.
    #[cfg(feature = "test-hooks")]
    pub test_panic: Option<String>,
    /// Test builds only: SNP evidence from an emulated configfs-tsm provider.
    #[cfg(feature = "test-hooks")]
    pub test_snp_emulator: Option<std::path::PathBuf>,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            debug: false,
            log_level: LevelFilter::Info,
            modules: Vec::new(),
            drivers: crate::modules::HARDWARE
                .iter()
                .map(|d| d.to_string())
                .collect(),
            root_hash: None,
            root_partuuid: None,
            verity_partuuid: None,
            verity_corruption: CorruptionPolicy::Eio,
            tee: TeeChoice::Auto,
            net: crate::net::NetOptions::default(),
            #[cfg(feature = "test-hooks")]
            test_panic: None,
            #[cfg(feature = "test-hooks")]
            test_snp_emulator: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("unknown option {key} on the kernel command line (known: {known})")]
    Unknown { key: String, known: String },
    #[error("option {key}={value:?} on the kernel command line is malformed: expected {expected}")]
    Malformed {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("option {key} appears twice on the kernel command line")]
    Duplicate { key: String },
}

impl CmdlineError {
    /// The option the error is about.
    pub fn key(&self) -> &str {
        match self {
            CmdlineError::Unknown { key, .. }
            | CmdlineError::Malformed { key, .. }
            | CmdlineError::Duplicate { key } => key,
        }
    }
}

/// Splits a kernel command line the way the kernel does (shared with the measurements, so that
/// what is parsed is exactly what is measured).
pub use cvm_formats::event::split_cmdline as split_params;

/// Parses the `cvm.*` options of a kernel command line; other parameters belong to the kernel
/// and are ignored here.
pub fn parse_cmdline(cmdline: &[u8]) -> Result<BootOptions, CmdlineError> {
    let mut options = BootOptions::default();
    let mut seen = BTreeSet::new();
    for (key, value) in split_params(cmdline) {
        if !key.starts_with(b"cvm.") && key != ROOTHASH.0.as_bytes() {
            continue;
        }
        let key = String::from_utf8_lossy(&key).into_owned();
        let value = value.map(|v| String::from_utf8_lossy(&v).into_owned());
        let expected = match OPTIONS
            .iter()
            .chain([&ROOTHASH])
            .find(|(name, _)| *name == key)
        {
            Some((_, expected)) => *expected,
            None => {
                let known = OPTIONS.iter().map(|(n, _)| *n).collect::<Vec<_>>();
                return Err(CmdlineError::Unknown {
                    key,
                    known: known.join(", "),
                });
            }
        };
        if !seen.insert(key.clone()) {
            return Err(CmdlineError::Duplicate { key });
        }
        let malformed = |value: &str| CmdlineError::Malformed {
            key: key.clone(),
            value: value.to_string(),
            expected,
        };
        match (key.as_str(), value.as_deref()) {
            ("cvm.debug", None) => options.debug = true,
            ("cvm.loglevel", Some(v)) => {
                options.log_level = match v {
                    "error" => LevelFilter::Error,
                    "warn" => LevelFilter::Warn,
                    "info" => LevelFilter::Info,
                    "debug" => LevelFilter::Debug,
                    _ => return Err(malformed(v)),
                }
            }
            ("cvm.modules", Some(v)) => {
                let names: Vec<&str> = v.split(',').collect();
                if names.iter().any(|n| !is_module_name(n)) {
                    return Err(malformed(v));
                }
                options.modules = names.into_iter().map(str::to_string).collect();
            }
            ("cvm.drivers", Some(v)) => {
                let names: Vec<&str> = v.split(',').collect();
                if names.iter().any(|n| !crate::modules::HARDWARE.contains(n)) {
                    return Err(malformed(v));
                }
                options.drivers = names.into_iter().map(str::to_string).collect();
            }
            ("roothash", Some(v)) => {
                let bytes = parse_hex(v)
                    .filter(|b| b.len() == 32)
                    .ok_or_else(|| malformed(v))?;
                options.root_hash = Some(bytes.try_into().unwrap());
            }
            ("cvm.root-partuuid", Some(v)) => {
                options.root_partuuid = Some(Guid::parse(v).ok_or_else(|| malformed(v))?)
            }
            ("cvm.verity-partuuid", Some(v)) => {
                options.verity_partuuid = Some(Guid::parse(v).ok_or_else(|| malformed(v))?)
            }
            ("cvm.tee", Some(v)) => {
                options.tee = match v {
                    "auto" => TeeChoice::Auto,
                    "tdx" => TeeChoice::Tdx,
                    "snp" => TeeChoice::Snp,
                    "tpm" => TeeChoice::Tpm,
                    "none" => TeeChoice::None,
                    _ => return Err(malformed(v)),
                }
            }
            ("cvm.verity-corruption", Some(v)) => {
                options.verity_corruption = match v {
                    "eio" => CorruptionPolicy::Eio,
                    "panic" => CorruptionPolicy::Panic,
                    "restart" => CorruptionPolicy::Restart,
                    _ => return Err(malformed(v)),
                }
            }
            ("cvm.hostname", Some(v)) if v.len() <= 64 && crate::net::dhcp::valid_dns_name(v) => {
                options.net.hostname = Some(v.to_string())
            }
            ("cvm.net.interface", Some(v)) if crate::net::valid_name(v) => {
                options.net.interface = Some(v.to_string())
            }
            #[cfg(feature = "test-hooks")]
            ("cvm.test-dhcp-lease", Some(v)) => {
                options.net.lease_cap = Some(
                    v.parse()
                        .ok()
                        .filter(|s| (4..=86400).contains(s))
                        .ok_or_else(|| malformed(v))?,
                )
            }
            #[cfg(feature = "test-hooks")]
            ("cvm.test-panic", Some(v)) if is_module_name(v) => {
                options.test_panic = Some(v.to_string())
            }
            #[cfg(feature = "test-hooks")]
            ("cvm.test-snp-emulator", Some(v)) if v.starts_with('/') => {
                options.test_snp_emulator = Some(v.into())
            }
            (_, v) => return Err(malformed(v.unwrap_or(""))),
        }
    }
    Ok(options)
}

/// True when the command line carries the bare `cvm.debug` flag, read without validating the
/// rest: the fatal path for a malformed command line still honours a debug boot.
pub fn cmdline_has_debug(cmdline: &[u8]) -> bool {
    split_params(cmdline)
        .iter()
        .any(|(k, v)| k == b"cvm.debug" && v.is_none())
}

fn parse_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

fn is_module_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

/// What restarts a service after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart whatever the exit status.
    #[default]
    Always,
    /// Restart after a non-zero exit or a signal.
    OnFailure,
    /// Never restart.
    Never,
}

/// One supervised process.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How long a service gets between SIGTERM and SIGKILL at shutdown.
    #[serde(default = "default_stop_timeout_ms")]
    pub stop_timeout_ms: u64,
    /// The working directory (default `/`).
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// A unix socket that accepts connections once the service is ready; without one, a
    /// service is ready once started.
    #[serde(default)]
    pub ready_socket: Option<PathBuf>,
    /// How long the socket may take to accept; then the service counts as failed and its
    /// restart policy applies.
    #[serde(default = "default_ready_timeout_ms")]
    pub ready_timeout_ms: u64,
    /// Services (earlier in the file) that must be ready before this one starts.
    #[serde(default)]
    pub after: Vec<String>,
    /// The kernel's OOM-killer bias, -1000 (never) to 1000.
    #[serde(default)]
    pub oom_score_adj: Option<i32>,
    /// Resource limits (setrlimit), soft and hard alike.
    #[serde(default)]
    pub limits: Limits,
    /// Controller settings for the service's own cgroup (/sys/fs/cgroup/<name>).
    #[serde(default)]
    pub cgroup: CgroupSettings,
}

fn default_stop_timeout_ms() -> u64 {
    5000
}

fn default_ready_timeout_ms() -> u64 {
    60_000
}

/// A resource limit: a number, or "infinity".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Limit {
    Value(u64),
    Named(Unlimited),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unlimited {
    Infinity,
}

impl Limit {
    /// The value for setrlimit.
    pub fn raw(self) -> u64 {
        match self {
            Limit::Value(v) => v,
            Limit::Named(Unlimited::Infinity) => u64::MAX,
        }
    }
}

/// The limits a container runtime usually needs raised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub nofile: Option<Limit>,
    pub nproc: Option<Limit>,
    pub memlock: Option<Limit>,
    pub core: Option<Limit>,
}

/// cgroup v2 settings written into the service's cgroup before it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupSettings {
    /// memory.max in bytes.
    pub memory_max: Option<u64>,
    /// cpu.weight, 1 to 10000.
    pub cpu_weight: Option<u32>,
    /// pids.max.
    pub pids_max: Option<u64>,
}

/// The configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
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

/// Where the state-disk key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeySourceChoice {
    /// Sealed by the vTPM to the boot-time PCRs.
    Tpm,
    /// A new key every boot; the disk is re-created every boot.
    Ephemeral,
    /// Released by a key broker (Trustee KBS protocol) to evidence of this image.
    Kbs,
    /// Derived by the SEV-SNP secure processor from the chip key, launch measurement and
    /// policy (the disk cannot move to another machine).
    SnpDerived,
}

/// The key broker the `kbs` key source asks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KbsConfig {
    /// `https://host:port` (trusted by `ca` or `public_key_sha256` only), or `http://host:port`
    /// with `plain_http = true`.
    pub url: String,
    /// The state-disk secret: `<repository>/<type>/<tag>`.
    pub resource: String,
    /// Test builds only (the `test-hooks` feature): must be true for an http:// URL. A release
    /// build refuses it by name, because over plain http anyone on the path can pose as the
    /// broker: the node's ephemeral key travels in clear, so anyone can encrypt a disk key of
    /// its own choosing to it (and choose the released files).
    #[serde(default)]
    pub plain_http: bool,
    /// https: the CA certificate(s) (PEM file in the verified root) the broker's certificate
    /// must chain to, for the URL's host.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// https: the sha256 (64 hex digits) of the broker certificate's SubjectPublicKeyInfo;
    /// any other key is refused.
    #[serde(default)]
    pub public_key_sha256: Option<String>,
    /// Further resources released in the same session, written to files on a tmpfs.
    #[serde(default, rename = "file")]
    pub files: Vec<KbsFile>,
}

/// A resource written to a file (for example a kubelet bootstrap kubeconfig).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KbsFile {
    /// `<repository>/<type>/<tag>`.
    pub resource: String,
    /// Under /run or /tmp (memory only: a secret never reaches a disk unencrypted).
    pub path: PathBuf,
    /// Permission bits, 0600 unless given.
    #[serde(default = "default_secret_mode")]
    pub mode: u32,
}

fn default_secret_mode() -> u32 {
    0o600
}

/// `<repository>/<type>/<tag>`, each part of letters, digits, `._-`, not starting with a dot.
fn is_resource_path(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

impl KbsConfig {
    /// `host:port` of the URL.
    pub fn address(&self) -> Option<&str> {
        let rest = self
            .url
            .strip_prefix("http://")
            .or_else(|| self.url.strip_prefix("https://"))?;
        let address = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = address.rsplit_once(':')?;
        let valid = !host.is_empty()
            && !address.contains('/')
            && !address.contains('@')
            && port.parse::<u16>().is_ok_and(|p| p != 0);
        valid.then_some(address)
    }

    pub fn https(&self) -> bool {
        self.url.starts_with("https://")
    }
}

/// The state disk.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// The disk's serial number (virtio `serial=`, NVMe serial): chosen by identity, never by
    /// probe order.
    pub serial: String,
    pub key: KeySourceChoice,
    /// Where the file system is mounted (a directory of the root image).
    #[serde(default = "default_state_mount")]
    pub mount: PathBuf,
    /// Directories of the root image bound onto the state file system.
    #[serde(default)]
    pub binds: Vec<PathBuf>,
    /// Authenticated encryption of every block (dm-integrity under dm-crypt), so that a
    /// block the host rewrote reads as an I/O error instead of as garbage.
    #[serde(default)]
    pub integrity: IntegrityChoice,
    /// Write every block once at first boot so that all integrity tags are valid (time grows
    /// with the disk); without it, blocks never written read as I/O errors, which a file
    /// system that writes before it reads never does.
    #[serde(default)]
    pub wipe: bool,
    /// The mkfs program of the root image and its arguments (the device is appended); the
    /// default depends on `integrity` and `wipe` (see [`StateConfig::mkfs_command`]).
    #[serde(default)]
    pub mkfs: Option<Vec<String>>,
    /// The operator's statement that the vTPM runs inside the TEE's trust boundary (an SVSM
    /// or paravisor vTPM the host cannot read or drive). Without it `key = "tpm"` is refused
    /// when measurements go to SEV-SNP or TDX: a vTPM the host emulates unseals anything.
    /// With it cvm-init also extends its events into the vTPM's PCRs, which the seal binds to.
    #[serde(default)]
    pub tpm_in_tee: bool,
}

/// Whether the state disk's blocks are authenticated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IntegrityChoice {
    /// aes-xts-plain64 alone: confidentiality, and a rewritten block decrypts to garbage.
    None,
    /// authenc(hmac(sha256), xts(aes)) with 32-byte tags kept by dm-integrity (journalled).
    #[default]
    HmacSha256,
}

impl StateConfig {
    /// The mkfs command, the device still to be appended.
    pub fn mkfs_command(&self) -> Vec<String> {
        self.mkfs
            .clone()
            .unwrap_or_else(|| default_mkfs(self.integrity, self.wipe))
    }

    /// True when blocks that were never written read as I/O errors.
    pub fn unwritten_blocks_fail(&self) -> bool {
        self.integrity == IntegrityChoice::HmacSha256 && !self.wipe
    }
}

fn default_state_mount() -> PathBuf {
    "/var/lib/cvm-state".into()
}

/// ext4 with lazy inode-table initialisation (the kernel zeroes inode tables in the
/// background) and a fixed 64 MiB journal, so that first-boot setup does not grow with the
/// disk. The journal is written out at mkfs time only where a block never written reads as an
/// I/O error (integrity without wipe): the journal's recovery reads the block after the last
/// transaction, and must not fail on it after a power cut.
fn default_mkfs(integrity: IntegrityChoice, wipe: bool) -> Vec<String> {
    let unwritten_fail = integrity == IntegrityChoice::HmacSha256 && !wipe;
    let extended = if unwritten_fail {
        "lazy_itable_init=1,lazy_journal_init=0,nodiscard"
    } else {
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard"
    };
    [
        "/sbin/mke2fs",
        "-q",
        "-t",
        "ext4",
        "-J",
        "size=64",
        "-E",
        extended,
        "-F",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
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
    let invalid = |field: String, value: &str, expected| ConfigFileError::Invalid {
        path: path.to_path_buf(),
        field,
        value: value.to_string(),
        expected,
    };
    for module in &config.modules {
        if !is_module_name(module) {
            return Err(invalid(
                "modules".into(),
                module,
                "module names of [A-Za-z0-9_-]",
            ));
        }
    }
    let mut names = BTreeSet::new();
    for (i, service) in config.services.iter().enumerate() {
        let field = |f: &str| format!("service[{i}].{f}");
        let valid_name = !service.name.is_empty()
            && service.name.len() <= 32
            && service
                .name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            // Its output is forwarded as `<name>: <line>`: named cvm-init, a workload would
            // write the init's own marker lines.
            && service.name != crate::logger::PREFIX;
        if !valid_name {
            return Err(invalid(
                field("name"),
                &service.name,
                "1 to 32 characters of [a-z0-9-], other than cvm-init",
            ));
        }
        if !names.insert(service.name.as_str()) {
            return Err(invalid(
                field("name"),
                &service.name,
                "a name no other service has",
            ));
        }
        if !service.path.is_absolute() {
            return Err(invalid(
                field("path"),
                &service.path.to_string_lossy(),
                "an absolute path",
            ));
        }
        for (key, value) in &service.env {
            let valid_key = !key.is_empty()
                && !key.as_bytes()[0].is_ascii_digit()
                && key.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
            if !valid_key {
                return Err(invalid(
                    field("env"),
                    key,
                    "variable names of [A-Za-z0-9_], not starting with a digit",
                ));
            }
            if value.contains('\0') {
                return Err(invalid(
                    format!("{}.{key}", field("env")),
                    value,
                    "a value without NUL",
                ));
            }
        }
        if service.args.iter().any(|a| a.contains('\0')) {
            return Err(invalid(field("args"), "…", "arguments without NUL"));
        }
        if !(100..=300_000).contains(&service.stop_timeout_ms) {
            return Err(invalid(
                field("stop_timeout_ms"),
                &service.stop_timeout_ms.to_string(),
                "100 to 300000",
            ));
        }
        if !(100..=3_600_000).contains(&service.ready_timeout_ms) {
            return Err(invalid(
                field("ready_timeout_ms"),
                &service.ready_timeout_ms.to_string(),
                "100 to 3600000",
            ));
        }
        for (what, path) in [
            ("workdir", service.workdir.as_ref()),
            ("ready_socket", service.ready_socket.as_ref()),
        ] {
            if let Some(path) = path.filter(|p| !p.is_absolute()) {
                return Err(invalid(
                    field(what),
                    &path.to_string_lossy(),
                    "an absolute path",
                ));
            }
        }
        for dependency in &service.after {
            // Only earlier services: the order of the file is the start order, and there can
            // be no cycle.
            if !config.services[..i].iter().any(|s| &s.name == dependency) {
                return Err(invalid(
                    field("after"),
                    dependency,
                    "the name of a service earlier in the file",
                ));
            }
        }
        if let Some(adj) = service
            .oom_score_adj
            .filter(|a| !(-1000..=1000).contains(a))
        {
            return Err(invalid(
                field("oom_score_adj"),
                &adj.to_string(),
                "-1000 to 1000",
            ));
        }
        if let Some(w) = service
            .cgroup
            .cpu_weight
            .filter(|w| !(1..=10_000).contains(w))
        {
            return Err(invalid(
                field("cgroup.cpu_weight"),
                &w.to_string(),
                "1 to 10000",
            ));
        }
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
        validate_state(state).map_err(|(field, value, expected)| {
            invalid(format!("state.{field}"), &value, expected)
        })?;
        if state.key == KeySourceChoice::Kbs && config.kbs.is_none() {
            return Err(invalid(
                "state.key".into(),
                "kbs",
                "a [kbs] section naming the key broker",
            ));
        }
    }
    if let Some(kbs) = &config.kbs {
        let kbs_key = config
            .state
            .as_ref()
            .is_some_and(|s| s.key == KeySourceChoice::Kbs);
        if !kbs.files.is_empty() && !kbs_key {
            return Err(invalid(
                "kbs.file".into(),
                &format!("{} file(s)", kbs.files.len()),
                "state.key = \"kbs\" (files come in the session that releases the disk key)",
            ));
        }
        if kbs.address().is_none() {
            return Err(invalid(
                "kbs.url".into(),
                &kbs.url,
                "https://host:port or http://host:port",
            ));
        }
        #[cfg(not(feature = "test-hooks"))]
        if kbs.plain_http {
            return Err(invalid(
                "kbs.plain_http".into(),
                "true",
                "absent: a release build has no plain http, since over it anyone on the path can \
                 pose as the key broker and choose the disk key (the node's ephemeral key travels \
                 in clear); use an https:// url with kbs.ca or kbs.public_key_sha256",
            ));
        }
        if kbs.https() {
            if kbs.plain_http {
                return Err(invalid(
                    "kbs.plain_http".into(),
                    "true",
                    "false (or absent) for an https:// key broker",
                ));
            }
            match (&kbs.ca, &kbs.public_key_sha256) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(invalid(
                        "kbs.ca".into(),
                        if kbs.ca.is_some() { "set with kbs.public_key_sha256" } else { "absent, as is kbs.public_key_sha256" },
                        "exactly one of kbs.ca (a PEM file) or kbs.public_key_sha256 for an https:// key broker",
                    ))
                }
                (Some(ca), None) if !ca.is_absolute() => {
                    return Err(invalid(
                        "kbs.ca".into(),
                        &ca.to_string_lossy(),
                        "an absolute path in the root image",
                    ))
                }
                (None, Some(pin))
                    if cvm_formats::verity::parse_hex(pin).is_none_or(|b| b.len() != 32) =>
                {
                    return Err(invalid(
                        "kbs.public_key_sha256".into(),
                        pin,
                        "64 hex digits (sha256 of the broker's SubjectPublicKeyInfo)",
                    ))
                }
                _ => {}
            }
        } else if cfg!(not(feature = "test-hooks")) {
            return Err(invalid(
                "kbs.url".into(),
                &kbs.url,
                "https://host:port with kbs.ca or kbs.public_key_sha256 (a release build has no \
                 plain http: anyone on the path could pose as the key broker)",
            ));
        } else {
            if !kbs.plain_http {
                return Err(invalid(
                    "kbs.plain_http".into(),
                    "false",
                    "true for an http:// key broker (say so explicitly; test builds only)",
                ));
            }
            if kbs.ca.is_some() || kbs.public_key_sha256.is_some() {
                return Err(invalid(
                    "kbs.url".into(),
                    &kbs.url,
                    "https:// when kbs.ca or kbs.public_key_sha256 is set",
                ));
            }
        }
        if !is_resource_path(&kbs.resource) {
            return Err(invalid(
                "kbs.resource".into(),
                &kbs.resource,
                "<repository>/<type>/<tag>",
            ));
        }
        let mut seen = Vec::new();
        for (i, file) in kbs.files.iter().enumerate() {
            if !is_resource_path(&file.resource) {
                return Err(invalid(
                    format!("kbs.file[{i}].resource"),
                    &file.resource,
                    "<repository>/<type>/<tag>",
                ));
            }
            let in_memory = ["/run/", "/tmp/"].iter().any(|m| {
                file.path.starts_with(m) && file.path != Path::new(m.trim_end_matches('/'))
            });
            let plain = file.path.components().all(|c| {
                matches!(
                    c,
                    std::path::Component::RootDir | std::path::Component::Normal(_)
                )
            });
            if !in_memory || !plain || seen.contains(&&file.path) {
                return Err(invalid(
                    format!("kbs.file[{i}].path"),
                    &file.path.to_string_lossy(),
                    "a new file under /run or /tmp (memory only), without . or ..",
                ));
            }
            seen.push(&file.path);
            if file.mode & !0o777 != 0 || file.mode & 0o007 != 0 {
                return Err(invalid(
                    format!("kbs.file[{i}].mode"),
                    &format!("{:o}", file.mode),
                    "permission bits without access for others (at most 0770)",
                ));
            }
        }
    }
    if let Some(network) = &config.network {
        if let Some((field, value, expected)) = crate::net::check_config(network).into_iter().next()
        {
            return Err(invalid(field.into(), &value, expected));
        }
    }
    Ok(config)
}

/// The state section's checks: (field, value, what was expected).
fn validate_state(state: &StateConfig) -> Result<(), (&'static str, String, &'static str)> {
    if state.serial.is_empty() || state.serial.len() > 20 || !state.serial.is_ascii() {
        return Err((
            "serial",
            state.serial.clone(),
            "1 to 20 ASCII characters (a virtio serial holds 20)",
        ));
    }
    if state.tpm_in_tee && state.key != KeySourceChoice::Tpm {
        return Err((
            "tpm_in_tee",
            "true".into(),
            "false (or absent) unless key = \"tpm\": the statement concerns the vTPM the tpm key source seals with",
        ));
    }
    if state.wipe && state.integrity == IntegrityChoice::None {
        return Err((
            "wipe",
            "true".into(),
            "false when integrity = \"none\" (only integrity tags need a wipe)",
        ));
    }
    for (field, path) in [("mount", &state.mount)]
        .into_iter()
        .chain(state.binds.iter().map(|b| ("binds", b)))
    {
        if !path.is_absolute() || path == Path::new("/") {
            return Err((
                field,
                path.display().to_string(),
                "an absolute path other than /",
            ));
        }
    }
    let mkfs = state.mkfs_command();
    if !mkfs.first().is_some_and(|p| p.starts_with('/')) {
        return Err((
            "mkfs",
            mkfs.join(" "),
            "a program given by absolute path, then its arguments",
        ));
    }
    if state.unwritten_blocks_fail() && mkfs.iter().any(|a| a.contains("lazy_journal_init=1")) {
        return Err((
            "mkfs",
            mkfs.join(" "),
            "no lazy_journal_init=1 with integrity and no wipe: the journal's recovery after a \
             power cut would read blocks never written, which fail",
        ));
    }
    if state.unwritten_blocks_fail() && mkfs.iter().any(|a| a.starts_with("-g")) {
        return Err((
            "mkfs",
            mkfs.join(" "),
            "ext4's default block groups with integrity and no wipe (no -g): cvm-init makes \
             the first block of each 128 MiB group readable for mke2fs",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert!(mkfs.contains("-J size=64"), "{mkfs}");
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
