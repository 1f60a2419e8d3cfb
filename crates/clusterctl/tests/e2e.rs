//! End-to-end tests: real `clusterctl` processes on loopback, driven through the CLI.
//!
//! Each test runs its own lab (see `clusterctl-testkit`) on an address range of its own, so the
//! tests run in parallel. Waits poll for a behaviour with a generous deadline; nothing sleeps and
//! then asserts on timing.

use clusterctl_api::{
    Event, EventKind, LinkKind, LinkState, Members, NodeStatus, PingReport, Role, Topology,
};
use clusterctl_core::name::{ClusterName, Ident, NodeName, SiteName};
use clusterctl_core::wire::{Handshake, RefusalCode};
use clusterctl_node::pki::{generate_ca, issue_node_cert, Validity};
use clusterctl_node::tls::TlsMaterial;
use clusterctl_testkit::handshake::{hello_with, send_hello, Outcome};
use clusterctl_testkit::{process_is_running, CliOutput, Lab, LabOptions, DEFAULT_WAIT};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const ALL_NODES: [&str; 6] = [
    "edge-eu-1",
    "edge-eu-2",
    "edge-us-1",
    "edge-us-2",
    "gw-eu-1",
    "gw-us-1",
];

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_clusterctl"))
}

/// The default lab: sites us-east and eu-west, two members and one gateway each.
fn default_lab() -> Lab {
    Lab::up(bin(), LabOptions::default())
}

/// The default lab, once every node sees every node alive (not only the node `lab up` asks).
fn converged_lab() -> Lab {
    let lab = default_lab();
    lab.wait_converged();
    lab
}

fn pretty<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("(cannot print: {e})"))
}

fn member<'a>(m: &'a Members, name: &str) -> Option<&'a clusterctl_api::MemberView> {
    m.members.iter().find(|r| r.name == name)
}

/// The status `observer` reports for `name`, or why it cannot tell.
fn status_seen_by(lab: &Lab, observer: &str, name: &str) -> Result<NodeStatus, String> {
    let m = lab.try_members(observer)?;
    member(&m, name)
        .map(|r| r.status)
        .ok_or_else(|| format!("{observer} does not list {name}:\n{}", pretty(&m)))
}

/// Writes `table` as a config file next to `node`'s own config (so that its relative paths
/// resolve the same way).
fn write_config(lab: &Lab, node: &str, file: &str, table: &toml::Table) -> PathBuf {
    let path = lab.node(node).dir().join(file);
    let text = toml::to_string(table).expect("a TOML table serializes");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

fn read_config(lab: &Lab, node: &str) -> toml::Table {
    let path = &lab.node(node).config;
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
}

fn tls_table(config: &mut toml::Table) -> &mut toml::Table {
    config
        .get_mut("tls")
        .and_then(toml::Value::as_table_mut)
        .expect("a lab config has a [tls] table")
}

#[test]
fn default_lab_comes_up_with_every_expected_link_up_and_secure() {
    let lab = default_lab();

    let out = lab.cli(&["topology", "--json"]);
    out.assert_success();
    let t: Topology = out.json();
    let all = pretty(&t);
    assert_eq!(t.links.len(), 7, "{all}");
    for l in &t.links {
        assert!(l.expected, "{} <-> {} is not expected\n{all}", l.from, l.to);
        assert_eq!(l.state, LinkState::Up, "{} <-> {}\n{all}", l.from, l.to);
        assert!(l.secure, "{} <-> {} is not secure\n{all}", l.from, l.to);
        assert_eq!(l.protocol.as_deref(), Some("tls1.3"), "{all}");
        assert_eq!(
            l.cipher_suite.as_deref(),
            Some("TLS13_AES_128_GCM_SHA256"),
            "{all}"
        );
        assert_eq!(l.identities.len(), 2, "{all}");
        assert!(
            l.secret_key.is_some() && l.cert_days_left.is_some_and(|d| d > 20),
            "{all}"
        );
    }
    let kind = |k| t.links.iter().filter(|l| l.kind == k).count();
    assert_eq!(kind(LinkKind::Site), 6, "{all}");
    assert_eq!(kind(LinkKind::Wan), 1, "{all}");
    let wan = t.links.iter().find(|l| l.kind == LinkKind::Wan).unwrap();
    assert_eq!((wan.from.as_str(), wan.to.as_str()), ("gw-eu-1", "gw-us-1"));
    assert!(t.secure, "{all}");
    assert!(t.healthy, "{all}");

    let sites: Vec<&str> = t.sites.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(sites, ["eu-west", "us-east"], "{all}");
    for site in &t.sites {
        assert_eq!(site.nodes.len(), 3, "site {}\n{all}", site.name);
        assert_eq!(site.gateways.len(), 1, "site {}\n{all}", site.name);
        for n in &site.nodes {
            assert_eq!(n.status, NodeStatus::Alive, "{}\n{all}", n.name);
            assert_eq!(n.site, site.name, "{}\n{all}", n.name);
            let is_gateway = site.gateways.contains(&n.name);
            assert_eq!(n.role == Role::Gateway, is_gateway, "{}\n{all}", n.name);
        }
    }

    let out = lab.cli(&["topology"]);
    out.assert_success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines.len() >= 3, "{}", out.describe());
    assert_eq!(
        lines[0],
        "site=eu-west nodes=[edge-eu-1,edge-eu-2] gateways=[gw-eu-1]",
        "{}",
        out.describe()
    );
    assert_eq!(
        lines[1],
        "site=us-east nodes=[edge-us-1,edge-us-2] gateways=[gw-us-1]",
        "{}",
        out.describe()
    );
    assert!(
        lines[2].starts_with("links=7 secure=true"),
        "{}",
        out.describe()
    );
}

