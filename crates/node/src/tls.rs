//! TLS for node links: mutual TLS 1.3 over QUIC, and the lab-only `insecure` mode.
//!
//! # Verification chain (mutual mode)
//!
//! Every node holds the cluster CA (`tls.ca`), its own certificate (`tls.cert`) and key
//! (`tls.key`). [`TlsMaterial::load`] checks them before any link is made: the key matches the
//! certificate, the certificate names a clusterctl node (see [`crate::pki`]) and was issued by
//! the CA.
//!
//! When a node **accepts** a link, the dialer must present a certificate. It is checked by
//! rustls' webpki client verifier against the CA (chain, signature, validity, `clientAuth`
//! usage); then its identity must name a node of our cluster. When a node **dials**, it names
//! the node it expects (`gw-us-1`) as the QUIC server name. The certificate the other side
//! presents must name exactly that node of our cluster; then rustls' webpki server verifier
//! checks chain, signature, validity and `serverAuth` usage against the CA, for the DNS name
//! `NAME.SITE.CLUSTER` that such a certificate carries. Every refusal, on either side, is handed
//! to a [`RejectSink`] with the name the refused certificate claims, so the runtime can report it.
//!
//! What this layer does not prove: that the peer is the node it claims to be in its application
//! hello (compare [`peer_identity`] with the hello), that a gateway is listed in the contract, or
//! that the other side accepted *our* certificate (in TLS 1.3 the dialer finishes its handshake
//! before the acceptor has checked the dialer's certificate). A link is up only after the
//! application hello/ack.
//!
//! Further choices: TLS 1.3 only; ALPN [`ALPN`] on both sides; no 0-RTT (replayable); no
//! session resumption, so every link is verified in full against the current CA and clock (a
//! resumed session would carry an old verification along); no SNI (the acceptor has no use for
//! it, and it would show whom we dial to anyone on the path).
//!
//! # Insecure mode
//!
//! [`Security::Insecure`] exists for labs. QUIC still encrypts, but the acceptor presents an
//! ephemeral self-signed certificate that the dialer accepts unchecked (with the private
//! verifier `DangerousAcceptAnyServerCert`), and the dialer presents none. A secure node and an
//! insecure node never link: the secure acceptor requires a certificate the insecure dialer does
//! not have, and the secure dialer refuses the self-signed certificate.

use crate::pki::{self, CertIdentity};
use clusterctl_core::name::{ClusterName, NodeName};
use clusterctl_core::table::CertSummary;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls::{OtherError, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The ALPN protocol every clusterctl link negotiates.
pub const ALPN: &[u8] = b"clusterctl/1";

/// Config key of the CA file, as named in errors.
const KEY_CA: &str = "tls.ca";
/// Config key of the node certificate file, as named in errors.
const KEY_CERT: &str = "tls.cert";
/// Config key of the node private key file, as named in errors.
const KEY_KEY: &str = "tls.key";

/// Why TLS material could not be loaded or TLS configs could not be built.
///
/// Each message names the config key concerned (`tls.ca`, `tls.cert`, `tls.key`) and the fix.
/// Nothing is changed when one of these is returned: the previous material, if any, stays in use.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{key}: cannot read {}: {source}; check the path and its permissions", path.display())]
    Read {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file is not valid PEM.
    #[error("{key}: the file is not valid PEM ({detail}); give the PEM file itself, unmodified")]
    BadPem {
        /// The config key naming the file.
        key: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The file holds no certificate.
    #[error(
        "{key}: no certificate in the file (expected a `-----BEGIN CERTIFICATE-----` block); \
         {hint}"
    )]
    NoCertificate {
        /// The config key naming the file.
        key: &'static str,
        /// What the file should be.
        hint: &'static str,
    },
    /// The CA file holds a certificate that cannot serve as the cluster CA.
    #[error(
        "tls.ca: {detail}; point tls.ca at the cluster CA certificate (not a node certificate)"
    )]
    BadCa {
        /// What is wrong.
        detail: String,
    },
    /// The key file is readable by others, or owned by another user.
    #[error("tls.key: {problem}; fix: {fix}")]
    KeyFile {
        /// What is wrong with the file (it names the file).
        problem: String,
        /// The `chmod`/`chown` that fixes it.
        fix: String,
    },
    /// The key file holds no private key.
    #[error(
        "tls.key: no private key in the file (expected an unencrypted \
         `-----BEGIN PRIVATE KEY-----` block); point tls.key at the key issued together with \
         tls.cert"
    )]
    NoPrivateKey,
    /// The private key cannot be used.
    #[error("tls.key: the private key is not usable ({detail}); use the key issued together with tls.cert")]
    BadKey {
        /// What is wrong.
        detail: String,
    },
    /// The private key is not the key of the certificate.
    #[error(
        "tls.key: the private key does not match the certificate in tls.cert; \
         use the key issued together with that certificate"
    )]
    KeyMismatch,
    /// The certificate names no clusterctl node.
    #[error(
        "tls.cert: the certificate has no clusterctl identity ({detail}); \
         issue the node certificate from the cluster CA with `clusterctl certs`"
    )]
    NoIdentity {
        /// What is missing or malformed.
        detail: String,
    },
    /// The certificate was not issued by the CA of `tls.ca`.
    #[error(
        "tls.cert: the certificate was not issued by the CA in tls.ca ({detail}); \
         use the CA that issued it, or issue a new certificate from this CA"
    )]
    NotIssuedByCa {
        /// What the verifier said.
        detail: String,
    },
    /// The certificate belongs to another cluster.
    #[error(
        "tls.cert: the certificate is for cluster `{cert_cluster}`, but this node is in cluster \
         `{cluster}`; issue a certificate for `{cluster}`"
    )]
    WrongCluster {
        /// The cluster the certificate names.
        cert_cluster: ClusterName,
        /// The cluster of this node.
        cluster: ClusterName,
    },
    /// The ephemeral certificate of insecure mode could not be generated.
    #[error("insecure mode: cannot generate the ephemeral self-signed certificate: {0}")]
    Generate(String),
    /// rustls or quinn refused the configuration (a bug, not an operator error).
    #[error("TLS configuration could not be built: {0}")]
    Config(String),
}

