//! cvm-init: PID 1 of a confidential Kubernetes node, as a library of one module per concern
//! so that its logic is tested without booting a machine. `boot` is the ordered phase list.

pub mod boot;
pub mod check;
pub mod config;
pub mod devices;
pub mod disk;
pub mod dm;
pub mod fatal;
pub mod keys;
#[cfg(test)]
mod leak_check;
pub mod logger;
pub mod measure;
pub mod modules;
pub mod mounts;
pub mod net;
pub mod nofollow;
pub mod power;
pub mod root;
pub mod runtime;
pub mod service_digests;
pub mod shutdown;
pub mod state_disk;
pub mod supervise;
pub mod sys;
pub mod tee;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;

/// The version printed by `--version` and at the start of every boot.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
