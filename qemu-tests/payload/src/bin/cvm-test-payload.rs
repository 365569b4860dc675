//! A small static program the boot scenarios run as a service under cvm-init. Each mode prints
//! what it observed as `payload: key=value` lines (forwarded to the console by the init), so
//! that the tests check the init's behaviour from the serial log.

#![no_main]

use std::ffi::{c_char, c_int, CStr};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult};

/// The SIGPIPE disposition this process was started with. Rust's runtime sets SIGPIPE to
/// ignored before `main`, so the program skips that runtime (`no_main`) and reads it first.
static STARTED_WITH_SIGPIPE: OnceLock<&'static str> = OnceLock::new();

/// The C entry point.
///
/// # Safety
/// Called only by the C runtime, with `argv` holding `argc` valid NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn main(argc: c_int, argv: *const *const c_char) -> c_int {
    STARTED_WITH_SIGPIPE.get_or_init(sigpipe_disposition);
    let args: Vec<String> = (1..argc as isize)
        .map(|i| {
            // SAFETY: the C runtime passes argc valid, NUL-terminated strings in argv.
            unsafe { CStr::from_ptr(*argv.offset(i)) }
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    run(args);
    0
}

fn run(args: Vec<String>) {
    let mode = args.first().map(String::as_str).unwrap_or("");
    match mode {
        "serve" => serve(),
        "orphans" => {
            let count = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(1000);
            orphans(count);
            serve();
        }
        "copy-self" => {
            // Copies this binary (from the verified root) to a writable place, for a service
            // whose path points there.
            let to = args
                .get(1)
                .map(String::as_str)
                .unwrap_or("/run/payload-copy");
            let tmp = format!("{to}.tmp");
            std::fs::copy("/proc/self/exe", &tmp).expect("copy the payload");
            std::fs::rename(&tmp, to).expect("rename the copy");
            println!("payload: copied to {to}");
            serve();
        }
        "bind-over" => {
            // A service that mounts another file of the root over a later service's binary
            // (what a compromised workload with CAP_SYS_ADMIN could do), then says so.
            let (Some(from), Some(over), Some(done)) = (args.get(1), args.get(2), args.get(3))
            else {
                eprintln!("payload: bind-over needs FROM OVER DONE-MARKER");
                std::process::exit(2);
            };
            nix::mount::mount(
                Some(from.as_str()),
                over.as_str(),
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .expect("bind mount");
            std::fs::write(done, b"").expect("write marker");
            println!("payload: bound {from} over {over}");
            serve();
        }
        "exit-after" => {
            // Runs until MARKER exists, then fails, so that the supervisor restarts it.
            let Some(marker) = args.get(1) else {
                eprintln!("payload: exit-after needs MARKER");
                std::process::exit(2);
            };
            println!("payload: started, waiting for {marker}");
            while !Path::new(marker).exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
            println!("payload: exiting after {marker}");
            std::process::exit(1);
        }
        "crash" => {
            println!("payload: crashing with status 3");
            std::process::exit(3);
        }
        "crash-once" => {
            let marker = Path::new("/run/payload-crashed-once");
            if marker.exists() {
                println!("payload: second start");
                serve();
            }
            std::fs::write(marker, b"").expect("write marker");
            println!("payload: first start, crashing");
            std::process::exit(1);
        }
        "rss-probe" => {
            // PID 1's resident set once the boot is complete (the init logs ready right after
            // starting its services).
            std::thread::sleep(Duration::from_millis(500));
            let status = std::fs::read_to_string("/proc/1/status").unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().trim_end_matches("kB").trim().to_string())
                    .unwrap_or_default()
            };
            // The parts say whether PID 1's own memory or the pages of its binary grew.
            println!(
                "payload: pid1-rss-kib={} anon={} file={} shmem={}",
                field("VmRSS:"),
                field("RssAnon:"),
                field("RssFile:"),
                field("RssShmem:")
            );
            serve();
        }
        "root-probe" => {
            // The root must be the read-only, verified one.
            let write = match std::fs::write("/probe-write", b"x") {
                Ok(()) => "succeeded".to_string(),
                Err(e) => e.to_string(),
            };
            println!("payload: root-write={write:?}");
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let root = mountinfo
                .lines()
                .find(|l| l.split(' ').nth(4) == Some("/"))
                .map(|l| {
                    let fields: Vec<&str> = l.split(' ').collect();
                    let after = l.split(" - ").nth(1).unwrap_or("");
                    format!(
                        "{} {}",
                        after.split(' ').take(2).collect::<Vec<_>>().join(" "),
                        fields.get(5).unwrap_or(&"")
                    )
                })
                .unwrap_or_default();
            println!("payload: root-mount={root:?}");
            serve();
        }
        "state-probe" => {
            // Data on the state disk: written on the first boot, found on later ones.
            let marker = Path::new("/var/lib/kubelet/cvm-marker");
            match std::fs::read_to_string(marker) {
                Ok(text) => println!("payload: marker found {}", text.trim()),
                Err(_) => {
                    let text = "plaintext-marker-7f3a9c21e5";
                    let f = std::fs::File::create(marker).expect("create the marker");
                    std::io::Write::write_all(&mut &f, text.as_bytes()).expect("write the marker");
                    f.sync_all().expect("sync the marker");
                    println!("payload: marker written");
                }
            }
            serve();
        }
        "file-probe" => {
            // A file the init wrote before any service (a released secret): its mode and text.
            let path = args.get(1).map(String::as_str).unwrap_or("/run/missing");
            match std::fs::read(path) {
                Ok(bytes) => {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o7777);
                    println!(
                        "payload: file {path} mode {:o} content {}",
                        mode.unwrap_or(0),
                        String::from_utf8_lossy(&bytes).trim()
                    );
                }
                Err(e) => println!("payload: file {path} unreadable: {e}"),
            }
            serve();
        }
        "net-probe" => {
            // What the network gave this workload: the resolver files, the host name, and an
            // answer from a server on the host through the forward at args[1].
            for path in ["/etc/resolv.conf", "/etc/hosts"] {
                match std::fs::read_to_string(path) {
                    Ok(text) => {
                        for line in text.lines().filter(|l| !l.starts_with('#')) {
                            println!("payload: {path}: {line}");
                        }
                    }
                    Err(e) => println!("payload: {path} unreadable: {e}"),
                }
            }
            let host = nix::sys::utsname::uname()
                .map(|u| u.nodename().to_string_lossy().into_owned())
                .unwrap_or_default();
            println!("payload: hostname {host}");
            if let Ok(mtu) = std::fs::read_to_string("/sys/class/net/eth0/mtu") {
                println!("payload: mtu {}", mtu.trim());
            }
            let target = args.get(1).cloned().unwrap_or_default();
            match exchange(&target, "hello from the guest") {
                Ok(answer) => println!("payload: answer {answer}"),
                Err(e) => println!("payload: no answer from {target}: {e}"),
            }
            serve();
        }
        "net-stream" => {
            // One connection kept for args[2] seconds, a line each half second, each echoed.
            let target = args.get(1).cloned().unwrap_or_default();
            let seconds: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
            let result = (|| -> std::io::Result<u32> {
                use std::io::{BufRead, Write};
                let stream = std::net::TcpStream::connect(&target)?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut reader = std::io::BufReader::new(stream.try_clone()?);
                let mut writer = stream;
                let end = Instant::now() + Duration::from_secs(seconds);
                let mut echoed = 0;
                while Instant::now() < end {
                    writeln!(writer, "line {echoed}")?;
                    let mut line = String::new();
                    reader.read_line(&mut line)?;
                    if line.trim() != format!("line {echoed}") {
                        return Err(std::io::Error::other(format!("echo {line:?}")));
                    }
                    echoed += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                Ok(echoed)
            })();
            match result {
                Ok(n) => println!("payload: stream done, {n} lines echoed on one connection"),
                Err(e) => println!("payload: stream broken: {e}"),
            }
            serve();
        }
        "dump-firmware-log" => {
            // The firmware's TCG event log (the kernel's copy), in hex lines of 1 KiB.
            let path = "/sys/kernel/security/tpm0/binary_bios_measurements";
            match std::fs::read(path) {
                Ok(log) => {
                    for chunk in log.chunks(1024) {
                        let hex: String = chunk.iter().map(|b| format!("{b:02x}")).collect();
                        println!("payload: firmware-log {hex}");
                    }
                    println!("payload: firmware-log-end {} bytes", log.len());
                }
                Err(e) => println!("payload: {path} unreadable: {e}"),
            }
            serve();
        }
        "dump-log" => {
            // The measurement log, once the init has measured `ready`, one record a line.
            let path = "/run/log/systemd/tpm2-measure.log";
            let deadline = Instant::now() + Duration::from_secs(60);
            let log = loop {
                let log = std::fs::read(path).unwrap_or_default();
                if String::from_utf8_lossy(&log).contains("\"string\":\"ready\"")
                    || Instant::now() > deadline
                {
                    break log;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            for record in log.split(|&b| b == 0x1e).filter(|r| !r.is_empty()) {
                let hex: String = record.iter().map(|b| format!("{b:02x}")).collect();
                println!("payload: log-record {hex}");
            }
            println!("payload: log-end");
            serve();
        }
        "cpu-probe" => {
            cpu_probe();
            serve();
        }
        "integrity-probe" => {
            integrity_probe(Path::new("/var/lib/kubelet/probe.bin"));
            serve();
        }
        "container-probe" => {
            container_probe();
            serve();
        }
        "throughput" => {
            let mib = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(256);
            throughput(mib);
            serve();
        }
        _ => {
            eprintln!("payload: unknown mode {mode:?}: expected serve, orphans [n], crash, crash-once, bind-over <from> <over> <marker>, exit-after <marker>, rss-probe, root-probe, dump-log, dump-firmware-log, net-probe <addr>, net-stream <addr> <s>, cpu-probe, integrity-probe, container-probe or throughput [MiB]");
            std::process::exit(2);
        }
    }
}

/// Reports the state the init started it in, then waits for SIGTERM.
/// Sends one line to `target` and reads one line back.
fn exchange(target: &str, line: &str) -> std::io::Result<String> {
    use std::io::{BufRead, Write};
    let mut stream = std::net::TcpStream::connect(target)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(stream, "{line}")?;
    let mut answer = String::new();
    std::io::BufReader::new(stream).read_line(&mut answer)?;
    Ok(answer.trim().to_string())
}

fn serve() -> ! {
    let mask = SigSet::thread_get_mask().expect("sigprocmask");
    let blocked: Vec<&str> = Signal::iterator()
        .filter(|s| mask.contains(*s))
        .map(|s| s.as_str())
        .collect();
    let sigpipe = STARTED_WITH_SIGPIPE.get().copied().unwrap_or("unknown");
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    fds.sort();
    // read_dir itself holds one descriptor while listing; report the others.
    let fd_count = fds.len().saturating_sub(1);
    let sid = nix::unistd::getsid(None).map(|p| p.as_raw()).unwrap_or(-1);
    let pid = std::process::id() as i32;
    println!(
        "payload: state blocked=[{}] sigpipe={sigpipe} fds={fd_count} session-leader={} greeting={} tpm={}",
        blocked.join(","),
        sid == pid,
        std::env::var("GREETING").unwrap_or_default(),
        Path::new("/dev/tpm0").exists(),
    );
    eprintln!("payload: serving (stderr)");
    let mut term = SigSet::empty();
    term.add(Signal::SIGTERM);
    term.thread_block().expect("block SIGTERM");
    let _ = term.wait();
    println!("payload: got SIGTERM, exiting");
    std::process::exit(0);
}

fn sigpipe_disposition() -> &'static str {
    // Raw sigaction(2): nix's `sigaction` always installs a new action, and this only reads.
    // SAFETY: reading the current disposition with a null new action changes nothing.
    unsafe {
        let mut old: nix::libc::sigaction = std::mem::zeroed();
        nix::libc::sigaction(nix::libc::SIGPIPE, std::ptr::null(), &mut old);
        match old.sa_sigaction {
            nix::libc::SIG_DFL => "default",
            nix::libc::SIG_IGN => "ignored",
            _ => "handled",
        }
    }
}

/// Forks `count` children that each fork a grandchild and exit at once: the grandchildren
/// become orphans of PID 1 and exit shortly after. Then counts zombies left in the system.
fn orphans(count: usize) {
    let started = Instant::now();
    for _ in 0..count {
        // SAFETY: this program is single-threaded; the children only call fork, sleep and exit.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                // SAFETY: as above.
                if let Ok(ForkResult::Child) = unsafe { fork() } {
                    std::thread::sleep(Duration::from_millis(5));
                    // Raw _exit(2): nix 0.31 has no wrapper for it.
                    // SAFETY: leaves without running atexit handlers of the parent's copy.
                    unsafe { nix::libc::_exit(0) };
                }
                // SAFETY: as above.
                unsafe { nix::libc::_exit(0) };
            }
            ForkResult::Parent { child } => {
                let _ = waitpid(child, None);
            }
        }
    }
    println!(
        "payload: forked {count} orphans in {}ms",
        started.elapsed().as_millis()
    );
    // Give the orphans time to exit and PID 1 time to reap them.
    std::thread::sleep(Duration::from_secs(3));
    println!("payload: orphans={count} zombies={}", count_zombies());
}

