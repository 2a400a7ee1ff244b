//! A worker: one thread, one mio `Poll`, one slab of sessions.
//!
//! The worker accepts on every listener of the current configuration
//! generation (each worker registers its own descriptors of each address's
//! listening sockets: its socket of the SO_REUSEPORT group, several after
//! a reload lowered `workers`, or the one shared socket; so connections
//! spread over workers and a reload never closes a listening socket), admits or refuses each client
//! (drain, allow/deny, limits — after the PROXY header when the route
//! expects one, see `handshake`), and drives sessions on their events.
//!
//! Timers cost nothing per tick: each session has one deadline and one
//! entry in a binary heap. Activity only moves the deadline inside the
//! session (no syscall, no heap operation); when the heap entry comes due
//! the worker looks at the real deadline and either fires or re-files it.
//!
//! Commands from the main thread (new generation, drain, stop) arrive on
//! a channel with a mio `Waker`.
//!
//! A worker that runs out of work may poll with a zero timeout for a
//! while before it sleeps, so events that come in quick succession find
//! it awake and whoever sends them is spared waking it (an
//! inter-processor interrupt, dear in a virtual machine). How long adapts
//! to the gaps it slept through, up to `busy_poll` (`idle_poll`), so a
//! worker whose events come further apart soon sleeps at once.
//!
//! A session that stopped only because its turn's budget ran out (a file
//! session that sent `send_chunk`) says `wants_turn`; the worker keeps it
//! on a small ready list and runs it again on the next loop turn with a
//! zero poll timeout, since no new edge will come for a socket that is
//! still writable.
//!
//! The lease-break signal of mmap file transfers (a real-time signal, see
//! `sys::file::lease_signal`) is watched by every worker through
//! signal-hook-mio; when it fires, the worker asks its leased transfers
//! (and only those) whether their lease is breaking.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::config::RouteKind;
use crate::conn::{Ctx, End, ProxyConn, Shortage, Side, token};
use crate::file_conn::{FileConn, OpenFiles};
use crate::handshake::{Accepted, Handshake, Step};
use crate::idle_poll::IdlePoll;
use crate::pipe_pool::{BufPool, PipeBudget, PipePool};
use crate::pump::Pools;
use crate::route::RouteRt;
use crate::stats::Counters;

/// Tokens at and above this value are not connections.
const LISTENER_BASE: usize = usize::MAX / 2;
pub const WAKER: Token = Token(usize::MAX);
/// The lease-break signal.
const LEASE: Token = Token(usize::MAX - 1);
/// Connections accepted per listener per loop turn before others get a go.
const ACCEPT_BATCH: usize = 128;
/// How long a listener rests after the process ran out of descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// One listening address of a generation: its sockets (one per worker
/// with SO_REUSEPORT, or one that all workers share) and its route.
pub struct SharedListener {
    pub addr: SocketAddr,
    pub route: usize,
    pub socks: crate::server::Group,
}

/// A configuration generation: what a reload replaces as a whole.
pub struct Generation {
    pub id: u64,
    pub routes: Vec<Arc<RouteRt>>,
    pub listeners: Vec<SharedListener>,
    pub max_connections: usize,
    /// Size of each worker's open-file cache (`file_conn::OpenFiles`).
    pub open_file_cache: usize,
    pub open_file_cache_inactive: Duration,
    /// `busy_poll`: the most a worker that ran out of work polls before
    /// it sleeps (`idle_poll`).
    pub busy_poll: Duration,
    /// Each worker's own descriptors of `listeners`, made by the main
    /// thread before the generation was announced (so a reload that
    /// cannot make them fails whole, see `server::duplicate_listeners`); a
    /// worker takes its set as it loads.
    pub handoff: Mutex<Handoff>,
}

/// By worker id, that worker's listening sockets: (index in
/// `Generation::listeners`, its own descriptor). A worker may have more
/// than one socket of a listener (a reload lowered `workers`, and the
/// group keeps the sockets it was bound with).
pub type Handoff = Vec<(usize, Vec<(usize, std::net::TcpListener)>)>;

impl Generation {
    /// The same routes and settings without a listener: what a worker that
    /// stops accepting holds on to, so that no listening socket stays open
    /// (queueing clients nobody accepts) through it.
    pub fn without_listeners(&self, handoff: Handoff) -> Generation {
        Generation {
            id: self.id,
            routes: self.routes.clone(),
            listeners: Vec::new(),
            max_connections: self.max_connections,
            open_file_cache: self.open_file_cache,
            open_file_cache_inactive: self.open_file_cache_inactive,
            busy_poll: self.busy_poll,
            handoff: Mutex::new(handoff),
        }
    }

    /// The copy buffer sizes its routes use (`pipe_pool::BufPool`).
    pub fn buffer_sizes(&self) -> Vec<usize> {
        let mut sizes: Vec<usize> = self
            .routes
            .iter()
            .map(|r| match &r.cfg.kind {
                RouteKind::Proxy(p) => p.buffer_size,
                RouteKind::File(f) => f.buffer_size,
            })
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        sizes
    }
}

