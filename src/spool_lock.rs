//! One daemon per spool: exclusive `flock`s on the spool's lock file and on the pid file.
//!
//! Two daemons on one spool would both run the outgoing queue and write the same SQLite
//! file and log, so `erlmail serve` takes an exclusive, non-blocking `flock` on
//! `<spool_dir>/erlmail.lock` (and on its `--pidfile`) before it opens anything else, and
//! holds it for its whole life. The kernel drops a `flock` when its holder dies, so a
//! file left behind by a crash is stale and simply taken over: whether a daemon runs is
//! decided by the lock, never by the pid the file contains (the pid is only for the
//! message naming the holder). A file that another process holds is never truncated,
//! rewritten or removed.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The lock file's name inside the spool directory.
pub const SPOOL_LOCK_NAME: &str = "erlmail.lock";

/// Why a lock was not taken.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds the lock; the pid it wrote, if it had written one yet.
    Held {
        /// The file that is locked.
        path: PathBuf,
        /// The holder's pid, as read from the file.
        pid: Option<u32>,
    },
    /// The file could not be created, opened or locked.
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Held { path, pid } => match pid {
                Some(pid) => write!(f, "{} is locked by pid {pid}", path.display()),
                None => write!(f, "{} is locked by another process", path.display()),
            },
            LockError::Io { path, error } => write!(f, "{}: {error}", path.display()),
        }
    }
}

impl std::error::Error for LockError {}

/// An exclusively locked file, held until dropped. A pid file is removed on drop (while
/// still locked, so no other process can have taken it over in between); the spool lock
/// file stays, as removing it would only open a window for two holders of two inodes.
#[derive(Debug)]
pub struct LockFile {
    file: Option<Flock<File>>,
    path: PathBuf,
    remove_on_drop: bool,
}

impl LockFile {
    /// Replace the file's content with `pid` and a newline. Called after any fork, so
    /// the pid named is the one holding the lock.
    pub fn write_pid(&mut self, pid: u32) -> io::Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(format!("{pid}\n").as_bytes())?;
        file.sync_all()
    }

    /// The locked file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        if self.remove_on_drop && self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
        // Unlocks and closes.
        self.file.take();
    }
}

/// Lock `<spool_dir>/erlmail.lock`, creating the file if needed (the directory must
/// exist). Fails with [`LockError::Held`] when another daemon runs on this spool.
pub fn lock_spool(spool_dir: &Path) -> Result<LockFile, LockError> {
    lock(&spool_dir.join(SPOOL_LOCK_NAME), false)
}

/// Lock a pid file, creating it exclusively when absent and taking over a stale one (a
/// file nobody holds locked). Removed when the returned guard is dropped.
pub fn lock_pidfile(path: &Path) -> Result<LockFile, LockError> {
    lock(path, true)
}

fn lock(path: &Path, remove_on_drop: bool) -> Result<LockFile, LockError> {
    let io_err = |error| LockError::Io {
        path: path.to_path_buf(),
        error,
    };
    // A holder that is stopping removes its pid file after we opened it: the lock we then
    // get is on an unlinked inode. Checking the path still names our inode, and trying
    // again when it does not, closes that window.
    for _ in 0..10 {
        let file = open(path).map_err(io_err)?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                return Err(LockError::Held {
                    path: path.to_path_buf(),
                    pid: read_pid(&mut file),
                })
            }
            Err((_, errno)) => return Err(io_err(errno.into())),
        };
        let ours = file.metadata().map_err(io_err)?;
        match std::fs::metadata(path) {
            Ok(now) if now.dev() == ours.dev() && now.ino() == ours.ino() => {
                // Until `write_pid` (after any fork), an empty file makes a reader wait
                // for the new pid instead of naming the dead one a crash left behind.
                file.set_len(0).map_err(io_err)?;
                return Ok(LockFile {
                    file: Some(file),
                    path: path.to_path_buf(),
                    remove_on_drop,
                });
            }
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(e)),
        }
    }
    Err(io_err(io::Error::other(
        "the file keeps being replaced; is another erlmail starting?",
    )))
}

/// Create the file exclusively, or open the existing one without truncating it.
fn open(path: &Path) -> io::Result<File> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
    {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            OpenOptions::new().read(true).write(true).open(path)
        }
        other => other,
    }
}

/// The pid a lock's holder wrote. The holder writes it just after locking (and, with
/// `--daemon`, after forking), so an empty file is read again for up to two seconds.
fn read_pid(file: &mut File) -> Option<u32> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut text = String::new();
        if file.rewind().is_ok() && file.read_to_string(&mut text).is_ok() {
            if let Ok(pid) = text.trim().parse() {
                return Some(pid);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = lock_spool(dir.path()).unwrap();
        first.write_pid(4242).unwrap();
        match lock_spool(dir.path()) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(4242)),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        assert!(
            dir.path().join(SPOOL_LOCK_NAME).exists(),
            "the spool lock file stays"
        );
        lock_spool(dir.path()).expect("free again once dropped");
    }

    #[test]
    fn pidfile_is_taken_over_when_stale_and_kept_when_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("erlmail.pid");
        std::fs::write(&path, "999999\n").unwrap();
        let mut ours = lock_pidfile(&path).expect("a stale file is taken over");
        ours.write_pid(77).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "77\n");
        assert!(matches!(
            lock_pidfile(&path),
            Err(LockError::Held { pid: Some(77), .. })
        ));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "77\n",
            "a refused locker leaves the file alone"
        );
        drop(ours);
        assert!(!path.exists(), "the owner removes its pid file");
    }
}
