//! `clusterctl preflight --config FILE [--json]`: everything that would stop a node, checked
//! before it starts, one line per check.
//!
//! The checks run even when the config is invalid: the loader's verdict is one check (`config`),
//! and every other check reads the raw TOML for what it needs, so one run shows every problem,
//! not just the first. [`run_checks`] is the whole engine; the agent runs [`local_checks`] (no
//! network, no port binding) before it starts.
//!
//! What is checked:
//! - `config`: the agent's own loader accepts the file;
//! - `name`, `site-role`, `contract`: name syntax and uniqueness in the contract, site and role
//!   as the contract has them, the contract itself;
//! - `cert-chain`, `cert-names`, `cert-validity`, `clock`: the certificate was issued by the CA
//!   of `tls.ca`, the key is its key, it names this node, site, role and cluster, it has not
//!   expired, and this machine's clock lies inside its (and its CA's) validity;
//! - `key-file`, `secret-file`, `keyring`: owner, permissions and contents of the private key,
//!   the cluster secret and the persisted keyring (owned by the agent's user or root, readable
//!   by the owner only: the agent's own rule);
//! - `data-dir`: the data directory exists and is writable (or can be created);
//! - `snapshot`: the node-table snapshot in the data directory, if any, decodes (the agent's own
//!   loader);
//! - `listen`, `control`: the ports are free (bound and released at once; no `control`, no TCP
//!   listener);
//! - `advertise`: dialable from the seeds (no wildcard; no loopback when seeds are remote);
//! - `seed NAME`: the seed's host resolves, and a full handshake with it succeeds (QUIC, mutual
//!   TLS against our CA for exactly that node, the cluster secret both ways, the same contract).
//!   A certificate of another node at that address is reported as DNS drift;
//! - `name-unique`, `seed-addresses`: against the node table a seed sends after the handshake,
//!   no other node holds this name, and the seeds' addresses are those the cluster knows.
//!
//! A preflight handshake shows up at the seed as a short link from this node.

use crate::output::{out, out_json};
use clusterctl_api::Role;
use clusterctl_core::contract::Contract;
use clusterctl_core::name::{ClusterName, Ident, NodeName, SiteName};
use clusterctl_core::secret::{Keyring, ProofRole, Secret, BINDING_LEN, EXPORTER_LABEL};
use clusterctl_core::table::{NodeRecord, RecordState};
use clusterctl_core::wire::{
    Frame, FrameSplitter, Handshake, Hello, Lane, RefusalCode, MAX_HANDSHAKE,
};
use clusterctl_node::config::AgentConfig;
use clusterctl_node::pki::{CertDetails, CertIdentity};
use clusterctl_node::tls::{self, RejectSide, RejectSink, Security, TlsError, TlsMaterial};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Time allowed for one seed: QUIC and TLS handshake, hello and answer.
pub const SEED_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for all seeds together (they are tried at the same time).
pub const SEEDS_BUDGET: Duration = Duration::from_secs(12);
/// Time spent collecting the node table a seed sends after the handshake.
const TABLE_WAIT: Duration = Duration::from_secs(2);
/// Quiet time after which the table is taken as complete.
const TABLE_QUIET: Duration = Duration::from_millis(300);
/// Most frames read from one seed while collecting its table.
const MAX_TABLE_FRAMES: usize = 64;
/// A certificate with fewer days left than this is a warning.
const SOON_DAYS: i64 = crate::certs::SOON_DAYS;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One check: what was checked, the outcome, and for a failure or warning how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// The line `preflight` prints: `PASS  name  detail` or `FAIL  name  detail — fix: ...`.
    pub fn line(&self) -> String {
        match (&self.fix, self.status) {
            (Some(fix), Status::Warn | Status::Fail) => format!(
                "{}  {}  {} — fix: {fix}",
                self.status.as_str(),
                self.name,
                self.detail
            ),
            _ => format!("{}  {}  {}", self.status.as_str(), self.name, self.detail),
        }
    }
}

/// `preflight --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreflightReport {
    pub config: String,
    pub ok: bool,
    pub checks: Vec<Check>,
}

