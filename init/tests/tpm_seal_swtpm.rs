//! Sealing to PCRs against a real TPM 2.0 implementation: swtpm (installed by `make deps`)
//! on loopback TCP, driven by the init's own TPM code.

use cvm_formats::registers::Bank;
use cvm_init::tee::seal::{seal, unseal};
use cvm_init::tee::tpm::{Tpm, TpmError};

mod common;
use common::{connect, start_swtpm};

#[test]
fn sealed_to_pcrs_unseals_until_a_pcr_moves() {
    let swtpm = start_swtpm(0);
    let mut tpm = Tpm::new(connect(swtpm.port)).expect("TPM banks");
    assert!(tpm.banks.contains(&Bank::Sha256), "banks {:?}", tpm.banks);
    tpm.extend(11, |b| b.hash(b"enter-initrd")).unwrap();
    let pcrs = [11u32, 15];
    let values = tpm.read_bank(Bank::Sha256, &pcrs).unwrap();
    drop(tpm);

    let secret = b"a 32-byte state disk unlock key!";
    let mut t = connect(swtpm.port);
    let blob = seal(&mut t, secret, &pcrs, &values).expect("seal");
    assert_eq!(&unseal(&mut t, &blob).expect("unseal")[..], secret);
    // Again: sealing leaves nothing behind that breaks a second unseal.
    assert_eq!(&unseal(&mut t, &blob).expect("unseal twice")[..], secret);

    // The identity PCR moves (another image, a seal barrier): unsealing is refused.
    let mut tpm = Tpm::new(t).unwrap();
    tpm.extend(15, |b| b.hash(b"cvm-init:v1:seal-barrier:"))
        .unwrap();
    drop(tpm);
    let mut t = connect(swtpm.port);
    match unseal(&mut t, &blob) {
        Err(TpmError::Response { code, .. }) => {
            // TPM_RC_POLICY_FAIL (0x99d) for session 1, or TPM_RC_VALUE on some versions.
            assert!(
                code & 0x3f == 0x1d || code & 0xfff == 0x99d,
                "unexpected code {code:#x}"
            );
        }
        other => panic!("unseal after a PCR change: {other:?}"),
    }
}

#[test]
fn tpm_key_source_round_trip_through_a_luks2_header() {
    use cvm_init::disk::luks2::{self, FormatInput, KdfPolicy, Policy};
    use cvm_init::keys::{KeySource, TpmSealed};

    let swtpm = start_swtpm(1);
    let port = swtpm.port;
    let pcrs = vec![11u32, 15];
    let mut tpm = Tpm::new(connect(port)).unwrap();
    let values = tpm.read_bank(Bank::Sha256, &pcrs).unwrap();
    drop(tpm);
    let mut source = TpmSealed {
        transport: connect(port),
        pcrs: pcrs.clone(),
        values,
    };
    let provisioned = source.provision().unwrap();
    let policy = Policy {
        integrity: false,
        kdf: KdfPolicy::Pbkdf2 { iterations: 1000 },
    };
    let volume_key = [5u8; 64];
    let head = luks2::format(FormatInput {
        policy,
        uuid: "11111111-2222-4333-8444-555555555555",
        secret: &provisioned.secret,
        volume_key: &volume_key,
        label: "cvm-state",
        token: provisioned.token.as_deref(),
        random: &mut luks2::kernel_random,
    })
    .unwrap();
    let header = luks2::parse(&head[..2 * luks2::HDR_SIZE as usize], 64 << 20, &policy)
        .expect("our header with a token");
    let token = header.metadata.tokens.0.get("0");
    let secret = source.recover(token).expect("unseal through the token");
    let key = luks2::unlock(&header, &secret, &mut |offset, buf| {
        buf.copy_from_slice(&head[offset as usize..offset as usize + buf.len()]);
        Ok(())
    })
    .unwrap();
    assert_eq!(&key[..], &volume_key[..]);

    // A configuration that seals to other PCRs does not trust the token's list.
    let mut other = TpmSealed {
        transport: connect(port),
        pcrs: vec![11],
        values: vec![vec![0; 32]],
    };
    let err = other.recover(token).err().unwrap();
    assert!(
        err.to_string().contains("the configuration seals to [11]"),
        "{err}"
    );
}

/// vTPM evidence: a quote by the attestation key, verified on the broker's side, binds the
/// qualifying data and the PCR values; the key is the same on every boot of the same TPM.
#[test]
fn a_quote_binds_its_nonce_and_pcr_values() {
    use cvm_init::tee::quote::quote;
    use cvm_measure::tpm::quote::{verify, QuoteError};

    let swtpm = start_swtpm(2);
    let mut tpm = Tpm::new(connect(swtpm.port)).unwrap();
    tpm.extend(11, |b| b.hash(b"enter-initrd")).unwrap();
    let pcrs = [11u32, 15];
    let values = tpm.read_bank(Bank::Sha256, &pcrs).unwrap();
    drop(tpm);
    let binding = [0x5au8; 48];
    let mut t = connect(swtpm.port);
    let q = quote(&mut t, &binding, &pcrs).expect("quote");
    let key = (q.ak_x.as_slice(), q.ak_y.as_slice());
    let attest = verify(&q.attest, &q.r, &q.s, key, &binding, &pcrs, &values).expect("verifies");
    assert_eq!(attest.pcrs, pcrs);

    // Another session's binding (a replayed quote), other PCR values, an altered byte.
    assert_eq!(
        verify(&q.attest, &q.r, &q.s, key, &[0u8; 48], &pcrs, &values),
        Err(QuoteError::Binding)
    );
    let mut moved = values.clone();
    moved[1][0] ^= 1;
    assert_eq!(
        verify(&q.attest, &q.r, &q.s, key, &binding, &pcrs, &moved),
        Err(QuoteError::PcrDigest)
    );
    for at in 0..q.attest.len() {
        let mut altered = q.attest.clone();
        altered[at] ^= 0x01;
        assert!(
            verify(&altered, &q.r, &q.s, key, &binding, &pcrs, &values).is_err(),
            "byte {at} altered"
        );
    }
    // The attestation key is deterministic: a second quote has the same key.
    let again = quote(&mut t, &binding, &pcrs).unwrap();
    assert_eq!((again.ak_x, again.ak_y), (q.ak_x, q.ak_y));
}
