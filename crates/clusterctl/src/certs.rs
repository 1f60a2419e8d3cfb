//! `clusterctl certs init|issue|inspect|status`: the cluster CA, node certificates, and which
//! certificate and CA every running node presents.
//!
//! Lifetimes are always explicit. Node certificates default to 90 days, short enough that
//! rotating them is a habit and not an emergency. Private keys are written mode 0600 and no file
//! is ever overwritten. Fingerprints are shown as [`pki::short_fingerprint`] (the first 16 hex
//! characters of the SHA-256 of the DER), the same form the agent publishes.

use crate::client::AgentArgs;
use crate::client::Client;
use crate::output::{out, out_json};
use anyhow::{anyhow, bail, Context};
use clusterctl_api::{CertsReport, Role};
use clusterctl_core::name::{ClusterName, Ident, NodeName, SiteName};
use clusterctl_node::pki::{self, CertDetails, Validity};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

/// Default lifetime of a cluster CA, in days.
pub const DEFAULT_CA_DAYS: u32 = 365;
/// Default lifetime of a node certificate, in days.
pub const DEFAULT_NODE_DAYS: u32 = 90;
/// Longest lifetime accepted for either, in days (ten years).
pub const MAX_DAYS: u32 = 3650;
/// A certificate with fewer days left than this is flagged `expires soon`.
pub const SOON_DAYS: i64 = 14;

/// Cluster CA and node certificates.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCmd {
    /// Create a cluster CA: DIR/ca.pem and DIR/ca.key (0600). Never overwrites.
    Init {
        /// Directory to write the CA into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Cluster name (a DNS label), the `cluster` of configs and contract.
        #[arg(long)]
        cluster: String,
        /// Lifetime in days.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        days: u32,
    },
    /// Issue a node certificate naming node, site and role: OUT/NAME.pem and OUT/NAME.key (0600).
    Issue {
        /// The node's name (its `name` in the config).
        name: String,
        /// The node's site.
        #[arg(long)]
        site: String,
        /// `member` or `gateway`.
        #[arg(long)]
        role: String,
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Cluster name; default: the cluster named by the CA.
        #[arg(long)]
        cluster: Option<String>,
        /// Lifetime in days.
        #[arg(long, default_value_t = DEFAULT_NODE_DAYS)]
        days: u32,
        /// Directory to write the certificate and key into (default: the current directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show what a certificate file (node certificate or CA bundle) says; exit 1 if expired.
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Which CA and certificate every node presents, from the running cluster.
    Status {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: CertsCmd, agent: &AgentArgs) -> anyhow::Result<ExitCode> {
    match cmd {
        CertsCmd::Init { dir, cluster, days } => init(&dir, &cluster, days),
        CertsCmd::Issue {
            name,
            site,
            role,
            ca_dir,
            cluster,
            days,
            out,
        } => issue(
            &name,
            &site,
            &role,
            &ca_dir,
            cluster.as_deref(),
            days,
            out.as_deref(),
        ),
        CertsCmd::Inspect { file, json } => inspect(&file, json),
        CertsCmd::Status { json } => status(json, agent),
    }
}

fn check_days(days: u32) -> anyhow::Result<()> {
    if days == 0 || days > MAX_DAYS {
        bail!("--days {days} is out of range: give 1 to {MAX_DAYS} days");
    }
    Ok(())
}

/// An RFC 3339 timestamp, to the second, UTC.
pub fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Refuses to go on when any of `paths` exists: nothing is ever overwritten.
fn refuse_existing(paths: &[&Path]) -> anyhow::Result<()> {
    for p in paths {
        if p.exists() {
            bail!(
                "{} already exists and is never overwritten: move it aside, or choose another directory",
                p.display()
            );
        }
    }
    Ok(())
}

/// Creates `path` (which must not exist) with `mode` and writes `text`.
fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {} (it is never overwritten)", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn init(dir: &Path, cluster: &str, days: u32) -> anyhow::Result<ExitCode> {
    check_days(days)?;
    let cluster = ClusterName::new(cluster)
        .map_err(|e| anyhow!("--cluster {cluster:?} {e}: use a DNS label, e.g. --cluster prod"))?;
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    refuse_existing(&[&cert_path, &key_path])?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = pki::generate_ca(&cluster, Validity::days_from_now(days))?;
    write_new(&key_path, &ca.key_pem, 0o600)?;
    write_new(&cert_path, &ca.cert_pem, 0o644)?;
    let d = first_cert(&ca.cert_pem)?;
    out(format!(
        "wrote {} and {} (0600): CA of cluster {cluster}, fingerprint {}, valid until {} ({days} days)",
        cert_path.display(),
        key_path.display(),
        d.short_fingerprint,
        stamp(d.not_after)
    ));
    out(format!(
        "next: clusterctl certs issue NAME --site SITE --role member --ca-dir {}",
        dir.display()
    ));
    Ok(ExitCode::SUCCESS)
}

