//! The node table: one record per node, last-writer-wins by a clock that only rises.
//!
//! The design follows the erlang-questions thread the project grew from:
//! - every record carries a `clock`; a record replaces another only if its clock is higher;
//! - the owner bumps its clock on every change and on every restart (the table is persisted);
//! - removal writes a tombstone (`Forgotten`) with a higher clock, so the node is not gossiped
//!   back into existence;
//! - a re-deployed node with an empty disk learns the last clock its peers saw for its name and
//!   comes back above it.
//!
//! Ties (equal clocks, different content) are broken deterministically so every node converges
//! on the same record: tombstone beats left beats alive, then the larger encoding wins.
//!
//! Everything here is bounded: see the `MAX_*` constants and [`NodeRecord::validate`].

use crate::name::{Ident, NodeName, SiteName};
use crate::secret::KeyId;
use clusterctl_api::{LinkState, Role};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// Most records a table holds (tombstones included).
pub const MAX_RECORDS: usize = 16_384;
/// Longest address string.
pub const MAX_ADDR_LEN: usize = 128;
/// Longest free-text field (reasons, versions, hashes).
pub const MAX_TEXT_LEN: usize = 256;
/// Most link reports in one record.
pub const MAX_LINKS: usize = 1_024;
/// Most entries in a gateway's `reach` or `view`.
pub const MAX_VIEW: usize = 4_096;

/// What the owner (or an operator, for tombstones) says about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RecordState {
    /// Running (as far as its owner last said).
    Alive,
    /// Left gracefully.
    Left,
    /// Removed by an operator: a tombstone.
    Forgotten,
}

/// The liveness of a node as its own site's failure detector sees it; gateways publish this for
/// their site so that other sites learn who is dead without crossing the WAN with probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Liveness {
    Alive,
    Suspect,
    Dead,
}

/// The certificate a node presents: short fingerprints (16 hex characters of a SHA-256) and
/// validity, published so that `certs status` and expiry warnings work cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertSummary {
    pub leaf: String,
    /// The CA of the node's bundle that issued its certificate.
    pub issuer: String,
    /// Every CA of the node's bundle.
    pub trusts: Vec<String>,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

/// Most CAs listed in a [`CertSummary`].
pub const MAX_TRUSTS: usize = 16;

/// One link as its reporting end sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkReport {
    pub peer: NodeName,
    /// `Up`, `Down`, `Refused` or `Drift` (the other states are derived when reports are combined).
    #[serde(with = "crate::wire::link_state_on_wire")]
    pub state: LinkState,
    /// Smoothed transport RTT in microseconds when the report was written.
    pub rtt_us: u32,
    /// Wall-clock milliseconds since the Unix epoch when the link entered `state`.
    pub since_ms: u64,
    /// Mutually authenticated TLS (false for `insecure` links).
    pub secure: bool,
    /// Refusal or drift reason.
    pub reason: Option<String>,
    /// The cluster secret both ends proved on this link.
    pub key: Option<KeyId>,
}

/// One node's entry in the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: NodeName,
    pub site: SiteName,
    #[serde(with = "crate::wire::role_on_wire")]
    pub role: Role,
    /// Only rises. Higher wins.
    pub clock: u64,
    pub state: RecordState,
    /// Cluster (QUIC) address the node advertises.
    pub addr: String,
    pub contract_hash: String,
    pub version: String,
    /// False when the node runs with `insecure = true`.
    pub secure: bool,
    /// The node's own links.
    pub links: Vec<LinkReport>,
    /// Gateways only: remote sites this gateway currently reaches over the WAN.
    pub reach: Vec<SiteName>,
    /// Gateways only: liveness of the nodes of its own site, from the site's failure detector.
    pub view: Vec<(NodeName, Liveness)>,
    /// Fingerprints of the cluster secrets the node holds, the one in use first.
    pub keys: Vec<KeyId>,
    /// The certificate the node presents (None when insecure).
    pub cert: Option<CertSummary>,
    /// Gateways on two networks: the address gateways of other sites dial (`advertise-wan`);
    /// `addr` is then the one its own site dials.
    pub wan_addr: Option<String>,
}

