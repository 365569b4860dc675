//! The operating-system layer of the supervisor: the service's binary, its cgroup, the clean
//! child state, spawn, signals and exec.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::resource::Resource;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{FileIdentity, Processes, Spawned};
use crate::config::ServiceConfig;

/// The environment every service starts with, before its own configured variables.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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
    #[error("{path} is not the file measured before the service's first start (inode {measured} on the root, now inode {found}): something was mounted or moved over it since, so it does not run")]
    Replaced {
        path: PathBuf,
        measured: u64,
        found: u64,
    },
}

/// Opening a service's binary for exec, and the devices that say where it lives (a trait, so
/// the check is tested without a verity root).
pub trait Binaries {
    /// The file opened for exec, and its device and inode.
    fn open(&self, path: &Path) -> io::Result<(OwnedFd, FileIdentity)>;
    /// The device of the root file system (the dm-verity device once the root is switched).
    fn root_device(&self) -> io::Result<u64>;
}

/// The running kernel's files.
pub struct OsBinaries;

impl Binaries for OsBinaries {
    fn open(&self, path: &Path) -> io::Result<(OwnedFd, FileIdentity)> {
        use std::os::unix::fs::MetadataExt;
        let (file, meta) = crate::sys::open_regular_file(path)?;
        Ok((file.into(), (meta.dev(), meta.ino())))
    }

    fn root_device(&self) -> io::Result<u64> {
        Ok(nix::sys::stat::stat("/")?.st_dev)
    }
}

/// Opens a service's binary and keeps it only if the opened file is on the root's device and,
/// once measured, is the file that was measured: the checks are made on what was opened (not
/// on the name), and the service is exec'd through this descriptor, so what was checked is
/// what runs.
pub fn open_binary(
    binaries: &dyn Binaries,
    path: &Path,
    measured: Option<FileIdentity>,
) -> Result<OwnedFd, BinaryError> {
    let open_err = |source| BinaryError::Open {
        path: path.to_path_buf(),
        source,
    };
    let (fd, (device, inode)) = binaries.open(path).map_err(open_err)?;
    let root = binaries.root_device().map_err(open_err)?;
    if device != root {
        let show = |d: u64| format!("{}:{}", nix::sys::stat::major(d), nix::sys::stat::minor(d));
        return Err(BinaryError::NotOnRoot {
            path: path.to_path_buf(),
            found: show(device),
            root: show(root),
        });
    }
    match measured {
        Some(identity) if identity != (device, inode) => Err(BinaryError::Replaced {
            path: path.to_path_buf(),
            measured: identity.1,
            found: inode,
        }),
        _ => Ok(fd),
    }
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
        // Raw execveat(2): nix's wrapper builds its argument arrays, which would allocate in
        // the child after the fork.
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
    limits: Vec<(Resource, u64)>,
}

impl Processes for OsProcesses {
    fn spawn(
        &mut self,
        service: &ServiceConfig,
        measured: Option<FileIdentity>,
    ) -> io::Result<Spawned> {
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
                (Resource::RLIMIT_NOFILE, limits.nofile),
                (Resource::RLIMIT_NPROC, limits.nproc),
                (Resource::RLIMIT_MEMLOCK, limits.memlock),
                (Resource::RLIMIT_CORE, limits.core),
            ]
            .into_iter()
            .filter_map(|(resource, limit)| Some((resource, limit?.raw())))
            .collect(),
        };
        // Checked (on the verified root) and run through the same open file.
        let binary = open_binary(&OsBinaries, &service.path, measured)
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

/// Joins the cgroup, sets the OOM bias and the limits (in the child, before exec). Every call
/// here is async-signal-safe and allocates nothing (the path is a `CStr`, the buffers were
/// prepared before the fork).
fn apply_child_setup(setup: &ChildSetup) -> io::Result<()> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    if let Some(fd) = setup.cgroup_procs {
        // SAFETY: the cgroup's procs file was opened before the fork and the parent keeps it
        // open until the spawn returns, so the descriptor is open for the whole call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        // "0" is the writing process itself.
        if nix::unistd::write(fd, b"0")? != 1 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    if let Some(value) = &setup.oom_score_adj {
        let file = open(
            c"/proc/self/oom_score_adj",
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        if nix::unistd::write(&file, value)? != value.len() {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    for &(resource, value) in &setup.limits {
        nix::sys::resource::setrlimit(resource, value, value)?;
    }
    Ok(())
}

/// Runs in the child before exec: empty signal mask, default dispositions, a new session, and
/// no descriptor beyond 0-2 survives exec.
fn clean_child_state() -> io::Result<()> {
    use nix::libc;
    use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
    for sig in 1..libc::SIGRTMAX() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // Raw signal(2): nix's `Signal` has no real-time signals, which are reset too.
            // SAFETY: SIG_DFL installs no handler; async-signal-safe.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    nix::unistd::setsid()?;
    // Raw close_range(2): nix 0.31 has no wrapper for it.
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: integer arguments only; marks descriptors close-on-exec, touches no memory.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binaries by device: the root on 254:0, /run a tmpfs on 0:23.
    struct FakeBinaries;

    impl Binaries for FakeBinaries {
        fn open(&self, path: &Path) -> io::Result<(OwnedFd, FileIdentity)> {
            // The inode: kubelet's 42, any other file's 7.
            let inode = if path.ends_with("kubelet") { 42 } else { 7 };
            let device = if path.starts_with("/run") {
                nix::sys::stat::makedev(0, 23)
            } else if path.starts_with("/usr") {
                nix::sys::stat::makedev(254, 0)
            } else {
                return Err(io::ErrorKind::NotFound.into());
            };
            Ok((File::open("/dev/null")?.into(), (device, inode)))
        }
        fn root_device(&self) -> io::Result<u64> {
            Ok(nix::sys::stat::makedev(254, 0))
        }
    }

    #[test]
    fn only_binaries_on_the_verified_root_are_run() {
        assert!(open_binary(&FakeBinaries, Path::new("/usr/bin/kubelet"), None).is_ok());
        let e = open_binary(&FakeBinaries, Path::new("/run/payload"), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/run/payload is not on the verified root (it is on device 0:23, the root on 254:0): a binary elsewhere can be changed after it was measured"
        );
        let e = open_binary(&FakeBinaries, Path::new("/missing"), None).unwrap_err();
        assert!(matches!(e, BinaryError::Open { .. }), "{e}");
    }

    #[test]
    fn a_fifo_or_a_device_is_not_opened_as_a_binary_and_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("kubelet");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        for path in [fifo, PathBuf::from("/dev/zero")] {
            let shown = path.display().to_string();
            let result =
                crate::sys::returns_promptly(&shown, move || OsBinaries.open(&path).map(|_| ()));
            let e = result.expect_err("not a binary");
            assert_eq!(e.to_string(), "not a regular file", "{shown}");
        }
    }

    #[test]
    fn a_measured_binary_runs_only_from_the_file_that_was_measured() {
        let root = nix::sys::stat::makedev(254, 0);
        let kubelet = Path::new("/usr/bin/kubelet");
        assert!(open_binary(&FakeBinaries, kubelet, Some((root, 42))).is_ok());
        // Another file of the verified root now at the path (a bind mount over it by a
        // service that ran first): same device, another inode.
        let e = open_binary(&FakeBinaries, kubelet, Some((root, 41))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/usr/bin/kubelet is not the file measured before the service's first start (inode 41 on the root, now inode 42): something was mounted or moved over it since, so it does not run"
        );
    }
}