/// Loaded, validated TLS material of one node: the cluster CA, our certificate chain and key.
pub struct TlsMaterial {
    roots: Arc<RootCertStore>,
    /// The CA certificates of the bundle, in file order.
    ca_certs: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// Who our certificate says we are.
    pub identity: CertIdentity,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("identity", &self.identity)
            .field("ca_roots", &self.roots.len())
            .field("chain_len", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl TlsMaterial {
    /// Reads and validates the PEM files of `tls.ca`, `tls.cert` and `tls.key`. The key file
    /// must be owned by this process's user (or root) and readable by its owner only
    /// ([`crate::files::check_private`]).
    ///
    /// Errors name the file's config key and what is wrong: unreadable, no certificate in it,
    /// no private key in it, key does not match certificate, certificate has no clusterctl
    /// identity, certificate not issued by the CA. An expired certificate loads (peers will
    /// refuse it, and the runtime reports its expiry).
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<TlsMaterial, TlsError> {
        let read = |config_key: &'static str, path: &Path| {
            std::fs::read_to_string(path).map_err(|source| TlsError::Read {
                key: config_key,
                path: path.to_path_buf(),
                source,
            })
        };
        let ca_pem = read(KEY_CA, ca)?;
        let cert_pem = read(KEY_CERT, cert)?;
        if std::fs::metadata(key).is_ok() {
            crate::files::check_private(key, KEY_KEY).map_err(|e| TlsError::KeyFile {
                problem: e.problem,
                fix: e.fix,
            })?;
        }
        let key_pem = read(KEY_KEY, key)?;
        TlsMaterial::from_pem(&ca_pem, &cert_pem, &key_pem)
    }

    /// [`TlsMaterial::load`] without the owner and mode check of the key file: for reports that
    /// check the file apart (`clusterctl preflight`) and still judge the chain.
    pub fn load_contents(ca: &Path, cert: &Path, key: &Path) -> Result<TlsMaterial, TlsError> {
        let read = |config_key: &'static str, path: &Path| {
            std::fs::read_to_string(path).map_err(|source| TlsError::Read {
                key: config_key,
                path: path.to_path_buf(),
                source,
            })
        };
        TlsMaterial::from_pem(
            &read(KEY_CA, ca)?,
            &read(KEY_CERT, cert)?,
            &read(KEY_KEY, key)?,
        )
    }

    /// Validates PEM contents, as [`TlsMaterial::load`] does for files.
    ///
    /// `ca_pem` may hold several CA certificates (while the CA is rotated); `cert_pem` holds the
    /// node certificate first, then any intermediates.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<TlsMaterial, TlsError> {
        let provider = provider();

