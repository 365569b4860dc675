//! The `[state]` section: the encrypted state disk, and its checks.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{invalid, Invalid};

/// Where the state-disk key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeySourceChoice {
    /// Sealed by the vTPM to the boot-time PCRs.
    Tpm,
    /// A new key every boot; the disk is re-created every boot.
    Ephemeral,
    /// Released by a key broker (Trustee KBS protocol) to evidence of this image.
    Kbs,
    /// Derived by the SEV-SNP secure processor from the chip key, launch measurement and
    /// policy (the disk cannot move to another machine).
    SnpDerived,
    /// `tpm` with `tpm_policy = "signed"` ([`StateConfig::key_choice`]); never written in a file.
    #[serde(skip)]
    TpmSigned,
}

/// The state disk.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// The disk's serial number (virtio `serial=`, NVMe serial): chosen by identity, never by
    /// probe order.
    pub serial: String,
    pub key: KeySourceChoice,
    /// Where the file system is mounted (a directory of the root image).
    #[serde(default = "default_state_mount")]
    pub mount: PathBuf,
    /// Directories of the root image bound onto the state file system.
    #[serde(default)]
    pub binds: Vec<PathBuf>,
    /// Directories of the root image made writable by an overlay whose upper layer is on the
    /// state file system: the image's files show through, what is written stays on the
    /// encrypted disk (the CNI directories, where a DaemonSet adds plugins beside the image's).
    #[serde(default)]
    pub overlays: Vec<PathBuf>,
    /// Authenticated encryption of every block (dm-integrity under dm-crypt), so that a
    /// block the host rewrote reads as an I/O error instead of as garbage.
    #[serde(default)]
    pub integrity: IntegrityChoice,
    /// Write every block once at first boot so that all integrity tags are valid (time grows
    /// with the disk); without it, blocks never written read as I/O errors, which a file
    /// system that writes before it reads never does.
    #[serde(default)]
    pub wipe: bool,
    /// The mkfs program of the root image and its arguments (the device is appended); the
    /// default depends on `integrity` and `wipe` (see [`StateConfig::mkfs_command`]).
    #[serde(default)]
    pub mkfs: Option<Vec<String>>,
    /// The operator's statement that the vTPM runs inside the TEE's trust boundary (an SVSM
    /// or paravisor vTPM the host cannot read or drive). Without it `key = "tpm"` is refused
    /// when measurements go to SEV-SNP or TDX: a vTPM the host emulates unseals anything.
    /// With it cvm-init also extends its events into the vTPM's PCRs, which the seal binds to.
    #[serde(default)]
    pub tpm_in_tee: bool,
    /// With `key = "tpm"`: seal to the literal PCR values of this boot (`pcrs`, lost at an
    /// image upgrade) or to the operator's signed PCR 11 policy the UKI carries (`signed`:
    /// any image whose PCR 11 the same key signed opens the disk).
    #[serde(default)]
    pub tpm_policy: TpmPolicyChoice,
}

/// What a `tpm` key source seals to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TpmPolicyChoice {
    /// PolicyPCR over this boot's PCR 11 and 15.
    #[default]
    Pcrs,
    /// PolicyAuthorize to the UKI's `.pcrpkey`, opened with its `.pcrsig` for the current PCR 11.
    Signed,
}

/// Whether the state disk's blocks are authenticated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IntegrityChoice {
    /// aes-xts-plain64 alone: confidentiality, and a rewritten block decrypts to garbage.
    None,
    /// authenc(hmac(sha256), xts(aes)) with 32-byte tags kept by dm-integrity (journalled).
    #[default]
    HmacSha256,
}

impl StateConfig {
    /// The key source to create: `key`, with the `tpm` source's policy applied.
    pub fn key_choice(&self) -> KeySourceChoice {
        match (self.key, self.tpm_policy) {
            (KeySourceChoice::Tpm, TpmPolicyChoice::Signed) => KeySourceChoice::TpmSigned,
            (key, _) => key,
        }
    }

    /// The mkfs command, the device still to be appended.
    pub fn mkfs_command(&self) -> Vec<String> {
        self.mkfs
            .clone()
            .unwrap_or_else(|| default_mkfs(self.integrity, self.wipe))
    }

    /// True when blocks that were never written read as I/O errors.
    pub fn unwritten_blocks_fail(&self) -> bool {
        self.integrity == IntegrityChoice::HmacSha256 && !self.wipe
    }
}

fn default_state_mount() -> PathBuf {
    "/var/lib/cvm-state".into()
}

