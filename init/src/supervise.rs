//! Supervision of long-running services (containerd and kubelet later): clean start, restart
//! with capped exponential backoff, output forwarded line by line, orderly stop in reverse.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
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

struct Service {
    config: ServiceConfig,
    state: State,
    failures: u32,
    starts: u32,
    /// Measured once, right before the first exec; restarts run the same measured binary.
    measured: bool,
    /// Its readiness socket accepted at least once.
    was_ready: bool,
    /// Killed because it did not become ready in time.
    not_ready: bool,
    log: Option<Rc<RefCell<ServiceLog>>>,
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

/// The real processes: fork and exec with a clean state.
pub struct OsProcesses;

/// Why a service's binary is not run.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not on the verified root (it is on device {found}, the root on {root}): a binary elsewhere can be changed after it was measured")]
    NotOnRoot {
        path: PathBuf,
        found: String,
        root: String,
    },
}

/// Opening a service's binary for exec, and the devices that say where it lives (a trait, so
/// the check is tested without a verity root).
pub trait Binaries {
    /// The file opened for exec, and the device it is on.
    fn open(&self, path: &Path) -> io::Result<(OwnedFd, u64)>;
    /// The device of the root file system (the dm-verity device once the root is switched).
    fn root_device(&self) -> io::Result<u64>;
}

/// The running kernel's files.
pub struct OsBinaries;

impl Binaries for OsBinaries {
    fn open(&self, path: &Path) -> io::Result<(OwnedFd, u64)> {
        use nix::fcntl::OFlag;
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        let st = nix::sys::stat::fstat(&fd)?;
        Ok((fd, st.st_dev))
    }

    fn root_device(&self) -> io::Result<u64> {
        Ok(nix::sys::stat::stat("/")?.st_dev)
    }
}

/// Opens a service's binary and keeps it only if the opened file is on the root's device: the
/// check is made on what was opened (not on the name), and the service is exec'd through this
/// descriptor, so what was checked is what runs.
pub fn open_binary(binaries: &dyn Binaries, path: &Path) -> Result<OwnedFd, BinaryError> {
    let open_err = |source| BinaryError::Open {
        path: path.to_path_buf(),
        source,
    };
    let (fd, device) = binaries.open(path).map_err(open_err)?;
    let root = binaries.root_device().map_err(open_err)?;
    if device != root {
        let show = |d: u64| format!("{}:{}", nix::sys::stat::major(d), nix::sys::stat::minor(d));
        return Err(BinaryError::NotOnRoot {
            path: path.to_path_buf(),
            found: show(device),
            root: show(root),
        });
    }
    Ok(fd)
}

/// execveat(2) of an open binary, everything prepared before the fork: the child only makes
/// the system call. The pointers point into `_args` and `_env`, moved along with them (a
/// `CString`'s bytes do not move with it), null-terminated.
struct ExecPlan {
    binary: OwnedFd,
    _args: Vec<std::ffi::CString>,
    _env: Vec<std::ffi::CString>,
    argv: Vec<usize>,
    envp: Vec<usize>,
}

impl ExecPlan {
    fn new(binary: OwnedFd, service: &ServiceConfig) -> io::Result<Self> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let invalid = |_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in an argument");
        let mut args = vec![CString::new(service.path.as_os_str().as_bytes()).map_err(invalid)?];
        for a in &service.args {
            args.push(CString::new(a.as_str()).map_err(invalid)?);
        }
        let mut env = Vec::new();
        if !service.env.contains_key("PATH") {
            env.push(CString::new(format!("PATH={DEFAULT_PATH}")).map_err(invalid)?);
        }
        for (k, v) in &service.env {
            env.push(CString::new(format!("{k}={v}")).map_err(invalid)?);
        }
        let pointers = |v: &[CString]| {
            v.iter()
                .map(|c| c.as_ptr() as usize)
                .chain([0])
                .collect::<Vec<_>>()
        };
        Ok(ExecPlan {
            argv: pointers(&args),
            envp: pointers(&env),
            binary,
            _args: args,
            _env: env,
        })
    }

    /// Runs in the child: returns only on failure.
    fn exec(&self) -> io::Error {
        // SAFETY: execveat(2) is async-signal-safe; the descriptor is open, and `argv` and
        // `envp` are null-terminated arrays of pointers to NUL-terminated strings owned by
        // `self`, which outlives the call.
        unsafe {
            nix::libc::syscall(
                nix::libc::SYS_execveat,
                self.binary.as_raw_fd(),
                c"".as_ptr(),
                self.argv.as_ptr(),
                self.envp.as_ptr(),
                nix::libc::AT_EMPTY_PATH,
            );
        }
        io::Error::last_os_error()
    }
}

