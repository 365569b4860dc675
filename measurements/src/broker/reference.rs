//! The parts of the broker's reference values (`kbs-serve --reference`) beyond the measured
//! registers: what an SNP guest's policy and TCB and a TDX guest's attributes and quoting
//! enclave must be. Unknown members of these objects are refused, so that a misspelt
//! requirement is not silently dropped.

use serde_json::Value;

use crate::snp::{MinimumTcb, Requirements, Tcb};
use crate::tdx::{QeIdentity, TdRequirements};

fn object<'a>(
    json: &'a Value,
    name: &str,
    known: &[&str],
) -> Result<Option<&'a serde_json::Map<String, Value>>, String> {
    let Some(value) = json.get(name) else {
        return Ok(None);
    };
    let map = value
        .as_object()
        .ok_or(format!("{name}: expected an object"))?;
    if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!(
            "{name}: unknown member {unknown:?} (expected {})",
            known.join(", ")
        ));
    }
    Ok(Some(map))
}

fn number(
    map: &serde_json::Map<String, Value>,
    owner: &str,
    name: &str,
    max: u64,
) -> Result<Option<u64>, String> {
    map.get(name)
        .map(|v| {
            v.as_u64()
                .filter(|n| *n <= max)
                .ok_or(format!("{owner}.{name}: expected a number from 0 to {max}"))
        })
        .transpose()
}

fn flag(
    map: &serde_json::Map<String, Value>,
    owner: &str,
    name: &str,
) -> Result<Option<bool>, String> {
    map.get(name)
        .map(|v| {
            v.as_bool()
                .ok_or(format!("{owner}.{name}: expected true or false"))
        })
        .transpose()
}

/// `snp_min_tcb` (`{"bootloader": N, "tee": N, "snp": N, "microcode": N}` or `"waived"`) and
/// `snp_policy_required` (`allow_debug`, `allow_migration_agent`, `allow_smt`, `min_abi_major`,
/// `min_abi_minor`); what is not named keeps `Requirements::default()`.
pub fn snp_requirements(json: &Value) -> Result<Requirements, String> {
    let mut required = Requirements::default();
    match json.get("snp_min_tcb") {
        None => {}
        Some(Value::String(s)) if s == "waived" => required.min_tcb = MinimumTcb::Waived,
        Some(_) => {
            let parts = ["bootloader", "tee", "snp", "microcode"];
            let map = object(json, "snp_min_tcb", &parts)?.expect("present");
            let mut values = [0u8; 4];
            for (value, part) in values.iter_mut().zip(parts) {
                *value = number(map, "snp_min_tcb", part, 255)?.ok_or(format!(
                    "snp_min_tcb: no {part} (all of bootloader, tee, snp, microcode are needed, or \"waived\")"
                ))? as u8;
            }
            let [bootloader, tee, snp, microcode] = values;
            required.min_tcb = MinimumTcb::At(Tcb {
                bootloader,
                tee,
                snp,
                microcode,
            });
        }
    }
    let known = [
        "allow_debug",
        "allow_migration_agent",
        "allow_smt",
        "min_abi_major",
        "min_abi_minor",
    ];
    if let Some(map) = object(json, "snp_policy_required", &known)? {
        let owner = "snp_policy_required";
        required.allow_debug = flag(map, owner, "allow_debug")?.unwrap_or(false);
        required.allow_migration_agent =
            flag(map, owner, "allow_migration_agent")?.unwrap_or(false);
        required.allow_smt = flag(map, owner, "allow_smt")?.unwrap_or(true);
        required.min_abi = (
            number(map, owner, "min_abi_major", 255)?.unwrap_or(0) as u8,
            number(map, owner, "min_abi_minor", 255)?.unwrap_or(0) as u8,
        );
    }
    Ok(required)
}

fn hex_value<const N: usize>(json: &Value, name: &str) -> Result<Option<[u8; N]>, String> {
    json.get(name)
        .map(|v| {
            v.as_str()
                .and_then(cvm_formats::verity::parse_hex)
                .and_then(|b| <[u8; N]>::try_from(b).ok())
                .ok_or(format!("{name}: expected {} hex digits", 2 * N))
        })
        .transpose()
}

