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
