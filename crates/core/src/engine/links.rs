//! Links: dialing, handshake decisions, refusals, the links wanted and held.
//! Part of [`Engine`]: its methods for this concern; the state stays in `Engine`.

use super::*;

impl Engine {
    /// Peers this node wants links to, with their addresses (computed from the whole table;
    /// the engine itself keeps the same answer up to date from the table's changes).
    pub fn wanted_links(&self) -> Vec<(NodeName, String)> {
        let mut out: BTreeMap<NodeName, String> = self
            .table
            .live()
            .filter_map(|r| wanted_addr(&self.cfg, r).map(|a| (r.name.clone(), a)))
            .collect();
        self.add_wanted_seeds(&mut out);
        out.into_iter().collect()
    }

    /// Seeds we have not learned a record for yet (their site is unknown until they answer).
    pub(super) fn add_wanted_seeds(&self, out: &mut BTreeMap<NodeName, String>) {
        for (name, addr) in &self.cfg.seeds {
            if *name != self.cfg.me.name
                && self.table.get(name.as_str()).is_none()
                && !self.refused.contains_key(name)
            {
                out.entry(name.clone()).or_insert_with(|| addr.clone());
            }
        }
    }

    /// Brings [`Engine::wanted`] up to date with the records stored since it was last read: a
    /// tick costs the changes, not the table (a member wants its site, of any size; a gateway
    /// also the other sites' gateways).
    pub(super) fn refresh_wanted(&mut self) {
        let gen = self.table.generation();
        if self.wanted.0 == gen {
            return;
        }
        for r in self.table.changed_since(self.wanted.0) {
            match wanted_addr(&self.cfg, r) {
                Some(addr) => {
                    self.wanted.1.insert(r.name.clone(), addr);
                }
                None => {
                    self.wanted.1.remove(&r.name);
                }
            }
        }
        self.wanted.0 = gen;
    }

    pub(super) fn dial_wanted(&mut self, now: Time) {
        let min = self.cfg.timing.dial_backoff_min;
        self.refresh_wanted();
        let mut seeds = BTreeMap::new();
        self.add_wanted_seeds(&mut seeds);
        let wanted = std::mem::take(&mut self.wanted.1);
        // Seeds are never in the table, so the two never name the same peer.
        for (peer, addr) in wanted.iter().chain(&seeds) {
            if self.links.get(peer).is_some_and(|l| l.up) {
                continue;
            }
            let grace = self.dial_grace(peer);
            let d = self.dialing.entry(peer.clone()).or_insert(Dialing {
                next: now + grace,
                backoff: min,
                in_flight: false,
            });
            if d.in_flight || now < d.next {
                continue;
            }
            d.in_flight = true;
            self.push(Output::Dial {
                peer: peer.clone(),
                addr: addr.clone(),
            });
        }
        self.wanted.1 = wanted;
    }

    /// Both ends want a link; the lower name dials first and the higher one only after a grace
    /// period, so that simultaneous dials (and the duplicate connection one of them must close)
    /// are rare.
    pub(super) fn dial_grace(&self, peer: &NodeName) -> Duration {
        if self.cfg.me.name > *peer {
            self.cfg.timing.dial_backoff_min * 4
        } else {
            Duration::ZERO
        }
    }

    pub(super) fn backoff(&mut self, now: Time, peer: &NodeName, long: bool) {
        let max = self.cfg.timing.dial_backoff_max;
        let min = self.cfg.timing.dial_backoff_min;
        let d = self.dialing.entry(peer.clone()).or_insert(Dialing {
            next: now,
            backoff: min,
            in_flight: false,
        });
        d.in_flight = false;
        d.backoff = if long { max } else { (d.backoff * 2).min(max) };
        d.next = now + d.backoff;
    }

    /// A dial of ours ended without a new link because a link to `peer` already exists (both
    /// ends dialed at once; the transport keeps one connection).
    pub fn handle_dial_superseded(&mut self, peer: &NodeName) {
        if let Some(d) = self.dialing.get_mut(peer) {
            d.in_flight = false;
        }
    }

