//! The SEV-SNP launch digest (the report's MEASUREMENT) that the secure processor computes as
//! the host adds the guest's first pages: the OVMF image, the pages its SEV metadata names (the
//! kernel-hashes page among them, for measured direct boot), and one VMSA per vCPU. Every
//! structure read from the firmware is bounds-checked; firmware that cannot do what is asked
//! (no SEV metadata; a kernel without a kernel-hashes section) is refused, not guessed at.

use sha2::{Digest, Sha256, Sha384};

const PAGE: usize = 4096;
const FOUR_GIB: u64 = 1 << 32;
const VMSA_GPA: u64 = 0x0000_FFFF_FFFF_F000;
const BSP_EIP: u32 = 0xffff_fff0;

const FOOTER_GUID: &str = "96b582de-1fb2-45f7-baea-a366c55a082d";
const SEV_METADATA_GUID: &str = "dc886566-984a-4798-a75e-5585a7bf67cc";
const SEV_ES_RESET_BLOCK_GUID: &str = "00f771de-1a7e-4fcb-890e-68c77e2fb44e";
const SEV_HASH_TABLE_GUID: &str = "7255371f-3a3b-4b04-927b-1da6efa8d454";
const HASH_TABLE_HEADER_GUID: &str = "9438d606-4f22-4cc9-b479-a793d411fd21";
const HASH_CMDLINE_GUID: &str = "97d02dd8-bd20-4c94-aa78-e7714d36ab2a";
const HASH_INITRD_GUID: &str = "44baf731-3a2f-4bd7-9af1-41e29169781d";
const HASH_KERNEL_GUID: &str = "4de79437-abd2-427f-b835-d5b172d2045b";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LaunchError {
    #[error("firmware: {what} at offset {offset:#x}: {detail}")]
    Firmware {
        what: &'static str,
        offset: usize,
        detail: String,
    },
    #[error("a kernel was given but the firmware's SEV metadata has no SNP_KERNEL_HASHES section (build OvmfPkg/AmdSev for measured direct boot)")]
    NoKernelHashes,
    #[error("{0}")]
    Input(String),
}

fn firmware_error(what: &'static str, offset: usize, detail: impl Into<String>) -> LaunchError {
    LaunchError::Firmware {
        what,
        offset,
        detail: detail.into(),
    }
}

/// A GUID as it is stored in EFI structures (the first three fields little-endian).
pub(crate) fn guid_le(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let b: [u8; 16] = cvm_formats::verity::parse_hex(&hex)
        .and_then(|v| v.try_into().ok())
        .expect("GUID constants are well formed");
    [
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
        b[14], b[15],
    ]
}

/// The kinds of pages the host adds (SNP ABI PAGE_TYPE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageType {
    Normal = 1,
    Vmsa = 2,
    Zero = 3,
    Unmeasured = 4,
    Secrets = 5,
    Cpuid = 6,
}

/// The running launch digest.
struct Gctx {
    digest: [u8; 48],
}

impl Gctx {
    fn update(&mut self, page_type: PageType, gpa: u64, contents: &[u8; 48]) {
        let mut info = [0u8; 0x70];
        info[..48].copy_from_slice(&self.digest);
        info[0x30..0x60].copy_from_slice(contents);
        info[0x60..0x62].copy_from_slice(&0x70u16.to_le_bytes());
        info[0x62] = page_type as u8;
        info[0x68..0x70].copy_from_slice(&gpa.to_le_bytes());
        self.digest = Sha384::digest(info).into();
    }

    /// Firmware volumes have runs of identical pages (erased flash, free space): a page equal
    /// to the one before it reuses its contents digest (a compare costs far less than a SHA-384),
    /// and the other pages are hashed together, four at a time.
    fn normal_pages(&mut self, gpa: u64, data: &[u8]) {
        let pages: Vec<&[u8]> = data.chunks(PAGE).collect();
        let repeats: Vec<bool> = (0..pages.len())
            .map(|i| i > 0 && same_bytes(pages[i], pages[i - 1]))
            .collect();
        let whole: Vec<&[u8; PAGE]> = (0..pages.len())
            .filter(|&i| !repeats[i])
            .filter_map(|i| pages[i].try_into().ok())
            .collect();
        let mut digests = crate::snp::page_sha384::sha384_pages(&whole).into_iter();
        let mut contents = [0u8; 48];
        for (i, page) in pages.iter().enumerate() {
            if !repeats[i] {
                // Only the last page can be short; it is hashed on its own.
                contents = match digests.next() {
                    Some(digest) if page.len() == PAGE => digest,
                    _ => Sha384::digest(page).into(),
                };
            }
            self.update(PageType::Normal, gpa + (i * PAGE) as u64, &contents);
        }
    }

