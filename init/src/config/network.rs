//! The `[network]` section: its type and its checks live with the network code
//! (`crate::net`); this is the configuration's view of them.

pub use crate::net::NetworkConfig;

use super::{invalid, Invalid};

/// The `[network]` checks: the first problem `crate::net::check_config` finds.
pub fn validate(network: &NetworkConfig) -> Result<(), Invalid> {
    if let Some((field, value, expected)) = crate::net::check_config(network).into_iter().next() {
        return Err(invalid(field.into(), &value, expected));
    }
    Ok(())
}
