//! The built-in `sink` process and the data messages and loads it counts.
//! Part of [`Engine`]: its methods for this concern; the state stays in `Engine`.

use super::*;

impl Engine {
    pub(super) fn sink_count(&mut self, from: NodeName, bytes: u64) {
        self.counters.sink_messages += 1;
        self.counters.sink_bytes += bytes;
        let full = self.sink.per_sender.len() >= MAX_SINK_SENDERS;
        match self.sink.per_sender.get_mut(&from) {
            Some(c) => {
                c.0 += 1;
                c.1 += bytes;
            }
            None if full => self.sink.unattributed += 1,
            None => {
                self.sink.per_sender.insert(from, (1, bytes));
            }
        }
    }

    /// Sends a data message to `process` on `dst` along the routed path (bulk lane). A message
    /// that cannot be routed is counted in `routed_undeliverable`.
    pub fn send_message(&mut self, now: Time, dst: NodeName, process: String, payload: Vec<u8>) {
        let id = self.fresh_id();
        self.originate(now, dst, id, Body::Message { process, payload }, false);
    }

    /// Asks `from` to send a load to `target`'s sink, answered with [`Output::Reply`] carrying
    /// `token` and [`Reply::Load`] (a timeout after the load's own timeout and 10 s more).
    pub fn start_load_from(&mut self, now: Time, token: u64, from: NodeName, spec: LoadSpec) {
        let id = self.fresh_id();
        self.calls.insert(
            id,
            PendingCall {
                from: CallFrom::Local { token },
                deadline: now + Duration::from_millis(spec.timeout_ms) + Duration::from_secs(10),
                what: PendingWhat::Load { from: from.clone() },
            },
        );
        let call = Call::Load(spec);
        self.originate(now, from, id, Body::Call { call }, false);
    }

    /// A load asked for by another node ([`Output::RunLoad`]) finished.
    pub fn load_done(&mut self, now: Time, handle: u64, result: Result<LoadReport, String>) {
        if let Some(from) = self.loads.remove(&handle) {
            let result = result.map_err(|e| short(&e));
            self.finish(now, from, CallReply::Load(result.map(Into::into)));
        }
    }

    /// What this node's `sink` has counted; `reset` zeroes the counters after reading.
    pub fn sink_report(&mut self, reset: bool) -> SinkReport {
        let r = SinkReport {
            node: self.cfg.me.name.to_string(),
            senders: self
                .sink
                .per_sender
                .iter()
                .map(|(n, (m, b))| SinkCount {
                    from: n.to_string(),
                    messages: *m,
                    bytes: *b,
                })
                .collect(),
            unattributed: self.sink.unattributed,
        };
        if reset {
            self.sink = Sink::default();
        }
        r
    }

    /// Reads the `sink` counters of `target` (this node or another), answered with
    /// [`Output::Reply`] carrying `token` and [`Reply::Sink`].
    pub fn start_sink_read(
        &mut self,
        now: Time,
        token: u64,
        target: NodeName,
        reset: bool,
        timeout: Duration,
    ) {
        if target == self.cfg.me.name {
            let r = self.sink_report(reset);
            self.push(Output::Reply {
                token,
                reply: Reply::Sink(Ok(r)),
            });
            return;
        }
        let id = self.fresh_id();
        self.calls.insert(
            id,
            PendingCall {
                from: CallFrom::Local { token },
                deadline: now + timeout,
                what: PendingWhat::Sink {
                    target: target.clone(),
                },
            },
        );
        self.originate(
            now,
            target,
            id,
            Body::Call {
                call: Call::Sink { reset },
            },
            false,
        );
    }
}
