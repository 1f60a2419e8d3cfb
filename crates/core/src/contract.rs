//! The topology contract: sites, the gateways of each, and the allowed site-to-site links.
//!
//! The same file is deployed on every node. Its hash (over a canonical form, so reordering the
//! file changes nothing) travels in every handshake; a peer with another hash is reported as
//! `drift`. Every link is checked against the contract when it is set up.
//!
//! ```toml
//! cluster = "lab"
//!
//! [[site]]
//! name = "us-east"
//! gateways = ["gw-us-1"]
//! # nodes = ["gw-us-1", "edge-us-1"]   # optional: when present, only these may join the site
//!
//! [[site]]
//! name = "eu-west"
//! gateways = ["gw-eu-1"]
//!
//! [[link]]
//! between = ["us-east", "eu-west"]
//! ```

use crate::name::{ClusterName, Ident, NodeName, SiteName};
use clusterctl_api::{LinkKind, Role};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Most sites a contract may hold.
pub const MAX_SITES: usize = 1024;
/// Most gateways (or listed nodes) per site.
pub const MAX_PER_SITE: usize = 4096;

/// One site of the contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteSpec {
    pub name: SiteName,
    pub gateways: BTreeSet<NodeName>,
    /// When present, the only nodes allowed in the site.
    pub nodes: Option<BTreeSet<NodeName>>,
}

/// A parsed and validated topology contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contract {
    pub cluster: ClusterName,
    /// Shared: every engine holds the contract, and a clone must not copy a hundred sites and
    /// their thousands of allowed pairs.
    sites: Arc<BTreeMap<SiteName, SiteSpec>>,
    links: Arc<BTreeSet<(SiteName, SiteName)>>,
    hash: String,
}

/// A contract file that cannot be used. Each variant names the key and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    #[error("contract is not valid TOML: {0}")]
    Syntax(String),
    #[error("contract key `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ContractError {
    ContractError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContract {
    cluster: String,
    #[serde(default)]
    site: Vec<RawSite>,
    #[serde(default)]
    link: Vec<RawLink>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: String,
    #[serde(default)]
    gateways: Vec<String>,
    nodes: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    between: Vec<String>,
}

/// Why the contract does not allow a link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractRefusal {
    #[error("site {0} is not in the contract")]
    UnknownSite(SiteName),
    #[error("node {node} is not listed in site {site} of the contract")]
    NotListed { node: NodeName, site: SiteName },
    #[error("node {node} claims the gateway role but is not a contract gateway of site {site}")]
    NotAGateway { node: NodeName, site: SiteName },
    #[error(
        "member {node} of site {site} may not link outside its site (only gateways cross sites)"
    )]
    MemberCrossSite { node: NodeName, site: SiteName },
    #[error("the contract has no link between sites {0} and {1}")]
    SitesNotLinked(SiteName, SiteName),
    #[error("a node cannot link to itself")]
    SelfLink,
}

impl Contract {
    /// Parses and validates contract TOML.
    pub fn parse(text: &str) -> Result<Contract, ContractError> {
        let raw: RawContract =
            toml::from_str(text).map_err(|e| ContractError::Syntax(e.message().to_string()))?;
        let cluster = ClusterName::new(raw.cluster.clone())
            .map_err(|e| invalid("cluster", format!("{:?} {e}", raw.cluster)))?;
        if raw.site.is_empty() {
            return Err(invalid(
                "site",
                "no [[site]] tables: list at least one site",
            ));
        }
        if raw.site.len() > MAX_SITES {
            return Err(invalid("site", format!("more than {MAX_SITES} sites")));
        }
        let mut sites = BTreeMap::new();
        let mut all_gateways: BTreeMap<NodeName, SiteName> = BTreeMap::new();
        for (i, s) in raw.site.iter().enumerate() {
            let key = format!("site[{i}].name");
            let name = SiteName::new(s.name.clone())
                .map_err(|e| invalid(&key, format!("{:?} {e}", s.name)))?;
            if sites.contains_key(&name) {
                return Err(invalid(key, format!("site {name} is listed twice")));
            }
            let gateways = parse_names(&s.gateways, &format!("site[{i}].gateways"))?;
            for g in &gateways {
                if let Some(other) = all_gateways.insert(g.clone(), name.clone()) {
                    return Err(invalid(
                        format!("site[{i}].gateways"),
                        format!("gateway {g} is also listed in site {other}"),
                    ));
                }
            }
            let nodes = match &s.nodes {
                None => None,
                Some(list) => {
                    let nodes = parse_names(list, &format!("site[{i}].nodes"))?;
                    if let Some(g) = gateways.iter().find(|g| !nodes.contains(*g)) {
                        return Err(invalid(
                            format!("site[{i}].nodes"),
                            format!("gateway {g} must also be listed in nodes"),
                        ));
                    }
                    Some(nodes)
                }
            };
            sites.insert(
                name.clone(),
                SiteSpec {
                    name,
                    gateways,
                    nodes,
                },
            );
        }
        let mut links = BTreeSet::new();
        for (i, l) in raw.link.iter().enumerate() {
            let key = format!("link[{i}].between");
            if l.between.len() != 2 {
                return Err(invalid(
                    key,
                    "must name exactly two sites, e.g. [\"us-east\", \"eu-west\"]",
                ));
            }
            let mut pair = Vec::with_capacity(2);
            for s in &l.between {
                let site =
                    SiteName::new(s.clone()).map_err(|e| invalid(&key, format!("{s:?} {e}")))?;
                let spec = sites.get(&site).ok_or_else(|| {
                    invalid(
                        &key,
                        format!("site {site} is not defined by a [[site]] table"),
                    )
                })?;
                if spec.gateways.is_empty() {
                    return Err(invalid(
                        &key,
                        format!(
                            "site {site} has no gateways, so it cannot be linked to another site"
                        ),
                    ));
                }
                pair.push(site);
            }
            if pair[0] == pair[1] {
                return Err(invalid(key, "a site cannot be linked to itself"));
            }
            pair.sort();
            links.insert((pair[0].clone(), pair[1].clone()));
        }
        let mut c = Contract {
            cluster,
            sites: Arc::new(sites),
            links: Arc::new(links),
            hash: String::new(),
        };
        c.hash = c.compute_hash();
        Ok(c)
    }

    fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"clusterctl-contract-v1\n");
        h.update(format!("cluster={}\n", self.cluster));
        for s in self.sites.values() {
            h.update(format!("site={}\n", s.name));
            for g in &s.gateways {
                h.update(format!(" gateway={g}\n"));
            }
            if let Some(nodes) = &s.nodes {
                for n in nodes {
                    h.update(format!(" node={n}\n"));
                }
            }
        }
        for (a, b) in self.links.iter() {
            h.update(format!("link={a},{b}\n"));
        }
        let digest = h.finalize();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Hex hash of the canonical form (16 characters).
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Every site, in name order.
    pub fn sites(&self) -> impl Iterator<Item = &SiteSpec> {
        self.sites.values()
    }

    /// One site.
    pub fn site(&self, name: &SiteName) -> Option<&SiteSpec> {
        self.sites.get(name)
    }

    /// Every allowed site pair, each ordered by name.
    pub fn links(&self) -> impl Iterator<Item = &(SiteName, SiteName)> {
        self.links.iter()
    }

    /// Whether `node` is a contract gateway of `site`.
    pub fn is_gateway(&self, site: &SiteName, node: &NodeName) -> bool {
        self.sites
            .get(site)
            .is_some_and(|s| s.gateways.contains(node))
    }

    /// Whether the contract links sites `a` and `b`.
    pub fn sites_linked(&self, a: &SiteName, b: &SiteName) -> bool {
        let key = if a <= b {
            (a.clone(), b.clone())
        } else {
            (b.clone(), a.clone())
        };
        self.links.contains(&key)
    }

    /// Sites directly linked to `site`.
    pub fn neighbours<'a>(&'a self, site: &'a SiteName) -> impl Iterator<Item = &'a SiteName> + 'a {
        self.links.iter().filter_map(move |(a, b)| {
            if a == site {
                Some(b)
            } else if b == site {
                Some(a)
            } else {
                None
            }
        })
    }

    /// Checks that `node` may exist in the cluster as it claims (site known, listed when the site
    /// lists nodes, gateway role only for contract gateways).
    pub fn check_node(&self, node: &Ident) -> Result<(), ContractRefusal> {
        let site = self
            .sites
            .get(&node.site)
            .ok_or_else(|| ContractRefusal::UnknownSite(node.site.clone()))?;
        if let Some(nodes) = &site.nodes {
            if !nodes.contains(&node.name) {
                return Err(ContractRefusal::NotListed {
                    node: node.name.clone(),
                    site: node.site.clone(),
                });
            }
        }
        if node.role == Role::Gateway && !site.gateways.contains(&node.name) {
            return Err(ContractRefusal::NotAGateway {
                node: node.name.clone(),
                site: node.site.clone(),
            });
        }
        Ok(())
    }

    /// Decides whether a link between `a` and `b` is allowed, and of which kind.
    pub fn check_link(&self, a: &Ident, b: &Ident) -> Result<LinkKind, ContractRefusal> {
        if a.name == b.name {
            return Err(ContractRefusal::SelfLink);
        }
        self.check_node(a)?;
        self.check_node(b)?;
        if a.site == b.site {
            return Ok(LinkKind::Site);
        }
        for n in [a, b] {
            if n.role != Role::Gateway {
                return Err(ContractRefusal::MemberCrossSite {
                    node: n.name.clone(),
                    site: n.site.clone(),
                });
            }
        }
        if !self.sites_linked(&a.site, &b.site) {
            return Err(ContractRefusal::SitesNotLinked(
                a.site.clone(),
                b.site.clone(),
            ));
        }
        Ok(LinkKind::Wan)
    }
}

