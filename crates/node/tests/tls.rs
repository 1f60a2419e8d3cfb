//! Links between nodes over QUIC and mutual TLS: who gets in, who is refused, and what is said
//! about it. Every endpoint binds 127.0.0.1 port 0.

// Helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use clusterctl_api::Role;
use clusterctl_core::name::{ClusterName, Ident, NodeName, SiteName};
use clusterctl_node::pki::{self, CertPair, Validity};
use clusterctl_node::tls::{self, RejectSink, Security, TlsError, TlsMaterial};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::fs::Permissions;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

const TIMEOUT: Duration = Duration::from_secs(10);
const HELLO: &[u8] = b"hello";

/// Records every refusal the TLS layer reports.
#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<(Option<String>, String)>>);

impl RejectSink for Recorder {
    fn rejected(
        &self,
        _side: clusterctl_node::tls::RejectSide,
        claimed_name: Option<String>,
        reason: String,
    ) {
        self.0.lock().unwrap().push((claimed_name, reason));
    }
}

impl Recorder {
    fn events(&self) -> Vec<(Option<String>, String)> {
        self.0.lock().unwrap().clone()
    }
}

fn lab() -> ClusterName {
    ClusterName::new("lab").unwrap()
}

fn ident(name: &str, site: &str, role: Role) -> Ident {
    Ident {
        name: NodeName::new(name).unwrap(),
        site: SiteName::new(site).unwrap(),
        role,
    }
}

fn past() -> Validity {
    let now = SystemTime::now();
    Validity {
        not_before: now - Duration::from_secs(10 * 86_400),
        not_after: now - Duration::from_secs(86_400),
    }
}

fn future() -> Validity {
    let now = SystemTime::now();
    Validity {
        not_before: now + Duration::from_secs(86_400),
        not_after: now + Duration::from_secs(10 * 86_400),
    }
}

fn new_ca(cluster: &ClusterName) -> CertPair {
    pki::generate_ca(cluster, Validity::days_from_now(30)).unwrap()
}

fn issue(ca: &CertPair, cluster: &ClusterName, ident: &Ident, validity: Validity) -> CertPair {
    pki::issue_node_cert(ca, cluster, ident, validity).unwrap()
}

/// TLS material for `ident`, trusting `trusted` (one or more CA PEMs).
fn material_trusting(trusted: &[&CertPair], node: &CertPair) -> Arc<TlsMaterial> {
    let ca_pem: String = trusted.iter().map(|ca| ca.cert_pem.as_str()).collect();
    Arc::new(TlsMaterial::from_pem(&ca_pem, &node.cert_pem, &node.key_pem).unwrap())
}

fn material(ca: &CertPair, cluster: &ClusterName, ident: &Ident, v: Validity) -> Arc<TlsMaterial> {
    material_trusting(&[ca], &issue(ca, cluster, ident, v))
}

/// One node: a QUIC endpoint that accepts and dials, and what its TLS layer refused.
struct Node {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    refused: Arc<Recorder>,
    security: Security,
}

impl Node {
    fn new(security: Security, cluster: &ClusterName) -> Node {
        let refused = Arc::new(Recorder::default());
        let (server, client) = tls::endpoint_configs(&security, cluster, refused.clone()).unwrap();
        let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
        Node {
            endpoint,
            client,
            refused,
            security,
        }
    }

    fn mutual(material: Arc<TlsMaterial>) -> Node {
        let cluster = material.identity.cluster.clone();
        Node::new(Security::Mutual(material), &cluster)
    }

    fn insecure(name: &str) -> Node {
        Node::new(
            Security::Insecure {
                node: NodeName::new(name).unwrap(),
            },
            &lab(),
        )
    }

    fn addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap()
    }
}

/// Accepts one link; once the handshake is done, sends the hello the dialer waits for.
fn accept_one(
    endpoint: &quinn::Endpoint,
) -> tokio::task::JoinHandle<Result<quinn::Connection, String>> {
    let endpoint = endpoint.clone();
    tokio::spawn(async move {
        let incoming = endpoint.accept().await.expect("endpoint is open");
        let conn = incoming
            .await
            .map_err(|e| tls::describe_connection_error(&e))?;
        let mut hello = conn
            .open_uni()
            .await
            .map_err(|e| tls::describe_connection_error(&e))?;
        hello.write_all(HELLO).await.map_err(|e| e.to_string())?;
        hello.finish().map_err(|e| e.to_string())?;
        Ok(conn)
    })
}

