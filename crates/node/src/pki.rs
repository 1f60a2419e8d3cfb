//! Certificates: the cluster CA and node certificates that name node, site and role.
//!
//! A node certificate carries two subject alternative names:
//! - DNS `NAME.SITE.CLUSTER`, the name TLS checks;
//! - URI `urn:clusterctl:node:CLUSTER:SITE:NAME:ROLE`, which states the role.
//!
//! Lifetimes are always explicit (rcgen's default would be the year 4096).

use clusterctl_api::Role;
use clusterctl_core::name::{ClusterName, Ident, NodeName, SiteName};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{pem::PemObject, CertificateDer};
use std::time::{Duration, SystemTime};
use time::OffsetDateTime;

/// Prefix of the URI SAN that carries a node's identity and role.
pub const URI_PREFIX: &str = "urn:clusterctl:node:";

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertPair")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Why a certificate could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("not a PEM certificate: {0}")]
    Pem(String),
    #[error("certificate does not parse: {0}")]
    Parse(String),
    #[error("certificate names no clusterctl node (no `{URI_PREFIX}...` URI SAN)")]
    NoIdentity,
    #[error("certificate identity is malformed: {0}")]
    BadIdentity(String),
    #[error("cannot read {0}")]
    Read(String),
    #[error("cannot issue from this CA: {0}")]
    NotACa(String),
}

/// Validity window of a certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From one hour ago (clock skew) for `days` days.
    pub fn days_from_now(days: u32) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

fn odt(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

/// Creates a cluster CA.
pub fn generate_ca(cluster: &ClusterName, validity: Validity) -> Result<CertPair, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    // Two CAs of one cluster must be told apart (during a rotation both are trusted, and a
    // verifier picks its anchor by subject): the subject names the CA's own key and its date.
    let created = clusterctl_core::engine::format_rfc3339_ms(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    );
    let key_id = short_fingerprint(key.public_key_raw());
    dn.push(
        DnType::CommonName,
        format!(
            "clusterctl CA for {cluster} (key {key_id}, {})",
            created.get(..10).unwrap_or(&created)
        ),
    );
    dn.push(DnType::OrganizationName, cluster.as_str());
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = odt(validity.not_before);
    params.not_after = odt(validity.not_after);
    let cert = params.self_signed(&key)?;
    Ok(CertPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a node certificate from `ca`, naming `ident` in `cluster`.
pub fn issue_node_cert(
    ca: &CertPair,
    cluster: &ClusterName,
    ident: &Ident,
    validity: Validity,
) -> Result<CertPair, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, ident.name.as_str());
    dn.push(DnType::OrganizationalUnitName, ident.role.as_str());
    dn.push(DnType::OrganizationName, cluster.as_str());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![
        SanType::DnsName(dns_name(cluster, &ident.site, &ident.name).try_into()?),
        SanType::URI(identity_uri(cluster, ident).try_into()?),
    ];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = odt(validity.not_before);
    params.not_after = odt(validity.not_after);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(CertPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The DNS SAN of a node: `NAME.SITE.CLUSTER`.
pub fn dns_name(cluster: &ClusterName, site: &SiteName, name: &NodeName) -> String {
    format!("{name}.{site}.{cluster}")
}

/// The URI SAN of a node.
pub fn identity_uri(cluster: &ClusterName, ident: &Ident) -> String {
    format!(
        "{URI_PREFIX}{cluster}:{}:{}:{}",
        ident.site, ident.name, ident.role
    )
}

/// Short fingerprint shown in reports: the first 16 hex characters of the SHA-256 of the DER.
pub fn short_fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a node certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub cluster: ClusterName,
    pub ident: Ident,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// SHA-256 of the DER, hex.
    pub fingerprint: String,
    pub issuer: String,
}

impl CertIdentity {
    /// Reads the identity out of a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<CertIdentity, PkiError> {
        use sha2::Digest;
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
        let mut found = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for gn in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::URI(uri) = gn {
                    if let Some(rest) = uri.strip_prefix(URI_PREFIX) {
                        found = Some(rest.to_string());
                    }
                }
            }
        }
        let rest = found.ok_or(PkiError::NoIdentity)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let [cluster, site, name, role] = parts[..] else {
            return Err(PkiError::BadIdentity(rest));
        };
        let bad = |what: &str, e: String| PkiError::BadIdentity(format!("{what}: {e}"));
        let ident = Ident {
            name: NodeName::new(name).map_err(|e| bad("name", e.to_string()))?,
            site: SiteName::new(site).map_err(|e| bad("site", e.to_string()))?,
            role: Role::parse(role).ok_or_else(|| bad("role", role.to_string()))?,
        };
        let to_sys = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        Ok(CertIdentity {
            cluster: ClusterName::new(cluster).map_err(|e| bad("cluster", e.to_string()))?,
            ident,
            not_before: to_sys(cert.validity().not_before),
            not_after: to_sys(cert.validity().not_after),
            fingerprint: sha2::Sha256::digest(der)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            issuer: cert.issuer().to_string(),
        })
    }

    /// Reads the identity out of the first certificate of a PEM file's contents.
    pub fn from_pem(pem: &str) -> Result<CertIdentity, PkiError> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| PkiError::Pem(e.to_string()))?;
        CertIdentity::from_der(&der)
    }

    /// Whole days until `not_after` (negative once expired).
    pub fn days_left(&self, now: SystemTime) -> i64 {
        match self.not_after.duration_since(now) {
            Ok(d) => (d.as_secs() / 86_400) as i64,
            Err(e) => -((e.duration().as_secs() / 86_400) as i64) - 1,
        }
    }
}

