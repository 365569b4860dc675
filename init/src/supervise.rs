//! Supervision of long-running services (containerd and kubelet later): clean start, restart
//! with capped exponential backoff, output forwarded line by line, orderly stop in reverse.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::config::{RestartPolicy, ServiceConfig};

/// The environment every service starts with, before its own configured variables.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
}

impl Exit {
    pub fn from_wait(status: WaitStatus) -> Option<(Pid, Exit)> {
        match status {
            WaitStatus::Exited(pid, code) => Some((pid, Exit::Code(code))),
            WaitStatus::Signaled(pid, sig, _) => Some((pid, Exit::Signal(sig))),
            _ => None,
        }
    }

    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit status {c}"),
            Exit::Signal(s) => write!(f, "signal {}", s.as_str()),
        }
    }
}

/// Restart delays: `base`, doubled after each consecutive failure, at most `cap`. A run that
/// lasted `stable` or longer resets the count.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    pub stable: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(30),
            stable: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The delay before the next start after `failures` consecutive failures (1 or more).
    pub fn delay(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(16);
        self.base.saturating_mul(1 << shift).min(self.cap)
    }
}

/// Consecutive failures after which a service is reported as crash-looping.
const CRASH_LOOP_REPORT: u32 = 5;

pub fn should_restart(policy: RestartPolicy, exit: Option<Exit>) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => !exit.is_some_and(Exit::success),
        RestartPolicy::Never => false,
    }
}

/// A started process, as the supervisor sees it.
pub struct Spawned {
    pub pid: Pid,
    pub outputs: Vec<OwnedFd>,
}

/// Starting and signalling processes; the real one forks, tests record.
pub trait Processes {
    fn spawn(&mut self, service: &ServiceConfig) -> io::Result<Spawned>;
    fn signal_group(&mut self, pid: Pid, signal: Signal);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not started yet: starts at the first tick.
    Pending,
    /// Waiting to be started at this instant.
    Waiting(Instant),
    Running {
        pid: Pid,
        since: Instant,
    },
    /// SIGTERM sent; SIGKILL at `kill_at`.
    Stopping {
        pid: Pid,
        since: Instant,
        kill_at: Instant,
        killed: bool,
    },
    /// Not running and not to be started again.
    Done,
}

/// Forwards one output pipe of a service to the console, a line at a time.
pub struct OutputForwarder {
    pub service: String,
    file: File,
    pending: Vec<u8>,
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
        }
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
        emit(&format!(
            "{}: {}",
            self.service,
            text.trim_end_matches('\r')
        ));
    }
}

struct Service {
    config: ServiceConfig,
    state: State,
    failures: u32,
    starts: u32,
    /// Measured once, right before the first exec; restarts run the same measured binary.
    measured: bool,
}

/// Measures a service's binary before its first exec; an error keeps it from starting.
pub type MeasureHook = Box<dyn FnMut(&ServiceConfig) -> Result<(), String>>;

/// The supervised services, in start order.
pub struct Supervisor<P: Processes> {
    processes: P,
    services: Vec<Service>,
    backoff: Backoff,
    stopping: bool,
    /// Output pipes of running (or recently exited) services.
    pub outputs: Vec<OutputForwarder>,
    measure: Option<MeasureHook>,
}

impl<P: Processes> Supervisor<P> {
    pub fn new(processes: P, configs: Vec<ServiceConfig>, backoff: Backoff) -> Self {
        Supervisor {
            processes,
            services: configs
                .into_iter()
                .map(|config| Service {
                    config,
                    state: State::Pending,
                    failures: 0,
                    starts: 0,
                    measured: false,
                })
                .collect(),
            backoff,
            stopping: false,
            outputs: Vec::new(),
            measure: None,
        }
    }

    /// Sets the hook that measures each binary before its first exec.
    pub fn with_measure(mut self, hook: MeasureHook) -> Self {
        self.measure = Some(hook);
        self
    }

    /// Starts what is due, kills what overran its stop timeout.
    pub fn tick(&mut self, now: Instant) {
        if self.stopping {
            self.advance_stop(now);
            return;
        }
        for i in 0..self.services.len() {
            let due = match self.services[i].state {
                State::Pending => true,
                State::Waiting(at) => at <= now,
                _ => false,
            };
            if due {
                self.start(i, now);
            }
        }
    }

