//! Each binary runs alone from its TOML configuration, as separate processes:
//! `lattice-cp`, `lattice join-token create`, `lattice-cache`, `lattice-agent
//! token`, `lattice status`. Also checks that the commented configurations in
//! `deploy/` parse and validate.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::procs::*;

#[test]
fn binaries_run_alone_from_their_configuration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cmd = cp_command(d);
    let (_cp, cp_addr) = spawn_listening(cmd);
    let admin_dir = d.join("cp/admin");
    let admin = [
        "--control-plane",
        &cp_addr.to_string(),
        "--admin-dir",
        admin_dir.to_str().expect("utf8"),
    ];

    // Two secret custodians, certified while the default bundle lets the
    // bootstrap admin do it alone (the example bundle wants two admins).
    let certify = |name: &str, role: &str| {
        let out = d.join(name);
        run_ok(
            Command::new(bin("lattice"))
                .args(["admin-cert", "issue", "--role", role])
                .args(["--id", &format!("spiffe://lattice.local/admin/{name}")])
                .args(["--out", out.to_str().expect("utf8")])
                .args(admin),
        );
        out
    };
    let (carol, dave) = (
        certify("carol", "secret-custodian"),
        certify("dave", "secret-custodian"),
    );
    let ann = certify("ann", "auditor");

    // The cache's join token, while the default bundle lets the bootstrap
    // admin make it alone (the example bundle's EnrolCache wants two).
    let cache_id = "spiffe://lattice.local/cache/eu/proc-cache";
    let cmd = cache_command(d, cp_addr, cache_id, &admin);

    // Policy as code from the CLI: validate and test offline, push (the
    // default bundle lets the bootstrap admin do it alone), list history.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/policies/example");
    let example = example.to_str().expect("utf8");
    let out = run_ok(Command::new(bin("lattice")).args(["policy", "validate", example]));
    assert!(out.contains("valid;"), "{out}");
    let out = run_ok(Command::new(bin("lattice")).args(["policy", "test", example]));
    assert!(out.contains(" 0 failed"), "{out}");
    let out = run_ok(
        Command::new(bin("lattice"))
            .args(["policy", "push", example, "-m", "from the CLI"])
            .args(admin),
    );
    assert!(out.contains("v2") && out.contains("from the CLI"), "{out}");
    let out = run_ok(
        Command::new(bin("lattice"))
            .args(["policy", "history"])
            .args(admin),
    );
    assert!(out.contains("v1") && out.contains("* v2"), "{out}");
    let out = run_ok(
        Command::new(bin("lattice"))
            .args(["policy", "diff", example])
            .args(admin),
    );
    assert!(
        out.trim().is_empty(),
        "nothing changes against the version in force: {out}"
    );

    let (_cache, cache_addr) = spawn_listening(cmd);

    let agent_id = "spiffe://lattice.local/agent/eu/proc-agent";
    let token = run_ok(
        Command::new(bin("lattice"))
            .args(["join-token", "create", "--id", agent_id])
            .args(admin),
    );
    let (agent_cfg, agent) = agent_minter(d, agent_id, cache_addr);
    // The cache serves once it is fresh: it has applied the log head it
    // asked for (both policy releases included). Poll the operator's view.
    common::eventually_blocking(
        "the cache becomes fresh",
        std::time::Duration::from_secs(30),
        || {
            let status = run_ok(Command::new(bin("lattice")).arg("status").args(admin));
            if status
                .lines()
                .any(|l| l.contains("proc-cache") && l.ends_with("fresh"))
            {
                Ok(())
            } else {
                Err(status)
            }
        },
    );
    let jwt = agent(Some(token.trim()));
    let claims = jwt_claims(&jwt);
    assert_eq!(claims["sub"], agent_id);
    assert_eq!(claims["iss"], cache_id);
    // The identity persisted (sealed): a second run needs no join token.
    let again = agent(None);
    assert_ne!(again.trim(), jwt.trim(), "a fresh token each time");

    let status = run_ok(Command::new(bin("lattice")).arg("status").args(admin));
    assert!(status.contains(cache_id), "{status}");
    assert!(status.contains("0 outstanding join tokens"), "{status}");

    // An upstream API key: carol puts it from stdin (never argv), the
    // example bundle's two-person rule parks it, dave approves, the agent
    // leases it and prints it for a script.
    // `args` then the admin's credential (global options of the subcommand).
    let as_admin = |dir: &Path, args: &[&str]| {
        let mut c = Command::new(bin("lattice"));
        c.args(args)
            .args(["--control-plane", &cp_addr.to_string()])
            .args(["--admin-dir", dir.to_str().expect("utf8")]);
        c
    };
    let mut put = as_admin(&carol, &["secret", "put", "openai", "--region", "eu"]);
    put.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = put.spawn().expect("spawn put");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"sk-proc-test-value\n")
            .expect("write the value");
    }
    let out = child.wait_with_output().expect("put runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "waits for a second custodian: {err}");
    let id = err
        .split("lattice approve ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_hexdigit()).next())
        .unwrap_or_else(|| panic!("no request id in: {err}"))
        .to_string();
    assert!(!err.contains("sk-proc-test-value"), "{err}");
    let out = run_ok(&mut as_admin(&dave, &["approve", &id]));
    assert!(out.contains("openai v1 active"), "{out}");
    let out = run_ok(&mut as_admin(&carol, &["secret", "versions", "openai"]));
    assert!(
        out.contains("active v1") && out.contains("approved by spiffe://lattice.local/admin/dave"),
        "{out}"
    );
    // The new cache holds it only once a custodian grants it custody.
    let out = run_ok(&mut as_admin(&carol, &["grant-custody", cache_id]));
    assert!(out.contains("1 secret(s) sealed to it"), "{out}");
    let status = run_ok(Command::new(bin("lattice")).arg("status").args(admin));
    assert!(
        status
            .lines()
            .any(|l| l.contains("proc-cache") && l.contains(" granted ")),
        "{status}"
    );
    let mut lease = Command::new(bin("lattice-agent"));
    lease
        .args(["--config", agent_cfg.to_str().expect("utf8")])
        .args(["secret", "openai", "--ttl-secs", "60"])
        .env("RUST_LOG", "warn");
    // The cache applies the approval's events shortly after it is durable.
    let value = common::eventually_blocking(
        "the lease succeeds",
        std::time::Duration::from_secs(30),
        || {
            let out = lease.output().expect("runs");
            if out.status.success() {
                Ok(out.stdout)
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        },
    );
    assert_eq!(
        value, b"sk-proc-test-value",
        "the trailing newline is stripped at put"
    );

    // The audit log from the CLI: every admin decision above is an entry;
    // verify recomputes the tree and checks the signed heads; a proof
    // printed for entry 1 checks offline against the root certificate.
    let out = run_ok(&mut as_admin(&ann, &["audit", "tail", "-n", "5"]));
    assert_eq!(out.lines().count(), 5, "{out}");
    assert!(
        out.lines()
            .all(|l| l.starts_with('{') && l.contains("\"index\"")),
        "{out}"
    );
    let out = run_ok(&mut as_admin(
        &ann,
        &[
            "audit",
            "query",
            "--kind",
            "admin",
            "--subject",
            "spiffe://lattice.local/admin/dave",
        ],
    ));
    assert!(out.contains("Approve") || out.contains("approved"), "{out}");
    // Tree heads are signed every few seconds: wait for one past entry 1.
    let proof = common::eventually_blocking(
        "a signed head covers entry 1",
        std::time::Duration::from_secs(30),
        || {
            let out = as_admin(&ann, &["audit", "proof", "1"])
                .output()
                .expect("runs");
            if out.status.success() {
                Ok(out.stdout)
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        },
    );
    let proof_file = write(&d.join("proof.json"), &String::from_utf8_lossy(&proof));
    let out = run_ok(Command::new(bin("lattice")).args([
        "audit",
        "check-proof",
        proof_file.to_str().expect("utf8"),
        "--root",
        d.join("cp/root.crt").to_str().expect("utf8"),
    ]));
    assert!(out.starts_with("ok: entry 1 is in the tree head"), "{out}");
    let out = run_ok(&mut as_admin(&ann, &["audit", "verify"]));
    assert!(out.starts_with("ok:"), "{out}");
    // An altered proof is refused.
    let forged = String::from_utf8_lossy(&proof).replacen("\"index\": 1", "\"index\": 0", 1);
    let forged_file = write(&d.join("forged.json"), &forged);
    let out = Command::new(bin("lattice"))
        .args([
            "audit",
            "check-proof",
            forged_file.to_str().expect("utf8"),
            "--root",
            d.join("cp/root.crt").to_str().expect("utf8"),
        ])
        .output()
        .expect("runs");
    assert!(!out.status.success(), "a forged proof must fail");

    // Evidence: who may and who did use each audience and secret, under a
    // signed tree head (the agent's records reach the log shortly after).
    let report: serde_json::Value = common::eventually_blocking(
        "the lease is in the report",
        std::time::Duration::from_secs(30),
        || {
            let out = run_ok(&mut as_admin(&ann, &["report", "access", "--days", "1"]));
            let v: serde_json::Value = serde_json::from_str(&out).expect("report JSON");
            let leased = v["rows"].as_array().is_some_and(|rows| {
                rows.iter().any(|r| {
                    r["resource"] == "openai"
                        && r["principal"] == agent_id
                        && r["uses"].as_u64() >= Some(1)
                })
            });
            if leased { Ok(v) } else { Err(out) }
        },
    );
    assert!(
        report["tree_head"]["tree_size"].as_u64() > Some(0),
        "{report}"
    );
    assert!(
        report["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .any(|r| r["resource"] == "https://api.example.com"
                && r["principal"] == agent_id
                && r["allowed"] == true
                && r["uses"].as_u64() >= Some(2)),
        "{report}"
    );
    let csv = run_ok(&mut as_admin(&ann, &["report", "access", "--csv"]));
    assert!(
        csv.starts_with("# policy v") && csv.contains("secret,openai,"),
        "{csv}"
    );

    // `lattice-agent run`: the Workload API on a socket; the one-shot
    // commands go through it (the running agent holds the store), the
    // parent token travels on stdin; SIGTERM stops it and removes the socket.
    let mut run = Command::new(bin("lattice-agent"));
    run.args(["--config", agent_cfg.to_str().expect("utf8"), "run"]);
    let (mut child, lines) = spawn_lines(run, "warn");
    let socket = std::path::PathBuf::from(wait_for_line(&lines, "workload API on ", &[';']));
    assert!(socket.exists(), "{}", socket.display());
    let parent = agent(None);
    let mut delegate = Command::new(bin("lattice-agent"));
    delegate
        .args(["--config", agent_cfg.to_str().expect("utf8")])
        .args(["delegate", "--actor", "planner", "--scope", "read"])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut d_child = delegate.spawn().expect("delegate runs");
    {
        use std::io::Write as _;
        d_child
            .stdin
            .take()
            .expect("stdin")
            .write_all(parent.as_bytes())
            .expect("parent on stdin");
    }
    let out = d_child.wait_with_output().expect("delegate ends");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let delegated = String::from_utf8(out.stdout).expect("utf8");
    let claims = jwt_claims(&delegated);
    assert_eq!(claims["act"]["sub"], format!("{agent_id}/planner"));
    assert_eq!(claims["sub"], agent_id);
    let pid = child.0.id().to_string();
    run_ok(Command::new("kill").args(["-TERM", &pid]));
    let status = child.0.wait().expect("agent exits");
    assert!(status.success(), "SIGTERM is a clean stop: {status:?}");
    assert!(!socket.exists(), "the socket is removed on SIGTERM");
}

/// Starts `cmd` with `RUST_LOG=level`; returns the process and every line
/// it writes to stderr.
fn spawn_lines(mut cmd: Command, level: &str) -> (Proc, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead as _;
    cmd.env("RUST_LOG", level)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = Proc(cmd.spawn().expect("spawns"));
    let stderr = child.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// The text after `marker` in the first line that holds it, up to `ends`.
fn wait_for_line(rx: &std::sync::mpsc::Receiver<String>, marker: &str, ends: &[char]) -> String {
    loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no line with {marker:?} within 60 s"));
        if let Some(rest) = line.split(marker).nth(1) {
            return rest.split(ends).next().unwrap_or_default().to_owned();
        }
    }
}

/// Starts `cmd` logging at info; returns the process, the address of its
/// "listening on" line and every stderr line (that one included).
fn spawn_logging(
    cmd: Command,
) -> (
    Proc,
    std::net::SocketAddr,
    std::sync::mpsc::Receiver<String>,
) {
    let (child, rx) = spawn_lines(cmd, "info");
    let addr = wait_for_line(&rx, " listening on ", &[' ', ';']);
    (child, addr.parse().expect("address"), rx)
}

/// `kill -TERM` (what systemd and Kubernetes send to stop a service), then
/// the exit status and the lines logged until the exit.
fn terminate(
    p: &mut Proc,
    log: &std::sync::mpsc::Receiver<String>,
) -> (std::process::ExitStatus, String) {
    run_ok(Command::new("kill").args(["-TERM", &p.0.id().to_string()]));
    let status = common::eventually_blocking(
        "the process exits after SIGTERM",
        std::time::Duration::from_secs(30),
        || p.0.try_wait().expect("wait"),
    );
    // Until the reader sees the end of stderr (bounded, should a child of
    // the process hold it open).
    let mut lines = Vec::new();
    while let Ok(line) = log.recv_timeout(std::time::Duration::from_secs(5)) {
        lines.push(line);
    }
    (status, lines.join("\n"))
}

#[test]
fn sigterm_stops_the_control_plane_and_a_cache_gracefully() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cmd = cp_command(d);
    let (mut cp, cp_addr, cp_log) = spawn_logging(cmd);
    let admin_dir = d.join("cp/admin");
    let admin = [
        "--control-plane",
        &cp_addr.to_string(),
        "--admin-dir",
        admin_dir.to_str().expect("utf8"),
    ];
    let cmd = cache_command(
        d,
        cp_addr,
        "spiffe://lattice.local/cache/eu/term-cache",
        &admin,
    );
    let (mut cache, _, cache_log) = spawn_logging(cmd);
    // The cache's Sync stream is open: the control plane's stop closes it.
    wait_fresh(&admin, "term-cache");

    for (name, p, log) in [
        ("lattice-cp", &mut cp, &cp_log),
        ("lattice-cache", &mut cache, &cache_log),
    ] {
        let (status, lines) = terminate(p, log);
        assert!(
            status.success(),
            "{name}: SIGTERM is a clean stop: {status:?}\n{lines}"
        );
        assert!(
            lines.contains("shutting down"),
            "{name} logs its graceful shutdown:\n{lines}"
        );
    }
}

#[test]
fn dev_walkthrough_exits_zero() {
    let out = Command::new(bin("lattice"))
        .args(["dev", "--exit-after-demo"])
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "[5] agent generates its key",
        "enforces version 3",
        "forbidden by high-assurance-needs-patched-os",
        "forbidden by internal-network-only",
        "needs the approval of a second admin",
        "approved by spiffe://lattice.local/admin/bob",
        "token: ey",
        "\"sub\": \"spiffe://lattice.local/agent/eu/agent-1\"",
        "JWKS holds 2 keys",
        "enforcing after",
        "next mint is refused: PermissionDenied",
        "revoked = true",
        "holds (sealed) [(\"openai\", [1, 2])]",
        "next lease is refused",
        "fetched a token over the socket",
        "a wider delegation is refused: PermissionDenied",
        "the process received: you sent: Bearer [REDACTED]",
        "the proxy's next request: HTTP/1.1 503",
        "the socket is gone: true",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn deploy_configurations_parse_and_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let cp: lattice_control_plane::Config =
        lattice_shared::config::load(Some(&root.join("control-plane.toml")), "LATTICE_TEST_NONE_")
            .expect("cp");
    cp.validate().expect("cp valid");
    let cache: lattice_regional_cache::Config = lattice_shared::config::load(
        Some(&root.join("regional-cache.toml")),
        "LATTICE_TEST_NONE_",
    )
    .expect("cache");
    cache.validate().expect("cache valid");
    let agent: lattice_edge_agent::Config =
        lattice_shared::config::load(Some(&root.join("edge-agent.toml")), "LATTICE_TEST_NONE_")
            .expect("agent");
    agent.validate().expect("agent valid");
    assert_eq!(agent.posture.os_patched, Some(true));
}

/// The Grafana dashboard is valid JSON and every metric it graphs is one
/// the code records.
#[test]
fn the_grafana_dashboard_graphs_metrics_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/lattice.json")).expect("dashboard"),
    )
    .expect("valid JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut sources = String::new();
    for dir in [
        "control-plane/src",
        "regional-cache/src",
        "edge-agent/src",
        "shared/src",
    ] {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("dir").map_while(Result::ok) {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    sources.push_str(&std::fs::read_to_string(&p).expect("source"));
                }
            }
        }
    }
    let check = |what: &str, expr: &str| {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !word.starts_with("lattice_") {
                continue;
            }
            let name = word.trim_end_matches("_bucket");
            assert!(
                sources.contains(&format!("\"{name}\"")),
                "{what} uses {name}, which no code records"
            );
        }
    };
    for p in panels {
        let expr = p["targets"][0]["expr"].as_str().expect("expr");
        check(&format!("panel {:?}", p["title"]), expr);
    }
    // The Prometheus alerting rules likewise.
    let rules =
        std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).expect("alert rules");
    let exprs: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .collect();
    assert!(exprs.len() >= 4, "alert rules");
    for e in exprs {
        check("alert rule", e);
    }
}

