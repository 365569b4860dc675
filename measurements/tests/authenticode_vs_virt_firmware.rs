//! The Authenticode digests RTMR 1 predictions rest on, against virt-firmware's (PyPI, in a
//! virtual environment under .cache; skipped with a message where PyPI is not reachable): the
//! Debian kernel as shipped (signed), the same kernel unsigned with trailing bytes that need
//! padding, and the kernel as QEMU patches it for a direct boot.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use cvm_measure::tdx::rtmr::{authenticode, qemu_loaded_kernel};
use sha2::{Sha256, Sha384};

const VERSION: &str = "26.10";

fn kernel() -> PathBuf {
    let dir = std::env::var_os("CVM_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::workspace().join(".cache/kernel"));
    let kernel = dir.join("vmlinuz");
    assert!(
        kernel.exists(),
        "{} is missing: `make deps` fetches the Debian kernel",
        kernel.display()
    );
    kernel
}

fn reference(venv: &Path, image: &Path, hash: &str) -> String {
    let script = "import sys, pefile\nfrom virt.peutils import pesign\n\
                  print(pesign.pe_authenticode_hash(pefile.PE(sys.argv[1]), sys.argv[2]).hex())";
    let out = common::stdout_of(
        Command::new(venv.join("bin/python"))
            .args(["-c", script])
            .arg(image)
            .arg(hash),
    );
    String::from_utf8_lossy(&out).trim().to_string()
}

#[test]
fn authenticode_digests_agree_with_virt_firmware() {
    let Some(venv) = common::python_package("virt-firmware", VERSION) else {
        return;
    };
    let signed = std::fs::read(kernel()).unwrap();
    // The same kernel without its signature, three bytes longer (padding to 8 is hashed).
    let mut unsigned = signed.clone();
    let pe = u32::from_le_bytes(unsigned[0x3c..0x40].try_into().unwrap()) as usize;
    let directory = pe + 24 + 112 + 4 * 8;
    let at = u32::from_le_bytes(unsigned[directory..directory + 4].try_into().unwrap()) as usize;
    assert!(at > 0, "the Debian kernel is expected to be signed");
    unsigned.truncate(at);
    unsigned[directory..directory + 8].fill(0);
    unsigned.extend(b"xyz");
    let patched = qemu_loaded_kernel(&signed, Some(3_000_000), 1 << 30, "console=ttyS0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, image) in [
        ("signed", &signed),
        ("unsigned", &unsigned),
        ("patched", &patched),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, image).unwrap();
        assert_eq!(
            cvm_formats::hex(&authenticode::<Sha384>(image).unwrap()),
            reference(&venv, &path, "sha384"),
            "{name} kernel, sha384"
        );
        assert_eq!(
            cvm_formats::hex(&authenticode::<Sha256>(image).unwrap()),
            reference(&venv, &path, "sha256"),
            "{name} kernel, sha256"
        );
    }
}