    /// A dial of ours failed before any handshake (unreachable, TLS refused, timeout).
    pub fn handle_dial_failed(&mut self, now: Time, peer: &NodeName, reason: &str, refused: bool) {
        if self.is_linked(peer) {
            // A stale dial (one started before the peer came back, which then linked by
            // another dial) says nothing about a link that is up.
            return;
        }
        self.backoff(now, peer, refused);
        if refused {
            self.counters.refused_out += 1;
            self.note_refusal(now, peer.clone(), reason.to_string(), false);
            return;
        }
        if let Some(l) = self.links.get_mut(peer) {
            l.reason = Some(short(reason));
        }
        let e = self.direction.entry(peer.clone()).or_default();
        e.dial_failed = Some(now);
        self.judge_direction(now, peer);
    }

    /// A handshake from `addr` reached us and then stalled (our answers never got through):
    /// evidence that packets flow from that peer to us but not back.
    pub fn handle_inbound_stalled(&mut self, now: Time, addr: &str) {
        let Some(peer) = self
            .table
            .live()
            .find(|r| {
                (r.addr == addr || r.wan_addr.as_deref() == Some(addr))
                    && r.name != self.cfg.me.name
            })
            .map(|r| r.name.clone())
        else {
            return;
        };
        let e = self.direction.entry(peer.clone()).or_default();
        e.inbound_stalled = Some(now);
        self.judge_direction(now, &peer);
    }

    /// One-way verdict for `peer`: its handshakes reach us and stall, and ours time out.
    pub(super) fn judge_direction(&mut self, now: Time, peer: &NodeName) {
        let window = ONE_WAY_EVIDENCE;
        let fresh = |t: Option<Time>| t.is_some_and(|t| now.saturating_sub(t) <= window);
        let Some(e) = self.direction.get(peer) else {
            return;
        };
        let one_way = fresh(e.inbound_stalled) && fresh(e.dial_failed);
        let was = e.one_way_since.is_some();
        if one_way && !was {
            if let Some(e) = self.direction.get_mut(peer) {
                e.one_way_since = Some(now);
            }
            let me = self.cfg.me.name.clone();
            self.event(
                now,
                EventKind::LinkDown,
                Some(me.clone()),
                Some(peer.clone()),
                format!("one-way: {peer} -> {me} gets through, {me} -> {peer} does not ({peer}'s handshakes reach {me} and stall; {me}'s dials time out)"),
            );
            self.refresh_own(now, false);
        }
    }

    pub(super) fn expire_directions(&mut self, now: Time) {
        let window = ONE_WAY_EVIDENCE;
        let mut changed = false;
        self.direction.retain(|peer, e| {
            let fresh = |t: Option<Time>| t.is_some_and(|t| now.saturating_sub(t) <= window);
            let linked = self.links.get(peer).is_some_and(|l| l.up);
            if e.one_way_since.is_some()
                && (linked || !(fresh(e.inbound_stalled) && fresh(e.dial_failed)))
            {
                e.one_way_since = None;
                changed = true;
            }
            !linked && (fresh(e.inbound_stalled) || fresh(e.dial_failed))
        });
        if changed {
            self.refresh_own(now, false);
        }
    }

    /// Checks the protocol version of a dialer's hello (or of an acceptor's answer), read
    /// before the rest of it ([`crate::wire::Handshake::version_of`]): another version is refused with
    /// [`RefusalCode::Version`], naming both. The caller reports a refusal with
    /// [`Engine::handle_refused`], as for [`Engine::check_hello`].
    pub fn check_hello_version(&self, version: u8) -> Result<(), Refusal> {
        if version == crate::wire::PROTOCOL_VERSION {
            Ok(())
        } else {
            Err(Refusal::version(version))
        }
    }

