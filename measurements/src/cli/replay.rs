//! `cvm-measure replay`: the registers a log produces, or its events.

use std::path::PathBuf;

use cvm_formats::registers::Bank;

use super::output::{print_registers, Shown};
use super::{read, usage, work, Failure};

/// The registers a log produces: systemd's JSON-seq tpm2-measure.log, a TCG binary log
/// (PCRs), or with --ccel a TDX CC event log (RTMRs)
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The event log
    log: PathBuf,
    /// The log is a TDX CC event log (CCEL): replay the RTMRs
    #[arg(long)]
    ccel: bool,
    /// Print JSON
    #[arg(long)]
    json: bool,
    /// List a binary log's events instead (register, type, digest, printable data)
    #[arg(long)]
    events: bool,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let bytes = read(&args.log, "the log")?;
    let path = args.log.display();
    let in_log = |e: &dyn std::fmt::Display| work(format!("{path}: {e}"));
    let json = args.json;
    let shown = |pcrs: &[usize], rtmrs: bool, regs: &cvm_formats::registers::Registers| {
        print_registers(
            regs,
            &Shown {
                pcrs,
                banks: &Bank::ALL,
                json,
                rtmrs,
                extra: &[],
            },
        )
    };
    if args.events {
        if bytes.first() == Some(&0x1e) {
            return Err(usage(
                "replay --events lists the events of a TCG binary log or a CCEL",
            ));
        }
        let log = cvm_measure::uefi::tcglog::parse(&bytes).map_err(|e| in_log(&e))?;
        print_events(&log, args.ccel, json);
        return Ok(());
    }
    if args.ccel {
        let log = cvm_measure::uefi::tcglog::parse(&bytes).map_err(|e| in_log(&e))?;
        let regs = log.replay_ccel().map_err(|e| in_log(&e))?;
        shown(&[], true, &regs);
    } else if bytes.first() == Some(&0x1e) {
        let records = cvm_formats::jsonseq::parse(&bytes).map_err(|e| in_log(&e))?;
        let regs = cvm_formats::jsonseq::replay(&records);
        let mut pcrs: Vec<usize> = records.iter().map(|r| r.pcr as usize).collect();
        pcrs.sort();
        pcrs.dedup();
        shown(&pcrs, true, &regs);
    } else {
        let log = cvm_measure::uefi::tcglog::parse(&bytes).map_err(|e| in_log(&e))?;
        let regs = log.replay_tpm().map_err(|e| in_log(&e))?;
        let mut pcrs: Vec<usize> = log
            .events
            .iter()
            .filter(|e| e.event_type != cvm_measure::uefi::tcglog::EV_NO_ACTION)
            .map(|e| e.index as usize)
            .collect();
        pcrs.sort();
        pcrs.dedup();
        shown(&pcrs, false, &regs);
    }
    Ok(())
}

/// `replay --events`: one line (or JSON object) per event, in log order.
fn print_events(log: &cvm_measure::uefi::tcglog::EventLog, ccel: bool, json: bool) {
    use cvm_measure::uefi::tcglog::event_type_name;
    let register = |index: u32| match (ccel, index) {
        (true, 0) => "MRTD".to_string(),
        (true, 1..=4) => format!("RTMR{}", index - 1),
        (true, _) => format!("MR{index}"),
        (false, _) => format!("PCR{index}"),
    };
    // Event data came from the firmware: only printable ASCII is shown.
    let printable = |data: &[u8]| -> String {
        data.iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            })
            .take(64)
            .collect()
    };
    let mut rows = Vec::new();
    for e in &log.events {
        if json {
            let digests: serde_json::Map<String, serde_json::Value> = e
                .digests
                .iter()
                .map(|(id, d)| (format!("{id:#06x}"), serde_json::json!(cvm_formats::hex(d))))
                .collect();
            rows.push(serde_json::json!({
                "register": register(e.index),
                "type": event_type_name(e.event_type),
                "type_value": e.event_type,
                "digests": digests,
                "data": cvm_formats::hex(&e.data),
            }));
        } else {
            let first = e
                .digests
                .first()
                .map(|(_, d)| cvm_formats::hex(d))
                .unwrap_or_default();
            println!(
                "{:<6} {:<34} {} {:?}",
                register(e.index),
                event_type_name(e.event_type),
                first,
                printable(&e.data)
            );
        }
    }
    if json {
        super::print_json(&serde_json::Value::Array(rows));
    }
}
