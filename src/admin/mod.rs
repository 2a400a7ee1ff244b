//! The admin listener: `/metrics` (Prometheus), `/` (status page) and
//! `/healthz`, served by the main thread's poll and never by a worker.
//!
//! An admin client gets little: one request per connection, at most
//! `MAX_REQUEST` bytes of head, `HEADER_TIMEOUT` to send it and
//! `TOTAL_TIMEOUT` for the whole exchange, and at most `MAX_CONNS` such
//! connections at once. When all are taken, a new client evicts one that
//! is done and lingering, else the one stuck longest in its phase
//! (sending its head, or being answered), so idle, slow or non-reading
//! clients cannot lock a monitor out of `/healthz`. Every socket is non-blocking, so a slow or
//! malicious client costs one slab entry and a small buffer until its
//! timer fires; it can never stall the main thread or the workers.
//! Requests are parsed with httparse; the response is built in full,
//! then written as the socket takes it; the connection closes at the
//! client's FIN (or `LINGER` after the answer), so bytes a client sent
//! after its request cannot turn the close into a reset that loses the
//! answer's tail.

mod metrics;
mod page;

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::server::ProcessStats;
use crate::worker::{Generation, Shared};

/// Largest request head accepted (bytes).
const MAX_REQUEST: usize = 8 * 1024;
/// Admin connections open at once; beyond that a new one evicts the one
/// stuck longest in its phase (see the module doc).
const MAX_CONNS: usize = 64;
/// Time a client has to send its whole request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for a whole exchange, answer included.
const TOTAL_TIMEOUT: Duration = Duration::from_secs(15);
/// Time a client has, once answered, to close its side.
const LINGER: Duration = Duration::from_secs(2);

/// What the pages show: the live state, borrowed for one request.
pub struct View<'a> {
    pub generation: &'a Generation,
    pub shared: &'a Shared,
    pub process: &'a ProcessStats,
    pub workers: usize,
    /// Workers a reload retired that still finish their connections.
    pub retiring: usize,
    pub started: SystemTime,
}

struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    /// Request bytes so far (never more than MAX_REQUEST).
    buf: Vec<u8>,
    /// The response, once the request is complete.
    out: Option<Vec<u8>>,
    sent: usize,
    deadline: Instant,
    /// Order of acceptance: the lowest is the oldest.
    seq: u64,
    /// When its current phase (sending its head, being answered) began.
    since: Instant,
    /// The answer is written and our side shut: reading (and dropping)
    /// until the client's FIN, since closing with unread bytes would
    /// reset the connection and discard what the client has yet to read.
    lingering: bool,
}

/// The admin endpoint: its listening socket and its open connections.
pub struct Admin {
    listener: Option<(SocketAddr, TcpListener)>,
    /// Token of the listening socket.
    token: Token,
    /// First token of connections (token = base + slab key).
    base: usize,
    conns: Slab<Conn>,
    /// Connections accepted so far (orders them for eviction).
    accepted: u64,
}

impl Admin {
    pub fn new(token: Token, base: usize) -> Self {
        Admin {
            listener: None,
            token,
            base,
            conns: Slab::new(),
            accepted: 0,
        }
    }

    /// The address the admin listener is bound to, if any.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().map(|(a, _)| *a)
    }

    /// Serve on this socket from now on (or on none); the old one, if
    /// any, is closed. Open admin connections are not affected.
    pub fn set_listener(
        &mut self,
        registry: &Registry,
        new: Option<(SocketAddr, std::net::TcpListener)>,
    ) -> io::Result<()> {
        if let Some((_, mut old)) = self.listener.take() {
            let _ = registry.deregister(&mut old);
        }
        if let Some((addr, sock)) = new {
            let mut sock = TcpListener::from_std(sock);
            registry.register(&mut sock, self.token, Interest::READABLE)?;
            log::info!("admin: listening on {addr} (/, /metrics, /healthz)");
            self.listener = Some((addr, sock));
        }
        Ok(())
    }

    pub fn owns(&self, token: Token) -> bool {
        token.0 >= self.base && self.conns.contains(token.0 - self.base)
    }

    pub fn next_wakeup(&self) -> Option<Instant> {
        self.conns.iter().map(|(_, c)| c.deadline).min()
    }

    /// Close connections whose time is up.
    pub fn expire(&mut self, registry: &Registry, now: Instant) {
        let late: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for k in late {
            let c = self.conns.remove(k);
            log::debug!("admin: {}: timed out; closing", c.peer);
            close(registry, c);
        }
    }

    /// The listening socket is readable: accept everything waiting.
    pub fn accept(&mut self, registry: &Registry, now: Instant) {
        loop {
            let Some((_, l)) = self.listener.as_ref() else {
                return;
            };
            let (mut stream, peer) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("admin: accept failed: {e}");
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNS {
                // Evict a client that is done and lingering; else whoever
                // has been stuck longest in its phase (sending its head,
                // or being answered: a client that asks and does not read
                // must not hold its place either, or 64 of them would lock
                // a monitor out of /healthz).
                let Some(k) = self
                    .conns
                    .iter()
                    .min_by_key(|(_, c)| (!c.lingering, c.since, c.seq))
                    .map(|(k, _)| k)
                else {
                    continue; // cannot happen: the table is full
                };
                let old = self.conns.remove(k);
                let why = match (&old.out, old.lingering) {
                    (None, _) => "no request yet",
                    (Some(_), true) => "answered",
                    (Some(_), false) => "not reading its answer",
                };
                log::warn!(
                    "admin: {MAX_CONNS} admin connections open; closing {} ({why}) for {peer}",
                    old.peer
                );
                close(registry, old);
            }
            self.accepted += 1;
            let entry = self.conns.vacant_entry();
            let token = Token(self.base + entry.key());
            if let Err(e) =
                registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            {
                log::warn!("admin: cannot register {peer}: {e}");
                continue;
            }
            entry.insert(Conn {
                stream,
                peer,
                buf: Vec::new(),
                out: None,
                sent: 0,
                deadline: now + HEADER_TIMEOUT,
                seq: self.accepted,
                since: now,
                lingering: false,
            });
        }
    }

    /// A connection is readable or writable: make what progress it can.
    pub fn on_event(&mut self, token: Token, registry: &Registry, view: &View, now: Instant) {
        let k = token.0 - self.base;
        let Some(c) = self.conns.get_mut(k) else {
            return;
        };
        if step(c, view, now) {
            let c = self.conns.remove(k);
            close(registry, c);
        }
    }
}