    fn empty_pages(&mut self, page_type: PageType, gpa: u64, size: u64) {
        for i in 0..size.div_ceil(PAGE as u64) {
            self.update(page_type, gpa + i * PAGE as u64, &[0; 48]);
        }
    }
}

/// `a == b` by 8-byte words (the byte slices' `==` is musl's byte-at-a-time memcmp in the static
/// build, a fifth of the firmware's measuring time).
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().expect("8 bytes"));
    let (x, y) = (a.chunks_exact(8), b.chunks_exact(8));
    a.len() == b.len()
        && x.remainder().iter().eq(y.remainder())
        && x.zip(y).all(|(x, y)| word(x) == word(y))
}

/// A section of the firmware's SEV metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataSection {
    pub gpa: u64,
    pub size: u64,
    /// 1 SNP_SEC_MEM, 2 SNP_SECRETS, 3 CPUID, 4 SVSM_CAA, 0x10 SNP_KERNEL_HASHES.
    pub kind: u32,
}

const SEC_MEM: u32 = 1;
const SECRETS: u32 = 2;
const CPUID: u32 = 3;
const SVSM_CAA: u32 = 4;
const KERNEL_HASHES: u32 = 0x10;

/// What the firmware image tells the launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ovmf {
    pub size: usize,
    pub sections: Vec<MetadataSection>,
    /// Where application processors start (the SEV-ES reset block).
    pub ap_reset_eip: Option<u32>,
    /// The kernel-hashes table's guest address and size (size 0: the build has none).
    pub hash_table: Option<(u32, u32)>,
}

impl Ovmf {
    /// Reads the footer GUID table and the SEV metadata, checking every offset.
    pub fn parse(bytes: &[u8]) -> Result<Ovmf, LaunchError> {
        Self::parse_for(bytes, true)
    }

    /// The same; SEV-ES launches need no SEV metadata (`snp_metadata` false).
    pub fn parse_for(bytes: &[u8], snp_metadata: bool) -> Result<Ovmf, LaunchError> {
        let size = bytes.len();
        let entries = footer_entries(bytes)?;
        let find = |guid: &str| entries.iter().find(|(g, _, _)| *g == guid_le(guid));
        let u32_of = |data: &[u8], at: usize, what: &'static str, offset: usize| {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                .ok_or_else(|| firmware_error(what, offset, "entry too short"))
        };
        let metadata = find(SEV_METADATA_GUID);
        if metadata.is_none() && !snp_metadata {
            return Ok(Ovmf {
                size,
                sections: Vec::new(),
                ap_reset_eip: match find(SEV_ES_RESET_BLOCK_GUID) {
                    Some((_, data, at)) => Some(u32_of(data, 0, "SEV-ES reset block", *at)?),
                    None => None,
                },
                hash_table: match find(SEV_HASH_TABLE_GUID) {
                    Some((_, data, at)) => Some((
                        u32_of(data, 0, "SEV hash table entry", *at)?,
                        u32_of(data, 4, "SEV hash table entry", *at)?,
                    )),
                    None => None,
                },
            });
        }
        let (_, metadata_entry, metadata_entry_at) = metadata.ok_or_else(|| {
            firmware_error(
                "SEV metadata",
                size - 48,
                "the footer table has no SEV metadata entry: this firmware cannot launch an SNP guest",
            )
        })?;
        let from_end =
            u32_of(metadata_entry, 0, "SEV metadata entry", *metadata_entry_at)? as usize;
        let at = size
            .checked_sub(from_end)
            .filter(|&a| a + 16 <= size)
            .ok_or_else(|| {
                firmware_error(
                    "SEV metadata",
                    *metadata_entry_at,
                    format!("offset {from_end:#x} from the end is outside the image"),
                )
            })?;
        let count = metadata_header(bytes, at, b"ASEV", 12, "SEV metadata")?;
        let mut sections = Vec::with_capacity(count);
        for i in 0..count {
            let s = at + 16 + 12 * i;
            let word = |k: usize| {
                u32::from_le_bytes(bytes[s + 4 * k..s + 4 * k + 4].try_into().expect("4"))
            };
            let section = MetadataSection {
                gpa: word(0) as u64,
                size: word(1) as u64,
                kind: word(2),
            };
            if ![SEC_MEM, SECRETS, CPUID, SVSM_CAA, KERNEL_HASHES].contains(&section.kind) {
                return Err(firmware_error(
                    "SEV metadata section",
                    s + 8,
                    format!("type {:#x} is not one of 1, 2, 3, 4, 0x10", section.kind),
                ));
            }
            sections.push(section);
        }
        let ap_reset_eip = match find(SEV_ES_RESET_BLOCK_GUID) {
            Some((_, data, at)) => Some(u32_of(data, 0, "SEV-ES reset block", *at)?),
            None => None,
        };
        let hash_table = match find(SEV_HASH_TABLE_GUID) {
            Some((_, data, at)) => Some((
                u32_of(data, 0, "SEV hash table entry", *at)?,
                u32_of(data, 4, "SEV hash table entry", *at)?,
            )),
            None => None,
        };
        Ok(Ovmf {
            size,
            sections,
            ap_reset_eip,
            hash_table,
        })
    }
}

