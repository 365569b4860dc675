//! Logging to /dev/kmsg and the console.
//!
//! Every line goes to the kernel ring buffer (so `dmesg` and a cloud's log capture have it) and
//! is visible on the console. When the kernel itself echoes a record to the console (its level is
//! below the console log level), the line is not written a second time.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// The prefix of every line the init writes; tests and operators grep for it.
pub const PREFIX: &str = "cvm-init";

struct Sinks {
    kmsg: Option<File>,
    console: Option<File>,
}

pub struct Logger {
    sinks: Mutex<Sinks>,
    /// The kernel's console log level: records below it are echoed by the kernel.
    console_loglevel: AtomicU8,
}

static LOGGER: Logger = Logger {
    sinks: Mutex::new(Sinks {
        kmsg: None,
        console: None,
    }),
    console_loglevel: AtomicU8::new(0),
};

/// Installs the logger with the console as its only sink (before /dev is mounted).
pub fn init(level: LevelFilter) {
    {
        let mut sinks = lock();
        if sinks.console.is_none() {
            sinks.console = console_from_stdout();
        }
    }
    // A second call (tests, or after a re-exec) keeps the first logger.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Adds /dev/kmsg once devtmpfs and /proc are mounted, and learns the console log level.
pub fn attach_kmsg() {
    let kmsg = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open("/dev/kmsg")
        .ok();
    let level = std::fs::read_to_string("/proc/sys/kernel/printk")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u8>().ok())
        .unwrap_or(0);
    LOGGER.console_loglevel.store(level, Ordering::Relaxed);
    let mut sinks = lock();
    if sinks.console.is_none() {
        sinks.console = OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOCTTY)
            .open("/dev/console")
            .ok();
    }
    sinks.kmsg = kmsg;
}

/// Drops /dev/kmsg so that /dev can be unmounted at shutdown; the console stays.
pub fn detach_kmsg() {
    lock().kmsg = None;
    LOGGER.console_loglevel.store(0, Ordering::Relaxed);
}

/// Writes a line to the console only (the forwarded output of services).
pub fn console_line(line: &str) {
    let mut sinks = lock();
    if let Some(console) = sinks.console.as_mut() {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        let _ = console.write_all(&buf);
    }
}

/// Writes one line at a syslog level to kmsg and the console. Used by the logger and by the
/// fatal path, which must not depend on `log` being initialised.
pub fn emit(syslog_level: u8, message: &str) {
    let mut sinks = lock();
    let echoed_by_kernel =
        sinks.kmsg.is_some() && syslog_level < LOGGER.console_loglevel.load(Ordering::Relaxed);
    // The kernel takes one record per write; a message with newlines becomes several records.
    for line in message.lines() {
        if let Some(kmsg) = sinks.kmsg.as_mut() {
            let _ = kmsg.write_all(format!("<{syslog_level}>{PREFIX}: {line}\n").as_bytes());
        }
        if !echoed_by_kernel {
            if let Some(console) = sinks.console.as_mut() {
                let _ = console.write_all(format!("{PREFIX}: {line}\n").as_bytes());
            }
        }
    }
}

fn syslog_level(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// The text put in front of a message of this level (info lines carry none, so that the
/// markers read `cvm-init: phase mounts ok 3ms`).
fn level_tag(level: Level) -> &'static str {
    match level {
        Level::Error => "error: ",
        Level::Warn => "warning: ",
        Level::Info => "",
        Level::Debug | Level::Trace => "debug: ",
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            let message = format!("{}{}", level_tag(record.level()), record.args());
            emit(syslog_level(record.level()), &message);
        }
    }

    fn flush(&self) {}
}

fn lock() -> std::sync::MutexGuard<'static, Sinks> {
    // A panic while logging must not silence the fatal path that follows it.
    LOGGER.sinks.lock().unwrap_or_else(|e| e.into_inner())
}

/// The kernel opened /dev/console as fds 0-2 for PID 1. Keep a duplicate (close-on-exec) so
/// that it survives the unmount of /dev and never leaks into children.
fn console_from_stdout() -> Option<File> {
    // SAFETY: fd 1 is only borrowed for the duration of the call; validity is checked by fcntl.
    let stdout = unsafe { BorrowedFd::borrow_raw(1) };
    let dup = nix::fcntl::fcntl(stdout, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3)).ok()?;
    // SAFETY: `dup` is a freshly created descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(dup) };
    debug_assert!(file.as_raw_fd() >= 3);
    Some(file)
}

/// Formats an error with its chain of sources, the one place that prints a chain:
/// `outer: middle: root cause`.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("inner {0}")]
    struct Inner(u32);

    #[test]
    fn chain_joins_every_source() {
        assert_eq!(chain(&Outer(Inner(7))), "outer: inner 7");
    }

    #[test]
    fn levels_map_to_syslog() {
        assert_eq!(syslog_level(Level::Error), 3);
        assert_eq!(syslog_level(Level::Warn), 4);
        assert_eq!(syslog_level(Level::Info), 6);
        assert_eq!(syslog_level(Level::Debug), 7);
    }
}
