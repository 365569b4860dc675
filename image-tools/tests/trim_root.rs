//! `image/trim-root.py` on a small tree: a dynamically linked service keeps its loader and
//! libraries (found from its ELF header), everything else goes, and what remains passes the
//! check `make image` runs; a library the service needs and the tree lacks stops it by name.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

/// The host's /bin/true and the libraries it links, laid out as Debian lays out a root.
fn tree_with_a_service(root: &Path) {
    for dir in [
        "usr/bin",
        "usr/lib/x86_64-linux-gnu",
        "usr/lib64",
        "etc/cvm-init",
        "var/lib/kubelet",
        "var",
        "usr/lib/cni",
        "opt/cni/bin",
    ] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    symlink("usr/bin", root.join("bin")).unwrap();
    symlink("usr/lib", root.join("lib")).unwrap();
    symlink("usr/lib64", root.join("lib64")).unwrap();
    let exe = |path: &str, from: &str| {
        fs::copy(from, root.join(path)).unwrap();
        fs::set_permissions(root.join(path), fs::Permissions::from_mode(0o755)).unwrap();
    };
    exe("usr/bin/service", "/bin/true");
    exe(
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/x86_64-linux-gnu/libc.so.6",
    );
    exe(
        "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "/lib64/ld-linux-x86-64.so.2",
    );
    symlink(
        "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        root.join("usr/lib64/ld-linux-x86-64.so.2"),
    )
    .unwrap();
    // Debian's CNI plugins, linked into /opt/cni/bin as mkosi.postinst links them.
    for plugin in [
        "loopback",
        "bridge",
        "host-local",
        "portmap",
        "dhcp",
        "macvlan",
    ] {
        exe(&format!("usr/lib/cni/{plugin}"), "/bin/true");
        symlink(
            format!("/usr/lib/cni/{plugin}"),
            root.join("opt/cni/bin").join(plugin),
        )
        .unwrap();
    }
    // What the node does not run.
    exe("usr/bin/bash", "/bin/true");
    symlink("bash", root.join("usr/bin/sh")).unwrap();
    exe("usr/bin/perl", "/bin/true");
    exe("usr/bin/mount", "/bin/true");
    fs::set_permissions(
        root.join("usr/bin/mount"),
        fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    fs::write(root.join("usr/lib/x86_64-linux-gnu/libperl.so.5"), b"").unwrap();
    fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
    fs::write(root.join("etc/motd"), b"hello\n").unwrap();
    fs::write(
        root.join("etc/cvm-init/config.toml"),
        "[[service]]\nname = \"svc\"\npath = \"/usr/bin/service\"\n",
    )
    .unwrap();
}

/// The tree in a temporary directory, or None (said) where the host has no glibc to copy.
fn tree() -> Option<tempfile::TempDir> {
    if !Path::new("/lib64/ld-linux-x86-64.so.2").exists() {
        eprintln!("skipped: no x86-64 glibc loader on this machine");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    tree_with_a_service(dir.path());
    Some(dir)
}

fn trim(root: &Path) -> std::process::Output {
    trim_with(root, None)
}

/// trim-root.py with CNI_PLUGINS set to `plugins`, or unset.
fn trim_with(root: &Path, plugins: Option<&str>) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/trim-root.py");
    // Debian's (3.11 or newer, with tomllib; `make deps` installs it) before another on PATH.
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let mut command = Command::new(python);
    command.arg(script).arg(root).env_remove("CNI_PLUGINS");
    if let Some(plugins) = plugins {
        command.env("CNI_PLUGINS", plugins);
    }
    command.output().expect("python3 (make deps installs it)")
}

/// The script stopped, saying `expected`, before it removed anything.
fn assert_refused(out: std::process::Output, root: &Path, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{expected}: it went ahead");
    assert!(stderr.contains(expected), "{expected}: {stderr}");
    assert!(
        root.join("usr/bin/bash").exists(),
        "{expected}: files were removed"
    );
}

#[test]
fn only_the_service_and_what_it_links_remain() {
    let Some(dir) = tree() else {
        return;
    };
    let root = dir.path();
    let before = cvm_image::root_check::check(root).unwrap();
    assert!(before.findings.len() >= 4, "{:?}", before.findings);
    let out = trim(root);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for kept in [
        "usr/bin/service",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "usr/lib64/ld-linux-x86-64.so.2",
        "lib64",
        "etc/passwd",
        "etc/cvm-init/config.toml",
        // The default CNI plugins, and their links.
        "usr/lib/cni/loopback",
        "usr/lib/cni/bridge",
        "usr/lib/cni/host-local",
        "usr/lib/cni/portmap",
        "opt/cni/bin/loopback",
        "opt/cni/bin/portmap",
    ] {
        assert!(
            root.join(kept).symlink_metadata().is_ok(),
            "{kept} was removed"
        );
    }
    for removed in [
        "usr/bin/bash",
        "usr/bin/sh",
        "usr/bin/perl",
        "usr/bin/mount",
        "usr/lib/x86_64-linux-gnu/libperl.so.5",
        "etc/motd",
        // Plugins not asked for: a CNI that needs one installs it into /opt/cni/bin.
        "usr/lib/cni/dhcp",
        "usr/lib/cni/macvlan",
        "opt/cni/bin/dhcp",
    ] {
        assert!(
            root.join(removed).symlink_metadata().is_err(),
            "{removed} was kept"
        );
    }
    // Directories stay: they are mount points.
    assert!(root.join("var/lib/kubelet").is_dir());
    let after = cvm_image::root_check::check(root).unwrap();
    assert!(after.findings.is_empty(), "{:?}", after.findings);
}

#[test]
fn a_library_the_tree_lacks_stops_it_by_name() {
    let Some(dir) = tree() else {
        return;
    };
    let root = dir.path();
    fs::remove_file(root.join("usr/lib/x86_64-linux-gnu/libc.so.6")).unwrap();
    assert_refused(trim(root), root, "/usr/bin/service needs libc.so.6");
}

#[test]
fn cni_plugins_chooses_the_plugins_and_a_missing_one_stops_it_by_name() {
    let Some(dir) = tree() else {
        return;
    };
    let root = dir.path();
    let out = trim_with(root, Some("loopback,macvlan"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (plugin, kept) in [("loopback", true), ("macvlan", true), ("bridge", false)] {
        for path in [
            format!("usr/lib/cni/{plugin}"),
            format!("opt/cni/bin/{plugin}"),
        ] {
            assert_eq!(root.join(&path).symlink_metadata().is_ok(), kept, "{path}");
        }
    }

    let Some(dir) = tree() else {
        return;
    };
    let root = dir.path();
    for (plugins, expected) in [
        (
            "loopback,flannel",
            "no plugin flannel in /usr/lib/cni (the image has: bridge dhcp",
        ),
        ("../../bin/bash", "'../../bin/bash' is not a plugin name"),
        (" ", "CNI_PLUGINS is empty"),
    ] {
        assert_refused(trim_with(root, Some(plugins)), root, expected);
    }
}

/// A kernel's modules as Debian installs them, with an index depmod would write.
fn with_modules(root: &Path) {
    let dir = root.join("usr/lib/modules/6.12.0-test");
    fs::create_dir_all(dir.join("kernel/net")).unwrap();
    for module in ["bridge", "stp", "llc", "veth", "br_netfilter"] {
        fs::write(dir.join(format!("kernel/net/{module}.ko.xz")), module).unwrap();
    }
    fs::write(dir.join("vmlinuz"), b"kernel").unwrap();
    fs::write(
        dir.join("modules.dep"),
        "kernel/net/bridge.ko.xz: kernel/net/stp.ko.xz kernel/net/llc.ko.xz\n\
         kernel/net/stp.ko.xz: kernel/net/llc.ko.xz\nkernel/net/llc.ko.xz:\n\
         kernel/net/veth.ko.xz:\nkernel/net/br_netfilter.ko.xz: kernel/net/bridge.ko.xz \
         kernel/net/stp.ko.xz kernel/net/llc.ko.xz\n",
    )
    .unwrap();
    fs::write(dir.join("modules.builtin"), "kernel/net/unix.ko\n").unwrap();
    fs::write(
        dir.join("modules.alias"),
        "alias rtnl-link-bridge bridge\nalias rtnl-link-veth veth\nalias crypto-sum sum_generic\n",
    )
    .unwrap();
    // Two lines for one module, and a soft dependency named by an alias with a dash.
    fs::write(
        dir.join("modules.softdep"),
        "softdep bridge post: br_netfilter\nsoftdep bridge pre: crypto-sum\n",
    )
    .unwrap();
    fs::write(dir.join("kernel/net/sum_generic.ko.xz"), "sum").unwrap();
    let mut dep = fs::read_to_string(dir.join("modules.dep")).unwrap();
    dep.push_str("kernel/net/sum_generic.ko.xz:\n");
    fs::write(dir.join("modules.dep"), dep).unwrap();
    fs::write(dir.join("modules.symbols"), "alias symbol:x bridge\n").unwrap();
}

#[test]
fn the_configurations_modules_stay_with_their_dependencies_and_nothing_else() {
    let Some(dir) = tree() else {
        return;
    };
    let root = dir.path();
    with_modules(root);
    symlink("/run", root.join("var/run")).unwrap();
    fs::write(
        root.join("etc/cvm-init/config.toml"),
        "modules = [\"bridge\", \"unix\"]\n[[service]]\nname = \"svc\"\npath = \"/usr/bin/service\"\n",
    )
    .unwrap();
    let out = trim(root);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = root.join("usr/lib/modules/6.12.0-test");
    // bridge, what modules.dep says it needs, and its soft dependency (with its own needs).
    for kept in ["bridge", "stp", "llc", "br_netfilter", "sum_generic"] {
        assert!(
            m.join(format!("kernel/net/{kept}.ko.xz")).exists(),
            "{kept}"
        );
    }
    assert!(!m.join("kernel/net/veth.ko.xz").exists());
    assert!(!m.join("modules.symbols").exists());
    // mkosi still makes the UKI from the kernel (the root partition leaves it out).
    assert!(m.join("vmlinuz").exists());
    let dep = fs::read_to_string(m.join("modules.dep")).unwrap();
    assert!(
        dep.contains("kernel/net/bridge.ko.xz: kernel/net/stp.ko.xz"),
        "{dep}"
    );
    assert!(!dep.contains("veth"), "{dep}");
    let alias = fs::read_to_string(m.join("modules.alias")).unwrap();
    assert_eq!(
        alias,
        "alias rtnl-link-bridge bridge\nalias crypto-sum sum_generic\n"
    );
    // cvm-init's own resolver, on what the root keeps, finds every module it will load.
    let index =
        cvm_init::modules::ModuleIndex::load(&cvm_init::sys::Linux, &m, "6.12.0-test").unwrap();
    let order = index
        .resolve_marked(&["bridge".to_string(), "unix".to_string()])
        .unwrap();
    let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["sum_generic", "llc", "stp", "bridge", "br_netfilter"]
    );
    for (name, _) in &order {
        let path = index.relative_path(name).unwrap();
        assert!(m.join(path).exists(), "{name}: {path} not kept");
    }
    // Debian's /var/run link: containerd makes network namespaces under it.
    assert!(root.join("var/run").symlink_metadata().is_ok());

    let Some(dir) = tree() else {
        return;
    };
    let root = dir.path();
    with_modules(root);
    fs::write(
        root.join("etc/cvm-init/config.toml"),
        "modules = [\"bridge\", \"wireguard\"]\n",
    )
    .unwrap();
    assert_refused(
        trim(root),
        root,
        "/etc/cvm-init/config.toml: modules: 'wireguard': kernel 6.12.0-test has no such module, neither loadable nor built in",
    );
}

#[test]
fn an_alias_several_kernels_or_a_cycle_in_the_modules_stop_it_by_name() {
    for (config, prepare, expected) in [
        (
            "modules = [\"rtnl-link-veth\"]\n",
            None,
            "modules: 'rtnl-link-veth' is an alias of veth: name the module itself",
        ),
        (
            "modules = [\"veth\"]\n",
            Some("two kernels"),
            "the root has the modules of 2 kernels (6.12.0-test 6.13.0-test)",
        ),
        (
            "modules = [\"bridge\"]\n",
            Some("cycle"),
            "module bridge has a dependency cycle",
        ),
    ] {
        let Some(dir) = tree() else {
            return;
        };
        let root = dir.path();
        with_modules(root);
        let m = root.join("usr/lib/modules/6.12.0-test");
        match prepare {
            Some("two kernels") => {
                fs::create_dir_all(root.join("usr/lib/modules/6.13.0-test")).unwrap()
            }
            Some(_) => fs::write(
                m.join("modules.softdep"),
                "softdep bridge pre: llc\nsoftdep llc pre: bridge\n",
            )
            .unwrap(),
            None => {}
        }
        fs::write(root.join("etc/cvm-init/config.toml"), config).unwrap();
        assert_refused(trim(root), root, expected);
    }
}
