//! Test harness: real clusters of real `clusterctl` processes on loopback.
//!
//! - [`Lab`]: `clusterctl lab up` in a temporary directory on an address range of its own,
//!   the CLI pointed at it ([`Lab::cli`]), node processes to kill, signal and restart, and a
//!   polling helper ([`Lab::wait_for`]) whose failure message carries the lab's logs. Dropping a
//!   `Lab` runs `lab down`, stops every agent the harness itself started and removes the
//!   directory.
//! - [`CliOutput`]: one finished CLI run, with helpers to check its exit code and read its JSON.
//! - [`handshake`]: a raw peer that dials an agent with chosen credentials and a hand-made
//!   hello, for the negative security tests.
//! - [`netns`]: labs on real network namespaces (`lab up --netns`) and [`netns::require_netns`],
//!   which fails a test in CI when the machine cannot build them.
//!
//! The harness only ever signals processes it can prove are its own: agents recorded in the
//! lab's `lab.json` (pid *and* start time must match) and children it spawned itself.
//!
//! Set `CLUSTERCTL_TEST_KEEP=1` to keep lab directories (configs, data, agent logs) after a run.

#![forbid(unsafe_code)]

pub mod handshake;
pub mod netns;

pub use clusterctl::lab::state::{LabNode, LabState};
use clusterctl_api::{Event, Members, NodeStatus, Topology};
use serde::de::DeserializeOwned;
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Default time [`Lab::wait_for`] callers give the cluster: generous, for a loaded 2-core machine
/// running several labs at once.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);
/// `--wait` of `lab up`, in seconds.
const LAB_UP_WAIT_SECS: u64 = 90;
/// Longest a single CLI command may run before it counts as hung.
const CLI_TIMEOUT: Duration = Duration::from_secs(150);
/// Pause between two polls of [`Lab::wait_for`].
const POLL: Duration = Duration::from_millis(250);
/// Lines of each agent log quoted in failure messages.
const LOG_TAIL_LINES: usize = 12;
/// Lowest and highest second octet handed out for lab address ranges (`127.N.0.0/16`).
const FIRST_OCTET: u32 = 100;
const LAST_OCTET: u32 = 254;
/// Address reserved in each handed-out range while its lab lives (site 255 never exists: a lab
/// has at most 16 sites), so two test processes never pick the same range.
const RESERVATION_THIRD_OCTET: u8 = 255;
const RESERVATION_PORT: u16 = 7499;

/// How to shape a lab; the defaults are those of `clusterctl lab up`.
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// `--sites`, e.g. `us-east=2,eu-west=2`.
    pub sites: Option<String>,
    /// `--gateways` per site.
    pub gateways: Option<u32>,
}

/// A finished CLI run.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// The arguments, for messages.
    pub args: Vec<String>,
    /// Exit code; `None` when a signal ended the process.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// The command, its exit code and both outputs, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "`clusterctl {}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args.join(" "),
            self.code
                .map_or_else(|| "a signal".to_string(), |c| c.to_string()),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }

    /// Panics unless the command exited with `code`.
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "{}", self.describe());
        self
    }

    /// Panics unless the command exited with 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        self.assert_code(0)
    }

    /// Decodes stdout as one JSON value (whatever the exit code).
    #[track_caller]
    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("stdout is not the expected JSON ({e})\n{}", self.describe())
        })
    }

    /// Decodes stdout as one JSON value per non-empty line.
    #[track_caller]
    pub fn json_lines<T: DeserializeOwned>(&self) -> Vec<T> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!(
                        "line {l:?} is not the expected JSON ({e})\n{}",
                        self.describe()
                    )
                })
            })
            .collect()
    }
}

/// An agent the harness started itself (see [`Lab::start_agent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedAgent {
    pub name: String,
    pub pid: u32,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

#[derive(Debug)]
struct Extra {
    name: String,
    child: Child,
    log: PathBuf,
    /// Set once the child has been waited for.
    status: Option<ExitStatus>,
}

/// A running lab: `clusterctl lab up` in a temporary directory, on its own address range.
#[derive(Debug)]
pub struct Lab {
    bin: PathBuf,
    tmp: Option<tempfile::TempDir>,
    dir: PathBuf,
    prefix: String,
    nodes: Vec<LabNode>,
    extra: Vec<Extra>,
    /// Holds the address range against other test processes while the lab lives.
    _reservation: TcpListener,
}

