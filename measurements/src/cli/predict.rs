//! `cvm-measure predict`: the registers a node reaches, or (with --launch) what the hardware
//! measures for a launch description. The UKI flags have systemd-measure's names.

use std::path::{Path, PathBuf};

use cvm_formats::registers::Bank;
use cvm_measure::predict::{pe_sections, services_of_config, Inputs};

use super::output::{print_registers, Shown};
use super::{chain, read, usage, work, Failure};

/// The registers a node reaches at ready (or when it asks a key broker for its disk key):
/// PCR 11, PCR 15 and RTMR2
///
/// PCR 11 holds the UKI's sections as systemd-stub measures them, then the boot phases;
/// PCR 15 cvm-init's identity events. Workload digests come from the services of the config
/// file, read inside --root-tree. Without --uki or --linux: a direct kernel boot, where
/// nothing measures the kernel into PCR 11. With --launch: what the hardware will measure for
/// that launch description, as reference values (JSON; also in Trustee's names).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The root file system's dm-verity root hash
    #[arg(long, value_name = "HEX", required_unless_present = "launch")]
    root_hash: Option<String>,
    /// The kernel command line (the text, not a file as systemd-measure takes)
    #[arg(long, value_name = "TEXT", conflicts_with = "uki")]
    cmdline: Option<String>,
    /// The node's configuration file
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The root file system's tree, where the config's service binaries are read
    #[arg(long, value_name = "DIR")]
    root_tree: Option<PathBuf>,
    /// A unified kernel image: its sections are measured
    #[arg(long, value_name = "FILE", conflicts_with = "linux")]
    uki: Option<PathBuf>,
    /// The kernel (a UKI's .linux section)
    #[arg(long, value_name = "FILE")]
    linux: Option<PathBuf>,
    /// The initrd (.initrd), with --linux
    #[arg(long, value_name = "FILE", requires = "linux")]
    initrd: Option<PathBuf>,
    /// The os-release file (.osrel), with --linux
    #[arg(long, value_name = "FILE", requires = "linux")]
    osrel: Option<PathBuf>,
    /// The kernel release (.uname), with --linux
    #[arg(long, value_name = "TEXT", requires = "linux")]
    uname: Option<String>,
    /// The microcode initrd (.ucode), with --linux
    #[arg(long, value_name = "FILE", requires = "linux")]
    ucode: Option<PathBuf>,
    /// The boot splash (.splash), with --linux
    #[arg(long, value_name = "FILE", requires = "linux")]
    splash: Option<PathBuf>,
    /// The device tree (.dtb), with --linux
    #[arg(long, value_name = "FILE", requires = "linux")]
    dtb: Option<PathBuf>,
    /// The SBAT data (.sbat), with --linux
    #[arg(long, value_name = "FILE", requires = "linux")]
    sbat: Option<PathBuf>,
    /// The PCR public key (.pcrpkey), with --linux
    #[arg(long, value_name = "FILE", requires = "linux")]
    pcrpkey: Option<PathBuf>,
    /// The PCR banks shown (repeatable; default both)
    #[arg(long, value_name = "BANK", value_parser = ["sha256", "sha384"])]
    bank: Vec<String>,
    /// The moment predicted
    #[arg(long, value_enum, default_value_t = At::Ready)]
    at: At,
    /// Print JSON
    #[arg(long)]
    json: bool,
    /// A launch description (TOML): print its reference values instead
    #[arg(long, value_name = "LAUNCH_TOML", exclusive = true)]
    launch: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum At {
    /// When the node is ready
    Ready,
    /// When it asks a key broker for its disk key
    KeyRelease,
}