/// `lattice-cache` for `cache_id` under `d`, enrolling at `cp_addr` with a
/// join token the admin creates; the token comes from the environment,
/// overriding the file.
fn cache_command(
    d: &Path,
    cp_addr: std::net::SocketAddr,
    cache_id: &str,
    admin: &[&str],
) -> Command {
    let token = run_ok(
        Command::new(bin("lattice"))
            .args(["join-token", "create", "--id", cache_id, "--ttl", "5m"])
            .args(admin),
    );
    let cache_cfg = write(
        &d.join("cache.toml"),
        &format!(
            "id = \"{cache_id}\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ncontrol_plane = \"{cp_addr}\"\nroot_ca = \"{}\"\n",
            d.join("cache").display(),
            d.join("cp/root.crt").display()
        ),
    );
    let mut cmd = Command::new(bin("lattice-cache"));
    cmd.args(["--config", cache_cfg.to_str().expect("utf8")])
        .env("LATTICE_CACHE_JOIN_TOKEN", token.trim());
    cmd
}

/// `cmd` run under a file-descriptor limit of `n` (soft and hard), as on a
/// host whose limit is the usual 1,024 and cannot be raised.
fn under_fd_limit(cmd: &Command, n: u32) -> Command {
    let mut c = Command::new("prlimit");
    c.arg(format!("--nofile={n}:{n}"))
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

/// Keeps `n` idle TCP connections to each of `addrs` open from 127.0.0.2
/// (never a TLS byte), as an attacker would: a connection the server
/// closes is opened again (at most 200 a round, every 100 ms), until the
/// flood is dropped.
struct Flood {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flood {
    fn start(addrs: &[std::net::SocketAddr], n: usize) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let total = addrs.len() * n;
        let addrs = addrs.to_vec();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut conns: Vec<(std::net::SocketAddr, Option<std::net::TcpStream>)> = addrs
                .iter()
                .flat_map(|a| std::iter::repeat_n(*a, n))
                .map(|a| (a, connect_from_127_0_0_2(a)))
                .collect();
            let opened = conns.iter().filter(|c| c.1.is_some()).count();
            let _ = ready_tx.send(opened);
            while !flag.load(Ordering::SeqCst) {
                let mut budget = 200;
                for (addr, c) in conns.iter_mut() {
                    let closed = match c {
                        Some(s) => {
                            let mut b = [0u8; 1];
                            !matches!(s.peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                        }
                        None => true,
                    };
                    if closed && budget > 0 {
                        budget -= 1;
                        *c = connect_from_127_0_0_2(*addr);
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        let opened = ready_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the flood starts");
        assert!(
            opened >= total * 95 / 100,
            "the flood connected: {opened} of {total}"
        );
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A blocking connect from 127.0.0.2 (tokio's socket API, driven on a
/// throwaway current-thread runtime).
fn connect_from_127_0_0_2(addr: std::net::SocketAddr) -> Option<std::net::TcpStream> {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    });
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().ok()?;
        s.bind("127.0.0.2:0".parse().ok()?).ok()?;
        let tcp = tokio::time::timeout(std::time::Duration::from_secs(2), s.connect(addr))
            .await
            .ok()?
            .ok()?;
        let s = tcp.into_std().ok()?;
        s.set_nonblocking(true).ok()?;
        Some(s)
    })
}

/// Issue #18: about 1,000 idle TCP connections exhausted a 1,024 fd limit
/// (the cap was 4,096 and handshakes held their descriptor for 10 s), so
/// the control plane could not commit a revocation and a cache could not
/// keep its audit records. Under a 1,024 limit and 2,000 idle connections
/// from another address, to each of them, an admin's revocation commits
/// over a new and over an existing connection, and mints succeed with
/// their audit records kept.
#[test]
fn an_fd_flood_from_one_address_stalls_neither_revocations_nor_mints() {
    // This process holds the 4,000 flooding sockets.
    lattice_shared::admission::raise_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cmd = cp_command(d);
    let (_cp, cp_addr, cp_log) = spawn_logging(under_fd_limit(&cmd, 1024));
    let admin_dir = d.join("cp/admin");
    let admin = [
        "--control-plane",
        &cp_addr.to_string(),
        "--admin-dir",
        admin_dir.to_str().expect("utf8"),
    ];
    let cmd = cache_command(
        d,
        cp_addr,
        "spiffe://lattice.local/cache/eu/flood-cache",
        &admin,
    );
    let ann = auditor(d, &admin);
    push_minting_bundle(d, &admin);
    let (_cache, cache_addr, _cache_log) = spawn_logging(under_fd_limit(&cmd, 1024));
    wait_fresh(&admin, "flood-cache");
    let agent_id = "spiffe://lattice.local/agent/eu/flood-agent";
    let token = run_ok(
        Command::new(bin("lattice"))
            .args(["join-token", "create", "--id", agent_id])
            .args(admin),
    );
    let (_, agent) = agent_minter(d, agent_id, cache_addr);
    let mint = |token: Option<&str>| {
        jwt_claims(&agent(token))["jti"]
            .as_str()
            .expect("jti")
            .to_owned()
    };
    let mut jtis = vec![mint(Some(token.trim()))];

    // An admin connection opened before the flood.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut existing = rt.block_on(async {
        let mut c = lattice::admin::connect(cp_addr, &admin_dir).expect("admin client");
        c.status(lattice_shared::proto::StatusRequest::default())
            .await
            .expect("status before the flood");
        c
    });

    let flood = Flood::start(&[cp_addr, cache_addr], 2000);

    // The control plane closes what is over its caps (and says so).
    let why = wait_for_line(&cp_log, "connection refused", &['\n']);
    assert!(why.contains("source_handshake_limit"), "{why}");

    // Over an existing and over a new connection, the revocation commits.
    let revoke = |jti: &str| lattice_shared::proto::RevokeRequest {
        revocation: Some(lattice_shared::proto::Revocation {
            target: Some(lattice_shared::proto::revocation::Target::Jti(jti.into())),
            reason: "flood test".into(),
        }),
    };
    let committed = rt
        .block_on(existing.revoke(revoke("flood-existing")))
        .expect("a revocation over the existing connection commits")
        .into_inner();
    assert!(committed.seq > 0);
    let out = run_ok(
        Command::new(bin("lattice"))
            .args(["revoke", "token", "flood-new"])
            .args(admin),
    );
    assert!(!out.trim().is_empty());
    // Mints over new connections to the flooded cache succeed.
    for _ in 0..10 {
        jtis.push(mint(None));
    }
    // Every mint's audit record reaches the control plane's log.
    wait_for_issuances(cp_addr, &ann, agent_id, &jtis);
    drop(flood);
}

/// The configuration of `lattice-agent` for `agent_id` at the cache
/// `cache_addr` (data under `d`), and a function that runs `lattice-agent
/// token` with it (with the join token on a first run) and returns the JWT.
fn agent_minter(
    d: &Path,
    agent_id: &str,
    cache_addr: std::net::SocketAddr,
) -> (std::path::PathBuf, impl Fn(Option<&str>) -> String) {
    let cfg = write(
        &d.join("agent.toml"),
        &format!(
            "id = \"{agent_id}\"\ncache = \"{cache_addr}\"\ndata_dir = \"{}\"\nroot_ca = \"{}\"\n",
            d.join("agent").display(),
            d.join("cp/root.crt").display()
        ),
    );
    let path = cfg.clone();
    let run = move |token: Option<&str>| {
        let mut c = Command::new(bin("lattice-agent"));
        c.args(["--config", path.to_str().expect("utf8")])
            .args(["token", "--audience", "https://api.example.com"])
            .args(["--scope", "read"])
            .env("RUST_LOG", "warn");
        if let Some(t) = token {
            c.env("LATTICE_AGENT_JOIN_TOKEN", t);
        }
        run_ok(&mut c)
    };
    (cfg, run)
}

/// The claims of a compact JWS, unverified.
fn jwt_claims(jwt: &str) -> serde_json::Value {
    use base64::Engine;
    let parts: Vec<&str> = jwt.trim().split('.').collect();
    assert_eq!(parts.len(), 3, "a compact JWS: {jwt}");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .expect("b64"),
    )
    .expect("json")
}

/// `lattice-cp` on 127.0.0.1:0 with its data under `d/cp` (configuration
/// written to `d/cp.toml`).
fn cp_command(d: &Path) -> Command {
    let cfg = write(
        &d.join("cp.toml"),
        &format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
            d.join("cp").display()
        ),
    );
    let mut cmd = Command::new(bin("lattice-cp"));
    cmd.args(["--config", cfg.to_str().expect("utf8")]);
    cmd
}
