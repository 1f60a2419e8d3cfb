//! Negative security suite: every way of getting into the cluster without the right to is
//! refused with a precise reason, and the refused peer never gets an application frame
//! processed. (Certificates of another CA, expired, not yet valid, name mismatch and 0-RTT are
//! also covered at the TLS layer in crates/node/tests/tls.rs.)

use clusterctl_api::{EventKind, Members, Role};
use clusterctl_core::name::{ClusterName, Ident, NodeName, SiteName};
use clusterctl_core::secret::{Keyring, Secret};
use clusterctl_core::table::NodeRecord;
use clusterctl_core::wire::{Frame, Handshake, RefusalCode, PROTOCOL_VERSION};
use clusterctl_node::pki::{generate_ca, issue_node_cert, CertPair, Validity};
use clusterctl_node::tls::TlsMaterial;
use clusterctl_testkit::handshake::{
    answer_hellos, dial_without_client_certificate, hello_with, send_hello, send_hello_bytes,
    Outcome,
};
use clusterctl_testkit::{Lab, LabOptions, DEFAULT_WAIT};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, SystemTime};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_clusterctl"))
}

fn ident(name: &str, site: &str, role: Role) -> Ident {
    Ident {
        name: NodeName::new(name).expect("name"),
        site: SiteName::new(site).expect("site"),
        role,
    }
}

struct Fixture {
    lab: Lab,
    ca: CertPair,
    ca_pem: String,
    keyring: Keyring,
    hash: String,
    target: SocketAddr,
    bind: SocketAddr,
}

impl Fixture {
    fn new() -> Fixture {
        let lab = Lab::up(bin(), LabOptions::default());
        lab.wait_converged();
        let read = |f: &str| std::fs::read_to_string(lab.dir().join(f)).expect("lab file");
        let ca = CertPair {
            cert_pem: read("ca.pem"),
            key_pem: read("ca.key"),
        };
        let secret = Secret::from_text(&read("secret.key")).expect("lab secret");
        let (_, t) = lab.topology("gw-us-1");
        let target = lab.node("gw-us-1").addr.parse().expect("addr");
        let bind = format!("{}.1.77:0", lab.prefix()).parse().expect("bind");
        Fixture {
            ca_pem: ca.cert_pem.clone(),
            ca,
            keyring: Keyring::new(secret),
            hash: t.contract_hash,
            target,
            bind,
            lab,
        }
    }

    /// TLS material for `who`, issued by `ca` with `validity`, trusting the lab CA.
    fn material(&self, ca: &CertPair, who: &Ident, validity: Validity) -> TlsMaterial {
        let cluster = ClusterName::new("lab").expect("cluster");
        let leaf = issue_node_cert(ca, &cluster, who, validity).expect("leaf");
        let bundle = format!("{}{}", self.ca_pem, ca.cert_pem);
        TlsMaterial::from_pem(&bundle, &leaf.cert_pem, &leaf.key_pem).expect("material")
    }

    /// Dials gw-us-1 with `material`, claims `claimed`, proves `keyring`, then tries to push a
    /// record of a made-up node `intruder` as if linked.
    fn attempt(
        &self,
        material: TlsMaterial,
        claimed: Ident,
        keyring: Keyring,
        intruder: &str,
    ) -> Outcome {
        // A lab node's own address, as a restart in place would advertise it.
        let addr = self
            .lab
            .nodes()
            .iter()
            .find(|n| n.name == claimed.name.as_str())
            .map_or_else(|| "127.0.0.1:9".to_string(), |n| n.addr.clone());
        self.attempt_from(material, claimed, keyring, intruder, addr)
    }

    /// [`Fixture::attempt`] advertising `addr` in the hello.
    fn attempt_from(
        &self,
        material: TlsMaterial,
        claimed: Ident,
        keyring: Keyring,
        intruder: &str,
        addr: String,
    ) -> Outcome {
        let mut fake = NodeRecord::new(
            &ident(intruder, "us-east", Role::Member),
            99,
            "127.0.0.1:9".into(),
            self.hash.clone(),
            "x".into(),
            true,
        );
        fake.clock = 99;
        let hello = hello_with(keyring, claimed, self.hash.clone(), addr);
        send_hello(
            self.bind,
            self.target,
            "gw-us-1",
            material,
            hello,
            Some(Frame::Records(vec![std::sync::Arc::new(fake)])),
        )
    }