    /// Checks a dialer's hello on the accepting side. `cert` is the identity and cluster proven
    /// by the peer's certificate (None when running insecure).
    pub fn check_hello(
        &self,
        hello: &Hello,
        cert: Option<(&ClusterName, &Ident)>,
        binding: &[u8],
    ) -> Result<HelloAck, Refusal> {
        let refuse = |code, reason: String| Refusal { code, reason };
        if hello.cluster != self.cfg.cluster {
            return Err(refuse(
                RefusalCode::Cluster,
                format!(
                    "peer belongs to cluster {}, this is cluster {}",
                    hello.cluster, self.cfg.cluster
                ),
            ));
        }
        match cert {
            Some((cluster, ident)) if cluster != &hello.cluster || ident != &hello.ident => {
                return Err(refuse(
                    RefusalCode::Identity,
                    format!(
                        "certificate names {} of site {} ({}) in cluster {}, but the peer claims {} of site {} ({})",
                        ident.name, ident.site, ident.role, cluster, hello.ident.name, hello.ident.site, hello.ident.role
                    ),
                ));
            }
            Some(_) => {}
            None if self.cfg.secure => {
                return Err(refuse(
                    RefusalCode::SecurityMode,
                    "peer presented no certificate; this node requires mutual TLS".into(),
                ))
            }
            None => {}
        }
        let key = self
            .keyring
            .verify(&hello.secret, ProofRole::Hello, &hello.ident.name, binding)
            .map_err(|e| refuse(RefusalCode::Secret, e.to_string()))?;
        if let Err(e) = self.cfg.contract.check_link(&self.cfg.me, &hello.ident) {
            return Err(refuse(RefusalCode::Contract, e.to_string()));
        }
        let last = self.table.get(hello.ident.name.as_str());
        if let Some(r) = last {
            if r.is_tombstone() && !hello.rejoin {
                return Err(refuse(
                    RefusalCode::Forgotten,
                    format!(
                        "{} was forgotten by an operator (tombstone at clock {}); restart it with --rejoin to bring it back",
                        hello.ident.name, r.clock
                    ),
                ));
            }
        }
        if let Some(reason) = self.second_instance(hello) {
            return Err(refuse(RefusalCode::Identity, reason));
        }
        let secret = self
            .keyring
            .prove_with(key, ProofRole::Ack, &self.cfg.me.name, binding)
            .ok_or_else(|| {
                refuse(
                    RefusalCode::Secret,
                    format!("key {key} vanished from the keyring"),
                )
            })?;
        Ok(HelloAck {
            ident: self.cfg.me.clone(),
            contract_hash: self.cfg.contract.hash().to_string(),
            clock: self.clock(),
            last_clock_for_you: last.map_or(0, |r| r.clock),
            secret,
        })
    }

    /// The [`crate::instance`] rule for `hello`: refused when the table's instance of the name
    /// answers at another address.
    pub(super) fn second_instance(&self, hello: &Hello) -> Option<String> {
        let name = &hello.ident.name;
        let incumbent = self
            .table
            .get(name.as_str())
            .map(|r| crate::instance::Incumbent {
                addr: &r.addr,
                answers: r.state == RecordState::Alive
                    && r.clock > 0
                    && self.status_of(name) == NodeStatus::Alive,
            });
        crate::instance::second_instance(name.as_str(), &hello.addr, incumbent)
    }

    /// What a dial needs to build its hello once the TLS session exists (the proof of the
    /// cluster secret is bound to that session).
    pub fn hello_maker(&self) -> HelloMaker {
        HelloMaker {
            cluster: self.cfg.cluster.clone(),
            ident: self.cfg.me.clone(),
            contract_hash: self.cfg.contract.hash().to_string(),
            clock: self.clock(),
            addr: self.cfg.addr.clone(),
            rejoin: self.cfg.rejoin,
            version: self.cfg.version.clone(),
            keyring: self.keyring.clone(),
        }
    }

    /// Checks the acceptor's ack on the dialing side (after the TLS layer verified that the
    /// certificate names the node we dialed). Raises our clock when the acceptor remembers us
    /// with a higher one (a re-deployed node with an empty data directory).
    pub fn check_ack(
        &mut self,
        now: Time,
        expected: &NodeName,
        ack: &HelloAck,
        cert: Option<(&ClusterName, &Ident)>,
        binding: &[u8],
    ) -> Result<KeyId, Refusal> {
        if let Some((cluster, ident)) = cert {
            if cluster != &self.cfg.cluster || ident != &ack.ident {
                return Err(Refusal {
                    code: RefusalCode::Identity,
                    reason: format!(
                        "certificate names {} of site {} ({}), but the peer claims {} of site {} ({})",
                        ident.name, ident.site, ident.role, ack.ident.name, ack.ident.site, ack.ident.role
                    ),
                });
            }
        }
        if &ack.ident.name != expected {
            return Err(Refusal {
                code: RefusalCode::Identity,
                reason: format!("dialed {expected} but {} answered", ack.ident.name),
            });
        }
        let key = self
            .keyring
            .verify(&ack.secret, ProofRole::Ack, &ack.ident.name, binding)
            .map_err(|e| Refusal {
                code: RefusalCode::Secret,
                reason: e.to_string(),
            })?;
        if let Err(e) = self.cfg.contract.check_link(&self.cfg.me, &ack.ident) {
            return Err(Refusal {
                code: RefusalCode::Contract,
                reason: e.to_string(),
            });
        }
        if ack.last_clock_for_you >= self.clock() {
            let from = self.clock();
            self.raise_clock(now, ack.last_clock_for_you + 1);
            self.event(
                now,
                EventKind::ClockRaised,
                Some(self.cfg.me.name.clone()),
                Some(ack.ident.name.clone()),
                format!(
                    "{} remembered this node at clock {}: clock {} -> {}",
                    ack.ident.name,
                    ack.last_clock_for_you,
                    from,
                    self.clock()
                ),
            );
        }
        Ok(key)
    }