/// A footer GUID table entry: its GUID, its data, and where it starts in the image.
pub(crate) type FooterEntry = ([u8; 16], Vec<u8>, usize);

/// The footer GUID table's entries, checked.
pub(crate) fn footer_entries(bytes: &[u8]) -> Result<Vec<FooterEntry>, LaunchError> {
    let size = bytes.len();
    if size < 64 || size % PAGE != 0 || size as u64 > FOUR_GIB {
        return Err(firmware_error(
            "image",
            0,
            format!("{size} bytes: expected a whole number of 4 KiB pages, at most 4 GiB"),
        ));
    }
    let footer_at = size - 48;
    if bytes[footer_at..footer_at + 16] != guid_le(FOOTER_GUID) {
        return Err(firmware_error(
            "footer GUID table",
            footer_at,
            "no table GUID 16 bytes before the last 32 (not an OVMF image)",
        ));
    }
    let table_len = u16::from_le_bytes([bytes[footer_at - 2], bytes[footer_at - 1]]) as usize;
    let table_start = (size - 32)
        .checked_sub(table_len)
        .filter(|_| table_len >= 18)
        .ok_or_else(|| {
            firmware_error(
                "footer GUID table",
                footer_at - 2,
                format!("length {table_len} does not fit the image"),
            )
        })?;
    let mut entries = Vec::new();
    // Entries are `data | u16 size | GUID`, walked back from the footer's own entry.
    let mut end = footer_at - 2;
    while end > table_start {
        if end < table_start + 18 {
            return Err(firmware_error(
                "footer GUID table entry",
                end,
                "an entry's size and GUID run past the table's start",
            ));
        }
        let guid: [u8; 16] = bytes[end - 16..end].try_into().expect("16 bytes");
        let entry_len = u16::from_le_bytes([bytes[end - 18], bytes[end - 17]]) as usize;
        if entry_len < 18 || end < table_start + entry_len {
            return Err(firmware_error(
                "footer GUID table entry",
                end - 18,
                format!("size {entry_len} is not between 18 and the bytes left in the table"),
            ));
        }
        let data = &bytes[end - entry_len..end - 18];
        entries.push((guid, data.to_vec(), end - entry_len));
        end -= entry_len;
    }
    if end != table_start {
        return Err(firmware_error(
            "footer GUID table",
            end,
            "the entries do not end exactly at the table's start",
        ));
    }
    Ok(entries)
}

/// A firmware metadata header, `signature | u32 length | u32 version = 1 | u32 count`, at
/// `at`, followed by `count` entries of `entry_len` bytes (the SEV and the TDVF metadata share
/// the shape); returns `count` once the signature, the version and the bounds are checked.
pub(crate) fn metadata_header(
    bytes: &[u8],
    at: usize,
    signature: &[u8; 4],
    entry_len: usize,
    what: &'static str,
) -> Result<usize, LaunchError> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    if bytes.get(at..at + 4) != Some(&signature[..]) {
        return Err(firmware_error(
            what,
            at,
            format!("no \"{}\" signature", String::from_utf8_lossy(signature)),
        ));
    }
    let (Some(length), Some(version), Some(count)) = (word(at + 4), word(at + 8), word(at + 12))
    else {
        return Err(firmware_error(what, at, "the header runs past the image"));
    };
    if version != 1 {
        return Err(firmware_error(
            what,
            at + 8,
            format!("version {version}, expected 1"),
        ));
    }
    let (length, count) = (length as usize, count as usize);
    count
        .checked_mul(entry_len)
        .and_then(|n| n.checked_add(16))
        .filter(|&n| n == length && at + n <= bytes.len())
        .ok_or_else(|| {
            firmware_error(
                what,
                at + 4,
                format!(
                    "length {length} for {count} sections (16 + {entry_len} each) does not fit"
                ),
            )
        })?;
    Ok(count)
}

/// Who launches the guest: the VMSA and page details differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    Qemu,
    Ec2,
    Gce,
}

impl Vmm {
    pub fn from_name(name: &str) -> Option<Vmm> {
        match name {
            "QEMU" | "qemu" => Some(Vmm::Qemu),
            "ec2" => Some(Vmm::Ec2),
            "gce" => Some(Vmm::Gce),
            _ => None,
        }
    }
}

