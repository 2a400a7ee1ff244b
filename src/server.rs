//! The main thread: binds listeners, starts workers, and runs the process
//! life cycle — signals, live reload, graceful stop, systemd notification.
//!
//! The main thread never touches a client byte. It owns the listening
//! sockets (keyed by address, so a reload keeps every socket whose address
//! did not change), builds a `Generation` per configuration, and tells the
//! workers about it over a channel. SIGHUP reloads (the file is read on a
//! thread of its own, `Loader`, then applied here), SIGTERM/SIGINT drain
//! (a second one closes what is left at once, with resets, and exits). A
//! reload that changes `workers` starts workers, or retires the extra ones
//! as a stop would (`resize_workers`).
//!
//! Its poll also serves the admin listener (`admin`) and runs the active
//! health checks (`health::Checker`), both non-blocking and bounded, so
//! neither can stall a worker. Under systemd socket activation the
//! listening sockets come from systemd (`sys::activation`), matched to
//! routes by `FileDescriptorName=` and address.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use socket2::{Domain, Socket, Type};

use crate::admin::{self, Admin};
use crate::config::{self, Config};
use crate::health::Checker;
use crate::keepalive;
use crate::pipe_pool::PipeBudget;
use crate::route::{Kept, RouteRt};
use crate::worker::{self, Cmd, Generation, Handoff, Shared, SharedListener, Worker};

const SIGNALS: Token = Token(0);
const ADMIN: Token = Token(1);
/// Admin connections use tokens from here up.
const ADMIN_CONNS: usize = 1 << 32;
/// Health-check probes use tokens from here up.
const PROBES: usize = 1 << 48;

/// Process-wide counters the main thread keeps.
#[derive(Default)]
pub struct ProcessStats {
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
}

/// A reload reads its file on a thread of its own: resolving a backend's
/// host name can take seconds, and the main thread meanwhile answers the
/// admin endpoint, runs health checks and hears stop signals. It looks
/// for the result every `LOADER_TICK` (no waker: a reload is rare, and
/// the main poll's registrations stay as they were).
#[derive(Default)]
struct Loader {
    /// The reload under way, if any: its result arrives here.
    pending: Option<mpsc::Receiver<Result<Config, String>>>,
    /// Another SIGHUP came meanwhile: reload again once this one is done
    /// (the file may have changed after it was read).
    again: bool,
}

const LOADER_TICK: Duration = Duration::from_millis(10);
/// How often the main thread looks whether retiring workers are done.
const RETIRE_TICK: Duration = Duration::from_millis(500);

