//! This node's own record: what it publishes about itself and when.
//! Part of [`Engine`]: its methods for this concern; the state stays in `Engine`.

use super::*;

impl Engine {
    pub(super) fn own(&self) -> NodeRecord {
        self.table
            .get(self.cfg.me.name.as_str())
            .cloned()
            .unwrap_or_else(|| {
                NodeRecord::new(
                    &self.cfg.me,
                    1,
                    self.cfg.addr.clone(),
                    self.cfg.contract.hash().to_string(),
                    self.cfg.version.clone(),
                    self.cfg.secure,
                )
            })
    }

    pub(super) fn raise_clock(&mut self, now: Time, to: u64) {
        let mut own = self.own();
        if to <= own.clock {
            return;
        }
        own.clock = to;
        self.write_own(now, own);
    }

    /// Our record changed: it is in the table (and persisted) at once; peers get it at the
    /// next tick, so a burst of changes (every link of a cold start coming up) goes out as one
    /// version instead of one per change.
    pub(super) fn write_own(&mut self, now: Time, own: NodeRecord) {
        self.table.put_own(own);
        self.push(Output::Persist);
        self.last_rtt_refresh = now;
        for l in self.links.values_mut() {
            l.reported_rtt_us = l.rtt_us;
            l.reset_rtt_window();
        }
        self.own_unsent = true;
    }

    /// Sends our record to every linked peer if it changed since it was last sent.
    pub(super) fn flush_own(&mut self) {
        if !self.own_unsent {
            return;
        }
        self.own_unsent = false;
        let own = match self.table.get_shared(self.cfg.me.name.as_str()) {
            Some(r) => r.clone(),
            None => Arc::new(self.own()),
        };
        let targets: Vec<NodeName> = self
            .links
            .iter()
            .filter(|(_, l)| l.up)
            .map(|(n, _)| n.clone())
            .collect();
        for t in targets {
            self.push(Output::Send {
                to: t,
                frame: Frame::Records(vec![own.clone()]),
            });
        }
    }

    /// Recomputes the dynamic parts of our record (links, reach, view) and publishes it with a
    /// higher clock if anything changed.
    pub(super) fn refresh_own(&mut self, now: Time, force: bool) {
        if self.forgotten {
            return;
        }
        let mut own = self.own();
        let wall = |t: Time| self.cfg.wall_base_ms + t.as_millis() as u64;
        let mut links: Vec<LinkReport> = Vec::new();
        for (name, l) in &self.links {
            links.push(LinkReport {
                peer: name.clone(),
                state: if !l.up {
                    LinkState::Down
                } else if l.contract_hash != self.cfg.contract.hash() {
                    LinkState::Drift
                } else {
                    LinkState::Up
                },
                rtt_us: l.rtt_us,
                since_ms: wall(l.since),
                secure: l.secure,
                reason: l.reason.clone(),
                key: l.key,
            });
        }
        for (name, d) in &self.direction {
            let Some(since) = d.one_way_since else {
                continue;
            };
            if self.links.get(name).is_some_and(|l| l.up) || self.refused.contains_key(name) {
                continue;
            }
            // Our own kernel refusing our sends is the cause to show, not only its effect.
            let local = self
                .links
                .get(name)
                .and_then(|l| l.reason.as_deref())
                .filter(|r| r.starts_with(LOCAL_SEND_ERROR))
                .map_or_else(String::new, |r| format!(" ({r})"));
            links.retain(|x| &x.peer != name);
            links.push(LinkReport {
                peer: name.clone(),
                state: LinkState::OneWay,
                rtt_us: 0,
                since_ms: wall(since),
                secure: self.cfg.secure,
                reason: Some(format!(
                    "one-way: {name} -> {me} gets through, {me} -> {name} does not{local}",
                    me = self.cfg.me.name
                )),
                key: None,
            });
        }
        for (name, r) in &self.refused {
            if self.links.get(name).is_some_and(|l| l.up) {
                continue;
            }
            links.retain(|x| &x.peer != name);
            links.push(LinkReport {
                peer: name.clone(),
                state: LinkState::Refused,
                rtt_us: 0,
                since_ms: wall(r.since),
                secure: self.cfg.secure,
                reason: Some(r.reason.clone()),
                key: None,
            });
        }
        links.sort_by(|a, b| a.peer.cmp(&b.peer));
        links.truncate(crate::table::MAX_LINKS);
        let (reach, view) = if self.cfg.me.role == Role::Gateway {
            let reach: BTreeSet<SiteName> = self.wan_reach().cloned().collect();
            let mut view: Vec<(NodeName, Liveness)> = self
                .site_ring
                .members()
                .filter(|(n, _)| {
                    self.table
                        .get(n.as_str())
                        .is_some_and(|r| r.site == self.cfg.me.site)
                })
                .map(|(n, l)| (n.clone(), l))
                .collect();
            view.push((self.cfg.me.name.clone(), Liveness::Alive));
            view.sort();
            view.truncate(crate::table::MAX_VIEW);
            (reach.into_iter().collect::<Vec<_>>(), view)
        } else {
            (Vec::new(), Vec::new())
        };
        let state = if self.leaving {
            RecordState::Left
        } else {
            RecordState::Alive
        };
        // RTTs alone do not justify a new clock, unless they moved a lot and a while has passed.
        let strip = |v: &[LinkReport]| -> Vec<LinkReport> {
            v.iter()
                .map(|l| LinkReport {
                    rtt_us: 0,
                    ..l.clone()
                })
                .collect()
        };
        let keys = self.keyring.ids();
        let links_changed = strip(&own.links) != strip(&links);
        let others_changed = own.keys != keys
            || own.cert != self.cert
            || own.reach != reach
            || own.view != view
            || own.state != state;
        let structural = links_changed || others_changed;
        // Once per window: did some link's RTT move for the whole window? Then a new window.
        let rtt_moved = now.saturating_sub(self.last_rtt_refresh) >= self.cfg.timing.rtt_refresh
            && {
                self.last_rtt_refresh = now;
                let moved = self.links.values().any(Link::rtt_moved);
                for l in self.links.values_mut() {
                    l.reset_rtt_window();
                }
                moved
            };
        if !(structural || rtt_moved || force) {
            self.links_grown = None;
            return;
        }
        // A record never published yet (a first start) goes out at once.
        let published = self.table.get(self.cfg.me.name.as_str()).is_some();
        if published
            && links_changed
            && !others_changed
            && !rtt_moved
            && !force
            && only_new_up(&own.links, &links)
        {
            // Only new links: publish once they settle. Each node waits the settle time plus
            // its own random share of it, so that after a cold start the settled records of a
            // whole cluster do not all go out in the same instant (10,000 nodes publishing at
            // once put 10^8 record deliveries in flight together).
            let (first, last, settle) = match self.links_grown {
                Some((n, first, last, settle)) if n == links.len() => (first, last, settle),
                Some((_, first, _, settle)) => (first, now, settle),
                None => {
                    let base = self.cfg.timing.link_settle;
                    let jitter = base.mul_f64(self.rng.random::<f64>());
                    (now, now, base + jitter)
                }
            };
            self.links_grown = Some((links.len(), first, last, settle));
            if now.saturating_sub(last) < settle && now.saturating_sub(first) < settle * 4 {
                return;
            }
        }
        self.links_grown = None;
        own.links = links;
        own.keys = keys;
        own.cert = self.cert.clone();
        own.reach = reach;
        own.view = view;
        own.state = state;
        own.clock += 1;
        self.write_own(now, own);
    }
}
