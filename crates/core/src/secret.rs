//! The cluster secret keyring: the cookie, done right.
//!
//! Every handshake proves knowledge of a cluster secret without sending it: each side sends an
//! HMAC-SHA256, keyed with the secret, over a label, its role, its node name and a value bound
//! to this very TLS session (a TLS exporter, RFC 5705/8446). A proof is useless on any other
//! connection, so it cannot be replayed, and comparisons are constant-time (`ring::hmac::verify`).
//!
//! A node holds up to [`MAX_KEYS`] secrets; it proves with its *primary* one and accepts a proof
//! with any one it holds. That makes rotation a three-step procedure with no refused link:
//! `install` the new secret everywhere (accepted, not yet used) -> `use` it everywhere (rolling)
//! -> `remove` the old one.
//!
//! The secret is no authentication of a node — the certificate is. It keeps clusters from
//! mixing, as Erlang's cookie was meant to.

use crate::name::NodeName;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Most secrets a keyring holds.
pub const MAX_KEYS: usize = 8;
/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;
/// Longest secret accepted, in bytes.
pub const MAX_SECRET_BYTES: usize = 64;
/// Length of the TLS exporter value that binds a proof to one session.
pub const BINDING_LEN: usize = 32;
/// TLS exporter label for the binding.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-clusterctl-secret-v1";

/// Public fingerprint of a secret: the first 8 bytes of a SHA-256 over it. Shown in reports and
/// carried in records; it reveals nothing usable about the secret.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl std::str::FromStr for KeyId {
    type Err = SecretError;
    fn from_str(s: &str) -> Result<KeyId, SecretError> {
        let b = hex_decode(s.trim()).ok_or(SecretError::BadKeyId)?;
        let arr: [u8; 8] = b.try_into().map_err(|_| SecretError::BadKeyId)?;
        Ok(KeyId(arr))
    }
}

/// Why a secret, a keyring change or a proof was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a secret is written as hex ({MIN_SECRET_BYTES}-{MAX_SECRET_BYTES} bytes, e.g. from `clusterctl secret generate FILE`)")]
    BadFormat,
    #[error("a key id is 16 hex characters (see `clusterctl secret list`)")]
    BadKeyId,
    #[error("the keyring already holds {MAX_KEYS} secrets: remove one first")]
    Full,
    #[error("key {0} is not in the keyring")]
    Unknown(KeyId),
    #[error("key {0} is the one in use: `use` another key first")]
    RemovePrimary(KeyId),
    #[error("secret mismatch: the peer proved key {theirs}, which this node does not hold (it holds {ours})")]
    NotHeld { theirs: KeyId, ours: String },
    #[error("secret mismatch: the proof for key {0} is wrong (another secret with the same fingerprint, or a forged proof)")]
    BadProof(KeyId),
}

/// One secret. Its bytes never leave the node and never appear in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    id: KeyId,
    bytes: Vec<u8>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({}, <redacted>)", self.id)
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Secret {
    /// A secret from raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Secret, SecretError> {
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&bytes.len()) {
            return Err(SecretError::BadFormat);
        }
        let d = Sha256::new()
            .chain_update(b"clusterctl-key-id-v1\n")
            .chain_update(bytes)
            .finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        Ok(Secret {
            id: KeyId(id),
            bytes: bytes.to_vec(),
        })
    }

    /// A secret from the text of a secret file: hex, surrounding whitespace ignored.
    pub fn from_text(text: &str) -> Result<Secret, SecretError> {
        let bytes = hex_decode(text.trim()).ok_or(SecretError::BadFormat)?;
        Secret::from_bytes(&bytes)
    }

    /// The text of a secret file for this secret.
    pub fn to_text(&self) -> String {
        let mut s: String = self.bytes.iter().map(|b| format!("{b:02x}")).collect();
        s.push('\n');
        s
    }

    /// Its public fingerprint.
    pub fn id(&self) -> KeyId {
        self.id
    }
}

/// Which message a proof belongs to (a proof for one cannot stand for the other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofRole {
    /// In the dialer's hello.
    Hello,
    /// In the acceptor's ack.
    Ack,
}

/// A proof of knowledge of the secret `key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretProof {
    pub key: KeyId,
    pub mac: [u8; 32],
}

