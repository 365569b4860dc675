//! The one PE/COFF parser of cvm-measure: the UKI's sections for PCR 11 prediction and the
//! Authenticode digest firmware measures (TDX RTMR 1, a vTPM's PCR 4) both read an image
//! through [`PeImage::parse`].
//!
//! Hand-written rather than a crate (goblin, object): the image comes from whoever builds or
//! hands over the node's boot files, and every offset must be checked against the file with
//! an error that names the field; the general crates tolerate what firmware would measure
//! differently (an optional header too small for its data directories, a certificate table
//! among the sections) and do not compute Authenticode.

use sha2::Digest;

/// Size of the DOS header, which ends with `e_lfanew` at 0x3c.
const DOS_HEADER: usize = 0x40;
const E_LFANEW: usize = 0x3c;
const COFF_HEADER: usize = 20;
const SECTION_HEADER: usize = 40;
/// Bytes of the optional header up to and including NumberOfRvaAndSizes.
const PE32_FIXED: usize = 96;
const PE32_PLUS_FIXED: usize = 112;
/// Offsets inside the optional header (the same for PE32 and PE32+).
const SIZE_OF_HEADERS: usize = 60;
const CHECKSUM: usize = 64;
/// The certificate table is data directory 4 (IMAGE_DIRECTORY_ENTRY_SECURITY).
const CERTIFICATE_DIRECTORY: u32 = 4;

/// How far a section's VirtualSize may exceed its raw data (zero fill, as .bss is): real UKI
/// sections have a few pages at most; without a bound a 4 GiB VirtualSize in a hostile image
/// would be allocated (found by `make fuzz`).
pub const MAX_ZERO_FILL: u64 = 16 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeError {
    #[error("the DOS header with its e_lfanew needs {DOS_HEADER} bytes, the file has {len}")]
    DosHeaderTruncated { len: usize },
    #[error("no MZ signature at the start of the file: not a PE image")]
    NoMz,
    #[error("the PE header at offset {offset} is past the end of the file ({len} bytes)")]
    PeHeaderPastEnd { offset: u64, len: usize },
    #[error("no PE signature (PE\\0\\0) at offset {offset}")]
    NoPeSignature { offset: usize },
    #[error(
        "{what} at offset {offset} needs {needed} bytes, past the end of the file ({len} bytes)"
    )]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: u64,
        len: usize,
    },
    #[error("the optional header's magic at offset {offset} is {magic:#x}, expected 0x10b (PE32) or 0x20b (PE32+)")]
    BadMagic { offset: usize, magic: u16 },
    #[error("the optional header is {size} bytes (SizeOfOptionalHeader), {what} needs {needed}")]
    OptionalHeaderTooSmall {
        size: usize,
        what: &'static str,
        needed: u64,
    },
    #[error("SizeOfHeaders is {size}: it must cover the section table (ends at {table_end}) and lie within the file ({len} bytes)")]
    SizeOfHeaders {
        size: u32,
        table_end: usize,
        len: usize,
    },
    #[error("section {name}: its raw data ({size} bytes at offset {offset}) is past the end of the file ({len} bytes)")]
    SectionPastEnd {
        name: String,
        offset: u32,
        size: u32,
        len: usize,
    },
    #[error("the certificate table ({size} bytes at offset {address}) must follow the headers and sections (they end at {sections_end}) within the file ({len} bytes)")]
    CertificateTable {
        address: u32,
        size: u32,
        sections_end: usize,
        len: usize,
    },
    #[error(
        "section {name} would be {virtual_size} bytes in memory from {raw_size} in the file: more than {MAX_ZERO_FILL} bytes of zero fill"
    )]
    ZeroFill {
        name: String,
        virtual_size: u64,
        raw_size: u64,
    },
}

/// PE32 or PE32+, by the optional header's magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Magic {
    Pe32,
    Pe32Plus,
}

/// One entry of the section table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The name up to its first NUL, lossily decoded (host text: escape before printing).
    pub name: String,
    pub virtual_size: u32,
    pub virtual_address: u32,
    pub raw_size: u32,
    pub raw_offset: u32,
}

/// A data directory entry (RVA and size; for the certificate table the RVA is a file offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Directory {
    /// Where the entry itself lies in the file.
    pub entry_offset: usize,
    pub address: u32,
    pub size: u32,
}

