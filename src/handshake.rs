//! The step between accept and a route's session: who is the client?
//!
//! Without `accept_proxy` the answer is the socket's peer and there is no
//! step at all. With it, a front load balancer speaks first: sluice reads
//! its PROXY header (v1 or v2, told apart by the first bytes) into a small
//! fixed buffer before anything else happens — no backend is connected,
//! no byte is forwarded — and only then knows the address that the access
//! log, allow/deny, per-IP limits, `source-hash` and `send_proxy` use.
//!
//! ```text
//!   accept ──► Handshake ──(header complete)──► Accepted ──► route session
//!                  │                               (worker::start_session)
//!                  ├─ malformed / too long ──► end=bad_proxy_header
//!                  ├─ header_timeout ─────────► end=bad_proxy_header
//!                  └─ EOF before any byte ────► end=client_closed
//! ```
//!
//! Admission around it (see `worker::admit`): the global and route
//! connection caps count the connection from accept, since a client that
//! is still sending its header already holds a descriptor. The sender's
//! own address is judged at accept by `accept_proxy_from` (the trusted
//! balancers; empty trusts anyone who reaches the port), and allow/deny
//! and `max_connections_per_ip` judge the address the header names, once
//! it is in. HAProxy splits it the same way: `tcp-request connection`
//! rules see the real address, later rules the PROXY one.
//!
//! The step is route-agnostic: it ends in an `Accepted`, the one thing
//! every session kind starts from, carrying the socket (still registered,
//! with the readiness seen so far, since edge-triggered events will not
//! repeat) and any client bytes read past the header, which the session
//! must deliver before the rest of the stream.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Token};

use crate::conn::{Ctx, End};
use crate::proxy_proto::{self, MAX_HEADER};
use crate::pump::Ready;
use crate::route::RouteRt;
use crate::stats::Counters;

/// A client whose address is settled, ready for its route's session.
pub struct Accepted {
    pub stream: TcpStream,
    /// The client as sluice treats it: the PROXY header's source, or the
    /// socket's peer.
    pub peer: SocketAddr,
    /// The address the client connected to as a PROXY header gave it;
    /// `None` = this socket's local address (looked up only if needed).
    pub dst: Option<SocketAddr>,
    /// The socket's real peer, when a PROXY header named another client.
    pub via: Option<SocketAddr>,
    /// `Some`: registered with the poll under the client token, with the
    /// readiness seen so far. `None`: not registered yet.
    pub ready: Option<Ready>,
    /// Client bytes read past the header: the start of the client stream.
    pub early: Vec<u8>,
    /// Bytes read from the socket in all: the header and `early`.
    pub consumed: usize,
    /// When the connection was accepted.
    pub since: Instant,
}

impl Accepted {
    /// A client taken as it is: no header was expected.
    pub fn plain(stream: TcpStream, peer: SocketAddr, since: Instant) -> Self {
        Accepted {
            stream,
            peer: proxy_proto::canonical(peer),
            dst: None,
            via: None,
            ready: None,
            early: Vec::new(),
            consumed: 0,
            since,
        }
    }
}

/// What an event or timer did to a handshake.
pub enum Step {
    /// Header not complete yet: wait for more.
    Wait,
    /// Header complete: call `finish` and start the session.
    Done,
    /// Close the connection for this reason.
    Fail(End),
}

/// Waiting for a PROXY header on one client connection.
pub struct Handshake {
    route: Arc<RouteRt>,
    stream: TcpStream,
    /// The socket's peer (the load balancer).
    peer: SocketAddr,
    ready: Ready,
    buf: Box<[u8; MAX_HEADER]>,
    len: usize,
    /// The header once parsed.
    got: Option<proxy_proto::Received>,
    /// Why the handshake failed, for the log.
    why: Option<String>,
    /// header_timeout from accept.
    pub deadline: Instant,
    since: Instant,
}

impl Handshake {
    /// Register a freshly accepted client under `token` and start waiting
    /// for its header. A `Fail` means: close it now.
    pub fn start(
        route: Arc<RouteRt>,
        token: Token,
        stream: TcpStream,
        peer: SocketAddr,
        ctx: &mut Ctx,
    ) -> (Handshake, Step) {
        let deadline = ctx.now + route.cfg.header_timeout;
        let mut h = Handshake {
            route,
            stream,
            peer,
            ready: Ready::default(),
            buf: Box::new([0; MAX_HEADER]),
            len: 0,
            got: None,
            why: None,
            deadline,
            since: ctx.now,
        };
        // Writable too, so the session that follows sees the first
        // EPOLLOUT edge (it comes once, right after registering).
        if let Err(e) = ctx.registry.register(
            &mut h.stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            h.why = Some(format!("cannot register the client: {e}"));
            return (h, Step::Fail(End::ClientError));
        }
        (h, Step::Wait)
    }

