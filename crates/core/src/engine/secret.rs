//! The cluster-secret keyring and its operations.
//! Part of [`Engine`]: its methods for this concern; the state stays in `Engine`.

use super::*;

impl Engine {
    /// The secrets this node holds.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    pub(super) fn keyring_changed(&mut self, now: Time, what: String) {
        self.event(
            now,
            EventKind::SecretChanged,
            Some(self.cfg.me.name.clone()),
            None,
            what,
        );
        self.refresh_own(now, false);
    }

    /// Adds a secret: accepted from peers from now on, not yet used to prove.
    pub fn install_key(&mut self, now: Time, secret: Secret) -> Result<bool, SecretError> {
        let id = secret.id();
        let changed = self.keyring.install(secret)?;
        if changed {
            self.keyring_changed(
                now,
                format!("installed key {id} (accepted, not yet in use)"),
            );
        }
        Ok(changed)
    }

    /// Proves with `id` from now on.
    pub fn use_key(&mut self, now: Time, id: KeyId) -> Result<bool, SecretError> {
        let changed = self.keyring.use_key(id)?;
        if changed {
            self.keyring_changed(now, format!("key {id} is now in use"));
        }
        Ok(changed)
    }

    /// Stops accepting `id` (it must not be the key in use).
    pub fn remove_key(&mut self, now: Time, id: KeyId) -> Result<(), SecretError> {
        self.keyring.remove(id)?;
        self.keyring_changed(now, format!("removed key {id}"));
        Ok(())
    }

    /// Which secrets the live nodes hold and use, from their records.
    pub fn secrets(&self) -> clusterctl_api::Secrets {
        let nodes: Vec<&NodeRecord> = self
            .table
            .live()
            .filter(|r| r.clock > 0 && r.state == RecordState::Alive)
            .collect();
        let mut ids: BTreeSet<KeyId> = BTreeSet::new();
        for r in &nodes {
            ids.extend(r.keys.iter().copied());
        }
        let keys = ids
            .into_iter()
            .map(|id| clusterctl_api::SecretKeyView {
                id: id.to_string(),
                holders: nodes.iter().filter(|r| r.keys.contains(&id)).count() as u32,
                in_use_by: nodes.iter().filter(|r| r.keys.first() == Some(&id)).count() as u32,
                missing_on: nodes
                    .iter()
                    .filter(|r| !r.keys.contains(&id))
                    .map(|r| r.name.to_string())
                    .collect(),
            })
            .collect();
        clusterctl_api::Secrets {
            observer: self.cfg.me.name.to_string(),
            nodes: nodes.len() as u32,
            keys,
        }
    }
}
