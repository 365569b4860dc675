//! Logging to /dev/kmsg and the console.
//!
//! Every line goes to the kernel ring buffer (so `dmesg` and a cloud's log capture have it) and
//! is visible on the console. When the kernel itself echoes a record to the console (its level is
//! below the console log level), the line is not written a second time.
//!
//! One message is one line. Messages carry text the host chose (LUKS2 header fields, a key
//! broker's error body, DHCP values, a workload's output), so every control character, line or
//! paragraph separator and bidirectional override is escaped here, the one place all console
//! text passes: no input can start a line of its own (a forged `cvm-init: ready`) or move the
//! cursor, recolour or erase what the console shows. Text the init itself means to span
//! several lines goes through [`emit_lines`], one escaped line per element.

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

/// Writes a line to the console only (the forwarded output of services), escaped.
pub fn console_line(line: &str) {
    let mut sinks = lock();
    if let Some(console) = sinks.console.as_mut() {
        let _ = console.write_all(&render_console_line(line));
    }
}

/// Writes one line at a syslog level to kmsg and the console, every control character of
/// `message` escaped. Used by the logger and by the fatal path, which must not depend on `log`
/// being initialised.
pub fn emit(syslog_level: u8, message: &str) {
    let mut sinks = lock();
    let echoed_by_kernel =
        sinks.kmsg.is_some() && syslog_level < LOGGER.console_loglevel.load(Ordering::Relaxed);
    let (kmsg_record, console_record) = render(syslog_level, message);
    if let Some(kmsg) = sinks.kmsg.as_mut() {
        let _ = kmsg.write_all(&kmsg_record);
    }
    if !echoed_by_kernel {
        if let Some(console) = sinks.console.as_mut() {
            let _ = console.write_all(&console_record);
        }
    }
}

/// The init's own text of several lines (never host text split by the caller): one escaped
/// record per element, so the lines stay readable and none can hold a newline of its own.
pub fn emit_lines(syslog_level: u8, lines: &[&str]) {
    for line in lines {
        emit(syslog_level, line);
    }
}

/// The kmsg record (one write is one record) and the console line for a message.
fn render(syslog_level: u8, message: &str) -> (Vec<u8>, Vec<u8>) {
    let line = escape(message);
    (
        format!("<{syslog_level}>{PREFIX}: {line}\n").into_bytes(),
        format!("{PREFIX}: {line}\n").into_bytes(),
    )
}

fn render_console_line(line: &str) -> Vec<u8> {
    let mut buf = escape(line).into_owned().into_bytes();
    buf.push(b'\n');
    buf
}

pub use cvm_formats::text::{escape, must_escape};

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

    /// Every byte a console line may hold: printable text and the single final newline.
    fn assert_one_clean_line(out: &[u8], starts: &str) {
        let text = std::str::from_utf8(out).unwrap();
        let body = text.strip_suffix('\n').expect("ends with a newline");
        assert!(body.starts_with(starts), "{body:?}");
        assert!(!body.chars().any(must_escape_raw), "{body:?}");
    }

    /// The characters that must never reach the console raw (a backslash may, as an escape).
    fn must_escape_raw(c: char) -> bool {
        c != '\\' && must_escape(c)
    }

    #[test]
    fn a_header_field_cannot_forge_a_marker_or_hide_the_reason() {
        let field = "x\nready\r\x1b[2K\x1b[8mhidden\u{9b}2J\u{202e}";
        let (kmsg, console) = render(3, &format!("fatal: the header field is {field}"));
        assert_eq!(
            String::from_utf8(console).unwrap(),
            "cvm-init: fatal: the header field is x\\nready\\r\\x1b[2K\\x1b[8mhidden\\x9b2J\\u{202e}\n"
        );
        assert!(kmsg.starts_with(b"<3>cvm-init: fatal: the header field is x\\nready"));
        assert_eq!(kmsg.iter().filter(|&&b| b == b'\n').count(), 1);
        // A workload's line as the supervisor forwards it.
        let line = render_console_line("app: ok\ncvm-init: ready\x1b[1A");
        assert_eq!(line, b"app: ok\\ncvm-init: ready\\x1b[1A\n");
    }

    #[test]
    fn the_inits_own_lines_stay_as_written() {
        assert_eq!(
            render(6, "phase mounts ok 3ms").1,
            b"cvm-init: phase mounts ok 3ms\n"
        );
        assert_eq!(escape("a\\n"), "a\\\\n", "a backslash is escaped too");
    }

    proptest::proptest! {
        #[test]
        fn no_input_yields_a_marker_line_or_a_control_character(input in ".*", bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let lossy = String::from_utf8_lossy(&bytes);
            for text in [input.as_str(), &*lossy] {
                for level in [Level::Error, Level::Warn, Level::Info, Level::Debug] {
                    let message = format!("{}the header field is {text}", level_tag(level));
                    let (kmsg, console) = render(syslog_level(level), &message);
                    let starts = format!("{PREFIX}: {}the header field is ", level_tag(level));
                    assert_one_clean_line(&console, &starts);
                    assert_one_clean_line(&kmsg, &format!("<{}>{starts}", syslog_level(level)));
                }
                let forwarded = render_console_line(&format!("app: {text}"));
                assert_one_clean_line(&forwarded, "app: ");
            }
        }
    }

    #[test]
    fn levels_map_to_syslog() {
        assert_eq!(syslog_level(Level::Error), 3);
        assert_eq!(syslog_level(Level::Warn), 4);
        assert_eq!(syslog_level(Level::Info), 6);
        assert_eq!(syslog_level(Level::Debug), 7);
    }
}
