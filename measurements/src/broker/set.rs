//! The broker's references as a set read from files (`kbs-serve --reference`, repeatable, each
//! a file or a directory of `*.json` files): during a rolling upgrade the old and the new
//! image's references are loaded at once, and a node is judged against each one whole. The
//! set is re-read on SIGHUP and when a file changes; a reload that fails keeps the set loaded
//! before, so the broker never serves with a partial set or none.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sha2::Digest;

use super::{Broker, Reference};

/// One loaded reference: its name (the file's name), a short digest of the file's bytes (so
/// that an operator sees which version is loaded) and its values.
#[derive(Debug, Clone)]
pub struct Named {
    pub name: String,
    /// The first 12 hex digits of the sha256 of the file's bytes.
    pub digest: String,
    pub reference: Reference,
}

impl Named {
    /// A reference that came from no file (a library user's).
    pub fn unnamed(reference: Reference) -> Named {
        Named {
            name: "reference".into(),
            digest: "-".into(),
            reference,
        }
    }
}

/// What every reference gets from the broker's own flags rather than from its file: the same
/// EK CAs, attestation keys, SNP chains and TDX roots for all.
#[derive(Debug, Clone, Default)]
pub struct Shared {
    pub ek_cas: Vec<Vec<u8>>,
    pub attestation_keys: Vec<(Vec<u8>, Vec<u8>)>,
    pub snp_chains: Vec<crate::snp::TrustedChain>,
    pub tdx_roots: Vec<Vec<u8>>,
}

impl Shared {
    fn apply(&self, reference: &mut Reference) {
        reference.ek_cas.extend(self.ek_cas.iter().cloned());
        reference
            .attestation_keys
            .extend(self.attestation_keys.iter().cloned());
        reference.snp_chains.extend(self.snp_chains.iter().cloned());
        reference
            .tdx_trust
            .extra_roots
            .extend(self.tdx_roots.iter().cloned());
    }
}

/// What the files looked like: each file's path, modification time and content digest. A
/// change of any (a file added, removed, touched or rewritten) makes the poll reload.
pub type Fingerprint = Vec<(PathBuf, Option<SystemTime>, [u8; 32])>;

/// Where the references come from: files and directories, as given.
#[derive(Debug, Clone)]
pub struct Sources {
    pub paths: Vec<PathBuf>,
    pub shared: Shared,
}

/// Why a set of references cannot be loaded (the previous set stays).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Parse { path: String, why: String },
    #[error("{0}: no reference file (*.json) in this directory")]
    EmptyDirectory(String),
    #[error("two references are named {name:?} ({first} and {second}): names must differ")]
    SameName {
        name: String,
        first: String,
        second: String,
    },
    #[error("no reference given")]
    Nothing,
}

fn shown(path: &Path) -> String {
    super::log::escape(&path.display().to_string())
}

