//! What UEFI firmware measures and how: the TCG event logs (`tcglog`) and PE images with
//! their Authenticode digests (`pe`).

pub mod pe;
pub mod tcglog;
