//! Failure-detection rings: SWIM with suspicion (foca), driven without a clock.
//!
//! Every node runs a [`Swim`] ring with the nodes of its own site; gateways run a second one with
//! the gateways of every site (the WAN ring). foca never reads a clock: it asks us to deliver
//! timer events later. We keep those timers in a heap keyed by the caller's `now`, and we stretch
//! the probe and suspicion timers by the [`LocalHealth`] multiplier, so a starved observer waits
//! longer before it accuses anyone (Lifeguard).
//!
//! Identities carry a generation: a node declared down (for example across a healed partition)
//! renews itself with the next generation, and a restarted node starts from its table clock, so
//! it always wins over its previous life.

use crate::health::LocalHealth;
use crate::name::NodeName;
use crate::table::Liveness;
use crate::wire::{Ring, MAX_SWIM_PACKET};
use crate::Time;
use foca::{
    AccumulatingRuntime, Config, Foca, Identity, NoCustomBroadcast, OwnedNotification,
    PostcardCodec, State, Timer,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::num::NonZeroUsize;
use std::time::Duration;

/// Most members a ring tracks; data that would grow it further is dropped.
pub const MAX_RING_MEMBERS: usize = crate::table::MAX_RECORDS;
/// Most pending timers.
const MAX_TIMERS: usize = 65_536;

/// A ring member: a node name plus a generation that rises on every renewal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SwimId {
    pub name: NodeName,
    pub gen: u64,
}

impl Identity for SwimId {
    type Addr = NodeName;

    fn renew(&self) -> Option<Self> {
        Some(SwimId {
            name: self.name.clone(),
            gen: self.gen.wrapping_add(1),
        })
    }

    fn addr(&self) -> NodeName {
        self.name.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.gen > adversary.gen
    }
}

/// Timing of one ring.
#[derive(Debug, Clone)]
pub struct RingTiming {
    pub probe_period: Duration,
    pub probe_rtt: Duration,
    /// Base suspicion timeout (before the local-health multiplier).
    pub suspect_to_down: Duration,
}

impl RingTiming {
    /// Inside a site: probe every 500 ms (timeout 250 ms), suspicion of 2.5 s (both scaled by
    /// health). A crashed member is `dead` across its site in 3.5-5 s (simulated): waiting to
    /// be probed (each period a given member is probed by nobody with probability ~1/e, so this
    /// wait has a tail), one period to suspect, the suspicion, then gossip. Halving the probe
    /// period halves that tail and doubles the failure detector's datagrams (~60 -> ~130 bytes
    /// per node per second); a peer stopped for longer than ~3 s is declared dead and comes
    /// back alive (with a renewed identity) when it resumes.
    pub fn lan() -> Self {
        RingTiming {
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(250),
            suspect_to_down: Duration::from_millis(2500),
        }
    }

    /// Between gateways: probe every 2 s, suspicion of 6 s.
    pub fn wan() -> Self {
        RingTiming {
            probe_period: Duration::from_secs(2),
            probe_rtt: Duration::from_secs(1),
            suspect_to_down: Duration::from_secs(6),
        }
    }

    fn foca_config(&self, expected_members: usize) -> Config {
        let n = std::num::NonZeroU32::new(expected_members.clamp(1, 1 << 20) as u32)
            .unwrap_or(std::num::NonZeroU32::MIN);
        let mut c = Config::new_lan(n);
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.suspect_to_down_after = self.suspect_to_down;
        c.max_packet_size = NonZeroUsize::new(MAX_SWIM_PACKET).unwrap_or(NonZeroUsize::MIN);
        c.remove_down_after = Some(Duration::from_secs(3600));
        c
    }
}

/// A liveness change seen by a ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub name: NodeName,
    pub from: Option<Liveness>,
    pub to: Liveness,
}

/// One ring.
pub struct Swim {
    ring: Ring,
    foca: Foca<SwimId, PostcardCodec, StdRng, NoCustomBroadcast>,
    rt: AccumulatingRuntime<SwimId>,
    timers: BinaryHeap<Reverse<(Time, u64)>>,
    pending: BTreeMap<u64, Timer<SwimId>>,
    next_timer: u64,
    health: LocalHealth,
    states: BTreeMap<NodeName, Liveness>,
    outbox: Vec<(NodeName, Vec<u8>)>,
    changes: Vec<Change>,
    /// Rises whenever a member's liveness changes.
    generation: u64,
    timing: RingTiming,
    /// The ring size foca's dissemination is currently configured for.
    sized_for: usize,
    /// Packets dropped: undecodable, or the ring is full.
    pub dropped: u64,
}

