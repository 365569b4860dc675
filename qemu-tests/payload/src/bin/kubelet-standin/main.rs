//! KUBELET STAND-IN for test and demo images — not a kubelet. No kubelet package exists in
//! the registries this project can reach, so test images put this program at the kubelet's
//! path: it logs its arguments, asks the container runtime for its version over CRI
//! (`runtime.v1.RuntimeService/Version`, gRPC over HTTP/2 on the unix socket), says when it
//! reaches the runtime and when it loses it, and keeps running until SIGTERM.
//!
//! The CRI client is `grpc.rs`.
//!
//! Before that it takes the first steps of joining a cluster (`join.rs`), as far as a test can
//! observe them. In the test image it also runs one pod through CRI (`workload.rs`), from an
//! image it serves itself (`registry.rs`), whose containers run this same executable
//! (`probe.rs`).

use std::time::Duration;

mod grpc;
mod join;
mod probe;
mod registry;
mod workload;

const DEFAULT_ENDPOINT: &str = "/run/containerd/containerd.sock";
const VERSION_PATH: &str = "/runtime.v1.RuntimeService/Version";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Inside a test container the same executable is the container's program.
    if std::env::args().next().as_deref() == Some(registry::ENTRYPOINT) {
        std::process::exit(probe::run(&args));
    }
    println!(
        "kubelet-standin: this is a stand-in, not a kubelet; arguments: {}",
        args.join(" ")
    );
    // A kubelet without --hostname-override registers the node under the kernel's host name.
    let node_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    println!("kubelet-standin: node name {}", node_name.trim_end());
    // The join steps beside the runtime's: neither waits for the other.
    let join_args = args.clone();
    std::thread::spawn(move || join::run(&join_args));
    let endpoint = args
        .iter()
        .find_map(|a| a.strip_prefix("--container-runtime-endpoint="))
        .map(|e| e.trim_start_matches("unix://").to_string())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    let mut reached = false;
    let mut ran_pod = false;
    let mut last_error = String::new();
    loop {
        match runtime_version(&endpoint) {
            Ok(version) => {
                if !reached {
                    println!(
                        "kubelet-standin: reached the container runtime at {endpoint}: {version}"
                    );
                    if !ran_pod && workload::wanted() {
                        ran_pod = true;
                        let socket = endpoint.clone();
                        std::thread::spawn(move || workload::run(&socket));
                    }
                    reached = true;
                    last_error.clear();
                }
            }
            Err(e) => {
                if reached || e != last_error {
                    println!("kubelet-standin: container runtime at {endpoint} unreachable: {e}");
                }
                reached = false;
                last_error = e;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One CRI Version call; returns "name version (CRI api version)".
fn runtime_version(socket: &str) -> Result<String, String> {
    // VersionRequest { version: "v1" }
    let request = grpc::Msg::new().string(1, "v1").encode();
    let answer = grpc::unary(socket, VERSION_PATH, &request, Duration::from_secs(5))?;
    let field = |n| {
        let s = grpc::string_field(&answer, n);
        if s.is_empty() {
            "?".to_string()
        } else {
            s
        }
    };
    Ok(format!("{} {} (CRI {})", field(2), field(3), field(4)))
}
