#!/usr/bin/python3
"""Deny by default: keeps in the root tree only what the node runs and reads, and removes every
other file and link (directories stay: they are mount points or hold kept files).

What is kept: the services' binaries named in /etc/cvm-init/config.toml and the state disk's
mkfs; what containerd and the CNI plugins execute (the runc shim, runc, iptables and its
extensions); the shared libraries these link, found from their ELF headers (PT_INTERP and
DT_NEEDED, recursively), not by hand; every link on the way to a kept file; and the data files
the node reads (KEEP_TREES, KEEP_FILES). Usage: trim-root.py ROOT. Prints what it kept and
removed; fails naming a root program it cannot find.
"""
import os
import stat
import struct
import sys
import tomllib

# Programs the services start beside their own binary (containerd's runtime and the CNI
# plugins' helpers), whole directories of data the node reads, and single files.
EXTRA_PROGRAMS = [
    "/usr/bin/containerd-shim-runc-v2",
    "/usr/sbin/runc",
    "/usr/sbin/iptables", "/usr/sbin/iptables-save", "/usr/sbin/iptables-restore",
    "/usr/sbin/ip6tables", "/usr/sbin/ip6tables-save", "/usr/sbin/ip6tables-restore",
]
PROGRAM_TREES = ["/usr/lib/x86_64-linux-gnu/xtables"]
# The standard CNI plugins the root keeps (CNI_PLUGINS in the environment, from `make image
# CNI_PLUGINS=...`, replaces the list): containerd's CRI runs `loopback` for every pod, and
# bridge, host-local and portmap are what a plain bridge network and flannel call. Every other
# plugin a CNI needs, its DaemonSet installs into /opt/cni/bin, a writable overlay.
DEFAULT_CNI_PLUGINS = ["loopback", "bridge", "host-local", "portmap"]
KEEP_TREES = [
    "/etc/cvm-init", "/etc/containerd", "/etc/cni", "/etc/kubernetes", "/etc/ssl/certs",
    "/usr/share/ca-certificates", "/usr/lib/cvm-init",
    # mkosi makes the UKI from these after this script; mkosi.repart/10-root.conf keeps them
    # out of the root partition (and scripts/image.sh the kernel in /usr/lib/modules/<release>).
    "/usr/lib/systemd/boot/efi",
]
KEEP_FILES = [
    "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/os-release", "/usr/lib/os-release",
    "/etc/hosts", "/etc/resolv.conf", "/etc/mke2fs.conf", "/etc/protocols", "/etc/services",
    "/etc/ethertypes", "/etc/ld.so.cache", "/etc/machine-id", "/etc/debian_version",
    # Debian's links into /run: containerd makes pods' network namespaces in /var/run/netns.
    "/var/run", "/var/lock",
]
LIBRARY_DIRS = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
                "/lib", "/usr/lib"]

root = os.path.realpath(sys.argv[1])
keep = set()


def host(path):
    return os.path.join(root, path.lstrip("/"))


def resolve(path, hops=0):
    """The path inside the root a path leads to, keeping each link on the way; None if missing."""
    if hops > 40:
        return None
    parts = [p for p in path.split("/") if p]
    current = "/"
    for i, part in enumerate(parts):
        candidate = os.path.join(current, part)
        try:
            st = os.lstat(host(candidate))
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            keep.add(candidate)
            target = os.readlink(host(candidate))
            base = "/" if target.startswith("/") else current
            rest = "/".join(parts[i + 1:])
            return resolve(os.path.normpath(os.path.join(base, target, rest)), hops + 1)
        current = candidate
    return current


