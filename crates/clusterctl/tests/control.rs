//! The control API lets only operators change the cluster (docs/security.md, "The control
//! API"): the control socket admits the agent's user and root, the TCP listener admits tokens by
//! scope, every change is an event naming its caller, errors are JSON, and the CLI never hangs on
//! a frozen agent.

use clusterctl_api::{Event, EventKind, Members, NodeStatus, Topology};
use clusterctl_testkit::{Lab, LabOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_clusterctl"))
}

/// The user the unprivileged checks run as.
const NOBODY: u32 = 65534;

fn converged_lab() -> Lab {
    let lab = Lab::up(bin(), LabOptions::default());
    lab.wait_converged();
    lab
}

/// One raw HTTP/1.0 request to a TCP control address: (status, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("a read timeout can be set");
    let mut req = format!("{method} {path} HTTP/1.0\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("request written");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("answer read");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

fn error_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("the error body is not JSON ({e}): {body:?}"));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no \"error\" string in {body}"))
        .to_string()
}

fn control_calls(lab: &Lab, agent: &str) -> Vec<Event> {
    lab.events(agent)
        .into_iter()
        .filter(|e| e.kind == EventKind::ControlCall)
        .collect()
}

/// Everything the cluster looks like from gw-us-1 that an intruder would want to change.
fn snapshot(lab: &Lab) -> (Vec<(String, NodeStatus)>, String) {
    let m: Members = lab.members("gw-us-1");
    let mut nodes: Vec<(String, NodeStatus)> = m
        .members
        .iter()
        .map(|n| (n.name.clone(), n.status))
        .collect();
    nodes.sort();
    let keys = lab.cli(&["secret", "list", "--agent", "gw-us-1"]);
    keys.assert_success();
    (nodes, keys.stdout)
}

#[test]
fn only_operators_change_the_cluster() {
    let lab = converged_lab();
    let gw = lab.node("gw-us-1").clone();
    let socket = format!("unix:{}", gw.socket.display());
    let read = lab.token("read");
    let admin = lab.token("admin");
    let before = snapshot(&lab);
    let calls_before = control_calls(&lab, "gw-us-1").len();

    // A secret file the unprivileged user owns, as in the reported attack.
    let theirs = lab
        .dir()
        .parent()
        .expect("lab parent")
        .join("theirs.secret");
    std::fs::write(&theirs, format!("{}\n", "ab".repeat(32))).expect("write");
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).expect("chown");
    let theirs = theirs.display().to_string();
    let verbs: Vec<Vec<&str>> = vec![
        vec!["forget", "edge-us-2", "--force"],
        vec!["secret", "install", &theirs],
        vec!["secret", "use", "0000000000000000"],
        vec!["reload"],
        vec!["load", "edge-us-2", "--count", "10"],
        vec!["ping", "edge-us-2"],
    ];

    // 1. Through the control socket: the user cannot even open it.
    for verb in &verbs {
        let mut args = vec!["--agent", socket.as_str()];
        args.extend(verb.iter().copied());
        let out = lab.cli_as(NOBODY, &[], &args);
        out.assert_code(2);
        assert!(
            out.stderr.contains("not an operator of this agent"),
            "{}",
            out.describe()
        );
    }

    // 2. Through TCP without a token, with a wrong one, and with the read token.
    for verb in &verbs {
        let mut args = vec!["--agent", gw.control.as_str()];
        args.extend(verb.iter().copied());
        let out = lab.cli_as(NOBODY, &[], &args);
        out.assert_code(2);
        assert!(
            out.stderr.contains("token is required"),
            "{}",
            out.describe()
        );
        let out = lab.cli_as(NOBODY, &[("CLUSTERCTL_TOKEN", &"f".repeat(64))], &args);
        out.assert_code(2);
        assert!(out.stderr.contains("(401)"), "{}", out.describe());
        let out = lab.cli_as(NOBODY, &[("CLUSTERCTL_TOKEN", &read)], &args);
        out.assert_code(2);
        assert!(
            out.stderr.contains("needs the admin scope"),
            "{}",
            out.describe()
        );
    }
    let (status, body) = http(
        &gw.control,
        "POST",
        "/v1/reload",
        &[("Authorization", "Bearer wrong")],
        "{}",
    );
    assert_eq!(status, 401, "{body}");
    assert!(error_of(&body).contains("not valid"), "{body}");

    // The read token reads.
    let out = lab.cli_as(
        NOBODY,
        &[("CLUSTERCTL_TOKEN", &read)],
        &["--agent", &gw.control, "members", "--json"],
    );
    out.assert_success();
    let m: Members = out.json();
    assert_eq!(m.observer, "gw-us-1");

    // Nothing changed, and every refused change is on record with its caller.
    assert_eq!(snapshot(&lab), before, "the cluster changed");
    let calls = control_calls(&lab, "gw-us-1");
    let refused: Vec<&Event> = calls[calls_before..]
        .iter()
        .filter(|e| e.reason.contains("refused"))
        .collect();
    // The socket refusals happen in the kernel (no connection): 6 verbs x 3 TCP attempts.
    assert!(
        refused.len() >= verbs.len() * 3,
        "{} refused calls recorded: {refused:#?}",
        refused.len()
    );
    assert!(
        refused.iter().any(|e| e.reason.contains("read token")),
        "{refused:#?}"
    );

    // The admin token may change things, as the unprivileged user too.
    let out = lab.cli_as(
        NOBODY,
        &[("CLUSTERCTL_TOKEN", &admin)],
        &["--agent", &gw.control, "reload"],
    );
    out.assert_success();
    let last = control_calls(&lab, "gw-us-1").pop().expect("an event");
    assert!(
        last.reason.starts_with("POST /v1/reload by admin token ")
            && last.reason.ends_with("200 OK"),
        "{last:?}"
    );
}

