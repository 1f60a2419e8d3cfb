//! One live instance per identity: the handshake rule that refuses a second instance of a name
//! that still answers elsewhere.
//!
//! A certificate, its key and a config can be copied; the table must still hold one instance
//! per name, or two processes fight over one record (its clock climbing, links replaced every
//! few seconds). The acceptor refuses a hello when the name's incumbent — the instance its table
//! holds — answers the failure detector at another address. A restart at the same address is
//! never refused (the new instance takes over at once, its clock raised above the old one), and
//! neither is a node restarted at a new address once the old instance stopped answering (crashed:
//! `suspect` or `dead`) or left.

/// Every refusal of this rule starts with this text (so the refusing engine can tell it from
/// other identity refusals it made itself).
pub const SECOND_INSTANCE: &str = "second instance";

/// The instance of a name the acceptor's table holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incumbent<'a> {
    /// The address its record advertises.
    pub addr: &'a str,
    /// It answers the failure detector (status `alive`), and neither left nor was forgotten.
    pub answers: bool,
}

/// Why a hello from `name` advertising `addr` must be refused, or None. `incumbent` is what the
/// table holds for `name` (None: nothing).
pub fn second_instance(name: &str, addr: &str, incumbent: Option<Incumbent>) -> Option<String> {
    let i = incumbent?;
    (i.answers && i.addr != addr).then(|| {
        format!(
            "{SECOND_INSTANCE} of {name}: {name} answers at {}, refused the instance at {addr}",
            i.addr
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_address_is_refused_only_while_the_incumbent_answers() {
        let live = Incumbent {
            addr: "10.0.0.1:7400",
            answers: true,
        };
        let why = second_instance("edge-1", "10.0.0.9:7400", Some(live)).expect("refused");
        assert!(why.starts_with(SECOND_INSTANCE), "{why}");
        assert!(
            why.contains("10.0.0.1:7400") && why.contains("10.0.0.9:7400"),
            "{why}"
        );
        let crashed = Incumbent {
            answers: false,
            ..live
        };
        assert_eq!(
            second_instance("edge-1", "10.0.0.9:7400", Some(crashed)),
            None
        );
    }

    #[test]
    fn a_restart_at_the_same_address_or_a_new_name_is_never_refused() {
        let live = Incumbent {
            addr: "10.0.0.1:7400",
            answers: true,
        };
        assert_eq!(second_instance("edge-1", "10.0.0.1:7400", Some(live)), None);
        assert_eq!(second_instance("edge-1", "10.0.0.9:7400", None), None);
    }
}
