//! What TDVF (OVMF for TDX) and the kernel's EFI stub measure into RTMR 1 and RTMR 2, so that a
//! verifier knows those registers before the first boot.
//!
//! RTMR 1 (PCRs 2–6) holds the boot path: every PE image the firmware loads, by its
//! Authenticode digest; the ReadyToBoot action and one separator; the disk's GPT when the
//! image comes from a disk; the two ExitBootServices actions. RTMR 2 (PCRs 8–15) holds what
//! the kernel's EFI stub measures: its load options (the command line, UTF-16) and its initrd.
//!
//! On a direct kernel boot, QEMU hands the firmware the kernel through fw_cfg after patching
//! its setup header (loader type, heap, command-line address, initrd address and size); OVMF up
//! to 2025.02 (Debian bookworm and trixie) measures that patched image, later OVMF the file
//! as it is. The digests are generic over the hash so the same events can be checked against a
//! vTPM's SHA-256 log of an OVMF boot, where the very same images and actions are measured
//! into PCRs.

use sha2::Digest;

/// QEMU's ACPI data reservation below 4 GiB on pc and q35 machines (`acpi_data_size`), which
/// bounds where it puts the initrd.
const QEMU_ACPI_DATA_SIZE: u32 = 0x28000;
const SEPARATOR: [u8; 4] = [0; 4];
pub const CALLING_EFI_APPLICATION: &str = "Calling EFI Application from Boot Option";
pub const RETURNING_FROM_EFI_APPLICATION: &str = "Returning from EFI Application from Boot Option";
pub const EXIT_BOOT_SERVICES_INVOCATION: &str = "Exit Boot Services Invocation";
pub const EXIT_BOOT_SERVICES_SUCCESS: &str = "Exit Boot Services Returned with Success";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("{what} at byte {offset} needs {needed} bytes, the image has {len}")]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: usize,
        len: usize,
    },
    #[error("{what} at byte {offset}: {detail}")]
    Invalid {
        what: &'static str,
        offset: usize,
        detail: String,
    },
    #[error(transparent)]
    Pe(#[from] crate::uefi::pe::PeError),
}

fn field<'a>(
    bytes: &'a [u8],
    offset: usize,
    size: usize,
    what: &'static str,
) -> Result<&'a [u8], ImageError> {
    offset
        .checked_add(size)
        .and_then(|end| bytes.get(offset..end))
        .ok_or(ImageError::Truncated {
            what,
            offset,
            needed: size,
            len: bytes.len(),
        })
}

fn u16_at(bytes: &[u8], offset: usize, what: &'static str) -> Result<u16, ImageError> {
    Ok(u16::from_le_bytes(
        field(bytes, offset, 2, what)?.try_into().unwrap(),
    ))
}

fn u32_at(bytes: &[u8], offset: usize, what: &'static str) -> Result<u32, ImageError> {
    Ok(u32::from_le_bytes(
        field(bytes, offset, 4, what)?.try_into().unwrap(),
    ))
}

pub use crate::uefi::pe::authenticode;

