//! Tests on real network namespaces: `lab up --netns`, `lab fault`, `lab drill`.
//!
//! They need root and the `ip` and `nft` commands ([`require_netns`]): in CI a missing
//! requirement fails the test; elsewhere the test prints a note and returns. Every lab is torn
//! down by its guard, also when a test fails.

use clusterctl_api::{Members, NodeStatus, PingReport, Topology};
use clusterctl_testkit::netns::{netns_names, require_netns, run_clusterctl, NetnsLab};
use clusterctl_testkit::process_is_running;
use std::path::Path;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_clusterctl"))
}

fn prefix(lab: &NetnsLab) -> String {
    lab.state()["netns"]["prefix"]
        .as_str()
        .expect("lab.json records the netns prefix")
        .to_string()
}

/// Polls `f` every 250 ms for at most `limit`; panics with `what` and the last value otherwise.
#[track_caller]
fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        let last = match f() {
            Ok(()) => return,
            Err(e) => e,
        };
        if start.elapsed() > limit {
            panic!("waited {limit:?} for {what}; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn status_seen_by(lab: &NetnsLab, observer: &str, node: &str) -> Result<NodeStatus, String> {
    let out = lab.cli(&["members", "--json", "--agent", observer]);
    if out.code != Some(0) {
        return Err(out.describe());
    }
    let m: Members = serde_json::from_str(&out.stdout).map_err(|e| e.to_string())?;
    m.members
        .iter()
        .find(|r| r.name == node)
        .map(|r| r.status)
        .ok_or_else(|| format!("{observer} does not list {node}"))
}

fn ping_ok(lab: &NetnsLab, from: &str, to: &str) -> bool {
    let out = lab.cli(&[
        "ping",
        to,
        "--agent",
        from,
        "--timeout-ms",
        "1000",
        "--json",
    ]);
    serde_json::from_str::<PingReport>(&out.stdout).is_ok_and(|r| r.ok)
}

#[test]
fn netns_lab_isolates_sites_and_down_removes_exactly_what_it_created() {
    if !require_netns("netns_lab_isolates_sites_and_down_removes_exactly_what_it_created") {
        return;
    }
    let lab = NetnsLab::up(bin(), &[]);
    let p = prefix(&lab);
    let ours: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{p}-")))
        .collect();
    assert_eq!(ours.len(), 7, "a hub and one namespace per node: {ours:?}");

    // The CLI works unchanged: topology, ping across sites, status.
    let out = lab.cli(&["topology", "--json"]);
    out.assert_success();
    let t: Topology = out.json();
    assert!(t.healthy && t.secure, "{}", out.stdout);
    let out = lab.cli(&["ping", "edge-eu-2", "--agent", "edge-us-1", "--json"]);
    out.assert_success();
    let r: PingReport = out.json();
    assert_eq!(
        r.attempts[0].path,
        ["edge-us-1", "gw-us-1", "gw-eu-1", "edge-eu-2"]
    );
    let out = lab.cli(&["lab", "status"]);
    out.assert_success();
    assert!(out
        .stdout
        .contains(&format!("netns lab {p}: 7/7 namespaces present")));

    // A member has an address only on its site network and no route out of it.
    let ns = format!("{p}-edge-us-1");
    let addrs = std::process::Command::new("ip")
        .args(["-n", &ns, "-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout).to_string();
    assert!(addrs.contains("10.77.1.2/24"), "{addrs}");
    assert!(!addrs.contains("10.77.250."), "{addrs}");
    for far in ["10.77.2.2", "10.77.2.1", "10.77.250.2"] {
        let route = std::process::Command::new("ip")
            .args(["-n", &ns, "route", "get", far])
            .output()
            .unwrap();
        assert!(
            !route.status.success(),
            "edge-us-1 has a route to {far}: {}",
            String::from_utf8_lossy(&route.stdout)
        );
    }

    // A namespace already gone (removed by hand) does not stop `down`.
    let gone = format!("{p}-edge-eu-2");
    assert!(std::process::Command::new("ip")
        .args(["netns", "del", &gone])
        .status()
        .unwrap()
        .success());
    let nodes = lab.nodes();
    let down = lab.down();
    down.assert_success();
    assert!(
        down.stdout.contains("removed 6 network namespaces"),
        "{}",
        down.stdout
    );
    let left: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{p}-")))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(&p),
        "links left behind"
    );
    for n in &nodes {
        assert!(
            !process_is_running(n.pid, n.pid_start),
            "{} still runs",
            n.name
        );
    }
    let again = lab.down();
    again.assert_success();
    assert!(again.stdout.contains("no lab running"), "{}", again.stdout);
}

#[test]
fn netns_lab_down_after_a_crash_removes_the_recorded_networks() {
    if !require_netns("netns_lab_down_after_a_crash_removes_the_recorded_networks") {
        return;
    }
    let lab = NetnsLab::up(bin(), &["--sites", "a=1,b=1"]);
    let p = prefix(&lab);
    // A crash of everything: the agents die with SIGKILL, nothing is cleaned up.
    for n in lab.nodes() {
        if process_is_running(n.pid, n.pid_start) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &n.pid.to_string()])
                .status();
        }
    }
    let out = lab.cli(&["lab", "status"]);
    out.assert_code(1);
    let down = lab.down();
    down.assert_success();
    assert!(
        !netns_names()
            .iter()
            .any(|n| n.starts_with(&format!("{p}-"))),
        "{}",
        down.stdout
    );
}

