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
    dn.push(DnType::CommonName, format!("clusterctl CA for {cluster}"));
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
