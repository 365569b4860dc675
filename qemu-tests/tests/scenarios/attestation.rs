//! The `kbs` key source end to end in QEMU with swtpm: the node reaches the reference key
//! broker (running in this test, on the host's loopback, forwarded to the guest at 10.0.2.100
//! on a restricted user network whose DHCP server configures the node),
//! proves itself with a vTPM quote over the PCRs `predict --at key-release` computes, and
//! opens its state disk with the released secret; another image is refused and never opens it.

use std::net::TcpListener;

use qemu_tests::broker;
use qemu_tests::support::{blank_state_disk, must, power_down, prepare, prepare_with_files, BOOT};

fn config(port: u16) -> String {
    format!(
        r#"
[network]

[kbs]
url = "http://10.0.2.100:{port}"
resource = "cvm/state-disk/key"
plain_http = true

[state]
serial = "cvm-state"
key = "kbs"
binds = ["/var/lib/kubelet"]

[[service]]
name = "app"
path = "/bin/payload"
args = ["state-probe"]
"#
    )
}

/// The attestation key the node prints while it asks (an operator registers it).
fn printed_key(log: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let hex = log
        .lines()
        .find_map(|l| l.split("vTPM attestation key is ").nth(1))?
        .split_whitespace()
        .next()?;
    let bytes = cvm_formats::verity::parse_hex(hex)?;
    (bytes.len() == 64).then(|| (bytes[..32].to_vec(), bytes[32..].to_vec()))
}

#[test]
fn the_node_gets_its_disk_key_from_the_broker_and_another_image_does_not() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = config(port);
    let prepared = prepare(Some(&config));
    let resources = tempfile::tempdir().unwrap();
    let secret = qemu_tests::pseudo_random_bytes(32, 0x2545f4914f6cdd1d);
    let work = tempfile::tempdir().unwrap();
    let disk = blank_state_disk(work.path());
    let tpm = work.path().join("tpm");
    // The node's vTPM carries an EK certificate from a test CA the broker is configured with;
    // the broker's allow-list names another key at first.
    let mut reference = broker::key_release_reference(&prepared.image, &config);
    reference.ek_cas = broker::certified_tpm(&tpm, &work.path().join("ek-ca")).unwrap();
    reference.attestation_keys = vec![(vec![1; 32], vec![2; 32])];
    let broker = broker::start(listener, resources.path(), reference, &secret);

    // b. A node the allow-list does not name: refused (after its endorsement was checked), and
    // it says so and retries; once the operator has listed its attestation key, the key is
    // released and the node boots to ready.
    let mut guest = prepared.boot("kbs-node", "", |g| {
        g.state_disk(&disk, "cvm-state")
            .tpm_state(&tpm)
            .forward(port, port)
    });
    must(guest.wait_for("is not one this broker trusts", BOOT));
    assert!(guest
        .serial_log()
        .contains("credential activated with the vTPM's endorsement key"));
    let (x, y) = printed_key(&guest.serial_log()).expect("the node printed its key");
    broker.allow_attestation_key(x, y);
    must(guest.wait_for("kbs: cvm/state-disk/key released", BOOT));
    must(guest.wait_for("app: payload: marker written", BOOT));
    must(guest.wait_for("cvm-init: ready", BOOT));
    let log = guest.serial_log();
    assert!(log.contains("formatted on this boot"));
    for line in log
        .lines()
        .filter(|l| l.contains("kbs") || l.contains("network"))
    {
        eprintln!("{line}");
    }
    power_down(&mut guest);
    drop(guest);
    assert!(std::fs::read(&disk).unwrap().starts_with(b"LUKS\xba\xbe"));

    // The next boot of the same image gets the same secret and opens the disk.
    let mut guest = prepared.boot("kbs-node-again", "", |g| {
        g.state_disk(&disk, "cvm-state")
            .tpm_state(&tpm)
            .forward(port, port)
    });
    must(guest.wait_for(
        "app: payload: marker found plaintext-marker-7f3a9c21e5",
        BOOT,
    ));
    assert!(guest.serial_log().contains("(attempt 1)"));
    power_down(&mut guest);
    drop(guest);

    // c. Another image (its configuration differs): the broker refuses its evidence, the node
    // says why, never opens the disk, and the disk is unchanged.
    let other_config = format!("{config}# another image\n");
    let other = prepare(Some(&other_config));
    let before = std::fs::read(&disk).unwrap();
    let mut guest = other.boot("kbs-other-image", "", |g| {
        g.state_disk(&disk, "cvm-state")
            .tpm_state(&tpm)
            .forward(port, port)
    });
    must(guest.wait_for("the quoted PCR digest does not match", BOOT));
    must(guest.wait_for_count("the quoted PCR digest does not match", 2, BOOT));
    let log = guest.serial_log();
    assert!(!log.contains("app: payload:"), "the workload ran");
    assert!(!log.contains("opened LUKS2"), "the disk was opened");
    drop(guest);
    assert!(std::fs::read(&disk).unwrap() == before, "the disk changed");
}

