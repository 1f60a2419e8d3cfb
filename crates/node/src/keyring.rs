//! The node's cluster-secret keyring on disk: `DATA_DIR/keyring`, mode 0600.
//!
//! A new node starts with the config's `secret` as its only key. From then on the keyring file
//! is the truth (so `clusterctl secret install|use|remove` survive restarts), except when the
//! agent is started with `--secret FILE`, which resets it to that one secret: an operator
//! restarting a node "with a new secret" gets exactly that.

use crate::config::ConfigError;
use clusterctl_core::secret::{KeyId, Keyring, Secret};
use std::path::{Path, PathBuf};

/// File name of the keyring in the data directory.
pub const KEYRING_FILE: &str = "keyring";

/// Path of the keyring in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(KEYRING_FILE)
}

fn bad(path: &Path, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: "data-dir".into(),
        problem: format!("{}: {}", path.display(), problem.into()),
        fix: "restore the file, or move it aside to start again from the config's `secret`".into(),
    }
}

/// The keyring to start with (see the module docs).
pub fn load_or_init(
    dir: &Path,
    from_config: &Secret,
    reset_to: Option<Secret>,
) -> Result<Keyring, ConfigError> {
    let p = path(dir);
    if let Some(s) = reset_to {
        let ring = Keyring::new(s);
        store(dir, &ring).map_err(|e| bad(&p, e.to_string()))?;
        return Ok(ring);
    }
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let ring = Keyring::new(from_config.clone());
            store(dir, &ring).map_err(|e| bad(&p, e.to_string()))?;
            return Ok(ring);
        }
        Err(e) => return Err(bad(&p, e.to_string())),
    };
    crate::files::check_private(&p, "data-dir")?;
    let mut primary: Option<KeyId> = None;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let s = Secret::from_text(line).map_err(|e| bad(&p, format!("line {}: {e}", i + 1)))?;
        primary.get_or_insert(s.id());
        keys.push(s);
    }
    let primary = primary.ok_or_else(|| bad(&p, "holds no secret"))?;
    Keyring::from_parts(keys, primary).map_err(|e| bad(&p, e.to_string()))
}

/// Writes the keyring (the key in use first), atomically through a temporary file of its own,
/// mode 0600.
pub fn store(dir: &Path, ring: &Keyring) -> std::io::Result<()> {
    let mut text =
        String::from("# clusterctl keyring: one hex secret per line, the one in use first\n");
    for id in ring.ids() {
        if let Some(s) = ring.secrets().iter().find(|s| s.id() == id) {
            text.push_str(&s.to_text());
        }
    }
    crate::files::write_atomic(&path(dir), text.as_bytes(), 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn s(b: u8) -> Secret {
        Secret::from_bytes(&[b; 32]).unwrap()
    }

    #[test]
    fn starts_from_config_then_keeps_changes_and_resets_on_request() {
        let d = tempfile::tempdir().unwrap();
        let r = load_or_init(d.path(), &s(1), None).unwrap();
        assert_eq!(r.ids(), vec![s(1).id()]);
        let mut r2 = r.clone();
        r2.install(s(2)).unwrap();
        r2.use_key(s(2).id()).unwrap();
        store(d.path(), &r2).unwrap();
        let mode = std::fs::metadata(path(d.path()))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let back = load_or_init(d.path(), &s(1), None).unwrap();
        assert_eq!(back.ids(), vec![s(2).id(), s(1).id()]);
        let reset = load_or_init(d.path(), &s(1), Some(s(3))).unwrap();
        assert_eq!(reset.ids(), vec![s(3).id()]);
    }

    #[test]
    fn a_readable_keyring_is_refused() {
        let d = tempfile::tempdir().unwrap();
        load_or_init(d.path(), &s(1), None).unwrap();
        std::fs::set_permissions(path(d.path()), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_init(d.path(), &s(1), None).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn a_keyring_of_another_user_is_refused() {
        if crate::files::current_uid() != 0 {
            eprintln!("note: needs root to give a file away; skipped");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        load_or_init(d.path(), &s(1), None).unwrap();
        std::os::unix::fs::chown(path(d.path()), Some(65534), None).unwrap();
        let e = load_or_init(d.path(), &s(1), None).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("chown root {}", path(d.path()).display())),
            "{e}"
        );
    }
}
