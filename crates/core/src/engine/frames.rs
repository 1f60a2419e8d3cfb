//! Frames from peers: records, digests, summaries, and what each one changes.
//! Part of [`Engine`]: its methods for this concern; the state stays in `Engine`.

use super::*;

impl Engine {
    /// Bytes of a frame arrived on the link to `from`.
    pub fn handle_frame_bytes(&mut self, now: Time, from: &NodeName, bytes: &[u8]) {
        match Frame::decode(bytes) {
            Ok(f) => self.handle_frame(now, from, f),
            Err(e) => {
                self.counters.bad_frames += 1;
                self.event(
                    now,
                    EventKind::Warning,
                    Some(from.clone()),
                    None,
                    format!("dropped a bad frame from {from}: {e}"),
                );
            }
        }
    }

    /// A decoded frame arrived on the link to `from`.
    pub fn handle_frame(&mut self, now: Time, from: &NodeName, frame: Frame) {
        let Some(kind) = self.links.get(from).filter(|l| l.up).map(|l| l.kind) else {
            return;
        };
        self.counters.frames_in += 1;
        match frame {
            Frame::Records(rs) => self.merge_records(now, from, kind, rs),
            Frame::Summary(theirs) => {
                let differs = theirs != self.table.summary();
                if differs {
                    self.table_moving(now);
                }
                // Differing tables: tell the sender which sites hold what, at most once per
                // sync period.
                if differs && now >= self.next_full_sync {
                    self.next_full_sync = now + self.cfg.timing.sync_every;
                    self.push(Output::Send {
                        to: from.clone(),
                        frame: Frame::Sites(self.table.site_summaries()),
                    });
                }
            }
            Frame::Sites(theirs) => {
                let sites = self.table.sites_differing(&theirs);
                if !sites.is_empty() {
                    let digest = self.table.digest_of(&sites);
                    self.push(Output::Send {
                        to: from.clone(),
                        frame: Frame::SiteDigest(sites, digest, true),
                    });
                }
            }
            Frame::SiteDigest(mut sites, d, want_reply) => {
                sites.sort();
                sites.dedup();
                let newer = self.table.newer_than_in(&d, Some(&sites));
                for chunk in newer.chunks(MAX_RECORDS_PER_FRAME) {
                    self.push(Output::Send {
                        to: from.clone(),
                        frame: Frame::Records(chunk.to_vec()),
                    });
                }
                if want_reply && self.table.behind(&d) {
                    let mine = self.table.digest_of(&sites);
                    self.push(Output::Send {
                        to: from.clone(),
                        frame: Frame::SiteDigest(sites, mine, false),
                    });
                }
            }
            Frame::Digest(d, want_reply) => {
                let newer = self.table.newer_than(&d);
                for chunk in newer.chunks(MAX_RECORDS_PER_FRAME) {
                    self.push(Output::Send {
                        to: from.clone(),
                        frame: Frame::Records(chunk.to_vec()),
                    });
                }
                if want_reply && self.table.behind(&d) {
                    let mine = self.table.digest();
                    self.push(Output::Send {
                        to: from.clone(),
                        frame: Frame::Digest(mine, false),
                    });
                }
            }
            Frame::Routed(env) => self.handle_routed(now, from, env),
            Frame::Leaving => {
                // Authoritative and immediate: the peer says it is going. Its `left` record
                // follows; until then (and if it is lost) this keeps the failure detector's
                // verdict from being reported as a death.
                self.left_peers.insert(from.clone());
                self.left_peers_generation += 1;
                self.diff_statuses(now);
            }
        }
        self.drain_rings(now);
    }

    /// Sends our full digest to `peer` (who answers with what we lack and, if it is behind, its
    /// own digest), unless a full exchange already started this sync period and `always` is
    /// false. Returns whether it sent.
    pub(super) fn start_full_sync(&mut self, now: Time, peer: &NodeName, always: bool) -> bool {
        if now < self.next_full_sync && !always {
            return false;
        }
        self.next_full_sync = now + self.cfg.timing.sync_every;
        self.push(Output::Send {
            to: peer.clone(),
            frame: Frame::Digest(self.table.digest(), true),
        });
        true
    }