/// Check a node's config before starting it; exit 1 on any FAIL.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node's config file.
    #[arg(long, short)]
    config: PathBuf,
    /// Print the checks as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if let Err(e) = std::fs::read(&a.config) {
        eprintln!(
            "clusterctl preflight: cannot read {}: {e} — fix: pass the path of the node's config file",
            a.config.display()
        );
        return Ok(ExitCode::from(2));
    }
    let checks = run_checks(&a.config);
    let ok = !checks.iter().any(|c| c.status == Status::Fail);
    if a.json {
        out_json(&PreflightReport {
            config: a.config.display().to_string(),
            ok,
            checks,
        })?;
    } else {
        let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &checks {
            let mut c = c.clone();
            c.name = format!("{:width$}", c.name);
            out(c.line());
        }
        let count = |s| checks.iter().filter(|c| c.status == s).count();
        out(format!(
            "{} checks: {} pass, {} warn, {} fail",
            checks.len(),
            count(Status::Pass),
            count(Status::Warn),
            count(Status::Fail)
        ));
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Every check, the network ones included (ports, seed handshakes).
pub fn run_checks(cfg_path: &Path) -> Vec<Check> {
    Preflight::new(cfg_path, Scope::Full).run()
}

/// The checks that need neither the network nor a port: what the agent runs at start, after its
/// loader accepted the config (so `config` is not repeated).
pub fn local_checks(cfg_path: &Path) -> Vec<Check> {
    Preflight::new(cfg_path, Scope::Local).run()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Full,
    Local,
}

/// The raw config: strings as written, paths resolved against the file's directory.
#[derive(Debug, Default)]
struct Raw {
    table: toml::Table,
    base: PathBuf,
}

impl Raw {
    fn str(&self, key: &str) -> Option<&str> {
        self.table.get(key).and_then(toml::Value::as_str)
    }

    fn tls(&self, key: &str) -> Option<&str> {
        self.table
            .get("tls")
            .and_then(toml::Value::as_table)
            .and_then(|t| t.get(key))
            .and_then(toml::Value::as_str)
    }

    fn path(&self, text: Option<&str>) -> Option<PathBuf> {
        text.filter(|t| !t.is_empty()).map(|t| self.base.join(t))
    }

    fn insecure(&self) -> bool {
        self.table
            .get("insecure")
            .and_then(toml::Value::as_bool)
            .unwrap_or(false)
    }

    fn seeds(&self) -> Vec<String> {
        self.table
            .get("seeds")
            .and_then(toml::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A seed as written and where it resolved.
#[derive(Debug, Clone)]
struct SeedTarget {
    index: usize,
    text: String,
    name: NodeName,
    host: String,
    addr: SocketAddr,
}

struct Preflight {
    path: PathBuf,
    scope: Scope,
    checks: Vec<Check>,
    contract: Option<Contract>,
    cluster: Option<ClusterName>,
    ident: Option<Ident>,
    material: Option<Arc<TlsMaterial>>,
    keyring: Option<Keyring>,
    now: SystemTime,
}

impl Preflight {
    fn new(path: &Path, scope: Scope) -> Preflight {
        Preflight {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
            scope,
            checks: Vec::new(),
            contract: None,
            cluster: None,
            ident: None,
            material: None,
            keyring: None,
            now: SystemTime::now(),
        }
    }

    fn push(&mut self, c: Check) {
        self.checks.push(c);
    }

    fn run(mut self) -> Vec<Check> {
        if self.scope == Scope::Full {
            self.check_loader();
        }
        let Some(raw) = self.read_raw() else {
            return self.checks;
        };
        self.check_contract(&raw);
        self.check_name(&raw);
        self.check_site_role(&raw);
        self.check_tls(&raw);
        self.check_secret(&raw);
        self.check_data_dir(&raw);
        self.check_snapshot(&raw);
        if self.scope == Scope::Full {
            self.check_port(&raw, "listen", true);
            self.check_port(&raw, "control", false);
        }
        let seeds = self.check_advertise_and_parse_seeds(&raw);
        if self.scope == Scope::Full {
            self.check_seeds(&raw, seeds);
        }
        self.checks
    }

    /// The agent's own loader. It creates a missing data directory; preflight removes it again
    /// when it was created here and is still empty.
    fn check_loader(&mut self) {
        let data_dir = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
            .and_then(|t| {
                t.get("data-dir")
                    .and_then(|v| v.as_str())
                    .map(PathBuf::from)
            })
            .map(|d| self.base_dir().join(d));
        let existed = data_dir.as_ref().is_some_and(|d| d.exists());
        match AgentConfig::load(&self.path) {
            Ok(c) => self.push(Check::pass(
                "config",
                format!(
                    "{}: {} ({}) of site {} in cluster {}",
                    self.path.display(),
                    c.ident.name,
                    c.ident.role,
                    c.ident.site,
                    c.cluster
                ),
            )),
            Err(e) => self.push(Check::fail(
                "config",
                format!(
                    "the agent would refuse this config: `{}` {}",
                    e.key, e.problem
                ),
                e.fix,
            )),
        }
        if let (Some(d), false) = (data_dir, existed) {
            // Only an empty directory is removed.
            let _ = std::fs::remove_dir(d);
        }
    }

    fn base_dir(&self) -> PathBuf {
        self.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"))
    }

    fn read_raw(&mut self) -> Option<Raw> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                self.push(Check::fail(
                    "config-file",
                    format!("cannot read {}: {e}", self.path.display()),
                    "pass the path of the node's config file",
                ));
                return None;
            }
        };
        match toml::from_str::<toml::Table>(&text) {
            Ok(table) => Some(Raw {
                table,
                base: self.base_dir(),
            }),
            Err(e) => {
                if self.scope == Scope::Local {
                    self.push(Check::fail(
                        "config-file",
                        format!("{} is not valid TOML: {}", self.path.display(), e.message()),
                        "correct the TOML syntax",
                    ));
                }
                // Under Scope::Full the `config` check already says so, with line and column.
                None
            }
        }
    }

    fn check_contract(&mut self, raw: &Raw) {
        let cluster = raw.str("cluster").and_then(|c| ClusterName::new(c).ok());
        self.cluster = cluster.clone();
        let Some(path) = raw.path(raw.str("contract")) else {
            self.push(Check::fail(
                "contract",
                "no `contract` in the config",
                "add contract = \"/etc/clusterctl/contract.toml\" (the same file on every node)",
            ));
            return;
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                self.push(Check::fail(
                    "contract",
                    format!("cannot read {}: {e}", path.display()),
                    "point contract at the topology contract (the same file on every node)",
                ));
                return;
            }
        };
        let contract = match Contract::parse(&text) {
            Ok(c) => c,
            Err(e) => {
                self.push(Check::fail(
                    "contract",
                    format!("{}: {e}", path.display()),
                    "correct the contract and deploy the same file on every node",
                ));
                return;
            }
        };
        match &cluster {
            Some(c) if *c != contract.cluster => self.push(Check::fail(
                "contract",
                format!(
                    "{} is the contract of cluster {}, but this node's cluster is {c}",
                    path.display(),
                    contract.cluster
                ),
                format!(
                    "set cluster = \"{}\", or point contract at the contract of cluster {c}",
                    contract.cluster
                ),
            )),
            _ => self.push(Check::pass(
                "contract",
                format!(
                    "{}: cluster {}, {} sites, hash {}",
                    path.display(),
                    contract.cluster,
                    contract.sites().count(),
                    contract.hash()
                ),
            )),
        }
        self.contract = Some(contract);
    }

    fn check_name(&mut self, raw: &Raw) {
        let Some(text) = raw.str("name") else {
            self.push(Check::fail(
                "name",
                "no `name` in the config",
                "add name = \"edge-us-1\" (this node's name, unique in the cluster)",
            ));
            return;
        };
        let name = match NodeName::new(text) {
            Ok(n) => n,
            Err(e) => {
                self.push(Check::fail(
                    "name",
                    format!("{text:?} {e}"),
                    "use a DNS label (1-63 of a-z, 0-9 and '-', not starting or ending with '-'), e.g. edge-us-1",
                ));
                return;
            }
        };
        let site = raw.str("site").and_then(|s| SiteName::new(s).ok());
        let Some(contract) = &self.contract else {
            self.push(Check::warn(
                "name",
                format!(
                    "{name} is a valid name; not checked against the contract (it does not load)"
                ),
                "fix the contract check first",
            ));
            return;
        };
        let elsewhere = contract
            .sites()
            .filter(|s| Some(&s.name) != site.as_ref())
            .find(|s| {
                s.gateways.contains(&name) || s.nodes.as_ref().is_some_and(|n| n.contains(&name))
            })
            .map(|s| s.name.clone());
        match elsewhere {
            Some(other) => self.push(Check::fail(
                "name",
                format!("the contract places {name} in site {other}: the name belongs to another node"),
                format!("choose a name unique in the cluster, or set site = \"{other}\" if this node is that one"),
            )),
            None => self.push(Check::pass(
                "name",
                format!("{name}: a valid name, not used by another site in the contract"),
            )),
        }
    }

    fn check_site_role(&mut self, raw: &Raw) {
        let name = raw.str("name").and_then(|n| NodeName::new(n).ok());
        let site = raw.str("site").map(|s| (s, SiteName::new(s)));
        let role = raw.str("role").map(|r| (r, Role::parse(r)));
        let (name, site, role) = match (name, site, role) {
            (Some(n), Some((_, Ok(s))), Some((_, Some(r)))) => (n, s, r),
            (_, None, _) => {
                return self.push(Check::fail(
                    "site-role",
                    "no `site` in the config",
                    "add site = \"us-east\" (a site of the contract)",
                ))
            }
            (_, Some((text, Err(e))), _) => {
                return self.push(Check::fail(
                    "site-role",
                    format!("site {text:?} {e}"),
                    "use a DNS label naming a site of the contract, e.g. site = \"us-east\"",
                ))
            }
            (_, _, None) | (_, _, Some((_, None))) => {
                return self.push(Check::fail(
                    "site-role",
                    format!(
                        "role {:?} is not a role",
                        raw.str("role").unwrap_or("(missing)")
                    ),
                    "write role = \"member\" or role = \"gateway\"",
                ))
            }
            (None, _, _) => return, // reported by `name`
        };
        let ident = Ident { name, site, role };
        self.ident = Some(ident.clone());
        let Some(contract) = &self.contract else {
            return;
        };
        let Some(spec) = contract.site(&ident.site) else {
            let known: Vec<&str> = contract.sites().map(|s| s.name.as_str()).collect();
            return self.push(Check::fail(
                "site-role",
                format!("site {} is not in the contract", ident.site),
                format!(
                    "set site to one of: {}; or add the site to the contract on every node",
                    known.join(", ")
                ),
            ));
        };
        let is_gateway = spec.gateways.contains(&ident.name);
        let listed = spec.nodes.as_ref().is_none_or(|n| n.contains(&ident.name));
        let c = if !listed {
            Check::fail(
                "site-role",
                format!("{} is not listed in `nodes` of site {}", ident.name, ident.site),
                format!(
                    "add {} to `nodes` of site {} in the contract (on every node), or use a listed name",
                    ident.name, ident.site
                ),
            )
        } else if ident.role == Role::Gateway && !is_gateway {
            Check::fail(
                "site-role",
                format!(
                    "role is gateway, but {} is not a gateway of site {} in the contract",
                    ident.name, ident.site
                ),
                format!(
                    "set role = \"member\", or add {} to `gateways` of site {} (on every node)",
                    ident.name, ident.site
                ),
            )
        } else if ident.role == Role::Member && is_gateway {
            Check::warn(
                "site-role",
                format!(
                    "the contract lists {} as a gateway of site {}, but its role is member: it will not link to other sites",
                    ident.name, ident.site
                ),
                "set role = \"gateway\"",
            )
        } else {
            Check::pass(
                "site-role",
                format!(
                    "{} of site {} as the contract has it",
                    ident.role, ident.site
                ),
            )
        };
        self.push(c);
    }

    fn check_tls(&mut self, raw: &Raw) {
        if raw.insecure() {
            self.push(Check::warn(
                "tls",
                "insecure = true: links are neither authenticated nor checked against a CA",
                "labs only; for a real cluster remove `insecure` and add [tls]",
            ));
            return;
        }
        let (Some(ca), Some(cert), Some(key)) = (
            raw.path(raw.tls("ca")),
            raw.path(raw.tls("cert")),
            raw.path(raw.tls("key")),
        ) else {
            self.push(Check::fail(
                "cert-chain",
                "[tls] with ca, cert and key is missing or incomplete",
                "add [tls] with ca, cert and key (see config.example.toml)",
            ));
            return;
        };
        let now = self.now;
        // The key file's owner and mode are the `key-file` check's; this one judges the chain.
        match TlsMaterial::load_contents(&ca, &cert, &key) {
            Ok(m) => {
                let issuer = std::fs::read_to_string(&ca)
                    .ok()
                    .and_then(|pem| CertDetails::all_from_pem(&pem).ok())
                    .and_then(|cas| cas.into_iter().find(|c| c.subject == m.identity.issuer))
                    .map(|c| c.short_fingerprint)
                    .unwrap_or_else(|| "?".into());
                self.push(Check::pass(
                    "cert-chain",
                    format!(
                        "{} was issued by CA {issuer} of {}; {} is its key",
                        cert.display(),
                        ca.display(),
                        key.display()
                    ),
                ));
                self.material = Some(Arc::new(m));
            }
            Err(e) => {
                let fix = tls_fix(&e);
                self.push(Check::fail("cert-chain", e.to_string(), fix));
            }
        }
        self.check_key_file(&key);
        // Names, validity and clock, from the certificate alone (even if the chain failed).
        let id = match std::fs::read_to_string(&cert)
            .map_err(|e| e.to_string())
            .and_then(|pem| CertIdentity::from_pem(&pem).map_err(|e| e.to_string()))
        {
            Ok(id) => id,
            Err(e) => {
                self.push(Check::fail(
                    "cert-names",
                    format!("{}: {e}", cert.display()),
                    "point tls.cert at a node certificate from `clusterctl certs issue`",
                ));
                return;
            }
        };
        self.check_cert_names(&id, &cert);
        let left = id.days_left(now);
        let until = crate::certs::stamp(id.not_after);
        if id.not_after <= now {
            self.push(Check::fail(
                "cert-validity",
                format!("{} expired at {until} ({} days ago)", cert.display(), -left),
                issue_fix(&id.ident, &id.cluster),
            ));
        } else if left < SOON_DAYS {
            self.push(Check::warn(
                "cert-validity",
                format!("{} expires in {left} days, at {until}", cert.display()),
                format!("rotate it now: {}", issue_fix(&id.ident, &id.cluster)),
            ));
        } else {
            self.push(Check::pass(
                "cert-validity",
                format!("{left} days left (until {until})"),
            ));
        }
        let cas = std::fs::read_to_string(&ca)
            .ok()
            .and_then(|pem| CertDetails::all_from_pem(&pem).ok())
            .unwrap_or_default();
        self.check_clock(&id, &cas);
    }

    /// The agent's own rule ([`clusterctl_node::files::check_private`]): owned by the agent's
    /// user or root, readable by its owner only.
    fn check_key_file(&mut self, key: &Path) {
        let Ok(m) = std::fs::metadata(key) else {
            // Reported by `cert-chain`.
            return;
        };
        match clusterctl_node::files::check_private(key, "tls.key") {
            Ok(()) => self.push(Check::pass(
                "key-file",
                format!(
                    "{} has mode {:04o} and belongs to this user or root",
                    key.display(),
                    m.permissions().mode() & 0o777
                ),
            )),
            Err(e) => self.push(Check::fail("key-file", e.problem, e.fix)),
        }
    }

    fn check_cert_names(&mut self, id: &CertIdentity, cert: &Path) {
        let (Some(ident), Some(cluster)) = (self.ident.clone(), self.cluster.clone()) else {
            return;
        };
        if id.ident == ident && id.cluster == cluster {
            self.push(Check::pass(
                "cert-names",
                format!(
                    "{} names {} ({}) of site {} in cluster {cluster}, as the config",
                    cert.display(),
                    ident.name,
                    ident.role,
                    ident.site
                ),
            ));
        } else {
            self.push(Check::fail(
                "cert-names",
                format!(
                    "{} names {} ({}) of site {} in cluster {}, but this config is {} ({}) of site {} in cluster {cluster}",
                    cert.display(),
                    id.ident.name,
                    id.ident.role,
                    id.ident.site,
                    id.cluster,
                    ident.name,
                    ident.role,
                    ident.site
                ),
                format!(
                    "point tls.cert and tls.key at this node's own certificate, or {}",
                    issue_fix(&ident, &cluster)
                ),
            ));
        }
    }

    fn check_clock(&mut self, id: &CertIdentity, cas: &[CertDetails]) {
        let now = self.now;
        let at = crate::certs::stamp(now);
        if now < SystemTime::UNIX_EPOCH + Duration::from_secs(1_577_836_800) {
            return self.push(Check::fail(
                "clock",
                format!("this machine's clock says {at}, before 2020"),
                "set the clock (enable NTP)",
            ));
        }
        if id.not_before > now {
            return self.push(Check::fail(
                "clock",
                format!(
                    "this machine's clock ({at}) is before the certificate's not-before ({}): the clock is behind, or the certificate was issued on a machine whose clock is ahead",
                    crate::certs::stamp(id.not_before)
                ),
                "set the clock (enable NTP) on this machine and on the one that issued the certificate",
            ));
        }
        let issuer = cas.iter().find(|c| c.subject == id.issuer);
        if let Some(ca) = issuer {
            if ca.not_before > now {
                return self.push(Check::fail(
                    "clock",
                    format!(
                        "this machine's clock ({at}) is before the CA's not-before ({})",
                        crate::certs::stamp(ca.not_before)
                    ),
                    "set the clock (enable NTP)",
                ));
            }
            if ca.not_after <= now {
                return self.push(Check::fail(
                    "clock",
                    format!(
                        "the CA {} that issued the certificate expired at {}",
                        ca.short_fingerprint,
                        crate::certs::stamp(ca.not_after)
                    ),
                    "create a new CA and issue new certificates from it (or check the clock)",
                ));
            }
        }
        self.push(Check::pass(
            "clock",
            format!("{at} lies within the validity of the certificate and of its CA"),
        ));
    }

    fn check_secret(&mut self, raw: &Raw) {
        let Some(path) = raw.path(raw.str("secret")) else {
            self.push(Check::fail(
                "secret-file",
                "no `secret` in the config",
                "add secret = \"/etc/clusterctl/cluster.secret\" (make one with `clusterctl secret generate FILE`)",
            ));
            return;
        };
        let secret = match clusterctl_node::config::load_secret(&path, "secret") {
            Ok(s) => {
                self.push(Check::pass(
                    "secret-file",
                    format!("{}: mode 0600, key id {}", path.display(), s.id()),
                ));
                Some(s)
            }
            Err(e) => {
                self.push(Check::fail("secret-file", e.problem, e.fix));
                None
            }
        };
        self.check_keyring(raw, secret);
    }

    fn check_keyring(&mut self, raw: &Raw, secret: Option<Secret>) {
        let Some(dir) = raw.path(raw.str("data-dir")) else {
            return;
        };
        let file = clusterctl_node::keyring::path(&dir);
        if !file.exists() {
            if let Some(s) = secret {
                self.push(Check::pass(
                    "keyring",
                    format!(
                        "no keyring in {} yet: the node starts with the config's secret {}",
                        dir.display(),
                        s.id()
                    ),
                ));
                self.keyring = Some(Keyring::new(s));
            }
            return;
        }
        // The file exists, so this reads it and writes nothing.
        let placeholder = match &secret {
            Some(s) => s.clone(),
            None => match Secret::from_bytes(&[0u8; 32]) {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        match clusterctl_node::keyring::load_or_init(&dir, &placeholder, None) {
            Ok(ring) => {
                let ids: Vec<String> = ring.ids().iter().map(ToString::to_string).collect();
                self.push(Check::pass(
                    "keyring",
                    format!(
                        "{}: proves with {}, accepts {}",
                        file.display(),
                        ring.primary(),
                        ids.join(", ")
                    ),
                ));
                self.keyring = Some(ring);
            }
            Err(e) => self.push(Check::fail("keyring", e.problem, e.fix)),
        }
    }

    /// The node-table snapshot, read with the agent's own loader: a file the agent would refuse
    /// is a failure here too.
    fn check_snapshot(&mut self, raw: &Raw) {
        let Some(dir) = raw.path(raw.str("data-dir")) else {
            return;
        };
        let file = clusterctl_node::persist::snapshot_path(&dir);
        if !file.exists() {
            return self.push(Check::pass(
                "snapshot",
                format!(
                    "no node table in {} yet: the node starts with an empty one",
                    dir.display()
                ),
            ));
        }
        match clusterctl_node::persist::load(&dir) {
            Ok(records) => self.push(Check::pass(
                "snapshot",
                format!("{}: {} records", file.display(), records.len()),
            )),
            Err(clusterctl_node::persist::PersistError::Corrupt { path, problem }) => {
                self.push(Check::fail(
                    "snapshot",
                    format!(
                        "{} is not a usable node-table snapshot: {problem}",
                        path.display()
                    ),
                    format!(
                        "mv {} {}.damaged (the node then starts with an empty table and learns its clock back from its peers)",
                        path.display(),
                        path.display()
                    ),
                ))
            }
            Err(e) => self.push(Check::fail(
                "snapshot",
                e.to_string(),
                "make the file readable by the agent's user",
            )),
        }
    }

    fn check_data_dir(&mut self, raw: &Raw) {
        let Some(dir) = raw.path(raw.str("data-dir")) else {
            return self.push(Check::fail(
                "data-dir",
                "no `data-dir` in the config",
                "add data-dir = \"/var/lib/clusterctl\"",
            ));
        };
        const FIX: &str = "choose a directory the agent's user can create and write";
        // The nearest directory that exists: the data directory itself, or where it would be made.
        let mut probe_in = dir.clone();
        while !probe_in.exists() {
            match probe_in.parent() {
                Some(p) => probe_in = p.to_path_buf(),
                None => break,
            }
        }
        if !probe_in.is_dir() {
            return self.push(Check::fail(
                "data-dir",
                format!("{} is not a directory", probe_in.display()),
                FIX,
            ));
        }
        let probe = probe_in.join(format!(".preflight-{}", std::process::id()));
        match std::fs::write(&probe, b"") {
            Ok(()) => {
                let _ = std::fs::remove_file(&probe);
                let what = if probe_in == dir {
                    "exists and is writable".to_string()
                } else {
                    format!("will be created in {}", probe_in.display())
                };
                self.push(Check::pass("data-dir", format!("{} {what}", dir.display())));
            }
            Err(e) => self.push(Check::fail(
                "data-dir",
                format!("cannot write in {}: {e}", probe_in.display()),
                FIX,
            )),
        }
    }

    /// Binds `key`'s address (UDP for the cluster port, TCP for the control API) and lets go.
    fn check_port(&mut self, raw: &Raw, key: &str, udp: bool) {
        let text = match (raw.str(key), key) {
            (Some(t), _) => t.to_string(),
            (None, "control") => return self.push(Check::pass(
                key,
                "not set: the control API is served on the control socket only (no TCP listener)",
            )),
            (None, _) => return, // reported by `config`
        };
        let Ok(addr) = text.parse::<SocketAddr>() else {
            return self.push(Check::fail(
                key,
                format!("{text:?} is not an IP:PORT address"),
                format!("write {key} = \"IP:PORT\""),
            ));
        };
        let proto = if udp { "UDP" } else { "TCP" };
        let bound = if udp {
            std::net::UdpSocket::bind(addr).map(drop)
        } else {
            std::net::TcpListener::bind(addr).map(drop)
        };
        match bound {
            Ok(()) => self.push(Check::pass(key, format!("{proto} {addr} is free and bindable"))),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => self.push(Check::fail(
                key,
                format!("{proto} {addr} is in use (is this node already running?)"),
                format!(
                    "stop the process holding it (`ss -{}lpn 'sport = :{}'` shows it), or choose another port for `{key}`",
                    if udp { "u" } else { "t" },
                    addr.port()
                ),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => self.push(Check::fail(
                key,
                format!("{proto} {addr}: {} is not an address of this machine", addr.ip()),
                format!("use an address of this machine (or the wildcard) for `{key}`"),
            )),
            Err(e) => self.push(Check::fail(
                key,
                format!("cannot bind {proto} {addr}: {e}"),
                format!("choose an address and port this user may bind for `{key}`"),
            )),
        }
    }

    /// `advertise` (or `listen`), then every seed's syntax and name resolution.
    fn check_advertise_and_parse_seeds(&mut self, raw: &Raw) -> Vec<SeedTarget> {
        let listen: Option<SocketAddr> = raw.str("listen").and_then(|l| l.parse().ok());
        let advertise: Option<SocketAddr> =
            raw.str("advertise").and_then(|a| a.parse().ok()).or(listen);
        let mut seeds = Vec::new();
        let texts = raw.seeds();
        for (i, text) in texts.iter().enumerate() {
            match parse_seed(text, listen) {
                Ok(s) => seeds.push(SeedTarget { index: i, ..s }),
                Err((problem, fix)) => {
                    // The loader resolves seeds too; the agent has already passed it.
                    if self.scope == Scope::Full {
                        self.push(Check::fail(format!("seeds[{i}]"), problem, fix));
                    }
                }
            }
        }
        let Some(adv) = advertise else {
            return seeds;
        };
        let remote = seeds.iter().find(|s| !s.addr.ip().is_loopback());
        if adv.ip().is_unspecified() {
            self.push(Check::fail(
                "advertise",
                format!("{adv} is a wildcard address, which peers cannot dial"),
                format!(
                    "set advertise = \"IP:{}\" with the address other nodes reach this one on",
                    adv.port()
                ),
            ));
        } else if let (true, Some(seed)) = (adv.ip().is_loopback(), remote) {
            self.push(Check::fail(
                "advertise",
                format!(
                    "{adv} is a loopback address, but seed {} is at {}: it could never dial back",
                    seed.name, seed.addr
                ),
                "set advertise = \"IP:PORT\" with an address the seeds can reach",
            ));
        } else if std::net::UdpSocket::bind(SocketAddr::new(adv.ip(), 0)).is_err() {
            self.push(Check::warn(
                "advertise",
                format!("{} is not an address of this machine", adv.ip()),
                "fine behind NAT or a port forward to this machine; otherwise advertise an address of this machine",
            ));
        } else {
            self.push(Check::pass(
                "advertise",
                format!("{adv} is dialable by the seeds"),
            ));
        }
        seeds
    }

    fn check_seeds(&mut self, raw: &Raw, seeds: Vec<SeedTarget>) {
        if seeds.is_empty() {
            return;
        }
        let missing = |what: &str| format!("handshake not tried: {what} (see the checks above)");
        let security = if raw.insecure() {
            self.ident.as_ref().map(|i| Security::Insecure {
                node: i.name.clone(),
            })
        } else {
            self.material.clone().map(Security::Mutual)
        };
        let ctx = match (
            security,
            self.keyring.clone(),
            self.contract.as_ref(),
            self.ident.clone(),
            self.cluster.clone(),
        ) {
            (Some(security), Some(keyring), Some(contract), Some(ident), Some(cluster)) => {
                Arc::new(Ctx {
                    security,
                    keyring,
                    contract_hash: contract.hash().to_string(),
                    ident,
                    cluster,
                    bind: raw
                        .str("listen")
                        .and_then(|l| l.parse::<SocketAddr>().ok())
                        .map(|l| SocketAddr::new(l.ip(), 0)),
                    addr: raw
                        .str("advertise")
                        .or(raw.str("listen"))
                        .unwrap_or_default()
                        .to_string(),
                })
            }
            (s, k, c, i, _) => {
                let what = if s.is_none() {
                    "this node's TLS material does not load"
                } else if k.is_none() {
                    "no usable cluster secret"
                } else if c.is_none() {
                    "the contract does not load"
                } else if i.is_none() {
                    "name, site or role is invalid"
                } else {
                    "the cluster name is invalid"
                };
                for s in &seeds {
                    self.push(Check::fail(
                        format!("seed {}", s.name),
                        missing(what),
                        "fix the failures above, then run preflight again",
                    ));
                }
                return;
            }
        };
        let outcomes = dial_all(ctx.clone(), seeds.clone());
        let mut table: Option<(NodeName, BTreeMap<String, NodeRecord>)> = None;
        let mut second_instance: Option<String> = None;
        for (seed, outcome) in seeds.iter().zip(outcomes) {
            if let Outcome::Refused(r) = &outcome {
                if r.reason
                    .starts_with(clusterctl_core::instance::SECOND_INSTANCE)
                {
                    second_instance.get_or_insert_with(|| r.reason.clone());
                }
            }
            let (check, records) = judge(&ctx, seed, outcome);
            self.push(check);
            if let (None, Some(r)) = (&table, records) {
                table = Some((seed.name.clone(), r));
            }
        }
        if let Some(reason) = second_instance {
            // The name answers elsewhere: starting would only be refused by every peer.
            self.push(Check::fail(
                "name-unique",
                reason,
                format!(
                    "another instance of {} runs: stop it before starting this one, or give this node its own name and certificate",
                    ctx.ident.name
                ),
            ));
            return;
        }
        match table {
            Some((from, records)) => self.check_against_table(&ctx, &seeds, &from, &records),
            None => self.push(Check::warn(
                "name-unique",
                "not checked against the live node table: no seed completed a handshake",
                "make a seed reachable, then run preflight again",
            )),
        }
    }

    fn check_against_table(
        &mut self,
        ctx: &Ctx,
        seeds: &[SeedTarget],
        from: &NodeName,
        records: &BTreeMap<String, NodeRecord>,
    ) {
        let me = &ctx.ident;
        let c = match records.get(me.name.as_str()) {
            None => Check::pass(
                "name-unique",
                format!(
                    "no node named {} in the cluster table ({} records, from {from})",
                    me.name,
                    records.len()
                ),
            ),
            Some(r) if r.state == RecordState::Forgotten => Check::fail(
                "name-unique",
                format!("{} was forgotten by an operator (tombstone at clock {})", me.name, r.clock),
                "start the agent with --rejoin to bring it back, or choose another name",
            ),
            Some(r) if r.site != me.site || r.role != me.role => Check::fail(
                "name-unique",
                format!(
                    "the cluster already has a node {} of site {} ({}) at {}; this config is site {} ({})",
                    me.name, r.site, r.role, show_addr(&r.addr), me.site, me.role
                ),
                "choose a name unique in the cluster",
            ),
            Some(r) if !r.addr.is_empty() && r.addr != ctx.addr => Check::warn(
                "name-unique",
                format!(
                    "the cluster table has {} at {} (state {:?}, clock {}), this config advertises {}",
                    me.name, r.addr, r.state, r.clock, ctx.addr
                ),
                "if another machine runs this node, choose another name; if this node moved here, stop the old one",
            ),
            Some(r) => Check::pass(
                "name-unique",
                format!(
                    "the cluster table knows {} at this address (clock {}): the same node",
                    me.name, r.clock
                ),
            ),
        };
        self.push(c);
        let mut drift = Vec::new();
        for s in seeds {
            if let Some(r) = records.get(s.name.as_str()) {
                if !r.addr.is_empty() && r.addr != s.addr.to_string() {
                    drift.push(format!(
                        "seeds[{}] {} resolves to {} but the cluster table has it at {}",
                        s.index, s.name, s.addr, r.addr
                    ));
                }
            }
        }
        if drift.is_empty() {
            self.push(Check::pass(
                "seed-addresses",
                "every seed resolves to the address the cluster table has for it",
            ));
        } else {
            self.push(Check::warn(
                "seed-addresses",
                format!("DNS drift: {}", drift.join("; ")),
                "correct the seed entries (or DNS) to the addresses the nodes advertise",
            ));
        }
    }
}

fn show_addr(a: &str) -> &str {
    if a.is_empty() {
        "(no address yet)"
    } else {
        a
    }
}

/// The `certs issue` line that makes a certificate for `ident`.
fn issue_fix(ident: &Ident, cluster: &ClusterName) -> String {
    format!(
        "issue one: clusterctl certs issue {} --site {} --role {} --cluster {cluster} --ca-dir CA-DIR",
        ident.name, ident.site, ident.role
    )
}

fn tls_fix(e: &TlsError) -> String {
    match e {
        TlsError::Read { key, .. } => format!("point {key} at an existing, readable PEM file"),
        TlsError::KeyMismatch => {
            "point tls.key at the key issued together with tls.cert".to_string()
        }
        TlsError::NotIssuedByCa { .. } => {
            "point tls.ca at the CA that issued the certificate, or issue a new one from this CA (`clusterctl certs issue`)".to_string()
        }
        TlsError::BadCa { .. } => "point tls.ca at the cluster CA certificate".to_string(),
        TlsError::NoIdentity { .. } => {
            "issue the node certificate with `clusterctl certs issue`".to_string()
        }
        _ => "see the message; `clusterctl certs inspect FILE` shows what a file holds".to_string(),
    }
}

/// Splits `NAME@HOST:PORT` and resolves HOST (preferring `listen`'s IP version).
fn parse_seed(text: &str, listen: Option<SocketAddr>) -> Result<SeedTarget, (String, String)> {
    const FORM: &str = "write each seed as \"NAME@HOST:PORT\", e.g. \"gw-us-1@10.0.1.1:7400\"";
    let Some((name, hostport)) = text.split_once('@') else {
        return Err((format!("{text:?} has no node name"), FORM.into()));
    };
    let name = NodeName::new(name)
        .map_err(|e| (format!("seed node name {name:?} {e}"), FORM.to_string()))?;
    let (host, port) = match hostport.strip_prefix('[') {
        Some(rest) => rest.split_once("]:"),
        None => hostport.rsplit_once(':'),
    }
    .ok_or_else(|| (format!("{text:?} has no port"), FORM.to_string()))?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
        (
            format!("{text:?}: {port:?} is not a port"),
            FORM.to_string(),
        )
    })?;
    if host.is_empty() {
        return Err((format!("{text:?} has no host"), FORM.into()));
    }
    let addr = match host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port),
        Err(_) => {
            let addrs: Vec<SocketAddr> = (host, port)
                .to_socket_addrs()
                .map_err(|e| {
                    (
                        format!("{name}: cannot resolve host {host:?}: {e}"),
                        "fix DNS (or /etc/hosts) for the host, or write the seed's IP address"
                            .to_string(),
                    )
                })?
                .collect();
            let v4 = listen.is_none_or(|l| l.is_ipv4());
            addrs
                .iter()
                .find(|a| a.is_ipv4() == v4)
                .or(addrs.first())
                .copied()
                .ok_or_else(|| {
                    (
                        format!("{name}: host {host:?} resolves to no address"),
                        "fix DNS for the host, or write the seed's IP address".to_string(),
                    )
                })?
        }
    };
    Ok(SeedTarget {
        index: 0,
        text: text.to_string(),
        name,
        host: host.to_string(),
        addr,
    })
}