/// State shared by every worker for the life of the process.
pub struct Shared {
    /// Client connections open, all routes and workers together.
    pub active: AtomicUsize,
    pub pipes: Arc<PipeBudget>,
    /// Set when a graceful stop begins (for /healthz).
    pub draining: AtomicBool,
    /// Every running worker's waker, with its id (a worker's is added
    /// before it starts, and taken off once it retired): a connection that
    /// ends while clients of its route wait for a backend slot wakes the
    /// other workers, whose clients may be waiting.
    pub wakers: RwLock<Vec<(usize, Arc<Waker>)>>,
}

pub enum Cmd {
    /// Serve this generation from now on (new connections only).
    Load(Arc<Generation>),
    /// Stop accepting; finish open connections until the deadline.
    Drain(Instant),
    /// Close every file of the open-file cache and say how many: a reload
    /// short of descriptors for its listeners asks before it tries again.
    EmptyFileCache(std::sync::mpsc::Sender<usize>),
}

struct Listener {
    sock: TcpListener,
    route: Arc<RouteRt>,
    /// Resting after EMFILE/ENFILE until then (or, not watched yet, until
    /// the next try to watch it).
    paused_until: Option<Instant>,
    /// Registered with the poll. A socket epoll refused to watch (ENOMEM,
    /// max_user_watches) is tried again every ACCEPT_PAUSE: with several
    /// workers it is this worker's own in the address's SO_REUSEPORT
    /// group, so the kernel goes on queueing a share of the clients on it.
    watched: bool,
}

/// A session in the slab: one state machine per kind of connection.
/// Stored inline (the slab is the allocation): boxing the big variant
/// would cost an allocation per connection to save bytes per handshake.
#[allow(clippy::large_enum_variant)]
enum Session {
    Proxy(ProxyConn),
    /// `accept_proxy`: waiting for the PROXY header (see `handshake`).
    Handshake(Handshake),
    File(FileConn),
}

struct Entry {
    /// Unique per session, so a stale timer never hits a reused slab key.
    id: u64,
    /// The time of this session's one heap entry.
    scheduled: Instant,
    /// The client IP counted against `max_connections_per_ip`, once known.
    ip: Option<IpAddr>,
    sess: Session,
    /// On the ready list already (so it is listed once).
    queued: bool,
    /// Holds a live place on its route's list of clients waiting for a
    /// backend slot (cleared as soon as it stops waiting, however it
    /// stopped; the place it leaves behind is stale).
    waits: bool,
}

impl Entry {
    fn deadline(&self) -> Instant {
        match &self.sess {
            Session::Proxy(c) => c.deadline,
            Session::Handshake(h) => h.deadline,
            Session::File(c) => c.deadline,
        }
    }
    fn route(&self) -> &Arc<RouteRt> {
        match &self.sess {
            Session::Proxy(c) => c.route(),
            Session::Handshake(h) => h.route(),
            Session::File(c) => c.route(),
        }
    }
    fn waits_for_backend(&self) -> bool {
        matches!(&self.sess, Session::Proxy(c) if c.is_waiting())
    }
    fn wants_turn(&self) -> bool {
        match &self.sess {
            Session::Proxy(c) => c.wants_turn(),
            Session::Handshake(_) => false,
            Session::File(c) => c.wants_turn(),
        }
    }
}

/// The clients (key, id) of one route (`RouteRt::id`) waiting for a
/// backend slot, oldest first, and how many of them ended since (their
/// places are stale until swept).
#[derive(Default)]
struct WaitQueue {
    route: u64,
    queue: VecDeque<(usize, u64)>,
    stale: usize,
}

pub struct Worker {
    id: usize,
    poll: Poll,
    rx: Receiver<Cmd>,
    shared: Arc<Shared>,
    generation: Arc<Generation>,
    listeners: Vec<Listener>,
    /// Listeners that hit the accept batch limit and still have clients.
    backlog: Vec<usize>,
    slab: Slab<Entry>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    next_id: u64,
    pipes: PipePool,
    bufs: BufPool,
    files: OpenFiles,
    rng: u64,
    drain: Option<Instant>,
    /// Sessions (key, id) to run again next turn without an event.
    ready: Vec<(usize, u64)>,
    /// Proxy clients waiting for a backend slot, one queue per route.
    waiting: Vec<WaitQueue>,
    /// A slot may have come free: try the waiting clients this turn.
    slot_freed: bool,
    /// A session of this worker freed a slot (or saw a backend come up)
    /// while clients wait: the other workers must hear of it too.
    freed_here: bool,
    lease_signal: Option<Signals>,
    /// How long to poll before sleeping (`busy_poll`, adaptive).
    idle_poll: IdlePoll,
}

