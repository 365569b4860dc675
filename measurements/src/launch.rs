//! One description of a confidential launch — TEE, vCPUs and their model, memory, firmware,
//! kernel, initrd, command line, guest policy — from which both the QEMU invocation and the
//! measurement the hardware will sign are made, so that the two cannot drift apart.
//!
//! The description is TOML (`cvm-measure launch qemu FILE`, `cvm-measure predict --launch
//! FILE`); unknown keys and out-of-range values are refused by name. Paths are relative to the
//! file's directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256, Sha384};

use crate::snp::launch::{self as snp_launch, LaunchInputs, Vmm};
use crate::tdx::launch::{self as tdx_launch, PageAddOrder};
use crate::tdx::rtmr::{self as tdx_rtmr, DirectBoot, KernelAsMeasured};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{path}: {detail}")]
    Description { path: String, detail: String },
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    Firmware {
        path: String,
        #[source]
        source: snp_launch::LaunchError,
    },
    #[error("{path}")]
    Kernel {
        path: String,
        #[source]
        source: tdx_rtmr::ImageError,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tee {
    Snp,
    Tdx,
}

impl Tee {
    /// As the description writes it.
    pub fn name(self) -> &'static str {
        match self {
            Tee::Snp => "snp",
            Tee::Tdx => "tdx",
        }
    }

    pub fn from_name(name: &str) -> Option<Tee> {
        [Tee::Snp, Tee::Tdx].into_iter().find(|t| t.name() == name)
    }
}

/// The launch as written: what the operator chooses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Launch {
    pub tee: Tee,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub firmware: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub snp: Snp,
    #[serde(default)]
    pub tdx: Tdx,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Snp {
    /// QEMU's CPU model, which is also what the VMSAs' CPUID signature is taken from.
    pub vcpu_model: String,
    /// The guest policy (SNP ABI 4.3): bit 17 must be set; debug (bit 19) is refused here.
    pub policy: u64,
    /// SEV_FEATURES QEMU puts in each VMSA (0x1: SNP active; QEMU 9.1 to 10.x).
    pub guest_features: u64,
    /// The host's C-bit position and the physical address bits it takes (CPUID 0x8000001f;
    /// 51 and 1 on Milan, Genoa and Turin).
    pub cbitpos: u32,
    pub reduced_phys_bits: u32,
}

