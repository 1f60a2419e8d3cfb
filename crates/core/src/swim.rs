//! Failure-detection rings: SWIM with suspicion (foca), driven without a clock.
//!
//! Every node runs a [`Swim`] ring with the nodes of its own site; gateways run a second one with
//! the gateways of every site (the WAN ring). foca never reads a clock: it asks us to deliver
//! timer events later. We keep those timers in a heap keyed by the caller's `now`, and we stretch
//! the probe and suspicion timers by the [`LocalHealth`] multiplier, so a starved observer waits
//! longer before it accuses anyone (Lifeguard).
//!
//! Suspicion is dynamic (Lifeguard's second half, as memberlist does it). foca starts a
//! suspicion timer only at a member whose own probe failed, and its gossip says *that* a member
//! is suspect, never *who* found it so: a member repeating a suspicion looks the same as one that
//! confirmed it. So every member whose own probe fails tells the ring once, with an accusation
//! datagram, "I suspect X at incarnation i" ([`Notice::Suspect`]), and every member that hears of a
//! suspicion (its own probe or an accusation) runs one timer for it here, in place of foca's.
//! The timer starts at its longest ([`RingTiming::suspect_to_down`]) and is brought forward as
//! distinct members accuse the same member at the same incarnation, down to
//! [`RingTiming::suspect_min`] after [`RingTiming::confirmations`] of them
//! ([`suspicion_timeout`]); when it expires we hand foca its own "suspect to down" timer, and
//! foca declares the member down if it has not refuted meanwhile. One accuser alone (a lossy or
//! starved observer) keeps the long timeout; a crash, which every prober sees, is declared in
//! about the short one, by every member at about the same time.
//!
//! Since every member holds a timer, a refutation must reach every member before the shortest
//! suspicion ends. The accused member gets the accusations too and refutes as soon as it reads
//! one (a paused member, as soon as it resumes), and a member whose incarnation rises tells every
//! member at once ([`Notice::Alive`]) rather than only those that gossip reaches first.
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
    AccumulatingRuntime, Codec, Config, Foca, Identity, Member, NoCustomBroadcast,
    OwnedNotification, PostcardCodec, State, Timer,
};
use foca::{Incarnation, TimerToken};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
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
/// Most suspicions tracked at once from accusations of others (one per member at its current
/// incarnation, so a ring holds at most one per member anyway); past it accusations about further
/// members are ignored (our own probes still start theirs).
pub const MAX_SUSPICIONS: usize = 256;
/// Most confirmations a suspicion may expect ([`RingTiming::confirmations`] is capped to it).
pub const MAX_CONFIRMATIONS: u32 = 8;
/// Most members one accusation is sent to (chosen at random in a larger ring).
pub const MAX_ACCUSATION_FANOUT: usize = 64;
/// First byte of a [`Notice`] datagram. A foca packet starts with its sender's name, whose
/// length (a DNS label: 1-63) is never zero.
const NOTICE_TAG: u8 = 0;

/// A ring member: a node name plus a generation that rises on every renewal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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
    /// Longest suspicion timeout, before the local-health multiplier: what a suspicion nobody
    /// else confirms waits.
    pub suspect_to_down: Duration,
    /// Shortest suspicion timeout, before the local-health multiplier: reached once
    /// `confirmations` members besides the first accuser accused the same member. Equal to
    /// `suspect_to_down`, the suspicion is fixed and no accusation is sent.
    pub suspect_min: Duration,
    /// Independent confirmations a suspicion expects (at most the ring's size minus 2, and
    /// [`MAX_CONFIRMATIONS`]). More: a single wrong accuser needs more company to shorten the
    /// wait, and a crash in a large ring is declared later.
    pub confirmations: u32,
}

impl RingTiming {
    /// Inside a site: probe every 500 ms (timeout 250 ms); a suspicion of 2.5 s that shrinks to
    /// 0.75 s as up to 3 other members confirm it (both scaled by health). A crashed member is
    /// `dead` across its site in 1.7-3.8 s, about 2 s typically (simulated): waiting to be
    /// probed (each period a given member is probed by nobody with probability ~1/e, so this
    /// wait has a tail), one period to suspect, then the suspicion until enough other probers
    /// failed too; every member that heard the accusations declares it at about the same time.
    /// Halving the probe period would halve that tail and double the failure detector's
    /// datagrams (~130 -> ~260 bytes per node per second). A suspicion by one observer alone
    /// (its own loss or starvation) keeps 2.5 s. A peer stopped for about the short suspicion
    /// plus the probe period in which it is noticed refutes in time (simulated: never dead for
    /// stops up to 1.5 s, often dead from 1.8 s; it was ~3 s with a fixed suspicion); one
    /// stopped for longer is declared dead and comes back alive (with a renewed identity) when
    /// it resumes.
    pub fn lan() -> Self {
        RingTiming {
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(250),
            suspect_to_down: Duration::from_millis(2500),
            suspect_min: Duration::from_millis(750),
            confirmations: 3,
        }
    }