/// The kernel as QEMU hands it to the firmware on a direct boot (`-kernel`): its setup header
/// patched for the loader, the command line and the initrd, whose address depends on the
/// guest's memory size below 4 GiB.
pub fn qemu_loaded_kernel(
    kernel: &[u8],
    initrd_size: Option<u64>,
    memory_bytes: u64,
    cmdline: &str,
) -> Result<Vec<u8>, ImageError> {
    if kernel.len() < 0x1000 {
        return Err(ImageError::Truncated {
            what: "the kernel's setup header",
            offset: 0,
            needed: 0x1000,
            len: kernel.len(),
        });
    }
    if field(kernel, 0x202, 4, "the setup header's magic")? != b"HdrS" {
        return Err(ImageError::Invalid {
            what: "the setup header's magic",
            offset: 0x202,
            detail: "not \"HdrS\": not a bzImage QEMU would patch".into(),
        });
    }
    if cmdline.split(' ').any(|w| w.starts_with("vga=")) {
        return Err(ImageError::Invalid {
            what: "the command line",
            offset: 0,
            detail: "vga= makes QEMU patch the video mode, which is not modelled".into(),
        });
    }
    let protocol = u16_at(kernel, 0x206, "the boot protocol version")?;
    if protocol < 0x202 {
        return Err(ImageError::Invalid {
            what: "the boot protocol version",
            offset: 0x206,
            detail: format!("{protocol:#x}: kernels before protocol 2.02 are not modelled"),
        });
    }
    let mut patched = kernel.to_vec();
    let loaded_high = patched[0x211] & 0x01 != 0;
    let (real_addr, cmdline_addr): (u32, u32) = if loaded_high {
        (0x10000, 0x20000)
    } else {
        (0x90000, 0x9a000)
    };
    patched[0x210] = 0xb0; // type_of_loader: QEMU
    patched[0x211] |= 0x80; // loadflags: CAN_USE_HEAP
    patched[0x224..0x228].copy_from_slice(&(cmdline_addr - real_addr - 0x200).to_le_bytes());
    patched[0x228..0x22c].copy_from_slice(&cmdline_addr.to_le_bytes());
    if let Some(size) = initrd_size {
        let size = u32::try_from(size).map_err(|_| ImageError::Invalid {
            what: "the initrd",
            offset: 0,
            detail: format!("{size} bytes: QEMU loads an initrd below 4 GiB"),
        })?;
        let xloadflags = if protocol >= 0x20c {
            u16_at(kernel, 0x236, "xloadflags")?
        } else {
            0
        };
        let mut initrd_max = if xloadflags & (1 << 1) != 0 {
            u32::MAX // XLF_CAN_BE_LOADED_ABOVE_4G
        } else if protocol >= 0x203 {
            match u32_at(kernel, 0x22c, "initrd_addr_max")? {
                0 => 0x37ff_ffff,
                max => max,
            }
        } else {
            0x37ff_ffff
        };
        let low_memory = if memory_bytes < 0xb000_0000 {
            0xb000_0000
        } else {
            0x8000_0000
        };
        let below_4g = memory_bytes.min(low_memory) as u32;
        let ceiling = below_4g.saturating_sub(QEMU_ACPI_DATA_SIZE);
        if initrd_max >= ceiling {
            initrd_max = ceiling.saturating_sub(1);
        }
        if size >= initrd_max {
            return Err(ImageError::Invalid {
                what: "the initrd",
                offset: 0,
                detail: format!(
                    "{size} bytes do not fit below {initrd_max:#x} with {memory_bytes} bytes of memory"
                ),
            });
        }
        let address = (initrd_max - size) & !0xfff;
        patched[0x218..0x21c].copy_from_slice(&address.to_le_bytes());
        patched[0x21c..0x220].copy_from_slice(&size.to_le_bytes());
    }
    Ok(patched)
}

/// How the firmware measures a directly booted kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelAsMeasured {
    /// As QEMU patched it (OVMF up to 2025.02).
    QemuPatched,
    /// The file as it is (OVMF 2025.05 and later).
    Unpatched,
}

/// A direct kernel boot (`-kernel`, `-initrd`, `-append`).
pub struct DirectBoot<'a> {
    pub kernel: &'a [u8],
    /// The initrd's bytes, or its digest already made (then pass its size too).
    pub initrd: Option<&'a [u8]>,
    pub cmdline: &'a str,
    pub memory_bytes: u64,
    pub kernel_as_measured: KernelAsMeasured,
}

/// One event of a prediction: what it is, its digest, and the PCR OVMF measures it into on a
/// vTPM (`None` for the separator, which a TPM gets in every PCR 0–7 and an RTMR once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Predicted {
    pub what: String,
    pub digest: Vec<u8>,
    pub pcr: Option<u32>,
}

fn action<D: Digest>(text: &str, pcr: u32) -> Predicted {
    Predicted {
        what: format!("EV_EFI_ACTION {text:?}"),
        digest: D::digest(text.as_bytes()).to_vec(),
        pcr: Some(pcr),
    }
}

fn separator<D: Digest>() -> Predicted {
    Predicted {
        what: "EV_SEPARATOR".into(),
        digest: D::digest(SEPARATOR).to_vec(),
        pcr: None,
    }
}

fn image<D: Digest>(what: &str, pe: &[u8]) -> Result<Predicted, ImageError> {
    Ok(Predicted {
        what: format!("EV_EFI_BOOT_SERVICES_APPLICATION {what}"),
        digest: authenticode::<D>(pe)?,
        pcr: Some(4),
    })
}

/// The same events as a vTPM's PCRs receive them from OVMF: each PCR the events name, from
/// zero, with the separator in each of them where it falls. (Checking a prediction against a
/// vTPM boot needs no TDX hardware.)
pub fn tpm_pcrs<D: Digest>(events: &[Predicted]) -> std::collections::BTreeMap<u32, Vec<u8>> {
    let mut pcrs: std::collections::BTreeMap<u32, Vec<Predicted>> = Default::default();
    for e in events {
        if let Some(pcr) = e.pcr {
            pcrs.entry(pcr).or_default();
        }
    }
    for e in events {
        match e.pcr {
            Some(pcr) => pcrs.get_mut(&pcr).unwrap().push(e.clone()),
            None => pcrs
                .iter_mut()
                .filter(|(pcr, _)| **pcr <= 7)
                .for_each(|(_, list)| list.push(e.clone())),
        }
    }
    pcrs.into_iter()
        .map(|(pcr, list)| (pcr, fold::<D>(&list)))
        .collect()
}

