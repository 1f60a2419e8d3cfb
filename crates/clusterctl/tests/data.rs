//! End-to-end tests of the data path: messages to a node's `sink`, across sites and under load.
//!
//! Real `clusterctl` processes on loopback (see `clusterctl-testkit`). Nothing asserts on
//! timing: the checks are that every message arrives and is counted, and that pings keep
//! getting answers while a load fills the link.

use clusterctl_api::{LoadReport, PingReport, SinkReport};
use clusterctl_testkit::{http_get_json, Lab, LabOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_clusterctl"))
}

fn converged_lab() -> Lab {
    let lab = Lab::up(bin(), LabOptions::default());
    lab.wait_converged();
    lab
}

/// One gauge of `name`'s `/metrics` (plain HTTP/1.0 on its TCP control address, read token).
fn metric(lab: &Lab, name: &str, gauge: &str) -> u64 {
    let addr = &lab.node(name).control;
    let mut s = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("cannot connect to {name}'s control API at {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("a read timeout can be set");
    let token = lab.token("read");
    write!(
        s,
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .expect("request written");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("metrics read");
    let key = format!("clusterctl_{gauge} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} has no gauge {gauge} in:\n{text}"))
}

/// `clusterctl load` from `from`: asked of `from`'s own agent when `local`, else sent there
/// through the cluster by another agent (`--from`).
/// Five pings from edge-us-1 to `to`, every one answered.
fn ping5(lab: &Lab, to: &str) -> PingReport {
    let out = lab.cli(&["ping", to, "--from", "edge-us-1", "--count", "5", "--json"]);
    out.assert_success();
    let p: PingReport = out.json();
    assert_eq!(p.received, 5, "{}", out.describe());
    p
}

fn load(lab: &Lab, from: &str, local: bool, target: &str, count: u64, size: u32) -> LoadReport {
    let (count, size) = (count.to_string(), size.to_string());
    let other = lab
        .nodes()
        .iter()
        .find(|n| n.name != from && n.name != target)
        .map(|n| n.name.clone())
        .expect("a lab has more than two nodes");
    let mut args = vec!["load", target, "--count", &count, "--size", &size, "--json"];
    if local {
        args.extend(["--agent", from]);
    } else {
        args.extend(["--agent", other.as_str(), "--from", from]);
    }
    let out = lab.cli_within(Duration::from_secs(300), &args);
    out.assert_success();
    out.json()
}

#[test]
fn a_cross_site_load_is_delivered_in_full_and_counted_by_the_sink() {
    let lab = converged_lab();
    let before = metric(&lab, "edge-eu-2", "sink_messages");

    // Asked of another agent: the request travels to edge-us-1, which runs the load.
    let r = load(&lab, "edge-us-1", false, "edge-eu-2", 3000, 100);
    assert_eq!(
        (r.sent, r.delivered, r.dropped, r.unsent),
        (3000, 3000, 0, 0),
        "{r:?}"
    );
    assert_eq!(
        (r.from.as_str(), r.target.as_str()),
        ("edge-us-1", "edge-eu-2")
    );
    assert!(r.error.is_none(), "{r:?}");

    let r = load(&lab, "edge-us-1", true, "edge-eu-2", 50, 64 * 1024);
    assert_eq!((r.sent, r.delivered), (50, 50), "{r:?}");

    // The sink counted every message, and both gateways forwarded them on the data path.
    assert_eq!(metric(&lab, "edge-eu-2", "sink_messages") - before, 3050);
    assert!(metric(&lab, "edge-eu-2", "sink_bytes") >= 3000 * 100 + 50 * 64 * 1024);
    for gw in ["gw-us-1", "gw-eu-1"] {
        assert!(metric(&lab, gw, "data_forwarded") >= 3050, "{gw}");
        assert_eq!(metric(&lab, gw, "data_dropped"), 0, "{gw}");
    }

    // The sink's counters, read through the cluster from another site, then reset.
    let at = &lab.node("edge-us-1").control;
    // Resetting the counters changes what others read: it needs the admin token.
    let admin = lab.token("admin");
    let sink = |path: &str| -> SinkReport {
        http_get_json(at, path, &admin).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    };
    let r = sink("/v1/sink?node=edge-eu-2&reset=true");
    assert_eq!(r.node, "edge-eu-2");
    let from_us = r.senders.iter().find(|c| c.from == "edge-us-1");
    assert!(from_us.is_some_and(|c| c.messages >= 3050), "{r:?}");
    let r = sink("/v1/sink?node=edge-eu-2");
    assert!(r.senders.is_empty(), "not reset: {r:?}");
}

#[test]
fn pings_keep_getting_answers_while_a_load_fills_the_link() {
    let lab = converged_lab();
    std::thread::scope(|s| {
        let loader = s.spawn(|| load(&lab, "edge-us-1", true, "edge-us-2", 2000, 64 * 1024));
        let mut answered = 0;
        for _ in 0..200 {
            if loader.is_finished() && answered >= 10 {
                break;
            }
            let p = ping5(&lab, "edge-us-2");
            answered += p.received;
        }
        let r = loader.join().expect("the load thread finished");
        assert_eq!((r.sent, r.delivered), (2000, 2000), "{r:?}");
    });
}

#[test]
fn gateways_forward_pings_on_the_control_lane_without_their_owner_task() {
    let lab = converged_lab();
    let gauges = |node: &str| {
        [
            "control_forwarded",
            "echo_answered",
            "control_dropped",
            "data_forwarded",
        ]
        .map(|g| metric(&lab, node, g))
    };
    let nodes = ["gw-us-1", "gw-eu-1", "edge-eu-2"];
    let before = nodes.map(gauges);
    let p = ping5(&lab, "edge-eu-2");
    for a in &p.attempts {
        assert_eq!(a.path, ["edge-us-1", "gw-us-1", "gw-eu-1", "edge-eu-2"]);
    }
    let after = nodes.map(gauges);
    for (i, node) in nodes.iter().enumerate() {
        let [forwarded, answered, dropped, data] =
            std::array::from_fn(|g| after[i][g] - before[i][g]);
        if node.starts_with("gw-") {
            // Every request and every reply crossed each gateway's data path, on the control
            // lane (nothing went on the bulk lane).
            assert!(
                forwarded >= 10,
                "{node} forwarded {forwarded} control frames"
            );
            assert_eq!(data, 0, "{node} forwarded pings on the bulk lane");
        } else {
            // The target's control reader answered every echo request.
            assert!(answered >= 5, "{node} answered {answered} echo requests");
        }
        assert_eq!(dropped, 0, "{node}");
    }
}

#[test]
fn a_load_to_an_unknown_node_fails_with_the_reason() {
    let lab = converged_lab();
    let out = lab.cli(&["load", "nowhere-1", "--from", "edge-us-1", "--count", "1"]);
    out.assert_code(2);
    assert!(
        out.stderr.contains("nowhere-1") && out.stderr.contains("not in the node table"),
        "{}",
        out.describe()
    );
    let out = lab.cli(&["load", "edge-us-1", "--from", "edge-us-1", "--count", "1"]);
    out.assert_code(2);
    assert!(
        out.stderr.contains("cannot load itself"),
        "{}",
        out.describe()
    );
}

#[test]
fn a_stalled_target_makes_its_gateway_drop_count_and_report_while_the_sender_only_waits() {
    let lab = converged_lab();
    let pid = lab.node("edge-eu-2").pid.to_string();
    let kill = |sig: &str| {
        let st = std::process::Command::new("kill")
            .args([sig, pid.as_str()])
            .status()
            .expect("kill(1) runs");
        assert!(st.success(), "kill {sig} {pid}: {st}");
    };
    std::thread::scope(|s| {
        let loader = s.spawn(|| {
            lab.cli_within(
                Duration::from_secs(150),
                &[
                    "load",
                    "edge-eu-2",
                    "--agent",
                    "edge-us-1",
                    "--count",
                    "1000000",
                    "--size",
                    "65536",
                    "--timeout-ms",
                    "25000",
                    "--json",
                ],
            )
        });
        lab.wait_until(
            "data flows through gw-eu-1",
            Duration::from_secs(60),
            || metric(&lab, "gw-eu-1", "data_forwarded") > 0,
        );
        // The target stops reading: the gateway's lane toward it fills, and after waiting for
        // room (5 s) the gateway drops what it cannot queue.
        kill("-STOP");
        lab.wait_until("gw-eu-1 drops data", Duration::from_secs(60), || {
            metric(&lab, "gw-eu-1", "data_dropped") > 0
        });
        kill("-CONT");
        let out = loader.join().expect("the load thread finished");
        out.assert_code(1);
        let r: LoadReport = out.json();
        assert!(r.dropped > 0 && r.delivered < r.sent, "{r:?}");
    });
    // The sender waited for room instead of dropping.
    assert_eq!(metric(&lab, "edge-us-1", "data_dropped"), 0);
    let events = lab.events("gw-eu-1");
    assert!(
        events
            .iter()
            .any(|e| e.reason.contains("data messages: a bulk lane stayed full")),
        "gw-eu-1 reported no drop: {events:#?}"
    );
}