/// A parsed PE image: every offset it holds has been checked against the file.
#[derive(Debug, Clone)]
pub struct PeImage<'a> {
    bytes: &'a [u8],
    /// Offset of the `PE\0\0` signature (e_lfanew).
    pub pe_offset: usize,
    pub machine: u16,
    pub magic: Magic,
    pub optional_header: usize,
    pub optional_header_size: usize,
    /// Offset of the CheckSum field, left out of the Authenticode digest.
    pub checksum_offset: usize,
    pub size_of_headers: usize,
    pub section_table: usize,
    pub sections: Vec<Section>,
    /// The data directories (NumberOfRvaAndSizes of them, all inside the optional header).
    pub directories: Vec<Directory>,
    /// The certificate table's directory entry, where the image has one (even empty).
    pub certificate_directory: Option<Directory>,
    /// Where the headers and the sections' raw data end.
    pub sections_end: usize,
}

fn field<'a>(
    bytes: &'a [u8],
    offset: usize,
    size: usize,
    what: &'static str,
) -> Result<&'a [u8], PeError> {
    offset
        .checked_add(size)
        .and_then(|end| bytes.get(offset..end))
        .ok_or(PeError::Truncated {
            what,
            offset,
            needed: size as u64,
            len: bytes.len(),
        })
}

