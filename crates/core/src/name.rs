//! Validated names: nodes, sites and clusters are DNS labels.
//!
//! A name that came from the network is validated while it is decoded, so no invalid or
//! oversized name ever reaches the table.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest name accepted (the DNS label limit).
pub const MAX_NAME_LEN: usize = 63;

/// Why a string is not a valid name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("is empty")]
    Empty,
    #[error("is {0} characters long; the limit is {MAX_NAME_LEN}")]
    TooLong(usize),
    #[error("contains {0:?}; use lower-case letters, digits and '-'")]
    BadChar(char),
    #[error("starts or ends with '-'")]
    Hyphen,
}

/// Checks that `s` is a DNS label: 1-63 of `a-z`, `0-9`, `-`, not starting or ending with `-`.
pub fn validate_label(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(s.len()));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::BadChar(c));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(NameError::Hyphen);
    }
    Ok(())
}

// Names are shared, not copied: a name is held by the table, the statuses, the rings and every
// frame that carries it (thousands of copies of each at scale), so a clone only bumps a count.
macro_rules! label_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(std::sync::Arc<str>);

        // By hand rather than `into = "String"`: encoding a name must not copy it.
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
                let s = s.into();
                validate_label(&s)?;
                Ok(Self(s.into()))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0.to_string()
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }
    };
}

label_type!(
    /// A node's name, unique in the cluster (like the `name` of `name@host` in Erlang).
    NodeName
);
label_type!(
    /// A site's name: one network segment.
    SiteName
);
label_type!(
    /// The cluster's name.
    ClusterName
);

/// Who a node is: its name, its site and its role.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ident {
    pub name: NodeName,
    pub site: SiteName,
    #[serde(with = "crate::wire::role_on_wire")]
    pub role: clusterctl_api::Role,
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} of {})", self.name, self.role, self.site)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "edge-us-1", "gw0", &"x".repeat(63)] {
            assert!(validate_label(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_labels_with_reason() {
        assert_eq!(validate_label(""), Err(NameError::Empty));
        assert_eq!(validate_label(&"x".repeat(64)), Err(NameError::TooLong(64)));
        assert_eq!(validate_label("Edge"), Err(NameError::BadChar('E')));
        assert_eq!(validate_label("a.b"), Err(NameError::BadChar('.')));
        assert_eq!(validate_label("-a"), Err(NameError::Hyphen));
    }

    #[test]
    fn decoding_validates() {
        let bad: Result<NodeName, _> = serde_json_like("\"UPPER\"");
        assert!(bad.is_err());
    }

    fn serde_json_like(s: &str) -> Result<NodeName, toml::de::Error> {
        #[derive(Deserialize)]
        struct W {
            #[allow(dead_code)]
            n: NodeName,
        }
        toml::from_str::<W>(&format!("n = {s}")).map(|w| w.n)
    }

    proptest! {
        #[test]
        fn never_panics_and_valid_names_round_trip(s in ".{0,80}") {
            if let Ok(n) = NodeName::new(s.clone()) {
                prop_assert!(n.as_str().len() <= MAX_NAME_LEN);
                let bytes = postcard::to_allocvec(&n).unwrap();
                let back: NodeName = postcard::from_bytes(&bytes).unwrap();
                prop_assert_eq!(back, n);
            }
        }
    }
}
