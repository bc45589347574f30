// The two checks every role binary passes, shared by the role crates'
// `tests/cli.rs` (each is its own small test target, so that
// `cargo test --workspace` also builds the binary that the process tests in
// `tests/it` run). Included with `include!`, not a test target of its own.

/// `cli_cases!(env!("CARGO_BIN_EXE_x"), "LATTICE_X_", &["args", "before"])`:
/// the binary, its environment prefix, arguments after `--config FILE`.
macro_rules! cli_cases {
    ($bin:expr, $prefix:literal, $extra:expr) => {
        #[test]
        fn help_describes_the_binary() {
            let out = std::process::Command::new($bin)
                .arg("--help")
                .output()
                .expect("runs");
            assert!(out.status.success());
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("--config"), "{text}");
            assert!(text.contains($prefix), "{text}");
        }

        #[test]
        fn bad_configuration_exits_64() {
            let dir = tempfile::tempdir().expect("tempdir");
            let bad = dir.path().join("bad.toml");
            std::fs::write(&bad, "no_such_key = 1\n").expect("write");
            let missing = dir.path().join("missing.toml");
            for (config, needle) in [(&bad, "no_such_key"), (&missing, "")] {
                let out = std::process::Command::new($bin)
                    .args(["--config", config.to_str().expect("utf8")])
                    .args($extra)
                    .output()
                    .expect("runs");
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert_eq!(out.status.code(), Some(64), "{stderr}");
                assert!(stderr.contains(needle), "{stderr}");
            }
        }
    };
}
