//! The node table on disk: one snapshot file, replaced atomically.
//!
//! Write: `table.snap.tmp` -> write -> fsync -> rename over `table.snap` -> fsync the directory.
//! A crash at any point leaves either the old or the new snapshot, never a torn one; the
//! checksum in the header catches anything else. A corrupt file stops the agent with a clear
//! message instead of silently starting empty (which would lose the clock and tombstones).

use clusterctl_core::snapshot;
use clusterctl_core::table::NodeRecord;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the snapshot inside the data directory.
pub const SNAPSHOT_FILE: &str = "table.snap";

/// Why the snapshot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a usable node-table snapshot: {problem}; move it aside to start this node with an empty table (it will learn its clock back from its peers)")]
    Corrupt { path: PathBuf, problem: String },
}

/// Path of the snapshot in `dir`.
pub fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join(SNAPSHOT_FILE)
}

/// Reads the snapshot; no file means a new node (empty table).
pub fn load(dir: &Path) -> Result<Vec<NodeRecord>, PersistError> {
    let path = snapshot_path(dir);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(PersistError::Read { path, source }),
    };
    snapshot::decode(&bytes).map_err(|e| PersistError::Corrupt {
        path,
        problem: e.to_string(),
    })
}

/// Writes the snapshot atomically and durably.
pub fn store(dir: &Path, records: &[NodeRecord]) -> std::io::Result<()> {
    let path = snapshot_path(dir);
    let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    let bytes = snapshot::encode(records);
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clusterctl_api::Role;
    use clusterctl_core::name::{Ident, NodeName, SiteName};

    fn rec(clock: u64) -> NodeRecord {
        NodeRecord::new(
            &Ident {
                name: NodeName::new("a").unwrap(),
                site: SiteName::new("s").unwrap(),
                role: Role::Member,
            },
            clock,
            "127.0.0.1:1".into(),
            "h".into(),
            "v".into(),
            true,
        )
    }

    #[test]
    fn round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        store(dir.path(), &[rec(1)]).unwrap();
        store(dir.path(), &[rec(2)]).unwrap();
        assert_eq!(load(dir.path()).unwrap(), vec![rec(2)]);
        assert!(!dir.path().join("table.snap.tmp").exists());
    }

    #[test]
    fn corruption_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path(), &[rec(1)]).unwrap();
        let p = snapshot_path(dir.path());
        let mut b = fs::read(&p).unwrap();
        let n = b.len() - 1;
        b[n] ^= 1;
        fs::write(&p, b).unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("checksum") && e.contains("move it aside"), "{e}");
    }
}