/// The load options the EFI stub measures (EV_EVENT_TAG "LOADED_IMAGE::LoadOptions"): the
/// command line in UTF-16LE with its terminating NUL. On a direct boot with an initrd, OVMF
/// appends " initrd=initrd" to what QEMU passed.
pub fn load_options<D: Digest>(cmdline: &str) -> Predicted {
    let mut bytes: Vec<u8> = cmdline.encode_utf16().flat_map(u16::to_le_bytes).collect();
    bytes.extend([0, 0]);
    Predicted {
        what: format!("EV_EVENT_TAG LoadOptions {cmdline:?}"),
        digest: D::digest(&bytes).to_vec(),
        pcr: Some(9),
    }
}

/// The initrd the EFI stub loads (EV_EVENT_TAG "Linux initrd").
pub fn initrd_event<D: Digest>(initrd: &[u8]) -> Predicted {
    Predicted {
        what: "EV_EVENT_TAG Linux initrd".into(),
        digest: D::digest(initrd).to_vec(),
        pcr: Some(9),
    }
}

impl DirectBoot<'_> {
    /// The kernel image the firmware measures.
    pub fn measured_kernel(&self) -> Result<Vec<u8>, ImageError> {
        match self.kernel_as_measured {
            KernelAsMeasured::Unpatched => Ok(self.kernel.to_vec()),
            KernelAsMeasured::QemuPatched => qemu_loaded_kernel(
                self.kernel,
                self.initrd.map(|i| i.len() as u64),
                self.memory_bytes,
                self.cmdline,
            ),
        }
    }

    /// RTMR 1's events, in order: the kernel loaded, ReadyToBoot, ExitBootServices.
    pub fn rtmr1_events<D: Digest>(&self) -> Result<Vec<Predicted>, ImageError> {
        Ok(vec![
            image::<D>("kernel", &self.measured_kernel()?)?,
            action::<D>(CALLING_EFI_APPLICATION, 4),
            separator::<D>(),
            action::<D>(EXIT_BOOT_SERVICES_INVOCATION, 5),
            action::<D>(EXIT_BOOT_SERVICES_SUCCESS, 5),
        ])
    }

    /// RTMR 2's events from the EFI stub: the load options, then the initrd.
    pub fn rtmr2_events<D: Digest>(&self) -> Vec<Predicted> {
        let mut events = Vec::new();
        match self.initrd {
            Some(initrd) => {
                events.push(load_options::<D>(&format!(
                    "{} initrd=initrd",
                    self.cmdline
                )));
                events.push(initrd_event::<D>(initrd));
            }
            None if !self.cmdline.is_empty() => events.push(load_options::<D>(self.cmdline)),
            None => {}
        }
        events
    }
}

/// A UKI booted from a disk by the firmware's boot manager: RTMR 1 holds ReadyToBoot, the
/// separator, one "Returning" and a new ReadyToBoot for each boot option the firmware tried
/// first and came back from (with a fresh variable store OVMF tries other devices before the
/// node's disk: seen once with a blank state disk attached), the disk's GPT, the UKI and the
/// kernel systemd-stub loads out of it, then ExitBootServices.
pub fn uki_rtmr1_events<D: Digest>(
    gpt_event: &[u8],
    uki: &[u8],
    embedded_kernel: &[u8],
    returned_boot_options: usize,
) -> Result<Vec<Predicted>, ImageError> {
    let mut events = vec![action::<D>(CALLING_EFI_APPLICATION, 4), separator::<D>()];
    for _ in 0..returned_boot_options {
        events.push(action::<D>(RETURNING_FROM_EFI_APPLICATION, 4));
        events.push(action::<D>(CALLING_EFI_APPLICATION, 4));
    }
    events.extend([
        Predicted {
            what: "EV_EFI_GPT_EVENT".into(),
            digest: D::digest(gpt_event).to_vec(),
            pcr: Some(5),
        },
        image::<D>("UKI", uki)?,
        image::<D>("kernel (the UKI's .linux)", embedded_kernel)?,
        action::<D>(EXIT_BOOT_SERVICES_INVOCATION, 5),
        action::<D>(EXIT_BOOT_SERVICES_SUCCESS, 5),
    ]);
    Ok(events)
}

