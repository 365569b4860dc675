//! The boot-test harness: test images (cpio initramfs with cvm-init and the test payload),
//! QEMU guests with optional swtpm, QMP, and console markers.

pub mod broker;
pub mod dhcp_server;
pub mod guest;
pub mod image;
pub mod qmp;
pub mod runtime;
pub mod support;

use std::path::{Path, PathBuf};

/// The cpio writer and the initramfs live in the image tooling (`cvm-image`), which `make image`
/// builds without the harness.
pub use cvm_image::{cpio, initramfs};
pub use guest::{Guest, RunningGuest};
pub use initramfs::{InitramfsSpec, Kernel};

/// The artifacts a boot test needs, from the environment `make test` sets, or the default
/// places `make` builds them.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub init: PathBuf,
    pub payload: PathBuf,
    /// The kubelet stand-in (test and demo roots with a container runtime).
    pub kubelet_standin: PathBuf,
    pub kernel: Kernel,
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub(crate) fn from_env(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
}

impl Artifacts {
    /// Finds the artifacts; panics with what to run when one is missing.
    pub fn get() -> Artifacts {
        let root = workspace_root();
        let init = from_env(
            "CVM_INIT_BIN",
            root.join("target/x86_64-unknown-linux-musl/test-image/cvm-init"),
        );
        let payload = from_env(
            "CVM_PAYLOAD_BIN",
            root.join("target/x86_64-unknown-linux-musl/test-image/cvm-test-payload"),
        );
        let kubelet_standin = from_env(
            "CVM_KUBELET_STANDIN_BIN",
            root.join("target/x86_64-unknown-linux-musl/test-image/kubelet-standin"),
        );
        let kernel_dir = from_env("CVM_KERNEL_DIR", root.join(".cache/kernel"));
        for (what, path) in [("cvm-init (test build)", &init), ("test payload", &payload)] {
            assert!(
                path.exists(),
                "{what} not found at {}: run the boot tests with `make test` (or `make test-artifacts` first)",
                path.display()
            );
        }
        let kernel = Kernel::open(&kernel_dir).unwrap_or_else(|e| {
            panic!(
                "no cached kernel in {}: run `make deps` ({e})",
                kernel_dir.display()
            )
        });
        Artifacts {
            init,
            payload,
            kubelet_standin,
            kernel,
        }
    }

    /// Builds the initramfs (cvm-init and its modules) into `dir` and returns its path.
    pub fn initramfs(&self, dir: &Path) -> PathBuf {
        let spec = InitramfsSpec {
            init: self.init.clone(),
            ..Default::default()
        };
        let out = dir.join("initrd.cpio");
        initramfs::build(&spec, &self.kernel, &out)
            .unwrap_or_else(|e| panic!("cannot build the test initramfs: {}", chain(&e)));
        out
    }

    /// Lays out the root tree of a test image: the payload, the configuration file, and the
    /// mount points the init moves its pseudo file systems to.
    pub fn root_tree(&self, tree: &Path, config: Option<&str>) {
        let io =
            |what: &str, r: std::io::Result<()>| r.unwrap_or_else(|e| panic!("cannot {what}: {e}"));
        for dir in ["bin", "dev", "etc/cvm-init", "proc", "run", "sys", "tmp"] {
            io(
                "create the root tree",
                std::fs::create_dir_all(tree.join(dir)),
            );
        }
        io(
            "copy the payload",
            std::fs::copy(&self.payload, tree.join("bin/payload")).map(|_| ()),
        );
        if let Some(config) = config {
            io(
                "write the config",
                std::fs::write(tree.join("etc/cvm-init/config.toml"), config),
            );
        }
        // The resolver files the init writes on /run, as the production image links them.
        for name in ["resolv.conf", "hosts"] {
            io(
                "link the resolver files",
                std::os::unix::fs::symlink(
                    format!("../run/cvm-init/{name}"),
                    tree.join("etc").join(name),
                ),
            );
        }
        // 1 MiB of ballast, so that the verity tree has two levels, as any real root has.
        let ballast = pseudo_random_bytes(1 << 20, 0x853c49e6748fea9b);
        // The state disk's mkfs (a dynamic program with its libraries, as in a real root) and
        // the mount points the init binds onto the state file system.
        copy_with_libraries(Path::new("/sbin/mke2fs"), tree);
        for dir in [
            "var/lib/cvm-state",
            "var/lib/kubelet",
            "var/lib/containerd",
            "etc/kubernetes",
            "var/log",
        ] {
            io(
                "create a mount point",
                std::fs::create_dir_all(tree.join(dir)),
            );
        }
        let share = tree.join("usr/share/cvm-test");
        io(
            "create the ballast directory",
            std::fs::create_dir_all(&share),
        );
        io(
            "write the ballast",
            std::fs::write(share.join("ballast"), ballast),
        );
    }

    /// The initramfs and a verified root disk with this configuration file, in `dir`.
    pub fn image(&self, dir: &Path, config: Option<&str>) -> TestImage {
        self.image_with(dir, config, false, &[])
    }

    /// The same, with extra files (path in the root, contents).
    pub fn image_with_files(
        &self,
        dir: &Path,
        config: Option<&str>,
        files: &[(&str, Vec<u8>)],
    ) -> TestImage {
        self.image_with(dir, config, false, files)
    }