struct WorkerHandle {
    /// Unique for the life of the process (a reload that adds workers
    /// gives them new ids): log lines, access lines, and the stats slot
    /// (`id % slots`).
    id: usize,
    tx: Sender<Cmd>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

pub struct Server {
    path: PathBuf,
    cfg: Config,
    shared: Arc<Shared>,
    generation: Arc<Generation>,
    /// Every listening socket group, by address; survives reloads.
    sockets: HashMap<SocketAddr, Group>,
    /// Listening addresses whose sockets sluice set keepalive on
    /// (`tcp_keepalive`), with what they had before: the only ones it
    /// changes again, to give that back when a reload drops the key.
    keepalive: HashMap<SocketAddr, keepalive::Untouched>,
    /// Sockets systemd passed, by route name and address. Kept for the
    /// life of the process: systemd holds them open anyway, so a route a
    /// reload removes and a later one brings back gets the same socket.
    activated: Activated,
    /// Route and backend state of past generations that connections may
    /// still hold (`route::Kept`).
    kept: Kept,
    /// The workers serving the listeners, in handoff order.
    workers: Vec<WorkerHandle>,
    /// Workers a reload that lowered `workers` retired: they accept
    /// nothing and finish their connections (up to `shutdown_timeout`).
    retiring: Vec<WorkerHandle>,
    /// The id the next started worker gets.
    next_worker_id: usize,
    pub stats: Arc<ProcessStats>,
    /// RUST_LOG set: logging stays as it started (RUST_LOG over the start
    /// `log_level`); a reload that changes `log_level` only warns.
    env_log: bool,
    /// The main thread's poll: signals, admin, health checks.
    poll: Poll,
    signals: Signals,
    admin: Admin,
    checker: Checker,
    loader: Loader,
    started: SystemTime,
}

/// Why the server could not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Server {
    /// Start serving `cfg`; `signals` were installed before it was read
    /// (see `main`).
    pub fn start(
        path: PathBuf,
        cfg: Config,
        env_log: bool,
        mut signals: Signals,
    ) -> Result<Server, StartError> {
        match crate::sys::raise_nofile_limit() {
            Ok(n) => log::debug!("file descriptor limit: {n}"),
            Err(e) => log::warn!("cannot raise the file descriptor limit: {e}"),
        }
        let shared = Arc::new(Shared {
            active: AtomicUsize::new(0),
            pipes: PipeBudget::new(cfg.global.max_pipes, cfg.global.workers),
            draining: AtomicBool::new(false),
            wakers: RwLock::new(Vec::new()),
        });
        let activated = activated_sockets(&cfg);
        let mut sockets = HashMap::new();
        let mut keepalive = HashMap::new();
        let ids: Vec<usize> = (0..cfg.global.workers).collect();
        let generation = build_generation(
            &cfg,
            &ids,
            1,
            None,
            &mut sockets,
            &mut keepalive,
            &activated,
        )
        .map_err(StartError)?;
        let generation = Arc::new(generation);
        let poll = Poll::new().map_err(|e| StartError(format!("cannot create a poll: {e}")))?;
        // Signals that came since `main` installed the handlers wait in
        // their pipe, and are heard on the first poll. The stop signals
        // join only now: until here one ends the process at once (as it
        // should while the configuration may still take long to read).
        for sig in [SIGTERM, SIGINT] {
            signals
                .add_signal(sig)
                .map_err(|e| StartError(format!("cannot install signal handlers: {e}")))?;
        }
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(|e| StartError(format!("cannot watch signals: {e}")))?;
        let mut admin = Admin::new(ADMIN, ADMIN_CONNS);
        if let Some(a) = &cfg.admin {
            let sock = bind(a.listen).map_err(|e| {
                StartError(format!(
                    "{}: admin: cannot listen on {}: {e}",
                    cfg.path.display(),
                    a.listen
                ))
            })?;
            admin
                .set_listener(poll.registry(), Some((a.listen, sock)))
                .map_err(|e| StartError(format!("admin: cannot watch the listener: {e}")))?;
        }
        let mut checker = Checker::new(PROBES);
        checker.follow(&generation.routes, poll.registry(), Instant::now());
        // Every worker's poll and waker first: each worker may wake the
        // others (see `Shared::wakers`).
        let polls = make_polls(&ids).map_err(StartError)?;
        let workers = start_workers(polls, &shared, &generation).map_err(StartError)?;
        log::info!(
            "sluice {} started (pid {}): {} routes, {} listeners, {} workers, pipe budget {}",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            generation.routes.len(),
            generation.listeners.len(),
            workers.len(),
            cfg.global.max_pipes
        );
        Ok(Server {
            path,
            cfg,
            shared,
            generation,
            sockets,
            keepalive,
            activated,
            kept: Kept::default(),
            workers,
            retiring: Vec::new(),
            next_worker_id: ids.len(),
            stats: Arc::new(ProcessStats::default()),
            env_log,
            poll,
            signals,
            admin,
            checker,
            loader: Loader::default(),
            started: SystemTime::now(),
        })
    }