pub fn run(args: Args) -> Result<(), Failure> {
    if let Some(file) = &args.launch {
        let values = super::launch::description(file)?
            .predict()
            .map_err(|e| work(chain(&e)))?;
        super::print_json(&values);
        return Ok(());
    }
    let hash = args.root_hash.as_deref().unwrap_or_default();
    let root_hash: [u8; 32] = cvm_formats::verity::parse_hex(hash)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| usage(format!("--root-hash {hash:?} is not 64 hex digits")))?;
    let mut inputs = Inputs {
        root_hash,
        ..Default::default()
    };
    if let Some(uki) = &args.uki {
        let image = read(uki, "the UKI")?;
        inputs.sections =
            pe_sections(&image).map_err(|e| work(format!("{}: {e}", uki.display())))?;
        if let Some(cmdline) = cvm_measure::predict::section(&inputs.sections, ".cmdline") {
            inputs.cmdline = cmdline.iter().copied().take_while(|&b| b != 0).collect();
        }
    } else if let Some(linux) = &args.linux {
        let files = [
            (".linux", Some(linux), "the kernel"),
            (".osrel", args.osrel.as_ref(), "the os-release"),
            (".initrd", args.initrd.as_ref(), "the initrd"),
            (".ucode", args.ucode.as_ref(), "the microcode"),
            (".splash", args.splash.as_ref(), "the splash image"),
            (".dtb", args.dtb.as_ref(), "the device tree"),
            (".sbat", args.sbat.as_ref(), "the SBAT data"),
            (".pcrpkey", args.pcrpkey.as_ref(), "the PCR public key"),
        ];
        for (section, path, what) in files {
            if let Some(path) = path {
                inputs.sections.push((section.into(), read(path, what)?));
            }
        }
        if let Some(c) = &args.cmdline {
            inputs
                .sections
                .push((".cmdline".into(), c.as_bytes().to_vec()));
        }
        if let Some(u) = &args.uname {
            inputs
                .sections
                .push((".uname".into(), u.as_bytes().to_vec()));
        }
    }
    if let Some(c) = &args.cmdline {
        inputs.cmdline = c.as_bytes().to_vec();
    }
    if let Some(config) = &args.config {
        let bytes = read(config, "the configuration file")?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let services =
            services_of_config(&text).map_err(|e| work(format!("{}: {e}", config.display())))?;
        if !services.is_empty() && args.root_tree.is_none() {
            return Err(usage(format!(
                "{} has services: --root-tree is needed to find their binaries",
                config.display()
            )));
        }
        let tree = args.root_tree.as_deref().unwrap_or(Path::new("/"));
        let manifest = root_manifest(tree)?;
        for (name, path) in services {
            let on_host = tree.join(path.trim_start_matches('/'));
            let digest = cvm_formats::sha256_file(&on_host).map_err(|e| work(chain(&e)))?;
            // The node takes a listed binary's digest from the root's manifest: a wrong line
            // would be measured as it stands, so it is an error here, before any node boots.
            if let Some(listed) = manifest.as_ref().and_then(|m| m.get(&path)) {
                if listed != digest {
                    return Err(work(format!(
                        "{}: lists {} for {path}, but the file's SHA-256 is {}: a node would measure the manifest's digest",
                        tree.join(cvm_formats::digests::PATH.trim_start_matches('/')).display(),
                        cvm_formats::hex(&listed),
                        cvm_formats::hex(&digest)
                    )));
                }
            }
            inputs.workloads.push((name, path, digest));
        }
        inputs.config_file = Some(bytes);
    }
    let (regs, extra) = match args.at {
        At::KeyRelease => {
            let regs = cvm_measure::predict::predict_key_release(&inputs);
            // The RTMRs predicted are cvm-init's part alone (the firmware's is in the CC log).
            let init_rtmr2 = cvm_formats::hex(&regs.rtmr[2]);
            (regs, vec![("tdx_init_rtmr2", init_rtmr2)])
        }
        At::Ready => (cvm_measure::predict::predict(&inputs), Vec::new()),
    };
    let banks: Vec<Bank> = Bank::ALL
        .into_iter()
        .filter(|b| args.bank.is_empty() || args.bank.iter().any(|n| n == b.name()))
        .collect();
    print_registers(
        &regs,
        &Shown {
            pcrs: &[11, 15],
            banks: &banks,
            json: args.json,
            rtmrs: true,
            extra: &extra,
        },
    );
    Ok(())
}

/// The root tree's digest manifest, if it has one.
fn root_manifest(tree: &Path) -> Result<Option<cvm_formats::digests::Manifest>, Failure> {
    let path = tree.join(cvm_formats::digests::PATH.trim_start_matches('/'));
    match std::fs::read(&path) {
        Ok(bytes) => cvm_formats::digests::Manifest::parse(&bytes)
            .map(Some)
            .map_err(|e| work(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(work(format!("cannot read {}: {e}", path.display()))),
    }
}