        let ca_certs = read_certs(KEY_CA, ca_pem, "point tls.ca at the cluster CA certificate")?;
        let mut roots = RootCertStore::empty();
        let bundle = ca_certs.clone();
        for (i, der) in ca_certs.into_iter().enumerate() {
            let n = i + 1;
            let (_, parsed) =
                x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| TlsError::BadCa {
                    detail: format!("certificate #{n} does not parse: {e}"),
                })?;
            if !parsed.is_ca() {
                return Err(TlsError::BadCa {
                    detail: format!(
                        "certificate #{n} ({}) is not a CA certificate",
                        parsed.subject()
                    ),
                });
            }
            roots.add(der).map_err(|e| TlsError::BadCa {
                detail: format!("certificate #{n} cannot be a trust anchor: {e}"),
            })?;
        }

        let chain = read_certs(
            KEY_CERT,
            cert_pem,
            "point tls.cert at this node's certificate",
        )?;
        let key = match PrivateKeyDer::from_pem_slice(key_pem.as_bytes()) {
            Ok(key) => key,
            Err(rustls_pki_types::pem::Error::NoItemsFound) => return Err(TlsError::NoPrivateKey),
            Err(e) => {
                return Err(TlsError::BadPem {
                    key: KEY_KEY,
                    detail: e.to_string(),
                })
            }
        };
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| TlsError::BadKey {
                detail: e.to_string(),
            })?;
        match rustls::sign::CertifiedKey::new(chain.clone(), signing_key).keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(TlsError::KeyMismatch)
            }
            // The key type cannot tell its public key: the handshake will find out.
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(e) => {
                return Err(TlsError::BadKey {
                    detail: e.to_string(),
                })
            }
        }

        let Some(end_entity) = chain.first() else {
            return Err(TlsError::NoCertificate {
                key: KEY_CERT,
                hint: "point tls.cert at this node's certificate",
            });
        };
        let identity =
            CertIdentity::from_der(end_entity.as_ref()).map_err(|e| TlsError::NoIdentity {
                detail: e.to_string(),
            })?;

        let roots = Arc::new(roots);
        check_issued_by(&roots, &chain, &identity, &provider)?;

        Ok(TlsMaterial {
            roots,
            ca_certs: bundle,
            chain,
            key,
            identity,
        })
    }

    /// What this node publishes about its certificate: short fingerprints of the certificate,
    /// of the bundle CA that issued it and of every bundle CA, and the validity window.
    pub fn summary(&self) -> CertSummary {
        let ms = |t: std::time::SystemTime| {
            t.duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        let leaf = self.chain.first().map(|c| c.as_ref()).unwrap_or_default();
        // The issuer is the bundle CA whose key verifies the certificate's signature: two CAs
        // of one cluster may well carry the same subject (during a rotation they do).
        let issuer = x509_parser::parse_x509_certificate(leaf)
            .ok()
            .and_then(|(_, leaf)| {
                self.ca_certs.iter().find(|ca| {
                    x509_parser::parse_x509_certificate(ca.as_ref())
                        .is_ok_and(|(_, ca)| leaf.verify_signature(Some(ca.public_key())).is_ok())
                })
            })
            .map(|ca| crate::pki::short_fingerprint(ca.as_ref()))
            .unwrap_or_default();
        CertSummary {
            leaf: crate::pki::short_fingerprint(leaf),
            issuer,
            trusts: self
                .ca_certs
                .iter()
                .map(|c| crate::pki::short_fingerprint(c.as_ref()))
                .collect(),
            not_before_ms: ms(self.identity.not_before),
            not_after_ms: ms(self.identity.not_after),
        }
    }
}

/// Parses every certificate of a PEM file; at least one is required.
fn read_certs(
    key: &'static str,
    pem: &str,
    hint: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            key,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { key, hint });
    }
    Ok(certs)
}

/// Checks that `chain` was issued by one of `roots`.
///
/// Verified at the middle of the certificate's validity, so that an expired certificate still
/// loads (its expiry is reported, and peers refuse it) while a wrong CA is caught at once.
fn check_issued_by(
    roots: &Arc<RootCertStore>,
    chain: &[CertificateDer<'static>],
    identity: &CertIdentity,
    provider: &Arc<CryptoProvider>,
) -> Result<(), TlsError> {
    let Some((end_entity, intermediates)) = chain.split_first() else {
        return Ok(());
    };
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let dns = pki::dns_name(
        &identity.cluster,
        &identity.ident.site,
        &identity.ident.name,
    );
    let server_name = ServerName::try_from(dns).map_err(|e| TlsError::NoIdentity {
        detail: format!("DNS name: {e}"),
    })?;
    let span = identity
        .not_after
        .duration_since(identity.not_before)
        .unwrap_or_default();
    let middle = identity.not_before + span / 2;
    let at = UnixTime::since_unix_epoch(
        middle
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    verifier
        .verify_server_cert(end_entity, intermediates, &server_name, &[], at)
        .map(|_| ())
        .map_err(|e| TlsError::NotIssuedByCa {
            detail: readable_reason(&e),
        })
}

/// How a node secures its links.
#[derive(Debug, Clone)]
pub enum Security {
    /// Mutual TLS 1.3 against the cluster CA: the only mode for real clusters.
    Mutual(Arc<TlsMaterial>),
    /// `insecure = true`: QUIC still encrypts, but nothing is authenticated (ephemeral
    /// self-signed certificate, no verification either way). Lab only; every report says
    /// `secure=false`.
    Insecure {
        /// The node's name, written into its ephemeral certificate.
        node: NodeName,
    },
}

/// Receives the reason whenever this node's TLS layer rejects a peer certificate, with the
/// node name the rejected certificate claims (if it could be parsed), so the runtime can report
/// "refused edge-x: certificate from an unknown CA" in its event stream.
///
/// Called from inside the handshake: it must return quickly and must not block.
pub trait RejectSink: Send + Sync + fmt::Debug + 'static {
    /// A peer certificate was refused. `claimed_name` is what the certificate says, unverified.
    fn rejected(&self, side: RejectSide, claimed_name: Option<String>, reason: String);
}

/// Which end of a handshake refused the peer's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectSide {
    /// A peer dialed us and we refused its client certificate.
    Accepting,
    /// We dialed a peer and refused its server certificate.
    Dialing,
}

