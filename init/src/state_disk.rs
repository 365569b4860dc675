//! The encrypted state disk at boot: find it by serial, decide (blank, ours, foreign) without
//! writing, measure its identity, get the key, open dm-crypt through a keyring key, create
//! the file system on first boot and commit, mount it and bind the node's writable paths.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cvm_formats::event::Event;
use nix::mount::MsFlags;
use zeroize::Zeroizing;

use crate::config::{IntegrityChoice, KbsConfig, KeySourceChoice, StateConfig};
use crate::disk::crypt::{crypt_params, KeyringError, LogonKey};
use crate::disk::integrity::{self, IntegrityError, SUPERBLOCK_LEN};
use crate::disk::luks2::{self, FormatInput, KdfPolicy, Luks2Error, Policy, DATA_OFFSET, HDR_SIZE};
use crate::disk::state::{
    classify, header_probe_suffices, DiskState, BLANK_PROBE, COMMITTED, HEADER_PROBE, UNCOMMITTED,
};
use crate::dm::{self, DmError, MappedDevice};
use crate::keys::{Ephemeral, Kbs, KeyError, KeySource, SnpDerived, TpmSealed, TpmSigned};
use crate::measure::MeasureError;
use crate::sys::System;
use crate::tee::seal::SEAL_PCRS;
use crate::tee::tpm::{DeviceTransport, Tpm, TpmError};
use crate::tee::Tee;

const DM_NAME: &str = "cvm-state";
const DM_INTEGRITY_NAME: &str = "cvm-state-integrity";
/// The smallest disk cvm-init formats: the LUKS2 metadata, the integrity journal and the file
/// system's 16 MiB journal need room.
const MIN_FORMAT_SIZE: u64 = 256 << 20;
/// The wipe writes this much per request.
const WIPE_CHUNK: usize = 4 << 20;