/// What any certificate says, CA or node: for `clusterctl certs inspect` and checks that must
/// read a CA as well as a node certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertDetails {
    /// Distinguished name of the subject, e.g. `CN=clusterctl CA for lab, O=lab`.
    pub subject: String,
    /// Distinguished name of the issuer.
    pub issuer: String,
    /// The subject's organization (`O`): the cluster name, in certificates made here.
    pub organization: Option<String>,
    /// Whether the certificate may issue others (basic constraints `CA:TRUE`).
    pub is_ca: bool,
    pub dns_sans: Vec<String>,
    pub uri_sans: Vec<String>,
    /// The clusterctl node identity, when the certificate carries one.
    pub identity: Option<CertIdentity>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// SHA-256 of the DER, hex (64 characters).
    pub fingerprint: String,
    /// [`short_fingerprint`] of the DER.
    pub short_fingerprint: String,
}

impl CertDetails {
    /// Reads a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<CertDetails, PkiError> {
        use sha2::Digest;
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
        let mut dns_sans = Vec::new();
        let mut uri_sans = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for gn in &san.value.general_names {
                match gn {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        dns_sans.push((*d).to_string())
                    }
                    x509_parser::extensions::GeneralName::URI(u) => uri_sans.push((*u).to_string()),
                    _ => {}
                }
            }
        }
        let organization = cert
            .subject()
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok())
            .map(str::to_string);
        let to_sys = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        Ok(CertDetails {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            organization,
            is_ca: cert.is_ca(),
            dns_sans,
            uri_sans,
            identity: CertIdentity::from_der(der).ok(),
            not_before: to_sys(cert.validity().not_before),
            not_after: to_sys(cert.validity().not_after),
            fingerprint: sha2::Sha256::digest(der)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            short_fingerprint: short_fingerprint(der),
        })
    }

    /// Reads every certificate of a PEM file's contents (a CA bundle may hold several).
    pub fn all_from_pem(pem: &str) -> Result<Vec<CertDetails>, PkiError> {
        let ders = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PkiError::Pem(e.to_string()))?;
        if ders.is_empty() {
            return Err(PkiError::Pem(
                "no `-----BEGIN CERTIFICATE-----` block".to_string(),
            ));
        }
        ders.iter().map(|d| CertDetails::from_der(d)).collect()
    }

    /// Whole days until `not_after` (negative once expired), as [`CertIdentity::days_left`].
    pub fn days_left(&self, now: SystemTime) -> i64 {
        days_until(self.not_after, now)
    }
}

fn days_until(t: SystemTime, now: SystemTime) -> i64 {
    match t.duration_since(now) {
        Ok(d) => (d.as_secs() / 86_400) as i64,
        Err(e) => -((e.duration().as_secs() / 86_400) as i64) - 1,
    }
}

/// Reads a CA made by [`generate_ca`] from its PEM files (`ca.pem`, `ca.key`) and checks that it
/// can issue: the certificate is a CA and the key is its key.
pub fn read_ca(
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
) -> Result<CertPair, PkiError> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|e| PkiError::Read(format!("{}: {e}", p.display())))
    };
    let pair = CertPair {
        cert_pem: read(cert_path)?,
        key_pem: read(key_path)?,
    };
    let details = CertDetails::all_from_pem(&pair.cert_pem)?;
    let Some(first) = details.first() else {
        return Err(PkiError::Pem("no certificate".to_string()));
    };
    if !first.is_ca {
        return Err(PkiError::NotACa(format!(
            "{} ({}) is not a CA certificate",
            cert_path.display(),
            first.subject
        )));
    }
    let key = KeyPair::from_pem(&pair.key_pem)?;
    let der = CertificateDer::from_pem_slice(pair.cert_pem.as_bytes())
        .map_err(|e| PkiError::Pem(e.to_string()))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::Parse(e.to_string()))?;
    if key.public_key_raw() != &parsed.public_key().subject_public_key.data[..] {
        return Err(PkiError::NotACa(format!(
            "{} is not the key of {}",
            key_path.display(),
            cert_path.display()
        )));
    }
    Ok(pair)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_cert_names_node_site_and_role() {
        let cluster = ClusterName::new("lab").unwrap();
        let ca = generate_ca(&cluster, Validity::days_from_now(10)).unwrap();
        let ident = Ident {
            name: NodeName::new("gw-us-1").unwrap(),
            site: SiteName::new("us-east").unwrap(),
            role: Role::Gateway,
        };
        let node = issue_node_cert(&ca, &cluster, &ident, Validity::days_from_now(5)).unwrap();
        let id = CertIdentity::from_pem(&node.cert_pem).unwrap();
        assert_eq!(id.ident, ident);
        assert_eq!(id.cluster, cluster);
        assert_eq!(id.fingerprint.len(), 64);
        let left = id.days_left(SystemTime::now());
        assert!((4..=5).contains(&left), "{left}");
        assert!(matches!(
            CertIdentity::from_pem(&ca.cert_pem),
            Err(PkiError::NoIdentity)
        ));
    }
}