/// A [`RejectSink`] that only logs, at `warn`.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogRejects;

impl RejectSink for LogRejects {
    fn rejected(&self, side: RejectSide, claimed_name: Option<String>, reason: String) {
        let _ = side;
        tracing::warn!(
            peer = claimed_name.as_deref().unwrap_or("<unknown>"),
            "refused peer certificate: {reason}"
        );
    }
}

/// Server and client configs for one quinn Endpoint.
///
/// In mutual mode, `cluster` must be the cluster our certificate names. The client config
/// expects the server name given to `connect_with` to be the name of the node being dialed
/// (`gw-us-1`), not an address or a DNS name.
pub fn endpoint_configs(
    security: &Security,
    cluster: &ClusterName,
    sink: Arc<dyn RejectSink>,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TlsError> {
    let provider = provider();
    let (server, client) = match security {
        Security::Mutual(material) => mutual_configs(material, cluster, sink, provider)?,
        Security::Insecure { node } => insecure_configs(node, provider)?,
    };
    let transport = Arc::new(transport_config());

    let server = quinn::crypto::rustls::QuicServerConfig::try_from(server)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(transport.clone());

    let client = quinn::crypto::rustls::QuicClientConfig::try_from(client)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(transport);
    Ok((server, client))
}

/// The one crypto provider: ring. Never rustls' process default (aws-lc-rs is not built in).
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    // One suite, the one every QUIC implementation must support: a link that is up is known to
    // use it (quinn does not expose the negotiated suite), and reports can say so.
    p.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
    Arc::new(p)
}

/// The only cipher suite links negotiate (see `provider`); reports name it.
pub use clusterctl_core::engine::CIPHER_SUITE;

/// Settings both modes share: ALPN, no 0-RTT, no resumption, no SNI.
fn harden(server: &mut rustls::ServerConfig, client: &mut rustls::ClientConfig) {
    server.alpn_protocols = vec![ALPN.to_vec()];
    server.max_early_data_size = 0;
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    client.alpn_protocols = vec![ALPN.to_vec()];
    client.enable_early_data = false;
    client.resumption = rustls::client::Resumption::disabled();
    client.enable_sni = false;
}

fn config_err(e: impl fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

fn mutual_configs(
    material: &TlsMaterial,
    cluster: &ClusterName,
    sink: Arc<dyn RejectSink>,
    provider: Arc<CryptoProvider>,
) -> Result<(rustls::ServerConfig, rustls::ClientConfig), TlsError> {
    if material.identity.cluster != *cluster {
        return Err(TlsError::WrongCluster {
            cert_cluster: material.identity.cluster.clone(),
            cluster: cluster.clone(),
        });
    }
    let client_verifier = ClusterClientVerifier {
        inner: WebPkiClientVerifier::builder_with_provider(
            material.roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(config_err)?,
        cluster: cluster.clone(),
        sink: sink.clone(),
    };
    let server_verifier = ClusterServerVerifier {
        inner: WebPkiServerVerifier::builder_with_provider(
            material.roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(config_err)?,
        cluster: cluster.clone(),
        sink,
    };

    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_client_cert_verifier(Arc::new(client_verifier))
        .with_single_cert(material.chain.clone(), material.key.clone_key())
        .map_err(config_err)?;
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(server_verifier))
        .with_client_auth_cert(material.chain.clone(), material.key.clone_key())
        .map_err(config_err)?;
    harden(&mut server, &mut client);
    Ok((server, client))
}

fn insecure_configs(
    node: &NodeName,
    provider: Arc<CryptoProvider>,
) -> Result<(rustls::ServerConfig, rustls::ClientConfig), TlsError> {
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(generate)?;
    let mut params =
        rcgen::CertificateParams::new(vec![node.as_str().to_string()]).map_err(generate)?;
    // Nobody verifies this certificate; its lifetime is explicit all the same.
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(3650 * 86_400)).into();
    let cert = params.self_signed(&key).map_err(generate)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .map_err(config_err)?;
    let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(DangerousAcceptAnyServerCert { provider }))
        .with_no_client_auth();
    harden(&mut server, &mut client);
    Ok((server, client))
}

/// Bytes of the connection IDs this node issues (quinn's default is 8). Every QUIC packet sent to
/// us carries one; a node has tens of connections, so 2^32 random values (quinn never issues one
/// already in use) are plenty, and 4 bytes less per packet is ~6% of idle traffic.
pub const CID_LEN: usize = 4;