#[test]
fn lab_up_netns_without_root_exits_2_with_one_line() {
    if !require_netns("lab_up_netns_without_root_exits_2_with_one_line") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(bin())
        .args(["lab", "up", "--netns", "--dir"])
        .arg(tmp.path().join("lab"))
        .output()
        .expect("setpriv (util-linux) runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("needs root"), "{err}");
}

#[test]
fn lab_faults_cut_heal_and_restart_what_they_name() {
    if !require_netns("lab_faults_cut_heal_and_restart_what_they_name") {
        return;
    }
    let lab = NetnsLab::up(bin(), &[]);
    let limit = Duration::from_secs(60);

    // partition: the far site becomes unreachable, never dead; the site keeps working.
    lab.cli(&["lab", "fault", "partition", "us-east", "eu-west"])
        .assert_success();
    let list = lab.cli(&["lab", "fault", "list"]);
    assert!(
        list.stdout.contains("partition us-east eu-west"),
        "{}",
        list.stdout
    );
    wait_for(
        "edge-us-1 to see edge-eu-2 unreachable",
        limit,
        || match status_seen_by(&lab, "edge-us-1", "edge-eu-2")? {
            NodeStatus::Unreachable => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(ping_ok(&lab, "edge-us-1", "edge-us-2"));
    assert!(!ping_ok(&lab, "edge-us-1", "edge-eu-2"));
    assert_eq!(
        status_seen_by(&lab, "edge-us-1", "edge-us-2").unwrap(),
        NodeStatus::Alive
    );

    // heal: every link back.
    lab.cli(&["lab", "fault", "heal"]).assert_success();
    let list = lab.cli(&["lab", "fault", "list", "--json"]);
    assert_eq!(list.stdout.trim(), "[]");
    wait_for("every link up after heal", limit, || {
        let out = lab.cli(&["topology", "--agent", "edge-us-1"]);
        if out.code == Some(0) && ping_ok(&lab, "edge-us-1", "edge-eu-2") {
            Ok(())
        } else {
            Err(out.describe())
        }
    });

    // isolate: nobody reaches the node; its site declares it dead.
    lab.cli(&["lab", "fault", "isolate", "edge-eu-2"])
        .assert_success();
    wait_for(
        "edge-eu-1 to see edge-eu-2 dead",
        limit,
        || match status_seen_by(&lab, "edge-eu-1", "edge-eu-2")? {
            NodeStatus::Dead => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    lab.cli(&["lab", "fault", "heal"]).assert_success();

    // loss 100 on one node's interfaces is as good as a cut; a bad target is refused.
    lab.cli(&["lab", "fault", "loss", "edge-us-2", "100"])
        .assert_success();
    assert!(!ping_ok(&lab, "edge-us-1", "edge-us-2"));
    lab.cli(&["lab", "fault", "loss", "mars", "5"])
        .assert_code(2);
    lab.cli(&["lab", "fault", "oneway", "gw-us-1", "gw-eu-1"])
        .assert_success();
    let list = lab.cli(&["lab", "fault", "list"]);
    assert_eq!(list.stdout.lines().count(), 2, "{}", list.stdout);
    lab.cli(&["lab", "fault", "heal"]).assert_success();

    // kill, then restart: a new process, the node back alive.
    let before = lab.nodes();
    let old = before
        .iter()
        .find(|n| n.name == "edge-us-2")
        .unwrap()
        .clone();
    lab.cli(&["lab", "fault", "kill", "edge-us-2"])
        .assert_success();
    assert!(!process_is_running(old.pid, old.pid_start));
    lab.cli(&["lab", "status"]).assert_code(1);
    lab.cli(&["lab", "fault", "restart", "edge-us-2"])
        .assert_success();
    let new = lab
        .nodes()
        .into_iter()
        .find(|n| n.name == "edge-us-2")
        .unwrap();
    assert_ne!((new.pid, new.pid_start), (old.pid, old.pid_start));
    assert!(process_is_running(new.pid, new.pid_start));
    wait_for("edge-us-2 alive again", limit, || {
        match status_seen_by(&lab, "edge-us-1", "edge-us-2")? {
            NodeStatus::Alive => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // pause: the command returns after the pause and the agent runs on.
    let start = Instant::now();
    lab.cli(&["lab", "fault", "pause", "edge-us-2", "1"])
        .assert_success();
    assert!(start.elapsed() >= Duration::from_secs(1));
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", new.pid)).unwrap();
    let state = stat[stat.rfind(')').unwrap() + 2..].chars().next().unwrap();
    assert_ne!(state, 'T', "the agent is still stopped");
    lab.cli(&["lab", "status"]).assert_success();

    // restart --secret: the agent runs as `agent --secret FILE` (here the lab's own secret).
    let secret = lab.dir().join("secret.key");
    let out = lab.cli(&[
        "lab",
        "fault",
        "restart",
        "edge-us-2",
        "--secret",
        &secret.display().to_string(),
    ]);
    out.assert_success();
    assert!(
        out.stdout.contains("with only the secret in"),
        "{}",
        out.stdout
    );
    let n = lab
        .nodes()
        .into_iter()
        .find(|n| n.name == "edge-us-2")
        .unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", n.pid)).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("--secret"),
        "the agent was not started with --secret"
    );
    wait_for(
        "edge-us-2 alive after restart --secret",
        limit,
        || match status_seen_by(&lab, "edge-us-1", "edge-us-2")? {
            NodeStatus::Alive => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    lab.cli(&[
        "lab",
        "fault",
        "restart",
        "edge-us-2",
        "--secret",
        "/nonexistent/next.secret",
    ])
    .assert_code(2);
}

/// Runs `lab drill NAME --duration DURATION`, requires a PASS and returns its output.
fn drill(name: &str, duration: &str) -> String {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path().join("drill");
    let out = run_clusterctl(
        bin(),
        &dir,
        &[
            "lab",
            "drill",
            name,
            "--duration",
            duration,
            "--dir",
            &dir.display().to_string(),
        ],
        Duration::from_secs(300),
    );
    if out.code != Some(0) {
        // Keep the lab directory (configs, agent logs, netns.log) for the failure message.
        panic!("{}\nlab kept in {}", out.describe(), tmp.keep().display());
    }
    assert!(
        out.stdout.contains(&format!("drill {name}: PASS")),
        "{}",
        out.describe()
    );
    assert!(out.stdout.contains("figures: drill="), "{}", out.stdout);
    assert!(
        !dir.join("lab.json").exists(),
        "the drill tears its lab down"
    );
    out.stdout
}

#[test]
fn drill_golden_path_passes() {
    if require_netns("drill_golden_path_passes") {
        drill("golden-path", "5");
    }
}

#[test]
fn drill_wan_partition_passes() {
    if require_netns("drill_wan_partition_passes") {
        drill("wan-partition", "20");
    }
}

#[test]
fn drill_gateway_failover_passes() {
    if require_netns("drill_gateway_failover_passes") {
        drill("gateway-failover", "15");
    }
}

#[test]
fn drill_lossy_wan_passes() {
    if require_netns("drill_lossy_wan_passes") {
        drill("lossy-wan", "20");
    }
}

#[test]
fn drill_rolling_restart_secret_passes() {
    if require_netns("drill_rolling_restart_secret_passes") {
        drill("rolling-restart-secret", "10");
    }
}

#[test]
fn drill_slow_node_passes() {
    // 25 s: two bursts (at 0 s and 20 s).
    if require_netns("drill_slow_node_passes") {
        drill("slow-node", "25");
    }
}

#[test]
fn drill_dns_drift_passes() {
    if require_netns("drill_dns_drift_passes") {
        drill("dns-drift", "10");
    }
}

#[test]
fn drill_one_way_passes() {
    // 90 s: the old connection idles out (10 s), then a few dials on each side give the
    // evidence (each waits 5 s); detection was 26-28 s in runs on a 2-core machine. The drill
    // then requires `one-way`, with its direction, at every poll (at most 3 s apart) of the
    // last 45 s: a fault that also dropped ARP became a full partition within a minute.
    if require_netns("drill_one_way_passes") {
        let out = drill("one-way", "90");
        assert!(
            out.contains("steady_window_s=45") && out.contains("fault held 90 s"),
            "{out}"
        );
    }
}

/// Runs `nft -f -` with `rules` inside network namespace `ns`.
fn nft_in(ns: &str, rules: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("ip netns exec runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(rules.as_bytes())
        .expect("rules written");
    let status = child.wait().expect("nft ends");
    assert!(status.success(), "nft -f in {ns} failed: {status}");
}

/// A node whose own UDP sends are refused by its kernel (an nftables drop on the output hook of
/// its own namespace returns EPERM to sendmsg) says so on its links, not just "timed out".
#[test]
fn a_member_whose_own_sends_fail_shows_local_send_error_on_its_links() {
    if !require_netns("a_member_whose_own_sends_fail_shows_local_send_error_on_its_links") {
        return;
    }
    let lab = NetnsLab::up(bin(), &[]);
    let state = lab.state();
    let ns = state["netns"]["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["name"] == "edge-us-1"))
        .and_then(|n| n["netns"].as_str())
        .expect("lab.json records edge-us-1's namespace")
        .to_string();
    nft_in(
        &ns,
        "table inet send-fault {\n\tchain out {\n\t\ttype filter hook output priority 0; policy accept;\n\t\tudp dport 7400 drop\n\t}\n}\n",
    );
    wait_for(
        "edge-us-1 to show a local send error on its links",
        Duration::from_secs(60),
        || {
            let out = lab.cli(&["topology", "--json", "--agent", "edge-us-1"]);
            let t: Topology =
                serde_json::from_str(&out.stdout).map_err(|e| out.describe() + &e.to_string())?;
            let mine: Vec<_> = t
                .links
                .iter()
                .filter(|l| l.from == "edge-us-1" || l.to == "edge-us-1")
                .collect();
            let shown = mine.iter().any(|l| {
                l.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("local send error: EPERM"))
            });
            if shown && out.code == Some(1) {
                Ok(())
            } else {
                Err(out.stdout)
            }
        },
    );
    let events = lab.cli(&["events", "--once", "--agent", "edge-us-1"]);
    assert!(
        events.stdout.contains("local send error: EPERM"),
        "{}",
        events.describe()
    );
}

/// A gateway whose own WAN sends fail (EPERM) holds the far site unreachable no later than its
/// members, which go by the `reach` of its record: its own WAN link still looks up to the
/// transport (the far gateway's packets keep arriving), but its WAN ring declared the far gateway
/// dead.
#[test]
fn a_gateway_whose_wan_sends_fail_sees_the_far_site_unreachable_with_its_members() {
    if !require_netns(
        "a_gateway_whose_wan_sends_fail_sees_the_far_site_unreachable_with_its_members",
    ) {
        return;
    }
    let lab = NetnsLab::up(bin(), &[]);
    let state = lab.state();
    let node = |name: &str| {
        state["netns"]["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("lab.json records {name}"))
    };
    let ns = node("gw-us-1")["netns"]
        .as_str()
        .expect("netns")
        .to_string();
    let far = node("gw-eu-1")["wan_addr"]
        .as_str()
        .expect("wan address")
        .to_string();
    nft_in(
        &ns,
        &format!("table inet send-fault {{\n\tchain out {{\n\t\ttype filter hook output priority 0; policy accept;\n\t\tip daddr {far} udp dport 7400 drop\n\t}}\n}}\n"),
    );
    let start = Instant::now();
    let (mut gw_at, mut member_at) = (None, None);
    while start.elapsed() < Duration::from_secs(60) && (gw_at.is_none() || member_at.is_none()) {
        for (observer, at) in [("gw-us-1", &mut gw_at), ("edge-us-1", &mut member_at)] {
            if at.is_none()
                && status_seen_by(&lab, observer, "edge-eu-1") == Ok(NodeStatus::Unreachable)
            {
                *at = Some(start.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (gw_at, member_at) = (
        gw_at.expect("gw-us-1 saw eu-west unreachable within 60 s"),
        member_at.expect("edge-us-1 saw eu-west unreachable within 60 s"),
    );
    eprintln!("eu-west unreachable: gw-us-1 after {gw_at:?}, edge-us-1 after {member_at:?}");
    assert!(
        gw_at <= member_at + Duration::from_secs(1),
        "gw-us-1 saw eu-west unreachable at {gw_at:?}, its member at {member_at:?}"
    );
}
