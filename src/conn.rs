//! The proxied connection: one client socket, one backend socket, two
//! flows, and the state machine that ties them together.
//!
//! ```text
//!   accept ──► Connecting ──(writable, no error)──► Relaying ──► closed
//!     │           │  ▲                                  │
//!     │  refused/timeout└── next backend                ├─ both flows done (FIN each way)
//!     │           ▼                                     ├─ idle_timeout
//!     │    ConnectFailed (all tried)                    └─ reset / error (RST the other peer)
//!     │
//!     └─(every backend that is up is full)─► Waiting ──(a slot frees)──► Connecting
//!                                               └──(queue_timeout)──► closed (or fallback_file)
//! ```
//!
//! The worker owns connections in a slab and routes each mio event here
//! with the side it came from. The connection remembers each socket's
//! readiness (edge-triggered: a flag stays set until a syscall says
//! WouldBlock), runs both flows, fits each socket's epoll registration
//! to what the flows still need to hear (`arm`), and answers with
//! `Some(End)` when it is over; the worker then calls `close`, which logs
//! the access line and updates the counters.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::file_conn::OpenFiles;
use crate::handshake::Accepted;
use crate::pump::{Fallback, Flow, FlowError, FlowParams, Pools, Ready};
use crate::route::{Attempts, RouteRt};
use crate::stats::Counters;

/// Which socket of a connection an event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client = 0,
    Backend = 1,
}

/// How a connection ended (the access log's `end=` field and the
/// `sluice_connections_ended_total{reason}` counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions finished; the client sent its FIN first.
    ClientClosed = 0,
    /// Both directions finished; the backend sent its FIN first.
    BackendClosed = 1,
    IdleTimeout = 2,
    /// Every backend refused or timed out.
    ConnectFailed = 3,
    /// No backend was up to try.
    NoBackend = 4,
    ClientReset = 5,
    BackendReset = 6,
    ClientError = 7,
    BackendError = 8,
    /// Closed by a graceful stop that ran out of time.
    Shutdown = 9,
    /// Refused by a connection limit.
    Limited = 10,
    /// Refused by allow/deny.
    Denied = 11,
    /// `accept_proxy`: the PROXY header was malformed, too long, or did
    /// not arrive within header_timeout.
    BadProxyHeader = 12,
    /// Every backend that was up stayed at its `max_connections` for the
    /// route's whole `queue_timeout`.
    QueueTimeout = 13,
    /// File routes: a response was cut short (the file shrank, its lease
    /// was broken, a raw file could not be opened); the client is reset.
    Truncated = 14,
}

impl End {
    pub const ALL: [End; crate::stats::END_KINDS] = [
        End::ClientClosed,
        End::BackendClosed,
        End::IdleTimeout,
        End::ConnectFailed,
        End::NoBackend,
        End::ClientReset,
        End::BackendReset,
        End::ClientError,
        End::BackendError,
        End::Shutdown,
        End::Limited,
        End::Denied,
        End::BadProxyHeader,
        End::QueueTimeout,
        End::Truncated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::BackendClosed => "backend_closed",
            End::IdleTimeout => "idle_timeout",
            End::ConnectFailed => "connect_failed",
            End::NoBackend => "no_backend",
            End::ClientReset => "client_reset",
            End::BackendReset => "backend_reset",
            End::ClientError => "client_error",
            End::BackendError => "backend_error",
            End::Shutdown => "shutdown",
            End::Limited => "limit",
            End::Denied => "denied",
            End::BadProxyHeader => "bad_proxy_header",
            End::QueueTimeout => "queue_timeout",
            End::Truncated => "truncated",
        }
    }
}

/// What the worker lends a connection while it handles an event.
pub struct Ctx<'a> {
    pub pools: Pools<'a>,
    pub files: &'a mut OpenFiles,
    pub registry: &'a Registry,
    pub now: Instant,
    pub worker: usize,
    pub rng: &'a mut u64,
    /// Set when a backend slot may have come free for clients waiting on
    /// it (a slot was given back, or a backend came up): the worker then
    /// tries its waiting clients and wakes the other workers.
    pub freed: &'a mut bool,
}

/// Watch a client socket for both directions (edge-triggered) under its
/// token, or move an already registered one to it (`again`). On failure
/// the client cannot be served: log it; the caller closes it.
pub fn watch_client(
    ctx: &Ctx,
    route: &RouteRt,
    sock: &mut TcpStream,
    peer: SocketAddr,
    key: usize,
    again: bool,
) -> bool {
    let (tok, both) = (
        token(key, Side::Client),
        Interest::READABLE | Interest::WRITABLE,
    );
    let res = if again {
        ctx.registry.reregister(sock, tok, both)
    } else {
        ctx.registry.register(sock, tok, both)
    };
    if let Err(e) = &res {
        log::warn!(
            "route {}: cannot register client {peer}: {e}",
            route.cfg.name
        );
    }
    res.is_ok()
}

/// What a relayed socket is registered for, and what decides it (see
/// `ProxyConn::arm`).
#[derive(Debug, Clone, Copy)]
struct Watch {
    read: bool,
    write: bool,
    /// A write to this socket has waited for room: keep writable on.
    blocked: bool,
    /// A "writable" came that no write was waiting for.
    idle_write: bool,
}

impl Watch {
    /// As registered at the start: both directions.
    const BOTH: Watch = Watch {
        read: true,
        write: true,
        blocked: false,
        idle_write: false,
    };