/// Dials `addr` expecting `expected`, and waits for the acceptor's hello: in TLS 1.3 the
/// dialer's handshake completes before the acceptor has checked the dialer's certificate.
async fn dial_with(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    addr: SocketAddr,
    expected: &str,
) -> Result<quinn::Connection, String> {
    let connecting = endpoint
        .connect_with(client.clone(), addr, expected)
        .map_err(|e| tls::describe_connect_error(&e))?;
    let conn = connecting
        .await
        .map_err(|e| tls::describe_connection_error(&e))?;
    let mut hello = conn
        .accept_uni()
        .await
        .map_err(|e| tls::describe_connection_error(&e))?;
    let got = hello.read_to_end(64).await.map_err(|e| match e {
        quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(e)) => {
            tls::describe_connection_error(&e)
        }
        other => other.to_string(),
    })?;
    assert_eq!(got, HELLO);
    Ok(conn)
}

struct Link {
    dialer: Result<quinn::Connection, String>,
    acceptor: Result<quinn::Connection, String>,
}

/// `from` dials `to`, expecting the node name `expected`.
async fn try_link(from: &Node, to: &Node, expected: &str) -> Link {
    let accepting = accept_one(&to.endpoint);
    let dialer = tokio::time::timeout(
        TIMEOUT,
        dial_with(&from.endpoint, &from.client, to.addr(), expected),
    )
    .await
    .expect("dial finished in time");
    let acceptor = tokio::time::timeout(TIMEOUT, accepting)
        .await
        .expect("accept finished in time")
        .expect("accept task did not panic");
    Link { dialer, acceptor }
}