fn close(registry: &Registry, mut c: Conn) {
    let _ = registry.deregister(&mut c.stream);
}

/// Read, answer, write. True = done with this connection.
fn step(c: &mut Conn, view: &View, now: Instant) -> bool {
    if c.out.is_none() {
        let mut chunk = [0u8; 2048];
        let mut eof = false;
        loop {
            let room = MAX_REQUEST - c.buf.len();
            if room == 0 {
                break;
            }
            let want = room.min(chunk.len());
            match c.stream.read(&mut chunk[..want]) {
                Ok(0) => {
                    // A client may half-close right after its request.
                    eof = true;
                    break;
                }
                Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let parsed = req.parse(&c.buf);
        // A HEAD request gets the head alone, whatever the answer (a 404,
        // a 400 after the method was read, ...).
        let head_only = req.method == Some("HEAD");
        let mut resp = match parsed {
            Ok(httparse::Status::Complete(_)) => {
                let method = req.method.unwrap_or("");
                let path = req.path.unwrap_or("");
                log::debug!("admin: {} {method} {path}", c.peer);
                respond(method, path, view)
            }
            Ok(httparse::Status::Partial) if eof => return true, // gone mid-request
            Ok(httparse::Status::Partial) if c.buf.len() >= MAX_REQUEST => plain(
                431,
                "Request Header Fields Too Large",
                "request head too large\n",
            ),
            Ok(httparse::Status::Partial) => return false,
            Err(e) => {
                log::debug!("admin: {}: bad request: {e}", c.peer);
                plain(400, "Bad Request", &format!("bad request: {e}\n"))
            }
        };
        if head_only {
            resp.truncate(head_len(&resp));
        }
        c.out = Some(resp);
        c.since = now;
        c.deadline = now + TOTAL_TIMEOUT;
    }
    let Some(out) = c.out.as_ref() else {
        return true;
    };
    while c.sent < out.len() {
        match c.stream.write(&out[c.sent..]) {
            Ok(0) => return true,
            Ok(n) => c.sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
    if !c.lingering {
        let _ = c.stream.shutdown(std::net::Shutdown::Write);
        c.lingering = true;
        c.deadline = c.deadline.min(now + LINGER);
    }
    let mut sink = [0u8; 2048];
    loop {
        match c.stream.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// The response to one request, head and body (`step` cuts the body of
/// a HEAD request's).
fn respond(method: &str, path: &str, view: &View) -> Vec<u8> {
    let path = path.split('?').next().unwrap_or("");
    let known = matches!(path, "/" | "/metrics" | "/healthz");
    if !known {
        return plain(404, "Not Found", "not found: try /, /metrics or /healthz\n");
    }
    if method != "GET" && method != "HEAD" {
        return response(
            405,
            "Method Not Allowed",
            "text/plain; charset=utf-8",
            b"only GET and HEAD are allowed\n",
            "Allow: GET, HEAD\r\n",
        );
    }
    match path {
        "/metrics" => response(
            200,
            "OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::render(view).as_bytes(),
            "",
        ),
        "/" => response(
            200,
            "OK",
            "text/html; charset=utf-8",
            page::render(view).as_bytes(),
            "",
        ),
        _ if view
            .shared
            .draining
            .load(std::sync::atomic::Ordering::Relaxed) =>
        {
            plain(503, "Service Unavailable", "draining\n")
        }
        _ => plain(200, "OK", "ok\n"),
    }
}

fn head_len(r: &[u8]) -> usize {
    r.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(r.len())
}

fn plain(code: u16, reason: &str, body: &str) -> Vec<u8> {
    response(
        code,
        reason,
        "text/plain; charset=utf-8",
        body.as_bytes(),
        "",
    )
}

fn response(code: u16, reason: &str, ctype: &str, body: &[u8], extra: &str) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}
