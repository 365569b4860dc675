//! Supervision of long-running services (containerd and kubelet later): clean start, restart
//! with capped exponential backoff, output forwarded line by line, orderly stop in reverse.
//!
//! This module is the state machine (what runs, what restarts when, what stops); `output`
//! forwards the services' output and rotates their logs; `os` is the operating-system layer
//! (the binary, the clean child state, spawn, signals, exec).

mod os;
mod output;

pub use os::{open_binary, Binaries, BinaryError, OsBinaries, OsProcesses};
pub use output::{OutputForwarder, ServiceLog};

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::config::{RestartPolicy, ServiceConfig};

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

/// A file as the kernel names it: (device, inode). On the read-only verified root the same
/// identity is the same bytes.
pub type FileIdentity = (u64, u64);

/// Starting and signalling processes; the real one forks, tests record.
pub trait Processes {
    /// Starts `service`; with `measured`, only from that file (the one measured before the
    /// service's first start), refusing whatever else its path leads to now.
    fn spawn(
        &mut self,
        service: &ServiceConfig,
        measured: Option<FileIdentity>,
    ) -> io::Result<Spawned>;
    fn signal_group(&mut self, pid: Pid, signal: Signal);
    /// True when the unix socket accepts a connection.
    fn socket_accepts(&mut self, socket: &Path) -> bool;
}

