//! Test builds only: a configfs-tsm SEV-SNP provider emulated in the init, so that SNP-format
//! evidence travels the whole path (tsm client, certificate table, Trustee evidence, broker
//! verification) on machines without SNP. Reports are signed by a test VCEK whose private key,
//! certificate and the launch digest to report lie in a directory of the test image
//! (`cvm.test-snp-emulator=<dir>`: `vcek.key` = 96 hex digits, `vcek.der`, `measurement` = 96
//! hex digits). A broker trusts them only when configured with the test chain.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cvm_formats::snp::{CertTableEntry, CertType};

use super::tsm::TsmFs;

/// Policy of the emulated launch: SMT allowed, bit 17 set, no debugging.
const POLICY: u64 = 0x30000;

pub struct EmulatedSnp {
    key: p384::ecdsa::SigningKey,
    vcek_der: Vec<u8>,
    measurement: [u8; 48],
    /// Report entries: their inblob and generation.
    entries: Mutex<HashMap<PathBuf, (Vec<u8>, u64)>>,
}

impl EmulatedSnp {
    pub fn load(dir: &Path) -> Result<EmulatedSnp, String> {
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()))
        };
        let hex = |name: &str| -> Result<[u8; 48], String> {
            let text = String::from_utf8_lossy(&read(name)?).trim().to_string();
            cvm_formats::verity::parse_hex(&text)
                .and_then(|v| v.try_into().ok())
                .ok_or(format!("{}/{name}: expected 96 hex digits", dir.display()))
        };
        let key = p384::ecdsa::SigningKey::from_slice(&hex("vcek.key")?)
            .map_err(|e| format!("{}/vcek.key: not a P-384 key: {e}", dir.display()))?;
        Ok(EmulatedSnp {
            key,
            vcek_der: read("vcek.der")?,
            measurement: hex("measurement")?,
            entries: Mutex::new(HashMap::new()),
        })
    }

    fn attribute(path: &Path) -> std::io::Result<(&Path, &str)> {
        let entry = path.parent().ok_or(std::io::ErrorKind::NotFound)?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or(std::io::ErrorKind::NotFound)?;
        Ok((entry, name))
    }
}

impl TsmFs for EmulatedSnp {
    fn mkdir(&self, path: &Path) -> std::io::Result<()> {
        let mut entries = self.entries.lock().unwrap();
        if entries.contains_key(path) {
            return Err(std::io::ErrorKind::AlreadyExists.into());
        }
        entries.insert(path.to_path_buf(), (Vec::new(), 0));
        Ok(())
    }
    fn rmdir(&self, path: &Path) -> std::io::Result<()> {
        self.entries
            .lock()
            .unwrap()
            .remove(path)
            .map(|_| ())
            .ok_or(std::io::ErrorKind::NotFound.into())
    }
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        let (entry, name) = Self::attribute(path)?;
        let entries = self.entries.lock().unwrap();
        let (inblob, generation) = entries.get(entry).ok_or(std::io::ErrorKind::NotFound)?;
        match name {
            "provider" => Ok(b"sev_guest\n".to_vec()),
            "generation" => Ok(format!("{generation}\n").into_bytes()),
            "outblob" => {
                let data: [u8; 64] = inblob
                    .as_slice()
                    .try_into()
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
                Ok(cvm_formats::snp::test_report(
                    &self.key,
                    &self.measurement,
                    &data,
                    POLICY,
                ))
            }
            "auxblob" => Ok(cvm_formats::snp::encode_cert_table(&[CertTableEntry {
                cert_type: CertType::VCEK,
                data: self.vcek_der.clone(),
            }])),
            _ => Err(std::io::ErrorKind::NotFound.into()),
        }
    }
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let (entry, name) = Self::attribute(path)?;
        let mut entries = self.entries.lock().unwrap();
        let (inblob, generation) = entries.get_mut(entry).ok_or(std::io::ErrorKind::NotFound)?;
        if name != "inblob" || bytes.len() > 64 {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        let mut padded = bytes.to_vec();
        padded.resize(64, 0);
        *inblob = padded;
        *generation += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cvm_measure::snp::VerifyReport;

    #[test]
    fn emulated_reports_verify_with_the_test_vcek() {
        let dir = tempfile::tempdir().unwrap();
        let key = p384::ecdsa::SigningKey::from_slice(&[7u8; 48]).unwrap();
        std::fs::write(dir.path().join("vcek.key"), cvm_formats::hex(&[7u8; 48])).unwrap();
        std::fs::write(dir.path().join("vcek.der"), b"not checked here").unwrap();
        std::fs::write(dir.path().join("measurement"), cvm_formats::hex(&[9u8; 48])).unwrap();
        let tsm = EmulatedSnp::load(dir.path()).unwrap();
        let binding = [5u8; 64];
        let report =
            super::super::tsm::report(&tsm, Path::new("/r"), &binding, Some("sev_guest")).unwrap();
        let parsed = cvm_formats::snp::Report::parse(&report.outblob).unwrap();
        parsed.verify_signature_with(key.verifying_key()).unwrap();
        assert_eq!(parsed.report_data(), &binding[..]);
        assert_eq!(parsed.measurement(), &[9u8; 48][..]);
        let certs = cvm_formats::snp::parse_cert_table(&report.auxblob.unwrap()).unwrap();
        assert_eq!(certs[0].data, b"not checked here");
        assert!(
            tsm.entries.lock().unwrap().is_empty(),
            "the entry was removed"
        );
    }
}
