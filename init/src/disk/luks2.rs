//! LUKS2, the subset the measured configuration allows, read strictly.
//!
//! The host can rewrite the header at will (its checksum is unkeyed), so nothing in it is
//! trusted: both copies must be valid and identical, the JSON must parse under a strict schema
//! (no unknown fields, no duplicate keys, canonical numbers and base64), and every parameter
//! must equal what the policy allows: aes-xts-plain64 with a 512-bit key (plus a 256-bit HMAC
//! key with integrity), 4096-byte sectors, one keyslot, one segment, one digest. The dm-crypt
//! table is later built from the policy, never from header strings.

use std::collections::BTreeMap;
use std::fmt;

use aes::cipher::KeyInit;
use aes::Aes256;
use base64::Engine;
use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use xts_mode::{get_tweak_default, Xts128};
use zeroize::{Zeroize, Zeroizing};

pub const HDR_SIZE: u64 = 16384;
pub const JSON_SIZE: u64 = HDR_SIZE - 4096;
pub const KEYSLOTS_SIZE: u64 = 16_744_448;
pub const DATA_OFFSET: u64 = 16 << 20;
pub const SECTOR_SIZE: u32 = 4096;
pub const STRIPES: usize = 4000;
const MAGIC_PRIMARY: &[u8; 6] = b"LUKS\xba\xbe";
const MAGIC_SECONDARY: &[u8; 6] = b"SKUL\xba\xbe";
const CIPHER: &str = "aes-xts-plain64";
const XTS_KEY: usize = 64;
const HMAC_KEY: usize = 32;

/// The keyslot KDF the policy asks for, with the bounds it accepts (the upper ones guard
/// against a header that asks for a day of work or all of memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfPolicy {
    Pbkdf2 {
        iterations: u32,
    },
    /// Only in builds with the `argon2` feature (tests): the node's policy is PBKDF2, whose
    /// secret is 32 random bytes, so the PID 1 does not carry a memory-hard KDF.
    #[cfg(feature = "argon2")]
    Argon2id {
        time: u32,
        memory_kib: u32,
        cpus: u32,
    },
}

/// What the measured configuration allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// dm-integrity with hmac(sha256) under the XTS encryption.
    pub integrity: bool,
    pub kdf: KdfPolicy,
}

impl Policy {
    /// Volume key bytes: the XTS key, plus the HMAC key with integrity.
    pub fn key_size(&self) -> usize {
        if self.integrity {
            XTS_KEY + HMAC_KEY
        } else {
            XTS_KEY
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Luks2Error {
    #[error("no LUKS2 header: {0}")]
    NotLuks(String),
    #[error("the {copy} header is invalid: {detail}")]
    Binary { copy: &'static str, detail: String },
    #[error("the two header copies differ: {0}")]
    CopiesDiffer(String),
    #[error("the JSON metadata is invalid: {0}")]
    Json(String),
    #[error("the header field {field} is {found}, the configuration allows {allowed}")]
    Policy {
        field: String,
        found: String,
        allowed: String,
    },
    #[error("the secret does not open keyslot 0 (its digest does not match)")]
    WrongSecret,
    #[error("keyslot {keyslot} uses {kdf}; this build opens only pbkdf2 keyslots")]
    KdfNotBuilt {
        keyslot: &'static str,
        kdf: &'static str,
    },
    #[error("cannot derive the keyslot key: {0}")]
    Kdf(String),
    #[error("cannot read or write the device: {0}")]
    Io(String),
}

/// Decimal digits in a JSON string (LUKS2's "string-uint64"), nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct U64Str(pub u64);

impl<'de> Deserialize<'de> for U64Str {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let canonical = !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        match (canonical, s.parse::<u64>()) {
            (true, Ok(v)) => Ok(U64Str(v)),
            _ => Err(serde::de::Error::custom(format!(
                "{s:?} is not a canonical decimal u64"
            ))),
        }
    }
}

/// Standard base64 that re-encodes to itself.
#[derive(Clone, PartialEq, Eq)]
pub struct B64(pub Vec<u8>);

impl fmt::Debug for B64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "B64({} bytes)", self.0.len())
    }
}

impl<'de> Deserialize<'de> for B64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let engine = base64::engine::general_purpose::STANDARD;
        let bytes = engine
            .decode(&s)
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))?;
        if engine.encode(&bytes) != s {
            return Err(serde::de::Error::custom("non-canonical base64"));
        }
        Ok(B64(bytes))
    }
}

