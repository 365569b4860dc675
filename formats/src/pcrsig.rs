//! The signed PCR policy of a unified kernel image (its `.pcrsig` section, which systemd-stub
//! hands the initrd as `/.extra/tpm2-pcr-signature.json`), in systemd-measure's JSON shape:
//!
//! ```json
//! {"sha256":[{"pcrs":[11],"pkfp":"<hex>","pol":"<hex>","sig":"<base64>"}]}
//! ```
//!
//! One array per PCR bank, one entry per signed boot phase: `pcrs` the PCRs the PolicyPCR
//! covers, `pkfp` SHA-256 of the signing key as OpenSSL's `i2d_PublicKey` writes it (the
//! PKCS#1 RSAPublicKey DER, or the uncompressed EC point; not the SubjectPublicKeyInfo, as
//! checked against systemd-measure 254), `pol` the SHA-256
//! PolicyPCR digest that was signed, `sig` the signature over SHA-256(`pol`) (RSA PKCS#1 v1.5,
//! or a DER ECDSA signature). The node seals its disk with PolicyAuthorize to that key and
//! picks the entry whose `pol` matches its current PCRs.
//!
//! Parsed by hand over a raw JSON tree rather than with serde's derive: duplicate keys are
//! refused (serde_json keeps the last), and no message carries the file's text (serde's
//! type errors quote the offending string).

use std::fmt::Write as _;

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// The banks systemd-measure signs for; only `sha256` is used, the others are checked for
/// shape and skipped.
pub const KNOWN_BANKS: [&str; 4] = ["sha1", "sha256", "sha384", "sha512"];

/// The bank the node's policy reads.
pub const BANK: &str = "sha256";

/// The largest file accepted: a UKI section with a few phases' signatures is a few KiB.
pub const MAX_LEN: usize = 64 * 1024;

/// The most entries a bank may hold (systemd-measure writes one per boot phase).
pub const MAX_ENTRIES: usize = 64;

/// What the signature file is checked against.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    /// The PCR set every entry must cover, ascending.
    pub pcrs: &'a [u32],
    /// The trusted public key's fingerprint ([`key_fingerprint`]).
    pub pkfp: [u8; 32],
    /// The accepted signature lengths (the modulus size for RSA; 8 to 72 for DER P-256 ECDSA).
    pub sig_len: std::ops::RangeInclusive<usize>,
}

/// One signed policy of the sha256 bank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub pcrs: Vec<u32>,
    pub pkfp: [u8; 32],
    pub pol: [u8; 32],
    pub sig: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PcrSigError {
    #[error("the PCR signature is {0} bytes, more than the {MAX_LEN} accepted")]
    TooLong(usize),
    #[error("the PCR signature is not JSON: {0}")]
    Json(String),
    #[error("the PCR signature is not a JSON object of PCR banks")]
    NotObject,
    #[error("the PCR signature has the key {0:?} twice")]
    DuplicateKey(String),
    #[error("the PCR signature names the unknown PCR bank {0:?} (expected one of sha1, sha256, sha384, sha512)")]
    UnknownBank(String),
    #[error("the PCR signature has no signature for the sha256 bank (banks present: {0})")]
    NoSha256(String),
    #[error("the PCR signature's {0} bank is not an array of 1 to {MAX_ENTRIES} entries")]
    BadBank(String),
    #[error("the PCR signature's {bank} entry {index}: {what}")]
    Entry {
        bank: String,
        index: usize,
        what: EntryError,
    },
    #[error("the PCR signature's {bank} bank signs the policy {pol} twice")]
    DuplicatePolicy { bank: String, pol: String },
}

