//! swtpm on loopback TCP for the host tests that drive the init's own TPM code.

use std::process::Child;

use cvm_init::tee::tpm::TcpTransport;

pub struct Swtpm {
    child: Child,
    _dir: tempfile::TempDir,
    pub port: u16,
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Slots per test process: each test passes its own `slot` so that tests running in parallel
/// do not collide.
const SLOTS: u16 = 8;

/// swtpm on a loopback port pair (server, control), below the kernel's ephemeral range
/// (32768 and up), where the tests' own connections would otherwise take ports swtpm needs.
pub fn start_swtpm(slot: u16) -> Swtpm {
    assert!(
        slot < SLOTS,
        "slot {slot}: at most {SLOTS} swtpm per test process"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = 10000 + ((std::process::id() % 1300) as u16) * SLOTS * 2 + slot * 2;
    let child =
        cvm_init::tee::tpm::spawn_swtpm(dir.path(), port).expect("swtpm is installed by make deps");
    Swtpm {
        child,
        _dir: dir,
        port,
    }
}

/// swtpm as `start_swtpm`, manufactured first with an EK certificate from the local CA in
/// `ca_dir` (`cvm_init::tee::tpm::manufacture_swtpm`).
#[allow(dead_code)]
pub fn start_certified_swtpm(slot: u16, ca_dir: &std::path::Path) -> Swtpm {
    assert!(
        slot < SLOTS,
        "slot {slot}: at most {SLOTS} swtpm per test process"
    );
    let dir = tempfile::tempdir().unwrap();
    cvm_init::tee::tpm::manufacture_swtpm(dir.path(), ca_dir).expect("swtpm_setup");
    let port = 10000 + ((std::process::id() % 1300) as u16) * SLOTS * 2 + slot * 2;
    let child =
        cvm_init::tee::tpm::spawn_swtpm(dir.path(), port).expect("swtpm is installed by make deps");
    Swtpm {
        child,
        _dir: dir,
        port,
    }
}

pub type Tcp = TcpTransport;

pub fn connect(port: u16) -> Tcp {
    TcpTransport::connect(port).unwrap_or_else(|e| panic!("swtpm did not listen: {e}"))
}