impl std::fmt::Debug for Swim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swim")
            .field("ring", &self.ring)
            .field("me", self.foca.identity())
            .field("members", &self.states)
            .field("health", &self.health.score())
            .finish_non_exhaustive()
    }
}

fn liveness(s: State) -> Liveness {
    match s {
        State::Alive => Liveness::Alive,
        State::Suspect => Liveness::Suspect,
        State::Down => Liveness::Dead,
    }
}

impl Swim {
    /// A ring of which `me` is the first member.
    pub fn new(
        ring: Ring,
        me: SwimId,
        timing: &RingTiming,
        expected_members: usize,
        seed: u64,
        health: LocalHealth,
    ) -> Swim {
        let sized_for = expected_members;
        let foca = Foca::new(
            me,
            timing.foca_config(sized_for),
            StdRng::seed_from_u64(seed),
            PostcardCodec,
        );
        Swim {
            ring,
            foca,
            rt: AccumulatingRuntime::new(),
            timers: BinaryHeap::new(),
            pending: BTreeMap::new(),
            next_timer: 0,
            health,
            states: BTreeMap::new(),
            outbox: Vec::new(),
            changes: Vec::new(),
            generation: 0,
            timing: timing.clone(),
            sized_for,
            dropped: 0,
        }
    }

    /// Which ring this is.
    pub fn ring(&self) -> Ring {
        self.ring
    }

    /// Our own identity (its generation rises when we renew).
    pub fn identity(&self) -> &SwimId {
        self.foca.identity()
    }

    /// Current local-health score.
    pub fn health_score(&self) -> u32 {
        self.health.score()
    }

    /// Asks `peer` to let us in (sent when a link to it comes up).
    pub fn announce(&mut self, now: Time, peer: &NodeName) {
        let dst = SwimId {
            name: peer.clone(),
            gen: 0,
        };
        let _ = self.foca.announce(dst, &mut self.rt);
        self.drain(now);
    }

    /// A packet from a peer.
    pub fn handle_data(&mut self, now: Time, data: &[u8]) {
        if self.states.len() >= MAX_RING_MEMBERS {
            self.dropped += 1;
            return;
        }
        if self.foca.handle_data(data, &mut self.rt).is_err() {
            self.dropped += 1;
        }
        self.drain(now);
    }