    /// A datagram arrived on the link to `from`.
    pub fn handle_datagram(&mut self, now: Time, from: &NodeName, bytes: &[u8]) {
        let Some(kind) = self.links.get(from).filter(|l| l.up).map(|l| l.kind) else {
            self.counters.datagrams_dropped += 1;
            return;
        };
        match decode_swim(bytes) {
            Ok((Ring::Site, data)) if kind == LinkKind::Site => {
                self.site_ring.handle_data(now, data)
            }
            Ok((Ring::Wan, data)) if kind == LinkKind::Wan => {
                if let Some(w) = self.wan_ring.as_mut() {
                    w.handle_data(now, data);
                }
            }
            _ => self.counters.datagrams_dropped += 1,
        }
        self.drain_rings(now);
    }

    pub(super) fn merge_records(
        &mut self,
        now: Time,
        from: &NodeName,
        kind: LinkKind,
        rs: Vec<Arc<NodeRecord>>,
    ) {
        let mut changed = Vec::new();
        // Records of our own site's nodes we knew nothing about, or held dead (a node joining or
        // coming back links to its seeds first; the rest of its site learns of it, and dials
        // it, through its gateway).
        let mut newcomers = Vec::new();
        // Peers held dead whose new record we have: dialed again at once, not at the end of a
        // backoff grown while they were down.
        let mut returned = Vec::new();
        for r in rs {
            if r.name == self.cfg.me.name {
                self.handle_own_record(now, r);
                continue;
            }
            let prev = self.table.get(r.name.as_str());
            let was_tomb = prev.is_some_and(NodeRecord::is_tombstone);
            // A link-up placeholder (no address) does not count as knowing the node.
            let unknown = prev.is_none_or(|p| p.addr.is_empty());
            let same_site = r.site == self.cfg.me.site;
            let newer = prev.is_some_and(|p| p.clock < r.clock);
            let candidate = !unknown && same_site && r.state == RecordState::Alive && newer;
            // Linked to us since it came back (see `handle_link_up`), or held dead here.
            let relinked = candidate && self.returning.remove(&r.name);
            let revived = candidate
                && self
                    .revived
                    .remove(&r.name)
                    .is_some_and(|t| now.saturating_sub(t) <= REVIVED_WINDOW);
            let was_dead =
                candidate && (relinked || revived || self.status_of(&r.name) == NodeStatus::Dead);
            match self.table.merge(r.clone()) {
                m if m.changed() => {
                    self.counters.records_merged += 1;
                    if r.state == RecordState::Alive {
                        // A newer alive record: the node came back after leaving.
                        if self.left_peers.remove(&r.name) {
                            self.left_peers_generation += 1;
                        }
                    }
                    if r.is_tombstone() && !was_tomb {
                        self.on_forgotten(now, &r.name);
                    }
                    if (unknown || was_dead) && same_site && kind == LinkKind::Site {
                        newcomers.push(r.clone());
                    }
                    if was_dead {
                        // A record from the node itself came over a connection to its new
                        // instance: that one stays.
                        returned.push((r.name.clone(), relinked || r.name == *from));
                    }
                    changed.push(r);
                }
                Merge::Full | Merge::Invalid => self.counters.records_refused += 1,
                _ => {}
            }
        }
        if changed.is_empty() {
            return;
        }
        self.redial_returned(now, returned);
        self.push(Output::Persist);
        // Forward: the origin pushed to all of its links; a node passes updates on only across
        // a boundary (site -> WAN, WAN -> site, WAN -> other WAN links). Across a site
        // boundary, one gateway of the site per record passes it on ([`Engine::forwards`]), not
        // every gateway. Across the WAN, not to a gateway the sender reports a link to: the
        // sender forwarded to it already. A record missed either way (a stale link report, two
        // gateways that disagree on which of them is up) is repaired by anti-entropy.
        let gateway = self.cfg.me.role == Role::Gateway;
        let across: Vec<Arc<NodeRecord>> = if gateway {
            changed
                .iter()
                .filter(|r| self.forwards(&r.name))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        // The one exception to "not site -> site": a newcomer of our site, passed on by the
        // gateway that passes its record across.
        newcomers.retain(|r| gateway && across.iter().any(|a| Arc::ptr_eq(a, r)));
        let sender = self.table.get(from.as_str());
        let sender_links_to = |n: &NodeName| {
            sender.is_some_and(|r| {
                r.links
                    .iter()
                    .any(|x| x.peer == *n && x.state == LinkState::Up)
            })
        };
        // Each target with what it gets.
        let targets: Vec<(NodeName, Vec<Arc<NodeRecord>>)> = self
            .links
            .iter()
            .filter(|(n, l)| l.up && *n != from)
            .filter_map(|(n, l)| {
                let records = match (kind, l.kind) {
                    (LinkKind::Site, LinkKind::Site) => &newcomers,
                    (LinkKind::Wan, LinkKind::Wan) if sender_links_to(n) => return None,
                    (LinkKind::Wan, LinkKind::Wan) => &changed,
                    _ => &across,
                };
                (!records.is_empty()).then(|| (n.clone(), records.clone()))
            })
            .collect();
        for (to, records) in targets {
            self.push(Output::Send {
                to,
                frame: Frame::Records(records),
            });
        }
    }

    /// Peers back from the dead (with whether they linked to us since): a connection still open
    /// to the dead instance is closed, and each is dialed again at once, not at the end of a
    /// backoff grown while it was down.
    pub(super) fn redial_returned(&mut self, now: Time, returned: Vec<(NodeName, bool)>) {
        if returned.is_empty() {
            return;
        }
        for (peer, relinked) in returned {
            if !relinked && self.is_linked(&peer) {
                // QUIC has not timed the old connection out yet: close it, so that the dial
                // below reaches the new instance.
                self.push(Output::Close {
                    peer: peer.clone(),
                    reason: "the peer restarted".into(),
                });
                self.handle_link_down(now, &peer, "the peer restarted");
            }
            let grace = self.dial_grace(&peer);
            let min = self.cfg.timing.dial_backoff_min;
            if let Some(d) = self.dialing.get_mut(&peer) {
                // A dial still in flight went to the dead instance and may hang until it times
                // out: dial again (the transport keeps one connection if both succeed).
                d.in_flight = false;
                d.backoff = min;
                d.next = d.next.min(now + grace);
            }
        }
        self.dial_wanted(now);
    }

    /// Whether this gateway is the one of its site that passes `name`'s record across the
    /// site boundary: the rendezvous choice among the site's gateways it sees up (itself, and
    /// those it is linked to that its site ring does not hold dead).
    pub(super) fn forwards(&self, name: &NodeName) -> bool {
        let me = &self.cfg.me.name;
        let up = self
            .table
            .gateways_of(&self.cfg.me.site)
            .filter(|g| g.state == RecordState::Alive)
            .map(|g| &g.name)
            .filter(|g| {
                *g == me
                    || (self.is_linked(g) && self.site_ring.liveness(g) != Some(Liveness::Dead))
            });
        rendezvous(name.as_str(), up).is_none_or(|g| g == *me)
    }

    pub(super) fn handle_own_record(&mut self, now: Time, r: Arc<NodeRecord>) {
        let mine = self.clock();
        if r.clock < mine {
            return;
        }
        if r.is_tombstone() && !self.cfg.rejoin {
            if self.forgotten {
                return;
            }
            self.forgotten = true;
            self.table.merge(r.clone());
            self.push(Output::Persist);
            let reason = format!(
                "this node was forgotten by an operator (tombstone at clock {}); restart it with --rejoin to bring it back",
                r.clock
            );
            self.event(
                now,
                EventKind::NodeForgotten,
                Some(self.cfg.me.name.clone()),
                None,
                reason.clone(),
            );
            let peers: Vec<NodeName> = self.links.keys().cloned().collect();
            for p in peers {
                self.push(Output::Close {
                    peer: p,
                    reason: "forgotten".into(),
                });
            }
            self.push(Output::Fatal(reason));
            return;
        }
        // A record of ours from an earlier life is at or above our clock: come back above it.
        let from = mine;
        self.raise_clock(now, r.clock + 1);
        self.event(
            now,
            EventKind::ClockRaised,
            Some(self.cfg.me.name.clone()),
            None,
            format!(
                "peers knew this node at clock {}: clock {} -> {}",
                r.clock,
                from,
                self.clock()
            ),
        );
    }

    pub(super) fn on_forgotten(&mut self, now: Time, name: &NodeName) {
        self.event(
            now,
            EventKind::NodeForgotten,
            Some(name.clone()),
            None,
            format!("{name} was forgotten by an operator"),
        );
        self.dialing.remove(name);
        if self.links.get(name).is_some_and(|l| l.up) {
            self.push(Output::Close {
                peer: name.clone(),
                reason: "forgotten".into(),
            });
        }
        if self.links.remove(name).is_some() {
            self.links_generation += 1;
        }
        self.announced.remove(name);
    }
}
