//! A TPM 2.0 over /dev/tpmrm0, in pure Rust: the three commands the init needs (which banks
//! are allocated, PCR_Extend, PCR_Read), marshalled by hand.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;

use cvm_formats::registers::Bank;

const TPM_ST_NO_SESSIONS: u16 = 0x8001;
const TPM_ST_SESSIONS: u16 = 0x8002;
const TPM_CC_PCR_EXTEND: u32 = 0x0000_0182;
const TPM_CC_PCR_READ: u32 = 0x0000_017e;
const TPM_CC_GET_CAPABILITY: u32 = 0x0000_017a;
const TPM_CAP_PCRS: u32 = 5;
const TPM_RS_PW: u32 = 0x4000_0009;
/// Response codes after which the command is simply sent again.
const RETRY_CODES: &[u32] = &[
    0x922, /* RETRY */
    0x908, /* YIELDED */
    0x90a, /* TESTING */
];

#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("cannot open /dev/tpmrm0")]
    Open(#[source] std::io::Error),
    #[error("cannot talk to the TPM")]
    Io(#[source] std::io::Error),
    #[error("TPM command {command:#x} failed with response code {code:#x}")]
    Response { command: u32, code: u32 },
    #[error("malformed TPM response to {command:#x}: {detail}")]
    Malformed { command: u32, detail: String },
}

/// Something that carries TPM command and response frames.
pub trait Transport {
    fn transact(&mut self, command: &[u8]) -> std::io::Result<Vec<u8>>;
}

/// The kernel's resource-managed TPM device.
pub struct DeviceTransport(File);

impl DeviceTransport {
    pub fn open() -> Result<Self, TpmError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open("/dev/tpmrm0")
            .map(DeviceTransport)
            .map_err(TpmError::Open)
    }
}

