use super::*;

/// Cluster `c` with one site, `us`, whose gateway is `gw-us`.
fn one_site_contract() -> crate::contract::Contract {
    crate::contract::Contract::parse(
        "cluster = \"c\"\n[[site]]\nname = \"us\"\ngateways = [\"gw-us\"]\n",
    )
    .unwrap()
}

/// Member `n` of site `us`.
fn member_of_us(n: &str) -> Ident {
    Ident {
        name: NodeName::new(n).unwrap(),
        site: crate::name::SiteName::new("us").unwrap(),
        role: Role::Member,
    }
}

/// An engine config for unit tests: cluster `c`, LAN timing, a fixed secret and seed.
fn test_config(contract: &crate::contract::Contract, me: Ident) -> EngineConfig {
    EngineConfig {
        cluster: ClusterName::new("c").unwrap(),
        me,
        addr: "10.0.0.1:7400".into(),
        wan_addr: None,
        contract: contract.clone(),
        secure: true,
        version: "t".into(),
        seeds: vec![],
        rejoin: false,
        timing: Timing::lan(),
        wall_base_ms: 0,
        seed: 1,
        keyring: crate::secret::Keyring::new(crate::secret::Secret::from_bytes(&[1; 32]).unwrap()),
        cert: None,
        cert_warn_fraction: 0.33,
    }
}

#[test]
fn rfc3339_formatting() {
    assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(
        format_rfc3339_ms(1_795_325_819_123),
        "2026-11-22T05:36:59.123Z"
    );
    assert_eq!(
        format_rfc3339_ms(951_782_400_000),
        "2000-02-29T00:00:00.000Z"
    );
}

#[test]
fn gateways_dial_each_other_at_their_wan_address_and_members_at_the_site_address() {
    use crate::contract::Contract;
    use crate::name::{Ident, SiteName};
    let contract = Contract::parse(
        "cluster = \"c\"\n[[site]]\nname = \"us\"\ngateways = [\"gw-us\"]\n[[site]]\nname = \"eu\"\ngateways = [\"gw-eu\"]\n[[link]]\nbetween = [\"us\", \"eu\"]\n",
    )
    .unwrap();
    let id = |n: &str, s: &str, r: Role| Ident {
        name: NodeName::new(n).unwrap(),
        site: SiteName::new(s).unwrap(),
        role: r,
    };
    let cfg = |me: Ident| test_config(&contract, me);

    let mut gw_us = NodeRecord::new(
        &id("gw-us", "us", Role::Gateway),
        3,
        "10.1.0.1:7400".into(),
        contract.hash().into(),
        "t".into(),
        true,
    );
    gw_us.wan_addr = Some("198.51.100.1:7400".into());
    let far = Engine::new(
        cfg(id("gw-eu", "eu", Role::Gateway)),
        vec![gw_us.clone()],
        Time::ZERO,
    )
    .unwrap();
    assert_eq!(
        far.wanted_links(),
        vec![(gw_us.name.clone(), "198.51.100.1:7400".to_string())]
    );
    let near = Engine::new(
        cfg(id("edge-us", "us", Role::Member)),
        vec![gw_us.clone()],
        Time::ZERO,
    )
    .unwrap();
    assert_eq!(
        near.wanted_links(),
        vec![(gw_us.name.clone(), "10.1.0.1:7400".to_string())]
    );
}

#[test]
fn a_seed_pointing_elsewhere_than_the_table_is_flagged_as_dns_drift() {
    use crate::contract::Contract;
    use crate::name::{Ident, SiteName};
    let contract =
        Contract::parse("cluster = \"c\"\n[[site]]\nname = \"us\"\ngateways = [\"gw-us\"]\n")
            .unwrap();
    let id = |n: &str, r: Role| Ident {
        name: NodeName::new(n).unwrap(),
        site: SiteName::new("us").unwrap(),
        role: r,
    };
    let gw = NodeRecord::new(
        &id("gw-us", Role::Gateway),
        3,
        "10.1.0.1:7400".into(),
        contract.hash().into(),
        "t".into(),
        true,
    );
    let cfg = |seed: &str| EngineConfig {
        addr: "10.1.0.2:7400".into(),
        seeds: vec![(gw.name.clone(), seed.to_string())],
        ..test_config(&contract, id("edge-us", Role::Member))
    };

    let ok = Engine::new(cfg("10.1.0.1:7400"), vec![gw.clone()], Time::ZERO).unwrap();
    assert!(ok.seed_drift().is_empty());
    let drifted = Engine::new(cfg("10.1.0.9:7400"), vec![gw.clone()], Time::ZERO).unwrap();
    let w = drifted.topology(Time::ZERO).warnings;
    assert!(
        w.iter()
            .any(|w| w.contains("DNS drift: seed gw-us") && w.contains("10.1.0.1:7400")),
        "{w:?}"
    );
}

