//! STAND-IN: what the test image's containers run (the stand-in's own executable, as
//! `/cvm-probe` in an image the stand-in made): `pause` for the pod's sandbox, `serve ADDR`
//! to answer whoever connects with where it runs, and `scan DIR ADDR`, in a privileged
//! container with the node's root mounted at DIR, to look there for what an escaped workload
//! could use (the check `make image` runs on the built root) and answer with what it found.

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

#[path = "../../../../../image-tools/src/root_check.rs"]
#[allow(dead_code)]
mod root_check;

/// Runs the mode `args` names; the process's exit status.
pub fn run(args: &[String]) -> i32 {
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["pause"] => pause(),
        ["serve", addr] => {
            let text = format!(
                "a container of the test image: pid {}, host name {}\n",
                std::process::id(),
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .unwrap_or_default()
                    .trim()
            );
            serve(addr, &text)
        }
        ["scan", dir, addr] => serve(addr, &scan(Path::new(dir))),
        _ => {
            eprintln!("cvm-probe: expected `pause`, `serve ADDR` or `scan DIR ADDR`, got {args:?}");
            2
        }
    }
}

/// The sandbox: waits for SIGTERM or SIGINT, reaping children meanwhile.
fn pause() -> i32 {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        set.add(signal);
    }
    if let Err(e) = set.thread_block() {
        eprintln!("cvm-probe: cannot block signals: {e}");
        return 1;
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    if status == nix::sys::wait::WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => return 0,
            Err(e) => {
                eprintln!("cvm-probe: sigwait: {e}");
                return 1;
            }
        }
    }
}

/// Answers every connection to `addr` with `text`, until the container is stopped.
fn serve(addr: &str, text: &str) -> i32 {
    print!("{text}");
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cvm-probe: cannot listen on {addr}: {e}");
            return 1;
        }
    };
    for mut connection in listener.incoming().flatten() {
        let _ = connection.write_all(text.as_bytes());
    }
    0
}

/// What the node's root mounted at `dir` holds, as lines of text.
fn scan(dir: &Path) -> String {
    let mut out = String::new();
    let caps = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    out.push_str(&format!("effective capabilities {caps}\n"));
    let containerd = dir.join("usr/bin/containerd");
    out.push_str(&format!(
        "{} {}\n",
        containerd.display(),
        if containerd.is_file() {
            "is there: this is the node's root"
        } else {
            "is missing: this is not the node's root"
        }
    ));
    match root_check::check_one_filesystem(dir) {
        Ok(report) => {
            out.push_str(&format!(
                "{}: {} files, {} bytes on its file system; other file systems not entered: {}\n",
                dir.display(),
                report.files,
                report.bytes,
                report
                    .other_filesystems
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
            if report.findings.is_empty() {
                out.push_str(&format!(
                    "no shell, interpreter, package manager or setuid/setgid file on the file system at {} (the node's root)\n",
                    dir.display()
                ));
            }
            for finding in &report.findings {
                out.push_str(&format!("found {finding}\n"));
            }
        }
        Err(e) => out.push_str(&format!("cannot scan {}: {e}\n", dir.display())),
    }
    out
}
