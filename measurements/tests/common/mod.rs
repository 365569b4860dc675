//! Shared by the integration tests that compare with reference tools from PyPI.
#![allow(dead_code)] // each test uses a part

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A file of the repository's `testdata/` (real hardware outputs; see its PROVENANCE.md).
pub fn testdata(path: &str) -> PathBuf {
    workspace().join("testdata").join(path)
}

/// A virtual environment under .cache with `package==version` installed once; None (and a
/// message) when it cannot be installed here, for example without PyPI.
pub fn python_package(package: &str, version: &str) -> Option<PathBuf> {
    let venv = workspace().join(format!(".cache/{package}-{version}"));
    let ready = venv.join(".installed");
    if ready.exists() || venv.join(format!("bin/{package}")).exists() {
        return Some(venv);
    }
    let ok = |c: &mut Command| c.output().map(|o| o.status.success()).unwrap_or(false);
    if !ok(Command::new("python3").arg("-m").arg("venv").arg(&venv))
        || !ok(Command::new(venv.join("bin/pip")).args([
            "install",
            "-q",
            &format!("{package}=={version}"),
        ]))
    {
        eprintln!("{package} {version} could not be installed (no PyPI?): comparison skipped");
        let _ = std::fs::remove_dir_all(&venv);
        return None;
    }
    std::fs::write(&ready, b"").expect("mark the environment installed");
    Some(venv)
}

/// Runs a command that must succeed; its stdout (its stderr in the panic otherwise).
pub fn stdout_of(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