    fn start(&mut self, i: usize, now: Instant) {
        let service = &mut self.services[i];
        service.starts += 1;
        if !service.measured {
            if let Some(measure) = self.measure.as_mut() {
                if let Err(e) = measure(&service.config) {
                    log::error!(
                        "cannot measure service {} ({}), so it does not start: {e}",
                        service.config.name,
                        service.config.path.display()
                    );
                    self.after_exit(i, None, now, Duration::ZERO);
                    return;
                }
            }
            service.measured = true;
        }
        match self.processes.spawn(&service.config) {
            Ok(spawned) => {
                log::info!(
                    "service {} started: pid {} ({}{})",
                    service.config.name,
                    spawned.pid,
                    service.config.path.display(),
                    if service.starts > 1 {
                        format!(", start {}", service.starts)
                    } else {
                        String::new()
                    }
                );
                service.state = State::Running {
                    pid: spawned.pid,
                    since: now,
                };
                for fd in spawned.outputs {
                    self.outputs
                        .push(OutputForwarder::new(&service.config.name, fd));
                }
            }
            Err(e) => {
                log::error!(
                    "cannot start service {} ({}): {e}",
                    service.config.name,
                    service.config.path.display()
                );
                self.after_exit(i, None, now, Duration::ZERO);
            }
        }
    }

    /// Hands a reaped exit status to its service. Returns false when no service owns `pid`.
    pub fn on_exit(&mut self, pid: Pid, exit: Exit, now: Instant) -> bool {
        let Some(i) = self.services.iter().position(|s| match s.state {
            State::Running { pid: p, .. } | State::Stopping { pid: p, .. } => p == pid,
            _ => false,
        }) else {
            return false;
        };
        match self.services[i].state {
            State::Stopping { since, .. } => {
                log::info!(
                    "service {} stopped: {exit} after {}ms",
                    self.services[i].config.name,
                    now.duration_since(since).as_millis()
                );
                self.services[i].state = State::Done;
                self.advance_stop(now);
            }
            State::Running { since, .. } => {
                self.after_exit(i, Some(exit), now, now.duration_since(since))
            }
            _ => unreachable!("matched above"),
        }
        true
    }

    fn after_exit(&mut self, i: usize, exit: Option<Exit>, now: Instant, ran: Duration) {
        let backoff = self.backoff;
        let service = &mut self.services[i];
        let name = &service.config.name;
        let what = exit.map_or("failed to start".to_string(), |e| format!("exited: {e}"));
        let failed = !exit.is_some_and(Exit::success);
        if ran >= backoff.stable {
            service.failures = 0;
        }
        if failed {
            service.failures += 1;
        }
        if self.stopping || !should_restart(service.config.restart, exit) {
            log::info!(
                "service {name} {what} after {}ms; not restarted ({:?} policy)",
                ran.as_millis(),
                service.config.restart
            );
            service.state = State::Done;
            return;
        }
        let delay = backoff.delay(service.failures.max(1));
        log::warn!(
            "service {name} {what} after {}ms; restart {} in {}ms",
            ran.as_millis(),
            service.starts,
            delay.as_millis()
        );
        if service.failures >= CRASH_LOOP_REPORT && service.failures % CRASH_LOOP_REPORT == 0 {
            log::error!(
                "service {name} is crash-looping: {} consecutive failures; retrying every {}ms at most",
                service.failures,
                backoff.delay(service.failures).as_millis()
            );
        }
        service.state = State::Waiting(now + delay);
    }

    /// The next instant `tick` has work to do, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.services
            .iter()
            .filter_map(|s| match s.state {
                State::Waiting(at) if !self.stopping => Some(at),
                State::Stopping { kill_at, .. } => Some(kill_at),
                _ => None,
            })
            .min()
    }

    /// Begins stopping every service, newest first, one at a time.
    pub fn begin_stop(&mut self, now: Instant) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        for s in &mut self.services {
            if matches!(s.state, State::Waiting(_) | State::Pending) {
                s.state = State::Done;
            }
        }
        self.advance_stop(now);
    }

    fn advance_stop(&mut self, now: Instant) {
        // A service being stopped: escalate when its time is up.
        if let Some(s) = self
            .services
            .iter_mut()
            .find(|s| matches!(s.state, State::Stopping { .. }))
        {
            if let State::Stopping {
                pid,
                since,
                kill_at,
                killed,
            } = s.state
            {
                if now >= kill_at && !killed {
                    log::warn!(
                        "service {} did not stop within {}ms: sending SIGKILL",
                        s.config.name,
                        s.config.stop_timeout_ms
                    );
                    self.processes.signal_group(pid, Signal::SIGKILL);
                    s.state = State::Stopping {
                        pid,
                        since,
                        kill_at: now + Duration::from_secs(2),
                        killed: true,
                    };
                } else if now >= kill_at {
                    log::error!(
                        "service {} (pid {pid}) survives SIGKILL; leaving it",
                        s.config.name
                    );
                    s.state = State::Done;
                    return self.advance_stop(now);
                }
            }
            return;
        }
        if let Some(s) = self
            .services
            .iter_mut()
            .rev()
            .find(|s| matches!(s.state, State::Running { .. }))
        {
            if let State::Running { pid, .. } = s.state {
                log::info!("stopping service {} (pid {pid}): SIGTERM", s.config.name);
                self.processes.signal_group(pid, Signal::SIGTERM);
                s.state = State::Stopping {
                    pid,
                    since: now,
                    kill_at: now + Duration::from_millis(s.config.stop_timeout_ms),
                    killed: false,
                };
            }
        }
    }

    /// True once a stop was requested and every service has ended.
    pub fn stopped(&self) -> bool {
        self.stopping && self.services.iter().all(|s| s.state == State::Done)
    }
}