    /// Serve until stopped. Returns the process exit code.
    pub fn run(mut self) -> i32 {
        notify(&[sd_notify::NotifyState::Ready]);
        let mut events = Events::with_capacity(64);
        let mut stopping: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let wake = [self.admin.next_wakeup(), self.checker.next_wakeup()]
                .into_iter()
                .flatten()
                .min()
                .map(|t| t.saturating_duration_since(now));
            let tick = match (stopping, &self.loader.pending) {
                (Some(_), _) => Some(Duration::from_millis(50)),
                (None, Some(_)) => Some(LOADER_TICK),
                (None, None) if !self.retiring.is_empty() => Some(RETIRE_TICK),
                (None, None) => None,
            };
            let timeout = match (wake, tick) {
                (Some(w), Some(t)) => Some(w.min(t)),
                (w, t) => w.or(t),
            };
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                log::error!("main poll failed: {e}");
                return 1;
            }
            let now = Instant::now();
            for ev in events.iter() {
                let token = ev.token();
                if token == ADMIN {
                    self.admin.accept(self.poll.registry(), now);
                } else if self.admin.owns(token) {
                    let view = admin::View {
                        generation: &self.generation,
                        shared: &self.shared,
                        process: &self.stats,
                        workers: self.workers.len(),
                        retiring: self.retiring.len(),
                        started: self.started,
                    };
                    self.admin.on_event(token, self.poll.registry(), &view, now);
                } else if self.checker.owns(token) {
                    self.checker.on_event(token, ev, self.poll.registry());
                } else if token == SIGNALS {
                    let pending: Vec<i32> = self.signals.pending().collect();
                    for sig in pending {
                        match sig {
                            SIGHUP if stopping.is_none() => self.reload(),
                            SIGTERM | SIGINT if stopping.is_none() => {
                                // A reload still reading its file is dropped.
                                self.loader.pending = None;
                                self.loader.again = false;
                                stopping = Some(self.drain());
                            }
                            SIGTERM | SIGINT => {
                                log::warn!("second stop signal: closing every connection now");
                                return self.stop_now();
                            }
                            _ => {}
                        }
                    }
                }
            }
            self.loaded();
            self.reap_retired();
            let now = Instant::now();
            self.admin.expire(self.poll.registry(), now);
            self.checker.run(self.poll.registry(), now);
            if self.checker.changed() {
                // Clients waiting for a backend slot may find one now.
                for w in self.workers.iter().chain(&self.retiring) {
                    let _ = w.waker.wake();
                }
            }
            if stopping.is_some() && self.workers_finished() {
                self.join_finished();
                log::info!("all connections finished; exiting");
                return 0;
            }
        }
    }

    /// A second stop signal: have every worker close its connections now
    /// as a stop that ran out of time does (peers reset, so no cut stream
    /// looks complete; access lines and counters written), wait a moment
    /// for them, and exit.
    fn stop_now(&mut self) -> i32 {
        self.send_all(|| Cmd::Drain(Instant::now()));
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end && !self.workers_finished() {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.join_finished();
        0
    }

    /// Every worker thread has returned, retiring ones included.
    fn workers_finished(&self) -> bool {
        self.workers
            .iter()
            .chain(&self.retiring)
            .all(|w| w.thread.as_ref().is_none_or(|t| t.is_finished()))
    }

    /// Join the worker threads that have returned.
    fn join_finished(&mut self) {
        for w in self.workers.iter_mut().chain(&mut self.retiring) {
            if let Some(t) = w.thread.take_if(|t| t.is_finished()) {
                let _ = t.join();
            }
        }
    }

    /// Forget the retired workers that finished their connections: join
    /// their threads, and take their wakers off the list the others wake.
    fn reap_retired(&mut self) {
        let shared = &self.shared;
        self.retiring.retain_mut(|w| {
            let Some(t) = w.thread.take_if(|t| t.is_finished()) else {
                return true;
            };
            let _ = t.join();
            shared
                .wakers
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|(id, _)| *id != w.id);
            log::info!("worker {} retired: its connections are finished", w.id);
            false
        });
    }

    /// To the workers serving the listeners.
    fn send(&self, make: impl Fn() -> Cmd) {
        send_to(&self.workers, make);
    }

    /// To every worker, retiring ones included.
    fn send_all(&self, make: impl Fn() -> Cmd) {
        send_to(&self.workers, &make);
        send_to(&self.retiring, &make);
    }

    /// SIGHUP: start reading the file on a thread of its own (`loaded`
    /// goes on when it is read); one SIGHUP during a reload makes another
    /// follow it.
    fn reload(&mut self) {
        if self.loader.pending.is_some() {
            if !self.loader.again {
                log::info!("reload requested during a reload: reloading again after it");
            }
            self.loader.again = true;
            return;
        }
        let usec = sd_notify::NotifyState::monotonic_usec_now();
        let mut msg = vec![sd_notify::NotifyState::Reloading];
        if let Ok(u) = usec {
            msg.push(u);
        }
        notify(&msg);
        log::info!("reloading {}", self.path.display());
        let (tx, rx) = mpsc::channel();
        let path = self.path.clone();
        let spawned = std::thread::Builder::new()
            .name("sluice-reload".into())
            .spawn(move || {
                let loaded = config::load(&path).map_err(|e| e.to_string());
                #[cfg(debug_assertions)]
                slow_reload_failpoint();
                let _ = tx.send(loaded);
            });
        match spawned {
            Ok(_) => self.loader.pending = Some(rx),
            Err(e) => self.apply(Err(format!("cannot start a thread to read the file: {e}"))),
        }
    }

    /// Apply the reload's result if its file has been read.
    fn loaded(&mut self) {
        let Some(rx) = &self.loader.pending else {
            return;
        };
        let result = match rx.try_recv() {
            Ok(r) => r,
            Err(mpsc::TryRecvError::Empty) => return,
            Err(mpsc::TryRecvError::Disconnected) => {
                Err("the thread reading the file ended without an answer".to_string())
            }
        };
        self.loader.pending = None;
        self.apply(result);
        if std::mem::take(&mut self.loader.again) {
            self.reload();
        }
    }

    /// Apply a reload's freshly read file; keep serving the old
    /// configuration if it is bad or cannot be put in place.
    fn apply(&mut self, loaded: Result<Config, String>) {
        let result = loaded.and_then(|cfg| {
            // A new admin address is bound before anything changes, so
            // a failure leaves the old configuration whole.
            let want = cfg.admin.as_ref().map(|a| a.listen);
            let admin = match want {
                Some(a) if Some(a) != self.admin.addr() => match bind(a) {
                    Ok(s) => Some(Some((a, s))),
                    Err(e) => {
                        return Err(format!(
                            "{}: admin: cannot listen on {a}: {e}",
                            cfg.path.display()
                        ));
                    }
                },
                None if self.admin.addr().is_some() => Some(None),
                _ => None,
            };
            // The workers that serve the new generation: the running ones,
            // less those a lower `workers` retires, plus new ones, whose
            // polls come first so that a reload that cannot make them
            // fails whole.
            let (want, have) = (cfg.global.workers, self.workers.len());
            let mut ids: Vec<usize> = self.workers.iter().take(want).map(|w| w.id).collect();
            ids.extend(self.next_worker_id..self.next_worker_id + want.saturating_sub(have));
            let polls = make_polls(&ids[have.min(want)..])?;
            let (workers, retiring) = (&self.workers, &self.retiring);
            self.kept.remember(&self.generation.routes);
            let running = Running {
                empty_file_caches: &|| empty_file_caches(workers) + empty_file_caches(retiring),
                kept: &self.kept,
            };
            let generation = build_generation(
                &cfg,
                &ids,
                self.generation.id + 1,
                Some(running),
                &mut self.sockets,
                &mut self.keepalive,
                &self.activated,
            )?;
            Ok((cfg, generation, admin, polls))
        });
        match result {
            Ok((cfg, generation, admin, polls)) => {
                if let Some(new) = admin {
                    let addr = new.as_ref().map(|(a, _)| *a);
                    if let Err(e) = self.admin.set_listener(self.poll.registry(), new) {
                        log::error!("admin: cannot watch the listener on {addr:?}: {e}");
                    } else if addr.is_none() {
                        log::info!("admin: listener closed (no [admin] table any more)");
                    }
                }
                if !self.env_log {
                    log::set_max_level(cfg.global.log_level);
                } else if cfg.global.log_level != self.cfg.global.log_level {
                    log::warn!(
                        "reload: `log_level` changed, but RUST_LOG is set: logging stays as it \
                         started (unset RUST_LOG to let `log_level` rule, and restart)"
                    );
                }
                let pipes = &self.shared.pipes;
                if cfg.global.max_pipes != pipes.cap() {
                    log::info!(
                        "reload: pipe budget {} -> {} ({} pipes exist now)",
                        pipes.cap(),
                        cfg.global.max_pipes,
                        pipes.used()
                    );
                }
                // Each worker's share of idle pipes follows the count too.
                pipes.set_cap(cfg.global.max_pipes, cfg.global.workers);
                let generation = Arc::new(generation);
                self.resize_workers(&cfg, polls, &generation);
                // Sockets no route listens on any more: close ours; the
                // workers drop their duplicates as they load the new set.
                let keep: Vec<SocketAddr> = generation.listeners.iter().map(|l| l.addr).collect();
                self.sockets.retain(|a, _| keep.contains(a));
                // A socket systemd passed outlives its route: what it had
                // before is kept for when a reload brings the route back.
                let (sockets, activated) = (&self.sockets, &self.activated);
                self.keepalive.retain(|a, _| {
                    sockets.contains_key(a) || activated.keys().any(|(_, x)| x == a)
                });
                log::info!(
                    "reload ok: generation {}, {} routes, {} listeners",
                    generation.id,
                    generation.routes.len(),
                    generation.listeners.len()
                );
                self.checker
                    .follow(&generation.routes, self.poll.registry(), Instant::now());
                self.generation = generation;
                self.cfg = cfg;
                self.stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                log::error!("reload failed, still serving the previous configuration: {e}");
                self.stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        notify(&[sd_notify::NotifyState::Ready]);
    }

    /// Put a reload's generation in place and bring the worker count to
    /// `workers`: the workers that stay load it; those past the new count
    /// stop accepting and finish their connections (their listening
    /// sockets stay open, served by the others: see `duplicate_listeners`);
    /// new ones start with it. `polls` are the new workers' (`make_polls`).
    fn resize_workers(
        &mut self,
        cfg: &Config,
        polls: Vec<(usize, Poll, Arc<Waker>)>,
        generation: &Arc<Generation>,
    ) {
        let before = self.workers.len();
        let stay = cfg.global.workers.min(before);
        let retired: Vec<WorkerHandle> = self.workers.drain(stay..).collect();
        self.send(|| Cmd::Load(generation.clone()));
        if !retired.is_empty() {
            let deadline = Instant::now() + cfg.global.shutdown_timeout;
            send_to(&retired, || Cmd::Drain(deadline));
            let ids: Vec<String> = retired.iter().map(|w| w.id.to_string()).collect();
            log::info!(
                "reload: workers {before} -> {}: worker(s) {} accept no more and finish their \
                 connections (up to shutdown_timeout, {:?})",
                cfg.global.workers,
                ids.join(", "),
                cfg.global.shutdown_timeout
            );
            self.retiring.extend(retired);
        }
        if polls.is_empty() {
            return;
        }
        match start_workers(polls, &self.shared, generation) {
            Ok(new) => {
                let ids: Vec<String> = new.iter().map(|w| w.id.to_string()).collect();
                log::info!(
                    "reload: workers {before} -> {}: started worker(s) {}",
                    cfg.global.workers,
                    ids.join(", ")
                );
                // Their ids were next_worker_id and on (see `apply`).
                self.next_worker_id += new.len();
                self.workers.extend(new);
            }
            Err(e) => {
                // Its share of every listening socket would go unserved
                // while the process looks healthy: end it all, as a worker
                // whose poll fails does, so the service manager restarts it.
                log::error!("reload: {e}; aborting");
                std::process::abort();
            }
        }
    }

    /// SIGTERM/SIGINT: stop accepting and let connections finish.
    fn drain(&mut self) -> Instant {
        notify(&[sd_notify::NotifyState::Stopping]);
        let deadline = Instant::now() + self.cfg.global.shutdown_timeout;
        log::info!(
            "stopping: no new connections; waiting up to {:?} for {} open ones",
            self.cfg.global.shutdown_timeout,
            self.shared.active.load(Ordering::Relaxed)
        );
        self.shared.draining.store(true, Ordering::Relaxed);
        self.checker.clear(self.poll.registry());
        // The same routes without listeners: once every worker has loaded
        // it and the old generation is gone, no descriptor of a listening
        // socket is left (ours go with `sockets`), so the kernel refuses
        // new clients instead of queueing them.
        let closed = Arc::new(
            self.generation
                .without_listeners(self.workers.iter().map(|w| (w.id, Vec::new())).collect()),
        );
        self.send(|| Cmd::Load(closed.clone()));
        self.generation = closed;
        self.send_all(|| Cmd::Drain(deadline));
        self.sockets.clear();
        deadline
    }
}

/// `open_file_cache`, but never more than a quarter of the descriptor
/// limit spread over the workers: cached files must not starve
/// connections of descriptors.
fn open_file_cache(cfg: &Config, workers: usize) -> usize {
    let want = cfg.global.open_file_cache;
    let Ok(limit) = crate::sys::nofile_limit() else {
        return want;
    };
    let share = usize::try_from(limit / 4).unwrap_or(usize::MAX) / workers.max(1);
    if want > share {
        log::warn!(
            "open_file_cache = {want} is more than a quarter of the file descriptor limit \
             ({limit}) over {workers} workers: each worker caches at most {share} files"
        );
        return share;
    }
    want
}

/// What a reload builds on: the state of the generations before it, and a
/// way to have the workers close the files they cache (descriptors a
/// reload may need, see `duplicate_listeners`).
struct Running<'a> {
    empty_file_caches: &'a dyn Fn() -> usize,
    /// Route and backend state connections of any generation still hold.
    kept: &'a Kept,
}