    pub fn route(&self) -> &Arc<RouteRt> {
        &self.route
    }

    /// Readiness on the client socket: read what is there and parse.
    pub fn on_event(&mut self, ev: &mio::event::Event) -> Step {
        self.ready.update(ev);
        while self.ready.read {
            let n = match self.stream.read(&mut self.buf[self.len..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.ready.read = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let end = if crate::conn::is_reset(&e) {
                        End::ClientReset
                    } else {
                        End::ClientError
                    };
                    return self.fail(end, format!("read: {e}"));
                }
            };
            if n == 0 {
                if self.len == 0 {
                    // Connected and closed without a word: a TCP health
                    // check from the load balancer, not a bad header.
                    return self.fail(End::ClientClosed, String::new());
                }
                let why = format!("connection closed after {} bytes of a header", self.len);
                return self.fail(End::BadProxyHeader, why);
            }
            self.len += n;
            match proxy_proto::parse(&self.buf[..self.len]) {
                Ok(Some(r)) => {
                    self.got = Some(r);
                    return Step::Done;
                }
                Ok(None) if self.len == MAX_HEADER => {
                    let e = proxy_proto::HeaderError::TooLong(MAX_HEADER);
                    return self.fail(End::BadProxyHeader, e.to_string());
                }
                Ok(None) => {}
                Err(e) => return self.fail(End::BadProxyHeader, e.to_string()),
            }
        }
        Step::Wait
    }

    /// The timer fired at `now`.
    pub fn on_timeout(&mut self, now: Instant) -> Step {
        if now < self.deadline {
            return Step::Wait;
        }
        let why = format!(
            "no complete PROXY header within header_timeout ({:?}; {} bytes received)",
            self.route.cfg.header_timeout, self.len
        );
        self.fail(End::BadProxyHeader, why)
    }

    fn fail(&mut self, end: End, why: String) -> Step {
        // One log line, one quoted field: no quotes or control characters
        // (some parser messages contain a CRLF).
        let why = why
            .chars()
            .map(|c| match c {
                '"' => '\'',
                c if c.is_control() => ' ',
                c => c,
            })
            .collect();
        self.why = Some(why);
        Step::Fail(end)
    }

    /// The client as the header describes it (after `Step::Done`).
    pub fn finish(self) -> Accepted {
        let got = self.got.unwrap_or(proxy_proto::Received {
            len: 0,
            version: crate::config::ProxyVersion::V1,
            addrs: None,
        });
        let (peer, dst, via) = match got.addrs {
            Some((src, dst)) => (src, Some(dst), Some(self.peer)),
            None => (self.peer, None, None),
        };
        log::debug!(
            "route {}: PROXY {:?} header from {}: client {peer}",
            self.route.cfg.name,
            got.version,
            self.peer
        );
        Accepted {
            stream: self.stream,
            peer: proxy_proto::canonical(peer),
            dst,
            via,
            ready: Some(self.ready),
            early: self.buf[got.len..self.len].to_vec(),
            consumed: self.len,
            since: self.since,
        }
    }

    /// Close a connection whose handshake failed (or was cut by a stop):
    /// count and log it.
    pub fn close(self, end: End, ctx: &mut Ctx) {
        // Closing the socket's only descriptor takes it out of the poll.
        if end == End::BadProxyHeader || end == End::Shutdown {
            // Nothing more will be read: drop what the client sent with a
            // reset rather than a FIN that suggests an answer was given.
            let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        }
        let c = self.route.shared.stats.slot(ctx.worker);
        if end == End::BadProxyHeader {
            Counters::inc(&c.proxy_header_errors);
            // The access line below says it too; this is for debugging.
            log::debug!(
                "route {}: client {}: {}",
                self.route.cfg.name,
                self.peer,
                self.why.as_deref().unwrap_or("bad PROXY header")
            );
        }
        c.ended(end as usize, ctx.now.saturating_duration_since(self.since));
        let why = match self.why.as_deref() {
            Some(w) if !w.is_empty() => format!(" error=\"{w}\""),
            _ => String::new(),
        };
        log::info!(
            target: "access",
            "route={} client={} backend=- bytes_in=0 bytes_out=0 duration_ms={} end={}{}",
            self.route.cfg.name,
            self.peer,
            ctx.now.saturating_duration_since(self.since).as_millis(),
            end.as_str(),
            why
        );
    }
}
