//! A lab's state file, `DIR/lab.json`: the agents a lab started ([`LabState`], [`LabNode`]), how
//! it is read and written, and whether a recorded process is still the agent the lab started.

use super::netns;
use crate::client::Endpoint;
use anyhow::{anyhow, bail, Context};
use clusterctl_api::Role;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

pub(super) const STATE_FILE: &str = "lab.json";
pub(super) const STATE_FORMAT: u32 = 1;
/// Format of a netns lab's `lab.json` (it has a `netns` section an older clusterctl would ignore).
pub(super) const STATE_FORMAT_NETNS: u32 = 2;
const MAX_STATE_BYTES: u64 = 4 << 20;

/// `DIR/lab.json`: the agents a lab started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    /// Version of this file's layout.
    pub format: u32,
    pub cluster: String,
    pub dir: PathBuf,
    /// Nodes whose agent was started, in start order.
    pub nodes: Vec<LabNode>,
    /// What `up --netns` created (namespaces, links, active faults); absent for a loopback lab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<netns::NetnsState>,
}

/// One started agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabNode {
    pub name: String,
    pub site: String,
    pub role: Role,
    /// Cluster address (QUIC, UDP).
    pub addr: String,
    /// Control API address (HTTP, TCP; needs a token of `DIR/tokens`).
    pub control: String,
    /// The agent's control socket (absolute); empty in a `lab.json` of an older clusterctl.
    #[serde(default)]
    pub socket: PathBuf,
    /// The config file the agent was started with (absolute).
    pub config: PathBuf,
    pub pid: u32,
    /// Start time of the process (field 22 of /proc/PID/stat, in clock ticks since boot).
    pub pid_start: u64,
}

impl LabState {
    /// Reads `DIR/lab.json`; `None` when there is none.
    pub fn load(dir: &Path) -> anyhow::Result<Option<LabState>> {
        let path = dir.join(STATE_FILE);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display())),
        };
        let mut bytes = Vec::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if bytes.len() as u64 > MAX_STATE_BYTES {
            bail!(
                "{} is larger than {MAX_STATE_BYTES} bytes: not a lab state file",
                path.display()
            );
        }
        let state: LabState = serde_json::from_slice(&bytes).map_err(|e| {
            anyhow!(
                "{} is damaged ({e}): stop its agents by hand (see DIR/nodes/*/config.toml in `ps` output), then remove the file",
                path.display()
            )
        })?;
        let want = if state.netns.is_some() {
            STATE_FORMAT_NETNS
        } else {
            STATE_FORMAT
        };
        if state.format != want {
            bail!(
                "{} has format {}, this clusterctl reads format {want}: use the clusterctl that made the lab",
                path.display(),
                state.format
            );
        }
        if let Some(ns) = &state.netns {
            ns.validate()
                .with_context(|| format!("{} is damaged", path.display()))?;
        }
        Ok(Some(state))
    }

    /// Writes `DIR/lab.json` atomically (temporary file, then rename).
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&tmp, text + "\n")
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Nodes whose agent is running: pid alive, same start time, and its command line names the
    /// node's config file.
    pub fn running_nodes(&self) -> Vec<&LabNode> {
        self.nodes.iter().filter(|n| n.is_running()).collect()
    }
}

impl LabNode {
    /// The node's directory (`DIR/nodes/NAME`): where its config file lives.
    pub fn dir(&self) -> PathBuf {
        self.config
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// Where the CLI reaches this node's agent: its control socket (no token needed by the
    /// lab's owner), else its TCP control address.
    pub fn endpoint(&self) -> Endpoint {
        if self.socket.as_os_str().is_empty() {
            Endpoint::Tcp(self.control.clone())
        } else {
            Endpoint::Socket(self.socket.clone())
        }
    }

    /// Whether the process recorded for this node is still the agent this lab started.
    pub fn is_running(&self) -> bool {
        proc_start_time(self.pid) == Some(self.pid_start) && cmdline_names(self.pid, &self.config)
    }
}

/// Field 22 (starttime) of /proc/PID/stat.
pub(super) fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 is the command name in parentheses and may itself hold spaces and ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts with field 3 (state), so field 22 is its 20th item.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Whether one argument of /proc/PID/cmdline is exactly `path`. A zombie has an empty cmdline.
fn cmdline_names(pid: u32, path: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = path.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::CLUSTER;

    #[test]
    fn lab_state_round_trips_and_absent_state_is_none() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(LabState::load(tmp.path()).unwrap().is_none());
        let state = LabState {
            format: STATE_FORMAT,
            cluster: CLUSTER.into(),
            dir: tmp.path().into(),
            nodes: vec![LabNode {
                name: "gw-us-1".into(),
                site: "us-east".into(),
                role: Role::Gateway,
                addr: "127.77.1.1:7400".into(),
                control: "127.77.1.1:7401".into(),
                socket: tmp.path().join("nodes/gw-us-1/data/control.sock"),
                config: tmp.path().join("nodes/gw-us-1/config.toml"),
                pid: u32::MAX,
                pid_start: 1,
            }],
            netns: None,
        };
        state.save(tmp.path()).unwrap();
        let back = LabState::load(tmp.path()).unwrap().unwrap();
        assert_eq!(back, state);
        assert!(back.running_nodes().is_empty());
        std::fs::write(tmp.path().join(STATE_FILE), "{").unwrap();
        assert!(LabState::load(tmp.path()).is_err());
    }

    #[test]
    fn lab_process_identity_needs_pid_start_time_and_config() {
        let pid = std::process::id();
        let start = proc_start_time(pid).unwrap();
        // This test process stands in for an agent: its first argument plays the config path.
        let arg0 = PathBuf::from(
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap()
                .split(|b| *b == 0)
                .next()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .unwrap(),
        );
        let node = LabNode {
            name: "n".into(),
            site: "s".into(),
            role: Role::Member,
            addr: String::new(),
            control: String::new(),
            socket: PathBuf::new(),
            config: arg0,
            pid,
            pid_start: start,
        };
        assert!(node.is_running());
        assert!(
            !LabNode {
                pid_start: start + 1,
                ..node.clone()
            }
            .is_running(),
            "pid reused"
        );
        assert!(!LabNode {
            config: "/other/config.toml".into(),
            ..node.clone()
        }
        .is_running());
    }
}