/// What a handshake needs to speak for this node.
struct Ctx {
    security: Security,
    keyring: Keyring,
    contract_hash: String,
    ident: Ident,
    cluster: ClusterName,
    /// Local address to dial from (the listen IP, port 0).
    bind: Option<SocketAddr>,
    /// The address this node advertises.
    addr: String,
}

/// Collects the reasons our TLS layer refused a seed's certificate.
#[derive(Debug, Default)]
struct Collect(Mutex<Vec<(Option<String>, String)>>);

impl RejectSink for Collect {
    fn rejected(&self, side: RejectSide, claimed_name: Option<String>, reason: String) {
        if side == RejectSide::Dialing {
            if let Ok(mut v) = self.0.lock() {
                if v.len() < 8 {
                    v.push((claimed_name, reason));
                }
            }
        }
    }
}

/// How the exchange with one seed ended.
#[derive(Debug)]
enum Outcome {
    /// Our TLS layer refused the seed's certificate; the name it claims, if any.
    TlsRejected {
        claimed: Option<String>,
        reason: String,
    },
    /// The connection failed (timeout, the seed refused our certificate, ...).
    Failed(String),
    Refused(clusterctl_core::wire::Refusal),
    Acked {
        ack: Box<clusterctl_core::wire::HelloAck>,
        binding: Vec<u8>,
        rtt: Duration,
        records: Option<BTreeMap<String, NodeRecord>>,
    },
}