    /// Never nothing (see `ProxyConn::arm`): writable when neither is
    /// asked for.
    fn interest(read: bool, write: bool) -> Interest {
        match (read, write) {
            (true, true) => Interest::READABLE | Interest::WRITABLE,
            (true, false) => Interest::READABLE,
            (false, _) => Interest::WRITABLE,
        }
    }
}

/// Token for one side of the connection stored at slab `key`.
pub fn token(key: usize, side: Side) -> Token {
    Token(key * 2 + side as usize)
}

/// A client handed from a proxy connection that found no backend to the
/// file session that sends it the route's `fallback_file`.
pub struct Handover {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// When it was accepted (its access line's `duration_ms` counts from here).
    pub since: Instant,
    /// How long it waited for a backend slot.
    pub queue_ms: u128,
}

pub struct ProxyConn {
    route: Arc<RouteRt>,
    key: usize,
    client: TcpStream,
    /// The client as sluice treats it (a PROXY header's source, if any).
    peer: SocketAddr,
    /// The destination a PROXY header gave; else this socket's local
    /// address is what `send_proxy` announces.
    dst: Option<SocketAddr>,
    /// The socket's real peer when a PROXY header named the client.
    via: Option<SocketAddr>,
    /// Client bytes read before the relay (after a PROXY header); they go
    /// to the backend first, right after any header sluice sends.
    early: Vec<u8>,
    cr: Ready,
    backend: Option<TcpStream>,
    br: Ready,
    /// Index of the backend connected or being connected to.
    bidx: Option<usize>,
    connecting: bool,
    /// Where this connection is in its backend order.
    attempts: Attempts,
    /// Why the last connect attempt failed, for the log.
    last_err: Option<io::Error>,
    up: Flow,
    down: Flow,
    started: Instant,
    /// When the connect (while connecting) or idle timer fires.
    pub deadline: Instant,
    /// Which side sent the first FIN.
    first_fin: Option<Side>,
    /// Flow totals already added to the route counters:
    /// (up spliced, up copied, down spliced, down copied).
    reported: [u64; 4],
    /// The backend stopped reading and its answer is delivered: waiting
    /// (at most `LINGER`) for the client's FIN before closing.
    lingering: bool,
    /// The backend reset the connection: the error, and how long to wait
    /// for the client to take what it was sent before resetting it too.
    reset: Option<(io::Error, Instant)>,
    /// What each socket (by `Side`) is registered for; see `arm`.
    watch: [Watch; 2],
    /// When the client's wait for a slot ends: set when it first waits,
    /// kept for its life, so failovers cannot stretch the wait.
    wait_until: Option<Instant>,
    /// Time spent waiting for a slot over the waits that ended, and when
    /// the current wait began (`Some` exactly while waiting for a slot,
    /// `max_connections`): the access log's `queue_ms`.
    queued: std::time::Duration,
    wait_began: Option<Instant>,
    /// When the first connect attempt after the last wait started, and
    /// when a connect completed: the access log's `connect_ms` (failed
    /// attempts and failovers included, as HAProxy's Tc), with `retries`
    /// the attempts that failed.
    connect_began: Option<Instant>,
    connected_at: Option<Instant>,
    retries: u32,
}

impl ProxyConn {
    /// Start a connection for an accepted client: register it (unless a
    /// handshake already did) and begin connecting to a backend. An `End`
    /// means it is over already (no backend could be tried): close it.
    pub fn start(
        route: Arc<RouteRt>,
        key: usize,
        acc: Accepted,
        ctx: &mut Ctx,
    ) -> (ProxyConn, Option<End>) {
        let peer = acc.peer;
        let registered = acc.ready.is_some();
        let p = route.proxy().expect("proxy route");
        let params = FlowParams {
            strategy: p.strategy,
            pipe_size: p.pipe_size,
            buffer_size: p.buffer_size,
        };
        let mut conn = ProxyConn {
            key,
            client: acc.stream,
            peer,
            dst: acc.dst,
            via: acc.via,
            early: acc.early,
            cr: acc.ready.unwrap_or_default(),
            backend: None,
            br: Ready::default(),
            bidx: None,
            connecting: false,
            attempts: Attempts::default(),
            last_err: None,
            up: Flow::new(params).after_reading(acc.consumed),
            down: Flow::new(params),
            started: acc.since,
            deadline: ctx.now,
            first_fin: None,
            reported: [0; 4],
            lingering: false,
            reset: None,
            watch: [Watch::BOTH; 2],
            wait_until: None,
            queued: std::time::Duration::ZERO,
            wait_began: None,
            connect_began: None,
            connected_at: None,
            retries: 0,
            route,
        };
        // TCP_NODELAY came with the socket: the listener has it.
        // A handshake already registered the socket under this same token.
        if !registered && !watch_client(ctx, &conn.route, &mut conn.client, peer, key, false) {
            return (conn, Some(End::ClientError));
        }
        let end = conn.connect_next(ctx).err();
        (conn, end)
    }

    pub fn route(&self) -> &Arc<RouteRt> {
        &self.route
    }

    /// What this process ran short of, if opening or watching a backend
    /// socket failed for want of it (a relayed connection's error, kept
    /// for the access line, says nothing about that).
    pub fn shortage(&self) -> Option<Shortage> {
        if self.backend.is_some() {
            return None;
        }
        self.last_err.as_ref().and_then(shortage)
    }

