//! STAND-IN: a kubelet's way of running a pod, reduced to one test pod. When the test image's
//! containerd names the stand-in's registry (`/etc/containerd/certs.d/cvm-test.invalid`), the
//! stand-in serves its image there ([`crate::registry`]) and asks the runtime over CRI, as a
//! kubelet does: pull the image, run a pod (privileged, on a CNI bridge network whose
//! configuration the stand-in writes as a CNI DaemonSet would), create and start two containers
//! (`serve`, and `scan` with the node's root at `/host`), then it connects to each at the pod's
//! address and prints what they answer; finally it stops and removes the pod.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::grpc::{bytes_field, string_field, unary, Msg};
use crate::registry::{self, Image};

/// Present only in the test image: containerd's mirror configuration for the test registry.
pub const TRIGGER: &str = "/etc/containerd/certs.d/cvm-test.invalid/hosts.toml";
const REGISTRY: &str = "127.0.0.1:5000";
const IMAGE: &str = "cvm-test.invalid/probe:1";
const SERVE_PORT: u16 = 5555;
const SCAN_PORT: u16 = 5556;
/// The pod network, as a CNI DaemonSet installs one: Debian's bridge, host-local and portmap
/// plugins (the image keeps them), masquerading through iptables.
const CNI_CONFIG: &str = "/etc/cni/net.d/10-cvm-test.conflist";
const CNI_NETWORK: &str = r#"{"cniVersion":"1.0.0","name":"cvm-test","plugins":[{"type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":true,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.88.0.0/24"}]],"routes":[{"dst":"0.0.0.0/0"}]}},{"type":"portmap","capabilities":{"portMappings":true}}]}
"#;
const LOG_DIR: &str = "/var/log/pods/cvm-test_probe_0";
/// A pull and unpack, or a container's start, under TCG.
const CALL: Duration = Duration::from_secs(300);

const NAMESPACE_POD: u64 = 0;
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
        .varint(1, NAMESPACE_POD) // network
        .varint(2, NAMESPACE_CONTAINER) // pid
        .varint(3, NAMESPACE_POD) // ipc
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
    let image = Image::of_executable(&executable);
    let listener =
        TcpListener::bind(REGISTRY).map_err(|e| format!("cannot listen on {REGISTRY}: {e}"))?;
    say(&format!(
        "serving {IMAGE} ({}, {} bytes of {}) and the pause image at {REGISTRY}",
        image.manifest_digest,
        executable.len(),
        registry::ENTRYPOINT
    ));
    std::thread::spawn(move || registry::serve(listener, image));
    std::fs::create_dir_all(LOG_DIR).map_err(|e| format!("cannot create {LOG_DIR}: {e}"))?;
    std::fs::write(CNI_CONFIG, CNI_NETWORK)
        .map_err(|e| format!("cannot write {CNI_CONFIG}: {e}"))?;

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
    // containerd takes up the new network configuration when it sees the file: until then a
    // pod is refused ("cni plugin not initialized").
    let mut tries = 0;
    let ran = loop {
        match call(
            socket,
            "RuntimeService/RunPodSandbox",
            Msg::new().message(1, sandbox_config()),
        ) {
            Ok(ran) => break ran,
            Err(e) if tries < 10 => {
                tries += 1;
                say(&format!("{e}; trying again"));
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    };
    let pod = string_field(&ran, 1);
    // PodSandboxStatusResponse.status (1) → PodSandboxStatus.network (5) → .ip (1)
    let status = call(
        socket,
        "RuntimeService/PodSandboxStatus",
        Msg::new().string(1, &pod),
    )?;
    let ip = string_field(&bytes_field(&bytes_field(&status, 1), 5), 1);
    if ip.is_empty() {
        return Err(format!("pod sandbox {pod} has no IP address"));
    }
    say(&format!(
        "pod sandbox {pod} running, pod IP {ip} (the CNI bridge network of {CNI_CONFIG})"
    ));
    let serve_listen = format!("0.0.0.0:{SERVE_PORT}");
    let scan_listen = format!("0.0.0.0:{SCAN_PORT}");
    let mut containers = Vec::new();
    for (name, args, privileged, host_root, port) in [
        (
            "serve",
            vec!["serve", &serve_listen],
            false,
            false,
            SERVE_PORT,
        ),
        (
            "scan",
            vec!["scan", "/host", &scan_listen],
            true,
            true,
            SCAN_PORT,
        ),
    ] {
        let created = call(
            socket,
            "RuntimeService/CreateContainer",
            Msg::new()
                .string(1, &pod)
                .message(2, container_config(name, &args, privileged, host_root))
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
        containers.push((name, format!("{ip}:{port}")));
    }
    for (name, addr) in containers {
        let answer = reach(&addr)?;
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
    let _ = std::fs::remove_file(CNI_CONFIG);
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
