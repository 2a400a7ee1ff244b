//! The open-file cache: each worker keeps the files its HTTP file routes
//! served recently open, so a repeated request costs one stat(2) instead
//! of openat2 + fstat + close.
//!
//! An entry is used only while its path still names the same inode,
//! unchanged in type, permissions, owner and ctime since it was opened
//! (`FileStat::same_file`). A file replaced by rename, deleted, chmod'ed
//! or chown'ed is opened again, or its error answered, on the very next
//! request; a file written in place is served as it is now (the descriptor
//! reads the live inode, and size and mtime come from that same stat).
//! So, unlike nginx's `open_file_cache`, which trusts an entry for
//! `open_file_cache_valid`, nothing is served stale.
//!
//! The stat does not confine its walk beneath the route's root as openat2
//! does. It does not need to: an entry is used only when the walk ends at
//! the very inode that a confined open reached, and any other result is a
//! miss that goes through openat2 again.
//!
//! Entries are bounded (least recently used goes first), and an entry
//! unused for `inactive` is closed by `sweep`, so the space of a deleted
//! file is released soon. The key's directory is a descriptor number,
//! which a reload may reuse for another folder; that is harmless, because
//! the check stats the path beneath the directory given now.
//!
//! Bodies share the cached descriptor: sendfile, splice and pread all pass
//! explicit offsets and never move the shared file position. mmap routes
//! do not use the cache, since each of their transfers takes a lease on
//! its own open file.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::sys::file::{FileStat, stat_at};

/// How often `sweep` looks for inactive entries.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The key's directory when a path is absolute (a single-file route).
const NO_DIR: RawFd = -1;

/// A file ready to serve, from the cache or freshly opened.
pub struct Opened {
    pub file: Arc<File>,
    /// Current size and mtime of the file.
    pub stat: FileStat,
    /// The Content-Type its name calls for.
    pub ctype: Arc<str>,
    /// The path named a folder and this is its index file.
    pub index: bool,
}

struct Entry {
    file: Arc<File>,
    /// As when the file was opened (or last checked).
    stat: FileStat,
    /// The index file's path when the key names a folder.
    index: Option<PathBuf>,
    ctype: Arc<str>,
    used: Instant,
}

pub struct OpenFiles {
    lru: Option<LruCache<(RawFd, PathBuf), Entry>>,
    inactive: Duration,
    next_sweep: Instant,
}

impl OpenFiles {
    /// A cache of at most `cap` files (0: no cache).
    pub fn new(cap: usize, inactive: Duration, now: Instant) -> OpenFiles {
        OpenFiles {
            lru: NonZeroUsize::new(cap).map(LruCache::new),
            inactive,
            next_sweep: now + SWEEP_EVERY,
        }
    }

    /// Apply a reloaded configuration: entries beyond the new size are
    /// closed, least recently used first.
    pub fn configure(&mut self, cap: usize, inactive: Duration) {
        self.inactive = inactive;
        match (NonZeroUsize::new(cap), self.lru.as_mut()) {
            (None, _) => self.lru = None,
            (Some(n), Some(lru)) => lru.resize(n),
            (Some(n), None) => self.lru = Some(LruCache::new(n)),
        }
    }

    pub fn enabled(&self) -> bool {
        self.lru.is_some()
    }

    pub fn len(&self) -> usize {
        self.lru.as_ref().map_or(0, LruCache::len)
    }

    /// The cached file `rel` names beneath `dir` (absolute `rel` with
    /// `None`), if it is still the same file; one stat(2). A miss hands
    /// `rel` back.
    pub fn get(
        &mut self,
        dir: Option<BorrowedFd>,
        rel: PathBuf,
        now: Instant,
    ) -> Result<Opened, PathBuf> {
        let Some(lru) = self.lru.as_mut() else {
            return Err(rel);
        };
        let key = (dir.map_or(NO_DIR, |d| d.as_raw_fd()), rel);
        let Some(e) = lru.get_mut(&key) else {
            return Err(key.1);
        };
        let path = e.index.as_deref().unwrap_or(&key.1);
        match stat_at(dir, path) {
            Ok(st) if st.same_file(&e.stat) => {
                e.stat = st;
                e.used = now;
                Ok(Opened {
                    file: e.file.clone(),
                    stat: st,
                    ctype: e.ctype.clone(),
                    index: e.index.is_some(),
                })
            }
            // Gone, replaced or changed: open it again (which also
            // answers the error, if there is one now).
            _ => {
                lru.pop(&key);
                Err(key.1)
            }
        }
    }

