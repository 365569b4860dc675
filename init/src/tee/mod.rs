//! The TEE's measurement registers: one trait, three backends (vTPM PCRs, TDX RTMRs, and
//! SEV-SNP, which has no runtime registers), chosen by `cvm.tee=`.

pub mod ek;
#[cfg(feature = "test-hooks")]
pub mod emulated_snp;
pub mod evidence;
pub mod quote;
pub mod seal;
pub mod signed_policy;
pub mod snp;
pub mod tdx_guest;
pub mod tpm;
pub mod tsm;

use std::path::{Path, PathBuf};

use cvm_formats::event::Event;
use cvm_formats::registers::{rtmr_for_pcr, Bank};

use crate::config::TeeChoice;

#[derive(Debug, thiserror::Error)]
pub enum TeeError {
    #[error(transparent)]
    Tpm(#[from] tpm::TpmError),
    #[error("PCR {0} has no RTMR in the TCG mapping")]
    NoRtmr(u32),
    #[error("cannot extend RTMR{rtmr} through {path} (RTMR extension from userspace needs Linux 6.16 or later)")]
    Rtmr {
        rtmr: usize,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no TEE found (no TDX guest device, no /dev/sev-guest, no /dev/tpmrm0): a node boots without measurements only with cvm.tee=none")]
    NoneFound,
}

/// The TEE a boot measures into, once `cvm.tee=auto` is resolved. `Display` gives the name
/// of `cvm.tee=` (and of Trustee's `tee` field), which the console shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tee {
    Tpm,
    Snp,
    Tdx,
    None,
}

impl Tee {
    pub fn as_str(self) -> &'static str {
        match self {
            Tee::Tpm => "tpm",
            Tee::Snp => "snp",
            Tee::Tdx => "tdx",
            Tee::None => "none",
        }
    }
}

impl std::fmt::Display for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A register as the TEE reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterValue {
    pub register: String,
    pub bank: &'static str,
    pub value: Vec<u8>,
}

/// Where the registers go.
pub trait Backend {
    fn tee(&self) -> Tee;
    fn extend(&mut self, event: &Event) -> Result<(), TeeError>;
    /// The current values, for the console at ready: `(register, bank, value)`.
    fn read_back(&mut self) -> Result<Vec<RegisterValue>, TeeError>;
}

pub struct TpmBackend(tpm::Tpm<tpm::DeviceTransport>);

impl Backend for TpmBackend {
    fn tee(&self) -> Tee {
        Tee::Tpm
    }
    fn extend(&mut self, event: &Event) -> Result<(), TeeError> {
        Ok(self.0.extend(event.pcr(), |bank| event.digest(bank))?)
    }
    /// The boot path's PCRs (4: the boot applications, 5: the GPT and ExitBootServices, 9: the
    /// kernel's load options and initrd), then cvm-init's. A TPM returns at most 8 digests a
    /// read, so a few PCRs at a time.
    fn read_back(&mut self) -> Result<Vec<RegisterValue>, TeeError> {
        let groups: [&[u32]; 3] = [
            &[4, 5],
            &[9],
            &[
                cvm_formats::event::PHASE_PCR,
                cvm_formats::event::IDENTITY_PCR,
            ],
        ];
        let mut values = Vec::new();
        for pcrs in groups {
            values.extend(
                self.0
                    .read(pcrs)?
                    .into_iter()
                    .map(|(bank, pcr, value)| RegisterValue {
                        register: format!("pcr{pcr}"),
                        bank: bank.name(),
                        value,
                    }),
            );
        }
        Ok(values)
    }
}

impl TpmBackend {
    /// The vTPM at /dev/tpmrm0, as a second place for events (`state.tpm_in_tee`).
    pub fn open() -> Result<Box<dyn Backend>, TeeError> {
        Ok(Box::new(TpmBackend(tpm::Tpm::new(
            tpm::DeviceTransport::open()?,
        )?)))
    }
}

/// TDX: RTMRs through the sysfs files of Linux ≥ 6.16.
pub struct TdxBackend {
    pub dir: PathBuf,
}

impl TdxBackend {
    fn file(&self, rtmr: usize) -> PathBuf {
        self.dir.join(format!("rtmr{rtmr}:sha384"))
    }
}

impl Backend for TdxBackend {
    fn tee(&self) -> Tee {
        Tee::Tdx
    }
    fn extend(&mut self, event: &Event) -> Result<(), TeeError> {
        let rtmr = rtmr_for_pcr(event.pcr()).ok_or(TeeError::NoRtmr(event.pcr()))?;
        let path = self.file(rtmr);
        // The file must exist (never created): it is the kernel's interface.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &event.digest(Bank::Sha384)))
            .map_err(|source| TeeError::Rtmr { rtmr, path, source })
    }
    fn read_back(&mut self) -> Result<Vec<RegisterValue>, TeeError> {
        let path = self.file(2);
        let value = std::fs::read(&path).map_err(|source| TeeError::Rtmr {
            rtmr: 2,
            path,
            source,
        })?;
        Ok(vec![RegisterValue {
            register: "rtmr2".into(),
            bank: "sha384",
            value,
        }])
    }
}

/// SEV-SNP without a vTPM has no registers that can be extended at run time: the event log is
/// kept and its SHA-384 shown at ready, but nothing binds it to the hardware. REPORT_DATA holds
/// the key broker's binding (its nonce and the node's ephemeral key), not the log, so an SNP
/// report attests the launch digest only (the firmware and, in a measured direct boot, the
/// kernel, initrd and command line with the root hash); the events of this log are not attested.
pub struct SnpLogOnly {
    pub log: PathBuf,
}

