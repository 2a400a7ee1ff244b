//! The file session: one client socket of a file route (or of a proxy
//! route falling back to its `fallback_file`), and the state machine that
//! serves it.
//!
//! ```text
//!  http:  accept ──► Reading head ──(complete)──► Sending head+body ──┐
//!                       ▲   │ header_timeout: 408 (bytes came)       │
//!                       │   │ idle: close silently (nothing came)    │
//!                       └───┴──────── keep-alive ◄───────────────────┤
//!                                                   close/error/cut ─┴─► Lingering ──► closed
//!  raw:   accept ──► Sending body ──► Lingering ──► closed
//! ```
//!
//! Sending is bounded: at most `send_chunk` bytes (and a few responses)
//! per turn, after which the session says `wants_turn` and the worker
//! runs it again on its next loop turn without waiting for an event
//! (edge-triggered readiness would never come back for a socket that is
//! still writable). Responses to pipelined requests go out in order: the
//! session does not parse the next request until the current response is
//! fully sent.
//!
//! "Lingering" is the close every response that ends a connection goes
//! through: shut down the write side, then read and discard until the
//! client closes (bounded by `LINGER`), so unread request bytes cannot
//! make the kernel answer with a reset that destroys the response in
//! flight.
//!
//! Each response is one access-log line (target "access") and counted by
//! status class and by the strategy that moved its bytes.
//!
//! This file is the state machine and its socket I/O; `respond` turns a
//! parsed request into the response it queues.

use std::fs::File;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::config::{FileSource, Protocol};
use crate::conn::{Ctx, End, watch_client};
use crate::handshake::Accepted;
use crate::http::MAX_HEAD;
use crate::http::request::{self, Parsed};
use crate::pump::file::{Body, BodyFallback, BodyParams, Sent};
use crate::pump::{Pools, Ready};
use crate::route::RouteRt;
use crate::stats::Counters;
use crate::sys;

mod open_files;
mod respond;
mod roots;

pub use open_files::OpenFiles;

/// Longest time a closing connection waits for the client's FIN.
const LINGER: Duration = Duration::from_secs(5);
/// Responses sent per turn before other connections get a go.
const RESPONSES_PER_TURN: usize = 32;
/// `send_chunk` for a proxy route's fallback file.
const FALLBACK_CHUNK: usize = 2 << 20;

enum Proto {
    Http,
    Raw,
    /// A proxy route's fallback file: why no backend served, and how long
    /// the client waited for one (`queue_ms`).
    Fallback(End, u128),
}

/// One response (or the raw file) on its way to the client.
struct Resp {
    head: Vec<u8>,
    head_sent: usize,
    body: Option<Body>,
    keep_alive: bool,
    method: String,
    target: String,
    /// 0 for raw bytes (no HTTP status).
    status: u16,
    started: Instant,
}

/// How sending the current response went this turn.
enum Step {
    Done,
    Wait,
    Yield,
    /// The response was cut short (file truncated or unreadable, lease
    /// broken): close with a reset.
    Cut(&'static str),
    Failed(End),
}

pub struct FileConn {
    route: Arc<RouteRt>,
    sock: TcpStream,
    peer: SocketAddr,
    ready: Ready,
    proto: Proto,
    params: BodyParams,
    send_chunk: usize,
    inbuf: Vec<u8>,
    resp: Option<Resp>,
    /// A byte of the next request has arrived (header_timeout runs).
    in_request: bool,
    /// The process is stopping gracefully: close after this response.
    draining: bool,
    /// A response went out whole on this connection (so, between requests,
    /// it is an idle keep-alive connection, which a stop may close).
    served: bool,
    /// Write side shut down; waiting for the client's FIN.
    lingering: bool,
    /// The response that ended the connection was cut short (file
    /// truncated, lease broken): a close that finds the client still
    /// there resets, so it cannot take the short body for a whole one.
    cut_short: bool,
    /// The client shut its write side.
    eof: bool,
    yielded: bool,
    /// When the client was accepted (by the proxy, for a fallback file).
    since: Instant,
    /// When the current timer (header, idle, linger) fires.
    pub deadline: Instant,
}

impl FileConn {
    /// Start serving a client accepted on file route `route`.
    pub fn start(
        route: Arc<RouteRt>,
        key: usize,
        acc: Accepted,
        ctx: &mut Ctx,
    ) -> (FileConn, Option<End>) {
        let Accepted {
            stream: sock,
            peer,
            ready,
            early,
            since,
            ..
        } = acc;
        let shared = route.clone();
        let f = shared.file().expect("file route");
        let proto = match f.protocol {
            Protocol::Http => Proto::Http,
            Protocol::Raw => Proto::Raw,
        };
        let params = BodyParams {
            strategy: f.strategy,
            pipe_size: f.pipe_size,
            buffer_size: f.buffer_size,
        };
        let mut c = FileConn::new(route, sock, peer, proto, params, f.send_chunk, since);
        let deadline = match c.proto {
            Proto::Http => ctx.now + c.route.cfg.header_timeout,
            _ => ctx.now + c.route.cfg.idle_timeout,
        };
        c.deadline = deadline;
        if let Some(r) = ready {
            // A PROXY header came first: the socket is registered already
            // and the handshake consumed its edges (EPOLLOUT included), so
            // no event may come again: run the session on the worker's
            // next turn whatever happened. Bytes read past the header start
            // the first request; more may wait in the socket (a header
            // that filled the handshake's read exactly).
            c.ready = r;
            // Nothing was ever sent on it: its send buffer has room (a
            // send that finds otherwise waits for the next edge).
            c.ready.write = true;
            c.inbuf = early;
            c.skip_blank_lines();
            c.in_request = !c.inbuf.is_empty();
            c.yielded = true;
        } else if !watch_client(ctx, &shared, &mut c.sock, peer, key, false) {
            return (c, Some(End::ClientError));
        }
        if let (Proto::Raw, FileSource::File(p)) = (&c.proto, &f.source) {
            c.start_raw(p, ctx);
        }
        (c, None)
    }