/// `tdx_td_attributes`, `tdx_xfam` (16 hex digits, the little-endian value as the quote
/// holds it printed as a number, e.g. "0x10000000"), `tdx_mrconfigid`, `tdx_mrowner`,
/// `tdx_mrownerconfig` (96 hex digits), `tdx_qe_min_isvsvn` (a number).
pub fn tdx_requirements(json: &Value) -> Result<(TdRequirements, QeIdentity), String> {
    let u64_value = |name: &str| -> Result<Option<u64>, String> {
        json.get(name)
            .map(|v| {
                v.as_str()
                    .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
                    .ok_or(format!(
                        "{name}: expected a hexadecimal number such as \"0x10000000\""
                    ))
            })
            .transpose()
    };
    let td = TdRequirements {
        td_attributes: u64_value("tdx_td_attributes")?,
        xfam: u64_value("tdx_xfam")?,
        mrconfigid: hex_value::<48>(json, "tdx_mrconfigid")?,
        mrowner: hex_value::<48>(json, "tdx_mrowner")?,
        mrownerconfig: hex_value::<48>(json, "tdx_mrownerconfig")?,
    };
    let mut qe = QeIdentity::default();
    if let Some(v) = json.get("tdx_qe_min_isvsvn") {
        qe.min_isvsvn = v
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .ok_or("tdx_qe_min_isvsvn: expected a number from 0 to 65535")?;
    }
    Ok((td, qe))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn snp_requirements_default_closed_and_misspellings_are_refused() {
        let r = snp_requirements(&json!({})).unwrap();
        assert_eq!(r, Requirements::default());
        assert_eq!(r.min_tcb, MinimumTcb::Missing);
        assert!(!r.allow_debug && !r.allow_migration_agent);
        let r = snp_requirements(&json!({"snp_min_tcb": "waived"})).unwrap();
        assert_eq!(r.min_tcb, MinimumTcb::Waived);
        let r = snp_requirements(&json!({
            "snp_min_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
            "snp_policy_required": {"allow_smt": false, "min_abi_major": 1, "min_abi_minor": 51},
        }))
        .unwrap();
        assert_eq!(
            r.min_tcb,
            MinimumTcb::At(Tcb {
                bootloader: 3,
                tee: 0,
                snp: 8,
                microcode: 115
            })
        );
        assert_eq!((r.allow_smt, r.min_abi), (false, (1, 51)));
        for (bad, why) in [
            (json!({"snp_min_tcb": {"bootloader": 3}}), "no tee"),
            (json!({"snp_min_tcb": "none"}), "expected an object"),
            (
                json!({"snp_min_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 300}}),
                "microcode",
            ),
            (
                json!({"snp_policy_required": {"allow_debugging": true}}),
                "unknown member \"allow_debugging\"",
            ),
            (
                json!({"snp_policy_required": {"allow_debug": 1}}),
                "allow_debug",
            ),
        ] {
            let got = snp_requirements(&bad).unwrap_err();
            assert!(got.contains(why), "{bad}: {got}");
        }
    }

    #[test]
    fn tdx_requirements_read_what_is_named() {
        let (td, qe) = tdx_requirements(&json!({})).unwrap();
        assert_eq!(td, TdRequirements::default());
        assert_eq!(qe, QeIdentity::default());
        let (td, qe) = tdx_requirements(&json!({
            "tdx_xfam": "0x600e7",
            "tdx_mrowner": "11".repeat(48),
            "tdx_qe_min_isvsvn": 7,
        }))
        .unwrap();
        assert_eq!(td.xfam, Some(0x600e7));
        assert_eq!(td.mrowner, Some([0x11; 48]));
        assert_eq!(qe.min_isvsvn, 7);
        assert!(tdx_requirements(&json!({"tdx_mrconfigid": "11"}))
            .unwrap_err()
            .contains("tdx_mrconfigid"));
    }
}
