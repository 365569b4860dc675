//! `scripts/image.sh`'s refusals that come before any build: a production build never takes
//! a test tree from the environment (its registry configuration points at the loopback).
//! INIT names no file, so a build that went ahead would stop at once with another message.

use std::path::Path;
use std::process::Command;

fn image_sh(args: &[&str], test_tree: Option<&str>) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/image.sh");
    let mut command = Command::new("bash");
    command
        .arg(script)
        .args(args)
        .env("INIT", "/nonexistent/cvm-init")
        .env("CONFIG", "/nonexistent/node.toml")
        .env_remove("TEST_TREE");
    if let Some(tree) = test_tree {
        command.env("TEST_TREE", tree);
    }
    command.output().expect("bash")
}

#[test]
fn a_test_tree_in_the_environment_is_refused_by_every_production_command() {
    for command in ["build", "lock", "reproducible", "check"] {
        let out = image_sh(&[command], Some("/tmp/some-test-tree"));
        assert_eq!(out.status.code(), Some(1), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "TEST_TREE=/tmp/some-test-tree is set, but only `image.sh build-test` (make image-test) builds a test image; unset it for `{command}`; nothing was built"
            )),
            "{command}: {stderr}"
        );
    }
}

#[test]
fn build_test_needs_a_test_tree() {
    let out = image_sh(&["build-test"], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("build-test needs TEST_TREE=<directory of files to add to the root>"),
        "{stderr}"
    );
}
