//! Drivers for this machine's disks and NICs, chosen by the devices it has.
//!
//! The initramfs carries the drivers of QEMU and of the clouds ([`HARDWARE`]); a driver is
//! loaded when a device asks for it, as the kernel publishes every device's `modalias` and
//! modules.alias maps those to modules. There is no udev: at boot every `modalias` under
//! `/sys/bus` is read (again after each round that loaded something, since a bus driver adds
//! devices), and a kernel uevent socket, opened before that scan, brings the devices that
//! appear later (a Hyper-V VMBus offers its disks after its driver loads; a cloud attaches a
//! volume at run time). Only drivers in [`HARDWARE`] are ever loaded this way, and only from
//! the measured initramfs: their files are opened before the switch to the verified root
//! empties it, and stay open for as long as the node runs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::modules::{normalize, ModuleIndex, HARDWARE};
use crate::sys::ModuleLoadError;

/// Drivers that a device's driver needs beside it although no device asks for them by alias
/// in time: SCSI disks appear only after the host adapter's asynchronous scan, and need sd.
const COMPANIONS: &[(&str, &str)] = &[("virtio_scsi", "sd_mod"), ("hv_storvsc", "sd_mod")];

/// Loads one module by name; the real one holds the files open.
pub trait LoadDriver {
    fn load(&self, name: &str) -> Result<(), ModuleLoadError>;
}

/// The module files of [`HARDWARE`] and their dependencies, opened while the initramfs still
/// has them.
pub struct HeldModules {
    files: BTreeMap<String, (File, PathBuf)>,
}

impl HeldModules {
    /// Opens the files of `names` and their dependencies; a driver this kernel lacks, or whose
    /// file cannot be opened, is logged and left out (a device that needs it is then refused
    /// by name).
    pub fn open(index: &ModuleIndex, names: &[String]) -> HeldModules {
        let mut files = BTreeMap::new();
        for name in names {
            let order = match index.resolve(std::slice::from_ref(name)) {
                Ok(order) => order,
                Err(e) => {
                    log::info!("device drivers: {}", crate::logger::chain(&e));
                    continue;
                }
            };
            for module in order {
                let Some(relative) = index.relative_path(&module) else {
                    continue;
                };
                if files.contains_key(&module) {
                    continue;
                }
                let path = index.dir.join(relative);
                match File::open(&path) {
                    Ok(file) => {
                        files.insert(module, (file, path));
                    }
                    Err(e) => log::warn!("device drivers: cannot open {}: {e}", path.display()),
                }
            }
        }
        HeldModules { files }
    }
}

impl LoadDriver for HeldModules {
    fn load(&self, name: &str) -> Result<(), ModuleLoadError> {
        let Some((file, path)) = self.files.get(name) else {
            return Err(ModuleLoadError::Open(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{name} is not in the initramfs"),
            )));
        };
        crate::sys::load_module_file(file, path)
    }
}

/// What decides and loads drivers for devices.
pub struct Drivers<L> {
    index: ModuleIndex,
    loader: L,
    /// The drivers devices may have: [`HARDWARE`], or fewer (`cvm.drivers=`).
    allowed: Vec<String>,
    /// Modules loaded (by anyone in this boot) or refused once (not tried again).
    done: BTreeSet<String>,
}

impl<L: LoadDriver> Drivers<L> {
    /// `loaded`: the modules the boot has loaded already; `allowed`: the drivers a device may
    /// get (only those also in [`HARDWARE`] count).
    pub fn new(index: ModuleIndex, loader: L, loaded: &[String], allowed: &[String]) -> Self {
        Drivers {
            index,
            loader,
            allowed: allowed
                .iter()
                .map(|d| normalize(d))
                .filter(|d| HARDWARE.contains(&d.as_str()))
                .collect(),
            done: loaded.iter().map(|m| normalize(m)).collect(),
        }
    }