    /// The same, with containerd, runc, the kubelet stand-in and a busybox image in the root.
    pub fn image_with_runtime(&self, dir: &Path, config: &str) -> TestImage {
        self.image_with(dir, Some(config), true, &[])
    }

    /// The same, with extra files (path in the root, contents).
    pub fn image_with_runtime_and_files(
        &self,
        dir: &Path,
        config: &str,
        files: &[(&str, Vec<u8>)],
    ) -> TestImage {
        self.image_with(dir, Some(config), true, files)
    }

    fn image_with(
        &self,
        dir: &Path,
        config: Option<&str>,
        runtime: bool,
        files: &[(&str, Vec<u8>)],
    ) -> TestImage {
        let tree = dir.join("tree");
        self.root_tree(&tree, config);
        for (path, contents) in files {
            let target = tree.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(target.parent().expect("a file in a directory"))
                .and_then(|_| std::fs::write(&target, contents))
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", target.display()));
            // Programs (anything in a bin directory) are executable, as a package installs them.
            if path.contains("bin/") {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
                    .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", target.display()));
            }
        }
        if runtime {
            assert!(
                self.kubelet_standin.exists(),
                "kubelet stand-in not found at {}: run `make test-artifacts`",
                self.kubelet_standin.display()
            );
            runtime::install(&tree, &self.kubelet_standin);
        }
        // The digest manifest of the root's programs, as the image build writes it last.
        let manifest = tree.join(cvm_formats::digests::PATH.trim_start_matches('/'));
        cvm_formats::digests::Manifest::of_tree(&tree)
            .and_then(|text| {
                std::fs::create_dir_all(manifest.parent().expect("a directory"))?;
                std::fs::write(&manifest, text)
            })
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", manifest.display()));
        let root = image::build_root_disk(&tree, dir)
            .unwrap_or_else(|e| panic!("cannot build the root disk: {}", chain(&e)));
        TestImage {
            initrd: self.initramfs(dir),
            root,
        }
    }
}

/// Deterministic bytes that do not repeat (xorshift64), for test data that must not compress
/// or hash alike.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.max(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Copies a host program into the tree at the same path, with the shared libraries and the
/// loader `ldd` lists.
fn copy_with_libraries(program: &Path, tree: &Path) {
    copy_with_libraries_to(program, tree, program.strip_prefix("/").unwrap());
}

/// Copies a program to `target` (relative to the tree), with its libraries at their paths.
pub(crate) fn copy_with_libraries_to(program: &Path, tree: &Path, target: &Path) {
    let out = std::process::Command::new("ldd")
        .arg(program)
        .output()
        .unwrap_or_else(|e| panic!("ldd {}: {e}", program.display()));
    let destination = tree.join(target);
    std::fs::create_dir_all(destination.parent().unwrap()).unwrap();
    std::fs::copy(program, &destination)
        .unwrap_or_else(|e| panic!("copy {}: {e}", program.display()));
    let mut files = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(p) = path {
            files.push(p);
        }
    }
    for f in files {
        let target = tree.join(f.strip_prefix("/").unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        // Follow symlinks: the tree gets the real bytes under the linked name.
        std::fs::copy(&f, &target).unwrap_or_else(|e| panic!("copy {}: {e}", f.display()));
    }
}

/// What a boot test boots.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub initrd: PathBuf,
    pub root: image::RootDisk,
}

impl TestImage {
    /// The kernel command-line option that names the root.
    pub fn roothash_option(&self) -> String {
        format!("roothash={}", self.root.root_hash_hex())
    }
}

/// Formats an error with its sources.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    cvm_init::logger::chain(err)
}

/// The console's lines with the kernel's `[   1.234567] ` timestamps removed (the kernel
/// echoes kmsg records at or above its console log level itself, with a timestamp).
pub fn console_lines(log: &str) -> Vec<&str> {
    log.lines().map(strip_timestamp).collect()
}

pub fn strip_timestamp(line: &str) -> &str {
    let trimmed = line.trim_end_matches('\r');
    if let Some(rest) = trimmed.strip_prefix('[') {
        if let Some((stamp, text)) = rest.split_once("] ") {
            if stamp
                .trim()
                .bytes()
                .all(|c| c.is_ascii_digit() || c == b'.')
            {
                return text;
            }
        }
    }
    trimmed
}

/// The kernel timestamp (seconds since its start) of the first console line containing
/// `marker`, when the kernel echoed it.
pub fn kernel_time_of(log: &str, marker: &str) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains(marker))
        .find_map(|l| l.strip_prefix('[')?.split_once(']')?.0.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_stripped_and_read() {
        let log = "[    3.456789] cvm-init: ready\r\ncvm-init: phase x ok 1ms\n[bad] x\n";
        assert_eq!(
            console_lines(log),
            vec!["cvm-init: ready", "cvm-init: phase x ok 1ms", "[bad] x"]
        );
        assert_eq!(kernel_time_of(log, "cvm-init: ready"), Some(3.456789));
        assert_eq!(kernel_time_of(log, "phase x"), None);
    }
}