/// The kernel's peer credentials are checked on every connection: a socket whose mode was
/// loosened by hand still refuses other users.
#[test]
fn the_control_socket_checks_who_connects() {
    use std::os::unix::fs::PermissionsExt;
    let lab = converged_lab();
    let node = lab.node("edge-us-1").clone();
    let mut p = node.socket.clone();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).expect("chmod socket");
    while let Some(parent) = p.parent() {
        if parent == Path::new("/") {
            break;
        }
        let mode = std::fs::metadata(parent)
            .expect("stat")
            .permissions()
            .mode();
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(mode | 0o011))
            .expect("chmod dir");
        p = parent.to_path_buf();
    }
    let socket = format!("unix:{}", node.socket.display());
    for args in [
        vec!["--agent", socket.as_str(), "members"],
        vec!["--agent", socket.as_str(), "forget", "edge-us-2", "--force"],
    ] {
        let out = lab.cli_as(NOBODY, &[], &args);
        out.assert_code(2);
        assert!(
            out.stderr
                .contains(&format!("uid {NOBODY} is not an operator")),
            "{}",
            out.describe()
        );
    }
    let calls = control_calls(&lab, "edge-us-1");
    assert!(
        calls.iter().any(|e| e
            .reason
            .contains("POST /v1/forget by uid 65534 on the control socket: refused")),
        "{calls:#?}"
    );
    // Root still gets in.
    lab.cli(&["--agent", &socket, "members"]).assert_success();
}

#[test]
fn errors_are_json_hosts_are_checked_and_each_change_is_one_event() {
    let lab = converged_lab();
    let gw = lab.node("gw-eu-1").clone();
    let admin = lab.token("admin");
    let auth = format!("Bearer {admin}");
    let a = [("Authorization", auth.as_str())];

    let (status, body) = http(&gw.control, "GET", "/v1/nothing-here", &a, "");
    assert_eq!(status, 404);
    assert!(error_of(&body).contains("no such endpoint"), "{body}");
    let (status, body) = http(&gw.control, "DELETE", "/v1/members", &a, "");
    assert_eq!(status, 405);
    assert!(error_of(&body).contains("not allowed"), "{body}");
    let (status, body) = http(&gw.control, "POST", "/v1/forget", &a, "{\"nam");
    assert_eq!(status, 400);
    assert!(!error_of(&body).is_empty(), "{body}");

    // DNS rebinding: a page served from another name cannot reach the API.
    let (status, body) = http(
        &gw.control,
        "GET",
        "/v1/status",
        &[("Host", "attacker.example:7401"), a[0]],
        "",
    );
    assert_eq!(status, 421, "{body}");
    assert!(error_of(&body).contains("Host header"), "{body}");
    let port = gw.control.rsplit_once(':').expect("port").1;
    let (status, body) = http(
        &gw.control,
        "GET",
        "/v1/status",
        &[("Host", &format!("localhost:{port}")), a[0]],
        "",
    );
    assert_eq!(status, 200, "{body}");

    // One event per mutating call, none per read.
    let count = || control_calls(&lab, "gw-eu-1").len();
    let n0 = count();
    http(&gw.control, "GET", "/v1/members", &a, "");
    lab.cli(&["--agent", "gw-eu-1", "topology"]);
    assert_eq!(count(), n0, "reads are not recorded");
    lab.cli(&["--agent", "gw-eu-1", "reload"]).assert_success();
    assert_eq!(count(), n0 + 1);
    let out = lab.cli(&["--agent", "gw-eu-1", "forget", "edge-eu-2"]);
    out.assert_code(2);
    assert_eq!(count(), n0 + 2);
    let calls = control_calls(&lab, "gw-eu-1");
    let last = &calls[calls.len() - 1];
    assert!(
        last.reason.starts_with("POST /v1/forget by uid 0 ")
            && last.reason.contains("on the control socket: 400"),
        "{last:?}"
    );
}

