//! The kernel command line's `cvm.*` options (part of the UKI, so measured with it).

use std::collections::BTreeSet;

use log::LevelFilter;

use crate::disk::gpt::Guid;

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

pub(super) fn is_module_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}