impl Transport for DeviceTransport {
    fn transact(&mut self, command: &[u8]) -> std::io::Result<Vec<u8>> {
        self.0.write_all(command)?;
        let mut buf = vec![0u8; 4096];
        let n = self.0.read(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }
}

/// swtpm's TCP command port, for host tools and tests (an operator reading a node's
/// attestation key before its first boot, the swtpm tests).
pub struct TcpTransport(std::net::TcpStream);

impl TcpTransport {
    /// Connects, retrying for up to 10 s while swtpm starts.
    pub fn connect(port: u16) -> std::io::Result<TcpTransport> {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => {
                    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
                    return Ok(TcpTransport(s));
                }
                Err(e) if std::time::Instant::now() > end => return Err(e),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
    }
}

/// Starts swtpm with its TCP command port `port` (and control port `port + 1`) on loopback,
/// keeping its state in `state_dir`.
pub fn spawn_swtpm(state_dir: &std::path::Path, port: u16) -> std::io::Result<std::process::Child> {
    std::process::Command::new("swtpm")
        .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
        .arg("--server")
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
        .arg("--tpmstate")
        .arg(format!("dir={}", state_dir.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
}

/// Manufactures a swtpm's state in `state_dir` as a TPM maker or a cloud does: endorsement
/// keys created and their certificates written to NV (the RSA-2048 EK's at 0x01c00002), issued
/// by a local CA kept in `ca_dir` (made there on first use; `swtpm_ca_pem` reads it). For tests
/// and demos: a broker trusts such a TPM only when configured with that CA.
pub fn manufacture_swtpm(
    state_dir: &std::path::Path,
    ca_dir: &std::path::Path,
) -> std::io::Result<()> {
    std::fs::create_dir_all(ca_dir)?;
    let ca = ca_dir.display();
    std::fs::write(
        ca_dir.join("swtpm-localca.conf"),
        format!(
            "statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
        ),
    )?;
    std::fs::write(ca_dir.join("swtpm-localca.options"), "")?;
    std::fs::write(
        ca_dir.join("swtpm_setup.conf"),
        format!(
            "create_certs_tool = swtpm_localca\ncreate_certs_tool_config = {ca}/swtpm-localca.conf\ncreate_certs_tool_options = {ca}/swtpm-localca.options\nactive_pcr_banks = sha256\n"
        ),
    )?;
    let out = std::process::Command::new("swtpm_setup")
        .args(["--tpm2", "--create-ek-cert", "--overwrite", "--tpm-state"])
        .arg(state_dir)
        .arg("--config")
        .arg(ca_dir.join("swtpm_setup.conf"))
        .stdin(std::process::Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "swtpm_setup failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// The CA certificates (PEM) of a `manufacture_swtpm` CA: its self-signed root, then the CA
/// that issues the EK certificates.
pub fn swtpm_ca_pem(ca_dir: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let mut pem = std::fs::read(ca_dir.join("swtpm-localca-rootca-cert.pem"))?;
    pem.extend(std::fs::read(ca_dir.join("issuercert.pem"))?);
    Ok(pem)
}

impl Transport for TcpTransport {
    fn transact(&mut self, command: &[u8]) -> std::io::Result<Vec<u8>> {
        self.0.write_all(command)?;
        let mut head = [0u8; 10];
        self.0.read_exact(&mut head)?;
        let size = u32::from_be_bytes(head[2..6].try_into().expect("4 bytes")) as usize;
        let mut reply = head.to_vec();
        reply.resize(size.max(10), 0);
        self.0.read_exact(&mut reply[10..])?;
        Ok(reply)
    }
}

pub(crate) fn frame(tag: u16, code: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + body.len());
    out.extend_from_slice(&tag.to_be_bytes());
    out.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// `TPM2_PCR_Extend` with a password session and one digest per bank.
pub fn extend_command(pcr: u32, digests: &[(Bank, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&pcr.to_be_bytes());
    // Authorization area: TPM_RS_PW, empty nonce, no attributes, empty password.
    body.extend_from_slice(&9u32.to_be_bytes());
    body.extend_from_slice(&TPM_RS_PW.to_be_bytes());
    body.extend_from_slice(&0u16.to_be_bytes());
    body.push(0);
    body.extend_from_slice(&0u16.to_be_bytes());
    body.extend_from_slice(&(digests.len() as u32).to_be_bytes());
    for (bank, digest) in digests {
        body.extend_from_slice(&bank.alg_id().to_be_bytes());
        body.extend_from_slice(digest);
    }
    frame(TPM_ST_SESSIONS, TPM_CC_PCR_EXTEND, &body)
}

/// `TPM2_PCR_Read` of some PCRs in some banks.
pub fn read_command(banks: &[Bank], pcrs: &[u32]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(banks.len() as u32).to_be_bytes());
    for bank in banks {
        body.extend_from_slice(&bank.alg_id().to_be_bytes());
        let mut select = [0u8; 3];
        for &p in pcrs {
            select[p as usize / 8] |= 1 << (p % 8);
        }
        body.push(3);
        body.extend_from_slice(&select);
    }
    frame(TPM_ST_NO_SESSIONS, TPM_CC_PCR_READ, &body)
}

pub fn capability_command() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&TPM_CAP_PCRS.to_be_bytes());
    body.extend_from_slice(&0u32.to_be_bytes());
    body.extend_from_slice(&1u32.to_be_bytes());
    frame(TPM_ST_NO_SESSIONS, TPM_CC_GET_CAPABILITY, &body)
}

pub(crate) struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    command: u32,
}

impl<'a> Cursor<'a> {
    /// A cursor over a nested structure of the response to `command`.
    pub(crate) fn nested(bytes: &'a [u8], command: u32) -> Self {
        Cursor {
            bytes,
            at: 0,
            command,
        }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], TpmError> {
        let s = self
            .bytes
            .get(self.at..self.at + n)
            .ok_or(TpmError::Malformed {
                command: self.command,
                detail: format!("truncated at byte {}", self.at),
            })?;
        self.at += n;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, TpmError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, TpmError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, TpmError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    /// A TPM2B: a 16-bit size, then that many bytes.
    pub(crate) fn tpm2b(&mut self) -> Result<&'a [u8], TpmError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

/// Checks the response header; returns a cursor at the parameters.
pub(crate) fn response(command: u32, bytes: &[u8]) -> Result<Cursor<'_>, TpmError> {
    let mut c = Cursor {
        bytes,
        at: 0,
        command,
    };
    let _tag = c.u16()?;
    let size = c.u32()? as usize;
    if size != bytes.len() {
        return Err(TpmError::Malformed {
            command,
            detail: format!("size field {size}, {} bytes received", bytes.len()),
        });
    }
    let code = c.u32()?;
    if code != 0 {
        return Err(TpmError::Response { command, code });
    }
    Ok(c)
}

/// The allocated PCR banks, from a `TPM2_GetCapability(TPM_CAP_PCRS)` response; banks this
/// code does not compute (sha1, sm3) are left out.
pub fn parse_banks(bytes: &[u8]) -> Result<Vec<Bank>, TpmError> {
    let mut c = response(TPM_CC_GET_CAPABILITY, bytes)?;
    let _more = c.u8()?;
    let _capability = c.u32()?;
    let count = c.u32()?;
    let mut banks = Vec::new();
    for _ in 0..count.min(16) {
        let alg = c.u16()?;
        let size = c.u8()? as usize;
        let select = c.take(size)?;
        if select.iter().any(|&b| b != 0) {
            if let Some(bank) = Bank::from_alg_id(alg) {
                banks.push(bank);
            }
        }
    }
    Ok(banks)
}

/// The digests of a `TPM2_PCR_Read` response, in selection order (bank, then PCR).
pub fn parse_read(bytes: &[u8]) -> Result<Vec<Vec<u8>>, TpmError> {
    let mut c = response(TPM_CC_PCR_READ, bytes)?;
    let _counter = c.u32()?;
    let selections = c.u32()?;
    for _ in 0..selections.min(16) {
        let _alg = c.u16()?;
        let size = c.u8()? as usize;
        c.take(size)?;
    }
    let count = c.u32()?;
    let mut digests = Vec::new();
    for _ in 0..count.min(16) {
        let size = c.u16()? as usize;
        digests.push(c.take(size)?.to_vec());
    }
    Ok(digests)
}

/// Sends a command frame; RETRY, YIELDED and TESTING (which a TPM may answer to any command)
/// are retried a bounded number of times. Other response codes are left to the caller.
pub(crate) fn send<T: Transport>(
    transport: &mut T,
    command: u32,
    frame: &[u8],
) -> Result<Vec<u8>, TpmError> {
    for _ in 0..20 {
        let reply = transport.transact(frame).map_err(TpmError::Io)?;
        let code = reply
            .get(6..10)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()));
        match code {
            Some(c) if RETRY_CODES.contains(&c) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            _ => return Ok(reply),
        }
    }
    Err(TpmError::Response {
        command,
        code: 0x922,
    })
}

pub struct Tpm<T: Transport> {
    transport: T,
    pub banks: Vec<Bank>,
}

impl<T: Transport> Tpm<T> {
    pub fn new(mut transport: T) -> Result<Self, TpmError> {
        let reply = send(&mut transport, TPM_CC_GET_CAPABILITY, &capability_command())?;
        let banks = parse_banks(&reply)?;
        Ok(Tpm { transport, banks })
    }

