//! A raw peer for negative tests: dial a real agent with chosen credentials, send a hand-made
//! hello (or garbage), read the answer, and optionally try to push an application frame anyway.

use clusterctl_core::secret::{Keyring, ProofRole, BINDING_LEN, EXPORTER_LABEL};
use clusterctl_core::wire::{Frame, Handshake, Hello, MAX_HANDSHAKE};
use clusterctl_node::tls::{
    describe_connection_error, endpoint_configs, RejectSide, RejectSink, Security, TlsMaterial,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Ignores refusals: tests check the answer on the wire instead.
#[derive(Debug)]
struct IgnoreRejects;

impl RejectSink for IgnoreRejects {
    fn rejected(&self, _side: RejectSide, _claimed: Option<String>, _reason: String) {}
}

/// What happened to a raw handshake.
#[derive(Debug)]
pub enum Outcome {
    /// The agent answered the hello.
    Answer(Handshake),
    /// QUIC/TLS or the stream failed before an answer (the reason, as text).
    Failed(String),
}

/// Dials `to` (expecting node `server_name`) with `material`, sends the hello `make` builds for
/// this TLS session, reads the answer; then, if `frame` is given, pushes it on a
/// unidirectional stream as a linked peer would (a refused peer must never get it processed).
pub fn send_hello(
    bind: SocketAddr,
    to: SocketAddr,
    server_name: &str,
    material: TlsMaterial,
    make: impl FnOnce(&[u8]) -> Hello + Send + 'static,
    frame: Option<Frame>,
) -> Outcome {
    send_hello_bytes(
        bind,
        to,
        server_name,
        material,
        move |binding: &[u8]| Handshake::Hello(make(binding)).encode(),
        frame,
    )
}

/// [`send_hello`] with the hello's bytes made by `encode` (for this TLS session's binding):
/// tamper with them, e.g. another protocol version byte. The answer is read as a dialer reads
/// it ([`Handshake::decode_answer`]: a refusal in any version).
pub fn send_hello_bytes(
    bind: SocketAddr,
    to: SocketAddr,
    server_name: &str,
    material: TlsMaterial,
    encode: impl FnOnce(&[u8]) -> Vec<u8> + Send + 'static,
    frame: Option<Frame>,
) -> Outcome {
    let cluster = material.identity.cluster.clone();
    let security = Security::Mutual(Arc::new(material));
    let (_server, client) = match endpoint_configs(&security, &cluster, Arc::new(IgnoreRejects)) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("TLS configs: {e}")),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Outcome::Failed(format!("runtime: {e}")),
    };
    let server_name = server_name.to_string();
    rt.block_on(async move {
        let exchange = async {
            let endpoint = quinn::Endpoint::client(bind).map_err(|e| format!("bind: {e}"))?;
            let conn = endpoint
                .connect_with(client, to, &server_name)
                .map_err(|e| format!("connect: {e}"))?
                .await
                .map_err(|e| format!("QUIC/TLS handshake: {e}"))?;
            // The dialer's TLS handshake completes before the acceptor has checked our
            // certificate: a refusal then shows as the connection closing, with the reason.
            let why = |what: &str, e: String| match conn.close_reason() {
                Some(reason) => format!("{what}: {}", describe_connection_error(&reason)),
                None => format!("{what}: {e}"),
            };
            let mut binding = [0u8; BINDING_LEN];
            conn.export_keying_material(&mut binding, EXPORTER_LABEL, b"")
                .map_err(|e| format!("exporter: {e:?}"))?;
            let hello = encode(&binding);
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| why("open", e.to_string()))?;
            send.write_all(&hello)
                .await
                .map_err(|e| why("write", e.to_string()))?;
            send.finish().map_err(|e| why("finish", e.to_string()))?;
            let bytes = recv
                .read_to_end(MAX_HANDSHAKE)
                .await
                .map_err(|e| why("read", e.to_string()))?;
            let answer = Handshake::decode_answer(&bytes).map_err(|e| format!("decode: {e}"))?;
            if let Some(f) = frame {
                // Best effort: the agent may already have closed the connection.
                if let Ok(mut s) = conn.open_uni().await {
                    // On the control lane: the lane byte, then the length-prefixed frame.
                    let mut bytes = vec![clusterctl_core::wire::Lane::Control as u8];
                    bytes.extend(f.encode_prefixed());
                    let _ = s.write_all(&bytes).await;
                    let _ = s.finish();
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            conn.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
            Ok::<_, String>(answer)
        };
        match tokio::time::timeout(Duration::from_secs(30), exchange).await {
            Ok(Ok(answer)) => Outcome::Answer(answer),
            Ok(Err(e)) => Outcome::Failed(e),
            Err(_) => Outcome::Failed(format!("no answer from {server_name} at {to} within 30 s")),
        }
    })
}