/// How often a readiness socket is tried while a service comes up.
const READY_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not started yet: starts at the first tick.
    Pending,
    /// Waiting to be started at this instant.
    Waiting(Instant),
    Running {
        pid: Pid,
        since: Instant,
        /// Its readiness socket accepted (or it has none).
        ready: bool,
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

struct Service {
    config: ServiceConfig,
    state: State,
    failures: u32,
    starts: u32,
    /// Measured once, right before the first exec; restarts run the same measured binary.
    measured: bool,
    /// The file measured (without a measure hook, none): every start runs only it.
    identity: Option<FileIdentity>,
    /// Its readiness socket accepted at least once.
    was_ready: bool,
    /// Killed because it did not become ready in time.
    not_ready: bool,
    log: Option<Rc<RefCell<ServiceLog>>>,
}

/// Measures a service's binary before its first exec and says which file it measured; an
/// error keeps it from starting.
pub type MeasureHook = Box<dyn FnMut(&ServiceConfig) -> Result<FileIdentity, String>>;

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

/// The log directory and size limit for service output.
pub struct LogSettings {
    pub dir: PathBuf,
    pub max_bytes: u64,
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
                    identity: None,
                    was_ready: false,
                    not_ready: false,
                    log: None,
                })
                .collect(),
            backoff,
            stopping: false,
            outputs: Vec::new(),
            measure: None,
        }
    }

    /// Writes each service's output to `<dir>/<name>.log` as well (the directory is created).
    pub fn with_logs(mut self, settings: Option<LogSettings>) -> Self {
        let Some(settings) = settings else {
            return self;
        };
        if let Err(e) = crate::nofollow::open_dir(&settings.dir, Some(0o755)) {
            log::warn!(
                "cannot create the service log directory {}: {e}; output goes to the console only",
                settings.dir.display()
            );
            return self;
        }
        for s in &mut self.services {
            let path = settings.dir.join(format!("{}.log", s.config.name));
            s.log = Some(Rc::new(RefCell::new(ServiceLog::open(
                path,
                settings.max_bytes,
            ))));
        }
        self
    }

    /// True once every service has started at least once and each readiness socket has
    /// accepted at least once: the node is up.
    pub fn all_ready(&self) -> bool {
        self.services
            .iter()
            .all(|s| s.starts > 0 && (s.config.ready_socket.is_none() || s.was_ready))
    }

    fn dependencies_ready(&self, i: usize) -> bool {
        self.services[i].config.after.iter().all(|name| {
            self.services.iter().any(|s| {
                &s.config.name == name && matches!(s.state, State::Running { ready: true, .. })
            })
        })
    }

    /// Tries the readiness sockets of services coming up; one that overran its timeout is
    /// killed, and its restart policy applies.
    fn probe_readiness(&mut self, now: Instant) {
        for s in &mut self.services {
            let State::Running {
                pid,
                since,
                ready: false,
            } = s.state
            else {
                continue;
            };
            let Some(socket) = s.config.ready_socket.as_deref() else {
                continue;
            };
            if self.processes.socket_accepts(socket) {
                log::info!(
                    "service {} ready: {} accepts connections after {}ms",
                    s.config.name,
                    socket.display(),
                    now.duration_since(since).as_millis()
                );
                s.state = State::Running {
                    pid,
                    since,
                    ready: true,
                };
                s.was_ready = true;
            } else if now.duration_since(since) >= Duration::from_millis(s.config.ready_timeout_ms)
                && !s.not_ready
            {
                log::error!(
                    "service {} not ready: {} did not accept connections within {}ms; killing it",
                    s.config.name,
                    socket.display(),
                    s.config.ready_timeout_ms
                );
                s.not_ready = true;
                self.processes.signal_group(pid, Signal::SIGKILL);
            }
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
        self.probe_readiness(now);
        // First starts follow the file's order strictly, so that the workload measurements
        // come in the order a prediction from the file expects: a service waiting for its
        // dependencies holds back the ones after it.
        let mut held = false;
        for i in 0..self.services.len() {
            let due = match self.services[i].state {
                State::Pending => !held,
                State::Waiting(at) => at <= now,
                _ => false,
            };
            if due && self.dependencies_ready(i) {
                self.start(i, now);
            } else if self.services[i].state == State::Pending {
                held = true;
            }
        }
    }

    fn start(&mut self, i: usize, now: Instant) {
        let service = &mut self.services[i];
        service.starts += 1;
        if !service.measured {
            if let Some(measure) = self.measure.as_mut() {
                match measure(&service.config) {
                    Ok(identity) => service.identity = Some(identity),
                    Err(e) => {
                        log::error!(
                            "cannot measure service {} ({}), so it does not start: {e}",
                            service.config.name,
                            service.config.path.display()
                        );
                        self.after_exit(i, None, now, Duration::ZERO);
                        return;
                    }
                }
            }
            service.measured = true;
        }
        match self.processes.spawn(&service.config, service.identity) {
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
                let ready = service.config.ready_socket.is_none();
                service.state = State::Running {
                    pid: spawned.pid,
                    since: now,
                    ready,
                };
                service.not_ready = false;
                for fd in spawned.outputs {
                    self.outputs.push(
                        OutputForwarder::new(&service.config.name, fd)
                            .with_log(service.log.clone()),
                    );
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
        let what = match exit {
            None => "failed to start".to_string(),
            Some(e) if service.not_ready => format!("was killed for not becoming ready ({e})"),
            Some(e) => format!("exited: {e}"),
        };
        let failed = !exit.is_some_and(Exit::success) || service.not_ready;
        if ran >= backoff.stable {
            service.failures = 0;
        }
        if failed {
            service.failures += 1;
        }
        let exit_for_policy = if service.not_ready { None } else { exit };
        if self.stopping || !should_restart(service.config.restart, exit_for_policy) {
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
                State::Running {
                    ready: false,
                    since,
                    ..
                } if !self.stopping => Some(Instant::now().max(since) + READY_POLL),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Recorder {
        next_pid: i32,
        spawned: Vec<String>,
        /// The measured file each start was held to.
        identities: Vec<Option<FileIdentity>>,
        signals: Vec<(i32, Signal)>,
        fail_spawn: bool,
        accepting: Rc<RefCell<Vec<PathBuf>>>,
    }

    impl Processes for &mut Recorder {
        fn spawn(
            &mut self,
            service: &ServiceConfig,
            measured: Option<FileIdentity>,
        ) -> io::Result<Spawned> {
            if self.fail_spawn {
                return Err(io::Error::from(io::ErrorKind::NotFound));
            }
            self.next_pid += 1;
            self.spawned.push(service.name.clone());
            self.identities.push(measured);
            Ok(Spawned {
                pid: Pid::from_raw(100 + self.next_pid),
                outputs: Vec::new(),
            })
        }
        fn signal_group(&mut self, pid: Pid, signal: Signal) {
            self.signals.push((pid.as_raw(), signal));
        }
        fn socket_accepts(&mut self, socket: &Path) -> bool {
            self.accepting.borrow().iter().any(|s| s == socket)
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
            workdir: None,
            ready_socket: None,
            ready_timeout_ms: 1000,
            after: vec![],
            oom_score_adj: None,
            limits: Default::default(),
            cgroup: Default::default(),
        }
    }

    fn containerd_and_kubelet() -> Vec<ServiceConfig> {
        let mut containerd = service("containerd", RestartPolicy::Always);
        containerd.ready_socket = Some("/run/containerd/containerd.sock".into());
        let mut kubelet = service("kubelet", RestartPolicy::Always);
        kubelet.after = vec!["containerd".into()];
        vec![containerd, kubelet]
    }

    #[test]
    fn a_service_waits_for_the_readiness_of_what_it_comes_after() {
        let mut rec = Recorder::default();
        let accepting = rec.accepting.clone();
        let t0 = Instant::now();
        let mut sup = Supervisor::new(&mut rec, containerd_and_kubelet(), Backoff::default());
        sup.tick(t0);
        assert!(!sup.all_ready());
        // Polled while the socket is not there yet.
        let next = sup.next_deadline().unwrap();
        assert!(next <= Instant::now() + READY_POLL);
        sup.tick(t0 + Duration::from_millis(100));
        assert!(!sup.all_ready());
        accepting
            .borrow_mut()
            .push("/run/containerd/containerd.sock".into());
        sup.tick(t0 + Duration::from_millis(150));
        // Ready now; kubelet starts on the same tick.
        assert!(sup.all_ready());
        drop(sup);
        assert_eq!(rec.spawned, vec!["containerd", "kubelet"]);
    }

    #[test]
    fn first_starts_keep_the_file_order() {
        let mut rec = Recorder::default();
        let accepting = rec.accepting.clone();
        let t0 = Instant::now();
        let mut services = containerd_and_kubelet();
        services.push(service("independent", RestartPolicy::Always));
        let mut sup = Supervisor::new(&mut rec, services, Backoff::default());
        sup.tick(t0);
        accepting
            .borrow_mut()
            .push("/run/containerd/containerd.sock".into());
        sup.tick(t0 + READY_POLL);
        drop(sup);
        // "independent" needs nothing, yet starts after kubelet, which waited.
        assert_eq!(rec.spawned, vec!["containerd", "kubelet", "independent"]);
    }

    #[test]
    fn a_service_that_is_not_ready_in_time_is_killed_and_restarted() {
        let mut rec = Recorder::default();
        let t0 = Instant::now();
        let mut sup = Supervisor::new(&mut rec, containerd_and_kubelet(), Backoff::default());
        sup.tick(t0);
        sup.tick(t0 + Duration::from_millis(999));
        let late = t0 + Duration::from_millis(1000);
        sup.tick(late);
        sup.tick(late + Duration::from_millis(50));
        // The kill is sent once; its exit follows the restart policy as a failure.
        assert!(sup.on_exit(Pid::from_raw(101), Exit::Signal(Signal::SIGKILL), late));
        assert_eq!(
            sup.next_deadline()
                .unwrap()
                .duration_since(late)
                .as_millis(),
            250
        );
        sup.tick(late + Duration::from_millis(250));
        assert!(!sup.all_ready());
        drop(sup);
        assert_eq!(rec.signals, vec![(101, Signal::SIGKILL)]);
        // kubelet never started: containerd never became ready.
        assert_eq!(rec.spawned, vec!["containerd", "containerd"]);
    }

    #[test]
    fn a_not_ready_kill_of_a_never_service_ends_it() {
        let mut rec = Recorder::default();
        let t0 = Instant::now();
        let mut services = containerd_and_kubelet();
        services[0].restart = RestartPolicy::Never;
        let mut sup = Supervisor::new(&mut rec, services, Backoff::default());
        sup.tick(t0);
        sup.tick(t0 + Duration::from_millis(1000));
        assert!(sup.on_exit(Pid::from_raw(101), Exit::Code(0), t0));
        assert_eq!(sup.next_deadline(), None);
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
                Ok((254, 42))
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
        // The restart too runs only the file measured at the first start.
        assert_eq!(rec.identities, vec![Some((254, 42)); 2]);
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
}
