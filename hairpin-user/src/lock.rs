//! The writers' lock: every process that changes a running instance's
//! tables (the daemon's configure, reload and reclaim, `mapping add|del`,
//! `deny add|del`, `conntrack flush`, `import-iptables`) holds an exclusive
//! `flock` on the pin directory around each change, so that two of them never
//! read the same free rule id or undo each other's writes. bpffs holds no
//! regular files, so the lock is on the directory itself.
//!
//! The daemon's lock: `hairpin run` holds another `flock`, on a file next
//! to its state file, for as long as it runs. The kernel releases it when
//! the process ends, however it ends, so "is the daemon running" is asked
//! of the lock, never of a pid another process may have been given since.

use std::{fs::File, io, path::Path};

use rustix::fs::{FlockOperation, flock};
use thiserror::Error;

#[derive(Debug, Error)]
#[error("locking {path} for writing: {source}")]
pub struct LockError {
    path: String,
    source: std::io::Error,
}

/// Held while it lives; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct WriteLock {
    _dir: File,
}

impl WriteLock {
    /// Waits for the other writers of the instance at `dir` to finish.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let error = |source| LockError { path: dir.display().to_string(), source };
        let file = File::open(dir).map_err(error)?;
        flock(&file, FlockOperation::LockExclusive).map_err(|e| error(e.into()))?;
        Ok(Self { _dir: file })
    }
}

/// Held by the running daemon of one instance.
#[derive(Debug)]
pub struct DaemonLock {
    _file: File,
}

impl DaemonLock {
    /// Takes the lock at `path` (created if missing), or `None` when a
    /// running daemon holds it.
    pub fn try_acquire(path: &Path) -> Result<Option<Self>, LockError> {
        let error = |source| LockError { path: path.display().to_string(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(error)?;
        }
        let file =
            File::options().create(true).truncate(false).write(true).open(path).map_err(error)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(Self { _file: file })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(error(e.into())),
        }
    }
}

/// Whether a daemon holds the lock at `path` now.
pub fn daemon_running(path: &Path) -> Result<bool, LockError> {
    let error = |source| LockError { path: path.display().to_string(), source };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(error(e)),
    };
    match flock(&file, FlockOperation::NonBlockingLockShared) {
        // Taken, so nobody held it; released as `file` closes.
        Ok(()) => Ok(false),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(true),
        Err(e) => Err(error(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn writers_never_interleave() {
        let dir = std::env::temp_dir().join(format!("hairpin-lock-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("test setup: a directory");
        let counter = dir.join("counter");
        fs::write(&counter, "0").expect("test setup: the counter");
        let (threads, rounds) = (4, 200);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    for _ in 0..rounds {
                        let _lock = WriteLock::acquire(&dir).expect("locking");
                        let value: u32 = fs::read_to_string(&counter).unwrap().parse().unwrap();
                        std::thread::yield_now();
                        fs::write(&counter, (value + 1).to_string()).unwrap();
                    }
                });
            }
        });
        let total: u32 = fs::read_to_string(&counter).unwrap().parse().unwrap();
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(total, threads * rounds, "an update was lost: two writers held the lock");
    }

    #[test]
    fn the_daemon_lock_says_whether_its_holder_runs() {
        let dir = tempfile::tempdir().expect("test setup: a directory");
        let path = dir.path().join("run/instance.lock");
        assert!(!daemon_running(&path).expect("no lock file yet"), "nothing ran yet");
        let held = DaemonLock::try_acquire(&path).expect("lock").expect("free at first");
        assert!(daemon_running(&path).expect("ask"), "held by this daemon");
        assert!(
            DaemonLock::try_acquire(&path).expect("lock").is_none(),
            "a second daemon must not take a held lock"
        );
        drop(held);
        assert!(!daemon_running(&path).expect("ask"), "released when its holder ends");
        assert!(DaemonLock::try_acquire(&path).expect("lock").is_some(), "free again");
    }

    #[test]
    fn a_missing_directory_is_a_one_line_error() {
        let error = WriteLock::acquire(Path::new("/nonexistent/hairpin")).expect_err("locked");
        let text = error.to_string();
        assert!(text.contains("/nonexistent/hairpin") && !text.contains('\n'), "{text}");
    }
}
