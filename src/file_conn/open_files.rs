//! The open-file cache: each worker keeps the files its HTTP file routes
//! served recently open, so a repeated request costs one stat(2) instead
//! of openat2 + fstat + close.
//!
//! An entry is used only while its path still names the same inode,
//! unchanged in type, permissions, owner and ctime since it was opened
//! (`FileStat::same_file`). A file replaced by rename, deleted, chmod'ed
//! or chown'ed is opened again, or its error answered, on the very next
//! request. A write moves ctime too (as finely as the kernel's clock tick
//! records it), and even a write the stat cannot tell from before is
//! served as it is now: the descriptor reads the live inode, and size and
//! mtime come from the fresh stat. Unlike nginx's `open_file_cache`, which trusts an
//! entry for `open_file_cache_valid`, sluice does not serve a stale file on
//! a local filesystem. On NFS or FUSE, stat can answer from the client's
//! attribute cache where open would revalidate: turn the cache off there
//! (`open_file_cache = 0`).
//!
//! The stat does not confine its walk beneath the route's root the way
//! openat2 does. A hit needs the walk to end at the very inode, unchanged,
//! that a confined open of the same path by the same route reached
//! earlier; any other result is a miss and goes through openat2 again. So
//! the cache can only go on serving a file that this route already served
//! under its own rules. Entries are filed under the route's unique id
//! (never a descriptor number, which a reload may reuse for another
//! folder), and a reload empties the cache, so new rules apply at once.
//!
//! Entries are bounded (least recently used goes first), and an entry
//! unused for `inactive` is closed by `sweep`, so the space of a deleted
//! file is released soon. When the process runs out of descriptors (an
//! accept, an open, or a connection's backend socket fails with EMFILE),
//! the worker sheds half the cache (`shed`), and half of its idle pooled
//! pipes: clients come before cached files.
//!
//! Bodies share the cached descriptor: sendfile, splice and pread all pass
//! explicit offsets and never move the shared file position. mmap routes
//! do not use the cache, since each of their transfers takes a lease on
//! its own open file. Nor do files larger than `MAX_CACHED_SIZE`: their
//! transfer dwarfs the cost of an open, and concurrent transfers of one
//! large file read faster from the disk with readahead state of their own
//! (which lives in the open file) than sharing one.

use std::ffi::OsString;
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::sys::file::{FileStat, stat_at};

/// Larger files are opened for each request (see the module doc).
pub const MAX_CACHED_SIZE: u64 = 1 << 20;

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
    /// As when the file was opened: what a later stat must match.
    stat: FileStat,
    /// The index file's path when the key names a folder.
    index: Option<PathBuf>,
    ctype: Arc<str>,
    used: Instant,
}

/// (route id, path as the request named it, beneath the route's root).
/// The path is kept as plain bytes: hashing a `PathBuf` walks its
/// components, hashing an `OsString` does not.
type Key = (u64, OsString);

/// Off until `configure` says otherwise.
#[derive(Default)]
pub struct OpenFiles {
    lru: Option<LruCache<Key, Entry>>,
    inactive: Duration,
    /// The folders `root` routes resolve beneath, as their paths name
    /// them now (kept whether or not files are cached).
    pub roots: super::roots::Roots,
}

impl OpenFiles {
    /// Apply a (re)loaded configuration: at most `cap` files (0: no
    /// cache). The cache starts empty: the new generation's routes have
    /// new ids, and their rules may differ.
    pub fn configure(&mut self, cap: usize, inactive: Duration) {
        self.inactive = inactive;
        self.roots.clear();
        // Sparse: the table grows with use, not to `cap` up front.
        self.lru = NonZeroUsize::new(cap).map(LruCache::sparse);
    }

    pub fn enabled(&self) -> bool {
        self.lru.is_some()
    }

    /// Close every cached file; how many there were.
    pub fn clear(&mut self) -> usize {
        self.lru.as_mut().map_or(0, |lru| {
            let n = lru.len();
            lru.clear();
            n
        })
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lru.as_ref().map_or(0, LruCache::len)
    }

    /// The cached file `rel` names for route `route` (beneath `dir`, or an
    /// absolute `rel` with `None`), if it is still the same file: one
    /// stat(2). A miss hands `rel` back.
    pub fn get(
        &mut self,
        route: u64,
        dir: Option<BorrowedFd>,
        rel: PathBuf,
        now: Instant,
    ) -> Result<Opened, PathBuf> {
        let Some(lru) = self.lru.as_mut() else {
            return Err(rel);
        };
        let key = (route, rel.into_os_string());
        let Some(e) = lru.get_mut(&key) else {
            return Err(key.1.into());
        };
        let path = e.index.as_deref().unwrap_or(Path::new(&key.1));
        match stat_at(dir, path) {
            Ok(st) if st.same_file(&e.stat) => {
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
                Err(key.1.into())
            }
        }
    }

