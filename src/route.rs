//! Routes at run time: the validated route settings plus the live state
//! every worker shares — backend health, connection counts, counters —
//! and the balancing that picks a backend for a new connection.
//!
//! A `RouteRt` is built by the main thread for each configuration
//! generation and shared (`Arc`) by all workers. Connections keep the
//! `RouteRt` they started with, so a reload never changes a connection
//! under its feet. State that must survive a reload (counters, health,
//! connection counts) lives in `RouteShared`/`BackendRt`, carried over by
//! route name and backend address (`Kept`), also across a reload that
//! dropped them while their connections live on.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::config::{self, Balance, RouteKind};
use crate::stats::{Histogram, Stats};

/// Live state of one backend, shared by all workers.
pub struct BackendRt {
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
    /// When it went down or, with passive health only, was last given a
    /// retry (`health::now_ms`); 0 while up.
    pub down_at: AtomicU64,
    /// Active health checks that passed and that failed, ever.
    pub checks_ok: AtomicU64,
    pub checks_failed: AtomicU64,
    /// How long successful connects to it took (one attempt each).
    pub connect_time: Histogram,
}

impl BackendRt {
    fn new(b: &config::Backend) -> Self {
        BackendRt {
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
            connect_time: Histogram::default(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Health as a new backend's (up, no streak, no check yet): for one a
    /// reload brings back after a gap in which nothing checked it.
    fn fresh_health(&self) {
        self.mark_up();
        self.last_check.store(0, Ordering::Relaxed);
    }
}

/// Per-route state that outlives a configuration generation.
pub struct RouteShared {
    pub stats: Stats,
    /// Client connections open on this route, all workers together.
    pub active: AtomicUsize,
    /// Per client IP counts, only kept when `max_connections_per_ip` > 0.
    pub per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Clients waiting for a backend below its `max_connections`, all
    /// workers together: a connection that ends while some wait frees a
    /// slot someone can take.
    pub waiting: AtomicUsize,
    rr: AtomicUsize,
}

impl RouteShared {
    pub fn new(workers: usize) -> Self {
        RouteShared {
            stats: Stats::new(workers),
            active: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            waiting: AtomicUsize::new(0),
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
    /// File routes with `root`: the folder as the generation was built,
    /// opened O_PATH|O_DIRECTORY (`open_root`); requests resolve beneath
    /// it, or beneath the folder the path names later (`file_conn::roots`).
    pub root: Option<Arc<OwnedFd>>,
    /// mmap routes: a transfer already logged that it had no lease (later
    /// ones are only counted and marked on their access line).
    pub lease_warned: AtomicBool,
    /// Unique for the life of the process (never reused, unlike a
    /// descriptor number): what the open-file cache files entries under,
    /// so an entry is only ever used by the route instance that opened it.
    pub id: u64,
    /// The primary backends, then the backups (empty for file routes).
    tiers: [Tier; 2],
}

/// Backends of one rank (primaries or backups) and their weighted order.
#[derive(Debug, Default)]
struct Tier {
    /// Backend indices, in file order.
    members: Vec<usize>,
    /// `members` in smooth weighted round-robin order: each appears as
    /// many times as its weight, spread out (weights 3 and 1 give
    /// a a b a, not a a a b).
    order: Vec<usize>,
    /// The members' weights divided by their greatest common divisor: how
    /// many times each appears in `order`.
    shares: Vec<u32>,
}

/// Work (order length × members) up to which a tier's order is nginx's
/// smooth weighted round-robin, step by step; above it (hundreds of
/// backends with uneven weights), stride scheduling builds an equally
/// spread order in O(length × log members), so a reload of a large
/// configuration does not stall the main thread for seconds.
const EXACT_WORK: u64 = 1 << 22;

impl Tier {
    fn new(members: Vec<usize>, weight: impl Fn(usize) -> u32) -> Tier {
        // Built once per generation. Weights are at most 256, so the order
        // stays short. Weights 100 and 200 are weights 1 and 2: divided
        // by their greatest common divisor, the order is as short as it
        // can be.
        let gcd = members.iter().fold(0, |g, &i| gcd(g, weight(i)));
        let shares: Vec<u32> = members.iter().map(|&i| weight(i) / gcd.max(1)).collect();
        let total: u64 = shares.iter().map(|&s| u64::from(s)).sum();
        let picks = if total * members.len() as u64 <= EXACT_WORK {
            smooth_order(&shares, total)
        } else {
            stride_order(&shares, total)
        };
        Tier {
            order: picks.into_iter().map(|k| members[k]).collect(),
            members,
            shares,
        }
    }
}

/// nginx's smooth weighted round-robin: each step every member gains its
/// share, the richest is picked and pays the total. Positions in `shares`.
fn smooth_order(shares: &[u32], total: u64) -> Vec<usize> {
    let w: Vec<i64> = shares.iter().map(|&s| i64::from(s)).collect();
    let total = total as i64;
    let mut current = vec![0i64; w.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&w) {
            *c += w;
        }
        let best = (0..w.len())
            .max_by_key(|&k| (current[k], std::cmp::Reverse(k)))
            .expect("a tier with weight has members");
        current[best] -= total;
        order.push(best);
    }
    order
}

/// Stride scheduling: a member with share `s` takes its `j`-th turn at
/// `(j + 1/2) / s` of the way through the order; turns are taken in that
/// order (ties by position). Positions in `shares`.
fn stride_order(shares: &[u32], total: u64) -> Vec<usize> {
    use std::cmp::{Ordering as By, Reverse};
    use std::collections::BinaryHeap;
    /// The turn `num / den` of member `k` (compared exactly, as fractions).
    #[derive(PartialEq, Eq)]
    struct Turn {
        num: u64,
        den: u64,
        k: usize,
    }
    impl Ord for Turn {
        fn cmp(&self, o: &Self) -> By {
            (self.num * o.den)
                .cmp(&(o.num * self.den))
                .then(self.k.cmp(&o.k))
        }
    }
    impl PartialOrd for Turn {
        fn partial_cmp(&self, o: &Self) -> Option<By> {
            Some(self.cmp(o))
        }
    }
    let turn = |k: usize, j: u64| Turn {
        num: 2 * j + 1,
        den: 2 * u64::from(shares[k]),
        k,
    };
    let mut heap: BinaryHeap<Reverse<Turn>> = (0..shares.len())
        .filter(|&k| shares[k] > 0)
        .map(|k| Reverse(turn(k, 0)))
        .collect();
    let mut taken = vec![0u64; shares.len()];
    let mut order = Vec::with_capacity(total as usize);
    while let Some(Reverse(t)) = heap.pop() {
        let k = t.k;
        order.push(k);
        taken[k] += 1;
        if taken[k] < u64::from(shares[k]) {
            heap.push(Reverse(turn(k, taken[k])));
        }
    }
    order
}

/// A hash of (client, backend) that is the same on every build and
/// machine, so that every sluice in a fleet, before and after an upgrade,
/// sends a client to the same backend: FNV-1a over the addresses as
/// explicit bytes (IPv4 as IPv4-mapped IPv6, the port big-endian), then
/// splitmix64's finalizer to spread FNV's weak low bits. std's
/// `DefaultHasher` promises no such stability.
fn pair_hash(client: IpAddr, backend: SocketAddr) -> u64 {
    let v6 = |ip: IpAddr| match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = v6(client)
        .into_iter()
        .chain(v6(backend.ip()))
        .chain(backend.port().to_be_bytes());
    for b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Where one connection is in its route's backend order (`RouteRt::pick`).
#[derive(Debug, Default)]
pub struct Attempts {
    /// The first choice, once made.
    first: Option<usize>,
    /// The first choice is a down backend this connection claimed a retry of.
    retry: bool,
    /// How far along the order the connection is.
    next: usize,
    /// A backend that was up had no free slot (`max_connections`).
    pub full: bool,
}

/// Source of `RouteRt::id`.
static NEXT_ROUTE_ID: AtomicU64 = AtomicU64::new(1);

/// The live state of every route (by name) and backend (by route name and
/// address) that some generation still holds: the running one, or an
/// older one that connections still use. A reload takes up the state of a
/// route or backend it keeps, and of one an earlier reload dropped and
/// this one brings back while connections of the old ones live, so the
/// counts that `max_connections` are held to stay whole. Weak: state that
/// nothing holds any more is gone, and comes back fresh.
///
/// A backend brought back from before the running generation has not
/// been checked since it was dropped: it comes back with its counts but
/// with fresh health (up), as a new backend does.
#[derive(Default)]
pub struct Kept {
    routes: HashMap<String, Weak<RouteShared>>,
    /// With the `remember` call that last saw each one.
    backends: HashMap<(String, SocketAddr), (Weak<BackendRt>, u64)>,
    /// How many times `remember` ran.
    round: u64,
}

impl Kept {
    /// Note the state of these routes (the running generation's), and
    /// forget state nothing holds any more.
    pub fn remember(&mut self, routes: &[Arc<RouteRt>]) {
        self.round += 1;
        self.routes.retain(|_, w| w.strong_count() > 0);
        self.backends.retain(|_, (w, _)| w.strong_count() > 0);
        for r in routes {
            let name = &r.cfg.name;
            self.routes.insert(name.clone(), Arc::downgrade(&r.shared));
            for b in &r.backends {
                self.backends
                    .insert((name.clone(), b.addr), (Arc::downgrade(b), self.round));
            }
        }
    }

    fn route(&self, name: &str) -> Option<Arc<RouteShared>> {
        self.routes.get(name)?.upgrade()
    }

    fn backend(&self, route: &str, addr: SocketAddr) -> Option<Arc<BackendRt>> {
        let (w, seen) = self.backends.get(&(route.to_string(), addr))?;
        let b = w.upgrade()?;
        if *seen != self.round {
            b.fresh_health();
        }
        Some(b)
    }
}

impl RouteRt {
    /// Build a route, taking up the shared state, backend health and
    /// connection counts that `kept` has for its name and addresses.
    pub fn new(cfg: config::Route, workers: usize, kept: &Kept) -> Self {
        let shared = kept
            .route(&cfg.name)
            .unwrap_or_else(|| Arc::new(RouteShared::new(workers)));
        let backends = match &cfg.kind {
            RouteKind::Proxy(p) => p
                .backends
                .iter()
                .map(|b| {
                    kept.backend(&cfg.name, b.addr)
                        .unwrap_or_else(|| Arc::new(BackendRt::new(b)))
                })
                .collect(),
            RouteKind::File(_) => Vec::new(),
        };
        let tiers = match &cfg.kind {
            RouteKind::Proxy(p) => {
                let rank = |backup: bool| {
                    let members = (0..p.backends.len())
                        .filter(|&i| p.backends[i].backup == backup)
                        .collect();
                    Tier::new(members, |i| p.backends[i].weight)
                };
                [rank(false), rank(true)]
            }
            RouteKind::File(_) => Default::default(),
        };
        RouteRt {
            cfg,
            shared,
            backends,
            root: None,
            lease_warned: AtomicBool::new(false),
            id: NEXT_ROUTE_ID.fetch_add(1, Ordering::Relaxed),
            tiers,
        }
    }

    /// Open the folder of a `root` file route (no-op for other routes):
    /// a reload whose root cannot be opened fails as a whole.
    pub fn open_root(&mut self) -> Result<(), String> {
        if let RouteKind::File(config::FileRoute {
            source: config::FileSource::Root(dir),
            ..
        }) = &self.cfg.kind
        {
            let fd = open_dir(dir).map_err(|e| {
                format!(
                    "route \"{}\": cannot open root {}: {e}",
                    self.cfg.name,
                    dir.display()
                )
            })?;
            self.root = Some(Arc::new(fd));
        }
        Ok(())
    }

    pub fn file(&self) -> Option<&config::FileRoute> {
        match &self.cfg.kind {
            RouteKind::File(f) => Some(f),
            RouteKind::Proxy(_) => None,
        }
    }

    /// The name of backend `i` as this generation's configuration gives
    /// it (shared state is kept by address, so a rename must come from
    /// here).
    pub fn backend_name(&self, i: usize) -> &str {
        self.proxy().map_or("", |p| p.backends[i].name.as_str())
    }

    pub fn proxy(&self) -> Option<&config::ProxyRoute> {
        match &self.cfg.kind {
            RouteKind::Proxy(p) => Some(p),
            RouteKind::File(_) => None,
        }
    }

    /// Backend `i`'s `max_connections` (0: no limit).
    fn max_connections(&self, i: usize) -> usize {
        self.proxy().map_or(0, |p| p.backends[i].max_connections)
    }

    /// Whether backend `i` has a free slot (no limit, or fewer connections
    /// than its `max_connections`).
    fn has_room(&self, i: usize) -> bool {
        let max = self.max_connections(i);
        max == 0 || self.backends[i].active.load(Ordering::Relaxed) < max
    }

    /// Take one of backend `i`'s slots for a connection about to be made;
    /// false: it is at its `max_connections`. The slot is held from before
    /// the connect until the connection ends (`release_slot`), so workers
    /// racing for the last slot cannot both get it.
    pub fn take_slot(&self, i: usize) -> bool {
        let max = self.max_connections(i);
        let active = &self.backends[i].active;
        if max == 0 {
            active.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        // SeqCst, like `release_slot` and the route's `waiting` count: a
        // client that announces its wait and then looks again, and a
        // connection that gives back a slot and then looks for waiting
        // clients, cannot both miss each other.
        active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Give back a slot `take_slot` took.
    pub fn release_slot(&self, i: usize) {
        self.backends[i].active.fetch_sub(1, Ordering::SeqCst);
    }

    /// Backend `i` is a backup while a primary is up: it does not take
    /// the clients of primaries that are merely full.
    pub fn backup_behind_primaries(&self, i: usize) -> bool {
        self.proxy().is_some_and(|p| p.backends[i].backup)
            && self.tiers[0]
                .members
                .iter()
                .any(|&m| self.backends[m].is_up())
    }

    /// The next backend to try for a client, in balance order, skipping
    /// backends that are down. `at` is the connection's place in that
    /// order (start from `Attempts::default()`). `None` when every backend
    /// has been tried or is down.
    ///
    /// The first choice follows the balance mode and the weights, among
    /// the primary backends while one of them is up, else among the
    /// backups; without active checks it may instead be a down backend
    /// whose retry this connection claimed (see `health::claim_retry`).
    /// Later attempts walk on from it through its rank, then through the
    /// other rank, so one connection tries each backend at most once and a
    /// backup only after every primary.
    pub fn pick(&self, client: IpAddr, at: &mut Attempts, rng: &mut u64) -> Option<usize> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        let start = match at.first {
            Some(start) => start,
            None => {
                let (start, retry) = self.first_choice(client, rng);
                at.first = Some(start);
                at.retry = retry;
                start
            }
        };
        while at.next < n {
            let j = at.next;
            at.next += 1;
            let i = self.nth_after(start, j);
            if self.backends[i].is_up() || (j == 0 && at.retry) {
                return Some(i);
            }
        }
        None
    }

    /// The `j`-th backend of the failover order that starts at `start`:
    /// `start`'s rank from `start` on, then the other rank in file order.
    fn nth_after(&self, start: usize, j: usize) -> usize {
        if j == 0 {
            return start; // every connection's first try: no search
        }
        let (own, other) = if self.tiers[0].members.contains(&start) {
            (&self.tiers[0].members, &self.tiers[1].members)
        } else {
            (&self.tiers[1].members, &self.tiers[0].members)
        };
        if j < own.len() {
            let pos = own.iter().position(|&i| i == start).unwrap_or(0);
            own[(pos + j) % own.len()]
        } else {
            other[j - own.len()]
        }
    }

    /// The first backend to try, and whether it is a claimed retry of a
    /// down backend.
    fn first_choice(&self, client: IpAddr, rng: &mut u64) -> (usize, bool) {
        let Some(p) = self.proxy() else {
            return (0, false);
        };
        let up = |t: &Tier| t.members.iter().any(|&i| self.backends[i].is_up());
        let primaries_up = up(&self.tiers[0]);
        if !p.health.active {
            // A down primary due for another try takes this client; a down
            // backup only matters while no primary is up.
            let due = if primaries_up { 1 } else { 2 };
            for t in &self.tiers[..due] {
                for &i in &t.members {
                    if crate::health::claim_retry(self, i, p.health.interval) {
                        return (i, true);
                    }
                }
            }
        }
        // The primaries while one is up, else the backups; with every
        // backend down, nothing is up to pick and `pick` gives up.
        let tier = if primaries_up || !up(&self.tiers[1]) {
            &self.tiers[0]
        } else {
            &self.tiers[1]
        };
        let first = match p.balance {
            Balance::RoundRobin => {
                let c = self.shared.rr.fetch_add(1, Ordering::Relaxed);
                self.weighted_nth(tier, c)
            }
            Balance::LeastConnections => {
                // Fewest connections per unit of weight; the rotating start
                // spreads ties.
                let c = self.shared.rr.fetch_add(1, Ordering::Relaxed);
                let m = &tier.members;
                let weight = |i: usize| u64::from(p.backends[i].weight);
                let load = |i: usize| self.backends[i].active.load(Ordering::Relaxed) as u64;
                (0..m.len())
                    .map(|k| m[(c + k) % m.len()])
                    .filter(|&i| self.backends[i].is_up() && self.has_room(i))
                    .reduce(|a, b| {
                        if load(b) * weight(a) < load(a) * weight(b) {
                            b
                        } else {
                            a
                        }
                    })
                    .unwrap_or(m[c % m.len()])
            }
            Balance::SourceHash => self.rendezvous(tier, client),
            Balance::Random => self.weighted_nth(tier, xorshift(rng) as usize),
        };
        (first, false)
    }
}

impl RouteRt {
    /// Weighted rendezvous (highest random weight) hashing, for
    /// `source-hash`: each backend up in the tier scores the client by a
    /// hash of the pair, the best score wins. A backend that goes down or
    /// comes back moves only its own clients, where `hash mod n` would move
    /// almost everyone's; the hash is of the backend's address, so a reload
    /// that reorders the list moves nobody. Weights scale the scores (the
    /// logarithmic method): a backend of weight 3 wins three times as many
    /// clients as one of weight 1. A backend at its `max_connections`
    /// scores nobody: its new clients go to their runner-up (each to its
    /// own, so its share spreads over all the others).
    fn rendezvous(&self, tier: &Tier, client: IpAddr) -> usize {
        // Among the backends that can take the client; failing that, the
        // ones that are up (all full: the client waits); failing that, all.
        let open = |i: usize| self.backends[i].is_up() && self.has_room(i);
        let up = |i: usize| self.backends[i].is_up();
        let fits: &dyn Fn(usize) -> bool = if tier.members.iter().any(|&i| open(i)) {
            &open
        } else if tier.members.iter().any(|&i| up(i)) {
            &up
        } else {
            &|_| true
        };
        let mut best = (f64::NEG_INFINITY, tier.members[0]);
        for (&i, &share) in tier.members.iter().zip(&tier.shares) {
            let b = &self.backends[i];
            if !fits(i) {
                continue;
            }
            // A uniform draw in (0, 1): 53 bits of the hash, never 0.
            let u = ((pair_hash(client, b.addr) >> 11) | 1) as f64 / (1u64 << 53) as f64;
            let score = -f64::from(share) / u.ln();
            if score > best.0 {
                best = (score, i);
            }
        }
        best.1
    }

    /// The `k`-th (modulo) entry of the tier's weighted order, counting
    /// only backends that are up and below their `max_connections` (all of
    /// them when none is), so a backend that is down or full hands its
    /// share to all the others, not to its neighbour. No allocation: it
    /// runs for every new connection, and only walks the order when some
    /// backend is down or full.
    fn weighted_nth(&self, tier: &Tier, k: usize) -> usize {
        let order = &tier.order;
        let up = |i: usize| self.backends[i].is_up() && self.has_room(i);
        let up_weight: usize = tier
            .members
            .iter()
            .zip(&tier.shares)
            .filter(|&(&i, _)| up(i))
            .map(|(_, &s)| s as usize)
            .sum();
        if up_weight == order.len() || up_weight == 0 {
            return order[k % order.len()];
        }
        let want = k % up_weight;
        order
            .iter()
            .copied()
            .filter(|&i| up(i))
            .nth(want)
            .unwrap_or(order[k % order.len()])
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

/// Open a folder to resolve paths beneath (O_PATH: no read permission
/// needed on the folder itself, nothing read through this descriptor).
pub fn open_dir(dir: &std::path::Path) -> std::io::Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map(OwnedFd::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proxy route over `backends` (a TOML list), one worker.
    fn route(backends: &str, extra: &str) -> RouteRt {
        let text = format!(
            "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:1\"\nbackends = {backends}\n{extra}"
        );
        let cfg = config::parse(&text, std::path::Path::new("/tmp/t.toml")).unwrap();
        RouteRt::new(cfg.routes[0].clone(), 1, &Kept::default())
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// The first choice of `n` new connections.
    fn firsts(r: &RouteRt, n: usize) -> Vec<usize> {
        let mut rng = 1u64;
        (0..n)
            .map(|_| r.pick(IP, &mut Attempts::default(), &mut rng).unwrap())
            .collect()
    }

    /// Every backend one connection would try, in order.
    fn order(r: &RouteRt) -> Vec<usize> {
        let (mut at, mut rng) = (Attempts::default(), 1u64);
        std::iter::from_fn(|| r.pick(IP, &mut at, &mut rng)).collect()
    }

    /// `n` client addresses spread over 10.0.0.0/8.
    fn spread_clients(n: u32) -> Vec<IpAddr> {
        (0..n)
            .map(|k| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + k * 7919)))
            .collect()
    }

    fn share(v: &[usize], i: usize) -> usize {
        v.iter().filter(|&&x| x == i).count()
    }

    /// Mark backend `i` down as passive health does, long enough ago to be
    /// due for a retry (`due`) or just now.
    fn down(r: &RouteRt, i: usize, due: bool) {
        let b = &r.backends[i];
        b.up.store(false, Ordering::Relaxed);
        let interval = r.proxy().unwrap().health.interval.as_millis() as u64;
        while crate::health::now_ms() <= 1 + interval {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let at = if due { 1 } else { crate::health::now_ms() };
        b.down_at.store(at, Ordering::Relaxed);
    }

    #[test]
    fn smooth_weighted_order_spreads_each_backend() {
        let t = Tier::new(vec![0, 1, 2], |i| [5, 1, 1][i]);
        assert_eq!(t.order, [0, 0, 1, 0, 2, 0, 0]);
        let t = Tier::new(vec![3, 7], |_| 2);
        assert_eq!((t.order, t.shares), (vec![3, 7], vec![1, 1]));
        // Divided by the common divisor: 100 and 200 are 1 and 2.
        let t = Tier::new(vec![0, 1], |i| [100, 200][i]);
        assert_eq!(t.order, [1, 0, 1]);
        assert!(Tier::new(vec![], |_| 1).order.is_empty());
    }

    #[test]
    fn a_large_tier_gets_an_equally_spread_order() {
        // 2,000 backends with weights 1 to 256: far above EXACT_WORK.
        let n = 2000;
        let weight = |i: usize| (i % 256) as u32 + 1;
        let t = Tier::new((0..n).collect(), weight);
        let total: u64 = (0..n).map(|i| u64::from(weight(i))).sum();
        assert!(total * n as u64 > EXACT_WORK);
        assert_eq!(t.order.len() as u64, total);
        let mut seen = vec![Vec::new(); n];
        for (pos, &b) in t.order.iter().enumerate() {
            seen[b].push(pos as u64);
        }
        for (b, at) in seen.iter().enumerate() {
            let share = u64::from(weight(b));
            assert_eq!(at.len() as u64, share, "backend {b}");
            // Each turn lands near its ideal place, (j + 1/2) / share of
            // the way (give or take the turns that tie with it).
            for (j, &pos) in at.iter().enumerate() {
                let ideal = (2 * j as u64 + 1) * total / (2 * share);
                assert!(
                    pos.abs_diff(ideal) <= n as u64,
                    "backend {b} turn {j}: {pos} vs {ideal}"
                );
            }
        }
        // The same small tiers as before keep nginx's exact order.
        assert_eq!(Tier::new(vec![0, 1], |i| [3, 1][i]).order, [0, 0, 1, 0]);
        assert_eq!(stride_order(&[3, 1], 4), [0, 0, 1, 0]);
    }

    #[test]
    fn round_robin_follows_weights_and_skips_down_backends_fairly() {
        let r = route(
            r#"["127.0.0.1:2", { address = "127.0.0.1:3", weight = 3 }, "127.0.0.1:4"]"#,
            "[route.health]\n",
        );
        let got = firsts(&r, 50);
        assert_eq!(
            (share(&got, 0), share(&got, 1), share(&got, 2)),
            (10, 30, 10)
        );
        // The middle backend down: its share goes to both others evenly,
        // not to its neighbour in the order.
        r.backends[1].up.store(false, Ordering::Relaxed);
        let got = firsts(&r, 40);
        assert_eq!(
            (share(&got, 0), share(&got, 1), share(&got, 2)),
            (20, 0, 20)
        );
    }

    #[test]
    fn backups_only_when_no_primary_is_up_and_last_in_failover() {
        let r = route(
            r#"["127.0.0.1:2", { address = "127.0.0.1:3", backup = true }, "127.0.0.1:4"]"#,
            "[route.health]\ninterval = \"1s\"\n",
        );
        assert!(firsts(&r, 10).iter().all(|&i| i != 1));
        let o = order(&r);
        assert_eq!((o.len(), o[2]), (3, 1), "the backup last: {o:?}");
        r.backends[0].up.store(false, Ordering::Relaxed);
        r.backends[2].up.store(false, Ordering::Relaxed);
        assert!(firsts(&r, 5).iter().all(|&i| i == 1));
        // Nothing up at all: nothing to try (active checks decide).
        r.backends[1].up.store(false, Ordering::Relaxed);
        assert_eq!(order(&r), []);
    }

    #[test]
    fn a_backend_holds_at_most_its_max_connections_slots() {
        let r = route(
            r#"[{ address = "127.0.0.1:2", max_connections = 2 }, "127.0.0.1:3"]"#,
            "",
        );
        assert!(r.take_slot(0) && r.take_slot(0));
        assert!(!r.take_slot(0), "a third slot of two");
        assert_eq!(r.backends[0].active.load(Ordering::Relaxed), 2);
        r.release_slot(0);
        assert!(r.take_slot(0), "a released slot is free again");
        // No limit: any number.
        assert!((0..1000).all(|_| r.take_slot(1)));
        // Racing workers never take more slots than there are.
        let r = std::sync::Arc::new(route(
            r#"[{ address = "127.0.0.1:2", max_connections = 7 }]"#,
            "",
        ));
        let taken: usize = (0..4)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || (0..1000).filter(|_| r.take_slot(0)).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(taken, 7);
    }

    #[test]
    fn a_full_backend_hands_its_share_to_the_others() {
        for balance in ["round-robin", "random", "least-connections"] {
            let r = route(
                r#"[{ address = "127.0.0.1:2", max_connections = 1 }, "127.0.0.1:3", "127.0.0.1:4"]"#,
                &format!("balance = \"{balance}\"\n"),
            );
            assert!(r.take_slot(0));
            let got = firsts(&r, 60);
            assert_eq!(share(&got, 0), 0, "{balance}: {got:?}");
            assert!(
                share(&got, 1) >= 20 && share(&got, 2) >= 20,
                "{balance}: {got:?}"
            );
            r.release_slot(0);
            assert!(share(&firsts(&r, 60), 0) >= 10, "{balance}: back in");
        }
    }

    #[test]
    fn source_hash_sends_a_full_backends_clients_to_their_runner_up() {
        let r = route(
            r#"[{ address = "127.0.0.1:2", max_connections = 1 }, "127.0.0.1:3", "127.0.0.1:4"]"#,
            "balance = \"source-hash\"\n",
        );
        let clients = spread_clients(300);
        let mut rng = 1u64;
        let mut pick = |ip| r.pick(ip, &mut Attempts::default(), &mut rng).unwrap();
        let before: Vec<usize> = clients.iter().map(|&ip| pick(ip)).collect();
        assert!(r.take_slot(0));
        let full: Vec<usize> = clients.iter().map(|&ip| pick(ip)).collect();
        let mut moved = [0; 3];
        for (b, f) in before.iter().zip(&full) {
            if b != f {
                assert_eq!(*b, 0, "only the full backend's clients move");
                moved[*f] += 1;
            }
        }
        assert_eq!(moved[0], 0);
        assert_eq!(moved[1] + moved[2], share(&before, 0));
        assert!(moved[1] > 20 && moved[2] > 20, "spread: {moved:?}");
        r.release_slot(0);
        let after: Vec<usize> = clients.iter().map(|&ip| pick(ip)).collect();
        assert_eq!(after, before, "back where they were");
    }

    #[test]
    fn least_connections_divides_by_weight() {
        let r = route(
            r#"[{ address = "127.0.0.1:2", weight = 2 }, "127.0.0.1:3"]"#,
            "balance = \"least-connections\"\n",
        );
        for _ in 0..30 {
            let i = firsts(&r, 1)[0];
            r.backends[i].active.fetch_add(1, Ordering::Relaxed);
        }
        let active: Vec<usize> = r
            .backends
            .iter()
            .map(|b| b.active.load(Ordering::Relaxed))
            .collect();
        assert_eq!(active, [20, 10]);
    }

    #[test]
    fn source_hash_moves_only_the_clients_of_a_backend_that_goes_down() {
        let r = route(
            r#"["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]"#,
            "balance = \"source-hash\"\n[route.health]\n",
        );
        let clients = spread_clients(600);
        let mut rng = 1u64;
        let mut pick = |ip| r.pick(ip, &mut Attempts::default(), &mut rng).unwrap();
        let before: Vec<usize> = clients.iter().map(|&ip| pick(ip)).collect();
        // Sticky, and spread over all three.
        assert_eq!(
            before,
            clients.iter().map(|&ip| pick(ip)).collect::<Vec<_>>()
        );
        for i in 0..3 {
            assert!(
                (150..250).contains(&share(&before, i)),
                "{}",
                share(&before, i)
            );
        }
        r.backends[1].up.store(false, Ordering::Relaxed);
        let after: Vec<usize> = clients.iter().map(|&ip| pick(ip)).collect();
        for (k, (&b, &a)) in before.iter().zip(&after).enumerate() {
            if b == 1 {
                assert_ne!(a, 1, "client {k} left the down backend");
            } else {
                assert_eq!(a, b, "client {k} stayed where it was");
            }
        }
        // Back up: everyone where they were.
        r.backends[1].up.store(true, Ordering::Relaxed);
        assert_eq!(
            before,
            clients.iter().map(|&ip| pick(ip)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn source_hash_is_the_same_on_every_build() {
        // Pinned values: a change here moves every sticky client of every
        // deployment, so it must be deliberate.
        let c4 = IpAddr::from([192, 0, 2, 7]);
        let c6: IpAddr = "2001:db8::7".parse().unwrap();
        let b: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        assert_eq!(pair_hash(c4, b), PINNED[0]);
        assert_eq!(pair_hash(c6, b), PINNED[1]);
        // An IPv4 client and its IPv4-mapped form are one client.
        assert_eq!(pair_hash("::ffff:192.0.2.7".parse().unwrap(), b), PINNED[0]);
        assert_ne!(pair_hash(c4, "10.0.0.1:8081".parse().unwrap()), PINNED[0]);
    }

    const PINNED: [u64; 2] = [7_639_601_215_532_668_450, 805_049_832_141_050_339];

    #[test]
    fn source_hash_follows_weights() {
        let r = route(
            r#"[{ address = "127.0.0.1:2", weight = 3 }, "127.0.0.1:3"]"#,
            "balance = \"source-hash\"\n",
        );
        let mut rng = 1u64;
        let got: Vec<usize> = (0..4000u32)
            .map(|k| {
                let ip = IpAddr::from(std::net::Ipv4Addr::from(0xc000_0000 + k * 104_729));
                r.pick(ip, &mut Attempts::default(), &mut rng).unwrap()
            })
            .collect();
        let a = share(&got, 0);
        assert!((2800..3200).contains(&a), "weight 3 of 4 won {a} of 4000");
    }

    #[test]
    fn passive_retry_is_one_connection_per_interval_for_any_backend() {
        // No [route.health]: passive only (the 2 s retry interval of the
        // default, which `down` waits out, if need be, to be "long ago").
        let r = route(
            r#"["127.0.0.1:2", "127.0.0.1:3", { address = "127.0.0.1:4", backup = true }]"#,
            "",
        );
        // Not due yet: the down backend gets nothing.
        down(&r, 1, false);
        assert!(firsts(&r, 6).iter().all(|&i| i == 0));
        // Due, although listed after an up backend: exactly one connection
        // tries it, the next ones do not, and it stays down meanwhile.
        down(&r, 1, true);
        let got = firsts(&r, 6);
        assert_eq!(got[0], 1, "{got:?}");
        assert!(got[1..].iter().all(|&i| i == 0), "{got:?}");
        assert!(!r.backends[1].is_up());
        // That connection fails over to the up primary, then the backup.
        down(&r, 1, true);
        assert_eq!(order(&r), [1, 0, 2]);
        // Its connect succeeds: up again.
        crate::health::passive_success(&r, 1);
        assert!(r.backends[1].is_up());
        // A down backup is retried only while no primary is up.
        down(&r, 2, true);
        assert!(!firsts(&r, 4).contains(&2));
        down(&r, 0, false);
        down(&r, 1, false);
        assert_eq!(firsts(&r, 1), [2]);
    }
}