impl Lab {
    /// Generates and starts a lab with `bin` (the `clusterctl` binary under test) and waits until
    /// it has converged. Panics, with the lab's logs, when it does not.
    pub fn up(bin: &Path, opts: LabOptions) -> Lab {
        let tmp = tempfile::Builder::new()
            .prefix("clusterctl-lab-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let dir = tmp.path().join("lab");
        // Another process (a lab started by hand, say) may hold the range we picked: `lab up`
        // then refuses before touching anything, and the next free range is tried.
        for _ in 0..20 {
            let (prefix, reservation) = reserve_prefix();
            let mut args = vec![
                "lab".to_string(),
                "up".into(),
                "--dir".into(),
                dir.display().to_string(),
                "--addr-prefix".into(),
                prefix.clone(),
                "--wait".into(),
                LAB_UP_WAIT_SECS.to_string(),
            ];
            if let Some(s) = &opts.sites {
                args.extend(["--sites".to_string(), s.clone()]);
            }
            if let Some(g) = opts.gateways {
                args.extend(["--gateways".to_string(), g.to_string()]);
            }
            let out = run_cli(bin, &dir, &args, CLI_TIMEOUT);
            if out.code == Some(2) && out.stderr.contains("cannot use") && !dir.exists() {
                continue;
            }
            let mut lab = Lab {
                bin: bin.to_path_buf(),
                tmp: Some(tmp),
                dir,
                prefix,
                nodes: Vec::new(),
                extra: Vec::new(),
                _reservation: reservation,
            };
            if out.code != Some(0) {
                panic!(
                    "the lab did not come up\n{}\n{}",
                    out.describe(),
                    lab.diagnostics()
                );
            }
            lab.nodes = lab.read_lab_file();
            return lab;
        }
        panic!("no free loopback address range for a lab after 20 tries");
    }

    /// The lab directory (`--dir`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The lab's control token of `scope` (`read`, `app` or `admin`).
    #[track_caller]
    pub fn token(&self, scope: &str) -> String {
        let path = self.dir.join("tokens").join(format!("{scope}.token"));
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
            .trim()
            .to_string()
    }

    /// Runs `clusterctl ARGS` as user `uid` (through `setpriv`), with `env` added, from a copy
    /// of the binary that user may execute. Nothing of the lab is readable by that user unless a
    /// test makes it so.
    pub fn cli_as(&self, uid: u32, env: &[(&str, &str)], args: &[&str]) -> CliOutput {
        let bin = self
            .dir
            .parent()
            .unwrap_or(&self.dir)
            .join("bin-for-others");
        if !bin.exists() {
            use std::os::unix::fs::PermissionsExt;
            let copy = || -> std::io::Result<()> {
                std::fs::create_dir_all(&bin)?;
                std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
                if let Some(p) = bin.parent() {
                    let mode = std::fs::metadata(p)?.permissions().mode();
                    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode | 0o011))?;
                }
                std::fs::copy(&self.bin, bin.join("clusterctl"))?;
                std::fs::set_permissions(
                    bin.join("clusterctl"),
                    std::fs::Permissions::from_mode(0o755),
                )
            };
            copy().unwrap_or_else(|e| panic!("cannot copy the binary for uid {uid}: {e}"));
        }
        let mut full = vec![
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".to_string(),
            bin.join("clusterctl").display().to_string(),
        ];
        full.extend(args.iter().map(|a| a.to_string()));
        run_cli_with(Path::new("setpriv"), &self.dir, &full, env, CLI_TIMEOUT)
    }

    /// `GET /metrics` of node `name` on its TCP control address, with the lab's read token.
    pub fn metrics_text(&self, name: &str) -> Result<String, String> {
        let url = format!("http://{}/metrics", self.node(name).control);
        ureq::get(&url)
            .header("Authorization", &format!("Bearer {}", self.token("read")))
            .call()
            .map_err(|e| format!("{url}: {e}"))?
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("{url}: {e}"))
    }

    /// The address prefix, e.g. `127.103`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every node, as `lab up` recorded them.
    pub fn nodes(&self) -> &[LabNode] {
        &self.nodes
    }

    /// The node named `name`; panics if the lab has none.
    #[track_caller]
    pub fn node(&self, name: &str) -> &LabNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("the lab has no node {name:?}"))
    }

    /// Runs `clusterctl ARGS` against this lab (`CLUSTERCTL_LAB_DIR` set, no
    /// `CLUSTERCTL_AGENT` inherited). Panics if it runs longer than a generous guard.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        self.cli_within(CLI_TIMEOUT, args)
    }

    /// Like [`Lab::cli`], for a command that must finish within `timeout` (it is killed, and the
    /// test fails, if it does not).
    pub fn cli_within(&self, timeout: Duration, args: &[&str]) -> CliOutput {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        run_cli(&self.bin, &self.dir, &args, timeout)
    }

    /// Runs `clusterctl ARGS` and decodes its stdout as JSON, whatever the exit code.
    #[track_caller]
    pub fn cli_json<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        self.cli(args).json()
    }

    /// `topology --json` as seen by `agent`, with the exit code.
    #[track_caller]
    pub fn topology(&self, agent: &str) -> (Option<i32>, Topology) {
        let out = self.cli(&["topology", "--json", "--agent", agent]);
        (out.code, out.json())
    }

    /// `members --json` as seen by `agent` (exit 0 required).
    #[track_caller]
    pub fn members(&self, agent: &str) -> Members {
        let out = self.cli(&["members", "--json", "--agent", agent]);
        out.assert_success();
        out.json()
    }

    /// Waits until every node of the lab lists every node of the lab `alive`.
    ///
    /// `lab up` judges convergence from one node's view; a test that asks other nodes right
    /// away (a ping from a member of another site, a node's table on disk) waits for this first.
    #[track_caller]
    pub fn wait_converged(&self) {
        let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        for observer in &names {
            self.wait_for(
                &format!("{observer} to see every node of the lab alive"),
                DEFAULT_WAIT,
                || {
                    let m = self.try_members(observer)?;
                    let all_alive = names.iter().all(|name| {
                        m.members
                            .iter()
                            .any(|r| r.name == *name && r.status == NodeStatus::Alive)
                    });
                    if all_alive {
                        Ok(())
                    } else {
                        Err(serde_json::to_string_pretty(&m).unwrap_or_default())
                    }
                },
            );
        }
    }

    /// `members --json` as seen by `agent`, or the failure as text (the agent may be starting).
    pub fn try_members(&self, agent: &str) -> Result<Members, String> {
        let out = self.cli(&["members", "--json", "--agent", agent]);
        if out.code != Some(0) {
            return Err(out.describe());
        }
        serde_json::from_str(&out.stdout).map_err(|e| format!("{e}\n{}", out.describe()))
    }

    /// Every event `agent` recorded so far (`events --once --json`; exit 0 required).
    #[track_caller]
    pub fn events(&self, agent: &str) -> Vec<Event> {
        let out = self.cli(&["events", "--once", "--json", "--agent", agent]);
        out.assert_success();
        out.json_lines()
    }

    /// The pid of the process currently standing for `name`: the last agent the harness started
    /// for it, else the one `lab up` started.
    #[track_caller]
    pub fn pid(&self, name: &str) -> u32 {
        match self.extra.iter().rev().find(|e| e.name == name) {
            Some(e) => e.child.id(),
            None => self.node(name).pid,
        }
    }

    /// Whether the process standing for `name` runs.
    #[track_caller]
    pub fn is_running(&mut self, name: &str) -> bool {
        match self.extra.iter_mut().rev().find(|e| e.name == name) {
            Some(e) => {
                if e.status.is_some() {
                    return false;
                }
                match e.child.try_wait() {
                    Ok(None) => true,
                    Ok(Some(s)) => {
                        e.status = Some(s);
                        false
                    }
                    Err(_) => false,
                }
            }
            None => {
                let n = self.node(name);
                process_is_running(n.pid, n.pid_start)
            }
        }
    }

    /// Sends `SIG` (e.g. `TERM`) to the process standing for `name` with kill(1).
    #[track_caller]
    pub fn signal(&mut self, name: &str, sig: &str) {
        assert!(
            self.is_running(name),
            "{name} is not running: nothing to send SIG{sig} to"
        );
        let pid = self.pid(name);
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill(1): {e}"));
        assert!(status.success(), "kill -{sig} {pid} failed: {status}");
    }

    /// Kills the process standing for `name` with SIGKILL and waits until it is gone.
    #[track_caller]
    pub fn kill9(&mut self, name: &str) {
        self.signal(name, "KILL");
        self.wait_until(
            &format!("{name} to be gone after SIGKILL"),
            Duration::from_secs(20),
            || !self.is_running_ro(name),
        );
        if let Some(e) = self.extra.iter_mut().rev().find(|e| e.name == name) {
            if e.status.is_none() {
                e.status = e.child.wait().ok();
            }
        }
    }

    /// Like [`Lab::is_running`] without reaping (for closures that borrow the lab).
    fn is_running_ro(&self, name: &str) -> bool {
        match self.extra.iter().rev().find(|e| e.name == name) {
            Some(e) => e.status.is_none() && process_is_running(e.child.id(), 0),
            None => {
                let n = self.node(name);
                process_is_running(n.pid, n.pid_start)
            }
        }
    }

    /// Starts `clusterctl agent --config CONFIG EXTRA...` for lab node `name` with its own
    /// config; stdout and stderr go to a new file in the node's directory.
    #[track_caller]
    pub fn start_agent(&mut self, name: &str, extra_args: &[&str]) -> StartedAgent {
        let config = self.node(name).config.clone();
        self.start_agent_with_config(name, &config, extra_args)
    }

    /// Starts `clusterctl agent --config CONFIG EXTRA...`, recorded as standing for `name`.
    #[track_caller]
    pub fn start_agent_with_config(
        &mut self,
        name: &str,
        config: &Path,
        extra_args: &[&str],
    ) -> StartedAgent {
        let dir = self.node(name).dir();
        let n = self.extra.iter().filter(|e| e.name == name).count() + 1;
        let log = dir.join(format!("agent-restart-{n}.log"));
        let file = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let file2 = file
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone a file handle: {e}"));
        let child = Command::new(&self.bin)
            .arg("agent")
            .arg("--config")
            .arg(config)
            .args(extra_args)
            .env_remove("CLUSTERCTL_AGENT")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        let started = StartedAgent {
            name: name.to_string(),
            pid: child.id(),
            log: log.clone(),
        };
        self.extra.push(Extra {
            name: name.to_string(),
            child,
            log,
            status: None,
        });
        started
    }

    /// Waits until `agent` exits by itself and returns how it exited; panics after `timeout`.
    #[track_caller]
    pub fn wait_exit(&mut self, agent: &StartedAgent, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let e = self
                .extra
                .iter_mut()
                .find(|e| e.child.id() == agent.pid)
                .unwrap_or_else(|| panic!("{agent:?} was not started by this lab"));
            if let Some(s) = e.status {
                return s;
            }
            match e.child.try_wait() {
                Ok(Some(s)) => {
                    e.status = Some(s);
                    return s;
                }
                Ok(None) => {}
                Err(err) => panic!("cannot wait for {agent:?}: {err}"),
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} (pid {}) did not exit within {timeout:?}\n{}",
                    agent.name,
                    agent.pid,
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `f` until it returns true; panics after `timeout` with `what`, the lab directory and
    /// the tail of every agent log.
    #[track_caller]
    pub fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        self.wait_for(
            what,
            timeout,
            || if f() { Ok(()) } else { Err(String::new()) },
        )
    }

    /// Polls `f` until it returns `Ok`; panics after `timeout` with `what`, the last `Err` (the
    /// state last seen), the lab directory and the tail of every agent log.
    #[track_caller]
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Result<T, String>,
    ) -> T {
        let start = Instant::now();
        loop {
            let last = match f() {
                Ok(v) => return v,
                Err(e) => e,
            };
            if start.elapsed() >= timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\nlast seen: {last}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The lab directory and the last lines of every agent log, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut s = format!(
            "lab directory: {} (prefix {})\n",
            self.dir.display(),
            self.prefix
        );
        let mut logs: Vec<PathBuf> = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("nodes")) {
            let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            dirs.sort();
            for d in dirs {
                logs.push(d.join("agent.log"));
            }
        }
        logs.extend(self.extra.iter().map(|e| e.log.clone()));
        for log in logs {
            let _ = writeln!(s, "--- last lines of {} ---", log.display());
            for line in log_tail(&log, LOG_TAIL_LINES) {
                let _ = writeln!(s, "  {line}");
            }
        }
        s
    }

    /// `lab down` of this lab.
    pub fn down(&self) -> CliOutput {
        let args = [
            "lab".to_string(),
            "down".into(),
            "--dir".into(),
            self.dir.display().to_string(),
        ];
        run_cli(&self.bin, &self.dir, &args, CLI_TIMEOUT)
    }

    fn read_lab_file(&self) -> Vec<LabNode> {
        let path = self.dir.join("lab.json");
        LabState::load(&self.dir)
            .unwrap_or_else(|e| panic!("{e:#}"))
            .unwrap_or_else(|| panic!("cannot read {}: no such file", path.display()))
            .nodes
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let down = self.down();
        if down.code != Some(0) {
            eprintln!("cleanup: {}", down.describe());
        }
        for e in &mut self.extra {
            if e.status.is_none() {
                // Never waited for, so the pid still belongs to this child.
                let _ = e.child.kill();
                e.status = e.child.wait().ok();
            }
        }
        if let Some(tmp) = self.tmp.take() {
            if std::env::var_os("CLUSTERCTL_TEST_KEEP").is_some_and(|v| !v.is_empty()) {
                eprintln!("keeping lab directory {}", tmp.keep().display());
            }
        }
    }
}