fn mac_input(role: ProofRole, name: &NodeName, binding: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + binding.len());
    m.extend_from_slice(b"clusterctl-secret-proof-v1\n");
    m.push(match role {
        ProofRole::Hello => 1,
        ProofRole::Ack => 2,
    });
    m.push(name.as_str().len() as u8);
    m.extend_from_slice(name.as_str().as_bytes());
    m.extend_from_slice(binding);
    m
}

/// Proves knowledge of `secret` for node `name` on the session identified by `binding`.
pub fn prove(secret: &Secret, role: ProofRole, name: &NodeName, binding: &[u8]) -> SecretProof {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret.bytes);
    let tag = ring::hmac::sign(&key, &mac_input(role, name, binding));
    let mut mac = [0u8; 32];
    mac.copy_from_slice(tag.as_ref());
    SecretProof {
        key: secret.id,
        mac,
    }
}

/// The secrets a node holds, one of them in use.
#[derive(Clone, PartialEq, Eq)]
pub struct Keyring {
    keys: Vec<Secret>,
    primary: KeyId,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("primary", &self.primary)
            .field("keys", &self.ids())
            .finish()
    }
}

impl Keyring {
    /// A keyring holding one secret, in use.
    pub fn new(primary: Secret) -> Keyring {
        Keyring {
            primary: primary.id,
            keys: vec![primary],
        }
    }

    /// A keyring from its parts (as persisted); `primary` must be one of `keys`.
    pub fn from_parts(keys: Vec<Secret>, primary: KeyId) -> Result<Keyring, SecretError> {
        if keys.is_empty() || keys.len() > MAX_KEYS {
            return Err(SecretError::Full);
        }
        if !keys.iter().any(|k| k.id == primary) {
            return Err(SecretError::Unknown(primary));
        }
        let mut r = Keyring {
            keys: Vec::new(),
            primary,
        };
        for k in keys {
            if !r.keys.iter().any(|x| x.id == k.id) {
                r.keys.push(k);
            }
        }
        Ok(r)
    }

    /// The key in use.
    pub fn primary(&self) -> KeyId {
        self.primary
    }

    /// Every key held, the one in use first.
    pub fn ids(&self) -> Vec<KeyId> {
        let mut v: Vec<KeyId> = vec![self.primary];
        v.extend(
            self.keys
                .iter()
                .map(|k| k.id)
                .filter(|id| *id != self.primary),
        );
        v
    }

    /// Every secret held (for persisting).
    pub fn secrets(&self) -> &[Secret] {
        &self.keys
    }

    /// Whether `id` is held.
    pub fn holds(&self, id: KeyId) -> bool {
        self.keys.iter().any(|k| k.id == id)
    }

    /// Adds a secret (accepted from now on, not used). Installing a held one changes nothing.
    pub fn install(&mut self, s: Secret) -> Result<bool, SecretError> {
        if self.holds(s.id) {
            return Ok(false);
        }
        if self.keys.len() >= MAX_KEYS {
            return Err(SecretError::Full);
        }
        self.keys.push(s);
        Ok(true)
    }

    /// Makes a held secret the one in use.
    pub fn use_key(&mut self, id: KeyId) -> Result<bool, SecretError> {
        if !self.holds(id) {
            return Err(SecretError::Unknown(id));
        }
        let changed = self.primary != id;
        self.primary = id;
        Ok(changed)
    }

    /// Removes a secret that is not in use.
    pub fn remove(&mut self, id: KeyId) -> Result<(), SecretError> {
        if id == self.primary {
            return Err(SecretError::RemovePrimary(id));
        }
        if !self.holds(id) {
            return Err(SecretError::Unknown(id));
        }
        self.keys.retain(|k| k.id != id);
        Ok(())
    }

    /// A proof with the key in use.
    pub fn prove_primary(&self, role: ProofRole, name: &NodeName, binding: &[u8]) -> SecretProof {
        let s = self
            .keys
            .iter()
            .find(|k| k.id == self.primary)
            .unwrap_or(&self.keys[0]);
        prove(s, role, name, binding)
    }

    /// A proof with a specific held key.
    pub fn prove_with(
        &self,
        id: KeyId,
        role: ProofRole,
        name: &NodeName,
        binding: &[u8],
    ) -> Option<SecretProof> {
        self.keys
            .iter()
            .find(|k| k.id == id)
            .map(|s| prove(s, role, name, binding))
    }

