//! Image tooling for `make image` and the boot tests: the `newc` cpio writer and the initramfs
//! (cvm-init as /init and the kernel modules it loads). Kept out of the test harness so that
//! building the production image builds and runs no test binary.

pub mod cpio;
pub mod initramfs;

pub use initramfs::{InitramfsSpec, Kernel};