#[test]
fn link_ups_and_differing_summaries_start_one_exchange_per_sync_period() {
    use crate::table::Summary;
    let contract = one_site_contract();
    let id = member_of_us;
    let cfg = test_config(&contract, id("edge-1"));

    let mut e = Engine::new(cfg, vec![], Time::ZERO).unwrap();
    let sent = |e: &mut Engine| {
        let mut out = Vec::new();
        while let Some(o) = e.poll_output() {
            if let Output::Send { to, frame } = o {
                let kind = match frame {
                    Frame::Digest(_, true) => "digest",
                    Frame::Digest(_, false) => "digest-reply",
                    Frame::Summary(_) => "summary",
                    Frame::Sites(_) => "sites",
                    Frame::SiteDigest(_, _, true) => "site-digest",
                    Frame::Records(_) => "records",
                    _ => "other",
                };
                out.push(format!("{kind} -> {to}"));
            }
        }
        out
    };
    sent(&mut e);
    let up = |e: &mut Engine, at: Time, peer: &str| {
        e.handle_link_up(
            at,
            LinkInfo {
                peer: id(peer),
                contract_hash: contract.hash().to_string(),
                secure: true,
                protocol: "tls1.3".into(),
                rtt_us: 100,
                key: None,
            },
        )
    };
    let ms = Duration::from_millis;
    // The first link syncs the whole table; the next, in the same period, only a summary.
    up(&mut e, ms(1), "edge-2");
    let first = sent(&mut e);
    assert!(first.contains(&"digest -> edge-2".to_string()), "{first:?}");
    assert!(
        first.contains(&"records -> edge-2".to_string()),
        "{first:?}"
    );
    up(&mut e, ms(2), "edge-3");
    let second = sent(&mut e);
    assert!(
        second.contains(&"summary -> edge-3".to_string()),
        "{second:?}"
    );
    assert!(
        !second.iter().any(|s| s.starts_with("digest")),
        "{second:?}"
    );
    // A differing summary waits for the next period, then is answered with the per-site
    // summaries.
    let other = Summary {
        records: 99,
        hash: 7,
    };
    let edge3 = NodeName::new("edge-3").unwrap();
    e.handle_frame(ms(3), &edge3, Frame::Summary(other));
    assert!(sent(&mut e).is_empty());
    e.handle_frame(ms(2500), &edge3, Frame::Summary(other));
    assert_eq!(sent(&mut e), vec!["sites -> edge-3"]);
    // Per-site summaries that differ in one site get a digest of that site only.
    let mut theirs = e.table().site_summaries();
    assert_eq!(theirs.len(), 1);
    theirs[0].1.hash ^= 1;
    let other_site = SiteName::new("eu").unwrap();
    theirs.push((other_site.clone(), other));
    e.handle_frame(ms(2600), &edge3, Frame::Sites(theirs.clone()));
    let mut out = Vec::new();
    while let Some(o) = e.poll_output() {
        if let Output::Send { to, frame } = o {
            out.push((to, frame));
        }
    }
    match out.as_slice() {
        [(to, Frame::SiteDigest(sites, digest, true))] => {
            assert_eq!(to, &edge3);
            assert_eq!(sites, &vec![other_site, SiteName::new("us").unwrap()]);
            assert_eq!(digest.len(), e.table().len());
        }
        other => panic!("expected one site digest, got {other:?}"),
    }
    // Equal per-site summaries: nothing to compare.
    e.handle_frame(ms(2700), &edge3, Frame::Sites(e.table().site_summaries()));
    assert!(sent(&mut e).is_empty());
    // An equal summary costs nothing, whenever it comes.
    let mine = e.table().summary();
    e.handle_frame(ms(6000), &edge3, Frame::Summary(mine));
    assert!(sent(&mut e).is_empty());
}

