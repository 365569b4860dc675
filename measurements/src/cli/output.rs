//! Registers as text (`pcr11 sha256 …`) or JSON, shared by `predict` and `replay`.

use cvm_formats::hex;
use cvm_formats::registers::{Bank, Registers};

/// What to print of a register bank.
pub struct Shown<'a> {
    pub pcrs: &'a [usize],
    pub banks: &'a [Bank],
    pub json: bool,
    pub rtmrs: bool,
    /// Extra named values (JSON fields, or `name value` lines before the registers).
    pub extra: &'a [(&'a str, String)],
}

pub fn print_registers(regs: &Registers, shown: &Shown) {
    if shown.json {
        let mut pcr_map = serde_json::Map::new();
        for &p in shown.pcrs {
            let banks: serde_json::Map<String, serde_json::Value> = shown
                .banks
                .iter()
                .map(|&b| (b.name().to_string(), serde_json::json!(hex(regs.pcr(b, p)))))
                .collect();
            pcr_map.insert(p.to_string(), serde_json::Value::Object(banks));
        }
        let mut value = serde_json::json!({ "pcr": pcr_map });
        if shown.rtmrs {
            value["rtmr"] = serde_json::json!((0..4)
                .map(|i| (i.to_string(), serde_json::json!(hex(&regs.rtmr[i]))))
                .collect::<serde_json::Map<_, _>>());
        }
        for (name, v) in shown.extra {
            value[*name] = serde_json::json!(v);
        }
        super::print_json(&value);
        return;
    }
    for (name, v) in shown.extra {
        println!("{name} {v}");
    }
    for &p in shown.pcrs {
        for &bank in shown.banks {
            println!("pcr{p:<2} {:<6} {}", bank.name(), hex(regs.pcr(bank, p)));
        }
    }
    if shown.rtmrs {
        for (i, r) in regs.rtmr.iter().enumerate() {
            println!("rtmr{i:<2}sha384 {}", hex(r));
        }
    }
}
