//! What `healthy` means: which nodes a topology report expects, what makes one of them a problem,
//! and which end of a refused link is the refused node. Pure functions over facts the engine
//! gathers, so the rule is one place the simulator and the agent share.
//!
//! An *expected* node is one the contract lists, or one alive in the table; a node that left
//! gracefully or was forgotten by an operator is not expected — unless it came back and is
//! being refused (a node that left and restarted with a wrong secret is refused, not `left`; a
//! forgotten node that still knocks was forgotten while alive).
//! A report is healthy only when every expected node is `alive`, none is refused or has a
//! second instance trying to join, and every expected link is `up`.

use crate::api::NodeStatus;
use crate::name::NodeName;

/// What the observer knows about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts<'a> {
    pub name: &'a NodeName,
    /// Its status as the observer computes it (`status_of`).
    pub status: NodeStatus,
    /// The contract lists it (as a gateway, or in its site's `nodes`).
    pub in_contract: bool,
    /// A live record reports one of its handshakes refused: the reason. For a forgotten node,
    /// only a refusal of this observer's within the evidence window counts (it is still
    /// running).
    pub refused: Option<&'a str>,
    /// A second instance of its name was refused at handshake lately: the reason.
    pub duplicate: Option<&'a str>,
}

/// Whether a report expects `f` (see the module documentation).
pub fn expected(f: &NodeFacts) -> bool {
    match f.status {
        NodeStatus::Forgotten => f.refused.is_some(),
        // Refused only while an instance answers: the name is in use.
        _ if f.duplicate.is_some() => true,
        NodeStatus::Left => f.refused.is_some(),
        NodeStatus::Unknown => f.in_contract,
        _ => true,
    }
}

/// The status a report shows: a node that left, died or was never seen but is refused while it
/// tries to (re)join is `refused`, not what its last record says.
pub fn shown_status(f: &NodeFacts) -> NodeStatus {
    match f.status {
        NodeStatus::Left | NodeStatus::Dead | NodeStatus::Unknown if f.refused.is_some() => {
            NodeStatus::Refused
        }
        s => s,
    }
}

/// Why `f` makes the report unhealthy, if it does.
pub fn problem(f: &NodeFacts) -> Option<String> {
    if !expected(f) {
        return None;
    }
    if let Some(r) = f.duplicate {
        return Some(format!(
            "{} has a second instance trying to join: {r}",
            f.name
        ));
    }
    if let (NodeStatus::Forgotten, Some(r)) = (f.status, f.refused) {
        return Some(format!(
            "{} was forgotten by an operator but is still running: {r}",
            f.name
        ));
    }
    if let Some(r) = f.refused {
        return Some(format!("{} is refused: {r}", f.name));
    }
    match f.status {
        NodeStatus::Alive => None,
        NodeStatus::Unknown => Some(format!("{} (in the contract) was never seen", f.name)),
        s => Some(format!("{} is {s}", f.name)),
    }
}

/// Which end of a refused link is the refused node. `reporter` published a link report to
/// `peer` in state `refused` with `reason`; reasons read `refused by NODE: ...` (the refusing
/// node), so the refused node is the other end.
pub fn refused_end<'a>(reporter: &'a NodeName, peer: &'a NodeName, reason: &str) -> &'a NodeName {
    let by_peer = reason
        .strip_prefix("refused by ")
        .and_then(|r| r.strip_prefix(peer.as_str()))
        .is_some_and(|r| r.starts_with(':'));
    if by_peer {
        reporter
    } else {
        peer
    }
}

/// Whether the end of a link that does not report it up has spoken since the other end's link
/// came up (`up_since_ms`): only then is its word evidence of a one-way link. A report older
/// than the link (from before a partition healed), or none, is not. Wall-clock milliseconds of
/// the two ends: a clock skew between them larger than the time since the link came up can
/// make a fresh report look old.
pub fn reported_since(down_since_ms: Option<u64>, up_since_ms: u64) -> bool {
    down_since_ms.is_some_and(|d| d >= up_since_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeName {
        NodeName::new(s).expect("valid name")
    }

    fn facts(name: &NodeName, status: NodeStatus) -> NodeFacts<'_> {
        NodeFacts {
            name,
            status,
            in_contract: true,
            refused: None,
            duplicate: None,
        }
    }

    #[test]
    fn a_node_that_left_is_expected_only_when_it_came_back_refused() {
        let x = n("edge-1");
        let mut f = facts(&x, NodeStatus::Left);
        assert!(!expected(&f));
        assert_eq!(problem(&f), None);
        assert_eq!(shown_status(&f), NodeStatus::Left);
        f.refused = Some("refused by gw-1: secret mismatch");
        assert!(expected(&f));
        assert_eq!(shown_status(&f), NodeStatus::Refused);
        assert_eq!(
            problem(&f).as_deref(),
            Some("edge-1 is refused: refused by gw-1: secret mismatch")
        );
    }

    #[test]
    fn a_forgotten_node_is_expected_only_while_it_still_knocks() {
        let x = n("edge-1");
        let mut f = facts(&x, NodeStatus::Forgotten);
        assert!(!expected(&f));
        assert_eq!(problem(&f), None);
        f.refused = Some("refused by gw-1: forgotten");
        assert!(expected(&f));
        assert_eq!(
            problem(&f).as_deref(),
            Some("edge-1 was forgotten by an operator but is still running: refused by gw-1: forgotten")
        );
        assert_eq!(shown_status(&f), NodeStatus::Forgotten);
    }

    #[test]
    fn every_expected_node_not_alive_is_a_problem() {
        let x = n("edge-1");
        for s in [
            NodeStatus::Suspect,
            NodeStatus::Dead,
            NodeStatus::Unreachable,
            NodeStatus::Unknown,
        ] {
            assert!(problem(&facts(&x, s)).is_some(), "{s}");
        }
        assert_eq!(problem(&facts(&x, NodeStatus::Alive)), None);
        // Never seen and not in the contract: nothing to expect.
        let mut f = facts(&x, NodeStatus::Unknown);
        f.in_contract = false;
        assert_eq!(problem(&f), None);
    }

    #[test]
    fn an_alive_node_refused_or_duplicated_is_a_problem() {
        let x = n("edge-1");
        let mut f = facts(&x, NodeStatus::Alive);
        f.duplicate = Some("edge-1 answers at A; refused a second instance at B");
        assert!(problem(&f).is_some_and(|p| p.contains("second instance")));
        assert_eq!(shown_status(&f), NodeStatus::Alive);
        let mut f = facts(&x, NodeStatus::Alive);
        f.refused = Some("refused by gw-2: contract");
        assert!(problem(&f).is_some_and(|p| p.contains("is refused")));
    }

    #[test]
    fn only_a_report_newer_than_the_link_is_evidence_of_one_way() {
        assert!(reported_since(Some(2_000), 1_000));
        assert!(reported_since(Some(1_000), 1_000));
        assert!(!reported_since(Some(500), 1_000));
        assert!(!reported_since(None, 1_000));
    }

    #[test]
    fn the_refused_end_is_the_one_the_reason_does_not_name() {
        let (gw, edge) = (n("gw-1"), n("edge-1"));
        assert_eq!(refused_end(&gw, &edge, "refused by gw-1: secret"), &edge);
        assert_eq!(refused_end(&edge, &gw, "refused by gw-1: secret"), &edge);
        // A name that is a prefix of another is not mistaken for it.
        let gw10 = n("gw-10");
        assert_eq!(refused_end(&edge, &gw, "refused by gw-10: x"), &gw);
        assert_eq!(refused_end(&edge, &gw10, "refused by gw-10: x"), &edge);
    }
}