    /// Take over the client of a proxy connection that found no backend
    /// (`end`) and send it the route's `fallback_file`. The socket is
    /// already registered (under another key, maybe): re-register it.
    pub fn fallback(
        route: Arc<RouteRt>,
        key: usize,
        h: crate::conn::Handover,
        end: End,
        ctx: &mut Ctx,
    ) -> (FileConn, Option<End>) {
        let (sock, peer) = (h.stream, h.peer);
        let shared = route.clone();
        let p = shared.proxy().expect("proxy route");
        let params = BodyParams {
            strategy: p.file_strategy,
            pipe_size: p.pipe_size,
            buffer_size: p.buffer_size,
        };
        let proto = Proto::Fallback(end, h.queue_ms);
        let mut c = FileConn::new(route, sock, peer, proto, params, FALLBACK_CHUNK, h.since);
        c.deadline = ctx.now + c.route.cfg.idle_timeout;
        if !watch_client(ctx, &shared, &mut c.sock, peer, key, true) {
            return (c, Some(End::ClientError));
        }
        // The proxy consumed the socket's edges: assume it is ready, the
        // syscalls will say otherwise.
        c.ready = Ready {
            read: true,
            write: true,
            hup: false,
        };
        if let Some(path) = &p.fallback_file {
            c.start_raw(path, ctx);
            // Its line counts from accept, as the proxy's would have.
            if let Some(r) = c.resp.as_mut() {
                r.started = h.since;
            }
        }
        let end = c.drive(ctx);
        (c, end)
    }

    fn new(
        route: Arc<RouteRt>,
        sock: TcpStream,
        peer: SocketAddr,
        proto: Proto,
        params: BodyParams,
        send_chunk: usize,
        since: Instant,
    ) -> FileConn {
        // TCP_NODELAY came with the socket: the listener has it.
        FileConn {
            route,
            sock,
            peer,
            ready: Ready::default(),
            proto,
            params,
            send_chunk: send_chunk.max(1),
            inbuf: Vec::new(),
            resp: None,
            in_request: false,
            draining: false,
            served: false,
            lingering: false,
            cut_short: false,
            eof: false,
            yielded: false,
            since,
            // Each caller sets the first timer.
            deadline: since,
        }
    }

    pub fn route(&self) -> &Arc<RouteRt> {
        &self.route
    }

    /// The session stopped because its turn's budget ran out while the
    /// socket could take more: run it again without waiting for an event.
    pub fn wants_turn(&self) -> bool {
        self.yielded
    }

    /// A graceful stop began: finish the response in flight (if any), then
    /// close; an idle keep-alive connection closes now (FIN, not reset).
    /// One that has not sent its first request yet may still send it
    /// (within header_timeout, its deadline already): its client cannot
    /// know of the stop, and its request is not one a closed idle
    /// keep-alive connection lets a client retry.
    pub fn drain(&mut self, ctx: &mut Ctx) -> Option<End> {
        self.draining = true;
        if self.resp.is_none() && !self.in_request && self.served {
            self.start_linger(ctx);
            return self.drive(ctx);
        }
        None
    }