#[test]
fn ping_across_sites_follows_the_four_node_path() {
    let lab = converged_lab();

    let out = lab.cli(&[
        "ping",
        "edge-eu-2",
        "--from",
        "edge-us-1",
        "--count",
        "3",
        "--json",
    ]);
    out.assert_success();
    let r: PingReport = out.json();
    assert!(r.ok, "{}", out.describe());
    assert_eq!((r.sent, r.received), (3, 3), "{}", out.describe());
    assert_eq!(r.attempts.len(), 3, "{}", out.describe());
    for a in &r.attempts {
        assert!(a.ok, "{}", out.describe());
        assert_eq!(
            a.path,
            ["edge-us-1", "gw-us-1", "gw-eu-1", "edge-eu-2"],
            "{}",
            out.describe()
        );
        assert_eq!(a.hops_ms.len(), 3, "{}", out.describe());
    }

    let out = lab.cli(&["ping", "edge-us-2", "--from", "edge-us-1", "--json"]);
    out.assert_success();
    let r: PingReport = out.json();
    assert!(r.ok, "{}", out.describe());
    assert_eq!(r.attempts.len(), 1, "{}", out.describe());
    assert_eq!(
        r.attempts[0].path,
        ["edge-us-1", "edge-us-2"],
        "{}",
        out.describe()
    );
    assert_eq!(r.attempts[0].hops_ms.len(), 1, "{}", out.describe());
}

#[test]
fn topology_probe_checks_every_expected_link() {
    let lab = converged_lab();

    let out = lab.cli(&["topology", "--probe", "--json"]);
    out.assert_success();
    let t: Topology = out.json();
    let probes = t.probes.as_ref().unwrap_or_else(|| {
        panic!("no probe results in the report\n{}", out.describe());
    });
    assert_eq!(probes.len(), 7, "{}", out.describe());
    assert!(probes.iter().all(|p| p.ok), "{}", out.describe());
    let pair = |a: &str, b: &str| {
        let (a, b) = if a < b { (a, b) } else { (b, a) };
        (a.to_string(), b.to_string())
    };
    let probed: BTreeSet<_> = probes.iter().map(|p| pair(&p.from, &p.to)).collect();
    let expected: BTreeSet<_> = t
        .links
        .iter()
        .filter(|l| l.expected)
        .map(|l| pair(&l.from, &l.to))
        .collect();
    assert_eq!(probed, expected, "{}", out.describe());
}

