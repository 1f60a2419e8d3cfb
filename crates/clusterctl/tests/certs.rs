//! End-to-end tests of `clusterctl certs` and `clusterctl preflight`: the real binary, on files
//! in temporary directories and, for the checks that need live seeds, against a lab on a
//! loopback range of its own.

use clusterctl_api::{CertsReport, Role};
use clusterctl_core::name::{ClusterName, Ident, NodeName, SiteName};
use clusterctl_node::pki::{issue_node_cert, read_ca, Validity};
use clusterctl_testkit::{CliOutput, Lab, LabOptions, DEFAULT_WAIT};
use serde::Deserialize;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_clusterctl"))
}

/// Runs `clusterctl ARGS` in `dir`, without any lab or agent from the environment.
fn cli(dir: &Path, args: &[&str]) -> CliOutput {
    let out = Command::new(bin())
        .args(args)
        .current_dir(dir)
        .env("CLUSTERCTL_LAB_DIR", dir.join("no-lab"))
        .env_remove("CLUSTERCTL_AGENT")
        .stdin(Stdio::null())
        .output()
        .expect("the clusterctl binary runs");
    CliOutput {
        args: args.iter().map(|a| a.to_string()).collect(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[derive(Debug, Deserialize)]
struct Report {
    ok: bool,
    checks: Vec<CheckView>,
}

#[derive(Debug, Deserialize)]
struct CheckView {
    name: String,
    status: String,
    detail: String,
    fix: Option<String>,
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

#[derive(Debug, Deserialize)]
struct Inspect {
    certificates: Vec<InspectCert>,
}

#[derive(Debug, Deserialize)]
struct InspectCert {
    kind: String,
    node: Option<String>,
    site: Option<String>,
    role: Option<Role>,
    dns_sans: Vec<String>,
    short_fingerprint: String,
    fingerprint: String,
    days_left: i64,
    expired: bool,
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .expect("file exists")
        .permissions()
        .mode()
        & 0o777
}

/// A UDP and a TCP port on `ip` that are free right now.
fn free_ports(ip: &str) -> (u16, u16) {
    let udp = UdpSocket::bind((ip, 0)).expect("a free UDP port");
    let tcp = TcpListener::bind((ip, 0)).expect("a free TCP port");
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
nodes = ["gw-us-1", "edge-us-1", "edge-us-2"]
"#;

/// A CA, certificates for edge-us-1 and edge-us-2 made with the CLI, a contract, a secret and
/// a config for edge-us-1 that passes preflight.
struct Deploy {
    tmp: tempfile::TempDir,
}

impl Deploy {
    fn new() -> Deploy {
        let tmp = tempfile::tempdir().expect("a temporary directory");
        let d = tmp.path();
        cli(d, &["certs", "init", "--dir", "ca", "--cluster", "prod"]).assert_success();
        for name in ["edge-us-1", "edge-us-2"] {
            cli(
                d,
                &[
                    "certs", "issue", name, "--site", "us-east", "--role", "member", "--ca-dir",
                    "ca", "--out", "etc",
                ],
            )
            .assert_success();
        }
        cli(d, &["secret", "generate", "etc/cluster.secret"]).assert_success();
        std::fs::write(d.join("etc/contract.toml"), CONTRACT).expect("write the contract");
        let deploy = Deploy { tmp };
        deploy.write_config("edge-us-1.pem", "edge-us-1.key");
        deploy
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn config(&self) -> PathBuf {
        self.dir().join("etc/node.toml")
    }

    fn write_config(&self, cert: &str, key: &str) {
        let (listen, _) = free_ports("127.0.0.1");
        let text = format!(
            "cluster = \"prod\"\nname = \"edge-us-1\"\nsite = \"us-east\"\nrole = \"member\"\n\
             listen = \"127.0.0.1:{listen}\"\n\
             data-dir = \"../data\"\ncontract = \"contract.toml\"\nsecret = \"cluster.secret\"\n\n\
             [tls]\nca = \"../ca/ca.pem\"\ncert = \"{cert}\"\nkey = \"{key}\"\n"
        );
        std::fs::write(self.config(), text).expect("write the config");
    }

    fn preflight(&self) -> (CliOutput, Report) {
        let cfg = self.config().display().to_string();
        let out = cli(self.dir(), &["preflight", "--config", &cfg, "--json"]);
        let report = out.json();
        (out, report)
    }
}

#[test]
fn certs_init_issue_inspect_round_trip() {
    let d = Deploy::new();
    let dir = d.dir();
    assert_eq!(mode(&dir.join("ca/ca.key")), 0o600);
    assert_eq!(mode(&dir.join("etc/edge-us-1.key")), 0o600);

    // Never overwrites.
    let again = cli(dir, &["certs", "init", "--dir", "ca", "--cluster", "prod"]);
    again.assert_code(2);
    assert!(
        again.stderr.contains("never overwritten"),
        "{}",
        again.describe()
    );

    let out = cli(dir, &["certs", "inspect", "etc/edge-us-1.pem", "--json"]);
    out.assert_success();
    let node: Inspect = out.json();
    let c = &node.certificates[0];
    assert_eq!(c.kind, "node");
    assert_eq!(c.node.as_deref(), Some("edge-us-1"));
    assert_eq!(c.site.as_deref(), Some("us-east"));
    assert_eq!(c.role, Some(Role::Member));
    assert_eq!(c.dns_sans, ["edge-us-1.us-east.prod"]);
    assert!(c.fingerprint.starts_with(&c.short_fingerprint));
    assert!((88..=90).contains(&c.days_left), "default lifetime: {c:?}");
    assert!(!c.expired);

    let out = cli(dir, &["certs", "inspect", "ca/ca.pem"]);
    out.assert_success();
    assert!(
        out.stdout.contains("CA certificate (cluster prod)"),
        "{}",
        out.describe()
    );
    let ca: Inspect = cli(dir, &["certs", "inspect", "ca/ca.pem", "--json"]).json();
    assert_eq!(ca.certificates[0].kind, "ca");
    assert!((363..=365).contains(&ca.certificates[0].days_left));

    // The issue line names the CA it came from.
    let out = cli(
        dir,
        &[
            "certs", "issue", "gw-us-1", "--site", "us-east", "--role", "gateway", "--ca-dir",
            "ca", "--days", "7",
        ],
    );
    out.assert_success();
    assert!(
        out.stdout.contains(&ca.certificates[0].short_fingerprint),
        "{}",
        out.describe()
    );
    // A certificate may not outlive its CA.
    let out = cli(
        dir,
        &[
            "certs", "issue", "gw-us-2", "--site", "us-east", "--role", "gateway", "--ca-dir",
            "ca", "--days", "400",
        ],
    );
    out.assert_code(2);
    assert!(out.stderr.contains("outlive the CA"), "{}", out.describe());
}

#[test]
fn a_config_made_with_certs_passes_preflight() {
    let d = Deploy::new();
    let (out, report) = d.preflight();
    assert!(report.ok, "{}", out.describe());
    out.assert_success();
    for c in &report.checks {
        assert_eq!(c.status, "pass", "{}", out.describe());
    }
    for name in [
        "config",
        "name",
        "site-role",
        "cert-chain",
        "cert-names",
        "cert-validity",
        "clock",
        "key-file",
        "secret-file",
        "keyring",
        "data-dir",
        "listen",
        "control",
        "advertise",
    ] {
        report.check(name);
    }
    // Preflight leaves no data directory behind.
    assert!(!d.dir().join("data").exists());
    // Human output: one line per check, PASS first.
    let cfg = d.config().display().to_string();
    let human = cli(d.dir(), &["preflight", "--config", &cfg]);
    human.assert_success();
    assert!(
        human
            .stdout
            .lines()
            .filter(|l| l.starts_with("PASS  "))
            .count()
            >= 14,
        "{}",
        human.describe()
    );
}

#[test]
fn preflight_fails_a_readable_secret_with_the_chmod() {
    let d = Deploy::new();
    let secret = d.dir().join("etc/cluster.secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (out, report) = d.preflight();
    out.assert_code(1);
    let c = report.check("secret-file");
    assert_eq!(c.status, "fail", "{}", out.describe());
    assert!(c.detail.contains("0644"), "{}", out.describe());
    assert_eq!(
        c.fix.as_deref(),
        Some(format!("chmod 600 {}", secret.display()).as_str())
    );
    // The other checks still ran.
    assert_eq!(
        report.check("cert-chain").status,
        "pass",
        "{}",
        out.describe()
    );
    let cfg = d.config().display().to_string();
    let human = cli(d.dir(), &["preflight", "--config", &cfg]);
    assert!(
        human
            .stdout
            .lines()
            .any(|l| l.starts_with("FAIL  secret-file") && l.contains("— fix: chmod 600")),
        "{}",
        human.describe()
    );
}

#[test]
fn preflight_fails_an_expired_certificate() {
    let d = Deploy::new();
    let ca = read_ca(&d.dir().join("ca/ca.pem"), &d.dir().join("ca/ca.key")).expect("the CA reads");
    let now = SystemTime::now();
    let past = Validity {
        not_before: now - Duration::from_secs(20 * 86_400),
        not_after: now - Duration::from_secs(2 * 86_400),
    };
    let ident = Ident {
        name: NodeName::new("edge-us-1").expect("valid"),
        site: SiteName::new("us-east").expect("valid"),
        role: Role::Member,
    };
    let cluster = ClusterName::new("prod").expect("valid");
    let old = issue_node_cert(&ca, &cluster, &ident, past).expect("issued");
    std::fs::write(d.dir().join("etc/old.pem"), &old.cert_pem).expect("write");
    std::fs::write(d.dir().join("etc/old.key"), &old.key_pem).expect("write");
    std::fs::set_permissions(
        d.dir().join("etc/old.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    d.write_config("old.pem", "old.key");

    let (out, report) = d.preflight();
    out.assert_code(1);
    let c = report.check("cert-validity");
    assert_eq!(c.status, "fail", "{}", out.describe());
    assert!(c.detail.contains("expired"), "{}", out.describe());
    assert!(
        c.fix.as_deref().is_some_and(
            |f| f.contains("clusterctl certs issue edge-us-1 --site us-east --role member")
        ),
        "{}",
        out.describe()
    );
    // inspect says so too, and exits 1.
    let inspect = cli(d.dir(), &["certs", "inspect", "etc/old.pem"]);
    inspect.assert_code(1);
    assert!(inspect.stdout.contains("EXPIRED"), "{}", inspect.describe());
}

#[test]
fn preflight_fails_the_certificate_of_another_node() {
    let d = Deploy::new();
    d.write_config("edge-us-2.pem", "edge-us-2.key");
    let (out, report) = d.preflight();
    out.assert_code(1);
    let c = report.check("cert-names");
    assert_eq!(c.status, "fail", "{}", out.describe());
    assert!(c.detail.contains("names edge-us-2"), "{}", out.describe());
    assert!(
        c.fix
            .as_deref()
            .is_some_and(|f| f.contains("certs issue edge-us-1")),
        "{}",
        out.describe()
    );
    // The chain itself is fine: only the names are wrong.
    assert_eq!(
        report.check("cert-chain").status,
        "pass",
        "{}",
        out.describe()
    );
}

#[test]
fn preflight_fails_a_listen_port_in_use() {
    let d = Deploy::new();
    let text = std::fs::read_to_string(d.config()).expect("read");
    let listen: SocketAddr = text
        .lines()
        .find_map(|l| l.strip_prefix("listen = "))
        .map(|v| v.trim_matches('"').parse().expect("an address"))
        .expect("a listen line");
    let _busy = UdpSocket::bind(listen).expect("the port is free until now");
    let (out, report) = d.preflight();
    out.assert_code(1);
    let c = report.check("listen");
    assert_eq!(c.status, "fail", "{}", out.describe());
    assert!(c.detail.contains("in use"), "{}", out.describe());
    assert!(
        c.fix.as_deref().is_some_and(|f| f.contains("ss -ulpn")),
        "{}",
        out.describe()
    );
}

#[test]
fn preflight_of_an_unreadable_config_exits_2() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let out = cli(tmp.path(), &["preflight", "--config", "missing.toml"]);
    out.assert_code(2);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.describe());
}

/// A copy of `node`'s lab config on ports of its own, with a fresh data directory and `seeds`.
fn lab_variant(
    lab: &Lab,
    node: &str,
    file: &str,
    seeds: &[String],
    secret: Option<&str>,
) -> PathBuf {
    let n = lab.node(node);
    let mut t: toml::Table =
        toml::from_str(&std::fs::read_to_string(&n.config).expect("read")).expect("parses");
    let ip = n.addr.rsplit_once(':').expect("IP:PORT").0.to_string();
    let (listen, control) = free_ports(&ip);
    t.insert("listen".into(), format!("{ip}:{listen}").into());
    // The node's own address, as preflight on its machine before a restart advertises it
    // (another address would be a second instance of the running node, and refused).
    t.insert("advertise".into(), n.addr.clone().into());
    t.insert("control".into(), format!("{ip}:{control}").into());
    t.insert("data-dir".into(), format!("data-{file}").into());
    t.insert(
        "seeds".into(),
        toml::Value::Array(seeds.iter().map(|s| s.clone().into()).collect()),
    );
    if let Some(s) = secret {
        t.insert("secret".into(), s.into());
    }
    let path = n.dir().join(format!("{file}.toml"));
    std::fs::write(&path, toml::to_string(&t).expect("serializes")).expect("write");
    path
}

#[test]
fn preflight_handshakes_with_seeds_and_names_dns_drift_and_secret_mismatch() {
    let lab = Lab::up(bin(), LabOptions::default());
    let gw = lab.node("gw-us-1").addr.clone();
    let edge2 = lab.node("edge-us-2").addr.clone();

    // gw-us-1 answers at its address; "edge-us-2" is written with gw-us-1's address.
    let cfg = lab_variant(
        &lab,
        "edge-us-1",
        "drift",
        &[format!("gw-us-1@{gw}"), format!("edge-us-2@{gw}")],
        None,
    );
    let cfg_s = cfg.display().to_string();
    let out = lab.cli(&["preflight", "--config", &cfg_s, "--json"]);
    out.assert_code(1);
    let report: Report = out.json();
    let ok = report.check("seed gw-us-1");
    assert_eq!(ok.status, "pass", "{}", out.describe());
    assert!(ok.detail.contains("handshake ok"), "{}", out.describe());
    let drift = report.check("seed edge-us-2");
    assert_eq!(drift.status, "fail", "{}", out.describe());
    assert!(
        drift.detail.contains(&format!(
            "DNS drift: edge-us-2 resolves to {gw} but the node answering there is gw-us-1"
        )),
        "{}",
        out.describe()
    );
    assert!(
        drift.fix.as_deref().is_some_and(|f| f.contains("seeds[1]")),
        "{}",
        out.describe()
    );
    // The table a seed sent shows edge-us-2's real address.
    let seeds = report.check("seed-addresses");
    assert_eq!(seeds.status, "warn", "{}", out.describe());
    assert!(seeds.detail.contains(&edge2), "{}", out.describe());

    // A node holding another cluster secret is refused, and preflight says why.
    let other = lab.node("edge-us-1").dir().join("other.secret");
    lab.cli(&["secret", "generate", &other.display().to_string()])
        .assert_success();
    let cfg = lab_variant(
        &lab,
        "edge-us-1",
        "secret",
        &[format!("gw-us-1@{gw}")],
        Some("other.secret"),
    );
    let cfg_s = cfg.display().to_string();
    let out = lab.cli(&["preflight", "--config", &cfg_s, "--json"]);
    out.assert_code(1);
    let report: Report = out.json();
    let c = report.check("seed gw-us-1");
    assert_eq!(c.status, "fail", "{}", out.describe());
    assert!(c.detail.contains("secret mismatch"), "{}", out.describe());
    assert!(
        c.fix.as_deref().is_some_and(|f| f.contains("secret")),
        "{}",
        out.describe()
    );

    // The lab is unharmed: the short preflight links leave every expected link up again.
    lab.wait_for("every expected link up again", DEFAULT_WAIT, || {
        let out = lab.cli(&["topology", "--json", "--agent", "gw-us-1"]);
        if out.code == Some(0) {
            Ok(())
        } else {
            Err(out.describe())
        }
    });
}

#[test]
fn certs_status_shows_every_node_and_the_ca() {
    let lab = Lab::up(bin(), LabOptions::default());
    lab.wait_converged();
    let ca = lab.cli(&[
        "certs",
        "inspect",
        &lab.dir().join("ca.pem").display().to_string(),
        "--json",
    ]);
    ca.assert_success();
    let ca: Inspect = ca.json();
    let fp = ca.certificates[0].short_fingerprint.clone();
    let report: CertsReport = lab.wait_for(
        "every node to publish its certificate",
        DEFAULT_WAIT,
        || {
            let out = lab.cli(&["certs", "status", "--json", "--agent", "gw-us-1"]);
            if out.code != Some(0) {
                return Err(out.describe());
            }
            let r: CertsReport = serde_json::from_str(&out.stdout)
                .map_err(|e| format!("{e}: {}", out.describe()))?;
            if r.node_certs.len() == 6 && r.node_certs.iter().all(|n| n.cert.is_some()) {
                Ok(r)
            } else {
                Err(out.describe())
            }
        },
    );
    for n in &report.node_certs {
        let c = n.cert.as_ref().expect("checked above");
        assert_eq!(c.issuer, fp, "{report:#?}");
        assert!(c.trusts.contains(&fp), "{report:#?}");
        assert_eq!(c.leaf.len(), 16);
    }
    let out = lab.cli(&["certs", "status", "--agent", "gw-us-1"]);
    out.assert_success();
    assert!(
        out.stdout.contains(&format!(
            "CA {fp}  trusted by 6/6 nodes, issued 6/6 certificates"
        )),
        "{}",
        out.describe()
    );
}