    /// Whether an mmap transfer under a lease is running (no syscall).
    pub fn holds_lease(&self) -> bool {
        self.resp
            .as_ref()
            .and_then(|r| r.body.as_ref())
            .is_some_and(Body::is_leased)
    }

    /// Open the raw file (or fallback file) and queue all of it.
    fn start_raw(&mut self, p: &Path, ctx: &mut Ctx) {
        let mut r = Resp {
            head: Vec::new(),
            head_sent: 0,
            body: None,
            keep_alive: false,
            method: "-".into(),
            target: "-".into(),
            status: 0,
            started: ctx.now,
        };
        match open_file(p).and_then(|f| {
            let meta = f.metadata()?;
            if !meta.is_file() {
                return Err(io::Error::other("not a regular file"));
            }
            Ok((f, meta.len()))
        }) {
            Ok((f, size)) => {
                let mut pools = pools(ctx);
                let mut body = Body::open(Arc::new(f), &self.params, &mut pools);
                let size = leased_stat(&body).map_or(size, |st| st.size);
                body.range(0, size);
                self.note_fallback(&body, ctx);
                r.body = Some(body);
            }
            Err(e) => {
                log::error!(
                    "route {}: cannot open {}: {e}; closing client {}",
                    self.route.cfg.name,
                    p.display(),
                    self.peer
                );
            }
        }
        self.resp = Some(r);
    }

    /// Handle readiness. `Some(end)` means: close now.
    pub fn on_event(&mut self, ev: &mio::event::Event, ctx: &mut Ctx) -> Option<End> {
        self.ready.update(ev);
        self.drive(ctx)
    }

    /// Continue after yielding a turn.
    pub fn resume(&mut self, ctx: &mut Ctx) -> Option<End> {
        self.drive(ctx)
    }

    /// The lease-break signal arrived: if this session's lease is being
    /// broken, stop sending from the mapping, unmap, release the lease,
    /// and end the transfer (the client gets fewer bytes and a close).
    pub fn lease_check(&mut self, ctx: &mut Ctx) -> Option<End> {
        let broken = self
            .resp
            .as_ref()
            .and_then(|r| r.body.as_ref())
            .is_some_and(Body::lease_broken);
        if !broken {
            return None;
        }
        let c = self.route.shared.stats.slot(ctx.worker);
        Counters::inc(&c.lease_breaks);
        log::info!(
            "route {}: lease break on the file sent to {}: transfer ended",
            self.route.cfg.name,
            self.peer
        );
        Some(self.cut("lease_break", ctx))
    }

    /// End the current response early: log it, and close the connection
    /// at once with a reset. A FIN would make a short body look whole to
    /// a client that has no length to check it against (a raw route, a
    /// fallback file, an HTTP/1.0 client ignoring Content-Length).
    fn cut(&mut self, why: &'static str, ctx: &mut Ctx) -> End {
        if let Some(r) = self.resp.take() {
            self.log_resp(r, why, ctx);
        }
        self.cut_short = true;
        End::Truncated
    }

    fn start_linger(&mut self, ctx: &mut Ctx) {
        if !self.lingering {
            let _ = self.sock.shutdown(Shutdown::Write);
            self.lingering = true;
            self.deadline = ctx.now + LINGER.min(self.route.cfg.idle_timeout);
        }
    }