/// The CPUID signature of a QEMU vCPU model (`-cpu`).
pub fn vcpu_signature(model: &str) -> Option<u32> {
    Some(match model {
        "EPYC" | "EPYC-v1" | "EPYC-v2" | "EPYC-v3" | "EPYC-v4" => 0x0080_0f12,
        "EPYC-Rome" | "EPYC-Rome-v1" | "EPYC-Rome-v2" | "EPYC-Rome-v3" | "EPYC-Rome-v4" => {
            0x0083_0f10
        }
        "EPYC-Milan" | "EPYC-Milan-v1" | "EPYC-Milan-v2" => 0x00a0_0f11,
        "EPYC-Genoa" | "EPYC-Genoa-v1" => 0x00a1_0f10,
        "EPYC-Turin" | "EPYC-Turin-v1" => 0x00b0_0f00,
        _ => return None,
    })
}

/// Everything the digest depends on.
#[derive(Debug, Clone)]
pub struct LaunchInputs<'a> {
    pub firmware: &'a [u8],
    /// The digest after the firmware's pages, when precomputed (`--snp-ovmf-hash`): the
    /// firmware is then read for its metadata only.
    pub firmware_digest: Option<[u8; 48]>,
    pub vcpus: u32,
    pub vcpu_signature: u32,
    pub vmm: Vmm,
    /// The VMSA's SEV_FEATURES, chosen by the host (typically 0x1 or 0x21).
    pub guest_features: u64,
    /// SHA-256 of the kernel and of the initrd (measured direct boot).
    pub kernel: Option<[u8; 32]>,
    pub initrd: Option<[u8; 32]>,
    pub append: Option<&'a str>,
}

/// The launch digest after the firmware's pages only (a seed for later launches).
pub fn firmware_digest(firmware: &[u8]) -> Result<[u8; 48], LaunchError> {
    Ovmf::parse(firmware)?;
    let mut gctx = Gctx { digest: [0; 48] };
    gctx.normal_pages(FOUR_GIB - firmware.len() as u64, firmware);
    Ok(gctx.digest)
}

/// The kernel-hashes table QEMU writes for measured direct boot (176 bytes), from the
/// SHA-256 of the kernel and of the initrd (none: the empty string's).
pub fn kernel_hashes_table(
    kernel: &[u8; 32],
    initrd: Option<&[u8; 32]>,
    append: Option<&str>,
) -> Vec<u8> {
    let mut cmdline = append.unwrap_or("").as_bytes().to_vec();
    cmdline.push(0);
    let mut table = Vec::with_capacity(176);
    table.extend(guid_le(HASH_TABLE_HEADER_GUID));
    table.extend(168u16.to_le_bytes());
    let no_initrd: [u8; 32] = Sha256::digest([]).into();
    let cmdline: [u8; 32] = Sha256::digest(&cmdline).into();
    for (guid, digest) in [
        (HASH_CMDLINE_GUID, &cmdline),
        (HASH_INITRD_GUID, initrd.unwrap_or(&no_initrd)),
        (HASH_KERNEL_GUID, kernel),
    ] {
        table.extend(guid_le(guid));
        table.extend(50u16.to_le_bytes());
        table.extend(digest);
    }
    table.resize(176, 0);
    table
}

/// One vCPU's initial state (AMD APM table B-4, with QEMU's or the cloud VMMs' values).
pub fn vmsa(eip: u32, bsp: bool, vcpu_signature: u32, vmm: Vmm, guest_features: u64) -> Vec<u8> {
    let mut page = vec![0u8; PAGE];
    let segment = |page: &mut [u8], at: usize, selector: u16, attrib: u16, base: u64| {
        page[at..at + 2].copy_from_slice(&selector.to_le_bytes());
        page[at + 2..at + 4].copy_from_slice(&attrib.to_le_bytes());
        page[at + 4..at + 8].copy_from_slice(&0xffffu32.to_le_bytes());
        page[at + 8..at + 16].copy_from_slice(&base.to_le_bytes());
    };
    let ec2 = vmm == Vmm::Ec2;
    for at in [0x00, 0x30, 0x40, 0x50] {
        segment(&mut page, at, 0, 0x93, 0);
    }
    let cs_attrib = if ec2 && bsp { 0x9a } else { 0x9b };
    segment(
        &mut page,
        0x10,
        0xf000,
        cs_attrib,
        (eip & 0xffff_0000) as u64,
    );
    segment(&mut page, 0x20, 0, if ec2 { 0x92 } else { 0x93 }, 0);
    segment(&mut page, 0x60, 0, 0, 0);
    segment(&mut page, 0x70, 0, 0x82, 0);
    segment(&mut page, 0x80, 0, 0, 0);
    segment(&mut page, 0x90, 0, if ec2 { 0x83 } else { 0x8b }, 0);
    let put = |page: &mut [u8], at: usize, value: u64| {
        page[at..at + 8].copy_from_slice(&value.to_le_bytes());
    };
    put(&mut page, 0xd0, 0x1000);
    put(&mut page, 0x148, 0x40);
    put(&mut page, 0x158, 0x10);
    put(&mut page, 0x160, 0x400);
    put(&mut page, 0x168, 0xffff_0ff0);
    put(&mut page, 0x170, 0x2);
    put(&mut page, 0x178, (eip & 0xffff) as u64);
    put(
        &mut page,
        0x268,
        if vmm == Vmm::Gce {
            0x0007_0106
        } else {
            0x0007_0406_0007_0406
        },
    );
    put(
        &mut page,
        0x310,
        if vmm == Vmm::Qemu {
            vcpu_signature as u64
        } else {
            0x600
        },
    );
    put(&mut page, 0x3b0, guest_features);
    put(&mut page, 0x3e8, 0x1);
    if vmm == Vmm::Qemu {
        page[0x408..0x40c].copy_from_slice(&0x1f80u32.to_le_bytes());
        page[0x410..0x412].copy_from_slice(&0x37fu16.to_le_bytes());
    }
    page
}