fn count_zombies() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return usize::MAX;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
                .unwrap_or(false)
        })
        .count()
}

/// CPU time PID 1 used over a 10 s window (clock ticks from /proc/1/stat).
fn cpu_probe() {
    let ticks = || -> u64 {
        let stat = std::fs::read_to_string("/proc/1/stat").unwrap_or_default();
        let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the command: state is field 0; utime and stime are fields 11 and 12.
        fields
            .get(11)
            .and_then(|u| u.parse::<u64>().ok())
            .unwrap_or(0)
            + fields
                .get(12)
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
    };
    let before = ticks();
    std::thread::sleep(Duration::from_secs(10));
    let after = ticks();
    println!("payload: pid1-cpu-ticks={} over 10s", after - before);
}

/// The probe file's content: a pseudo-random stream, so that a changed block shows.
fn probe_chunk(index: u64, chunk: &mut [u8]) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (index + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    for b in chunk.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        b.copy_from_slice(&state.to_le_bytes()[..b.len()]);
    }
}

const PROBE_CHUNKS: u64 = 32;

/// Arms on the first boot, writes 32 MiB of known content on the second; on later boots reads
/// it back and says whether it came back intact, different, or not at all (an I/O error).
fn integrity_probe(path: &Path) {
    use std::io::{Read, Write};
    let mut expected = vec![0u8; 1 << 20];
    match std::fs::File::open(path) {
        Ok(mut f) => {
            let mut got = vec![0u8; 1 << 20];
            for index in 0..PROBE_CHUNKS {
                match f.read_exact(&mut got) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        println!("payload: probe read short at MiB {index}");
                        return;
                    }
                    Err(e) => {
                        println!("payload: probe read error at MiB {index}: {e}");
                        return;
                    }
                }
                probe_chunk(index, &mut expected);
                if got != expected {
                    println!("payload: probe read differs in MiB {index}");
                    return;
                }
            }
            println!("payload: probe read ok");
        }
        Err(_) if !path.with_extension("armed").exists() => {
            // First boot: only arm, so the host can compare the disk before and after the
            // probe's data is written.
            let armed = std::fs::File::create(path.with_extension("armed")).expect("arm");
            armed.sync_all().expect("sync the armed marker");
            println!("payload: probe armed");
        }
        Err(_) => {
            println!("payload: probe writing");
            let mut f = std::fs::File::create(path).expect("create the probe file");
            for index in 0..PROBE_CHUNKS {
                probe_chunk(index, &mut expected);
                f.write_all(&expected).expect("write the probe file");
                // Every MiB durable: a power cut then leaves committed transactions to replay.
                f.sync_data().expect("sync the probe file");
                println!("payload: probe synced MiB {index}");
            }
            f.sync_all().expect("sync the probe file");
            println!("payload: probe written");
        }
    }
}

