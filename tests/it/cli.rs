//! Each role binary: `--help` describes it, and a bad configuration exits 64
//! before binding (one table, one row a binary).

use std::process::Command;

use crate::common::procs::bin;

/// (binary, its environment prefix, arguments before `--config`)
macro_rules! cli_cases {
    ($($name:ident: $bin:literal, $prefix:literal, $extra:expr;)*) => {$(
        mod $name {
            #[test]
            fn help_describes_the_binary() {
                super::help_describes($bin, $prefix);
            }
            #[test]
            fn bad_configuration_exits_64() {
                super::bad_configuration_exits_64($bin, $extra);
            }
        }
    )*};
}

cli_cases! {
    control_plane: "lattice-cp", "LATTICE_CP_", &[];
    regional_cache: "lattice-cache", "LATTICE_CACHE_", &[];
    edge_agent: "lattice-agent", "LATTICE_AGENT_", &["enrol"];
}

fn help_describes(name: &str, prefix: &str) {
    let out = Command::new(bin(name))
        .arg("--help")
        .output()
        .expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--config"), "{text}");
    assert!(text.contains(prefix), "{text}");
}

fn bad_configuration_exits_64(name: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "no_such_key = 1\n").expect("write");
    let out = Command::new(bin(name))
        .args(["--config", path.to_str().expect("utf8")])
        .args(extra)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("no_such_key"), "{stderr}");

    let missing = dir.path().join("missing.toml");
    let out = Command::new(bin(name))
        .args(["--config", missing.to_str().expect("utf8")])
        .args(extra)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
}
