//! `cvm-measure tdx`: the TDX MRTD of a launch, and RTMR 1 and the boot's part of RTMR 2.

use std::path::PathBuf;

use cvm_measure::tdx::launch::{mrtd, PageAddOrder};
use cvm_measure::tdx::rtmr::{self as tdx_rtmr, DirectBoot, KernelAsMeasured, Predicted};
use sha2::Sha384;

use super::{read, usage, work, Failure};

/// The TDX MRTD of a launch of that firmware (the unified OVMF.fd with TDVF metadata)
///
/// Pages added, MR_EXTEND sections measured; --two-pass for QEMU versions that add a
/// section's pages before extending them. With --kernel (a direct boot) or --uki (booted
/// from the GPT disk RAW): RTMR 1 (the kernel or UKI and its kernel by Authenticode,
/// ReadyToBoot, the separator, the GPT, ExitBootServices) and the boot's part of RTMR 2 (the
/// EFI stub's load options and initrd; cvm-init's events follow, see predict). A direct
/// boot's kernel is measured as QEMU patches it (OVMF up to 2025.02), whose initrd address
/// depends on --memory; --kernel-unpatched for later OVMF. N boot options the firmware tries
/// and returns from before the disk each add two actions. RTMR 0 (ACPI tables of the exact
/// QEMU) is not predicted.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The firmware (OVMF.fd with TDVF metadata)
    #[arg(long, value_name = "FILE")]
    ovmf: PathBuf,
    /// Pages of a section are added before it is extended (some QEMU versions)
    #[arg(long)]
    two_pass: bool,
    /// Print JSON (reference values in Trustee's names, and the events)
    #[arg(long)]
    json: bool,
    /// The kernel of a direct boot
    #[arg(long, value_name = "FILE", conflicts_with = "uki")]
    kernel: Option<PathBuf>,
    /// The guest's memory in MiB (QEMU places the initrd by it), with --kernel
    #[arg(long, value_name = "MIB")]
    memory: Option<String>,
    /// The initrd of a direct boot, with --kernel
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// The kernel command line of a direct boot, with --kernel
    #[arg(long, value_name = "TEXT")]
    append: Option<String>,
    /// The kernel is measured as loaded, not as QEMU patches it (OVMF after 2025.02)
    #[arg(long)]
    kernel_unpatched: bool,
    /// A unified kernel image booted from the disk of --disk
    #[arg(long, value_name = "FILE")]
    uki: Option<PathBuf>,
    /// The raw disk image the UKI boots from (its GPT is measured), with --uki
    #[arg(long, value_name = "RAW")]
    disk: Option<PathBuf>,
    /// Boot options the firmware tries and returns from before the disk (0 to 16), with --uki
    #[arg(long, value_name = "N")]
    returned_boot_options: Option<String>,
}

pub fn run(args: Args) -> Result<(), Failure> {
    for (flag, given) in [
        ("--initrd", args.initrd.is_some()),
        ("--append", args.append.is_some()),
        ("--memory", args.memory.is_some()),
        ("--kernel-unpatched", args.kernel_unpatched),
    ] {
        if given && args.kernel.is_none() {
            return Err(usage(format!("{flag} goes with --kernel")));
        }
    }
    for (flag, given) in [
        ("--disk", args.disk.is_some()),
        (
            "--returned-boot-options",
            args.returned_boot_options.is_some(),
        ),
    ] {
        if given && args.uki.is_none() {
            return Err(usage(format!("{flag} goes with --uki")));
        }
    }
    let order = if args.two_pass {
        PageAddOrder::TwoPass
    } else {
        PageAddOrder::SinglePass
    };
    let digest = mrtd(&read(&args.ovmf, "the firmware")?, order)
        .map_err(|e| work(format!("{}: {e}", args.ovmf.display())))?;
    let in_file = |file: &std::path::Path| {
        let file = file.display().to_string();
        move |e: tdx_rtmr::ImageError| work(format!("{file}: {e}"))
    };
    let events: Option<(Vec<Predicted>, Vec<Predicted>)> = match (&args.kernel, &args.uki) {
        (Some(kernel_path), _) => {
            let memory = args.memory.as_deref().ok_or_else(|| {
                usage("tdx --kernel needs --memory MIB (QEMU places the initrd by it)")
            })?;
            let memory = memory
                .parse::<u64>()
                .ok()
                .filter(|m| (1..=16 << 20).contains(m))
                .ok_or_else(|| {
                    usage(format!("--memory {memory:?}: expected MiB, 1 to 16777216"))
                })?;
            let kernel = read(kernel_path, "the kernel")?;
            let initrd = args
                .initrd
                .as_ref()
                .map(|p| read(p, "the initrd"))
                .transpose()?;
            let boot = DirectBoot {
                kernel: &kernel,
                initrd: initrd.as_deref(),
                cmdline: args.append.as_deref().unwrap_or(""),
                memory_bytes: memory << 20,
                kernel_as_measured: if args.kernel_unpatched {
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
        (None, Some(uki_path)) => {
            let disk_path = args
                .disk
                .as_ref()
                .ok_or_else(|| usage("tdx --uki needs --disk RAW (its GPT is measured)"))?;
            let uki = read(uki_path, "the UKI")?;
            let sections = cvm_measure::predict::pe_sections(&uki)
                .map_err(|e| work(format!("{}: {e}", uki_path.display())))?;
            let linux = cvm_measure::predict::section(&sections, ".linux").ok_or_else(|| {
                work(format!(
                    "{}: no .linux section: not a UKI",
                    uki_path.display()
                ))
            })?;
            let gpt = tdx_rtmr::gpt_event(&read(disk_path, "the disk image")?, 512)
                .map_err(in_file(disk_path))?;
            let returned = match args.returned_boot_options.as_deref() {
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
    let list = |events: &[Predicted]| -> Vec<serde_json::Value> {
        events
            .iter()
            .map(|e| serde_json::json!({ "event": e.what, "digest": cvm_formats::hex(&e.digest) }))
            .collect()
    };
    let fold = |events: &[Predicted]| cvm_formats::hex(&tdx_rtmr::fold::<Sha384>(events));
    if args.json {
        let mut out = serde_json::json!({
            "tdx_mrtds": [cvm_formats::hex(&digest)],
            "page_add_order": format!("{order:?}"),
        });
        if let Some((rtmr1, rtmr2)) = &events {
            // RTMR 1 is whole at boot: a reference value. RTMR 2 continues with cvm-init's
            // events (`tdx_init_rtmr2`), so only the boot's part is shown.
            out["tdx_rtmrs"] = serde_json::json!({ "1": fold(rtmr1) });
            out["tdx_rtmr2_before_init"] = serde_json::json!(fold(rtmr2));
            out["rtmr1_events"] = serde_json::json!(list(rtmr1));
            out["rtmr2_events"] = serde_json::json!(list(rtmr2));
        }
        super::print_json(&out);
    } else if let Some((rtmr1, rtmr2)) = &events {
        println!("mrtd {}", cvm_formats::hex(&digest));
        println!("rtmr1 {}", fold(rtmr1));
        println!("rtmr2-before-init {}", fold(rtmr2));
    } else {
        println!("{}", cvm_formats::hex(&digest));
    }
    Ok(())
}