/// Random connection IDs of [`CID_LEN`] bytes.
struct ShortCids(rand::rngs::StdRng);

impl ShortCids {
    fn new() -> ShortCids {
        use rand::SeedableRng;
        use ring::rand::SecureRandom;
        let mut seed = [0u8; 32];
        if ring::rand::SystemRandom::new().fill(&mut seed).is_err() {
            // No system randomness (never seen on Linux): IDs need only be hard to guess for
            // an off-path observer, so the clock and the process id do.
            let t = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            seed[..16].copy_from_slice(&t.to_le_bytes());
            seed[16..20].copy_from_slice(&std::process::id().to_le_bytes());
        }
        ShortCids(rand::rngs::StdRng::from_seed(seed))
    }
}

impl quinn::ConnectionIdGenerator for ShortCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        use rand::Rng;
        let mut b = [0u8; CID_LEN];
        self.0.fill_bytes(&mut b);
        quinn::ConnectionId::new(&b)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The endpoint settings of an agent: quinn's defaults with [`CID_LEN`]-byte connection IDs.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    c.cid_generator(|| Box::new(ShortCids::new()));
    c
}

/// A link that received nothing for this long is closed (QUIC idle timeout).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A link that received nothing for this long sends a QUIC PING.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// The transport settings every link uses.
///
/// - idle timeout 10 s: a link silent that long is dead (keep-alives keep it from being silent);
/// - keep-alive after 5 s without receiving anything (half the idle timeout: a lost keep-alive
///   is retransmitted, with backoff from ~25 ms, several times before the timeout), so NAT
///   bindings stay open (they last 30 s and more) and a dead path is seen within the timeout.
///   Links mostly carry failure-detector probes every few seconds anyway; at 2 s the
///   keep-alives and the acks they draw were a fifth of a member's idle bytes (24 agents);
/// - 1 MiB of datagram buffer each way (SWIM traffic; datagrams beyond it are dropped, never
///   queued behind streams);
/// - up to 4 concurrent unidirectional streams opened by the peer (its two lanes, control and
///   bulk, and room for two more) and 64 bidirectional ones (handshakes).
pub fn transport_config() -> quinn::TransportConfig {
    debug_assert!(KEEP_ALIVE * 2 <= IDLE_TIMEOUT);
    const DATAGRAM_BUFFER: usize = 1 << 20;
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        IDLE_TIMEOUT.as_millis() as u32,
    ))));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER));
    t.datagram_send_buffer_size(DATAGRAM_BUFFER);
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(4));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    t
}

/// The identity from the peer's certificate on an established connection.
///
/// `None` when the peer presented no certificate with a clusterctl identity, which is always the
/// case for honest peers in insecure mode. Under [`Security::Mutual`] the identity was verified
/// against the cluster CA during the handshake; under [`Security::Insecure`] nothing is verified,
/// so a `Some` there proves nothing.
pub fn peer_identity(conn: &quinn::Connection) -> Option<CertIdentity> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    CertIdentity::from_der(chain.first()?.as_ref()).ok()
}

/// Negotiated protocol label for reports: "tls1.3" for mutual TLS, "insecure" otherwise.
///
/// QUIC always runs TLS 1.3, so the label follows from `security`; `conn` is taken so that the
/// label can follow the connection should another protocol version ever be negotiated.
pub fn protocol_label(conn: &quinn::Connection, security: &Security) -> String {
    let _ = conn;
    match security {
        Security::Mutual(_) => "tls1.3".to_string(),
        Security::Insecure { .. } => "insecure".to_string(),
    }
}

/// A readable one-line reason for a failed or lost connection.
///
/// For example "peer rejected our certificate (TLS alert: unknown CA)", "peer certificate
/// expired", "peer presented a certificate for edge-us-2, expected gw-us-1", "timed out".
/// Text sent by the peer is cleaned of control characters and shortened.
pub fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as E;
    match e {
        E::VersionMismatch => "peer does not support our QUIC version".to_string(),
        E::TransportError(te) => match alert_of(te.code) {
            Some(alert) => describe_local_tls_failure(alert, &te.reason),
            None => format!("QUIC protocol error: {}", clean(te.to_string().as_bytes())),
        },
        E::ConnectionClosed(close) => match alert_of(close.error_code) {
            Some(alert) => describe_peer_alert(alert),
            None => {
                let reason = clean(&close.reason);
                if reason.is_empty() {
                    format!("peer aborted the connection: {}", close.error_code)
                } else {
                    format!(
                        "peer aborted the connection: {} ({reason})",
                        close.error_code
                    )
                }
            }
        },
        E::ApplicationClosed(close) => {
            let reason = clean(&close.reason);
            if reason.is_empty() {
                format!("peer closed the connection (code {})", close.error_code)
            } else {
                format!(
                    "peer closed the connection (code {}: {reason})",
                    close.error_code
                )
            }
        }
        E::Reset => "connection reset by peer (it probably restarted)".to_string(),
        E::TimedOut => "timed out".to_string(),
        E::LocallyClosed => "closed locally".to_string(),
        E::CidsExhausted => "out of connection IDs".to_string(),
    }
}