/// The real processes: fork and exec with a clean state.
pub struct OsProcesses;

impl Processes for OsProcesses {
    fn spawn(&mut self, service: &ServiceConfig) -> io::Result<Spawned> {
        let mut cmd = Command::new(&service.path);
        cmd.args(&service.args)
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .envs(&service.env)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs between fork and exec in a single-threaded child; it only
        // makes async-signal-safe system calls and does not allocate.
        unsafe {
            cmd.pre_exec(clean_child_state);
        }
        let mut child = cmd.spawn()?;
        let pid = Pid::from_raw(child.id() as i32);
        let mut outputs = Vec::new();
        if let Some(out) = child.stdout.take() {
            outputs.push(OwnedFd::from(out));
        }
        if let Some(err) = child.stderr.take() {
            outputs.push(OwnedFd::from(err));
        }
        // The reaper collects the exit status; `child` is dropped without waiting.
        Ok(Spawned { pid, outputs })
    }

    fn signal_group(&mut self, pid: Pid, signal: Signal) {
        // The service leads its own session and process group; signal the whole group, and
        // the process itself in case it left the group.
        let _ = nix::sys::signal::killpg(pid, signal);
        let _ = nix::sys::signal::kill(pid, signal);
    }
}

/// Runs in the child before exec: empty signal mask, default dispositions, a new session, and
/// no descriptor beyond 0-2 survives exec.
fn clean_child_state() -> io::Result<()> {
    use nix::libc;
    // SAFETY: plain system calls on values owned by this function; all are async-signal-safe.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Recorder {
        next_pid: i32,
        spawned: Vec<String>,
        signals: Vec<(i32, Signal)>,
        fail_spawn: bool,
    }

    impl Processes for &mut Recorder {
        fn spawn(&mut self, service: &ServiceConfig) -> io::Result<Spawned> {
            if self.fail_spawn {
                return Err(io::Error::from(io::ErrorKind::NotFound));
            }
            self.next_pid += 1;
            self.spawned.push(service.name.clone());
            Ok(Spawned {
                pid: Pid::from_raw(100 + self.next_pid),
                outputs: Vec::new(),
            })
        }
        fn signal_group(&mut self, pid: Pid, signal: Signal) {
            self.signals.push((pid.as_raw(), signal));
        }
    }

    fn service(name: &str, restart: RestartPolicy) -> ServiceConfig {
        ServiceConfig {
            name: name.into(),
            path: "/bin/x".into(),
            args: vec![],
            env: BTreeMap::new(),
            restart,
            stop_timeout_ms: 1000,
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let b = Backoff::default();
        let delays: Vec<u128> = (1..=10).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(
            delays,
            vec![250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(b.delay(u32::MAX), b.cap);
    }

    #[test]
    fn restart_policies() {
        use RestartPolicy::*;
        let ok = Some(Exit::Code(0));
        let bad = Some(Exit::Code(1));
        let killed = Some(Exit::Signal(Signal::SIGSEGV));
        assert!(should_restart(Always, ok));
        assert!(!should_restart(OnFailure, ok));
        assert!(should_restart(OnFailure, bad));
        assert!(should_restart(OnFailure, killed));
        assert!(should_restart(OnFailure, None));
        assert!(!should_restart(Never, bad));
    }

    #[test]
    fn crash_loop_backs_off_and_stable_run_resets() {
        let mut rec = Recorder::default();
        let t0 = Instant::now();
        let mut sup = Supervisor::new(
            &mut rec,
            vec![service("crasher", RestartPolicy::Always)],
            Backoff::default(),
        );
        sup.tick(t0);
        let mut now = t0;
        let mut delays = Vec::new();
        for n in 0..4 {
            let pid = Pid::from_raw(101 + n);
            assert!(sup.on_exit(pid, Exit::Code(1), now));
            let next = sup.next_deadline().unwrap();
            delays.push(next.duration_since(now).as_millis());
            // Nothing starts before the deadline.
            sup.tick(next - Duration::from_millis(1));
            now = next;
            sup.tick(now);
        }
        assert_eq!(delays, vec![250, 500, 1000, 2000]);
        // A run longer than `stable` resets the backoff.
        now += Duration::from_secs(11);
        assert!(sup.on_exit(Pid::from_raw(105), Exit::Code(1), now));
        assert_eq!(
            sup.next_deadline().unwrap().duration_since(now).as_millis(),
            250
        );
        drop(sup);
        assert_eq!(rec.spawned.len(), 5);
    }

    #[test]
    fn binaries_are_measured_once_before_the_first_start() {
        let mut rec = Recorder::default();
        let measured = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let seen = measured.clone();
        let now = Instant::now();
        let mut sup = Supervisor::new(
            &mut rec,
            vec![
                service("a", RestartPolicy::Always),
                service("bad", RestartPolicy::Always),
            ],
            Backoff::default(),
        )
        .with_measure(Box::new(move |s: &ServiceConfig| {
            seen.borrow_mut().push(s.name.clone());
            if s.name == "bad" {
                Err("I/O error".into())
            } else {
                Ok(())
            }
        }));
        sup.tick(now);
        sup.on_exit(Pid::from_raw(101), Exit::Code(1), now);
        let later = now + Duration::from_secs(1);
        sup.tick(later);
        drop(sup);
        // "a" measured once though started twice; "bad" never started, measured again on retry.
        assert_eq!(*measured.borrow(), vec!["a", "bad", "bad"]);
        assert_eq!(rec.spawned, vec!["a", "a"]);
    }

    #[test]
    fn unknown_pids_are_not_owned() {
        let mut rec = Recorder::default();
        let mut sup = Supervisor::new(&mut rec, vec![], Backoff::default());
        assert!(!sup.on_exit(Pid::from_raw(7), Exit::Code(0), Instant::now()));
    }

    #[test]
    fn never_and_on_failure_end_the_service() {
        let mut rec = Recorder::default();
        let now = Instant::now();
        let mut sup = Supervisor::new(
            &mut rec,
            vec![
                service("once", RestartPolicy::Never),
                service("job", RestartPolicy::OnFailure),
            ],
            Backoff::default(),
        );
        sup.tick(now);
        sup.on_exit(Pid::from_raw(101), Exit::Code(3), now);
        sup.on_exit(Pid::from_raw(102), Exit::Code(0), now);
        assert_eq!(sup.next_deadline(), None);
    }

    #[test]
    fn spawn_failure_is_retried_with_backoff() {
        let mut rec = Recorder {
            fail_spawn: true,
            ..Default::default()
        };
        let now = Instant::now();
        let mut sup = Supervisor::new(
            &mut rec,
            vec![service("missing", RestartPolicy::Always)],
            Backoff::default(),
        );
        sup.tick(now);
        assert_eq!(
            sup.next_deadline().unwrap().duration_since(now).as_millis(),
            250
        );
    }

    #[test]
    fn stop_is_reverse_order_term_then_kill() {
        let mut rec = Recorder::default();
        let t0 = Instant::now();
        let mut sup = Supervisor::new(
            &mut rec,
            vec![
                service("containerd", RestartPolicy::Always),
                service("kubelet", RestartPolicy::Always),
            ],
            Backoff::default(),
        );
        sup.tick(t0);
        sup.begin_stop(t0);
        // kubelet (pid 102) first.
        assert!(!sup.stopped());
        assert!(sup.on_exit(Pid::from_raw(102), Exit::Signal(Signal::SIGTERM), t0));
        // containerd ignores SIGTERM: SIGKILL after its timeout.
        let deadline = sup.next_deadline().unwrap();
        assert_eq!(deadline.duration_since(t0).as_millis(), 1000);
        sup.tick(deadline);
        assert!(sup.on_exit(Pid::from_raw(101), Exit::Signal(Signal::SIGKILL), deadline));
        assert!(sup.stopped());
        drop(sup);
        assert_eq!(
            rec.signals,
            vec![
                (102, Signal::SIGTERM),
                (101, Signal::SIGTERM),
                (101, Signal::SIGKILL)
            ]
        );
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
