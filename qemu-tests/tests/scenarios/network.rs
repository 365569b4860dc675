//! The node's network, in QEMU. On a restricted user network (`restrict=on`: the guest reaches
//! nothing but the ports forwarded to this test's loopback) QEMU's DHCP server gives the
//! address (restricted, it leaves out router and DNS) and a workload reaches a server of this
//! test through a forward, also while short leases renew. On a network of this test's own
//! (`DhcpServer`, frames over the loopback) a DHCP server gives router, DNS, domain, host name
//! and MTU, answers hostile replies first, renews real short leases, or says nothing.

use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;

use qemu_tests::dhcp_server::{DhcpServer, Offer};
use qemu_tests::guest::FORWARD_ADDRESS;
use qemu_tests::support::{assert_fatal_before_workload, must, power_down, prepare, BOOT};

/// A line-echo server on the loopback, one thread per connection; returns its port.
fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                for line in std::io::BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if writeln!(writer, "{line}").is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

fn service(args: &str) -> String {
    format!("[network]\n\n[[service]]\nname = \"net\"\npath = \"/bin/payload\"\nargs = [{args}]\n")
}

/// The boot's `phase network ok <ms>` figure.
fn network_phase_ms(log: &str) -> u64 {
    log.lines()
        .find_map(|l| l.split("cvm-init: phase network ok ").nth(1))
        .and_then(|rest| rest.trim().trim_end_matches("ms").parse().ok())
        .expect("the boot logs the network phase with its time")
}

#[test]
fn dhcp_configures_the_node_and_a_workload_reaches_a_forwarded_server() {
    let port = echo_server();
    let config = service(&format!("\"net-probe\", \"{FORWARD_ADDRESS}:{port}\""));
    let prepared = prepare(Some(&config));
    let mut guest = prepared.boot("dhcp", "", |g| {
        g.forward(port, port)
            .netdev_option("hostname=dhcp-node")
            .netdev_option("domainname=cluster.test")
    });
    must(guest.wait_for("net: payload: answer", BOOT));
    let log = guest.serial_log();
    assert!(
        log.contains("network: eth0 has 10.0.2.15/24, DNS none, lease 86400 s"),
        "the lease is logged"
    );
    // The host answers DHCP: without `hostname_from_dhcp` its name does not name the node.
    assert!(
        log.contains("host name node-525400123456 (from the MAC address)"),
        "the node is not named by its MAC"
    );
    assert!(log.contains("DHCP offers the host name dhcp-node, not used"));
    assert!(
        !log.contains("payload: hostname dhcp-node"),
        "DHCP named the node"
    );
    for line in [
        "net: payload: /etc/resolv.conf: search cluster.test",
        // A tab in a workload's output reaches the console escaped, like every control character.
        "net: payload: /etc/hosts: 10.0.2.15\\tnode-525400123456",
        "net: payload: hostname node-525400123456",
        "net: payload: answer hello from the guest",
    ] {
        assert!(log.contains(line), "missing: {line}");
    }
    eprintln!(
        "network phase (DHCP on QEMU's user network, TCG): {} ms",
        network_phase_ms(&log)
    );
    power_down(&mut guest);
}

#[test]
fn a_dhcp_server_configures_route_dns_name_and_mtu_and_renews_short_leases() {
    let server = DhcpServer::start(
        Offer {
            lease_seconds: 6,
            hostile_first: true,
            ..Offer::default()
        },
        true,
    );
    // The configuration lets DHCP name the node; leases of 6 s stay 6 s only because the test
    // hook lowers the 60 s floor to its cut.
    let config = service("\"net-probe\", \"10.0.3.1:9\"").replacen(
        "[network]\n",
        "[network]\nhostname_from_dhcp = true\n",
        1,
    );
    let prepared = prepare(Some(&config));
    let mut guest = prepared.boot("dhcp-served", "cvm.test-dhcp-lease=6", |g| {
        g.netdev(&server.netdev)
    });
    must(guest.wait_for("net: payload: hostname", BOOT));
    let log = guest.serial_log();
    assert!(
        log.contains("network: eth0 has 10.0.3.15/24 via 10.0.3.1, MTU 1400, DNS 10.0.3.53 10.0.3.54, lease 6 s (renewal after 3 s) from 10.0.3.1, host name served-node (from DHCP)"),
        "the lease is logged"
    );
    assert!(
        log.contains("refused a DHCP reply: subnet mask 255.0.255.0 is not acceptable"),
        "the hostile reply is refused by name"
    );
    for line in [
        "net: payload: /etc/resolv.conf: nameserver 10.0.3.53",
        "net: payload: /etc/resolv.conf: nameserver 10.0.3.54",
        // The search list (option 119, the second name compressed) wins over the domain.
        "net: payload: /etc/resolv.conf: search lan.test svc.lan.test",
        "net: payload: /etc/hosts: 10.0.3.15\\tserved-node",
        "net: payload: hostname served-node",
    ] {
        assert!(log.contains(line), "missing: {line}");
    }
    eprintln!(
        "network phase (DHCP from the test's server over a dgram netdev, TCG): {} ms",
        network_phase_ms(&log)
    );
    // Leases of 6 s: renewed (unicast to the server) again and again, never lost.
    let started = Instant::now();
    while server.renewals.load(Ordering::SeqCst) < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "fewer than 3 renewals in 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = guest.serial_log();
    assert!(log.contains("network: lease renewed on eth0: 10.0.3.15/24 via 10.0.3.1"));
    // The MTU reached the interface (the payload reads it back from sysfs).
    assert!(
        log.contains("net: payload: mtu 1400"),
        "the MTU was not applied"
    );
    assert!(!log.contains("was not renewed"));
    assert_eq!(
        server.discovers.load(Ordering::SeqCst),
        1,
        "one DISCOVER: renewals keep the lease"
    );
    power_down(&mut guest);
}

