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

/// swtpm on a loopback port pair; each test passes its own `slot` so that tests running in
/// parallel do not collide.
pub fn start_swtpm(slot: u16) -> Swtpm {
    let dir = tempfile::tempdir().unwrap();
    let port = 20000 + ((std::process::id() % 4000) as u16) * 8 + slot * 2;
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