/// Build a generation from a config, reusing sockets bound to the same
/// address and route state of routes with the same name.
fn build_generation(
    cfg: &Config,
    ids: &[usize],
    id: u64,
    running: Option<Running<'_>>,
    sockets: &mut HashMap<SocketAddr, Group>,
    keepalive: &mut HashMap<SocketAddr, keepalive::Untouched>,
    activated: &Activated,
) -> Result<Generation, String> {
    // A failed reload leaves the sockets as they were: what it bound is
    // closed, and groups grown for more workers are put back (a socket no
    // worker watches would keep the clients the kernel gives it).
    let before = sockets.clone();
    let built = build_generation_in(cfg, ids, id, running, sockets, keepalive, activated);
    if built.is_err() {
        *sockets = before;
    }
    built
}

fn build_generation_in(
    cfg: &Config,
    ids: &[usize],
    id: u64,
    running: Option<Running<'_>>,
    sockets: &mut HashMap<SocketAddr, Group>,
    keepalive: &mut HashMap<SocketAddr, keepalive::Untouched>,
    activated: &Activated,
) -> Result<Generation, String> {
    let workers = ids.len();
    let none = Kept::default();
    let kept = running.as_ref().map_or(&none, |r| r.kept);
    let mut routes = Vec::new();
    let mut listeners = Vec::new();
    // Sockets bound into a live group for new workers (`grow_group`): they
    // listen only once the generation stands, since a listening one gets
    // its share of clients at once, and closing it, if the reload failed,
    // would reset them.
    let mut unlistened: Group = Vec::new();
    for (ri, r) in cfg.routes.iter().enumerate() {
        let mut rt = RouteRt::new(r.clone(), workers, kept);
        if let Err(e) = rt.open_root() {
            return Err(format!("{}: {e}", cfg.path.display()));
        }
        routes.push(Arc::new(rt));
        for addr in &r.listen {
            let sock = match sockets.get(addr) {
                Some(s) if s.len() > 1 && s.len() < workers => {
                    let grown = grow_group(*addr, s, workers);
                    unlistened.extend(grown[s.len()..].iter().cloned());
                    sockets.insert(*addr, grown.clone());
                    grown
                }
                Some(s) => s.clone(),
                None => match activated
                    .get(&(r.name.clone(), *addr))
                    .map(|s| Ok(vec![s.clone()]))
                    .unwrap_or_else(|| bind_group(*addr, workers))
                {
                    Ok(s) => {
                        sockets.insert(*addr, s.clone());
                        s
                    }
                    Err(e) => {
                        // The running configuration holding the same port
                        // on another address (127.0.0.1:80 to 0.0.0.0:80)
                        // is the usual cause: say how to get there.
                        let held = sockets
                            .keys()
                            .find(|a| {
                                a.port() == addr.port()
                                    && !cfg.routes.iter().any(|r| r.listen.contains(a))
                            })
                            .filter(|_| e.kind() == io::ErrorKind::AddrInUse);
                        let hint = held.map_or(String::new(), |a| {
                            format!(
                                " (sluice itself listens on {a}, which this configuration \
                                 drops: moving a port to another address takes a restart, \
                                 or a reload without the port and then one with it)"
                            )
                        });
                        return Err(format!(
                            "{}: route \"{}\": cannot listen on {addr}: {e}{hint}",
                            cfg.path.display(),
                            r.name
                        ));
                    }
                },
            };
            listeners.push(SharedListener {
                addr: *addr,
                route: ri,
                socks: sock,
            });
        }
    }
    // Every worker's own descriptors, made here so that running out of
    // them fails the whole reload instead of leaving a worker behind on
    // the old listeners while the log says the reload went well.
    // Files the workers keep open for file routes come back first (a
    // reload empties those caches anyway).
    let handoff = match duplicate_listeners(&listeners, ids) {
        Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
            match running.as_ref().map_or(0, |r| (r.empty_file_caches)()) {
                0 => Err(e),
                n => {
                    log::info!(
                        "out of file descriptors for the listeners: closed the {n} files the \
                     workers had cached, trying again"
                    );
                    duplicate_listeners(&listeners, ids)
                }
            }
        }
        r => r,
    };
    let handoff = match handoff {
        Ok(h) => h,
        Err(e) => {
            let hint = match e.raw_os_error() {
                Some(libc::EMFILE) => {
                    " (this process is out of file descriptors: raise its limit, \
                     LimitNOFILE= under systemd)"
                }
                Some(libc::ENFILE) => " (the system's file table is full: see fs.file-max)",
                _ => "",
            };
            return Err(format!(
                "{}: cannot give {workers} worker(s) their own descriptors of {} listening \
                 socket(s): {e}{hint}",
                cfg.path.display(),
                listeners.len()
            ));
        }
    };
    // Only now that the generation stands: a reload that fails must not
    // change the sockets the running one listens on.
    for s in &unlistened {
        socket2::SockRef::from(&**s).listen(BACKLOG).map_err(|e| {
            format!(
                "{}: cannot listen for the new workers: {e}",
                cfg.path.display()
            )
        })?;
    }
    // A socket sluice never set keepalive on keeps what it came with (a
    // socket unit's KeepAlive=, say), and gets it back when a reload drops
    // the key.
    for l in &listeners {
        let route = &routes[l.route].cfg;
        keepalive::set_listener(
            keepalive,
            l.addr,
            &l.socks,
            route.tcp_keepalive.as_ref(),
            &route.name,
        );
    }
    Ok(Generation {
        id,
        routes,
        listeners,
        max_connections: cfg.global.max_connections,
        open_file_cache: open_file_cache(cfg, workers),
        open_file_cache_inactive: cfg.global.open_file_cache_inactive,
        busy_poll: cfg.global.busy_poll,
        handoff: Mutex::new(handoff),
    })
}