fn first_cert(pem: &str) -> anyhow::Result<CertDetails> {
    CertDetails::all_from_pem(pem)?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no certificate"))
}

fn issue(
    name: &str,
    site: &str,
    role: &str,
    ca_dir: &Path,
    cluster: Option<&str>,
    days: u32,
    out_dir: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    check_days(days)?;
    let ident = Ident {
        name: NodeName::new(name)
            .map_err(|e| anyhow!("node name {name:?} {e}: use a DNS label, e.g. edge-us-1"))?,
        site: SiteName::new(site)
            .map_err(|e| anyhow!("--site {site:?} {e}: use a DNS label, e.g. us-east"))?,
        role: Role::parse(role)
            .ok_or_else(|| anyhow!("--role {role:?} is not a role: use member or gateway"))?,
    };
    let ca_cert = ca_dir.join("ca.pem");
    let ca_key = ca_dir.join("ca.key");
    // A CA key others can read may already be copied: refuse to sign with it.
    if ca_key.exists() {
        clusterctl_node::files::check_owner_only(&ca_key).map_err(|e| anyhow!(e))?;
    }
    let ca = pki::read_ca(&ca_cert, &ca_key).map_err(|e| {
        anyhow!("{e} (--ca-dir must hold the ca.pem and ca.key written by `clusterctl certs init`)")
    })?;
    let ca_details = first_cert(&ca.cert_pem)?;
    let ca_cluster = ca_details.organization.clone();
    let cluster = match (cluster, ca_cluster.as_deref()) {
        (Some(c), Some(of_ca)) if c != of_ca => bail!(
            "--cluster {c} differs from the cluster of the CA in {} ({of_ca}): leave --cluster out, or use the CA of cluster {c}",
            ca_dir.display()
        ),
        (Some(c), _) => c.to_string(),
        (None, Some(of_ca)) => of_ca.to_string(),
        (None, None) => bail!(
            "the CA in {} names no cluster (no O= in its subject): pass --cluster NAME",
            ca_dir.display()
        ),
    };
    let cluster = ClusterName::new(cluster.clone())
        .map_err(|e| anyhow!("cluster {cluster:?} {e}: use a DNS label"))?;
    let now = SystemTime::now();
    let validity = Validity::days_from_now(days);
    if ca_details.not_after <= now {
        bail!(
            "the CA in {} expired at {}: create a new CA (`clusterctl certs init`) and roll it out",
            ca_dir.display(),
            stamp(ca_details.not_after)
        );
    }
    if validity.not_after > ca_details.not_after {
        bail!(
            "a {days}-day certificate would outlive the CA in {} (valid until {}, {} days left): use --days {} or less, or renew the CA first",
            ca_dir.display(),
            stamp(ca_details.not_after),
            ca_details.days_left(now),
            ca_details.days_left(now).max(1)
        );
    }
    let out_dir = out_dir.unwrap_or(Path::new("."));
    let cert_path = out_dir.join(format!("{name}.pem"));
    let key_path = out_dir.join(format!("{name}.key"));
    refuse_existing(&[&cert_path, &key_path])?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let pair = pki::issue_node_cert(&ca, &cluster, &ident, validity)?;
    write_new(&key_path, &pair.key_pem, 0o600)?;
    write_new(&cert_path, &pair.cert_pem, 0o644)?;
    let d = first_cert(&pair.cert_pem)?;
    out(format!(
        "wrote {} and {} (0600): {} ({}) of site {} in cluster {cluster}, fingerprint {}, issued by CA {}, valid until {} ({days} days)",
        cert_path.display(),
        key_path.display(),
        ident.name,
        ident.role,
        ident.site,
        d.short_fingerprint,
        ca_details.short_fingerprint,
        stamp(d.not_after)
    ));
    Ok(ExitCode::SUCCESS)
}

/// One certificate of `certs inspect --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertInspect {
    /// `ca` or `node` (or `other` for a certificate that is neither).
    pub kind: String,
    pub subject: String,
    pub issuer: String,
    pub dns_sans: Vec<String>,
    pub uri_sans: Vec<String>,
    /// The cluster (node certificates: from the URI SAN; CAs: their organization).
    pub cluster: Option<String>,
    pub node: Option<String>,
    pub site: Option<String>,
    pub role: Option<Role>,
    /// SHA-256 of the DER, 64 hex characters.
    pub fingerprint: String,
    /// Its first 16 hex characters, as shown everywhere else.
    pub short_fingerprint: String,
    pub not_before: String,
    pub not_after: String,
    /// Whole days until `not_after` (negative once expired).
    pub days_left: i64,
    pub expired: bool,
    pub not_yet_valid: bool,
}