/// The load options systemd-stub passes the kernel from a UKI: the `.cmdline` section without
/// trailing whitespace (the kernel's EFI stub measures them into PCR 9 / RTMR 2).
pub fn uki_load_options<D: Digest>(cmdline_section: &[u8]) -> Predicted {
    let text = String::from_utf8_lossy(cmdline_section);
    load_options::<D>(text.trim_end_matches(['\0', ' ', '\n', '\t']))
}

/// RTMR 2's events before cvm-init for a UKI booted by systemd-stub: its load options, then the
/// initrd it serves (see [`systemd_stub_initrd`]).
pub fn uki_rtmr2_events<D: Digest>(sections: &[(String, Vec<u8>)]) -> Vec<Predicted> {
    let section = |name: &str| crate::predict::section(sections, name);
    vec![
        uki_load_options::<D>(section(".cmdline").unwrap_or_default()),
        initrd_event::<D>(&systemd_stub_initrd(sections)),
    ]
}

/// The initrd systemd-stub (257) hands the kernel from a UKI, which the kernel's EFI stub
/// measures whole: the `.ucode` and `.initrd` sections, then archives the stub generates —
/// `.pcrsig`, `.pcrpkey`, `.osrel` and `.profile` each as a one-file cpio under `/.extra` —
/// every part padded to 4 bytes when there is more than one. Credentials, system and
/// configuration extensions the stub would pick up from the ESP are not predicted: the node's
/// ESP holds only the UKI.
pub fn systemd_stub_initrd(sections: &[(String, Vec<u8>)]) -> Vec<u8> {
    let section = |name: &str| crate::predict::section(sections, name);
    let mut parts: Vec<Vec<u8>> = [".ucode", ".initrd"]
        .iter()
        .filter_map(|name| section(name).map(<[u8]>::to_vec))
        .collect();
    for (name, file) in [
        (".pcrsig", "tpm2-pcr-signature.json"),
        (".pcrpkey", "tpm2-pcr-public-key.pem"),
        (".osrel", "os-release"),
        (".profile", "profile"),
    ] {
        if let Some(contents) = section(name) {
            parts.push(stub_cpio(file, contents));
        }
    }
    if parts.len() == 1 {
        return parts.remove(0);
    }
    let mut initrd = Vec::new();
    for part in parts {
        initrd.extend_from_slice(&part);
        initrd.resize(initrd.len().next_multiple_of(4), 0);
    }
    initrd
}