fn dial_all(ctx: Arc<Ctx>, seeds: Vec<SeedTarget>) -> Vec<Outcome> {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return seeds
                .iter()
                .map(|_| Outcome::Failed(format!("cannot start the async runtime: {e}")))
                .collect()
        }
    };
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for s in seeds {
            let ctx = ctx.clone();
            tasks.push(tokio::spawn(async move {
                match tokio::time::timeout(
                    SEED_TIMEOUT + TABLE_WAIT + Duration::from_secs(1),
                    dial(&ctx, &s),
                )
                .await
                {
                    Ok(o) => o,
                    Err(_) => Outcome::Failed(format!(
                        "no answer from {} within {} s",
                        s.addr,
                        SEED_TIMEOUT.as_secs()
                    )),
                }
            }));
        }
        let deadline = tokio::time::Instant::now() + SEEDS_BUDGET;
        let mut out = Vec::new();
        for t in tasks {
            let o = match tokio::time::timeout_at(deadline, t).await {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => Outcome::Failed(format!("the check stopped: {e}")),
                Err(_) => Outcome::Failed(format!(
                    "not finished within preflight's budget of {} s for all seeds",
                    SEEDS_BUDGET.as_secs()
                )),
            };
            out.push(o);
        }
        out
    })
}

async fn dial(ctx: &Ctx, seed: &SeedTarget) -> Outcome {
    let sink = Arc::new(Collect::default());
    let client = match tls::endpoint_configs(&ctx.security, &ctx.cluster, sink.clone()) {
        Ok((_, c)) => c,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let bind = match ctx.bind {
        Some(b) if !b.ip().is_unspecified() && b.is_ipv4() == seed.addr.is_ipv4() => b,
        _ if seed.addr.is_ipv4() => SocketAddr::from(([0, 0, 0, 0], 0)),
        _ => SocketAddr::from(([0u16; 8], 0)),
    };
    let endpoint = match quinn::Endpoint::client(bind) {
        Ok(e) => e,
        Err(e) => return Outcome::Failed(format!("cannot open a UDP socket on {bind}: {e}")),
    };
    let started = Instant::now();
    let outcome = exchange(ctx, seed, &endpoint, client, &sink, started).await;
    endpoint.close(0u32.into(), b"preflight done");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    outcome
}

async fn exchange(
    ctx: &Ctx,
    seed: &SeedTarget,
    endpoint: &quinn::Endpoint,
    client: quinn::ClientConfig,
    sink: &Collect,
    started: Instant,
) -> Outcome {
    let rejected = |fallback: String| {
        let first = sink.0.lock().ok().and_then(|v| v.first().cloned());
        match first {
            Some((claimed, reason)) => Outcome::TlsRejected { claimed, reason },
            None => Outcome::Failed(fallback),
        }
    };
    let connecting = match endpoint.connect_with(client, seed.addr, seed.name.as_str()) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(tls::describe_connect_error(&e)),
    };
    let conn = match tokio::time::timeout(SEED_TIMEOUT, connecting).await {
        Err(_) => {
            return Outcome::Failed(format!(
                "no answer from {} within {} s",
                seed.addr,
                SEED_TIMEOUT.as_secs()
            ))
        }
        Ok(Err(e)) => return rejected(tls::describe_connection_error(&e)),
        Ok(Ok(c)) => c,
    };
    let rtt = started.elapsed();
    let mut binding = vec![0u8; BINDING_LEN];
    if conn
        .export_keying_material(&mut binding, EXPORTER_LABEL, b"")
        .is_err()
    {
        return Outcome::Failed("the TLS session exports no keying material".into());
    }
    let hello = Hello {
        cluster: ctx.cluster.clone(),
        ident: ctx.ident.clone(),
        contract_hash: ctx.contract_hash.clone(),
        clock: 0,
        addr: ctx.addr.clone(),
        rejoin: false,
        version: env!("CARGO_PKG_VERSION").to_string(),
        secret: ctx
            .keyring
            .prove_primary(ProofRole::Hello, &ctx.ident.name, &binding),
    };
    let answer = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| tls::describe_connection_error(&e))?;
        send.write_all(&Handshake::Hello(hello).encode())
            .await
            .map_err(|e| format!("sending the hello: {e}"))?;
        let _ = send.finish();
        let bytes = recv.read_to_end(MAX_HANDSHAKE).await.map_err(|e| match e {
            quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(ce)) => {
                tls::describe_connection_error(&ce)
            }
            other => format!("reading the answer: {other}"),
        })?;
        Handshake::decode_answer(&bytes).map_err(|e| format!("the answer does not decode: {e}"))
    };
    let answer = match tokio::time::timeout(SEED_TIMEOUT, answer).await {
        Err(_) => return Outcome::Failed("no answer to the hello in time".into()),
        Ok(Err(e)) => return rejected(e),
        Ok(Ok(a)) => a,
    };
    let outcome = match answer {
        Handshake::Refuse(r) => Outcome::Refused(r),
        Handshake::Hello(_) => Outcome::Failed("the seed answered a hello with a hello".into()),
        Handshake::Ack(ack) => {
            let records = fetch_table(&conn).await;
            Outcome::Acked {
                ack: Box::new(ack),
                binding,
                rtt,
                records,
            }
        }
    };
    conn.close(0u32.into(), b"preflight done");
    outcome
}