#[test]
fn rtt_jitter_below_a_millisecond_does_not_republish_the_record() {
    let contract = one_site_contract();
    let id = member_of_us;
    let cfg = test_config(&contract, id("edge-1"));

    let mut e = Engine::new(cfg, vec![], Time::ZERO).unwrap();
    let peer = NodeName::new("edge-2").unwrap();
    e.handle_link_up(
        Time::ZERO + Duration::from_millis(1),
        LinkInfo {
            peer: id("edge-2"),
            contract_hash: contract.hash().to_string(),
            secure: true,
            protocol: "tls1.3".into(),
            rtt_us: 100,
            key: None,
        },
    );
    // Runs the engine's timers up to `until` (at most one step per 50 ms of virtual time).
    let run = |e: &mut Engine, from: Duration, until: Duration| {
        let mut now = from;
        while now < until {
            now = (e.poll_timeout() - Time::ZERO).clamp(now, until);
            e.handle_timeout(Time::ZERO + now);
            while e.poll_output().is_some() {}
            now += Duration::from_millis(50);
        }
    };
    let refresh = Timing::lan().rtt_refresh;
    run(&mut e, Duration::ZERO, refresh);
    let settled = e.clock();
    // 100 us -> 600 us: six times slower, but half a millisecond: jitter, not news.
    e.handle_rtt(&peer, 600);
    run(&mut e, refresh, refresh * 3);
    assert_eq!(e.clock(), settled, "jitter republished the record");
    // 100 us -> 5 ms, for good: the record says so within two refresh windows (the window
    // in which it changed holds both values).
    e.handle_rtt(&peer, 5_000);
    run(&mut e, refresh * 3, refresh * 5 + Duration::from_secs(1));
    assert!(e.clock() > settled, "a real RTT change was not published");
    let own = e.table().get(e.me().name.as_str()).expect("own record");
    assert_eq!(
        own.links.iter().map(|l| l.rtt_us).collect::<Vec<_>>(),
        [5_000]
    );
}

/// A hello of another protocol version is refused with the `Version` code and a reason
/// naming both versions; reported, it counts and raises `link-refused` like any refusal.
#[test]
fn a_hello_of_another_protocol_version_is_refused_with_the_version_reason() {
    let contract = one_site_contract();
    let mut e = Engine::new(
        test_config(&contract, member_of_us("edge-1")),
        vec![],
        Time::ZERO,
    )
    .unwrap();
    let ours = crate::wire::PROTOCOL_VERSION;
    assert_eq!(e.check_hello_version(ours), Ok(()));
    for theirs in [0, 1, ours + 1, u8::MAX] {
        let r = e.check_hello_version(theirs).unwrap_err();
        assert_eq!(r.code, RefusalCode::Version);
        assert!(
            r.reason.contains(&format!("protocol version {theirs},"))
                && r.reason.contains(&format!("protocol version {ours};")),
            "{r}"
        );
    }
    // The bytes of a hello of another version: refused from the version byte alone.
    let mut hello = crate::wire::Handshake::Refuse(Refusal::version(0)).encode();
    hello[0] = ours + 1;
    let theirs = crate::wire::Handshake::version_of(&hello).unwrap();
    let refusal = e.check_hello_version(theirs).unwrap_err();
    let peer = NodeName::new("edge-2").unwrap();
    let t = Time::from_secs(1);
    while e.poll_output().is_some() {}
    e.handle_refused(
        t,
        Some(peer.clone()),
        Some(refusal.code),
        &refusal.reason,
        true,
    );
    assert_eq!(e.counters.refused_in, 1);
    let mut events = Vec::new();
    while let Some(o) = e.poll_output() {
        if let Output::Event(ev) = o {
            events.push(ev);
        }
    }
    assert!(
        events.iter().any(|ev| ev.kind == EventKind::LinkRefused
            && ev.peer.as_ref() == Some(&peer)
            && ev.reason.contains("protocol version")),
        "{events:?}"
    );
}