fn parse_names(list: &[String], key: &str) -> Result<BTreeSet<NodeName>, ContractError> {
    if list.len() > MAX_PER_SITE {
        return Err(invalid(key, format!("more than {MAX_PER_SITE} names")));
    }
    let mut out = BTreeSet::new();
    for n in list {
        let name = NodeName::new(n.clone()).map_err(|e| invalid(key, format!("{n:?} {e}")))?;
        if !out.insert(name) {
            return Err(invalid(key, format!("{n} is listed twice")));
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const TWO_SITES: &str = r#"
cluster = "lab"
[[site]]
name = "us-east"
gateways = ["gw-us-1", "gw-us-2"]
[[site]]
name = "eu-west"
gateways = ["gw-eu-1"]
[[site]]
name = "ap-south"
gateways = ["gw-ap-1"]
[[link]]
between = ["us-east", "eu-west"]
"#;

    pub fn id(name: &str, site: &str, role: Role) -> Ident {
        Ident {
            name: NodeName::new(name).unwrap(),
            site: SiteName::new(site).unwrap(),
            role,
        }
    }

    #[test]
    fn same_site_members_link() {
        let c = Contract::parse(TWO_SITES).unwrap();
        let a = id("edge-us-1", "us-east", Role::Member);
        let b = id("edge-us-2", "us-east", Role::Member);
        assert_eq!(c.check_link(&a, &b), Ok(LinkKind::Site));
        let g = id("gw-us-1", "us-east", Role::Gateway);
        assert_eq!(c.check_link(&a, &g), Ok(LinkKind::Site));
    }

    #[test]
    fn member_never_links_across_sites() {
        let c = Contract::parse(TWO_SITES).unwrap();
        let a = id("edge-us-1", "us-east", Role::Member);
        let g = id("gw-eu-1", "eu-west", Role::Gateway);
        assert!(matches!(
            c.check_link(&a, &g),
            Err(ContractRefusal::MemberCrossSite { .. })
        ));
    }

    #[test]
    fn gateways_link_only_along_contract_links() {
        let c = Contract::parse(TWO_SITES).unwrap();
        let us = id("gw-us-1", "us-east", Role::Gateway);
        let eu = id("gw-eu-1", "eu-west", Role::Gateway);
        let ap = id("gw-ap-1", "ap-south", Role::Gateway);
        assert_eq!(c.check_link(&us, &eu), Ok(LinkKind::Wan));
        assert!(matches!(
            c.check_link(&us, &ap),
            Err(ContractRefusal::SitesNotLinked(..))
        ));
    }

    #[test]
    fn only_listed_gateways_act_as_gateways() {
        let c = Contract::parse(TWO_SITES).unwrap();
        let fake = id("edge-us-1", "us-east", Role::Gateway);
        assert!(matches!(
            c.check_node(&fake),
            Err(ContractRefusal::NotAGateway { .. })
        ));
    }

    #[test]
    fn listed_nodes_are_enforced() {
        let c = Contract::parse(
            r#"cluster = "c"
[[site]]
name = "s"
gateways = ["g"]
nodes = ["g", "a"]"#,
        )
        .unwrap();
        assert!(c.check_node(&id("a", "s", Role::Member)).is_ok());
        assert!(matches!(
            c.check_node(&id("b", "s", Role::Member)),
            Err(ContractRefusal::NotListed { .. })
        ));
    }

    #[test]
    fn hash_ignores_order_but_not_content() {
        let a = Contract::parse(TWO_SITES).unwrap();
        let reordered = r#"
cluster = "lab"
[[link]]
between = ["eu-west", "us-east"]
[[site]]
name = "ap-south"
gateways = ["gw-ap-1"]
[[site]]
name = "eu-west"
gateways = ["gw-eu-1"]
[[site]]
name = "us-east"
gateways = ["gw-us-2", "gw-us-1"]
"#;
        let b = Contract::parse(reordered).unwrap();
        assert_eq!(a.hash(), b.hash());
        let c = Contract::parse(&TWO_SITES.replace("gw-us-2", "gw-us-3")).unwrap();
        assert_ne!(a.hash(), c.hash());
        assert_eq!(a.hash().len(), 16);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Contract::parse("cluster = \"c\"\n[[site]]\nname = \"Bad\"\n").unwrap_err();
        assert!(e.to_string().contains("site[0].name"), "{e}");
        let e = Contract::parse(
            "cluster = \"c\"\n[[site]]\nname = \"a\"\n[[link]]\nbetween = [\"a\", \"b\"]\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("link[0].between"), "{e}");
        let e = Contract::parse("cluster = \"c\"\nsites = 1\n").unwrap_err();
        assert!(e.to_string().contains("sites"), "{e}");
        let e = Contract::parse(
            "cluster = \"c\"\n[[site]]\nname = \"a\"\ngateways=[\"g\"]\n[[site]]\nname = \"b\"\ngateways=[\"g\"]\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("also listed"), "{e}");
    }
}