/// What is wrong with one entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryError {
    #[error("is not an object")]
    NotObject,
    #[error("has the field {0:?} twice")]
    DuplicateField(String),
    #[error("has the unknown field {0:?} (expected pcrs, pkfp, pol, sig)")]
    UnknownField(String),
    #[error("lacks the field {0:?}")]
    Missing(&'static str),
    #[error("\"pcrs\" is {found}, expected the PCRs {expected:?}")]
    Pcrs { found: String, expected: Vec<u32> },
    #[error("\"pkfp\" is not 64 lower-case hex digits")]
    PkfpFormat,
    #[error(
        "\"pkfp\" is {found}, the fingerprint of another key than the trusted one ({expected})"
    )]
    OtherKey { found: String, expected: String },
    #[error("\"pol\" is not 64 lower-case hex digits (a SHA-256 policy digest)")]
    PolFormat,
    #[error("\"sig\" is not base64")]
    SigFormat,
    #[error("\"sig\" is {found} bytes, expected {min} to {max} (truncated or another key type)")]
    SigLength {
        found: usize,
        min: usize,
        max: usize,
    },
}

/// systemd's `pkfp`: SHA-256 of the public key's `i2d_PublicKey` form (an RSA key's PKCS#1
/// RSAPublicKey DER, an EC key's uncompressed point).
pub fn key_fingerprint(public_key: &[u8]) -> [u8; 32] {
    Sha256::digest(public_key).into()
}

/// Parses a signature file strictly and returns its sha256 bank's entries, each checked
/// against `expect`.
pub fn parse(bytes: &[u8], expect: &Expect) -> Result<Vec<Entry>, PcrSigError> {
    if bytes.len() > MAX_LEN {
        return Err(PcrSigError::TooLong(bytes.len()));
    }
    let tree: Tree = serde_json::from_slice(bytes).map_err(|e| {
        let msg = e.to_string();
        PcrSigError::Json(crate::text::escape(&msg).into_owned())
    })?;
    let Tree::Obj(banks) = tree else {
        return Err(PcrSigError::NotObject);
    };
    let mut sha256 = None;
    let present: Vec<String> = banks.iter().map(|(n, _)| shown(n)).collect();
    for (name, value) in banks {
        if !KNOWN_BANKS.contains(&name.as_str()) {
            return Err(PcrSigError::UnknownBank(shown(&name)));
        }
        let entries = bank(&name, value, expect)?;
        if name == BANK {
            sha256 = Some(entries);
        }
    }
    sha256.ok_or_else(|| PcrSigError::NoSha256(present.join(", ")))
}

/// The entry that signs `policy`, if any.
pub fn find<'a>(entries: &'a [Entry], policy: &[u8; 32]) -> Option<&'a Entry> {
    entries.iter().find(|e| &e.pol == policy)
}

/// Writes entries as systemd-measure does (its short JSON form), under the sha256 bank.
pub fn write(entries: &[Entry]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = String::from("{\"sha256\":[");
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let pcrs: Vec<String> = e.pcrs.iter().map(u32::to_string).collect();
        let _ = write!(
            out,
            "{{\"pcrs\":[{}],\"pkfp\":\"{}\",\"pol\":\"{}\",\"sig\":\"{}\"}}",
            pcrs.join(","),
            crate::hex(&e.pkfp),
            crate::hex(&e.pol),
            b64.encode(&e.sig)
        );
    }
    out.push_str("]}\n");
    out
}

/// Host text as it may be shown: escaped and cut short.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    let mut out = crate::text::escape(&cut).into_owned();
    if cut.len() < s.len() {
        out.push('…');
    }
    out
}

fn bank(name: &str, value: Tree, expect: &Expect) -> Result<Vec<Entry>, PcrSigError> {
    let Tree::Arr(items) = value else {
        return Err(PcrSigError::BadBank(name.into()));
    };
    if items.is_empty() || items.len() > MAX_ENTRIES {
        return Err(PcrSigError::BadBank(name.into()));
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let e = entry(item, expect).map_err(|what| PcrSigError::Entry {
            bank: name.into(),
            index,
            what,
        })?;
        if entries.iter().any(|o| o.pol == e.pol) {
            return Err(PcrSigError::DuplicatePolicy {
                bank: name.into(),
                pol: crate::hex(&e.pol),
            });
        }
        entries.push(e);
    }
    Ok(entries)
}

