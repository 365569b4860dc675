//! A QEMU guest for boot tests: a builder for the machine, readiness by console markers, and
//! cleanup of every process it started. When a test fails (panics) while a guest is alive, the
//! guest's serial log is printed. Beside `serial.log`, `serial.timed.log` has each console
//! line with its arrival time since QEMU's start (`cvm-measure timeline` draws it).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::qmp::Qmp;

/// The kernel command line every test guest starts with.
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 loglevel=4 printk.devkmsg=on";

pub struct Guest {
    name: String,
    kernel: PathBuf,
    initrd: PathBuf,
    cmdline: String,
    disks: Vec<PathBuf>,
    /// Disks that keep what the guest writes, with their serial numbers.
    persistent: Vec<(PathBuf, String)>,
    tpm: bool,
    tpm_state: Option<PathBuf>,
    memory_mib: u32,
    reboot: bool,
    interactive: bool,
    network: bool,
    /// UEFI firmware (code, variable-store template): the guest boots its first disk's ESP
    /// instead of a kernel given to QEMU.
    uefi: Option<(PathBuf, PathBuf)>,
    /// With `uefi`: the firmware boots the kernel QEMU is given (fw_cfg), not a disk.
    kernel_through_firmware: bool,
    /// Guest TCP ports at FORWARD_ADDRESS joined to ports of the host's loopback.
    forwards: Vec<(u16, u16)>,
    /// More options for QEMU's user network (`hostname=...`, `domainname=...`).
    netdev_options: Vec<String>,
    /// A NIC on this `-netdev` (id n0) instead of QEMU's user network.
    custom_netdev: Option<String>,
    /// A confidential launch (SNP or TDX on KVM): its firmware, vCPUs, memory and TEE settings
    /// replace the TCG machine; its kernel, initrd and command line are this guest's.
    confidential: Option<cvm_measure::launch::Launch>,
    /// One-file firmware (`-bios`) that boots the kernel QEMU hands it.
    bios: Option<PathBuf>,
    /// More QEMU arguments, last on the command line.
    extra_args: Vec<String>,
    /// The controller every disk hangs on.
    disk_bus: DiskBus,
}

/// How a guest's disks are attached: as the clouds attach them, so that the init's choice of
/// drivers is exercised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskBus {
    /// virtio-blk, one PCI device per disk (QEMU's usual, GCE's N2D).
    #[default]
    Virtio,
    /// One NVMe controller per disk (AWS, GCE's C3): the serial is the controller's.
    Nvme,
    /// Disks on one virtio-scsi adapter (GCE's default for other machines).
    Scsi,
}

/// Where a guest reaches the host services a test forwards to it (`Guest::forward`).
pub const FORWARD_ADDRESS: &str = "10.0.2.100";

/// The harness binary, beside the running test or harness (cargo builds it for the tests).
fn harness_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable");
    let dir = exe.parent().expect("a directory");
    [dir.join("cvm-harness"), dir.join("../cvm-harness")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no cvm-harness beside {}", exe.display()))
}

impl Guest {
    pub fn new(name: &str, kernel: &Path, initrd: &Path) -> Self {
        Guest {
            name: name.to_string(),
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            cmdline: BASE_CMDLINE.to_string(),
            disks: Vec::new(),
            persistent: Vec::new(),
            tpm_state: None,
            // A node boots only where it can measure: guests have a TPM unless a test says not.
            tpm: true,
            memory_mib: 512,
            reboot: false,
            interactive: false,
            network: false,
            uefi: None,
            kernel_through_firmware: false,
            forwards: Vec::new(),
            netdev_options: Vec::new(),
            custom_netdev: None,
            confidential: None,
            bios: None,
            extra_args: Vec::new(),
            disk_bus: DiskBus::default(),
        }
    }

