//! An image upgrade in place with a signed PCR policy, in QEMU with swtpm: the state disk's
//! secret is sealed with TPM2_PolicyAuthorize to the operator's key, which the boot finds with
//! its signature in `/.extra` as systemd-stub leaves them (here an archive appended to the
//! initramfs, as the stub appends its own). Image A formats the disk; image B (another root,
//! signed with the same key) opens it and the data is there; image C (signed with another key)
//! is refused with the reason, and the disk's bytes are unchanged.

use std::path::Path;

use cvm_image::cpio::CpioWriter;
use qemu_tests::broker::{self, openssl};
use qemu_tests::support::{
    assert_fatal_before_workload, blank_state_disk, must, power_down, prepare, Prepared, BOOT,
};

fn config(comment: &str) -> String {
    format!(
        "# {comment}\n[state]\nserial = \"cvm-state\"\nkey = \"tpm\"\ntpm_policy = \"signed\"\nbinds = [\"/var/lib/kubelet\"]\n\n[[service]]\nname = \"app\"\npath = \"/bin/payload\"\nargs = [\"state-probe\"]\n"
    )
}

/// An RSA key `name` in `dir`, and the `/.extra` files a UKI signed with it carries: the
/// public key (PEM) and systemd's `.pcrsig` for `pcr11`, PCR 11 at the key release.
fn signed_extra(dir: &Path, name: &str, pcr11: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let key = format!("{name}.pem");
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &key,
        ],
    );
    let public_pem = openssl(dir, &["pkey", "-in", &key, "-pubout"]);
    // systemd's fingerprint hashes the key as i2d_PublicKey writes it: PKCS#1 for RSA.
    let pkcs1 = openssl(
        dir,
        &["rsa", "-in", &key, "-RSAPublicKey_out", "-outform", "DER"],
    );
    let pol = cvm_formats::tpm::policy_pcr_digest(&[11], &[pcr11.to_vec()]);
    let pol_file = format!("{name}.pol");
    std::fs::write(dir.join(&pol_file), pol).unwrap();
    let sig = openssl(dir, &["dgst", "-sha256", "-sign", &key, &pol_file]);
    let json = cvm_formats::pcrsig::write(&[cvm_formats::pcrsig::Entry {
        pcrs: vec![11],
        pkfp: cvm_formats::pcrsig::key_fingerprint(&pkcs1),
        pol,
        sig,
    }]);
    (public_pem, json.into_bytes())
}

/// Appends the `/.extra` archive to the image's initramfs.
fn add_extra(prepared: &Prepared, (public_pem, pcrsig): &(Vec<u8>, Vec<u8>)) {
    let mut cpio = CpioWriter::new(Vec::new());
    cpio.dir(".extra", 0o755).unwrap();
    cpio.file(".extra/tpm2-pcr-public-key.pem", 0o444, public_pem)
        .unwrap();
    cpio.file(".extra/tpm2-pcr-signature.json", 0o444, pcrsig)
        .unwrap();
    let archive = cpio.finish().unwrap();
    let mut initrd = std::fs::read(&prepared.image.initrd).unwrap();
    initrd.extend_from_slice(&archive);
    std::fs::write(&prepared.image.initrd, initrd).unwrap();
}

#[test]
fn an_image_signed_with_the_same_key_opens_the_disk_and_another_key_does_not() {
    let (a, b, c) = (
        prepare(Some(&config("image A"))),
        prepare(Some(&config("image B"))),
        prepare(Some(&config("image C"))),
    );
    // PCR 11 where the node unseals, as `cvm-measure predict --at key-release` gives it: on a
    // direct boot (no stub measuring a UKI) only the phases, the same for every image.
    let reference = broker::key_release_reference(&a.image, &config("image A"));
    let (_, pcr11) = reference.pcrs.iter().find(|(p, _)| *p == 11).unwrap();
    let keys = tempfile::tempdir().unwrap();
    let operator = signed_extra(keys.path(), "operator", pcr11);
    let other = signed_extra(keys.path(), "other", pcr11);
    let work = tempfile::tempdir().unwrap();
    let disk = blank_state_disk(work.path());
    let tpm = work.path().join("tpm");

    // A: formats the disk, sealed to the operator's key.
    add_extra(&a, &operator);
    let mut guest = a.boot("signed-a", "cvm.tee=tpm", |g| {
        g.state_disk(&disk, "cvm-state").tpm_state(&tpm)
    });
    must(guest.wait_for("app: payload: marker written", BOOT));
    assert!(guest.serial_log().contains("formatted on this boot"));
    power_down(&mut guest);
    drop(guest);

    // B: another root (its configuration differs), signed with the same key: the disk opens
    // and the data written by A is there.
    assert_ne!(a.image.roothash_option(), b.image.roothash_option());
    add_extra(&b, &operator);
    let mut guest = b.boot("signed-b", "cvm.tee=tpm", |g| {
        g.state_disk(&disk, "cvm-state").tpm_state(&tpm)
    });
    must(guest.wait_for(
        "app: payload: marker found plaintext-marker-7f3a9c21e5",
        BOOT,
    ));
    assert!(!guest.serial_log().contains("formatted on this boot"));
    power_down(&mut guest);
    drop(guest);

    // C: signed with another key: refused with the reason, before any workload, and the
    // disk's bytes are unchanged.
    add_extra(&c, &other);
    let before = std::fs::read(&disk).unwrap();
    let mut guest = c.boot("signed-c", "cvm.tee=tpm", |g| {
        g.state_disk(&disk, "cvm-state").tpm_state(&tpm)
    });
    let log = assert_fatal_before_workload(&mut guest, "another signing key", "app: payload:");
    assert!(
        !log.contains("formatted on this boot"),
        "image C formatted the disk"
    );
    drop(guest);
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "image C changed the disk"
    );
}