#[test]
fn forgetting_a_live_node_needs_force() {
    let mut lab = converged_lab();
    let out = lab.cli(&["--agent", "edge-us-1", "forget", "edge-eu-1"]);
    out.assert_code(2);
    assert!(
        out.stderr.contains("edge-eu-1 is alive") && out.stderr.contains("--force"),
        "{}",
        out.describe()
    );
    let out = lab.cli(&["--agent", "edge-us-1", "forget", "edge-us-1", "--force"]);
    out.assert_code(2);
    assert!(
        out.stderr.contains("cannot forget itself"),
        "{}",
        out.describe()
    );
    let m = lab.members("edge-us-1");
    assert!(
        m.members.iter().all(|n| n.status == NodeStatus::Alive),
        "nothing was forgotten: {m:?}"
    );
    // With --force it is done, and the forgotten node stops.
    lab.cli(&["--agent", "edge-us-1", "forget", "edge-eu-1", "--force"])
        .assert_success();
    let deadline = Instant::now() + Duration::from_secs(30);
    while lab.is_running("edge-eu-1") {
        assert!(
            Instant::now() < deadline,
            "edge-eu-1 still runs 30 s after it was forgotten"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_tcp_listener_without_tokens_does_not_start() {
    let mut lab = converged_lab();
    let n = lab.node("edge-us-2").clone();
    let text = std::fs::read_to_string(&n.config).expect("config");
    let mut t: toml::Table = toml::from_str(&text).expect("toml");
    t.remove("control-tokens");
    t.insert("control".into(), "0.0.0.0:7499".into());
    t.insert("data-dir".into(), "data-other".into());
    let cfg = n.dir().join("open-control.toml");
    std::fs::write(&cfg, toml::to_string(&t).expect("toml")).expect("write");
    let started = lab.start_agent_with_config("edge-us-2", &cfg, &[]);
    let status = lab.wait_exit(&started, Duration::from_secs(30));
    assert_eq!(status.code(), Some(2));
    let log = std::fs::read_to_string(&started.log).expect("log");
    assert!(
        log.contains("config error in `control`")
            && log.contains("non-loopback")
            && log.contains("control-tokens"),
        "{log}"
    );
}

#[test]
fn reload_reports_a_changed_contract() {
    let lab = converged_lab();
    let path = lab.dir().join("contract.toml");
    let text = std::fs::read_to_string(&path).expect("contract");
    // A comment changes nothing: no report.
    std::fs::write(&path, format!("{text}\n# reviewed\n")).expect("write");
    let out = lab.cli(&["--agent", "gw-us-1", "reload", "--json"]);
    out.assert_success();
    let r: Vec<serde_json::Value> = out.json();
    assert!(r[0]["contract_changed"].is_null(), "{}", out.stdout);
    // A new site is a change.
    std::fs::write(
        &path,
        format!("{text}\n[[site]]\nname = \"ap-south\"\ngateways = [\"gw-ap-1\"]\n"),
    )
    .expect("write");
    let out = lab.cli(&["--agent", "gw-us-1", "reload"]);
    out.assert_success();
    assert!(
        out.stdout.contains("differs from the one in use"),
        "{}",
        out.describe()
    );
    let events = lab.events("gw-us-1");
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == EventKind::ContractChanged)
            .count(),
        1,
        "{events:#?}"
    );
    let (code, t): (Option<i32>, Topology) = lab.topology("gw-us-1");
    assert_eq!(code, Some(0), "a pending contract is not a fault");
    assert!(
        t.warnings
            .iter()
            .any(|w| w.contains("differs from the one in use")),
        "{:?}",
        t.warnings
    );
    let text_out = lab.cli(&["--agent", "gw-us-1", "topology"]);
    assert!(
        text_out.stdout.contains("differs from the one in use"),
        "{}",
        text_out.describe()
    );
}

/// A stopped (SIGSTOP) agent: every command returns within its timeout with one clear line.
#[test]
fn a_frozen_agent_never_hangs_the_cli() {
    let mut lab = converged_lab();
    lab.signal("edge-eu-2", "STOP");
    let mut results = Vec::new();
    // Each command with the bound it promises: 2 s for each request, the default 10 s, and for
    // ping the wait for each probe plus one and 5 s.
    for (args, bound) in [
        (vec!["topology", "--timeout", "2s"], 2),
        (vec!["members", "--timeout", "2s"], 2),
        (vec!["events", "--once", "--timeout", "2s"], 2),
        (vec!["events", "--timeout", "2s"], 2),
        (vec!["ping", "edge-eu-1", "--timeout", "1s"], 7),
        (vec!["reload", "--timeout", "2s"], 2),
        (vec!["members"], 10),
    ] {
        let mut full = vec!["--agent", "edge-eu-2"];
        full.extend(args.iter().copied());
        let start = Instant::now();
        let out = lab.cli_within(Duration::from_secs(60), &full);
        results.push((out, start.elapsed(), Duration::from_secs(bound)));
    }
    lab.signal("edge-eu-2", "CONT");
    for (out, took, bound) in &results {
        out.assert_code(2);
        assert!(
            *took >= *bound && *took < *bound + Duration::from_secs(8),
            "took {took:?}: {}",
            out.describe()
        );
        assert!(
            out.stderr.contains("did not answer") || out.stderr.contains("sent nothing"),
            "{}",
            out.describe()
        );
        assert!(!out.stderr.contains("(global)"), "{}", out.describe());
        assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.describe());
    }
}

