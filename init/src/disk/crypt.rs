//! dm-crypt (and dm-integrity) tables for the state disk, built from the policy — never from
//! strings in the untrusted LUKS2 header — with the volume key handed to the kernel through a
//! `logon` key in the thread keyring: the table names the key, never contains it, and the key
//! is invalidated as soon as the table is loaded.

use zeroize::Zeroize;

use super::luks2::{Policy, DATA_OFFSET, SECTOR_SIZE};

const KEY_SPEC_THREAD_KEYRING: i32 = -1;
const KEYCTL_INVALIDATE: i32 = 21;

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("cannot add the logon key {description} to the thread keyring")]
    Add {
        description: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid key description {0:?}: expected \"cvm:\" and [a-z0-9-]")]
    Description(String),
}

/// A `logon` key in this thread's keyring; invalidated when dropped.
pub struct LogonKey {
    pub serial: i32,
    pub description: String,
    pub len: usize,
}

impl LogonKey {
    /// Adds `key` as a logon key (its payload cannot be read back from userspace).
    pub fn add(description: &str, key: &[u8]) -> Result<LogonKey, KeyringError> {
        let valid = description.strip_prefix("cvm:").is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
        if !valid {
            return Err(KeyringError::Description(description.to_string()));
        }
        let c_type = c"logon";
        let c_desc = std::ffi::CString::new(description).expect("checked above: no NUL");
        // SAFETY: add_key(2) with NUL-terminated strings and a payload slice that outlive the
        // call; the kernel copies the payload.
        let serial = unsafe {
            nix::libc::syscall(
                nix::libc::SYS_add_key,
                c_type.as_ptr(),
                c_desc.as_ptr(),
                key.as_ptr(),
                key.len(),
                KEY_SPEC_THREAD_KEYRING,
            )
        };
        if serial < 0 {
            return Err(KeyringError::Add {
                description: description.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(LogonKey {
            serial: serial as i32,
            description: description.to_string(),
            len: key.len(),
        })
    }

    /// The dm-crypt key field that refers to this key: `:<len>:logon:<description>`.
    pub fn table_reference(&self) -> String {
        format!(":{}:logon:{}", self.len, self.description)
    }
}

impl Drop for LogonKey {
    fn drop(&mut self) {
        // SAFETY: keyctl(2) on a serial this value owns; no memory is passed.
        unsafe {
            nix::libc::syscall(nix::libc::SYS_keyctl, KEYCTL_INVALIDATE, self.serial);
        }
    }
}

/// The dm-crypt parameters (after `crypt`) for the state disk's data segment.
/// `backing` is the LUKS2 device itself without integrity, the dm-integrity device with it.
pub fn crypt_params(policy: &Policy, key_reference: &str, backing: (u32, u32)) -> String {
    let (major, minor) = backing;
    if policy.integrity {
        // The integrity device starts at the data segment already; tags are 32-byte HMACs.
        format!(
            "capi:authenc(hmac(sha256),xts(aes))-plain64 {key_reference} 0 {major}:{minor} 0 2 integrity:32:aead sector_size:{SECTOR_SIZE}"
        )
    } else {
        format!(
            "aes-xts-plain64 {key_reference} 0 {major}:{minor} {} 1 sector_size:{SECTOR_SIZE}",
            DATA_OFFSET / 512
        )
    }
}

/// Zeroizes a table string that referred to key material (defence in depth: ours only name a
/// key, but a caller may have built one with a hex key).
pub fn scrub(mut table: String) {
    table.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::luks2::KdfPolicy;

    fn policy(integrity: bool) -> Policy {
        Policy {
            integrity,
            kdf: KdfPolicy::Pbkdf2 { iterations: 1000 },
        }
    }

    #[test]
    fn tables_come_from_the_policy() {
        assert_eq!(
            crypt_params(&policy(false), ":64:logon:cvm:state", (254, 16)),
            "aes-xts-plain64 :64:logon:cvm:state 0 254:16 32768 1 sector_size:4096"
        );
        assert_eq!(
            crypt_params(&policy(true), ":96:logon:cvm:state", (253, 1)),
            "capi:authenc(hmac(sha256),xts(aes))-plain64 :96:logon:cvm:state 0 253:1 0 2 integrity:32:aead sector_size:4096"
        );
    }

    #[test]
    fn descriptions_are_checked() {
        assert!(matches!(
            LogonKey::add("nocolon", b"k"),
            Err(KeyringError::Description(_))
        ));
        assert!(matches!(
            LogonKey::add("cvm:Bad Name", b"k"),
            Err(KeyringError::Description(_))
        ));
    }

    #[test]
    fn a_logon_key_is_added_referenced_and_invalidated() {
        // The host kernel's keyring works without device-mapper.
        let key = LogonKey::add("cvm:unit-test", &[7u8; 64]).expect("add_key(logon)");
        assert!(key.serial > 0);
        assert_eq!(key.table_reference(), ":64:logon:cvm:unit-test");
        let listed = |serial: i32| {
            std::fs::read_to_string("/proc/keys")
                .unwrap_or_default()
                .lines()
                // A live key: listed, its flags without i (invalidated) or D (dead).
                .filter(|l| l.starts_with(&format!("{serial:08x} ")) && l.contains("logon"))
                .any(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .is_some_and(|f| !f.contains('i') && !f.contains('D'))
                })
        };
        let serial = key.serial;
        assert!(listed(serial), "the key is not in /proc/keys");
        drop(key);
        // Invalidated keys are marked at once and collected soon after.
        let gone = (0..50).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            !listed(serial)
        });
        assert!(gone, "the key was not invalidated");
    }
}