    /// A handshake was refused: by us (`by_us`) or by the peer. `peer` is the claimed name;
    /// `code` is known when the refusal came from the application handshake (not from TLS).
    pub fn handle_refused(
        &mut self,
        now: Time,
        peer: Option<NodeName>,
        code: Option<RefusalCode>,
        reason: &str,
        by_us: bool,
    ) {
        if by_us {
            self.counters.refused_in += 1;
        } else {
            self.counters.refused_out += 1;
        }
        if !by_us && code == Some(RefusalCode::Forgotten) && !self.cfg.rejoin && !self.forgotten {
            self.forgotten = true;
            let reason = format!(
                "{reason} (told by {})",
                peer.as_ref().map_or("a peer", |p| p.as_str())
            );
            self.event(
                now,
                EventKind::NodeForgotten,
                Some(self.cfg.me.name.clone()),
                None,
                reason.clone(),
            );
            self.push(Output::Fatal(reason));
            return;
        }
        if let (true, Some(p)) = (by_us, &peer) {
            if code == Some(RefusalCode::Identity)
                && reason.starts_with(crate::instance::SECOND_INSTANCE)
            {
                self.note_duplicate(now, p.clone(), reason);
                return;
            }
        }
        match peer {
            Some(p) => {
                if !by_us {
                    self.backoff(now, &p, true);
                }
                self.note_refusal(now, p, reason.to_string(), by_us);
            }
            None => {
                let who = if by_us {
                    "refused a peer"
                } else {
                    "refused by a peer"
                };
                self.event(
                    now,
                    EventKind::LinkRefused,
                    Some(self.cfg.me.name.clone()),
                    None,
                    format!("{who}: {reason}"),
                );
            }
        }
    }

    /// We refused a second instance of `name`: an event when it starts (or its reason changes),
    /// and reports stay unhealthy while it keeps trying ([`DUPLICATE_EVIDENCE`]). The incumbent's
    /// link and record are left alone.
    pub(super) fn note_duplicate(&mut self, now: Time, name: NodeName, reason: &str) {
        let fresh = self
            .duplicates
            .get(&name)
            .is_none_or(|d| d.reason != reason || now.saturating_sub(d.last) >= DUPLICATE_EVIDENCE);
        if self.duplicates.len() >= MAX_REFUSALS && !self.duplicates.contains_key(&name) {
            if let Some(oldest) = self
                .duplicates
                .iter()
                .min_by_key(|(_, d)| d.last)
                .map(|(n, _)| n.clone())
            {
                self.duplicates.remove(&oldest);
            }
        }
        self.duplicates.insert(
            name.clone(),
            Duplicate {
                reason: short(reason),
                last: now,
            },
        );
        if fresh {
            self.event(
                now,
                EventKind::LinkRefused,
                Some(self.cfg.me.name.clone()),
                Some(name),
                format!("refused by {}: {reason}", self.cfg.me.name),
            );
        }
    }

    pub(super) fn note_refusal(&mut self, now: Time, peer: NodeName, reason: String, by_us: bool) {
        let text = if by_us {
            format!("refused by {}: {reason}", self.cfg.me.name)
        } else {
            format!("refused by {peer}: {reason}")
        };
        let changed = self
            .refused
            .get(&peer)
            .is_none_or(|r| r.reason != short(&text));
        if let Some(r) = self.refused.get_mut(&peer) {
            r.last = now;
        }
        if self.refused.len() >= MAX_REFUSALS && !self.refused.contains_key(&peer) {
            // Forget the oldest refusal to make room.
            if let Some(oldest) = self
                .refused
                .iter()
                .min_by_key(|(_, r)| r.since)
                .map(|(n, _)| n.clone())
            {
                self.refused.remove(&oldest);
            }
        }
        if changed {
            self.refused.insert(
                peer.clone(),
                Refused {
                    reason: short(&text),
                    since: now,
                    last: now,
                },
            );
            self.event(
                now,
                EventKind::LinkRefused,
                Some(self.cfg.me.name.clone()),
                Some(peer),
                text,
            );
            self.refresh_own(now, false);
        }
    }

