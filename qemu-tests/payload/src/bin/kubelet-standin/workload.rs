//! STAND-IN: a kubelet's way of running a pod, reduced to one test pod. When the test image's
//! containerd names the stand-in's registry (`/etc/containerd/certs.d/cvm-test.invalid`), the
//! stand-in serves its image there ([`crate::registry`]) and asks the runtime over CRI, as a
//! kubelet does: pull the image, run a pod (host network, privileged), create and start two
//! containers (`serve`, and `scan` with the node's root at `/host`), then it connects to each
//! and prints what they answer; finally it stops and removes the pod.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::grpc::{string_field, unary, Msg};
use crate::registry::{self, Image};

/// Present only in the test image: containerd's mirror configuration for the test registry.
pub const TRIGGER: &str = "/etc/containerd/certs.d/cvm-test.invalid/hosts.toml";
const REGISTRY: &str = "127.0.0.1:5000";
const IMAGE: &str = "cvm-test.invalid/probe:1";
const SERVE_ADDR: &str = "127.0.0.1:5555";
const SCAN_ADDR: &str = "127.0.0.1:5556";
const LOG_DIR: &str = "/var/log/pods/cvm-test_probe_0";
/// A pull and unpack, or a container's start, under TCG.
const CALL: Duration = Duration::from_secs(300);

const NAMESPACE_NODE: u64 = 2;
const NAMESPACE_CONTAINER: u64 = 1;

fn say(text: &str) {
    println!("kubelet-standin: test pod: {text}");
}

/// Runs the test pod once; says how far it got.
pub fn run(socket: &str) {
    if let Err(e) = run_pod(socket) {
        say(&format!("failed: {e}"));
    }
}

fn namespaces() -> Msg {
    Msg::new()
        .varint(1, NAMESPACE_NODE) // network
        .varint(2, NAMESPACE_CONTAINER) // pid
        .varint(3, NAMESPACE_NODE) // ipc
}

fn sandbox_config() -> Msg {
    Msg::new()
        .message(
            1,
            Msg::new()
                .string(1, "probe")
                .string(2, "cvm-test-probe-uid")
                .string(3, "cvm-test"),
        )
        .string(3, LOG_DIR)
        .message(
            8,
            Msg::new().string(1, "/kubepods/cvm-test").message(
                2,
                Msg::new().message(1, namespaces()).varint(6, 1), // privileged
            ),
        )
}

fn container_config(name: &str, args: &[&str], privileged: bool, host_root: bool) -> Msg {
    let mut config = Msg::new()
        .message(1, Msg::new().string(1, name))
        .message(2, Msg::new().string(1, IMAGE));
    for arg in args {
        config = config.string(4, arg);
    }
    if host_root {
        // Mount { container_path, host_path, readonly }
        config = config.message(7, Msg::new().string(1, "/host").string(2, "/").varint(3, 1));
    }
    let mut security = Msg::new();
    if privileged {
        security = security.varint(2, 1);
    }
    config
        .string(11, &format!("{name}.log"))
        .message(15, Msg::new().message(2, security.message(3, namespaces())))
}

fn call(socket: &str, method: &str, request: Msg) -> Result<Vec<u8>, String> {
    let path = format!("/runtime.v1.{method}");
    unary(socket, &path, &request.encode(), CALL).map_err(|e| format!("{method}: {e}"))
}

fn run_pod(socket: &str) -> Result<(), String> {
    let executable =
        std::fs::read("/proc/self/exe").map_err(|e| format!("cannot read /proc/self/exe: {e}"))?;
    let image = Arc::new(Image::of_executable(&executable));
    let listener =
        TcpListener::bind(REGISTRY).map_err(|e| format!("cannot listen on {REGISTRY}: {e}"))?;
    say(&format!(
        "serving {IMAGE} ({}, {} bytes of {}) and the pause image at {REGISTRY}",
        image.manifest_digest,
        executable.len(),
        registry::ENTRYPOINT
    ));
    let served = Arc::clone(&image);
    std::thread::spawn(move || registry::serve(listener, served));
    std::fs::create_dir_all(LOG_DIR).map_err(|e| format!("cannot create {LOG_DIR}: {e}"))?;

    let started = Instant::now();
    let pulled = call(
        socket,
        "ImageService/PullImage",
        Msg::new().message(1, Msg::new().string(1, IMAGE)),
    )?;
    say(&format!(
        "pulled {IMAGE} as {} in {} ms",
        string_field(&pulled, 1),
        started.elapsed().as_millis()
    ));
    let ran = call(
        socket,
        "RuntimeService/RunPodSandbox",
        Msg::new().message(1, sandbox_config()),
    )?;
    let pod = string_field(&ran, 1);
    say(&format!("pod sandbox {pod} running"));
    let mut containers = Vec::new();
    for (name, args, privileged, host_root, addr) in [
        (
            "serve",
            &["serve", SERVE_ADDR][..],
            false,
            false,
            SERVE_ADDR,
        ),
        (
            "scan",
            &["scan", "/host", SCAN_ADDR][..],
            true,
            true,
            SCAN_ADDR,
        ),
    ] {
        let created = call(
            socket,
            "RuntimeService/CreateContainer",
            Msg::new()
                .string(1, &pod)
                .message(2, container_config(name, args, privileged, host_root))
                .message(3, sandbox_config()),
        )?;
        let id = string_field(&created, 1);
        call(
            socket,
            "RuntimeService/StartContainer",
            Msg::new().string(1, &id),
        )?;
        say(&format!(
            "container {name} started ({}{})",
            if privileged {
                "privileged"
            } else {
                "unprivileged"
            },
            if host_root {
                ", the node's / at /host"
            } else {
                ""
            }
        ));
        containers.push((name, addr));
    }
    for (name, addr) in containers {
        let answer = reach(addr)?;
        for line in answer.lines() {
            say(&format!("{name} at {addr}: {}", printable(line)));
        }
    }
    call(
        socket,
        "RuntimeService/StopPodSandbox",
        Msg::new().string(1, &pod),
    )?;
    call(
        socket,
        "RuntimeService/RemovePodSandbox",
        Msg::new().string(1, &pod),
    )?;
    say(&format!(
        "pod sandbox {pod} stopped and removed, {} ms after the pull began",
        started.elapsed().as_millis()
    ));
    Ok(())
}

/// What the container listening on `addr` answers, retried until it listens (a minute).
fn reach(addr: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match TcpStream::connect(addr) {
            Ok(mut stream) => {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let mut text = String::new();
                stream
                    .read_to_string(&mut text)
                    .map_err(|e| format!("reading {addr}: {e}"))?;
                return Ok(text);
            }
            Err(e) if Instant::now() > deadline => {
                return Err(format!("nothing listens on {addr} after a minute: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Text from a container, with control characters replaced.
fn printable(line: &str) -> String {
    line.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Whether this image asks for the test pod.
pub fn wanted() -> bool {
    Path::new(TRIGGER).exists()
}