    /// Between gateways: probe every 2 s, a fixed suspicion of 6 s (a gateway's death has
    /// other witnesses: its site ring and the links of the other sites).
    pub fn wan() -> Self {
        RingTiming {
            probe_period: Duration::from_secs(2),
            probe_rtt: Duration::from_secs(1),
            suspect_to_down: Duration::from_secs(6),
            suspect_min: Duration::from_secs(6),
            confirmations: 0,
        }
    }

    /// Whether suspicions shrink with confirmations (and accusations are sent).
    fn dynamic(&self) -> bool {
        self.suspect_min < self.suspect_to_down
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

/// The suspicion timeout after `confirmations` distinct members besides the first accuser
/// accused, when `expected` are expected (Lifeguard, as in memberlist):
/// `max - (max - min) * ln(C + 1) / ln(K + 1)`, never below `min`; with `expected` 0, `min`.
/// Both bounds before the local-health multiplier; `min` above `max` counts as `max`.
pub fn suspicion_timeout(
    max: Duration,
    min: Duration,
    expected: u32,
    confirmations: usize,
) -> Duration {
    let min = min.min(max);
    if expected == 0 {
        return min;
    }
    let c = confirmations.min(expected as usize) as f64;
    let frac = (c + 1.0).ln() / (f64::from(expected) + 1.0).ln();
    let span = (max - min).as_secs_f64();
    let t = max.as_secs_f64() - span * frac;
    if t.is_finite() {
        Duration::from_secs_f64(t.clamp(min.as_secs_f64(), max.as_secs_f64()))
    } else {
        max
    }
}

/// A ring datagram of ours beside foca's packets (tagged [`NOTICE_TAG`]), for dynamic
/// suspicion. Each goes to every member of the ring (at most [`MAX_ACCUSATION_FANOUT`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notice {
    /// "I suspect `member` at `incarnation`": sent once per suspicion by every member whose own
    /// probe of `member` failed (the suspected member included among the receivers).
    Suspect {
        accuser: NodeName,
        member: SwimId,
        incarnation: Incarnation,
    },
    /// "I am alive at `incarnation`": sent by `member` when its incarnation rose (it refuted a
    /// suspicion); what any foca packet from it would tell, to everyone at once.
    Alive {
        member: SwimId,
        incarnation: Incarnation,
    },
}

impl Notice {
    /// The datagram payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![NOTICE_TAG];
        // Serializing our own in-memory value into a Vec cannot fail.
        out.extend(postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    /// Decodes a payload that [`Notice::encode`] produced; anything else is refused.
    pub fn decode(bytes: &[u8]) -> Option<Notice> {
        let rest = bytes.strip_prefix(&[NOTICE_TAG])?;
        match postcard::take_from_bytes::<Notice>(rest) {
            Ok((n, [])) => Some(n),
            _ => None,
        }
    }
}

/// A suspected member at the incarnation it was suspected at.
type SuspicionKey = (SwimId, Incarnation);

/// One suspicion this ring runs a timer for.
#[derive(Debug)]
struct Suspicion {
    /// When we first heard of it (an accusation or our own probe): the timer's start.
    since: Time,
    /// Distinct accusers in the order heard, the first one included; at most
    /// [`MAX_CONFIRMATIONS`] + 1.
    accusers: Vec<NodeName>,
    /// Whether we accused ourselves (and told the ring).
    sent: bool,
    /// Local-health multiplier when it started.
    multiplier: u32,
    /// Confirmations expected (K).
    expected: u32,
    /// When it expires, and the id of its pending timer (None once it fired).
    due: Time,
    timer: Option<u64>,
}

/// A timer in our heap: one of foca's, or the end of one of our suspicions.
#[derive(Debug)]
enum Pending {
    Foca(Timer<SwimId>),
    SuspicionEnds(SuspicionKey),
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
    pending: BTreeMap<u64, Pending>,
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
    /// Suspicions we accused in or heard accusations about (dynamic suspicion only).
    suspicions: BTreeMap<SuspicionKey, Suspicion>,
    /// foca's current timer token (its timers carry it; one we hand it must too).
    token: Option<TimerToken>,
    /// Our identity and incarnation as our last packet carried them.
    announced: Option<(SwimId, Incarnation)>,
    /// When we last told the ring our incarnation rose.
    alive_told: Option<Time>,
    /// Picks accusation targets in a ring larger than [`MAX_ACCUSATION_FANOUT`].
    rng: StdRng,
    /// Packets dropped: undecodable, or the ring is full.
    pub dropped: u64,
    /// Accusations counted (a new accuser of a suspicion we track).
    pub accusations_heard: u64,
    /// Suspicion timers brought forward by a confirmation.
    pub suspicions_shortened: u64,
    /// Suspicions that expired here (handed to foca).
    pub suspicions_expired: u64,
}

impl std::fmt::Debug for Swim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swim")
            .field("ring", &self.ring)
            .field("me", self.foca.identity())
            .field("members", &self.states)
            .field("health", &self.health.score())
            .field("suspicions", &self.suspicions)
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
            suspicions: BTreeMap::new(),
            token: None,
            announced: None,
            alive_told: None,
            rng: StdRng::seed_from_u64(seed.rotate_left(32) ^ 0xacc0_5ed0),
            dropped: 0,
            accusations_heard: 0,
            suspicions_shortened: 0,
            suspicions_expired: 0,
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

