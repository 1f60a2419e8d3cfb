//! Certificates: what each node presents and the reports about them.
//! Part of [`Engine`]: its methods for this concern; the state stays in `Engine`.

use super::*;

impl Engine {
    /// The certificate now in use changed (hot reload): publish it.
    pub fn set_cert(&mut self, now: Time, cert: Option<CertSummary>) {
        self.cert = cert;
        self.refresh_own(now, false);
    }

    pub(super) fn days_left(&self, now: Time, not_after_ms: u64) -> i64 {
        let wall = self.wall_ms(now) as i64;
        (not_after_ms as i64 - wall).div_euclid(86_400_000)
    }

    /// Which certificate and CA every node presents, from the table.
    pub fn certs(&self, now: Time) -> clusterctl_api::CertsReport {
        let nodes: Vec<&NodeRecord> = self
            .table
            .live()
            .filter(|r| r.clock > 0 && r.state == RecordState::Alive)
            .collect();
        let view = |c: &CertSummary| clusterctl_api::CertSummaryView {
            leaf: c.leaf.clone(),
            issuer: c.issuer.clone(),
            trusts: c.trusts.clone(),
            not_before: format_rfc3339_ms(c.not_before_ms),
            not_after: format_rfc3339_ms(c.not_after_ms),
            days_left: self.days_left(now, c.not_after_ms),
        };
        let mut cas: BTreeSet<String> = BTreeSet::new();
        for r in &nodes {
            if let Some(c) = &r.cert {
                cas.extend(c.trusts.iter().cloned());
                cas.insert(c.issuer.clone());
            }
        }
        cas.remove("");
        clusterctl_api::CertsReport {
            observer: self.cfg.me.name.to_string(),
            nodes: nodes.len() as u32,
            node_certs: nodes
                .iter()
                .map(|r| clusterctl_api::NodeCertView {
                    name: r.name.to_string(),
                    site: r.site.to_string(),
                    role: r.role,
                    cert: r.cert.as_ref().map(view),
                })
                .collect(),
            cas: cas
                .into_iter()
                .map(|fp| clusterctl_api::CaView {
                    trusted_by: nodes
                        .iter()
                        .filter(|r| r.cert.as_ref().is_some_and(|c| c.trusts.contains(&fp)))
                        .count() as u32,
                    issued_for: nodes
                        .iter()
                        .filter(|r| r.cert.as_ref().is_some_and(|c| c.issuer == fp))
                        .count() as u32,
                    fingerprint: fp,
                })
                .collect(),
        }
    }

    /// Seeds whose configured address is not where the cluster knows that node to be: DNS drift
    /// (or a stale config). Nothing breaks while the table has the right address — links are
    /// dialed at the record's address — but a node starting with an empty table would dial the
    /// wrong host.
    pub fn seed_drift(&self) -> Vec<String> {
        self.cfg
            .seeds
            .iter()
            .filter_map(|(name, addr)| {
                let r = self.table.get(name.as_str()).filter(|r| r.clock > 0 && !r.is_tombstone())?;
                let known = r.addr == *addr || r.wan_addr.as_deref() == Some(addr.as_str());
                (!known).then(|| {
                    format!(
                        "DNS drift: seed {name} of {} resolves to {addr}, but the cluster knows {name} at {}: fix the name or the seed",
                        self.cfg.me.name, r.addr
                    )
                })
            })
            .collect()
    }

    /// Certificates in use that expire within the warning fraction of their lifetime, and
    /// those already expired.
    pub(super) fn cert_warnings(&self, now: Time) -> (Vec<String>, Vec<String>) {
        let wall = self.wall_ms(now);
        let (mut warn, mut expired) = (Vec::new(), Vec::new());
        for r in self
            .table
            .live()
            .filter(|r| r.clock > 0 && r.state == RecordState::Alive)
        {
            let Some(c) = &r.cert else { continue };
            let life = c.not_after_ms.saturating_sub(c.not_before_ms);
            let left = c.not_after_ms.saturating_sub(wall);
            if c.not_after_ms <= wall {
                expired.push(format!(
                    "the certificate of {} expired on {}",
                    r.name,
                    format_rfc3339_ms(c.not_after_ms)
                ));
            } else if (left as f64) < life as f64 * self.cfg.cert_warn_fraction {
                warn.push(format!(
                    "the certificate of {} expires in {} days ({}), less than {:.0}% of its {}-day lifetime: issue a new one",
                    r.name,
                    self.days_left(now, c.not_after_ms),
                    format_rfc3339_ms(c.not_after_ms),
                    self.cfg.cert_warn_fraction * 100.0,
                    life / 86_400_000
                ));
            }
        }
        (warn, expired)
    }
}
