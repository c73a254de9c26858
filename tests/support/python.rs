//! Test support: run a short Python 3 script on a file, as a second reader of what
//! erlmail wrote (Python's `email` package, `prometheus_client`, dkimpy).
//!
//! `python3_on` writes the bytes to a file in a fresh temporary directory, runs
//! `python3 -c SCRIPT FILE ARGS…` and returns its standard output, failing the test when
//! the script fails. Include it with `#[path = "support/python.rs"] mod python;`.
#![allow(dead_code)]

use std::process::Command;

/// Run `script` with the path of a temporary file holding `input` as `sys.argv[1]` and
/// `args` after it; its stdout. Panics, naming `what` and the script's stderr, if it fails.
pub fn python3_on(input: &[u8], script: &str, args: &[&str], what: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("input");
    std::fs::write(&file, input).unwrap();
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&file)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