    fn assert_refused(&self, outcome: &Outcome, code: RefusalCode, needle: &str) {
        match outcome {
            Outcome::Answer(Handshake::Refuse(r)) => {
                assert_eq!(r.code, code, "{r:?}");
                assert!(
                    r.reason.contains(needle),
                    "reason {:?} lacks {needle:?}",
                    r.reason
                );
            }
            other => panic!("expected a {code:?} refusal, got {other:?}"),
        }
    }

    fn assert_tls_refused(&self, outcome: &Outcome, needle: &str) {
        match outcome {
            Outcome::Failed(e) => assert!(e.to_lowercase().contains(needle), "{e}"),
            other => panic!("expected the TLS handshake to fail, got {other:?}"),
        }
    }

    /// No node ever learned of the intruders: their frames were never processed.
    fn assert_no_intruder(&self, names: &[&str]) {
        std::thread::sleep(Duration::from_millis(500));
        for observer in ["gw-us-1", "edge-us-1", "gw-eu-1"] {
            let m: Members = self.lab.members(observer);
            for n in names {
                assert!(
                    !m.members.iter().any(|x| x.name == *n),
                    "{observer} learned of {n}: a refused peer's frame was processed"
                );
            }
        }
    }
}

#[test]
fn every_unauthorized_handshake_is_refused_with_a_precise_reason_and_no_frame_processed() {
    let f = Fixture::new();
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let valid = Validity::days_from_now(10);
    let me = ident("edge-us-1", "us-east", Role::Member);

    // The real credentials advertising another address while edge-us-1 answers: a second
    // instance of its identity.
    let o = f.attempt_from(
        f.material(&f.ca, &me, valid),
        me.clone(),
        f.keyring.clone(),
        "intruder-0b",
        "127.0.0.1:9".into(),
    );
    f.assert_refused(&o, RefusalCode::Identity, "second instance of edge-us-1");

    // The positive: the real credentials are accepted, and that link really is TLS (the
    // handshake above the TLS session only works when the server proved the lab certificate).
    let ok = f.attempt(
        f.material(&f.ca, &me, valid),
        me.clone(),
        f.keyring.clone(),
        "intruder-0",
    );
    assert!(matches!(ok, Outcome::Answer(Handshake::Ack(_))), "{ok:?}");

    // Another CA (same cluster name): refused by TLS.
    let rogue = generate_ca(&ClusterName::new("lab").expect("c"), valid).expect("rogue CA");
    let o = f.attempt(
        f.material(&rogue, &me, valid),
        me.clone(),
        f.keyring.clone(),
        "intruder-1",
    );
    f.assert_tls_refused(&o, "certificate");

    // Expired and not yet valid certificates from the real CA: refused by TLS.
    let expired = Validity {
        not_before: now - 30 * day,
        not_after: now - day,
    };
    let o = f.attempt(
        f.material(&f.ca, &me, expired),
        me.clone(),
        f.keyring.clone(),
        "intruder-2",
    );
    f.assert_tls_refused(&o, "expired");
    let future = Validity {
        not_before: now + day,
        not_after: now + 30 * day,
    };
    let o = f.attempt(
        f.material(&f.ca, &me, future),
        me.clone(),
        f.keyring.clone(),
        "intruder-3",
    );
    // (The dialer only sees the TLS alert; the refusing node's event says which.)
    f.assert_tls_refused(&o, "certificate");

    // Node A's certificate used to claim name B.
    let o = f.attempt(
        f.material(&f.ca, &me, valid),
        ident("edge-us-2", "us-east", Role::Member),
        f.keyring.clone(),
        "intruder-4",
    );
    f.assert_refused(&o, RefusalCode::Identity, "certificate names edge-us-1");

    // A member's certificate claiming the gateway role.
    let o = f.attempt(
        f.material(&f.ca, &me, valid),
        ident("edge-us-1", "us-east", Role::Gateway),
        f.keyring.clone(),
        "intruder-5",
    );
    f.assert_refused(&o, RefusalCode::Identity, "(member)");

    // A certificate that does say gateway, for a node the contract does not list as one.
    let fake_gw = ident("edge-us-1", "us-east", Role::Gateway);
    let o = f.attempt(
        f.material(&f.ca, &fake_gw, valid),
        fake_gw.clone(),
        f.keyring.clone(),
        "intruder-6",
    );
    f.assert_refused(&o, RefusalCode::Contract, "not a contract gateway");

    // The wrong cluster secret.
    let wrong = Keyring::new(Secret::from_bytes(&[7u8; 32]).expect("secret"));
    let o = f.attempt(
        f.material(&f.ca, &me, valid),
        me.clone(),
        wrong,
        "intruder-7",
    );
    f.assert_refused(&o, RefusalCode::Secret, "secret mismatch");

    // A node absent from the contract (the lab's contract lists every node of each site).
    let stranger = ident("edge-us-9", "us-east", Role::Member);
    let o = f.attempt(
        f.material(&f.ca, &stranger, valid),
        stranger.clone(),
        f.keyring.clone(),
        "intruder-8",
    );
    f.assert_refused(&o, RefusalCode::Contract, "not listed");

    f.assert_no_intruder(&[
        "intruder-0b",
        "intruder-1",
        "intruder-2",
        "intruder-3",
        "intruder-4",
        "intruder-5",
        "intruder-6",
        "intruder-7",
        "intruder-8",
        "edge-us-9",
    ]);
    // Each refusal is an event on the refusing node, with its reason.
    let events = f.lab.events("gw-us-1");
    for needle in [
        "second instance of edge-us-1",
        "secret mismatch",
        "not listed",
        "certificate names edge-us-1",
        "certificate expired",
        "not yet valid",
    ] {
        assert!(
            events
                .iter()
                .any(|e| e.kind == EventKind::LinkRefused && e.reason.contains(needle)),
            "no link-refused event mentioning {needle:?}"
        );
    }
}

