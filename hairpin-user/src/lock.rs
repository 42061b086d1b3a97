//! The writers' lock: every process that changes a running instance's
//! tables (the daemon's configure, reload and reclaim, `mapping add|del`,
//! `deny add|del`, `conntrack flush`, `import-iptables`) holds an exclusive
//! `flock` on the pin directory around each change, so that two of them never
//! read the same free rule id or undo each other's writes. bpffs holds no
//! regular files, so the lock is on the directory itself.

use std::{fs::File, path::Path};

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
    fn a_missing_directory_is_a_one_line_error() {
        let error = WriteLock::acquire(Path::new("/nonexistent/hairpin")).expect_err("locked");
        let text = error.to_string();
        assert!(text.contains("/nonexistent/hairpin") && !text.contains('\n'), "{text}");
    }
}