/// Debug builds only, for the tests: `SLUICE_FAILPOINT=slow_reload` makes
/// a reload's read of its file take 2 s longer, as a slow name lookup
/// would (after reading it, so a test can tell which content was read).
#[cfg(debug_assertions)]
fn slow_reload_failpoint() {
    if std::env::var_os("SLUICE_FAILPOINT").is_some_and(|v| v == "slow_reload") {
        log::info!("failpoint slow_reload: file read, sleeping 2 s");
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Have every worker close the files its open-file cache holds (each
/// does at its next loop turn); how many they closed, counting those that
/// answered within 2 s.
fn empty_file_caches(workers: &[WorkerHandle]) -> usize {
    let (tx, rx) = mpsc::channel();
    for w in workers {
        if w.tx.send(Cmd::EmptyFileCache(tx.clone())).is_ok() {
            let _ = w.waker.wake();
        }
    }
    drop(tx);
    let end = Instant::now() + Duration::from_secs(2);
    let mut closed = 0;
    while let Ok(n) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
        closed += n;
    }
    closed
}

/// Each worker's own descriptors of the listening sockets, as (listener
/// index, socket) pairs, by worker id; all or nothing. With M workers and
/// a group of G sockets (SO_REUSEPORT), the worker at position p takes
/// every socket i with i % M == p when G >= M, so a group bound for more
/// workers than now run keeps every socket served (the kernel goes on
/// giving each its share of new clients); else socket p % G (fewer
/// sockets than workers, or one shared socket: some workers share).
fn duplicate_listeners(listeners: &[SharedListener], ids: &[usize]) -> io::Result<Handoff> {
    let m = ids.len().max(1);
    ids.iter()
        .enumerate()
        .map(|(p, &id)| {
            let mut socks = Vec::new();
            for (li, l) in listeners.iter().enumerate() {
                let g = l.socks.len();
                if g >= m {
                    for i in (p..g).step_by(m) {
                        socks.push((li, l.socks[i].try_clone()?));
                    }
                } else {
                    socks.push((li, l.socks[p % g].try_clone()?));
                }
            }
            Ok((id, socks))
        })
        .collect()
}

/// A reload raised `workers`: bind more sockets into an address's
/// SO_REUSEPORT group, one per worker, so the kernel spreads new clients
/// over all of them. A group bound without SO_REUSEPORT (one worker, or a
/// socket systemd passed) cannot grow; nor can one whose new member fails
/// to bind: then workers share sockets (`duplicate_listeners`).
fn grow_group(addr: SocketAddr, group: &Group, workers: usize) -> Group {
    let mut grown = group.clone();
    while grown.len() < workers {
        match bind_only(addr, true) {
            Ok(s) => grown.push(Arc::new(s)),
            Err(e) => {
                log::warn!(
                    "cannot add a listening socket on {addr} for the new workers: {e}; \
                     they share the {} there are",
                    grown.len()
                );
                break;
            }
        }
    }
    grown
}

/// A poll and a waker for each worker to start, by id.
fn make_polls(ids: &[usize]) -> Result<Vec<(usize, Poll, Arc<Waker>)>, String> {
    ids.iter()
        .map(|&id| {
            let poll =
                Poll::new().map_err(|e| format!("cannot create a poll for worker {id}: {e}"))?;
            let waker = worker::waker(&poll)
                .map_err(|e| format!("cannot create a waker for worker {id}: {e}"))?;
            Ok((id, poll, Arc::new(waker)))
        })
        .collect()
}

/// Start a worker thread for each poll, serving `generation` (each takes
/// its listening sockets from the generation's handoff). Their wakers join
/// `Shared::wakers` first: each worker may wake the others.
fn start_workers(
    polls: Vec<(usize, Poll, Arc<Waker>)>,
    shared: &Arc<Shared>,
    generation: &Arc<Generation>,
) -> Result<Vec<WorkerHandle>, String> {
    shared
        .wakers
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .extend(polls.iter().map(|(id, _, w)| (*id, w.clone())));
    let mut workers = Vec::new();
    for (id, poll, waker) in polls {
        let (tx, rx) = mpsc::channel();
        let w = Worker::new(id, poll, rx, shared.clone(), generation.clone())
            .map_err(|e| format!("worker {id}: {e}"))?;
        let thread = std::thread::Builder::new()
            .name(format!("sluice-w{id}"))
            .spawn(move || w.run())
            .map_err(|e| format!("cannot start worker {id}: {e}"))?;
        workers.push(WorkerHandle {
            id,
            tx,
            waker,
            thread: Some(thread),
        });
    }
    Ok(workers)
}

fn send_to(workers: &[WorkerHandle], make: impl Fn() -> Cmd) {
    for w in workers {
        if w.tx.send(make()).is_ok() {
            let _ = w.waker.wake();
        }
    }
}

/// Sockets systemd passed, keyed by (route name, address).
type Activated = HashMap<(String, SocketAddr), Arc<std::net::TcpListener>>;

/// Sockets systemd passed (socket activation) for the routes they were
/// named for. A socket is used by the route whose name is its
/// `FileDescriptorName=` and that listens on its address; any other
/// passed socket is logged and closed.
fn activated_sockets(cfg: &Config) -> Activated {
    let mut out = HashMap::new();
    let (passed, rejected) = match crate::sys::activation::take_listen_fds() {
        Ok(x) => x,
        Err(e) => {
            log::warn!("socket activation: cannot read LISTEN_FDS/LISTEN_FDNAMES: {e}");
            return out;
        }
    };
    for r in rejected {
        log::warn!(
            "socket activation: fd {} ({:?}) is not usable: {}; closing it",
            r.fd,
            r.name,
            r.why
        );
    }
    for a in passed {
        let route = cfg
            .routes
            .iter()
            .find(|r| r.name == a.name && r.listen.contains(&a.addr));
        match route {
            Some(r) if !out.contains_key(&(r.name.clone(), a.addr)) => {
                log::info!(
                    "route {}: listening on {} with a socket from systemd (fd {})",
                    r.name,
                    a.addr,
                    a.fd
                );
                // What `listen` sets on sockets sluice binds itself. Clients
                // that queued before this call keep Nagle on: the shipped
                // sluice.socket sets NoDelay=yes for them.
                if let Err(e) = socket2::SockRef::from(&a.sock).set_tcp_nodelay(true) {
                    log::warn!(
                        "route {}: cannot set TCP_NODELAY on the socket from systemd: {e}; \
                         small writes to its clients may wait for ACKs (set NoDelay=yes in \
                         the socket unit)",
                        r.name
                    );
                }
                out.insert((r.name.clone(), a.addr), Arc::new(a.sock));
            }
            _ => log::warn!(
                "socket activation: fd {} named {:?} listens on {}, but no route of that name \
                 listens there (FileDescriptorName= must be the route name); closing it",
                a.fd,
                a.name,
                a.addr
            ),
        }
    }
    out
}

/// The listening sockets of one address: one per worker, bound with
/// SO_REUSEPORT so the kernel spreads new connections over the workers by
/// connection hash; or a single socket every worker shares (one worker, or
/// a socket systemd passed).
pub type Group = Vec<Arc<std::net::TcpListener>>;

/// Bind the listening group of `addr` for `workers` workers.
fn bind_group(addr: SocketAddr, workers: usize) -> io::Result<Group> {
    if workers <= 1 {
        return Ok(vec![Arc::new(listen(addr, false)?)]);
    }
    // SO_REUSEPORT would let this group join one that another process
    // (a second sluice on the same file) already listens with, splitting
    // its traffic silently. Bind once without it first, so an address in
    // use fails with EADDRINUSE as it does with one worker.
    drop(listen(addr, false)?);
    (0..workers)
        .map(|_| listen(addr, true).map(Arc::new))
        .collect()
}

/// A non-blocking listening socket with the options a proxy wants.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    listen(addr, false)
}

fn listen(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let sock = bind_only(addr, reuse_port)?;
    socket2::SockRef::from(&sock).listen(BACKLOG)?;
    Ok(sock)
}

/// As deep an accept queue as the system allows: the kernel caps the
/// backlog at net.core.somaxconn, which an operator can raise for bursts.
const BACKLOG: i32 = 65535;

/// A non-blocking socket bound to `addr` with the options a proxy wants,
/// not listening yet.
fn bind_only(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY: one setsockopt per listener
    // instead of one per connection.
    sock.set_tcp_nodelay(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        log::warn!("cannot notify systemd: {e}");
    }
}

/// `sluice run`: load, start, serve. Returns the exit code.
pub fn main(path: &Path) -> i32 {
    // Handlers first: the configuration may take seconds to read (host
    // names to resolve), and a SIGHUP meanwhile (a deploy script's
    // reload) would end the process, whose default action that is. Now it
    // waits, and is heard once the server runs: a reload, or a stop.
    let signals = match Signals::new([SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sluice: cannot install signal handlers: {e}");
            return 1;
        }
    };
    let cfg = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice: {e}");
            return 2;
        }
    };
    let env_log = std::env::var_os("RUST_LOG").is_some();
    let mut b = env_logger::Builder::new();
    if env_log {
        // RUST_LOG's directives, over `log_level` for every target they
        // do not name.
        b.filter_level(cfg.global.log_level);
        b.parse_default_env();
    } else {
        // The logger passes everything; `log::set_max_level` filters, so
        // a reload can raise `log_level` as well as lower it.
        b.filter_level(log::LevelFilter::Trace);
    }
    b.format_timestamp_millis();
    b.init();
    if !env_log {
        log::set_max_level(cfg.global.log_level);
    }
    match Server::start(path.to_path_buf(), cfg, env_log, signals) {
        Ok(s) => s.run(),
        Err(e) => {
            log::error!("{e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    /// The point of setting TCP_NODELAY on the listener: every accepted
    /// socket has it without a setsockopt of its own.
    #[test]
    fn accepted_sockets_inherit_nodelay() {
        let l = super::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let mut accepted = None;
        for _ in 0..200 {
            match l.accept() {
                Ok((s, _)) => {
                    accepted = Some(s);
                    break;
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
        let s = accepted.expect("a connection to accept");
        assert!(socket2::SockRef::from(&s).tcp_nodelay().unwrap());
    }
}
