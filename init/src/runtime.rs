//! The steady state of PID 1: one poll loop over the signalfd, the power buttons and the output
//! pipes of services, driving reaping, supervision and shutdown requests.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::logger;
use crate::power::PowerButton;
use crate::shutdown::{reap_all, PowerAction};
use crate::supervise::{Exit, Processes, Supervisor};

/// Signals that must stay deliverable: a fault in PID 1 cannot be handled later from a queue.
const SYNCHRONOUS: &[Signal] = &[
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGILL,
    Signal::SIGFPE,
    Signal::SIGABRT,
    Signal::SIGTRAP,
    Signal::SIGSYS,
];

/// Blocks every asynchronous signal and returns a signalfd that receives them. Called first
/// thing, so that no SIGCHLD or ctrl-alt-del is lost during the boot.
pub fn block_signals() -> nix::Result<SignalFd> {
    let mut mask = SigSet::all();
    for s in SYNCHRONOUS {
        mask.remove(*s);
    }
    mask.thread_block()?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
}

/// What a signal asks of PID 1.
pub fn action_for_signal(signal: Signal) -> Option<PowerAction> {
    match signal {
        // ctrl-alt-del, once the kernel's own handling is disabled.
        Signal::SIGINT => Some(PowerAction::Reboot),
        Signal::SIGTERM | Signal::SIGPWR => Some(PowerAction::PowerOff),
        _ => None,
    }
}

enum Source {
    Signals,
    Button(usize),
    Output(usize),
}

pub struct Runtime<P: Processes> {
    pub signals: SignalFd,
    pub buttons: Vec<PowerButton>,
    pub supervisor: Supervisor<P>,
    pub orphans_reaped: u64,
    requested: Option<PowerAction>,
    /// Runs once, when every service has started and is ready.
    on_ready: Option<Box<dyn FnOnce()>>,
}

impl<P: Processes> Runtime<P> {
    pub fn new(signals: SignalFd, buttons: Vec<PowerButton>, supervisor: Supervisor<P>) -> Self {
        Runtime {
            signals,
            buttons,
            supervisor,
            orphans_reaped: 0,
            requested: None,
            on_ready: None,
        }
    }

    /// Sets what happens once every service is up (the `ready` measurement and line).
    pub fn on_ready(mut self, hook: Box<dyn FnOnce()>) -> Self {
        self.on_ready = Some(hook);
        self
    }

    /// Runs until a shutdown was requested and every service has stopped.
    pub fn run(&mut self) -> PowerAction {
        loop {
            let now = Instant::now();
            self.supervisor.tick(now);
            if self.requested.is_none() && self.supervisor.all_ready() {
                if let Some(hook) = self.on_ready.take() {
                    hook();
                }
            }
            if let Some(action) = self.requested {
                if self.supervisor.stopped() {
                    self.drain_outputs();
                    return action;
                }
            }
            let timeout = self
                .supervisor
                .next_deadline()
                .map(|at| at.saturating_duration_since(now));
            self.wait(timeout);
        }
    }

    fn wait(&mut self, timeout: Option<Duration>) {
        let mut sources = vec![(Source::Signals, self.signals.as_fd().as_raw_fd())];
        for (i, b) in self.buttons.iter().enumerate() {
            sources.push((Source::Button(i), b.file.as_raw_fd()));
        }
        for (i, o) in self.supervisor.outputs.iter().enumerate() {
            sources.push((Source::Output(i), o.raw_fd()));
        }
        let ready: Vec<bool> = {
            let mut fds: Vec<PollFd> = sources
                .iter()
                .map(|(_, fd)| {
                    // SAFETY: each descriptor is owned by `self` and stays open for the duration
                    // of this poll call; `fds` is dropped before `self` is touched again.
                    PollFd::new(unsafe { BorrowedFd::borrow_raw(*fd) }, PollFlags::POLLIN)
                })
                .collect();
            let timeout = match timeout {
                // Round up so that a deadline is not polled for again just before it is due.
                Some(t) => {
                    PollTimeout::try_from(t.as_millis().saturating_add(1).min(60_000) as u32)
                        .unwrap_or(PollTimeout::MAX)
                }
                None => PollTimeout::NONE,
            };
            match poll(&mut fds, timeout) {
                Ok(_) => fds
                    .iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                    .collect(),
                Err(_) => vec![false; sources.len()],
            }
        };
        // Output before signals: what a service wrote before it exited is shown before its exit.
        let mut finished_outputs = Vec::new();
        let mut ordered: Vec<(&Source, bool)> = sources.iter().map(|(s, _)| s).zip(ready).collect();
        ordered.sort_by_key(|(s, _)| !matches!(s, Source::Output(_)));
        for (source, ready) in ordered {
            if !ready {
                continue;
            }
            match source {
                Source::Signals => self.drain_signals(),
                Source::Button(i) => {
                    if self.buttons[*i].pressed() {
                        log::info!("power button pressed ({})", self.buttons[*i].name);
                        self.request(PowerAction::PowerOff);
                    }
                }
                Source::Output(i) => {
                    if !self.supervisor.outputs[*i].pump(&mut |line| logger::console_line(line)) {
                        finished_outputs.push(*i);
                    }
                }
            }
        }
        for i in finished_outputs.into_iter().rev() {
            self.supervisor.outputs.remove(i);
        }
    }

    /// Forwards whatever the services left in their pipes.
    fn drain_outputs(&mut self) {
        for output in &mut self.supervisor.outputs {
            output.pump(&mut |line| logger::console_line(line));
        }
    }

    fn drain_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            if signal == Signal::SIGCHLD {
                self.reap();
            } else if let Some(action) = action_for_signal(signal) {
                log::info!("received {} from pid {}", signal.as_str(), info.ssi_pid);
                self.request(action);
            } else {
                log::debug!("ignoring {} from pid {}", signal.as_str(), info.ssi_pid);
            }
        }
    }

    fn reap(&mut self) {
        let now = Instant::now();
        let supervisor = &mut self.supervisor;
        let orphans = &mut self.orphans_reaped;
        reap_all(|status| {
            if let Some((pid, exit)) = Exit::from_wait(status) {
                if !supervisor.on_exit(pid, exit, now) {
                    *orphans += 1;
                    log::debug!("reaped orphan {pid}: {exit}");
                }
            }
        });
    }

    /// The first request wins; later ones are reported and ignored.
    pub fn request(&mut self, action: PowerAction) {
        match self.requested {
            None => {
                log::info!("shutdown requested: {action:?}; stopping services");
                self.requested = Some(action);
                self.supervisor.begin_stop(Instant::now());
            }
            Some(current) => log::info!("already shutting down ({current:?}); ignoring {action:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_map_to_actions() {
        assert_eq!(action_for_signal(Signal::SIGINT), Some(PowerAction::Reboot));
        assert_eq!(
            action_for_signal(Signal::SIGTERM),
            Some(PowerAction::PowerOff)
        );
        assert_eq!(
            action_for_signal(Signal::SIGPWR),
            Some(PowerAction::PowerOff)
        );
        assert_eq!(action_for_signal(Signal::SIGHUP), None);
        assert_eq!(action_for_signal(Signal::SIGCHLD), None);
    }
}