    /// Remember a file route `route` just opened for `rel` (`index`: the
    /// folder's index file that was opened instead, by its path).
    pub fn put(
        &mut self,
        route: u64,
        rel: PathBuf,
        index: Option<PathBuf>,
        opened: &Opened,
        now: Instant,
    ) {
        let Some(lru) = self.lru.as_mut() else {
            return;
        };
        lru.put(
            (route, rel.into_os_string()),
            Entry {
                file: opened.file.clone(),
                stat: opened.stat,
                index,
                ctype: opened.ctype.clone(),
                used: now,
            },
        );
    }

    /// When the least recently used entry becomes inactive (None: the
    /// cache is empty). The worker wakes up for it, and only for it.
    pub fn next_sweep(&self) -> Option<Instant> {
        let (_, e) = self.lru.as_ref()?.peek_lru()?;
        Some(e.used + self.inactive)
    }

    /// Close the entries unused for `inactive`.
    pub fn sweep(&mut self, now: Instant) {
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

    /// The process ran out of descriptors: close the least recently used
    /// half (descriptors a body still sends from close when it ends).
    /// Returns whether anything was closed.
    pub fn shed(&mut self) -> bool {
        let Some(lru) = self.lru.as_mut() else {
            return false;
        };
        let n = lru.len().div_ceil(2);
        for _ in 0..n {
            lru.pop_lru();
        }
        n > 0
    }

    /// Whether `rel` of route `route` is cached (tests).
    #[cfg(test)]
    fn has(&self, route: u64, rel: &str) -> bool {
        let key = (route, OsString::from(rel));
        self.lru.as_ref().is_some_and(|l| l.contains(&key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::file::fstat;
    use std::os::fd::{AsFd, AsRawFd};
    use std::os::unix::fs::PermissionsExt;

    const R: u64 = 7;

    fn cache(cap: usize, inactive: Duration) -> OpenFiles {
        let mut c = OpenFiles::default();
        c.configure(cap, inactive);
        c
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sluice-of-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn opened(p: &Path) -> Opened {
        let file = File::open(p).unwrap();
        let stat = fstat(file.as_fd()).unwrap();
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
        let root = Some(root.as_fd());
        std::fs::write(d.join("a"), b"one").unwrap();
        let now = Instant::now();
        let mut c = cache(4, Duration::from_secs(20));
        let first = opened(&d.join("a"));
        c.put(R, "a".into(), None, &first, now);
        let hit = c.get(R, root, "a".into(), now).ok().unwrap();
        assert_eq!(hit.file.as_raw_fd(), first.file.as_raw_fd());
        assert_eq!(hit.stat.size, 3);
        // Another route (another id) never sees this route's entry.
        assert!(c.get(R + 1, root, "a".into(), now).is_err());
        // Replaced by rename (how deploys swap files): a miss.
        std::fs::write(d.join("b"), b"three").unwrap();
        std::fs::rename(d.join("b"), d.join("a")).unwrap();
        assert!(c.get(R, root, "a".into(), now).is_err());
        assert!(!c.has(R, "a"), "a miss drops the entry");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn chmod_and_delete_miss() {
        let d = dir("chmod");
        let root = File::open(&d).unwrap();
        let root = Some(root.as_fd());
        let a = d.join("a");
        std::fs::write(&a, b"x").unwrap();
        let now = Instant::now();
        let mut c = cache(4, Duration::from_secs(20));
        c.put(R, "a".into(), None, &opened(&a), now);
        // Toggle "others may read": a different mode whatever the umask.
        let mode = std::fs::metadata(&a).unwrap().permissions().mode();
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode((mode ^ 0o004) & 0o7777))
            .unwrap();
        assert!(c.get(R, root, "a".into(), now).is_err());
        c.put(R, "a".into(), None, &opened(&a), now);
        assert!(c.get(R, root, "a".into(), now).is_ok());
        std::fs::remove_file(&a).unwrap();
        assert!(c.get(R, root, "a".into(), now).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bounded_swept_shed_and_emptied_by_a_reload() {
        let d = dir("sweep");
        let t0 = Instant::now();
        let inactive = Duration::from_secs(20);
        let mut c = cache(2, inactive);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            std::fs::write(d.join(name), b"x").unwrap();
            let at = t0 + Duration::from_secs(i as u64 * 10);
            c.put(R, name.into(), None, &opened(&d.join(name)), at);
        }
        assert_eq!(c.len(), 2, "the least recently used went");
        assert!(!c.has(R, "a"));
        // b was last used at 10 s, c at 20 s: b is due at 30 s.
        assert_eq!(c.next_sweep(), Some(t0 + Duration::from_secs(30)));
        c.sweep(t0 + Duration::from_secs(29));
        assert_eq!(c.len(), 2);
        c.sweep(t0 + Duration::from_secs(31));
        assert_eq!(c.len(), 1);
        assert!(c.has(R, "c"));
        assert_eq!(c.next_sweep(), Some(t0 + Duration::from_secs(40)));
        assert!(c.shed());
        assert_eq!((c.len(), c.next_sweep()), (0, None));
        assert!(!c.shed(), "nothing left to shed");
        c.put(R, "c".into(), None, &opened(&d.join("c")), t0);
        c.configure(2, inactive);
        assert_eq!(c.len(), 0, "a reload empties the cache");
        c.configure(0, inactive);
        assert!(!c.enabled());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
