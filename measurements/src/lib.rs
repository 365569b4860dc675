//! cvm-measure: predicts and verifies what a correct cvm-init node measures. For now it holds
//! the digest helper the other parts share; event framing, prediction and verification follow
//! with the measured-boot and launch-measurement issues.

pub mod broker_log;
pub mod broker_reference;
pub mod elsewhere;
pub mod kbs_broker;
pub mod launch;
pub mod mapped;
pub mod page_sha384;
pub mod predict;
pub mod snp;
pub mod snp_launch;
pub mod tcglog;
pub mod tdx;
pub mod tdx_launch;
pub mod tdx_rtmr;
pub mod tpm_credential;
pub mod tpm_quote;
pub mod x509;

// The formats and the protocol the verifier shares with the node, at the paths the verifier's
// modules name them by.
pub use cvm_formats::{
    event, evidence, hex, jsonseq, registers, sha256_file, text, verity, DigestError,
};
pub use cvm_kbs::{client as kbs_client, http, protocol as kbs, tls};

use std::path::Path;

use sha2::{Digest, Sha256};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// SHA-256 of a file, mapped rather than copied (see [`mapped`]): for the command-line tools.
pub fn sha256_file_mapped(path: &Path) -> Result<[u8; 32], DigestError> {
    let bytes = mapped::FileBytes::open(path).map_err(|source| DigestError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok(Sha256::digest(&*bytes).into())
}

/// The real hardware outputs in the repository's `testdata/` (see its PROVENANCE.md).
#[cfg(test)]
pub(crate) mod testdata {
    pub fn read(path: &str) -> Vec<u8> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata");
        std::fs::read(root.join(path)).unwrap_or_else(|e| panic!("testdata/{path}: {e}"))
    }
}