/// The SEV-ES launch digest (SHA-256): the firmware, the kernel-hashes table when a kernel is
/// measured, and each vCPU's VMSA (guest features 0: SEV-ES has none).
pub fn seves_launch_digest(inputs: &LaunchInputs) -> Result<[u8; 32], LaunchError> {
    let ovmf = Ovmf::parse_for(inputs.firmware, false)?;
    if inputs.vcpus == 0 || inputs.vcpus > 512 {
        return Err(LaunchError::Input(format!(
            "{} vCPUs: expected 1 to 512",
            inputs.vcpus
        )));
    }
    let mut hash = Sha256::new();
    hash.update(inputs.firmware);
    if let Some(kernel) = &inputs.kernel {
        if ovmf.hash_table.is_none_or(|(gpa, _)| gpa == 0) {
            return Err(LaunchError::NoKernelHashes);
        }
        hash.update(kernel_hashes_table(
            kernel,
            inputs.initrd.as_ref(),
            inputs.append,
        ));
    }
    let ap_eip = ovmf.ap_reset_eip.unwrap_or(0);
    if inputs.vcpus > 1 && ap_eip == 0 {
        return Err(firmware_error(
            "SEV-ES reset block",
            0,
            "more than one vCPU, but the firmware names no AP reset address",
        ));
    }
    for cpu in 0..inputs.vcpus {
        let bsp = cpu == 0;
        hash.update(vmsa(
            if bsp { BSP_EIP } else { ap_eip },
            bsp,
            inputs.vcpu_signature,
            inputs.vmm,
            0,
        ));
    }
    Ok(hash.finalize().into())
}