/// Sequential write (then fsync) and read (after dropping the page cache) of `mib` MiB on the
/// state file system and on an unencrypted ext4 on the disk with serial `cvm-plain`.
fn throughput(mib: u64) {
    let plain = std::fs::read_dir("/sys/block")
        .expect("/sys/block")
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("serial")).is_ok_and(|s| s.trim() == "cvm-plain")
        })
        .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
        .expect("no disk with serial cvm-plain");
    let status = std::process::Command::new("/sbin/mke2fs")
        .args(["-q", "-t", "ext4", "-F", &plain])
        .status()
        .expect("run mke2fs");
    assert!(status.success(), "mke2fs {plain}: {status}");
    std::fs::create_dir_all("/run/plain").expect("mkdir /run/plain");
    nix::mount::mount(
        Some(plain.as_str()),
        "/run/plain",
        Some("ext4"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount the plain disk");
    for (label, dir) in [("state", "/var/lib/cvm-state"), ("plain", "/run/plain")] {
        let (write, read) = measure_throughput(&Path::new(dir).join("throughput.bin"), mib);
        println!("payload: throughput {label} write={write:.1} read={read:.1} MiB/s");
    }
}

fn measure_throughput(path: &Path, mib: u64) -> (f64, f64) {
    use std::io::{Read, Write};
    let mut chunk = vec![0u8; 1 << 20];
    let started = Instant::now();
    let mut f = std::fs::File::create(path).expect("create the throughput file");
    for index in 0..mib {
        probe_chunk(index, &mut chunk);
        f.write_all(&chunk).expect("write");
    }
    f.sync_all().expect("sync");
    let write = mib as f64 / started.elapsed().as_secs_f64();
    drop(f);
    std::fs::write("/proc/sys/vm/drop_caches", b"3").expect("drop caches");
    let started = Instant::now();
    let mut f = std::fs::File::open(path).expect("open the throughput file");
    for _ in 0..mib {
        f.read_exact(&mut chunk).expect("read");
    }
    let read = mib as f64 / started.elapsed().as_secs_f64();
    std::fs::remove_file(path).expect("remove the throughput file");
    (write, read)
}

/// Runs `ctr` and prints what it said; true on success.
fn ctr(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("/usr/bin/ctr")
        .args(["--address", "/run/containerd/containerd.sock"])
        .args(args)
        .output();
    match out {
        Ok(out) if out.status.success() => Some(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => {
            println!(
                "payload: ctr {} failed: {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            None
        }
        Err(e) => {
            println!("payload: cannot run ctr: {e}");
            None
        }
    }
}

/// Imports the busybox OCI archive, runs a container that writes a marker into its own root
/// (a snapshot on the state disk), reports the service log files, then SIGKILLs containerd.
fn container_probe() {
    if ctr(&["images", "import", "/usr/share/cvm-test/busybox-oci.tar"]).is_none() {
        return;
    }
    println!("payload: image imported");
    let said = ctr(&[
        "run",
        "--rm",
        "docker.io/cvm-test/busybox:1",
        "probe",
        "/bin/sh",
        "-c",
        "echo container-$((6*7))-marker-5e1f9a > /marker && sync && cat /marker",
    ]);
    if let Some(said) = said {
        println!("payload: container said {}", said.trim());
    }
    nix::unistd::sync();
    for name in ["containerd", "kubelet"] {
        let path = format!("/var/log/cvm/{name}.log");
        let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        println!("payload: service log {path} bytes={bytes}");
    }
    let containerd = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "containerd")
        });
    if let Some(pid) = containerd {
        // What the init applied to it: its own cgroup, the OOM bias, the file limit.
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let oom = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap_or_default();
        let nofile = std::fs::read_to_string(format!("/proc/{pid}/limits"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .map(|l| l.split_whitespace().nth(3).unwrap_or("").to_string())
            .unwrap_or_default();
        println!(
            "payload: containerd cgroup={} oom_score_adj={} nofile={nofile}",
            cgroup.trim(),
            oom.trim()
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        println!("payload: killed containerd pid {pid}");
    }
}
