//! The cluster secret over real agents: a rolling restart with only a new secret is refused
//! with `secret mismatch` on the right links; install -> use -> remove rotates the secret with
//! zero refused links.

use clusterctl_api::{EventKind, LinkState, Secrets, Topology};
use clusterctl_testkit::{Lab, LabOptions, DEFAULT_WAIT};
use std::path::Path;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_clusterctl"))
}

fn converged_lab() -> Lab {
    let lab = Lab::up(bin(), LabOptions::default());
    lab.wait_converged();
    lab
}

fn pretty<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// Generates a secret file in the lab directory and returns its path and key id.
fn new_secret(lab: &Lab, name: &str) -> (String, String) {
    let path = lab.dir().join(name);
    let out = lab.cli(&["secret", "generate", &path.to_string_lossy()]);
    out.assert_success();
    let text = std::fs::read_to_string(&path).expect("the secret file was written");
    let id = clusterctl_core::secret::Secret::from_text(&text)
        .expect("a generated secret parses")
        .id()
        .to_string();
    (path.to_string_lossy().into_owned(), id)
}

fn refusals(lab: &Lab) -> Vec<String> {
    let mut out = Vec::new();
    for n in lab.nodes() {
        for e in lab.events(&n.name) {
            if e.kind == EventKind::LinkRefused {
                out.push(format!("{}: {}", n.name, e.reason));
            }
        }
    }
    out
}

#[test]
fn restart_with_only_a_new_secret_is_refused_as_secret_mismatch() {
    let mut lab = converged_lab();
    let (file, _) = new_secret(&lab, "new.secret");
    lab.kill9("edge-us-2");
    lab.start_agent("edge-us-2", &["--secret", &file]);
    let t: Topology = lab.wait_for(
        "gw-us-1 to report its link with edge-us-2 refused for a secret mismatch",
        DEFAULT_WAIT,
        || {
            let (_, t) = lab.topology("gw-us-1");
            let bad = t.links.iter().find(|l| {
                [l.from.as_str(), l.to.as_str()].contains(&"edge-us-2")
                    && l.state == LinkState::Refused
                    && l.reason
                        .as_deref()
                        .unwrap_or("")
                        .contains("secret mismatch")
            });
            if bad.is_some() {
                Ok(t)
            } else {
                Err(pretty(&t))
            }
        },
    );
    assert!(!t.healthy);
    let (code, _) = lab.topology("gw-us-1");
    assert_eq!(code, Some(1), "topology must fail while a link is refused");
}

#[test]
fn install_use_remove_rotates_the_secret_with_zero_refused_links() {
    let mut lab = converged_lab();
    let old = lab.cli_json::<Secrets>(&["secret", "list", "--json"]);
    assert_eq!(old.keys.len(), 1, "{}", pretty(&old));
    let old_id = old.keys[0].id.clone();
    let (file, new_id) = new_secret(&lab, "next.secret");

    lab.cli(&["secret", "install", &file, "--all"])
        .assert_success();
    lab.wait_for("every node to hold the new secret", DEFAULT_WAIT, || {
        let s: Secrets = lab.cli_json(&["secret", "list", "--json"]);
        match s.keys.iter().find(|k| k.id == new_id) {
            Some(k) if k.holders == 6 && s.nodes == 6 => Ok(()),
            _ => Err(pretty(&s)),
        }
    });
    lab.cli(&["secret", "use", &new_id, "--all"])
        .assert_success();
    // Force fresh handshakes with the new secret while some nodes may still prove the old one.
    for name in ["edge-us-2", "gw-eu-1"] {
        lab.kill9(name);
        lab.start_agent(name, &[]);
        lab.wait_converged();
    }
    lab.cli(&["secret", "remove", &old_id, "--all"])
        .assert_success();
    lab.kill9("edge-eu-1");
    lab.start_agent("edge-eu-1", &[]);
    lab.wait_converged();

    // Records carry each node's keys and reach gw-us-1 within a tick or two of the change.
    let s: Secrets = lab.wait_for(
        "the old secret gone from every record",
        DEFAULT_WAIT,
        || {
            let s: Secrets = lab.cli_json(&["secret", "list", "--json"]);
            if s.keys.len() == 1 {
                Ok(s)
            } else {
                Err(pretty(&s))
            }
        },
    );
    assert_eq!(s.keys.len(), 1, "{}", pretty(&s));
    assert_eq!(
        (s.keys[0].id.as_str(), s.keys[0].in_use_by),
        (new_id.as_str(), 6)
    );
    // Records of the restarted node reach gw-us-1 a moment after it is seen alive.
    let t = lab.wait_for("every expected link up", DEFAULT_WAIT, || {
        let (code, t) = lab.topology("gw-us-1");
        if code == Some(0) {
            Ok(t)
        } else {
            Err(pretty(&t))
        }
    });
    // Links handshaken after the rotation carry the new key.
    assert!(
        t.links
            .iter()
            .any(|l| l.secret_key.as_deref() == Some(new_id.as_str())),
        "{}",
        pretty(&t)
    );
    let refused = refusals(&lab);
    assert!(
        refused.is_empty(),
        "links were refused during the rotation: {refused:#?}"
    );
}

#[test]
fn secret_install_refuses_a_file_readable_by_others_or_owned_by_another_user() {
    let lab = converged_lab();
    let (file, id) = new_secret(&lab, "other.secret");
    let path = Path::new(&file);
    let mut cases = vec![("chmod", format!("chmod 600 {file}"))];
    if clusterctl_node::files::current_uid() == 0 {
        cases.push(("chown", format!("chown root {file}")));
    }
    for (how, fix) in cases {
        match how {
            "chmod" => {
                std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o640))
                    .expect("chmod")
            }
            _ => {
                std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                    .expect("chmod");
                std::os::unix::fs::chown(path, Some(65534), None).expect("chown");
            }
        }
        let out = lab.cli(&["secret", "install", &file, "--agent", "edge-us-1"]);
        assert_ne!(out.code, Some(0), "{}", out.describe());
        assert!(
            format!("{}{}", out.stdout, out.stderr).contains(&fix),
            "{how}: {}",
            out.describe()
        );
        let s: Secrets = lab.cli_json(&["secret", "list", "--json", "--agent", "edge-us-1"]);
        assert!(!pretty(&s).contains(&id), "{how}: {}", pretty(&s));
    }
}
