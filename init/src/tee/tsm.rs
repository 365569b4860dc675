//! Hardware evidence through configfs-tsm (Linux ≥ 6.7): one report entry per request, the
//! report data written to `inblob`, the report (SNP) or quote (TDX) read from `outblob`, the
//! SNP certificate table from `auxblob`, and the generation check that proves no other writer
//! changed the request between our write and our read. The file system sits behind a small
//! trait so that the protocol is tested without the kernel.

use std::path::{Path, PathBuf};

/// Where the kernel offers report entries.
pub const REPORT_ROOT: &str = "/sys/kernel/config/tsm/report";
/// Attempts before a persistent concurrent writer is reported.
const ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum TsmError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another writer changed the report request {path} (generation {found}, expected {expected}) on every one of {ATTEMPTS} attempts"
    )]
    Concurrent {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("{path} holds {found:?}, expected a generation number")]
    Generation { path: PathBuf, found: String },
    #[error("the TSM provider is {found:?}, expected {expected}")]
    Provider {
        found: String,
        expected: &'static str,
    },
}

/// The file operations configfs-tsm needs.
pub trait TsmFs {
    fn mkdir(&self, path: &Path) -> std::io::Result<()>;
    fn rmdir(&self, path: &Path) -> std::io::Result<()>;
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>>;
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()>;
}

/// The real configfs.
pub struct Configfs;

impl TsmFs for Configfs {
    fn mkdir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::create_dir(path)
    }
    fn rmdir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_dir(path)
    }
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::write(path, bytes)
    }
}

/// What one request returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsmReport {
    /// `sev_guest`, `tdx_guest`, …
    pub provider: String,
    /// The SNP report or the TDX quote.
    pub outblob: Vec<u8>,
    /// The SNP certificate table, when the host provisioned one.
    pub auxblob: Option<Vec<u8>>,
}