    /// Extends every allocated bank this code computes.
    pub fn extend(
        &mut self,
        pcr: u32,
        digest_of: impl Fn(Bank) -> Vec<u8>,
    ) -> Result<(), TpmError> {
        let digests: Vec<(Bank, Vec<u8>)> = self.banks.iter().map(|&b| (b, digest_of(b))).collect();
        let reply = send(
            &mut self.transport,
            TPM_CC_PCR_EXTEND,
            &extend_command(pcr, &digests),
        )?;
        response(TPM_CC_PCR_EXTEND, &reply).map(|_| ())
    }

    /// The values of `pcrs` in one bank, in the order given.
    pub fn read_bank(&mut self, bank: Bank, pcrs: &[u32]) -> Result<Vec<Vec<u8>>, TpmError> {
        let all = self.read(pcrs)?;
        pcrs.iter()
            .map(|p| {
                all.iter()
                    .find(|(b, q, _)| *b == bank && q == p)
                    .map(|(_, _, v)| v.clone())
                    .ok_or(TpmError::Malformed {
                        command: TPM_CC_PCR_READ,
                        detail: format!("no {} value for PCR {p}", bank.name()),
                    })
            })
            .collect()
    }

    /// Reads PCRs of every allocated bank: `(bank, pcr, value)`.
    pub fn read(&mut self, pcrs: &[u32]) -> Result<Vec<(Bank, u32, Vec<u8>)>, TpmError> {
        let mut pcrs = pcrs.to_vec();
        pcrs.sort();
        let reply = send(
            &mut self.transport,
            TPM_CC_PCR_READ,
            &read_command(&self.banks, &pcrs),
        )?;
        let digests = parse_read(&reply)?;
        let expected: Vec<(Bank, u32)> = self
            .banks
            .iter()
            .flat_map(|&b| pcrs.iter().map(move |&p| (b, p)))
            .collect();
        if digests.len() != expected.len() {
            return Err(TpmError::Malformed {
                command: TPM_CC_PCR_READ,
                detail: format!("{} digests for {} PCRs", digests.len(), expected.len()),
            });
        }
        Ok(expected
            .into_iter()
            .zip(digests)
            .map(|((b, p), d)| (b, p, d))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extend_command_bytes() {
        let cmd = extend_command(11, &[(Bank::Sha256, vec![0xaa; 32])]);
        let expected_head = [
            0x80, 0x02, 0, 0, 0, 65, 0, 0, 0x01,
            0x82, // header: sessions, size 65, PCR_Extend
            0, 0, 0, 11, // PCR 11
            0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 0, 0, 0, // password session
            0, 0, 0, 1, 0, 0x0b, // one sha256 digest
        ];
        assert_eq!(&cmd[..expected_head.len()], &expected_head);
        assert_eq!(cmd.len(), 65);
    }

    #[test]
    fn read_command_selects_bits() {
        let cmd = read_command(&[Bank::Sha256, Bank::Sha384], &[11, 15]);
        assert_eq!(&cmd[10..14], &[0, 0, 0, 2]);
        assert_eq!(&cmd[14..20], &[0, 0x0b, 3, 0, 0x88, 0]);
        assert_eq!(&cmd[20..26], &[0, 0x0c, 3, 0, 0x88, 0]);
    }

    fn reply(body: &[u8]) -> Vec<u8> {
        frame(0x8001, 0, body)
    }

    #[test]
    fn banks_and_reads_parse() {
        // sha1 allocated (ignored), sha256 allocated, sha384 not allocated.
        let mut body = vec![0, 0, 0, 0, 5, 0, 0, 0, 3];
        body.extend_from_slice(&[0, 4, 3, 0xff, 0xff, 0xff]);
        body.extend_from_slice(&[0, 0x0b, 3, 0xff, 0xff, 0xff]);
        body.extend_from_slice(&[0, 0x0c, 3, 0, 0, 0]);
        assert_eq!(parse_banks(&reply(&body)).unwrap(), vec![Bank::Sha256]);

        let mut body = vec![0, 0, 0, 7, 0, 0, 0, 1, 0, 0x0b, 3, 0, 0x88, 0, 0, 0, 0, 2];
        body.extend_from_slice(&[0, 32]);
        body.extend_from_slice(&[1; 32]);
        body.extend_from_slice(&[0, 32]);
        body.extend_from_slice(&[2; 32]);
        assert_eq!(
            parse_read(&reply(&body)).unwrap(),
            vec![vec![1; 32], vec![2; 32]]
        );
    }

    proptest::proptest! {
        /// Whatever a (hostile or broken) TPM answers, parsing never panics.
        #[test]
        fn responses_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), lie in proptest::prelude::any::<bool>()) {
            let mut r = reply(&body);
            if lie && r.len() > 6 {
                r[5] ^= 0x10;
            }
            let _ = parse_banks(&r);
            let _ = parse_read(&r);
            let _ = parse_banks(&body);
        }
    }

    #[test]
    fn errors_and_truncation() {
        let failed = frame(0x8001, 0, &[]);
        let mut failed = failed.clone();
        failed[6..10].copy_from_slice(&0x101u32.to_be_bytes());
        assert!(matches!(
            parse_banks(&failed),
            Err(TpmError::Response { code: 0x101, .. })
        ));
        let short = reply(&[0, 0, 0]);
        assert!(matches!(
            parse_banks(&short),
            Err(TpmError::Malformed { .. })
        ));
        let mut lying = reply(&[0; 8]);
        lying[5] = 99;
        assert!(matches!(
            parse_read(&lying),
            Err(TpmError::Malformed { .. })
        ));
    }
}