    /// Do everything possible now.
    fn drive(&mut self, ctx: &mut Ctx) -> Option<End> {
        self.yielded = false;
        let mut budget = self.send_chunk;
        let mut responses = 0;
        loop {
            if self.lingering {
                return self.linger(budget);
            }
            if self.resp.is_some() {
                match self.send_resp(&mut budget, ctx) {
                    Step::Done => {
                        let r = self.resp.take()?;
                        let keep = r.keep_alive;
                        self.log_resp(r, "ok", ctx);
                        responses += 1;
                        self.served = true;
                        self.skip_blank_lines();
                        if !keep || self.draining {
                            self.start_linger(ctx);
                        } else if self.inbuf.is_empty() {
                            self.deadline = ctx.now + self.route.cfg.idle_timeout;
                        } else {
                            // The next request has begun already.
                            self.in_request = true;
                            self.deadline = ctx.now + self.route.cfg.header_timeout;
                        }
                        continue;
                    }
                    Step::Wait => return None,
                    Step::Yield => {
                        self.yielded = true;
                        return None;
                    }
                    Step::Cut(why) => return Some(self.cut(why, ctx)),
                    Step::Failed(end) => {
                        if let Some(r) = self.resp.take() {
                            // A body cut short ends with a reset, never a
                            // FIN that would make it look whole (a raw
                            // route, HTTP/1.0); a socket that really failed
                            // loses nothing by it.
                            self.cut_short = true;
                            self.log_resp(r, end.as_str(), ctx);
                        }
                        return Some(end);
                    }
                }
            }
            if !matches!(self.proto, Proto::Http) {
                // Raw bytes went out (or could not be opened): close.
                self.start_linger(ctx);
                continue;
            }
            if budget == 0 || responses >= RESPONSES_PER_TURN {
                self.yielded = true;
                return None;
            }
            match request::parse(&self.inbuf) {
                Parsed::Complete(req, len) => {
                    self.inbuf.drain(..len);
                    self.in_request = false;
                    // The request is whole: from here its answer waits on
                    // the client (idle_timeout), even if not a byte of it
                    // can be sent yet.
                    self.deadline = ctx.now + self.route.cfg.idle_timeout;
                    self.respond(req, ctx);
                    continue;
                }
                Parsed::Error(status) => {
                    self.inbuf.clear();
                    self.error(1, status, false, None, ctx);
                    continue;
                }
                Parsed::Partial => {}
            }
            if self.eof {
                // The client finished sending; nothing left to answer.
                return Some(End::ClientClosed);
            }
            if !self.ready.read {
                return None;
            }
            match self.read_more(ctx) {
                Ok(()) => {}
                Err(end) => return Some(end),
            }
        }
    }

