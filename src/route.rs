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
}

impl Tier {
    fn new(members: Vec<usize>, weight: impl Fn(usize) -> u32) -> Tier {
        // nginx's smooth weighted round-robin, run once per generation: each
        // step every member gains its weight, the richest is picked and pays
        // the total. Weights are at most 256, so the order stays short.
        let total: i64 = members.iter().map(|&i| i64::from(weight(i))).sum();
        let mut current = vec![0i64; members.len()];
        let mut order = Vec::with_capacity(total as usize);
        for _ in 0..total {
            for (k, &i) in members.iter().enumerate() {
                current[k] += i64::from(weight(i));
            }
            let best = (0..members.len())
                .max_by_key(|&k| (current[k], std::cmp::Reverse(k)))
                .expect("a tier with weight has members");
            current[best] -= total;
            order.push(members[best]);
        }
        Tier { members, order }
    }
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
    /// The first choice follows the balance mode and the weights, among
    /// the primary backends while one of them is usable, else among the
    /// backups. Later attempts walk on from it through its rank, then
    /// through the other rank, so one connection tries each backend at
    /// most once and a backup only after every primary.
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
            let i = self.nth_after(start, *next);
            *next += 1;
            if self.usable(i) {
                return Some(i);
            }
        }
        None
    }

    /// The `j`-th backend of the failover order that starts at `start`:
    /// `start`'s rank from `start` on, then the other rank in file order.
    fn nth_after(&self, start: usize, j: usize) -> usize {
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
        let balance = self
            .proxy()
            .map(|p| p.balance)
            .unwrap_or(Balance::RoundRobin);
        // The primaries while one is usable (up, or passively down and due
        // for another try, which this brings back), else the backups; with
        // every backend down, the primaries anyway (the connect decides).
        let tier = self
            .tiers
            .iter()
            .find(|t| t.members.iter().any(|&i| self.usable(i)))
            .unwrap_or(&self.tiers[0]);
        match balance {
            Balance::RoundRobin => {
                let c = self.shared.rr.fetch_add(1, Ordering::Relaxed);
                self.weighted_nth(tier, c)
            }
            Balance::LeastConnections => {
                // Fewest connections per unit of weight; the rotating start
                // spreads ties.
                let c = self.shared.rr.fetch_add(1, Ordering::Relaxed);
                let m = &tier.members;
                let weight = |i: usize| u64::from(self.weight(i));
                let load = |i: usize| self.backends[i].active.load(Ordering::Relaxed) as u64;
                (0..m.len())
                    .map(|k| m[(c + k) % m.len()])
                    .filter(|&i| self.backends[i].is_up())
                    .reduce(|a, b| {
                        if load(b) * weight(a) < load(a) * weight(b) {
                            b
                        } else {
                            a
                        }
                    })
                    .unwrap_or(m[c % m.len()])
            }
            Balance::SourceHash => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                client.hash(&mut h);
                self.weighted_nth(tier, h.finish() as usize)
            }
            Balance::Random => self.weighted_nth(tier, xorshift(rng) as usize),
        }
    }

    fn weight(&self, i: usize) -> u32 {
        self.proxy().map_or(1, |p| p.backends[i].weight)
    }
}

impl RouteRt {
    /// The `k`-th (modulo) entry of the tier's weighted order, counting
    /// only backends that are up (all of them when none is), so a backend
    /// that is down hands its share to all the others, not to its
    /// neighbour. No allocation: it runs for every new connection, and
    /// only walks the order when some backend is down.
    fn weighted_nth(&self, tier: &Tier, k: usize) -> usize {
        let order = &tier.order;
        let up = |i: usize| self.backends[i].is_up();
        let up_weight: usize = tier
            .members
            .iter()
            .filter(|&&i| up(i))
            .map(|&i| self.weight(i) as usize)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A proxy route over `backends` (a TOML list), one worker.
    fn route(backends: &str, extra: &str) -> RouteRt {
        let text = format!(
            "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:1\"\nbackends = {backends}\n{extra}"
        );
        let cfg = config::parse(&text, std::path::Path::new("/tmp/t.toml")).unwrap();
        RouteRt::new(cfg.routes[0].clone(), 1, None)
    }

    fn firsts(r: &RouteRt, n: usize) -> Vec<usize> {
        let mut rng = 1u64;
        (0..n)
            .map(|_| {
                let (mut first, mut next) = (None, 0);
                r.pick(
                    IpAddr::from([127, 0, 0, 1]),
                    &mut first,
                    &mut next,
                    &mut rng,
                )
                .unwrap()
            })
            .collect()
    }

    #[test]
    fn smooth_weighted_order_spreads_each_backend() {
        let t = Tier::new(vec![0, 1, 2], |i| [5, 1, 1][i]);
        assert_eq!(t.order, [0, 0, 1, 0, 2, 0, 0]);
        let t = Tier::new(vec![3, 7], |_| 2);
        assert_eq!(t.order, [3, 7, 3, 7]);
        assert!(Tier::new(vec![], |_| 1).order.is_empty());
    }

    #[test]
    fn round_robin_follows_weights_and_skips_down_backends_fairly() {
        let r = route(
            r#"["127.0.0.1:2", { address = "127.0.0.1:3", weight = 3 }, "127.0.0.1:4"]"#,
            "",
        );
        let got = firsts(&r, 50);
        let share = |v: &[usize], i| v.iter().filter(|&&x| x == i).count();
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
        // A connection that fails over walks the primaries first.
        let (mut first, mut next, mut rng) = (None, 0, 1u64);
        let ip = IpAddr::from([127, 0, 0, 1]);
        let order: Vec<usize> =
            std::iter::from_fn(|| r.pick(ip, &mut first, &mut next, &mut rng)).collect();
        assert_eq!(order.len(), 3);
        assert_eq!(order[2], 1, "the backup last: {order:?}");
        r.backends[0].up.store(false, Ordering::Relaxed);
        r.backends[2].up.store(false, Ordering::Relaxed);
        assert!(firsts(&r, 5).iter().all(|&i| i == 1));
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
}
