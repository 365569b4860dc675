//! Links the panic = "abort" init without unwind tables (see no-unwind-tables.ld): nothing in
//! the PID 1 unwinds, and the tables were about a tenth of the static binary.
fn main() {
    println!("cargo:rerun-if-changed=no-unwind-tables.ld");
    // Cargo's cfg values do not carry the profile's panic strategy: every profile built from
    // `release` (release, size-report, test-image) has panic = "abort" (the root Cargo.toml).
    let abort = std::env::var("PROFILE").as_deref() == Ok("release");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    if abort && linux {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bins=-Wl,--no-eh-frame-hdr");
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/no-unwind-tables.ld");
    }
}