/// A JSON object whose duplicate keys are an error (serde maps keep the last silently).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrictMap<T>(pub BTreeMap<String, T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for StrictMap<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = StrictMap<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, T>()? {
                    if out.insert(k.clone(), v).is_some() {
                        return Err(serde::de::Error::custom(format!("duplicate key {k:?}")));
                    }
                }
                Ok(StrictMap(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub keyslots: StrictMap<Keyslot>,
    pub tokens: StrictMap<Token>,
    pub segments: StrictMap<Segment>,
    pub digests: StrictMap<DigestEntry>,
    pub config: Config,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keyslot {
    #[serde(rename = "type")]
    pub kind: String,
    pub key_size: u32,
    pub af: Af,
    pub area: Area,
    pub kdf: Kdf,
    #[serde(default)]
    pub priority: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Af {
    #[serde(rename = "type")]
    pub kind: String,
    pub stripes: u32,
    pub hash: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Area {
    #[serde(rename = "type")]
    pub kind: String,
    pub offset: U64Str,
    pub size: U64Str,
    pub encryption: String,
    pub key_size: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kdf {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub hash: Option<String>,
    #[serde(default)]
    pub iterations: Option<u32>,
    #[serde(default)]
    pub time: Option<u32>,
    #[serde(default)]
    pub memory: Option<u32>,
    #[serde(default)]
    pub cpus: Option<u32>,
    pub salt: B64,
}

#[derive(Debug, Deserialize)]
pub struct Token {
    #[serde(rename = "type")]
    pub kind: String,
    pub keyslots: Vec<String>,
    #[serde(flatten)]
    pub fields: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    #[serde(rename = "type")]
    pub kind: String,
    pub offset: U64Str,
    pub size: String,
    pub iv_tweak: U64Str,
    pub encryption: String,
    pub sector_size: u32,
    #[serde(default)]
    pub integrity: Option<IntegrityJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntegrityJson {
    #[serde(rename = "type")]
    pub kind: String,
    pub journal_encryption: String,
    pub journal_integrity: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigestEntry {
    #[serde(rename = "type")]
    pub kind: String,
    pub keyslots: Vec<String>,
    pub segments: Vec<String>,
    pub hash: String,
    pub iterations: u32,
    pub salt: B64,
    pub digest: B64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub json_size: U64Str,
    pub keyslots_size: U64Str,
}

/// A validated header: the values the policy allowed, from the in-memory copy.
#[derive(Debug)]
pub struct Header {
    pub uuid: String,
    pub label: String,
    pub seqid: u64,
    pub metadata: Metadata,
}

fn policy_err(field: &str, found: impl fmt::Display, allowed: impl fmt::Display) -> Luks2Error {
    Luks2Error::Policy {
        field: field.to_string(),
        found: found.to_string(),
        allowed: allowed.to_string(),
    }
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A NUL-terminated field with only zeros after the terminator.
fn c_string(field: &[u8]) -> Option<&str> {
    let end = field.iter().position(|&b| b == 0)?;
    if field[end..].iter().any(|&b| b != 0) {
        return None;
    }
    std::str::from_utf8(&field[..end]).ok()
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| {
            g.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// The checksum of one copy: SHA-256 over the copy with its checksum field zeroed.
pub fn checksum(copy: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&copy[..0x1c0]);
    h.update([0u8; 64]);
    h.update(&copy[0x200..]);
    h.finalize().into()
}

/// Checks one binary header copy; returns (seqid, uuid, JSON text).
fn check_copy(copy: &[u8], offset: u64) -> Result<(u64, String, &str), String> {
    let magic = if offset == 0 {
        MAGIC_PRIMARY
    } else {
        MAGIC_SECONDARY
    };
    if &copy[0..6] != magic {
        return Err(format!(
            "magic {:02x?}, expected {:02x?}",
            &copy[0..6],
            magic
        ));
    }
    if copy[6..8] != [0, 2] {
        return Err(format!(
            "version {}",
            u16::from_be_bytes([copy[6], copy[7]])
        ));
    }
    let hdr_size = be64(copy, 8);
    if hdr_size != HDR_SIZE {
        return Err(format!("header size {hdr_size}, expected {HDR_SIZE}"));
    }
    let seqid = be64(copy, 0x10);
    c_string(&copy[0x18..0x48]).ok_or("label is not a NUL-terminated string")?;
    if c_string(&copy[0x48..0x68]) != Some("sha256") {
        return Err("checksum algorithm is not sha256".into());
    }
    let uuid = c_string(&copy[0xa8..0xd0]).ok_or("uuid is not a NUL-terminated string")?;
    if !is_uuid(uuid) {
        return Err(format!("uuid {uuid:?} is not a lower-case 8-4-4-4-12 UUID"));
    }
    c_string(&copy[0xd0..0x100]).ok_or("subsystem is not a NUL-terminated string")?;
    if be64(copy, 0x100) != offset {
        return Err(format!(
            "it says it is at offset {}, it was read at {offset}",
            be64(copy, 0x100)
        ));
    }
    if copy[0x108..0x1c0].iter().any(|&b| b != 0) || copy[0x1e0..0x1000].iter().any(|&b| b != 0) {
        return Err("padding is not zero".into());
    }
    if checksum(copy) != copy[0x1c0..0x1e0] {
        return Err("checksum does not match".into());
    }
    let area = &copy[4096..];
    let end = area
        .iter()
        .position(|&b| b == 0)
        .ok_or("JSON area has no terminator")?;
    if area[end..].iter().any(|&b| b != 0) {
        return Err("bytes after the JSON text are not zero".into());
    }
    let json = std::str::from_utf8(&area[..end]).map_err(|_| "JSON is not UTF-8")?;
    if !json.starts_with('{') {
        return Err("JSON does not start with '{'".into());
    }
    Ok((seqid, uuid.to_string(), json))
}

/// Parses and validates the first `2 * HDR_SIZE` bytes of a device against the policy.
/// `device_size` bounds the areas.
pub fn parse(bytes: &[u8], device_size: u64, policy: &Policy) -> Result<Header, Luks2Error> {
    if bytes.len() < 2 * HDR_SIZE as usize {
        return Err(Luks2Error::NotLuks(format!("only {} bytes", bytes.len())));
    }
    if &bytes[0..6] != MAGIC_PRIMARY {
        return Err(Luks2Error::NotLuks("no LUKS magic at offset 0".into()));
    }
    let primary = &bytes[..HDR_SIZE as usize];
    let secondary = &bytes[HDR_SIZE as usize..2 * HDR_SIZE as usize];
    let (seq_a, uuid_a, json_a) = check_copy(primary, 0).map_err(|detail| Luks2Error::Binary {
        copy: "primary",
        detail,
    })?;
    let (seq_b, uuid_b, json_b) =
        check_copy(secondary, HDR_SIZE).map_err(|detail| Luks2Error::Binary {
            copy: "secondary",
            detail,
        })?;
    if seq_a != seq_b {
        return Err(Luks2Error::CopiesDiffer(format!(
            "sequence IDs {seq_a} and {seq_b}"
        )));
    }
    if uuid_a != uuid_b
        || primary[0x18..0x48] != secondary[0x18..0x48]
        || primary[0xd0..0x100] != secondary[0xd0..0x100]
    {
        return Err(Luks2Error::CopiesDiffer("uuid, label or subsystem".into()));
    }
    if json_a != json_b {
        return Err(Luks2Error::CopiesDiffer("JSON metadata".into()));
    }
    let metadata: Metadata =
        serde_json::from_str(json_a).map_err(|e| Luks2Error::Json(e.to_string()))?;
    validate(&metadata, device_size, policy)?;
    Ok(Header {
        uuid: uuid_a,
        label: c_string(&primary[0x18..0x48]).unwrap_or("").to_string(),
        seqid: seq_a,
        metadata,
    })
}

/// Rewrites the label of both copies (secondary first, then primary) with the next sequence
/// ID, fresh checksums and the JSON untouched. `head` holds the first `2 * HDR_SIZE` bytes.
pub fn relabel(head: &mut [u8], label: &str) -> Result<(), Luks2Error> {
    if label.len() > 47 || label.bytes().any(|b| b == 0) {
        return Err(policy_err("label", label, "at most 47 bytes without NUL"));
    }
    for offset in [HDR_SIZE as usize, 0] {
        let copy = &mut head[offset..offset + HDR_SIZE as usize];
        let seqid = be64(copy, 0x10)
            .checked_add(1)
            .ok_or_else(|| policy_err("seqid", u64::MAX, "below 18446744073709551615"))?;
        copy[0x10..0x18].copy_from_slice(&seqid.to_be_bytes());
        copy[0x18..0x48].fill(0);
        copy[0x18..0x18 + label.len()].copy_from_slice(label.as_bytes());
        let sum = checksum(copy);
        copy[0x1c0..0x1e0].copy_from_slice(&sum);
    }
    Ok(())
}

/// Reads one copy alone (for telling an interrupted relabel from a forgery): its label and
/// sequence ID, when the copy is valid by itself.
pub fn copy_label(head: &[u8], offset: u64) -> Option<(String, u64)> {
    let copy = head.get(offset as usize..(offset + HDR_SIZE) as usize)?;
    let (seqid, _, _) = check_copy(copy, offset).ok()?;
    Some((c_string(&copy[0x18..0x48])?.to_string(), seqid))
}

/// Refuses, by name, an Argon2 keyslot in a build without the `argon2` feature (the
/// production build): the keyslot KDF is then known before any policy comparison.
fn argon2_built(kind: &str) -> Result<(), Luks2Error> {
    if cfg!(feature = "argon2") {
        return Ok(());
    }
    // Only the two fixed names are echoed: the header is host text.
    let kdf = match kind {
        "argon2id" => "argon2id",
        "argon2i" => "argon2i",
        _ => return Ok(()),
    };
    Err(Luks2Error::KdfNotBuilt { keyslot: "0", kdf })
}

fn only_key<'a, T>(map: &'a StrictMap<T>, what: &str) -> Result<&'a T, Luks2Error> {
    match map.0.iter().collect::<Vec<_>>().as_slice() {
        [(k, v)] if k.as_str() == "0" => Ok(v),
        other => Err(policy_err(
            what,
            format!(
                "{:?}",
                other.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>()
            ),
            "exactly one, numbered 0",
        )),
    }
}

fn validate(m: &Metadata, device_size: u64, policy: &Policy) -> Result<(), Luks2Error> {
    let c = &m.config;
    if c.json_size.0 != JSON_SIZE {
        return Err(policy_err("config.json_size", c.json_size.0, JSON_SIZE));
    }
    if c.keyslots_size.0 != KEYSLOTS_SIZE {
        return Err(policy_err(
            "config.keyslots_size",
            c.keyslots_size.0,
            KEYSLOTS_SIZE,
        ));
    }
    let ks = only_key(&m.keyslots, "keyslots")?;
    argon2_built(&ks.kdf.kind)?;
    let key_size = policy.key_size() as u32;
    if ks.kind != "luks2" {
        return Err(policy_err("keyslots.0.type", &ks.kind, "luks2"));
    }
    if ks.key_size != key_size {
        return Err(policy_err("keyslots.0.key_size", ks.key_size, key_size));
    }
    if ks.priority.is_some_and(|p| p != 1) {
        return Err(policy_err(
            "keyslots.0.priority",
            ks.priority.unwrap(),
            "absent or 1",
        ));
    }
    if ks.af.kind != "luks1" || ks.af.stripes != STRIPES as u32 || ks.af.hash != "sha256" {
        return Err(policy_err(
            "keyslots.0.af",
            format!("{} {} {}", ks.af.kind, ks.af.stripes, ks.af.hash),
            "luks1 4000 sha256",
        ));
    }
    let a = &ks.area;
    if a.kind != "raw" {
        return Err(policy_err("keyslots.0.area.type", &a.kind, "raw"));
    }
    if a.encryption != CIPHER {
        return Err(policy_err(
            "keyslots.0.area.encryption",
            &a.encryption,
            CIPHER,
        ));
    }
    if a.key_size != XTS_KEY as u32 {
        return Err(policy_err("keyslots.0.area.key_size", a.key_size, XTS_KEY));
    }
    let material = af_material_len(key_size as usize) as u64;
    let area_end = a.offset.0.checked_add(a.size.0).ok_or_else(|| {
        policy_err(
            "keyslots.0.area",
            "an overflowing range",
            "inside the keyslots area",
        )
    })?;
    if a.offset.0 < 2 * HDR_SIZE
        || area_end > 2 * HDR_SIZE + KEYSLOTS_SIZE
        || a.size.0 < material
        || a.offset.0 % 4096 != 0
        || a.size.0 % 4096 != 0
    {
        return Err(policy_err(
            "keyslots.0.area",
            format!("offset {} size {}", a.offset.0, a.size.0),
            format!(
                "4096-aligned, at least {material} bytes, within {}..{}",
                2 * HDR_SIZE,
                2 * HDR_SIZE + KEYSLOTS_SIZE
            ),
        ));
    }
    let k = &ks.kdf;
    if k.salt.0.len() != 32 {
        return Err(policy_err(
            "keyslots.0.kdf.salt",
            format!("{} bytes", k.salt.0.len()),
            "32 bytes",
        ));
    }
    match policy.kdf {
        KdfPolicy::Pbkdf2 { iterations } => {
            let ok = k.kind == "pbkdf2"
                && k.hash.as_deref() == Some("sha256")
                && k.iterations == Some(iterations)
                && k.time.is_none()
                && k.memory.is_none()
                && k.cpus.is_none();
            if !ok {
                return Err(policy_err(
                    "keyslots.0.kdf",
                    format!("{k:?}"),
                    format!("pbkdf2 sha256 {iterations} iterations"),
                ));
            }
        }
        #[cfg(feature = "argon2")]
        KdfPolicy::Argon2id {
            time,
            memory_kib,
            cpus,
        } => {
            let ok = k.kind == "argon2id"
                && k.hash.is_none()
                && k.iterations.is_none()
                && k.time == Some(time)
                && k.memory == Some(memory_kib)
                && k.cpus == Some(cpus);
            if !ok {
                return Err(policy_err(
                    "keyslots.0.kdf",
                    format!("{k:?}"),
                    format!("argon2id time {time} memory {memory_kib} KiB cpus {cpus}"),
                ));
            }
        }
    }
    let s = only_key(&m.segments, "segments")?;
    if s.kind != "crypt" {
        return Err(policy_err("segments.0.type", &s.kind, "crypt"));
    }
    if s.encryption != CIPHER {
        return Err(policy_err("segments.0.encryption", &s.encryption, CIPHER));
    }
    if s.offset.0 != DATA_OFFSET {
        return Err(policy_err("segments.0.offset", s.offset.0, DATA_OFFSET));
    }
    if s.size != "dynamic" {
        return Err(policy_err("segments.0.size", &s.size, "dynamic"));
    }
    if s.iv_tweak.0 != 0 {
        return Err(policy_err("segments.0.iv_tweak", s.iv_tweak.0, 0));
    }
    if s.sector_size != SECTOR_SIZE {
        return Err(policy_err(
            "segments.0.sector_size",
            s.sector_size,
            SECTOR_SIZE,
        ));
    }
    match (&s.integrity, policy.integrity) {
        (None, false) => {}
        (Some(i), true)
            if i.kind == "hmac(sha256)"
                && i.journal_encryption == "none"
                && i.journal_integrity == "none" => {}
        (found, _) => {
            return Err(policy_err(
                "segments.0.integrity",
                format!("{:?}", found.as_ref().map(|i| &i.kind)),
                if policy.integrity {
                    "hmac(sha256), journals none"
                } else {
                    "absent"
                },
            ))
        }
    }
    if device_size < DATA_OFFSET + SECTOR_SIZE as u64 {
        return Err(policy_err(
            "device size",
            device_size,
            format!("at least {}", DATA_OFFSET + SECTOR_SIZE as u64),
        ));
    }
    let d = only_key(&m.digests, "digests")?;
    if d.kind != "pbkdf2" || d.hash != "sha256" || d.keyslots != ["0"] || d.segments != ["0"] {
        return Err(policy_err(
            "digests.0",
            format!(
                "{} {} keyslots {:?} segments {:?}",
                d.kind, d.hash, d.keyslots, d.segments
            ),
            "pbkdf2 sha256 binding keyslot 0 to segment 0",
        ));
    }
    if !(1000..=10_000_000).contains(&d.iterations) {
        return Err(policy_err(
            "digests.0.iterations",
            d.iterations,
            "1000 to 10000000",
        ));
    }
    if d.salt.0.len() != 32 || d.digest.0.len() != 32 {
        return Err(policy_err(
            "digests.0 salt/digest",
            format!("{}/{} bytes", d.salt.0.len(), d.digest.0.len()),
            "32/32 bytes",
        ));
    }
    for (id, t) in &m.tokens.0 {
        if !t.kind.starts_with("cvm-") || t.keyslots != ["0"] {
            return Err(policy_err(
                &format!("tokens.{id}"),
                format!("type {} keyslots {:?}", t.kind, t.keyslots),
                "a cvm-* token of keyslot 0",
            ));
        }
    }
    Ok(())
}

/// Bytes of AF-split material for a key: `ceil(key_size * 4000 / 512) * 512`.
pub fn af_material_len(key_size: usize) -> usize {
    (key_size * STRIPES).div_ceil(512) * 512
}

fn diffuse(block: &mut [u8]) {
    let chunks = block.len().div_ceil(32);
    let mut out = Vec::with_capacity(block.len());
    for i in 0..chunks {
        let part = &block[i * 32..((i + 1) * 32).min(block.len())];
        let mut h = Sha256::new();
        h.update((i as u32).to_be_bytes());
        h.update(part);
        out.extend_from_slice(&h.finalize()[..part.len()]);
    }
    block.copy_from_slice(&out);
    out.zeroize();
}

/// AF-merge (LUKS1 anti-forensic splitter, sha256).
pub fn af_merge(material: &[u8], key_size: usize) -> Zeroizing<Vec<u8>> {
    let mut b = Zeroizing::new(vec![0u8; key_size]);
    for s in 0..STRIPES - 1 {
        for (x, y) in b
            .iter_mut()
            .zip(&material[s * key_size..(s + 1) * key_size])
        {
            *x ^= y;
        }
        diffuse(&mut b);
    }
    for (x, y) in b
        .iter_mut()
        .zip(&material[(STRIPES - 1) * key_size..STRIPES * key_size])
    {
        *x ^= y;
    }
    b
}

/// AF-split with random stripes: the inverse of [`af_merge`].
pub fn af_split(key: &[u8], random: &mut dyn FnMut(&mut [u8])) -> Zeroizing<Vec<u8>> {
    let bs = key.len();
    let mut material = Zeroizing::new(vec![0u8; af_material_len(bs)]);
    random(&mut material[..(STRIPES - 1) * bs]);
    let mut b = Zeroizing::new(vec![0u8; bs]);
    for s in 0..STRIPES - 1 {
        for (x, y) in b.iter_mut().zip(&material[s * bs..(s + 1) * bs]) {
            *x ^= y;
        }
        diffuse(&mut b);
    }
    for (i, x) in material[(STRIPES - 1) * bs..STRIPES * bs]
        .iter_mut()
        .enumerate()
    {
        *x = key[i] ^ b[i];
    }
    material
}

/// AES-256-XTS over 512-byte units, the tweak counting units from 0 (keyslot areas).
fn xts(key: &[u8], data: &mut [u8], encrypt: bool) {
    let c1 = Aes256::new_from_slice(&key[..32]).expect("32-byte key");
    let c2 = Aes256::new_from_slice(&key[32..64]).expect("32-byte key");
    let x = Xts128::new(c1, c2);
    if encrypt {
        x.encrypt_area(data, 512, 0, get_tweak_default);
    } else {
        x.decrypt_area(data, 512, 0, get_tweak_default);
    }
}

fn pbkdf2_sha256(secret: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
    pbkdf2::pbkdf2_hmac::<Sha256>(secret, salt, iterations, out);
}

fn derive(kdf: &Kdf, secret: &[u8], len: usize) -> Result<Zeroizing<Vec<u8>>, Luks2Error> {
    let mut out = Zeroizing::new(vec![0u8; len]);
    match kdf.kind.as_str() {
        "pbkdf2" => pbkdf2_sha256(secret, &kdf.salt.0, kdf.iterations.unwrap_or(0), &mut out),
        #[cfg(feature = "argon2")]
        "argon2id" => {
            let params = argon2::Params::new(
                kdf.memory.unwrap_or(0),
                kdf.time.unwrap_or(0),
                kdf.cpus.unwrap_or(0),
                Some(len),
            )
            .map_err(|e| Luks2Error::Kdf(e.to_string()))?;
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password_into(secret, &kdf.salt.0, &mut out)
                .map_err(|e| Luks2Error::Kdf(e.to_string()))?;
        }
        other => {
            argon2_built(other)?;
            return Err(Luks2Error::Kdf(format!("unknown KDF {other}")));
        }
    }
    Ok(out)
}

/// Checks a volume key against the digest (constant-time comparison).
pub fn verify_volume_key(header: &Header, key: &[u8]) -> bool {
    let d = &header.metadata.digests.0["0"];
    let mut candidate = Zeroizing::new(vec![0u8; d.digest.0.len()]);
    pbkdf2_sha256(key, &d.salt.0, d.iterations, &mut candidate);
    candidate
        .iter()
        .zip(&d.digest.0)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
        && candidate.len() == d.digest.0.len()
}

/// Opens keyslot 0 with a secret; `read_at` reads the device. Returns the volume key.
pub fn unlock(
    header: &Header,
    secret: &[u8],
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<Zeroizing<Vec<u8>>, Luks2Error> {
    let ks = &header.metadata.keyslots.0["0"];
    let key_size = ks.key_size as usize;
    let dk = derive(&ks.kdf, secret, ks.area.key_size as usize)?;
    let mut material = Zeroizing::new(vec![0u8; af_material_len(key_size)]);
    read_at(ks.area.offset.0, &mut material).map_err(|e| Luks2Error::Io(e.to_string()))?;
    xts(&dk, &mut material, false);
    let key = af_merge(&material, key_size);
    if !verify_volume_key(header, &key) {
        return Err(Luks2Error::WrongSecret);
    }
    Ok(key)
}

/// What [`format`] needs to make a header.
pub struct FormatInput<'a> {
    pub policy: Policy,
    pub uuid: &'a str,
    pub secret: &'a [u8],
    pub volume_key: &'a [u8],
    /// The header label (at most 47 bytes): cvm-init marks setup progress with it.
    pub label: &'a str,
    /// Token 0 (a JSON object of a `cvm-*` type bound to keyslot 0), if the key source keeps
    /// one.
    pub token: Option<&'a str>,
    pub random: &'a mut dyn FnMut(&mut [u8]),
}

/// Builds the first `DATA_OFFSET` bytes of a formatted device (both headers and the keyslots
/// area, unused keyslot space filled with random bytes, as cryptsetup does).
pub fn format(input: FormatInput<'_>) -> Result<Zeroizing<Vec<u8>>, Luks2Error> {
    let FormatInput {
        policy,
        uuid,
        secret,
        volume_key,
        label,
        token,
        random,
    } = input;
    let tokens = token.map(|t| format!("\"0\":{t}")).unwrap_or_default();
    assert_eq!(volume_key.len(), policy.key_size(), "volume key size");
    if label.len() > 47 || label.bytes().any(|b| b == 0) {
        return Err(policy_err("label", label, "at most 47 bytes without NUL"));
    }
    if !is_uuid(uuid) {
        return Err(policy_err("uuid", uuid, "a lower-case 8-4-4-4-12 UUID"));
    }
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut kdf_salt = [0u8; 32];
    random(&mut kdf_salt);
    let mut digest_salt = [0u8; 32];
    random(&mut digest_salt);
    let key_size = policy.key_size();
    let area_size = (af_material_len(key_size) as u64).div_ceil(4096) * 4096;
    let kdf_json = match policy.kdf {
        KdfPolicy::Pbkdf2 { iterations } => {
            format!("{{\"type\":\"pbkdf2\",\"hash\":\"sha256\",\"iterations\":{iterations},\"salt\":\"{}\"}}", b64(&kdf_salt))
        }
        #[cfg(feature = "argon2")]
        KdfPolicy::Argon2id { time, memory_kib, cpus } => format!(
            "{{\"type\":\"argon2id\",\"time\":{time},\"memory\":{memory_kib},\"cpus\":{cpus},\"salt\":\"{}\"}}",
            b64(&kdf_salt)
        ),
    };
    let kdf: Kdf = serde_json::from_str(&kdf_json).expect("own KDF JSON");
    let dk = derive(&kdf, secret, XTS_KEY)?;
    let mut material = af_split(volume_key, random);
    xts(&dk, &mut material, true);
    let digest_iterations = 1000u32;
    let mut digest = [0u8; 32];
    pbkdf2_sha256(volume_key, &digest_salt, digest_iterations, &mut digest);
    let integrity = if policy.integrity {
        ",\"integrity\":{\"type\":\"hmac(sha256)\",\"journal_encryption\":\"none\",\"journal_integrity\":\"none\"}"
    } else {
        ""
    };
    let json = format!(
        "{{\"keyslots\":{{\"0\":{{\"type\":\"luks2\",\"key_size\":{key_size},\"af\":{{\"type\":\"luks1\",\"stripes\":4000,\"hash\":\"sha256\"}},\
\"area\":{{\"type\":\"raw\",\"offset\":\"{}\",\"size\":\"{area_size}\",\"encryption\":\"{CIPHER}\",\"key_size\":{XTS_KEY}}},\"kdf\":{kdf_json}}}}},\
\"tokens\":{{{tokens}}},\"segments\":{{\"0\":{{\"type\":\"crypt\",\"offset\":\"{DATA_OFFSET}\",\"size\":\"dynamic\",\"iv_tweak\":\"0\",\"encryption\":\"{CIPHER}\",\"sector_size\":{SECTOR_SIZE}{integrity}}}}},\
\"digests\":{{\"0\":{{\"type\":\"pbkdf2\",\"keyslots\":[\"0\"],\"segments\":[\"0\"],\"hash\":\"sha256\",\"iterations\":{digest_iterations},\"salt\":\"{}\",\"digest\":\"{}\"}}}},\
\"config\":{{\"json_size\":\"{JSON_SIZE}\",\"keyslots_size\":\"{KEYSLOTS_SIZE}\"}}}}",
        2 * HDR_SIZE,
        b64(&digest_salt),
        b64(&digest),
    );
    let mut out = Zeroizing::new(vec![0u8; DATA_OFFSET as usize]);
    // Unused keyslot space: random, so used and unused areas look alike.
    random(&mut out[(2 * HDR_SIZE) as usize..(2 * HDR_SIZE + KEYSLOTS_SIZE) as usize]);
    let area_at = (2 * HDR_SIZE) as usize;
    out[area_at..area_at + material.len()].copy_from_slice(&material);
    for (offset, magic) in [(0u64, MAGIC_PRIMARY), (HDR_SIZE, MAGIC_SECONDARY)] {
        let copy = &mut out[offset as usize..(offset + HDR_SIZE) as usize];
        copy[0..6].copy_from_slice(magic);
        copy[6..8].copy_from_slice(&[0, 2]);
        copy[8..16].copy_from_slice(&HDR_SIZE.to_be_bytes());
        copy[0x10..0x18].copy_from_slice(&1u64.to_be_bytes());
        copy[0x18..0x18 + label.len()].copy_from_slice(label.as_bytes());
        copy[0x48..0x4e].copy_from_slice(b"sha256");
        random(&mut copy[0x68..0xa8]);
        copy[0xa8..0xa8 + uuid.len()].copy_from_slice(uuid.as_bytes());
        copy[0x100..0x108].copy_from_slice(&offset.to_be_bytes());
        copy[4096..4096 + json.len()].copy_from_slice(json.as_bytes());
        let sum = checksum(copy);
        copy[0x1c0..0x1e0].copy_from_slice(&sum);
    }
    Ok(out)
}

/// Random bytes from the kernel.
pub fn kernel_random(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("/dev/urandom is readable");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn af_merge_vector() {
        // reference/luks2.md §5.2: stripes are SHA-512(be32(i)).
        let mut material = Vec::new();
        for i in 0..4000u32 {
            material.extend_from_slice(&sha2::Sha512::digest(i.to_be_bytes()));
        }
        assert_eq!(
            hex(&af_merge(&material, 64)),
            "4b09bebd337c2e9a62405b56e09c39698c033da9268d50c0172e5ef0d39695d10940e6148837422ec2fa3c6aa9b9416bc6e7069f9c4f265382b770d87627696c"
        );
        let mut d: Vec<u8> = (0u8..40).collect();
        diffuse(&mut d);
        assert_eq!(hex(&d[32..]), "9168dfa0b824fbae");
    }

    #[test]
    fn pbkdf2_vector() {
        let salt = base64::engine::general_purpose::STANDARD
            .decode("8JUGhvx/CDaMC4ULPmlwXcef8m7zvO4n6vCkQPxhEhI=")
            .unwrap();
        let mut out = [0u8; 64];
        pbkdf2_sha256(b"cvm-init test vector", &salt, 1000, &mut out);
        assert!(hex(&out).starts_with("586687dafee72b2ea5323cb2667d6323"));
    }

    #[test]
    fn split_then_merge_round_trips() {
        let key: Vec<u8> = (0..96).collect();
        let mut counter = 0u8;
        let material = af_split(&key, &mut |b: &mut [u8]| {
            for x in b {
                counter = counter.wrapping_add(7);
                *x = counter;
            }
        });
        assert_eq!(&af_merge(&material, 96)[..], &key[..]);
    }

    #[test]
    fn strict_scalars() {
        assert!(serde_json::from_str::<U64Str>("\"16384\"").is_ok());
        for bad in [
            "\"+1\"",
            "\" 1\"",
            "\"01\"",
            "\"\"",
            "\"18446744073709551616\"",
            "1",
        ] {
            assert!(serde_json::from_str::<U64Str>(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<B64>("\"AAEC\"").is_ok());
        assert!(serde_json::from_str::<B64>("\"AAE\"").is_err());
        let dup: Result<StrictMap<u32>, _> = serde_json::from_str("{\"0\":1,\"0\":2}");
        assert!(dup.unwrap_err().to_string().contains("duplicate key"));
    }

    /// The AES key schedule is wiped when a cipher drops (the `aes` crate's `zeroize`
    /// feature): its first two round keys are the key itself, and the keyslot and volume keys
    /// pass through it. A compile-time check: it does not build without the feature.
    #[test]
    fn aes_ciphers_wipe_their_key_schedule_on_drop() {
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>(_: &T) {}
        let cipher = Aes256::new_from_slice(&[7u8; 32]).unwrap();
        wiped_on_drop(&cipher);
    }

    /// A header whose sequence ID is already the largest cannot be relabelled: the increment
    /// overflowed (a panic in debug builds, a wrapped sequence ID in release).
    #[test]
    fn relabel_refuses_the_last_sequence_id() {
        let mut head = vec![0u8; 2 * HDR_SIZE as usize];
        for offset in [0, HDR_SIZE as usize] {
            head[offset + 0x10..offset + 0x18].copy_from_slice(&u64::MAX.to_be_bytes());
        }
        match relabel(&mut head, "cvm-state") {
            Err(Luks2Error::Policy { field, .. }) => assert_eq!(field, "seqid"),
            other => panic!("{other:?}"),
        }
    }

    /// A pbkdf2 header whose keyslot KDF is rewritten to `kdf` (both copies, valid checksums).
    #[cfg(not(feature = "argon2"))]
    fn header_with_keyslot_kdf(kdf: &str) -> Vec<u8> {
        let policy = Policy {
            integrity: false,
            kdf: KdfPolicy::Pbkdf2 { iterations: 1000 },
        };
        let mut head = format(FormatInput {
            policy,
            uuid: "11111111-2222-4333-8444-555555555555",
            secret: b"secret",
            volume_key: &[1u8; 64],
            label: "",
            token: None,
            random: &mut |b: &mut [u8]| b.fill(3),
        })
        .unwrap()[..2 * HDR_SIZE as usize]
            .to_vec();
        for offset in [0, HDR_SIZE as usize] {
            let copy = &mut head[offset..offset + HDR_SIZE as usize];
            let end = 4096 + copy[4096..].iter().position(|&b| b == 0).unwrap();
            let json = std::str::from_utf8(&copy[4096..end]).unwrap().replacen(
                "\"kdf\":{\"type\":\"pbkdf2\",\"hash\":\"sha256\",\"iterations\":1000,",
                &format!("\"kdf\":{kdf}"),
                1,
            );
            copy[4096..].fill(0);
            copy[4096..4096 + json.len()].copy_from_slice(json.as_bytes());
            let sum = checksum(copy);
            copy[0x1c0..0x1e0].copy_from_slice(&sum);
        }
        head
    }

    /// The production build carries no Argon2: a keyslot that needs it is refused by name
    /// before any policy comparison, and before any key derivation is attempted.
    #[cfg(not(feature = "argon2"))]
    #[test]
    fn argon2_keyslots_are_refused_by_name() {
        let pbkdf2 = Policy {
            integrity: false,
            kdf: KdfPolicy::Pbkdf2 { iterations: 1000 },
        };
        let control = header_with_keyslot_kdf(
            "{\"type\":\"pbkdf2\",\"hash\":\"sha256\",\"iterations\":1000,",
        );
        assert!(parse(&control, 1 << 30, &pbkdf2).is_ok());
        for kdf in ["argon2id", "argon2i"] {
            let head = header_with_keyslot_kdf(&format!(
                "{{\"type\":\"{kdf}\",\"time\":4,\"memory\":32,\"cpus\":1,"
            ));
            let err = parse(&head, 1 << 30, &pbkdf2).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("keyslot 0 uses {kdf}; this build opens only pbkdf2 keyslots")
            );
        }
    }

    proptest! {
        /// Arbitrary bytes (with and without a LUKS magic) never panic and are never accepted.
        #[test]
        fn arbitrary_headers_are_refused(mut bytes in proptest::collection::vec(any::<u8>(), 0..40000), magic in any::<bool>()) {
            if magic && bytes.len() >= 6 {
                bytes[..6].copy_from_slice(MAGIC_PRIMARY);
            }
            let policy = Policy { integrity: false, kdf: KdfPolicy::Pbkdf2 { iterations: 1000 } };
            prop_assert!(parse(&bytes, 1 << 30, &policy).is_err());
        }

        /// Arbitrary JSON text behind valid binary headers never panics.
        #[test]
        fn arbitrary_json_never_panics(json in "\\{[ -~]{0,300}") {
            let policy = Policy { integrity: false, kdf: KdfPolicy::Pbkdf2 { iterations: 1000 } };
            let mut dev = vec![0u8; 2 * HDR_SIZE as usize];
            for (offset, magic) in [(0usize, MAGIC_PRIMARY), (HDR_SIZE as usize, MAGIC_SECONDARY)] {
                let copy = &mut dev[offset..offset + HDR_SIZE as usize];
                copy[0..6].copy_from_slice(magic);
                copy[6..8].copy_from_slice(&[0, 2]);
                copy[8..16].copy_from_slice(&HDR_SIZE.to_be_bytes());
                copy[0x48..0x4e].copy_from_slice(b"sha256");
                copy[0xa8..0xa8 + 36].copy_from_slice(b"11111111-2222-4333-8444-555555555555");
                copy[0x100..0x108].copy_from_slice(&(offset as u64).to_be_bytes());
                copy[4096..4096 + json.len()].copy_from_slice(json.as_bytes());
                let sum = checksum(copy);
                copy[0x1c0..0x1e0].copy_from_slice(&sum);
            }
            let _ = parse(&dev, 1 << 30, &policy);
        }
    }
}
