//! Maildir delivery for local recipients (optional, beside the INBOX in the database).
//!
//! Owns the on-disk layout `<root>/<domain>/<local>/{tmp,new,cur}` and the Maildir
//! delivery protocol: write into `tmp`, fsync, rename into `new`, fsync the directory, so
//! that a message is either wholly in `new` or absent after a crash. Path components come
//! from addresses and are checked here: nothing outside `root` can be named. These are
//! blocking `std::fs` calls: async callers run them on a blocking thread. It must not
//! decide who is local; the store does.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use rand::RngCore;

/// Deliveries made by this process, part of each unique file name.
static DELIVERIES: AtomicU64 = AtomicU64::new(0);

/// The Maildir of `address` under `root`: `<root>/<domain>/<local>`, both lower-cased.
/// `InvalidInput` when the address has no `@`, or a part is empty, starts with `.`, or
/// holds `/`, `\` or NUL (so `..` and absolute paths cannot escape `root`).
pub fn maildir_path(root: &Path, address: &str) -> io::Result<PathBuf> {
    let (local, domain) = address
        .rsplit_once('@')
        .ok_or_else(|| invalid(format!("address {address:?} has no domain")))?;
    let local = component(local, address)?;
    let domain = component(domain, address)?;
    Ok(root.join(domain).join(local))
}