    /// A guest that boots a whole disk image through UEFI firmware (OVMF code and a variable
    /// store template, copied for the guest): firmware → the ESP's UKI → its initramfs.
    pub fn uefi(name: &str, code: &Path, vars: &Path, disk: &Path) -> Self {
        let mut guest = Guest::new(name, Path::new(""), Path::new("")).disk(disk);
        guest.uefi = Some((code.to_path_buf(), vars.to_path_buf()));
        guest
    }

    /// A direct kernel boot through UEFI firmware: OVMF loads the kernel, initrd and command
    /// line QEMU hands it and measures them, as it does for a TDX or SNP launch.
    pub fn direct_uefi(mut self, code: &Path, vars: &Path) -> Self {
        self.uefi = Some((code.to_path_buf(), vars.to_path_buf()));
        self.kernel_through_firmware = true;
        self
    }

    /// A one-file firmware image (`-bios`, as the AmdSev and TDX builds are) that boots the
    /// kernel, initrd and command line QEMU hands it.
    pub fn bios(mut self, firmware: &Path) -> Self {
        self.bios = Some(firmware.to_path_buf());
        self
    }

    /// One more QEMU argument (a `-device loader,...` that fills guest memory, for example).
    pub fn qemu_arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_string());
        self
    }

    /// The kernel command line QEMU passes.
    pub fn kernel_cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Appends options to the kernel command line.
    pub fn cmdline(mut self, extra: &str) -> Self {
        self.cmdline.push(' ');
        self.cmdline.push_str(extra);
        self
    }

    /// Attaches a raw disk image (copy-on-write: the file itself is never written).
    pub fn disk(mut self, path: &Path) -> Self {
        self.disks.push(path.to_path_buf());
        self
    }

    /// Attaches every disk through this controller instead of virtio-blk.
    pub fn disk_bus(mut self, bus: DiskBus) -> Self {
        self.disk_bus = bus;
        self
    }

    /// Attaches a disk that the guest writes to for real, with a serial number.
    pub fn state_disk(mut self, path: &Path, serial: &str) -> Self {
        self.persistent
            .push((path.to_path_buf(), serial.to_string()));
        self
    }

    /// Keeps the TPM's state in this directory (so that another guest gets the same TPM).
    pub fn tpm_state(mut self, dir: &Path) -> Self {
        self.tpm_state = Some(dir.to_path_buf());
        self
    }

    /// Gives the guest a TPM 2.0 (swtpm, started and stopped with the guest).
    pub fn tpm(mut self, on: bool) -> Self {
        self.tpm = on;
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Lets a guest reboot in place; by default a reboot ends QEMU like a power-off does.
    pub fn allow_reboot(mut self, on: bool) -> Self {
        self.reboot = on;
        self
    }

    /// A virtio NIC on QEMU's user network, restricted (`restrict=on`): the guest gets
    /// 10.0.2.15/24 from its DHCP server and reaches nothing but the ports `forward` joins to
    /// the host's loopback.
    pub fn network(mut self, on: bool) -> Self {
        self.network = on;
        self
    }

    /// Connections of the guest to FORWARD_ADDRESS:`guest_port` reach 127.0.0.1:`host_port`
    /// (a `cvm-harness forward` per connection).
    pub fn forward(mut self, guest_port: u16, host_port: u16) -> Self {
        self.network = true;
        self.forwards.push((guest_port, host_port));
        self
    }

    /// Another option of the user network (`hostname=node`, `domainname=example.test`).
    pub fn netdev_option(mut self, option: &str) -> Self {
        self.netdev_options.push(option.to_string());
        self
    }

    /// A NIC on another network: a `-netdev` value with id n0 (`DhcpServer::netdev`).
    pub fn netdev(mut self, netdev: &str) -> Self {
        self.custom_netdev = Some(netdev.to_string());
        self
    }

    /// The console (and the QEMU monitor, ctrl-a c) on this terminal instead of a log file:
    /// for `make run`.
    pub fn interactive(mut self, on: bool) -> Self {
        self.interactive = on;
        self
    }

    /// Launches on SNP or TDX hardware as `launch` describes (firmware, vCPUs, memory, TEE
    /// settings); the kernel, initrd and command line are this guest's.
    pub fn confidential(mut self, launch: cvm_measure::launch::Launch) -> Self {
        self.confidential = Some(launch);
        self
    }

    /// The confidential launch as it will run: the description with this guest's kernel,
    /// initrd and command line — what its measurement is predicted from.
    pub fn launch_description(&self) -> Option<cvm_measure::launch::Launch> {
        self.confidential.clone().map(|mut launch| {
            launch.kernel = self.kernel.clone();
            launch.initrd = Some(self.initrd.clone());
            launch.cmdline = self.cmdline.clone();
            launch
        })
    }

    /// The QEMU command line this guest runs with, its files (console log, QMP socket, swtpm
    /// socket, variable store) in `dir`: for `DRY_RUN=1`.
    pub fn command_line(&self, dir: &Path) -> Vec<String> {
        let mut line = vec!["qemu-system-x86_64".to_string()];
        line.extend(
            self.qemu_args(dir)
                .iter()
                .map(|a| a.to_string_lossy().into_owned()),
        );
        line
    }

    fn qemu_args(&self, dir: &Path) -> Vec<std::ffi::OsString> {
        let serial = dir.join("serial.log");
        let qmp_socket = dir.join("qmp.sock");
        let mut cmd = Command::new("qemu-system-x86_64");
        match self.launch_description() {
            Some(launch) => {
                cmd.args(launch.qemu_args())
                    .args(["-nodefaults", "-no-user-config"]);
            }
            None => {
                cmd.args([
                    "-machine",
                    "q35",
                    "-accel",
                    "tcg",
                    // Every feature TCG emulates, AES-NI and SSSE3 among them, as a TEE host's
                    // CPU has them: the guest's dm-crypt then runs the code it runs in
                    // production.
                    "-cpu",
                    "max",
                    "-smp",
                    "1",
                    "-nodefaults",
                    "-no-user-config",
                ])
                .args(["-m", &self.memory_mib.to_string()]);
            }
        }
        if let Some(netdev) = &self.custom_netdev {
            cmd.args([
                "-netdev",
                netdev,
                "-device",
                "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
            ]);
        } else if self.network {
            let mut netdev = String::from("user,id=n0,restrict=on");
            for option in &self.netdev_options {
                netdev.push(',');
                netdev.push_str(option);
            }
            let harness = harness_binary();
            for (guest_port, host_port) in &self.forwards {
                netdev.push_str(&format!(
                    ",guestfwd=tcp:{FORWARD_ADDRESS}:{guest_port}-cmd:{} forward 127.0.0.1:{host_port}",
                    harness.display()
                ));
            }
            cmd.args([
                "-netdev",
                &netdev,
                "-device",
                "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
            ]);
        } else {
            cmd.args(["-nic", "none"]);
        }
        if self.interactive {
            cmd.args(["-nographic", "-serial", "mon:stdio"]);
        } else {
            cmd.args(["-display", "none", "-serial"])
                .arg(format!("file:{}", serial.display()));
        }
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_socket.display()));
        if let (Some(firmware), None) = (&self.bios, &self.confidential) {
            cmd.arg("-bios").arg(firmware);
        }
        if let Some((code, _)) = &self.uefi {
            let vars = dir.join("efivars.fd");
            cmd.arg("-drive")
                .arg(format!(
                    "if=pflash,format=raw,readonly=on,file={}",
                    code.display()
                ))
                .arg("-drive")
                .arg(format!("if=pflash,format=raw,file={}", vars.display()));
        }
        if self.confidential.is_none() && (self.uefi.is_none() || self.kernel_through_firmware) {
            cmd.arg("-kernel")
                .arg(&self.kernel)
                .arg("-initrd")
                .arg(&self.initrd)
                .args(["-append", &self.cmdline]);
        }
        if !self.reboot {
            cmd.arg("-no-reboot");
        }
        if self.disk_bus == DiskBus::Scsi && !(self.disks.is_empty() && self.persistent.is_empty())
        {
            cmd.args(["-device", "virtio-scsi-pci,id=scsi0"]);
        }
        let disk_device = |id: &str, serial: &str| match self.disk_bus {
            DiskBus::Virtio => format!("virtio-blk-pci,drive={id},serial={serial}"),
            DiskBus::Nvme => format!("nvme,drive={id},serial={serial}"),
            DiskBus::Scsi => format!("scsi-hd,drive={id},bus=scsi0.0,serial={serial}"),
        };
        for (i, disk) in self.disks.iter().enumerate() {
            if self.disk_bus == DiskBus::Virtio {
                cmd.arg("-drive").arg(format!(
                    "if=virtio,format=raw,file={},snapshot=on,index={i}",
                    disk.display()
                ));
            } else {
                cmd.arg("-drive").arg(format!(
                    "if=none,id=disk{i},format=raw,file={},snapshot=on",
                    disk.display()
                ));
                cmd.arg("-device")
                    .arg(disk_device(&format!("disk{i}"), &format!("disk{i}")));
            }
        }
        for (i, (disk, serial)) in self.persistent.iter().enumerate() {
            cmd.arg("-drive").arg(format!(
                "if=none,id=state{i},format=raw,file={}",
                disk.display()
            ));
            cmd.arg("-device")
                .arg(disk_device(&format!("state{i}"), serial));
        }
        if self.tpm {
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id=chrtpm,path={}",
                    dir.join("swtpm.sock").display()
                ))
                .args(["-tpmdev", "emulator,id=tpm0,chardev=chrtpm"])
                .args(["-device", "tpm-crb,tpmdev=tpm0"]);
        }
        cmd.args(&self.extra_args);
        cmd.get_args().map(|a| a.to_os_string()).collect()
    }

    pub fn start(self) -> RunningGuest {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cvm-guest-{}-", self.name))
            .tempdir()
            .expect("temporary directory for the guest");
        let serial = dir.path().join("serial.log");
        let qmp_socket = dir.path().join("qmp.sock");
        let args = self.qemu_args(dir.path());
        let mut guest = RunningGuest {
            name: self.name.clone(),
            serial,
            timer: None,
            qemu: None,
            swtpm: None,
            qmp: None,
            exit: None,
            dir,
        };
        if let Some((_, vars_template)) = &self.uefi {
            fs::copy(vars_template, guest.dir.path().join("efivars.fd"))
                .expect("copy the UEFI variable store");
        }
        if self.tpm {
            let state = self
                .tpm_state
                .clone()
                .unwrap_or_else(|| guest.dir.path().join("tpm"));
            fs::create_dir_all(&state).expect("tpm state directory");
            let socket = guest.dir.path().join("swtpm.sock");
            let swtpm = Command::new("swtpm")
                .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
                .arg("--tpmstate")
                .arg(format!("dir={}", state.display()))
                .arg("--ctrl")
                .arg(format!("type=unixio,path={}", socket.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("swtpm is installed by make deps");
            guest.swtpm = Some(swtpm);
            wait_for_path(&socket, Duration::from_secs(10));
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(args);
        if !self.interactive {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
        }
        let started = Instant::now();
        let qemu = cmd
            .spawn()
            .expect("qemu-system-x86_64 is installed by make deps");
        guest.qemu = Some(qemu);
        if !self.interactive {
            guest.timer = Some(ConsoleTimer::start(&guest.serial, started));
        }
        match Qmp::connect(&qmp_socket, Duration::from_secs(20)) {
            Ok(qmp) => guest.qmp = Some(qmp),
            Err(e) => panic!("guest {}: cannot connect to QMP: {e}", guest.name),
        }
        guest
    }
}

fn wait_for_path(path: &Path, timeout: Duration) {
    let end = Instant::now() + timeout;
    while !path.exists() {
        assert!(Instant::now() < end, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Copies the console, as QEMU writes it to `serial.log`, to `serial.timed.log`: each line
/// `<seconds since QEMU's start, 3 decimals> <line>`, the time when the line was read (the file
/// is polled every 5 ms). QEMU's `file:` backend keeps no times; the copy adds them without
/// changing how the console is written or read.
struct ConsoleTimer {
    stop: Arc<AtomicBool>,
    /// Bytes of `serial.log` copied so far.
    copied: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
    timed: PathBuf,
}

impl ConsoleTimer {
    fn start(serial: &Path, started: Instant) -> ConsoleTimer {
        let stop = Arc::new(AtomicBool::new(false));
        let copied = Arc::new(AtomicU64::new(0));
        let timed = serial.with_file_name("serial.timed.log");
        let thread = {
            let (serial, timed, stop, copied) = (
                serial.to_path_buf(),
                timed.clone(),
                stop.clone(),
                copied.clone(),
            );
            std::thread::spawn(move || {
                let Ok(mut out) = fs::File::create(&timed) else {
                    return;
                };
                let mut input = None;
                let mut pending = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let stopping = stop.load(Ordering::Acquire);
                    if input.is_none() {
                        input = fs::File::open(&serial).ok();
                    }
                    let mut read_any = false;
                    if let Some(file) = input.as_mut() {
                        while let Ok(n @ 1..) = file.read(&mut buf) {
                            read_any = true;
                            let at = started.elapsed().as_secs_f64();
                            for &byte in &buf[..n] {
                                pending.push(byte);
                                if byte == b'\n' {
                                    let _ = write!(out, "{at:.3} ");
                                    let _ = out.write_all(&pending);
                                    pending.clear();
                                }
                            }
                            copied.fetch_add(n as u64, Ordering::Release);
                        }
                    }
                    if stopping {
                        if !pending.is_empty() {
                            let at = started.elapsed().as_secs_f64();
                            let _ = write!(out, "{at:.3} ");
                            let _ = out.write_all(&pending);
                            let _ = out.write_all(b"\n");
                        }
                        return;
                    }
                    if !read_any {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            })
        };
        ConsoleTimer {
            stop,
            copied,
            thread: Some(thread),
            timed,
        }
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub struct RunningGuest {
    pub name: String,
    serial: PathBuf,
    timer: Option<ConsoleTimer>,
    qemu: Option<Child>,
    swtpm: Option<Child>,
    qmp: Option<Qmp>,
    exit: Option<ExitStatus>,
    dir: tempfile::TempDir,
}

impl RunningGuest {
    /// Everything the guest wrote to its serial console so far.
    pub fn serial_log(&self) -> String {
        fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The timed copy of the console (`serial.timed.log`, see [`ConsoleTimer`]) once it holds
    /// everything `serial.log` holds now (waiting at most a second for the copy to catch up).
    pub fn timed_serial_log(&self) -> Vec<u8> {
        let Some(timer) = self.timer.as_ref() else {
            return Vec::new();
        };
        let written = fs::metadata(&self.serial).map_or(0, |m| m.len());
        let end = Instant::now() + Duration::from_secs(1);
        while timer.copied.load(Ordering::Acquire) < written && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        fs::read(&timer.timed).unwrap_or_default()
    }

    /// Waits until `marker` has appeared `count` times on the console. Fails early when QEMU
    /// exits first. Returns the time waited.
    pub fn wait_for_count(
        &mut self,
        marker: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            let log = self.serial_log();
            if log.matches(marker).count() >= count {
                return Ok(start.elapsed());
            }
            if self.has_exited() {
                // The last lines may land after the exit is seen.
                if self.serial_log().matches(marker).count() >= count {
                    return Ok(start.elapsed());
                }
                return Err(format!(
                    "guest {} exited before {marker:?} appeared {count} time(s)",
                    self.name
                ));
            }
            if start.elapsed() >= timeout {
                return Err(format!(
                    "guest {}: {marker:?} did not appear {count} time(s) within {}s",
                    self.name,
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<Duration, String> {
        self.wait_for_count(marker, 1, timeout)
    }

    pub fn qmp(&mut self) -> &mut Qmp {
        self.qmp
            .as_mut()
            .expect("QMP is connected while the guest runs")
    }

    fn has_exited(&mut self) -> bool {
        if self.exit.is_some() {
            return true;
        }
        if let Some(qemu) = self.qemu.as_mut() {
            if let Ok(Some(status)) = qemu.try_wait() {
                self.exit = Some(status);
                return true;
            }
        }
        false
    }

    /// Waits for QEMU to exit by itself (the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let start = Instant::now();
        loop {
            if self.has_exited() {
                return Ok(self.exit.unwrap());
            }
            if start.elapsed() >= timeout {
                return Err(format!(
                    "guest {} still runs after {}s",
                    self.name,
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The directory the guest's files live in (serial log, sockets).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Some(mut qemu) = self.qemu.take() {
            let _ = qemu.kill();
            let _ = qemu.wait();
            if std::thread::panicking() {
                if let Some(mut stderr) = qemu.stderr.take() {
                    let mut text = String::new();
                    let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
                    if !text.is_empty() {
                        eprintln!("----- qemu stderr of guest {} -----\n{text}", self.name);
                    }
                }
            }
        }
        if let Some(mut swtpm) = self.swtpm.take() {
            let _ = swtpm.kill();
            let _ = swtpm.wait();
        }
        if let Some(mut timer) = self.timer.take() {
            timer.finish();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- serial log of guest {} -----\n{}\n----- end of serial log of guest {} -----",
                self.name,
                self.serial_log(),
                self.name
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The timed copy has every line of the console, in order, each after its arrival time;
    /// a last line without its newline is kept when the guest ends.
    #[test]
    fn the_timed_console_copies_each_line_with_its_arrival_time() {
        let dir = tempfile::tempdir().unwrap();
        let serial = dir.path().join("serial.log");
        let started = Instant::now();
        let mut timer = ConsoleTimer::start(&serial, started);
        std::thread::sleep(Duration::from_millis(50));
        let mut console = fs::File::create(&serial).unwrap();
        console
            .write_all(b"[    0.000000] Linux\r\ncvm-init: start")
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        console
            .write_all(b"ing version 0.1.0\n\xffpartial")
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        timer.finish();
        let timed = fs::read(dir.path().join("serial.timed.log")).unwrap();
        let lines: Vec<&[u8]> = timed.split(|&b| b == b'\n').collect();
        assert_eq!(lines.len(), 4, "{}", String::from_utf8_lossy(&timed));
        assert!(lines[3].is_empty());
        let split = |line: &[u8]| {
            let space = line.iter().position(|&b| b == b' ').unwrap();
            let time = std::str::from_utf8(&line[..space]).unwrap();
            assert_eq!(time.split_once('.').unwrap().1.len(), 3, "{time}");
            (time.parse::<f64>().unwrap(), line[space + 1..].to_vec())
        };
        let (t0, l0) = split(lines[0]);
        let (t1, l1) = split(lines[1]);
        let (t2, l2) = split(lines[2]);
        assert_eq!(l0, b"[    0.000000] Linux\r");
        assert_eq!(l1, b"cvm-init: starting version 0.1.0");
        assert_eq!(l2, b"\xffpartial");
        assert!(t0 >= 0.04 && t1 >= t0 + 0.25 && t2 >= t1, "{t0} {t1} {t2}");
        // The times are written to the millisecond, rounded: within 1 ms of the clock.
        assert!(t2 <= started.elapsed().as_secs_f64() + 0.001);
    }
}
