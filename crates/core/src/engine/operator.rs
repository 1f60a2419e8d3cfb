//! Operator commands: forget, leave.
//! Part of [`Engine`]: its methods for this concern; the state stays in `Engine`.

use super::*;

impl Engine {
    /// Writes a tombstone for `name` above every clock seen, and spreads it.
    /// Without `force`, a node this observer sees `alive` or `suspect` is not forgotten: the
    /// tombstone would make a running node exit and be refused everywhere.
    pub fn forget(&mut self, now: Time, name: &NodeName, force: bool) -> Result<u64, String> {
        if *name == self.cfg.me.name {
            return Err(format!(
                "{name} is the node answering this request: a node cannot forget itself; ask another node (--agent) to forget it"
            ));
        }
        let Some(r) = self.table.get(name.as_str()).cloned() else {
            return Err(format!("{name} is not in the node table"));
        };
        if r.is_tombstone() {
            return Ok(r.clock);
        }
        let status = self.status_of(name);
        if !force && matches!(status, NodeStatus::Alive | NodeStatus::Suspect) {
            return Err(format!(
                "{name} is {} as seen by {}: forgetting it would make the running node exit and be refused by every peer; stop it first, or pass --force if that is what you want",
                status.as_str(),
                self.cfg.me.name
            ));
        }
        let stone = Arc::new(NodeRecord::tombstone(&r, r.clock + 1));
        let clock = stone.clock;
        self.table.merge(stone.clone());
        self.push(Output::Persist);
        self.on_forgotten(now, name);
        self.statuses.insert(name.clone(), NodeStatus::Forgotten);
        let targets: Vec<NodeName> = self
            .links
            .iter()
            .filter(|(_, l)| l.up)
            .map(|(n, _)| n.clone())
            .collect();
        for t in targets {
            self.push(Output::Send {
                to: t,
                frame: Frame::Records(vec![stone.clone()]),
            });
        }
        self.refresh_own(now, false);
        Ok(clock)
    }

    /// Leaves gracefully: marks our record `left`, tells the rings and every peer.
    pub fn leave(&mut self, now: Time) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        // The rings are not told: a failure-detector datagram would outrun the `left` record
        // (streams) and peers would report a death first. Peers learn from the record and the
        // `Leaving` frame; the rings then see us go quiet, and `left` wins over their verdict.
        self.refresh_own(now, true);
        // The `left` record goes out now, ahead of the `Leaving` frame.
        self.flush_own();
        let targets = self.linked_peers();
        for t in targets {
            self.push(Output::Send {
                to: t,
                frame: Frame::Leaving,
            });
        }
    }
}