fn u16_at(bytes: &[u8], offset: usize, what: &'static str) -> Result<u16, PeError> {
    let b = field(bytes, offset, 2, what)?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(bytes: &[u8], offset: usize, what: &'static str) -> Result<u32, PeError> {
    let b = field(bytes, offset, 4, what)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

impl<'a> PeImage<'a> {
    /// Parses and checks the headers, the section table, the data directories and the
    /// certificate table's place.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, PeError> {
        let len = bytes.len();
        if len < DOS_HEADER {
            return Err(PeError::DosHeaderTruncated { len });
        }
        if &bytes[..2] != b"MZ" {
            return Err(PeError::NoMz);
        }
        let lfanew = le32(&bytes[E_LFANEW..E_LFANEW + 4]);
        let pe_offset = lfanew as usize;
        // The signature and the COFF header must be in the file.
        if (lfanew as u64) + 4 + COFF_HEADER as u64 > len as u64 {
            return Err(PeError::PeHeaderPastEnd {
                offset: lfanew as u64,
                len,
            });
        }
        if &bytes[pe_offset..pe_offset + 4] != b"PE\0\0" {
            return Err(PeError::NoPeSignature { offset: pe_offset });
        }
        let coff = pe_offset + 4;
        let machine = u16_at(bytes, coff, "the COFF header's Machine")?;
        let count = u16_at(bytes, coff + 2, "the COFF header's NumberOfSections")? as usize;
        let optional_header_size =
            u16_at(bytes, coff + 16, "the COFF header's SizeOfOptionalHeader")? as usize;
        let optional_header = coff + COFF_HEADER;
        field(
            bytes,
            optional_header,
            optional_header_size,
            "the optional header",
        )?;
        if optional_header_size < 2 {
            return Err(PeError::OptionalHeaderTooSmall {
                size: optional_header_size,
                what: "its magic",
                needed: 2,
            });
        }
        let raw_magic = u16_at(bytes, optional_header, "the optional header's magic")?;
        let (magic, fixed) = match raw_magic {
            0x10b => (Magic::Pe32, PE32_FIXED),
            0x20b => (Magic::Pe32Plus, PE32_PLUS_FIXED),
            magic => {
                return Err(PeError::BadMagic {
                    offset: optional_header,
                    magic,
                })
            }
        };
        if optional_header_size < fixed {
            return Err(PeError::OptionalHeaderTooSmall {
                size: optional_header_size,
                what: "its fixed fields",
                needed: fixed as u64,
            });
        }
        let directory_count = u32_at(bytes, optional_header + fixed - 4, "NumberOfRvaAndSizes")?;
        let directories_needed = fixed as u64 + 8 * directory_count as u64;
        if directories_needed > optional_header_size as u64 {
            return Err(PeError::OptionalHeaderTooSmall {
                size: optional_header_size,
                what: "NumberOfRvaAndSizes's data directories",
                needed: directories_needed,
            });
        }
        let directories: Vec<Directory> = (0..directory_count as usize)
            .map(|i| {
                let entry_offset = optional_header + fixed + 8 * i;
                Directory {
                    entry_offset,
                    address: le32(&bytes[entry_offset..]),
                    size: le32(&bytes[entry_offset + 4..]),
                }
            })
            .collect();
        let section_table = optional_header + optional_header_size;
        let table_size = count * SECTION_HEADER;
        let table = field(bytes, section_table, table_size, "the section table")?;
        let table_end = section_table + table_size;
        let size_of_headers = u32_at(bytes, optional_header + SIZE_OF_HEADERS, "SizeOfHeaders")?;
        if (size_of_headers as usize) < table_end || size_of_headers as usize > len {
            return Err(PeError::SizeOfHeaders {
                size: size_of_headers,
                table_end,
                len,
            });
        }
        let mut sections = Vec::with_capacity(count);
        let mut sections_end = size_of_headers as usize;
        for header in table.chunks_exact(SECTION_HEADER) {
            let name_end = header[..8].iter().position(|&b| b == 0).unwrap_or(8);
            let section = Section {
                name: String::from_utf8_lossy(&header[..name_end]).into_owned(),
                virtual_size: le32(&header[8..]),
                virtual_address: le32(&header[12..]),
                raw_size: le32(&header[16..]),
                raw_offset: le32(&header[20..]),
            };
            if section.raw_size > 0 {
                let end = section.raw_offset as u64 + section.raw_size as u64;
                if end > len as u64 {
                    return Err(PeError::SectionPastEnd {
                        name: cvm_formats::text::escape(&section.name).into_owned(),
                        offset: section.raw_offset,
                        size: section.raw_size,
                        len,
                    });
                }
                sections_end = sections_end.max(end as usize);
            }
            sections.push(section);
        }
        let certificate_directory = directories.get(CERTIFICATE_DIRECTORY as usize).copied();
        if let Some(d) = certificate_directory.filter(|d| d.size > 0) {
            let end = d.address as u64 + d.size as u64;
            if (d.address as usize) < sections_end || end > len as u64 {
                return Err(PeError::CertificateTable {
                    address: d.address,
                    size: d.size,
                    sections_end,
                    len,
                });
            }
        }
        Ok(PeImage {
            bytes,
            pe_offset,
            machine,
            magic,
            optional_header,
            optional_header_size,
            checksum_offset: optional_header + CHECKSUM,
            size_of_headers: size_of_headers as usize,
            section_table,
            sections,
            directories,
            certificate_directory,
            sections_end,
        })
    }

    /// The file the image was parsed from.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The certificate table as `(file offset, size)`, where the image is signed.
    pub fn certificate_table(&self) -> Option<(usize, usize)> {
        self.certificate_directory
            .filter(|d| d.size > 0)
            .map(|d| (d.address as usize, d.size as usize))
    }

    /// A section's contents as loaded: VirtualSize bytes, the raw data zero-extended where
    /// VirtualSize exceeds it (at most [`MAX_ZERO_FILL`] bytes of fill).
    pub fn loaded(&self, section: &Section) -> Result<Vec<u8>, PeError> {
        let virtual_size = section.virtual_size as u64;
        let take = (section.raw_size as u64).min(virtual_size);
        if virtual_size - take > MAX_ZERO_FILL {
            return Err(PeError::ZeroFill {
                name: cvm_formats::text::escape(&section.name).into_owned(),
                virtual_size,
                raw_size: section.raw_size as u64,
            });
        }
        // In bounds: parse checked the whole raw data of every section with any.
        let start = section.raw_offset as usize;
        let mut contents = self.bytes[start..start + take as usize].to_vec();
        contents.resize(virtual_size as usize, 0);
        Ok(contents)
    }

    /// The Authenticode digest as edk2 measures it (EV_EFI_BOOT_SERVICES_APPLICATION): the
    /// headers without the checksum and the certificate-table entry, the sections by file
    /// offset, the data after them up to the certificate table, zero-padded to 8 bytes.
    pub fn authenticode<D: Digest>(&self) -> Vec<u8> {
        let pe = self.bytes;
        let headers_end = self.size_of_headers;
        let checksum = self.checksum_offset;
        let mut hash = D::new();
        hash.update(&pe[..checksum]);
        // parse placed the directories inside the optional header, before the section
        // table and so before SizeOfHeaders.
        match self.certificate_directory {
            Some(d) => {
                hash.update(&pe[checksum + 4..d.entry_offset]);
                hash.update(&pe[d.entry_offset + 8..headers_end]);
            }
            None => hash.update(&pe[checksum + 4..headers_end]),
        }
        let mut raw: Vec<(usize, usize)> = self
            .sections
            .iter()
            .filter(|s| s.raw_size > 0)
            .map(|s| (s.raw_offset as usize, s.raw_size as usize))
            .collect();
        raw.sort();
        for (start, size) in raw {
            hash.update(&pe[start..start + size]);
        }
        let hashed_to = self.sections_end;
        let end = self
            .certificate_table()
            .map_or(pe.len(), |(address, _)| address);
        if hashed_to < end {
            hash.update(&pe[hashed_to..end]);
        }
        let padding = (8 - end % 8) % 8;
        hash.update(&[0u8; 8][..padding]);
        hash.finalize().to_vec()
    }
}

/// The Authenticode digest of a PE image's bytes (see [`PeImage::authenticode`]).
pub fn authenticode<D: Digest>(bytes: &[u8]) -> Result<Vec<u8>, PeError> {
    Ok(PeImage::parse(bytes)?.authenticode::<D>())
}

/// A PE32+ image with 16 data directories and these `(name, contents, virtual size)`
/// sections, its data right after the headers (SizeOfHeaders is the end of the section
/// table); test images for the parser, predict and the CLI.
pub fn build_pe(sections: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let optional_size = PE32_PLUS_FIXED + 16 * 8;
    let mut image = vec![0u8; DOS_HEADER];
    image[0..2].copy_from_slice(b"MZ");
    image[E_LFANEW..E_LFANEW + 4].copy_from_slice(&(DOS_HEADER as u32).to_le_bytes());
    image.extend_from_slice(b"PE\0\0");
    let mut coff = [0u8; COFF_HEADER];
    coff[0..2].copy_from_slice(&0x8664u16.to_le_bytes());
    coff[2..4].copy_from_slice(&(sections.len() as u16).to_le_bytes());
    coff[16..18].copy_from_slice(&(optional_size as u16).to_le_bytes());
    image.extend_from_slice(&coff);
    let table_end = image.len() + optional_size + SECTION_HEADER * sections.len();
    let mut optional = vec![0u8; optional_size];
    optional[0..2].copy_from_slice(&0x20bu16.to_le_bytes());
    optional[SIZE_OF_HEADERS..SIZE_OF_HEADERS + 4]
        .copy_from_slice(&(table_end as u32).to_le_bytes());
    optional[PE32_PLUS_FIXED - 4..PE32_PLUS_FIXED].copy_from_slice(&16u32.to_le_bytes());
    image.extend_from_slice(&optional);
    let mut data_at = table_end as u32;
    let mut data = Vec::new();
    for (name, contents, virtual_size) in sections {
        let mut h = [0u8; SECTION_HEADER];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[8..12].copy_from_slice(&virtual_size.to_le_bytes());
        h[16..20].copy_from_slice(&(contents.len() as u32).to_le_bytes());
        h[20..24].copy_from_slice(&data_at.to_le_bytes());
        image.extend_from_slice(&h);
        data.extend_from_slice(contents);
        data_at += contents.len() as u32;
    }
    image.extend_from_slice(&data);
    image
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::Sha256;

    const PE: usize = DOS_HEADER;
    const OPTIONAL: usize = PE + 4 + COFF_HEADER;
    const TABLE: usize = OPTIONAL + PE32_PLUS_FIXED + 16 * 8;

    fn sample() -> Vec<u8> {
        build_pe(&[(".linux", b"HALLO\n", 6), (".initrd", b"foobar\n", 16)])
    }

    /// Sets the certificate-table directory entry.
    fn set_certificates(image: &mut [u8], address: u32, size: u32) {
        let entry = OPTIONAL + PE32_PLUS_FIXED + 8 * CERTIFICATE_DIRECTORY as usize;
        image[entry..entry + 4].copy_from_slice(&address.to_le_bytes());
        image[entry + 4..entry + 8].copy_from_slice(&size.to_le_bytes());
    }

    #[test]
    fn parses_headers_sections_and_directories() {
        let image = sample();
        let pe = PeImage::parse(&image).unwrap();
        assert_eq!(pe.pe_offset, PE);
        assert_eq!(pe.machine, 0x8664);
        assert_eq!(pe.magic, Magic::Pe32Plus);
        assert_eq!(pe.optional_header, OPTIONAL);
        assert_eq!(pe.checksum_offset, OPTIONAL + 64);
        assert_eq!(pe.section_table, TABLE);
        assert_eq!(pe.size_of_headers, TABLE + 80);
        assert_eq!(pe.directories.len(), 16);
        assert_eq!(pe.certificate_table(), None);
        assert_eq!(pe.sections_end, image.len());
        let names: Vec<_> = pe.sections.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, [".linux", ".initrd"]);
        assert_eq!(pe.loaded(&pe.sections[0]).unwrap(), b"HALLO\n");
        assert_eq!(
            pe.loaded(&pe.sections[1]).unwrap(),
            b"foobar\n\0\0\0\0\0\0\0\0\0"
        );
    }

    #[test]
    fn pe32_is_read_by_its_own_offsets() {
        let mut image = sample();
        image[OPTIONAL..OPTIONAL + 2].copy_from_slice(&0x10bu16.to_le_bytes());
        // PE32's NumberOfRvaAndSizes is 16 bytes earlier; 18 entries fit the same header.
        image[OPTIONAL + 92..OPTIONAL + 96].copy_from_slice(&18u32.to_le_bytes());
        let pe = PeImage::parse(&image).unwrap();
        assert_eq!(pe.magic, Magic::Pe32);
        assert_eq!(pe.directories.len(), 18);
        assert_eq!(pe.directories[0].entry_offset, OPTIONAL + 96);
    }

    #[test]
    fn every_truncation_is_refused_by_the_boundary_it_crosses() {
        let image = sample();
        let size_of_headers = TABLE + 80;
        for n in 0..image.len() {
            let e = PeImage::parse(&image[..n]).unwrap_err();
            let ok = match n {
                0..DOS_HEADER => e == PeError::DosHeaderTruncated { len: n },
                _ if n < PE + 24 => {
                    e == PeError::PeHeaderPastEnd {
                        offset: PE as u64,
                        len: n,
                    }
                }
                _ if n < TABLE => matches!(
                    e,
                    PeError::Truncated {
                        what: "the optional header",
                        ..
                    }
                ),
                _ if n < size_of_headers => {
                    matches!(
                        e,
                        PeError::Truncated {
                            what: "the section table",
                            ..
                        }
                    )
                }
                _ => matches!(e, PeError::SectionPastEnd { .. }),
            };
            assert!(ok, "{n} bytes: {e}");
        }
        assert_eq!(
            PeImage::parse(&image[..0x50]).unwrap_err().to_string(),
            "the PE header at offset 64 is past the end of the file (80 bytes)"
        );
    }

    #[test]
    fn bad_signatures_and_magic_are_refused() {
        let image = sample();
        let mut bad = image.clone();
        bad[0] = b'X';
        assert_eq!(PeImage::parse(&bad).unwrap_err(), PeError::NoMz);
        let mut bad = image.clone();
        bad[PE + 2] = 1;
        assert_eq!(
            PeImage::parse(&bad).unwrap_err(),
            PeError::NoPeSignature { offset: PE }
        );
        let mut bad = image.clone();
        bad[E_LFANEW..E_LFANEW + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            PeImage::parse(&bad).unwrap_err(),
            PeError::PeHeaderPastEnd {
                offset: 0xffff_ffff,
                ..
            }
        ));
        let mut bad = image.clone();
        bad[OPTIONAL] = 7;
        let e = PeImage::parse(&bad).unwrap_err();
        assert!(
            e.to_string()
                .contains("expected 0x10b (PE32) or 0x20b (PE32+)"),
            "{e}"
        );
    }

    #[test]
    fn headers_that_do_not_hold_together_are_refused() {
        let image = sample();
        // An optional header too small for its magic, its fixed fields, its directories.
        for (size, what) in [(0u16, "its magic"), (100, "its fixed fields")] {
            let mut bad = image.clone();
            bad[PE + 4 + 16..PE + 4 + 18].copy_from_slice(&size.to_le_bytes());
            let e = PeImage::parse(&bad).unwrap_err();
            assert!(
                matches!(e, PeError::OptionalHeaderTooSmall { what: w, .. } if w == what),
                "{e}"
            );
        }
        let mut bad = image.clone();
        bad[OPTIONAL + 108..OPTIONAL + 112].copy_from_slice(&17u32.to_le_bytes());
        assert!(matches!(
            PeImage::parse(&bad).unwrap_err(),
            PeError::OptionalHeaderTooSmall { needed: 248, .. }
        ));
        // SizeOfHeaders inside the section table, or past the end.
        for size in [TABLE as u32 + 79, image.len() as u32 + 1] {
            let mut bad = image.clone();
            bad[OPTIONAL + 60..OPTIONAL + 64].copy_from_slice(&size.to_le_bytes());
            assert!(matches!(
                PeImage::parse(&bad).unwrap_err(),
                PeError::SizeOfHeaders { .. }
            ));
        }
    }

    #[test]
    fn a_section_past_the_end_is_refused_by_name() {
        let mut bad = sample();
        let raw_offset = TABLE + 40 + 20;
        bad[raw_offset..raw_offset + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            PeImage::parse(&bad).unwrap_err().to_string(),
            format!(
                "section .initrd: its raw data (7 bytes at offset 4294967295) is past the end of the file ({} bytes)",
                bad.len()
            )
        );
        // The name is host text: escaped in the error.
        bad[TABLE + 40..TABLE + 41].copy_from_slice(b"\x1b");
        let e = PeImage::parse(&bad).unwrap_err().to_string();
        assert!(e.starts_with("section \\x1binitrd:"), "{e}");
    }

    #[test]
    fn the_certificate_table_must_follow_the_sections() {
        let mut image = sample();
        let end = image.len() as u32;
        image.extend_from_slice(&[0x55; 16]);
        set_certificates(&mut image, end, 16);
        let pe = PeImage::parse(&image).unwrap();
        assert_eq!(pe.certificate_table(), Some((end as usize, 16)));
        for (address, size) in [(end - 1, 16), (end, 17), (u32::MAX, u32::MAX)] {
            let mut bad = image.clone();
            set_certificates(&mut bad, address, size);
            let e = PeImage::parse(&bad).unwrap_err();
            assert!(matches!(e, PeError::CertificateTable { .. }), "{e}");
        }
    }

    #[test]
    fn authenticode_skips_checksum_certificate_entry_and_table() {
        let plain = sample();
        let digest = authenticode::<Sha256>(&plain).unwrap();
        let mut signed = plain.clone();
        let end = signed.len() as u32;
        signed.extend_from_slice(&[0x55; 8]);
        set_certificates(&mut signed, end, 8);
        signed[OPTIONAL + 64] ^= 0xff;
        assert_eq!(authenticode::<Sha256>(&signed).unwrap(), digest);
        let mut other = plain.clone();
        *other.last_mut().unwrap() ^= 1;
        assert_ne!(authenticode::<Sha256>(&other).unwrap(), digest);
    }

    #[test]
    fn zero_fill_is_bounded() {
        let image = build_pe(&[(".bss", b"", MAX_ZERO_FILL as u32 + 1)]);
        let pe = PeImage::parse(&image).unwrap();
        assert!(matches!(
            pe.loaded(&pe.sections[0]),
            Err(PeError::ZeroFill { .. })
        ));
    }

    proptest! {
        /// No input panics: arbitrary bytes, and a valid image with arbitrary bytes written
        /// over its headers or cut anywhere.
        #[test]
        fn no_input_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..1024),
            at in 0usize..TABLE + 80,
            patch in proptest::collection::vec(any::<u8>(), 1..8),
            cut in 0usize..512,
        ) {
            if let Ok(pe) = PeImage::parse(&bytes) {
                let _ = pe.authenticode::<Sha256>();
            }
            let mut image = sample();
            for (i, b) in patch.iter().enumerate() {
                if let Some(x) = image.get_mut(at + i) {
                    *x = *b;
                }
            }
            image.truncate(image.len().min(cut.max(at)));
            if let Ok(pe) = PeImage::parse(&image) {
                let _ = pe.authenticode::<Sha256>();
                for s in &pe.sections {
                    let _ = pe.loaded(s);
                }
            }
        }
    }
}
