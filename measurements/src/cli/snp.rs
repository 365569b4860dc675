//! `cvm-measure snp`: the SEV-SNP launch digest. The flags have sev-snp-measure's names, and
//! its spellings are accepted too (`--snp-ovmf-hash`, `--mode snp:ovmf-hash`,
//! `--output-format`, `--vcpu-family/--vcpu-model/--vcpu-stepping`), so that its command
//! lines work unchanged.

use std::path::PathBuf;

use cvm_measure::snp::launch::{firmware_digest, launch_digest, vcpu_signature, LaunchInputs, Vmm};

use super::{chain, usage, work, Failure};

/// The SEV-SNP launch digest (the report's MEASUREMENT) of a launch of that firmware
///
/// Measured: the firmware's pages, its SEV metadata sections (the kernel-hashes page with
/// --kernel, which needs an AmdSev build), one VMSA per vCPU. Models: EPYC(-v1..v4),
/// EPYC-Rome, EPYC-Milan, EPYC-Genoa, EPYC-Turin. Guest features (the VMSA's SEV_FEATURES)
/// are the host's choice: default 0x1. --ovmf-hash seeds the digest with a precomputed
/// firmware digest, which --firmware-digest prints. --mode seves: the SEV-ES digest (SHA-256).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The firmware (OVMF.fd)
    #[arg(long, value_name = "FILE")]
    ovmf: PathBuf,
    /// The number of vCPUs
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// The vCPU model, as QEMU's -cpu names it
    #[arg(long, value_name = "MODEL")]
    vcpu_type: Option<String>,
    /// The vCPU signature (CPUID 1 EAX) in hex
    #[arg(long, value_name = "HEX")]
    vcpu_sig: Option<String>,
    /// The vCPU family (with --vcpu-model and --vcpu-stepping)
    #[arg(long, value_name = "N", requires_all = ["vcpu_model", "vcpu_stepping"])]
    vcpu_family: Option<u32>,
    /// The vCPU model number
    #[arg(long, value_name = "N", requires = "vcpu_family")]
    vcpu_model: Option<u32>,
    /// The vCPU stepping
    #[arg(long, value_name = "N", requires = "vcpu_family")]
    vcpu_stepping: Option<u32>,
    /// The VMM that builds the VMSAs: QEMU, ec2 or gce
    #[arg(long, value_name = "TYPE")]
    vmm_type: Option<String>,
    /// The VMSA's SEV_FEATURES in hex (default 0x1)
    #[arg(long, value_name = "HEX")]
    guest_features: Option<String>,
    /// The kernel of a measured direct boot
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// The initrd of a measured direct boot
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// The kernel command line of a measured direct boot
    #[arg(long, value_name = "TEXT", requires = "kernel")]
    append: Option<String>,
    /// A precomputed firmware digest (96 hex digits, from --firmware-digest)
    #[arg(long, value_name = "HEX", visible_alias = "snp-ovmf-hash")]
    ovmf_hash: Option<String>,
    /// snp, seves, or snp:ovmf-hash (the same as --firmware-digest)
    #[arg(long, value_name = "MODE", value_parser = ["snp", "seves", "snp:ovmf-hash"], default_value = "snp")]
    mode: String,
    /// Print the firmware digest only (a seed for --ovmf-hash)
    #[arg(long)]
    firmware_digest: bool,
    /// The digest's encoding: hex (default) or base64
    #[arg(long, value_name = "FORMAT", value_parser = ["hex", "base64"], default_value = "hex", conflicts_with = "json")]
    output_format: String,
    /// Print the digest with the launch it assumes as JSON
    #[arg(long)]
    json: bool,
}

/// CPUID 1 EAX of an AMD family, model and stepping (the extended fields above 0xf).
fn signature_of(family: u32, model: u32, stepping: u32) -> Result<u32, Failure> {
    if family > 0xff + 0xf || model > 0xff || stepping > 0xf {
        return Err(usage(format!(
            "--vcpu-family {family} --vcpu-model {model} --vcpu-stepping {stepping}: out of range"
        )));
    }
    let (base_family, ext_family) = if family > 0xf {
        (0xf, family - 0xf)
    } else {
        (family, 0)
    };
    Ok((ext_family << 20)
        | ((model >> 4) << 16)
        | (base_family << 8)
        | ((model & 0xf) << 4)
        | stepping)
}

fn hex_number(name: &str, v: &str) -> Result<u64, Failure> {
    u64::from_str_radix(v.trim_start_matches("0x"), 16)
        .map_err(|_| usage(format!("{name} {v:?} is not a hexadecimal number")))
}