    /// Delivers every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        while let Some(Reverse((due, id))) = self.timers.peek().copied() {
            if due > now {
                break;
            }
            self.timers.pop();
            let Some(timer) = self.pending.remove(&id) else {
                continue;
            };
            let late = self.health.timer_fired(now.saturating_sub(due));
            if matches!(timer, Timer::ProbeRandomMember(_)) && !late {
                self.health.period_ok();
            }
            let _ = self.foca.handle_timer(timer, &mut self.rt);
            self.drain(now);
        }
    }

    /// When [`Swim::handle_timeout`] next needs calling.
    pub fn next_deadline(&self) -> Option<Time> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Leaves the ring gracefully (tells a few members we are going).
    pub fn leave(&mut self, now: Time) {
        let _ = self.foca.leave_cluster(&mut self.rt);
        self.drain(now);
    }

    /// Liveness of `name` as this ring sees it (None: never a member).
    pub fn liveness(&self, name: &NodeName) -> Option<Liveness> {
        self.states.get(name).copied()
    }

    /// Every member this ring has seen, with its liveness.
    pub fn members(&self) -> impl Iterator<Item = (&NodeName, Liveness)> {
        self.states.iter().map(|(n, l)| (n, *l))
    }

    /// A number that rises whenever a member's liveness changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Datagrams to send: `(peer, foca packet)`.
    pub fn take_sends(&mut self) -> Vec<(NodeName, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }

    /// Liveness changes since the last call.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    fn drain(&mut self, now: Time) {
        let changes_before = self.changes.len();
        while let Some((to, data)) = self.rt.to_send() {
            self.outbox.push((to.name, data.to_vec()));
        }
        while let Some((after, timer)) = self.rt.to_schedule() {
            if self.pending.len() >= MAX_TIMERS {
                self.dropped += 1;
                continue;
            }
            let after = match timer {
                Timer::SendIndirectProbe { .. } | Timer::ChangeSuspectToDown { .. } => {
                    self.health.scale(after)
                }
                _ => after,
            };
            let id = self.next_timer;
            self.next_timer += 1;
            self.pending.insert(id, timer);
            self.timers.push(Reverse((now + after, id)));
        }
        let mut notified = false;
        while let Some(n) = self.rt.to_notify() {
            if matches!(
                n,
                OwnedNotification::MemberUp(_)
                    | OwnedNotification::MemberDown(_)
                    | OwnedNotification::Rename(..)
                    | OwnedNotification::Rejoin(_)
            ) {
                notified = true;
            }
        }
        // Suspicion is not notified by foca: diff the membership after every interaction.
        let _ = notified;
        let me = self.foca.identity().name.clone();
        let mut seen: BTreeMap<NodeName, Liveness> = BTreeMap::new();
        for m in self.foca.iter_membership_state() {
            let id = m.id();
            if id.name == me {
                continue;
            }
            let l = liveness(m.state());
            // Several generations of one node may be present: the live one wins.
            seen.entry(id.name.clone())
                .and_modify(|cur| {
                    if l < *cur {
                        *cur = l;
                    }
                })
                .or_insert(l);
        }
        for (name, l) in &seen {
            let prev = self.states.get(name).copied();
            if prev != Some(*l) {
                if prev == Some(Liveness::Suspect) && *l == Liveness::Alive {
                    self.health.suspicion_refuted();
                }
                self.changes.push(Change {
                    name: name.clone(),
                    from: prev,
                    to: *l,
                });
            }
        }
        // Members foca forgot entirely stay known to us as dead.
        for (name, l) in self.states.iter_mut() {
            if !seen.contains_key(name) && *l != Liveness::Dead {
                self.changes.push(Change {
                    name: name.clone(),
                    from: Some(*l),
                    to: Liveness::Dead,
                });
                *l = Liveness::Dead;
            }
        }
        for (name, l) in seen {
            self.states.insert(name, l);
        }
        if self.changes.len() != changes_before {
            self.generation += 1;
        }
        // How many times foca retransmits an update grows with the log of the ring size; a node
        // starting with an empty table does not know the size, so follow what the ring sees
        // (only the retransmission count and the suspicion multiplier change, never the probe
        // timing, which foca does not allow).
        let size = self.states.len() + 1;
        if size > self.sized_for {
            self.sized_for = size.next_power_of_two();
            let _ = self
                .foca
                .set_config(self.timing.foca_config(self.sized_for));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(name: &str, seed: u64) -> Swim {
        Swim::new(
            Ring::Site,
            SwimId {
                name: NodeName::new(name).unwrap(),
                gen: 1,
            },
            &RingTiming::lan(),
            3,
            seed,
            LocalHealth::new(8, Duration::from_millis(250)),
        )
    }

    /// Delivers every packet instantly between the rings, `steps` times 100 ms.
    fn run(rings: &mut [Swim], now: &mut Time, steps: u32, cut: Option<&str>) {
        for _ in 0..steps {
            *now += Duration::from_millis(100);
            for r in rings.iter_mut() {
                r.handle_timeout(*now);
            }
            loop {
                let mut packets = Vec::new();
                for (i, r) in rings.iter_mut().enumerate() {
                    for (to, data) in r.take_sends() {
                        packets.push((i, to, data));
                    }
                }
                if packets.is_empty() {
                    break;
                }
                for (from, to, data) in packets {
                    let from_name = rings[from].identity().name.clone();
                    if cut.is_some_and(|c| c == to.as_str() || c == from_name.as_str()) {
                        continue;
                    }
                    if let Some(r) = rings.iter_mut().find(|r| r.identity().name == to) {
                        r.handle_data(*now, &data);
                    }
                }
            }
        }
    }

    #[test]
    fn three_nodes_see_each_other_then_detect_a_dead_one() {
        let mut rings = vec![ring("a", 1), ring("b", 2), ring("c", 3)];
        let mut now = Duration::ZERO;
        let a = NodeName::new("a").unwrap();
        let c = NodeName::new("c").unwrap();
        rings[1].announce(now, &a);
        rings[2].announce(now, &a);
        run(&mut rings, &mut now, 30, None);
        for r in &rings {
            assert_eq!(
                r.members().filter(|(_, l)| *l == Liveness::Alive).count(),
                2,
                "{r:?}"
            );
        }
        run(&mut rings, &mut now, 200, Some("c"));
        assert_eq!(rings[0].liveness(&c), Some(Liveness::Dead));
        assert_eq!(rings[1].liveness(&c), Some(Liveness::Dead));
        let changes = rings[0].take_changes();
        assert!(changes
            .iter()
            .any(|ch| ch.name == c && ch.to == Liveness::Suspect));
    }
}