impl Backend for SnpLogOnly {
    fn tee(&self) -> Tee {
        Tee::Snp
    }
    fn extend(&mut self, _event: &Event) -> Result<(), TeeError> {
        Ok(())
    }
    fn read_back(&mut self) -> Result<Vec<RegisterValue>, TeeError> {
        let log = std::fs::read(&self.log).unwrap_or_default();
        Ok(vec![RegisterValue {
            register: "log".into(),
            bank: "sha384",
            value: Bank::Sha384.hash(&log),
        }])
    }
}

/// No TEE, chosen explicitly with `cvm.tee=none` (which is itself measured into nothing, but
/// visible in the log and on the console).
pub struct NoTee;

impl Backend for NoTee {
    fn tee(&self) -> Tee {
        Tee::None
    }
    fn extend(&mut self, _event: &Event) -> Result<(), TeeError> {
        Ok(())
    }
    fn read_back(&mut self) -> Result<Vec<RegisterValue>, TeeError> {
        Ok(Vec::new())
    }
}

/// Where the kernel shows TEE guest interfaces; a temporary tree in tests.
pub struct Probe {
    pub tdx_measurements: PathBuf,
    pub tdx_device: PathBuf,
    pub sev_guest: PathBuf,
    pub tpm: PathBuf,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            tdx_measurements: "/sys/devices/virtual/misc/tdx_guest/measurements".into(),
            tdx_device: "/dev/tdx_guest".into(),
            sev_guest: "/dev/sev-guest".into(),
            tpm: "/dev/tpmrm0".into(),
        }
    }
}

/// Which TEE `auto` finds: TDX, then SEV-SNP, then a TPM.
pub fn detect(probe: &Probe) -> Option<Tee> {
    if probe.tdx_device.exists() || probe.tdx_measurements.exists() {
        Some(Tee::Tdx)
    } else if probe.sev_guest.exists() {
        Some(Tee::Snp)
    } else if probe.tpm.exists() {
        Some(Tee::Tpm)
    } else {
        None
    }
}

/// The TEE this guest runs under, whatever `cvm.tee` chose: the key-source checks ask it, since
/// `cvm.tee=tpm` does not make an SNP or TDX guest's vTPM any less the host's.
pub fn hardware(probe: &Probe) -> Option<Tee> {
    detect(probe).filter(|tee| matches!(tee, Tee::Snp | Tee::Tdx))
}

/// The TEE a choice measures into on a guest where `detected` was found (`auto` takes it, and
/// stops the boot where nothing was found).
pub fn resolve(choice: TeeChoice, detected: Option<Tee>) -> Result<Tee, TeeError> {
    Ok(match choice {
        TeeChoice::Auto => detected.ok_or(TeeError::NoneFound)?,
        TeeChoice::Tpm => Tee::Tpm,
        TeeChoice::Tdx => Tee::Tdx,
        TeeChoice::Snp => Tee::Snp,
        TeeChoice::None => Tee::None,
    })
}

/// Opens the backend for a choice.
pub fn open(choice: TeeChoice, probe: &Probe, log: &Path) -> Result<Box<dyn Backend>, TeeError> {
    Ok(match resolve(choice, detect(probe))? {
        Tee::Tpm => Box::new(TpmBackend(tpm::Tpm::new(tpm::DeviceTransport::open()?)?)),
        Tee::Tdx => Box::new(TdxBackend {
            dir: probe.tdx_measurements.clone(),
        }),
        Tee::Snp => Box::new(SnpLogOnly {
            log: log.to_path_buf(),
        }),
        Tee::None => Box::new(NoTee),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(dir: &Path) -> Probe {
        Probe {
            tdx_measurements: dir.join("tdx_measurements"),
            tdx_device: dir.join("tdx_guest"),
            sev_guest: dir.join("sev-guest"),
            tpm: dir.join("tpmrm0"),
        }
    }

    #[test]
    fn detection_order_is_tdx_snp_tpm() {
        let dir = tempfile::tempdir().unwrap();
        let p = probe(dir.path());
        assert_eq!(detect(&p), None);
        std::fs::write(&p.tpm, b"").unwrap();
        assert_eq!(detect(&p), Some(Tee::Tpm));
        assert_eq!(hardware(&p), None);
        std::fs::write(&p.sev_guest, b"").unwrap();
        assert_eq!(detect(&p), Some(Tee::Snp));
        assert_eq!(hardware(&p), Some(Tee::Snp));
        std::fs::write(&p.tdx_device, b"").unwrap();
        assert_eq!(detect(&p), Some(Tee::Tdx));
        assert_eq!(hardware(&p), Some(Tee::Tdx));
        let err = open(
            TeeChoice::Auto,
            &probe(&dir.path().join("nothing")),
            Path::new("/x"),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("cvm.tee=none"), "{err}");
    }

    #[test]
    fn tee_names_are_those_of_the_command_line() {
        let names: Vec<String> = [Tee::Tpm, Tee::Snp, Tee::Tdx, Tee::None]
            .iter()
            .map(|t| t.to_string())
            .collect();
        assert_eq!(names, ["tpm", "snp", "tdx", "none"]);
    }

    #[test]
    fn tdx_writes_the_sha384_digest_to_the_mapped_rtmr() {
        let dir = tempfile::tempdir().unwrap();
        let mut tdx = TdxBackend {
            dir: dir.path().to_path_buf(),
        };
        let event = Event::Phase(cvm_formats::event::Phase::Ready);
        // Without the sysfs files (Linux < 6.16) the error says so.
        let err = tdx.extend(&event).unwrap_err();
        assert!(crate::logger::chain(&err).contains("Linux 6.16"), "{err}");
        std::fs::write(dir.path().join("rtmr2:sha384"), b"").unwrap();
        tdx.extend(&event).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("rtmr2:sha384")).unwrap(),
            event.digest(Bank::Sha384)
        );
    }
}