    /// Try backends in balance order until a non-blocking connect starts;
    /// if the only backends left are up but full, wait for a slot.
    ///
    /// Every backend that could take the client is up but at its
    /// `max_connections`: wait, as HAProxy's queue does, at most
    /// `queue_timeout` (none: give up at once). The worker tries again
    /// (`retry_waiting`) whenever a slot may have come free: a connection
    /// holding one ended or failed over (`slot_news`, on any worker), or a
    /// backend came up (a health check, or a passive retry that
    /// connected).
    fn connect_next(&mut self, ctx: &mut Ctx) -> Result<(), End> {
        if let Some(started) = self.try_backends(ctx) {
            return started;
        }
        if self.attempts.full {
            if self.is_waiting() {
                return Ok(()); // still full: keep the place
            }
            // Announce the wait, then look once more: a slot given back
            // between the first look and the announcement was given back
            // by someone who saw nobody waiting, and would wake no one
            // (both sides use SeqCst, so one of them sees the other).
            self.start_waiting(ctx)?;
            self.attempts = Attempts::default();
            if let Some(started) = self.try_backends(ctx) {
                return started;
            }
            if self.attempts.full {
                return Ok(());
            }
            self.stop_waiting(ctx.now);
        }
        if self.last_err.is_some() {
            Err(End::ConnectFailed)
        } else {
            Err(End::NoBackend)
        }
    }

    /// Walk the balance order from where `attempts` is: `Some` once a
    /// connect started (or cannot, for want of descriptors), `None` when
    /// every backend was down, failed, or full (`attempts.full`).
    fn try_backends(&mut self, ctx: &mut Ctx) -> Option<Result<(), End>> {
        let connect_timeout = self.route.proxy().expect("proxy route").connect_timeout;
        while let Some(i) = self.route.pick(self.peer.ip(), &mut self.attempts, ctx.rng) {
            // Full primaries make clients wait; they do not spill over to
            // the backups, which stand in only for primaries that are down.
            if self.attempts.full && self.route.backup_behind_primaries(i) {
                continue;
            }
            if !self.route.take_slot(i) {
                self.attempts.full = true;
                continue;
            }
            let b = &self.route.backends[i];
            match TcpStream::connect(b.addr) {
                Ok(mut s) => {
                    if let Err(e) = ctx.registry.register(
                        &mut s,
                        token(self.key, Side::Backend),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        // epoll refused the socket (ENOMEM, ENOSPC past
                        // fs.epoll.max_user_watches): a limit of this
                        // machine, not the backend's fault.
                        return Some(Err(self.local_failure(i, e, ctx)));
                    }
                    self.stop_waiting(ctx.now);
                    self.connect_began.get_or_insert(ctx.now);
                    if let Some(k) = &self.route.cfg.tcp_keepalive {
                        let ka = crate::keepalive::backend_params(k);
                        if let Err(e) = socket2::SockRef::from(&s).set_tcp_keepalive(&ka) {
                            log::debug!("client {}: backend keepalive not set: {e}", self.peer);
                        }
                    }
                    self.backend = Some(s);
                    self.bidx = Some(i);
                    self.br = Ready::default();
                    self.watch[Side::Backend as usize] = Watch::BOTH;
                    self.connecting = true;
                    self.deadline = ctx.now + connect_timeout;
                    return Some(Ok(()));
                }
                Err(e) if local_exhaustion(&e) => {
                    return Some(Err(self.local_failure(i, e, ctx)));
                }
                Err(e) => {
                    self.give_back(i, ctx);
                    self.connect_failed(i, e, ctx);
                }
            }
        }
        None
    }

    /// No socket to backend `i` could be opened or watched because this
    /// process or machine ran out of something (descriptors, memory, epoll
    /// watches): not a backend fault, so no passive-health blame, and no
    /// point trying the others now.
    fn local_failure(&mut self, i: usize, e: io::Error, ctx: &mut Ctx) -> End {
        self.give_back(i, ctx);
        log::warn!(
            "route {}: cannot open a socket to a backend for client {}: {e}",
            self.route.cfg.name,
            self.peer
        );
        self.last_err = Some(e);
        self.stop_waiting(ctx.now);
        End::ConnectFailed
    }

    /// Begin waiting for a slot, until `queue_timeout` after the first
    /// time this client waited.
    fn start_waiting(&mut self, ctx: &mut Ctx) -> Result<(), End> {
        let wait = self.route.proxy().expect("proxy route").queue_timeout;
        if wait.is_zero() {
            return Err(End::QueueTimeout);
        }
        let until = *self.wait_until.get_or_insert(ctx.now + wait);
        if ctx.now >= until {
            return Err(End::QueueTimeout);
        }
        self.route.shared.waiting.fetch_add(1, Ordering::SeqCst);
        self.wait_began = Some(ctx.now);
        // Connect time counts again from the attempt after this wait.
        self.connect_began = None;
        self.deadline = self.next_look(ctx.now, until);
        Ok(())
    }

    /// When a waiting client looks for a backend by itself: at the end of
    /// its wait; or, without active health checks and with a backend down,
    /// after a health `interval`, since only a client's own connect can
    /// bring such a backend back (`health::claim_retry`) and no event
    /// will say when it is due.
    fn next_look(&self, now: Instant, until: Instant) -> Instant {
        let p = self.route.proxy().expect("proxy route");
        if !p.health.active && self.route.backends.iter().any(|b| !b.is_up()) {
            until.min(now + p.health.interval)
        } else {
            until
        }
    }

    /// Give back the slot of backend `i` and tell waiting clients.
    fn give_back(&self, i: usize, ctx: &mut Ctx) {
        self.route.release_slot(i);
        self.slot_news(ctx);
    }