impl Sources {
    /// The files the paths name: a file as is, a directory's `*.json` files (not hidden
    /// ones, which editors write while saving) in name order.
    pub fn files(&self) -> Result<Vec<PathBuf>, LoadError> {
        let mut files = Vec::new();
        for path in &self.paths {
            let meta = std::fs::metadata(path).map_err(|source| LoadError::Read {
                path: shown(path),
                source,
            })?;
            if !meta.is_dir() {
                files.push(path.clone());
                continue;
            }
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|source| LoadError::Read {
                    path: shown(path),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    name.ends_with(".json") && !name.starts_with('.') && p.is_file()
                })
                .collect();
            if found.is_empty() {
                return Err(LoadError::EmptyDirectory(shown(path)));
            }
            found.sort();
            files.extend(found);
        }
        if files.is_empty() {
            return Err(LoadError::Nothing);
        }
        Ok(files)
    }

    /// Every reference, or the first error: never a part of the set.
    pub fn load(&self) -> Result<(Vec<Named>, Fingerprint), LoadError> {
        let mut set: Vec<Named> = Vec::new();
        let mut fingerprint = Fingerprint::new();
        let mut paths: Vec<PathBuf> = Vec::new();
        for path in self.files()? {
            let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
            let bytes = std::fs::read(&path).map_err(|source| LoadError::Read {
                path: shown(&path),
                source,
            })?;
            let digest: [u8; 32] = sha2::Sha256::digest(&bytes).into();
            fingerprint.push((path.clone(), modified, digest));
            let parse = |why: String| LoadError::Parse {
                path: shown(&path),
                why,
            };
            let json: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| parse(e.to_string()))?;
            let mut reference = Reference::from_prediction(&json).map_err(parse)?;
            self.shared.apply(&mut reference);
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string());
            if let Some(at) = set.iter().position(|n| n.name == name) {
                return Err(LoadError::SameName {
                    name: super::log::escape(&name),
                    first: shown(&paths[at]),
                    second: shown(&path),
                });
            }
            paths.push(path);
            set.push(Named {
                name,
                digest: cvm_formats::hex(&digest[..6]),
                reference,
            });
        }
        Ok((set, fingerprint))
    }

    /// The files as they are now (errors count as a state of their own, so that a file
    /// coming back is seen).
    pub fn fingerprint(&self) -> Fingerprint {
        let Ok(files) = self.files() else {
            return Fingerprint::new();
        };
        files
            .into_iter()
            .map(|path| {
                let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                let digest = std::fs::read(&path)
                    .map(|b| sha2::Sha256::digest(&b).into())
                    .unwrap_or([0xff; 32]);
                (path, modified, digest)
            })
            .collect()
    }
}

/// The line listing a set: `A.json (sha256 0123456789ab: 2 PCRs, 0 SNP launch digests, 0 TDX
/// MRTDs), ...`.
pub fn describe(set: &[Named]) -> String {
    set.iter()
        .map(|n| {
            format!(
                "{} (sha256 {}: {} PCRs, {} SNP launch digests, {} TDX MRTDs)",
                super::log::escape(&n.name),
                n.digest,
                n.reference.pcrs.len(),
                n.reference.snp_measurements.len(),
                n.reference.tdx_mrtds.len()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Re-reads `sources` into `broker` and logs the outcome; `why` says what asked for it.
pub fn reload(broker: &Broker, sources: &Sources, why: &str) -> Option<Fingerprint> {
    match sources.load() {
        Ok((set, fingerprint)) => {
            let line = format!(
                "kbs-serve: reloaded ({why}): {} references: {}",
                set.len(),
                describe(&set)
            );
            broker.replace_references(set);
            (broker.log)(&line);
            Some(fingerprint)
        }
        Err(e) => {
            let kept = broker.references();
            (broker.log)(&format!(
                "kbs-serve: reload ({why}) failed, keeping the {} references loaded before ({}): {e}",
                kept.len(),
                kept.iter()
                    .map(|n| super::log::escape(&n.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            None
        }
    }
}

/// Reloads on every message of `signals` (SIGHUP in `kbs-serve`) and when the files' fingerprint
/// differs from `loaded` (looked at every `every`), for as long as the broker lives. A change
/// whose reload fails is logged once, not at every poll.
pub fn watch(
    broker: Arc<Broker>,
    sources: Sources,
    loaded: Fingerprint,
    every: Duration,
    signals: Receiver<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut seen = loaded;
        let mut polled = Instant::now();
        let mut signals_open = true;
        loop {
            let wait = every.saturating_sub(polled.elapsed());
            let signalled = if signals_open {
                match signals.recv_timeout(wait) {
                    Ok(()) => true,
                    Err(RecvTimeoutError::Timeout) => false,
                    Err(RecvTimeoutError::Disconnected) => {
                        signals_open = false;
                        false
                    }
                }
            } else {
                std::thread::sleep(wait);
                false
            };
            if signalled {
                if let Some(f) = reload(&broker, &sources, "SIGHUP") {
                    seen = f;
                }
                continue;
            }
            if polled.elapsed() < every {
                continue;
            }
            polled = Instant::now();
            let now = sources.fingerprint();
            if now != seen {
                seen = reload(&broker, &sources, "a reference file changed").unwrap_or(now);
            }
        }
    })
}