/// The LUKS2 policy of the state disk this configuration describes. The keyslot secret is 32
/// random bytes, so the KDF only has to be cheap and standard.
pub fn policy(cfg: &StateConfig) -> Policy {
    Policy {
        integrity: cfg.integrity == IntegrityChoice::HmacSha256,
        kdf: KdfPolicy::Pbkdf2 { iterations: 1000 },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot rename the node")]
    NodeName(#[from] crate::net::files::FilesError),
    #[error(transparent)]
    Modules(#[from] crate::modules::ModuleError),
    #[error("no disk with serial {serial:?} (seen: {seen})")]
    NotFound { serial: String, seen: String },
    #[error("more than one disk has the serial {serial:?} ({disks}): the state disk is ambiguous, nothing was written")]
    DuplicateSerial { serial: String, disks: String },
    #[error("cannot {what} {device}")]
    Io {
        what: &'static str,
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the state disk {device} is refused, and nothing was written to it: it holds {why}")]
    Foreign { device: String, why: String },
    #[error("the state disk {device} has a header cvm-init cannot use")]
    Header {
        device: String,
        #[source]
        source: Luks2Error,
    },
    #[error("cannot get the state-disk key from the {source_name} key source")]
    Key {
        source_name: &'static str,
        #[source]
        source: KeyError,
    },
    #[error("the tpm key source needs the vTPM")]
    Tpm(#[source] TpmError),
    #[error("cannot read {path}: state.tpm_policy = \"signed\" needs a UKI with .pcrsig and .pcrpkey sections (systemd-stub copies them there); nothing was written")]
    SignedPolicyFile {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is refused (state.tpm_policy = \"signed\"); nothing was written")]
    SignedPolicy {
        path: &'static str,
        #[source]
        source: crate::tee::signed_policy::SignedPolicyError,
    },
    #[error("state.key = \"tpm\" is refused with cvm.tee={tee} and nothing was written to any disk: {why}")]
    TpmKeyRefused { tee: Tee, why: &'static str },
    #[error("state.key = \"tpm\" is refused with cvm.tee=tpm on a {under} guest and nothing was written to any disk: a vTPM outside the TEE is the host's and can unseal anything; use key = \"kbs\", or set state.tpm_in_tee = true only if the vTPM runs inside the TEE (an SVSM or paravisor vTPM)")]
    TpmKeyUnderTee { under: Tee },
    #[error("cannot extend cvm-init's events into the vTPM (state.tpm_in_tee)")]
    Mirror(#[source] crate::tee::TeeError),
    #[error(transparent)]
    Measure(#[from] MeasureError),
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error(transparent)]
    Dm(#[from] DmError),
    #[error("{program} failed on {device}: {detail}")]
    Mkfs {
        program: String,
        device: String,
        detail: String,
    },
    #[error("cannot mount {what} on {target}")]
    Mount {
        what: String,
        target: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("state.key is kbs but the configuration has no [kbs] section")]
    NoKbs,
    #[error("TLS to the key broker")]
    Tls(#[source] cvm_kbs::tls::TlsError),
    #[error("no evidence for the key broker")]
    Evidence(#[source] crate::tee::evidence::EvidenceError),
    #[error("{device} is too small for a state disk ({size} bytes, at least {MIN_FORMAT_SIZE})")]
    TooSmall { device: String, size: u64 },
    #[error("the state disk {device} has integrity metadata cvm-init cannot use")]
    Integrity {
        device: String,
        #[source]
        source: IntegrityError,
    },
}

/// Where the `tpm` key source's PCRs get cvm-init's events from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VtpmUse {
    /// Not the `tpm` key source: the vTPM plays no part in the disk key.
    NotUsed,
    /// Measurements already go to the vTPM (`cvm.tee=tpm`).
    Registers,
    /// Measurements go to SEV-SNP or TDX and the configuration states that the vTPM is inside
    /// the TEE: the events go to the vTPM's PCRs as well.
    AlsoExtend,
}

/// Decides, before any disk is touched, whether `key = "tpm"` is safe with the TEE the boot
/// measures into (`tee` is the resolved backend, so `cvm.tee=auto` counts as what it found).
/// On SEV-SNP and TDX cvm-init's events do not reach the vTPM's PCRs by themselves, and a vTPM
/// the host emulates answers the host: sealing to it protects nothing unless the operator
/// states that it is inside the TEE. With `cvm.tee=none` nothing is measured at all.
///
/// `hardware` is the TEE the guest runs under whatever `cvm.tee` chose (see
/// [`crate::tee::hardware`]): `cvm.tee=tpm` on an SNP or TDX guest measures into the vTPM only,
/// and that vTPM is as much the host's as on `cvm.tee=snp`, so it needs the same statement.
pub fn tpm_key_decision(
    cfg: &StateConfig,
    tee: Tee,
    hardware: Option<Tee>,
) -> Result<VtpmUse, StateError> {
    if cfg.key != KeySourceChoice::Tpm {
        return Ok(VtpmUse::NotUsed);
    }
    let refuse = |why| Err(StateError::TpmKeyRefused { tee, why });
    match tee {
        Tee::Tpm => match hardware {
            Some(under) if !cfg.tpm_in_tee => Err(StateError::TpmKeyUnderTee { under }),
            _ => Ok(VtpmUse::Registers),
        },
        Tee::Snp | Tee::Tdx if cfg.tpm_in_tee => Ok(VtpmUse::AlsoExtend),
        Tee::Snp => refuse(
            "the vTPM is outside SEV-SNP's protection unless the configuration says otherwise, and a \
             vTPM the host emulates can unseal anything; use key = \"kbs\" or \"snp-derived\", or \
             set state.tpm_in_tee = true only if the vTPM runs inside the TEE (an SVSM or paravisor vTPM)",
        ),
        Tee::Tdx => refuse(
            "the vTPM is outside TDX's protection unless the configuration says otherwise, and a \
             vTPM the host emulates can unseal anything; use key = \"kbs\", or set \
             state.tpm_in_tee = true only if the vTPM runs inside the TD (a paravisor vTPM)",
        ),
        Tee::None => refuse(
            "this boot measures nothing into the vTPM's PCRs, so the seal would bind to nothing \
             cvm-init measured; boot with cvm.tee=tpm (or auto) or use another key source",
        ),
    }
}

/// A disk's serial number as its driver shows it: virtio-blk's own `serial`, an NVMe
/// controller's `device/serial`, or a SCSI disk's unit serial number page (`device/vpd_pg80`:
/// a 4-byte header with the length, then the text).
fn disk_serial(disk: &Path) -> Option<String> {
    let text = std::fs::read_to_string(disk.join("serial"))
        .or_else(|_| std::fs::read_to_string(disk.join("device/serial")))
        .ok()
        .or_else(|| {
            let page = std::fs::read(disk.join("device/vpd_pg80")).ok()?;
            if page.get(1) != Some(&0x80) {
                return None;
            }
            let len = u16::from_be_bytes([*page.get(2)?, *page.get(3)?]) as usize;
            let serial = page.get(4..4 + len)?;
            Some(String::from_utf8_lossy(serial).into_owned())
        })?;
    Some(
        text.trim_matches(|c: char| c.is_whitespace() || c == '\0')
            .to_string(),
    )
}

/// Finds the disk whose serial number matches, waiting a little for slow devices. The host
/// chooses serials: two disks with the configured one are refused, never resolved by directory
/// order (a blank decoy listed first would be formatted while the real disk sat aside).
pub fn find_by_serial(sys_block: &Path, serial: &str) -> Result<(String, (u32, u32)), StateError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut seen = Vec::new();
        let mut matches = Vec::new();
        for entry in std::fs::read_dir(sys_block).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // The kernel hides the per-path devices of an NVMe multipath namespace
            // (`nvme1c1n1` beside `nvme1n1`): same serial, no device node, not a second disk.
            if hidden(&entry.path()) {
                continue;
            }
            let Some(found) = disk_serial(&entry.path()) else {
                continue;
            };
            if found == serial {
                let dev = std::fs::read_to_string(entry.path().join("dev")).unwrap_or_default();
                let dev = dev
                    .trim()
                    .split_once(':')
                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
                matches.push((name.clone(), dev));
            }
            seen.push(format!("{name} serial {found:?}"));
        }
        if matches.len() > 1 {
            matches.sort();
            return Err(StateError::DuplicateSerial {
                serial: serial.to_string(),
                disks: matches
                    .iter()
                    .map(|(name, _)| name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        if let [(name, Some(dev))] = matches.as_slice() {
            return Ok((name.clone(), *dev));
        }
        if Instant::now() >= deadline {
            seen.sort();
            return Err(StateError::NotFound {
                serial: serial.to_string(),
                seen: if seen.is_empty() {
                    "no disk with a serial".into()
                } else {
                    seen.join(", ")
                },
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the kernel marks the block device hidden (`/sys/class/block/<name>/hidden`).
fn hidden(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("hidden")).is_ok_and(|v| v.trim() == "1")
}

fn random_uuid() -> String {
    let uuid = cvm_formats::verity::random_uuid_v4().expect("/dev/urandom is readable");
    cvm_formats::verity::format_uuid(&uuid)
}

/// The `kbs` source: evidence of the TEE this boot measures into, bound to the broker's
/// challenge; the extra resources are written to their files.
fn kbs_source(kbs: &KbsConfig, tee: Tee) -> Result<Kbs, StateError> {
    let endpoint = kbs_endpoint(kbs)?;
    let address = endpoint.address.clone();
    let evidence = crate::tee::evidence::Source::for_tee(tee).map_err(StateError::Evidence)?;
    let mut resources = vec![kbs.resource.as_str()];
    resources.extend(kbs.files.iter().map(|f| f.resource.as_str()));
    log::info!(
        "kbs: asking the key broker at {address} for {} ({} evidence)",
        resources.join(", "),
        evidence.tee()
    );
    let mut fetched = Kbs::fetch(&endpoint, &evidence, &resources);
    for (file, bytes) in kbs.files.iter().zip(std::mem::take(&mut fetched.extras)) {
        write_secret_file(&file.path, &bytes, file.mode).map_err(|source| StateError::Io {
            what: "write the released resource to",
            device: file.path.display().to_string(),
            source,
        })?;
        log::info!(
            "kbs: {} written to {} ({} bytes, mode {:o})",
            file.resource,
            file.path.display(),
            bytes.len(),
            file.mode
        );
    }
    Ok(fetched)
}

/// The broker's address and, for https, TLS trusting only the pinned CA or public key.
fn kbs_endpoint(kbs: &KbsConfig) -> Result<cvm_kbs::client::Endpoint, StateError> {
    use cvm_kbs::tls::{client_config, Pin};
    let address = kbs.address().expect("validated with the configuration");
    // Test builds only: a release build refuses plain_http with the configuration.
    #[cfg(feature = "test-hooks")]
    if !kbs.https() {
        log::warn!("kbs: plain http to {address} (kbs.plain_http, test build): anyone on the path can pose as the key broker");
        return Ok(cvm_kbs::client::Endpoint::plain(address));
    }
    let pin = match (&kbs.ca, &kbs.public_key_sha256) {
        (Some(ca), _) => Pin::Ca(std::fs::read(ca).map_err(|source| StateError::Io {
            what: "read the key broker's CA",
            device: ca.display().to_string(),
            source,
        })?),
        (None, Some(hex)) => Pin::PublicKeySha256(
            cvm_formats::verity::parse_hex(hex)
                .and_then(|b| b.try_into().ok())
                .expect("validated with the configuration"),
        ),
        (None, None) => unreachable!("validated with the configuration"),
    };
    Ok(cvm_kbs::client::Endpoint {
        address: address.to_string(),
        tls: Some(client_config(&pin).map_err(StateError::Tls)?),
    })
}

/// Writes a released secret with its mode from the start (never readable by others, even for
/// a moment); parents are created 0700, and no link is followed on the way (/run is writable
/// by workloads: see [`crate::nofollow`]).
fn write_secret_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use nix::fcntl::OFlag;
    use std::io::Write;
    let mut file = crate::nofollow::open_parent(path, Some(0o700))?.open(
        None,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
        mode,
    )?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn tpm_source() -> Result<TpmSealed<DeviceTransport>, StateError> {
    let mut tpm =
        Tpm::new(DeviceTransport::open().map_err(StateError::Tpm)?).map_err(StateError::Tpm)?;
    let values = tpm
        .read_bank(cvm_formats::registers::Bank::Sha256, &SEAL_PCRS)
        .map_err(StateError::Tpm)?;
    Ok(TpmSealed {
        transport: DeviceTransport::open().map_err(StateError::Tpm)?,
        pcrs: SEAL_PCRS.to_vec(),
        values,
    })
}

/// Where systemd-stub puts the UKI's `.pcrsig` and `.pcrpkey` for the initrd.
pub const PCR_SIGNATURE_PATH: &str = "/.extra/tpm2-pcr-signature.json";
pub const PCR_PUBLIC_KEY_PATH: &str = "/.extra/tpm2-pcr-public-key.pem";

/// The UKI's signed-policy files as read in the initramfs: after switch_root `/.extra` is out
/// of reach, and the configuration that says whether they are needed is read only then.
static EXTRA: std::sync::OnceLock<[Result<Vec<u8>, std::io::ErrorKind>; 2]> =
    std::sync::OnceLock::new();
const PUBLIC_KEY_MAX: usize = 16 * 1024;

/// Keeps a copy of `/.extra`'s signed-policy files (absent ones as their error), before
/// switch_root. Not measured: the TPM checks the signature against the key the seal names,
/// and systemd-stub measures the key (`.pcrpkey`) into PCR 11.
pub fn keep_signed_policy_files() {
    let read = |path: &str, max: usize| {
        use std::io::Read;
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|f| f.take(max as u64 + 1).read_to_end(&mut bytes))
            .map(|_| bytes)
            .map_err(|e| e.kind())
    };
    let _ = EXTRA.set([
        read(PCR_PUBLIC_KEY_PATH, PUBLIC_KEY_MAX),
        read(PCR_SIGNATURE_PATH, cvm_formats::pcrsig::MAX_LEN),
    ]);
}

/// The kept copy of a file of `/.extra`, at most `max` bytes.
fn read_extra(path: &'static str, max: usize) -> Result<Vec<u8>, StateError> {
    let index = usize::from(path == PCR_SIGNATURE_PATH);
    let kept = EXTRA
        .get()
        .map(|files| files[index].clone())
        .unwrap_or(Err(std::io::ErrorKind::NotFound));
    let bytes = kept.map_err(|kind| StateError::SignedPolicyFile {
        path,
        source: kind.into(),
    })?;
    if bytes.len() > max {
        let source = if index == 0 {
            crate::tee::signed_policy::SignedPolicyError::TooLong(max)
        } else {
            cvm_formats::pcrsig::PcrSigError::TooLong(bytes.len()).into()
        };
        return Err(StateError::SignedPolicy { path, source });
    }
    Ok(bytes)
}

fn tpm_signed_source() -> Result<TpmSigned<DeviceTransport>, StateError> {
    use crate::tee::signed_policy::{PolicyKey, SIGNED_PCRS};
    let pem = read_extra(PCR_PUBLIC_KEY_PATH, PUBLIC_KEY_MAX)?;
    let key = PolicyKey::from_pem(&pem).map_err(|source| StateError::SignedPolicy {
        path: PCR_PUBLIC_KEY_PATH,
        source,
    })?;
    let text = read_extra(PCR_SIGNATURE_PATH, cvm_formats::pcrsig::MAX_LEN)?;
    let entries =
        cvm_formats::pcrsig::parse(&text, &key.expect()).map_err(|e| StateError::SignedPolicy {
            path: PCR_SIGNATURE_PATH,
            source: e.into(),
        })?;
    log::info!(
        "state: signed PCR policy of the UKI, key fingerprint {}",
        cvm_formats::hex(&key.fingerprint())
    );
    let mut tpm =
        Tpm::new(DeviceTransport::open().map_err(StateError::Tpm)?).map_err(StateError::Tpm)?;
    let pcr11 = tpm
        .read_bank(cvm_formats::registers::Bank::Sha256, &SIGNED_PCRS)
        .map_err(StateError::Tpm)?
        .remove(0);
    Ok(TpmSigned {
        transport: DeviceTransport::open().map_err(StateError::Tpm)?,
        key,
        entries,
        pcr11,
    })
}

/// What the state phase did.
pub struct Opened {
    pub device: String,
    pub uuid: String,
    pub formatted: bool,
    pub mapped: MappedDevice,
    /// The node's name when nobody named it ([`crate::net::node_name::derive`]).
    pub node_name: String,
}

/// The steps of the state phase that touch the machine (the disk's bytes, the key sources,
/// device-mapper, mkfs, the mount), behind one trait so that the order of the steps is
/// unit-tested against a simulated disk (the tests' `SimDisk`), as [`RealDisk`] drives the
/// kernel. The decisions (classify, measure, format, commit) stay in [`set_up_with`].
pub trait StateDisk {
    /// Finds the disk with this serial and opens it: `/dev/<name>`, its major:minor and size.
    fn open(&mut self, serial: &str) -> Result<(String, (u32, u32), u64), StateError>;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    fn sync(&mut self) -> std::io::Result<()>;
    /// The key source `choice` names, created now (a `tpm` source reads the PCRs it seals to
    /// when created).
    fn key_source(
        &mut self,
        choice: KeySourceChoice,
        kbs: Option<&KbsConfig>,
        tee: Tee,
    ) -> Result<Box<dyn KeySource>, StateError>;
    /// Maps dm-crypt (over dm-integrity when the policy asks) with the volume key: the device
    /// and its size in sectors.
    fn map(
        &mut self,
        policy: &Policy,
        device: &str,
        dev: (u32, u32),
        size: u64,
        formatted: bool,
        volume_key: &[u8],
    ) -> Result<(MappedDevice, u64), StateError>;
    /// Before mkfs on a new format: the wipe, or the superblock slots of an unwiped integrity
    /// device.
    fn prepare(&mut self, cfg: &StateConfig, node: &str, bytes: u64) -> Result<(), StateError>;
    fn mkfs(&mut self, cfg: &StateConfig, node: &str) -> Result<(), StateError>;
    /// On an existing disk: what the file system's superblock says of the last boot.
    fn report_file_system(&mut self, node: &str);
    fn mount(&mut self, cfg: &StateConfig, node: &str) -> Result<(), StateError>;
}

/// The machine's disk, keys, device-mapper and mount.
pub struct RealDisk<'a> {
    sys: &'a dyn System,
    file: Option<File>,
}

impl<'a> RealDisk<'a> {
    pub fn new(sys: &'a dyn System) -> Self {
        RealDisk { sys, file: None }
    }

    fn file(&self) -> std::io::Result<&File> {
        self.file
            .as_ref()
            .ok_or_else(|| std::io::Error::other("the state disk is not open"))
    }
}

impl StateDisk for RealDisk<'_> {
    fn open(&mut self, serial: &str) -> Result<(String, (u32, u32), u64), StateError> {
        let (name, dev) = find_by_serial(Path::new("/sys/block"), serial)?;
        let device = format!("/dev/{name}");
        let io = |what: &'static str| {
            let device = device.clone();
            move |source| StateError::Io {
                what,
                device,
                source,
            }
        };
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&device)
            .map_err(io("open"))?;
        let size = luks2_size(&file).map_err(io("size"))?;
        self.file = Some(file);
        Ok((device, dev, size))
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file()?.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file()?.write_all_at(buf, offset)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.file()?.sync_all()
    }

    fn key_source(
        &mut self,
        choice: KeySourceChoice,
        kbs: Option<&KbsConfig>,
        tee: Tee,
    ) -> Result<Box<dyn KeySource>, StateError> {
        Ok(match choice {
            KeySourceChoice::Tpm => Box::new(tpm_source()?),
            KeySourceChoice::TpmSigned => Box::new(tpm_signed_source()?),
            KeySourceChoice::Ephemeral => Box::new(Ephemeral),
            KeySourceChoice::Kbs => Box::new(kbs_source(kbs.ok_or(StateError::NoKbs)?, tee)?),
            KeySourceChoice::SnpDerived => Box::new(SnpDerived),
        })
    }

    fn map(
        &mut self,
        policy: &Policy,
        device: &str,
        dev: (u32, u32),
        size: u64,
        formatted: bool,
        volume_key: &[u8],
    ) -> Result<(MappedDevice, u64), StateError> {
        let (backing, sectors) = if policy.integrity {
            let integrity = open_integrity(device, dev, size, formatted)?;
            let sectors = integrity.1;
            ((integrity.0.major, integrity.0.minor), sectors)
        } else {
            (dev, (size - DATA_OFFSET) / 4096 * 8)
        };
        let key = LogonKey::add("cvm:state", volume_key)?;
        let params = crypt_params(policy, &key.table_reference(), backing);
        let mapped = dm::create(DM_NAME, sectors, "crypt", &params, false)?;
        drop(key);
        Ok((mapped, sectors))
    }

    fn prepare(&mut self, cfg: &StateConfig, node: &str, bytes: u64) -> Result<(), StateError> {
        if cfg.wipe {
            wipe(node, bytes)
        } else if cfg.unwritten_blocks_fail() {
            write_superblock_slots(node, bytes, cfg.mkfs.is_some())
        } else {
            Ok(())
        }
    }

    fn mkfs(&mut self, cfg: &StateConfig, node: &str) -> Result<(), StateError> {
        mkfs(cfg, node)
    }

    fn report_file_system(&mut self, node: &str) {
        report_file_system(node)
    }

    fn mount(&mut self, cfg: &StateConfig, node: &str) -> Result<(), StateError> {
        mount_state(cfg, self.sys, node)
    }
}

/// Sets up the state disk. `measure` extends an event (the disk's identity is measured before
/// the key is derived or used).
pub fn set_up(
    cfg: &StateConfig,
    kbs: Option<&KbsConfig>,
    tee: Tee,
    sys: &dyn System,
    measure: &mut dyn FnMut(Event) -> Result<(), MeasureError>,
) -> Result<Opened, StateError> {
    set_up_with(cfg, kbs, tee, &mut RealDisk::new(sys), measure)
}

/// The state phase's decisions and their order, on any [`StateDisk`]: the disk's identity is
/// measured before a key is derived from a source, the volume key's identity before the key
/// is used; a foreign disk is refused before anything is written; COMMITTED is written only
/// after mkfs succeeded.
pub fn set_up_with(
    cfg: &StateConfig,
    kbs: Option<&KbsConfig>,
    tee: Tee,
    disk: &mut dyn StateDisk,
    measure: &mut dyn FnMut(Event) -> Result<(), MeasureError>,
) -> Result<Opened, StateError> {
    let (device, dev, size) = disk.open(&cfg.serial)?;
    let io = |what: &'static str| {
        let device = device.clone();
        move |source| StateError::Io {
            what,
            device,
            source,
        }
    };
    let policy = policy(cfg);
    let mut head = vec![0u8; HEADER_PROBE.min(size) as usize];
    disk.read_at(&mut head, 0)
        .map_err(io("read the start of"))?;
    if !header_probe_suffices(&head, size) {
        let read = head.len();
        head.resize(BLANK_PROBE.min(size) as usize, 0);
        disk.read_at(&mut head[read..], read as u64)
            .map_err(io("read the start of"))?;
    }
    let state = classify(&head, size, &policy);
    // Nothing about the disk is measured yet: a key broker asked here checks the evidence
    // `cvm-measure predict --at key-release` computes.
    let mut source = disk.key_source(cfg.key_choice(), kbs, tee)?;
    let key_err = |source_name: &'static str| {
        move |source| StateError::Key {
            source_name,
            source,
        }
    };
    let (uuid, volume_key, formatted) = match state {
        DiskState::Foreign(why) => return Err(StateError::Foreign { device, why }),
        DiskState::Ours(header) if !source.ephemeral() => {
            let key = open_ours(
                &header,
                &device,
                source.as_mut(),
                measure,
                &mut |offset, buf| disk.read_at(buf, offset),
            )?;
            log::info!("state disk {device}: opened LUKS2 {}", header.uuid);
            (header.uuid.clone(), key, false)
        }
        // Blank, an uncommitted format of ours, or (ephemeral) any disk of ours: format.
        _ => {
            if size < MIN_FORMAT_SIZE {
                return Err(StateError::TooSmall { device, size });
            }
            let uuid = random_uuid();
            measure(Event::StateDisk(Some(uuid.as_bytes().to_vec())))?;
            // The source seals now, with the disk's identity already in the PCRs (a signed
            // policy covers PCR 11 alone, which this does not move).
            if let KeySourceChoice::Tpm = cfg.key_choice() {
                source = disk.key_source(cfg.key_choice(), kbs, tee)?;
            }
            let provisioned = source.provision().map_err(key_err(source.name()))?;
            let mut volume_key = Zeroizing::new(vec![0u8; policy.key_size()]);
            luks2::kernel_random(&mut volume_key);
            measure(Event::VolumeKey(volume_key_identity(&volume_key)))?;
            let new_head = luks2::format(FormatInput {
                policy,
                uuid: &uuid,
                secret: &provisioned.secret,
                volume_key: &volume_key,
                label: UNCOMMITTED,
                token: provisioned.token.as_deref(),
                random: &mut luks2::kernel_random,
            })
            .map_err(|source| StateError::Header {
                device: device.clone(),
                source,
            })?;
            disk.write_at(&new_head, 0)
                .map_err(io("write the header of"))?;
            if policy.integrity {
                // A fresh integrity superblock: the kernel formats the device when it finds
                // zeros there (an interrupted earlier attempt may have left one).
                disk.write_at(&[0u8; SUPERBLOCK_LEN], DATA_OFFSET)
                    .map_err(io("clear the integrity superblock of"))?;
            }
            disk.sync().map_err(io("sync"))?;
            log::info!(
                "state disk {device}: formatted LUKS2 {uuid} (key source {})",
                source.name()
            );
            (uuid, volume_key, true)
        }
    };
    let (mapped, sectors) = disk.map(&policy, &device, dev, size, formatted, &volume_key)?;
    let node_name = crate::net::node_name::derive(&volume_key);
    drop(volume_key);
    if formatted {
        disk.prepare(cfg, &mapped.node(), sectors * 512)?;
        disk.mkfs(cfg, &mapped.node())?;
        commit(disk, &device)?;
    } else {
        disk.report_file_system(&mapped.node());
    }
    disk.mount(cfg, &mapped.node())?;
    Ok(Opened {
        device,
        uuid,
        formatted,
        mapped,
        node_name,
    })
}

/// The label of the volume key's identity (the HMAC's message).
const VOLUME_KEY_IDENTITY: &[u8] = b"cvm-init volume key identity";

/// What is measured of a volume key: HMAC-SHA256 keyed with it, so the value names the key
/// without revealing it (the key is 64 or 96 random bytes: nothing to guess).
pub fn volume_key_identity(volume_key: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(volume_key)
        .expect("HMAC takes a key of any length");
    mac.update(VOLUME_KEY_IDENTITY);
    mac.finalize().into_bytes().into()
}

/// Opens a disk of ours: measures its identity, recovers the keyslot secret through the key
/// source (the token as found on the disk), unlocks the volume key and measures its identity
/// before anything uses it. The token is the host's to write, so a header and token made
/// elsewhere (the predicted PCR policy, a secret of the host's choosing) open a volume key the
/// host knows: the measured identity then differs from the node's first boot.
fn open_ours(
    header: &luks2::Header,
    device: &str,
    source: &mut dyn KeySource,
    measure: &mut dyn FnMut(Event) -> Result<(), MeasureError>,
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<Zeroizing<Vec<u8>>, StateError> {
    measure(Event::StateDisk(Some(header.uuid.as_bytes().to_vec())))?;
    let secret = source
        .recover(header.metadata.tokens.0.get("0"))
        .map_err(|e| StateError::Key {
            source_name: source.name(),
            source: e,
        })?;
    let key = luks2::unlock(header, &secret, read_at).map_err(|source| StateError::Header {
        device: device.to_string(),
        source,
    })?;
    measure(Event::VolumeKey(volume_key_identity(&key)))?;
    Ok(key)
}

fn luks2_size(file: &File) -> std::io::Result<u64> {
    use std::io::Seek;
    let mut f = file;
    f.seek(std::io::SeekFrom::End(0))
}

/// Maps dm-integrity over the data segment. On a new format the kernel first formats it
/// through a one-block device (its superblock then tells the size); on every boot the
/// superblock is read back and checked before the device that uses it is created.
fn open_integrity(
    device: &str,
    dev: (u32, u32),
    size: u64,
    formatted: bool,
) -> Result<(MappedDevice, u64), StateError> {
    let params = integrity::params(dev);
    if formatted {
        dm::create(DM_INTEGRITY_NAME, 8, "integrity", &params, false)?;
        dm::remove(DM_INTEGRITY_NAME)?;
    }
    let block = read_direct(device, DATA_OFFSET).map_err(|source| StateError::Io {
        what: "read the integrity superblock of",
        device: device.to_string(),
        source,
    })?;
    let sb = integrity::parse(&block.0, (size - DATA_OFFSET) / 512).map_err(|source| {
        StateError::Integrity {
            device: device.to_string(),
            source,
        }
    })?;
    let mapped = dm::create(
        DM_INTEGRITY_NAME,
        sb.provided_data_sectors,
        "integrity",
        &params,
        false,
    )?;
    log::info!(
        "state disk {device}: dm-integrity (hmac-sha256 tags, journalled) with {} MiB of data",
        sb.provided_data_sectors / 2048
    );
    Ok((mapped, sb.provided_data_sectors))
}

/// Says, before the mount, whether the last boot left the file system clean (ext4 clears its
/// needs-recovery flag at a clean unmount) and whether ext4 recorded errors.
fn report_file_system(node: &str) {
    let Ok(block) = read_direct(node, 0) else {
        log::warn!("state file system on {node}: cannot read its superblock");
        return;
    };
    let sb = &block.0[1024..];
    if sb[0x38..0x3a] != [0x53, 0xef] {
        log::warn!("state file system on {node}: no ext4 superblock");
        return;
    }
    let state = u16::from_le_bytes([sb[0x3a], sb[0x3b]]);
    let incompat = u32::from_le_bytes(sb[0x60..0x64].try_into().expect("4 bytes"));
    const ERRORS: u16 = 2;
    const RECOVER: u32 = 4;
    if state & ERRORS != 0 {
        log::warn!("state file system on {node}: ext4 recorded errors in an earlier boot");
    }
    if incompat & RECOVER != 0 {
        log::warn!(
            "state file system on {node}: not unmounted cleanly by the last boot; its journal is replayed now"
        );
    } else {
        log::info!("state file system on {node}: unmounted cleanly by the last boot");
    }
}

/// One block, aligned for O_DIRECT.
#[derive(Clone)]
#[repr(C, align(4096))]
struct Block([u8; SUPERBLOCK_LEN]);

/// Reads 4096 bytes at `offset` past the page cache: the kernel wrote them through another
/// device, and a cached copy of the block device could be stale.
fn read_direct(device: &str, offset: u64) -> std::io::Result<Box<Block>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT | nix::libc::O_CLOEXEC)
        .open(device)?;
    let mut block = Box::new(Block([0u8; SUPERBLOCK_LEN]));
    file.read_exact_at(&mut block.0, offset)?;
    Ok(block)
}

/// O_DIRECT writes to a new device, each failure saying what was being done to which device.
struct DirectWriter<'a> {
    file: File,
    what: &'static str,
    node: &'a str,
}

impl<'a> DirectWriter<'a> {
    fn open(what: &'static str, node: &'a str) -> Result<Self, StateError> {
        OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_DIRECT | nix::libc::O_CLOEXEC)
            .open(node)
            .map(|file| DirectWriter { file, what, node })
            .map_err(|source| StateError::Io {
                what,
                device: node.to_string(),
                source,
            })
    }

    fn err(&self, source: std::io::Error) -> StateError {
        StateError::Io {
            what: self.what,
            device: self.node.to_string(),
            source,
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StateError> {
        self.file.write_all_at(buf, offset).map_err(|e| self.err(e))
    }

    fn sync(&self) -> Result<(), StateError> {
        self.file.sync_all().map_err(|e| self.err(e))
    }
}

/// ext4's block groups (4096-byte blocks, 32768 per group): every group may hold a backup
/// superblock, which mke2fs writes as 1024 bytes into a block it first reads.
const EXT4_GROUP_BYTES: u64 = 32768 * 4096;

/// Without a wipe, a block never written fails to read. mke2fs reads exactly two kinds of
/// block before writing them: block 0 (the primary superblock at byte 1024, and the sectors it
/// clears of old partition labels) and the first block of the groups with a backup superblock.
/// With the default mkfs (4096-byte blocks, `sparse_super`) those are groups 0, 1 and the
/// powers of 3, 5 and 7: 12 blocks on a 32 GiB disk, where writing the first block of every
/// group (one per 128 MiB, each a synchronous write through the integrity journal) made the
/// first boot grow with the disk. A configured mkfs may place backups anywhere: every group's
/// first block is written then.
fn write_superblock_slots(node: &str, bytes: u64, every_group: bool) -> Result<(), StateError> {
    let writer = DirectWriter::open("prepare", node)?;
    let zeros = Block([0u8; SUPERBLOCK_LEN]);
    let groups = bytes.div_ceil(EXT4_GROUP_BYTES);
    let slots: Vec<u64> = if every_group {
        (0..groups).collect()
    } else {
        backup_groups(groups)
    };
    for group in slots {
        writer.write_at(&zeros.0, group * EXT4_GROUP_BYTES)?;
    }
    writer.sync()
}

/// The block groups that hold a superblock with `sparse_super`, of `groups` groups.
fn backup_groups(groups: u64) -> Vec<u64> {
    let mut found = std::collections::BTreeSet::from([0, 1]);
    for base in [3u64, 5, 7] {
        let mut power = base;
        while power < groups {
            found.insert(power);
            power *= base;
        }
    }
    found.into_iter().filter(|&g| g < groups).collect()
}

/// Writes every block of the new crypt device once, so that every integrity tag is valid.
fn wipe(node: &str, bytes: u64) -> Result<(), StateError> {
    let writer = DirectWriter::open("wipe", node)?;
    let chunk = vec![Block([0u8; SUPERBLOCK_LEN]); WIPE_CHUNK / SUPERBLOCK_LEN];
    // SAFETY: `Block` is a plain, padding-free array of bytes, so the vector's elements are
    // `WIPE_CHUNK` contiguous, initialised bytes, aligned to 4096 as O_DIRECT needs.
    let zeros: &[u8] = unsafe { std::slice::from_raw_parts(chunk.as_ptr().cast(), WIPE_CHUNK) };
    let started = Instant::now();
    let mut reported = 0;
    let mut offset = 0u64;
    while offset < bytes {
        let len = (bytes - offset).min(WIPE_CHUNK as u64) as usize;
        writer.write_at(&zeros[..len], offset)?;
        offset += len as u64;
        let percent = offset * 100 / bytes;
        if percent >= reported + 10 {
            reported = percent - percent % 10;
            log::info!(
                "state disk: wiping {node}: {reported}% ({} MiB in {:.1} s)",
                offset >> 20,
                started.elapsed().as_secs_f64()
            );
        }
    }
    writer.sync()
}

fn mkfs(cfg: &StateConfig, node: &str) -> Result<(), StateError> {
    let command = cfg.mkfs_command();
    let program = command.first().cloned().unwrap_or_default();
    let fail = |detail: String| StateError::Mkfs {
        program: program.clone(),
        device: node.to_string(),
        detail,
    };
    let out = std::process::Command::new(&program)
        .args(&command[1..])
        .arg(node)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    log::info!("state file system created on {node}");
    Ok(())
}

/// Marks the format committed: the secondary copy first, then the primary, each synced.
fn commit(disk: &mut dyn StateDisk, device: &str) -> Result<(), StateError> {
    let io = |what: &'static str| {
        move |source| StateError::Io {
            what,
            device: device.to_string(),
            source,
        }
    };
    let mut head = vec![0u8; 2 * HDR_SIZE as usize];
    disk.read_at(&mut head, 0)
        .map_err(io("read the header of"))?;
    luks2::relabel(&mut head, COMMITTED).map_err(|source| StateError::Header {
        device: device.to_string(),
        source,
    })?;
    disk.write_at(&head[HDR_SIZE as usize..], HDR_SIZE)
        .map_err(io("commit the header of"))?;
    disk.sync().map_err(io("sync"))?;
    disk.write_at(&head[..HDR_SIZE as usize], 0)
        .map_err(io("commit the header of"))?;
    disk.sync().map_err(io("sync"))?;
    Ok(())
}

fn mount_state(cfg: &StateConfig, sys: &dyn System, node: &str) -> Result<(), StateError> {
    let flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    // ext4 reads ahead one inode-table block past the last inode in use; without a wipe that
    // block may never have been written and would fail its integrity check (harmlessly, but
    // loudly) until the kernel's lazy init has zeroed the inode tables.
    let data = cfg
        .unwritten_blocks_fail()
        .then_some("inode_readahead_blks=0");
    sys.mount(node, &cfg.mount, "ext4", flags, data)
        .map_err(|source| StateError::Mount {
            what: node.to_string(),
            target: cfg.mount.clone(),
            source,
        })?;
    for target in &cfg.binds {
        let backing = cfg.mount.join(target.strip_prefix("/").unwrap_or(target));
        sys.mkdir_all(&backing).map_err(|source| StateError::Io {
            what: "create",
            device: backing.display().to_string(),
            source,
        })?;
        sys.mount(
            &backing.to_string_lossy(),
            target,
            "",
            MsFlags::MS_BIND,
            None,
        )
        .map_err(|source| StateError::Mount {
            what: backing.display().to_string(),
            target: target.clone(),
            source,
        })?;
    }
    for target in &cfg.overlays {
        mount_overlay(cfg, sys, target)?;
    }
    Ok(())
}

/// An overlay on `target`: the image's directory below (read-only, verified), an upper layer and
/// its work directory on the state file system (`<mount>/overlays/<target>/{upper,work}`).
/// The paths were checked with the configuration (no `,` `:` `\` to break the options).
fn mount_overlay(cfg: &StateConfig, sys: &dyn System, target: &Path) -> Result<(), StateError> {
    let base = cfg
        .mount
        .join("overlays")
        .join(target.strip_prefix("/").unwrap_or(target));
    let (upper, work) = (base.join("upper"), base.join("work"));
    for dir in [&upper, &work] {
        sys.mkdir_all(dir).map_err(|source| StateError::Io {
            what: "create",
            device: dir.display().to_string(),
            source,
        })?;
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        target.display(),
        upper.display(),
        work.display()
    );
    sys.mount(
        "overlay",
        target,
        "overlay",
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some(&options),
    )
    .map_err(|source| StateError::Mount {
        what: format!("overlay of {}", target.display()),
        target: target.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod sim;

#[cfg(test)]
mod tests {

    #[test]
    fn backup_superblocks_are_in_groups_0_1_and_the_powers_of_3_5_7() {
        // 32 GiB: 256 groups of 128 MiB.
        assert_eq!(
            backup_groups(256),
            vec![0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125, 243]
        );
        assert_eq!(backup_groups(1), vec![0]);
        assert_eq!(backup_groups(8), vec![0, 1, 3, 5, 7]);
        assert_eq!(backup_groups(2), vec![0, 1]);
    }
    use super::*;

    fn state_config(key: &str, extra: &str) -> StateConfig {
        crate::config::parse_config_file(
            Path::new("/c"),
            &format!("[state]\nserial = \"s\"\nkey = \"{key}\"\n{extra}\n[kbs]\nurl = \"https://h:1\"\nca = \"/c.pem\"\nresource = \"r/t/k\""),
        )
        .unwrap()
        .state
        .unwrap()
    }

    /// Binds first, then each overlay: its upper and work directories on the state file
    /// system, the image's directory as the lower layer, never suid or device files.
    #[test]
    fn binds_then_overlays_with_their_layers_on_the_state_disk() {
        let cfg = state_config(
            "tpm",
            "binds = [\"/var/lib/kubelet\"]\noverlays = [\"/etc/cni/net.d\", \"/opt/cni/bin\"]",
        );
        let sys = crate::sys::fake::FakeSystem::default();
        mount_state(&cfg, &sys, "/dev/mapper/cvm-state").unwrap();
        let nosuid_nodev = (MsFlags::MS_NODEV | MsFlags::MS_NOSUID).bits();
        let calls = sys.calls.borrow();
        let expected = [
            "mount /dev/mapper/cvm-state /var/lib/cvm-state ext4".to_string(),
            "mkdir /var/lib/cvm-state/var/lib/kubelet".into(),
            "mount /var/lib/cvm-state/var/lib/kubelet /var/lib/kubelet".into(),
            "mkdir /var/lib/cvm-state/overlays/etc/cni/net.d/upper".into(),
            "mkdir /var/lib/cvm-state/overlays/etc/cni/net.d/work".into(),
            format!("mount overlay /etc/cni/net.d overlay {nosuid_nodev:#x} lowerdir=/etc/cni/net.d,upperdir=/var/lib/cvm-state/overlays/etc/cni/net.d/upper,workdir=/var/lib/cvm-state/overlays/etc/cni/net.d/work"),
            "mkdir /var/lib/cvm-state/overlays/opt/cni/bin/upper".into(),
            "mkdir /var/lib/cvm-state/overlays/opt/cni/bin/work".into(),
            format!("mount overlay /opt/cni/bin overlay {nosuid_nodev:#x} lowerdir=/opt/cni/bin,upperdir=/var/lib/cvm-state/overlays/opt/cni/bin/upper,workdir=/var/lib/cvm-state/overlays/opt/cni/bin/work"),
        ];
        assert_eq!(calls.len(), expected.len(), "{calls:#?}");
        for (call, expected) in calls.iter().zip(expected) {
            assert!(call.starts_with(&expected), "{call} is not {expected}");
        }
    }

    #[test]
    fn overlay_paths_that_would_break_the_options_or_repeat_are_refused() {
        for (extra, value) in [
            ("overlays = [\"etc/cni\"]", "etc/cni"),
            ("overlays = [\"/\"]", "/"),
            ("overlays = [\"/opt/a,upperdir=/x\"]", "/opt/a,upperdir=/x"),
            ("overlays = [\"/opt/a:b\"]", "/opt/a:b"),
            ("overlays = [\"/opt/../etc\"]", "/opt/../etc"),
            ("overlays = [\"/opt/a\", \"/opt/a\"]", "/opt/a"),
            ("binds = [\"/opt/a\"]\noverlays = [\"/opt/a\"]", "/opt/a"),
        ] {
            let err = crate::config::parse_config_file(
                Path::new("/c"),
                &format!("[state]\nserial = \"s\"\nkey = \"tpm\"\n{extra}\n"),
            )
            .unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(&format!("state.overlays = {value:?}")),
                "{extra}: {text}"
            );
        }
    }

    #[test]
    fn the_signed_tpm_policy_is_the_tpm_sources_only() {
        assert_eq!(state_config("tpm", "").key_choice(), KeySourceChoice::Tpm);
        let signed = state_config("tpm", "tpm_policy = \"signed\"");
        assert_eq!(signed.key_choice(), KeySourceChoice::TpmSigned);
        // The same checks as any tpm key: a host's vTPM under SNP is refused.
        assert!(tpm_key_decision(&signed, Tee::Snp, None).is_err());
        assert_eq!(
            state_config("tpm", "tpm_policy = \"pcrs\"").key_choice(),
            KeySourceChoice::Tpm
        );
        let e = crate::config::parse_config_file(
            Path::new("/c"),
            "[state]\nserial = \"s\"\nkey = \"ephemeral\"\ntpm_policy = \"signed\"",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("state.tpm_policy"), "{e}");
        let e = crate::config::parse_config_file(
            Path::new("/c"),
            "[state]\nserial = \"s\"\nkey = \"tpm\"\ntpm_policy = \"sined\"",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tpm_policy"), "{e}");
        // Not a key source of its own in the file.
        assert!(crate::config::parse_config_file(
            Path::new("/c"),
            "[state]\nserial = \"s\"\nkey = \"tpm-signed\"",
        )
        .is_err());
        // Without a UKI's /.extra files the source is refused by name before any disk write.
        if !Path::new(PCR_PUBLIC_KEY_PATH).exists() {
            keep_signed_policy_files();
            let err = tpm_signed_source().err().unwrap().to_string();
            assert!(
                err.starts_with("cannot read /.extra/tpm2-pcr-public-key.pem: state.tpm_policy = \"signed\" needs a UKI"),
                "{err}"
            );
        }
    }

    #[test]
    fn the_tpm_key_is_refused_on_snp_tdx_and_none_unless_the_vtpm_is_in_the_tee() {
        let tpm = state_config("tpm", "");
        assert_eq!(
            tpm_key_decision(&tpm, Tee::Tpm, None).unwrap(),
            VtpmUse::Registers
        );
        for tee in [Tee::Snp, Tee::Tdx, Tee::None] {
            let err = tpm_key_decision(&tpm, tee, None).unwrap_err().to_string();
            assert!(
                err.contains(&format!(
                    "state.key = \"tpm\" is refused with cvm.tee={tee}"
                )) && err.contains("nothing was written"),
                "{err}"
            );
            if tee != Tee::None {
                assert!(err.contains("state.tpm_in_tee = true"), "{err}");
            }
        }
        let stated = state_config("tpm", "tpm_in_tee = true");
        assert_eq!(
            tpm_key_decision(&stated, Tee::Snp, None).unwrap(),
            VtpmUse::AlsoExtend
        );
        assert_eq!(
            tpm_key_decision(&stated, Tee::Tdx, None).unwrap(),
            VtpmUse::AlsoExtend
        );
        assert_eq!(
            tpm_key_decision(&stated, Tee::Tpm, None).unwrap(),
            VtpmUse::Registers
        );
        assert!(tpm_key_decision(&stated, Tee::None, None).is_err());
        // cvm.tee=tpm on an SNP or TDX guest: the vTPM is still the host's unless stated.
        for under in [Tee::Snp, Tee::Tdx] {
            let err = tpm_key_decision(&tpm, Tee::Tpm, Some(under))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("cvm.tee=tpm on a {under} guest"))
                    && err.contains("nothing was written")
                    && err.contains("state.tpm_in_tee = true"),
                "{err}"
            );
            assert_eq!(
                tpm_key_decision(&stated, Tee::Tpm, Some(under)).unwrap(),
                VtpmUse::Registers
            );
        }
        for key in ["kbs", "ephemeral", "snp-derived"] {
            for tee in [Tee::Tpm, Tee::Snp, Tee::Tdx, Tee::None] {
                assert_eq!(
                    tpm_key_decision(&state_config(key, ""), tee, None).unwrap(),
                    VtpmUse::NotUsed
                );
            }
        }
        // The statement belongs to the tpm key source only.
        let e = crate::config::parse_config_file(
            Path::new("/c"),
            "[state]\nserial = \"s\"\nkey = \"ephemeral\"\ntpm_in_tee = true",
        )
        .unwrap_err();
        assert!(e.to_string().contains("state.tpm_in_tee"), "{e}");
    }

    /// The host writes its own header and `cvm-tpm2` token: a keyed-hash object sealed with
    /// the predicted PCR policy (the same PCR values the node sees) around a secret it knows,
    /// and a keyslot for a volume key it knows. The node opens it (the token's policy holds),
    /// but the volume key's measured identity differs from the node's own disk's.
    #[test]
    fn a_substituted_token_opens_another_volume_key_and_the_measurement_shows_it() {
        use crate::tee::tpm::{spawn_swtpm, TcpTransport};
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut swtpm = spawn_swtpm(dir.path(), port).expect("swtpm (make deps installs it)");
        let connect = || TcpTransport::connect(port).expect("swtpm listens");
        let mut tpm = Tpm::new(connect()).unwrap();
        tpm.extend(15, |bank| bank.hash(b"this boot's identity events"))
            .unwrap();
        let values = tpm
            .read_bank(cvm_formats::registers::Bank::Sha256, &SEAL_PCRS)
            .unwrap();
        // swtpm serves one connection at a time.
        drop(tpm);
        let source = || TpmSealed {
            transport: connect(),
            pcrs: SEAL_PCRS.to_vec(),
            values: values.clone(),
        };
        let policy = Policy {
            integrity: true,
            kdf: KdfPolicy::Pbkdf2 { iterations: 1000 },
        };
        let uuid = "2f1c7a3e-5b7d-4c61-9a0e-8d1f3b2a6c45";
        let image = |secret: &[u8], volume_key: &[u8], token: &str| -> Vec<u8> {
            let mut head = luks2::format(FormatInput {
                policy,
                uuid,
                secret,
                volume_key,
                label: COMMITTED,
                token: Some(token),
                random: &mut luks2::kernel_random,
            })
            .unwrap()
            .to_vec();
            head.resize(DATA_OFFSET as usize, 0);
            head
        };

        // The node's own disk.
        let node_key = vec![0x11u8; policy.key_size()];
        let provisioned = source().provision().unwrap();
        let node_disk = image(
            &provisioned.secret,
            &node_key,
            provisioned.token.as_deref().unwrap(),
        );
        // The host's: sealed outside cvm-init, to the predicted policy, around its own secret.
        let host_secret = [0x22u8; 32];
        let blob =
            crate::tee::seal::seal(&mut connect(), &host_secret, &SEAL_PCRS, &values).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let host_token = format!(
            "{{\"type\":\"{}\",\"keyslots\":[\"0\"],\"private\":\"{}\",\"public\":\"{}\",\"pcrs\":[11,15],\"pcr_bank\":\"sha256\"}}",
            crate::keys::TPM_TOKEN,
            b64.encode(&blob.private),
            b64.encode(&blob.public)
        );
        let host_key = vec![0x33u8; policy.key_size()];
        let host_disk = image(&host_secret, &host_key, &host_token);

        let open = |disk: &[u8]| {
            let header = luks2::parse(disk, MIN_FORMAT_SIZE, &policy).unwrap();
            let mut events = Vec::new();
            let key = open_ours(
                &header,
                "/dev/test",
                &mut source(),
                &mut |event| {
                    events.push(event);
                    Ok(())
                },
                &mut |offset, buf| {
                    let at = offset as usize;
                    buf.copy_from_slice(&disk[at..at + buf.len()]);
                    Ok(())
                },
            )
            .unwrap();
            (events, key)
        };
        let (node_events, key) = open(&node_disk);
        assert_eq!(*key, node_key);
        // What remains: the substitute opens, with a volume key the host knows.
        let (host_events, key) = open(&host_disk);
        assert_eq!(*key, host_key);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(swtpm.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = swtpm.wait();

        // The disk's identity (its UUID, copied) cannot tell them apart; the measured volume
        // key identity does.
        assert_eq!(node_events[0], host_events[0]);
        assert_ne!(
            node_events, host_events,
            "the substitution is not visible in the measurements"
        );
        assert_eq!(
            host_events.last(),
            Some(&Event::VolumeKey(volume_key_identity(&host_key)))
        );
        // The measured value is a keyed digest, not the key.
        let measured = Event::VolumeKey(volume_key_identity(&node_key)).measured_bytes();
        assert!(!measured.windows(8).any(|w| w == &node_key[..8]));
    }

    #[test]
    fn released_resources_are_not_written_through_links() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), "untouched").unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), run.join("secret")).unwrap();
        std::os::unix::fs::symlink(&outside, run.join("linked")).unwrap();
        for (path, named) in [
            (run.join("secret"), run.join("secret")),
            (run.join("linked/victim"), run.join("linked")),
            (run.join("linked/new/file"), run.join("linked")),
        ] {
            let e = write_secret_file(&path, b"secret", 0o600).unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("{} in {}", named.display(), path.display())),
                "{e}"
            );
        }
        assert_eq!(
            std::fs::read_to_string(outside.join("victim")).unwrap(),
            "untouched"
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
        // Without links: written with its mode, parents 0700.
        use std::os::unix::fs::PermissionsExt;
        write_secret_file(&run.join("kbs/a/key"), b"secret", 0o600).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&run.join("kbs/a/key")), 0o600);
        assert_eq!(mode(&run.join("kbs/a")), 0o700);
    }

    #[test]
    fn serials_are_read_as_virtio_nvme_and_scsi_show_them_and_duplicates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let disk = |name: &str, file: &str, content: &[u8], dev: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(d.join("device")).unwrap();
            std::fs::write(d.join(file), content).unwrap();
            std::fs::write(d.join("dev"), dev).unwrap();
        };
        disk("vda", "serial", b"root\n", "254:0\n");
        disk(
            "nvme0n1",
            "device/serial",
            b"cvm-state           \n",
            "259:0\n",
        );
        let mut page = vec![0, 0x80, 0, 9];
        page.extend(b"scsi-disk");
        disk("sda", "device/vpd_pg80", &page, "8:0\n");
        disk(
            "sdb",
            "device/vpd_pg80",
            &[0, 0x83, 0, 2, b'x', b'y'],
            "8:16\n",
        );
        disk("sdc", "device/vpd_pg80", &[0, 0x80, 0, 200, b'x'], "8:32\n");
        assert_eq!(
            disk_serial(&dir.path().join("vda")).as_deref(),
            Some("root")
        );
        assert_eq!(
            find_by_serial(dir.path(), "cvm-state").unwrap(),
            ("nvme0n1".to_string(), (259, 0))
        );
        assert_eq!(
            find_by_serial(dir.path(), "scsi-disk").unwrap(),
            ("sda".to_string(), (8, 0))
        );
        // Another VPD page, or a length past the end: no serial.
        assert_eq!(disk_serial(&dir.path().join("sdb")), None);
        assert_eq!(disk_serial(&dir.path().join("sdc")), None);
        // An NVMe multipath namespace's hidden per-path device is not a second disk.
        disk(
            "nvme0c0n1",
            "device/serial",
            b"cvm-state           \n",
            "259:1\n",
        );
        std::fs::write(dir.path().join("nvme0c0n1/hidden"), "1\n").unwrap();
        std::fs::write(dir.path().join("nvme0n1/hidden"), "0\n").unwrap();
        assert_eq!(
            find_by_serial(dir.path(), "cvm-state").unwrap(),
            ("nvme0n1".to_string(), (259, 0))
        );
        // A second disk with the same serial (here a SCSI one): refused, naming both.
        let mut page = vec![0, 0x80, 0, 9];
        page.extend(b"cvm-state");
        disk("sdd", "device/vpd_pg80", &page, "8:48\n");
        match find_by_serial(dir.path(), "cvm-state") {
            Err(StateError::DuplicateSerial { serial, disks }) => {
                assert_eq!(serial, "cvm-state");
                assert_eq!(disks, "nvme0n1, sdd");
            }
            other => panic!("{other:?}"),
        }
    }
}
