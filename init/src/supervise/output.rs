//! A service's output: forwarded to the console a line at a time, and to its rotated log file.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Forwards one output pipe of a service to the console, a line at a time, and to the
/// service's log file when there is one.
pub struct OutputForwarder {
    pub service: String,
    file: File,
    pending: Vec<u8>,
    log: Option<Rc<RefCell<ServiceLog>>>,
}

/// A service's log file, rotated at a size limit with one previous generation kept
/// (`<name>.log.1`), so the state disk never fills with output.
pub struct ServiceLog {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max: u64,
}

impl ServiceLog {
    pub fn open(path: PathBuf, max: u64) -> Self {
        let mut log = ServiceLog {
            path,
            file: None,
            size: 0,
            max,
        };
        log.reopen();
        log
    }

    fn reopen(&mut self) {
        use nix::fcntl::OFlag;
        // The log directory is on the state disk, which a workload writes too: no link is
        // followed on the way to the file.
        self.file = crate::nofollow::open_parent(&self.path, Some(0o755))
            .and_then(|p| {
                p.open(
                    None,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_APPEND,
                    0o644,
                )
            })
            .inspect_err(|e| log::warn!("cannot open the service log {}: {e}", self.path.display()))
            .ok();
        self.size = self
            .file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
    }

    pub fn write_line(&mut self, line: &str) {
        use std::io::Write;
        let len = line.len() as u64 + 1;
        if self.size + len > self.max {
            let rotated = crate::nofollow::open_parent(&self.path, None).and_then(|p| {
                let mut old = p.name.clone().into_os_string();
                old.push(".1");
                p.rename(&p.name, Path::new(&old))
            });
            if let Err(e) = rotated {
                log::warn!("cannot rotate the service log {}: {e}", self.path.display());
            }
            self.reopen();
        }
        if let Some(file) = self.file.as_mut() {
            if file.write_all(format!("{line}\n").as_bytes()).is_ok() {
                self.size += len;
            }
        }
    }
}

/// Longest line forwarded in one piece; longer ones are split.
const MAX_LINE: usize = 4096;

impl OutputForwarder {
    pub fn new(service: &str, fd: OwnedFd) -> Self {
        let _ = nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        OutputForwarder {
            service: service.to_string(),
            file: File::from(fd),
            pending: Vec::new(),
            log: None,
        }
    }

    /// Also writes every line (without the prefix) to `log`.
    pub fn with_log(mut self, log: Option<Rc<RefCell<ServiceLog>>>) -> Self {
        self.log = log;
        self
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Reads what is available and emits complete lines. Returns false at end of file.
    pub fn pump(&mut self, emit: &mut dyn FnMut(&str)) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => {
                    self.flush(emit);
                    return false;
                }
                Ok(n) => {
                    self.pending.extend_from_slice(&buf[..n]);
                    self.emit_lines(emit);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.flush(emit);
                    return false;
                }
            }
        }
    }

    fn emit_lines(&mut self, emit: &mut dyn FnMut(&str)) {
        while let Some(pos) = self.pending.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=pos).collect();
            self.emit_one(&line[..line.len() - 1], emit);
        }
        while self.pending.len() >= MAX_LINE {
            let line: Vec<u8> = self.pending.drain(..MAX_LINE).collect();
            self.emit_one(&line, emit);
        }
    }

    fn flush(&mut self, emit: &mut dyn FnMut(&str)) {
        self.emit_lines(emit);
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.emit_one(&line, emit);
        }
    }

    fn emit_one(&self, line: &[u8], emit: &mut dyn FnMut(&str)) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        if let Some(log) = &self.log {
            log.borrow_mut().write_line(text);
        }
        emit(&format!("{}: {text}", self.service));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_logs_are_not_written_through_links() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), "untouched").unwrap();
        // Final component: the log file a link (planted by a workload on the state disk).
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), logs.join("svc.log")).unwrap();
        // Intermediate: the directory of the log a link.
        std::os::unix::fs::symlink(&outside, dir.path().join("linked")).unwrap();
        for path in [logs.join("svc.log"), dir.path().join("linked/victim")] {
            let mut log = ServiceLog::open(path.clone(), 4096);
            assert!(log.file.is_none(), "{} was opened", path.display());
            log.write_line("written through a link");
        }
        assert_eq!(
            std::fs::read_to_string(outside.join("victim")).unwrap(),
            "untouched"
        );
        let e = crate::nofollow::open_parent(&dir.path().join("linked/victim"), None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("linked in "), "{e}");
    }

    #[test]
    fn service_logs_rotate_at_their_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let mut log = ServiceLog::open(path.clone(), 4096);
        for i in 0..100 {
            log.write_line(&format!("line {i:04} {}", "x".repeat(80)));
        }
        let current = std::fs::read_to_string(&path).unwrap();
        let previous = std::fs::read_to_string(dir.path().join("svc.log.1")).unwrap();
        assert!(current.len() <= 4096 && previous.len() <= 4096);
        assert!(current.ends_with(&format!("line 0099 {}\n", "x".repeat(80))));
        // Nothing is lost across the rotation: the two generations end and start in sequence.
        let last_previous = previous.lines().last().unwrap()[5..9]
            .parse::<u32>()
            .unwrap();
        let first_current = current.lines().next().unwrap()[5..9]
            .parse::<u32>()
            .unwrap();
        assert_eq!(first_current, last_previous + 1);
    }

    #[test]
    fn output_is_forwarded_by_line_with_prefix() {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        let mut fwd = OutputForwarder::new("svc", reader);
        let mut lines = Vec::new();
        nix::unistd::write(&writer, b"one\ntwo\r\npart").unwrap();
        assert!(fwd.pump(&mut |l| lines.push(l.to_string())));
        assert_eq!(lines, vec!["svc: one", "svc: two"]);
        nix::unistd::write(&writer, b"ial\n").unwrap();
        drop(writer);
        assert!(!fwd.pump(&mut |l| lines.push(l.to_string())));
        assert_eq!(lines.last().unwrap(), "svc: partial");
        let long = vec![b'x'; MAX_LINE + 10];
        let (reader, writer) = nix::unistd::pipe().unwrap();
        let mut fwd = OutputForwarder::new("svc", reader);
        nix::unistd::write(&writer, &long).unwrap();
        drop(writer);
        let mut lines = Vec::new();
        fwd.pump(&mut |l| lines.push(l.len()));
        assert_eq!(lines, vec![MAX_LINE + 5, 15]);
    }
}
