//! Labs on real network namespaces (`clusterctl lab up --netns`), for tests that run as root.
//!
//! [`require_netns`] decides whether such a test can run: it needs root and the `ip` and `nft`
//! commands. Outside CI a test without them is skipped with a printed note; in CI (`CI` set)
//! it fails with the reason, so a missing tool is never a silent pass.

use crate::{run_cli, CliOutput, LabNode, LabState, CLI_TIMEOUT};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why this machine cannot build netns labs, if it cannot.
pub fn netns_unsupported() -> Option<String> {
    let uid_is_root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false);
    if !uid_is_root {
        return Some("netns labs need root".into());
    }
    for (tool, pkg) in [("ip", "iproute2"), ("nft", "nftables")] {
        let ok = Command::new(tool)
            .arg("-V")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some(format!("the `{tool}` command is missing (install {pkg})"));
        }
    }
    None
}

/// Whether a netns test can run here. In CI (`CI` set and not `false`) a missing requirement
/// fails the test; elsewhere it prints a note and returns false (the test then returns).
#[track_caller]
pub fn require_netns(test: &str) -> bool {
    let Some(why) = netns_unsupported() else {
        return true;
    };
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    if ci {
        panic!("{test} needs a machine that can build netns labs and CI must provide one: {why}");
    }
    eprintln!("note: skipping {test}: {why}");
    false
}

/// A netns lab in a temporary directory; dropping it runs `lab down` (namespaces, links,
/// agents) and removes the directory.
#[derive(Debug)]
pub struct NetnsLab {
    bin: PathBuf,
    tmp: Option<tempfile::TempDir>,
    dir: PathBuf,
    nodes: Vec<LabNode>,
    /// The `lab up` run.
    pub up: CliOutput,
}

impl NetnsLab {
    /// `lab up --netns` with `extra` arguments (e.g. `--gateways 2`); panics with the output
    /// when it does not exit 0.
    pub fn up(bin: &Path, extra: &[&str]) -> NetnsLab {
        let tmp = tempfile::Builder::new()
            .prefix("clusterctl-netns-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let dir = tmp.path().join("lab");
        let mut args: Vec<String> = ["lab", "up", "--netns", "--wait", "90", "--dir"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(dir.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        let up = run_cli(bin, &dir, &args, CLI_TIMEOUT);
        let mut lab = NetnsLab {
            bin: bin.to_path_buf(),
            tmp: Some(tmp),
            dir,
            nodes: Vec::new(),
            up,
        };
        if lab.up.code != Some(0) {
            panic!("the netns lab did not come up\n{}", lab.up.describe());
        }
        lab.nodes = lab.read_nodes();
        lab
    }

    /// The lab directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Nodes as recorded in `lab.json` (re-read: `lab fault restart` changes pids).
    pub fn nodes(&self) -> Vec<LabNode> {
        self.read_nodes()
    }

    /// `lab.json` as JSON.
    pub fn state(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.dir.join("lab.json")).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    /// Runs `clusterctl ARGS` against this lab.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        run_cli(&self.bin, &self.dir, &args, CLI_TIMEOUT)
    }

    /// `lab down` of this lab.
    pub fn down(&self) -> CliOutput {
        self.cli(&["lab", "down", "--dir", &self.dir.display().to_string()])
    }

    fn read_nodes(&self) -> Vec<LabNode> {
        LabState::load(&self.dir)
            .ok()
            .flatten()
            .map(|s| s.nodes)
            .unwrap_or_default()
    }
}

impl Drop for NetnsLab {
    fn drop(&mut self) {
        if self.dir.join("lab.json").exists() {
            let down = self.down();
            if down.code != Some(0) {
                eprintln!("cleanup: {}", down.describe());
            }
        }
        if let Some(tmp) = self.tmp.take() {
            if std::env::var_os("CLUSTERCTL_TEST_KEEP").is_some_and(|v| !v.is_empty()) {
                eprintln!("keeping lab directory {}", tmp.keep().display());
            }
        }
    }
}

/// Names of the network namespaces of this machine.
pub fn netns_names() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `clusterctl ARGS` with `lab_dir` as `CLUSTERCTL_LAB_DIR` (for drills, which make their
/// own labs).
pub fn run_clusterctl(
    bin: &Path,
    lab_dir: &Path,
    args: &[&str],
    timeout: std::time::Duration,
) -> CliOutput {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    run_cli(bin, lab_dir, &args, timeout)
}
