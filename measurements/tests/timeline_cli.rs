//! `cvm-measure timeline` as a user runs it: a real boot's console drawn to a file or standard
//! output, and malformed logs refused on stderr with exit 1 and the line they fail at.

use std::path::PathBuf;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cvm-measure");

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// (exit code, stdout, stderr)
fn timeline<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("timeline")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The phases of the fixture's boot and the durations cvm-init reported for them.
const PHASES: [(&str, &str); 15] = [
    ("mounts", "44 ms"),
    ("config", "9 ms"),
    ("modules", "2.67 s"),
    ("devices", "215 ms"),
    ("configfs", "0 ms"),
    ("measure", "28 ms"),
    ("verity-root", "114 ms"),
    ("mount-root", "13 ms"),
    ("switch-root", "47 ms"),
    ("config-file", "45 ms"),
    ("network", "44 ms"),
    ("state", "5.51 s"),
    ("power-button", "14 ms"),
    ("services", "1.99 s"),
    ("measure-ready", "28 ms"),
];

/// One `<g>` per bar: its tooltip, its rectangle and its label.
fn bars(svg: &str) -> Vec<(String, String)> {
    svg.lines()
        .filter_map(|l| {
            let g = l.strip_prefix("<g><title>")?;
            let (title, rest) = g.split_once("</title>")?;
            assert!(rest.starts_with("<rect "), "{l}");
            let label = rest.split_once("\">")?.1.strip_suffix("</text></g>")?;
            Some((title.split(" from ").next()?.to_string(), label.to_string()))
        })
        .collect()
}

#[test]
fn a_real_boot_is_drawn_with_a_bar_per_phase_and_its_duration() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("boot.svg");
    let log = data("boot-node-first.timed.log");
    let (code, stdout, stderr) = timeline(&[log.as_os_str(), "-o".as_ref(), out.as_os_str()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.is_empty() && stderr.is_empty(), "{stdout}{stderr}");
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg "));
    assert!(svg.trim_end().ends_with("</svg>"));
    let drawn = bars(&svg);
    for (name, duration) in PHASES {
        let label = format!("{name} {duration}");
        assert!(
            drawn.iter().any(|(n, l)| n == name && *l == label),
            "no bar {label:?} in {drawn:?}"
        );
    }
    let names: Vec<&str> = drawn.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(&names[..3], ["firmware", "kernel", "cvm-init"]);
    assert!(names.contains(&"containerd"));
    assert!(svg.contains("ready 19.016 s"));

    // The same boot's plain console, to standard output.
    let (code, stdout, stderr) = timeline(&[data("boot-node-first.serial.log")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("after the kernel&apos;s start"));
    assert_eq!(bars(&stdout).len(), drawn.len() - 1, "no firmware bar");
}

fn refused(log: &str, says: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.log");
    std::fs::write(&path, log).unwrap();
    let out = dir.path().join("out.svg");
    let (code, stdout, stderr) = timeline(&[path.as_os_str(), "-o".as_ref(), out.as_os_str()]);
    assert_eq!(code, 1, "{log:?}: {stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("cvm-measure: {}: ", path.display())),
        "{stderr}"
    );
    assert!(stderr.contains(says), "{log:?}: {stderr}");
    assert!(!out.exists(), "no SVG for a malformed log");
}

const HEAD: &str =
    "0.100 [    0.000000] Linux version 6.12\n1.000 cvm-init: starting version 0.1.0\n";

#[test]
fn malformed_logs_are_refused_with_the_line() {
    refused(
        &format!("{HEAD}1.100 cvm-init: phase mounts ok 4ms\n"),
        "line 3: phase mounts ends without its start",
    );
    refused(
        &format!("{HEAD}0.900 cvm-init: phase mounts start\n"),
        "line 3: time 0.900 s goes back before 1.000 s",
    );
    refused(
        "0.100 [    0.000000] Linux version 6.12\n",
        "no `cvm-init: starting` line",
    );
    refused(
        &format!(
            "{HEAD}1.100 cvm-init: phase mounts start\n1.200 cvm-init: phase mounts ok soon\n"
        ),
        "line 4: expected `phase NAME start`, `phase NAME ok <N>ms`",
    );
    refused(
        "cvm-init: starting version 0.1.0\ncvm-init: ready\n",
        "line 1: `cvm-init: starting version 0.1.0` carries no time",
    );
    // Host text in the error is escaped: the terminal sees no escape sequence.
    refused(
        &format!("{HEAD}1.100 cvm-init: phase \u{1b}]0;owned\u{7} ok 1ms\n"),
        "line 3: phase \\x1b]0;owned\\x07 ends without its start",
    );
}

#[test]
fn a_missing_log_is_named() {
    let (code, _, stderr) = timeline(&["/nonexistent/serial.log"]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("cvm-measure: cannot read the console log /nonexistent/serial.log"),
        "{stderr}"
    );
}
