//! The `lattice-cp` binary: help, and a bad configuration exits 64 before binding.

use std::process::Command;

const EXTRA: &[&str] = &[];

#[test]
fn help_describes_the_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_lattice-cp"))
        .arg("--help")
        .output()
        .expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--config"), "{text}");
    assert!(text.contains("LATTICE_CP_"), "{text}");
}

#[test]
fn bad_configuration_exits_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "no_such_key = 1\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_lattice-cp"))
        .args(["--config", path.to_str().expect("utf8")])
        .args(EXTRA)
        .output()
        .expect("runs");
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_key"));

    let out = Command::new(env!("CARGO_BIN_EXE_lattice-cp"))
        .args([
            "--config",
            dir.path().join("missing.toml").to_str().expect("utf8"),
        ])
        .args(EXTRA)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
}