#[test]
fn certificate_from_another_ca_is_refused_and_reported() {
    let mut lab = converged_lab();
    lab.kill9("edge-us-2");

    // A CA nobody in the cluster trusts issues a certificate that claims to be edge-us-2.
    let cluster = ClusterName::new("lab").unwrap();
    let ident = Ident {
        name: NodeName::new("edge-us-2").unwrap(),
        site: SiteName::new("us-east").unwrap(),
        role: Role::Member,
    };
    let rogue_ca = generate_ca(&cluster, Validity::days_from_now(2)).unwrap();
    let rogue = issue_node_cert(&rogue_ca, &cluster, &ident, Validity::days_from_now(1)).unwrap();
    let node_dir = lab.node("edge-us-2").dir();
    let real_ca = std::fs::read_to_string(lab.dir().join("ca.pem")).unwrap();
    // The rogue node trusts both CAs, so that it is the cluster that refuses it, not itself.
    std::fs::write(
        node_dir.join("rogue-ca.pem"),
        format!("{}{real_ca}", rogue_ca.cert_pem),
    )
    .unwrap();
    std::fs::write(node_dir.join("rogue-cert.pem"), &rogue.cert_pem).unwrap();
    std::fs::write(node_dir.join("rogue-key.pem"), &rogue.key_pem).unwrap();
    std::fs::set_permissions(
        node_dir.join("rogue-key.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut config = read_config(&lab, "edge-us-2");
    let tls = tls_table(&mut config);
    tls.insert("ca".into(), "rogue-ca.pem".into());
    tls.insert("cert".into(), "rogue-cert.pem".into());
    tls.insert("key".into(), "rogue-key.pem".into());
    let rogue_config = write_config(&lab, "edge-us-2", "rogue.toml", &config);
    lab.start_agent_with_config("edge-us-2", &rogue_config, &[]);

    let is_refused_edge_us_2_link = |l: &clusterctl_api::LinkView| {
        let ends = [l.from.as_str(), l.to.as_str()];
        ends.contains(&"edge-us-2")
            && (ends.contains(&"gw-us-1") || ends.contains(&"edge-us-1"))
            && l.state == LinkState::Refused
            && l.reason.as_deref().is_some_and(|r| r.contains("CA"))
    };
    let (code, t) = lab.wait_for(
        "gw-us-1 to report a link of edge-us-2 refused for its CA",
        DEFAULT_WAIT,
        || {
            let out = lab.cli(&["topology", "--json", "--agent", "gw-us-1"]);
            let t: Topology = serde_json::from_str(&out.stdout).map_err(|_| out.describe())?;
            if t.links.iter().any(is_refused_edge_us_2_link) {
                Ok((out.code, t))
            } else {
                Err(out.describe())
            }
        },
    );
    let edge_link_up = t.links.iter().any(|l| {
        l.expected && (l.from == "edge-us-2" || l.to == "edge-us-2") && l.state == LinkState::Up
    });
    assert!(
        !edge_link_up,
        "the rogue node got a link up\n{}",
        pretty(&t)
    );
    assert!(!t.healthy, "{}", pretty(&t));
    assert_eq!(
        code,
        Some(1),
        "topology must exit 1 while an expected link is not up\n{}",
        pretty(&t)
    );

    lab.wait_for(
        "a link-refused event naming the CA on gw-us-1",
        DEFAULT_WAIT,
        || {
            let events = lab.events("gw-us-1");
            let found = events.iter().any(|e| {
                e.kind == EventKind::LinkRefused
                    && e.reason.contains("CA")
                    && [e.node.as_deref(), e.peer.as_deref()].contains(&Some("edge-us-2"))
            });
            if found {
                Ok(())
            } else {
                Err(pretty(&events))
            }
        },
    );
}

#[test]
fn member_dialing_another_site_is_refused_by_contract() {
    let lab = converged_lab();
    let (_, t) = lab.topology("gw-eu-1");
    let edge = lab.node("edge-us-1");
    let gw = lab.node("gw-eu-1");

    // Real credentials of edge-us-1: only the contract stands in the way.
    let material = TlsMaterial::load(
        &lab.dir().join("ca.pem"),
        &edge.dir().join("cert.pem"),
        &edge.dir().join("key.pem"),
    )
    .expect("edge-us-1's TLS material loads");
    // ... and the lab's real cluster secret.
    let secret = clusterctl_core::secret::Secret::from_text(
        &std::fs::read_to_string(lab.dir().join("secret.key")).expect("lab secret"),
    )
    .expect("lab secret parses");
    let hello = hello_with(
        clusterctl_core::secret::Keyring::new(secret),
        Ident {
            name: NodeName::new("edge-us-1").expect("name"),
            site: SiteName::new("us-east").expect("site"),
            role: Role::Member,
        },
        t.contract_hash.clone(),
        edge.addr.clone(),
    );
    // From edge-us-1's own loopback address, on a port of its own.
    let bind: SocketAddr = format!("{}.1.2:0", lab.prefix()).parse().unwrap();
    let answer = match send_hello(
        bind,
        gw.addr.parse().unwrap(),
        "gw-eu-1",
        material,
        hello,
        None,
    ) {
        Outcome::Answer(a) => a,
        Outcome::Failed(e) => panic!("hello exchange with gw-eu-1 failed: {e}"),
    };
    match &answer {
        Handshake::Refuse(r) => {
            assert_eq!(r.code, RefusalCode::Contract, "{answer:?}");
            assert!(
                r.reason.contains("may not link outside its site"),
                "{answer:?}"
            );
        }
        other => panic!("gw-eu-1 answered a cross-site member with {other:?}"),
    }

    lab.wait_for(
        "a link-refused event naming edge-us-1 on gw-eu-1",
        DEFAULT_WAIT,
        || {
            let events = lab.events("gw-eu-1");
            let found = events.iter().any(|e: &Event| {
                e.kind == EventKind::LinkRefused
                    && [e.node.as_deref(), e.peer.as_deref()].contains(&Some("edge-us-1"))
            });
            if found {
                Ok(())
            } else {
                Err(pretty(&events))
            }
        },
    );
}

/// The records of a node's table snapshot on disk: `(name, clock)`.
fn snapshot_on_disk(data_dir: &Path) -> Result<BTreeMap<String, u64>, String> {
    let records = clusterctl_node::persist::load(data_dir)
        .map_err(|e| format!("snapshot in {}: {e}", data_dir.display()))?;
    Ok(records
        .into_iter()
        .map(|r| (r.name.to_string(), r.clock))
        .collect())
}

#[test]
fn kill_9_and_restart_keeps_the_table_and_raises_the_clock() {
    let mut lab = converged_lab();
    let data_dir = lab.node("edge-eu-1").dir().join("data");
    let before = lab.members("edge-eu-1");
    let clock_before = member(&before, "edge-eu-1")
        .unwrap_or_else(|| panic!("edge-eu-1 does not list itself\n{}", pretty(&before)))
        .clock;
    let all: BTreeSet<&str> = BTreeSet::from(ALL_NODES);
    // The agent writes its table to disk in the background, shortly after each change. What a
    // restart brings back is what was on disk, so the kill comes once the table is there.
    lab.wait_for(
        &format!("edge-eu-1's snapshot to hold all 6 nodes and its clock {clock_before}"),
        DEFAULT_WAIT,
        || {
            let disk = snapshot_on_disk(&data_dir)?;
            let names: BTreeSet<&str> = disk.keys().map(String::as_str).collect();
            if names == all && disk.get("edge-eu-1") >= Some(&clock_before) {
                Ok(())
            } else {
                Err(format!("on disk: {disk:?}"))
            }
        },
    );

    lab.kill9("edge-eu-1");
    let clock_on_disk = snapshot_on_disk(&data_dir).unwrap()["edge-eu-1"];
    lab.start_agent("edge-eu-1", &[]);

    // The first answer of the new process already holds the whole table, read from disk.
    let first = lab.wait_for("the restarted edge-eu-1 to answer", DEFAULT_WAIT, || {
        lab.try_members("edge-eu-1")
    });
    let names: BTreeSet<&str> = first.members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        all,
        "the restarted node lost its table\n{}",
        pretty(&first)
    );
    let clock_after = member(&first, "edge-eu-1").unwrap().clock;
    assert!(
        clock_after > clock_on_disk && clock_after > clock_before,
        "clock {clock_before} before the kill ({clock_on_disk} on disk), {clock_after} after the restart\n{}",
        pretty(&first)
    );

    for observer in ALL_NODES.iter().filter(|n| **n != "edge-eu-1") {
        lab.wait_for(
            &format!("{observer} to see edge-eu-1 alive at clock {clock_after} or later"),
            DEFAULT_WAIT,
            || {
                let m = lab.try_members(observer)?;
                match member(&m, "edge-eu-1") {
                    Some(r) if r.status == NodeStatus::Alive && r.clock >= clock_after => Ok(()),
                    _ => Err(pretty(&m)),
                }
            },
        );
    }
    lab.wait_for("topology to be healthy again", DEFAULT_WAIT, || {
        let out = lab.cli(&["topology"]);
        if out.code == Some(0) {
            Ok(())
        } else {
            Err(out.describe())
        }
    });
}

#[test]
fn forgotten_node_stays_out() {
    let mut lab = converged_lab();
    lab.kill9("edge-eu-2");
    lab.wait_for(
        "gw-us-1 to see edge-eu-2 dead",
        DEFAULT_WAIT,
        || match status_seen_by(&lab, "gw-us-1", "edge-eu-2")? {
            NodeStatus::Dead => Ok(()),
            other => Err(format!("edge-eu-2 is {other}")),
        },
    );

    lab.cli(&["forget", "edge-eu-2"]).assert_success();
    let observers = ["gw-us-1", "edge-us-1", "gw-eu-1", "edge-eu-1"];
    let all_see_forgotten = |lab: &Lab| {
        for observer in observers {
            lab.wait_for(
                &format!("{observer} to see edge-eu-2 forgotten"),
                DEFAULT_WAIT,
                || match status_seen_by(lab, observer, "edge-eu-2")? {
                    NodeStatus::Forgotten => Ok(()),
                    other => Err(format!("edge-eu-2 is {other}")),
                },
            );
        }
    };
    all_see_forgotten(&lab);
    // The forgotten node's links are no longer expected.
    lab.wait_for(
        "topology to be healthy without edge-eu-2",
        DEFAULT_WAIT,
        || {
            let out = lab.cli(&["topology"]);
            if out.code == Some(0) {
                Ok(())
            } else {
                Err(out.describe())
            }
        },
    );

    // Without --rejoin the node learns it was forgotten and stops by itself.
    let agent = lab.start_agent("edge-eu-2", &[]);
    let status = lab.wait_exit(&agent, DEFAULT_WAIT);
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    assert_eq!(status.code(), Some(3), "{status}\n{log}");
    assert!(log.contains("forgotten"), "{log}");
    // A forgotten node that still knocks was forgotten while alive: the nodes that refused it
    // report it (for 30 s after its last attempt).
    let reports: Vec<CliOutput> = ["gw-eu-1", "edge-eu-1"]
        .iter()
        .map(|a| lab.cli(&["topology", "--agent", a]))
        .collect();
    assert!(
        reports.iter().any(|o| o.code == Some(1)
            && o.stdout
                .contains("edge-eu-2 was forgotten by an operator but is still running")),
        "{}",
        reports
            .iter()
            .map(CliOutput::describe)
            .collect::<Vec<_>>()
            .join("\n")
    );
    for observer in ["gw-us-1", "edge-eu-1"] {
        assert_eq!(
            status_seen_by(&lab, observer, "edge-eu-2"),
            Ok(NodeStatus::Forgotten),
            "as seen by {observer}"
        );
    }

    // With --rejoin it comes back.
    lab.start_agent("edge-eu-2", &["--rejoin"]);
    for observer in ["gw-us-1", "edge-eu-1"] {
        lab.wait_for(
            &format!("{observer} to see the rejoined edge-eu-2 alive"),
            DEFAULT_WAIT,
            || match status_seen_by(&lab, observer, "edge-eu-2")? {
                NodeStatus::Alive => Ok(()),
                other => Err(format!("edge-eu-2 is {other}")),
            },
        );
    }
    lab.wait_for(
        "topology to be healthy with edge-eu-2 back",
        DEFAULT_WAIT,
        || {
            let out = lab.cli(&["topology"]);
            if out.code == Some(0) {
                Ok(())
            } else {
                Err(out.describe())
            }
        },
    );
}

#[test]
fn bad_config_exits_2_with_one_line_naming_the_key() {
    let lab = default_lab();
    let base = read_config(&lab, "edge-us-1");
    let spare_data = lab.node("edge-us-1").dir().join("spare-data");

    type Breaker = fn(&mut toml::Table, &Path);
    let cases: [(&str, &str, Breaker); 5] = [
        ("unknown key", "colour", |c, _| {
            c.insert("colour".into(), "blue".into());
        }),
        ("invalid node name", "name", |c, _| {
            c.insert("name".into(), "Edge_US_1".into());
        }),
        ("missing certificate file", "tls.cert", |c, _| {
            tls_table(c).insert("cert".into(), "no-such-cert.pem".into());
        }),
        ("listen address in use", "listen", |c, data| {
            // Same listen address as the running edge-us-1; nothing else is shared.
            c.insert("data-dir".into(), data.display().to_string().into());
        }),
        ("missing contract", "contract", |c, _| {
            c.insert("contract".into(), "no-such-contract.toml".into());
        }),
    ];
    for (i, (case, key, breaker)) in cases.into_iter().enumerate() {
        let mut config = base.clone();
        breaker(&mut config, &spare_data);
        let path = write_config(&lab, "edge-us-1", &format!("broken-{i}.toml"), &config);
        let path = path.display().to_string();
        let out = lab.cli_within(Duration::from_secs(60), &["agent", "--config", &path]);
        let ctx = format!("case {case:?}\n{}", out.describe());
        assert_eq!(out.code, Some(2), "{ctx}");
        let stderr = out.stderr.trim_end();
        assert_eq!(stderr.lines().count(), 1, "stderr is not one line\n{ctx}");
        assert!(stderr.contains(&format!("`{key}`")), "{ctx}");
        assert!(stderr.contains("fix"), "{ctx}");
        assert!(!stderr.contains("panicked"), "{ctx}");
        assert!(!stderr.to_lowercase().contains("backtrace"), "{ctx}");
    }
}

#[test]
fn lab_down_is_safe_twice_and_stops_only_its_agents() {
    let lab = default_lab();
    let other = default_lab();
    let nodes = lab.nodes().to_vec();
    for n in &nodes {
        assert!(
            process_is_running(n.pid, n.pid_start),
            "{n:?} is not running"
        );
    }

    let first = lab.down();
    first.assert_success();
    let second = lab.down();
    second.assert_success();
    for n in &nodes {
        assert!(
            !process_is_running(n.pid, n.pid_start),
            "{} (pid {}) still runs after `lab down`\n{}\n{}",
            n.name,
            n.pid,
            first.describe(),
            second.describe()
        );
    }

    // The other lab is untouched.
    for n in other.nodes() {
        assert!(
            process_is_running(n.pid, n.pid_start),
            "{} of the other lab was stopped",
            n.name
        );
    }
    other.cli(&["topology"]).assert_success();
}

/// Restarts edge-us-2 as a child of the test (so that its exit status can be read), waits until
/// the cluster is whole again, sends it SIGTERM, checks that it exits 0 and that gw-us-1 ends up
/// listing it `left`. Returns the events gw-us-1 recorded about edge-us-2 from the SIGTERM on.
fn sigterm_edge_us_2(lab: &mut Lab) -> Vec<Event> {
    let clock_before = member(&lab.members("edge-us-2"), "edge-us-2")
        .expect("edge-us-2 lists itself")
        .clock;
    lab.kill9("edge-us-2");
    let agent = lab.start_agent("edge-us-2", &[]);
    lab.wait_for(
        "gw-us-1 to see the restarted edge-us-2 alive and every link up",
        DEFAULT_WAIT,
        || {
            let m = lab.try_members("gw-us-1")?;
            match member(&m, "edge-us-2") {
                Some(r) if r.status == NodeStatus::Alive && r.clock > clock_before => {}
                _ => return Err(pretty(&m)),
            }
            let out = lab.cli(&["topology", "--agent", "gw-us-1"]);
            if out.code == Some(0) {
                Ok(())
            } else {
                Err(out.describe())
            }
        },
    );
    let seen_before: u64 = lab
        .events("gw-us-1")
        .iter()
        .map(|e| e.seq)
        .max()
        .unwrap_or(0);

    lab.signal("edge-us-2", "TERM");
    let status = lab.wait_exit(&agent, DEFAULT_WAIT);
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{status}\n{log}");

    lab.wait_for(
        "gw-us-1 to see edge-us-2 left",
        DEFAULT_WAIT,
        || match status_seen_by(lab, "gw-us-1", "edge-us-2")? {
            NodeStatus::Left => Ok(()),
            other => Err(format!("edge-us-2 is {other}")),
        },
    );
    lab.events("gw-us-1")
        .into_iter()
        .filter(|e| e.seq > seen_before && e.node.as_deref() == Some("edge-us-2"))
        .collect()
}

#[test]
fn sigterm_makes_a_node_leave_gracefully() {
    let mut lab = converged_lab();
    let events = sigterm_edge_us_2(&mut lab);
    assert!(
        events.iter().any(|e| e.kind == EventKind::NodeLeft),
        "no node-left event for edge-us-2\n{}",
        pretty(&events)
    );
    // Still `left` once the leave is over (a failure would end in `dead`).
    let m = lab.members("gw-us-1");
    assert_eq!(
        member(&m, "edge-us-2").map(|r| r.status),
        Some(NodeStatus::Left),
        "{}",
        pretty(&m)
    );
}

/// A graceful leave (SIGTERM) is reported `left` by every observer, never `dead` first.
#[test]
fn graceful_leave_is_never_reported_as_dead() {
    let mut lab = converged_lab();
    let events = sigterm_edge_us_2(&mut lab);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.kind, EventKind::NodeDead | EventKind::NodeSuspect)),
        "a graceful leave was reported as a failure\n{}",
        pretty(&events)
    );
}