/// A readable one-line reason why a connection could not even be started.
pub fn describe_connect_error(e: &quinn::ConnectError) -> String {
    use quinn::ConnectError as E;
    match e {
        E::EndpointStopping => "the local endpoint is shutting down".to_string(),
        E::CidsExhausted => "out of connection IDs".to_string(),
        E::InvalidServerName(name) => {
            format!("cannot dial {name:?}: the server name must be the peer's node name")
        }
        E::InvalidRemoteAddress(addr) => format!("cannot dial {addr}: invalid address"),
        E::NoDefaultClientConfig => "no client configuration to dial with".to_string(),
        E::UnsupportedVersion => "unsupported QUIC version in the client configuration".to_string(),
    }
}

// TLS alert codes (RFC 8446 §6) that matter here.
const ALERT_HANDSHAKE_FAILURE: u8 = 40;
const ALERT_BAD_CERTIFICATE: u8 = 42;
const ALERT_UNSUPPORTED_CERTIFICATE: u8 = 43;
const ALERT_CERTIFICATE_REVOKED: u8 = 44;
const ALERT_CERTIFICATE_EXPIRED: u8 = 45;
const ALERT_CERTIFICATE_UNKNOWN: u8 = 46;
const ALERT_ILLEGAL_PARAMETER: u8 = 47;
const ALERT_UNKNOWN_CA: u8 = 48;
const ALERT_ACCESS_DENIED: u8 = 49;
const ALERT_DECODE_ERROR: u8 = 50;
const ALERT_DECRYPT_ERROR: u8 = 51;
const ALERT_PROTOCOL_VERSION: u8 = 70;
const ALERT_INTERNAL_ERROR: u8 = 80;
const ALERT_CERTIFICATE_REQUIRED: u8 = 116;
const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

/// The TLS alert carried by a QUIC `CRYPTO_ERROR` code (0x100 + alert).
/// Whether this node's own TLS layer ended an incoming handshake because the peer presented no
/// client certificate (no certificate verifier ran, so no [`RejectSink`] heard of it).
pub fn refused_for_no_client_certificate(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::TransportError(te)
        if alert_of(te.code) == Some(ALERT_CERTIFICATE_REQUIRED))
}

fn alert_of(code: quinn::TransportErrorCode) -> Option<u8> {
    let code = u64::from(code);
    if (0x100..0x200).contains(&code) {
        u8::try_from(code - 0x100).ok()
    } else {
        None
    }
}

fn alert_name(alert: u8) -> String {
    match alert {
        ALERT_HANDSHAKE_FAILURE => "handshake failure".to_string(),
        ALERT_BAD_CERTIFICATE => "bad certificate".to_string(),
        ALERT_UNSUPPORTED_CERTIFICATE => "unsupported certificate".to_string(),
        ALERT_CERTIFICATE_REVOKED => "certificate revoked".to_string(),
        ALERT_CERTIFICATE_EXPIRED => "certificate expired".to_string(),
        ALERT_CERTIFICATE_UNKNOWN => "certificate unknown".to_string(),
        ALERT_ILLEGAL_PARAMETER => "illegal parameter".to_string(),
        ALERT_UNKNOWN_CA => "unknown CA".to_string(),
        ALERT_ACCESS_DENIED => "access denied".to_string(),
        ALERT_DECODE_ERROR => "decode error".to_string(),
        ALERT_DECRYPT_ERROR => "decrypt error".to_string(),
        ALERT_PROTOCOL_VERSION => "protocol version".to_string(),
        ALERT_INTERNAL_ERROR => "internal error".to_string(),
        ALERT_CERTIFICATE_REQUIRED => "certificate required".to_string(),
        ALERT_NO_APPLICATION_PROTOCOL => "no application protocol".to_string(),
        other => format!("alert {other}"),
    }
}

/// The peer aborted the handshake with `alert`.
fn describe_peer_alert(alert: u8) -> String {
    let name = alert_name(alert);
    match alert {
        ALERT_CERTIFICATE_REQUIRED => format!(
            "peer requires a certificate and we presented none (TLS alert: {name}); \
             is this node running with insecure = true?"
        ),
        ALERT_BAD_CERTIFICATE
        | ALERT_UNSUPPORTED_CERTIFICATE
        | ALERT_CERTIFICATE_REVOKED
        | ALERT_CERTIFICATE_EXPIRED
        | ALERT_CERTIFICATE_UNKNOWN
        | ALERT_UNKNOWN_CA
        | ALERT_ACCESS_DENIED => format!("peer rejected our certificate (TLS alert: {name})"),
        // In TLS 1.3 mostly a certificate signature that does not verify against its CA.
        ALERT_DECRYPT_ERROR => {
            format!("peer rejected our certificate or handshake signature (TLS alert: {name})")
        }
        ALERT_NO_APPLICATION_PROTOCOL => format!(
            "peer does not speak {} (TLS alert: {name})",
            String::from_utf8_lossy(ALPN)
        ),
        _ => format!("peer aborted the handshake (TLS alert: {name})"),
    }
}

