//! Routing: next hops, the forwarding rule applied, originating and delivering.
//! Part of [`Engine`]: its methods for this concern; the state stays in `Engine`.

use super::*;

impl Engine {
    /// The next hop toward `dst`, or why there is none.
    pub fn next_hop(&self, dst: &NodeName) -> Result<NodeName, (PingFailure, String)> {
        if self.links.get(dst).is_some_and(|l| l.up) {
            return Ok(dst.clone());
        }
        let Some(r) = self.table.get(dst.as_str()).filter(|r| !r.is_tombstone()) else {
            return Err((
                PingFailure::UnknownNode,
                format!("{dst} is not in the node table"),
            ));
        };
        let me = &self.cfg.me;
        if r.site == me.site {
            let why = match self.links.get(dst) {
                Some(l) => l.reason.clone().unwrap_or_else(|| "link is down".into()),
                None => match self.refused.get(dst) {
                    Some(f) => f.reason.clone(),
                    None => "no link yet".into(),
                },
            };
            return Err((
                PingFailure::NoRoute,
                format!("no link from {} to {dst}: {why}", me.name),
            ));
        }
        if !self.contract_path_exists(&me.site, &r.site) {
            return Err((
                PingFailure::Refused,
                format!(
                    "the contract has no path from site {} to site {}",
                    me.site, r.site
                ),
            ));
        }
        if me.role == Role::Gateway {
            // A gateway of the target site we are linked to.
            let direct = self
                .links
                .iter()
                .filter(|(_, l)| l.up && l.kind == LinkKind::Wan && l.ident.site == r.site)
                .map(|(n, _)| n);
            if let Some(g) = self.best_hop(dst, direct) {
                return Ok(g);
            }
            // Another WAN gateway that reaches the target site.
            let via = self
                .links
                .iter()
                .filter(|(n, l)| {
                    l.up && l.kind == LinkKind::Wan
                        && self
                            .table
                            .get(n.as_str())
                            .is_some_and(|g| g.reach.contains(&r.site))
                })
                .map(|(n, _)| n);
            if let Some(g) = self.best_hop(dst, via) {
                return Ok(g);
            }
        }
        if let Some(g) = self.best_hop(dst, self.local_gateways_reaching(&r.site)) {
            return Ok(g);
        }
        Err((
            PingFailure::NoRoute,
            format!(
                "no live gateway of site {} reaches site {}",
                me.site, r.site
            ),
        ))
    }

    /// How healthy a candidate next hop looks from here, worst of every view we have: its site
    /// ring (same site), the view its own site's gateways publish (other sites) and the WAN
    /// ring (gateways). 0 alive, 1 suspect, 2 dead.
    pub(super) fn hop_rank(&self, n: &NodeName) -> u8 {
        let Some(r) = self.table.get(n.as_str()) else {
            return 0;
        };
        let mut worst = Liveness::Alive;
        let mut consider = |l: Option<Liveness>| {
            if let Some(l) = l {
                worst = worst.max(l);
            }
        };
        if r.site == self.cfg.me.site {
            consider(self.site_ring.liveness(n));
        } else {
            consider(self.remote_view(&r.site, n));
        }
        if r.role == Role::Gateway {
            consider(self.wan_ring.as_ref().and_then(|w| w.liveness(n)));
        }
        match worst {
            Liveness::Alive => 0,
            Liveness::Suspect => 1,
            Liveness::Dead => 2,
        }
    }

