//! Routes at run time: the validated route settings plus the live state
//! every worker shares — backend health, connection counts, counters —
//! and the balancing that picks a backend for a new connection.
//!
//! A `RouteRt` is built by the main thread for each configuration
//! generation and shared (`Arc`) by all workers. Connections keep the
//! `RouteRt` they started with, so a reload never changes a connection
//! under its feet. State that must survive a reload (counters, health,
//! connection counts) lives in `RouteShared`/`BackendRt`, carried over by
//! route name and backend address.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::{self, Balance, RouteKind};
use crate::stats::Stats;

/// Live state of one backend, shared by all workers.
pub struct BackendRt {
    pub name: String,
    pub addr: SocketAddr,
    /// Connections open to it now.
    pub active: AtomicUsize,
    /// Up or down as health checks (active and passive) decide.
    pub up: AtomicBool,
    /// Consecutive failures (passive) or check failures (active).
    pub fails: AtomicU32,
    /// Consecutive check successes while down.
    pub rises: AtomicU32,
    /// Connections sent to it, ever.
    pub total: AtomicU64,
    /// Connect attempts that failed.
    pub failures: AtomicU64,
    /// Last health-check result: 0 none yet, 1 ok, 2 failed.
    pub last_check: AtomicU32,
    /// When it went down (`health::now_ms`), 0 while up.
    pub down_at: AtomicU64,
    /// Active health checks that passed and that failed, ever.
    pub checks_ok: AtomicU64,
    pub checks_failed: AtomicU64,
}

