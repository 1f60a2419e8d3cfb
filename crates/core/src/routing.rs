//! The forwarding rule: what a node does with a routed envelope that reaches it. One pure
//! function over the envelope and the node's next-hop choice, used by the engine and by the
//! runtime's fast path (crates/node/src/data.rs), so both forward exactly alike.
//!
//! A transit node delivers an envelope addressed to it, refuses one with no hops left
//! (`hop-limit`), and otherwise spends one hop and sends it to the next hop toward its
//! destination, recording itself (with the RTT of the link it leaves on) in the trace; with no
//! next hop the envelope is undeliverable with the reason routing gave.

use crate::name::NodeName;
use crate::wire::{Envelope, Hop};
use clusterctl_api::PingFailure;

/// What to do with a routed envelope. `H` is how the caller's next-hop choice names the hop
/// (the engine: its name; the runtime's fast path: the link itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<H = NodeName> {
    /// It is addressed to this node.
    Deliver,
    /// Send it to `hop` (after [`spend_hop`]); `rtt_us` is the RTT of the link to `hop`.
    Forward { hop: H, rtt_us: u32 },
    /// It cannot go on: bounce it to its source with this failure and reason.
    Undeliverable(PingFailure, String),
}

/// The verdict for `env` arriving at `me`, whose next hop toward a destination is
/// `next_hop(dst)` (the hop and the RTT of the link to it, or why there is none). Pure: the
/// envelope is not changed; apply a `Forward` with [`spend_hop`].
pub fn transit<H>(
    me: &NodeName,
    env: &Envelope,
    next_hop: impl FnOnce(&NodeName) -> Result<(H, u32), (PingFailure, String)>,
) -> Verdict<H> {
    if env.dst == *me {
        return Verdict::Deliver;
    }
    if env.ttl == 0 {
        return Verdict::Undeliverable(
            PingFailure::HopLimit,
            format!("hop limit reached after {} hops", env.trace.len()),
        );
    }
    match next_hop(&env.dst) {
        Ok((hop, rtt_us)) => Verdict::Forward { hop, rtt_us },
        Err((failure, reason)) => Verdict::Undeliverable(failure, reason),
    }
}

/// Carries out a `Forward` verdict on the envelope: one hop spent, `me` recorded in the trace
/// with the RTT of the link it leaves on.
pub fn spend_hop(me: &NodeName, env: &mut Envelope, rtt_us: u32) {
    debug_assert!(env.ttl > 0, "a forwarded envelope has a hop left");
    env.ttl = env.ttl.saturating_sub(1);
    env.trace.push(Hop {
        node: me.clone(),
        rtt_us,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Body;

    fn n(s: &str) -> NodeName {
        NodeName::new(s).expect("valid name")
    }

    fn env(dst: &str, ttl: u8) -> Envelope {
        Envelope {
            id: 7,
            src: n("a"),
            dst: n(dst),
            ttl,
            trace: vec![Hop {
                node: n("a"),
                rtt_us: 5,
            }],
            body: Body::EchoRequest { seq: 1 },
        }
    }

    #[test]
    fn an_envelope_for_this_node_is_delivered_whatever_its_hops() {
        assert_eq!(
            transit::<NodeName>(&n("b"), &env("b", 0), |_| unreachable!()),
            Verdict::Deliver
        );
    }

    #[test]
    fn no_hops_left_is_a_hop_limit_naming_the_hops_taken() {
        let v = transit(&n("b"), &env("c", 0), |_| Ok((n("c"), 1)));
        assert_eq!(
            v,
            Verdict::Undeliverable(
                PingFailure::HopLimit,
                "hop limit reached after 1 hops".into()
            )
        );
    }

    #[test]
    fn a_forward_spends_one_hop_and_records_this_node_with_the_link_rtt() {
        let me = n("b");
        let mut e = env("c", 3);
        let Verdict::Forward { hop, rtt_us } = transit(&me, &e, |d| Ok((d.clone(), 42))) else {
            panic!("expected a forward");
        };
        assert_eq!(hop, n("c"));
        spend_hop(&me, &mut e, rtt_us);
        assert_eq!(e.ttl, 2);
        assert_eq!(
            e.trace.last(),
            Some(&Hop {
                node: me,
                rtt_us: 42
            })
        );
    }

    #[test]
    fn no_route_is_undeliverable_with_routing_s_reason() {
        let v = transit::<NodeName>(&n("b"), &env("c", 3), |_| {
            Err((PingFailure::NoRoute, "no link".into()))
        });
        assert_eq!(
            v,
            Verdict::Undeliverable(PingFailure::NoRoute, "no link".into())
        );
    }
}