/// A hello from `ident` with a valid proof of `keyring`'s key in use.
pub fn hello_with(
    keyring: Keyring,
    ident: clusterctl_core::name::Ident,
    contract_hash: String,
    addr: String,
) -> impl FnOnce(&[u8]) -> Hello + Send + 'static {
    move |binding: &[u8]| Hello {
        cluster: clusterctl_core::name::ClusterName::new("lab").expect("valid cluster name"),
        secret: keyring.prove_primary(ProofRole::Hello, &ident.name, binding),
        ident,
        contract_hash,
        clock: 1,
        addr,
        rejoin: false,
        version: "test".into(),
    }
}

/// Accepts any server certificate: the raw peer below only needs to reach the acceptor's
/// client-certificate check.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Dials `to` over QUIC with TLS 1.3 and the cluster's ALPN but without any client certificate,
/// as a peer that does not know the cluster's CA would, and returns how the handshake ended.
pub fn dial_without_client_certificate(bind: SocketAddr, to: SocketAddr) -> Outcome {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
                .with_no_client_auth()
        });
    let mut config = match config {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("TLS config: {e}")),
    };
    config.alpn_protocols = vec![clusterctl_node::tls::ALPN.to_vec()];
    let client = match quinn::crypto::rustls::QuicClientConfig::try_from(config) {
        Ok(c) => quinn::ClientConfig::new(Arc::new(c)),
        Err(e) => return Outcome::Failed(format!("QUIC config: {e}")),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Outcome::Failed(format!("runtime: {e}")),
    };
    rt.block_on(async move {
        let exchange = async {
            let endpoint = quinn::Endpoint::client(bind).map_err(|e| format!("bind: {e}"))?;
            let conn = endpoint
                .connect_with(client, to, "peer")
                .map_err(|e| format!("connect: {e}"))?
                .await
                .map_err(|e| format!("QUIC/TLS handshake: {}", describe_connection_error(&e)))?;
            // The acceptor checks the client certificate after our side completes: the
            // refusal arrives as the connection closing.
            let closed = conn.closed().await;
            endpoint.wait_idle().await;
            Err::<Handshake, _>(format!("closed: {}", describe_connection_error(&closed)))
        };
        match tokio::time::timeout(Duration::from_secs(30), exchange).await {
            Ok(Ok(answer)) => Outcome::Answer(answer),
            Ok(Err(e)) => Outcome::Failed(e),
            Err(_) => Outcome::Failed(format!("no end to the handshake with {to} within 30 s")),
        }
    })
}

/// A raw acceptor for negative tests of the dialing side: listens at `bind` with `material`
/// (a node's certificate, so that a real agent dialing that node completes TLS), answers
/// every hello with the bytes `answer` makes of it, until `stop` is set (checked every 100 ms)
/// or 60 s pass. Returns how many hellos it answered.
pub fn answer_hellos(
    bind: SocketAddr,
    material: TlsMaterial,
    answer: impl Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<usize, String> {
    let cluster = material.identity.cluster.clone();
    let security = Security::Mutual(Arc::new(material));
    let (server, _client) = endpoint_configs(&security, &cluster, Arc::new(IgnoreRejects))
        .map_err(|e| format!("TLS configs: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let answer = Arc::new(answer);
    rt.block_on(async move {
        let endpoint = quinn::Endpoint::server(server, bind).map_err(|e| format!("bind: {e}"))?;
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !stop.load(std::sync::atomic::Ordering::SeqCst)
            && tokio::time::Instant::now() < deadline
        {
            let incoming =
                match tokio::time::timeout(Duration::from_millis(100), endpoint.accept()).await {
                    Ok(Some(i)) => i,
                    Ok(None) => break,
                    Err(_) => continue,
                };
            let (answer, answered) = (answer.clone(), answered.clone());
            tokio::spawn(async move {
                let exchange = async {
                    let conn = incoming.await.ok()?;
                    let (mut send, mut recv) = conn.accept_bi().await.ok()?;
                    let hello = recv.read_to_end(MAX_HANDSHAKE).await.ok()?;
                    send.write_all(&answer(&hello)).await.ok()?;
                    send.finish().ok()?;
                    answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                    Some(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(10), exchange).await;
            });
        }
        endpoint.close(0u32.into(), b"done");
        Ok(answered.load(std::sync::atomic::Ordering::SeqCst))
    })
}
