//! The node table on disk: one snapshot file, replaced atomically.
//!
//! Write: a temporary file of its own (`.table.snap.XXXXXX.tmp`, unique per write) -> write ->
//! fsync -> rename over `table.snap` -> fsync the directory ([`crate::files::write_atomic`]).
//! A crash at any point leaves either the old or the new snapshot, never a torn one, and two
//! writes at once never share a temporary file; the checksum in the header catches anything
//! else. The agent writes through one task (its persister), the final save at shutdown included. A corrupt file stops the agent with a clear
//! message instead of silently starting empty (which would lose the clock and tombstones).

use clusterctl_core::snapshot;
use clusterctl_core::table::NodeRecord;
use std::fs;
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

/// Writes the snapshot atomically and durably (mode 0600); safe to call from several threads.
pub fn store(dir: &Path, records: &[NodeRecord]) -> std::io::Result<()> {
    crate::files::write_atomic(&snapshot_path(dir), &snapshot::encode(records), 0o600)
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
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(SNAPSHOT_FILE)]);
    }

    #[test]
    fn concurrent_saves_never_fail_and_the_file_always_decodes() {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path(), &[rec(0)]).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let writers: Vec<_> = (0..4u64)
                .map(|w| {
                    let d = dir.path();
                    s.spawn(move || {
                        for i in 0..100u64 {
                            let many: Vec<NodeRecord> =
                                (0..1 + (i % 7)).map(|k| rec(w * 1000 + i + k)).collect();
                            store(d, &many).unwrap_or_else(|e| panic!("writer {w}, save {i}: {e}"));
                        }
                    })
                })
                .collect();
            let reader = s.spawn(|| {
                let mut reads = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    load(dir.path()).unwrap_or_else(|e| panic!("read {reads}: {e}"));
                    reads += 1;
                }
                reads
            });
            for w in writers {
                w.join().unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(reader.join().unwrap() > 0);
        });
        assert!(!load(dir.path()).unwrap().is_empty());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(SNAPSHOT_FILE)]);
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