def elf_needs(path):
    """(interpreter, [DT_NEEDED names]) of a 64-bit little-endian ELF file, or None."""
    with open(host(path), "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic, interp = [], None, None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:
            dynamic = (p_offset, p_filesz)
        elif p_type == 3:
            interp = data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
    needed, strtab = [], None
    if dynamic:
        off, size = dynamic
        for j in range(0, size, 16):
            tag, val = struct.unpack_from("<qQ", data, off + j)
            if tag == 0:
                break
            if tag == 1:
                needed.append(val)
            elif tag == 5:
                strtab = val
    names = []
    if strtab is not None:
        base = next((o + strtab - v for v, o, s in loads if v <= strtab < v + s), None)
        if base is None:
            raise SystemExit(f"trim-root: {path}: its string table is outside its segments")
        for n in needed:
            end = data.index(b"\0", base + n)
            names.append(data[base + n:end].decode())
    return interp, names


def keep_program(path, required=True):
    real = resolve(path)
    if real is None:
        if required:
            raise SystemExit(f"trim-root: {path} is not in the root, and the node needs it")
        return
    if real in keep:
        return
    keep.add(real)
    if not os.path.isfile(host(real)):
        return
    found = elf_needs(real)
    if found is None:
        return
    interp, names = found
    if interp:
        keep_program(interp)
    for name in names:
        for d in LIBRARY_DIRS:
            if resolve(os.path.join(d, name)) is not None:
                keep_program(os.path.join(d, name))
                break
        else:
            raise SystemExit(f"trim-root: {real} needs {name}, which no library directory holds")


def files_and_links(dirpath, dirnames, filenames):
    """What os.walk found in one directory that is not a directory to descend into: its files
    and its links, links to directories included (os.walk lists those with the directories)."""
    return filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]


def walk_files(top):
    for dirpath, dirnames, filenames in os.walk(host(top)):
        dirnames.sort()
        for name in sorted(files_and_links(dirpath, dirnames, filenames)):
            yield "/" + os.path.relpath(os.path.join(dirpath, name), root)


config = tomllib.loads(open(host("/etc/cvm-init/config.toml")).read())
for service in config.get("service", []):
    keep_program(service["path"])
state = config.get("state")
if state is not None:
    mkfs = state.get("mkfs") or ["/sbin/mke2fs"]
    keep_program(mkfs[0] if isinstance(mkfs, list) else mkfs.split()[0])
for program in EXTRA_PROGRAMS:
    keep_program(program, required=False)
plugins = os.environ.get("CNI_PLUGINS", ",".join(DEFAULT_CNI_PLUGINS)).replace(",", " ").split()
if not plugins:
    raise SystemExit("trim-root: CNI_PLUGINS is empty (expected at least loopback, which "
                     "containerd runs for every pod)")
for name in plugins:
    if not name.replace("-", "").replace("_", "").isalnum() or not name.isascii():
        raise SystemExit(f"trim-root: CNI_PLUGINS: {name!r} is not a plugin name "
                         "(expected letters, digits, '-' and '_')")
    if resolve(f"/usr/lib/cni/{name}") is None:
        have = " ".join(sorted(os.listdir(host("/usr/lib/cni")))) if os.path.isdir(
            host("/usr/lib/cni")) else "none"
        raise SystemExit(f"trim-root: CNI_PLUGINS: no plugin {name} in /usr/lib/cni "
                         f"(the image has: {have})")
    keep_program(f"/usr/lib/cni/{name}")
    keep_program(f"/opt/cni/bin/{name}", required=False)
for top in PROGRAM_TREES:
    if resolve(top) is not None:
        for path in walk_files(resolve(top)):
            keep_program(path)
for top in KEEP_TREES:
    real = resolve(top)
    if real is not None:
        for path in walk_files(real):
            real_file = resolve(path)
            if real_file is not None:
                keep.add(real_file)
            keep.add(path)
for path in KEEP_FILES:
    real = resolve(path)
    if real is not None:
        keep.add(real)