impl Worker {
    pub fn new(
        id: usize,
        poll: Poll,
        rx: Receiver<Cmd>,
        shared: Arc<Shared>,
        generation: Arc<Generation>,
    ) -> io::Result<Self> {
        let pipes = PipePool::new(shared.pipes.clone());
        let mut w = Worker {
            id,
            poll,
            rx,
            shared,
            generation: generation.clone(),
            listeners: Vec::new(),
            backlog: Vec::new(),
            slab: Slab::new(),
            timers: BinaryHeap::new(),
            next_id: 0,
            pipes,
            bufs: BufPool::default(),
            // Sized by `load`, below.
            files: OpenFiles::default(),
            rng: 0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1),
            drain: None,
            ready: Vec::new(),
            waiting: Vec::new(),
            slot_freed: false,
            freed_here: false,
            lease_signal: None,
            idle_poll: IdlePoll::new(generation.busy_poll),
        };
        w.watch_lease_signal();
        w.load(generation)?;
        Ok(w)
    }

    /// Swap in a generation's listeners. Sockets are shared, so nothing is
    /// closed or re-bound: only this worker's registrations change, using
    /// the duplicates the main thread made for it.
    fn load(&mut self, generation: Arc<Generation>) -> io::Result<()> {
        self.files.configure(
            generation.open_file_cache,
            generation.open_file_cache_inactive,
        );
        self.bufs.keep_sizes(generation.buffer_sizes());
        self.idle_poll.set_max(generation.busy_poll);
        let socks = {
            let mut h = generation
                .handoff
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            h.iter_mut()
                .find(|(id, _)| *id == self.id)
                .map(|(_, s)| std::mem::take(s))
                .unwrap_or_default()
        };
        if let Some(li) =
            (0..generation.listeners.len()).find(|li| !socks.iter().any(|(i, _)| i == li))
        {
            // Cannot happen: each worker loads a generation once, and the
            // main thread made a socket of each listener for every worker.
            return Err(io::Error::other(format!(
                "generation {} holds no socket of {} for this worker",
                generation.id, generation.listeners[li].addr
            )));
        }
        self.unlisten();
        for (li, sock) in socks {
            let l = &generation.listeners[li];
            let mut sock = TcpListener::from_std(sock);
            let token = Token(LISTENER_BASE + self.listeners.len());
            let watched = match self
                .poll
                .registry()
                .register(&mut sock, token, Interest::READABLE)
            {
                Ok(()) => true,
                Err(e) => {
                    log::error!(
                        "worker {}: cannot watch {}: {e}; trying again every {ACCEPT_PAUSE:?} \
                         (its clients wait in the kernel's queue meanwhile)",
                        self.id,
                        l.addr
                    );
                    false
                }
            };
            self.listeners.push(Listener {
                sock,
                route: generation.routes[l.route].clone(),
                paused_until: (!watched).then(|| Instant::now() + ACCEPT_PAUSE),
                watched,
            });
            if watched {
                // A client may already wait in the backlog: no edge will say so.
                self.backlog.push(self.listeners.len() - 1);
            }
        }
        self.generation = generation;
        Ok(())
    }

    /// Install (process-wide) and watch the lease-break signal. A worker
    /// that cannot takes no leases: its mmap transfers use sendfile.
    fn watch_lease_signal(&mut self) {
        let sig = crate::sys::file::lease_signal();
        // SIGIO too: when the real-time signal queue overflows, the kernel
        // sends SIGIO instead, whose default action would end the process.
        let mut signals = match Signals::new([sig, libc::SIGIO]) {
            Ok(s) => s,
            Err(e) => {
                log::error!(
                    "worker {}: cannot handle the lease-break signal {sig}: {e}; mmap will use sendfile",
                    self.id
                );
                return;
            }
        };
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut signals, LEASE, Interest::READABLE)
        {
            log::error!(
                "worker {}: cannot watch the lease-break signal: {e}; mmap will use sendfile",
                self.id
            );
            return;
        }
        self.lease_signal = Some(signals);
    }

    fn unlisten(&mut self) {
        for mut l in self.listeners.drain(..) {
            // Deregister explicitly: the socket lives on in other
            // descriptors, so closing ours would not remove it from epoll.
            let _ = self.poll.registry().deregister(&mut l.sock);
        }
        self.backlog.clear();
    }

    pub fn run(mut self) {
        if self.lease_signal.is_some() {
            // This thread answers lease breaks: its transfers may take leases.
            crate::pump::file::lease_watched();
        }
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let idle = self.backlog.is_empty()
                && self.ready.is_empty()
                && !self.freed_here
                && !self.slot_freed;
            if !idle {
                self.idle_poll.busy();
            }
            let timeout = if idle && !self.idle_poll.keep_polling(now) {
                self.next_wakeup().map(|t| t.saturating_duration_since(now))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                // A worker that stops would leave its share of every port
                // unserved while the process looks healthy: end it all, so
                // the service manager restarts it.
                log::error!("worker {}: poll failed: {e}; aborting", self.id);
                std::process::abort();
            }
            let now = Instant::now();
            if !events.is_empty() {
                self.idle_poll.woken(now, timeout != Some(Duration::ZERO));
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {
                        // Commands, or another worker freed a backend slot.
                        self.slot_freed = true;
                        if !self.commands(now) {
                            return;
                        }
                    }
                    LEASE => self.lease_break(now),
                    Token(t) if t >= LISTENER_BASE => {
                        let i = t - LISTENER_BASE;
                        if !self.backlog.contains(&i) {
                            self.backlog.push(i);
                        }
                    }
                    Token(t) => self.conn_event(t, ev, now),
                }
            }
            self.run_ready(now);
            if self.freed_here {
                self.wake_others();
            }
            if self.slot_freed {
                self.serve_waiting(now);
            }
            self.accept_backlog(now);
            self.fire_timers(now);
            self.files.sweep(now);
            self.bufs.sweep(now);
            self.pipes.sweep(now);
            if let Some(deadline) = self.drain {
                if self.slab.is_empty() {
                    log::debug!("worker {}: drained", self.id);
                    return;
                }
                if now >= deadline {
                    self.close_all(now);
                    return;
                }
            }
        }
    }

    /// Handle commands; false = exit now.
    fn commands(&mut self, now: Instant) -> bool {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Load(generation) => {
                    if let Err(e) = self.load(generation) {
                        log::error!("worker {}: cannot take the new listeners: {e}", self.id);
                    }
                    // The reload may have lowered max_pipes.
                    self.pipes.trim();
                }
                Cmd::EmptyFileCache(done) => {
                    let _ = done.send(self.files.clear());
                }
                Cmd::Drain(deadline) => {
                    self.unlisten();
                    // A worker a reload retired holds the generation it
                    // last loaded: let go of its sockets too.
                    if !self.generation.listeners.is_empty() {
                        self.generation = Arc::new(self.generation.without_listeners(Vec::new()));
                    }
                    self.drain = Some(deadline);
                    self.drain_sessions(now);
                    if now >= deadline {
                        self.close_all(now);
                        return false;
                    }
                }
            }
        }
        true
    }

    fn next_wakeup(&mut self) -> Option<Instant> {
        // Entries of sessions that ended (or were re-filed) go now rather
        // than when they come due: after a burst of short connections they
        // would wake a quiet worker about once a millisecond, for nothing.
        while let Some(&Reverse((t, key, id))) = self.timers.peek() {
            if self.timer_live(t, key, id) {
                break;
            }
            self.timers.pop();
        }
        let t = self.timers.peek().map(|Reverse((t, _, _))| *t);
        let p = self.listeners.iter().filter_map(|l| l.paused_until).min();
        let d = self.drain;
        let f = self.files.next_sweep();
        let b = self.bufs.next_sweep();
        let q = self.pipes.next_sweep();
        [t, p, d, f, b, q].into_iter().flatten().min()
    }

    fn accept_backlog(&mut self, now: Instant) {
        for i in 0..self.listeners.len() {
            if let Some(until) = self.listeners[i].paused_until {
                if now < until || !self.watch_listener(i, now) {
                    continue;
                }
                self.listeners[i].paused_until = None;
                if !self.backlog.contains(&i) {
                    self.backlog.push(i);
                }
            }
        }
        let pending = std::mem::take(&mut self.backlog);
        for i in pending {
            if i < self.listeners.len()
                && self.listeners[i].paused_until.is_none()
                && self.accept(i, now)
            {
                self.backlog.push(i);
            }
        }
    }

    /// Make sure listener `i` is registered with the poll, trying again if
    /// an earlier try failed; false (and another try after ACCEPT_PAUSE)
    /// if it still cannot be.
    fn watch_listener(&mut self, i: usize, now: Instant) -> bool {
        let l = &mut self.listeners[i];
        if l.watched {
            return true;
        }
        let token = Token(LISTENER_BASE + i);
        // A fresh descriptor of the socket: mio (in debug builds) marks a
        // source registered before it asks the kernel, and keeps the mark
        // when that fails.
        let fresh = socket2::SockRef::from(&l.sock)
            .try_clone()
            .map(|s| TcpListener::from_std(s.into()));
        match fresh.and_then(|mut sock| {
            self.poll
                .registry()
                .register(&mut sock, token, Interest::READABLE)
                .map(|()| sock)
        }) {
            Ok(sock) => {
                l.sock = sock;
                l.watched = true;
                log::info!(
                    "worker {}: watching {} now",
                    self.id,
                    l.sock
                        .local_addr()
                        .map_or("a listener".into(), |a| a.to_string())
                );
                true
            }
            Err(e) => {
                log::debug!("worker {}: still cannot watch a listener: {e}", self.id);
                l.paused_until = Some(now + ACCEPT_PAUSE);
                false
            }
        }
    }

    /// Accept up to a batch from listener `i`; true = more may be waiting.
    fn accept(&mut self, i: usize, now: Instant) -> bool {
        let mut errors = 0;
        let mut shed = false;
        for _ in 0..ACCEPT_BATCH {
            match self.listeners[i].sock.accept() {
                Ok((stream, peer)) => {
                    self.admit(i, stream, peer, now);
                    if self.listeners[i].paused_until.is_some() {
                        return false; // that client found no descriptor left
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => match e.raw_os_error() {
                    // Clients come before cached files and idle pipes:
                    // give half of those back and try again, once.
                    Some(libc::EMFILE | libc::ENFILE)
                        if !shed && (self.files.shed() | self.pipes.shed()) =>
                    {
                        log::warn!(
                            "route {}: accept failed: {e}; closed half of the open-file cache \
                             and of the idle pipes",
                            self.listeners[i].route.cfg.name
                        );
                        shed = true;
                    }
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        // Out of descriptors: the client stays in the backlog
                        // and no new edge will come, so rest and retry on a
                        // timer instead of spinning or giving up.
                        log::warn!(
                            "route {}: accept failed: {e}; pausing this listener for {ACCEPT_PAUSE:?}",
                            self.listeners[i].route.cfg.name
                        );
                        self.listeners[i].paused_until = Some(now + ACCEPT_PAUSE);
                        return false;
                    }
                    // The client gave up before we accepted (ECONNABORTED,
                    // EPROTO...): next. An error that keeps coming rests
                    // the listener rather than spin on it.
                    _ => {
                        log::debug!("accept: {e}");
                        errors += 1;
                        if errors >= 16 {
                            log::warn!(
                                "route {}: accept keeps failing ({e}); pausing this listener for {ACCEPT_PAUSE:?}",
                                self.listeners[i].route.cfg.name
                            );
                            self.listeners[i].paused_until = Some(now + ACCEPT_PAUSE);
                            return false;
                        }
                    }
                },
            }
        }
        true
    }

    /// Admission, in order: allow/deny on the socket's address (unless a
    /// PROXY header will name the client), the global and route caps
    /// (counted from accept: a connection waiting for its header holds a
    /// descriptor too), then either the PROXY handshake or the session.
    fn admit(&mut self, li: usize, stream: TcpStream, peer: SocketAddr, now: Instant) {
        let route = self.listeners[li].route.clone();
        let c = route.shared.stats.slot(self.id);
        Counters::inc(&c.conns);
        let acc = Accepted::plain(stream, peer, now);
        let end = if route.cfg.accept_proxy {
            // Only a trusted balancer may send a header; the client it
            // names is judged once the header is in.
            untrusted_sender(&route, acc.peer.ip())
        } else {
            deny(&route, acc.peer.ip())
        };
        if let Some(end) = end.or_else(|| self.take_caps(&route)) {
            self.refused(&route, acc, end, now);
            return;
        }
        c.active.fetch_add(1, Ordering::Relaxed);
        let key = self.slab.vacant_key();
        let id = self.next_id;
        self.next_id += 1;
        if !route.cfg.accept_proxy {
            self.start_session(key, id, route, acc, now);
            return;
        }
        let mut ctx = self.ctx(now);
        let tok = token(key, Side::Client);
        let (h, step) = Handshake::start(route, tok, acc.stream, acc.peer, &mut ctx);
        let entry = Entry {
            id,
            scheduled: h.deadline,
            ip: None,
            sess: Session::Handshake(h),
            queued: false,
            waits: false,
        };
        match step {
            Step::Fail(end) => self.close(entry, end, now),
            Step::Wait | Step::Done => {
                self.timers.push(Reverse((entry.scheduled, key, id)));
                self.slab.insert(entry);
            }
        }
    }

    /// The PROXY header is in: admit the client it names, by the same
    /// rules as a client without a header (the caps are already counted).
    fn hand_over(&mut self, key: usize, h: Handshake, now: Instant) {
        let route = h.route().clone();
        let acc = h.finish();
        if let Some(end) = deny(&route, acc.peer.ip()) {
            self.refused(&route, acc, end, now);
            self.release(&route, None);
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.start_session(key, id, route, acc, now);
    }

    /// Count the client against its IP's limit and start the session its
    /// route runs. The one place a session kind is chosen: a handshake
    /// hands over here too. Global and route caps are already counted.
    fn start_session(
        &mut self,
        key: usize,
        id: u64,
        route: Arc<RouteRt>,
        acc: Accepted,
        now: Instant,
    ) {
        let ip = acc.peer.ip();
        if let Some(end) = self.take_ip(&route, ip) {
            self.refused(&route, acc, end, now);
            self.release(&route, None);
            return;
        }
        let mut ctx = self.ctx(now);
        let (sess, end) = match route.cfg.kind {
            RouteKind::Proxy(_) => {
                let (c, end) = ProxyConn::start(route, key, acc, &mut ctx);
                (Session::Proxy(c), end)
            }
            RouteKind::File(_) => {
                let (c, end) = FileConn::start(route, key, acc, &mut ctx);
                (Session::File(c), end)
            }
        };
        let entry = Entry {
            id,
            scheduled: now,
            ip: Some(ip),
            sess,
            queued: false,
            waits: false,
        };
        match end {
            Some(end) => self.close(entry, end, now),
            None => self.insert_new(key, entry),
        }
    }

    /// Put a new session in the slab at `key` with its timer.
    fn insert_new(&mut self, key: usize, mut entry: Entry) {
        entry.scheduled = entry.deadline();
        self.timers.push(Reverse((entry.scheduled, key, entry.id)));
        if entry.wants_turn() {
            entry.queued = true;
            self.ready.push((key, entry.id));
        }
        if entry.waits_for_backend() {
            entry.waits = true;
            self.wait_list(entry.route().id).push_back((key, entry.id));
        }
        let k = self.slab.insert(entry);
        debug_assert_eq!(k, key);
    }

    /// Turn a client away at once: count, log, and close with a reset
    /// (SO_LINGER 0). A reset frees the socket without leaving TIME_WAIT
    /// behind on sluice's side, which matters most under the floods that
    /// fill limits, and the client learns at once it was refused instead
    /// of reading an EOF that looks like an empty answer.
    fn refused(&self, route: &RouteRt, mut acc: Accepted, end: End, now: Instant) {
        let c = route.shared.stats.slot(self.id);
        match end {
            End::Denied => Counters::inc(&c.denied),
            _ => Counters::inc(&c.limited),
        }
        c.ended(end as usize, now.saturating_duration_since(acc.since));
        let via = acc.via.map(|v| format!(" via={v}")).unwrap_or_default();
        log::info!(
            target: "access",
            "route={} client={} backend=- bytes_in=0 bytes_out=0 duration_ms={} end={}{via}",
            route.cfg.name,
            acc.peer,
            now.saturating_duration_since(acc.since).as_millis(),
            end.as_str()
        );
        if acc.ready.is_some() {
            let _ = self.poll.registry().deregister(&mut acc.stream);
        }
        let _ = socket2::SockRef::from(&acc.stream).set_linger(Some(Duration::ZERO));
    }

    /// Count a new connection against the global and route caps.
    fn take_caps(&self, route: &RouteRt) -> Option<End> {
        if self.shared.active.fetch_add(1, Ordering::AcqRel) >= self.generation.max_connections {
            self.shared.active.fetch_sub(1, Ordering::AcqRel);
            return Some(End::Limited);
        }
        if route.shared.active.fetch_add(1, Ordering::AcqRel) >= route.cfg.max_connections {
            route.shared.active.fetch_sub(1, Ordering::AcqRel);
            self.shared.active.fetch_sub(1, Ordering::AcqRel);
            return Some(End::Limited);
        }
        None
    }

    /// Count a client against `max_connections_per_ip`.
    fn take_ip(&self, route: &RouteRt, ip: IpAddr) -> Option<End> {
        let cap = route.cfg.max_connections_per_ip;
        if cap == 0 {
            return None;
        }
        let mut m = route
            .shared
            .per_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= cap {
            return Some(End::Limited);
        }
        *n += 1;
        None
    }

    /// Undo what `take_caps` (and, with `ip`, `take_ip`) counted.
    fn release(&self, route: &RouteRt, ip: Option<IpAddr>) {
        self.shared.active.fetch_sub(1, Ordering::AcqRel);
        route.shared.active.fetch_sub(1, Ordering::AcqRel);
        route
            .shared
            .stats
            .slot(self.id)
            .active
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = ip
            && route.cfg.max_connections_per_ip > 0
        {
            let mut m = route
                .shared
                .per_ip
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        }
    }

    fn ctx(&mut self, now: Instant) -> Ctx<'_> {
        Ctx {
            pools: Pools {
                pipes: &mut self.pipes,
                bufs: &mut self.bufs,
            },
            files: &mut self.files,
            registry: self.poll.registry(),
            now,
            worker: self.id,
            rng: &mut self.rng,
            freed: &mut self.freed_here,
        }
    }

    fn conn_event(&mut self, t: usize, ev: &Event, now: Instant) {
        let key = t / 2;
        let side = if t.is_multiple_of(2) {
            Side::Client
        } else {
            Side::Backend
        };
        let Some(mut entry) = self.slab.try_remove(key) else {
            return;
        };
        let mut ctx = self.ctx(now);
        let end = match &mut entry.sess {
            Session::Proxy(c) => c.on_event(side, ev, &mut ctx),
            Session::Handshake(h) => match h.on_event(ev) {
                Step::Wait => None,
                Step::Fail(end) => Some(end),
                Step::Done => {
                    if let Session::Handshake(h) = entry.sess {
                        self.hand_over(key, h, now);
                    }
                    return;
                }
            },
            Session::File(c) => c.on_event(ev, &mut ctx),
        };
        self.settle(key, entry, end, now);
    }

    /// Run the sessions that yielded their last turn.
    fn run_ready(&mut self, now: Instant) {
        for (key, id) in std::mem::take(&mut self.ready) {
            if !matches!(self.slab.get(key), Some(e) if e.id == id) {
                continue;
            }
            let mut entry = self.slab.remove(key);
            entry.queued = false;
            let mut ctx = self.ctx(now);
            let end = match &mut entry.sess {
                Session::Proxy(c) => c.resume(&mut ctx),
                Session::Handshake(_) => None,
                Session::File(c) => c.resume(&mut ctx),
            };
            self.settle(key, entry, end, now);
        }
    }

    /// A session of this worker freed a backend slot (or saw a backend
    /// come up) while clients wait for one: try this worker's waiting
    /// clients this turn, and wake the other workers to try theirs.
    fn wake_others(&mut self) {
        self.freed_here = false;
        self.slot_freed = true;
        let wakers = self
            .shared
            .wakers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (i, w) in wakers.iter() {
            if *i != self.id
                && let Err(e) = w.wake()
            {
                log::debug!("worker {}: cannot wake worker {i}: {e}", self.id);
            }
        }
    }

    /// The queue of clients of route `rid` waiting for a backend slot.
    fn wait_list(&mut self, rid: u64) -> &mut VecDeque<(usize, u64)> {
        let i = match self.waiting.iter().position(|q| q.route == rid) {
            Some(i) => i,
            None => {
                self.waiting.push(WaitQueue {
                    route: rid,
                    ..WaitQueue::default()
                });
                self.waiting.len() - 1
            }
        };
        &mut self.waiting[i].queue
    }

    /// Give waiting clients, oldest first, the backend slots that came
    /// free. In each route's queue only the oldest clients try: once one
    /// still finds no slot, the ones behind it would find none either (and
    /// must not overtake it), so a pass costs what it serves, however many
    /// wait.
    fn serve_waiting(&mut self, now: Instant) {
        self.slot_freed = false;
        let mut queues = std::mem::take(&mut self.waiting);
        for WaitQueue { queue, stale, .. } in &mut queues {
            // Clients that ended while waiting behind others left stale
            // places: sweep them once they are half the queue (so a sweep
            // costs at most twice what the stale places did).
            if *stale > 32 && 2 * *stale > queue.len() {
                let slab = &self.slab;
                queue.retain(|&(key, id)| {
                    matches!(slab.get(key), Some(e) if e.id == id && e.waits_for_backend())
                });
                *stale = 0;
            }
            while let Some(&(key, id)) = queue.front() {
                let live =
                    matches!(self.slab.get(key), Some(e) if e.id == id && e.waits_for_backend());
                if !live {
                    queue.pop_front(); // ended while it waited
                    *stale = stale.saturating_sub(1);
                    continue;
                }
                let mut entry = self.slab.remove(key);
                let mut ctx = self.ctx(now);
                let end = match &mut entry.sess {
                    Session::Proxy(c) => c.retry_waiting(&mut ctx),
                    Session::Handshake(_) | Session::File(_) => None,
                };
                let still = end.is_none() && entry.waits_for_backend();
                if !still {
                    queue.pop_front();
                    entry.waits = false;
                }
                self.settle(key, entry, end, now);
                if still {
                    break;
                }
            }
        }
        // Sessions settled during the pass may have joined queues (a client
        // whose connect failed over to a full backend).
        for mut late in std::mem::take(&mut self.waiting) {
            match queues.iter_mut().find(|q| q.route == late.route) {
                Some(q) => {
                    q.queue.append(&mut late.queue);
                    q.stale += late.stale;
                }
                None => queues.push(late),
            }
        }
        queues.retain(|q| !q.queue.is_empty());
        self.waiting = queues;
    }

    /// A graceful stop began: idle HTTP keep-alive connections close now,
    /// busy ones after their current response.
    fn drain_sessions(&mut self, now: Instant) {
        self.each_file(now, |_| true, FileConn::drain);
    }

    /// The lease-break signal fired: let each leased transfer (no other
    /// session is touched) check whether its lease is the one breaking.
    fn lease_break(&mut self, now: Instant) {
        if let Some(s) = self.lease_signal.as_mut() {
            for _ in s.pending() {}
        }
        self.each_file(now, FileConn::holds_lease, FileConn::lease_check);
    }

    /// Run `f` on every file session that `pick` selects, then settle it.
    fn each_file(
        &mut self,
        now: Instant,
        pick: impl Fn(&FileConn) -> bool,
        f: impl Fn(&mut FileConn, &mut Ctx) -> Option<End>,
    ) {
        let keys: Vec<usize> = self
            .slab
            .iter()
            .filter(|(_, e)| matches!(&e.sess, Session::File(c) if pick(c)))
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            let mut entry = self.slab.remove(key);
            let mut ctx = self.ctx(now);
            let end = match &mut entry.sess {
                Session::File(c) => f(c, &mut ctx),
                Session::Proxy(_) | Session::Handshake(_) => None,
            };
            self.settle(key, entry, end, now);
        }
    }

    /// Put a session back after it ran, or close it.
    fn settle(&mut self, key: usize, mut entry: Entry, end: Option<End>, now: Instant) {
        match end {
            Some(end) => self.close(entry, end, now),
            None => {
                let d = entry.deadline();
                if d < entry.scheduled {
                    entry.scheduled = d;
                    self.timers.push(Reverse((d, key, entry.id)));
                }
                if entry.wants_turn() && !entry.queued {
                    entry.queued = true;
                    self.ready.push((key, entry.id));
                }
                if entry.waits_for_backend() {
                    if !entry.waits {
                        entry.waits = true;
                        self.wait_list(entry.route().id).push_back((key, entry.id));
                    }
                } else if entry.waits {
                    // It stopped waiting by itself (its own timer found a
                    // backend to try): the place it left is stale, and a
                    // later wait (that connect failing over to a full
                    // backend) must queue it again, or no freed slot would
                    // ever reach it.
                    entry.waits = false;
                    if let Some(q) = self
                        .waiting
                        .iter_mut()
                        .find(|q| q.route == entry.route().id)
                    {
                        q.stale += 1;
                    }
                }
                let k = self.slab.insert(entry);
                debug_assert_eq!(k, key);
            }
        }
    }

    fn close(&mut self, entry: Entry, end: End, now: Instant) {
        let route = entry.route().clone();
        if entry.waits {
            // Its place in the queue is stale now; enough of them call
            // for a pass, which sweeps them.
            if let Some(q) = self.waiting.iter_mut().find(|q| q.route == route.id) {
                q.stale += 1;
                if q.stale > 32 && 2 * q.stale > q.queue.len() {
                    self.slot_freed = true;
                }
            }
        }
        let starved = match &entry.sess {
            Session::Proxy(c) => c.shortage(),
            _ => None,
        };
        let fallback = matches!(end, End::ConnectFailed | End::NoBackend | End::QueueTimeout)
            && route.proxy().is_some_and(|p| p.fallback_file.is_some());
        let key = self.slab.vacant_key();
        let mut ctx = self.ctx(now);
        match entry.sess {
            Session::Proxy(c) if fallback => {
                // The client stays: it gets the route's fallback file.
                let h = c.into_client(&mut ctx);
                let (f, fend) = FileConn::fallback(route.clone(), key, h, end, &mut ctx);
                let entry = Entry {
                    id: self.next_id,
                    scheduled: now,
                    ip: entry.ip,
                    sess: Session::File(f),
                    queued: false,
                    waits: false,
                };
                self.next_id += 1;
                match fend {
                    // The fallback session is over already: close it
                    // (no fallback of a fallback: the end is not a proxy's).
                    Some(fend) => self.close(entry, fend, now),
                    None => self.insert_new(key, entry),
                }
                if starved.is_some() {
                    self.after_close(starved, now);
                }
                return;
            }
            Session::Proxy(c) => c.close(end, &mut ctx),
            Session::Handshake(h) => h.close(end, &mut ctx),
            Session::File(c) => c.close(end, &mut ctx),
        }
        self.release(&route, entry.ip);
        self.after_close(starved, now);
    }

    /// A closed session gave its descriptors back, so listeners resting
    /// after EMFILE may accept again now rather than at their timer —
    /// unless the session ended for want of something local itself
    /// (descriptors, kernel memory, epoll watches): then every listener
    /// rests, and queued clients wait in the backlog instead of being
    /// accepted only to be dropped (as HAProxy and nginx do on EMFILE).
    fn after_close(&mut self, starved: Option<Shortage>, now: Instant) {
        if let Some(short) = starved {
            log::warn!(
                "worker {}: {}; pausing accepts for {ACCEPT_PAUSE:?}",
                self.id,
                short.what()
            );
            if short != Shortage::EpollWatches {
                // Connections come before cached files and idle pipes,
                // which hold descriptors and memory (not epoll watches).
                self.files.shed();
                self.pipes.shed();
            }
        }
        for (i, l) in self.listeners.iter_mut().enumerate() {
            if !l.watched {
                continue; // rests until its next try to be watched
            }
            if starved.is_some() {
                l.paused_until.get_or_insert(now + ACCEPT_PAUSE);
            } else if l.paused_until.take().is_some() && !self.backlog.contains(&i) {
                self.backlog.push(i);
            }
        }
    }

    /// Whether a heap entry is its session's current one.
    fn timer_live(&self, t: Instant, key: usize, id: u64) -> bool {
        live_timer(&self.slab, t, key, id)
    }

    fn fire_timers(&mut self, now: Instant) {
        // Entries of closed or re-filed sessions wait in the heap until
        // they come due (up to an idle timeout away); under a high
        // connection rate, sweep them out instead of letting the heap grow.
        if self.timers.len() > 2 * self.slab.len() + 1024 {
            let slab = &self.slab;
            self.timers
                .retain(|&Reverse((t, k, id))| live_timer(slab, t, k, id));
        }
        while let Some(&Reverse((t, key, id))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if !self.timer_live(t, key, id) {
                continue; // stale: the session ended or was re-filed
            }
            let mut entry = self.slab.remove(key);
            let d = entry.deadline();
            let end = if d > now {
                None
            } else {
                let mut ctx = self.ctx(now);
                match &mut entry.sess {
                    Session::Proxy(c) => c.on_timeout(&mut ctx),
                    Session::Handshake(h) => match h.on_timeout(now) {
                        Step::Fail(end) => Some(end),
                        Step::Wait | Step::Done => None,
                    },
                    Session::File(c) => c.on_timeout(&mut ctx),
                }
            };
            if end.is_none() {
                entry.scheduled = entry.deadline();
                self.timers.push(Reverse((entry.scheduled, key, entry.id)));
            }
            self.settle(key, entry, end, now);
        }
    }

    fn close_all(&mut self, now: Instant) {
        let keys: Vec<usize> = self.slab.iter().map(|(k, _)| k).collect();
        for k in keys {
            let entry = self.slab.remove(k);
            self.close(entry, End::Shutdown, now);
        }
    }
}

