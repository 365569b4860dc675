//! The container runtime in test and demo roots: containerd, its runc shim, ctr and runc from
//! Debian's packages (unpacked into the cache by `make deps`), with their libraries; a
//! containerd configuration for a node without systemd; the kubelet stand-in at the kubelet's
//! path; and a busybox OCI image archive for a container to run.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Where the stand-in sits: the path the real kubelet has in the production image.
pub const KUBELET_PATH: &str = "usr/bin/kubelet";
/// The OCI archive in the root, and the image name inside it.
pub const BUSYBOX_ARCHIVE: &str = "usr/share/cvm-test/busybox-oci.tar";
pub const BUSYBOX_IMAGE: &str = "docker.io/cvm-test/busybox:1";

/// A node's configuration file: the encrypted state disk, containerd, and the kubelet (here
/// the stand-in) once containerd's socket accepts. Tests and benchmarks append services.
pub const NODE_CONFIG: &str = r#"
service_log_dir = "/var/log/cvm"

[state]
serial = "cvm-state"
key = "tpm"
binds = ["/var/lib/containerd", "/var/lib/kubelet", "/etc/kubernetes", "/var/log"]

[[service]]
name = "containerd"
path = "/usr/bin/containerd"
args = ["--config", "/etc/containerd/config.toml"]
ready_socket = "/run/containerd/containerd.sock"
oom_score_adj = -999
limits = { nofile = 1048576, nproc = "infinity", core = "infinity" }

[[service]]
name = "kubelet"
path = "/usr/bin/kubelet"
args = [
  "--container-runtime-endpoint=unix:///run/containerd/containerd.sock",
  "--kubeconfig=/etc/kubernetes/kubelet.conf",
  "--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf",
  "--root-dir=/var/lib/kubelet",
]
after = ["containerd"]
cgroup = { pids_max = 4096 }
"#;

/// containerd for cgroup v2 without systemd: cgroupfs, overlayfs snapshots on the state disk,
/// CRI enabled (the kubelet's API), the snapshotters a node does not have switched off. The
/// node image's own file, so that test roots and the image run the same configuration.
pub const CONTAINERD_CONFIG: &str = include_str!("../../image/extra/etc/containerd/config.toml");

/// The unpacked Debian packages.
pub fn cache_dir() -> PathBuf {
    crate::from_env(
        "CVM_RUNTIME_DIR",
        crate::workspace_root().join(".cache/container-runtime"),
    )
}

/// Installs the runtime, the stand-in and the busybox image into `tree`.
pub fn install(tree: &Path, standin: &Path) {
    let cache = cache_dir();
    assert!(
        cache.join("ready").exists(),
        "no container runtime in {}: run `make deps`",
        cache.display()
    );
    let root = cache.join("root");
    for program in [
        "usr/bin/containerd",
        "usr/bin/containerd-shim-runc-v2",
        "usr/bin/ctr",
        "usr/sbin/runc",
    ] {
        crate::copy_with_libraries_to(&root.join(program), tree, Path::new(program));
    }
    let write = |path: &str, bytes: &[u8]| {
        let target = tree.join(path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(&target, bytes).unwrap_or_else(|e| panic!("write {path}: {e}"));
    };
    write("etc/containerd/config.toml", CONTAINERD_CONFIG.as_bytes());
    // CNI's places exist in the read-only root (empty: no pod network in these tests).
    for dir in ["etc/cni/net.d", "opt/cni/bin"] {
        std::fs::create_dir_all(tree.join(dir)).unwrap();
    }
    let kubelet = tree.join(KUBELET_PATH);
    std::fs::copy(standin, &kubelet)
        .unwrap_or_else(|e| panic!("copy the kubelet stand-in {}: {e}", standin.display()));
    write(
        BUSYBOX_ARCHIVE,
        &busybox_oci_archive(&root.join("bin/busybox")),
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `tar` of a directory with fixed owners and times, so that the same inputs give the same
/// archive.
fn tar(dir: &Path) -> Vec<u8> {
    let out = Command::new("tar")
        .args([
            "--format=ustar",
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-cf",
            "-",
            "-C",
        ])
        .arg(dir)
        .arg(".")
        .output()
        .expect("run tar");
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// An OCI image layout archive (what `ctr images import` reads) with one layer: a static
/// busybox and the applet links a probe needs.
pub fn busybox_oci_archive(busybox: &Path) -> Vec<u8> {
    let work = tempfile::tempdir().unwrap();
    let layer_dir = work.path().join("layer");
    std::fs::create_dir_all(layer_dir.join("bin")).unwrap();
    std::fs::create_dir_all(layer_dir.join("tmp")).unwrap();
    std::fs::copy(busybox, layer_dir.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "echo", "sleep", "sync", "ls"] {
        std::os::unix::fs::symlink("busybox", layer_dir.join("bin").join(applet)).unwrap();
    }
    let layer = tar(&layer_dir);
    let layer_digest = sha256_hex(&layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{layer_digest}"]}}}}"#
    );
    let config_digest = sha256_hex(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{layer_digest}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let manifest_digest = sha256_hex(manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_digest}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"{BUSYBOX_IMAGE}","io.containerd.image.name":"{BUSYBOX_IMAGE}"}}}}]}}"#,
        manifest.len()
    );
    let oci = work.path().join("oci");
    let blobs = oci.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(&layer_digest), &layer).unwrap();
    std::fs::write(blobs.join(&config_digest), &config).unwrap();
    std::fs::write(blobs.join(&manifest_digest), &manifest).unwrap();
    std::fs::write(oci.join("index.json"), &index).unwrap();
    std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    tar(&oci)
}
