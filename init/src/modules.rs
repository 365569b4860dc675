//! Kernel modules: dependencies from `modules.dep` (and soft dependencies from
//! `modules.softdep`, resolved through `modules.alias`), built-ins skipped, loaded with
//! `finit_module`. The initramfs has no modprobe; this is all it needs of one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::sys::{ModuleLoadError, System};

/// Modules the init itself always needs, in two lists by when: configfs (configfs-tsm
/// attestation reports live there), dm-verity and erofs for the verified root (its disk's
/// driver is in [`HARDWARE`]) are loaded by the `modules` phase; the rest in
/// [`REQUIRED_AFTER_ROOT`].
pub const REQUIRED_BEFORE_ROOT: &[&str] = &["configfs", "dm_verity", "erofs"];

/// The required modules that nothing needs before the root is mounted: the ACPI power button
/// and the input device that delivers its key presses; dm-crypt, dm-integrity and the ciphers
/// they ask the crypto API for (no modprobe answers its requests), ext4 for the state disk,
/// and overlay for containerd's snapshots (every node runs containerd). The `modules` phase
/// opens them and a thread loads them while the root is set up; the `state` phase waits for it.
pub const REQUIRED_AFTER_ROOT: &[&str] = &[
    "button",
    "evdev",
    "dm_crypt",
    "dm_integrity",
    "xts",
    "authenc",
    "ext4",
    "overlay",
];

/// Modules loaded when the machine has what they drive, in two lists by when: the SEV-SNP and
/// TDX guest drivers (their devices tell the measurement backend which TEE this is) before the
/// root; the AES-NI and SSSE3 ciphers in [`OPTIONAL_AFTER_ROOT`].
pub const OPTIONAL_BEFORE_ROOT: &[&str] = &["sev_guest", "tdx_guest"];

/// The AES-NI and SSSE3 ciphers, loaded with [`REQUIRED_AFTER_ROOT`]: without them dm-crypt
/// falls back to the generic C code (the crypto API's own module requests need a modprobe this
/// system does not have).
pub const OPTIONAL_AFTER_ROOT: &[&str] = &["aesni_intel", "sha256_ssse3"];

/// The disk and network drivers of QEMU and of the clouds that offer confidential VMs: virtio
/// (QEMU, GCE's N2D), NVMe (AWS, GCE's C3, Azure's v6), SCSI disks behind virtio-scsi or
/// Hyper-V, Google's gVNIC (which GCE's confidential VMs require), Amazon's ENA, and Azure's
/// VMBus devices and MANA NIC. The initramfs carries them all; `devices.rs` loads only those a
/// device of this machine asks for by its modalias.
pub const HARDWARE: &[&str] = &[
    "virtio_blk",
    "virtio_net",
    "virtio_scsi",
    "nvme",
    "sd_mod",
    "gve",
    "ena",
    "hv_vmbus",
    "hv_storvsc",
    "hv_netvsc",
    "mana",
];

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("module {name} is neither in {dir}/modules.dep nor built into kernel {release}")]
    Missing {
        name: String,
        dir: PathBuf,
        release: String,
    },
    #[error(
        "module {name} is an alias of {modules} in {dir}/modules.alias: name the module itself"
    )]
    Alias {
        name: String,
        modules: String,
        dir: PathBuf,
    },
    #[error("module {name} has a dependency cycle")]
    Cycle { name: String },
    #[error("cannot load module {name} from {path}")]
    Load {
        name: String,
        path: PathBuf,
        #[source]
        source: ModuleLoadError,
    },
    #[error("the thread loading modules in the background stopped before it was done")]
    Background,
}

/// Module files opened now and loaded later, in order: an open descriptor keeps a file's
/// contents after switch_root empties the initramfs.
#[derive(Debug, Default)]
pub struct Pending {
    /// (name, required, path, file)
    files: Vec<(String, bool, PathBuf, std::fs::File)>,
    /// What was left out, said when the load is reported.
    pub notes: Vec<String>,
}

/// What [`Pending::load`] did.
#[derive(Debug, Default)]
pub struct Loaded {
    pub names: Vec<String>,
    pub notes: Vec<String>,
}

impl Pending {
    /// The modules to load, in order.
    pub fn names(&self) -> Vec<&str> {
        self.files.iter().map(|(n, ..)| n.as_str()).collect()
    }

