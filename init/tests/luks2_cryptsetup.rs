//! LUKS2 compatibility with cryptsetup (cryptsetup-bin, installed by `make deps`) in both
//! directions, and the 2025 header attacks, each of which must be refused.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use cvm_init::disk::luks2::{self, checksum, FormatInput, KdfPolicy, Luks2Error, Policy, HDR_SIZE};

const SECRET: &[u8] = b"cvm-init test vector";
const UUID: &str = "11111111-2222-4333-8444-555555555555";
const IMAGE_SIZE: u64 = 20 << 20;

fn volume_key(len: usize) -> Vec<u8> {
    (0..len as u8).collect()
}

fn pbkdf2_policy() -> Policy {
    Policy {
        integrity: false,
        kdf: KdfPolicy::Pbkdf2 { iterations: 1000 },
    }
}

fn cryptsetup(args: &[&str]) -> std::process::Output {
    Command::new("cryptsetup")
        .args(args)
        .output()
        .expect("cryptsetup is installed by make deps (cryptsetup-bin)")
}

/// A 20 MiB image formatted by cryptsetup with a fixed volume key.
fn cryptsetup_image(dir: &Path, kdf: &[&str]) -> std::path::PathBuf {
    let img = dir.join("cs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(IMAGE_SIZE)
        .unwrap();
    std::fs::write(dir.join("pass"), SECRET).unwrap();
    std::fs::write(dir.join("vk"), volume_key(64)).unwrap();
    let (img_s, pass, vk) = (img.to_str().unwrap(), dir.join("pass"), dir.join("vk"));
    let mut args = vec![
        "luksFormat",
        "-q",
        "--type",
        "luks2",
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        "512",
        "--sector-size",
        "4096",
        "--hash",
        "sha256",
        "--uuid",
        UUID,
    ];
    args.extend_from_slice(kdf);
    let out = Command::new("cryptsetup")
        .args(&args)
        .arg("--volume-key-file")
        .arg(&vk)
        .arg("--key-file")
        .arg(&pass)
        .arg(img_s)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "luksFormat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

fn read_header(img: &Path) -> Vec<u8> {
    let mut buf = vec![0u8; 2 * HDR_SIZE as usize];
    std::fs::File::open(img)
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    buf
}

fn open(img: &Path, policy: &Policy, secret: &[u8]) -> Result<Vec<u8>, Luks2Error> {
    let header = luks2::parse(&read_header(img), IMAGE_SIZE, policy)?;
    let file = std::fs::File::open(img).unwrap();
    let key = luks2::unlock(&header, secret, &mut |offset, buf| {
        file.read_exact_at(buf, offset)
    })?;
    Ok(key.to_vec())
}

#[test]
fn we_open_what_cryptsetup_formats_with_pbkdf2() {
    let dir = tempfile::tempdir().unwrap();
    let img = cryptsetup_image(
        dir.path(),
        &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
    );
    assert_eq!(
        open(&img, &pbkdf2_policy(), SECRET).unwrap(),
        volume_key(64)
    );
    assert_eq!(
        open(&img, &pbkdf2_policy(), b"wrong").unwrap_err(),
        Luks2Error::WrongSecret
    );
}

/// cryptsetup's options for a cheap Argon2id keyslot.
const ARGON2ID: &[&str] = &[
    "--pbkdf",
    "argon2id",
    "--pbkdf-force-iterations",
    "4",
    "--pbkdf-memory",
    "32",
    "--pbkdf-parallel",
    "1",
];

/// Tests only (`--features argon2`): the production build opens pbkdf2 keyslots only.
#[cfg(feature = "argon2")]
#[test]
fn we_open_what_cryptsetup_formats_with_argon2id() {
    let dir = tempfile::tempdir().unwrap();
    let img = cryptsetup_image(dir.path(), ARGON2ID);
    let policy = Policy {
        integrity: false,
        kdf: KdfPolicy::Argon2id {
            time: 4,
            memory_kib: 32,
            cpus: 1,
        },
    };
    assert_eq!(open(&img, &policy, SECRET).unwrap(), volume_key(64));
    // The same header under a policy that wants pbkdf2 is refused, naming the KDF.
    let err = open(&img, &pbkdf2_policy(), SECRET).unwrap_err();
    assert!(err.to_string().contains("keyslots.0.kdf"), "{err}");
}

/// The production build refuses an Argon2id keyslot by name, under any policy it can express.
#[cfg(not(feature = "argon2"))]
#[test]
fn cryptsetup_argon2id_keyslots_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let img = cryptsetup_image(dir.path(), ARGON2ID);
    for integrity in [false, true] {
        let policy = Policy {
            integrity,
            kdf: KdfPolicy::Pbkdf2 { iterations: 1000 },
        };
        let err = open(&img, &policy, SECRET).unwrap_err();
        assert_eq!(
            err,
            Luks2Error::KdfNotBuilt {
                keyslot: "0",
                kdf: "argon2id"
            }
        );
        assert_eq!(
            err.to_string(),
            "keyslot 0 uses argon2id; this build opens only pbkdf2 keyslots"
        );
    }
}

fn our_image(dir: &Path, policy: Policy) -> std::path::PathBuf {
    let img = dir.join("ours.img");
    let vk = volume_key(policy.key_size());
    let head = luks2::format(FormatInput {
        policy,
        uuid: UUID,
        secret: SECRET,
        volume_key: &vk,
        label: "",
        token: None,
        random: &mut luks2::kernel_random,
    })
    .unwrap();
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(IMAGE_SIZE).unwrap();
    f.write_all_at(&head, 0).unwrap();
    std::fs::write(dir.join("pass"), SECRET).unwrap();
    img
}

fn dumped_volume_key(img: &Path, pass: &Path) -> String {
    let out = cryptsetup(&[
        "luksDump",
        "-q",
        "--dump-volume-key",
        "--key-file",
        pass.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "luksDump --dump-volume-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // The key follows "MK dump:" as hex pairs over several lines.
    let after = text
        .split("MK dump:")
        .nth(1)
        .expect("MK dump in the output");
    after
        .split_whitespace()
        .filter(|w| w.len() == 2 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect()
}

#[test]
fn cryptsetup_opens_what_we_format() {
    let dir = tempfile::tempdir().unwrap();
    let policies = [
        pbkdf2_policy(),
        #[cfg(feature = "argon2")]
        Policy {
            integrity: false,
            kdf: KdfPolicy::Argon2id {
                time: 4,
                memory_kib: 32,
                cpus: 1,
            },
        },
        Policy {
            integrity: true,
            kdf: KdfPolicy::Pbkdf2 { iterations: 1000 },
        },
    ];
    for policy in policies {
        let img = our_image(dir.path(), policy);
        let out = cryptsetup(&["luksDump", img.to_str().unwrap()]);
        let dump = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "luksDump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(dump.contains("Version:       \t2"), "{dump}");
        assert!(dump.contains(UUID), "{dump}");
        assert!(dump.contains("sector: 4096 [bytes]"), "{dump}");
        if policy.integrity {
            assert!(dump.contains("integrity: hmac(sha256)"), "{dump}");
        }
        let expected: String = volume_key(policy.key_size())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            dumped_volume_key(&img, &dir.path().join("pass")),
            expected,
            "{policy:?}"
        );
        // And we read our own header back.
        assert_eq!(
            open(&img, &policy, SECRET).unwrap(),
            volume_key(policy.key_size())
        );
    }
}

/// Rewrites the JSON of both copies (what an attacker with disk access can do: the checksum
/// is unkeyed), keeping everything else valid.
fn forge(img: &Path, edit: impl Fn(&str) -> String) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    for offset in [0u64, HDR_SIZE] {
        let mut copy = vec![0u8; HDR_SIZE as usize];
        f.read_exact_at(&mut copy, offset).unwrap();
        let end = copy[4096..].iter().position(|&b| b == 0).unwrap();
        let json = edit(std::str::from_utf8(&copy[4096..4096 + end]).unwrap());
        assert!(json.len() < copy.len() - 4096);
        copy[4096..].fill(0);
        copy[4096..4096 + json.len()].copy_from_slice(json.as_bytes());
        let sum = checksum(&copy);
        copy[0x1c0..0x1e0].copy_from_slice(&sum);
        f.write_all_at(&copy, offset).unwrap();
    }
}

/// An attack: its name, how it rewrites the JSON, and what the refusal must name.
type Attack<'a> = (&'a str, &'a dyn Fn(&str) -> String, &'a str);

fn sha256_file(p: &Path) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(p).unwrap()).to_vec()
}

