//! Requests: ping, echo, probe sets, calls between nodes.
//! Part of [`Engine`]: its methods for this concern; the state stays in `Engine`.

use super::*;

impl Engine {
    /// Starts a ping from this node (`from` None or us) or from another node, answered with
    /// [`Output::Reply`] carrying `token`.
    pub fn start_ping(
        &mut self,
        now: Time,
        token: u64,
        from: Option<NodeName>,
        target: NodeName,
        count: u32,
        timeout: Duration,
    ) {
        let count = count.clamp(1, MAX_PING_COUNT);
        match from {
            Some(f) if f != self.cfg.me.name => {
                let id = self.fresh_id();
                let deadline = now + timeout * (count + 1) + Duration::from_secs(1);
                self.calls.insert(
                    id,
                    PendingCall {
                        from: CallFrom::Local { token },
                        deadline,
                        what: PendingWhat::Ping {
                            from: f.clone(),
                            target: target.clone(),
                        },
                    },
                );
                let timeout_ms = timeout.as_millis() as u64;
                self.originate(
                    now,
                    f,
                    id,
                    Body::Call {
                        call: Call::Ping {
                            target,
                            count,
                            timeout_ms,
                        },
                    },
                    false,
                );
            }
            _ => self.start_session(now, CallFrom::Local { token }, target, count, timeout),
        }
    }

    pub(super) fn start_session(
        &mut self,
        now: Time,
        from: CallFrom,
        target: NodeName,
        count: u32,
        timeout: Duration,
    ) {
        if self.sessions.len() >= MAX_PING_SESSIONS {
            let me = self.cfg.me.name.clone();
            let report = self.failed_ping(
                &me,
                &target,
                PingFailure::NoRoute,
                me.to_string(),
                "too many pings in progress on this node".into(),
            );
            self.finish(now, from, CallReply::Ping(report.into()));
            return;
        }
        let id = self.fresh_id();
        self.sessions.insert(
            id,
            PingSession {
                from,
                target,
                count,
                timeout,
                attempts: Vec::new(),
                next_seq: 0,
                measuring: None,
            },
        );
        self.session_next(now, id);
    }