/// Requests a report binding `report_data`; `expected_provider` (if given) must match.
pub fn report(
    fs: &dyn TsmFs,
    root: &Path,
    report_data: &[u8; 64],
    expected_provider: Option<&'static str>,
) -> Result<TsmReport, TsmError> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| TsmError::Io { what, path, source }
    };
    let mut last = None;
    for attempt in 0..ATTEMPTS {
        let entry = root.join(format!("cvm-init-{}-{attempt}", std::process::id()));
        fs.mkdir(&entry).map_err(io("create", &entry))?;
        let result = (|| {
            let provider_path = entry.join("provider");
            let provider = fs
                .read(&provider_path)
                .map_err(io("read", &provider_path))?;
            let provider = String::from_utf8_lossy(&provider).trim().to_string();
            if let Some(expected) = expected_provider {
                if provider != expected {
                    return Err(TsmError::Provider {
                        found: provider,
                        expected,
                    });
                }
            }
            let generation_path = entry.join("generation");
            let read_generation = || -> Result<u64, TsmError> {
                let text = fs
                    .read(&generation_path)
                    .map_err(io("read", &generation_path))?;
                let text = String::from_utf8_lossy(&text).trim().to_string();
                text.parse().map_err(|_| TsmError::Generation {
                    path: generation_path.clone(),
                    found: text,
                })
            };
            let before = read_generation()?;
            let inblob = entry.join("inblob");
            fs.write(&inblob, report_data)
                .map_err(io("write", &inblob))?;
            let outblob_path = entry.join("outblob");
            let outblob = fs.read(&outblob_path).map_err(io("read", &outblob_path))?;
            let auxblob = fs
                .read(&entry.join("auxblob"))
                .ok()
                .filter(|a| !a.is_empty());
            let after = read_generation()?;
            if after != before + 1 {
                return Ok(Err((after, before + 1)));
            }
            Ok(Ok(TsmReport {
                provider,
                outblob,
                auxblob,
            }))
        })();
        // The entry goes whatever happened; a failure to remove it is only worth a warning.
        if let Err(e) = fs.rmdir(&entry) {
            log::warn!("cannot remove {}: {e}", entry.display());
        }
        match result? {
            Ok(report) => return Ok(report),
            Err((found, expected)) => {
                log::warn!(
                    "report request {} was changed by another writer (generation {found}, expected {expected}); retrying",
                    entry.display()
                );
                last = Some((entry, found, expected));
            }
        }
    }
    let (path, found, expected) = last.expect("at least one attempt");
    Err(TsmError::Concurrent {
        path,
        found,
        expected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// configfs-tsm as the kernel behaves: entries appear with their attributes, each write
    /// bumps the generation, outblob answers the current inblob. `meddle` simulates another
    /// writer changing the entry right after ours, for that many requests.
    struct FakeTsm {
        provider: &'static str,
        entries: RefCell<BTreeMap<PathBuf, (u64, Vec<u8>)>>,
        meddle: RefCell<u32>,
        removed: RefCell<u32>,
    }

    impl FakeTsm {
        fn new(provider: &'static str, meddle: u32) -> Self {
            FakeTsm {
                provider,
                entries: RefCell::default(),
                meddle: RefCell::new(meddle),
                removed: RefCell::new(0),
            }
        }
    }

    impl TsmFs for FakeTsm {
        fn mkdir(&self, path: &Path) -> std::io::Result<()> {
            self.entries
                .borrow_mut()
                .insert(path.to_path_buf(), (0, Vec::new()));
            Ok(())
        }
        fn rmdir(&self, path: &Path) -> std::io::Result<()> {
            self.entries.borrow_mut().remove(path);
            *self.removed.borrow_mut() += 1;
            Ok(())
        }
        fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
            let entries = self.entries.borrow();
            let (generation, inblob) = entries
                .get(path.parent().unwrap())
                .ok_or(std::io::ErrorKind::NotFound)?;
            match path.file_name().unwrap().to_str().unwrap() {
                "provider" => Ok(format!("{}\n", self.provider).into_bytes()),
                "generation" => Ok(format!("{generation}\n").into_bytes()),
                "outblob" => Ok([b"report-over:".as_slice(), inblob].concat()),
                "auxblob" => Ok(b"certs".to_vec()),
                _ => Err(std::io::ErrorKind::NotFound.into()),
            }
        }
        fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
            let mut entries = self.entries.borrow_mut();
            let entry = entries.get_mut(path.parent().unwrap()).unwrap();
            entry.0 += 1;
            entry.1 = bytes.to_vec();
            let mut meddle = self.meddle.borrow_mut();
            if *meddle > 0 {
                *meddle -= 1;
                entry.0 += 1;
                entry.1 = b"someone else's".to_vec();
            }
            Ok(())
        }
    }

    #[test]
    fn a_report_binds_the_report_data() {
        let fs = FakeTsm::new("sev_guest", 0);
        let data = [7u8; 64];
        let report = report(&fs, Path::new("/tsm"), &data, Some("sev_guest")).unwrap();
        assert_eq!(report.provider, "sev_guest");
        assert_eq!(report.outblob, [b"report-over:".as_slice(), &data].concat());
        assert_eq!(report.auxblob.as_deref(), Some(b"certs".as_slice()));
        assert!(fs.entries.borrow().is_empty(), "the entry was not removed");
    }

    #[test]
    fn a_concurrent_writer_is_detected_and_retried() {
        let fs = FakeTsm::new("tdx_guest", 1);
        let data = [9u8; 64];
        let report = report(&fs, Path::new("/tsm"), &data, None).unwrap();
        assert_eq!(report.outblob, [b"report-over:".as_slice(), &data].concat());
        assert_eq!(*fs.removed.borrow(), 2);
        let fs = FakeTsm::new("tdx_guest", 10);
        let err = super::report(&fs, Path::new("/tsm"), &data, None).unwrap_err();
        assert!(err.to_string().contains("another writer changed"), "{err}");
    }

    #[test]
    fn another_provider_is_refused() {
        let fs = FakeTsm::new("tdx_guest", 0);
        let err = report(&fs, Path::new("/tsm"), &[0; 64], Some("sev_guest")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the TSM provider is \"tdx_guest\", expected sev_guest"
        );
        assert!(fs.entries.borrow().is_empty());
    }
}
