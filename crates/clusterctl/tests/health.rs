//! Truthful health over real agents: `topology` exits 1 whenever an expected node is refused,
//! duplicated or not alive (docs/security.md, "What healthy means"); a second instance of a
//! live node's identity is refused at handshake without disturbing the incumbent; a dead
//! gateway is never shown alive.

use clusterctl_api::{Event, EventKind, LinkKind, LinkState, Members, NodeStatus, Topology};
use clusterctl_testkit::{Lab, LabOptions, DEFAULT_WAIT};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_clusterctl"))
}

fn pretty<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("(cannot print: {e})"))
}

fn lab_with(sites: &str, gateways: u32) -> Lab {
    let lab = Lab::up(
        bin(),
        LabOptions {
            sites: Some(sites.into()),
            gateways: Some(gateways),
        },
    );
    lab.wait_converged();
    lab
}

fn touches(l: &clusterctl_api::LinkView, node: &str) -> bool {
    l.from == node || l.to == node
}

/// `node`'s config with `edit` applied, written next to it as `file`.
fn edited_config(
    lab: &Lab,
    node: &str,
    file: &str,
    edit: impl FnOnce(&mut toml::Table),
) -> PathBuf {
    let path = &lab.node(node).config;
    let text = std::fs::read_to_string(path).expect("a lab config is readable");
    let mut t: toml::Table = toml::from_str(&text).expect("a lab config parses");
    edit(&mut t);
    let out = lab.node(node).dir().join(file);
    std::fs::write(&out, toml::to_string(&t).expect("serializes")).expect("config written");
    out
}

fn clock_seen_by(m: &Members, name: &str) -> Option<u64> {
    m.members.iter().find(|r| r.name == name).map(|r| r.clock)
}