/// Refused by `allow`/`deny` (`deny` wins; an empty `allow` admits all).
fn deny(route: &RouteRt, ip: IpAddr) -> Option<End> {
    let cfg = &route.cfg;
    let denied = cfg.deny.iter().any(|n| n.contains(&ip))
        || (!cfg.allow.is_empty() && !cfg.allow.iter().any(|n| n.contains(&ip)));
    denied.then_some(End::Denied)
}

/// `accept_proxy_from` is set and `ip` is not in it: a peer that is not
/// one of the route's balancers may not name a client.
fn untrusted_sender(route: &RouteRt, ip: IpAddr) -> Option<End> {
    let from = &route.cfg.accept_proxy_from;
    (!from.is_empty() && !from.iter().any(|n| n.contains(&ip))).then_some(End::Denied)
}

/// Make a waker for a worker's poll (before the worker thread starts).
pub fn waker(poll: &Poll) -> io::Result<Waker> {
    Waker::new(poll.registry(), WAKER)
}

/// Whether the timer heap entry (`t`, `key`, `id`) is the current one of a
/// live session (not one that ended, or whose entry was replaced by an
/// earlier one).
fn live_timer(slab: &Slab<Entry>, t: Instant, key: usize, id: u64) -> bool {
    slab.get(key)
        .is_some_and(|e| e.id == id && e.scheduled == t)
}