/// The root of the cgroup v2 hierarchy; each service gets `<root>/<name>`.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Creates the service's cgroup, writes its settings, and opens its `cgroup.procs` for the
/// child to join before exec.
fn service_cgroup(service: &ServiceConfig) -> io::Result<File> {
    let dir = Path::new(CGROUP_ROOT).join(&service.name);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let settings = &service.cgroup;
    for (file, value) in [
        ("memory.max", settings.memory_max.map(|v| v.to_string())),
        ("cpu.weight", settings.cpu_weight.map(|v| v.to_string())),
        ("pids.max", settings.pids_max.map(|v| v.to_string())),
    ] {
        if let Some(value) = value {
            std::fs::write(dir.join(file), value).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot set {}/{file}: {e}", dir.display()),
                )
            })?;
        }
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))
}

/// What the child applies to itself between fork and exec, prepared before the fork so
/// that the child does not allocate.
struct ChildSetup {
    cgroup_procs: Option<RawFd>,
    oom_score_adj: Option<Vec<u8>>,
    limits: Vec<(i32, u64)>,
}

impl Processes for OsProcesses {
    fn spawn(&mut self, service: &ServiceConfig) -> io::Result<Spawned> {
        let cgroup = match service_cgroup(service) {
            Ok(file) => Some(file),
            Err(e) if Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() => {
                return Err(e);
            }
            // No cgroup2 mounted (unit tests on a host): run in the current cgroup.
            Err(_) => None,
        };
        let limits = &service.limits;
        let setup = ChildSetup {
            cgroup_procs: cgroup.as_ref().map(|f| f.as_raw_fd()),
            oom_score_adj: service.oom_score_adj.map(|v| v.to_string().into_bytes()),
            limits: [
                (nix::libc::RLIMIT_NOFILE as i32, limits.nofile),
                (nix::libc::RLIMIT_NPROC as i32, limits.nproc),
                (nix::libc::RLIMIT_MEMLOCK as i32, limits.memlock),
                (nix::libc::RLIMIT_CORE as i32, limits.core),
            ]
            .into_iter()
            .filter_map(|(resource, limit)| Some((resource, limit?.raw())))
            .collect(),
        };
        // Checked (on the verified root) and run through the same open file.
        let binary = open_binary(&OsBinaries, &service.path)
            .map_err(|e| io::Error::other(crate::logger::chain(&e)))?;
        let plan = ExecPlan::new(binary, service)?;
        // std sets up the pipes, the working directory and the report of a failed exec; the
        // exec itself is the last step of `pre_exec`, through the descriptor.
        let mut cmd = Command::new(&service.path);
        cmd.env_clear()
            .current_dir(service.workdir.as_deref().unwrap_or(Path::new("/")))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs between fork and exec in a single-threaded child; it only
        // makes async-signal-safe system calls on data prepared before the fork and does not
        // allocate. `cgroup` outlives the spawn, so its descriptor is valid in the child.
        unsafe {
            cmd.pre_exec(move || {
                clean_child_state()?;
                apply_child_setup(&setup)?;
                Err(plan.exec())
            });
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

    fn socket_accepts(&mut self, socket: &Path) -> bool {
        std::os::unix::net::UnixStream::connect(socket).is_ok()
    }
}

/// Joins the cgroup, sets the OOM bias and the limits (in the child, before exec).
fn apply_child_setup(setup: &ChildSetup) -> io::Result<()> {
    use nix::libc;
    // SAFETY: write(2), open(2), close(2) and setrlimit(2) on descriptors and buffers
    // prepared before the fork; all are async-signal-safe and nothing is allocated.
    unsafe {
        if let Some(fd) = setup.cgroup_procs {
            // "0" is the writing process itself.
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(value) = &setup.oom_score_adj {
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let written = libc::write(fd, value.as_ptr().cast(), value.len());
            libc::close(fd);
            if written != value.len() as isize {
                return Err(io::Error::last_os_error());
            }
        }
        for &(resource, value) in &setup.limits {
            let limit = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if libc::setrlimit(resource as _, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
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
        accepting: Rc<RefCell<Vec<PathBuf>>>,
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

    /// Binaries by device: the root on 254:0, /run a tmpfs on 0:23.
    struct FakeBinaries;

    impl Binaries for FakeBinaries {
        fn open(&self, path: &Path) -> io::Result<(OwnedFd, u64)> {
            let device = if path.starts_with("/run") {
                nix::sys::stat::makedev(0, 23)
            } else if path.starts_with("/usr") {
                nix::sys::stat::makedev(254, 0)
            } else {
                return Err(io::ErrorKind::NotFound.into());
            };
            Ok((File::open("/dev/null")?.into(), device))
        }
        fn root_device(&self) -> io::Result<u64> {
            Ok(nix::sys::stat::makedev(254, 0))
        }
    }

    #[test]
    fn only_binaries_on_the_verified_root_are_run() {
        assert!(open_binary(&FakeBinaries, Path::new("/usr/bin/kubelet")).is_ok());
        let e = open_binary(&FakeBinaries, Path::new("/run/payload")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/run/payload is not on the verified root (it is on device 0:23, the root on 254:0): a binary elsewhere can be changed after it was measured"
        );
        let e = open_binary(&FakeBinaries, Path::new("/missing")).unwrap_err();
        assert!(matches!(e, BinaryError::Open { .. }), "{e}");
    }

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