/// Asks for the seed's whole node table (an empty digest, on our control lane) and collects the
/// records it sends back on its control lane.
async fn fetch_table(conn: &quinn::Connection) -> Option<BTreeMap<String, NodeRecord>> {
    let mut s = conn.open_uni().await.ok()?;
    let mut ask = vec![Lane::Control as u8];
    ask.extend(Frame::Digest(Vec::new(), false).encode_prefixed());
    s.write_all(&ask).await.ok()?;
    let _ = s.finish();
    let deadline = tokio::time::Instant::now() + TABLE_WAIT;
    let Ok(Ok(mut recv)) = tokio::time::timeout_at(deadline, conn.accept_uni()).await else {
        return None;
    };
    let mut split = FrameSplitter::default();
    let mut lane_checked = false;
    let mut records: Option<BTreeMap<String, NodeRecord>> = None;
    let mut frames = 0;
    while frames < MAX_TABLE_FRAMES {
        let wait_until = match &records {
            Some(_) => (tokio::time::Instant::now() + TABLE_QUIET).min(deadline),
            None => deadline,
        };
        let Ok(Ok(Some(chunk))) =
            tokio::time::timeout_at(wait_until, recv.read_chunk(64 * 1024, true)).await
        else {
            break;
        };
        let mut bytes = &chunk.bytes[..];
        if !lane_checked {
            let (&lane, rest) = bytes.split_first()?;
            if Lane::from_byte(lane) != Some(Lane::Control) {
                return records;
            }
            lane_checked = true;
            bytes = rest;
        }
        split.push(bytes);
        while let Ok(Some(frame)) = split.next_frame() {
            frames += 1;
            if let Ok(Frame::Records(rs)) = Frame::decode(frame) {
                let map = records.get_or_insert_with(BTreeMap::new);
                for r in rs {
                    let r = std::sync::Arc::unwrap_or_clone(r);
                    map.insert(r.name.to_string(), r);
                }
            }
        }
    }
    records
}