fn entry(item: Tree, expect: &Expect) -> Result<Entry, EntryError> {
    let Tree::Obj(fields) = item else {
        return Err(EntryError::NotObject);
    };
    let (mut pcrs, mut pkfp, mut pol, mut sig) = (None, None, None, None);
    for (key, value) in fields {
        let slot = match key.as_str() {
            "pcrs" => &mut pcrs,
            "pkfp" => &mut pkfp,
            "pol" => &mut pol,
            "sig" => &mut sig,
            _ => return Err(EntryError::UnknownField(shown(&key))),
        };
        // Duplicates were refused by the tree; kept for clarity.
        if slot.replace(value).is_some() {
            return Err(EntryError::DuplicateField(shown(&key)));
        }
    }
    let pcrs = read_pcrs(pcrs.ok_or(EntryError::Missing("pcrs"))?, expect)?;
    let pkfp = match pkfp.ok_or(EntryError::Missing("pkfp"))? {
        Tree::Str(s) => hex32(&s).ok_or(EntryError::PkfpFormat)?,
        _ => return Err(EntryError::PkfpFormat),
    };
    if pkfp != expect.pkfp {
        return Err(EntryError::OtherKey {
            found: crate::hex(&pkfp),
            expected: crate::hex(&expect.pkfp),
        });
    }
    let pol = match pol.ok_or(EntryError::Missing("pol"))? {
        Tree::Str(s) => hex32(&s).ok_or(EntryError::PolFormat)?,
        _ => return Err(EntryError::PolFormat),
    };
    let sig = match sig.ok_or(EntryError::Missing("sig"))? {
        Tree::Str(s) => base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(|_| EntryError::SigFormat)?,
        _ => return Err(EntryError::SigFormat),
    };
    if !expect.sig_len.contains(&sig.len()) {
        return Err(EntryError::SigLength {
            found: sig.len(),
            min: *expect.sig_len.start(),
            max: *expect.sig_len.end(),
        });
    }
    Ok(Entry {
        pcrs,
        pkfp,
        pol,
        sig,
    })
}

fn read_pcrs(value: Tree, expect: &Expect) -> Result<Vec<u32>, EntryError> {
    let refuse = |found: String| EntryError::Pcrs {
        found,
        expected: expect.pcrs.to_vec(),
    };
    let Tree::Arr(items) = value else {
        return Err(refuse("not an array".into()));
    };
    let mut pcrs = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Tree::Num(n) if n.as_u64().is_some_and(|v| v < 24) => {
                pcrs.push(n.as_u64().unwrap() as u32)
            }
            _ => return Err(refuse("not an array of PCR numbers 0 to 23".into())),
        }
    }
    if pcrs != expect.pcrs {
        return Err(refuse(format!("{pcrs:?}")));
    }
    Ok(pcrs)
}

/// 64 lower-case hex digits (systemd writes lower case).
fn hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A JSON value whose objects keep their keys in order and refuse a key given twice.
enum Tree {
    Null,
    Bool,
    Num(serde_json::Number),
    Str(String),
    Arr(Vec<Tree>),
    Obj(Vec<(String, Tree)>),
}

impl<'de> serde::Deserialize<'de> for Tree {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TreeVisitor)
    }
}

struct TreeVisitor;