impl Default for Snp {
    fn default() -> Snp {
        Snp {
            vcpu_model: "EPYC-v4".into(),
            policy: 0x30000,
            guest_features: 0x1,
            cbitpos: 51,
            reduced_phys_bits: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tdx {
    /// Where the host's quote generation service listens (vsock CID 2 is the host).
    pub quote_generation_vsock_port: u32,
    /// "single-pass" (KVM's upstream TDX: each page added then extended) or "two-pass".
    pub page_add_order: String,
}

impl Default for Tdx {
    fn default() -> Tdx {
        Tdx {
            quote_generation_vsock_port: 4050,
            page_add_order: "single-pass".into(),
        }
    }
}

const SNP_POLICY_RESERVED_ONE: u64 = 1 << 17;
const SNP_POLICY_DEBUG: u64 = 1 << 19;

impl Launch {
    /// Reads and checks a description; relative paths are taken from its directory.
    pub fn from_file(path: &Path) -> Result<Launch, LaunchError> {
        let text = std::fs::read_to_string(path).map_err(|source| LaunchError::Read {
            what: "the launch description",
            path: path.display().to_string(),
            source,
        })?;
        let bad = |detail: String| LaunchError::Description {
            path: path.display().to_string(),
            detail,
        };
        let mut launch: Launch = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for file in [&mut launch.firmware, &mut launch.kernel]
            .into_iter()
            .chain(launch.initrd.as_mut())
        {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        launch.check().map_err(bad)?;
        Ok(launch)
    }

    /// The description as a file `from_file` reads back (absolute paths).
    pub fn to_toml(&self) -> String {
        let quoted = |text: &str| serde_json::Value::from(text).to_string();
        let path = |p: &Path| quoted(&p.display().to_string());
        let mut out = format!(
            "tee = {}\nvcpus = {}\nmemory_mib = {}\nfirmware = {}\nkernel = {}\n",
            quoted(self.tee.name()),
            self.vcpus,
            self.memory_mib,
            path(&self.firmware),
            path(&self.kernel),
        );
        if let Some(initrd) = &self.initrd {
            out.push_str(&format!("initrd = {}\n", path(initrd)));
        }
        out.push_str(&format!("cmdline = {}\n", quoted(&self.cmdline)));
        match self.tee {
            Tee::Snp => out.push_str(&format!(
                "\n[snp]\nvcpu_model = {}\npolicy = {:#x}\nguest_features = {:#x}\ncbitpos = {}\nreduced_phys_bits = {}\n",
                quoted(&self.snp.vcpu_model),
                self.snp.policy,
                self.snp.guest_features,
                self.snp.cbitpos,
                self.snp.reduced_phys_bits
            )),
            Tee::Tdx => out.push_str(&format!(
                "\n[tdx]\nquote_generation_vsock_port = {}\npage_add_order = {}\n",
                self.tdx.quote_generation_vsock_port,
                quoted(&self.tdx.page_add_order)
            )),
        }
        out
    }

    /// Values no launch can have, named.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=512).contains(&self.vcpus) {
            return Err(format!("vcpus = {}: expected 1 to 512", self.vcpus));
        }
        if !(128..=4 << 20).contains(&self.memory_mib) {
            return Err(format!(
                "memory_mib = {}: expected 128 to 4194304",
                self.memory_mib
            ));
        }
        if self.cmdline.contains('\0') {
            return Err("cmdline holds a NUL byte".into());
        }
        match self.tee {
            Tee::Snp => {
                if snp_launch::vcpu_signature(&self.snp.vcpu_model).is_none() {
                    return Err(format!(
                        "snp.vcpu_model = {:?}: expected a QEMU EPYC model (EPYC, EPYC-v1 to EPYC-v4, EPYC-Rome, EPYC-Milan, EPYC-Genoa, EPYC-Turin)",
                        self.snp.vcpu_model
                    ));
                }
                if self.snp.policy & SNP_POLICY_RESERVED_ONE == 0 {
                    return Err(format!(
                        "snp.policy = {:#x}: bit 17 is reserved and must be 1",
                        self.snp.policy
                    ));
                }
                if self.snp.policy & SNP_POLICY_DEBUG != 0 {
                    return Err(format!(
                        "snp.policy = {:#x}: bit 19 lets the host debug (read) the guest; refused",
                        self.snp.policy
                    ));
                }
                if self.snp.policy >> 25 != 0 {
                    return Err(format!(
                        "snp.policy = {:#x}: bits above 24 are reserved",
                        self.snp.policy
                    ));
                }
                if !(32..=63).contains(&self.snp.cbitpos) || self.snp.reduced_phys_bits > 63 {
                    return Err(format!(
                        "snp.cbitpos = {}, snp.reduced_phys_bits = {}: expected 32 to 63 and 0 to 63",
                        self.snp.cbitpos, self.snp.reduced_phys_bits
                    ));
                }
            }
            Tee::Tdx => {
                self.page_add_order()?;
                if self.tdx.quote_generation_vsock_port == 0 {
                    return Err("tdx.quote_generation_vsock_port = 0".into());
                }
            }
        }
        Ok(())
    }

    fn page_add_order(&self) -> Result<PageAddOrder, String> {
        match self.tdx.page_add_order.as_str() {
            "single-pass" => Ok(PageAddOrder::SinglePass),
            "two-pass" => Ok(PageAddOrder::TwoPass),
            other => Err(format!(
                "tdx.page_add_order = {other:?}: expected \"single-pass\" or \"two-pass\""
            )),
        }
    }

    /// QEMU's arguments for the measured part of the launch: accelerator, CPU, memory,
    /// confidential-guest object, firmware, kernel, initrd, command line. Devices, disks and
    /// consoles are the caller's: they are not measured.
    pub fn qemu_args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec!["-accel".into(), "kvm".into()];
        let memory = format!("{}M", self.memory_mib);
        match self.tee {
            Tee::Snp => {
                let snp = &self.snp;
                args.extend([
                    "-cpu".into(),
                    snp.vcpu_model.clone(),
                    "-machine".into(),
                    "q35,confidential-guest-support=sev0,memory-backend=ram0".into(),
                    "-object".into(),
                    format!("memory-backend-memfd,id=ram0,size={memory},share=true,prealloc=false"),
                    "-object".into(),
                    format!(
                        "sev-snp-guest,id=sev0,cbitpos={},reduced-phys-bits={},policy={:#x},kernel-hashes=on",
                        snp.cbitpos, snp.reduced_phys_bits, snp.policy
                    ),
                ]);
            }
            Tee::Tdx => {
                let object = serde_json::json!({
                    "qom-type": "tdx-guest",
                    "id": "tdx0",
                    "quote-generation-socket": {
                        "type": "vsock",
                        "cid": "2",
                        "port": self.tdx.quote_generation_vsock_port.to_string(),
                    },
                });
                args.extend([
                    "-cpu".into(),
                    "host".into(),
                    "-machine".into(),
                    "q35,kernel-irqchip=split,confidential-guest-support=tdx0,memory-backend=ram0"
                        .into(),
                    "-object".into(),
                    object.to_string(),
                    "-object".into(),
                    format!("memory-backend-ram,id=ram0,size={memory}"),
                ]);
            }
        }
        args.extend([
            "-smp".into(),
            self.vcpus.to_string(),
            "-m".into(),
            memory,
            "-bios".into(),
            self.firmware.display().to_string(),
            "-kernel".into(),
            self.kernel.display().to_string(),
        ]);
        if let Some(initrd) = &self.initrd {
            args.extend(["-initrd".into(), initrd.display().to_string()]);
        }
        args.extend(["-append".into(), self.cmdline.clone()]);
        args
    }

    /// What the hardware will measure for this launch, as reference values: the SNP launch
    /// digest with the policy and guest features it assumes, or the TDX MRTD and RTMRs 1 and 2
    /// (RTMR 2 up to cvm-init: the EFI stub's load options and initrd).
    pub fn predict(&self) -> Result<serde_json::Value, LaunchError> {
        let read = |what: &'static str, path: &Path| {
            crate::mapped::FileBytes::open(path).map_err(|source| LaunchError::Read {
                what,
                path: path.display().to_string(),
                source,
            })
        };
        let firmware = read("the firmware", &self.firmware)?;
        let kernel = read("the kernel", &self.kernel)?;
        let initrd = self
            .initrd
            .as_ref()
            .map(|p| read("the initrd", p))
            .transpose()?;
        let in_firmware = |source| LaunchError::Firmware {
            path: self.firmware.display().to_string(),
            source,
        };
        let hex = cvm_formats::hex;
        match self.tee {
            Tee::Snp => {
                let snp = &self.snp;
                let signature = snp_launch::vcpu_signature(&snp.vcpu_model)
                    .expect("checked when the description was read");
                let digest = snp_launch::launch_digest(&LaunchInputs {
                    firmware: &firmware,
                    firmware_digest: None,
                    vcpus: self.vcpus,
                    vcpu_signature: signature,
                    vmm: Vmm::Qemu,
                    guest_features: snp.guest_features,
                    kernel: Some(Sha256::digest(&*kernel).into()),
                    initrd: initrd.as_ref().map(|i| Sha256::digest(&**i).into()),
                    append: Some(&self.cmdline),
                })
                .map_err(in_firmware)?;
                let digest = hex(&digest);
                Ok(serde_json::json!({
                    "tee": "snp",
                    "snp_measurements": [digest],
                    "snp_policy": format!("{:#x}", snp.policy),
                    "snp_guest_features": format!("{:#x}", snp.guest_features),
                    "snp_vcpu_signature": format!("{signature:#010x}"),
                    "trustee": { "snp_launch_measurement": [digest] },
                }))
            }
            Tee::Tdx => {
                let order = self.page_add_order().expect("checked when read");
                let mrtd = hex(&tdx_launch::mrtd(&firmware, order).map_err(in_firmware)?);
                let boot = DirectBoot {
                    kernel: &kernel,
                    initrd: initrd.as_deref(),
                    cmdline: &self.cmdline,
                    memory_bytes: self.memory_mib << 20,
                    kernel_as_measured: KernelAsMeasured::QemuPatched,
                };
                let rtmr1 =
                    boot.rtmr1_events::<Sha384>()
                        .map_err(|source| LaunchError::Kernel {
                            path: self.kernel.display().to_string(),
                            source,
                        })?;
                let rtmr1 = hex(&tdx_rtmr::fold::<Sha384>(&rtmr1));
                let rtmr2 = hex(&tdx_rtmr::fold::<Sha384>(&boot.rtmr2_events::<Sha384>()));
                Ok(serde_json::json!({
                    "tee": "tdx",
                    "tdx_mrtds": [mrtd],
                    "tdx_rtmrs": { "1": rtmr1 },
                    "tdx_rtmr2_before_init": rtmr2,
                    "tdx_page_add_order": self.tdx.page_add_order,
                    "trustee": { "mr_td": [mrtd], "rtmr_1": [rtmr1] },
                }))
            }
        }
    }
}