    /// Loads the opened modules into the running kernel, in order; an optional one the kernel
    /// refuses is noted, a required one stops the load.
    pub fn load(self) -> Result<Loaded, ModuleError> {
        let mut done = Loaded {
            names: Vec::new(),
            notes: self.notes,
        };
        for (name, required, path, file) in self.files {
            match crate::sys::load_module_file(&file, &path) {
                Ok(()) => done.names.push(name),
                Err(source) if !required => done.notes.push(format!(
                    "optional module {name} not loaded: {}",
                    crate::logger::chain(&source)
                )),
                Err(source) => return Err(ModuleError::Load { name, path, source }),
            }
        }
        Ok(done)
    }
}

/// `modules.dep` and friends of one kernel release.
#[derive(Debug, Default, Clone)]
pub struct ModuleIndex {
    /// The modules directory (`/lib/modules/<release>`).
    pub dir: PathBuf,
    pub release: String,
    /// Module name → path relative to `dir`.
    paths: BTreeMap<String, String>,
    /// Module name → hard dependencies (names), as modules.dep lists them.
    deps: BTreeMap<String, Vec<String>>,
    /// Module name → (pre, post) soft dependencies (names or aliases).
    softdeps: BTreeMap<String, (Vec<String>, Vec<String>)>,
    /// Alias → module names, for exact (non-wildcard) aliases.
    aliases: BTreeMap<String, Vec<String>>,
    /// (pattern, module name) for aliases with wildcards: the device aliases.
    patterns: Vec<(String, String)>,
    builtin: BTreeSet<String>,
}

/// `dm-mod` and `dm_mod` are the same module.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path such as `kernel/drivers/md/dm-mod.ko.xz`.
pub fn name_of_path(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    normalize(file.split(".ko").next().unwrap_or(file))
}

