//! Helpers for tests that run the real binaries as processes.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub fn bin(name: &str) -> PathBuf {
    // Every workspace binary is built next to this package's own.
    let lattice = PathBuf::from(env!("CARGO_BIN_EXE_lattice"));
    let path = lattice.with_file_name(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo test --workspace`",
        path.display()
    );
    path
}

/// A child process killed when the test ends, however it ends.
pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` and waits for the stderr line "... listening on ADDR ...".
pub fn spawn_listening(mut cmd: Command) -> (Proc, SocketAddr) {
    cmd.stderr(Stdio::piped())
        .stdout(Stdio::null())
        .env("RUST_LOG", "warn");
    let mut child = cmd.spawn().expect("spawns");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split(" listening on ").nth(1) {
                let addr = rest.split([' ', ';']).next().unwrap_or_default().to_owned();
                let _ = tx.send(Ok(addr));
            } else if line.contains("lattice-") {
                let _ = tx.send(Err(line));
            }
        }
    });
    let got = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("process reports its address");
    let addr = got.unwrap_or_else(|line| panic!("process failed: {line}"));
    (Proc(child), addr.parse().expect("address"))
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

pub fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).expect("write config");
    path.to_owned()
}

/// An auditor certificate (`spiffe://lattice.local/admin/ann`) under
/// `d/ann`, issued with the bootstrap admin's `admin` arguments.
pub fn auditor(d: &Path, admin: &[&str]) -> PathBuf {
    let ann = d.join("ann");
    run_ok(
        Command::new(bin("lattice"))
            .args(["admin-cert", "issue", "--role", "auditor"])
            .args(["--id", "spiffe://lattice.local/admin/ann"])
            .args(["--out", ann.to_str().expect("utf8")])
            .args(admin),
    );
    ann
}

/// Releases the default bundle with one audience agents may mint for,
/// `https://api.example.com` (scope `read`).
pub fn push_minting_bundle(d: &Path, admin: &[&str]) {
    let bundle = d.join("bundle");
    std::fs::create_dir(&bundle).expect("mkdir");
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("shared/policies/default");
    for f in std::fs::read_dir(&default).expect("default bundle") {
        let f = f.expect("entry").path();
        std::fs::copy(&f, bundle.join(f.file_name().expect("name"))).expect("copy");
    }
    write(
        &bundle.join("entities.json"),
        r#"[{"uid":{"type":"Lattice::Audience","id":"https://api.example.com"},
             "attrs":{"scopes":["read"],"labels":[]},"parents":[]}]"#,
    );
    write(&bundle.join("tests.json"), "[]");
    run_ok(
        Command::new(bin("lattice"))
            .args(["policy", "push", bundle.to_str().expect("utf8")])
            .args(["-m", "minting test"])
            .args(admin),
    );
}

/// Waits until the control plane's audit log holds an `issued` record of
/// `agent_id` for every one of `jtis` (read as the auditor `ann`).
pub fn wait_for_issuances(cp: SocketAddr, ann: &Path, agent_id: &str, jtis: &[String]) {
    super::eventually_blocking(
        "every mint's audit record is in the log",
        Duration::from_secs(30),
        || {
            let log = run_ok(
                Command::new(bin("lattice"))
                    .args(["audit", "query", "--kind", "issued", "--subject", agent_id])
                    .args(["--control-plane", &cp.to_string()])
                    .args(["--admin-dir", ann.to_str().expect("utf8")]),
            );
            let missing: Vec<&String> = jtis.iter().filter(|j| !log.contains(j.as_str())).collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("missing {missing:?}"))
            }
        },
    );
}

/// Waits until `lattice status` shows the cache `name` fresh.
pub fn wait_fresh(admin: &[&str], name: &str) {
    super::eventually_blocking("the cache becomes fresh", Duration::from_secs(30), || {
        run_ok(Command::new(bin("lattice")).arg("status").args(admin))
            .lines()
            .any(|l| l.contains(name) && l.ends_with("fresh"))
    });
}