/// ext4 with lazy inode-table initialisation (the kernel zeroes inode tables in the
/// background) and a fixed 16 MiB journal, so that first-boot setup does not grow with the
/// disk. The journal is written out at mkfs time only where a block never written reads as an
/// I/O error (integrity without wipe): the journal's recovery reads the block after the last
/// transaction, and must not fail on it after a power cut.
fn default_mkfs(integrity: IntegrityChoice, wipe: bool) -> Vec<String> {
    let unwritten_fail = integrity == IntegrityChoice::HmacSha256 && !wipe;
    let extended = if unwritten_fail {
        "lazy_itable_init=1,lazy_journal_init=0,nodiscard"
    } else {
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard"
    };
    [
        "/sbin/mke2fs",
        "-q",
        "-t",
        "ext4",
        // The block size and the backup superblocks' places are what the state phase
        // prepares for (4096-byte blocks, also below 512 MiB; `sparse_super`).
        "-b",
        "4096",
        "-O",
        "sparse_super",
        "-J",
        "size=16",
        "-E",
        extended,
        "-F",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl StateConfig {
    /// The `[state]` checks; `has_kbs` says whether the file has a `[kbs]` section.
    pub fn validate(&self, has_kbs: bool) -> Result<(), Invalid> {
        validate_state(self).map_err(|(field, value, expected)| {
            invalid(format!("state.{field}"), &value, expected)
        })?;
        if self.key == KeySourceChoice::Kbs && !has_kbs {
            return Err(invalid(
                "state.key".into(),
                "kbs",
                "a [kbs] section naming the key broker",
            ));
        }
        Ok(())
    }
}

/// The state section's checks: (field, value, what was expected).
fn validate_state(state: &StateConfig) -> Result<(), (&'static str, String, &'static str)> {
    if state.serial.is_empty() || state.serial.len() > 20 || !state.serial.is_ascii() {
        return Err((
            "serial",
            state.serial.clone(),
            "1 to 20 ASCII characters (a virtio serial holds 20)",
        ));
    }
    if state.tpm_in_tee && state.key != KeySourceChoice::Tpm {
        return Err((
            "tpm_in_tee",
            "true".into(),
            "false (or absent) unless key = \"tpm\": the statement concerns the vTPM the tpm key source seals with",
        ));
    }
    if state.tpm_policy == TpmPolicyChoice::Signed && state.key != KeySourceChoice::Tpm {
        return Err((
            "tpm_policy",
            "signed".into(),
            "\"pcrs\" (or absent) unless key = \"tpm\": the policy is the tpm key source's",
        ));
    }
    if state.wipe && state.integrity == IntegrityChoice::None {
        return Err((
            "wipe",
            "true".into(),
            "false when integrity = \"none\" (only integrity tags need a wipe)",
        ));
    }
    for (field, path) in [("mount", &state.mount)]
        .into_iter()
        .chain(state.binds.iter().map(|b| ("binds", b)))
    {
        if !path.is_absolute() || path == Path::new("/") {
            return Err((
                field,
                path.display().to_string(),
                "an absolute path other than /",
            ));
        }
    }
    for path in &state.overlays {
        let text = path.to_string_lossy();
        if !path.is_absolute()
            || path == Path::new("/")
            || text.contains([',', ':', '\\'])
            || path.components().any(|c| {
                matches!(
                    c,
                    std::path::Component::ParentDir | std::path::Component::CurDir
                )
            })
        {
            return Err((
                "overlays",
                text.into_owned(),
                "an absolute path other than /, without . or .., and without , : or \\ (overlayfs \
                 option separators)",
            ));
        }
        if state.binds.contains(path) || state.overlays.iter().filter(|o| *o == path).count() > 1 {
            return Err((
                "overlays",
                text.into_owned(),
                "a directory given once, in binds or in overlays",
            ));
        }
    }
    let mkfs = state.mkfs_command();
    if !mkfs.first().is_some_and(|p| p.starts_with('/')) {
        return Err((
            "mkfs",
            mkfs.join(" "),
            "a program given by absolute path, then its arguments",
        ));
    }
    if state.unwritten_blocks_fail() && mkfs.iter().any(|a| a.contains("lazy_journal_init=1")) {
        return Err((
            "mkfs",
            mkfs.join(" "),
            "no lazy_journal_init=1 with integrity and no wipe: the journal's recovery after a \
             power cut would read blocks never written, which fail",
        ));
    }
    if state.unwritten_blocks_fail() && mkfs.iter().any(|a| a.starts_with("-g")) {
        return Err((
            "mkfs",
            mkfs.join(" "),
            "ext4's default block groups with integrity and no wipe (no -g): cvm-init makes \
             the first block of each 128 MiB group readable for mke2fs",
        ));
    }
    Ok(())
}