#[test]
fn token_init_writes_private_tokens_an_agent_accepts() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("tokens");
    let run = || {
        std::process::Command::new(bin())
            .args(["token", "init"])
            .arg(&dir)
            .output()
            .expect("run clusterctl")
    };
    let out = run();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("control-tokens"), "{text}");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    let mut values = Vec::new();
    for scope in ["read", "app", "admin"] {
        let p = dir.join(format!("{scope}.token"));
        assert_eq!(mode(&p), 0o600, "{}", p.display());
        values.push(std::fs::read_to_string(&p).expect("read"));
    }
    // Existing tokens are kept, and they load as the agent loads them.
    assert!(run().status.success());
    for (scope, v) in ["read", "app", "admin"].iter().zip(&values) {
        assert_eq!(
            &std::fs::read_to_string(dir.join(format!("{scope}.token"))).expect("read"),
            v
        );
    }
    let tokens = clusterctl_node::auth::Tokens::load(&dir).expect("the agent accepts them");
    assert_eq!(tokens.scopes().len(), 3);
}

/// `events` follows a quiet agent for as long as it lives (keep-alives), and reports one that
/// freezes mid-stream within its timeout.
#[test]
fn events_follow_a_quiet_agent_and_report_a_frozen_one() {
    let mut lab = converged_lab();
    let mut child = std::process::Command::new(bin())
        .args(["events", "--agent", "edge-us-2", "--timeout", "3s"])
        .env("CLUSTERCTL_LAB_DIR", lab.dir())
        .env_remove("CLUSTERCTL_AGENT")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run clusterctl events");
    // Twice the timeout with (most likely) no event: keep-alives hold the stream.
    std::thread::sleep(Duration::from_secs(7));
    let alive = child.try_wait().expect("try_wait").is_none();
    lab.signal("edge-us-2", "STOP");
    let stopped = Instant::now();
    let mut status = None;
    while stopped.elapsed() < Duration::from_secs(15) {
        if let Some(s) = child.try_wait().expect("try_wait") {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = stopped.elapsed();
    lab.signal("edge-us-2", "CONT");
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(alive, "events gave up on a live, quiet agent: {stderr}");
    let status = status.unwrap_or_else(|| panic!("events still follows a frozen agent after 15 s"));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(stderr.contains("not even a keep-alive"), "{stderr}");
}