    /// Hands the ring a member it has never heard of (at generation 0, `suspect`, not
    /// gossiped): foca probes it, and it is declared dead unless it answers, when its real
    /// identity (a higher generation) replaces this one. For a node the table holds alive that
    /// no member of the ring mentions: a crashed peer the ring forgot while this node was down.
    pub fn suspect_unheard(&mut self, now: Time, peer: &NodeName) {
        if self.states.contains_key(peer)
            || self.states.len() >= MAX_RING_MEMBERS
            || *peer == self.foca.identity().name
        {
            return;
        }
        let id = SwimId {
            name: peer.clone(),
            gen: 0,
        };
        let _ = self.foca.apply_many(
            std::iter::once(Member::new(id, 0, State::Suspect)),
            false,
            &mut self.rt,
        );
        self.drain(now);
    }

    /// A packet from a peer: a foca packet or a [`Notice`].
    pub fn handle_data(&mut self, now: Time, data: &[u8]) {
        if self.states.len() >= MAX_RING_MEMBERS {
            self.dropped += 1;
            return;
        }
        if data.first() == Some(&NOTICE_TAG) {
            match Notice::decode(data) {
                Some(n) if self.timing.dynamic() => self.heard_notice(now, n),
                _ => self.dropped += 1,
            }
            self.drain(now);
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
            let Some(pending) = self.pending.remove(&id) else {
                continue;
            };
            let late = self.health.timer_fired(now.saturating_sub(due));
            match pending {
                Pending::Foca(timer) => {
                    if matches!(timer, Timer::ProbeRandomMember(_)) && !late {
                        self.health.period_ok();
                    }
                    let _ = self.foca.handle_timer(timer, &mut self.rt);
                }
                Pending::SuspicionEnds(key) => self.suspicion_ends(&key),
            }
            self.drain(now);
        }
    }

    /// Our timer for `key` expired: foca declares the member down unless it refuted meanwhile
    /// (its incarnation rose) or is down already.
    fn suspicion_ends(&mut self, key: &SuspicionKey) {
        let Some(s) = self.suspicions.get_mut(key) else {
            return;
        };
        s.timer = None;
        let Some(token) = self.token else {
            return;
        };
        self.suspicions_expired += 1;
        let was_up = self.is_down(&key.0) == Some(false);
        let _ = self.foca.handle_timer(
            Timer::ChangeSuspectToDown {
                member_id: key.0.clone(),
                incarnation: key.1,
                token,
            },
            &mut self.rt,
        );
        if was_up && self.is_down(&key.0) == Some(true) {
            // Tell a few members now rather than at the next periodic gossip: any of them whose
            // own timer has not expired yet learns it sooner.
            let _ = self.foca.gossip(&mut self.rt);
        }
    }

    /// Whether foca holds `id` down (None: not a member).
    fn is_down(&self, id: &SwimId) -> Option<bool> {
        self.foca
            .iter_membership_state()
            .find(|m| m.id() == id)
            .map(|m| m.state() == State::Down)
    }