/// A "newc" cpio archive as systemd-stub writes one: the directory `.extra` (0555, inode 1),
/// the file `.extra/<name>` (0444, inode 2), the trailer; owner root, mtime 0, every header and
/// body padded to 4 bytes from the archive's start.
fn stub_cpio(name: &str, contents: &[u8]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, inode: u32, mode: u32, path: &str, body: &[u8]) {
        let words = [
            inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            body.len() as u32,
            0,
            0,
            0,
            0, // device numbers
            path.len() as u32 + 1,
            0, // check
        ];
        out.extend_from_slice(b"070701");
        for word in words {
            out.extend_from_slice(format!("{word:08x}").as_bytes());
        }
        out.extend_from_slice(path.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(body);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    let mut out = Vec::new();
    entry(&mut out, 1, 0o040555, ".extra", &[]);
    entry(&mut out, 2, 0o100444, &format!(".extra/{name}"), contents);
    // The trailer's words are all zero but nlink 1 and the name size (upper-case hex there).
    out.extend_from_slice(b"070701");
    for word in ["00000000"; 4]
        .into_iter()
        .chain(["00000001"])
        .chain(["00000000"; 6])
        .chain(["0000000B", "00000000"])
    {
        out.extend_from_slice(word.as_bytes());
    }
    out.extend_from_slice(b"TRAILER!!!\0");
    out.resize(out.len().next_multiple_of(4), 0);
    out
}

/// The UEFI_GPT_DATA the firmware measures for a disk (EV_EFI_GPT_EVENT): the primary GPT
/// header, the number of used partition entries (u64), the used entries in table order.
pub fn gpt_event(disk: &[u8], sector: usize) -> Result<Vec<u8>, ImageError> {
    let header = field(disk, sector, 92, "the GPT header")?;
    if &header[..8] != b"EFI PART" {
        return Err(ImageError::Invalid {
            what: "the GPT header",
            offset: sector,
            detail: "no \"EFI PART\" signature".into(),
        });
    }
    let header_size = u32_at(disk, sector + 12, "the GPT header size")? as usize;
    if !(92..=sector).contains(&header_size) {
        return Err(ImageError::Invalid {
            what: "the GPT header size",
            offset: sector + 12,
            detail: format!("{header_size}, expected 92 to {sector}"),
        });
    }
    let entries_lba = u64::from_le_bytes(
        field(disk, sector + 72, 8, "PartitionEntryLBA")?
            .try_into()
            .unwrap(),
    );
    let count = u32_at(disk, sector + 80, "NumberOfPartitionEntries")? as usize;
    let entry_size = u32_at(disk, sector + 84, "SizeOfPartitionEntry")? as usize;
    if entry_size < 128 || count > 1024 {
        return Err(ImageError::Invalid {
            what: "the GPT partition array",
            offset: sector + 80,
            detail: format!("{count} entries of {entry_size} bytes"),
        });
    }
    let table_at = usize::try_from(entries_lba)
        .ok()
        .and_then(|lba| lba.checked_mul(sector))
        .ok_or(ImageError::Invalid {
            what: "PartitionEntryLBA",
            offset: sector + 72,
            detail: format!("{entries_lba} is out of range"),
        })?;
    let table = field(
        disk,
        table_at,
        count * entry_size,
        "the GPT partition array",
    )?;
    let used: Vec<&[u8]> = table
        .chunks(entry_size)
        .filter(|e| e[..16].iter().any(|&b| b != 0))
        .collect();
    let mut event = field(disk, sector, header_size, "the GPT header")?.to_vec();
    event.extend((used.len() as u64).to_le_bytes());
    for entry in used {
        event.extend(entry);
    }
    Ok(event)
}

/// A register's value after extending each event's digest into it, from zero.
pub fn fold<D: Digest>(events: &[Predicted]) -> Vec<u8> {
    let mut register = vec![0u8; <D as Digest>::output_size()];
    for e in events {
        let mut h = D::new();
        h.update(&register);
        h.update(&e.digest);
        register = h.finalize().to_vec();
    }
    register
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::{Sha256, Sha384};

    /// A small PE32+ image: DOS header, PE header, two sections (out of file order in the
    /// table), optional trailing data and certificates.
    pub(crate) fn tiny_pe(trailing: &[u8], certificates: &[u8]) -> Vec<u8> {
        let mut pe = vec![0u8; 0x400];
        pe[..2].copy_from_slice(b"MZ");
        pe[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        pe[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        pe[coff + 2..coff + 4].copy_from_slice(&2u16.to_le_bytes());
        pe[coff + 16..coff + 18].copy_from_slice(&240u16.to_le_bytes());
        let opt = coff + 20;
        pe[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        pe[opt + 60..opt + 64].copy_from_slice(&0x400u32.to_le_bytes());
        pe[opt + 64..opt + 68].copy_from_slice(&0xdeadbeefu32.to_le_bytes()); // checksum
        pe[opt + 108..opt + 112].copy_from_slice(&16u32.to_le_bytes());
        let table = opt + 240;
        for (i, (ptr, size)) in [(0x600u32, 0x200u32), (0x400, 0x200)].iter().enumerate() {
            let s = table + i * 40;
            pe[s..s + 5].copy_from_slice(b".sect");
            pe[s + 16..s + 20].copy_from_slice(&size.to_le_bytes());
            pe[s + 20..s + 24].copy_from_slice(&ptr.to_le_bytes());
        }
        pe.extend((0..0x400u32).map(|i| (i * 7) as u8));
        pe.extend(trailing);
        if !certificates.is_empty() {
            let at = pe.len() as u32;
            let dir = opt + 112 + 32;
            pe[dir..dir + 4].copy_from_slice(&at.to_le_bytes());
            pe[dir + 4..dir + 8].copy_from_slice(&(certificates.len() as u32).to_le_bytes());
            pe.extend(certificates);
        }
        pe
    }

    #[test]
    fn authenticode_leaves_out_checksum_and_certificates() {
        let plain = tiny_pe(b"", b"");
        let signed = tiny_pe(b"", &[0x55; 24]);
        assert_eq!(
            authenticode::<Sha384>(&plain).unwrap(),
            authenticode::<Sha384>(&signed).unwrap()
        );
        let mut other_checksum = plain.clone();
        other_checksum[0x84 + 20 + 64] ^= 0xff;
        assert_eq!(
            authenticode::<Sha256>(&plain).unwrap(),
            authenticode::<Sha256>(&other_checksum).unwrap()
        );
        let mut other_section = plain.clone();
        other_section[0x500] ^= 1;
        assert_ne!(
            authenticode::<Sha256>(&plain).unwrap(),
            authenticode::<Sha256>(&other_section).unwrap()
        );
        // Trailing data counts, padded to 8 bytes with zeros.
        let trailing = authenticode::<Sha256>(&tiny_pe(b"abc", b"")).unwrap();
        assert_eq!(
            trailing,
            authenticode::<Sha256>(&tiny_pe(b"abc\0\0\0\0\0", b"")).unwrap()
        );
        assert_ne!(trailing, authenticode::<Sha256>(&plain).unwrap());
    }

    #[test]
    fn broken_images_are_refused_by_field() {
        let pe = tiny_pe(b"", b"");
        let e = authenticode::<Sha256>(&pe[..0x30]).unwrap_err();
        assert!(e.to_string().contains("e_lfanew"), "{e}");
        let mut bad = pe.clone();
        bad[0x80] = b'X';
        assert!(authenticode::<Sha256>(&bad)
            .unwrap_err()
            .to_string()
            .contains("PE signature"));
        let mut bad = pe.clone();
        bad[0x84 + 20 + 240 + 20..0x84 + 20 + 240 + 24].copy_from_slice(&0xfff0u32.to_le_bytes());
        let e = authenticode::<Sha256>(&bad).unwrap_err();
        assert!(e.to_string().contains("raw data"), "{e}");
        let mut bad = tiny_pe(b"", &[1; 16]);
        let dir = 0x84 + 20 + 112 + 32;
        bad[dir + 4..dir + 8].copy_from_slice(&1000u32.to_le_bytes());
        let e = authenticode::<Sha256>(&bad).unwrap_err();
        assert!(e.to_string().contains("certificate table"), "{e}");
    }

    fn bzimage(protocol: u16, xloadflags: u16) -> Vec<u8> {
        let mut k = vec![0u8; 0x2000];
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k[0x206..0x208].copy_from_slice(&protocol.to_le_bytes());
        k[0x211] = 0x01;
        k[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        k
    }

    #[test]
    fn qemu_patches_loader_command_line_and_initrd() {
        let k = bzimage(0x20f, 0x2);
        let p = qemu_loaded_kernel(&k, Some(0x123456), 1 << 30, "console=ttyS0").unwrap();
        assert_eq!(p[0x210], 0xb0);
        assert_eq!(p[0x211], 0x81);
        assert_eq!(
            &p[0x224..0x228],
            &(0x20000u32 - 0x10000 - 0x200).to_le_bytes()
        );
        assert_eq!(&p[0x228..0x22c], &0x20000u32.to_le_bytes());
        // 1 GiB: initrd below 1 GiB less QEMU's ACPI data, page aligned.
        let max = (1u32 << 30) - 0x28000 - 1;
        assert_eq!(&p[0x218..0x21c], &((max - 0x123456) & !0xfff).to_le_bytes());
        assert_eq!(&p[0x21c..0x220], &0x123456u32.to_le_bytes());
        // 4 GiB: only 2 GiB lie below 4 GiB on q35.
        let p = qemu_loaded_kernel(&k, Some(0x1000), 4 << 30, "").unwrap();
        let max = 0x8000_0000u32 - 0x28000 - 1;
        assert_eq!(&p[0x218..0x21c], &((max - 0x1000) & !0xfff).to_le_bytes());
        // Without XLF_CAN_BE_LOADED_ABOVE_4G, initrd_addr_max bounds it.
        let mut k = bzimage(0x20f, 0);
        k[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
        let p = qemu_loaded_kernel(&k, Some(0x1000), 4 << 30, "").unwrap();
        assert_eq!(
            &p[0x218..0x21c],
            &((0x37ff_ffffu32 - 0x1000) & !0xfff).to_le_bytes()
        );
        // No initrd: its fields stay as they were.
        let p = qemu_loaded_kernel(&k, None, 1 << 30, "").unwrap();
        assert_eq!(&p[0x218..0x220], &[0; 8]);
        for (kernel, cmdline, what) in [
            (vec![0u8; 0x2000], "", "magic"),
            (bzimage(0x201, 0), "", "protocol"),
            (bzimage(0x20f, 0), "vga=791", "vga="),
        ] {
            let e = qemu_loaded_kernel(&kernel, None, 1 << 30, cmdline).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
        let e = qemu_loaded_kernel(&bzimage(0x20f, 2), Some(900 << 20), 512 << 20, "").unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
    }

    #[test]
    fn direct_boot_events_follow_the_firmware_order() {
        let kernel = bzimage(0x20f, 2);
        let boot = DirectBoot {
            kernel: &kernel,
            initrd: Some(b"initrd bytes"),
            cmdline: "console=ttyS0",
            memory_bytes: 1 << 30,
            kernel_as_measured: KernelAsMeasured::Unpatched,
        };
        let e = boot.rtmr1_events::<Sha384>();
        // The bzImage stand-in is no PE (no MZ signature, checked since the one PE parser):
        // refused by what is missing.
        let e = e.unwrap_err().to_string();
        assert!(e.contains("no MZ signature"), "{e}");
        let two = boot.rtmr2_events::<Sha384>();
        assert_eq!(two.len(), 2);
        let utf16: Vec<u8> = "console=ttyS0 initrd=initrd\0"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert_eq!(two[0].digest, Sha384::digest(&utf16).to_vec());
        assert_eq!(two[1].digest, Sha384::digest(b"initrd bytes").to_vec());
        let one = DirectBoot {
            initrd: None,
            ..boot
        }
        .rtmr2_events::<Sha384>();
        assert_eq!(one.len(), 1);
        assert!(one[0].what.contains("\"console=ttyS0\""));
        // The separator and actions digest their data.
        assert_eq!(
            separator::<Sha384>().digest,
            cvm_formats::verity::parse_hex("394341b7182cd227c5c6b07ef8000cdfd86136c4292b8e576573ad7ed9ae41019f5818b4b971c9effc60e1ad9f1289f0").unwrap()
        );
        assert_eq!(
            action::<Sha384>(CALLING_EFI_APPLICATION, 4).digest,
            cvm_formats::verity::parse_hex("77a0dab2312b4e1e57a84d865a21e5b2ee8d677a21012ada819d0a98988078d3d740f6346bfe0abaa938ca20439a8d71").unwrap()
        );
    }

    #[test]
    fn tpm_view_puts_the_separator_in_each_pcr() {
        let pe = tiny_pe(b"", b"");
        let events = uki_rtmr1_events::<Sha256>(b"gpt", &pe, &pe, 0).unwrap();
        let pcrs = tpm_pcrs::<Sha256>(&events);
        assert_eq!(pcrs.keys().copied().collect::<Vec<_>>(), vec![4, 5]);
        let by = |what: &str| {
            events
                .iter()
                .find(|e| e.what.contains(what))
                .unwrap()
                .clone()
        };
        let four = [
            by("Calling"),
            separator::<Sha256>(),
            by("UKI"),
            by("kernel"),
        ];
        let five = [
            separator::<Sha256>(),
            by("GPT"),
            by("Invocation"),
            by("Success"),
        ];
        assert_eq!(pcrs[&4], fold::<Sha256>(&four));
        assert_eq!(pcrs[&5], fold::<Sha256>(&five));
        // RTMR 1 has the separator once.
        assert_eq!(events.iter().filter(|e| e.pcr.is_none()).count(), 1);
        // A boot option tried and returned from adds its two actions to PCR 4 only.
        let retried = uki_rtmr1_events::<Sha256>(b"gpt", &pe, &pe, 1).unwrap();
        assert_eq!(retried.len(), events.len() + 2);
        assert!(retried[2].what.contains("Returning") && retried[3].what.contains("Calling"));
        let pcrs_retried = tpm_pcrs::<Sha256>(&retried);
        assert_ne!(pcrs_retried[&4], pcrs[&4]);
        assert_eq!(pcrs_retried[&5], pcrs[&5]);
        // systemd-stub's load options: the section without its trailing NUL and newline.
        assert_eq!(
            uki_load_options::<Sha256>(b"console=ttyS0\n\0").digest,
            load_options::<Sha256>("console=ttyS0").digest
        );
    }

    #[test]
    fn the_stub_cpio_layout() {
        let archive = stub_cpio("os-release", b"ID=x\n");
        // Directory: 110-byte header + ".extra\0", padded to 120; the file's header + name are
        // 128 bytes, its 5 bytes padded to 8; the trailer 124.
        assert_eq!(archive.len(), 120 + 128 + 8 + 124);
        assert_eq!(&archive[..6], b"070701");
        assert_eq!(&archive[6..14], b"00000001");
        assert_eq!(&archive[14..22], b"0000416d"); // S_IFDIR | 0555
        assert_eq!(&archive[110..117], b".extra\0");
        assert_eq!(&archive[120 + 14..120 + 22], b"00008124"); // S_IFREG | 0444
        assert_eq!(&archive[120 + 54..120 + 62], b"00000005"); // size
        assert_eq!(&archive[120 + 110..120 + 128], b".extra/os-release\0");
        assert_eq!(&archive[248..253], b"ID=x\n");
        assert_eq!(&archive[256 + 94..256 + 102], b"0000000B");
        assert_eq!(&archive[256 + 110..256 + 121], b"TRAILER!!!\0");
    }

    #[test]
    fn gnu_cpio_reads_the_stub_cpio() {
        let dir = tempfile::tempdir().unwrap();
        let archive = stub_cpio("os-release", b"NAME=test\n");
        let out = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .current_dir(dir.path())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(&archive)?;
                child.wait_with_output()
            });
        let Ok(out) = out else {
            eprintln!("skipped: no cpio (installed by make deps)");
            return;
        };
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{listing}");
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 2, "{listing}");
        assert!(lines[0].starts_with("dr-xr-xr-x") && lines[0].ends_with(" .extra"));
        assert!(lines[1].starts_with("-r--r--r--") && lines[1].ends_with(" .extra/os-release"));
        assert!(lines[1].contains(" 10 "), "{listing}");
    }

    #[test]
    fn the_stub_serves_the_initrd_alone_or_padded_parts() {
        let named = |list: &[(&str, &[u8])]| -> Vec<(String, Vec<u8>)> {
            list.iter()
                .map(|(n, c)| (n.to_string(), c.to_vec()))
                .collect()
        };
        // Only .initrd: served as it is, not padded.
        let alone = named(&[(".linux", b"k"), (".initrd", b"abcde")]);
        assert_eq!(systemd_stub_initrd(&alone), b"abcde");
        // .ucode first, .initrd, then the generated archives in the stub's order.
        let all = named(&[
            (".osrel", b"ID=x\n"),
            (".initrd", b"abcde"),
            (".pcrpkey", b"KEY"),
            (".ucode", b"uc"),
        ]);
        let mut expected = b"uc\0\0abcde\0\0\0".to_vec();
        expected.extend(stub_cpio("tpm2-pcr-public-key.pem", b"KEY"));
        expected.extend(stub_cpio("os-release", b"ID=x\n"));
        assert_eq!(systemd_stub_initrd(&all), expected);
        let events = uki_rtmr2_events::<Sha256>(&named(&[
            (".cmdline", b"console=ttyS0\n"),
            (".initrd", b"abcde"),
        ]));
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0].digest,
            load_options::<Sha256>("console=ttyS0").digest
        );
        assert_eq!(events[1].digest, Sha256::digest(b"abcde").to_vec());
        assert!(events.iter().all(|e| e.pcr == Some(9)));
    }

    #[test]
    fn gpt_event_keeps_used_entries_only() {
        let mut disk = vec![0u8; 512 * 40];
        let h = 512;
        disk[h..h + 8].copy_from_slice(b"EFI PART");
        disk[h + 12..h + 16].copy_from_slice(&92u32.to_le_bytes());
        disk[h + 72..h + 80].copy_from_slice(&2u64.to_le_bytes());
        disk[h + 80..h + 84].copy_from_slice(&128u32.to_le_bytes());
        disk[h + 84..h + 88].copy_from_slice(&128u32.to_le_bytes());
        disk[1024] = 1; // entry 0 used
        disk[1024 + 2 * 128] = 2; // entry 2 used
        let event = gpt_event(&disk, 512).unwrap();
        assert_eq!(event.len(), 92 + 8 + 2 * 128);
        assert_eq!(&event[92..100], &2u64.to_le_bytes());
        assert_eq!(event[100], 1);
        assert_eq!(event[228], 2);
        let e = gpt_event(&disk[..2048], 512).unwrap_err();
        assert!(e.to_string().contains("partition array"), "{e}");
        disk[h] = b'X';
        assert!(gpt_event(&disk, 512)
            .unwrap_err()
            .to_string()
            .contains("EFI PART"));
    }

    proptest! {
        #[test]
        fn arbitrary_images_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), at in 0usize..2048, value in any::<u32>()) {
            let _ = authenticode::<Sha256>(&bytes);
            let mut pe = tiny_pe(b"xyz", &[3; 8]);
            let at = at % (pe.len() - 4);
            pe[at..at + 4].copy_from_slice(&value.to_le_bytes());
            let _ = authenticode::<Sha384>(&pe);
            let _ = qemu_loaded_kernel(&pe, Some(value as u64), value as u64 * 4096, "");
            let _ = gpt_event(&bytes, 512);
        }
    }
}