/// Picks an address range no other lab of this or any other test process uses, and holds it.
fn reserve_prefix() -> (String, TcpListener) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = LAST_OCTET - FIRST_OCTET + 1;
    // Spread test processes over the ranges so that they rarely even try the same one.
    let base = (std::process::id() % span) * 7;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let octet = FIRST_OCTET + (base + n) % span;
        let octet = u8::try_from(octet).unwrap_or(u8::MAX - 1);
        let addr = SocketAddrV4::new(
            Ipv4Addr::new(127, octet, RESERVATION_THIRD_OCTET, 1),
            RESERVATION_PORT,
        );
        if let Ok(l) = TcpListener::bind(addr) {
            return (format!("127.{octet}"), l);
        }
    }
    panic!("every loopback range 127.{FIRST_OCTET}-127.{LAST_OCTET} is taken by another lab");
}

/// Runs the binary with a time guard; both outputs are captured.
fn run_cli(bin: &Path, lab_dir: &Path, args: &[String], timeout: Duration) -> CliOutput {
    run_cli_with(bin, lab_dir, args, &[], timeout)
}

/// [`run_cli`] with environment variables added.
fn run_cli_with(
    bin: &Path,
    lab_dir: &Path,
    args: &[String],
    env: &[(&str, &str)],
    timeout: Duration,
) -> CliOutput {
    let mut child = Command::new(bin)
        .args(args)
        .env("CLUSTERCTL_LAB_DIR", lab_dir)
        .env_remove("CLUSTERCTL_AGENT")
        .env_remove("CLUSTERCTL_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = child.stdout.take().map(|s| reader(Box::new(s)));
    let err = child.stderr.take().map(|s| reader(Box::new(s)));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`clusterctl {}` did not finish within {timeout:?}",
                    args.join(" ")
                );
            }
            Err(e) => panic!("cannot wait for `clusterctl {}`: {e}", args.join(" ")),
        }
    };
    let join = |h: Option<std::thread::JoinHandle<String>>| {
        h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    };
    CliOutput {
        args: args.to_vec(),
        code: status.code(),
        stdout: join(out),
        stderr: join(err),
    }
}

