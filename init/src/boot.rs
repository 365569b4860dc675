//! The boot as an ordered list of phases. Each phase logs its start and its end in one fixed
//! form (`cvm-init: phase <name> ok <ms>ms` or `cvm-init: phase <name> failed: <reason>`);
//! a failed phase goes to the fatal path.

use std::path::{Path, PathBuf};
use std::time::Instant;

use log::LevelFilter;

use crate::config::{self, BootOptions, ConfigFile};
use crate::disk::discover::Roots;
use crate::fatal::{self, fatal};
use crate::logger;
use crate::modules::{self, ModuleIndex};
use crate::mounts;
use crate::power;
use crate::root;
use crate::runtime::{self, Runtime};
use crate::shutdown;
use crate::supervise::{Backoff, OsProcesses, Supervisor};
use crate::sys::{Linux, System};

/// Runs one phase: logs start and end, and sends a failure to the fatal path.
pub fn phase<T, E>(name: &str, f: impl FnOnce() -> Result<T, E>) -> T
where
    E: std::error::Error + 'static,
{
    log::info!("phase {name} start");
    #[cfg(feature = "test-hooks")]
    test_hooks::maybe_panic(name);
    let started = Instant::now();
    match f() {
        Ok(value) => {
            log::info!("phase {name} ok {}ms", started.elapsed().as_millis());
            value
        }
        Err(err) => {
            let reason = logger::chain(&err);
            log::error!("phase {name} failed: {reason}");
            fatal(&format!("phase {name} failed: {reason}"))
        }
    }
}

#[cfg(feature = "test-hooks")]
pub mod test_hooks {
    //! Test builds only: `cvm.test-panic=<phase>` panics at the start of that phase.
    use std::sync::Mutex;

    pub static PANIC_IN: Mutex<Option<String>> = Mutex::new(None);

    pub fn maybe_panic(phase: &str) {
        let wanted = PANIC_IN.lock().map(|p| p.clone()).unwrap_or(None);
        if wanted.as_deref() == Some(phase) {
            panic!("test hook: cvm.test-panic={phase}");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read /proc/cmdline")]
    Cmdline(#[source] std::io::Error),
    #[error(transparent)]
    Options(#[from] config::CmdlineError),
    #[error(transparent)]
    File(#[from] config::ConfigFileError),
}

#[derive(Debug, thiserror::Error)]
pub enum ModulesPhaseError {
    #[error("cannot tell the kernel release")]
    Release(#[source] nix::errno::Errno),
    #[error(transparent)]
    Module(#[from] modules::ModuleError),
}

fn read_cmdline() -> Result<BootOptions, ConfigError> {
    let cmdline = std::fs::read("/proc/cmdline").map_err(ConfigError::Cmdline)?;
    // A debug boot holds on a fatal error even when the rest of the line is malformed.
    fatal::set_hold(config::cmdline_has_debug(&cmdline));
    Ok(config::parse_cmdline(&cmdline)?)
}

/// The configuration file of the verified root (read after the switch, so it is as trusted
/// as the root hash).
fn read_config_file() -> Result<ConfigFile, ConfigError> {
    Ok(config::load_config_file(Path::new(config::CONFIG_PATH))?)
}

fn load_modules(sys: &dyn System, wanted: &[String]) -> Result<Vec<String>, ModulesPhaseError> {
    let release = nix::sys::utsname::uname()
        .map_err(ModulesPhaseError::Release)?
        .release()
        .to_string_lossy()
        .into_owned();
    let dir = PathBuf::from("/lib/modules").join(&release);
    let index = ModuleIndex::load(sys, &dir, &release)?;
    Ok(index.load_all(sys, wanted)?)
}

/// Never returns: PID 1 ends in reboot(2).
pub fn run() -> ! {
    fatal::install_panic_hook();
    logger::init(LevelFilter::Info);
    log::info!("starting version {}", crate::VERSION);
    let boot_started = Instant::now();
    let sys = Linux;
    let signals = match runtime::block_signals() {
        Ok(fd) => fd,
        Err(e) => fatal(&format!("cannot block signals and open a signalfd: {e}")),
    };
    // ctrl-alt-del becomes SIGINT (an orderly reboot) instead of an immediate restart.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        log::warn!("cannot disable ctrl-alt-del: {e}");
    }

    phase("mounts", || mounts::mount_early(&sys));
    logger::attach_kmsg();
    // Boot lines come in bursts: the default rate limit of /dev/kmsg would drop some.
    let _ = sys.write(Path::new("/proc/sys/kernel/printk_devkmsg"), b"on\n");

    let options = phase("config", read_cmdline);
    let options = &options;
    log::set_max_level(options.log_level);
    #[cfg(feature = "test-hooks")]
    {
        *test_hooks::PANIC_IN.lock().unwrap() = options.test_panic.clone();
    }
    if options.debug {
        log::warn!("cvm.debug is set: a fatal error holds the machine instead of powering off");
    }

    let mut wanted: Vec<String> = modules::REQUIRED.iter().map(|m| m.to_string()).collect();
    wanted.extend(options.modules.iter().cloned());
    let loaded = phase("modules", || load_modules(&sys, &wanted));
    log::info!("modules loaded: {}", loaded.join(" "));
    phase("configfs", || mounts::mount_one(&sys, &mounts::CONFIGFS));

    let verified = phase("verity-root", || {
        root::set_up_verity(options, &Roots::default())
    });
    phase("mount-root", || root::mount_root(&sys, &verified.device));
    phase("switch-root", || root::switch_root(&sys));

    let config_file = phase("config-file", read_config_file);
    if !config_file.modules.is_empty() {
        // From the verified root's /lib/modules: the initramfs is gone.
        let loaded = phase("modules-late", || load_modules(&sys, &config_file.modules));
        log::info!("modules loaded: {}", loaded.join(" "));
    }

    let buttons = phase("power-button", || {
        let buttons =
            power::find_power_buttons(Path::new("/sys/class/input"), Path::new("/dev/input"));
        if buttons.is_empty() {
            log::warn!("no power button found: only signals can stop this machine");
        }
        for b in &buttons {
            log::info!("listening for the power key on: {}", b.name);
        }
        Ok::<_, std::convert::Infallible>(buttons)
    });

    let supervisor = phase("services", || {
        let mut supervisor = Supervisor::new(
            OsProcesses,
            config_file.services.clone(),
            Backoff::default(),
        );
        supervisor.tick(Instant::now());
        Ok::<_, std::convert::Infallible>(supervisor)
    });
    let mut runtime = Runtime::new(signals, buttons, supervisor);
    log::info!("boot complete in {}ms", boot_started.elapsed().as_millis());
    log::info!("ready");

    let action = runtime.run();
    log::info!(
        "services stopped; reaped {} orphaned processes since boot",
        runtime.orphans_reaped
    );
    drop(runtime);
    shutdown::finish(action, None)
}
