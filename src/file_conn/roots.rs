//! Where a `root` file route's requests resolve: the folder its path names
//! now, not only the one it named when the configuration was loaded.
//!
//! A route opens its root folder (O_PATH) when its generation is built,
//! and requests resolve beneath a descriptor of it (openat2 with
//! RESOLVE_BENEATH). A deploy that swaps a symlink (`current ->
//! releases/N`), or renames a new folder into place, changes what the path
//! names: each worker looks at the path again at most once per `RECHECK`
//! (one stat) and, when it names another folder, opens that one and
//! serves from it from then on, as nginx, which resolves its root for each
//! request, does. The open-file cache needs nothing more: its entries are
//! checked by a stat beneath the folder in use, so a file of the old
//! folder is a miss.
//!
//! A path that no longer resolves (a deploy that removes the old link
//! before making the new one) keeps the folder it named last, with one
//! warning, rather than failing every request in the gap.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::route::{RouteRt, open_dir};
use crate::sys;

/// How long a worker trusts a root path to name the same folder.
pub const RECHECK: Duration = Duration::from_secs(1);

/// One worker's root folders, by route id.
#[derive(Default)]
pub struct Roots {
    map: HashMap<u64, Root>,
}

struct Root {
    fd: Arc<OwnedFd>,
    /// Device and inode of the folder `fd` is.
    id: (u64, u64),
    checked: Instant,
    /// The path did not resolve at the last look (warned once).
    lost: bool,
}

impl Roots {
    /// Forget every route's folder (a reload: the new routes have new ids).
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// The folder `route`'s requests resolve beneath (`path` is its
    /// `root`), or None for a route without one.
    pub fn get(&mut self, route: &RouteRt, path: &Path, now: Instant) -> Option<Arc<OwnedFd>> {
        let loaded = route.root.as_ref()?;
        let r = self.map.entry(route.id).or_insert_with(|| {
            // The folder the generation opened may be any age by now (a
            // worker's first request, or an older generation's keep-alive
            // connection after a reload emptied the map): look at once.
            let mut r = Root {
                id: identity(loaded),
                fd: loaded.clone(),
                checked: now,
                lost: false,
            };
            r.follow(&route.cfg.name, path);
            r
        });
        if now.saturating_duration_since(r.checked) >= RECHECK {
            r.checked = now;
            r.follow(&route.cfg.name, path);
        }
        Some(r.fd.clone())
    }
}

impl Root {
    /// Look at what `path` names now; open it if it is another folder.
    fn follow(&mut self, route: &str, path: &Path) {
        let named = std::fs::metadata(path).and_then(|m| {
            if (m.dev(), m.ino()) == self.id {
                return Ok(None);
            }
            let fd = open_dir(path)?;
            Ok(Some(fd))
        });
        match named {
            Ok(None) => self.lost = false,
            Ok(Some(fd)) => {
                let id = identity(&fd);
                log::info!(
                    "route {route}: root {} names another folder now; serving from it",
                    path.display()
                );
                (self.fd, self.id, self.lost) = (Arc::new(fd), id, false);
            }
            Err(e) => {
                if !self.lost {
                    log::warn!(
                        "route {route}: root {}: {e}; serving from the folder it named before",
                        path.display()
                    );
                }
                self.lost = true;
            }
        }
    }
}

/// Device and inode of an open folder ((0, 0) if fstat fails, which makes
/// the next look open the path again).
fn identity(fd: &OwnedFd) -> (u64, u64) {
    sys::file::fstat(fd.as_fd()).map_or((0, 0), |st| (st.dev, st.ino))
}