/// `certs inspect --json`: every certificate of the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InspectReport {
    pub file: String,
    pub certificates: Vec<CertInspect>,
}

/// What one certificate says, as `certs inspect` shows it.
pub fn describe(d: &CertDetails, now: SystemTime) -> CertInspect {
    let kind = if d.is_ca {
        "ca"
    } else if d.identity.is_some() {
        "node"
    } else {
        "other"
    };
    let id = d.identity.as_ref();
    CertInspect {
        kind: kind.to_string(),
        subject: d.subject.clone(),
        issuer: d.issuer.clone(),
        dns_sans: d.dns_sans.clone(),
        uri_sans: d.uri_sans.clone(),
        cluster: id
            .map(|i| i.cluster.to_string())
            .or_else(|| d.organization.clone()),
        node: id.map(|i| i.ident.name.to_string()),
        site: id.map(|i| i.ident.site.to_string()),
        role: id.map(|i| i.ident.role),
        fingerprint: d.fingerprint.clone(),
        short_fingerprint: d.short_fingerprint.clone(),
        not_before: stamp(d.not_before),
        not_after: stamp(d.not_after),
        days_left: d.days_left(now),
        expired: d.not_after <= now,
        not_yet_valid: d.not_before > now,
    }
}

fn inspect(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let pem =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let details = CertDetails::all_from_pem(&pem)
        .map_err(|e| anyhow!("{}: {e}; give a PEM certificate file", file.display()))?;
    let now = SystemTime::now();
    let report = InspectReport {
        file: file.display().to_string(),
        certificates: details.iter().map(|d| describe(d, now)).collect(),
    };
    let bad = report
        .certificates
        .iter()
        .any(|c| c.expired || c.not_yet_valid);
    if json {
        out_json(&report)?;
    } else {
        let many = report.certificates.len() > 1;
        for (i, c) in report.certificates.iter().enumerate() {
            if many {
                out(format!(
                    "certificate {} of {}:",
                    i + 1,
                    report.certificates.len()
                ));
            }
            print_inspect(c);
        }
    }
    Ok(if bad {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_inspect(c: &CertInspect) {
    let what = match c.kind.as_str() {
        "ca" => format!(
            "CA certificate (cluster {})",
            c.cluster.as_deref().unwrap_or("?")
        ),
        "node" => format!(
            "node certificate: {} of site {} in cluster {}",
            c.node.as_deref().unwrap_or("?"),
            c.site.as_deref().unwrap_or("?"),
            c.cluster.as_deref().unwrap_or("?")
        ),
        _ => "certificate without a clusterctl identity (neither a CA nor a node certificate)"
            .to_string(),
    };
    out(format!("kind         {what}"));
    out(format!("subject      {}", c.subject));
    if !c.dns_sans.is_empty() || !c.uri_sans.is_empty() {
        let sans: Vec<String> = c
            .dns_sans
            .iter()
            .map(|d| format!("DNS:{d}"))
            .chain(c.uri_sans.iter().map(|u| format!("URI:{u}")))
            .collect();
        out(format!("sans         {}", sans.join(", ")));
    }
    if let Some(role) = c.role {
        out(format!("role         {role}"));
    }
    out(format!("issuer       {}", c.issuer));
    out(format!("fingerprint  {}", c.short_fingerprint));
    out(format!("sha256       {}", c.fingerprint));
    out(format!("not before   {}", c.not_before));
    out(format!("not after    {}", c.not_after));
    if c.expired {
        out(format!(
            "EXPIRED      {} days ago, at {}: issue a new certificate{}",
            -c.days_left,
            c.not_after,
            if c.kind == "ca" {
                " from a new CA"
            } else {
                " (clusterctl certs issue)"
            }
        ));
    } else if c.not_yet_valid {
        out(format!(
            "NOT YET VALID  until {}: check this machine's clock",
            c.not_before
        ));
    } else {
        let soon = if c.days_left < SOON_DAYS {
            "  (expires soon: rotate it)"
        } else {
            ""
        };
        out(format!("days left    {}{soon}", c.days_left));
    }
}

fn status(json: bool, agent: &AgentArgs) -> anyhow::Result<ExitCode> {
    let r: CertsReport = Client::resolve(agent)?.get("/v1/certs")?;
    if json {
        out_json(&r)?;
    } else {
        for line in status_lines(&r) {
            out(line);
        }
    }
    let expired = r
        .node_certs
        .iter()
        .any(|n| n.cert.as_ref().is_some_and(|c| c.days_left < 0));
    Ok(if expired {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The human output of `certs status`: a table, then one line per CA.
pub fn status_lines(r: &CertsReport) -> Vec<String> {
    let head = ["NAME", "SITE", "ROLE", "LEAF", "ISSUER", "TRUSTS", "DAYS"].map(String::from);
    let rows: Vec<[String; 7]> = r
        .node_certs
        .iter()
        .map(|n| match &n.cert {
            Some(c) => [
                n.name.clone(),
                n.site.clone(),
                n.role.to_string(),
                c.leaf.clone(),
                c.issuer.clone(),
                c.trusts.join(","),
                if c.days_left < 0 {
                    format!("{} (EXPIRED)", c.days_left)
                } else if c.days_left < SOON_DAYS {
                    format!("{} (soon)", c.days_left)
                } else {
                    c.days_left.to_string()
                },
            ],
            None => [
                n.name.clone(),
                n.site.clone(),
                n.role.to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "- (insecure or not known yet)".into(),
            ],
        })
        .collect();
    let mut w = head.clone().map(|h| h.len());
    for row in &rows {
        for (i, c) in row.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:w$}", w = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut lines = vec![line(&head)];
    lines.extend(rows.iter().map(|r| line(r)));
    let n = r.nodes;
    for ca in &r.cas {
        lines.push(format!(
            "CA {}  trusted by {}/{n} nodes, issued {}/{n} certificates",
            ca.fingerprint, ca.trusted_by, ca.issued_for
        ));
    }
    lines.push(format!("{n} nodes, as seen by {}", r.observer));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use clusterctl_api::{CaView, CertSummaryView, NodeCertView};

    #[test]
    fn status_lists_every_node_and_one_line_per_ca() {
        let cert = |leaf: &str, issuer: &str, trusts: &[&str], days_left| {
            Some(CertSummaryView {
                leaf: leaf.into(),
                issuer: issuer.into(),
                trusts: trusts.iter().map(|s| s.to_string()).collect(),
                not_before: "2026-01-01T00:00:00Z".into(),
                not_after: "2026-04-01T00:00:00Z".into(),
                days_left,
            })
        };
        let r = CertsReport {
            observer: "gw-us-1".into(),
            nodes: 3,
            node_certs: vec![
                NodeCertView {
                    name: "edge-us-1".into(),
                    site: "us-east".into(),
                    role: Role::Member,
                    cert: cert("aaaa", "ca-old", &["ca-old", "ca-new"], 80),
                },
                NodeCertView {
                    name: "edge-us-2".into(),
                    site: "us-east".into(),
                    role: Role::Member,
                    cert: cert("bbbb", "ca-new", &["ca-old", "ca-new"], 3),
                },
                NodeCertView {
                    name: "gw-us-1".into(),
                    site: "us-east".into(),
                    role: Role::Gateway,
                    cert: None,
                },
            ],
            cas: vec![
                CaView {
                    fingerprint: "ca-new".into(),
                    trusted_by: 2,
                    issued_for: 1,
                },
                CaView {
                    fingerprint: "ca-old".into(),
                    trusted_by: 2,
                    issued_for: 1,
                },
            ],
        };
        let lines = status_lines(&r);
        assert!(lines[0].starts_with("NAME"), "{lines:#?}");
        assert!(
            lines[1].contains("aaaa") && lines[1].ends_with("80"),
            "{lines:#?}"
        );
        assert!(lines[2].contains("3 (soon)"), "{lines:#?}");
        assert!(lines[3].contains("insecure"), "{lines:#?}");
        assert_eq!(
            lines[4],
            "CA ca-new  trusted by 2/3 nodes, issued 1/3 certificates"
        );
        assert_eq!(
            lines.last().map(String::as_str),
            Some("3 nodes, as seen by gw-us-1")
        );
    }

    #[test]
    fn describe_tells_a_ca_from_a_node_certificate() {
        let cluster = ClusterName::new("lab").expect("valid name");
        let ca = pki::generate_ca(&cluster, Validity::days_from_now(30)).expect("CA");
        let ident = Ident {
            name: NodeName::new("gw-us-1").expect("valid name"),
            site: SiteName::new("us-east").expect("valid name"),
            role: Role::Gateway,
        };
        let node =
            pki::issue_node_cert(&ca, &cluster, &ident, Validity::days_from_now(5)).expect("cert");
        let now = SystemTime::now();
        let c = describe(&first_cert(&ca.cert_pem).expect("parses"), now);
        assert_eq!(c.kind, "ca");
        assert_eq!(c.cluster.as_deref(), Some("lab"));
        let n = describe(&first_cert(&node.cert_pem).expect("parses"), now);
        assert_eq!(n.kind, "node");
        assert_eq!(n.role, Some(Role::Gateway));
        assert_eq!(n.dns_sans, ["gw-us-1.us-east.lab"]);
        assert_eq!(n.short_fingerprint.len(), 16);
        assert!(n.fingerprint.starts_with(&n.short_fingerprint));
        assert!((4..=5).contains(&n.days_left), "{}", n.days_left);
        assert!(!n.expired && !n.not_yet_valid);
    }
}