/// The wire counters of `/metrics` on `node`: tx bytes, tx datagrams, rx bytes, rx datagrams.
fn wire_counters(lab: &Lab, node: &str) -> Result<[u64; 4], String> {
    let text = lab.metrics_text(node)?;
    let names = [
        "clusterctl_wire_tx_bytes",
        "clusterctl_wire_tx_datagrams",
        "clusterctl_wire_rx_bytes",
        "clusterctl_wire_rx_datagrams",
    ];
    let mut out = [0; 4];
    for (slot, name) in out.iter_mut().zip(names) {
        let help = format!("# HELP {name} ");
        if !text.lines().any(|l| l.starts_with(&help)) {
            return Err(format!("no help line for {name} in\n{text}"));
        }
        *slot = text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("no sample of {name} in\n{text}"))?;
    }
    Ok(out)
}

#[test]
fn metrics_wire_counters_grow_while_links_are_up() {
    let lab = converged_lab();
    for node in ALL_NODES {
        let first = wire_counters(&lab, node).unwrap_or_else(|e| panic!("{node}: {e}"));
        // Links are up: handshakes and hellos have crossed every one of them.
        assert!(
            first.iter().all(|v| *v > 0),
            "{node}: wire counters {first:?} with its links up"
        );
        assert!(
            first[0] >= first[1] && first[2] >= first[3],
            "{node}: fewer bytes than datagrams in {first:?}"
        );
        // The failure detector and the table keep talking at idle: every counter moves on.
        lab.wait_for(
            &format!("{node}'s wire counters to grow past {first:?}"),
            DEFAULT_WAIT,
            || {
                let now = wire_counters(&lab, node)?;
                if now.iter().zip(&first).all(|(n, f)| n > f) {
                    Ok(())
                } else {
                    Err(format!("{now:?}"))
                }
            },
        );
    }
}