    pub(super) fn session_next(&mut self, now: Time, session: u64) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if s.next_seq >= s.count {
            let s = self.sessions.remove(&session).expect("present");
            let report = self.ping_report(&s);
            self.finish(now, s.from, CallReply::Ping(report.into()));
            return;
        }
        let seq = s.next_seq;
        s.next_seq += 1;
        let target = s.target.clone();
        let timeout = s.timeout;
        self.send_echo(
            now,
            target,
            seq,
            timeout,
            EchoOwner::Ping { session },
            false,
        );
    }

    pub(super) fn send_echo(
        &mut self,
        now: Time,
        target: NodeName,
        seq: u32,
        timeout: Duration,
        owner: EchoOwner,
        direct: bool,
    ) {
        if self.echoes.len() >= MAX_PENDING_ECHOES {
            // Oldest first out: it will be reported as a timeout.
            if let Some((&oldest, _)) = self.echoes.iter().next() {
                self.expire_echo(now, oldest);
            }
        }
        let id = self.fresh_id();
        self.echoes.insert(
            id,
            PendingEcho {
                seq,
                target: target.clone(),
                sent: now,
                deadline: now + timeout,
                owner,
            },
        );
        self.originate(now, target, id, Body::EchoRequest { seq }, direct);
    }

    pub(super) fn echo_answered(
        &mut self,
        now: Time,
        id: u64,
        seq: u32,
        result: Result<Vec<Hop>, (PingFailure, NodeName, String, Vec<Hop>)>,
    ) {
        let Some(p) = self.echoes.remove(&id) else {
            return;
        };
        let total_ms = now.saturating_sub(p.sent).as_secs_f64() * 1000.0;
        let attempt = match result {
            Ok(forward) => {
                let path: Vec<String> = forward.iter().map(|h| h.node.to_string()).collect();
                let hops_ms = forward[..forward.len().saturating_sub(1)]
                    .iter()
                    .map(|h| f64::from(h.rtt_us) / 1000.0)
                    .collect();
                PingAttempt {
                    seq,
                    ok: true,
                    path,
                    hops_ms,
                    total_ms,
                    failure: None,
                    broke_at: None,
                    reason: None,
                }
            }
            Err((failure, at, reason, trace)) => PingAttempt {
                seq,
                ok: false,
                path: trace.iter().map(|h| h.node.to_string()).collect(),
                hops_ms: trace[..trace.len().saturating_sub(1)]
                    .iter()
                    .map(|h| f64::from(h.rtt_us) / 1000.0)
                    .collect(),
                total_ms,
                failure: Some(failure),
                broke_at: Some(at.to_string()),
                reason: Some(reason),
            },
        };
        self.echo_done(now, p, attempt);
    }

    pub(super) fn echo_done(&mut self, now: Time, p: PendingEcho, attempt: PingAttempt) {
        match p.owner {
            EchoOwner::Ping { session } => {
                let n = attempt.path.len();
                if attempt.ok && n > 2 {
                    // Measure each hop for real: echo every intermediate node of the path, then
                    // split the round trip into differences of cumulative round trips.
                    let Some(s) = self.sessions.get_mut(&session) else {
                        return;
                    };
                    let timeout = s.timeout;
                    let targets: Vec<(usize, String)> = attempt.path[1..n - 1]
                        .iter()
                        .cloned()
                        .enumerate()
                        .map(|(i, t)| (i + 1, t))
                        .collect();
                    let mut cum = vec![None; n];
                    cum[0] = Some(0.0);
                    cum[n - 1] = Some(attempt.total_ms);
                    s.measuring = Some(Measuring {
                        attempt,
                        cum,
                        waiting: targets.len(),
                    });
                    for (index, t) in targets {
                        match NodeName::new(t) {
                            Ok(t) => self.send_echo(
                                now,
                                t,
                                0,
                                timeout,
                                EchoOwner::Segment { session, index },
                                false,
                            ),
                            Err(_) => self.segment_done(now, session, index, None),
                        }
                    }
                } else {
                    let mut attempt = attempt;
                    if attempt.ok && n == 2 {
                        // One link: the hop is the measured round trip itself.
                        attempt.hops_ms = vec![attempt.total_ms];
                    }
                    if let Some(s) = self.sessions.get_mut(&session) {
                        s.attempts.push(attempt);
                    }
                    self.session_next(now, session);
                }
            }
            EchoOwner::Segment { session, index } => {
                self.segment_done(now, session, index, attempt.ok.then_some(attempt.total_ms));
            }
            EchoOwner::Probe { call, peer } => {
                let kind = self.link_kind_to(&peer);
                let result = ProbeResult {
                    from: self.cfg.me.name.to_string(),
                    to: peer.to_string(),
                    kind,
                    ok: attempt.ok,
                    rtt_ms: attempt.ok.then_some(attempt.total_ms),
                    error: attempt.reason,
                };
                self.finish(now, call, CallReply::Probe(result.into()));
            }
        }
    }

    pub(super) fn segment_done(
        &mut self,
        now: Time,
        session: u64,
        index: usize,
        rtt_ms: Option<f64>,
    ) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(m) = s.measuring.as_mut() else {
            return;
        };
        if let Some(slot) = m.cum.get_mut(index) {
            *slot = rtt_ms;
        }
        m.waiting = m.waiting.saturating_sub(1);
        if m.waiting > 0 {
            return;
        }
        let Some(mut m) = s.measuring.take() else {
            return;
        };
        // Hop k = RTT(origin -> node k+1) - RTT(origin -> node k). Measurements are taken a
        // moment apart, so a difference can come out slightly negative: clamp it at zero. A hop
        // whose end did not answer keeps the transport's RTT estimate of that link.
        for k in 0..m.attempt.hops_ms.len() {
            if let (Some(a), Some(b)) = (m.cum[k], m.cum[k + 1]) {
                m.attempt.hops_ms[k] = (b - a).max(0.0);
            }
        }
        s.attempts.push(m.attempt);
        self.session_next(now, session);
    }

    pub(super) fn expire_echo(&mut self, now: Time, id: u64) {
        let Some(p) = self.echoes.remove(&id) else {
            return;
        };
        let path = vec![self.cfg.me.name.to_string()];
        let guess = self.next_hop(&p.target).ok();
        let reason = match &guess {
            Some(h) if *h == p.target => format!(
                "no answer from {} within {:?}",
                p.target,
                p.deadline - p.sent
            ),
            Some(h) => format!(
                "no answer within {:?}; the path leaves {} via {h}",
                p.deadline - p.sent,
                self.cfg.me.name
            ),
            None => format!("no answer within {:?}", p.deadline - p.sent),
        };
        let attempt = PingAttempt {
            seq: p.seq,
            ok: false,
            path,
            hops_ms: vec![],
            total_ms: now.saturating_sub(p.sent).as_secs_f64() * 1000.0,
            failure: Some(PingFailure::Timeout),
            broke_at: None,
            reason: Some(reason),
        };
        self.echo_done(now, p, attempt);
    }

    /// A ping that never got to send a probe: one failed attempt saying where and why.
    pub(super) fn failed_ping(
        &self,
        from: &NodeName,
        target: &NodeName,
        failure: PingFailure,
        broke_at: String,
        reason: String,
    ) -> PingReport {
        PingReport {
            from: from.to_string(),
            target: target.to_string(),
            ok: false,
            secure: self.cfg.secure,
            sent: 0,
            received: 0,
            attempts: vec![PingAttempt {
                seq: 0,
                ok: false,
                path: vec![self.cfg.me.name.to_string()],
                hops_ms: vec![],
                total_ms: 0.0,
                failure: Some(failure),
                broke_at: Some(broke_at),
                reason: Some(reason),
            }],
            min_ms: None,
            p50_ms: None,
            max_ms: None,
        }
    }

    pub(super) fn ping_report(&self, s: &PingSession) -> PingReport {
        let mut rtts: Vec<f64> = s
            .attempts
            .iter()
            .filter(|a| a.ok)
            .map(|a| a.total_ms)
            .collect();
        rtts.sort_by(f64::total_cmp);
        let received = rtts.len() as u32;
        PingReport {
            from: self.cfg.me.name.to_string(),
            target: s.target.to_string(),
            ok: received == s.count,
            secure: self.cfg.secure,
            sent: s.attempts.len() as u32,
            received,
            attempts: s.attempts.clone(),
            min_ms: rtts.first().copied(),
            p50_ms: rtts.get(rtts.len() / 2).copied(),
            max_ms: rtts.last().copied(),
        }
    }

    pub(super) fn link_kind_to(&self, peer: &NodeName) -> LinkKind {
        match self.table.get(peer.as_str()) {
            Some(r) if r.site != self.cfg.me.site => LinkKind::Wan,
            _ => LinkKind::Site,
        }
    }

    /// Probes every expected link once (each from its lower-named end, directly over that link)
    /// and answers with [`Reply::Probes`].
    pub fn start_probe_links(&mut self, now: Time, token: u64, timeout: Duration) {
        let pairs = self.expected_links();
        let set = self.fresh_id();
        self.probe_sets.insert(
            set,
            ProbeSet {
                token,
                expected: pairs.len(),
                results: Vec::new(),
            },
        );
        if pairs.is_empty() {
            self.maybe_finish_probe_set(now, set);
            return;
        }
        for (a, b, kind) in pairs {
            if a == self.cfg.me.name {
                self.send_echo(
                    now,
                    b.clone(),
                    0,
                    timeout,
                    EchoOwner::Probe {
                        call: CallFrom::ProbeSet { set },
                        peer: b,
                    },
                    true,
                );
            } else {
                let id = self.fresh_id();
                self.calls.insert(
                    id,
                    PendingCall {
                        from: CallFrom::ProbeSet { set },
                        deadline: now + timeout * 2 + Duration::from_millis(500),
                        what: PendingWhat::Probe {
                            from: a.clone(),
                            to: b.clone(),
                            kind,
                        },
                    },
                );
                let timeout_ms = timeout.as_millis() as u64;
                self.originate(
                    now,
                    a,
                    id,
                    Body::Call {
                        call: Call::ProbeLink {
                            peer: b,
                            timeout_ms,
                        },
                    },
                    false,
                );
            }
        }
    }

    pub(super) fn maybe_finish_probe_set(&mut self, now: Time, set: u64) {
        let done = self
            .probe_sets
            .get(&set)
            .is_some_and(|p| p.results.len() >= p.expected);
        if done {
            if let Some(mut p) = self.probe_sets.remove(&set) {
                p.results
                    .sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
                let _ = now;
                self.push(Output::Reply {
                    token: p.token,
                    reply: Reply::Probes(p.results),
                });
            }
        }
    }

    pub(super) fn handle_call(&mut self, now: Time, src: NodeName, id: u64, call: Call) {
        let from = CallFrom::Remote { node: src, id };
        let cap = |ms: u64| Duration::from_millis(ms.clamp(1, 60_000));
        match call {
            Call::Ping {
                target,
                count,
                timeout_ms,
            } => self.start_session(now, from, target, count, cap(timeout_ms)),
            Call::ProbeLink { peer, timeout_ms } => self.send_echo(
                now,
                peer.clone(),
                0,
                cap(timeout_ms),
                EchoOwner::Probe { call: from, peer },
                true,
            ),
            Call::Sink { reset } => {
                let r = self.sink_report(reset);
                self.finish(now, from, CallReply::Sink(r.into()));
            }
            Call::Load(spec) => {
                if self.loads.len() >= MAX_PENDING_CALLS {
                    let why = format!("{} runs too many loads already", self.cfg.me.name);
                    self.finish(now, from, CallReply::Load(Err(why)));
                    return;
                }
                let handle = self.fresh_id();
                self.loads.insert(handle, from);
                self.push(Output::RunLoad { handle, spec });
            }
        }
    }

    pub(super) fn finish(&mut self, now: Time, to: CallFrom, reply: CallReply) {
        match to {
            CallFrom::Local { token } => {
                let reply = match reply {
                    CallReply::Ping(p) => Reply::Ping(p.into()),
                    CallReply::Probe(p) => Reply::Probes(vec![p.into()]),
                    CallReply::Sink(r) => Reply::Sink(Ok(r.into())),
                    CallReply::Load(r) => Reply::Load(r.map(Into::into)),
                };
                self.push(Output::Reply { token, reply });
            }
            CallFrom::Remote { node, id } => {
                self.originate(now, node, id, Body::CallReply { reply }, false);
            }
            CallFrom::ProbeSet { set } => {
                if let (Some(p), CallReply::Probe(r)) = (self.probe_sets.get_mut(&set), reply) {
                    p.results.push(r.into());
                }
                self.maybe_finish_probe_set(now, set);
            }
        }
    }

    pub(super) fn call_answered(&mut self, now: Time, id: u64, reply: CallReply) {
        if let Some(c) = self.calls.remove(&id) {
            self.finish(now, c.from, reply);
        }
    }

    pub(super) fn call_failed(
        &mut self,
        now: Time,
        id: u64,
        failure: PingFailure,
        at: String,
        reason: String,
    ) {
        let Some(c) = self.calls.remove(&id) else {
            return;
        };
        let reply = match c.what {
            PendingWhat::Ping { from, target } => CallReply::Ping(
                self.failed_ping(
                    &from,
                    &target,
                    failure,
                    at,
                    format!("could not reach {from} to start the ping: {reason}"),
                )
                .into(),
            ),
            PendingWhat::Probe { from, to, kind } => CallReply::Probe(
                ProbeResult {
                    from: from.to_string(),
                    to: to.to_string(),
                    kind,
                    ok: false,
                    rtt_ms: None,
                    error: Some(format!(
                        "could not reach {from} to run the probe ({at}: {reason})"
                    )),
                }
                .into(),
            ),
            PendingWhat::Sink { target } => {
                if let CallFrom::Local { token } = c.from {
                    self.push(Output::Reply {
                        token,
                        reply: Reply::Sink(Err(format!(
                            "could not read the sink of {target} ({at}: {reason})"
                        ))),
                    });
                }
                return;
            }
            PendingWhat::Load { from } => {
                if let CallFrom::Local { token } = c.from {
                    self.push(Output::Reply {
                        token,
                        reply: Reply::Load(Err(format!(
                            "could not run the load on {from} ({at}: {reason})"
                        ))),
                    });
                }
                return;
            }
        };
        self.finish(now, c.from, reply);
    }

    pub(super) fn expire_requests(&mut self, now: Time) {
        let due: Vec<u64> = self
            .echoes
            .iter()
            .filter(|(_, e)| e.deadline <= now)
            .map(|(i, _)| *i)
            .collect();
        for id in due {
            self.expire_echo(now, id);
        }
        let due: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(i, _)| *i)
            .collect();
        for id in due {
            let me = self.cfg.me.name.to_string();
            self.call_failed(
                now,
                id,
                PingFailure::Timeout,
                me,
                "no answer in time".into(),
            );
        }
    }
}