impl<'de> serde::de::Visitor<'de> for TreeVisitor {
    type Value = Tree;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Tree, E> {
        Ok(Tree::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Tree, E> {
        Ok(Tree::Bool)
    }
    fn visit_u64<E>(self, v: u64) -> Result<Tree, E> {
        Ok(Tree::Num(v.into()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Tree, E> {
        Ok(Tree::Num(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Tree, E> {
        // Not a PCR number; NaN cannot come out of JSON text.
        Ok(serde_json::Number::from_f64(v).map_or(Tree::Null, Tree::Num))
    }
    fn visit_str<E>(self, v: &str) -> Result<Tree, E> {
        Ok(Tree::Str(v.into()))
    }
    fn visit_string<E>(self, v: String) -> Result<Tree, E> {
        Ok(Tree::Str(v))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Tree, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Tree::Arr(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Tree, A::Error> {
        let mut fields: Vec<(String, Tree)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if fields.iter().any(|(k, _)| *k == key) {
                return Err(serde::de::Error::custom(format_args!(
                    "the key {:?} is given twice",
                    shown(&key)
                )));
            }
            let value = map.next_value()?;
            fields.push((key, value));
        }
        Ok(Tree::Obj(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FP: [u8; 32] = [7; 32];

    fn expect() -> Expect<'static> {
        Expect {
            pcrs: &[11],
            pkfp: FP,
            sig_len: 256..=256,
        }
    }

    fn entry(pol: u8) -> Entry {
        Entry {
            pcrs: vec![11],
            pkfp: FP,
            pol: [pol; 32],
            sig: vec![pol ^ 0x5a; 256],
        }
    }

    fn refused(text: &str) -> String {
        parse(text.as_bytes(), &expect()).unwrap_err().to_string()
    }

    fn one(fields: &str) -> String {
        format!("{{\"sha256\":[{{{fields}}}]}}")
    }

    fn good_fields() -> (String, String, String) {
        let b64 = base64::engine::general_purpose::STANDARD;
        (
            crate::hex(&FP),
            crate::hex(&[0xab; 32]),
            b64.encode([2u8; 256]),
        )
    }

    #[test]
    fn written_form_parses_back() {
        let entries = vec![entry(1), entry(2)];
        let text = write(&entries);
        assert!(text.starts_with("{\"sha256\":[{\"pcrs\":[11],\"pkfp\":\"0707"));
        assert_eq!(parse(text.as_bytes(), &expect()).unwrap(), entries);
        assert_eq!(find(&entries, &[2; 32]), Some(&entries[1]));
        assert_eq!(find(&entries, &[3; 32]), None);
    }

    #[test]
    fn other_known_banks_are_checked_and_skipped() {
        let (fp, pol, sig) = good_fields();
        let e = format!("{{\"pcrs\":[11],\"pkfp\":\"{fp}\",\"pol\":\"{pol}\",\"sig\":\"{sig}\"}}");
        let text = format!("{{\"sha1\":[{e}],\"sha256\":[{e}],\"sha384\":[{e}]}}");
        assert_eq!(parse(text.as_bytes(), &expect()).unwrap().len(), 1);
        let only_sha1 = format!("{{\"sha1\":[{e}]}}");
        assert_eq!(
            refused(&only_sha1),
            "the PCR signature has no signature for the sha256 bank (banks present: sha1)"
        );
    }

    #[test]
    fn malformed_files_are_refused_by_name() {
        let (fp, pol, sig) = good_fields();
        let ok = |k: &str, v: &str| {
            let mut f = [
                ("pcrs", "[11]".to_string()),
                ("pkfp", format!("\"{fp}\"")),
                ("pol", format!("\"{pol}\"")),
                ("sig", format!("\"{sig}\"")),
            ];
            for x in f.iter_mut() {
                if x.0 == k {
                    x.1 = v.to_string();
                }
            }
            one(&f
                .iter()
                .map(|(k, v)| format!("\"{k}\":{v}"))
                .collect::<Vec<_>>()
                .join(","))
        };
        assert!(refused("{\"sha256\":[").starts_with("the PCR signature is not JSON: "));
        assert_eq!(
            refused("[]"),
            "the PCR signature is not a JSON object of PCR banks"
        );
        assert_eq!(
            refused("{\"md5\":[]}"),
            "the PCR signature names the unknown PCR bank \"md5\" (expected one of sha1, sha256, sha384, sha512)"
        );
        assert!(refused("{\"sha256\":[],\"sha256\":[]}").contains("given twice"));
        assert_eq!(
            refused("{\"sha256\":[]}"),
            "the PCR signature's sha256 bank is not an array of 1 to 64 entries"
        );
        assert_eq!(
            refused(&ok("pcrs", "[11,15]")),
            "the PCR signature's sha256 entry 0: \"pcrs\" is [11, 15], expected the PCRs [11]"
        );
        assert!(refused(&ok("pcrs", "[\"11\"]")).contains("not an array of PCR numbers"));
        assert!(refused(&ok("pcrs", "[24]")).contains("not an array of PCR numbers"));
        let other = crate::hex(&[8; 32]);
        assert_eq!(
            refused(&ok("pkfp", &format!("\"{other}\""))),
            format!(
                "the PCR signature's sha256 entry 0: \"pkfp\" is {other}, the fingerprint of another key than the trusted one ({})",
                crate::hex(&FP)
            )
        );
        assert!(refused(&ok("pkfp", "\"0707\"")).contains("\"pkfp\" is not 64 lower-case hex"));
        assert!(refused(&ok("pol", &format!("\"{}\"", &pol[..62]))).contains("\"pol\" is not 64"));
        assert!(refused(&ok("pol", &format!("\"{pol}00\""))).contains("\"pol\" is not 64"));
        assert!(refused(&ok("pol", &format!("\"{}\"", pol.to_uppercase())))
            .contains("\"pol\" is not 64"));
        assert_eq!(
            refused(&ok("sig", &format!("\"{}\"", &sig[..sig.len() - 4]))),
            "the PCR signature's sha256 entry 0: \"sig\" is 255 bytes, expected 256 to 256 (truncated or another key type)"
        );
        assert!(refused(&ok("sig", "\"\"")).contains("\"sig\" is 0 bytes"));
        assert!(refused(&ok("sig", "\"!!\"")).contains("\"sig\" is not base64"));
        assert!(refused(&ok("sig", "7")).contains("\"sig\" is not base64"));
        assert!(refused(&one(&format!(
            "\"pcrs\":[11],\"pkfp\":\"{fp}\",\"pol\":\"{pol}\""
        )))
        .contains("lacks the field \"sig\""));
        assert!(refused(&one(&format!(
            "\"pcrs\":[11],\"pcrs\":[11],\"pkfp\":\"{fp}\",\"pol\":\"{pol}\",\"sig\":\"{sig}\""
        )))
        .contains("given twice"));
        assert_eq!(
            refused(&one(&format!(
                "\"pcrs\":[11],\"pkfp\":\"{fp}\",\"pol\":\"{pol}\",\"sig\":\"{sig}\",\"x\\u001b[2J\":1"
            ))),
            "the PCR signature's sha256 entry 0: has the unknown field \"x\\\\x1b[2J\" (expected pcrs, pkfp, pol, sig)"
        );
        let twice = write(&[entry(1), entry(1)]);
        assert_eq!(
            refused(&twice),
            format!(
                "the PCR signature's sha256 bank signs the policy {} twice",
                crate::hex(&[1; 32])
            )
        );
        assert!(refused(&"x".repeat(MAX_LEN + 1)).contains("more than the 65536 accepted"));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes, &expect());
        }

        #[test]
        fn written_entries_round_trip(pols in proptest::collection::btree_set(any::<[u8; 32]>(), 1..5),
                                      sig in proptest::collection::vec(any::<u8>(), 256)) {
            let entries: Vec<Entry> = pols.into_iter().map(|pol| Entry {
                pcrs: vec![11], pkfp: FP, pol, sig: sig.clone(),
            }).collect();
            prop_assert_eq!(parse(write(&entries).as_bytes(), &expect()).unwrap(), entries);
        }

        /// Any one byte of a valid file changed: refused, or (where the change keeps it valid
        /// for this key, as in the signature's bytes) parsed to entries that differ.
        #[test]
        fn one_changed_byte_is_never_read_as_the_original(at in 0usize..500, to in any::<u8>()) {
            let entries = vec![entry(1)];
            let text = write(&entries);
            let mut bytes = text.into_bytes();
            let at = at % bytes.len();
            prop_assume!(bytes[at] != to);
            let original = bytes[at];
            bytes[at] = to;
            // Whitespace between tokens does not change the content.
            let harmless = original.is_ascii_whitespace() && to.is_ascii_whitespace()
                || at == bytes.len() - 1 && to.is_ascii_whitespace();
            if let Ok(parsed) = parse(&bytes, &expect()) {
                prop_assert!(harmless || parsed != entries);
            }
        }
    }
}