    /// Checks a peer's proof (constant-time). Returns the key it proved.
    pub fn verify(
        &self,
        proof: &SecretProof,
        role: ProofRole,
        name: &NodeName,
        binding: &[u8],
    ) -> Result<KeyId, SecretError> {
        let Some(s) = self.keys.iter().find(|k| k.id == proof.key) else {
            return Err(SecretError::NotHeld {
                theirs: proof.key,
                ours: self
                    .ids()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &s.bytes);
        ring::hmac::verify(&key, &mac_input(role, name, binding), &proof.mac)
            .map(|()| s.id)
            .map_err(|_| SecretError::BadProof(s.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(b: u8) -> Secret {
        Secret::from_bytes(&[b; 32]).unwrap()
    }

    fn n(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }

    #[test]
    fn proof_verifies_only_for_the_same_secret_role_name_and_session() {
        let ring = Keyring::new(secret(1));
        let p = ring.prove_primary(ProofRole::Hello, &n("a"), b"session-1");
        assert_eq!(
            ring.verify(&p, ProofRole::Hello, &n("a"), b"session-1"),
            Ok(secret(1).id())
        );
        // replayed on another session, for another name, or as the other message
        assert!(ring
            .verify(&p, ProofRole::Hello, &n("a"), b"session-2")
            .is_err());
        assert!(ring
            .verify(&p, ProofRole::Hello, &n("b"), b"session-1")
            .is_err());
        assert!(ring
            .verify(&p, ProofRole::Ack, &n("a"), b"session-1")
            .is_err());
        // tampered
        let mut t = p.clone();
        t.mac[0] ^= 1;
        assert_eq!(
            ring.verify(&t, ProofRole::Hello, &n("a"), b"session-1"),
            Err(SecretError::BadProof(secret(1).id()))
        );
    }

    #[test]
    fn a_node_with_only_another_secret_is_a_mismatch() {
        let old = Keyring::new(secret(1));
        let new = Keyring::new(secret(2));
        let p = new.prove_primary(ProofRole::Hello, &n("a"), b"s");
        let e = old.verify(&p, ProofRole::Hello, &n("a"), b"s").unwrap_err();
        assert!(e.to_string().starts_with("secret mismatch"), "{e}");
    }

    #[test]
    fn install_use_remove_rotates_without_a_mismatch_at_any_step() {
        // Three nodes; every pair must accept each other at every step.
        let mut nodes = vec![Keyring::new(secret(1)); 3];
        let check = |nodes: &[Keyring]| {
            for a in nodes {
                for b in nodes {
                    let p = a.prove_primary(ProofRole::Hello, &n("x"), b"s");
                    assert!(b.verify(&p, ProofRole::Hello, &n("x"), b"s").is_ok());
                }
            }
        };
        for i in 0..3 {
            nodes[i].install(secret(2)).unwrap();
            check(&nodes);
        }
        for i in 0..3 {
            nodes[i].use_key(secret(2).id()).unwrap();
            check(&nodes);
        }
        for i in 0..3 {
            nodes[i].remove(secret(1).id()).unwrap();
            check(&nodes);
        }
        assert_eq!(nodes[0].ids(), vec![secret(2).id()]);
    }

    #[test]
    fn keyring_rules() {
        let mut r = Keyring::new(secret(1));
        assert_eq!(
            r.remove(secret(1).id()),
            Err(SecretError::RemovePrimary(secret(1).id()))
        );
        assert_eq!(
            r.use_key(secret(9).id()),
            Err(SecretError::Unknown(secret(9).id()))
        );
        for b in 2..=MAX_KEYS as u8 {
            assert_eq!(r.install(secret(b)), Ok(true));
        }
        assert_eq!(r.install(secret(100)), Err(SecretError::Full));
        assert_eq!(r.install(secret(2)), Ok(false));
    }

    #[test]
    fn secret_files_are_hex_and_debug_never_shows_the_bytes() {
        let s = secret(7);
        let back = Secret::from_text(&s.to_text()).unwrap();
        assert_eq!(back, s);
        assert!(!format!("{s:?}").contains("0707"));
        assert_eq!(Secret::from_text("abc"), Err(SecretError::BadFormat));
        assert_eq!(Secret::from_text("00ff"), Err(SecretError::BadFormat));
        let id: KeyId = s.id().to_string().parse().unwrap();
        assert_eq!(id, s.id());
    }
}
