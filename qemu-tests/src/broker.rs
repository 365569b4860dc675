//! The reference key broker for test and demo guests: reference values predicted for an
//! image, a node's attestation key read from its swtpm state before the first boot, and a
//! broker thread on the host's loopback (which QEMU's user network shows at 10.0.2.2).

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;

use cvm_measure::kbs_broker::{serve, Broker, Reference};
use cvm_measure::predict::{predict_key_release, Inputs};
use cvm_measure::registers::Bank;

use crate::guest::BASE_CMDLINE;
use crate::TestImage;

/// The PCRs the `kbs` key source quotes.
pub const QUOTED_PCRS: [u32; 2] = [11, 15];

/// The registers a node booted from `image` with `config` has when it asks for its key.
pub fn key_release_reference(image: &TestImage, config: &str) -> Reference {
    let cmdline = format!("{BASE_CMDLINE} {}", image.roothash_option());
    let registers = predict_key_release(&Inputs {
        cmdline: cmdline.into_bytes(),
        root_hash: image.root.tree.root_hash,
        config_file: Some(config.as_bytes().to_vec()),
        ..Default::default()
    });
    Reference {
        pcrs: QUOTED_PCRS
            .iter()
            .map(|&p| (p, registers.pcr(Bank::Sha256, p as usize).to_vec()))
            .collect(),
        ..Default::default()
    }
}

/// Reads the attestation key of the vTPM whose state is in `dir` (creating the TPM if the
/// directory is empty), as an operator registers a node before its first boot.
pub fn attestation_key(dir: &Path) -> Result<(Vec<u8>, Vec<u8>), String> {
    let port = {
        let probe = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        probe.local_addr().map_err(|e| e.to_string())?.port()
    };
    let mut swtpm = cvm_init::tee::tpm::spawn_swtpm(dir, port)
        .map_err(|e| format!("cannot start swtpm: {e}"))?;
    let result = cvm_init::tee::tpm::TcpTransport::connect(port)
        .map_err(|e| format!("swtpm did not listen: {e}"))
        .and_then(|mut t| {
            cvm_init::tee::quote::quote(&mut t, &[0; 64], &QUOTED_PCRS)
                .map_err(|e| crate::chain(&e))
        });
    // SIGTERM: swtpm writes its state out before it exits.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(swtpm.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = swtpm.wait();
    let quote = result?;
    Ok((quote.ak_x, quote.ak_y))
}

/// Starts a broker for `reference` on `listener`, with the state-disk secret `secret` as
/// resource `cvm/state-disk/key` under `resources`.
pub fn start(
    listener: TcpListener,
    resources: &Path,
    reference: Reference,
    secret: &[u8],
) -> Arc<Broker> {
    let dir = resources.join("cvm/state-disk");
    std::fs::create_dir_all(&dir).expect("the broker's resource directory");
    std::fs::write(dir.join("key"), secret).expect("the broker's resource");
    let broker = Arc::new(Broker::new(resources.to_path_buf(), reference));
    let serving = broker.clone();
    std::thread::spawn(move || serve(listener, serving));
    broker
}