    /// Read what the socket holds into the request buffer (bounded).
    fn read_more(&mut self, ctx: &mut Ctx) -> Result<(), End> {
        let mut tmp = [0u8; 4096];
        let room = (MAX_HEAD + 1)
            .saturating_sub(self.inbuf.len())
            .clamp(1, tmp.len());
        match (&self.sock).read(&mut tmp[..room]) {
            Ok(0) => {
                self.eof = true;
                self.ready.read = false;
            }
            Ok(n) => {
                if n < room && !self.ready.hup {
                    // A short read drained the socket; the next byte raises
                    // a new edge (saves an EAGAIN read per request).
                    self.ready.read = false;
                }
                self.inbuf.extend_from_slice(&tmp[..n]);
                Counters::add(&self.route.shared.stats.slot(ctx.worker).bytes_in, n as u64);
                self.skip_blank_lines();
                if !self.in_request && !self.inbuf.is_empty() {
                    self.in_request = true;
                    self.deadline = ctx.now + self.route.cfg.header_timeout;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.ready.read = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(client_end(&e)),
        }
        Ok(())
    }

    /// Drop empty lines before a request line: RFC 9112 §2.2 has servers
    /// ignore them (some clients send a CRLF after a request's body). They
    /// neither start a request's header_timeout nor refresh a timer.
    fn skip_blank_lines(&mut self) {
        let blank = self
            .inbuf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        self.inbuf.drain(..blank);
    }

    /// Read and discard until the client's FIN, at most `budget` bytes
    /// this turn.
    fn linger(&mut self, budget: usize) -> Option<End> {
        let mut tmp = [0u8; 16 * 1024];
        let mut dropped = 0;
        loop {
            if dropped >= budget {
                // A client that keeps sending gets its turn like any other.
                self.yielded = true;
                return None;
            }
            match (&self.sock).read(&mut tmp) {
                Ok(0) => return Some(End::ClientClosed),
                Ok(n) => dropped += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Some(End::ClientClosed),
            }
        }
    }

    /// Send the current response's head, then its body, within `budget`.
    fn send_resp(&mut self, budget: &mut usize, ctx: &mut Ctx) -> Step {
        let Some(r) = self.resp.as_mut() else {
            return Step::Done;
        };
        if !self.ready.write {
            return Step::Wait;
        }
        let c = self.route.shared.stats.slot(ctx.worker);
        while r.head_sent < r.head.len() {
            let more = r.body.as_ref().is_some_and(|b| b.sent == 0);
            match sys::send(self.sock.as_fd(), &r.head[r.head_sent..], more) {
                Ok(n) => {
                    r.head_sent += n;
                    *budget = budget.saturating_sub(n);
                    Counters::add(&c.bytes_out, n as u64);
                    self.deadline = ctx.now + self.route.cfg.idle_timeout;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.ready.write = false;
                    return Step::Wait;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Step::Failed(client_end(&e)),
            }
        }
        let Some(body) = r.body.as_mut() else {
            if r.status == 0 {
                return Step::Cut("open_failed");
            }
            return Step::Done;
        };
        let fallback = body.fallback;
        // The strategy that moves this call's bytes: a switch to sendfile
        // (file_blocked) ends the call, so it is the one before it.
        let strategy = body.strategy();
        let res = body.send(&self.sock, *budget);
        if body.fallback != fallback && body.fallback == Some(BodyFallback::FileBlocked) {
            Counters::inc(&c.fallback_file_blocked);
            log::info!(
                "route {}: splice from the file to {} would block; sending the rest with sendfile",
                self.route.cfg.name,
                self.peer
            );
        }
        let strategy_bytes = match strategy {
            "mmap" => &c.bytes_mmap,
            "splice" => &c.bytes_splice,
            "copy" => &c.bytes_copy,
            _ => &c.bytes_sendfile,
        };
        match res {
            Ok((n, sent)) => {
                *budget = budget.saturating_sub(n);
                if n > 0 {
                    Counters::add(&c.bytes_out, n as u64);
                    Counters::add(strategy_bytes, n as u64);
                    self.deadline = ctx.now + self.route.cfg.idle_timeout;
                }
                match sent {
                    Sent::Done => Step::Done,
                    Sent::Budget => Step::Yield,
                    Sent::Blocked => {
                        self.ready.write = false;
                        Step::Wait
                    }
                    Sent::Shrunk => {
                        Counters::inc(&c.file_truncated);
                        log::info!(
                            "route {}: file shrank while being sent to {}: transfer ended",
                            self.route.cfg.name,
                            self.peer
                        );
                        Step::Cut("truncated")
                    }
                    Sent::FileError(errno) => {
                        Counters::inc(&c.file_errors);
                        log::warn!(
                            "route {}: reading the file for {} failed: {}; transfer ended",
                            self.route.cfg.name,
                            self.peer,
                            io::Error::from_raw_os_error(errno)
                        );
                        Step::Cut("file_error")
                    }
                }
            }
            Err(e) => {
                log::debug!(
                    "route {}: sending to {}: {e}",
                    self.route.cfg.name,
                    self.peer
                );
                Step::Failed(client_end(&e))
            }
        }
    }

    /// Count a body that could not use the route's strategy (and log the
    /// first such mmap transfer of the route).
    fn note_fallback(&self, b: &Body, ctx: &Ctx) {
        let c = self.route.shared.stats.slot(ctx.worker);
        match b.fallback {
            Some(BodyFallback::NoLease) => {
                Counters::inc(&c.lease_fallbacks);
                if self.route.lease_warned.swap(true, Ordering::Relaxed) {
                    return;
                }
                log::warn!(
                    "route {}: no read lease for mmap ({}); sending to {} with sendfile \
                     (logged once; see fallback=no_lease on access lines)",
                    self.route.cfg.name,
                    b.lease_error
                        .as_ref()
                        .map(|e| e.to_string())
                        .unwrap_or_default(),
                    self.peer
                );
            }
            Some(BodyFallback::NoPipe) => Counters::inc(&c.fallback_no_pipe),
            Some(BodyFallback::FileBlocked) | None => {}
        }
    }

    /// The timer fired. `Some(end)` means: close now.
    pub fn on_timeout(&mut self, ctx: &mut Ctx) -> Option<End> {
        if ctx.now < self.deadline {
            return None;
        }
        if self.lingering {
            return Some(End::IdleTimeout);
        }
        if self.resp.is_some() {
            return Some(End::IdleTimeout); // close() logs the response
        }
        if self.in_request {
            // Part of a request head came, not all of it in time: 408.
            self.inbuf.clear();
            self.in_request = false;
            self.error(1, 408, false, None, ctx);
            self.ready.write = true;
            // The answer gets idle_timeout to go out, as any other: with
            // the deadline left behind, a client not reading at this
            // moment would see the timer fire again at once and cut it.
            self.deadline = ctx.now + self.route.cfg.idle_timeout;
            return self.drive(ctx);
        }
        // Idle between requests (or before the first): close silently.
        Some(End::IdleTimeout)
    }

    /// Close: log an unfinished response, release the body, count.
    pub fn close(mut self, end: End, ctx: &mut Ctx) {
        // A stuck transfer or a stop is cut with a reset; an idle
        // keep-alive connection gets a plain FIN. So does a lingering one
        // whose response went out whole: `Sent::Done` means every byte is
        // in the socket's send buffer, not that the client has read it,
        // and a reset would discard what a slow reader has yet to get. The
        // FIN is queued behind those bytes already; the kernel finishes.
        let busy = self.resp.is_some() || (self.in_request && !self.lingering);
        if let Some(r) = self.resp.take() {
            self.log_resp(r, end.as_str(), ctx);
        }
        // Closing the socket's only descriptor takes it out of the poll.
        if self.cut_short || (busy && (end == End::IdleTimeout || end == End::Shutdown)) {
            let _ = socket2::SockRef::from(&self.sock).set_linger(Some(Duration::ZERO));
        }
        let c = self.route.shared.stats.slot(ctx.worker);
        let end = match self.proto {
            Proto::Fallback(why, _) => why,
            _ => end,
        };
        c.ended(end as usize, ctx.now.saturating_duration_since(self.since));
    }

    /// One access-log line for a response, and its counters.
    fn log_resp(&mut self, mut r: Resp, end: &str, ctx: &mut Ctx) {
        let c = self.route.shared.stats.slot(ctx.worker);
        let (strategy, fallback, body_bytes) = match r.body.take() {
            Some(b) => {
                let s = (b.strategy(), b.fallback.map(BodyFallback::as_str), b.sent);
                b.finish(&mut pools(ctx));
                s
            }
            None => ("-", None, 0),
        };
        if r.status > 0 {
            Counters::inc(&c.http_status[usize::from(r.status / 100).min(5)]);
        }
        // The line costs some formatting: only when it is wanted.
        if !log::log_enabled!(target: "access", log::Level::Info) {
            return;
        }
        let end = match self.proto {
            Proto::Fallback(..) if end == "ok" => "fallback",
            _ => end,
        };
        // A fallback says why no backend served and how long it waited.
        let why = match self.proto {
            Proto::Fallback(why, queue_ms) => {
                format!(" reason={} queue_ms={queue_ms}", why.as_str())
            }
            _ => String::new(),
        };
        let status = match r.status {
            0 => "-".to_string(),
            s => s.to_string(),
        };
        let target = log_safe(&r.target);
        log::info!(
            target: "access",
            "route={} client={} method={} path={} status={} bytes={} body_bytes={} strategy={} fallback={} duration_ms={} end={}{}",
            self.route.cfg.name,
            self.peer,
            r.method,
            target,
            status,
            r.head_sent as u64 + body_bytes,
            body_bytes,
            strategy,
            fallback.unwrap_or("-"),
            ctx.now.saturating_duration_since(r.started).as_millis(),
            end,
            why,
        );
    }
}

/// A request target as one log token: at most 256 bytes, with quotes,
/// backslashes, `=` and anything not printable ASCII percent-encoded, so
/// no target can fake or split a key=value field.
fn log_safe(t: &str) -> String {
    let mut out = String::with_capacity(t.len().min(260));
    for &b in t.as_bytes() {
        if out.len() >= 256 {
            out.push_str("...");
            break;
        }
        if b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b'=') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

fn pools<'a>(ctx: &'a mut Ctx) -> Pools<'a> {
    Pools {
        pipes: ctx.pools.pipes,
        bufs: ctx.pools.bufs,
    }
}

/// With a lease held, fstat again: the file cannot change from here on.
fn leased_stat(b: &Body) -> Option<sys::file::FileStat> {
    if b.is_leased() {
        sys::file::fstat(b.file().as_fd()).ok()
    } else {
        None
    }
}

/// Open a configured file read-only, non-blocking (a FIFO put in its place
/// must not stall the worker).
fn open_file(p: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)
}

/// How an I/O error on the client socket ends the connection.
fn client_end(e: &io::Error) -> End {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => End::ClientReset,
        _ => End::ClientError,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_safe_targets() {
        assert_eq!(super::log_safe("/a/b.txt?x"), "/a/b.txt?x");
        assert_eq!(super::log_safe("/a\"b=c"), "/a%22b%3Dc");
        assert_eq!(super::log_safe("/é"), "/%C3%A9");
        assert_eq!(super::log_safe(""), "-");
        assert!(super::log_safe(&"x".repeat(1000)).ends_with("..."));
    }
}