/// f. SNP-format evidence end to end, over TLS: the test build's emulated configfs-tsm provider
/// signs reports with a test VCEK (chained to a test ASK/ARK that only this broker trusts); the
/// node reaches the broker by https trusting only the CA its configuration pins, asks with
/// `snp` evidence in Trustee's shape, is refused while its launch digest is not a reference
/// value, then gets its disk key and a second resource written to a tmpfs file.
#[test]
fn snp_format_evidence_from_an_emulated_provider_releases_the_key() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = config(port)
        .replace(
            r#"args = ["state-probe"]"#,
            r#"args = ["file-probe", "/run/kubelet/bootstrap-kubeconfig"]"#,
        )
        .replace("http://", "https://")
        .replace(
            "plain_http = true\n",
            "ca = \"/etc/cvm/kbs-ca.pem\"\n\n[[kbs.file]]\nresource = \"cvm/kubelet/bootstrap\"\npath = \"/run/kubelet/bootstrap-kubeconfig\"\n",
        );
    let keys = tempfile::tempdir().unwrap();
    let (ca, tls_chain, tls_key) =
        broker::tls_test_pki(keys.path(), qemu_tests::guest::FORWARD_ADDRESS);
    let chain = broker::snp_test_chain(keys.path());
    let measurement = [0x5au8; 48];
    let mut files = broker::snp_emulator_files(&chain, &measurement);
    files.push(("etc/cvm/kbs-ca.pem", ca));
    let prepared = prepare_with_files(&config, &files);
    let resources = tempfile::tempdir().unwrap();
    let bootstrap = resources.path().join("cvm/kubelet");
    std::fs::create_dir_all(&bootstrap).unwrap();
    std::fs::write(bootstrap.join("bootstrap"), "kubeconfig-for-test-3c1d").unwrap();
    let broker = broker::start_with(
        listener,
        resources.path(),
        broker::snp_emulated_reference(&chain, Vec::new()),
        &qemu_tests::pseudo_random_bytes(32, 0x9e3779b97f4a7c15),
        Some(cvm_kbs::tls::server_config(&tls_chain, &tls_key).unwrap()),
    );
    let work = tempfile::tempdir().unwrap();
    let disk = blank_state_disk(work.path());
    let mut guest = prepared.boot(
        "kbs-snp-emulated",
        &format!("cvm.tee=snp cvm.test-snp-emulator={}", broker::SNP_EMULATOR),
        |g| g.state_disk(&disk, "cvm-state").forward(port, port),
    );
    must(guest.wait_for("is not one of the 0 allowed", BOOT));
    let log = guest.serial_log();
    assert!(
        log.contains("(snp evidence)"),
        "the node did not send SNP evidence"
    );
    assert!(log.contains(&format!("launch digest {}", cvm_formats::hex(&measurement))));
    assert!(!log.contains("opened LUKS2") && !log.contains("formatted on this boot"));
    assert!(!log.contains("plain http"), "the node did not use TLS");
    broker.allow_snp_measurement(measurement.to_vec());
    must(guest.wait_for(
        "kbs: cvm/state-disk/key, cvm/kubelet/bootstrap released",
        BOOT,
    ));
    must(guest.wait_for(
        "app: payload: file /run/kubelet/bootstrap-kubeconfig mode 600 content kubeconfig-for-test-3c1d",
        BOOT,
    ));
    must(guest.wait_for("cvm-init: ready", BOOT));
    assert!(guest.serial_log().contains("formatted on this boot"));
    power_down(&mut guest);
}