    /// The next hop among `candidates`: never a dead one, alive ones before suspected ones, and
    /// among equals a rendezvous-hash choice on the destination (stable, spread, fails over).
    pub(super) fn best_hop<'a>(
        &self,
        dst: &NodeName,
        candidates: impl Iterator<Item = &'a NodeName>,
    ) -> Option<NodeName> {
        let ranked: Vec<(u8, &NodeName)> = candidates
            .map(|n| (self.hop_rank(n), n))
            .filter(|(rank, _)| *rank < 2)
            .collect();
        let best = ranked.iter().map(|(rank, _)| *rank).min()?;
        rendezvous(
            dst.as_str(),
            ranked
                .iter()
                .filter(|(rank, _)| *rank == best)
                .map(|(_, n)| *n),
        )
    }

    pub(super) fn contract_path_exists(&self, from: &SiteName, to: &SiteName) -> bool {
        let mut seen = BTreeSet::new();
        let mut queue = VecDeque::from([from.clone()]);
        while let Some(s) = queue.pop_front() {
            if s == *to {
                return true;
            }
            if !seen.insert(s.clone()) {
                continue;
            }
            for n in self.cfg.contract.neighbours(&s) {
                if !seen.contains(n) {
                    queue.push_back(n.clone());
                }
            }
        }
        false
    }

    pub(super) fn link_rtt(&self, peer: &NodeName) -> u32 {
        self.links.get(peer).map_or(0, |l| l.rtt_us)
    }

    /// Sends a message we originate. Failures to route are answered locally.
    pub(super) fn originate(
        &mut self,
        now: Time,
        dst: NodeName,
        id: u64,
        body: Body,
        direct_only: bool,
    ) {
        let env = Envelope {
            id,
            src: self.cfg.me.name.clone(),
            dst: dst.clone(),
            ttl: HOP_LIMIT,
            trace: Vec::new(),
            body,
        };
        if dst == self.cfg.me.name {
            self.deliver(now, env);
            return;
        }
        let hop = if direct_only {
            if self.links.get(&dst).is_some_and(|l| l.up) {
                Ok(dst.clone())
            } else {
                let why = self
                    .links
                    .get(&dst)
                    .and_then(|l| l.reason.clone())
                    .or_else(|| self.refused.get(&dst).map(|r| r.reason.clone()))
                    .unwrap_or_else(|| "no link".into());
                Err((
                    PingFailure::NoRoute,
                    format!("link {} -> {dst} is not up: {why}", self.cfg.me.name),
                ))
            }
        } else {
            self.next_hop(&dst)
        };
        self.forward_or_bounce(now, env, hop);
    }

    pub(super) fn forward_or_bounce(
        &mut self,
        now: Time,
        mut env: Envelope,
        hop: Result<NodeName, (PingFailure, String)>,
    ) {
        match hop {
            Ok(next) => {
                let rtt = self.link_rtt(&next);
                env.trace.push(Hop {
                    node: self.cfg.me.name.clone(),
                    rtt_us: rtt,
                });
                self.send_routed(next, env);
            }
            Err((failure, reason)) => {
                self.counters.routed_undeliverable += 1;
                if matches!(env.body, Body::Undeliverable { .. }) {
                    return; // never bounce a bounce
                }
                let mut trace = env.trace.clone();
                trace.push(Hop {
                    node: self.cfg.me.name.clone(),
                    rtt_us: 0,
                });
                let bounce = Body::Undeliverable {
                    id: env.id,
                    at: self.cfg.me.name.clone(),
                    failure: failure.into(),
                    reason,
                    trace,
                };
                if env.src == self.cfg.me.name {
                    let b = Envelope {
                        id: env.id,
                        src: self.cfg.me.name.clone(),
                        dst: env.src.clone(),
                        ttl: 0,
                        trace: Vec::new(),
                        body: bounce,
                    };
                    self.deliver(now, b);
                } else {
                    let id = env.id;
                    self.originate(now, env.src, id, bounce, false);
                }
            }
        }
    }

    /// Sends a routed envelope on the link to `next` (counted as forwarded).
    pub(super) fn send_routed(&mut self, next: NodeName, env: Envelope) {
        self.counters.routed_forwarded += 1;
        self.push(Output::Send {
            to: next,
            frame: Frame::Routed(env),
        });
    }

    /// A routed envelope reached this node: the forwarding rule ([`routing::transit`]) decides.
    pub(super) fn handle_routed(&mut self, now: Time, _from: &NodeName, mut env: Envelope) {
        let me = self.cfg.me.name.clone();
        let verdict = routing::transit(&me, &env, |dst| {
            self.next_hop(dst).map(|hop| {
                let rtt = self.link_rtt(&hop);
                (hop, rtt)
            })
        });
        match verdict {
            routing::Verdict::Deliver => self.deliver(now, env),
            routing::Verdict::Forward { hop, rtt_us } => {
                routing::spend_hop(&me, &mut env, rtt_us);
                self.send_routed(hop, env);
            }
            routing::Verdict::Undeliverable(failure, reason) => {
                self.forward_or_bounce(now, env, Err((failure, reason)));
            }
        }
    }

    pub(super) fn deliver(&mut self, now: Time, mut env: Envelope) {
        env.trace.push(Hop {
            node: self.cfg.me.name.clone(),
            rtt_us: 0,
        });
        match env.body {
            Body::EchoRequest { seq } => {
                // The built-in `echo` process.
                let id = env.id;
                self.originate(
                    now,
                    env.src.clone(),
                    id,
                    Body::EchoReply {
                        seq,
                        forward: env.trace,
                    },
                    false,
                );
            }
            Body::EchoReply { seq, forward } => self.echo_answered(now, env.id, seq, Ok(forward)),
            Body::Undeliverable {
                id,
                at,
                failure,
                reason,
                trace,
            } => {
                let failure = failure.into();
                if self.echoes.contains_key(&id) {
                    let seq = self.echoes.get(&id).map_or(0, |e| e.seq);
                    self.echo_answered(now, id, seq, Err((failure, at, reason, trace)));
                } else if self.calls.contains_key(&id) {
                    self.call_failed(now, id, failure, at.to_string(), reason);
                }
            }
            Body::Call { call } => self.handle_call(now, env.src, env.id, call),
            Body::CallReply { reply } => self.call_answered(now, env.id, reply),
            Body::Message { process, payload } => {
                if process == SINK {
                    self.sink_count(env.src, payload.len() as u64);
                } else {
                    self.counters.messages_refused += 1;
                    let me = self.cfg.me.name.clone();
                    let reason = format!("no process named {process:?} runs on {me}");
                    env.body = Body::Message {
                        process,
                        payload: Vec::new(),
                    };
                    self.forward_or_bounce(now, env, Err((PingFailure::Refused, short(&reason))));
                }
            }
        }
    }
}