impl ModuleIndex {
    /// Reads the index files from `dir`. `modules.dep` is required; the others are optional.
    pub fn load(sys: &dyn System, dir: &Path, release: &str) -> Result<Self, ModuleError> {
        let read = |file: &str, required: bool| -> Result<String, ModuleError> {
            let path = dir.join(file);
            match sys.read_to_string(&path) {
                Ok(text) => Ok(text),
                Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                    Ok(String::new())
                }
                Err(source) => Err(ModuleError::Read { path, source }),
            }
        };
        Ok(Self::parse(
            dir,
            release,
            &read("modules.dep", true)?,
            &read("modules.builtin", false)?,
            &read("modules.softdep", false)?,
            &read("modules.alias", false)?,
        ))
    }

    pub fn parse(
        dir: &Path,
        release: &str,
        dep: &str,
        builtin: &str,
        softdep: &str,
        alias: &str,
    ) -> Self {
        let mut index = ModuleIndex {
            dir: dir.to_path_buf(),
            release: release.to_string(),
            ..Default::default()
        };
        for line in dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let name = name_of_path(path.trim());
            index.paths.insert(name.clone(), path.trim().to_string());
            index
                .deps
                .insert(name, deps.split_whitespace().map(name_of_path).collect());
        }
        index.builtin = builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(name_of_path)
            .collect();
        for line in softdep.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(module) = words.next() else { continue };
            let entry = index.softdeps.entry(normalize(module)).or_default();
            let mut post = false;
            for word in words {
                match word {
                    "pre:" => post = false,
                    "post:" => post = true,
                    other if post => entry.1.push(other.to_string()),
                    other => entry.0.push(other.to_string()),
                }
            }
        }
        for line in alias.lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(alias), Some(module)) =
                (words.next(), words.next(), words.next())
            {
                if !alias.contains(['*', '?', '[']) {
                    // Stored as kmod compares them: '-' and '_' alike (`crypto-crc32c`).
                    index
                        .aliases
                        .entry(normalize(alias))
                        .or_default()
                        .push(normalize(module));
                } else {
                    index.patterns.push((alias.to_string(), normalize(module)));
                }
            }
        }
        index
    }

    /// The modules whose aliases match a device's modalias (`pci:v00001AF4d00001042...`), each
    /// once, by name.
    pub fn modules_for_modalias(&self, modalias: &str) -> Vec<String> {
        let mut found: BTreeSet<String> = self
            .aliases
            .get(&normalize(modalias))
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for (pattern, module) in &self.patterns {
            if glob_matches(pattern.as_bytes(), modalias.as_bytes()) {
                found.insert(module.clone());
            }
        }
        found.into_iter().collect()
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// The path of a loadable module relative to the modules directory.
    pub fn relative_path(&self, name: &str) -> Option<&str> {
        self.paths.get(&normalize(name)).map(String::as_str)
    }

    /// The hard dependencies of a module (names), as modules.dep lists them.
    pub fn dependencies(&self, name: &str) -> &[String] {
        self.deps.get(&normalize(name)).map_or(&[], Vec::as_slice)
    }

    /// The load order for `wanted`: every module after its dependencies and soft `pre:`
    /// dependencies, before its soft `post:` dependencies; built-ins left out; each once.
    pub fn resolve(&self, wanted: &[String]) -> Result<Vec<String>, ModuleError> {
        Ok(self
            .resolve_marked(wanted)?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// Like [`resolve`](Self::resolve), with each module marked required (wanted, or a hard
    /// dependency of one) or optional (reached only through soft dependencies: a CPU-specific
    /// crc32c driver, say, which may refuse this CPU).
    pub fn resolve_marked(&self, wanted: &[String]) -> Result<Vec<(String, bool)>, ModuleError> {
        // A wanted name is a module's own: through an alias, what it leads to would be loaded
        // as optional, and its failure would go unnoticed.
        for given in wanted {
            let name = normalize(given);
            if !self.paths.contains_key(&name) && !self.builtin.contains(&name) {
                if let Some(targets) = self.aliases.get(&name) {
                    return Err(ModuleError::Alias {
                        name: given.clone(),
                        modules: targets.join(" "),
                        dir: self.dir.clone(),
                    });
                }
            }
        }
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        let mut visiting = BTreeSet::new();
        for name in wanted {
            self.visit(&normalize(name), true, &mut order, &mut done, &mut visiting)?;
        }
        let mut required = BTreeSet::new();
        for name in wanted {
            self.mark_required(&normalize(name), &mut required);
        }
        Ok(order
            .into_iter()
            .map(|name| {
                let needed = required.contains(&name);
                (name, needed)
            })
            .collect())
    }

    fn mark_required(&self, name: &str, required: &mut BTreeSet<String>) {
        if self.paths.contains_key(name) && required.insert(name.to_string()) {
            for dep in self.deps.get(name).into_iter().flatten() {
                self.mark_required(dep, required);
            }
        }
    }

    fn visit(
        &self,
        name: &str,
        required: bool,
        order: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        visiting: &mut BTreeSet<String>,
    ) -> Result<(), ModuleError> {
        if done.contains(name) || self.builtin.contains(name) {
            return Ok(());
        }
        if !self.paths.contains_key(name) {
            // A soft dependency may name an alias or a module this kernel does not have.
            if let Some(targets) = self.aliases.get(name).cloned() {
                for target in targets {
                    self.visit(&target, required, order, done, visiting)?;
                }
                return Ok(());
            }
            if !required {
                return Ok(());
            }
            return Err(ModuleError::Missing {
                name: name.to_string(),
                dir: self.dir.clone(),
                release: self.release.clone(),
            });
        }
        if !visiting.insert(name.to_string()) {
            return Err(ModuleError::Cycle {
                name: name.to_string(),
            });
        }
        let (pre, post) = self.softdeps.get(name).cloned().unwrap_or_default();
        for soft in &pre {
            self.visit(&normalize(soft), false, order, done, visiting)?;
        }
        // modules.dep lists the full closure with the deepest dependencies last.
        for dep in self.deps.get(name).into_iter().flatten().rev() {
            self.visit(dep, true, order, done, visiting)?;
        }
        visiting.remove(name);
        done.insert(name.to_string());
        order.push(name.to_string());
        for soft in &post {
            self.visit(&normalize(soft), false, order, done, visiting)?;
        }
        Ok(())
    }

    /// Opens `required` and `optional` with their dependencies, in load order, for
    /// [`Pending::load`]: a required module that is missing or cannot be opened is an error now,
    /// an optional one is noted.
    pub fn open_for_later(
        &self,
        required: &[String],
        optional: &[String],
    ) -> Result<Pending, ModuleError> {
        let mut order = self.resolve_marked(required)?;
        let mut pending = Pending::default();
        for name in optional {
            match self.resolve_marked(std::slice::from_ref(name)) {
                Ok(chain) => {
                    for (module, _) in chain {
                        if !order.iter().any(|(n, _)| *n == module) {
                            order.push((module, false));
                        }
                    }
                }
                Err(e) => pending.notes.push(format!(
                    "optional module {name} not loaded: {}",
                    crate::logger::chain(&e)
                )),
            }
        }
        for (name, required) in order {
            let path = self.dir.join(&self.paths[&name]);
            match std::fs::File::open(&path) {
                Ok(file) => pending.files.push((name, required, path, file)),
                Err(e) if !required => pending.notes.push(format!(
                    "optional module {name} not loaded: cannot open {}: {e}",
                    path.display()
                )),
                Err(e) => {
                    return Err(ModuleError::Load {
                        name,
                        path,
                        source: ModuleLoadError::Open(e),
                    })
                }
            }
        }
        Ok(pending)
    }

    /// Loads `wanted` and their dependencies in order; returns the names loaded.
    pub fn load_all(
        &self,
        sys: &dyn System,
        wanted: &[String],
    ) -> Result<Vec<String>, ModuleError> {
        let mut loaded = Vec::new();
        for (name, required) in self.resolve_marked(wanted)? {
            let path = self.dir.join(&self.paths[&name]);
            log::debug!("loading module {name} from {}", path.display());
            match sys.load_module(&path) {
                Ok(()) => loaded.push(name),
                Err(source) if !required => {
                    log::info!(
                        "optional module {name} not loaded: {}",
                        crate::logger::chain(&source)
                    )
                }
                Err(source) => return Err(ModuleError::Load { name, path, source }),
            }
        }
        Ok(loaded)
    }
}

/// Shell-style matching as modules.alias uses it: `*` any run of characters, `?` one, and
/// `[...]` one of a set (`a-z` ranges, `!` or `^` to negate). A malformed set (no closing
/// bracket) matches nothing. Linear backtracking on the last `*`: no exponential patterns.
pub fn glob_matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => match class_matches(&pattern[p..], text[t]) {
                Some((true, len)) => Some(p + len),
                Some((false, _)) => None,
                None => return false,
            },
            Some(&c) if c == text[t] => Some(p + 1),
            _ => None,
        };
        match (step, star) {
            (Some(next), _) => {
                p = next;
                t += 1;
            }
            (None, Some((star_p, star_t))) => {
                // Let the last `*` take one more character and try again from there.
                star = Some((star_p, star_t + 1));
                p = star_p + 1;
                t = star_t + 1;
            }
            (None, None) => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whether `c` is in the set that `pattern` starts with (`[...]`), and the set's length;
/// `None` when the set has no closing bracket.
fn class_matches(pattern: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negated = matches!(pattern.get(i), Some(b'!' | b'^'));
    if negated {
        i += 1;
    }
    let mut found = false;
    let mut first = true;
    loop {
        let &start = pattern.get(i)?;
        if start == b']' && !first {
            return Some((found != negated, i + 1));
        }
        first = false;
        if pattern.get(i + 1) == Some(&b'-') && pattern.get(i + 2).is_some_and(|&e| e != b']') {
            let end = pattern[i + 2];
            found |= start <= c && c <= end;
            i += 3;
        } else {
            found |= start == c;
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::FakeSystem;

    const DEP: &str = "\
kernel/drivers/md/dm-verity.ko.xz: kernel/lib/reed_solomon/reed_solomon.ko.xz kernel/drivers/md/dm-bufio.ko.xz kernel/drivers/md/dm-mod.ko.xz
kernel/drivers/md/dm-mod.ko.xz:
kernel/drivers/md/dm-bufio.ko.xz:
kernel/lib/reed_solomon/reed_solomon.ko.xz:
kernel/lib/libcrc32c.ko.xz:
kernel/crypto/crc32c_generic.ko.xz:
kernel/arch/x86/crypto/crc32c-intel.ko.xz:
kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko.xz
kernel/drivers/acpi/button.ko.xz:
";
    const BUILTIN: &str = "kernel/drivers/virtio/virtio_pci.ko\n";
    const SOFTDEP: &str = "softdep libcrc32c pre: crc32c\nsoftdep erofs pre: crypto-nothing\n";
    const ALIAS: &str = "alias crc32c crc32c_generic\nalias pci:v00001AF4d* virtio_pci\nalias crc32c crc32c_intel\n";

    #[test]
    fn a_wanted_alias_is_refused_naming_the_module() {
        let err = index()
            .resolve_marked(&names(&["button", "crc32c"]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "module crc32c is an alias of crc32c_generic crc32c_intel in /lib/modules/6.12/modules.alias: name the module itself"
        );
        // The modules themselves, by their names.
        let order = index().resolve_marked(&names(&["crc32c-intel"])).unwrap();
        assert_eq!(order, vec![("crc32c_intel".to_string(), true)]);
    }

    #[test]
    fn an_alias_with_a_dash_resolves_as_kmod_resolves_it() {
        let index = ModuleIndex::parse(
            Path::new("/lib/modules/6.12"),
            "6.12",
            "kernel/fs/ext4.ko.xz:\nkernel/crypto/crc32c_generic.ko.xz:\n",
            "",
            "softdep ext4 pre: crypto-crc32c\n",
            "alias crypto-crc32c crc32c_generic\nalias platform:sev-guest crc32c_generic\n",
        );
        let order = index.resolve_marked(&names(&["ext4"])).unwrap();
        assert_eq!(
            order,
            vec![
                ("crc32c_generic".to_string(), false),
                ("ext4".to_string(), true)
            ]
        );
        assert_eq!(
            index.modules_for_modalias("platform:sev-guest"),
            vec!["crc32c_generic".to_string()]
        );
    }

    fn index() -> ModuleIndex {
        ModuleIndex::parse(
            Path::new("/lib/modules/6.12"),
            "6.12",
            DEP,
            BUILTIN,
            SOFTDEP,
            ALIAS,
        )
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn modules_for_later_are_opened_now_in_order_and_survive_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let index = ModuleIndex::parse(dir.path(), "6.12", DEP, BUILTIN, SOFTDEP, ALIAS);
        for rel in DEP.lines().filter_map(|l| l.split(':').next()) {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, rel).unwrap();
        }
        let pending = index
            .open_for_later(
                &names(&["erofs", "button"]),
                &names(&["nosuch", "dm_verity"]),
            )
            .unwrap();
        assert_eq!(
            pending.names(),
            [
                "crc32c_generic",
                "crc32c_intel",
                "libcrc32c",
                "erofs",
                "button",
                "dm_mod",
                "dm_bufio",
                "reed_solomon",
                "dm_verity"
            ]
        );
        assert!(
            pending
                .notes
                .iter()
                .any(|n| n.starts_with("optional module nosuch not loaded")),
            "{:?}",
            pending.notes
        );
        // The files are open: removing them (switch_root empties the initramfs) loses nothing.
        std::fs::remove_dir_all(dir.path().join("kernel")).unwrap();
        let mut first = String::new();
        use std::io::Read as _;
        (&pending.files[3].3).read_to_string(&mut first).unwrap();
        assert_eq!(first, "kernel/fs/erofs/erofs.ko.xz");
        // A required module that is missing is an error now, not in the thread.
        let e = index.open_for_later(&names(&["nosuch"]), &[]).unwrap_err();
        assert!(matches!(e, ModuleError::Missing { .. }), "{e}");
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let order = index()
            .resolve(&names(&["dm-verity", "erofs", "dm_mod"]))
            .unwrap();
        assert_eq!(
            order,
            names(&[
                "dm_mod",
                "dm_bufio",
                "reed_solomon",
                "dm_verity",
                "crc32c_generic",
                "crc32c_intel",
                "libcrc32c",
                "erofs"
            ])
        );
    }

    #[test]
    fn soft_dependencies_are_optional() {
        let marked = index().resolve_marked(&names(&["erofs"])).unwrap();
        assert_eq!(
            marked,
            vec![
                ("crc32c_generic".to_string(), false),
                ("crc32c_intel".to_string(), false),
                ("libcrc32c".to_string(), true),
                ("erofs".to_string(), true)
            ]
        );
    }

    #[test]
    fn builtins_are_skipped() {
        assert!(index().resolve(&names(&["virtio-pci"])).unwrap().is_empty());
    }

    #[test]
    fn a_missing_module_is_named() {
        let err = index().resolve(&names(&["button", "nosuch"])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("nosuch"), "{text}");
        assert!(text.contains("/lib/modules/6.12/modules.dep"), "{text}");
    }

    #[test]
    fn load_uses_resolved_paths_and_names_a_refusal() {
        let mut sys = FakeSystem::default();
        sys.refuse_modules.insert("erofs.ko.xz".into());
        // A soft dependency that refuses this CPU does not stop the boot.
        sys.refuse_modules.insert("crc32c-intel.ko.xz".into());
        let err = index()
            .load_all(&sys, &names(&["dm-verity", "erofs"]))
            .unwrap_err();
        assert_eq!(
            *sys.calls.borrow(),
            names(&[
                "load dm-mod.ko.xz",
                "load dm-bufio.ko.xz",
                "load reed_solomon.ko.xz",
                "load dm-verity.ko.xz",
                "load crc32c_generic.ko.xz",
                "load crc32c-intel.ko.xz",
                "load libcrc32c.ko.xz",
                "load erofs.ko.xz"
            ])
        );
        assert!(logger_chain(&err).contains("cannot load module erofs from /lib/modules/6.12/kernel/fs/erofs/erofs.ko.xz: the kernel refused the module"));
    }

    #[test]
    fn globs_match_as_modules_alias_means_them() {
        let yes = |p: &str, t: &str| assert!(glob_matches(p.as_bytes(), t.as_bytes()), "{p} {t}");
        let no = |p: &str, t: &str| assert!(!glob_matches(p.as_bytes(), t.as_bytes()), "{p} {t}");
        // Real lines of Debian 6.12's modules.alias against real devices.
        let nvme = "pci:v*d*sv*sd*bc01sc08i02*";
        yes(
            nvme,
            "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02",
        );
        no(
            nvme,
            "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc06i01",
        );
        yes("virtio:d00000001v*", "virtio:d00000001v00001AF4");
        no("virtio:d00000001v*", "virtio:d00000002v00001AF4");
        yes("acpi*:VMBUS:*", "acpi:VMBUS:");
        yes("scsi:t-0x00*", "scsi:t-0x00");
        yes(
            "pci:v00001AE0d00000042sv*sd*bc*sc*i*",
            "pci:v00001AE0d00000042sv00001AE0sd00000058bc02sc00i00",
        );
        no(
            "pci:v00001AE0d00000042sv*sd*bc*sc*i*",
            "pci:v00001AE0d00000043sv00001AE0sd00000058bc02sc00i00",
        );
        // The other metacharacters.
        yes("a?c", "abc");
        no("a?c", "ac");
        yes("x[0-9a-f]y", "x7y");
        no("x[0-9a-f]y", "xgy");
        yes("x[!0-9]y", "xgy");
        no("x[^0-9]y", "x5y");
        yes("x[]]y", "x]y");
        no("x[0-9", "x5");
        yes("*", "");
        yes("**a**", "a");
        no("*a", "");
        no("", "a");
        yes("a*b*c", "aXXbYYbc");
        no("a*b*c", "aXXbYYb");
    }

    proptest::proptest! {
        // Against a plain recursive definition, on a small alphabet so that matches happen.
        #[test]
        fn glob_agrees_with_a_reference(pattern in "[ab*?]{0,8}", text in "[ab]{0,10}") {
            fn reference(p: &[u8], t: &[u8]) -> bool {
                match (p.first(), t.first()) {
                    (None, _) => t.is_empty(),
                    (Some(b'*'), _) => reference(&p[1..], t) || (!t.is_empty() && reference(p, &t[1..])),
                    (Some(_), None) => false,
                    (Some(b'?'), Some(_)) => reference(&p[1..], &t[1..]),
                    (Some(a), Some(b)) => a == b && reference(&p[1..], &t[1..]),
                }
            }
            proptest::prop_assert_eq!(
                glob_matches(pattern.as_bytes(), text.as_bytes()),
                reference(pattern.as_bytes(), text.as_bytes())
            );
        }

        #[test]
        fn glob_never_panics(pattern in proptest::collection::vec(proptest::num::u8::ANY, 0..24), text in proptest::collection::vec(proptest::num::u8::ANY, 0..24)) {
            let _ = glob_matches(&pattern, &text);
        }
    }

    #[test]
    fn device_aliases_name_their_modules() {
        let index = ModuleIndex::parse(
            Path::new("/lib/modules/6.12"),
            "6.12",
            "kernel/drivers/nvme/host/nvme.ko.xz: kernel/drivers/nvme/host/nvme-core.ko.xz\nkernel/drivers/nvme/host/nvme-core.ko.xz:\n",
            "",
            "",
            "alias pci:v*d*sv*sd*bc01sc08i02* nvme\nalias pci:v0000106Bd00002001sv*sd*bc*sc*i* nvme\nalias nvme-exact nvme\nalias virtio:d00000001v* virtio_net\n",
        );
        let qemu_nvme = "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02";
        assert_eq!(index.modules_for_modalias(qemu_nvme), names(&["nvme"]));
        assert_eq!(index.modules_for_modalias("nvme-exact"), names(&["nvme"]));
        assert_eq!(
            index.modules_for_modalias("virtio:d00000001v00001AF4"),
            names(&["virtio_net"])
        );
        assert!(index
            .modules_for_modalias("pci:v00008086d00001237sv00001AF4sd00001100bc06sc00i00")
            .is_empty());
    }

    fn logger_chain(e: &ModuleError) -> String {
        crate::logger::chain(e)
    }
}