#[test]
fn node_restarted_with_a_wrong_secret_makes_topology_exit_1_naming_the_refusal_on_its_links() {
    // Two gateways per site, so the far site stays reachable while gw-eu-1 is refused, and its
    // refused links include both kinds.
    let mut lab = lab_with("us-east=1,eu-west=1", 2);
    let bad = lab.dir().join("wrong.secret");
    lab.cli(&["secret", "generate", &bad.to_string_lossy()])
        .assert_success();
    // A graceful stop first: the node is `left` until it comes back.
    lab.signal("gw-eu-1", "TERM");
    let deadline = Instant::now() + DEFAULT_WAIT;
    while lab.is_running("gw-eu-1") {
        assert!(Instant::now() < deadline, "gw-eu-1 did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.wait_for("gw-us-1 to see gw-eu-1 left", DEFAULT_WAIT, || {
        let m = lab.try_members("gw-us-1")?;
        match m
            .members
            .iter()
            .find(|r| r.name == "gw-eu-1")
            .map(|r| r.status)
        {
            Some(NodeStatus::Left) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let started = Instant::now();
    lab.start_agent("gw-eu-1", &["--secret", &bad.to_string_lossy()]);
    let t: Topology = lab.wait_for(
        "topology on gw-us-1 to exit 1 naming gw-eu-1 refused",
        Duration::from_secs(10),
        || {
            let (code, t) = lab.topology("gw-us-1");
            let refused: Vec<_> = t
                .links
                .iter()
                .filter(|l| l.state == LinkState::Refused)
                .collect();
            let kinds = |k: LinkKind| refused.iter().filter(|l| l.kind == k).count();
            if code == Some(1)
                && !t.healthy
                && kinds(LinkKind::Wan) == 2
                && kinds(LinkKind::Site) == 2
            {
                Ok(t)
            } else {
                Err(format!("exit {code:?}\n{}", pretty(&t)))
            }
        },
    );
    let elapsed = started.elapsed();
    for l in t.links.iter().filter(|l| l.state == LinkState::Refused) {
        assert!(
            touches(l, "gw-eu-1"),
            "refused link not of gw-eu-1: {}",
            pretty(l)
        );
        assert!(
            l.expected,
            "a contract link shown as not expected: {}",
            pretty(l)
        );
        assert!(
            l.reason
                .as_deref()
                .unwrap_or("")
                .contains("secret mismatch"),
            "{}",
            pretty(l)
        );
        let want = if l.from.starts_with("gw-us") || l.to.starts_with("gw-us") {
            LinkKind::Wan
        } else {
            LinkKind::Site
        };
        assert_eq!(l.kind, want, "{}", pretty(l));
    }
    for l in t.links.iter().filter(|l| !touches(l, "gw-eu-1")) {
        assert_eq!(l.state, LinkState::Up, "{}", pretty(&t));
    }
    let gw = t
        .sites
        .iter()
        .flat_map(|s| &s.nodes)
        .find(|n| n.name == "gw-eu-1")
        .expect("gw-eu-1 listed");
    assert_eq!(gw.status, NodeStatus::Refused, "{}", pretty(&t));
    assert!(
        t.problems.iter().any(|p| p.contains("gw-eu-1 is refused")),
        "{}",
        pretty(&t)
    );
    let text = lab.cli(&["topology", "--agent", "gw-us-1"]);
    text.assert_code(1);
    assert!(
        text.stdout.contains("gw-eu-1(refused)")
            && text.stdout.contains("NOT HEALTHY: gw-eu-1 is refused"),
        "{}",
        text.describe()
    );
    eprintln!("topology exit 1 naming the refusal {elapsed:?} after the restart");
}

fn link_flaps(events: &[Event], since_seq: u64) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| e.seq > since_seq)
        .filter(|e| matches!(e.kind, EventKind::LinkDown | EventKind::LinkUp))
        .collect()
}

#[test]
fn second_instance_with_a_copied_identity_is_refused_and_the_incumbent_is_untouched() {
    let mut lab = lab_with("us-east=2,eu-west=2", 1);
    let incumbent = lab.node("edge-us-2").addr.clone();
    let impostor = format!("{}.1.9:7400", lab.prefix());
    let impostor_control = format!("{}.1.9:7401", lab.prefix());
    let config = edited_config(&lab, "edge-us-2", "impostor.toml", |t| {
        t.insert("listen".into(), impostor.clone().into());
        t.insert("control".into(), impostor_control.into());
        t.insert("data-dir".into(), "data-impostor".into());
    });
    let observers = ["gw-us-1", "edge-us-1", "edge-us-2"];
    let seq_before: Vec<u64> = observers
        .iter()
        .map(|o| lab.events(o).iter().map(|e| e.seq).max().unwrap_or(0))
        .collect();
    // After convergence a record still changes once its links settle (they are published a
    // settle time after they come up): wait until edge-us-2's record holds both its links and
    // its clock stays put for 5 s, as seen by gw-us-1 and by itself.
    let settled = |lab: &Lab| -> Result<(u64, u64), String> {
        let row = |observer: &str| -> Result<(u64, u32), String> {
            lab.members(observer)
                .members
                .iter()
                .find(|r| r.name == "edge-us-2")
                .map(|r| (r.clock, r.links_up))
                .ok_or_else(|| format!("{observer} does not list edge-us-2"))
        };
        let (a, links_a) = row("gw-us-1")?;
        let (b, links_b) = row("edge-us-2")?;
        if links_a < 2 || links_b < 2 {
            return Err(format!(
                "edge-us-2's record shows {links_a}/{links_b} links up"
            ));
        }
        std::thread::sleep(Duration::from_secs(5));
        let (a2, _) = row("gw-us-1")?;
        let (b2, _) = row("edge-us-2")?;
        if (a, b) == (a2, b2) {
            Ok((a, b))
        } else {
            Err(format!(
                "edge-us-2's clock moved: {a}->{a2} at gw-us-1, {b}->{b2} at itself"
            ))
        }
    };
    let (clock_before, own_clock_before) =
        lab.wait_for("edge-us-2's record to settle", DEFAULT_WAIT, || {
            settled(&lab)
        });

    // Preflight of the copy fails: the name answers elsewhere.
    let pre = lab.cli(&["preflight", "--config", &config.to_string_lossy(), "--json"]);
    pre.assert_code(1);
    let report: serde_json::Value = pre.json();
    let unique = report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "name-unique"))
        .unwrap_or_else(|| panic!("no name-unique check\n{}", pre.describe()));
    assert_eq!(unique["status"], "fail", "{}", pre.describe());
    assert!(
        unique["detail"].as_str().unwrap_or("").contains(&incumbent),
        "{}",
        pre.describe()
    );

    let agent = lab.start_agent_with_config("edge-us-2", &config, &[]);
    // The refusing node's event names both addresses.
    lab.wait_for(
        "gw-us-1 to record the refused second instance with both addresses",
        DEFAULT_WAIT,
        || {
            let ev = lab.events("gw-us-1");
            ev.iter()
                .find(|e| {
                    e.kind == EventKind::LinkRefused
                        && e.peer.as_deref() == Some("edge-us-2")
                        && e.reason.contains(&incumbent)
                        && e.reason.contains(&impostor)
                })
                .map(|_| ())
                .ok_or_else(|| pretty(&ev))
        },
    );
    // So does the refused instance's own log.
    lab.wait_for(
        "the second instance to log its refusal",
        DEFAULT_WAIT,
        || {
            let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
            if log.contains("second instance")
                && log.contains(&incumbent)
                && log.contains(&impostor)
            {
                Ok(())
            } else {
                Err(log)
            }
        },
    );
    // For 30 s while it keeps trying: topology exits 1, the incumbent's clock does not move,
    // no link of the incumbent or its neighbours goes down or comes up again.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let (code, t) = lab.topology("gw-us-1");
        assert_eq!(code, Some(1), "{}", pretty(&t));
        assert!(
            t.problems.iter().any(|p| p.contains("second instance")),
            "{}",
            pretty(&t)
        );
        let edge = t
            .sites
            .iter()
            .flat_map(|s| &s.nodes)
            .find(|n| n.name == "edge-us-2")
            .expect("edge-us-2 listed");
        assert_eq!(edge.status, NodeStatus::Alive, "{}", pretty(&t));
        assert_eq!(edge.addr, incumbent, "{}", pretty(&t));
        std::thread::sleep(Duration::from_secs(2));
    }
    assert_eq!(
        clock_seen_by(&lab.members("gw-us-1"), "edge-us-2"),
        Some(clock_before),
        "the incumbent's record changed as seen by gw-us-1"
    );
    assert_eq!(
        clock_seen_by(&lab.members("edge-us-2"), "edge-us-2"),
        Some(own_clock_before),
        "the incumbent's own clock moved"
    );
    for (o, seq) in observers.iter().zip(seq_before) {
        let ev = lab.events(o);
        let flaps = link_flaps(&ev, seq);
        assert!(flaps.is_empty(), "{o}: links flapped: {}", pretty(&flaps));
    }
    assert!(
        lab.is_running("edge-us-2"),
        "the second instance stopped trying"
    );
}