    /// Backend `i` gave back a slot, or came up: let waiting clients know.
    fn slot_news(&self, ctx: &mut Ctx) {
        if self.route.shared.waiting.load(Ordering::SeqCst) > 0 {
            *ctx.freed = true;
        }
    }

    /// Leave the wait for a slot, if waiting.
    fn stop_waiting(&mut self, now: Instant) {
        if let Some(began) = self.wait_began.take() {
            self.route.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            self.queued += now.saturating_duration_since(began);
        }
    }

    /// Milliseconds spent waiting for a slot so far (a wait still going
    /// counts up to `now`).
    fn queue_ms(&self, now: Instant) -> u128 {
        let current = self.wait_began.map_or(std::time::Duration::ZERO, |b| {
            now.saturating_duration_since(b)
        });
        (self.queued + current).as_millis()
    }

    /// Count the whole wait for a slot into the route's histogram, once
    /// the wait is over for good, if the client waited at all.
    fn observe_queue(&self, c: &Counters) {
        if self.wait_until.is_some() {
            c.queued.observe(self.queued);
        }
    }

    /// Waiting for a backend slot.
    pub fn is_waiting(&self) -> bool {
        self.wait_began.is_some()
    }

    /// A slot may have come free: try the backends again, from the top of
    /// the balance order.
    pub fn retry_waiting(&mut self, ctx: &mut Ctx) -> Option<End> {
        if !self.is_waiting() {
            return None;
        }
        self.attempts = Attempts::default();
        self.connect_next(ctx).err()
    }

    /// Record a failed attempt on backend `i` (passive health) and drop
    /// the socket, if any.
    fn connect_failed(&mut self, i: usize, e: io::Error, ctx: &mut Ctx) {
        let b = &self.route.backends[i];
        log::warn!(
            "route {}: backend {} ({}) connect failed for client {}: {e}",
            self.route.cfg.name,
            self.route.backend_name(i),
            b.addr,
            self.peer
        );
        b.failures.fetch_add(1, Ordering::Relaxed);
        self.retries += 1;
        Counters::inc(&self.route.shared.stats.slot(ctx.worker).connect_failures);
        crate::health::passive_failure(&self.route, i);
        self.last_err = Some(e);
    }

    /// Abandon the backend being connected to and try the next one.
    fn retry(&mut self, e: io::Error, ctx: &mut Ctx) -> Option<End> {
        // Dropping the socket closes its only descriptor, which also takes it
        // out of the poll: no epoll_ctl needed (here and on every close).
        if let (Some(s), Some(i)) = (self.backend.take(), self.bidx.take()) {
            drop(s);
            self.give_back(i, ctx);
            self.connect_failed(i, e, ctx);
        }
        self.connecting = false;
        self.connect_next(ctx).err()
    }

    /// Handle readiness on one side. `Some(end)` means: close now.
    pub fn on_event(&mut self, side: Side, ev: &mio::event::Event, ctx: &mut Ctx) -> Option<End> {
        let r = match side {
            Side::Client => &mut self.cr,
            Side::Backend => &mut self.br,
        };
        r.update(ev);
        if ev.is_writable() && !ev.is_readable() && !ev.is_error() && !ev.is_read_closed() {
            let to = match side {
                Side::Client => &self.down,
                Side::Backend => &self.up,
            };
            // (After a shutdown(2) a socket reports writable on every state
            // change: not a reason to change anything.)
            self.watch[side as usize].idle_write |=
                to.pending() == 0 && !to.shut && !self.connecting;
        }

        if side == Side::Client && (self.is_waiting() || self.connecting) && ev.is_error() {
            // Reset while waiting for a backend, or while one is being
            // connected to: end now. Its place, or the slot and the
            // connect, go to others; the edge will not come again, so a
            // client left in place would hold them until its timers ran
            // out, or be connected for nothing.
            return Some(End::ClientReset);
        }
        if side == Side::Backend && self.connecting {
            let s = self.backend.as_ref()?;
            match connect_outcome(s, ev) {
                Ok(true) => {
                    self.connecting = false;
                    self.connected_at = Some(ctx.now);
                    let _ = s.set_nodelay(true);
                    if let Some(i) = self.bidx {
                        if crate::health::passive_success(&self.route, i) {
                            self.slot_news(ctx);
                        }
                        let b = &self.route.backends[i];
                        b.total.fetch_add(1, Ordering::Relaxed);
                        // The attempt started connect_timeout before the
                        // deadline it set (no field spent on it: this
                        // struct is most of an idle connection's memory).
                        let p = self.route.proxy().expect("proxy route");
                        let began = self.deadline.checked_sub(p.connect_timeout);
                        let took = began.map_or(std::time::Duration::ZERO, |b| {
                            ctx.now.saturating_duration_since(b)
                        });
                        b.connect_time.observe(took);
                    }
                    self.deadline = ctx.now + self.route.cfg.idle_timeout;
                    self.preload(ctx);
                }
                Ok(false) => return None, // still connecting
                Err(e) => return self.retry(e, ctx),
            }
        }
        if self.connecting || self.backend.is_none() {
            return None;
        }
        let end = self.relay(ctx);
        // A client's error the flows did not meet (nothing to read into,
        // nothing to write to it: its bytes wait for a backend that is not
        // reading) is not reported again: take it now, so the connection
        // ends as the client's reset, and the backend's cut upload with a
        // reset too, instead of living on to its idle timeout. A backend's
        // is left to the client's flow, which meets it once it has
        // delivered what the backend sent before it.
        if end.is_none()
            && side == Side::Client
            && ev.is_error()
            && let Ok(Some(e)) = self.client.take_error()
        {
            return Some(self.fail(Side::Client, &e));
        }
        end
    }

