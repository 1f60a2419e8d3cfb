//! Failure detection: the site and WAN rings, node statuses and their basis.
//! Part of [`Engine`]: its methods for this concern; the state stays in `Engine`.

use super::*;

impl Engine {
    pub(super) fn drain_rings(&mut self, now: Time) {
        let mut changed = false;
        for ring in [Ring::Site, Ring::Wan] {
            let (sends, changes) = match ring {
                Ring::Site => (self.site_ring.take_sends(), self.site_ring.take_changes()),
                Ring::Wan => match self.wan_ring.as_mut() {
                    Some(w) => (w.take_sends(), w.take_changes()),
                    None => continue,
                },
            };
            if ring == Ring::Site {
                for c in &changes {
                    if c.from == Some(Liveness::Dead) && c.to == Liveness::Alive {
                        self.revived.insert(c.name.clone(), now);
                    } else if c.to == Liveness::Dead {
                        self.revived.remove(&c.name);
                    }
                }
            }
            for (to, data) in sends {
                let ok_kind = match ring {
                    Ring::Site => LinkKind::Site,
                    Ring::Wan => LinkKind::Wan,
                };
                if self
                    .links
                    .get(&to)
                    .is_some_and(|l| l.up && l.kind == ok_kind)
                {
                    self.push(Output::Datagram {
                        to,
                        bytes: encode_swim(ring, &data),
                    });
                } else {
                    self.counters.datagrams_dropped += 1;
                }
            }
            changed |= !changes.is_empty();
            if ring == Ring::Site {
                self.status_basis
                    .ring
                    .extend(changes.into_iter().map(|c| c.name));
            }
        }
        if changed {
            self.refresh_own(now, false);
            // A gateway's view is how other sites learn that a node of its site is alive or
            // dead: the first change in a tick goes out at once, later ones with the tick (so
            // a cold start, where the view changes with every member, still coalesces).
            if self.cfg.me.role == Role::Gateway
                && now.saturating_sub(self.view_flushed) >= self.cfg.timing.tick
            {
                self.view_flushed = now;
                self.flush_own();
            }
            self.diff_statuses(now);
        }
    }

    /// Whether this node currently has a path to site `site`.
    pub fn site_reachable(&self, site: &SiteName) -> bool {
        if *site == self.cfg.me.site {
            return true;
        }
        if self.wan_reach().any(|s| s == site) {
            return true;
        }
        self.local_gateways_reaching(site).next().is_some()
    }