#[test]
fn plaintext_and_garbage_on_the_cluster_port_are_dropped() {
    let f = Fixture::new();
    let sock = UdpSocket::bind(f.bind).expect("bind");
    let mut junk: Vec<Vec<u8>> = vec![
        b"HELLO gw-us-1 cookie=secret\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0u8; 1200],
        vec![0xff; 1500],
    ];
    // A pseudo-random spray, deterministic.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for len in [1usize, 7, 64, 600, 1199, 1200, 1350] {
        let mut v = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(x as u8);
        }
        junk.push(v);
    }
    for _ in 0..20 {
        for j in &junk {
            let _ = sock.send_to(j, f.target);
        }
    }
    // A plaintext TCP client finds nothing to talk to on the cluster port.
    assert!(std::net::TcpStream::connect_timeout(&f.target, Duration::from_secs(2)).is_err());
    // The node is unharmed and the cluster still healthy.
    f.lab.wait_for(
        "the cluster healthy after the garbage",
        DEFAULT_WAIT,
        || {
            let (code, t) = f.lab.topology("gw-us-1");
            if code == Some(0) {
                Ok(())
            } else {
                Err(format!("{t:?}"))
            }
        },
    );
}

/// `handshakes_refused_in` of `node`, from `/metrics`.
fn refused_in(lab: &Lab, node: &str) -> Result<u64, String> {
    let text = lab.metrics_text(node)?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("clusterctl_handshakes_refused_in ")?
                .trim()
                .parse()
                .ok()
        })
        .ok_or_else(|| format!("no clusterctl_handshakes_refused_in in\n{text}"))
}

#[test]
fn a_dial_without_a_client_certificate_is_counted_and_reported_with_its_address() {
    let f = Fixture::new();
    let before = refused_in(&f.lab, "gw-us-1").expect("metrics");
    match dial_without_client_certificate(f.bind, f.target) {
        Outcome::Failed(why) => assert!(why.contains("certificate"), "{why}"),
        Outcome::Answer(a) => panic!("a peer without a certificate got an answer: {a:?}"),
    }
    let from = f.bind.ip().to_string();
    f.lab.wait_for(
        "gw-us-1 to count and report the refused dial with its address",
        DEFAULT_WAIT,
        || {
            let after = refused_in(&f.lab, "gw-us-1")?;
            let events = f.lab.events("gw-us-1");
            let event = events.iter().find(|e| {
                e.kind == EventKind::LinkRefused
                    && e.reason.contains(&from)
                    && e.reason.contains("no client certificate")
            });
            if after > before && event.is_some() {
                Ok(())
            } else {
                Err(format!(
                    "refused_in {before} -> {after}; events: {events:?}"
                ))
            }
        },
    );
}