    /// The backend just connected: queue what it must receive before any
    /// new client byte — the PROXY header (`send_proxy`), then the client
    /// bytes a handshake read past its header.
    fn preload(&mut self, ctx: &mut Ctx) {
        let mut pools = Pools {
            pipes: ctx.pools.pipes,
            bufs: ctx.pools.bufs,
        };
        if let Some(v) = self.route.proxy().and_then(|p| p.send_proxy) {
            let dst = match self.dst {
                Some(d) => d,
                None => self.client.local_addr().unwrap_or_else(|e| {
                    log::debug!("client {}: no local address: {e}", self.peer);
                    SocketAddr::new(unspecified(self.peer), 0)
                }),
            };
            let header = crate::proxy_proto::build(v, self.peer, dst);
            self.up.preload(&header, false, &mut pools);
        }
        let early = std::mem::take(&mut self.early);
        self.up.preload(&early, true, &mut pools);
    }

    /// Run both flows until neither can progress, then fit each socket's
    /// registration to what the flows still need to hear (`arm`).
    fn relay(&mut self, ctx: &mut Ctx) -> Option<End> {
        if let Some(end) = self.run_flows(ctx) {
            return Some(end);
        }
        self.arm(Side::Client, ctx)
            .or_else(|| self.arm(Side::Backend, ctx))
    }

    /// Fit one socket's registration to what the flows still need to
    /// hear from it: most of a bulk transfer's wake-ups were for nothing.
    ///
    /// * Readable: not needed while the flow reading it holds bytes for a
    ///   destination that is not taking them and already knows the source
    ///   is readable. It stopped with its buffer full, or with bytes in a
    ///   pipe that splice could not add to (full, or the source empty: an
    ///   EAGAIN cannot tell), and it reads again by itself after its next
    ///   write (a socket stays "readable" until a read says WouldBlock).
    ///   Left on, every segment a fast sender sends wakes the worker while
    ///   it waits for a slower receiver. Dropped then, added back once the
    ///   flow holds nothing or a read drains the socket (a flow that drops
    ///   what it reads, after its destination went away, holds nothing: it
    ///   is always watched).
    /// * Writable: needed while the opposite flow waits to write to it, and
    ///   kept on a socket a write once blocked on. Otherwise dropped with
    ///   readable, or lazily after a "writable" came that nobody needed:
    ///   with edge triggering, a readable socket whose bytes were already
    ///   read when the worker collects its event reports just "writable",
    ///   a wake-up for nothing.
    ///
    /// A direction that is over changes nothing, and while a flow is due
    /// another turn (`more`) interests are only added, never dropped.
    /// Adding one re-polls the socket, so what happened in between still
    /// raises an event. A steady transfer changes a registration only when
    /// it changes regime; a short connection, not at all. A socket is never
    /// watched for nothing: when neither is needed, writable stays, which
    /// costs an event only when the socket's state changes and still
    /// reports its reset or error (EPOLLERR, EPOLLHUP come with any
    /// interest). A client's is then taken at once (`on_event`); a
    /// backend's is met by the next read, which its flow makes as soon as
    /// the client takes bytes again (or the idle timeout ends it).
    ///
    /// `Some(end)`: an interest the flows need could not be added, so the
    /// connection could wait forever: close it.
    fn arm(&mut self, side: Side, ctx: &mut Ctx) -> Option<End> {
        let (sock, ready, from, to) = match side {
            Side::Client => (&mut self.client, &self.cr, &self.up, &self.down),
            Side::Backend => match self.backend.as_mut() {
                Some(b) => (b, &self.br, &self.down, &self.up),
                None => return None,
            },
        };
        let w = &mut self.watch[side as usize];
        let mut read = if from.eof {
            w.read
        } else {
            !ready.read || from.pending() == 0
        };
        let wants_write = to.pending() > 0 && !ready.write;
        w.blocked |= wants_write;
        // Writable stays while a write waits or once blocked; else it goes
        // after a useless "writable", or together with readable (one
        // epoll_ctl instead of two, and no "writable" from the re-poll).
        let mut write = if to.shut {
            w.write
        } else {
            wants_write || (w.write && (w.blocked || (read && !w.idle_write)))
        };
        if from.more || to.more {
            // resumed next turn either way: only what is missing
            (read, write) = (read || w.read, write || w.write);
        } else {
            w.idle_write = false;
        }
        // Never watch for nothing: a writable-only registration still
        // hears EPOLLERR and EPOLLHUP, and a socket nobody waits to write
        // to raises its edges only when its state changes.
        if !read && !write {
            write = true;
        }
        if (read, write) == (w.read, w.write) {
            return None;
        }
        let needed = (read && !w.read) || (write && !w.write);
        let tok = token(self.key, side);
        let i = Watch::interest(read, write);
        let res = if w.read || w.write {
            ctx.registry.reregister(sock, tok, i)
        } else {
            ctx.registry.register(sock, tok, i)
        };
        match res {
            Ok(()) => (w.read, w.write) = (read, write),
            Err(e) if needed => {
                log::warn!(
                    "route {}: client {}: cannot watch the {side:?} socket: {e}",
                    self.route.cfg.name,
                    self.peer
                );
                // Both streams are cut here: reset both peers.
                self.reset_peer(side);
                return Some(self.fail(side, &e));
            }
            // Still registered for more than needed: wake-ups to spare.
            Err(e) => log::debug!("client {}: {side:?} watch unchanged: {e}", self.peer),
        }
        None
    }

