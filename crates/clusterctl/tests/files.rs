//! The agent's files: one agent per data directory, secret and key files owned by the agent's
//! user (or root) and readable by it only, a CA key nobody else can read, and a damaged
//! snapshot caught by preflight as the agent would catch it. The real binary, on files in
//! temporary directories (CI runs as root: the "another user" cases give files to uid 65534).

use clusterctl_testkit::CliOutput;
use serde::Deserialize;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Generous bound for an agent to start (or to refuse to) on a loaded machine.
const START: Duration = Duration::from_secs(30);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_clusterctl"))
}

fn is_root() -> bool {
    clusterctl_node::files::current_uid() == 0
}

/// Runs `clusterctl ARGS` in `dir`, without any lab or agent from the environment; killed
/// after `limit`.
fn cli_within(dir: &Path, limit: Duration, args: &[&str]) -> CliOutput {
    let mut child = Command::new(bin())
        .args(args)
        .current_dir(dir)
        .env("CLUSTERCTL_LAB_DIR", dir.join("no-lab"))
        .env_remove("CLUSTERCTL_AGENT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the clusterctl binary runs");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("clusterctl {args:?} still ran after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    CliOutput {
        args: args.iter().map(|a| a.to_string()).collect(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn cli(dir: &Path, args: &[&str]) -> CliOutput {
    cli_within(dir, START, args)
}

/// A UDP and a TCP port on loopback that are free right now.
fn free_ports() -> (u16, u16) {
    let udp = UdpSocket::bind(("127.0.0.1", 0)).expect("a free UDP port");
    let tcp = TcpListener::bind(("127.0.0.1", 0)).expect("a free TCP port");
    (
        udp.local_addr().expect("bound").port(),
        tcp.local_addr().expect("bound").port(),
    )
}

const CONTRACT: &str = r#"
cluster = "prod"
[[site]]
name = "us-east"
gateways = ["gw-us-1"]
nodes = ["gw-us-1", "edge-us-1"]
"#;

/// A CA, a certificate for edge-us-1, a secret, a contract and a config made with the CLI:
/// `etc/node.toml` with data directory `data/`.
struct Deploy {
    tmp: tempfile::TempDir,
}

#[derive(Debug, Deserialize)]
struct Report {
    checks: Vec<CheckView>,
}

#[derive(Debug, Deserialize)]
struct CheckView {
    name: String,
    status: String,
    detail: String,
    fix: Option<String>,
}

impl Deploy {
    fn new() -> Deploy {
        let tmp = tempfile::tempdir().expect("a temporary directory");
        let d = tmp.path();
        cli(d, &["certs", "init", "--dir", "ca", "--cluster", "prod"]).assert_success();
        cli(
            d,
            &[
                "certs",
                "issue",
                "edge-us-1",
                "--site",
                "us-east",
                "--role",
                "member",
                "--ca-dir",
                "ca",
                "--out",
                "etc",
            ],
        )
        .assert_success();
        cli(d, &["secret", "generate", "etc/cluster.secret"]).assert_success();
        std::fs::write(d.join("etc/contract.toml"), CONTRACT).expect("write the contract");
        let deploy = Deploy { tmp };
        deploy.write_config("node.toml");
        deploy
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The data directory as the agent resolves it (relative to the config's directory).
    fn data(&self) -> PathBuf {
        self.dir().join("etc/../data")
    }

    fn key(&self) -> PathBuf {
        self.dir().join("etc/edge-us-1.key")
    }

    fn secret(&self) -> PathBuf {
        self.dir().join("etc/cluster.secret")
    }

    /// Writes `etc/NAME`, a config of edge-us-1 on ports of its own, data directory `data/`.
    fn write_config(&self, name: &str) -> PathBuf {
        let (listen, _) = free_ports();
        let text = format!(
            "cluster = \"prod\"\nname = \"edge-us-1\"\nsite = \"us-east\"\nrole = \"member\"\n\
             listen = \"127.0.0.1:{listen}\"\n\
             data-dir = \"../data\"\ncontract = \"contract.toml\"\nsecret = \"cluster.secret\"\n\n\
             [tls]\nca = \"../ca/ca.pem\"\ncert = \"edge-us-1.pem\"\nkey = \"edge-us-1.key\"\n"
        );
        let path = self.dir().join("etc").join(name);
        std::fs::write(&path, text).expect("write the config");
        path
    }

    fn config(&self) -> PathBuf {
        self.dir().join("etc/node.toml")
    }

    fn preflight(&self) -> (CliOutput, Report) {
        let cfg = self.config().display().to_string();
        let out = cli(self.dir(), &["preflight", "--config", &cfg, "--json"]);
        let report = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("not a report ({e})\n{}", out.describe()));
        (out, report)
    }

    /// `clusterctl agent --config CONFIG` in the background, output to `LOG`.
    fn spawn_agent(&self, config: &Path, log: &str) -> (Child, PathBuf) {
        let log = self.dir().join(log);
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin())
            .args(["agent", "--config"])
            .arg(config)
            .current_dir(self.dir())
            .env_remove("CLUSTERCTL_AGENT")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone"))
            .stderr(file)
            .spawn()
            .expect("the agent runs");
        (child, log)
    }

    /// Runs the agent of `etc/node.toml`, which must refuse to start: its exit code and output.
    fn refused_agent(&self) -> CliOutput {
        let cfg = self.config().display().to_string();
        cli(self.dir(), &["agent", "--config", &cfg])
    }
}

impl Report {
    #[track_caller]
    fn check(&self, name: &str) -> &CheckView {
        self.checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name:?} in {:#?}", self.checks))
    }
}

/// Ends a child this test started, however the test ends.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The lines of `out`'s stderr that are not log lines of the agent (which start with a time).
fn plain_lines(out: &CliOutput) -> Vec<&str> {
    out.stderr
        .lines()
        .filter(|l| l.starts_with("clusterctl"))
        .collect()
}

#[test]
fn a_second_agent_on_the_same_data_directory_exits_2_naming_the_holder() {
    let d = Deploy::new();
    let (first, log) = d.spawn_agent(&d.config(), "first.log");
    let mut first = Reap(first);
    let pid = first.0.id();
    let deadline = Instant::now() + START;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("agent started")
    {
        assert!(
            first.0.try_wait().expect("wait").is_none(),
            "the first agent stopped: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "the first agent did not start");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Other ports, the same data directory.
    let second = d.write_config("second.toml");
    let cfg = second.display().to_string();
    let out = cli(d.dir(), &["agent", "--config", &cfg]);
    out.assert_code(2);
    let lines = plain_lines(&out);
    assert_eq!(lines.len(), 1, "{}", out.describe());
    let line = lines[0];
    for needle in [
        d.data().display().to_string(),
        "is in use by another agent".to_string(),
        format!("pid {pid}"),
        d.config().display().to_string(),
    ] {
        assert!(line.contains(&needle), "{needle:?} missing: {line}");
    }
    assert!(!out.stderr.contains("agent started"), "{}", out.describe());
    // The same config (the same ports too): the lock is taken before any port is bound, so
    // the line names the holder, not a busy port.
    let out = d.refused_agent();
    out.assert_code(2);
    let lines = plain_lines(&out);
    assert_eq!(lines.len(), 1, "{}", out.describe());
    assert!(
        lines[0].contains(&format!("is in use by another agent (pid {pid} ")),
        "{}",
        out.describe()
    );

    // The first one keeps running, and still holds the directory.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        first.0.try_wait().expect("wait").is_none(),
        "the first agent stopped: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let lock = std::fs::read_to_string(d.data().join("lock")).expect("lock file");
    assert!(lock.starts_with(&format!("pid {pid} ")), "{lock}");

    // Once it is gone, the directory is free again.
    drop(first);
    let (again, log) = d.spawn_agent(&second, "again.log");
    let mut again = Reap(again);
    let deadline = Instant::now() + START;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("agent started")
    {
        assert!(
            again.0.try_wait().expect("wait").is_none(),
            "the agent did not start after the first one ended: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "the agent did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_agent_refuses_a_key_or_secret_readable_by_others_naming_the_chmod() {
    let d = Deploy::new();
    for (file, mode, check) in [
        (d.key(), 0o644, "key-file"),
        (d.key(), 0o640, "key-file"),
        (d.secret(), 0o640, "secret-file"),
    ] {
        chmod(&file, mode);
        let fix = format!("chmod 600 {}", file.display());
        let out = d.refused_agent();
        out.assert_code(2);
        let lines = plain_lines(&out);
        assert_eq!(lines.len(), 1, "{}", out.describe());
        assert!(
            lines[0].contains(&format!("{mode:04o}")) && lines[0].contains(&fix),
            "{}",
            out.describe()
        );
        let (pf, report) = d.preflight();
        pf.assert_code(1);
        let c = report.check(check);
        assert_eq!(c.status, "fail", "{}", pf.describe());
        assert!(c.detail.contains(&file.display().to_string()), "{c:?}");
        assert_eq!(c.fix.as_deref(), Some(fix.as_str()), "{c:?}");
        chmod(&file, 0o600);
    }
    let (pf, report) = d.preflight();
    pf.assert_success();
    assert_eq!(report.check("key-file").status, "pass");

    // `agent --secret FILE` holds its file to the same rule.
    cli(d.dir(), &["secret", "generate", "etc/next.secret"]).assert_success();
    let next = d.dir().join("etc/next.secret");
    chmod(&next, 0o640);
    let cfg = d.config().display().to_string();
    let out = cli(
        d.dir(),
        &[
            "agent",
            "--config",
            &cfg,
            "--secret",
            &next.display().to_string(),
        ],
    );
    out.assert_code(2);
    let lines = plain_lines(&out);
    assert_eq!(lines.len(), 1, "{}", out.describe());
    assert!(
        lines[0].contains(&format!("chmod 600 {}", next.display())),
        "{}",
        out.describe()
    );
}

#[test]
fn the_agent_refuses_a_key_or_secret_owned_by_another_user_naming_the_chown() {
    if !is_root() {
        eprintln!("note: needs root to give files to another user; skipped");
        return;
    }
    let d = Deploy::new();
    for (file, check) in [(d.key(), "key-file"), (d.secret(), "secret-file")] {
        // Mode 0600 and readable by root, but another user's file.
        std::os::unix::fs::chown(&file, Some(65534), None).expect("chown");
        let fix = format!("chown root {}", file.display());
        let out = d.refused_agent();
        out.assert_code(2);
        let lines = plain_lines(&out);
        assert_eq!(lines.len(), 1, "{}", out.describe());
        assert!(
            lines[0].contains("uid 65534") && lines[0].contains(&fix),
            "{}",
            out.describe()
        );
        let (pf, report) = d.preflight();
        pf.assert_code(1);
        let c = report.check(check);
        assert_eq!(c.status, "fail", "{}", pf.describe());
        assert_eq!(c.fix.as_deref(), Some(fix.as_str()), "{c:?}");
        std::os::unix::fs::chown(&file, Some(0), None).expect("chown");
    }
}

#[test]
fn certs_issue_refuses_a_ca_key_readable_by_others_naming_the_chmod() {
    let d = Deploy::new();
    for mode in [0o640, 0o644] {
        chmod(&d.dir().join("ca/ca.key"), mode);
        let out = cli(
            d.dir(),
            &[
                "certs", "issue", "gw-us-1", "--site", "us-east", "--role", "gateway", "--ca-dir",
                "ca", "--out", "etc",
            ],
        );
        out.assert_code(2);
        assert!(
            out.stderr
                .contains(&format!("ca/ca.key has mode {mode:04o}"))
                && out.stderr.contains("chmod 600 ca/ca.key"),
            "{}",
            out.describe()
        );
        assert!(!d.dir().join("etc/gw-us-1.pem").exists());
        assert!(!d.dir().join("etc/gw-us-1.key").exists());
    }
    chmod(&d.dir().join("ca/ca.key"), 0o600);
    cli(
        d.dir(),
        &[
            "certs", "issue", "gw-us-1", "--site", "us-east", "--role", "gateway", "--ca-dir",
            "ca", "--out", "etc",
        ],
    )
    .assert_success();
}

#[test]
fn preflight_fails_a_damaged_snapshot_that_the_agent_refuses() {
    let d = Deploy::new();
    std::fs::create_dir_all(d.data()).expect("mkdir");
    clusterctl_node::persist::store(&d.data(), &[]).expect("a snapshot");
    let (pf, report) = d.preflight();
    pf.assert_success();
    assert_eq!(report.check("snapshot").status, "pass", "{}", pf.describe());

    let file = clusterctl_node::persist::snapshot_path(&d.data());
    let mut bytes = std::fs::read(&file).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&file, bytes).expect("write");

    let (pf, report) = d.preflight();
    pf.assert_code(1);
    let c = report.check("snapshot");
    assert_eq!(c.status, "fail", "{}", pf.describe());
    assert!(
        c.detail.contains(&file.display().to_string()) && c.detail.contains("checksum"),
        "{c:?}"
    );
    assert!(
        c.fix.as_deref().is_some_and(|f| f.starts_with(&format!(
            "mv {} {}.damaged",
            file.display(),
            file.display()
        ))),
        "{c:?}"
    );
    // The agent refuses the same file, with the same line.
    let out = d.refused_agent();
    out.assert_code(2);
    assert!(
        out.stderr.contains(&c.detail) && out.stderr.contains(c.fix.as_deref().unwrap_or("")),
        "{}",
        out.describe()
    );
}

/// Gives `path` and everything under it to `uid`.
fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).expect("chown");
    if path.is_dir() {
        for e in std::fs::read_dir(path).expect("read_dir") {
            chown_tree(&e.expect("entry").path(), uid);
        }
    }
}

#[test]
fn an_agent_of_another_user_than_root_names_its_own_user_in_the_chown() {
    let setpriv_runs = Command::new("setpriv")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !is_root() || !setpriv_runs {
        eprintln!("note: needs root and setpriv to run as another user; skipped");
        return;
    }
    let d = Deploy::new();
    // The deployment belongs to uid 65534, which runs the agent; the key to uid 65533.
    chown_tree(d.dir(), 65534);
    std::os::unix::fs::chown(d.key(), Some(65533), None).expect("chown");
    let user = clusterctl_node::files::user_name(65534);
    let fix = format!("chown {user} {}", d.key().display());
    let as_agent_user = |args: &[&str]| {
        let out = Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(bin())
            .args(args)
            .current_dir(d.dir())
            .env_remove("CLUSTERCTL_AGENT")
            .stdin(Stdio::null())
            .output()
            .expect("setpriv runs");
        CliOutput {
            args: args.iter().map(|a| a.to_string()).collect(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };
    let cfg = d.config().display().to_string();
    let pf = as_agent_user(&["preflight", "--config", &cfg, "--json"]);
    pf.assert_code(1);
    let report: Report = serde_json::from_str(&pf.stdout).expect("a report");
    let c = report.check("key-file");
    assert_eq!(c.status, "fail", "{}", pf.describe());
    assert!(
        c.detail.contains(&format!(
            "not by the agent's user {user} (uid 65534) or root"
        )),
        "{c:?}"
    );
    assert_eq!(c.fix.as_deref(), Some(fix.as_str()), "{c:?}");
    let out = as_agent_user(&["agent", "--config", &cfg]);
    out.assert_code(2);
    assert!(out.stderr.contains(&fix), "{}", out.describe());
}
