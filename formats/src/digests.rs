//! The digest manifest of a root image: the SHA-256 of each program, written when the image is
//! built, so that the node measures a service's binary without reading it all before its first
//! exec. The manifest is a file of the dm-verity root, whose root hash is measured: its lines
//! are as trustworthy as the binaries beside it. The format is `sha256sum`'s text output with
//! absolute paths (`<64 lower-case hex>  /usr/bin/containerd`), so coreutils writes it in the
//! image build and anyone can check it with `sha256sum -c`.

use std::collections::BTreeMap;
use std::path::Path;

/// Where the manifest is in the root.
pub const PATH: &str = "/usr/lib/cvm-init/sha256sums";

/// The largest manifest read (a root of some thousand programs is well below).
pub const MAX_LEN: usize = 1 << 20;

/// The directories whose programs (regular files with an execute bit) are listed, relative to
/// the root; the image build lists the same.
pub const PROGRAM_DIRS: &[&str] = &["bin", "sbin", "usr/bin", "usr/sbin", "usr/libexec", "opt"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("the manifest is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("line {line}: {what}")]
    Line { line: usize, what: &'static str },
    #[error("line {line}: {path} does not come after the line before it (the paths are sorted and each is listed once)")]
    Order { line: usize, path: String },
}

/// A parsed manifest: absolute path to SHA-256, sorted by path (a vector rather than a map:
/// the static init links this, and every map type costs it code).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    entries: Vec<(String, [u8; 32])>,
}

impl Manifest {
    /// Parses `sha256sum` text output, strictly: every line is 64 lower-case hex digits, two
    /// spaces (text mode) and an absolute path without `.`/`..` components, control characters
    /// or a trailing `/`; no line is escaped (`sha256sum` starts a line with `\` for names it
    /// had to escape), none is empty, the paths are in byte order (as `LC_ALL=C sort` and the
    /// image build write them) with none listed twice, and the text ends with a newline.
    pub fn parse(text: &[u8]) -> Result<Manifest, ManifestError> {
        if text.len() > MAX_LEN {
            return Err(ManifestError::TooLong);
        }
        let text = std::str::from_utf8(text).map_err(|e| ManifestError::Line {
            line: 1 + text[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count(),
            what: "not UTF-8",
        })?;
        let Some(body) = text.strip_suffix('\n').or(text.is_empty().then_some("")) else {
            return Err(ManifestError::Line {
                line: text.split('\n').count(),
                what: "no newline at the end",
            });
        };
        let mut entries: Vec<(String, [u8; 32])> = Vec::new();
        // Split on newlines alone: a carriage return stays in its line, and is refused.
        for (i, line) in body.split('\n').enumerate().filter(|_| !text.is_empty()) {
            let line_no = i + 1;
            let bad = |what| ManifestError::Line {
                line: line_no,
                what,
            };
            let (digest, path) = line
                .split_at_checked(64)
                .ok_or(bad("expected 64 hex digits, two spaces and a path"))?;
            let path = path.strip_prefix("  ").ok_or(bad(
                "expected two spaces after the digest (sha256sum's text mode)",
            ))?;
            // Lower case only, as sha256sum writes it.
            let bytes: [u8; 32] = digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                .then(|| crate::verity::parse_hex(digest))
                .flatten()
                .and_then(|v| v.try_into().ok())
                .ok_or(bad("the digest is not 64 lower-case hex digits"))?;
            if !valid_path(path) {
                return Err(bad(
                    "the path is not absolute and clean (no `.` or `..`, no empty component, no control character)",
                ));
            }
            if entries
                .last()
                .is_some_and(|(last, _)| last.as_str() >= path)
            {
                return Err(ManifestError::Order {
                    line: line_no,
                    path: crate::text::escape(path).into_owned(),
                });
            }
            entries.push((path.to_string(), bytes));
        }
        Ok(Manifest { entries })
    }

    /// The digest listed for an absolute path.
    pub fn get(&self, path: &str) -> Option<[u8; 32]> {
        self.entries
            .binary_search_by(|(p, _)| p.as_str().cmp(path))
            .ok()
            .map(|i| self.entries[i].1)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The manifest of the programs in `tree` (see [`PROGRAM_DIRS`]), as the image build writes
    /// it: sorted by path, links not followed.
    pub fn of_tree(tree: &Path) -> std::io::Result<String> {
        use std::os::unix::fs::PermissionsExt;
        let mut found = BTreeMap::new();
        let mut pending: Vec<std::path::PathBuf> = PROGRAM_DIRS
            .iter()
            .map(|d| tree.join(d))
            .filter(|d| d.symlink_metadata().is_ok_and(|m| m.is_dir()))
            .collect();
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let meta = entry.path().symlink_metadata()?;
                if meta.is_dir() {
                    pending.push(entry.path());
                } else if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                    let rel = entry
                        .path()
                        .strip_prefix(tree)
                        .map_err(std::io::Error::other)?
                        .to_string_lossy()
                        .into_owned();
                    found.insert(
                        format!("/{rel}"),
                        crate::sha256_file(&entry.path()).map_err(std::io::Error::other)?,
                    );
                }
            }
        }
        Ok(found
            .iter()
            .map(|(path, digest)| format!("{}  {path}\n", crate::hex(digest)))
            .collect())
    }
}