    fn run_flows(&mut self, ctx: &mut Ctx) -> Option<End> {
        let backend = self.backend.as_ref()?;
        let mut pools = Pools {
            pipes: ctx.pools.pipes,
            bufs: ctx.pools.bufs,
        };
        self.up.closes_after(&self.down);
        let up = self.up.run(
            &self.client,
            &mut self.cr,
            backend,
            &mut self.br,
            &mut pools,
        );
        let up = match up {
            Ok(n) => n,
            Err(FlowError::Read(e)) => return Some(self.fail(Side::Client, &e)),
            Err(FlowError::Write(e)) if is_reset(&e) => {
                // The backend stopped reading (it answered and closed, say
                // a 413 during an upload). Its answer may still be on the
                // way: keep relaying it, and drop what the client sends.
                // ECONNRESET: the reset came before any FIN and ended its
                // stream (this write took the error, so its reads will say
                // end-of-stream): the client gets a reset after what is
                // queued, as from a read that met it, never a FIN that
                // would make a cut answer look whole. EPIPE: the reset
                // came after its FIN (Linux reports a reset in CLOSE_WAIT
                // so), the stream is whole and its FIN passes on; or an
                // earlier splice to it took the ECONNRESET and returned
                // the bytes it moved: the read that meets the end asks the
                // kernel which (`Flow::closes_after`, `sys::ended_by_reset`).
                log::debug!(
                    "route {}: client {}: backend stopped reading ({e}); finishing its answer",
                    self.route.cfg.name,
                    self.peer
                );
                self.up.abort(&mut pools);
                if e.kind() == io::ErrorKind::ConnectionReset {
                    self.down.source_reset_pending();
                }
                0
            }
            Err(FlowError::Write(e)) => return Some(self.fail(Side::Backend, &e)),
        };
        if self.up.ended_by_reset() {
            // The client's reset, found at its end of stream (a splice to
            // it took the error): as a read that met it.
            let e = io::Error::from(io::ErrorKind::ConnectionReset);
            return Some(self.fail(Side::Client, &e));
        }
        self.down.closes_after(&self.up);
        let down = self.down.run(
            backend,
            &mut self.br,
            &self.client,
            &mut self.cr,
            &mut pools,
        );
        let down = match down {
            Ok(n) => n,
            Err(FlowError::Read(e)) => {
                // The backend reset the connection (or its socket failed
                // otherwise, a timeout say). What it sent before arrived in
                // order: deliver it, then pass the reset on once the client
                // has it all (see `reset_due`), as a direct connection
                // would behave.
                self.down.source_reset();
                self.reset = Some((e, ctx.now + LINGER));
                if let Err(FlowError::Write(e)) = self.down.run(
                    backend,
                    &mut self.br,
                    &self.client,
                    &mut self.cr,
                    &mut pools,
                ) {
                    return Some(self.fail(Side::Client, &e));
                }
                0
            }
            Err(FlowError::Write(e)) => return Some(self.fail(Side::Client, &e)),
        };
        if self.reset.is_none() && self.down.ended_by_reset() {
            let e = io::Error::from(io::ErrorKind::ConnectionReset);
            self.reset = Some((e, ctx.now + LINGER));
        }
        if up + down > 0 {
            self.deadline = ctx.now + self.route.cfg.idle_timeout;
            self.report(ctx.worker);
        }
        if self.reset.is_some() {
            return self.reset_due(ctx);
        }
        if self.first_fin.is_none() {
            if self.up.eof {
                self.first_fin = Some(Side::Client);
            } else if self.down.eof {
                self.first_fin = Some(Side::Backend);
            }
        }
        if self.up.done() && self.down.done() {
            let end = match self.first_fin {
                Some(Side::Backend) => End::BackendClosed,
                _ => End::ClientClosed,
            };
            if self.up.discarding() && !self.up.eof {
                // Closing now, with the client's unread bytes queued, would
                // reset the answer still in flight to it: wait (bounded)
                // for its FIN, dropping what it sends.
                if !self.lingering {
                    self.lingering = true;
                    self.deadline = self.deadline.min(ctx.now + LINGER);
                }
                return None;
            }
            return Some(end);
        }
        None
    }

    /// The backend reset the connection: reset the client too once it has
    /// acknowledged every byte sluice holds or queued for it (a reset
    /// throws away unsent data), or once `LINGER` has passed. There is no
    /// event for "all acknowledged", so this checks again every few ms.
    fn reset_due(&mut self, ctx: &mut Ctx) -> Option<End> {
        let (_, until) = self.reset.as_ref()?;
        let until = *until;
        let drained = self.down.pending() == 0
            && crate::sys::unsent_bytes(self.client.as_fd()).unwrap_or(0) == 0;
        if drained || ctx.now >= until {
            let (e, _) = self.reset.take()?;
            return Some(self.fail(Side::Backend, &e));
        }
        self.deadline = until.min(ctx.now + RESET_CHECK);
        None
    }

    /// A flow stopped at its per-turn budget: run again next loop turn.
    pub fn wants_turn(&self) -> bool {
        self.up.more || self.down.more
    }

    /// The worker's ready list gave this connection another turn.
    pub fn resume(&mut self, ctx: &mut Ctx) -> Option<End> {
        if self.connecting || self.backend.is_none() {
            return None;
        }
        self.relay(ctx)
    }