/// Whether `pid` is a live (not zombie) process; with `start` non-zero, also that it is the
/// process that started at that time (field 22 of /proc/PID/stat), not a later one with a
/// reused pid.
pub fn process_is_running(pid: u32, start: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Field 2 (the command name) is in parentheses and may hold spaces.
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let state = fields.first().copied().unwrap_or("");
    if state == "Z" || state == "X" {
        return false;
    }
    start == 0 || fields.get(22 - 3).and_then(|f| f.parse().ok()) == Some(start)
}

/// The last `n` lines of a file (reads at most its last 64 KiB).
pub fn log_tail(path: &Path, n: usize) -> Vec<String> {
    const TAIL_BYTES: u64 = 64 << 10;
    let Ok(mut f) = std::fs::File::open(path) else {
        return vec![format!("(cannot read {})", path.display())];
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = f.take(TAIL_BYTES).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// `GET http://ADDR/PATH` on an agent's TCP control API with `token`, decoded as JSON.
pub fn http_get_json<T: DeserializeOwned>(
    addr: &str,
    path: &str,
    token: &str,
) -> Result<T, String> {
    let url = format!("http://{addr}{path}");
    let mut resp = ureq::get(&url)
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .map_err(|e| format!("{url}: {e}"))?;
    resp.body_mut()
        .read_json::<T>()
        .map_err(|e| format!("{url}: {e}"))
}