pub fn run(args: Args) -> Result<(), Failure> {
    let only_firmware = args.firmware_digest || args.mode == "snp:ovmf-hash";
    // The kernel is the largest input, and SHA-256 is one chain: it gets a thread (and a CPU)
    // of its own from the start, and the firmware, then the initrd, are measured on this one
    // meanwhile.
    let kernel = match &args.kernel {
        Some(p) if !only_firmware => {
            let path = p.clone();
            Some(cvm_measure::elsewhere::spawn_on_another_cpu(move || {
                cvm_measure::sha256_file_mapped(&path)
            }))
        }
        _ => None,
    };
    let ovmf_path = args.ovmf.display();
    let firmware = cvm_measure::mapped::FileBytes::open(&args.ovmf)
        .map_err(|e| work(format!("cannot read the firmware {ovmf_path}: {e}")))?;
    let fail = |e: cvm_measure::snp::launch::LaunchError| work(format!("{ovmf_path}: {e}"));
    let encode = |digest: &[u8]| match args.output_format.as_str() {
        "base64" => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(digest)
        }
        _ => cvm_formats::hex(digest),
    };
    if only_firmware {
        println!("{}", encode(&firmware_digest(&firmware).map_err(fail)?));
        return Ok(());
    }
    let vcpus = args.vcpus.ok_or_else(|| usage("snp needs --vcpus N"))?;
    let signature = match (&args.vcpu_type, &args.vcpu_sig, args.vcpu_family) {
        (Some(model), None, None) => vcpu_signature(model).ok_or_else(|| {
            usage(format!("--vcpu-type {model:?}: expected EPYC, EPYC-v1..v4, EPYC-Rome, EPYC-Milan, EPYC-Genoa or EPYC-Turin"))
        })?,
        (None, Some(sig), None) => u32::try_from(hex_number("--vcpu-sig", sig)?)
            .map_err(|_| usage(format!("--vcpu-sig {sig}: more than 32 bits")))?,
        (None, None, Some(family)) => signature_of(
            family,
            args.vcpu_model.unwrap_or_default(),
            args.vcpu_stepping.unwrap_or_default(),
        )?,
        _ => {
            return Err(usage(
                "snp needs exactly one of --vcpu-type, --vcpu-sig or --vcpu-family",
            ))
        }
    };
    let vmm = match &args.vmm_type {
        None => Vmm::Qemu,
        Some(name) => Vmm::from_name(name)
            .ok_or_else(|| usage(format!("--vmm-type {name:?}: expected QEMU, ec2 or gce")))?,
    };
    let guest_features = match &args.guest_features {
        None => 0x1,
        Some(v) => hex_number("--guest-features", v)?,
    };
    let seed = match &args.ovmf_hash {
        Some(v) => cvm_formats::verity::parse_hex(v)
            .and_then(|d| d.try_into().ok())
            .ok_or_else(|| usage(format!("--ovmf-hash {v:?}: expected 96 hex digits")))?,
        None => firmware_digest(&firmware).map_err(fail)?,
    };
    let hashed =
        |digest: Result<[u8; 32], cvm_formats::DigestError>| digest.map_err(|e| work(chain(&e)));
    let initrd = args
        .initrd
        .as_ref()
        .map(|p| hashed(cvm_measure::sha256_file_mapped(p)))
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
        append: args.append.as_deref(),
    };
    let digest = if args.mode == "seves" {
        if args.ovmf_hash.is_some() || args.guest_features.is_some() {
            return Err(usage(
                "--mode seves takes neither --ovmf-hash nor --guest-features",
            ));
        }
        encode(&cvm_measure::snp::launch::seves_launch_digest(&inputs).map_err(fail)?)
    } else {
        encode(&launch_digest(&inputs).map_err(fail)?)
    };
    if args.json {
        use sha2::Digest;
        super::print_json(&serde_json::json!({
            "snp_measurements": [digest],
            "launch": {
                "firmware_sha256": cvm_formats::hex(&sha2::Sha256::digest(&*firmware)),
                "vcpus": vcpus,
                "vcpu_signature": format!("{signature:#010x}"),
                "vmm_type": format!("{vmm:?}"),
                "guest_features": format!("{guest_features:#x}"),
                "kernel_sha256": kernel.as_ref().map(|k| cvm_formats::hex(k)),
                "initrd_sha256": initrd.as_ref().map(|k| cvm_formats::hex(k)),
            },
        }));
    } else {
        println!("{digest}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_model_stepping_give_the_models_signatures() {
        // EPYC (family 0x17, model 1, stepping 2) and EPYC-Genoa (0x19, 0x11, 0).
        assert_eq!(signature_of(0x17, 1, 2).ok(), vcpu_signature("EPYC"));
        assert_eq!(
            signature_of(0x19, 0x11, 0).ok(),
            vcpu_signature("EPYC-Genoa")
        );
        assert_eq!(signature_of(0x19, 1, 1).ok(), vcpu_signature("EPYC-Milan"));
    }
}