    /// Confirmations a suspicion starting now expects: at most the ring's members (us and the
    /// suspect included) minus 2.
    fn expected_confirmations(&self) -> u32 {
        let ring = 1 + self
            .states
            .values()
            .filter(|l| **l != Liveness::Dead)
            .count();
        let k = self.timing.confirmations.min(MAX_CONFIRMATIONS);
        k.min(u32::try_from(ring.saturating_sub(2)).unwrap_or(u32::MAX))
    }

    /// The suspicion `key`, started now if it is new (None: too many suspicions already).
    fn suspicion(&mut self, now: Time, key: &SuspicionKey, ours: bool) -> Option<&mut Suspicion> {
        if !self.suspicions.contains_key(key) {
            if !ours && self.suspicions.len() >= MAX_SUSPICIONS {
                return None;
            }
            let s = Suspicion {
                since: now,
                accusers: Vec::new(),
                sent: false,
                multiplier: self.health.multiplier(),
                expected: self.expected_confirmations(),
                due: now,
                timer: None,
            };
            self.suspicions.insert(key.clone(), s);
        }
        self.suspicions.get_mut(key)
    }

    /// Counts `accuser` in the suspicion `key` (started now if new) and brings its timer
    /// forward as far as its confirmations allow. Returns whether the accuser was new.
    fn accused(&mut self, now: Time, key: &SuspicionKey, accuser: NodeName, ours: bool) -> bool {
        let timing = self.timing.clone();
        let id = self.next_timer;
        let Some(s) = self.suspicion(now, key, ours) else {
            return false;
        };
        let new = !s.accusers.contains(&accuser) && s.accusers.len() <= MAX_CONFIRMATIONS as usize;
        if new {
            s.accusers.push(accuser);
        }
        let confirmations = s.accusers.len().saturating_sub(1);
        let timeout = suspicion_timeout(
            timing.suspect_to_down,
            timing.suspect_min,
            s.expected,
            confirmations,
        );
        let due = (s.since + timeout * s.multiplier).max(now);
        let reschedule = match s.timer {
            None if s.accusers.len() == 1 && new => true,
            Some(_) => due < s.due,
            None => false,
        };
        if !reschedule {
            return new;
        }
        let old = s.timer.take();
        s.due = due;
        s.timer = Some(id);
        self.next_timer += 1;
        if let Some(old) = old {
            // Its heap entry finds nothing pending under its id and is skipped.
            self.pending.remove(&old);
            self.suspicions_shortened += 1;
        }
        self.pending.insert(id, Pending::SuspicionEnds(key.clone()));
        self.timers.push(Reverse((due, id)));
        new
    }

    /// A notice from a peer. An accusation counts if it names a member we hold active at that
    /// very incarnation and comes from another member we hold active (foca then holds that
    /// member suspect, as if it had read it in gossip); one naming us makes foca refute it. An `alive` notice is applied as foca applies the sender of any packet, if we
    /// know that member.
    fn heard_notice(&mut self, now: Time, n: Notice) {
        let me = self.foca.identity().clone();
        match n {
            Notice::Suspect {
                accuser,
                member,
                incarnation,
            } => {
                let accuser_active = matches!(
                    self.states.get(&accuser),
                    Some(Liveness::Alive | Liveness::Suspect)
                );
                if accuser == me.name || accuser == member.name || !accuser_active {
                    self.dropped += 1;
                    return;
                }
                if member == me {
                    // As if foca had read the suspicion in gossip: it refutes it (if it is about
                    // our current incarnation or a later one) and we tell the ring (`drain`).
                    let about_us = Member::new(member, incarnation, State::Suspect);
                    let _ = self
                        .foca
                        .apply_many(std::iter::once(about_us), true, &mut self.rt);
                    return;
                }
                let current = self.foca.iter_membership_state().any(|m| {
                    m.id() == &member && m.state() != State::Down && m.incarnation() == incarnation
                });
                if !current {
                    return;
                }
                if self.accused(now, &(member.clone(), incarnation), accuser, false) {
                    self.accusations_heard += 1;
                }
                // As a suspicion read in gossip: foca holds the member suspect and passes the
                // news on (to the member too, which refutes sooner if it is alive).
                let suspect = Member::new(member, incarnation, State::Suspect);
                let _ = self
                    .foca
                    .apply_many(std::iter::once(suspect), true, &mut self.rt);
            }
            Notice::Alive {
                member,
                incarnation,
            } => {
                let known = member != me
                    && self
                        .foca
                        .iter_membership_state()
                        .any(|m| m.id() == &member && m.state() != State::Down);
                if !known {
                    self.dropped += 1;
                    return;
                }
                let alive = Member::new(member, incarnation, State::Alive);
                let _ = self
                    .foca
                    .apply_many(std::iter::once(alive), true, &mut self.rt);
            }
        }
    }