#[test]
fn node_restarted_at_a_new_address_after_a_crash_rejoins() {
    let mut lab = lab_with("us-east=2,eu-west=1", 1);
    let new_addr = format!("{}.1.9:7400", lab.prefix());
    let config = edited_config(&lab, "edge-us-2", "moved.toml", |t| {
        t.insert("listen".into(), new_addr.clone().into());
        t.insert(
            "control".into(),
            format!("{}.1.9:7401", lab.prefix()).into(),
        );
    });
    lab.kill9("edge-us-2");
    lab.start_agent_with_config("edge-us-2", &config, &[]);
    lab.wait_for(
        "gw-us-1 to see edge-us-2 alive at its new address",
        DEFAULT_WAIT,
        || {
            let (code, t) = lab.topology("gw-us-1");
            let at_new = t.sites.iter().flat_map(|s| &s.nodes).any(|n| {
                n.name == "edge-us-2" && n.addr == new_addr && n.status == NodeStatus::Alive
            });
            if code == Some(0) && at_new {
                Ok(())
            } else {
                Err(format!("exit {code:?}\n{}", pretty(&t)))
            }
        },
    );
}

#[test]
fn of_two_crashed_gateways_the_one_still_down_is_dead_everywhere() {
    let mut lab = lab_with("us-east=1,eu-west=1", 2);
    lab.kill9("gw-us-1");
    lab.kill9("gw-us-2");
    // Long enough for the site's ring to stop gossiping gw-us-2's death: the restarted gw-us-1
    // then never hears of it from the ring, only from its own table.
    std::thread::sleep(Duration::from_secs(40));
    lab.start_agent("gw-us-1", &[]);
    lab.wait_for("gw-eu-1 to see gw-us-1 alive again", DEFAULT_WAIT, || {
        let m = lab.try_members("gw-eu-1")?;
        match m
            .members
            .iter()
            .find(|r| r.name == "gw-us-1")
            .map(|r| r.status)
        {
            Some(NodeStatus::Alive) => Ok(()),
            other => Err(format!("{other:?}\n{}", pretty(&m))),
        }
    });
    // 2x the detection bound of a crash in its own site (5 s), plus a WAN hop.
    let bound = Duration::from_secs(15);
    let start = Instant::now();
    for observer in ["gw-us-1", "edge-us-1", "gw-eu-1", "gw-eu-2", "edge-eu-1"] {
        let left = bound
            .saturating_sub(start.elapsed())
            .max(Duration::from_secs(1));
        lab.wait_for(&format!("{observer} to see gw-us-2 dead"), left, || {
            let m = lab.try_members(observer)?;
            match m
                .members
                .iter()
                .find(|r| r.name == "gw-us-2")
                .map(|r| r.status)
            {
                Some(NodeStatus::Dead) => Ok(()),
                other => Err(format!("{other:?}\n{}", pretty(&m))),
            }
        });
    }
    eprintln!(
        "gw-us-2 dead everywhere {:?} after gw-us-1 was back",
        start.elapsed()
    );
}