/// The SEV-SNP launch digest for these inputs.
pub fn launch_digest(inputs: &LaunchInputs) -> Result<[u8; 48], LaunchError> {
    let ovmf = Ovmf::parse(inputs.firmware)?;
    if inputs.vcpus == 0 || inputs.vcpus > 512 {
        return Err(LaunchError::Input(format!(
            "{} vCPUs: expected 1 to 512",
            inputs.vcpus
        )));
    }
    if inputs.kernel.is_none() && (inputs.initrd.is_some() || inputs.append.is_some()) {
        return Err(LaunchError::Input(
            "an initrd or a command line without a kernel: nothing would measure them".into(),
        ));
    }
    let has_hashes = ovmf.sections.iter().any(|s| s.kind == KERNEL_HASHES);
    if inputs.kernel.is_some() && !has_hashes {
        return Err(LaunchError::NoKernelHashes);
    }
    let mut gctx = Gctx {
        digest: inputs.firmware_digest.unwrap_or([0; 48]),
    };
    if inputs.firmware_digest.is_none() {
        gctx.normal_pages(FOUR_GIB - ovmf.size as u64, inputs.firmware);
    }
    let sec_mem_type = if inputs.vmm == Vmm::Gce {
        PageType::Unmeasured
    } else {
        PageType::Zero
    };
    let mut deferred_cpuid = Vec::new();
    for section in &ovmf.sections {
        match section.kind {
            SEC_MEM => gctx.empty_pages(sec_mem_type, section.gpa, section.size),
            SECRETS => gctx.update(PageType::Secrets, section.gpa, &[0; 48]),
            CPUID if inputs.vmm == Vmm::Ec2 => deferred_cpuid.push(section.gpa),
            CPUID => gctx.update(PageType::Cpuid, section.gpa, &[0; 48]),
            SVSM_CAA => gctx.empty_pages(PageType::Zero, section.gpa, section.size),
            KERNEL_HASHES => {
                match inputs.kernel {
                    Some(kernel) => {
                        let (table_gpa, _) = ovmf
                            .hash_table
                            .filter(|(_, size)| *size >= 176)
                            .ok_or(LaunchError::NoKernelHashes)?;
                        let offset = (table_gpa & 0xfff) as usize;
                        if offset + 176 > PAGE {
                            return Err(firmware_error(
                            "SEV hash table",
                            0,
                            format!("address {table_gpa:#x} leaves no room for the table in its page"),
                        ));
                        }
                        let mut page = vec![0u8; PAGE];
                        page[offset..offset + 176].copy_from_slice(&kernel_hashes_table(
                            &kernel,
                            inputs.initrd.as_ref(),
                            inputs.append,
                        ));
                        gctx.normal_pages(section.gpa, &page);
                    }
                    None => gctx.empty_pages(PageType::Zero, section.gpa, section.size),
                }
            }
            _ => unreachable!("section types are checked by the parser"),
        }
    }
    for gpa in deferred_cpuid {
        gctx.update(PageType::Cpuid, gpa, &[0; 48]);
    }
    let ap_eip = match (inputs.vcpus > 1, ovmf.ap_reset_eip) {
        (true, None) => {
            return Err(firmware_error(
                "SEV-ES reset block",
                0,
                "more than one vCPU, but the firmware names no AP reset address",
            ))
        }
        (_, eip) => eip.unwrap_or(0),
    };
    for cpu in 0..inputs.vcpus {
        let bsp = cpu == 0;
        let page = vmsa(
            if bsp { BSP_EIP } else { ap_eip },
            bsp,
            inputs.vcpu_signature,
            inputs.vmm,
            inputs.guest_features,
        );
        let contents: [u8; 48] = Sha384::digest(&page).into();
        gctx.update(PageType::Vmsa, VMSA_GPA, &contents);
    }
    Ok(gctx.digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn amdsev() -> Vec<u8> {
        crate::testdata::read("ovmf/ovmf_AmdSev_suffix.bin")
    }

    fn synthetic_kernel() -> Vec<u8> {
        (0..=255u8).cycle().take(256 * 64).collect()
    }

    fn synthetic_initrd() -> Vec<u8> {
        b"initrd-".repeat(1000)
    }

    const SYNTHETIC_APPEND: &str = "console=ttyS0 root=/dev/vda ro";

    fn inputs<'a>(firmware: &'a [u8], vcpus: u32, sig: u32, vmm: Vmm, gf: u64) -> LaunchInputs<'a> {
        LaunchInputs {
            firmware,
            firmware_digest: None,
            vcpus,
            vcpu_signature: sig,
            vmm,
            guest_features: gf,
            kernel: None,
            initrd: None,
            append: None,
        }
    }

    fn sha256(bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(bytes).into()
    }

    fn hex(d: [u8; 48]) -> String {
        cvm_formats::hex(&d)
    }

    #[test]
    fn the_amdsev_fixture_parses_as_documented() {
        let ovmf = Ovmf::parse(&amdsev()).unwrap();
        assert_eq!(ovmf.ap_reset_eip, Some(0x80b004));
        assert_eq!(ovmf.hash_table, Some((0x810c00, 0x400)));
        assert_eq!(ovmf.sections.len(), 7);
        assert_eq!(
            ovmf.sections[5],
            MetadataSection {
                gpa: 0x810000,
                size: 0x1000,
                kind: KERNEL_HASHES
            }
        );
    }

    #[test]
    fn the_firmware_seed_vector() {
        assert_eq!(
            hex(firmware_digest(&amdsev()).unwrap()),
            "086e2e9149ebf45abdc3445fba5b2da8270bdbb04094d7a2c37faaa4b24af3aa16aff8c374c2a55c467a50da6d466b74"
        );
    }

    #[test]
    fn the_kernel_hashes_table_vector() {
        let table = kernel_hashes_table(
            &sha256(&synthetic_kernel()),
            Some(&sha256(&synthetic_initrd())),
            Some(SYNTHETIC_APPEND),
        );
        assert_eq!(cvm_formats::hex(&table), "06d63894224fc94cb479a793d411fd21a800d82dd09720bd944caa78e7714d36ab2a320004490ebd411de8f53ce562b8b071e557bd6efda474686eb8454d495bf1de687c31f7ba442f3ad74b9af141e29169781d3200d8c6d3d157f9b6dd5421e11d7e72543ec9d60d85ff0ebf5808e73354ff2130073794e74dd2ab7f42b835d5b172d2045b3200a1f259d4365ed4320c377ce26f5c8c56dcdc9a89e7b641bfd8eabfbbeac866540000000000000000");
    }

    #[test]
    fn published_vectors_with_an_empty_kernel() {
        let fw = amdsev();
        let empty = sha256(&[]);
        for (gf, expected) in [
            (0x21, "803f691094946e42068aaa3a8f9e26a5c89f36f7b73ecfb28c653360fe4b3aba7e534442e7e1e17895dfe778d0228977"),
            (0x1, "6d287813eb5222d770f75005c664e34c204f385ce832cc2ce7d0d6f354454362f390ef83a92046c042e706363b4b08fa"),
        ] {
            let mut i = inputs(&fw, 1, vcpu_signature("EPYC-v4").unwrap(), Vmm::Qemu, gf);
            i.kernel = Some(empty);
            i.initrd = Some(empty);
            i.append = Some("console=ttyS0 loglevel=7");
            assert_eq!(hex(launch_digest(&i).unwrap()), expected, "gf {gf:#x}");
        }
    }

    #[test]
    fn abbreviated_published_vectors() {
        let fw = amdsev();
        let x64 = crate::testdata::read("ovmf/ovmf_OvmfX64_suffix.bin");
        let v4 = vcpu_signature("EPYC-v4").unwrap();
        let empty = sha256(&[]);
        let with_kernel = |mut i: LaunchInputs<'static>, append: &'static str| {
            i.kernel = Some(empty);
            i.append = Some(append);
            i
        };
        let fw: &'static [u8] = Box::leak(fw.into_boxed_slice());
        let x64: &'static [u8] = Box::leak(x64.into_boxed_slice());
        let cases: Vec<(LaunchInputs<'static>, &str, &str)> = vec![
            (inputs(fw, 1, v4, Vmm::Qemu, 0x21), "e1e1ca02", "0e2b"),
            (inputs(fw, 1, v4, Vmm::Qemu, 0x1), "19358ba9", "632d"),
            (
                with_kernel(inputs(fw, 4, v4, Vmm::Qemu, 0x21), ""),
                "4953b1fb",
                "1942",
            ),
            (
                with_kernel(inputs(fw, 4, v4, Vmm::Qemu, 0x1), ""),
                "5061fffb",
                "6ad5",
            ),
            (
                with_kernel(inputs(fw, 1, v4, Vmm::Ec2, 0x21), ""),
                "0ce9ccc0",
                "67fb",
            ),
            (
                with_kernel(inputs(fw, 1, v4, Vmm::Ec2, 0x1), ""),
                "0883bd0e",
                "5056",
            ),
            (
                with_kernel(inputs(fw, 1, v4, Vmm::Gce, 0x1), ""),
                "5da7106c",
                "722e",
            ),
            (
                with_kernel(inputs(fw, 4, v4, Vmm::Gce, 0x1), ""),
                "5c5debf1",
                "e29d",
            ),
            (inputs(x64, 1, v4, Vmm::Qemu, 0x21), "28797ae0", "c385"),
            (inputs(x64, 1, v4, Vmm::Qemu, 0x1), "da0296de", "4005"),
        ];
        for (i, first, last) in cases {
            let got = hex(launch_digest(&i).unwrap());
            assert!(
                got.starts_with(first) && got.ends_with(last),
                "{i:?}: {got}, expected {first}…{last}"
            );
        }
    }

    #[test]
    fn vectors_with_the_synthetic_kernel_initrd_and_command_line() {
        let fw = amdsev();
        let (kernel, initrd) = (sha256(&synthetic_kernel()), sha256(&synthetic_initrd()));
        for (vcpus, model, vmm, gf, expected) in [
            (1, "EPYC-v4", Vmm::Qemu, 0x1, "0a8535c65df9c5ab74b7a1ea713c591432dd3c62429f6af74dd1f5559ebc23f89cda249601459da998300fc548c664fb"),
            (1, "EPYC-v4", Vmm::Qemu, 0x21, "2590617244d0a33857c52ac8d1a0f3d66493b679c1e6de9c0156ca32af8ff269503b4ecd1d67ed3a84d84d85f0f998b2"),
            (4, "EPYC-Milan", Vmm::Qemu, 0x1, "92c4864d0c572547c881fedf7318a9460c24a0bc0a0b79c5143b3fdab6a0831ca355dd49d1d355a92a2b40f45043fe37"),
            (2, "EPYC-Genoa", Vmm::Qemu, 0x1, "822106753e1c0d0827a8d72d71d4d5efe10370edd94581a9dbfaf17ecf9305d1cb1a2f2fc83b79c5c741cdb89586eff0"),
            (2, "EPYC-v4", Vmm::Ec2, 0x1, "3fb8438bb661f663021de9210151959ef28a5b3d7a537e3023a24f35cf1ff01e0cb4afc5486856e67d11ea173e6ea529"),
            (2, "EPYC-v4", Vmm::Gce, 0x1, "415c41d290d484047319b7f90a2748c5fb90e61d5d43623a58485b898954cd7682b40954bc989a74c11669e224c95c3d"),
        ] {
            let mut i = inputs(&fw, vcpus, vcpu_signature(model).unwrap(), vmm, gf);
            i.kernel = Some(kernel);
            i.initrd = Some(initrd);
            i.append = Some(SYNTHETIC_APPEND);
            assert_eq!(hex(launch_digest(&i).unwrap()), expected, "{vcpus} {model} {vmm:?} {gf:#x}");
            // Seeded from the firmware digest: the same result.
            i.firmware_digest = Some(firmware_digest(&fw).unwrap());
            assert_eq!(hex(launch_digest(&i).unwrap()), expected);
        }
    }

    #[test]
    fn debian_bookworm_ovmf() {
        let Ok(fw) = std::fs::read("/usr/share/ovmf/OVMF.fd") else {
            eprintln!("no /usr/share/ovmf/OVMF.fd: skipped");
            return;
        };
        // The vector is for ovmf 2022.11-6+deb12u2; another build gives another digest.
        if cvm_formats::hex(&sha2::Sha256::digest(&fw)[..8]) != "7b456907dd0786d4" {
            eprintln!("/usr/share/ovmf/OVMF.fd is not the 2022.11-6+deb12u2 build: skipped");
            return;
        }
        let i = inputs(
            &fw,
            2,
            vcpu_signature("EPYC-Milan").unwrap(),
            Vmm::Qemu,
            0x1,
        );
        assert_eq!(
            hex(launch_digest(&i).unwrap()),
            "a175292a4a09fcfb760c5bd80c93ed667dbaafce6247d0f21fc06638658b3ebf2804d3019e2abed05cb6a9efe0a7464e"
        );
        let mut with_kernel = i.clone();
        with_kernel.kernel = Some(sha256(&[]));
        assert_eq!(
            launch_digest(&with_kernel),
            Err(LaunchError::NoKernelHashes)
        );
    }

    #[test]
    fn firmware_without_what_is_needed_is_refused_by_name() {
        let err = |fw: &[u8]| Ovmf::parse(fw).unwrap_err().to_string();
        assert!(err(&[0u8; 100]).contains("whole number of 4 KiB pages"));
        assert!(err(&[0u8; 4096]).contains("not an OVMF image"));
        let mut no_metadata = amdsev();
        // Turn the SEV metadata entry's GUID into another one.
        let at = no_metadata
            .windows(16)
            .rposition(|w| w == guid_le(SEV_METADATA_GUID))
            .unwrap();
        no_metadata[at] ^= 1;
        assert!(err(&no_metadata).contains("cannot launch an SNP guest"));
        let mut bad_signature = amdsev();
        let asev = bad_signature.windows(4).position(|w| w == b"ASEV").unwrap();
        bad_signature[asev] = b'X';
        assert!(err(&bad_signature).contains("no \"ASEV\" signature"));
    }

    #[test]
    fn the_seves_digest_is_sha256_over_firmware_hashes_and_vmsas() {
        let fw = amdsev();
        let i = inputs(&fw, 2, vcpu_signature("EPYC-v4").unwrap(), Vmm::Qemu, 0x1);
        let digest = seves_launch_digest(&i).unwrap();
        let mut expected = Sha256::new();
        expected.update(&fw);
        expected.update(vmsa(BSP_EIP, true, 0x00800f12, Vmm::Qemu, 0));
        expected.update(vmsa(0x80b004, false, 0x00800f12, Vmm::Qemu, 0));
        assert_eq!(digest, <[u8; 32]>::from(expected.finalize()));
        // A kernel needs the hash table; the OvmfX64 build has none.
        let x64 = crate::testdata::read("ovmf/ovmf_OvmfX64_suffix.bin");
        let mut k = inputs(&x64, 1, 0x00800f12, Vmm::Qemu, 0);
        k.kernel = Some(sha256(b"k"));
        assert_eq!(seves_launch_digest(&k), Err(LaunchError::NoKernelHashes));
    }

    proptest! {
        #[test]
        fn arbitrary_firmware_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            // Random bytes, and the real footer with random bytes spliced in before it.
            let mut page = vec![0u8; PAGE];
            let n = bytes.len().min(PAGE);
            page[..n].copy_from_slice(&bytes[..n]);
            let _ = Ovmf::parse(&page);
            let mut fw = amdsev();
            let start = PAGE - 48 - tail.len().min(PAGE - 48);
            fw[start..start + tail.len().min(PAGE - 48)].copy_from_slice(&tail[..tail.len().min(PAGE - 48)]);
            let i = inputs(&fw, 2, 0x00a00f11, Vmm::Qemu, 1);
            let _ = launch_digest(&i);
        }
    }
}