    /// Sends `notice` to every member we hold active but `except` (at most
    /// [`MAX_ACCUSATION_FANOUT`], chosen at random).
    fn tell_ring(&mut self, notice: &Notice, except: Option<&NodeName>) {
        let mut to: Vec<NodeName> = self
            .states
            .iter()
            .filter(|(n, l)| **l != Liveness::Dead && Some(*n) != except)
            .map(|(n, _)| n.clone())
            .collect();
        if to.len() > MAX_ACCUSATION_FANOUT {
            to.shuffle(&mut self.rng);
            to.truncate(MAX_ACCUSATION_FANOUT);
        }
        let bytes = notice.encode();
        for n in to {
            self.outbox.push((n, bytes.clone()));
        }
    }

    /// Our own probe of `key.0` failed: count us as an accuser and, the first time, tell the
    /// ring.
    fn accuse(&mut self, now: Time, key: &SuspicionKey) {
        let me = self.foca.identity().name.clone();
        self.accused(now, key, me.clone(), true);
        let Some(s) = self.suspicions.get_mut(key) else {
            return;
        };
        if s.sent {
            return;
        }
        s.sent = true;
        let notice = Notice::Suspect {
            accuser: me,
            member: key.0.clone(),
            incarnation: key.1,
        };
        self.tell_ring(&notice, None);
    }

    /// Reads our incarnation off a packet foca sends; when it rose (we refuted a suspicion),
    /// tells every member at once, at most once per probe period (accusations streamed at us
    /// cannot make us stream notices to the whole ring; foca's gossip still carries every
    /// refutation).
    fn note_incarnation(&mut self, now: Time, packet: &[u8]) {
        let Ok(header) = PostcardCodec.decode_header(packet) else {
            return;
        };
        let current = (header.src, header.src_incarnation);
        let rose = self
            .announced
            .as_ref()
            .is_some_and(|(id, inc)| *id == current.0 && *inc < current.1);
        let quiet = self
            .alive_told
            .is_none_or(|t| now.saturating_sub(t) >= self.timing.probe_period);
        if rose && quiet {
            self.alive_told = Some(now);
            let notice = Notice::Alive {
                member: current.0.clone(),
                incarnation: current.1,
            };
            self.tell_ring(&notice, None);
        }
        self.announced = Some(current);
    }