impl BackendRt {
    fn new(b: &config::Backend) -> Self {
        BackendRt {
            name: b.name.clone(),
            addr: b.addr,
            active: AtomicUsize::new(0),
            up: AtomicBool::new(true),
            fails: AtomicU32::new(0),
            rises: AtomicU32::new(0),
            total: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_check: AtomicU32::new(0),
            down_at: AtomicU64::new(0),
            checks_ok: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}

/// Per-route state that outlives a configuration generation.
pub struct RouteShared {
    pub stats: Stats,
    /// Client connections open on this route, all workers together.
    pub active: AtomicUsize,
    /// Per client IP counts, only kept when `max_connections_per_ip` > 0.
    pub per_ip: Mutex<HashMap<IpAddr, usize>>,
    rr: AtomicUsize,
}

impl RouteShared {
    pub fn new(workers: usize) -> Self {
        RouteShared {
            stats: Stats::new(workers),
            active: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            rr: AtomicUsize::new(0),
        }
    }
}

/// One route of one configuration generation.
pub struct RouteRt {
    pub cfg: config::Route,
    pub shared: Arc<RouteShared>,
    /// Empty for file routes.
    pub backends: Vec<Arc<BackendRt>>,
    /// File routes with `root`: the folder, opened O_PATH|O_DIRECTORY
    /// once per generation (`open_root`); requests resolve beneath it.
    pub root: Option<OwnedFd>,
    /// mmap routes: a transfer already logged that it had no lease (later
    /// ones are only counted and marked on their access line).
    pub lease_warned: AtomicBool,
    /// Unique for the life of the process (never reused, unlike a
    /// descriptor number): what the open-file cache files entries under,
    /// so an entry is only ever used by the route instance that opened it.
    pub id: u64,
}

/// Source of `RouteRt::id`.
static NEXT_ROUTE_ID: AtomicU64 = AtomicU64::new(1);

impl RouteRt {
    /// Build a route, reusing shared state and backend health from the
    /// previous generation's route of the same name.
    pub fn new(cfg: config::Route, workers: usize, prev: Option<&RouteRt>) -> Self {
        let shared = prev
            .map(|p| p.shared.clone())
            .unwrap_or_else(|| Arc::new(RouteShared::new(workers)));
        let backends = match &cfg.kind {
            RouteKind::Proxy(p) => p
                .backends
                .iter()
                .map(|b| {
                    prev.and_then(|pr| pr.backends.iter().find(|o| o.addr == b.addr))
                        .cloned()
                        .unwrap_or_else(|| Arc::new(BackendRt::new(b)))
                })
                .collect(),
            RouteKind::File(_) => Vec::new(),
        };
        RouteRt {
            cfg,
            shared,
            backends,
            root: None,
            lease_warned: AtomicBool::new(false),
            id: NEXT_ROUTE_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Open the folder of a `root` file route (no-op for other routes).
    /// Every request of this generation resolves beneath this descriptor,
    /// so a folder renamed or replaced later does not move the route.
    pub fn open_root(&mut self) -> Result<(), String> {
        if let RouteKind::File(config::FileRoute {
            source: config::FileSource::Root(dir),
            ..
        }) = &self.cfg.kind
        {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
                .open(dir)
                .map_err(|e| {
                    format!(
                        "route \"{}\": cannot open root {}: {e}",
                        self.cfg.name,
                        dir.display()
                    )
                })?;
            self.root = Some(OwnedFd::from(f));
        }
        Ok(())
    }

    pub fn file(&self) -> Option<&config::FileRoute> {
        match &self.cfg.kind {
            RouteKind::File(f) => Some(f),
            RouteKind::Proxy(_) => None,
        }
    }

    pub fn proxy(&self) -> Option<&config::ProxyRoute> {
        match &self.cfg.kind {
            RouteKind::Proxy(p) => Some(p),
            RouteKind::File(_) => None,
        }
    }

    /// The next backend to try for a client, in balance order, skipping
    /// backends that are down. `next` is the connection's position in that
    /// order (start at 0); it advances past the backend returned. `None`
    /// when every backend has been tried or is down.
    ///
    /// The first choice follows the balance mode; later attempts walk on
    /// from it, so one connection tries each backend at most once.
    pub fn pick(
        &self,
        client: IpAddr,
        first: &mut Option<usize>,
        next: &mut usize,
        rng: &mut u64,
    ) -> Option<usize> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        let start = *first.get_or_insert_with(|| self.first_choice(client, rng));
        while *next < n {
            let i = (start + *next) % n;
            *next += 1;
            if self.usable(i) {
                return Some(i);
            }
        }
        None
    }

    /// Up, or down only passively and due for another try.
    fn usable(&self, i: usize) -> bool {
        let b = &self.backends[i];
        if b.is_up() {
            return true;
        }
        match self.proxy() {
            Some(p) if !p.health.active => crate::health::maybe_retry(b, p.health.interval),
            _ => false,
        }
    }

    fn first_choice(&self, client: IpAddr, rng: &mut u64) -> usize {
        let n = self.backends.len();
        let balance = self
            .proxy()
            .map(|p| p.balance)
            .unwrap_or(Balance::RoundRobin);
        match balance {
            Balance::RoundRobin => {
                // Start from the next up backend after the counter so that a
                // down backend does not double its neighbour's share.
                let c = self.shared.rr.fetch_add(1, Ordering::Relaxed);
                self.nth_up(c)
            }
            Balance::LeastConnections => {
                let c = self.shared.rr.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| (c + i) % n)
                    .filter(|&i| self.backends[i].is_up())
                    .min_by_key(|&i| self.backends[i].active.load(Ordering::Relaxed))
                    .unwrap_or(c % n)
            }
            Balance::SourceHash => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                client.hash(&mut h);
                self.nth_up(h.finish() as usize)
            }
            Balance::Random => (xorshift(rng) % n as u64) as usize,
        }
    }
}

impl RouteRt {
    /// The `k`-th backend (modulo) among those up, or among all when none
    /// is up; no allocation, since it runs for every new connection.
    fn nth_up(&self, k: usize) -> usize {
        let n = self.backends.len();
        let up = self.backends.iter().filter(|b| b.is_up()).count();
        if up == 0 {
            return k % n;
        }
        let want = k % up;
        (0..n)
            .filter(|&i| self.backends[i].is_up())
            .nth(want)
            .unwrap_or(k % n)
    }
}

/// A small, fast PRNG for `balance = "random"` (no crypto needed).
pub fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}
