//! Test builds only (feature `test-hooks`): the hooks the boot tests set from the command line.
//! A leaf module (it uses no other module of the crate) so that both the boot and the TEE code
//! can read it without an import cycle.
use std::path::PathBuf;
use std::sync::Mutex;

/// `cvm.test-panic=<phase>`: panic at the start of that phase.
pub static PANIC_IN: Mutex<Option<String>> = Mutex::new(None);
/// `cvm.test-snp-emulator=<dir>`: evidence from an emulated SNP provider.
pub static SNP_EMULATOR: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The directory of the emulated SNP provider, when the command line asked for one.
pub fn snp_emulator_dir() -> Option<PathBuf> {
    SNP_EMULATOR.lock().ok()?.clone()
}

pub fn maybe_panic(phase: &str) {
    let wanted = PANIC_IN.lock().map(|p| p.clone()).unwrap_or(None);
    if wanted.as_deref() == Some(phase) {
        panic!("test hook: cvm.test-panic={phase}");
    }
}