/// Our own TLS stack aborted the handshake with `alert`; `reason` is its (local) error text.
fn describe_local_tls_failure(alert: u8, reason: &str) -> String {
    if let Some(refusal) = refusal_in(reason) {
        return refusal;
    }
    match alert {
        ALERT_CERTIFICATE_EXPIRED
            if reason.contains("not valid yet") || reason.contains("NotValidYet") =>
        {
            "peer certificate not yet valid".to_string()
        }
        ALERT_CERTIFICATE_EXPIRED => "peer certificate expired".to_string(),
        ALERT_UNKNOWN_CA => {
            "peer certificate from an unknown CA (not signed by this cluster's CA)".to_string()
        }
        ALERT_DECRYPT_ERROR if reason.contains("BadSignature") => {
            "bad peer certificate signature (not signed by this cluster's CA, \
             or the peer does not hold the certificate's key)"
                .to_string()
        }
        ALERT_CERTIFICATE_REQUIRED => {
            "peer presented no certificate; is it running with insecure = true?".to_string()
        }
        ALERT_NO_APPLICATION_PROTOCOL => format!(
            "peer does not offer protocol {}",
            String::from_utf8_lossy(ALPN)
        ),
        _ => format!("TLS handshake failed: {}", clean(reason.as_bytes())),
    }
}

/// At most this many characters of a reason are shown.
const MAX_REASON_CHARS: usize = 200;

/// Peer-supplied text made fit for one log line: control characters dropped, length bounded.
fn clean(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_REASON_CHARS)
        .collect();
    if text.chars().filter(|c| !c.is_control()).count() > MAX_REASON_CHARS {
        out.push('…');
    }
    out
}

/// A refusal decided by this module (not by webpki), with a message for people.
///
/// rustls renders `CertificateError::Other` with `Debug`, so `Debug` prints the bare message;
/// [`refusal_in`] finds it again in the error text quinn keeps.
struct Refusal(String);

impl fmt::Debug for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

const REFUSAL_START: &str = "Other(OtherError(";
const REFUSAL_END: &str = "))";

/// A refusal with `message`, which may quote the peer's certificate: it is cleaned here.
fn refuse(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refusal(
        clean(message.as_bytes()),
    )))))
}

/// The message of a [`Refusal`] inside rustls' rendering of the error, if there is one.
fn refusal_in(reason: &str) -> Option<String> {
    let start = reason.find(REFUSAL_START)? + REFUSAL_START.len();
    // Only the outermost two parentheses are rustls'; the message may end in its own.
    let inner = reason.get(start..)?.strip_suffix(REFUSAL_END)?;
    Some(inner.to_string())
}

/// Refuses a certificate whose identity cannot be read; `what` names it ("peer certificate").
fn identity_refusal(what: &str, e: &pki::PkiError) -> rustls::Error {
    match e {
        pki::PkiError::NoIdentity => refuse(format!("{what} names no clusterctl node")),
        other => refuse(format!("{what} names no valid clusterctl node: {other}")),
    }
}

/// The reason for a refused certificate, in words an operator understands, fit for one line
/// (rustls' own texts may quote names from the peer's certificate).
fn readable_reason(e: &rustls::Error) -> String {
    let text = match e {
        rustls::Error::InvalidCertificate(ce) => match ce {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "certificate expired".to_string()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "certificate not yet valid".to_string()
            }
            CertificateError::UnknownIssuer => {
                "certificate from an unknown CA (not signed by this cluster's CA)".to_string()
            }
            // Raised while verifying the chain: the issuer has the name of one of our CAs but
            // did not sign the certificate, typically another CA made for the same cluster.
            CertificateError::BadSignature => {
                "bad certificate signature (from an unknown CA with the name of this cluster's CA)"
                    .to_string()
            }
            CertificateError::Other(OtherError(inner)) => inner.to_string(),
            other => other.to_string(),
        },
        rustls::Error::NoCertificatesPresented => "no certificate presented".to_string(),
        other => other.to_string(),
    };
    clean(text.as_bytes())
}

/// Why a certificate that passed verification is refused all the same.
const BAD_HANDSHAKE_SIGNATURE: &str =
    "handshake signature does not match the certificate (the peer does not hold its key)";

/// The node name a certificate claims, unverified, for reports.
fn claimed_name(end_entity: &CertificateDer<'_>) -> Option<String> {
    CertIdentity::from_der(end_entity.as_ref())
        .ok()
        .map(|id| id.ident.name.to_string())
}

