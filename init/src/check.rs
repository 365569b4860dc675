//! `cvm-init check-config`: the boot's own checks of a configuration file and of the command
//! line's `cvm.*` options, run on a build machine before the image is made, so that a typo is
//! found there and not by a node powering itself off. Every check here is the function the boot
//! calls, and a refusal is printed as the console prints it (`phase <name> failed: <reason>`).
//!
//! Some decisions depend on the machine the image boots on (which TEE `cvm.tee=auto` finds,
//! whether `key = "tpm"` is safe there): those are made for each kind of machine asked for.

use std::path::Path;

use crate::config::{self, BootOptions, ConfigFile, KeySourceChoice};
use crate::logger::chain;
use crate::state_disk;
use crate::tee::{self, Tee};

/// A kind of machine the image may boot on, as the TEE detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    Snp,
    Tdx,
    Vtpm,
    Bare,
}

impl Machine {
    pub const ALL: [Machine; 4] = [Machine::Snp, Machine::Tdx, Machine::Vtpm, Machine::Bare];

    /// The names `--on` takes.
    pub const NAMES: &'static str = "snp, tdx, vtpm, bare";

    pub fn parse(name: &str) -> Option<Machine> {
        Machine::ALL.into_iter().find(|m| m.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Machine::Snp => "snp",
            Machine::Tdx => "tdx",
            Machine::Vtpm => "vtpm",
            Machine::Bare => "bare",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Machine::Snp => "an SEV-SNP guest",
            Machine::Tdx => "a TDX guest",
            Machine::Vtpm => "a VM with a vTPM and no SNP or TDX",
            Machine::Bare => "a machine with no TEE and no TPM",
        }
    }

    /// What `tee::detect` finds on such a machine.
    fn detected(self) -> Option<Tee> {
        match self {
            Machine::Snp => Some(Tee::Snp),
            Machine::Tdx => Some(Tee::Tdx),
            Machine::Vtpm => Some(Tee::Tpm),
            Machine::Bare => None,
        }
    }
}

/// A refusal as the console shows it: the phase that stops the boot and the error chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub phase: &'static str,
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "phase {} failed: {}", self.phase, self.reason)
    }
}

fn refusal(phase: &'static str, err: &(dyn std::error::Error + 'static)) -> Refusal {
    Refusal {
        phase,
        reason: chain(err),
    }
}

/// What a configuration does on one kind of machine: the TEE it measures into, or the refusal.
pub type Outcome = Result<Tee, Refusal>;

/// A configuration that parsed and passed the checks that do not depend on the machine.
#[derive(Debug)]
pub struct Checked {
    pub options: BootOptions,
    pub config: ConfigFile,
    pub machines: Vec<(Machine, Outcome)>,
}

/// The boot's checks, in the boot's order: the command line (phase `config`), the file (phase
/// `config-file`), then for each machine the TEE choice (phase `measure`) and the state disk's
/// key source against that TEE (phase `state`). `file` names the file in messages.
pub fn check(
    file: &Path,
    bytes: Option<&[u8]>,
    cmdline: &[u8],
    machines: &[Machine],
) -> Result<Checked, Refusal> {
    let options = config::parse_cmdline(cmdline)
        .map_err(|e| refusal("config", &crate::boot::ConfigError::from(e)))?;
    let config = config::parse_config_bytes(file, bytes)
        .map_err(|e| refusal("config-file", &crate::boot::ConfigError::from(e)))?;
    let machines = machines
        .iter()
        .map(|&machine| (machine, on_machine(&options, &config, machine)))
        .collect();
    Ok(Checked {
        options,
        config,
        machines,
    })
}

fn on_machine(options: &BootOptions, config: &ConfigFile, machine: Machine) -> Outcome {
    let detected = machine.detected();
    let tee = tee::resolve(options.tee, detected)
        .map_err(|e| refusal("measure", &crate::boot::MeasureStartError::from(e)))?;
    if let Some(state) = &config.state {
        let hardware = detected.filter(|t| matches!(t, Tee::Snp | Tee::Tdx));
        state_disk::tpm_key_decision(state, tee, hardware).map_err(|e| refusal("state", &e))?;
        if state.key == KeySourceChoice::Kbs {
            crate::tee::evidence::Source::for_tee(tee)
                .map_err(|e| refusal("state", &state_disk::StateError::Evidence(e)))?;
        }
    }
    Ok(tee)
}

impl Checked {
    /// One line: what the configuration sets up and where it boots.
    pub fn summary(&self) -> String {
        let config = &self.config;
        let services: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        let state = match &config.state {
            Some(s) => format!(
                "state disk {:?} (key {}, mounted at {})",
                s.serial,
                key_name(s.key_choice()),
                s.mount.display()
            ),
            None => "no state disk".into(),
        };
        let network = match &config.network {
            Some(n) if n.address.is_some() => "static network",
            Some(_) => "DHCP network",
            None => "loopback only",
        };
        let boots: Vec<String> = self
            .machines
            .iter()
            .map(|(m, outcome)| match outcome {
                Ok(tee) => format!("{} (measuring into {tee})", m.name()),
                Err(_) => format!("not {}", m.name()),
            })
            .collect();
        format!(
            "{} service(s) [{}], {state}, {network}; boots on: {}",
            services.len(),
            services.join(", "),
            boots.join(", ")
        )
    }
}

fn key_name(key: KeySourceChoice) -> &'static str {
    match key {
        KeySourceChoice::Tpm => "tpm",
        KeySourceChoice::TpmSigned => "tpm with a signed PCR policy",
        KeySourceChoice::Ephemeral => "ephemeral",
        KeySourceChoice::Kbs => "kbs",
        KeySourceChoice::SnpDerived => "snp-derived",
    }
}
