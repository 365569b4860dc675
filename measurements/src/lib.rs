//! cvm-measure: predicts and verifies what a correct cvm-init node measures: prediction
//! (`predict`, `launch`), report and quote verification by TEE (`snp`, `tdx`, `tpm`), the
//! firmware's formats (`uefi`), and the reference key broker (`broker`). The formats it shares
//! with the node are `cvm_formats`'s, the key-broker protocol `cvm_kbs`'s.

pub mod broker;
pub mod elsewhere;
pub mod launch;
pub mod mapped;
pub mod predict;
pub mod snp;
pub mod tdx;
pub mod timeline;
pub mod tpm;
pub mod uefi;
pub mod x509;

use std::path::Path;

use sha2::{Digest, Sha256};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// SHA-256 of a file, mapped rather than copied (see [`mapped`]): for the command-line tools.
pub fn sha256_file_mapped(path: &Path) -> Result<[u8; 32], cvm_formats::DigestError> {
    let bytes = mapped::FileBytes::open(path).map_err(|source| cvm_formats::DigestError::Read {
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