def keep_modules(names):
    """The kernel modules the configuration's `modules` names, with what modules.dep says they
    need and their soft dependencies (resolved through modules.alias, as cvm-init resolves
    them), for cvm-init's modules-late phase (there is no modprobe: nothing else loads a module
    after the initramfs is gone). The index files cvm-init reads are rewritten to list only
    those; every other module goes. A name the kernel lacks, an alias instead of a module's
    name, or a cycle cvm-init would refuse stops the build."""
    norm = lambda name: name.replace("-", "_")
    top = host("/usr/lib/modules")
    releases = sorted(os.listdir(top)) if os.path.isdir(top) else []
    if not releases:
        if names:
            raise SystemExit("trim-root: /etc/cvm-init/config.toml names modules, and the root "
                             "has no /usr/lib/modules")
        return
    if len(releases) > 1:
        raise SystemExit(f"trim-root: the root has the modules of {len(releases)} kernels "
                         f"({' '.join(releases)}): the image boots one")
    release = releases[0]
    moddir = f"/usr/lib/modules/{release}"
    # cvm-init reads them as /lib/modules/<release>: keep the links on the way.
    resolve(f"/lib/modules/{release}")
    if os.path.isfile(host(f"{moddir}/vmlinuz")):
        keep.add(f"{moddir}/vmlinuz")  # for mkosi's UKI; not in the root partition

    def lines(name):
        path = host(f"{moddir}/{name}")
        return open(path).read().splitlines() if os.path.isfile(path) else []
    module_of = lambda path: norm(os.path.basename(path).split(".ko")[0])
    deps, paths = {}, {}
    for line in lines("modules.dep"):
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        paths[module_of(path)] = path.strip()
        deps[module_of(path)] = [module_of(d) for d in rest.split()]
    builtin = {module_of(p) for p in lines("modules.builtin") if p.strip()}
    pre, post = {}, {}
    for line in lines("modules.softdep"):
        words = line.split()
        if len(words) < 2 or words[0] != "softdep":
            continue
        after = False
        for word in words[2:]:
            if word in ("pre:", "post:"):
                after = word == "post:"
            else:
                (post if after else pre).setdefault(norm(words[1]), []).append(norm(word))
    aliases = {}
    for line in lines("modules.alias"):
        words = line.split()
        if len(words) == 3 and words[0] == "alias" and not any(c in words[1] for c in "*?["):
            aliases.setdefault(norm(words[1]), []).append(norm(words[2]))

    wanted = set()

    def visit(name, stack, soft):
        if name in wanted:
            return
        if name in builtin:
            return
        if name not in paths:
            if soft and name in aliases:
                for target in aliases[name]:
                    visit(target, stack, True)
            elif not soft:
                raise SystemExit(f"trim-root: modules.dep of kernel {release} names {name}, "
                                 "which it does not list")
            return  # a soft dependency this kernel does not have
        if name in stack:
            raise SystemExit(f"trim-root: module {name} has a dependency cycle (cvm-init "
                             "would refuse it)")
        stack = stack | {name}
        for soft_dep in pre.get(name, []):
            visit(soft_dep, stack, True)
        for dep in deps[name]:
            visit(dep, stack, False)
        wanted.add(name)
        for soft_dep in post.get(name, []):
            visit(soft_dep, frozenset(), True)

    for given in names:
        name = norm(given)
        if name not in paths and name not in builtin:
            if name in aliases:
                raise SystemExit(
                    f"trim-root: /etc/cvm-init/config.toml: modules: {given!r} is an alias of "
                    f"{' '.join(aliases[name])}: name the module itself (cvm-init refuses aliases)")
            raise SystemExit(f"trim-root: /etc/cvm-init/config.toml: modules: {given!r}: kernel "
                             f"{release} has no such module, neither loadable nor built in")
        visit(name, frozenset(), False)
    for name in wanted:
        keep.add(f"{moddir}/{paths[name]}")
    kept_paths = {paths[n] for n in wanted}
    rewrites = {
        "modules.dep": [l for l in lines("modules.dep") if l.split(":", 1)[0].strip() in kept_paths],
        "modules.builtin": lines("modules.builtin"),
        "modules.softdep": [l for l in lines("modules.softdep")
                            if len(l.split()) >= 2 and norm(l.split()[1]) in wanted],
        # Every alias of a kept module: cvm-init resolves soft dependencies through them.
        "modules.alias": [l for l in lines("modules.alias")
                          if len(l.split()) == 3 and norm(l.split()[2]) in wanted],
    }
    for name, content in rewrites.items():
        with open(host(f"{moddir}/{name}"), "w") as f:
            f.write("".join(l + "\n" for l in content))
        keep.add(f"{moddir}/{name}")
    print(f"trim-root: kernel {release}: {len(wanted)} modules for the configuration's "
          f"{len(names)}: {' '.join(sorted(wanted))}")


keep_modules(config.get("modules", []))

removed = kept = 0
for dirpath, dirnames, filenames in os.walk(root):
    entries = files_and_links(dirpath, dirnames, filenames)
    dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    for name in entries:
        full = os.path.join(dirpath, name)
        inside = "/" + os.path.relpath(full, root)
        if inside in keep:
            kept += 1
        else:
            os.unlink(full)
            removed += 1
print(f"trim-root: kept {kept} files and links, removed {removed}")