    /// An I/O error on `side`: say how the connection ends, and make the
    /// other peer see a reset. A reset passes on as a reset; any other
    /// error (a timeout, say) cuts the stream too, and a FIN would let the
    /// other peer take what it got for complete — a reset is how a proxy
    /// says "aborted" (HAProxy does the same).
    fn fail(&mut self, side: Side, e: &io::Error) -> End {
        let reset = is_reset(e);
        log::debug!(
            "route {}: client {}: {:?} side error: {e}",
            self.route.cfg.name,
            self.peer,
            side
        );
        self.reset_peer(match side {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        });
        if !reset {
            // For the access line: what the kernel said (a peer that
            // stopped answering keepalive probes: "Connection timed out").
            self.last_err = Some(match e.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code),
                None => io::Error::new(e.kind(), e.to_string()),
            });
        }
        match (side, reset) {
            (Side::Client, true) => End::ClientReset,
            (Side::Backend, true) => End::BackendReset,
            (Side::Client, false) => End::ClientError,
            (Side::Backend, false) => End::BackendError,
        }
    }

    /// Make the close of `side`'s socket a reset (SO_LINGER 0).
    fn reset_peer(&self, side: Side) {
        let sock = match side {
            Side::Client => Some(&self.client),
            Side::Backend => self.backend.as_ref(),
        };
        if let Some(s) = sock {
            let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
        }
    }

    /// The timer fired at `now`. `Some(end)` means: close now.
    pub fn on_timeout(&mut self, ctx: &mut Ctx) -> Option<End> {
        if ctx.now < self.deadline {
            return None;
        }
        if self.is_waiting() {
            let until = self.wait_until.unwrap_or(ctx.now);
            if ctx.now >= until {
                return Some(End::QueueTimeout);
            }
            // A passively downed backend may be due its retry.
            let end = self.retry_waiting(ctx);
            if end.is_none() && self.is_waiting() {
                self.deadline = self.next_look(ctx.now, until);
            }
            return end;
        }
        if self.connecting {
            let e = io::Error::new(io::ErrorKind::TimedOut, "connect_timeout expired");
            return self.retry(e, ctx);
        }
        if self.reset.is_some() {
            // Check again whether the client has everything; the relay
            // (with no event) is what moves any bytes still held.
            if let Some(end) = self.relay(ctx) {
                return Some(end);
            }
            return self.reset_due(ctx);
        }
        if self.lingering {
            // The answer had its time; the client never closed.
            return Some(End::BackendClosed);
        }
        Some(End::IdleTimeout)
    }

    /// Add the bytes moved since the last report to the route counters,
    /// so /metrics sees long transfers while they run.
    fn report(&mut self, worker: usize) {
        let now = [
            self.up.spliced,
            self.up.copied,
            self.down.spliced,
            self.down.copied,
        ];
        let r = self.reported;
        let d = [now[0] - r[0], now[1] - r[1], now[2] - r[2], now[3] - r[3]];
        self.reported = now;
        let c = self.route.shared.stats.slot(worker);
        Counters::add(&c.bytes_in, d[0] + d[1]);
        Counters::add(&c.bytes_out, d[2] + d[3]);
        Counters::add(&c.bytes_splice, d[0] + d[2]);
        Counters::add(&c.bytes_copy, d[1] + d[3]);
    }

    /// No backend could be connected and the route has a fallback file:
    /// release everything but the client socket (still registered under
    /// this connection's token) and hand it over. Counts `no_backend`; the
    /// file session that takes over logs the access line.
    pub fn into_client(mut self, ctx: &mut Ctx) -> Handover {
        let mut pools = Pools {
            pipes: ctx.pools.pipes,
            bufs: ctx.pools.bufs,
        };
        self.up.finish(&mut pools);
        self.down.finish(&mut pools);
        drop(self.backend.take());
        let w = self.watch[Side::Client as usize];
        if !(w.read && w.write) {
            // The file session expects both interests (never the case
            // today: the relay, the only one to drop one, never ran).
            let tok = token(self.key, Side::Client);
            let both = Interest::READABLE | Interest::WRITABLE;
            let res = if w.read || w.write {
                ctx.registry.reregister(&mut self.client, tok, both)
            } else {
                ctx.registry.register(&mut self.client, tok, both)
            };
            if let Err(e) = res {
                log::debug!("client {}: watch unchanged: {e}", self.peer);
            }
        }
        if let Some(i) = self.bidx {
            self.give_back(i, ctx);
        }
        self.stop_waiting(ctx.now);
        let c = self.route.shared.stats.slot(ctx.worker);
        Counters::inc(&c.no_backend);
        self.observe_queue(c);
        if let Some(e) = &self.last_err {
            log::info!(
                "route {}: no backend for {} (last error: {e}): sending the fallback file",
                self.route.cfg.name,
                self.peer
            );
        }
        Handover {
            since: self.started,
            queue_ms: self.queue_ms(ctx.now),
            stream: self.client,
            peer: self.peer,
        }
    }

    /// Close both sockets, release pipes and buffers, count and log.
    pub fn close(mut self, end: End, ctx: &mut Ctx) {
        let mut pools = Pools {
            pipes: ctx.pools.pipes,
            bufs: ctx.pools.bufs,
        };
        self.up.finish(&mut pools);
        self.down.finish(&mut pools);
        // No deregistering: each socket has a single descriptor, and
        // closing it removes it from the poll (two syscalls saved per
        // connection).
        if let Some(i) = self.bidx {
            self.give_back(i, ctx);
        }
        self.stop_waiting(ctx.now);
        if end == End::IdleTimeout || end == End::Shutdown {
            // Nobody is waiting for a graceful FIN exchange any more.
            self.reset_peer(Side::Client);
            // Nor does the backend wait for one when the client's stream
            // to it is cut: a FIN would make it look whole.
            if !self.up.done() {
                self.reset_peer(Side::Backend);
            }
        }
        self.report(ctx.worker);
        let c = self.route.shared.stats.slot(ctx.worker);
        let fallbacks = Fallback::both(self.up.fallback, self.down.fallback);
        for f in &fallbacks {
            Counters::inc(match f {
                Fallback::NoPipe => &c.fallback_no_pipe,
                Fallback::Refused => &c.fallback_refused,
                Fallback::Memory => &c.fallback_memory,
            });
        }
        if matches!(end, End::ConnectFailed | End::NoBackend | End::QueueTimeout) {
            Counters::inc(&c.no_backend);
        }
        c.ended(
            end as usize,
            ctx.now.saturating_duration_since(self.started),
        );
        self.observe_queue(c);
        // The access line costs some formatting: only when it is wanted.
        if log::log_enabled!(target: "access", log::Level::Info) {
            let backend = match self.bidx {
                Some(i) => self.route.backends[i].addr.to_string(),
                None => "-".to_string(),
            };
            let mut why = match (&self.last_err, end) {
                (Some(e), End::ConnectFailed | End::ClientError | End::BackendError) => {
                    format!(" error=\"{e}\"")
                }
                _ => String::new(),
            };
            if let Some(v) = self.via {
                why.push_str(&format!(" via={v}"));
            }
            log::info!(
                target: "access",
                "route={} client={} backend={} strategy={} up_strategy={} down_strategy={} bytes_in={} bytes_out={} spliced={} copied={} fallback={} queue_ms={} connect_ms={} retries={} duration_ms={} worker={} end={}{}",
                self.route.cfg.name,
                self.peer,
                backend,
                crate::pump::strategy_name(
                    self.up.spliced + self.down.spliced,
                    self.up.copied + self.down.copied
                ),
                self.up.strategy_used(),
                self.down.strategy_used(),
                self.up.spliced + self.up.copied,
                self.down.spliced + self.down.copied,
                self.up.spliced + self.down.spliced,
                self.up.copied + self.down.copied,
                match fallbacks.as_slice() {
                    [] => "-".to_string(),
                    f => f.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(","),
                },
                self.queue_ms(ctx.now),
                match (self.connect_began, self.connected_at) {
                    (Some(began), Some(at)) => {
                        at.saturating_duration_since(began).as_millis().to_string()
                    }
                    _ => "-".to_string(),
                },
                self.retries,
                ctx.now.saturating_duration_since(self.started).as_millis(),
                ctx.worker,
                end.as_str(),
                why,
            );
        }
    }
}