#[test]
fn the_command_line_names_the_node_and_a_short_lease_renews_under_a_connection() {
    let port = echo_server();
    let config = service(&format!(
        "\"net-stream\", \"{FORWARD_ADDRESS}:{port}\", \"14\""
    ));
    let prepared = prepare(Some(&config));
    // Leases cut to 6 s (a test-build option): renewals at 3 s, several within the stream.
    let mut guest = prepared.boot(
        "dhcp-renew",
        "cvm.hostname=named-node cvm.test-dhcp-lease=6",
        |g| g.forward(port, port).netdev_option("hostname=dhcp-node"),
    );
    must(guest.wait_for("net: payload: stream", BOOT));
    let log = guest.serial_log();
    assert!(log.contains("host name named-node (from cvm.hostname)"));
    assert!(
        log.contains("net: payload: stream done"),
        "the connection broke: {}",
        log.lines()
            .filter(|l| l.contains("payload: stream"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let renewals = log.matches("network: lease renewed on eth0").count();
    assert!(renewals >= 2, "{renewals} renewals during the stream");
    assert!(!log.contains("was not renewed"));
    power_down(&mut guest);
}

#[test]
fn no_dhcp_answer_follows_the_policy() {
    // Continue: the boot goes on and says so.
    let continue_config = "[network]\non_no_lease = \"continue\"\ndhcp_timeout_s = 3\n";
    let prepared = prepare(Some(continue_config));
    let started = Instant::now();
    let silent = DhcpServer::start(Offer::default(), false);
    let mut guest = prepared.boot("no-dhcp-continue", "", |g| g.netdev(&silent.netdev));
    must(guest.wait_for("cvm-init: ready", BOOT));
    let log = guest.serial_log();
    assert!(log.contains(
        "network: no DHCP lease on eth0 (no DHCP answer within 3s); continuing without network"
    ));
    assert!(started.elapsed() > Duration::from_secs(3));
    power_down(&mut guest);

    // Fail: the boot stops with the reason, before any workload.
    let fail_config = "[network]\non_no_lease = \"fail\"\ndhcp_timeout_s = 2\n\n[[service]]\nname = \"never\"\npath = \"/bin/payload\"\nargs = [\"serve\"]\n";
    let prepared = prepare(Some(fail_config));
    let silent = DhcpServer::start(Offer::default(), false);
    let mut guest = prepared.boot("no-dhcp-fail", "", |g| g.netdev(&silent.netdev));
    assert_fatal_before_workload(
        &mut guest,
        "no DHCP lease on eth0 and network.on_no_lease is \"fail\": no DHCP answer within 2s",
        "never: payload:",
    );

    // Wait (the default): the boot keeps asking and says so each time.
    let prepared = prepare(Some("[network]\ndhcp_timeout_s = 2\n"));
    let silent = DhcpServer::start(Offer::default(), false);
    let mut guest = prepared.boot("no-dhcp-wait", "", |g| g.netdev(&silent.netdev));
    let asking = "asking again (network.on_no_lease = \"wait\")";
    must(guest.wait_for(asking, BOOT));
    let first = Instant::now();
    while guest.serial_log().matches(asking).count() < 2 {
        assert!(
            first.elapsed() < Duration::from_secs(60),
            "no second attempt"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!guest.serial_log().contains("cvm-init: ready"));
    drop(guest); // stopped where it waits
}