/// Verifies the dialer's certificate on the accepting side: webpki against the cluster CA,
/// then the identity must be of our cluster. Refusals go to the sink.
#[derive(Debug)]
struct ClusterClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    cluster: ClusterName,
    sink: Arc<dyn RejectSink>,
}

impl ClusterClientVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let identity = CertIdentity::from_der(end_entity.as_ref())
            .map_err(|e| identity_refusal("certificate", &e))?;
        if identity.cluster != self.cluster {
            return Err(refuse(format!(
                "certificate is for cluster {}, this node is in cluster {}",
                identity.cluster, self.cluster
            )));
        }
        Ok(verified)
    }
}

impl ClientCertVerifier for ClusterClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now).inspect_err(|e| {
            self.sink.rejected(
                RejectSide::Accepting,
                claimed_name(end_entity),
                readable_reason(e),
            );
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner
            .verify_tls13_signature(message, cert, dss)
            .inspect_err(|_| {
                self.sink.rejected(
                    RejectSide::Accepting,
                    claimed_name(cert),
                    BAD_HANDSHAKE_SIGNATURE.to_string(),
                );
            })
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Verifies the acceptor's certificate on the dialing side: it must name exactly the node
/// dialed, of our cluster; then webpki checks it against the cluster CA for that node's DNS
/// name. Refusals go to the sink.
#[derive(Debug)]
struct ClusterServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    cluster: ClusterName,
    sink: Arc<dyn RejectSink>,
}

impl ClusterServerVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let expected = match server_name {
            ServerName::DnsName(name) => name.as_ref(),
            _ => {
                return Err(refuse(
                    "dialed by address; dial by the peer's node name".to_string(),
                ))
            }
        };
        let identity = CertIdentity::from_der(end_entity.as_ref())
            .map_err(|e| identity_refusal("peer certificate", &e))?;
        if identity.cluster != self.cluster {
            return Err(refuse(format!(
                "peer presented a certificate of cluster {}, this node is in cluster {}",
                identity.cluster, self.cluster
            )));
        }
        if identity.ident.name.as_str() != expected {
            return Err(refuse(format!(
                "peer presented a certificate for {}, expected {expected}",
                identity.ident.name
            )));
        }
        let dns = pki::dns_name(
            &identity.cluster,
            &identity.ident.site,
            &identity.ident.name,
        );
        let dns = ServerName::try_from(dns)
            .map_err(|e| refuse(format!("certificate DNS name is invalid: {e}")))?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &dns, ocsp_response, now)
    }
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| {
                self.sink.rejected(
                    RejectSide::Dialing,
                    claimed_name(end_entity),
                    readable_reason(e),
                );
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner
            .verify_tls13_signature(message, cert, dss)
            .inspect_err(|_| {
                self.sink.rejected(
                    RejectSide::Dialing,
                    claimed_name(cert),
                    BAD_HANDSHAKE_SIGNATURE.to_string(),
                );
            })
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Insecure mode only: accepts **any** server certificate without checking who it names or who
/// issued it. The handshake signature is still checked (so the key is held), which proves
/// nothing about identity.
#[derive(Debug)]
struct DangerousAcceptAnyServerCert {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for DangerousAcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_are_four_random_bytes() {
        use quinn::ConnectionIdGenerator;
        let mut g = ShortCids::new();
        assert_eq!(g.cid_len(), CID_LEN);
        let ids: std::collections::HashSet<Vec<u8>> =
            (0..1000).map(|_| g.generate_cid().to_vec()).collect();
        assert!(ids.iter().all(|c| c.len() == 4));
        // 1000 draws of 32 random bits: a collision is a 1 in 8,600 event, ten are impossible.
        assert!(ids.len() > 990, "only {} distinct IDs in 1000", ids.len());
    }

    #[test]
    fn refusal_message_survives_rustls_rendering() {
        let e = refuse("peer presented a certificate for edge-us-2, expected gw-us-1".into());
        assert_eq!(
            refusal_in(&e.to_string()).as_deref(),
            Some("peer presented a certificate for edge-us-2, expected gw-us-1")
        );
        assert_eq!(
            readable_reason(&e),
            "peer presented a certificate for edge-us-2, expected gw-us-1"
        );
        assert_eq!(refusal_in("invalid peer certificate: UnknownIssuer"), None);
    }

    #[test]
    fn peer_text_is_cleaned_and_bounded() {
        assert_eq!(clean(b"a\nb\x1b[31mc"), "ab[31mc");
        let long = vec![b'x'; 10_000];
        assert_eq!(clean(&long).chars().count(), MAX_REASON_CHARS + 1);
        assert_eq!(clean(&[0xff, b'a']), "\u{fffd}a");
    }

    #[test]
    fn alerts_come_only_from_crypto_codes() {
        assert_eq!(alert_of(quinn::TransportErrorCode::crypto(48)), Some(48));
        assert_eq!(
            alert_of(quinn::TransportErrorCode::PROTOCOL_VIOLATION),
            None
        );
    }
}
