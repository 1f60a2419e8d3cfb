//! The agent's files: who may own them, who may read them, and who may write the data directory.
//!
//! - [`check_private`]: a file holding a secret (the cluster secret, the keyring, the TLS
//!   private key) must be owned by the agent's user or by root and readable by its owner only;
//!   anything else is refused with the `chmod`/`chown` that fixes it.
//! - [`DataDirLock`]: one agent per data directory. The lock is an exclusive `flock` on
//!   `DATA_DIR/lock`, held for the agent's lifetime and released by the kernel when the process
//!   ends, however it ends; the file names the holder (pid and config) for the next one.
//! - [`write_atomic`]: every file the agent writes in its data directory goes through a unique
//!   temporary file in the same directory, fsync, rename over the target, fsync of the directory.

use crate::config::ConfigError;
use fs4::fs_std::FileExt;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// File name of the lock in the data directory.
pub const LOCK_FILE: &str = "lock";
/// Most bytes of the holder line read from a lock file.
const MAX_HOLDER: u64 = 1024;

/// The effective user id of this process.
pub fn current_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The login name of `uid` from /etc/passwd, or the number when it has none.
pub fn user_name(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let id = f.nth(1)?;
                (id.parse::<u32>().ok()? == uid).then(|| name.to_string())
            })
        })
        .unwrap_or_else(|| uid.to_string())
}

/// Checks that `path`, a file holding a secret, is owned by this process's user (or root) and
/// readable by its owner only. `key` is the config key naming it, for the error.
pub fn check_private(path: &Path, key: &str) -> Result<(), ConfigError> {
    let meta = std::fs::metadata(path).map_err(|e| ConfigError {
        key: key.into(),
        problem: format!("cannot read {}: {e}", path.display()),
        fix: "check the path and its permissions".into(),
    })?;
    let me = current_uid();
    let owner = meta.uid();
    let mode = meta.permissions().mode() & 0o777;
    let foreign = owner != me && owner != 0;
    let open = mode & 0o077 != 0;
    let mut problems = Vec::new();
    let mut fixes = Vec::new();
    if foreign {
        let allowed = if me == 0 {
            "by root, the agent's user".to_string()
        } else {
            format!("by the agent's user {} (uid {me}) or root", user_name(me))
        };
        problems.push(format!(
            "is owned by {} (uid {owner}), not {allowed}",
            user_name(owner)
        ));
        fixes.push(format!("chown {} {}", user_name(me), path.display()));
    }
    if open {
        problems.push(format!(
            "has mode {mode:04o}: it holds a secret and must be readable by its owner only"
        ));
        fixes.push(format!("chmod 600 {}", path.display()));
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(ConfigError {
        key: key.into(),
        problem: format!("{} {}", path.display(), problems.join(" and ")),
        fix: fixes.join(" && "),
    })
}

/// Checks only that `path` is readable by its owner only (a CA key kept by an operator: any
/// owner, but no group or other access). The error names the `chmod`.
pub fn check_owner_only(path: &Path) -> Result<(), String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {mode:04o}: a private key must be readable by its owner only; fix: chmod 600 {}",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically and durably, with mode `mode`: a unique temporary file
/// next to it (so two writers never share one), fsync, rename, fsync of the directory. A
/// failure leaves the old file in place and no temporary file behind.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The exclusive lock on a data directory, held until dropped (or the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the lock on `dir` (created if missing) for the agent of `config`, or says who holds
    /// it. Never waits.
    pub fn acquire(dir: &Path, config: &Path) -> Result<DataDirLock, ConfigError> {
        let path = dir.join(LOCK_FILE);
        let io = |what: &str, e: std::io::Error| ConfigError {
            key: "data-dir".into(),
            problem: format!("cannot {what} {}: {e}", path.display()),
            fix: "choose a directory the agent's user can create and write".into(),
        };
        std::fs::create_dir_all(dir).map_err(|e| io("create the directory of", e))?;
        // Not truncated on open: the holder's line must survive a failed attempt.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io("open", e))?;
        let got = file.try_lock_exclusive().map_err(|e| io("lock", e))?;
        if !got {
            let mut holder = String::new();
            let _ = (&file).take(MAX_HOLDER).read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another agent".to_string()
            } else {
                format!("another agent ({holder})")
            };
            return Err(ConfigError {
                key: "data-dir".into(),
                problem: format!("{} is in use by {who}", dir.display()),
                fix: "stop that agent first, or give this node its own data-dir".into(),
            });
        }
        let line = format!("pid {} config {}\n", std::process::id(), config.display());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(line.as_bytes()))
            .map_err(|e| io("write", e))?;
        Ok(DataDirLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &Path, mode: u32) -> PathBuf {
        let p = dir.join("secret");
        std::fs::write(&p, "x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_private_file_of_this_user_passes() {
        let d = tempfile::tempdir().unwrap();
        check_private(&file(d.path(), 0o600), "secret").unwrap();
        check_private(&file(d.path(), 0o400), "secret").unwrap();
    }

    #[test]
    fn a_file_readable_by_group_or_others_is_refused_with_the_chmod() {
        let d = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o644, 0o604] {
            let p = file(d.path(), mode);
            let e = check_private(&p, "tls.key").unwrap_err();
            assert_eq!(e.fix, format!("chmod 600 {}", p.display()), "{e}");
            assert!(e.problem.contains(&format!("{mode:04o}")), "{e}");
            assert_eq!(e.key, "tls.key");
        }
        assert!(check_owner_only(&file(d.path(), 0o644))
            .unwrap_err()
            .contains("chmod 600"));
        check_owner_only(&file(d.path(), 0o600)).unwrap();
    }

    #[test]
    fn a_file_of_another_user_is_refused_with_the_chown() {
        if current_uid() != 0 {
            eprintln!("note: needs root to give a file away; skipped");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let p = file(d.path(), 0o600);
        std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
        let e = check_private(&p, "secret").unwrap_err();
        assert_eq!(e.fix, format!("chown {} {}", user_name(0), p.display()));
        assert!(e.problem.contains("uid 65534"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_private(&p, "secret").unwrap_err();
        assert!(
            e.fix.contains("chown") && e.fix.contains("chmod 600"),
            "{e}"
        );
    }

    #[test]
    fn a_second_lock_on_a_data_directory_names_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(d.path(), Path::new("/etc/a.toml")).unwrap();
        let e = DataDirLock::acquire(d.path(), Path::new("/etc/b.toml")).unwrap_err();
        let line = e.to_string();
        assert!(line.contains(&d.path().display().to_string()), "{line}");
        assert!(
            line.contains(&format!("pid {}", std::process::id())) && line.contains("/etc/a.toml"),
            "{line}"
        );
        drop(first);
        DataDirLock::acquire(d.path(), Path::new("/etc/b.toml")).unwrap();
    }

    #[test]
    fn atomic_writes_leave_no_temporary_file_and_set_the_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    }
}
