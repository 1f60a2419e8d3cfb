//! Reports: topology, members, secrets; the verdicts behind `healthy`.
//! Part of [`Engine`]: its methods for this concern; the state stays in `Engine`.

use super::*;

impl Engine {
    /// Links the contract expects, between known nodes: `(a, b, kind)` with `a < b`.
    pub fn expected_links(&self) -> Vec<(NodeName, NodeName, LinkKind)> {
        self.expected_links_with(&BTreeSet::new())
    }

    /// [`Engine::expected_links`], also with the `refused` nodes that left and came back (see
    /// [`crate::verdict`]).
    pub(super) fn expected_links_with(
        &self,
        refused: &BTreeSet<NodeName>,
    ) -> Vec<(NodeName, NodeName, LinkKind)> {
        let mut nodes: BTreeMap<NodeName, Ident> = BTreeMap::new();
        for name in refused {
            if let Some(r) = self.table.get(name.as_str()) {
                if !r.is_tombstone() && r.clock > 0 {
                    nodes.insert(r.name.clone(), r.ident());
                }
            }
        }
        for r in self.table.live() {
            if r.state == RecordState::Alive && r.clock > 0 {
                nodes.insert(r.name.clone(), r.ident());
            }
        }
        for s in self.cfg.contract.sites() {
            for g in &s.gateways {
                let known = self.table.get(g.as_str());
                if known.is_none_or(|r| r.clock == 0) {
                    nodes.insert(
                        g.clone(),
                        Ident {
                            name: g.clone(),
                            site: s.name.clone(),
                            role: Role::Gateway,
                        },
                    );
                } else if known.is_some_and(|r| r.state != RecordState::Alive)
                    && !refused.contains(g)
                {
                    nodes.remove(g);
                }
            }
        }
        let list: Vec<&Ident> = nodes.values().collect();
        let mut out = Vec::new();
        for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                if let Ok(kind) = self.cfg.contract.check_link(a, b) {
                    out.push((a.name.clone(), b.name.clone(), kind));
                }
            }
        }
        out
    }

    pub(super) fn report_of(&self, from: &NodeName, to: &NodeName) -> Option<LinkReport> {
        if *from == self.cfg.me.name {
            let own = self.own();
            let mut rep = own.links.into_iter().find(|l| l.peer == *to)?;
            if let Some(l) = self.links.get(to) {
                rep.rtt_us = l.rtt_us;
            }
            return Some(rep);
        }
        self.table
            .get(from.as_str())
            .and_then(|r| r.links.iter().find(|l| l.peer == *to).cloned())
    }

    pub(super) fn format_ms(&self, ms: u64) -> String {
        format_rfc3339_ms(ms)
    }

    pub(super) fn link_view(
        &self,
        now: Time,
        a: &NodeName,
        b: &NodeName,
        kind: LinkKind,
        expected: bool,
    ) -> LinkView {
        let ra = self.report_of(a, b);
        let rb = self.report_of(b, a);
        // Both ends' reports as published, before an unreachable end's is set aside.
        let (raw_a, raw_b) = (ra.clone(), rb.clone());
        let sa = self.status_of(a);
        let sb = self.status_of(b);
        let my_hash = self.cfg.contract.hash();
        let hash_of = |n: &NodeName| {
            self.table
                .get(n.as_str())
                .map(|r| r.contract_hash.clone())
                .unwrap_or_default()
        };
        let gone = |s: NodeStatus| {
            matches!(
                s,
                NodeStatus::Dead | NodeStatus::Left | NodeStatus::Forgotten
            )
        };
        let stale = |s: NodeStatus| s == NodeStatus::Unreachable;
        // The report of an end we cannot reach is old news: when the other end is reachable,
        // its report alone decides (a cut WAN is `down`, not `one-way` against a stale `up`).
        let (ra, rb) = match (stale(sa), stale(sb)) {
            (true, false) => (None, rb),
            (false, true) => (ra, None),
            _ => (ra, rb),
        };
        let is = |r: &Option<LinkReport>, st: LinkState| r.as_ref().is_some_and(|x| x.state == st);
        let mut reason = None;
        let state = if (stale(sa) != stale(sb)) && ra.is_none() && rb.is_none() {
            let far = if stale(sa) { a } else { b };
            reason = Some(format!("{far} is unreachable from {}", self.cfg.me.name));
            LinkState::Down
        } else if let Some(r) = [&ra, &rb]
            .into_iter()
            .flatten()
            .find(|r| r.state == LinkState::Refused)
        {
            reason = r.reason.clone();
            LinkState::Refused
        } else if let Some(r) = [&ra, &rb]
            .into_iter()
            .flatten()
            .find(|r| r.state == LinkState::OneWay)
        {
            reason = r.reason.clone();
            LinkState::OneWay
        } else if gone(sa) || gone(sb) {
            let who = if gone(sa) { (a, sa) } else { (b, sb) };
            reason = Some(format!("{} is {}", who.0, who.1));
            LinkState::Down
        } else if ra.is_none() && rb.is_none() {
            reason = Some("neither end has reported this link yet".into());
            LinkState::Missing
        } else {
            let up_a = is(&ra, LinkState::Up) || is(&ra, LinkState::Drift);
            let up_b = is(&rb, LinkState::Up) || is(&rb, LinkState::Drift);
            if up_a && up_b {
                let (ha, hb) = (hash_of(a), hash_of(b));
                if ha != my_hash
                    || hb != my_hash
                    || is(&ra, LinkState::Drift)
                    || is(&rb, LinkState::Drift)
                {
                    let odd: Vec<String> = [(a, &ha), (b, &hb)]
                        .into_iter()
                        .filter(|(_, h)| h.as_str() != my_hash)
                        .map(|(n, h)| format!("{n} runs contract {h}"))
                        .collect();
                    reason = Some(if odd.is_empty() {
                        "the two ends run different contracts".into()
                    } else {
                        format!("{} (observer runs {my_hash})", odd.join(", "))
                    });
                    LinkState::Drift
                } else {
                    LinkState::Up
                }
            } else if up_a || up_b {
                // Only one end says up: in our own view that is authoritative for our end.
                let (up_end, down_end) = if up_a { (a, b) } else { (b, a) };
                let (up_rep, down_raw) = if up_a { (&ra, &raw_b) } else { (&rb, &raw_a) };
                let up_since = up_rep.as_ref().map_or(0, |r| r.since_ms);
                // Its last word, unless that word is `up` too (set aside only because its end is
                // unreachable from here at this instant).
                let down_word = down_raw
                    .as_ref()
                    .filter(|r| !matches!(r.state, LinkState::Up | LinkState::Drift))
                    .map(|r| r.since_ms);
                if verdict::reported_since(down_word, up_since) {
                    reason = Some(format!("{up_end} reports the link up, {down_end} does not"));
                    LinkState::OneWay
                } else {
                    // The other end's last word predates the link (a link just up after a
                    // partition healed): nothing says one direction fails.
                    reason = Some(format!(
                        "{down_end} has not reported the link since it came up"
                    ));
                    LinkState::Up
                }
            } else {
                reason = [&ra, &rb]
                    .into_iter()
                    .flatten()
                    .find_map(|r| r.reason.clone());
                LinkState::Down
            }
        };
        if stale(sa) || stale(sb) {
            let note = "last report before the far site became unreachable";
            reason = Some(match reason {
                Some(r) => format!("{r}; {note}"),
                None => note.to_string(),
            });
        }
        let any = ra.as_ref().or(rb.as_ref());
        let secure = self.cfg.secure
            && [&ra, &rb].into_iter().flatten().all(|r| r.secure)
            && state != LinkState::Missing;
        let mine = if *a == self.cfg.me.name {
            self.links.get(b)
        } else if *b == self.cfg.me.name {
            self.links.get(a)
        } else {
            None
        };
        // Transport details only while a connection exists (an end reports it up); a one-way
        // link found from stalled handshakes has none.
        let connected = [&ra, &rb]
            .into_iter()
            .flatten()
            .any(|r| matches!(r.state, LinkState::Up | LinkState::Drift))
            && matches!(state, LinkState::Up | LinkState::Drift | LinkState::OneWay);
        let mine = mine.filter(|l| l.up);
        let rtt_us = match (connected, mine) {
            (true, Some(l)) => Some(l.rtt_us),
            (true, None) => any.map(|r| r.rtt_us),
            _ => None,
        };
        let protocol = match (connected, mine) {
            (true, Some(l)) => Some(l.protocol.clone()),
            (true, None) => Some(if secure {
                "tls1.3".to_string()
            } else {
                "insecure".to_string()
            }),
            _ => None,
        };
        LinkView {
            from: a.to_string(),
            to: b.to_string(),
            kind,
            state,
            secure,
            rtt_ms: rtt_us.map(|u| f64::from(u) / 1000.0),
            since: any.map(|r| self.format_ms(r.since_ms)),
            protocol,
            reason,
            expected,
            cipher_suite: (secure && connected).then(|| CIPHER_SUITE.to_string()),
            identities: [a, b]
                .iter()
                .filter_map(|n| self.table.get(n.as_str()))
                .filter_map(|r| {
                    r.cert.as_ref().map(|c| {
                        format!(
                            "{}.{}.{} ({}, cert {})",
                            r.name, r.site, self.cfg.cluster, r.role, c.leaf
                        )
                    })
                })
                .collect(),
            cert_days_left: [a, b]
                .iter()
                .filter_map(|n| self.table.get(n.as_str()).and_then(|r| r.cert.as_ref()))
                .map(|c| self.days_left(now, c.not_after_ms))
                .min(),
            secret_key: connected
                .then(|| mine.and_then(|l| l.key).or_else(|| any.and_then(|r| r.key)))
                .flatten()
                .map(|k| k.to_string()),
        }
    }

    /// Nodes refused at handshake, each with the first reason found: from this node's own
    /// refusals and every live record's refused link reports ([`verdict::refused_end`]).
    pub(super) fn refused_nodes(&self) -> BTreeMap<NodeName, String> {
        let me = &self.cfg.me.name;
        let mut out: BTreeMap<NodeName, String> = BTreeMap::new();
        for (peer, r) in &self.refused {
            if !self.links.get(peer).is_some_and(|l| l.up) {
                let end = verdict::refused_end(me, peer, &r.reason);
                out.entry(end.clone()).or_insert_with(|| r.reason.clone());
            }
        }
        for r in self.table.live().filter(|r| r.name != *me) {
            for l in r.links.iter().filter(|l| l.state == LinkState::Refused) {
                let reason = l.reason.as_deref().unwrap_or("refused");
                let end = verdict::refused_end(&r.name, &l.peer, reason);
                out.entry(end.clone()).or_insert_with(|| reason.to_string());
            }
        }
        out
    }

    /// The status each node is shown with, and why the expected nodes that are at fault make
    /// the report unhealthy ([`crate::verdict`]).
    pub(super) fn node_verdicts(&self, now: Time) -> (BTreeMap<NodeName, NodeStatus>, Vec<String>) {
        let refused = self.refused_nodes();
        let duplicates: BTreeMap<&NodeName, &str> = self
            .duplicates
            .iter()
            .filter(|(_, d)| now.saturating_sub(d.last) < DUPLICATE_EVIDENCE)
            .map(|(n, d)| (n, d.reason.as_str()))
            .collect();
        let mut names: BTreeSet<NodeName> = self
            .table
            .live()
            .filter(|r| r.clock > 0 || r.name == self.cfg.me.name)
            .map(|r| r.name.clone())
            .collect();
        let mut listed: BTreeSet<&NodeName> = BTreeSet::new();
        for s in self.cfg.contract.sites() {
            listed.extend(s.gateways.iter());
            listed.extend(s.nodes.iter().flatten());
        }
        names.extend(listed.iter().map(|n| (*n).clone()));
        names.extend(refused.keys().cloned());
        names.extend(duplicates.keys().map(|n| (*n).clone()));
        let mut out = BTreeMap::new();
        let mut problems = Vec::new();
        for name in &names {
            let in_contract = listed.contains(name);
            let status = self.status_of(name);
            // A forgotten node counts as refused only while it still knocks here.
            let refused = if status == NodeStatus::Forgotten {
                self.refused
                    .get(name)
                    .filter(|r| now.saturating_sub(r.last) < DUPLICATE_EVIDENCE)
                    .map(|r| r.reason.as_str())
            } else {
                refused.get(name).map(String::as_str)
            };
            let f = verdict::NodeFacts {
                name,
                status,
                in_contract,
                refused,
                duplicate: duplicates.get(name).copied(),
            };
            problems.extend(verdict::problem(&f));
            out.insert(name.clone(), verdict::shown_status(&f));
        }
        (out, problems)
    }

    /// The topology as this node sees it.
    pub fn topology(&self, now: Time) -> Topology {
        let my_hash = self.cfg.contract.hash().to_string();
        let mut sites: BTreeMap<SiteName, SiteView> = BTreeMap::new();
        for s in self.cfg.contract.sites() {
            sites.insert(
                s.name.clone(),
                SiteView {
                    name: s.name.to_string(),
                    nodes: Vec::new(),
                    gateways: s.gateways.iter().map(|g| g.to_string()).collect(),
                },
            );
        }
        let (facts, problems) = self.node_verdicts(now);
        for r in self.table.live() {
            if r.clock == 0 && r.name != self.cfg.me.name {
                continue;
            }
            let view = NodeView {
                name: r.name.to_string(),
                site: r.site.to_string(),
                role: r.role,
                status: facts
                    .get(&r.name)
                    .copied()
                    .unwrap_or_else(|| self.status_of(&r.name)),
                clock: r.clock,
                addr: r.addr.clone(),
                contract_hash: r.contract_hash.clone(),
                drift: r.contract_hash != my_hash,
            };
            sites
                .entry(r.site.clone())
                .or_insert_with(|| SiteView {
                    name: r.site.to_string(),
                    nodes: Vec::new(),
                    gateways: Vec::new(),
                })
                .nodes
                .push(view);
        }
        let refused_nodes: BTreeSet<NodeName> = facts
            .iter()
            .filter(|(_, s)| **s == NodeStatus::Refused)
            .map(|(n, _)| n.clone())
            .collect();
        let expected = self.expected_links_with(&refused_nodes);
        let mut links: Vec<LinkView> = expected
            .iter()
            .map(|(a, b, k)| self.link_view(now, a, b, *k, true))
            .collect();
        // Refused links the contract does not expect are shown too: they are what an operator
        // needs to see (a member dialing another site, a node of another cluster).
        let expected_set: BTreeSet<(NodeName, NodeName)> = expected
            .iter()
            .map(|(a, b, _)| (a.clone(), b.clone()))
            .collect();
        let mut extra: BTreeSet<(NodeName, NodeName)> = BTreeSet::new();
        for r in self.table.live() {
            for l in &r.links {
                if l.state == LinkState::Refused {
                    let pair = if r.name < l.peer {
                        (r.name.clone(), l.peer.clone())
                    } else {
                        (l.peer.clone(), r.name.clone())
                    };
                    if !expected_set.contains(&pair) {
                        extra.insert(pair);
                    }
                }
            }
        }
        for (a, b) in extra {
            let kind = match (self.table.get(a.as_str()), self.table.get(b.as_str())) {
                (Some(x), Some(y)) if x.site != y.site => LinkKind::Wan,
                _ => LinkKind::Site,
            };
            links.push(self.link_view(now, &a, &b, kind, false));
        }
        let mut problems: Vec<String> = problems;
        problems.extend(
            links
                .iter()
                .filter(|l| l.expected && l.state != LinkState::Up)
                .map(|l| {
                    format!(
                        "{} link {} - {} is {}{}",
                        l.kind.as_str(),
                        l.from,
                        l.to,
                        l.state.as_str(),
                        l.reason
                            .as_ref()
                            .map_or_else(String::new, |r| format!(": {r}"))
                    )
                }),
        );
        let healthy = problems.is_empty();
        let insecure_nodes: Vec<String> = self
            .table
            .live()
            .filter(|r| r.clock > 0 && !r.secure)
            .map(|r| r.name.to_string())
            .collect();
        let insecure_links = links
            .iter()
            .filter(|l| l.state == LinkState::Up && !l.secure)
            .count();
        let (mut warnings, expired) = self.cert_warnings(now);
        warnings.extend(self.seed_drift());
        let secure = self.cfg.secure
            && insecure_nodes.is_empty()
            && insecure_links == 0
            && expired.is_empty();
        let insecure_reason = (!secure).then(|| {
            if !expired.is_empty() {
                expired.join("; ")
            } else if !self.cfg.secure {
                format!(
                    "{} runs with insecure = true (no authentication)",
                    self.cfg.me.name
                )
            } else if !insecure_nodes.is_empty() {
                format!("nodes running insecure: {}", insecure_nodes.join(", "))
            } else {
                format!("{insecure_links} link(s) are not mutually authenticated")
            }
        });
        Topology {
            cluster: self.cfg.cluster.to_string(),
            observer: self.cfg.me.name.to_string(),
            contract_hash: my_hash,
            secure,
            insecure_reason,
            healthy,
            problems,
            sites: sites.into_values().collect(),
            links,
            probes: None,
            warnings: std::mem::take(&mut warnings),
            generated_at: self.format_ms(self.wall_ms(now)),
        }
    }

    /// Every node in the table with its status.
    pub fn members(&self) -> Members {
        let members = self
            .table
            .iter()
            .filter(|r| r.clock > 0 || r.name == self.cfg.me.name)
            .map(|r| MemberView {
                name: r.name.to_string(),
                site: r.site.to_string(),
                role: r.role,
                status: self.status_of(&r.name),
                clock: r.clock,
                addr: r.addr.clone(),
                contract_hash: r.contract_hash.clone(),
                version: r.version.clone(),
                links_up: if r.name == self.cfg.me.name {
                    self.links.values().filter(|l| l.up).count() as u32
                } else {
                    r.links.iter().filter(|l| l.state == LinkState::Up).count() as u32
                },
            })
            .collect();
        let secure = self.cfg.secure && self.table.live().all(|r| r.clock == 0 || r.secure);
        Members {
            cluster: self.cfg.cluster.to_string(),
            observer: self.cfg.me.name.to_string(),
            secure,
            members,
        }
    }
}