fn component(part: &str, address: &str) -> io::Result<String> {
    let bad = part.is_empty()
        || part.starts_with('.')
        || part.chars().any(|c| c == '/' || c == '\\' || c == '\0');
    if bad {
        return Err(invalid(format!(
            "address {address:?} cannot name a Maildir"
        )));
    }
    Ok(part.to_lowercase())
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// A unique Maildir file name per the Maildir spec:
/// `<secs>.M<usec>P<pid>Q<n>R<random>.<host>`, with `/` and `:` in the host escaped.
fn unique_name(now: DateTime<Utc>) -> String {
    let n = DELIVERIES.fetch_add(1, Ordering::Relaxed);
    let random = rand::rng().next_u64();
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string())
        .replace('/', "\\057")
        .replace(':', "\\072");
    format!(
        "{}.M{}P{}Q{}R{:016x}.{}",
        now.timestamp(),
        now.timestamp_subsec_micros(),
        std::process::id(),
        n,
        random,
        host
    )
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Deliver `bytes` into the Maildir of `address` under `root` (into its Maildir++ folder
/// `.<folder>` when `folder` is given, such as `Junk`) and return the path of the file
/// in `new/`. Creates the Maildir (and folder, marked with a `maildirfolder` file) if
/// missing. The file is durable (file and
/// directory fsynced) when this returns `Ok`. A full disk is an error of kind
/// `StorageFull` (the store maps it to `StoreError::Full`).
pub fn deliver(
    root: &Path, address: &str, folder: Option<&str>, bytes: &[u8], now: DateTime<Utc>,
) -> io::Result<PathBuf> {
    deliver_with_flags(root, address, folder, bytes, &[], now)
}

/// The Maildir info of IMAP `flags`: `2,` and the letters of the flags Maildir knows, in
/// ASCII order (D draft, F flagged, R answered, S seen, T deleted). Keywords and
/// `\Recent` have no letter and are left out.
pub fn info(flags: &[String]) -> String {
    let mut letters: Vec<char> = flags
        .iter()
        .filter_map(|f| match f.to_ascii_lowercase().as_str() {
            "\\draft" => Some('D'),
            "\\flagged" => Some('F'),
            "\\answered" => Some('R'),
            "\\seen" => Some('S'),
            "\\deleted" => Some('T'),
            _ => None,
        })
        .collect();
    letters.sort_unstable();
    letters.dedup();
    format!("2,{}", letters.into_iter().collect::<String>())
}

/// `deliver` for a message that already has IMAP `flags` (an imported one): without
/// flags it lands in `new/` as `deliver` puts it; with flags it has been seen by a mail
/// client, so it lands in `cur/` with its Maildir info (`<name>:2,FS`, see [`info`]).
pub fn deliver_with_flags(
    root: &Path, address: &str, folder: Option<&str>, bytes: &[u8], flags: &[String],
    now: DateTime<Utc>,
) -> io::Result<PathBuf> {
    let user = maildir_path(root, address)?;
    let dir = match folder {
        // Folder names keep their case (`.Junk`); the same characters are refused.
        Some(f) => {
            component(f, address)?;
            user.join(format!(".{f}"))
        }
        None => user.clone(),
    };
    let created = !dir.join("new").is_dir();
    for sub in ["tmp", "new", "cur"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    if created {
        if folder.is_some() {
            File::create(dir.join("maildirfolder"))?.sync_all()?;
            sync_dir(&user)?;
        }
        // New directories must themselves survive a crash: sync their parents.
        sync_dir(&dir)?;
        if let Some(parent) = user.parent() {
            sync_dir(parent)?;
        }
        sync_dir(root)?;
    }
    let name = unique_name(now);
    let tmp = dir.join("tmp").join(&name);
    let (sub, new) = if flags.is_empty() {
        ("new", dir.join("new").join(&name))
    } else {
        (
            "cur",
            dir.join("cur").join(format!("{name}:{}", info(flags))),
        )
    };
    let written = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        // Leave no half-written file in tmp/ (best effort: the write error matters more).
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &new)?;
    sync_dir(&dir.join(sub))?;
    Ok(new)
}

/// Every message in the Maildir of `address` (`new/` then `cur/`, each sorted by file
/// name), with its bytes. An absent Maildir reads as empty. Used by tests and tools.
pub fn read_all(root: &Path, address: &str) -> io::Result<Vec<(PathBuf, Vec<u8>)>> {
    let dir = maildir_path(root, address)?;
    let mut out = Vec::new();
    for sub in ["new", "cur"] {
        let entries = match fs::read_dir(dir.join(sub)) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut paths = entries
            .map(|e| e.map(|e| e.path()))
            .collect::<io::Result<Vec<_>>>()?;
        paths.sort();
        for p in paths {
            let bytes = fs::read(&p)?;
            out.push((p, bytes));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000, 123_456_000).unwrap()
    }

    #[test]
    fn deliver_writes_new_and_reads_back() {
        let root = tempfile::tempdir().unwrap();
        let body = b"Subject: hi\r\n\r\nbody\r\n.. dot\r\n\x00\xff";
        let p1 = deliver(root.path(), "Alice@Example.COM", None, body, now()).unwrap();
        let p2 = deliver(root.path(), "alice@example.com", None, b"second", now()).unwrap();
        assert_ne!(p1, p2);
        let dir = root.path().join("example.com").join("alice");
        assert_eq!(p1.parent().unwrap(), dir.join("new"));
        assert!(dir.join("tmp").is_dir() && dir.join("cur").is_dir());
        assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        let name = p1.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("1700000000.M123456P"), "{name}");
        let all = read_all(root.path(), "alice@example.com").unwrap();
        let mut bodies: Vec<Vec<u8>> = all.into_iter().map(|(_, b)| b).collect();
        bodies.sort();
        let mut want = vec![body.to_vec(), b"second".to_vec()];
        want.sort();
        assert_eq!(bodies, want);
    }

    #[test]
    fn junk_goes_to_a_maildir_plus_plus_folder() {
        let root = tempfile::tempdir().unwrap();
        let p = deliver(root.path(), "bob@example.com", Some("Junk"), b"spam", now()).unwrap();
        let folder = root.path().join("example.com/bob/.Junk");
        assert_eq!(p.parent().unwrap(), folder.join("new"));
        assert!(folder.join("maildirfolder").is_file());
        assert!(folder.join("tmp").is_dir() && folder.join("cur").is_dir());
        assert!(
            read_all(root.path(), "bob@example.com").unwrap().is_empty(),
            "not the INBOX"
        );
        assert!(deliver(root.path(), "bob@example.com", Some("../x"), b"x", now()).is_err());
    }

    #[test]
    fn flagged_messages_go_to_cur_with_their_info() {
        let root = tempfile::tempdir().unwrap();
        let flags: Vec<String> = ["\\Seen", "$Label", "\\Answered", "\\Flagged", "\\Recent"]
            .iter()
            .map(|f| f.to_string())
            .collect();
        let p = deliver_with_flags(
            root.path(),
            "bob@example.com",
            Some("Sent"),
            b"sent",
            &flags,
            now(),
        )
        .unwrap();
        let folder = root.path().join("example.com/bob/.Sent");
        assert_eq!(p.parent().unwrap(), folder.join("cur"));
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(name.ends_with(":2,FRS"), "{name}");
        assert_eq!(fs::read(&p).unwrap(), b"sent");
        assert_eq!(fs::read_dir(folder.join("new")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(folder.join("tmp")).unwrap().count(), 0);
        // No flags: an unseen message, in new/ without info.
        let p = deliver_with_flags(root.path(), "bob@example.com", None, b"x", &[], now()).unwrap();
        assert_eq!(p.parent().unwrap(), root.path().join("example.com/bob/new"));
        assert!(!p.to_str().unwrap().contains(":2,"));
        let all = ["\\Deleted", "\\draft", "\\Seen", "\\Flagged", "\\Answered"];
        assert_eq!(info(&all.map(String::from)), "2,DFRST");
        assert_eq!(info(&["kw".to_string()]), "2,");
    }

    #[test]
    fn absent_maildir_reads_empty() {
        let root = tempfile::tempdir().unwrap();
        assert!(read_all(root.path(), "bob@example.com").unwrap().is_empty());
    }

    #[test]
    fn hostile_addresses_are_refused() {
        let root = tempfile::tempdir().unwrap();
        for bad in [
            "..@example.com",
            "a@..",
            "a/b@example.com",
            "a@ex/ample.com",
            "a\\b@example.com",
            ".hidden@example.com",
            "@example.com",
            "a@",
            "nodomain",
            "a\0@example.com",
        ] {
            let e = deliver(root.path(), bad, None, b"x", now()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 0);
    }
}
