//! Certificates change under a running cluster: hot reload (bad files refused, the old material
//! stays) and the CA rotation runbook (add the new CA everywhere -> re-issue leaves, rolling ->
//! drop the old CA) with zero refused links.

use clusterctl_api::{CertsReport, EventKind, ReloadReport};
use clusterctl_core::name::{ClusterName, Ident, NodeName, SiteName};
use clusterctl_node::pki::{generate_ca, issue_node_cert, short_fingerprint, Validity};
use clusterctl_testkit::{Lab, LabOptions, DEFAULT_WAIT};
use rustls_pki_types::{pem::PemObject, CertificateDer};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_clusterctl"))
}

fn pretty<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn fingerprint(pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("a PEM certificate");
    short_fingerprint(der.as_ref())
}

/// Writes a file by rename, so an agent polling it never reads half of it.
/// Replaces a certificate or key file as an operator would: a new file, mode 0600, renamed over.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename");
}

fn refusals(lab: &Lab) -> Vec<String> {
    lab.nodes()
        .iter()
        .flat_map(|n| {
            lab.events(&n.name)
                .into_iter()
                .filter(|e| e.kind == EventKind::LinkRefused)
                .map(move |e| format!("{}: {}", n.name, e.reason))
        })
        .collect()
}

#[test]
fn reload_refuses_a_bad_or_readable_key_and_keeps_links_up() {
    let lab = Lab::up(bin(), LabOptions::default());
    lab.wait_converged();
    let key = lab.node("edge-us-1").dir().join("key.pem");
    let good = std::fs::read_to_string(&key).expect("key");
    replace(&key, "not a key\n");
    let r: Vec<ReloadReport> = lab.cli_json(&["--agent", "edge-us-1", "reload", "--json"]);
    assert!(!r[0].reloaded, "{}", pretty(&r));
    assert!(
        r[0].reason.as_deref().unwrap_or("").contains("tls.key"),
        "{}",
        pretty(&r)
    );
    let (code, t) = lab.topology("edge-us-1");
    assert_eq!(code, Some(0), "links must stay up: {}", pretty(&t));
    replace(&key, &good);
    let r: Vec<ReloadReport> = lab.cli_json(&["--agent", "edge-us-1", "reload", "--json"]);
    assert!(r[0].reloaded, "{}", pretty(&r));

    // A key readable by others is refused as at start, with the same reason and fix.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let r: Vec<ReloadReport> = lab.cli_json(&["--agent", "edge-us-1", "reload", "--json"]);
    assert!(!r[0].reloaded, "{}", pretty(&r));
    let reason = r[0].reason.as_deref().unwrap_or("");
    assert!(
        reason.starts_with(&format!("tls.key: {} has mode 0644", key.display()))
            && reason.ends_with(&format!("fix: chmod 600 {}", key.display())),
        "{}",
        pretty(&r)
    );
    let (code, t) = lab.topology("edge-us-1");
    assert_eq!(code, Some(0), "links must stay up: {}", pretty(&t));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let r: Vec<ReloadReport> = lab.cli_json(&["--agent", "edge-us-1", "reload", "--json"]);
    assert!(r[0].reloaded, "{}", pretty(&r));
}

#[test]
fn ca_rotation_runbook_refuses_no_link() {
    let mut lab = Lab::up(bin(), LabOptions::default());
    lab.wait_converged();
    let cluster = ClusterName::new("lab").expect("name");
    let old_ca_pem = std::fs::read_to_string(lab.dir().join("ca.pem")).expect("ca.pem");
    let old_fp = fingerprint(&old_ca_pem);
    let new_ca = generate_ca(&cluster, Validity::days_from_now(365)).expect("new CA");
    let new_fp = fingerprint(&new_ca.cert_pem);
    let status = |lab: &Lab| -> CertsReport {
        let out = lab.cli(&["--agent", "gw-us-1", "topology", "--json"]);
        drop(out);
        let c = clusterctl_testkit::http_get_json::<CertsReport>(
            &lab.node("gw-us-1").control,
            "/v1/certs",
            &lab.token("read"),
        );
        c.unwrap_or_else(|e| panic!("GET /v1/certs: {e}"))
    };
    let ca_counts = |c: &CertsReport, fp: &str| {
        c.cas
            .iter()
            .find(|x| x.fingerprint == fp)
            .map_or((0, 0), |x| (x.trusted_by, x.issued_for))
    };

    // Step 1: every bundle holds both CAs (the lab's nodes share one ca.pem).
    replace(
        &lab.dir().join("ca.pem"),
        &format!("{old_ca_pem}{}", new_ca.cert_pem),
    );
    lab.cli(&["reload", "--all"]).assert_success();
    lab.wait_for("the new CA trusted by 6/6", DEFAULT_WAIT, || {
        let c = status(&lab);
        if ca_counts(&c, &new_fp) == (6, 0) {
            Ok(())
        } else {
            Err(pretty(&c))
        }
    });

    // Step 2: re-issue every leaf from the new CA, one node at a time; restart one node so that
    // fresh handshakes run with mixed old and new leaves.
    let names: Vec<(String, String, clusterctl_api::Role)> = lab
        .nodes()
        .iter()
        .map(|n| (n.name.clone(), n.site.clone(), n.role))
        .collect();
    for (i, (name, site, role)) in names.iter().enumerate() {
        let ident = Ident {
            name: NodeName::new(name.clone()).expect("name"),
            site: SiteName::new(site.clone()).expect("site"),
            role: *role,
        };
        let leaf =
            issue_node_cert(&new_ca, &cluster, &ident, Validity::days_from_now(30)).expect("leaf");
        let dir = lab.node(name).dir();
        // Key first, then certificate: a poll in between is refused (mismatched pair) and the
        // old material stays; the explicit reload below takes both.
        replace(&dir.join("key.pem"), &leaf.key_pem);
        replace(&dir.join("cert.pem"), &leaf.cert_pem);
        let r: Vec<ReloadReport> = lab.cli_json(&["--agent", name, "reload", "--json"]);
        assert!(r[0].reloaded, "{}", pretty(&r));
        if i == 2 {
            lab.kill9(name);
            lab.start_agent(name, &[]);
            lab.wait_converged();
        }
    }
    lab.wait_for("every leaf issued by the new CA", DEFAULT_WAIT, || {
        let c = status(&lab);
        if ca_counts(&c, &new_fp) == (6, 6) {
            Ok(())
        } else {
            Err(pretty(&c))
        }
    });

    // Step 3: drop the old CA.
    replace(&lab.dir().join("ca.pem"), &new_ca.cert_pem);
    lab.cli(&["reload", "--all"]).assert_success();
    lab.wait_for("the old CA gone from every bundle", DEFAULT_WAIT, || {
        let c = status(&lab);
        if ca_counts(&c, &old_fp) == (0, 0) {
            Ok(())
        } else {
            Err(pretty(&c))
        }
    });
    // Fresh handshakes on the new CA alone.
    lab.kill9("edge-eu-2");
    lab.start_agent("edge-eu-2", &[]);
    lab.wait_converged();
    lab.wait_for(
        "every expected link up after the rotation",
        DEFAULT_WAIT,
        || {
            let (code, t) = lab.topology("gw-us-1");
            if code == Some(0) {
                Ok(())
            } else {
                Err(pretty(&t))
            }
        },
    );
    let refused = refusals(&lab);
    assert!(
        refused.is_empty(),
        "links were refused during the CA rotation: {refused:#?}"
    );
}
