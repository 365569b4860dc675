//! Image tooling for `make image` and the boot tests: the `newc` cpio writer, the initramfs
//! (cvm-init as /init and the kernel modules it loads) and the check of a root tree. Kept out of the test harness so that
//! building the production image builds and runs no test binary.

pub mod cpio;
pub mod initramfs;
pub mod root_check;

pub use initramfs::{InitramfsSpec, Kernel};