fn err(result: &Result<quinn::Connection, String>) -> &str {
    match result {
        Ok(_) => panic!("link was established but must be refused"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn mutual_tls_links_nodes_of_one_ca() {
    let cluster = lab();
    let ca = new_ca(&cluster);
    let gw = ident("gw-us-1", "us-east", Role::Gateway);
    let edge = ident("edge-us-2", "us-east", Role::Member);
    let server = Node::mutual(material(&ca, &cluster, &gw, Validity::days_from_now(5)));
    let client = Node::mutual(material(&ca, &cluster, &edge, Validity::days_from_now(5)));

    let link = try_link(&client, &server, "gw-us-1").await;
    let dialed = link.dialer.unwrap();
    let accepted = link.acceptor.unwrap();

    let seen_by_dialer = tls::peer_identity(&dialed).expect("server identity");
    assert_eq!(seen_by_dialer.ident, gw);
    assert_eq!(seen_by_dialer.cluster, cluster);
    let seen_by_acceptor = tls::peer_identity(&accepted).expect("client identity");
    assert_eq!(seen_by_acceptor.ident, edge);
    assert_eq!(seen_by_acceptor.cluster, cluster);

    assert_eq!(tls::protocol_label(&dialed, &client.security), "tls1.3");
    assert_eq!(tls::protocol_label(&accepted, &server.security), "tls1.3");
    let alpn = dialed
        .handshake_data()
        .unwrap()
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .unwrap()
        .protocol;
    assert_eq!(alpn.as_deref(), Some(tls::ALPN));

    assert!(client.refused.events().is_empty());
    assert!(server.refused.events().is_empty());
}

/// CAs that are not the cluster's: one named for another cluster, and one made for the same
/// cluster (its subject names its own key, so it is never mistaken for the real CA).
fn rogue_cas() -> [CertPair; 2] {
    [new_ca(&ClusterName::new("rogue").unwrap()), new_ca(&lab())]
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let cluster = lab();
    let ca = new_ca(&cluster);
    let gw = ident("gw-us-1", "us-east", Role::Gateway);
    let server = Node::mutual(material(&ca, &cluster, &gw, Validity::days_from_now(5)));
    let expected_alerts = ["(TLS alert: unknown CA)", "(TLS alert: unknown CA)"];

    for (rogue_ca, alert) in rogue_cas().iter().zip(expected_alerts) {
        // The rogue node trusts the cluster CA, so it gets as far as presenting its certificate.
        let rogue_cert = issue(
            rogue_ca,
            &cluster,
            &ident("edge-x", "us-east", Role::Member),
            Validity::days_from_now(5),
        );
        let rogue = Node::mutual(material_trusting(&[rogue_ca, &ca], &rogue_cert));

        let link = try_link(&rogue, &server, "gw-us-1").await;

        let dial_err = err(&link.dialer);
        assert!(
            dial_err.starts_with("peer rejected our certificate"),
            "{dial_err}"
        );
        assert!(dial_err.ends_with(alert), "{dial_err}");
        assert!(link.acceptor.is_err());
    }
    let refused = server.refused.events();
    assert_eq!(refused.len(), 2, "{refused:?}");
    for (claimed, reason) in refused {
        assert_eq!(claimed.as_deref(), Some("edge-x"));
        assert!(reason.contains("unknown CA"), "{reason}");
    }
}

#[tokio::test]
async fn server_with_certificate_from_another_ca_is_refused_by_dialer() {
    let cluster = lab();
    let ca = new_ca(&cluster);
    let edge = ident("edge-us-2", "us-east", Role::Member);
    let client = Node::mutual(material(&ca, &cluster, &edge, Validity::days_from_now(5)));
    let gw = ident("gw-us-1", "us-east", Role::Gateway);

    for rogue_ca in rogue_cas() {
        let rogue_cert = issue(&rogue_ca, &cluster, &gw, Validity::days_from_now(5));
        let rogue_server = Node::mutual(material_trusting(&[&rogue_ca], &rogue_cert));

        let link = try_link(&client, &rogue_server, "gw-us-1").await;

        let dial_err = err(&link.dialer);
        assert!(
            dial_err.contains("not signed by this cluster's CA"),
            "{dial_err}"
        );
        assert!(link.acceptor.is_err());
    }
    let refused = client.refused.events();
    assert_eq!(refused.len(), 2, "{refused:?}");
    for (claimed, reason) in refused {
        assert_eq!(claimed.as_deref(), Some("gw-us-1"));
        assert!(reason.contains("unknown CA"), "{reason}");
    }
}

/// Both directions: a dialer with a certificate outside its validity, and an acceptor with one.
async fn assert_refused_for_validity(validity: Validity, reason: &str) {
    let cluster = lab();
    let ca = new_ca(&cluster);
    let gw = ident("gw-us-1", "us-east", Role::Gateway);
    let edge = ident("edge-us-2", "us-east", Role::Member);

    let server = Node::mutual(material(&ca, &cluster, &gw, Validity::days_from_now(5)));
    let client = Node::mutual(material(&ca, &cluster, &edge, validity));
    let link = try_link(&client, &server, "gw-us-1").await;
    let dial_err = err(&link.dialer);
    assert!(
        dial_err.contains("peer rejected our certificate"),
        "{dial_err}"
    );
    assert!(dial_err.contains("certificate expired"), "{dial_err}"); // the TLS alert
    assert!(link.acceptor.is_err());
    assert_eq!(
        server.refused.events(),
        vec![(Some("edge-us-2".to_string()), reason.to_string())]
    );

    let server = Node::mutual(material(&ca, &cluster, &gw, validity));
    let client = Node::mutual(material(&ca, &cluster, &edge, Validity::days_from_now(5)));
    let link = try_link(&client, &server, "gw-us-1").await;
    assert_eq!(err(&link.dialer), format!("peer {reason}"));
    assert!(link.acceptor.is_err());
    assert_eq!(
        client.refused.events(),
        vec![(Some("gw-us-1".to_string()), reason.to_string())]
    );
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    assert_refused_for_validity(past(), "certificate expired").await;
}

#[tokio::test]
async fn not_yet_valid_certificate_is_refused() {
    assert_refused_for_validity(future(), "certificate not yet valid").await;
}

#[tokio::test]
async fn name_mismatch_is_refused() {
    let cluster = lab();
    let ca = new_ca(&cluster);
    let impostor = ident("edge-us-2", "us-east", Role::Member);
    let server = Node::mutual(material(
        &ca,
        &cluster,
        &impostor,
        Validity::days_from_now(5),
    ));
    let edge = ident("edge-us-3", "us-east", Role::Member);
    let client = Node::mutual(material(&ca, &cluster, &edge, Validity::days_from_now(5)));

    let link = try_link(&client, &server, "gw-us-1").await;

    let expected = "peer presented a certificate for edge-us-2, expected gw-us-1";
    assert_eq!(err(&link.dialer), expected);
    assert!(link.acceptor.is_err());
    assert_eq!(
        client.refused.events(),
        vec![(Some("edge-us-2".to_string()), expected.to_string())]
    );
}

#[tokio::test]
async fn certificate_of_another_cluster_is_refused_by_dialer() {
    let cluster = lab();
    let other = ClusterName::new("other").unwrap();
    let ca = new_ca(&cluster);
    // Signed by our CA, but naming another cluster.
    let gw = ident("gw-us-1", "us-east", Role::Gateway);
    let server = Node::mutual(material(&ca, &other, &gw, Validity::days_from_now(5)));
    let edge = ident("edge-us-2", "us-east", Role::Member);
    let client = Node::mutual(material(&ca, &cluster, &edge, Validity::days_from_now(5)));

    let link = try_link(&client, &server, "gw-us-1").await;

    let expected = "peer presented a certificate of cluster other, this node is in cluster lab";
    assert_eq!(err(&link.dialer), expected);
    assert_eq!(
        client.refused.events(),
        vec![(Some("gw-us-1".to_string()), expected.to_string())]
    );
}

/// A plain rustls dialer that checks the server by its DNS name and presents `node`: unlike
/// a clusterctl node, it does not check clusters, and it asks for 0-RTT if `early_data`.
fn plain_dialer(ca: &CertPair, node: &CertPair, early_data: bool) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_slice(node.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(node.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![tls::ALPN.to_vec()];
    config.enable_early_data = early_data;
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(config).unwrap(),
    ))
}

#[tokio::test]
async fn client_certificate_of_another_cluster_is_refused() {
    let cluster = lab();
    let other = ClusterName::new("other").unwrap();
    let ca = new_ca(&cluster);
    let gw = ident("gw-us-1", "us-east", Role::Gateway);
    let server = Node::mutual(material(&ca, &cluster, &gw, Validity::days_from_now(5)));
    let foreign = issue(
        &ca,
        &other,
        &ident("edge-x", "eu-west", Role::Member),
        Validity::days_from_now(5),
    );
    let dialer = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let config = plain_dialer(&ca, &foreign, false);

    let accepting = accept_one(&server.endpoint);
    let dialed = tokio::time::timeout(
        TIMEOUT,
        dial_with(&dialer, &config, server.addr(), "gw-us-1.us-east.lab"),
    )
    .await
    .unwrap();
    let accepted = tokio::time::timeout(TIMEOUT, accepting)
        .await
        .unwrap()
        .unwrap();

    let dial_err = err(&dialed);
    assert!(
        dial_err.contains("peer rejected our certificate"),
        "{dial_err}"
    );
    assert!(accepted.is_err());
    assert_eq!(
        server.refused.events(),
        vec![(
            Some("edge-x".to_string()),
            "certificate is for cluster other, this node is in cluster lab".to_string()
        )]
    );
}

/// A certificate signed by `ca` for DNS name `dns`, with `uri` as its identity URI.
fn issue_with_uri(ca: &CertPair, dns: &str, uri: &str) -> CertPair {
    let ca_key = rcgen::KeyPair::from_pem(&ca.key_pem).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![dns.to_string()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(uri.to_string().try_into().unwrap()));
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let validity = Validity::days_from_now(5);
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();
    let cert = params.signed_by(&key, &issuer).unwrap();
    CertPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

#[tokio::test]
async fn malformed_identity_is_refused_and_reported_in_one_clean_line() {
    let cluster = lab();
    let ca = new_ca(&cluster);
    let uri = format!(
        "urn:clusterctl:node:lab:us-east:gw-us-1:\u{7}\r\n{}",
        "x".repeat(5_000)
    );
    let odd = issue_with_uri(&ca, "gw-us-1.us-east.lab", &uri);
    let check = |events: Vec<(Option<String>, String)>| {
        assert_eq!(events.len(), 1, "{events:?}");
        let (claimed, reason) = &events[0];
        assert_eq!(claimed, &None);
        assert!(
            reason.contains(
                "certificate names no valid clusterctl node: certificate identity is malformed"
            ),
            "{reason}"
        );
        assert!(!reason.chars().any(char::is_control), "{reason:?}");
        assert!(reason.chars().count() <= 201, "{}", reason.len());
    };

    // Presented by an acceptor.
    let odd_server =
        quinn::Endpoint::server(permissive_server(&odd), "127.0.0.1:0".parse().unwrap()).unwrap();
    let edge = ident("edge-us-2", "us-east", Role::Member);
    let client = Node::mutual(material(&ca, &cluster, &edge, Validity::days_from_now(5)));
    let accepting = accept_one(&odd_server);
    let dialed = tokio::time::timeout(
        TIMEOUT,
        dial_with(
            &client.endpoint,
            &client.client,
            odd_server.local_addr().unwrap(),
            "gw-us-1",
        ),
    )
    .await
    .unwrap();
    let dial_err = err(&dialed);
    assert!(!dial_err.chars().any(char::is_control), "{dial_err:?}");
    assert!(tokio::time::timeout(TIMEOUT, accepting)
        .await
        .unwrap()
        .unwrap()
        .is_err());
    check(client.refused.events());

    // Presented by a dialer.
    let gw = ident("gw-us-1", "us-east", Role::Gateway);
    let server = Node::mutual(material(&ca, &cluster, &gw, Validity::days_from_now(5)));
    let dialer = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let accepting = accept_one(&server.endpoint);
    let dialed = tokio::time::timeout(
        TIMEOUT,
        dial_with(
            &dialer,
            &plain_dialer(&ca, &odd, false),
            server.addr(),
            "gw-us-1.us-east.lab",
        ),
    )
    .await
    .unwrap();
    assert!(err(&dialed).contains("peer rejected our certificate"));
    assert!(tokio::time::timeout(TIMEOUT, accepting)
        .await
        .unwrap()
        .unwrap()
        .is_err());
    check(server.refused.events());
}

#[tokio::test]
async fn insecure_and_secure_nodes_cannot_link() {
    let cluster = lab();
    let ca = new_ca(&cluster);
    let gw = ident("gw-us-1", "us-east", Role::Gateway);
    let secure = Node::mutual(material(&ca, &cluster, &gw, Validity::days_from_now(5)));
    let insecure = Node::insecure("lab-1");

    // Insecure dials secure: it has no certificate to present.
    let link_in = try_link(&insecure, &secure, "gw-us-1").await;
    let dial_err = err(&link_in.dialer);
    assert!(
        dial_err.contains("peer requires a certificate and we presented none"),
        "{dial_err}"
    );
    let accept_err = err(&link_in.acceptor);
    assert!(
        accept_err.contains("peer presented no certificate"),
        "{accept_err}"
    );

    // Secure dials insecure: the self-signed certificate names no node.
    let link_out = try_link(&secure, &insecure, "lab-1").await;
    assert_eq!(
        err(&link_out.dialer),
        "peer certificate names no clusterctl node"
    );
    assert!(link_out.acceptor.is_err());
    assert_eq!(
        secure.refused.events(),
        vec![(
            None,
            "peer certificate names no clusterctl node".to_string()
        )]
    );
}

#[tokio::test]
async fn insecure_nodes_link_without_identity() {
    let a = Node::insecure("lab-1");
    let b = Node::insecure("lab-2");

    let link = try_link(&a, &b, "lab-2").await;
    let dialed = link.dialer.unwrap();
    let accepted = link.acceptor.unwrap();

    assert_eq!(tls::peer_identity(&dialed), None);
    assert_eq!(tls::peer_identity(&accepted), None);
    assert_eq!(tls::protocol_label(&dialed, &a.security), "insecure");
    assert_eq!(tls::protocol_label(&accepted, &b.security), "insecure");
}

/// A plain server that hands out session tickets for 0-RTT and does not ask for a client
/// certificate.
fn permissive_server(node: &CertPair) -> quinn::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = vec![CertificateDer::from_pem_slice(node.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(node.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![tls::ALPN.to_vec()];
    config.max_early_data_size = u32::MAX;
    quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(config).unwrap(),
    ))
}

/// Connects twice with the same client config (the first connection leaves any session
/// ticket behind) and tells whether the second could send 0-RTT data.
async fn second_connect_offers_0rtt(
    endpoint: &quinn::Endpoint,
    server: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    name: &str,
) -> bool {
    let addr = server.local_addr().unwrap();
    let accepting = accept_one(server);
    let first = tokio::time::timeout(TIMEOUT, dial_with(endpoint, client, addr, name))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(TIMEOUT, accepting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    first.close(0u32.into(), b"done");

    let accepting = accept_one(server);
    let connecting = endpoint.connect_with(client.clone(), addr, name).unwrap();
    let (offered, conn) = match connecting.into_0rtt() {
        Ok((conn, _accepted)) => (true, conn),
        Err(connecting) => (
            false,
            tokio::time::timeout(TIMEOUT, connecting)
                .await
                .unwrap()
                .unwrap(),
        ),
    };
    tokio::time::timeout(TIMEOUT, accepting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    conn.close(0u32.into(), b"done");
    offered
}

#[tokio::test]
async fn zero_rtt_is_never_accepted() {
    let cluster = lab();
    let ca = new_ca(&cluster);
    let gw = ident("gw-us-1", "us-east", Role::Gateway);
    let gw_cert = issue(&ca, &cluster, &gw, Validity::days_from_now(5));
    let edge_cert = issue(
        &ca,
        &cluster,
        &ident("edge-us-2", "us-east", Role::Member),
        Validity::days_from_now(5),
    );
    let eager = plain_dialer(&ca, &edge_cert, true);
    let dialer = Node::mutual(material_trusting(&[&ca], &edge_cert));

    // Control: a server that allows 0-RTT gets it from an eager client, so the check can fail.
    let permissive =
        quinn::Endpoint::server(permissive_server(&gw_cert), "127.0.0.1:0".parse().unwrap())
            .unwrap();
    assert!(
        second_connect_offers_0rtt(&dialer.endpoint, &permissive, &eager, "gw-us-1.us-east.lab")
            .await,
        "control: 0-RTT should be possible against a permissive server"
    );

    // Our acceptor never hands out what 0-RTT needs, even to an eager client.
    let server = Node::mutual(material_trusting(&[&ca], &gw_cert));
    assert!(
        !second_connect_offers_0rtt(
            &dialer.endpoint,
            &server.endpoint,
            &eager,
            "gw-us-1.us-east.lab"
        )
        .await
    );

    // Our dialer never attempts 0-RTT, even against a permissive server.
    assert!(
        !second_connect_offers_0rtt(&dialer.endpoint, &permissive, &dialer.client, "gw-us-1").await
    );
    assert!(dialer.refused.events().is_empty());
    assert!(server.refused.events().is_empty());
}

#[test]
fn key_that_does_not_match_certificate_is_refused_at_load() {
    let cluster = lab();
    let ca = new_ca(&cluster);
    let a = issue(
        &ca,
        &cluster,
        &ident("gw-us-1", "us-east", Role::Gateway),
        Validity::days_from_now(5),
    );
    let b = issue(
        &ca,
        &cluster,
        &ident("edge-us-2", "us-east", Role::Member),
        Validity::days_from_now(5),
    );

    let e = TlsMaterial::from_pem(&ca.cert_pem, &a.cert_pem, &b.key_pem).unwrap_err();
    assert!(matches!(e, TlsError::KeyMismatch), "{e:?}");
    assert!(e.to_string().starts_with("tls.key: "), "{e}");
}

#[test]
fn missing_file_error_names_the_key() {
    let cluster = lab();
    let ca = new_ca(&cluster);
    let node = issue(
        &ca,
        &cluster,
        &ident("gw-us-1", "us-east", Role::Gateway),
        Validity::days_from_now(5),
    );
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    let cert_path = dir.path().join("node.pem");
    let key_path = dir.path().join("node.key");
    let missing = dir.path().join("missing.pem");
    std::fs::write(&ca_path, &ca.cert_pem).unwrap();
    std::fs::write(&cert_path, &node.cert_pem).unwrap();
    std::fs::write(&key_path, &node.key_pem).unwrap();
    std::fs::set_permissions(&key_path, Permissions::from_mode(0o600)).unwrap();

    let loaded = TlsMaterial::load(&ca_path, &cert_path, &key_path).unwrap();
    assert_eq!(loaded.identity.ident.name.as_str(), "gw-us-1");

    for (key, paths) in [
        ("tls.ca", [&missing, &cert_path, &key_path]),
        ("tls.cert", [&ca_path, &missing, &key_path]),
        ("tls.key", [&ca_path, &cert_path, &missing]),
    ] {
        let e = TlsMaterial::load(paths[0], paths[1], paths[2]).unwrap_err();
        assert!(
            matches!(e, TlsError::Read { key: k, .. } if k == key),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(text.starts_with(&format!("{key}: cannot read ")), "{text}");
        assert!(text.contains("missing.pem"), "{text}");
    }
}

#[test]
fn a_key_file_readable_by_others_or_owned_by_another_user_is_refused_at_load() {
    let cluster = lab();
    let ca = new_ca(&cluster);
    let node = issue(
        &ca,
        &cluster,
        &ident("gw-us-1", "us-east", Role::Gateway),
        Validity::days_from_now(5),
    );
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    let cert_path = dir.path().join("node.pem");
    let key_path = dir.path().join("node.key");
    std::fs::write(&ca_path, &ca.cert_pem).unwrap();
    std::fs::write(&cert_path, &node.cert_pem).unwrap();
    std::fs::write(&key_path, &node.key_pem).unwrap();
    for mode in [0o644, 0o640] {
        std::fs::set_permissions(&key_path, Permissions::from_mode(mode)).unwrap();
        let e = TlsMaterial::load(&ca_path, &cert_path, &key_path).unwrap_err();
        assert!(matches!(e, TlsError::KeyFile { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.starts_with("tls.key: ")
                && text.contains(&format!("{mode:04o}"))
                && text.ends_with(&format!("fix: chmod 600 {}", key_path.display())),
            "{text}"
        );
    }
    if clusterctl_node::files::current_uid() == 0 {
        std::fs::set_permissions(&key_path, Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&key_path, Some(65534), None).unwrap();
        let text = TlsMaterial::load(&ca_path, &cert_path, &key_path)
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("uid 65534")
                && text.contains(&format!("chown root {}", key_path.display())),
            "{text}"
        );
    }
}

#[test]
fn wrong_file_contents_are_refused_at_load_naming_the_key() {
    let cluster = lab();
    let ca = new_ca(&cluster);
    let node = issue(
        &ca,
        &cluster,
        &ident("gw-us-1", "us-east", Role::Gateway),
        Validity::days_from_now(5),
    );
    let other_ca = new_ca(&cluster);

    let cases: Vec<(TlsError, &str)> = vec![
        (
            TlsMaterial::from_pem(&ca.cert_pem, &node.key_pem, &node.key_pem).unwrap_err(),
            "tls.cert: no certificate",
        ),
        (
            TlsMaterial::from_pem(&ca.cert_pem, &node.cert_pem, &node.cert_pem).unwrap_err(),
            "tls.key: no private key",
        ),
        (
            TlsMaterial::from_pem("", &node.cert_pem, &node.key_pem).unwrap_err(),
            "tls.ca: no certificate",
        ),
        (
            // tls.ca and tls.cert swapped.
            TlsMaterial::from_pem(&node.cert_pem, &node.cert_pem, &node.key_pem).unwrap_err(),
            "tls.ca: certificate #1",
        ),
        (
            TlsMaterial::from_pem(&ca.cert_pem, &ca.cert_pem, &ca.key_pem).unwrap_err(),
            "tls.cert: the certificate has no clusterctl identity",
        ),
        (
            TlsMaterial::from_pem(&other_ca.cert_pem, &node.cert_pem, &node.key_pem).unwrap_err(),
            "tls.cert: the certificate was not issued by the CA in tls.ca",
        ),
        (
            TlsMaterial::from_pem(
                &ca.cert_pem,
                "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
                &node.key_pem,
            )
            .unwrap_err(),
            "tls.cert: the file is not valid PEM",
        ),
    ];
    for (e, start) in cases {
        assert!(e.to_string().starts_with(start), "{e}");
    }

    // Several CAs (during a rotation) are fine, and an expired certificate still loads.
    let both = format!("{}{}", other_ca.cert_pem, ca.cert_pem);
    TlsMaterial::from_pem(&both, &node.cert_pem, &node.key_pem).unwrap();
    let expired = issue(
        &ca,
        &cluster,
        &ident("gw-us-1", "us-east", Role::Gateway),
        past(),
    );
    let m = TlsMaterial::from_pem(&ca.cert_pem, &expired.cert_pem, &expired.key_pem).unwrap();
    assert!(m.identity.days_left(SystemTime::now()) < 0);
}

#[tokio::test]
async fn material_of_another_cluster_is_refused_by_endpoint_configs() {
    let other = ClusterName::new("other").unwrap();
    let ca = new_ca(&other);
    let m = material(
        &ca,
        &other,
        &ident("gw-us-1", "us-east", Role::Gateway),
        Validity::days_from_now(5),
    );
    let e = tls::endpoint_configs(&Security::Mutual(m), &lab(), Arc::new(Recorder::default()))
        .unwrap_err();
    assert!(matches!(e, TlsError::WrongCluster { .. }), "{e:?}");
    assert!(e.to_string().starts_with("tls.cert: "), "{e}");
}