    /// Loads the [`HARDWARE`] drivers that a device's modalias asks for and has not got yet,
    /// with their dependencies; returns those loaded now.
    pub fn for_device(&mut self, device: &str, modalias: &str) -> Vec<String> {
        let mut loaded = Vec::new();
        for driver in self.index.modules_for_modalias(modalias) {
            if !HARDWARE.contains(&driver.as_str()) || self.done.contains(&driver) {
                continue;
            }
            if !self.allowed.contains(&driver) {
                log::warn!("driver {driver} for {device} not loaded: not among cvm.drivers");
                self.done.insert(driver);
                continue;
            }
            let mut wanted = vec![driver.clone()];
            wanted.extend(
                COMPANIONS
                    .iter()
                    .filter(|(with, _)| *with == driver)
                    .map(|(_, companion)| companion.to_string()),
            );
            let order = match self.index.resolve(&wanted) {
                Ok(order) => order,
                Err(e) => {
                    log::warn!("driver {driver} for {device}: {}", crate::logger::chain(&e));
                    self.done.insert(driver);
                    continue;
                }
            };
            for module in order {
                if self.done.contains(&module) {
                    continue;
                }
                self.done.insert(module.clone());
                match self.loader.load(&module) {
                    Ok(()) => loaded.push(module),
                    Err(e) => log::warn!(
                        "driver {module} for {device} ({modalias}) not loaded: {}",
                        crate::logger::chain(&e)
                    ),
                }
            }
        }
        loaded
    }
}

/// Every device under `sys_bus` (`/sys/bus`) that has a modalias: (bus/device, modalias).
pub fn present_devices(sys_bus: &Path) -> Vec<(String, String)> {
    let mut devices = Vec::new();
    for bus in std::fs::read_dir(sys_bus).into_iter().flatten().flatten() {
        let bus_name = bus.file_name().to_string_lossy().into_owned();
        for device in std::fs::read_dir(bus.path().join("devices"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(alias) = std::fs::read_to_string(device.path().join("modalias")) {
                let alias = alias.trim();
                if !alias.is_empty() {
                    let name = device.file_name().to_string_lossy().into_owned();
                    devices.push((format!("{bus_name}/{name}"), alias.to_string()));
                }
            }
        }
    }
    devices.sort();
    devices
}

/// Drivers for the devices present now, round after round while a round adds drivers (a bus
/// driver's devices appear as it loads). Returns (driver, device) in load order.
pub fn coldplug<L: LoadDriver>(drivers: &mut Drivers<L>, sys_bus: &Path) -> Vec<(String, String)> {
    let mut all = Vec::new();
    for _ in 0..4 {
        let mut this_round = Vec::new();
        for (device, modalias) in present_devices(sys_bus) {
            for driver in drivers.for_device(&device, &modalias) {
                this_round.push((driver, device.clone()));
            }
        }
        if this_round.is_empty() {
            break;
        }
        all.extend(this_round);
    }
    all
}

/// A device event from the kernel.
#[derive(Debug, PartialEq, Eq)]
pub struct Uevent {
    pub action: String,
    pub devpath: String,
    pub modalias: Option<String>,
}

/// Reads a kernel uevent message: `action@devpath` then NUL-separated `KEY=value` fields.
/// Anything else (udev's own messages start with `libudev`) is `None`.
pub fn parse_uevent(message: &[u8]) -> Option<Uevent> {
    let mut fields = message.split(|&b| b == 0).filter(|f| !f.is_empty());
    let header = std::str::from_utf8(fields.next()?).ok()?;
    let (_, header_path) = header.split_once('@')?;
    let mut event = Uevent {
        action: String::new(),
        devpath: header_path.to_string(),
        modalias: None,
    };
    for field in fields {
        let Ok(field) = std::str::from_utf8(field) else {
            continue;
        };
        match field.split_once('=') {
            Some(("ACTION", v)) => event.action = v.to_string(),
            Some(("DEVPATH", v)) => event.devpath = v.to_string(),
            Some(("MODALIAS", v)) if !v.is_empty() => event.modalias = Some(v.to_string()),
            _ => {}
        }
    }
    (!event.action.is_empty()).then_some(event)
}

/// The kernel's uevent multicast group, read from a netlink socket.
pub struct Uevents {
    fd: OwnedFd,
}

impl Uevents {
    pub fn open() -> std::io::Result<Uevents> {
        use nix::sys::socket::{bind, setsockopt, sockopt, NetlinkAddr, SockProtocol, SockType};
        let fd = crate::net::netlink::netlink_socket(
            SockType::Datagram,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        // A boot's burst of events must not overflow the queue (ENOBUFS is handled, by a
        // rescan, but costs one). SO_RCVBUFFORCE: PID 1 may exceed rmem_max; failure only
        // leaves the default size.
        let _ = setsockopt(&fd, sockopt::RcvBufForce, &(4 << 20));
        // Port 0 (the kernel assigns one), multicast group 1: the kernel's uevents.
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1))?;
        Ok(Uevents { fd })
    }

    /// The next event the kernel sent (messages from other processes are skipped).
    pub fn next(&self, buf: &mut [u8]) -> std::io::Result<Option<Uevent>> {
        let (n, from) =
            nix::sys::socket::recvfrom::<nix::sys::socket::NetlinkAddr>(self.fd.as_raw_fd(), buf)?;
        // Only the kernel (port 0) is believed; a sender without an address is not.
        if from.is_none_or(|from| from.pid() != 0) {
            return Ok(None);
        }
        Ok(parse_uevent(&buf[..n]))
    }
}