/// A refused second instance makes reports unhealthy while it retries, for
/// [`DUPLICATE_EVIDENCE`] after its last attempt, without marking the name's link refused.
#[test]
fn a_second_instance_keeps_reports_unhealthy_while_it_retries_and_no_longer() {
    let contract = one_site_contract();
    let mut e = Engine::new(
        test_config(&contract, member_of_us("edge-1")),
        vec![],
        Time::ZERO,
    )
    .unwrap();
    let x = NodeName::new("edge-2").unwrap();
    let why = "second instance of edge-2: edge-2 answers at A, refused the instance at B";
    let dup = |t: &Topology| t.problems.iter().any(|p| p.contains("second instance"));
    let t0 = Time::from_secs(10);
    e.handle_refused(t0, Some(x.clone()), Some(RefusalCode::Identity), why, true);
    assert!(dup(&e.topology(t0)));
    assert!(
        !e.refused.contains_key(&x),
        "the incumbent's link is not refused"
    );
    assert_eq!(e.counters.refused_in, 1);
    let retry = t0 + Duration::from_secs(5);
    e.handle_refused(retry, Some(x), Some(RefusalCode::Identity), why, true);
    assert!(dup(
        &e.topology(retry + DUPLICATE_EVIDENCE - Duration::from_secs(1))
    ));
    assert!(!dup(&e.topology(retry + DUPLICATE_EVIDENCE)));
}

/// A busy host's RTT estimate jumps from 1 to 4 ms for one second in three. Either value
/// alone is a change worth publishing against the other, but neither lasts a window.
#[test]
fn rtt_swinging_back_and_forth_does_not_republish_the_record() {
    let contract = one_site_contract();
    let id = member_of_us;
    let mut e = Engine::new(test_config(&contract, id("edge-1")), vec![], Time::ZERO).unwrap();
    let peer = NodeName::new("edge-2").unwrap();
    e.handle_link_up(
        Time::ZERO,
        LinkInfo {
            peer: id("edge-2"),
            contract_hash: contract.hash().to_string(),
            secure: true,
            protocol: "tls1.3".into(),
            rtt_us: 1_000,
            key: None,
        },
    );
    let refresh = Timing::lan().rtt_refresh;
    let mut settled = None;
    // One estimate a second, as the runtime hands them over; every engine timer in between.
    for second in 0..(refresh.as_secs() * 6) {
        if second == refresh.as_secs() {
            settled = Some(e.clock());
        }
        e.handle_rtt(&peer, if second % 3 == 0 { 4_000 } else { 1_000 });
        let end = Time::ZERO + Duration::from_secs(second + 1);
        while e.poll_timeout() < end {
            let at = e.poll_timeout();
            e.handle_timeout(at);
            while e.poll_output().is_some() {}
        }
    }
    let settled = settled.expect("ran past the first window");
    assert_eq!(e.clock(), settled, "RTT swings republished the record");
}

#[test]
fn only_new_up_links_are_told_apart_from_other_link_changes() {
    let link = |peer: &str, state: LinkState, rtt_us: u32| LinkReport {
        peer: NodeName::new(peer).unwrap(),
        state,
        rtt_us,
        since_ms: 5,
        secure: true,
        reason: None,
        key: None,
    };
    let old = vec![link("b", LinkState::Up, 10), link("d", LinkState::Up, 10)];
    let grown = vec![
        link("a", LinkState::Up, 1),
        link("b", LinkState::Up, 99),
        link("c", LinkState::Up, 1),
        link("d", LinkState::Up, 10),
        link("e", LinkState::Up, 1),
    ];
    assert!(only_new_up(&old, &grown));
    assert!(only_new_up(&[], &grown));
    assert!(only_new_up(&old, &old));
    // A link lost, a new link that is not up, a link whose state changed: not only growth.
    assert!(!only_new_up(&old, &grown[..2]));
    assert!(!only_new_up(
        &old,
        &[
            old[0].clone(),
            link("c", LinkState::Refused, 0),
            old[1].clone()
        ]
    ));
    assert!(!only_new_up(
        &old,
        &[old[0].clone(), link("d", LinkState::Down, 10)]
    ));
}

#[test]
fn rendezvous_is_deterministic_and_fails_over() {
    let g: Vec<NodeName> = ["gw-1", "gw-2", "gw-3"]
        .iter()
        .map(|s| NodeName::new(*s).unwrap())
        .collect();
    let pick = rendezvous("edge-9", g.iter()).unwrap();
    assert_eq!(rendezvous("edge-9", g.iter()).unwrap(), pick);
    let rest: Vec<NodeName> = g.iter().filter(|x| **x != pick).cloned().collect();
    let second = rendezvous("edge-9", rest.iter()).unwrap();
    assert_ne!(second, pick);
    assert!(rendezvous("x", std::iter::empty()).is_none());
}