/// Turns the outcome of one seed into its check line.
fn judge(
    ctx: &Ctx,
    seed: &SeedTarget,
    outcome: Outcome,
) -> (Check, Option<BTreeMap<String, NodeRecord>>) {
    let name = format!("seed {}", seed.name);
    let at = format!("{} ({})", seed.text, seed.addr);
    let fail = |detail: String, fix: String| (Check::fail(&name, detail, fix), None);
    match outcome {
        Outcome::TlsRejected {
            claimed: Some(other),
            ..
        } if other != seed.name.as_str() => fail(
            format!(
                "DNS drift: {} resolves to {} but the node answering there is {other}",
                if seed.host.parse::<IpAddr>().is_ok() {
                    seed.name.to_string()
                } else {
                    format!("{} ({})", seed.name, seed.host)
                },
                seed.addr
            ),
            format!(
                "point seeds[{}]{} at the address {} advertises; `clusterctl members` lists the addresses",
                seed.index,
                if seed.host.parse::<IpAddr>().is_ok() {
                    String::new()
                } else {
                    format!(" (or DNS for {})", seed.host)
                },
                seed.name
            ),
        ),
        Outcome::TlsRejected { reason, .. } => fail(
            format!("{at}: this node refused the seed's certificate: {reason}"),
            if reason.contains("unknown CA") || reason.contains("signature") {
                "give this node the cluster's CA bundle in tls.ca (during a CA rotation: both CAs)".to_string()
            } else if reason.contains("expired") || reason.contains("not yet valid") {
                format!("renew {}'s certificate, or check the clocks", seed.name)
            } else {
                "see the reason".to_string()
            },
        ),
        Outcome::Failed(reason) => {
            let fix = if reason.contains("rejected our certificate") {
                format!(
                    "{} does not accept this node's certificate: issue it from the CA the cluster trusts, or add its CA to the seeds' bundles",
                    seed.name
                )
            } else if reason.contains("no answer") || reason.contains("timed out") {
                format!(
                    "check that {} runs and that UDP port {} is open between the two machines",
                    seed.name,
                    seed.addr.port()
                )
            } else {
                "see the reason".to_string()
            };
            fail(format!("{at}: {reason}"), fix)
        }
        Outcome::Refused(r) => {
            let fix = match r.code {
                RefusalCode::Secret => "give this node a secret the cluster holds: copy the cluster secret file (0600), or `clusterctl secret install` this node's secret on every node first".to_string(),
                RefusalCode::Contract => "deploy the same contract on every node, and check this node's site and role".to_string(),
                RefusalCode::Forgotten => "start the agent with --rejoin to bring the node back".to_string(),
                RefusalCode::Identity if r.reason.starts_with(clusterctl_core::instance::SECOND_INSTANCE) => {
                    "another instance of this node answers at the other address: stop it first, or give this node its own name".to_string()
                }
                RefusalCode::Identity => "use this node's own certificate (tls.cert names the node)".to_string(),
                RefusalCode::Cluster => "set `cluster` to the seed's cluster, or choose seeds of this cluster".to_string(),
                RefusalCode::SecurityMode => "run every node with [tls] (or every node insecure, labs only)".to_string(),
                RefusalCode::Version => "run the same clusterctl version as the seed".to_string(),
                RefusalCode::Overloaded => "try again shortly".to_string(),
            };
            fail(format!("{at}: refused by {}: {r}", seed.name), fix)
        }
        Outcome::Acked {
            ack,
            binding,
            rtt,
            records,
        } => {
            if ack.ident.name != seed.name {
                return fail(
                    format!(
                        "DNS drift: {} resolves to {} but the node answering there is {}",
                        seed.name, seed.addr, ack.ident.name
                    ),
                    format!("point seeds[{}] at the address {} advertises", seed.index, seed.name),
                );
            }
            let key = match ctx
                .keyring
                .verify(&ack.secret, ProofRole::Ack, &ack.ident.name, &binding)
            {
                Ok(k) => k,
                Err(e) => {
                    return fail(
                        format!("{at}: the seed's answer does not prove our secret: {e}"),
                        "give every node the same cluster secret".to_string(),
                    )
                }
            };
            if ack.contract_hash != ctx.contract_hash {
                return fail(
                    format!(
                        "{at}: contract drift: {} runs contract {}, this config's contract is {}",
                        seed.name, ack.contract_hash, ctx.contract_hash
                    ),
                    "deploy the same contract file on every node".to_string(),
                );
            }
            let proto = match ctx.security {
                Security::Mutual(_) => "mutual TLS 1.3",
                Security::Insecure { .. } => "insecure (unauthenticated)",
            };
            (
                Check::pass(
                    &name,
                    format!(
                        "{at}: handshake ok in {:.1} ms ({proto}, secret {key}, contract {})",
                        rtt.as_secs_f64() * 1000.0,
                        ack.contract_hash
                    ),
                ),
                records,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clusterctl_node::pki::{generate_ca, issue_node_cert, Validity};

    const CONTRACT: &str = r#"
cluster = "lab"
[[site]]
name = "us-east"
gateways = ["gw-us-1"]
nodes = ["gw-us-1", "edge-us-1", "edge-us-2"]
[[site]]
name = "eu-west"
gateways = ["gw-eu-1"]
[[link]]
between = ["us-east", "eu-west"]
"#;

    /// A directory with a contract, a CA, a 0600 secret and a certificate for edge-us-1.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    fn ident(name: &str, site: &str, role: Role) -> Ident {
        Ident {
            name: NodeName::new(name).expect("valid name"),
            site: SiteName::new(site).expect("valid name"),
            role,
        }
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().expect("temp dir");
            let p = dir.path();
            std::fs::write(p.join("contract.toml"), CONTRACT).expect("write");
            let cluster = ClusterName::new("lab").expect("valid name");
            let ca = generate_ca(&cluster, Validity::days_from_now(30)).expect("CA");
            std::fs::write(p.join("ca.pem"), &ca.cert_pem).expect("write");
            let node = issue_node_cert(
                &ca,
                &cluster,
                &ident("edge-us-1", "us-east", Role::Member),
                Validity::days_from_now(20),
            )
            .expect("cert");
            std::fs::write(p.join("node.pem"), &node.cert_pem).expect("write");
            std::fs::write(p.join("node.key"), &node.key_pem).expect("write");
            std::fs::set_permissions(p.join("node.key"), std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
            std::fs::write(p.join("secret"), "00112233445566778899aabbccddeeff\n").expect("write");
            std::fs::set_permissions(p.join("secret"), std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
            Fixture { dir }
        }

        fn config(&self, extra: &str) -> PathBuf {
            let text = format!(
                "cluster = \"lab\"\nname = \"edge-us-1\"\nsite = \"us-east\"\nrole = \"member\"\n\
                 listen = \"127.0.0.1:0\"\nadvertise = \"127.0.0.1:7400\"\ndata-dir = \"data\"\n\
                 contract = \"contract.toml\"\nsecret = \"secret\"\n{extra}\n\
                 [tls]\nca = \"ca.pem\"\ncert = \"node.pem\"\nkey = \"node.key\"\n"
            );
            let p = self.dir.path().join("node.toml");
            std::fs::write(&p, text).expect("write");
            p
        }
    }

    fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name}: {checks:#?}"))
    }

    #[test]
    fn a_good_config_passes_every_local_check() {
        let f = Fixture::new();
        let checks = local_checks(&f.config(""));
        for c in &checks {
            assert_eq!(c.status, Status::Pass, "{checks:#?}");
        }
        for name in [
            "contract",
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
            "snapshot",
            "advertise",
        ] {
            find(&checks, name);
        }
    }

    #[test]
    fn secret_and_key_files_of_another_user_fail_with_the_chown() {
        if clusterctl_node::files::current_uid() != 0 {
            eprintln!("note: needs root to give files away; skipped");
            return;
        }
        let f = Fixture::new();
        let p = f.dir.path();
        for file in ["secret", "node.key"] {
            std::os::unix::fs::chown(p.join(file), Some(65534), None).expect("chown");
        }
        let checks = local_checks(&f.config(""));
        for (check, file) in [("secret-file", "secret"), ("key-file", "node.key")] {
            let c = find(&checks, check);
            assert_eq!(c.status, Status::Fail, "{checks:#?}");
            assert!(c.detail.contains("uid 65534"), "{c:?}");
            assert_eq!(
                c.fix.as_deref(),
                Some(format!("chown root {}", p.join(file).display()).as_str()),
                "{c:?}"
            );
        }
    }

    #[test]
    fn a_damaged_snapshot_fails_naming_the_file_and_the_fix() {
        let f = Fixture::new();
        let cfg = f.config("");
        let data = f.dir.path().join("data");
        std::fs::create_dir_all(&data).expect("mkdir");
        let c = local_checks(&cfg);
        assert_eq!(find(&c, "snapshot").status, Status::Pass, "{c:#?}");
        clusterctl_node::persist::store(&data, &[]).expect("store");
        let c = local_checks(&cfg);
        assert_eq!(find(&c, "snapshot").status, Status::Pass, "{c:#?}");
        let file = clusterctl_node::persist::snapshot_path(&data);
        let mut bytes = std::fs::read(&file).expect("read");
        bytes.push(0);
        std::fs::write(&file, bytes).expect("write");
        // The agent's own loader refuses it; so does preflight.
        assert!(clusterctl_node::persist::load(&data).is_err());
        let c = local_checks(&cfg);
        let snap = find(&c, "snapshot");
        assert_eq!(snap.status, Status::Fail, "{c:#?}");
        assert!(
            snap.detail.contains(&file.display().to_string()) && snap.detail.contains("length"),
            "{snap:?}"
        );
        assert!(
            snap.fix
                .as_deref()
                .is_some_and(|f| f.starts_with(&format!("mv {} ", file.display()))),
            "{snap:?}"
        );
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let f = Fixture::new();
        let p = f.dir.path();
        std::fs::set_permissions(p.join("secret"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        std::fs::set_permissions(p.join("node.key"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let cfg = f.config("");
        let text = std::fs::read_to_string(&cfg)
            .expect("read")
            .replace("role = \"member\"", "role = \"gateway\"");
        std::fs::write(&cfg, text).expect("write");
        let checks = run_checks(&cfg);
        assert_eq!(find(&checks, "config").status, Status::Fail, "{checks:#?}");
        let secret = find(&checks, "secret-file");
        assert_eq!(secret.status, Status::Fail, "{checks:#?}");
        assert!(secret
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("chmod 600")));
        let key = find(&checks, "key-file");
        assert_eq!(key.status, Status::Fail, "{checks:#?}");
        assert_eq!(
            key.fix.as_deref(),
            Some(format!("chmod 600 {}", p.join("node.key").display()).as_str())
        );
        // The chain itself is still judged (and is fine).
        assert_eq!(find(&checks, "cert-chain").status, Status::Pass);
        assert_eq!(find(&checks, "site-role").status, Status::Fail);
        // The certificate names a member: the names differ from the config.
        assert_eq!(find(&checks, "cert-names").status, Status::Fail);
    }

    #[test]
    fn name_of_another_site_is_refused() {
        let f = Fixture::new();
        let cfg = f.config("");
        let text = std::fs::read_to_string(&cfg)
            .expect("read")
            .replace("name = \"edge-us-1\"", "name = \"gw-eu-1\"");
        std::fs::write(&cfg, text).expect("write");
        let c = local_checks(&cfg);
        let name = find(&c, "name");
        assert_eq!(name.status, Status::Fail, "{c:#?}");
        assert!(name.detail.contains("eu-west"), "{name:?}");
    }

    #[test]
    fn loopback_advertise_with_a_remote_seed_fails() {
        let f = Fixture::new();
        let c = local_checks(&f.config("seeds = [\"gw-us-1@10.9.9.9:7400\"]"));
        let adv = find(&c, "advertise");
        assert_eq!(adv.status, Status::Fail, "{c:#?}");
        assert!(adv.detail.contains("loopback"), "{adv:?}");
    }

    #[test]
    fn a_busy_listen_port_fails_with_the_fix() {
        let f = Fixture::new();
        let busy = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = busy.local_addr().expect("addr").port();
        let cfg = f.config("");
        let text = std::fs::read_to_string(&cfg)
            .expect("read")
            .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
        std::fs::write(&cfg, text).expect("write");
        let c = run_checks(&cfg);
        let listen = find(&c, "listen");
        assert_eq!(listen.status, Status::Fail, "{c:#?}");
        assert!(listen.detail.contains("in use"), "{listen:?}");
        assert!(listen
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("ss -ulpn")));
    }

    #[test]
    fn lines_carry_the_fix() {
        let c = Check::fail("listen", "UDP 1.2.3.4:5 is in use", "stop it");
        assert_eq!(
            c.line(),
            "FAIL  listen  UDP 1.2.3.4:5 is in use — fix: stop it"
        );
        assert_eq!(Check::pass("x", "ok").line(), "PASS  x  ok");
    }

    #[test]
    fn seeds_parse_like_the_config() {
        let s = parse_seed("gw-us-1@127.0.0.1:7400", None).expect("parses");
        assert_eq!(s.addr, "127.0.0.1:7400".parse().expect("addr"));
        let s = parse_seed("gw-us-1@[::1]:7400", None).expect("parses");
        assert_eq!(s.addr, "[::1]:7400".parse().expect("addr"));
        assert!(parse_seed("127.0.0.1:7400", None).is_err());
        assert!(parse_seed("gw@127.0.0.1", None).is_err());
    }
}