/// What this host lacks to run a launch on `tee`, with its `qemu-system-x86_64` asked for its
/// version.
pub fn missing_on_this_host(tee: Tee) -> Vec<String> {
    let version = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| parse_qemu_version(&String::from_utf8_lossy(&out.stdout)));
    missing_on_host(tee, version)
}

/// What a host with this QEMU version lacks to run the launch, each thing named (empty: it can).
pub fn missing_on_host(tee: Tee, qemu_version: Option<(u32, u32)>) -> Vec<String> {
    let mut missing = Vec::new();
    let param = |path: &str| {
        std::fs::read_to_string(path)
            .map(|v| matches!(v.trim(), "Y" | "y" | "1"))
            .unwrap_or(false)
    };
    if !Path::new("/dev/kvm").exists() {
        missing.push("/dev/kvm (KVM)".to_string());
    }
    let (needed, name) = match tee {
        Tee::Snp => {
            if !param("/sys/module/kvm_amd/parameters/sev_snp") {
                missing.push(
                    "SEV-SNP in KVM (/sys/module/kvm_amd/parameters/sev_snp is not Y: an AMD EPYC host with SNP enabled in firmware, Linux 6.11 or later)"
                        .to_string(),
                );
            }
            if !Path::new("/dev/sev").exists() {
                missing.push("/dev/sev (the AMD secure processor's driver, ccp)".to_string());
            }
            ((9, 1), "sev-snp-guest")
        }
        Tee::Tdx => {
            if !param("/sys/module/kvm_intel/parameters/tdx") {
                missing.push(
                    "TDX in KVM (/sys/module/kvm_intel/parameters/tdx is not Y: an Intel Xeon host with TDX enabled, Linux 6.16 or later)"
                        .to_string(),
                );
            }
            ((10, 1), "tdx-guest")
        }
    };
    match qemu_version {
        Some(v) if v >= needed => {}
        Some((major, minor)) => missing.push(format!(
            "QEMU {}.{} or later for {name} (this host has {major}.{minor})",
            needed.0, needed.1
        )),
        None => missing.push("qemu-system-x86_64".to_string()),
    }
    missing
}