    /// A link completed its hello/ack.
    pub fn handle_link_up(&mut self, now: Time, info: LinkInfo) {
        let peer = info.peer.name.clone();
        let Ok(kind) = self.cfg.contract.check_link(&self.cfg.me, &info.peer) else {
            // The driver only reports links that passed check_hello/check_ack.
            debug_assert!(false, "link up that the contract does not allow");
            return;
        };
        if info.peer.site == self.cfg.me.site
            && (self.status_of(&peer) == NodeStatus::Dead || self.revived.contains_key(&peer))
        {
            self.returning.insert(peer.clone());
        }
        self.dialing.remove(&peer);
        self.refused.remove(&peer);
        if self.left_peers.remove(&peer) {
            self.left_peers_generation += 1;
        }
        self.links_generation += 1;
        let drift = info.contract_hash != self.cfg.contract.hash();
        let reason = drift.then(|| {
            format!(
                "contract drift: {} runs contract {}, this node runs {}",
                peer,
                info.contract_hash,
                self.cfg.contract.hash()
            )
        });
        self.links.insert(
            peer.clone(),
            Link {
                ident: info.peer.clone(),
                kind,
                up: true,
                since: now,
                rtt_us: info.rtt_us,
                secure: info.secure,
                protocol: info.protocol.clone(),
                contract_hash: info.contract_hash,
                reason: reason.clone(),
                reported_rtt_us: info.rtt_us,
                rtt_low_us: info.rtt_us,
                rtt_high_us: info.rtt_us,
                key: info.key,
            },
        );
        self.event(
            now,
            EventKind::LinkUp,
            Some(self.cfg.me.name.clone()),
            Some(peer.clone()),
            format!("{} link up ({})", kind.as_str(), info.protocol),
        );
        if let Some(r) = reason {
            self.event(now, EventKind::Drift, Some(peer.clone()), None, r);
        }
        // Make sure we have a record for the peer before the table sync lands.
        if self.table.get(peer.as_str()).is_none() {
            let mut rec = NodeRecord::new(
                &info.peer,
                0,
                String::new(),
                String::new(),
                String::new(),
                info.secure,
            );
            rec.clock = 0;
            self.table.merge(rec);
        }
        self.refresh_own(now, false);
        // The new peer gets our record as it stands now (it may not have it, and no other
        // sync runs on this link); every peer gets the next version at the next tick.
        if let Some(own) = self.table.get_shared(self.cfg.me.name.as_str()) {
            self.push(Output::Send {
                to: peer.clone(),
                frame: Frame::Records(vec![own.clone()]),
            });
        }
        // The first link (or the first in a sync period) syncs the whole table; the others
        // only compare summaries, and a difference waits for the next period. A WAN link always
        // syncs: it is where a site's records cross (a gateway's first records of its site
        // arrive before its WAN links are up), and a gateway has few of them.
        if !self.start_full_sync(now, &peer, kind == LinkKind::Wan) {
            self.push(Output::Send {
                to: peer.clone(),
                frame: Frame::Summary(self.table.summary()),
            });
        }
        self.announce(now, &peer, kind);
        self.drain_rings(now);
    }

    /// A link closed.
    pub fn handle_link_down(&mut self, now: Time, peer: &NodeName, reason: &str) {
        let Some(l) = self.links.get_mut(peer) else {
            return;
        };
        if !l.up {
            return;
        }
        self.links_generation += 1;
        l.up = false;
        l.since = now;
        l.reason = Some(short(reason));
        let kind = l.kind;
        self.returning.remove(peer);
        self.backoff(now, peer, false);
        self.event(
            now,
            EventKind::LinkDown,
            Some(self.cfg.me.name.clone()),
            Some(peer.clone()),
            format!("{} link down: {reason}", kind.as_str()),
        );
        self.refresh_own(now, false);
    }

    /// The transport's latest RTT estimate for a link.
    pub fn handle_rtt(&mut self, peer: &NodeName, rtt_us: u32) {
        if let Some(l) = self.links.get_mut(peer) {
            l.rtt_us = rtt_us;
            l.rtt_low_us = l.rtt_low_us.min(rtt_us);
            l.rtt_high_us = l.rtt_high_us.max(rtt_us);
        }
    }
}