    /// Ends the suspicions that are over (refuted with a higher incarnation, the member down or
    /// gone, or older than any timer could run) and cancels their timers.
    fn prune_suspicions(&mut self, now: Time) {
        if self.suspicions.is_empty() {
            return;
        }
        let active: BTreeMap<&SwimId, Incarnation> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.state() != State::Down)
            .map(|m| (m.id(), m.incarnation()))
            .collect();
        let keep_for = self.timing.suspect_to_down * (2 + crate::health::DEFAULT_MAX_SCORE);
        let mut cancel = Vec::new();
        self.suspicions.retain(|k, s| {
            let open = active.get(&k.0) == Some(&k.1) && now.saturating_sub(s.since) < keep_for;
            if !open {
                cancel.extend(s.timer);
            }
            open
        });
        for id in cancel {
            self.pending.remove(&id);
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
        let mut first = true;
        while let Some((to, data)) = self.rt.to_send() {
            if first && self.timing.dynamic() {
                first = false;
                self.note_incarnation(now, &data);
            }
            self.outbox.push((to.name, data.to_vec()));
        }
        while let Some((after, timer)) = self.rt.to_schedule() {
            if self.pending.len() >= MAX_TIMERS {
                self.dropped += 1;
                continue;
            }
            match &timer {
                Timer::ProbeRandomMember(t)
                | Timer::SendIndirectProbe { token: t, .. }
                | Timer::ChangeSuspectToDown { token: t, .. }
                | Timer::PeriodicAnnounce(t)
                | Timer::PeriodicAnnounceDown(t)
                | Timer::PeriodicGossip(t) => self.token = Some(*t),
                Timer::RemoveDown(_) => {}
            }
            let after = match &timer {
                Timer::ChangeSuspectToDown {
                    member_id,
                    incarnation,
                    ..
                } if self.timing.dynamic() => {
                    // foca asks for this only when our own probe of the member failed: our
                    // suspicion timer replaces it.
                    self.accuse(now, &(member_id.clone(), *incarnation));
                    continue;
                }
                Timer::SendIndirectProbe { .. } | Timer::ChangeSuspectToDown { .. } => {
                    self.health.scale(after)
                }
                _ => after,
            };
            let id = self.next_timer;
            self.next_timer += 1;
            self.pending.insert(id, Pending::Foca(timer));
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
        let mut returned = false;
        for (name, l) in &seen {
            let prev = self.states.get(name).copied();
            if prev != Some(*l) {
                if prev == Some(Liveness::Suspect) && *l == Liveness::Alive {
                    self.health.suspicion_refuted();
                }
                returned |= prev == Some(Liveness::Dead) && *l == Liveness::Alive;
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
        if returned {
            // A member back from the dead (a new identity): tell a few members now. In a small
            // ring foca sends an update only a couple of times, and the next packets may all go
            // to the returning member itself, leaving the others to learn of it when it links
            // to them.
            let _ = self.foca.gossip(&mut self.rt);
            while let Some((to, data)) = self.rt.to_send() {
                self.outbox.push((to.name, data.to_vec()));
            }
        }
        self.prune_suspicions(now);
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

    fn name(n: &str) -> NodeName {
        NodeName::new(n).unwrap()
    }

    fn id(n: &str) -> SwimId {
        SwimId {
            name: name(n),
            gen: 1,
        }
    }

    fn suspect(accuser: &str, member: &str) -> Notice {
        Notice::Suspect {
            accuser: name(accuser),
            member: id(member),
            incarnation: 0,
        }
    }

    /// Rings of `names` (the first is the seed the others announce to), converged.
    fn converged(names: &[&str]) -> (Vec<Swim>, Time) {
        let mut rings: Vec<Swim> = names
            .iter()
            .enumerate()
            .map(|(i, n)| ring(n, i as u64 + 1))
            .collect();
        let mut now = Duration::ZERO;
        let first = name(names[0]);
        for r in rings.iter_mut().skip(1) {
            r.announce(now, &first);
        }
        run(&mut rings, &mut now, 30, None);
        for r in &rings {
            assert_eq!(
                r.members().filter(|(_, l)| *l == Liveness::Alive).count(),
                names.len() - 1,
                "{r:?}"
            );
            assert_eq!(r.health_score(), 0, "{r:?}");
        }
        for r in rings.iter_mut() {
            let _ = r.take_changes();
        }
        (rings, now)
    }

    /// Ring `r` reads notice `n`.
    fn hear(r: &mut Swim, now: Time, n: Notice) {
        r.handle_data(now, &n.encode());
    }

    /// When ring `r`'s suspicion of `member` (at incarnation 0) ends.
    fn due(r: &Swim, member: &str) -> Option<Time> {
        r.suspicions.get(&(id(member), 0)).map(|s| s.due)
    }

    #[test]
    fn suspicion_timeout_runs_from_max_to_min_with_confirmations() {
        let max = Duration::from_millis(2500);
        let min = Duration::from_millis(750);
        assert_eq!(suspicion_timeout(max, min, 3, 0), max);
        let mut last = max;
        for c in 1..=3 {
            let t = suspicion_timeout(max, min, 3, c);
            assert!(t < last && t >= min, "{c}: {t:?}");
            last = t;
        }
        assert_eq!(suspicion_timeout(max, min, 3, 3), min);
        assert_eq!(suspicion_timeout(max, min, 3, 100), min);
        // ln 2 / ln 4 = 1/2: half way with one confirmation of three.
        let half = suspicion_timeout(max, min, 3, 1).as_millis();
        assert!((1624..=1626).contains(&half), "{half}");
        // Nobody could confirm: the shortest at once.
        assert_eq!(suspicion_timeout(max, min, 0, 0), min);
        // A minimum above the maximum is the maximum; a fixed suspicion stays fixed.
        assert_eq!(suspicion_timeout(max, max * 2, 3, 3), max);
        assert_eq!(suspicion_timeout(max, max, 3, 0), max);
        assert_eq!(suspicion_timeout(max, max, 0, 0), max);
    }

    #[test]
    fn single_accuser_keeps_the_long_timeout_and_confirmations_shorten_it() {
        let (mut rings, now) = converged(&["a", "b", "c", "d", "x"]);
        let t = RingTiming::lan();
        let a = &mut rings[0];
        // Five members: three confirmations expected.
        hear(a, now, suspect("b", "x"));
        assert_eq!(due(a, "x"), Some(now + t.suspect_to_down));
        assert_eq!(a.liveness(&name("x")), Some(Liveness::Suspect));
        // The same accuser again is no confirmation.
        hear(a, now + Duration::from_millis(100), suspect("b", "x"));
        assert_eq!(due(a, "x"), Some(now + t.suspect_to_down));
        let mut last = now + t.suspect_to_down;
        for (k, accuser) in ["c", "d"].into_iter().enumerate() {
            hear(a, now + Duration::from_millis(200), suspect(accuser, "x"));
            let d = due(a, "x").unwrap();
            let want = now + suspicion_timeout(t.suspect_to_down, t.suspect_min, 3, k + 1);
            assert_eq!(d, want, "{accuser}");
            assert!(d < last);
            last = d;
        }
        // Our own failed probe is the third confirmation: the shortest suspicion, from when we
        // first heard of it.
        a.accuse(now + Duration::from_millis(300), &(id("x"), 0));
        assert_eq!(due(a, "x"), Some(now + t.suspect_min));
        assert_eq!(a.suspicions_shortened, 3);
        // Ending: foca declares it down then, not before.
        a.handle_timeout(now + t.suspect_min - Duration::from_millis(1));
        assert_eq!(a.liveness(&name("x")), Some(Liveness::Suspect));
        a.handle_timeout(now + t.suspect_min);
        assert_eq!(a.liveness(&name("x")), Some(Liveness::Dead));
        assert!(a.suspicions.is_empty());
    }

    #[test]
    fn with_nobody_else_to_confirm_the_shortest_suspicion_applies_at_once() {
        // Three members: one confirmation expected, from the only other observer.
        let (mut rings, now) = converged(&["a", "b", "x"]);
        let t = RingTiming::lan();
        rings[0].accuse(now, &(id("x"), 0));
        assert_eq!(due(&rings[0], "x"), Some(now + t.suspect_to_down));
        hear(&mut rings[0], now, suspect("b", "x"));
        assert_eq!(due(&rings[0], "x"), Some(now + t.suspect_min));
        // Two members: nobody could confirm.
        let (mut rings, now) = converged(&["a", "x"]);
        rings[0].accuse(now, &(id("x"), 0));
        assert_eq!(due(&rings[0], "x"), Some(now + t.suspect_min));
    }

    #[test]
    fn refuted_suspicion_is_cancelled() {
        let (mut rings, mut now) = converged(&["a", "b", "c", "x"]);
        // A wrong accusation by b (x is fine), sent to the ring as b would.
        for i in [0, 2] {
            hear(&mut rings[i], now, suspect("b", "x"));
            assert!(due(&rings[i], "x").is_some());
        }
        let x = name("x");
        assert_eq!(rings[0].liveness(&x), Some(Liveness::Suspect));
        hear(&mut rings[3], now, suspect("b", "x"));
        // x refutes and tells everyone; nobody declares it down.
        run(&mut rings, &mut now, 40, None);
        for r in rings.iter_mut().take(3) {
            assert_eq!(r.liveness(&x), Some(Liveness::Alive), "{r:?}");
            let changes = r.take_changes();
            assert!(
                changes.iter().all(|c| c.to != Liveness::Dead),
                "{changes:?} {r:?}"
            );
            assert!(r.suspicions.is_empty(), "{r:?}");
        }
        // Later accusations of the refuted incarnation count for nothing.
        hear(&mut rings[0], now, suspect("c", "x"));
        assert!(rings[0].suspicions.is_empty());
        assert_eq!(rings[0].liveness(&x), Some(Liveness::Alive));
    }

    #[test]
    fn accused_member_refutes_on_reading_the_accusation_and_tells_everyone() {
        let (mut rings, now) = converged(&["a", "b", "c", "x"]);
        let _ = rings[3].take_sends();
        hear(&mut rings[3], now, suspect("a", "x"));
        // A foca gossip of the refutation, and our notice to each of the other three.
        let sends = rings[3].take_sends();
        let alive: Vec<&NodeName> = sends
            .iter()
            .filter(|(_, d)| {
                matches!(
                    Notice::decode(d),
                    Some(Notice::Alive { ref member, incarnation: 1 }) if *member == id("x")
                )
            })
            .map(|(to, _)| to)
            .collect();
        assert_eq!(alive.len(), 3, "{sends:?}");
        // Read by a member that suspects x: the suspicion ends at once.
        hear(&mut rings[0], now, suspect("b", "x"));
        assert!(due(&rings[0], "x").is_some());
        for (to, d) in &sends {
            if *to == name("a") {
                rings[0].handle_data(now, d);
            }
        }
        assert!(rings[0].suspicions.is_empty());
        assert_eq!(rings[0].liveness(&name("x")), Some(Liveness::Alive));
    }

    #[test]
    fn crashed_member_is_dead_everywhere_sooner_than_the_longest_suspicion() {
        let names = ["a", "b", "c", "d", "e", "f", "x"];
        let (mut rings, mut now) = converged(&names);
        let x = name("x");
        let mut suspected: Option<Time> = None;
        let mut dead = Vec::new();
        for _ in 0..100 {
            run(&mut rings, &mut now, 1, Some("x"));
            for r in rings.iter_mut().take(names.len() - 1) {
                for c in r.take_changes().into_iter().filter(|c| c.name == x) {
                    match c.to {
                        Liveness::Suspect => {
                            suspected.get_or_insert(now);
                        }
                        Liveness::Dead => dead.push(now),
                        Liveness::Alive => panic!("{c:?}"),
                    }
                }
            }
            if dead.len() == names.len() - 1 {
                break;
            }
        }
        assert_eq!(dead.len(), names.len() - 1, "{dead:?}");
        let first = suspected.unwrap();
        let last = dead.iter().max().unwrap();
        assert!(
            *last - first < RingTiming::lan().suspect_to_down,
            "suspected at {first:?}, dead everywhere at {last:?}"
        );
        assert!(rings[0].accusations_heard > 0);
    }

    #[test]
    fn notices_from_or_about_strangers_are_ignored() {
        let (mut rings, now) = converged(&["a", "b", "x"]);
        let a = &mut rings[0];
        let dropped = a.dropped;
        // An accuser we do not know, a member we do not know, a stale or future incarnation.
        hear(a, now, suspect("zz", "x"));
        hear(a, now, suspect("b", "zz"));
        for incarnation in [1, 7, Incarnation::MAX] {
            let n = Notice::Suspect {
                accuser: name("b"),
                member: id("x"),
                incarnation,
            };
            a.handle_data(now, &n.encode());
        }
        // Another generation of x.
        let other = Notice::Suspect {
            accuser: name("b"),
            member: SwimId {
                name: name("x"),
                gen: 9,
            },
            incarnation: 0,
        };
        a.handle_data(now, &other.encode());
        // An alive notice about a stranger would make foca take it in.
        let stranger = Notice::Alive {
            member: id("zz"),
            incarnation: 3,
        };
        a.handle_data(now, &stranger.encode());
        assert!(a.suspicions.is_empty());
        assert_eq!(a.liveness(&name("zz")), None);
        assert_eq!(a.liveness(&name("x")), Some(Liveness::Alive));
        // Bytes that are no notice: dropped, never a panic.
        for bad in [
            &[NOTICE_TAG][..],
            &[NOTICE_TAG, 0, 200],
            &[NOTICE_TAG, 9, 1, 2, 3],
        ] {
            a.handle_data(now, bad);
        }
        let mut good = suspect("b", "x").encode();
        good.push(0);
        a.handle_data(now, &good);
        assert!(a.suspicions.is_empty());
        assert_eq!(a.dropped, dropped + 6);
    }

    #[test]
    fn notices_round_trip_and_never_look_like_a_foca_packet() {
        for n in [
            suspect("b", "x"),
            Notice::Alive {
                member: id("x"),
                incarnation: 4,
            },
        ] {
            let bytes = n.encode();
            assert_eq!(bytes[0], NOTICE_TAG);
            assert_eq!(Notice::decode(&bytes), Some(n));
        }
        // foca's packets start with the sender's name length, never zero.
        let (mut rings, mut now) = converged(&["a", "b"]);
        run(&mut rings, &mut now, 5, None);
        rings[0].handle_timeout(now + Duration::from_secs(1));
        let sends = rings[0].take_sends();
        assert!(!sends.is_empty());
        assert!(sends.iter().all(|(_, d)| d[0] != NOTICE_TAG));
    }

    #[test]
    fn fixed_suspicion_ring_sends_no_notice_and_ignores_them() {
        let mut a = Swim::new(
            Ring::Wan,
            id("a"),
            &RingTiming::wan(),
            3,
            1,
            LocalHealth::new(8, Duration::from_millis(250)),
        );
        let dropped = a.dropped;
        a.handle_data(Duration::ZERO, &suspect("b", "x").encode());
        assert_eq!(a.dropped, dropped + 1);
        assert!(a.suspicions.is_empty());
    }
}
