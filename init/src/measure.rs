//! Measured boot: every event is written to the log first (write-ahead), then extended into
//! the TEE's registers. The log is systemd's JSON-seq `tpm2-measure.log`, so existing tools
//! replay it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cvm_formats::event::Event;
use cvm_formats::jsonseq;
use nix::fcntl::{Flock, FlockArg};

use crate::tee::{Backend, RegisterValue, Tee, TeeError};

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("cannot write the event log {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot measure {event} into the {backend} registers")]
    Extend {
        event: String,
        backend: Tee,
        #[source]
        source: TeeError,
    },
}

pub struct Measurer {
    backend: Box<dyn Backend>,
    /// The vTPM as well, when the configuration states that it is inside the TEE
    /// (`state.tpm_in_tee`); see [`Measurer::also_extend`].
    also: Option<Box<dyn Backend>>,
    /// Every event measured so far, to replay into a backend added later.
    history: Vec<Event>,
    log: File,
    path: PathBuf,
    pub events: usize,
}

impl Measurer {
    /// Creates the log (mode 0600) and takes the backend.
    pub fn new(backend: Box<dyn Backend>, path: &Path) -> Result<Self, MeasureError> {
        let err = |source| MeasureError::Log {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(path)
            .map_err(err)?;
        Ok(Measurer {
            backend,
            also: None,
            history: Vec::new(),
            log,
            path: path.to_path_buf(),
            events: 0,
        })
    }

    /// The TEE this boot measures into.
    pub fn tee(&self) -> Tee {
        self.backend.tee()
    }

    /// Logs, then extends. A failure here is fatal to the boot: nothing unmeasured may run.
    pub fn measure(&mut self, event: &Event) -> Result<(), MeasureError> {
        self.append(&jsonseq::record(event))
            .map_err(|source| MeasureError::Log {
                path: self.path.clone(),
                source,
            })?;
        for backend in std::iter::once(&mut self.backend).chain(self.also.as_mut()) {
            extend_into(backend.as_mut(), event)?;
        }
        self.history.push(event.clone());
        self.events += 1;
        log::info!("measured {} into PCR {}", event.description(), event.pcr());
        Ok(())
    }

    /// From now on every event goes to `backend` too, after the events measured so far are
    /// replayed into it in order: its registers end as if it had been measured into from the
    /// start (the configuration that asks for this is read only after the switch to the root).
    pub fn also_extend(&mut self, mut backend: Box<dyn Backend>) -> Result<(), MeasureError> {
        for event in &self.history {
            extend_into(backend.as_mut(), event)?;
        }
        log::info!(
            "{} events so far replayed into the {} registers; later events go there too",
            self.history.len(),
            backend.tee()
        );
        self.also = Some(backend);
        Ok(())
    }

    /// Appends one record under an exclusive lock, with the sticky bit set while writing (the
    /// "being written" marker systemd's readers honour).
    fn append(&mut self, record: &[u8]) -> std::io::Result<()> {
        // flock(2) locks the open file description, which the duplicate shares; dropping the
        // guard unlocks, on every path out of here.
        let locked = Flock::lock(self.log.try_clone()?, FlockArg::LockExclusive)
            .map_err(|(_, errno)| std::io::Error::from(errno))?;
        let mode = self.log.metadata()?.permissions().mode() & 0o7777;
        self.log
            .set_permissions(std::fs::Permissions::from_mode(mode | 0o1000))?;
        let written = self
            .log
            .write_all(record)
            .and_then(|_| self.log.sync_data());
        self.log
            .set_permissions(std::fs::Permissions::from_mode(mode & !0o1000))?;
        drop(locked);
        written
    }

    pub fn read_back(&mut self) -> Result<Vec<RegisterValue>, TeeError> {
        self.backend.read_back()
    }
}

/// Extends one event into one backend, naming both when it fails.
fn extend_into(backend: &mut dyn Backend, event: &Event) -> Result<(), MeasureError> {
    backend
        .extend(event)
        .map_err(|source| MeasureError::Extend {
            event: event.description(),
            backend: backend.tee(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cvm_formats::event::Phase;

    struct Recording(std::rc::Rc<std::cell::RefCell<Vec<String>>>);

    impl Backend for Recording {
        fn tee(&self) -> Tee {
            Tee::Tpm
        }
        fn extend(&mut self, event: &Event) -> Result<(), TeeError> {
            self.0.borrow_mut().push(event.description());
            Ok(())
        }
        fn read_back(&mut self) -> Result<Vec<RegisterValue>, TeeError> {
            Ok(Vec::new())
        }
    }

    #[test]
    fn a_backend_added_later_gets_every_event_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let first = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let later = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let mut m =
            Measurer::new(Box::new(Recording(first.clone())), &dir.path().join("l")).unwrap();
        m.measure(&Event::Phase(Phase::EnterInitrd)).unwrap();
        m.measure(&Event::RootHash([3; 32])).unwrap();
        m.also_extend(Box::new(Recording(later.clone()))).unwrap();
        m.measure(&Event::SealBarrier).unwrap();
        assert_eq!(*first.borrow(), *later.borrow());
        assert_eq!(later.borrow().len(), 3);
    }

    #[test]
    fn logged_before_extended_and_replayable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log/tpm2-measure.log");
        let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let mut m = Measurer::new(Box::new(Recording(seen.clone())), &path).unwrap();
        let events = [Event::Phase(Phase::EnterInitrd), Event::RootHash([3; 32])];
        for e in &events {
            m.measure(e).unwrap();
        }
        assert_eq!(seen.borrow().len(), 2);
        let records = jsonseq::parse(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(records.len(), 2);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(
            mode, 0o600,
            "mode {mode:o}: sticky marker left or wrong permissions"
        );
    }
}