/// A record that breaks a bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("{field} is {len} long; the limit is {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
}

fn cap(field: &'static str, len: usize, max: usize) -> Result<(), RecordError> {
    if len > max {
        Err(RecordError::TooLong { field, len, max })
    } else {
        Ok(())
    }
}

impl NodeRecord {
    /// A fresh alive record for `ident`.
    pub fn new(
        ident: &Ident,
        clock: u64,
        addr: String,
        contract_hash: String,
        version: String,
        secure: bool,
    ) -> Self {
        NodeRecord {
            name: ident.name.clone(),
            site: ident.site.clone(),
            role: ident.role,
            clock,
            state: RecordState::Alive,
            addr,
            contract_hash,
            version,
            secure,
            links: Vec::new(),
            reach: Vec::new(),
            view: Vec::new(),
            keys: Vec::new(),
            cert: None,
            wan_addr: None,
        }
    }

    /// Who the record is about.
    pub fn ident(&self) -> Ident {
        Ident {
            name: self.name.clone(),
            site: self.site.clone(),
            role: self.role,
        }
    }

    /// A tombstone for `name` (operator `forget`).
    pub fn tombstone(prev: &NodeRecord, clock: u64) -> Self {
        NodeRecord {
            clock,
            state: RecordState::Forgotten,
            links: Vec::new(),
            reach: Vec::new(),
            view: Vec::new(),
            keys: Vec::new(),
            ..prev.clone()
        }
    }

    /// Checks every bound; names were already validated while decoding.
    pub fn validate(&self) -> Result<(), RecordError> {
        cap("addr", self.addr.len(), MAX_ADDR_LEN)?;
        cap(
            "wan_addr",
            self.wan_addr.as_ref().map_or(0, String::len),
            MAX_ADDR_LEN,
        )?;
        cap("contract_hash", self.contract_hash.len(), MAX_TEXT_LEN)?;
        cap("version", self.version.len(), MAX_TEXT_LEN)?;
        cap("links", self.links.len(), MAX_LINKS)?;
        cap("reach", self.reach.len(), MAX_VIEW)?;
        cap("view", self.view.len(), MAX_VIEW)?;
        cap("keys", self.keys.len(), crate::secret::MAX_KEYS)?;
        if let Some(c) = &self.cert {
            cap("cert.trusts", c.trusts.len(), MAX_TRUSTS)?;
            for t in c.trusts.iter().chain([&c.leaf, &c.issuer]) {
                cap("cert fingerprint", t.len(), 64)?;
            }
        }
        for l in &self.links {
            if let Some(r) = &l.reason {
                cap("links[].reason", r.len(), MAX_TEXT_LEN)?;
            }
        }
        Ok(())
    }

    /// Whether this record is a tombstone.
    pub fn is_tombstone(&self) -> bool {
        self.state == RecordState::Forgotten
    }

    /// Total order used to break clock ties: the greater record wins.
    fn tie_key(&self) -> (RecordState, Vec<u8>) {
        (self.state, postcard::to_allocvec(self).unwrap_or_default())
    }

    /// Whether `self` should replace `other` (same name).
    pub fn supersedes(&self, other: &NodeRecord) -> bool {
        match self.clock.cmp(&other.clock) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => self != other && self.tie_key() > other.tie_key(),
        }
    }
}

/// What [`NodeTable::merge`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// New name: inserted.
    Inserted,
    /// Replaced an older record.
    Replaced,
    /// Not newer than what the table holds: ignored.
    Stale,
    /// Refused: the table is full (counted; nothing changed).
    Full,
    /// Refused: the record breaks a bound (counted; nothing changed).
    Invalid,
}

impl Merge {
    /// Whether the table changed.
    pub fn changed(self) -> bool {
        matches!(self, Merge::Inserted | Merge::Replaced)
    }
}

/// How many recent changes [`NodeTable::changed_since`] answers from its log instead of a
/// scan of the whole table.
pub const CHANGE_LOG: usize = 128;