/// Serves devices that appear from now on, for as long as the node runs.
pub fn watch<L: LoadDriver>(mut drivers: Drivers<L>, events: Uevents, sys_bus: &Path) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match events.next(&mut buf) {
            Ok(Some(Uevent {
                action,
                devpath,
                modalias: Some(modalias),
            })) if action == "add" => {
                let loaded = drivers.for_device(&devpath, &modalias);
                if !loaded.is_empty() {
                    log::info!("device drivers: {} for {devpath}", loaded.join(" "));
                }
            }
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => {
                // Events were lost: what they announced is in sysfs.
                for (driver, device) in coldplug(&mut drivers, sys_bus) {
                    log::info!("device drivers: {driver} for {device}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("device drivers: the uevent socket failed ({e}); devices that appear from now on get no driver");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;
    use std::cell::RefCell;

    #[derive(Default)]
    struct Recorder {
        loads: RefCell<Vec<String>>,
        refuse: Vec<&'static str>,
    }

    impl LoadDriver for &Recorder {
        fn load(&self, name: &str) -> Result<(), ModuleLoadError> {
            self.loads.borrow_mut().push(name.to_string());
            if self.refuse.contains(&name) {
                return Err(ModuleLoadError::Kernel(Errno::ENODEV));
            }
            Ok(())
        }
    }

    const DEP: &str = "\
kernel/drivers/nvme/host/nvme.ko.xz: kernel/drivers/nvme/host/nvme-core.ko.xz kernel/drivers/nvme/common/nvme-auth.ko.xz
kernel/drivers/nvme/host/nvme-core.ko.xz: kernel/drivers/nvme/common/nvme-auth.ko.xz
kernel/drivers/nvme/common/nvme-auth.ko.xz:
kernel/drivers/scsi/virtio_scsi.ko.xz: kernel/drivers/scsi/scsi_mod.ko.xz kernel/drivers/scsi/scsi_common.ko.xz
kernel/drivers/scsi/sd_mod.ko.xz: kernel/drivers/scsi/scsi_mod.ko.xz kernel/drivers/scsi/scsi_common.ko.xz
kernel/drivers/scsi/scsi_mod.ko.xz: kernel/drivers/scsi/scsi_common.ko.xz
kernel/drivers/scsi/scsi_common.ko.xz:
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz
kernel/drivers/net/net_failover.ko.xz:
kernel/drivers/net/ethernet/google/gve/gve.ko.xz:
kernel/drivers/input/evdev.ko.xz:
";
    const ALIAS: &str = "\
alias pci:v*d*sv*sd*bc01sc08i02* nvme
alias virtio:d00000008v* virtio_scsi
alias scsi:t-0x00* sd_mod
alias virtio:d00000001v* virtio_net
alias pci:v00001AE0d00000042sv*sd*bc*sc*i* gve
alias input:b*v*p*e*-e*k*r*a*m*l*s*f*w* evdev
";
    const NVME: &str = "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02";

    fn all() -> Vec<String> {
        HARDWARE.iter().map(|d| d.to_string()).collect()
    }

    #[test]
    fn drivers_left_out_of_cvm_drivers_are_not_loaded() {
        let recorder = Recorder::default();
        let mut drivers = Drivers::new(index(), &recorder, &[], &["gve".to_string()]);
        assert!(drivers.for_device("pci/0000:00:04.0", NVME).is_empty());
        assert!(recorder.loads.borrow().is_empty());
        let gvnic = "pci:v00001AE0d00000042sv00001AE0sd00000058bc02sc00i00";
        assert_eq!(drivers.for_device("pci/0000:00:06.0", gvnic), ["gve"]);
    }

    fn index() -> ModuleIndex {
        ModuleIndex::parse(Path::new("/lib/modules/6.12"), "6.12", DEP, "", "", ALIAS)
    }

    #[test]
    fn a_device_gets_its_driver_after_the_dependencies_and_only_once() {
        let recorder = Recorder::default();
        let mut drivers = Drivers::new(index(), &recorder, &[], &all());
        assert_eq!(
            drivers.for_device("pci/0000:00:04.0", NVME),
            ["nvme_auth", "nvme_core", "nvme"].map(String::from)
        );
        // A second NVMe controller needs nothing more.
        assert!(drivers.for_device("pci/0000:00:05.0", NVME).is_empty());
        assert_eq!(recorder.loads.borrow().len(), 3);
    }

    #[test]
    fn a_scsi_host_brings_the_disk_driver_and_shared_dependencies_load_once() {
        let recorder = Recorder::default();
        let mut drivers = Drivers::new(index(), &recorder, &["scsi_common".to_string()], &all());
        assert_eq!(
            drivers.for_device("virtio/virtio2", "virtio:d00000008v00001AF4"),
            ["scsi_mod", "virtio_scsi", "sd_mod"].map(String::from)
        );
        assert!(drivers.for_device("scsi/0:0:0:0", "scsi:t-0x00").is_empty());
    }

    #[test]
    fn only_hardware_drivers_are_loaded_by_device() {
        let recorder = Recorder::default();
        let mut drivers = Drivers::new(index(), &recorder, &[], &all());
        // evdev matches every input device, but it is not a disk or NIC driver: the boot
        // loads it by name, never because a device asked.
        assert!(drivers
            .for_device(
                "input/input0",
                "input:b0019v0000p0001e0000-e0,1,k74,ramlsfw"
            )
            .is_empty());
        assert!(drivers
            .for_device(
                "pci/0000:00:01.0",
                "pci:v00008086d00007000sv00001AF4sd00001100bc06sc01i00"
            )
            .is_empty());
        assert!(recorder.loads.borrow().is_empty());
    }

    #[test]
    fn a_refused_driver_is_logged_and_not_retried() {
        let recorder = Recorder {
            refuse: vec!["gve"],
            ..Default::default()
        };
        let mut drivers = Drivers::new(index(), &recorder, &[], &all());
        let gvnic = "pci:v00001AE0d00000042sv00001AE0sd00000058bc02sc00i00";
        assert!(drivers.for_device("pci/0000:00:06.0", gvnic).is_empty());
        assert!(drivers.for_device("pci/0000:00:06.0", gvnic).is_empty());
        assert_eq!(*recorder.loads.borrow(), ["gve"]);
    }

    #[test]
    fn coldplug_reads_sysfs_in_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let device = |bus: &str, name: &str, alias: &str| {
            let d = dir.path().join(bus).join("devices").join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("modalias"), format!("{alias}\n")).unwrap();
        };
        device("pci", "0000:00:04.0", NVME);
        device(
            "pci",
            "0000:00:00.0",
            "pci:v00008086d00001237sv00001AF4sd00001100bc06sc00i00",
        );
        device("virtio", "virtio1", "virtio:d00000001v00001AF4");
        std::fs::create_dir_all(dir.path().join("virtio/devices/virtio9")).unwrap(); // no modalias
        let recorder = Recorder::default();
        let mut drivers = Drivers::new(index(), &recorder, &[], &all());
        let found = coldplug(&mut drivers, dir.path());
        assert_eq!(
            found,
            [
                ("nvme_auth", "pci/0000:00:04.0"),
                ("nvme_core", "pci/0000:00:04.0"),
                ("nvme", "pci/0000:00:04.0"),
                ("net_failover", "virtio/virtio1"),
                ("virtio_net", "virtio/virtio1"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        // Nothing new: one more pass loads nothing.
        assert!(coldplug(&mut drivers, dir.path()).is_empty());
        assert!(coldplug(&mut drivers, &dir.path().join("missing")).is_empty());
    }

    #[test]
    fn uevents_are_read_strictly() {
        let add = b"add@/devices/pci0000:00/0000:00:05.0\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:05.0\0SUBSYSTEM=pci\0MODALIAS=pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02\0SEQNUM=1234\0";
        assert_eq!(
            parse_uevent(add),
            Some(Uevent {
                action: "add".into(),
                devpath: "/devices/pci0000:00/0000:00:05.0".into(),
                modalias: Some(NVME.into()),
            })
        );
        let bind = b"bind@/devices/x\0ACTION=bind\0DEVPATH=/devices/x\0";
        assert_eq!(parse_uevent(bind).unwrap().modalias, None);
        assert_eq!(parse_uevent(b"libudev\0\xfe\xed\xca\xfe"), None);
        assert_eq!(parse_uevent(b""), None);
        assert_eq!(parse_uevent(b"add@/x\0"), None, "no ACTION");
    }

    proptest::proptest! {
        #[test]
        fn uevent_parsing_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse_uevent(&bytes);
        }
    }
}