    /// The sites a gateway reaches over its own WAN links: links up whose far gateway the WAN
    /// ring does not hold dead. A link the ring already declared dead still looks up until its
    /// transport times out (longer when only our sends are lost: the far end's packets keep it
    /// alive); the `reach` our record publishes, which our members go by, drops it at once, and so
    /// must our own view. Empty for a member.
    pub(super) fn wan_reach(&self) -> impl Iterator<Item = &SiteName> + '_ {
        let gateway = self.cfg.me.role == Role::Gateway;
        self.links
            .values()
            .filter(move |l| gateway && l.up && l.kind == LinkKind::Wan)
            .filter(|l| {
                self.wan_ring
                    .as_ref()
                    .and_then(|w| w.liveness(&l.ident.name))
                    .is_none_or(|lv| lv != Liveness::Dead)
            })
            .map(|l| &l.ident.site)
    }

    /// Live gateways of our own site (other than us) that report reaching `site`.
    pub(super) fn local_gateways_reaching<'a>(
        &'a self,
        site: &'a SiteName,
    ) -> impl Iterator<Item = &'a NodeName> + 'a {
        self.links
            .iter()
            .filter(move |(n, l)| {
                l.up && l.kind == LinkKind::Site
                    && l.ident.role == Role::Gateway
                    && self.site_ring.liveness(n) != Some(Liveness::Dead)
                    && self
                        .table
                        .get(n.as_str())
                        .is_some_and(|r| r.reach.contains(site))
            })
            .map(|(n, _)| n)
    }

    /// The status of `name` as this node last reported it (in events): [`Engine::status_of`]
    /// as of the last tick or failure-detector change, read without computing anything.
    pub fn reported_status(&self, name: &NodeName) -> Option<NodeStatus> {
        self.statuses.get(name).copied()
    }

    /// How many nodes this node last reported as `status`.
    pub fn reported_count(&self, status: NodeStatus) -> usize {
        self.statuses.values().filter(|s| **s == status).count()
    }

    /// The status of `name` as this node sees it.
    pub fn status_of(&self, name: &NodeName) -> NodeStatus {
        self.status_with(name, None)
    }

    /// Checks that what the engine keeps up to date incrementally (the statuses it reports
    /// events from, the links it wants) equals the same computed from scratch, wherever it is
    /// current. For simulations and tests: it costs a pass over the whole table.
    pub fn check_caches(&self) -> Result<(), String> {
        if self.statuses_current(&self.reachable_sites()) {
            for (name, s) in self.statuses() {
                let held = self.statuses.get(&name).copied();
                if held != Some(s) && !(held.is_none() && s == NodeStatus::Unknown) {
                    return Err(format!(
                        "{}: status of {name} held as {held:?}, computed {s:?}",
                        self.cfg.me.name
                    ));
                }
            }
        }
        if self.wanted.0 == self.table.generation() {
            let mut held = self.wanted.1.clone();
            self.add_wanted_seeds(&mut held);
            let computed: BTreeMap<NodeName, String> = self.wanted_links().into_iter().collect();
            if held != computed {
                return Err(format!(
                    "{}: wanted links held as {:?}, computed {:?}",
                    self.cfg.me.name,
                    held.keys().collect::<Vec<_>>(),
                    computed.keys().collect::<Vec<_>>()
                ));
            }
        }
        Ok(())
    }

    /// The status of every node in the table (but this one) as this node sees it: the same
    /// answers as [`Engine::status_of`], computed in one pass (each remote site's reachability
    /// and gateway views are read once, not once per node).
    pub fn statuses(&self) -> BTreeMap<NodeName, NodeStatus> {
        let mut cache = SiteCache::default();
        self.table
            .iter()
            .filter(|r| r.name != self.cfg.me.name)
            .map(|r| (r.name.clone(), self.status_with(&r.name, Some(&mut cache))))
            .collect()
    }

    pub(super) fn status_with(&self, name: &NodeName, cache: Option<&mut SiteCache>) -> NodeStatus {
        if *name == self.cfg.me.name {
            return if self.leaving {
                NodeStatus::Left
            } else {
                NodeStatus::Alive
            };
        }
        let Some(r) = self.table.get(name.as_str()) else {
            return NodeStatus::Unknown;
        };
        match r.state {
            RecordState::Forgotten => return NodeStatus::Forgotten,
            RecordState::Left => return NodeStatus::Left,
            RecordState::Alive if self.left_peers.contains(name) => return NodeStatus::Left,
            RecordState::Alive => {}
        }
        if r.site == self.cfg.me.site {
            return match self.site_ring.liveness(name) {
                Some(Liveness::Alive) => NodeStatus::Alive,
                Some(Liveness::Suspect) => NodeStatus::Suspect,
                Some(Liveness::Dead) => NodeStatus::Dead,
                None => NodeStatus::Unknown,
            };
        }
        let view = match cache {
            Some(cache) => {
                let site = cache
                    .0
                    .entry(r.site.clone())
                    .or_insert_with(|| self.site_facts(&r.site));
                if !site.reachable {
                    return NodeStatus::Unreachable;
                }
                site.views.get(name).copied()
            }
            None => {
                if !self.site_reachable(&r.site) {
                    return NodeStatus::Unreachable;
                }
                self.remote_view(&r.site, name)
            }
        };
        match view {
            Some(Liveness::Alive) => NodeStatus::Alive,
            Some(Liveness::Suspect) => NodeStatus::Suspect,
            Some(Liveness::Dead) => NodeStatus::Dead,
            None => NodeStatus::Unknown,
        }
    }

    /// What the gateways of `site` report about `name`. Views of gateways that another gateway
    /// of the site reports dead are ignored (they are stale), unless that leaves none.
    pub(super) fn remote_view(&self, site: &SiteName, name: &NodeName) -> Option<Liveness> {
        self.trusted_gateways(site)
            .iter()
            .filter_map(|g| g.view.iter().find(|(n, _)| n == name).map(|(_, l)| *l))
            .min()
    }

    /// The gateways of `site` whose views count (see [`Engine::remote_view`]).
    pub(super) fn trusted_gateways(&self, site: &SiteName) -> Vec<&NodeRecord> {
        let gws: Vec<&NodeRecord> = self
            .table
            .gateways_of(site)
            .filter(|g| {
                !g.is_tombstone()
                    && g.site == *site
                    && g.role == Role::Gateway
                    && g.state == RecordState::Alive
            })
            .collect();
        let dead_by_peer = |g: &NodeRecord| {
            gws.iter().any(|o| {
                o.name != g.name
                    && o.view
                        .iter()
                        .any(|(n, l)| *n == g.name && *l == Liveness::Dead)
            })
        };
        let trusted: Vec<&NodeRecord> = gws.iter().copied().filter(|g| !dead_by_peer(g)).collect();
        if trusted.is_empty() {
            gws
        } else {
            trusted
        }
    }

    /// Reachability of `site` and what its trusted gateways report about each of its nodes (for
    /// each node, the first entry of each gateway's view, the worst across gateways: exactly
    /// what [`Engine::remote_view`] answers node by node).
    pub(super) fn site_facts(&self, site: &SiteName) -> SiteFacts {
        let reachable = self.site_reachable(site);
        let mut views: BTreeMap<NodeName, Liveness> = BTreeMap::new();
        if reachable {
            for g in self.trusted_gateways(site) {
                let mut seen: BTreeSet<&NodeName> = BTreeSet::new();
                for (n, l) in &g.view {
                    if !seen.insert(n) {
                        continue;
                    }
                    views
                        .entry(n.clone())
                        .and_modify(|cur| *cur = (*cur).min(*l))
                        .or_insert(*l);
                }
            }
        }
        SiteFacts { reachable, views }
    }

    /// The remote sites this node has a path to: over its own WAN links (a gateway), or through
    /// a live gateway of its site that reports reaching them ([`Engine::site_reachable`] for
    /// every site at once).
    pub(super) fn reachable_sites(&self) -> BTreeSet<SiteName> {
        let me = &self.cfg.me;
        let mut out: BTreeSet<SiteName> = self.wan_reach().cloned().collect();
        for (n, l) in self.links.iter().filter(|(_, l)| l.up) {
            if l.kind == LinkKind::Site
                && l.ident.role == Role::Gateway
                && self.site_ring.liveness(n) != Some(Liveness::Dead)
            {
                if let Some(r) = self.table.get(n.as_str()) {
                    out.extend(r.reach.iter().cloned());
                }
            }
        }
        out.remove(&me.site);
        out
    }

    /// Whether the statuses held are those of the current state, with `reachable` the current
    /// [`Engine::reachable_sites`].
    pub(super) fn statuses_current(&self, reachable: &BTreeSet<SiteName>) -> bool {
        let b = &self.status_basis;
        b.valid
            && b.table == self.table.generation()
            && b.left_peers == self.left_peers_generation
            && b.leaving == self.leaving
            && b.ring.is_empty()
            && b.reachable == *reachable
    }

    /// The nodes whose status may have moved since the last computation, or None when any may
    /// have (or when so many may have that one pass over the table is cheaper).
    ///
    /// A status reads the node's record, the site ring (our site), and for a node of another
    /// site whether that site is reachable and what its gateways' records report. So it can
    /// move only for a node whose record changed, a node of our site whose ring liveness
    /// changed, and every node of a remote site whose reachability flipped or one of whose
    /// gateways' records changed. Left peers and our own leaving move everything (both rare).
    pub(super) fn stale_statuses(
        &self,
        reachable: &BTreeSet<SiteName>,
    ) -> Option<BTreeSet<NodeName>> {
        let b = &self.status_basis;
        if !b.valid || b.left_peers != self.left_peers_generation || b.leaving != self.leaving {
            return None;
        }
        let changed = self.table.changed_since(b.table);
        if (changed.len() + b.ring.len()) * 4 > self.table.len() {
            return None;
        }
        let mut names: BTreeSet<NodeName> = b.ring.clone();
        let mut sites: BTreeSet<&SiteName> = b.reachable.symmetric_difference(reachable).collect();
        for r in changed {
            if r.role == Role::Gateway && r.site != self.cfg.me.site {
                sites.insert(&r.site);
            }
            names.insert(r.name.clone());
        }
        if !sites.is_empty() {
            names.extend(
                self.table
                    .iter()
                    .filter(|r| sites.contains(&r.site))
                    .map(|r| r.name.clone()),
            );
        }
        names.remove(&self.cfg.me.name);
        Some(names)
    }

    /// Brings the statuses up to date and emits an event for each that moved. Costs the nodes
    /// whose status may have moved ([`Engine::stale_statuses`]), not the table.
    pub(super) fn diff_statuses(&mut self, now: Time) {
        let reachable = self.reachable_sites();
        if self.statuses_current(&reachable) {
            return;
        }
        let current: Vec<(NodeName, NodeStatus)> = match self.stale_statuses(&reachable) {
            Some(names) => {
                let mut cache = SiteCache::default();
                names
                    .into_iter()
                    .map(|n| {
                        let s = self.status_with(&n, Some(&mut cache));
                        (n, s)
                    })
                    .collect()
            }
            None => self.statuses().into_iter().collect(),
        };
        self.status_basis = StatusBasis {
            valid: true,
            table: self.table.generation(),
            left_peers: self.left_peers_generation,
            leaving: self.leaving,
            reachable,
            ring: BTreeSet::new(),
        };
        for (name, s) in current {
            let prev = self.statuses.insert(name.clone(), s);
            if prev == Some(s) || (prev.is_none() && s == NodeStatus::Unknown) {
                continue;
            }
            let kind = match s {
                NodeStatus::Alive => EventKind::NodeUp,
                NodeStatus::Suspect => EventKind::NodeSuspect,
                NodeStatus::Dead => EventKind::NodeDead,
                NodeStatus::Left => EventKind::NodeLeft,
                NodeStatus::Unreachable => EventKind::NodeUnreachable,
                NodeStatus::Forgotten => EventKind::NodeForgotten,
                // Never computed by `status_of` (only reports show it).
                NodeStatus::Unknown | NodeStatus::Refused => continue,
            };
            let site = self.table.get(name.as_str()).map(|r| r.site.clone());
            let why = match (s, &site) {
                (NodeStatus::Unreachable, Some(site)) => {
                    format!("no live path from {} to site {site}", self.cfg.me.name)
                }
                (NodeStatus::Dead, Some(site)) if *site == self.cfg.me.site => {
                    "failure detector of its site confirmed it dead".to_string()
                }
                (NodeStatus::Dead, Some(site)) => format!("gateways of site {site} report it dead"),
                (NodeStatus::Suspect, _) => "missed failure-detector probes".to_string(),
                _ => String::new(),
            };
            let reason = match prev {
                Some(p) => format!(
                    "{} -> {}{}{}",
                    p.as_str(),
                    s.as_str(),
                    if why.is_empty() { "" } else { ": " },
                    why
                ),
                None => format!(
                    "{}{}{}",
                    s.as_str(),
                    if why.is_empty() { "" } else { ": " },
                    why
                ),
            };
            self.event(now, kind, Some(name), None, reason);
        }
    }
}
