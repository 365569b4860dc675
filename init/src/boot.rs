//! The boot as an ordered list of phases. Each phase logs its start and its end in one fixed
//! form (`cvm-init: phase <name> ok <ms>ms` or `cvm-init: phase <name> failed: <reason>`);
//! a failed phase goes to the fatal path.

use std::path::{Path, PathBuf};
use std::time::Instant;

use log::LevelFilter;

use std::cell::RefCell;
use std::rc::Rc;

use cvm_formats::event::{Event, Phase};

use crate::config::{self, BootOptions, ConfigFile};
use crate::devices;
use crate::disk::discover::Roots;
use crate::fatal::{self, fatal};
use crate::logger;
use crate::measure::{MeasureError, Measurer};
use crate::modules::{self, ModuleIndex};
use crate::mounts;
use crate::power;
use crate::root;
use crate::runtime::{self, Runtime};
use crate::shutdown;
use crate::state_disk;
use crate::supervise::{Backoff, OsProcesses, Supervisor};
use crate::sys::{Linux, System};
use crate::tee::{self, TeeError};

/// Runs one phase: logs start and end, and sends a failure to the fatal path.
pub fn phase<T, E>(name: &str, f: impl FnOnce() -> Result<T, E>) -> T
where
    E: std::error::Error + 'static,
{
    log::info!("phase {name} start");
    #[cfg(feature = "test-hooks")]
    crate::test_hooks::maybe_panic(name);
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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read /proc/cmdline")]
    Cmdline(#[source] std::io::Error),
    #[error(transparent)]
    Options(#[from] config::CmdlineError),
    #[error(transparent)]
    File(#[from] config::ConfigFileError),
    #[error(transparent)]
    Measure(#[from] MeasureError),
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
/// as the root hash); `None` when there is none.
fn read_config_bytes() -> Result<Option<Vec<u8>>, ConfigError> {
    Ok(config::read_config_bytes(Path::new(config::CONFIG_PATH))?)
}

fn parse_config(bytes: Option<Vec<u8>>) -> Result<ConfigFile, ConfigError> {
    Ok(config::parse_config_bytes(
        Path::new(config::CONFIG_PATH),
        bytes.as_deref(),
    )?)
}

#[derive(Debug, thiserror::Error)]
pub enum RootPhaseError {
    #[error(transparent)]
    Measure(MeasureError),
    #[error(transparent)]
    Root(root::RootError),
}

#[derive(Debug, thiserror::Error)]
pub enum MeasureStartError {
    #[error("cannot read /proc/cmdline")]
    Cmdline(#[source] std::io::Error),
    #[error(transparent)]
    Tee(#[from] TeeError),
    #[error(transparent)]
    Measure(#[from] MeasureError),
}

/// Opens the TEE backend and the log, and measures the start of the boot and its options.
fn start_measuring(options: &BootOptions) -> Result<Measurer, MeasureStartError> {
    let cmdline = std::fs::read("/proc/cmdline").map_err(MeasureStartError::Cmdline)?;
    let log = Path::new(cvm_formats::jsonseq::LOG_PATH);
    let backend = tee::open(options.tee, &tee::Probe::default(), log)?;
    if backend.tee() == tee::Tee::None {
        log::warn!("cvm.tee=none: this boot is not measured");
    }
    let mut measurer = Measurer::new(backend, log)?;
    log::info!("measuring into {} (log {})", measurer.tee(), log.display());
    measurer.measure(&Event::Phase(Phase::EnterInitrd))?;
    measurer.measure(&Event::BootOptions(cvm_formats::event::cvm_options(
        &cmdline,
    )))?;
    Ok(measurer)
}

/// Prints the registers as the TEE reports them, for operators and tests.
fn report_registers(measurer: &mut Measurer) {
    match measurer.read_back() {
        Ok(values) => {
            for v in values {
                let hex: String = v.value.iter().map(|b| format!("{b:02x}")).collect();
                log::info!("register {} {} {hex}", v.register, v.bank);
            }
        }
        Err(e) => log::warn!("cannot read the registers back: {}", logger::chain(&e)),
    }
    log::info!("{} events measured", measurer.events);
}

fn load_modules(
    sys: &dyn System,
    wanted: &[String],
    optional: &[&str],
) -> Result<(Vec<String>, ModuleIndex), ModulesPhaseError> {
    let index = running_kernels_modules(sys)?;
    let mut loaded = index.load_all(sys, wanted)?;
    // The TEE guest drivers refuse machines that are not their TEE: best effort, and not tried
    // where the kernel itself found no such TEE (each refused load costs tens of milliseconds).
    for optional in optional {
        if let Some(why) = not_this_tee(optional) {
            log::info!("optional module {optional} not loaded: {why}");
            continue;
        }
        match index.load_all(sys, &[optional.to_string()]) {
            Ok(more) => loaded.extend(
                more.into_iter()
                    .filter(|m| !loaded.contains(m))
                    .collect::<Vec<_>>(),
            ),
            Err(e) => log::info!(
                "optional module {optional} not loaded: {}",
                logger::chain(&e)
            ),
        }
    }
    Ok((loaded, index))
}

/// The index of the running kernel's modules in /lib/modules (the initramfs's before
/// switch_root, the verified root's after).
fn running_kernels_modules(sys: &dyn System) -> Result<ModuleIndex, ModulesPhaseError> {
    let release = nix::sys::utsname::uname()
        .map_err(ModulesPhaseError::Release)?
        .release()
        .to_string_lossy()
        .into_owned();
    let dir = PathBuf::from("/lib/modules").join(&release);
    Ok(ModuleIndex::load(sys, &dir, &release)?)
}

/// A thread that loads opened modules while the boot goes on; [`wait_for_modules`] joins it.
fn load_meanwhile(
    name: &str,
    pending: modules::Pending,
) -> std::thread::JoinHandle<Result<modules::Loaded, modules::ModuleError>> {
    log::info!("modules loading meanwhile: {}", pending.names().join(" "));
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || pending.load())
        .unwrap_or_else(|e| fatal(&format!("cannot start the thread that loads modules: {e}")))
}

/// Waits for a [`load_meanwhile`] thread and says what it loaded; a required module it could
/// not load is the error.
fn wait_for_modules(
    thread: std::thread::JoinHandle<Result<modules::Loaded, modules::ModuleError>>,
) -> Result<(), modules::ModuleError> {
    let loaded = thread
        .join()
        .unwrap_or(Err(modules::ModuleError::Background))?;
    for note in &loaded.notes {
        log::info!("{note}");
    }
    log::info!("modules loaded meanwhile: {}", loaded.names.join(" "));
    Ok(())
}

/// Why a TEE guest driver cannot bind here, from what the kernel decided at boot: it registers
/// the `sev-guest` platform device only in an SEV-SNP guest (its own check of the SEV status
/// MSR), and sets the `tdx_guest` CPU flag only in a TDX guest; the drivers check the same.
fn not_this_tee(module: &str) -> Option<&'static str> {
    match module {
        "sev_guest" if !Path::new("/sys/bus/platform/devices/sev-guest").exists() => {
            Some("the kernel found no SEV-SNP (no sev-guest platform device)")
        }
        "tdx_guest"
            if !std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
                info.lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| f == "tdx_guest"))
            }) =>
        {
            Some("the kernel found no TDX (no tdx_guest CPU flag)")
        }
        _ => None,
    }
}

/// Drivers for the disks and NICs present, then a thread for those that appear later.
fn start_device_drivers(index: ModuleIndex, loaded: &[String], allowed: &[String]) {
    let sys_bus = Path::new("/sys/bus");
    // Opened before the scan, so that a device added meanwhile is not missed.
    let events = match devices::Uevents::open() {
        Ok(events) => Some(events),
        Err(e) => {
            log::warn!(
                "device drivers: no uevent socket ({e}): only the devices present now get drivers"
            );
            None
        }
    };
    let held = devices::HeldModules::open(&index, allowed);
    let mut drivers = devices::Drivers::new(index, held, loaded, allowed);
    let found = devices::coldplug(&mut drivers, sys_bus);
    if found.is_empty() {
        log::info!("device drivers: none loaded");
    } else {
        let list: Vec<String> = found
            .iter()
            .map(|(driver, device)| format!("{driver} for {device}"))
            .collect();
        log::info!("device drivers: {}", list.join(", "));
    }
    if let Some(events) = events {
        let spawned = std::thread::Builder::new()
            .name("device-drivers".into())
            .spawn(move || devices::watch(drivers, events, sys_bus));
        if let Err(e) = spawned {
            log::warn!("device drivers: cannot start the thread for later devices: {e}");
        }
    }
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
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
        *crate::test_hooks::PANIC_IN.lock().unwrap() = options.test_panic.clone();
        *crate::test_hooks::SNP_EMULATOR.lock().unwrap() = options.test_snp_emulator.clone();
    }
    if options.debug {
        log::warn!("cvm.debug is set: a fatal error holds the machine instead of powering off");
    }

    // What the root needs now; the rest is opened here and loaded by a thread meanwhile.
    let mut wanted = strings(modules::REQUIRED_BEFORE_ROOT);
    wanted.extend(options.modules.iter().cloned());
    let (loaded, index, pending) = phase("modules", || {
        let (loaded, index) = load_modules(&sys, &wanted, modules::OPTIONAL_BEFORE_ROOT)?;
        let pending = index.open_for_later(
            &strings(modules::REQUIRED_AFTER_ROOT),
            &strings(modules::OPTIONAL_AFTER_ROOT),
        )?;
        Ok::<_, ModulesPhaseError>((loaded, index, pending))
    });
    log::info!("modules loaded: {}", loaded.join(" "));
    let later_modules = load_meanwhile("modules", pending);
    phase("devices", || {
        start_device_drivers(index, &loaded, &options.drivers);
        Ok::<(), std::convert::Infallible>(())
    });
    phase("configfs", || mounts::mount_one(&sys, &mounts::CONFIGFS));

    // From here on every decision is measured before it takes effect.
    let measurer = Rc::new(RefCell::new(phase("measure", || start_measuring(options))));
    let measure = |event: Event| measurer.borrow_mut().measure(&event);

    let verified = phase("verity-root", || {
        if let Some(hash) = options.root_hash {
            measure(Event::RootHash(hash)).map_err(RootPhaseError::Measure)?;
        }
        root::set_up_verity(options, &Roots::default()).map_err(RootPhaseError::Root)
    });
    phase("mount-root", || root::mount_root(&sys, &verified.device));
    phase("switch-root", || {
        state_disk::keep_signed_policy_files();
        root::switch_root(&sys).map_err(RootPhaseError::Root)?;
        measure(Event::Phase(Phase::LeaveInitrd)).map_err(RootPhaseError::Measure)
    });

    let config_file = phase("config-file", || {
        let bytes = read_config_bytes()?;
        measure(Event::ConfigFile(bytes.clone()))?;
        parse_config(bytes)
    });
    // The configuration's modules, from the verified root's /lib/modules (the initramfs is
    // gone): opened now, so that a missing one stops the boot here, and loaded by a thread
    // while the network and the state disk are set up.
    let late_modules = (!config_file.modules.is_empty()).then(|| {
        let pending = phase("modules-late", || {
            let index = running_kernels_modules(&sys)?;
            Ok::<_, ModulesPhaseError>(index.open_for_later(&config_file.modules, &[])?)
        });
        load_meanwhile("modules-late", pending)
    });
    let name_from = phase("network", || {
        crate::net::bring_up(config_file.network.as_ref(), &options.net)
    });
    // The state disk (a later issue) is measured here; without one, its absence is. Then the
    // seal barrier: nothing sealed to the values so far unseals later in this boot.
    phase("state", || {
        wait_for_modules(later_modules)?;
        match &config_file.state {
            None => measure(Event::StateDisk(None))?,
            Some(cfg) => {
                let tee = measurer.borrow().tee();
                let hardware = tee::hardware(&tee::Probe::default());
                if state_disk::tpm_key_decision(cfg, tee, hardware)?
                    == state_disk::VtpmUse::AlsoExtend
                {
                    let vtpm = tee::TpmBackend::open().map_err(state_disk::StateError::Mirror)?;
                    measurer.borrow_mut().also_extend(vtpm)?;
                }
                let opened =
                    state_disk::set_up(cfg, config_file.kbs.as_ref(), tee, &sys, &mut |event| {
                        measure(event)
                    })?;
                log::info!(
                    "state disk {} ({}) mounted at {}{}",
                    opened.device,
                    opened.uuid,
                    cfg.mount.display(),
                    if opened.formatted {
                        ", formatted on this boot"
                    } else {
                        ""
                    }
                );
                if name_from == crate::net::NameFrom::Generated {
                    crate::net::files::rename(&opened.node_name)?;
                    log::info!("node name {} (from the state disk's key)", opened.node_name);
                }
            }
        }
        measure(Event::SealBarrier)?;
        Ok::<_, state_disk::StateError>(measure(Event::Phase(Phase::Sysinit))?)
    });
    if let Some(late_modules) = late_modules {
        // Before any service starts: a required module that did not load stops the boot here.
        phase("modules-late-wait", || wait_for_modules(late_modules));
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
        let workload_measurer = measurer.clone();
        let digests = crate::service_digests::ServiceDigests::load(
            Path::new("/"),
            config_file.services.iter().map(|s| s.path.as_path()),
        );
        if !digests.is_empty() {
            log::info!(
                "services: the digests of {} of {} binaries from the verified root's manifest",
                digests.len(),
                config_file.services.len()
            );
        }
        let mut supervisor =
            Supervisor::new(
                OsProcesses,
                config_file.services.clone(),
                Backoff::default(),
            )
            .with_measure(Box::new(move |service| {
                let path = service.path.display().to_string();
                let (sha256, _, identity) = digests
                    .sha256(&service.path)
                    .map_err(|e| logger::chain(&e))?;
                let event = Event::Workload {
                    name: service.name.clone(),
                    path,
                    sha256,
                };
                workload_measurer
                    .borrow_mut()
                    .measure(&event)
                    .map_err(|e| logger::chain(&e))?;
                Ok(identity)
            }))
            .with_logs(config_file.service_log_dir.clone().map(|dir| {
                crate::supervise::LogSettings {
                    dir,
                    max_bytes: config_file.service_log_max_bytes,
                }
            }));
        supervisor.tick(Instant::now());
        Ok::<_, std::convert::Infallible>(supervisor)
    });
    // `ready` once every service has started and every readiness socket has accepted: the
    // services that wait for others start from the main loop.
    let ready_measurer = measurer.clone();
    let mut runtime = Runtime::new(signals, buttons, supervisor).on_ready(Box::new(move || {
        phase("measure-ready", || {
            ready_measurer
                .borrow_mut()
                .measure(&Event::Phase(Phase::Ready))?;
            report_registers(&mut ready_measurer.borrow_mut());
            Ok::<_, MeasureError>(())
        });
        log::info!("boot complete in {}ms", boot_started.elapsed().as_millis());
        log::info!("ready");
    }));

    let action = runtime.run();
    log::info!(
        "services stopped; reaped {} orphaned processes since boot",
        runtime.orphans_reaped
    );
    // Close the measurement log: /run unmounts only when nothing holds a file in it.
    drop(runtime);
    drop(measurer);
    shutdown::finish(action, None)
}