/// One stored record and the generation at which it was stored.
#[derive(Debug, Clone)]
struct Entry {
    /// Shared: a record received once is held, forwarded and persisted without copies.
    rec: Arc<NodeRecord>,
    stamp: u64,
}

/// The table itself: bounded, ordered by name.
///
/// Records are stored behind an [`Arc`], so forwarding a record, sending it in a frame or
/// persisting it does not copy it (and a simulator that hands frames over in memory holds one
/// copy of each version for all of its nodes).
#[derive(Debug, Clone, Default)]
pub struct NodeTable {
    records: BTreeMap<NodeName, Entry>,
    /// Names of the records with the gateway role, by site (tombstones included): reading a
    /// site's gateway views must not scan the whole table.
    gateways: BTreeMap<SiteName, BTreeSet<NodeName>>,
    /// Rises on every change of the table.
    generation: u64,
    /// The last [`CHANGE_LOG`] changes: generation and name, oldest first.
    log: VecDeque<(u64, NodeName)>,
    /// XOR of [`entry_hash`] over every `(name, clock)`: see [`NodeTable::summary`].
    hash: u64,
    /// The same per site: see [`NodeTable::site_summaries`].
    sites: BTreeMap<SiteName, Summary>,
    /// Records refused because they broke a bound or the table was full.
    pub refused: u64,
}

/// What a table holds, in 12 bytes: the number of records and a 64-bit hash of every
/// `(name, clock)` pair. Two tables with equal summaries hold the same versions (up to a hash
/// collision, which only delays a repair until a record changes again).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Summary {
    pub records: u32,
    pub hash: u64,
}

