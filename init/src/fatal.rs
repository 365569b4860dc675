//! The one fatal path of PID 1: say why, sync, and power off after a visible countdown, or
//! hold when the (measured) command line asked for `cvm.debug`. Panics come here too, so the
//! kernel never sees PID 1 exit ("Attempted to kill init").

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};

use crate::logger;
use crate::shutdown::{self, PowerAction};

static HOLD: AtomicBool = AtomicBool::new(false);
static IN_FATAL: AtomicBool = AtomicBool::new(false);

/// Seconds of countdown before the power-off, so that a person at the console can read why.
pub const COUNTDOWN_SECONDS: u32 = 5;

/// With `cvm.debug` a fatal error holds the machine instead of powering it off.
pub fn set_hold(hold: bool) {
    HOLD.store(hold, Ordering::Relaxed);
}

/// Routes every panic into [`fatal`].
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        fatal(&format!("panic: {info}"));
    }));
}

/// Never returns. `reason` is the whole error chain, already formatted.
pub fn fatal(reason: &str) -> ! {
    if IN_FATAL.swap(true, Ordering::SeqCst) {
        // A panic inside the fatal path itself: no more logic, just stop the machine.
        logger::emit(2, &format!("fatal error inside the fatal path: {reason}"));
        nix::unistd::sync();
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
        loop {
            nix::unistd::pause();
        }
    }
    logger::emit(3, &format!("fatal: {reason}"));
    nix::unistd::sync();
    if HOLD.load(Ordering::Relaxed) {
        let action = hold();
        shutdown::finish(action, Some(reason));
    }
    for left in (1..=COUNTDOWN_SECONDS).rev() {
        logger::emit(3, &format!("powering off in {left} s"));
        std::thread::sleep(Duration::from_secs(1));
    }
    shutdown::finish(PowerAction::PowerOff, Some(reason))
}

/// Holds the failed machine for inspection, reaping children, until ctrl-alt-del (reboot) or
/// SIGTERM/SIGPWR (power off).
fn hold() -> PowerAction {
    logger::emit(
        3,
        "holding (cvm.debug): the node stays stopped here; ctrl-alt-del reboots, SIGTERM or SIGPWR powers off",
    );
    let all = SigSet::all();
    let _ = all.thread_block();
    loop {
        match all.wait() {
            Ok(Signal::SIGINT) => return PowerAction::Reboot,
            Ok(Signal::SIGTERM) | Ok(Signal::SIGPWR) => return PowerAction::PowerOff,
            Ok(Signal::SIGCHLD) => {
                shutdown::reap_all(|_| {});
            }
            _ => {}
        }
    }
}