    /// Remember a file just opened for `rel` (`index`: the folder's index
    /// file that was opened instead, by its path beneath `dir`).
    pub fn put(
        &mut self,
        dir: Option<BorrowedFd>,
        rel: PathBuf,
        index: Option<PathBuf>,
        opened: &Opened,
        now: Instant,
    ) {
        let Some(lru) = self.lru.as_mut() else {
            return;
        };
        let key = (dir.map_or(NO_DIR, |d| d.as_raw_fd()), rel);
        lru.put(
            key,
            Entry {
                file: opened.file.clone(),
                stat: opened.stat,
                index,
                ctype: opened.ctype.clone(),
                used: now,
            },
        );
    }

    /// When `sweep` next has work to look for (None: the cache is empty).
    pub fn next_sweep(&self) -> Option<Instant> {
        (self.len() > 0).then_some(self.next_sweep)
    }

    /// Close the entries unused for `inactive`. Cheap when not due.
    pub fn sweep(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_EVERY;
        let Some(lru) = self.lru.as_mut() else {
            return;
        };
        while let Some((_, e)) = lru.peek_lru() {
            if now.saturating_duration_since(e.used) < self.inactive {
                break;
            }
            lru.pop_lru();
        }
    }

    /// Whether `rel` beneath `dir` is cached (tests).
    #[cfg(test)]
    fn has(&self, dir: Option<BorrowedFd>, rel: &std::path::Path) -> bool {
        let key = (dir.map_or(NO_DIR, |d| d.as_raw_fd()), rel.to_path_buf());
        self.lru.as_ref().is_some_and(|l| l.contains(&key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::file::stat;
    use std::os::fd::AsFd;
    use std::path::Path;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sluice-of-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn opened(p: &Path) -> Opened {
        let file = File::open(p).unwrap();
        let stat = stat(file.as_fd()).unwrap();
        Opened {
            file: Arc::new(file),
            stat,
            ctype: "text/plain".into(),
            index: false,
        }
    }

    #[test]
    fn a_hit_is_the_same_descriptor_and_a_replaced_file_misses() {
        let d = dir("replace");
        let root = File::open(&d).unwrap();
        std::fs::write(d.join("a"), b"one").unwrap();
        let now = Instant::now();
        let mut c = OpenFiles::new(4, Duration::from_secs(20), now);
        let first = opened(&d.join("a"));
        c.put(Some(root.as_fd()), "a".into(), None, &first, now);
        let hit = c.get(Some(root.as_fd()), "a".into(), now).ok().unwrap();
        assert_eq!(hit.file.as_raw_fd(), first.file.as_raw_fd());
        assert_eq!(hit.stat.size, 3);
        // Replaced by rename (how deploys swap files): a miss.
        std::fs::write(d.join("b"), b"three").unwrap();
        std::fs::rename(d.join("b"), d.join("a")).unwrap();
        assert!(c.get(Some(root.as_fd()), "a".into(), now).is_err());
        assert!(
            !c.has(Some(root.as_fd()), Path::new("a")),
            "a miss drops the entry"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn chmod_and_delete_miss() {
        let d = dir("chmod");
        let root = File::open(&d).unwrap();
        std::fs::write(d.join("a"), b"x").unwrap();
        let now = Instant::now();
        let mut c = OpenFiles::new(4, Duration::from_secs(20), now);
        c.put(
            Some(root.as_fd()),
            "a".into(),
            None,
            &opened(&d.join("a")),
            now,
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.join("a"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(c.get(Some(root.as_fd()), "a".into(), now).is_err());
        c.put(
            Some(root.as_fd()),
            "a".into(),
            None,
            &opened(&d.join("a")),
            now,
        );
        assert!(c.get(Some(root.as_fd()), "a".into(), now).is_ok());
        std::fs::remove_file(d.join("a")).unwrap();
        assert!(c.get(Some(root.as_fd()), "a".into(), now).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bounded_and_swept() {
        let d = dir("sweep");
        let root = File::open(&d).unwrap();
        let t0 = Instant::now();
        let mut c = OpenFiles::new(2, Duration::from_secs(20), t0);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            std::fs::write(d.join(name), b"x").unwrap();
            let at = t0 + Duration::from_secs(i as u64 * 10);
            c.put(
                Some(root.as_fd()),
                name.into(),
                None,
                &opened(&d.join(name)),
                at,
            );
        }
        assert_eq!(c.len(), 2, "the least recently used went");
        assert!(!c.has(Some(root.as_fd()), Path::new("a")));
        // b was last used at 10 s, c at 20 s: at 31 s only b is inactive.
        c.sweep(t0 + Duration::from_secs(31));
        assert_eq!(c.len(), 1);
        assert!(c.has(Some(root.as_fd()), Path::new("c")));
        // Not due again within SWEEP_EVERY.
        c.sweep(t0 + Duration::from_secs(31) + SWEEP_EVERY / 2);
        assert_eq!(c.len(), 1);
        c.sweep(t0 + Duration::from_secs(60));
        assert_eq!(c.len(), 0);
        assert_eq!(c.next_sweep(), None);
        c.configure(0, Duration::from_secs(20));
        assert!(!c.enabled());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