#[test]
fn header_attacks_are_refused_and_nothing_is_written() {
    let attacks: &[Attack] = &[
        (
            "A1 null segment cipher",
            &|j: &str| {
                j.replacen(
                    "\"encryption\":\"aes-xts-plain64\",\"sector_size\"",
                    "\"encryption\":\"cipher_null-ecb\",\"sector_size\"",
                    1,
                )
            },
            "segments.0.encryption",
        ),
        (
            "A2 null keyslot cipher",
            &|j: &str| {
                j.replacen(
                    "\"encryption\":\"aes-xts-plain64\",\"key_size\":64",
                    "\"encryption\":\"cipher_null-ecb\",\"key_size\":64",
                    1,
                )
            },
            "keyslots.0.area.encryption",
        ),
        (
            "A3 segment offset into the header",
            &|j: &str| j.replacen("\"offset\":\"16777216\"", "\"offset\":\"4096\"", 1),
            "segments.0.offset",
        ),
        (
            "segment type linear",
            &|j: &str| j.replacen("\"type\":\"crypt\"", "\"type\":\"linear\"", 1),
            "segments.0.type",
        ),
        (
            "second segment",
            &|j: &str| {
                j.replacen("\"segments\":{", "\"segments\":{\"1\":{\"type\":\"linear\",\"offset\":\"16777216\",\"size\":\"dynamic\",\"iv_tweak\":\"0\",\"encryption\":\"aes-xts-plain64\",\"sector_size\":4096},", 1)
            },
            "segments",
        ),
        (
            "keyslot area overlapping data",
            &|j: &str| j.replacen("\"offset\":\"32768\"", "\"offset\":\"16777216\"", 1),
            "keyslots.0.area",
        ),
        (
            "digest bound to no segment",
            &|j: &str| j.replacen("\"segments\":[\"0\"]", "\"segments\":[]", 1),
            "digests.0",
        ),
        (
            "reencryption requirement",
            &|j: &str| {
                j.replacen("\"keyslots_size\":\"16744448\"", "\"keyslots_size\":\"16744448\",\"requirements\":{\"mandatory\":[\"online-reencrypt-v2\"]}", 1)
            },
            "unknown field `requirements`",
        ),
        (
            "discard flag",
            &|j: &str| {
                j.replacen(
                    "\"keyslots_size\":\"16744448\"",
                    "\"keyslots_size\":\"16744448\",\"flags\":[\"allow-discards\"]",
                    1,
                )
            },
            "unknown field `flags`",
        ),
        (
            "KDF made cheap",
            &|j: &str| {
                j.replacen(
                    "\"iterations\":1000,\"salt\"",
                    "\"iterations\":1,\"salt\"",
                    1,
                )
            },
            "keyslots.0.kdf",
        ),
        (
            "sector size changed",
            &|j: &str| j.replacen("\"sector_size\":4096", "\"sector_size\":512", 1),
            "segments.0.sector_size",
        ),
        (
            "integrity removed from policy view",
            &|j: &str| {
                j.replacen("\"sector_size\":4096", "\"sector_size\":4096,\"integrity\":{\"type\":\"hmac(sha256)\",\"journal_encryption\":\"none\",\"journal_integrity\":\"none\"}", 1)
            },
            "segments.0.integrity",
        ),
        (
            "duplicate token key",
            &|j: &str| {
                j.replacen(
                    "\"tokens\":{}",
                    "\"tokens\":{\"0\":{\"type\":\"cvm-a\",\"keyslots\":[\"0\"]},\"0\":{\"type\":\"cvm-b\",\"keyslots\":[\"0\"]}}",
                    1,
                )
            },
            "duplicate key",
        ),
        (
            "foreign token",
            &|j: &str| {
                j.replacen("\"tokens\":{}", "\"tokens\":{\"0\":{\"type\":\"luks2-keyring\",\"keyslots\":[\"0\"],\"key_description\":\"x\"}}", 1)
            },
            "tokens.0",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let pristine = cryptsetup_image(
        dir.path(),
        &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
    );
    for (name, edit, field) in attacks {
        let img = dir.path().join("attacked.img");
        std::fs::copy(&pristine, &img).unwrap();
        forge(&img, edit);
        let before = sha256_file(&img);
        let err = open(&img, &pbkdf2_policy(), SECRET).expect_err(name);
        assert!(err.to_string().contains(field), "{name}: {err}");
        assert_eq!(sha256_file(&img), before, "{name}: the device changed");
    }
}

#[test]
fn a_digest_that_does_not_bind_the_key_is_refused() {
    // The attacker swaps in the digest of a key of their own: the real secret then yields a key
    // the digest rejects; nothing opens.
    let dir = tempfile::tempdir().unwrap();
    let img = cryptsetup_image(
        dir.path(),
        &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
    );
    forge(&img, |j| {
        let start = j.find("\"digest\":\"").unwrap() + 10;
        let end = start + j[start..].find('"').unwrap();
        format!(
            "{}{}{}",
            &j[..start],
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            &j[end..]
        )
    });
    assert_eq!(
        open(&img, &pbkdf2_policy(), SECRET).unwrap_err(),
        Luks2Error::WrongSecret
    );
}

#[test]
fn copies_must_agree() {
    let dir = tempfile::tempdir().unwrap();
    let img = cryptsetup_image(
        dir.path(),
        &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
    );
    // A secondary with a higher sequence ID (cryptsetup would prefer it).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut copy = vec![0u8; HDR_SIZE as usize];
    f.read_exact_at(&mut copy, HDR_SIZE).unwrap();
    copy[0x10..0x18].copy_from_slice(&99u64.to_be_bytes());
    let sum = checksum(&copy);
    copy[0x1c0..0x1e0].copy_from_slice(&sum);
    f.write_all_at(&copy, HDR_SIZE).unwrap();
    let err = open(&img, &pbkdf2_policy(), SECRET).unwrap_err();
    assert!(matches!(err, Luks2Error::CopiesDiffer(_)), "{err}");
    // A corrupted primary is not repaired from the secondary: refused.
    let img2 = cryptsetup_image(
        dir.path(),
        &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
    );
    let f = std::fs::OpenOptions::new().write(true).open(&img2).unwrap();
    f.write_all_at(b"x", 4200).unwrap();
    let err = open(&img2, &pbkdf2_policy(), SECRET).unwrap_err();
    assert!(
        err.to_string().contains("the primary header is invalid"),
        "{err}"
    );
}
