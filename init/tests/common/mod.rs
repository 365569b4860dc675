//! swtpm on loopback TCP for the host tests that drive the init's own TPM code.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cvm_init::tee::tpm::Transport;

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
    let child = Command::new("swtpm")
        .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
        .arg("--server")
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
        .arg("--tpmstate")
        .arg(format!("dir={}", dir.path().display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("swtpm is installed by make deps");
    Swtpm {
        child,
        _dir: dir,
        port,
    }
}

pub struct Tcp(pub TcpStream);

impl Transport for Tcp {
    fn transact(&mut self, command: &[u8]) -> std::io::Result<Vec<u8>> {
        self.0.write_all(command)?;
        let mut head = [0u8; 10];
        self.0.read_exact(&mut head)?;
        let size = u32::from_be_bytes(head[2..6].try_into().unwrap()) as usize;
        let mut reply = head.to_vec();
        reply.resize(size.max(10), 0);
        self.0.read_exact(&mut reply[10..])?;
        Ok(reply)
    }
}

pub fn connect(port: u16) -> Tcp {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                return Tcp(s);
            }
            Err(e) if Instant::now() > end => panic!("swtpm did not listen: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