/// A hello of another protocol version is refused with the `version` code, read from its first
/// byte before the rest (it would not decode), under the dialer's version byte so that the
/// dialer reads why; the acceptor counts it and reports `link-refused`, and the dialer's frame
/// is never processed.
#[test]
fn a_hello_of_another_protocol_version_is_refused_with_the_version_reason() {
    let f = Fixture::new();
    let before = refused_in(&f.lab, "gw-us-1").expect("metrics");
    // Valid credentials of a name the contract does not list: the version is checked first.
    let who = ident("edge-us-9", "us-east", Role::Member);
    let theirs = PROTOCOL_VERSION + 1;
    let hello = hello_with(
        f.keyring.clone(),
        who.clone(),
        f.hash.clone(),
        "127.0.0.1:9".into(),
    );
    let mut fake = NodeRecord::new(
        &ident("intruder-v", "us-east", Role::Member),
        99,
        "127.0.0.1:9".into(),
        f.hash.clone(),
        "x".into(),
        true,
    );
    fake.clock = 99;
    let o = send_hello_bytes(
        f.bind,
        f.target,
        "gw-us-1",
        f.material(&f.ca, &who, Validity::days_from_now(10)),
        move |binding: &[u8]| {
            let mut bytes = Handshake::Hello(hello(binding)).encode();
            bytes[0] = theirs;
            bytes
        },
        Some(Frame::Records(vec![std::sync::Arc::new(fake)])),
    );
    f.assert_refused(
        &o,
        RefusalCode::Version,
        &format!("peer speaks protocol version {theirs}, this node speaks protocol version {PROTOCOL_VERSION}"),
    );
    f.assert_no_intruder(&["intruder-v", "edge-us-9"]);
    f.lab.wait_for(
        "gw-us-1 to count the version refusal and report it",
        DEFAULT_WAIT,
        || {
            let after = refused_in(&f.lab, "gw-us-1")?;
            let events = f.lab.events("gw-us-1");
            let event = events.iter().find(|e| {
                e.kind == EventKind::LinkRefused
                    && e.peer.as_deref() == Some("edge-us-9")
                    && e.reason.contains(&format!("protocol version {theirs}"))
            });
            if after > before && event.is_some() {
                Ok(())
            } else {
                Err(format!(
                    "refused_in {before} -> {after}; events: {events:?}"
                ))
            }
        },
    );
}

/// The dialing side: a peer whose answer to our hello is of another protocol version (and not
/// a refusal we can read) is refused by the dialer with the `version` code, counted and
/// reported as `link-refused` with the dialed node's name.
#[test]
fn an_answer_of_another_protocol_version_is_refused_by_the_dialer_with_the_version_reason() {
    let mut f = Fixture::new();
    let who = ident("edge-us-2", "us-east", Role::Member);
    let addr: SocketAddr = f.lab.node("edge-us-2").addr.parse().expect("addr");
    let material = f.material(&f.ca, &who, Validity::days_from_now(10));
    let observers = ["gw-us-1", "edge-us-1"];
    let before: Vec<u64> = observers
        .iter()
        .map(|o| refused_in(&f.lab, o).expect("metrics"))
        .collect();
    // edge-us-2 is replaced by a peer of the next protocol version at its address.
    f.lab.kill9("edge-us-2");
    let theirs = PROTOCOL_VERSION + 1;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = std::thread::spawn({
        let stop = stop.clone();
        move || answer_hellos(addr, material, move |_hello| vec![theirs, 1, 0, 0], stop)
    });
    let needle = format!(
        "peer speaks protocol version {theirs}, this node speaks protocol version {PROTOCOL_VERSION}"
    );
    let seen = f.lab.wait_for(
        "a node of site us-east to refuse the answer of another version",
        DEFAULT_WAIT,
        || {
            for (o, before) in observers.iter().zip(&before) {
                let after = refused_in(&f.lab, o)?;
                let events = f.lab.events(o);
                let refused = events.iter().any(|e| {
                    e.kind == EventKind::LinkRefused
                        && e.peer.as_deref() == Some("edge-us-2")
                        && e.reason.contains(&needle)
                });
                if refused && after > *before {
                    return Ok(o.to_string());
                }
            }
            Err(format!(
                "no version refusal yet; events of {}: {:?}",
                observers[0],
                f.lab.events(observers[0])
            ))
        },
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let answered = server.join().expect("raw acceptor").expect("raw acceptor");
    assert!(answered >= 1, "{seen} refused without a hello answered");
}