/// "QEMU emulator version 10.0.2 (...)" → (10, 0).
pub fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(tee: Tee) -> Launch {
        Launch {
            tee,
            vcpus: 2,
            memory_mib: 2048,
            firmware: "fw.fd".into(),
            kernel: "vmlinuz".into(),
            initrd: Some("initrd".into()),
            cmdline: "console=ttyS0".into(),
            snp: Snp::default(),
            tdx: Tdx::default(),
        }
    }

    #[test]
    fn snp_arguments() {
        let args = launch(Tee::Snp).qemu_args().join(" ");
        assert_eq!(
            args,
            "-accel kvm -cpu EPYC-v4 -machine q35,confidential-guest-support=sev0,memory-backend=ram0 \
             -object memory-backend-memfd,id=ram0,size=2048M,share=true,prealloc=false \
             -object sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,policy=0x30000,kernel-hashes=on \
             -smp 2 -m 2048M -bios fw.fd -kernel vmlinuz -initrd initrd -append console=ttyS0"
        );
    }

    #[test]
    fn tdx_arguments() {
        let args = launch(Tee::Tdx).qemu_args();
        let object = &args[args.iter().position(|a| a.contains("tdx-guest")).unwrap()];
        let json: serde_json::Value = serde_json::from_str(object).unwrap();
        assert_eq!(json["quote-generation-socket"]["port"], "4050");
        assert_eq!(json["quote-generation-socket"]["cid"], "2");
        assert!(args.contains(
            &"q35,kernel-irqchip=split,confidential-guest-support=tdx0,memory-backend=ram0".into()
        ));
    }

    #[test]
    fn bad_descriptions_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("launch.toml");
        let refused = |text: &str, says: &str| {
            std::fs::write(&file, text).unwrap();
            let e = Launch::from_file(&file).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
            assert!(e.contains("launch.toml"), "{e}");
        };
        let base =
            "tee = \"snp\"\nvcpus = 2\nmemory_mib = 1024\nfirmware = \"f\"\nkernel = \"k\"\n";
        refused(&format!("{base}colour = 1\n"), "unknown field");
        refused(&base.replace("\"snp\"", "\"sgx\""), "unknown variant");
        refused(&base.replace("vcpus = 2", "vcpus = 0"), "vcpus = 0");
        refused(
            &base.replace("memory_mib = 1024", "memory_mib = 64"),
            "memory_mib",
        );
        refused(
            &format!("{base}[snp]\nvcpu_model = \"Skylake\"\n"),
            "vcpu_model",
        );
        refused(&format!("{base}[snp]\npolicy = 0x10000\n"), "bit 17");
        refused(&format!("{base}[snp]\npolicy = 0xb0000\n"), "debug");
        refused(
            &format!(
                "{}[tdx]\npage_add_order = \"sideways\"\n",
                base.replace("snp", "tdx")
            ),
            "page_add_order",
        );
        std::fs::write(&file, base).unwrap();
        let ok = Launch::from_file(&file).unwrap();
        assert_eq!(ok.kernel, dir.path().join("k"));
        assert_eq!(ok.snp.policy, 0x30000);
    }

    #[test]
    fn a_written_description_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("launch.toml");
        for tee in [Tee::Snp, Tee::Tdx] {
            let mut original = launch(tee);
            original.firmware = dir.path().join("fw.fd");
            original.kernel = dir.path().join("vm linuz");
            original.initrd = Some(dir.path().join("initrd"));
            original.cmdline = "console=ttyS0 quote=\"x\" back\\slash".into();
            original.snp.policy = 0x1_0000 | 0x2_0000 | 0x10_0000;
            std::fs::write(&file, original.to_toml()).unwrap();
            let read = Launch::from_file(&file).unwrap();
            assert_eq!(read.qemu_args(), original.qemu_args());
            assert_eq!(read.to_toml(), original.to_toml());
        }
    }

    #[test]
    fn the_host_check_names_what_is_missing() {
        let missing = missing_on_host(Tee::Tdx, Some((10, 0)));
        assert!(
            missing.iter().any(|m| m.contains("QEMU 10.1")),
            "{missing:?}"
        );
        let missing = missing_on_host(Tee::Snp, None);
        assert!(missing.iter().any(|m| m == "qemu-system-x86_64"));
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\n"),
            Some((10, 0))
        );
    }
}
