//! The end of every boot: stop what is left, unmount, sync, and reboot(2) with the requested
//! action. PID 1 never returns from here.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::logger;
use crate::mounts;
use crate::sys::Linux;

/// What the machine does at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    PowerOff,
    Reboot,
}

impl PowerAction {
    fn verb(self) -> &'static str {
        match self {
            PowerAction::PowerOff => "powering off",
            PowerAction::Reboot => "rebooting",
        }
    }
}

/// Reaps every exited child without blocking; returns how many.
pub fn reap_all(mut on_exit: impl FnMut(WaitStatus)) -> usize {
    let mut count = 0;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return count,
            Err(Errno::EINTR) => continue,
            Err(_) => return count,
            Ok(status) => {
                count += 1;
                on_exit(status);
            }
        }
    }
}

/// Waits up to `limit` for every process to be gone, reaping as they exit.
fn wait_for_no_children(limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        reap_all(|_| {});
        if matches!(
            waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)),
            Err(Errno::ECHILD)
        ) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM to every process, a grace period, then SIGKILL. As PID 1 every process is a
/// descendant, so "no children left" means nothing else runs.
pub fn kill_everything(grace: Duration) {
    if kill(Pid::from_raw(-1), Signal::SIGTERM).is_err() {
        // ESRCH: nothing else runs.
        reap_all(|_| {});
        return;
    }
    if wait_for_no_children(grace) {
        return;
    }
    log::warn!(
        "processes left after {}ms: sending SIGKILL",
        grace.as_millis()
    );
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    if !wait_for_no_children(Duration::from_secs(2)) {
        log::error!("processes survive SIGKILL (stuck in the kernel?)");
    }
}

/// The common tail: kill, unmount, sync, act. `last_words` (a fatal reason) is printed as the
/// very last line so that it is what the console shows.
pub fn finish(action: PowerAction, last_words: Option<&str>) -> ! {
    kill_everything(Duration::from_secs(3));
    logger::emit(6, "unmounting file systems");
    logger::detach_kmsg();
    // Opened while /dev is still there: the devices go once their file systems are gone.
    let dm_control = crate::dm::control();
    let report = mounts::unmount_all(&Linux);
    for target in &report.unmounted {
        logger::emit(6, &format!("unmounted {}", target.display()));
    }
    for target in &report.read_only {
        logger::emit(
            4,
            &format!("busy, remounted read-only: {}", target.display()),
        );
    }
    for target in &report.detached {
        logger::emit(6, &format!("busy, detached: {}", target.display()));
    }
    nix::unistd::sync();
    let removed = dm_control
        .as_ref()
        .map(crate::dm::remove_unused)
        .unwrap_or_default();
    if !removed.is_empty() {
        logger::emit(
            6,
            &format!("removed device-mapper devices: {}", removed.join(" ")),
        );
    }
    if let Some(words) = last_words {
        logger::emit(3, &format!("fatal: {words}"));
    }
    logger::emit(6, action.verb());
    let mode = match action {
        PowerAction::PowerOff => RebootMode::RB_POWER_OFF,
        PowerAction::Reboot => RebootMode::RB_AUTOBOOT,
    };
    let err = match reboot(mode) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    logger::emit(3, &format!("reboot(2) failed: {err}; halting here"));
    loop {
        nix::unistd::pause();
    }
}