/// The hash of one `(name, clock)` pair: FNV-1a over the name, then the clock, finished with
/// the splitmix64 mixer. Fixed here (not `std`'s hasher) because peers of different builds
/// compare it.
pub fn entry_hash(name: &str, clock: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes().chain(clock.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl PartialEq for NodeTable {
    fn eq(&self, other: &Self) -> bool {
        self.records.len() == other.records.len()
            && self
                .records
                .values()
                .zip(other.records.values())
                .all(|(a, b)| a.rec == b.rec)
            && self.refused == other.refused
    }
}

impl NodeTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a table from restored records (invalid ones are dropped and counted).
    pub fn from_records<R: Into<Arc<NodeRecord>>>(records: impl IntoIterator<Item = R>) -> Self {
        let mut t = NodeTable::new();
        for r in records {
            t.merge(r);
        }
        t
    }

    /// Merges one record by the clock rule (an owned record or a shared one).
    pub fn merge(&mut self, rec: impl Into<Arc<NodeRecord>>) -> Merge {
        let rec = rec.into();
        if rec.validate().is_err() {
            self.refused += 1;
            return Merge::Invalid;
        }
        match self.records.get(&rec.name) {
            Some(cur) => {
                // The very same version (shared): nothing to compare.
                if !Arc::ptr_eq(&rec, &cur.rec) && rec.supersedes(&cur.rec) {
                    self.insert(rec);
                    Merge::Replaced
                } else {
                    Merge::Stale
                }
            }
            None => {
                if self.records.len() >= MAX_RECORDS {
                    self.refused += 1;
                    return Merge::Full;
                }
                self.insert(rec);
                Merge::Inserted
            }
        }
    }

    /// Stores a record, keeping the gateway index, the generation and the hash up to date.
    fn insert(&mut self, rec: Arc<NodeRecord>) {
        self.generation += 1;
        let h = entry_hash(rec.name.as_str(), rec.clock);
        self.hash ^= h;
        let site = self.sites.entry(rec.site.clone()).or_default();
        site.records += 1;
        site.hash ^= h;
        if rec.role == Role::Gateway {
            self.gateways
                .entry(rec.site.clone())
                .or_default()
                .insert(rec.name.clone());
        }
        let entry = Entry {
            rec: rec.clone(),
            stamp: self.generation,
        };
        if self.log.len() == CHANGE_LOG {
            self.log.pop_front();
        }
        self.log.push_back((self.generation, rec.name.clone()));
        if let Some(old) = self.records.insert(rec.name.clone(), entry) {
            let old = old.rec;
            let h = entry_hash(old.name.as_str(), old.clock);
            self.hash ^= h;
            if let Some(site) = self.sites.get_mut(&old.site) {
                site.records -= 1;
                site.hash ^= h;
                if site.records == 0 {
                    self.sites.remove(&old.site);
                }
            }
            if old.role == Role::Gateway && (rec.role != Role::Gateway || rec.site != old.site) {
                if let Some(set) = self.gateways.get_mut(&old.site) {
                    set.remove(&old.name);
                    if set.is_empty() {
                        self.gateways.remove(&old.site);
                    }
                }
            }
        }
    }

    /// A number that rises on every change of the table: equal generations, same content.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Records stored after generation `generation`, each once (what an incremental snapshot
    /// must write). Costs the number of changes when they are among the last [`CHANGE_LOG`],
    /// else one pass over the table.
    pub fn changed_since(&self, generation: u64) -> Vec<&Arc<NodeRecord>> {
        if generation >= self.generation {
            return Vec::new();
        }
        let logged = self
            .log
            .front()
            .is_some_and(|(first, _)| *first <= generation + 1);
        if logged {
            // Generations are consecutive: the log holds every change after `generation`. A
            // name stored twice is yielded at its last stamp only.
            self.log
                .iter()
                .filter(|(g, _)| *g > generation)
                .filter_map(|(g, n)| self.records.get(n).filter(|e| e.stamp == *g))
                .map(|e| &e.rec)
                .collect()
        } else {
            self.records
                .values()
                .filter(|e| e.stamp > generation)
                .map(|e| &e.rec)
                .collect()
        }
    }

    /// Records with the gateway role in `site` (tombstones included), in name order.
    pub fn gateways_of<'a>(&'a self, site: &SiteName) -> impl Iterator<Item = &'a NodeRecord> {
        self.gateways
            .get(site)
            .into_iter()
            .flatten()
            .filter_map(|n| self.get(n.as_str()))
    }

    /// Sets a record unconditionally (the owner writing its own record, which it has already
    /// made newer). Returns false when the table is full.
    pub fn put_own(&mut self, rec: NodeRecord) -> bool {
        debug_assert!(self
            .records
            .get(&rec.name)
            .is_none_or(|cur| rec.clock >= cur.rec.clock));
        if !self.records.contains_key(&rec.name) && self.records.len() >= MAX_RECORDS {
            return false;
        }
        self.insert(Arc::new(rec));
        true
    }

    /// One record.
    pub fn get(&self, name: &str) -> Option<&NodeRecord> {
        self.records.get(name).map(|e| &*e.rec)
    }

    /// One record, shared (to send or forward it without a copy).
    pub fn get_shared(&self, name: &str) -> Option<&Arc<NodeRecord>> {
        self.records.get(name).map(|e| &e.rec)
    }

    /// Every record in name order.
    pub fn iter(&self) -> impl Iterator<Item = &NodeRecord> {
        self.records.values().map(|e| &*e.rec)
    }

    /// Live records (not tombstones) in name order.
    pub fn live(&self) -> impl Iterator<Item = &NodeRecord> {
        self.iter().filter(|r| !r.is_tombstone())
    }

    /// Number of records, tombstones included.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The number of records and the hash of every `(name, clock)`: what a peer compares with
    /// its own before asking for the full [`NodeTable::digest`]. Kept up to date on every
    /// change, so reading it costs nothing.
    pub fn summary(&self) -> Summary {
        Summary {
            records: u32::try_from(self.records.len()).unwrap_or(u32::MAX),
            hash: self.hash,
        }
    }

    /// [`NodeTable::summary`] of each site's records, in site order: when two tables differ,
    /// what tells which sites to compare record by record.
    pub fn site_summaries(&self) -> Vec<(SiteName, Summary)> {
        self.sites.iter().map(|(s, x)| (s.clone(), *x)).collect()
    }

    /// The sites whose summary differs between this table and `theirs` (a site one side lacks
    /// included), in site order.
    pub fn sites_differing(&self, theirs: &[(SiteName, Summary)]) -> Vec<SiteName> {
        let theirs: BTreeMap<&SiteName, &Summary> = theirs.iter().map(|(s, x)| (s, x)).collect();
        let mut out: BTreeSet<SiteName> = self
            .sites
            .iter()
            .filter(|(s, x)| theirs.get(s) != Some(x))
            .map(|(s, _)| s.clone())
            .collect();
        out.extend(
            theirs
                .keys()
                .filter(|s| !self.sites.contains_key(**s))
                .map(|s| (*s).clone()),
        );
        out.into_iter().collect()
    }

    /// `(name, clock)` of every record: what anti-entropy compares.
    pub fn digest(&self) -> Vec<(NodeName, u64)> {
        self.iter().map(|r| (r.name.clone(), r.clock)).collect()
    }

    /// `(name, clock)` of every record of `sites` (sorted): a digest of part of the table.
    pub fn digest_of(&self, sites: &[SiteName]) -> Vec<(NodeName, u64)> {
        self.iter()
            .filter(|r| sites.binary_search(&r.site).is_ok())
            .map(|r| (r.name.clone(), r.clock))
            .collect()
    }

    /// Records that are newer here than in `digest`, or absent from it.
    pub fn newer_than(&self, digest: &[(NodeName, u64)]) -> Vec<Arc<NodeRecord>> {
        self.newer_than_in(digest, None)
    }

    /// [`NodeTable::newer_than`] among the records of `sites` (sorted) only, or of every site
    /// when `None`.
    pub fn newer_than_in(
        &self,
        digest: &[(NodeName, u64)],
        sites: Option<&[SiteName]>,
    ) -> Vec<Arc<NodeRecord>> {
        let theirs: BTreeMap<&NodeName, u64> = digest.iter().map(|(n, c)| (n, *c)).collect();
        self.records
            .values()
            .filter(|e| sites.is_none_or(|s| s.binary_search(&e.rec.site).is_ok()))
            .filter(|e| theirs.get(&e.rec.name).is_none_or(|c| e.rec.clock > *c))
            .map(|e| e.rec.clone())
            .collect()
    }

    /// Whether `digest` names a record newer than ours (or one we lack).
    pub fn behind(&self, digest: &[(NodeName, u64)]) -> bool {
        digest
            .iter()
            .any(|(n, c)| self.get(n.as_str()).is_none_or(|r| *c > r.clock))
    }

    /// Highest clock in the table (used to place tombstones above everything seen).
    pub fn max_clock(&self) -> u64 {
        self.iter().map(|r| r.clock).max().unwrap_or(0)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn rec(name: &str, site: &str, clock: u64) -> NodeRecord {
        NodeRecord::new(
            &Ident {
                name: NodeName::new(name).unwrap(),
                site: SiteName::new(site).unwrap(),
                role: Role::Member,
            },
            clock,
            "127.0.0.1:7400".into(),
            "h".into(),
            "0.1.0".into(),
            true,
        )
    }

    #[test]
    fn higher_clock_wins() {
        let mut t = NodeTable::new();
        assert_eq!(t.merge(rec("a", "s", 1)), Merge::Inserted);
        let mut newer = rec("a", "s", 2);
        newer.addr = "127.0.0.2:7400".into();
        assert_eq!(t.merge(newer.clone()), Merge::Replaced);
        assert_eq!(t.merge(rec("a", "s", 1)), Merge::Stale);
        assert_eq!(t.get("a").unwrap(), &newer);
    }

    #[test]
    fn ties_break_the_same_way_everywhere() {
        let a = rec("a", "s", 5);
        let mut b = rec("a", "s", 5);
        b.addr = "127.0.0.9:1".into();
        let mut t1 = NodeTable::new();
        t1.merge(a.clone());
        t1.merge(b.clone());
        let mut t2 = NodeTable::new();
        t2.merge(b);
        t2.merge(a);
        assert_eq!(t1.get("a"), t2.get("a"));
    }

    #[test]
    fn tombstone_beats_alive_at_equal_clock_and_keeps_node_out() {
        let alive = rec("a", "s", 7);
        let stone = NodeRecord::tombstone(&alive, 7);
        let mut t = NodeTable::new();
        t.merge(stone.clone());
        assert_eq!(t.merge(alive.clone()), Merge::Stale);
        // gossip of any older record cannot bring it back
        assert_eq!(t.merge(rec("a", "s", 3)), Merge::Stale);
        assert!(t.get("a").unwrap().is_tombstone());
        assert_eq!(t.live().count(), 0);
        // only a higher clock (an explicit rejoin) replaces it
        assert_eq!(t.merge(rec("a", "s", 8)), Merge::Replaced);
    }

    #[test]
    fn restart_comes_back_higher_and_redeploy_learns_clock() {
        // node persisted clock 4, restarts -> 5, which replaces 4 everywhere
        let mut peer = NodeTable::new();
        peer.merge(rec("a", "s", 4));
        assert_eq!(peer.merge(rec("a", "s", 5)), Merge::Replaced);
        // re-deployed with empty disk: clock 0 is stale, the digest tells it what to beat
        assert_eq!(peer.merge(rec("a", "s", 0)), Merge::Stale);
        let seen = peer
            .digest()
            .into_iter()
            .find(|(n, _)| n.as_str() == "a")
            .unwrap()
            .1;
        assert_eq!(peer.merge(rec("a", "s", seen + 1)), Merge::Replaced);
    }

    #[test]
    fn caps_are_enforced() {
        let mut t = NodeTable::new();
        let mut big = rec("a", "s", 1);
        big.addr = "x".repeat(MAX_ADDR_LEN + 1);
        assert_eq!(t.merge(big), Merge::Invalid);
        assert_eq!(t.refused, 1);
        assert!(t.is_empty());
    }

    #[test]
    fn table_is_bounded() {
        let mut t = NodeTable::new();
        for i in 0..MAX_RECORDS {
            assert_eq!(t.merge(rec(&format!("n{i}"), "s", 1)), Merge::Inserted);
        }
        assert_eq!(t.merge(rec("one-too-many", "s", 1)), Merge::Full);
        assert_eq!(t.len(), MAX_RECORDS);
    }

    #[test]
    fn digest_exchange_finds_differences() {
        let mut a = NodeTable::new();
        let mut b = NodeTable::new();
        a.merge(rec("x", "s", 3));
        b.merge(rec("x", "s", 1));
        b.merge(rec("y", "s", 1));
        assert!(b.behind(&a.digest()));
        let send = a.newer_than(&b.digest());
        assert_eq!(send.len(), 1);
        for r in send {
            b.merge(r);
        }
        for r in b.newer_than(&a.digest()) {
            a.merge(r);
        }
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn changed_since_is_the_same_from_the_log_and_from_a_scan() {
        let mut t = NodeTable::new();
        let mut gens = vec![0];
        for i in 0..(CHANGE_LOG as u64 * 3) {
            t.merge(rec(&format!("n{}", i % 50), "s", i + 1));
            gens.push(t.generation());
        }
        for g in gens {
            let mut fast: Vec<(NodeName, u64)> = t
                .changed_since(g)
                .iter()
                .map(|r| (r.name.clone(), r.clock))
                .collect();
            fast.sort();
            let scan: Vec<(NodeName, u64)> = t
                .records
                .values()
                .filter(|e| e.stamp > g)
                .map(|e| (e.rec.name.clone(), e.rec.clock))
                .collect();
            assert_eq!(fast, scan, "since generation {g}");
        }
    }

    #[test]
    fn summary_follows_every_change_and_matches_equal_tables() {
        let mut a = NodeTable::new();
        let mut b = NodeTable::new();
        assert_eq!(a.summary(), b.summary());
        a.merge(rec("x", "s", 1));
        assert_ne!(a.summary(), b.summary());
        b.merge(rec("x", "s", 1));
        assert_eq!(a.summary(), b.summary());
        // A newer version changes it; the same version again does not.
        a.merge(rec("x", "s", 2));
        let after = a.summary();
        assert_ne!(after, b.summary());
        a.merge(rec("x", "s", 2));
        assert_eq!(a.summary(), after);
        b.merge(rec("x", "s", 2));
        assert_eq!(a.summary(), b.summary());
        // Same clocks under other names differ.
        let mut c = NodeTable::new();
        c.merge(rec("y", "s", 2));
        assert_ne!(c.summary(), b.summary());
        assert_eq!(c.summary().records, b.summary().records);
    }

    #[test]
    fn site_summaries_point_at_the_sites_that_differ() {
        let mut a = NodeTable::new();
        let mut b = NodeTable::new();
        for t in [&mut a, &mut b] {
            t.merge(rec("x1", "sx", 1));
            t.merge(rec("y1", "sy", 1));
        }
        assert!(a.sites_differing(&b.site_summaries()).is_empty());
        a.merge(rec("y1", "sy", 2));
        a.merge(rec("z1", "sz", 1));
        let sy = SiteName::new("sy").unwrap();
        let sz = SiteName::new("sz").unwrap();
        assert_eq!(
            a.sites_differing(&b.site_summaries()),
            vec![sy.clone(), sz.clone()]
        );
        assert_eq!(
            b.sites_differing(&a.site_summaries()),
            vec![sy.clone(), sz.clone()]
        );
        // A scoped exchange repairs exactly those sites.
        let sites = b.sites_differing(&a.site_summaries());
        let send = a.newer_than_in(&b.digest_of(&sites), Some(&sites));
        assert_eq!(send.len(), 2);
        for r in send {
            b.merge(r);
        }
        assert_eq!(a.summary(), b.summary());
        assert_eq!(a.site_summaries(), b.site_summaries());
        // Per-site summaries add up to the whole.
        let total = a
            .site_summaries()
            .iter()
            .fold(Summary::default(), |acc, (_, x)| Summary {
                records: acc.records + x.records,
                hash: acc.hash ^ x.hash,
            });
        assert_eq!(total, a.summary());
    }

    #[test]
    fn entry_hash_is_fixed() {
        // Peers of different builds compare summaries: the hash must never change.
        assert_eq!(entry_hash("", 0), entry_hash("", 0));
        assert_ne!(entry_hash("a", 1), entry_hash("a", 2));
        assert_ne!(entry_hash("a", 1), entry_hash("b", 1));
        // FNV-1a of "node-a" and 7u64 (little-endian), splitmix64-finished: computed apart.
        assert_eq!(entry_hash("node-a", 7), 0xeb84_6ee7_e926_3821_u64);
    }

    fn arb_record() -> impl Strategy<Value = NodeRecord> {
        (0u8..6, 0u64..6, 0u8..3, 0u8..4).prop_map(|(n, clock, st, addr)| {
            let mut r = rec(&format!("n{n}"), "s", clock);
            r.state = match st {
                0 => RecordState::Alive,
                1 => RecordState::Left,
                _ => RecordState::Forgotten,
            };
            r.addr = format!("127.0.0.{addr}:7400");
            r
        })
    }

    proptest! {
        /// Merge is commutative and idempotent: any delivery order converges on one table.
        #[test]
        fn merge_converges_in_any_order(mut recs in prop::collection::vec(arb_record(), 0..40), seed in any::<u64>()) {
            let mut a = NodeTable::new();
            for r in &recs { a.merge(r.clone()); }
            // a deterministic shuffle from the seed, plus duplicates
            let mut s = seed;
            for i in (1..recs.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                recs.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut b = NodeTable::new();
            for r in recs.iter().chain(recs.iter()) { b.merge(r.clone()); }
            prop_assert!(a == b);
            prop_assert_eq!(a.summary(), b.summary());
        }

        /// A clock never goes down for any name.
        #[test]
        fn clocks_never_fall(recs in prop::collection::vec(arb_record(), 0..40)) {
            let mut t = NodeTable::new();
            let mut seen: BTreeMap<NodeName, u64> = BTreeMap::new();
            for r in recs {
                t.merge(r);
                for cur in t.iter() {
                    let prev = seen.insert(cur.name.clone(), cur.clock).unwrap_or(0);
                    prop_assert!(cur.clock >= prev);
                }
            }
        }
    }
}