/// g. A rolling upgrade at the broker: with the references of images A and B loaded at once, a
/// node of each gets its key; once A's reference is removed (a reload), a node of A is refused,
/// the refusal naming the reference left, and its disk is never opened.
#[test]
fn both_images_get_keys_while_both_references_are_loaded_and_a_removed_one_is_refused() {
    use cvm_measure::broker::set::Named;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let keys = tempfile::tempdir().unwrap();
    let chain = broker::snp_test_chain(keys.path());
    let (digest_a, digest_b) = ([0xa1u8; 48], [0xb2u8; 48]);
    let image = |name: &str, digest: &[u8]| {
        prepare_with_files(
            &format!("{}# image {name}\n", config(port)),
            &broker::snp_emulator_files(&chain, digest),
        )
    };
    let (a, b) = (image("A", &digest_a), image("B", &digest_b));
    let named = |name: &str, digest: &[u8]| Named {
        name: name.into(),
        digest: String::new(),
        reference: broker::snp_emulated_reference(&chain, vec![digest.to_vec()]),
    };
    let resources = tempfile::tempdir().unwrap();
    let broker = broker::start(
        listener,
        resources.path(),
        broker::snp_emulated_reference(&chain, Vec::new()),
        &qemu_tests::pseudo_random_bytes(32, 0x243f6a8885a308d3),
    );
    broker.replace_references(vec![named("A.json", &digest_a), named("B.json", &digest_b)]);
    let cmdline = format!("cvm.tee=snp cvm.test-snp-emulator={}", broker::SNP_EMULATOR);
    let work = tempfile::tempdir().unwrap();
    let (disk_a, disk_b) = (work.path().join("a.img"), work.path().join("b.img"));
    std::fs::rename(blank_state_disk(work.path()), &disk_a).unwrap();
    std::fs::rename(blank_state_disk(work.path()), &disk_b).unwrap();

    for (prepared, disk, name) in [(&a, &disk_a, "rolling-a"), (&b, &disk_b, "rolling-b")] {
        let mut guest = prepared.boot(name, &cmdline, |g| {
            g.state_disk(disk, "cvm-state").forward(port, port)
        });
        must(guest.wait_for("kbs: cvm/state-disk/key released", BOOT));
        must(guest.wait_for("app: payload: marker written", BOOT));
        power_down(&mut guest);
    }

    // A's reference removed: A's node is refused by name, its disk untouched; B's still opens.
    broker.replace_references(vec![named("B.json", &digest_b)]);
    let before = std::fs::read(&disk_a).unwrap();
    let mut guest = a.boot("rolling-a-removed", &cmdline, |g| {
        g.state_disk(&disk_a, "cvm-state").forward(port, port)
    });
    must(guest.wait_for("no loaded reference matches: B.json", BOOT));
    let log = guest.serial_log();
    assert!(
        !log.contains("released") && !log.contains("app: payload:"),
        "A was let in"
    );
    drop(guest);
    assert!(
        std::fs::read(&disk_a).unwrap() == before,
        "A's disk changed"
    );
    let mut guest = b.boot("rolling-b-again", &cmdline, |g| {
        g.state_disk(&disk_b, "cvm-state").forward(port, port)
    });
    must(guest.wait_for(
        "app: payload: marker found plaintext-marker-7f3a9c21e5",
        BOOT,
    ));
    power_down(&mut guest);
}