fn valid_path(path: &str) -> bool {
    path.starts_with('/')
        && path.len() > 1
        && !path.ends_with('/')
        && !path.chars().any(|c| c.is_control())
        && path[1..]
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn sha256sum_output_parses() {
        let text = format!("{ABC}  /usr/bin/containerd\n{ABC}  /usr/bin/kubelet\n");
        let m = Manifest::parse(text.as_bytes()).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(crate::hex(&m.get("/usr/bin/kubelet").unwrap()), ABC);
        assert_eq!(m.get("/usr/bin/runc"), None);
        assert!(Manifest::parse(b"").unwrap().is_empty());
        assert!(Manifest::parse(b"\n").is_err(), "an empty line");
    }

    #[test]
    fn malformed_manifests_are_refused_naming_the_line() {
        let line = |l: &str| format!("{ABC}  /usr/bin/ok\n{l}\n");
        for (text, expect) in [
            (line("abc  /x"), "line 2: expected 64 hex digits"),
            (
                line(&format!("{}  /x", ABC.to_uppercase())),
                "line 2: the digest is not 64",
            ),
            (line(&format!("{ABC} */x")), "line 2: expected two spaces"),
            (
                line(&format!("{ABC}  x")),
                "line 2: the path is not absolute",
            ),
            (
                line(&format!("{ABC}  /a/../b")),
                "line 2: the path is not absolute",
            ),
            (
                line(&format!("{ABC}  /a//b")),
                "line 2: the path is not absolute",
            ),
            (
                line(&format!("{ABC}  /a/")),
                "line 2: the path is not absolute",
            ),
            (
                line(&format!("{ABC}  /a\u{1b}b")),
                "line 2: the path is not absolute",
            ),
            (line(&format!("\\{ABC}  /a\\nb")), "line 2: "),
            (line(""), "line 2: expected 64 hex digits"),
            (
                line(&format!("{ABC}  /usr/bin/ok")),
                "line 2: /usr/bin/ok does not come after",
            ),
            (
                line(&format!("{ABC}  /usr/bin/a")),
                "line 2: /usr/bin/a does not come after",
            ),
            (
                format!("{ABC}  /usr/bin/ok"),
                "line 1: no newline at the end",
            ),
            (
                format!("{ABC}  /usr/bin/ok\r\n"),
                "line 1: the path is not absolute",
            ),
        ] {
            let e = Manifest::parse(text.as_bytes()).unwrap_err().to_string();
            assert!(e.starts_with(expect), "{text:?}: {e}");
        }
        assert_eq!(
            Manifest::parse(&vec![b'a'; MAX_LEN + 1]).unwrap_err(),
            ManifestError::TooLong
        );
        assert!(Manifest::parse(b"\xff\n")
            .unwrap_err()
            .to_string()
            .starts_with("line 1: not UTF-8"));
    }

    #[test]
    fn the_manifest_of_a_tree_lists_its_programs_as_sha256sum_would() {
        use std::os::unix::fs::PermissionsExt;
        let tree = tempfile::tempdir().unwrap();
        let write = |rel: &str, mode: u32| {
            let path = tree.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"abc").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("usr/bin/containerd", 0o755);
        write("bin/payload", 0o755);
        write("opt/cni/bin/bridge", 0o755);
        write("usr/bin/not-a-program", 0o644);
        write("etc/passwd", 0o755);
        std::os::unix::fs::symlink("containerd", tree.path().join("usr/bin/link")).unwrap();
        let text = Manifest::of_tree(tree.path()).unwrap();
        assert_eq!(
            text,
            format!(
                "{ABC}  /bin/payload\n{ABC}  /opt/cni/bin/bridge\n{ABC}  /usr/bin/containerd\n"
            )
        );
        let m = Manifest::parse(text.as_bytes()).unwrap();
        assert_eq!(m.len(), 3);
        // `sha256sum -c` agrees (its paths made relative to the tree).
        if let Ok(out) = std::process::Command::new("sha256sum")
            .arg("/dev/null")
            .output()
        {
            assert!(out.status.success());
            let rel: String = text.replace("  /", "  ");
            let check = std::process::Command::new("sha256sum")
                .args(["-c", "--quiet", "-"])
                .current_dir(tree.path())
                .stdin(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut child| {
                    use std::io::Write;
                    child.stdin.take().unwrap().write_all(rel.as_bytes())?;
                    child.wait()
                })
                .unwrap();
            assert!(check.success());
        }
    }
}
