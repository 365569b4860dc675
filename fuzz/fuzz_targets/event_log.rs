//! Event logs: TCG crypto-agile binary logs and CCELs (with their replays), and systemd's
//! JSON-seq measurement log.
#![no_main]

use cvm_formats::jsonseq;
use cvm_measure::uefi::tcglog;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(log) = tcglog::parse(data) {
        let _ = log.replay_tpm();
        let _ = log.replay_ccel();
    }
    if let Ok(records) = jsonseq::parse(data) {
        let _ = jsonseq::replay(&records);
    }
});