/// How long a connection whose backend stopped reading waits for the
/// client's FIN after the backend's answer is delivered.
const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// How often a connection passing on a backend's reset checks whether the
/// client has acknowledged everything.
const RESET_CHECK: std::time::Duration = std::time::Duration::from_millis(10);

/// What readiness `ev` on a socket with a connect(2) in flight says:
/// `Ok(true)` connected, `Ok(false)` still connecting, `Err` failed.
///
/// A TCP socket reports EPOLLOUT only once its handshake is complete
/// (never in SYN_SENT), and a failed one reports EPOLLERR or EPOLLHUP; so
/// a plain "writable" needs no syscall to confirm, which saves the
/// getsockopt(SO_ERROR) and getpeername(2) of every connection. Any other
/// combination is settled the slow, certain way.
fn connect_outcome(s: &TcpStream, ev: &mio::event::Event) -> io::Result<bool> {
    if ev.is_writable() && !ev.is_error() && !ev.is_write_closed() && !ev.is_read_closed() {
        return Ok(true);
    }
    if let Some(e) = s.take_error()? {
        return Err(e);
    }
    match s.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => {
            if ev.is_error() || ev.is_write_closed() {
                Err(io::Error::from(io::ErrorKind::ConnectionRefused))
            } else {
                Ok(false)
            }
        }
        Err(e) => Err(e),
    }
}

/// Whether an I/O error means the peer reset or abandoned the connection.
pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// The unspecified address of `a`'s family.
fn unspecified(a: SocketAddr) -> std::net::IpAddr {
    match a {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// Errors that say this process or machine ran short of something local
/// (descriptors, memory, epoll watches): not a peer's fault.
pub fn local_exhaustion(e: &io::Error) -> bool {
    shortage(e).is_some()
}

/// What a local errno says this process or machine ran short of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortage {
    /// EMFILE, ENFILE.
    Descriptors,
    /// ENOMEM, ENOBUFS.
    Memory,
    /// ENOSPC from epoll_ctl: past fs.epoll.max_user_watches.
    EpollWatches,
}

impl Shortage {
    /// For the log: what ran out.
    pub fn what(self) -> &'static str {
        match self {
            Shortage::Descriptors => "out of file descriptors",
            Shortage::Memory => "out of kernel memory",
            Shortage::EpollWatches => "out of epoll watches (fs.epoll.max_user_watches)",
        }
    }
}

/// The shortage an errno reports, if it is a local one.
pub fn shortage(e: &io::Error) -> Option<Shortage> {
    match e.raw_os_error()? {
        libc::EMFILE | libc::ENFILE => Some(Shortage::Descriptors),
        libc::ENOMEM | libc::ENOBUFS => Some(Shortage::Memory),
        libc::ENOSPC => Some(Shortage::EpollWatches),
        _ => None,
    }
}
