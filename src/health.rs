//! Backend health: passive marking from real traffic, shared by workers,
//! and the active checker the main thread runs.
//!
//! Passive: every failed connect counts against the backend; `fall`
//! failures in a row mark it down, and balance then skips it. A successful
//! connect resets the count. With active checks enabled (`[route.health]`),
//! only the checker brings a down backend back (after `rise` good checks);
//! without them one connection at a time tries a down backend again each
//! `interval` (half-open, as nginx's `fail_timeout`): if it connects, the
//! backend is up again; if not, that client fails over and the backend
//! stays down another interval. So a route never stays dark for good, and
//! a dead backend is not handed every new client each time it is retried.
//!
//! Active: `Checker` probes every backend of every route with a
//! `[route.health]` table by opening a TCP connection (and, with
//! `http_path`, sending a GET and reading its status line), on its own timer,
//! with non-blocking connects registered in the main thread's poll — one
//! poll for all probes, never a thread per backend. On a `send_proxy`
//! route every probe opens with a PROXY header of its own (v1 `UNKNOWN`,
//! v2 `LOCAL`, as HAProxy's `check-send-proxy` does), since such backends
//! refuse connections without one. Results land in the
//! shared `BackendRt` (`up`, `fails`, `rises`, `last_check`), where
//! balancing and /metrics read them.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::config::{Health, ProxyVersion};
use crate::route::{BackendRt, RouteRt};

/// Milliseconds since the process started, as a cheap shared clock.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// The one place a backend changes state, for passive and active checks.
impl BackendRt {
    /// Mark it down; true when it was up (the caller logs the change).
    pub fn mark_down(&self) -> bool {
        if !self.up.swap(false, Ordering::Relaxed) {
            return false;
        }
        self.down_at.store(now_ms(), Ordering::Relaxed);
        self.rises.store(0, Ordering::Relaxed);
        true
    }

    /// Mark it up again, with its failure bookkeeping cleared.
    pub fn mark_up(&self) {
        self.fails.store(0, Ordering::Relaxed);
        self.rises.store(0, Ordering::Relaxed);
        self.down_at.store(0, Ordering::Relaxed);
        self.up.store(true, Ordering::Relaxed);
    }
}

/// A connect to backend `i` of `route` failed.
pub fn passive_failure(route: &RouteRt, i: usize) {
    let Some(p) = route.proxy() else { return };
    let b = &route.backends[i];
    let fails = b.fails.fetch_add(1, Ordering::Relaxed) + 1;
    if fails >= p.health.fall && b.mark_down() {
        log::warn!(
            "route {}: backend {} ({}) is DOWN after {fails} failed connects in a row",
            route.cfg.name,
            route.backend_name(i),
            b.addr
        );
    }
}

/// A connect to backend `i` of `route` succeeded. Without active checks
/// this is also what brings a downed backend back: its retry connected
/// (true: it came up).
pub fn passive_success(route: &RouteRt, i: usize) -> bool {
    let b = &route.backends[i];
    b.fails.store(0, Ordering::Relaxed);
    let passive = route.proxy().is_some_and(|p| !p.health.active);
    if passive && !b.is_up() {
        b.mark_up();
        log::info!(
            "route {}: backend {} ({}) is UP again: a connect succeeded",
            route.cfg.name,
            route.backend_name(i),
            b.addr
        );
        return true;
    }
    false
}

/// Without active checks: whether a downed backend may be tried again now,
/// by the one caller that claims it. Once `interval` has passed since it
/// went down (or was last tried), the first caller wins the try and
/// restarts the interval; the backend stays down, out of balancing, until
/// that connect succeeds (`passive_success`). So a backend that is still
/// dead costs one client a failover per interval, not a herd of them.
pub fn claim_retry(route: &RouteRt, i: usize, interval: Duration) -> bool {
    let b = &route.backends[i];
    // Runs for every primary on every new connection: up costs one load.
    if b.is_up() {
        return false;
    }
    let at = b.down_at.load(Ordering::Relaxed);
    let now = now_ms();
    if at == 0 || now.saturating_sub(at) < interval.as_millis() as u64 {
        return false;
    }
    if b.down_at
        .compare_exchange(at, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        return false; // another connection took this try
    }
    log::info!(
        "route {}: backend {} ({}) is given another try after {:?} down",
        route.cfg.name,
        route.backend_name(i),
        b.addr,
        interval
    );
    true
}

/// Advance an HTTP check as far as the socket allows: write what is left
/// of the request (then listen for the answer), read the answer. `Some`
/// once there is a verdict.
fn http_step(p: &mut Probe, registry: &Registry, token: Token) -> Option<Result<(), String>> {
    let (req, sent) = p.request.as_mut()?;
    while *sent < req.len() {
        match io::Write::write(&mut p.stream, &req[*sent..]) {
            Ok(n) => {
                *sent += n;
                if *sent == req.len()
                    && let Err(e) = registry.reregister(&mut p.stream, token, Interest::READABLE)
                {
                    return Some(Err(e.to_string()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Some(Err(format!("sending the request: {e}"))),
        }
    }
    let mut buf = [0u8; 512];
    loop {
        // httparse knows the status by byte 13 or calls it an error, so
        // this bound only keeps a strange peer from feeding us forever.
        let room = MAX_ANSWER.saturating_sub(p.answer.len());
        if room == 0 {
            return Some(Err(format!(
                "no HTTP status in the first {MAX_ANSWER} bytes"
            )));
        }
        match io::Read::read(&mut p.stream, &mut buf[..room.min(512)]) {
            Ok(0) => return judge_answer(&p.answer, true),
            Ok(n) => {
                p.answer.extend_from_slice(&buf[..n]);
                if let Some(verdict) = judge_answer(&p.answer, false) {
                    return Some(verdict);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Some(Err(format!("reading the answer: {e}"))),
        }
    }
}

/// One backend the checker probes.
struct Target {
    route: String,
    /// The backend's name in the current configuration (its `Host:` for
    /// HTTP checks).
    name: String,
    backend: Arc<BackendRt>,
    health: Health,
    /// The route's `send_proxy`: its backends expect a PROXY header on
    /// every connection, the checker's too.
    send_proxy: Option<ProxyVersion>,
    /// When the next probe starts.
    due: Instant,
    /// A probe is in flight.
    probing: bool,
}

/// A check in flight: a TCP connect, then for HTTP checks the request
/// and the answer's status line.
struct Probe {
    backend: Arc<BackendRt>,
    stream: TcpStream,
    deadline: Instant,
    timeout: Duration,
    /// HTTP checks: the request (behind the PROXY header, if the route
    /// sends one), and how much of it is written.
    request: Option<(Vec<u8>, usize)>,
    /// TCP checks of a `send_proxy` route: the PROXY header written once
    /// connected, before the close, so the backend sees a well-formed
    /// connection rather than a broken header.
    hello: Option<Vec<u8>>,
    /// The connect completed.
    connected: bool,
    /// HTTP checks: the answer so far (at most `MAX_ANSWER` bytes).
    answer: Vec<u8>,
}

/// How much of an HTTP check's answer is read for its status line.
const MAX_ANSWER: usize = 1024;

/// The request an HTTP check sends: HTTP/1.0, so the backend closes after
/// answering, with the backend as written in the configuration as Host.
fn check_request(path: &str, host: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: sluice-health-check\r\n\
         Connection: close\r\n\r\n"
    )
    .into_bytes()
}

/// The verdict on an HTTP check's answer so far: `None` until httparse has
/// the status code. 2xx and 3xx pass, as in HAProxy's `httpchk`.
fn judge_answer(answer: &[u8], eof: bool) -> Option<Result<(), String>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let parsed = resp.parse(answer);
    // Only the status matters: once httparse has the code, what it thinks
    // of the headers after it (or whether they have arrived) does not.
    if let Some(code) = resp.code {
        return Some(if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("HTTP status {code}"))
        });
    }
    match parsed {
        Ok(_) if eof => Some(Err(
            "the connection closed before an HTTP status line".into()
        )),
        Ok(_) => None,
        Err(e) => Some(Err(format!("not an HTTP answer ({e})"))),
    }
}

/// Active TCP connect checks for every backend of the current generation.
pub struct Checker {
    /// First mio token of the checker's probes (token = base + slab key).
    base: usize,
    targets: Vec<Target>,
    probes: Slab<Probe>,
    /// A backend came up or went down since `changed` was last asked.
    moved: std::cell::Cell<bool>,
}

impl Checker {
    /// A checker whose probes use tokens from `base` up.
    pub fn new(base: usize) -> Self {
        Checker {
            base,
            targets: Vec::new(),
            probes: Slab::new(),
            moved: std::cell::Cell::new(false),
        }
    }

    /// Whether a backend came up or went down since the last call:
    /// clients waiting for a backend slot (`max_connections`) may find one
    /// on a backend that came up, or on a backup standing in for a primary
    /// that went down (or learn at once that none is left).
    pub fn changed(&self) -> bool {
        self.moved.replace(false)
    }

    /// Probe the backends of these routes from now on. Backends carried
    /// over from the previous generation (same `BackendRt`) keep their
    /// schedule and in-flight probe; probes of backends no longer checked
    /// are dropped.
    pub fn follow(&mut self, routes: &[Arc<RouteRt>], registry: &Registry, now: Instant) {
        let mut targets = Vec::new();
        for r in routes {
            let Some(p) = r.proxy() else { continue };
            if !p.health.active {
                continue;
            }
            let n = r.backends.len() as u32;
            for (i, b) in r.backends.iter().enumerate() {
                let old = self.targets.iter().find(|t| Arc::ptr_eq(&t.backend, b));
                // New backends: first probes spread over one interval, so
                // a route with many backends does not connect to all of
                // them in the same instant.
                let first = now + p.health.interval / n.max(1) * i as u32;
                targets.push(Target {
                    route: r.cfg.name.clone(),
                    name: r.backend_name(i).to_string(),
                    backend: b.clone(),
                    health: p.health.clone(),
                    send_proxy: p.send_proxy,
                    due: old
                        .map(|t| t.due.min(now + p.health.interval))
                        .unwrap_or(first),
                    probing: old.is_some_and(|t| t.probing),
                });
            }
        }
        self.targets = targets;
        let gone: Vec<usize> = self
            .probes
            .iter()
            .filter(|(_, p)| {
                !self
                    .targets
                    .iter()
                    .any(|t| Arc::ptr_eq(&t.backend, &p.backend))
            })
            .map(|(k, _)| k)
            .collect();
        for k in gone {
            let mut p = self.probes.remove(k);
            let _ = registry.deregister(&mut p.stream);
        }
    }

    /// Stop every probe (graceful stop).
    pub fn clear(&mut self, registry: &Registry) {
        for mut p in self.probes.drain() {
            let _ = registry.deregister(&mut p.stream);
        }
        self.targets.clear();
    }

    /// Whether a poll token belongs to a probe.
    pub fn owns(&self, token: Token) -> bool {
        token.0 >= self.base && self.probes.contains(token.0 - self.base)
    }

    /// When `run` next has something to do.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let due = self.targets.iter().filter(|t| !t.probing).map(|t| t.due);
        let deadlines = self.probes.iter().map(|(_, p)| p.deadline);
        due.chain(deadlines).min()
    }

    /// Start the probes that are due and fail those that timed out.
    pub fn run(&mut self, registry: &Registry, now: Instant) {
        let expired: Vec<usize> = self
            .probes
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for k in expired {
            let t = self.probes[k].timeout;
            let why = if self.probes[k].connected {
                format!("no HTTP status within {t:?}")
            } else {
                format!("no connection within {t:?}")
            };
            self.finish(k, Err(why), registry);
        }
        for i in 0..self.targets.len() {
            let t = &mut self.targets[i];
            if t.probing || t.due > now {
                continue;
            }
            t.due = now + t.health.interval;
            let addr = t.backend.addr;
            let timeout = t.health.timeout;
            let header = t.send_proxy.map(crate::proxy_proto::build_local);
            let (request, hello) = match t.health.http_path.as_deref() {
                Some(path) => {
                    let mut req = header.unwrap_or_default();
                    req.extend_from_slice(&check_request(path, &t.name));
                    (Some((req, 0)), None)
                }
                None => (None, header),
            };
            let started = TcpStream::connect(addr).and_then(|mut stream| {
                let entry = self.probes.vacant_entry();
                registry.register(
                    &mut stream,
                    Token(self.base + entry.key()),
                    Interest::WRITABLE,
                )?;
                entry.insert(Probe {
                    backend: self.targets[i].backend.clone(),
                    stream,
                    deadline: now + timeout,
                    timeout,
                    request,
                    hello,
                    connected: false,
                    answer: Vec::new(),
                });
                Ok(())
            });
            match started {
                Ok(()) => self.targets[i].probing = true,
                // This process is out of descriptors or memory: the
                // backend is not to blame (as with passive checks), so the
                // check is skipped, not failed.
                Err(e) if crate::conn::local_exhaustion(&e) => log::warn!(
                    "route {}: cannot check backend {} ({addr}): {e}; check skipped",
                    self.targets[i].route,
                    self.targets[i].name
                ),
                Err(e) => self.record(i, Err(e.to_string())),
            }
        }
    }

    /// A probe's socket became writable or readable, or failed.
    pub fn on_event(&mut self, token: Token, ev: &mio::event::Event, registry: &Registry) {
        let k = token.0 - self.base;
        let Some(p) = self.probes.get_mut(k) else {
            return;
        };
        if !p.connected {
            let connected = match p.stream.take_error() {
                Ok(Some(e)) | Err(e) => Err(e.to_string()),
                Ok(None) => match p.stream.peer_addr() {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                        if ev.is_error() || ev.is_write_closed() {
                            Err(io::Error::from(io::ErrorKind::ConnectionRefused).to_string())
                        } else {
                            return; // still connecting
                        }
                    }
                    Err(e) => Err(e.to_string()),
                },
            };
            if connected.is_err() || p.request.is_none() {
                if connected.is_ok()
                    && let Some(h) = &p.hello
                {
                    // A few bytes into a new connection's empty buffer;
                    // the check's verdict is the connect either way.
                    let _ = io::Write::write(&mut p.stream, h);
                }
                self.finish(k, connected, registry);
                return;
            }
            p.connected = true;
        }
        // An HTTP check: send the request, then read up to the status line.
        if let Some(result) = http_step(p, registry, Token(self.base + k)) {
            self.finish(k, result, registry);
        }
    }

    fn finish(&mut self, k: usize, result: Result<(), String>, registry: &Registry) {
        // An HTTP check stops reading after the status line: reset, as
        // HAProxy does, rather than leave unread bytes and a TIME_WAIT on
        // every interval. A TCP check closes normally.
        if self.probes[k].request.is_some() {
            let _ = socket2::SockRef::from(&self.probes[k].stream).set_linger(Some(Duration::ZERO));
        }
        let mut p = self.probes.remove(k);
        let _ = registry.deregister(&mut p.stream);
        if let Some(i) = self
            .targets
            .iter()
            .position(|t| Arc::ptr_eq(&t.backend, &p.backend))
        {
            self.targets[i].probing = false;
            self.record(i, result);
        }
    }

    /// Apply one check result to the backend's state; log changes.
    fn record(&self, i: usize, result: Result<(), String>) {
        let t = &self.targets[i];
        let b = &t.backend;
        match result {
            Ok(()) => {
                b.checks_ok.fetch_add(1, Ordering::Relaxed);
                b.last_check.store(1, Ordering::Relaxed);
                b.fails.store(0, Ordering::Relaxed);
                if b.is_up() {
                    return;
                }
                let rises = b.rises.fetch_add(1, Ordering::Relaxed) + 1;
                if rises >= t.health.rise {
                    b.mark_up();
                    self.moved.set(true);
                    log::warn!(
                        "route {}: backend {} ({}) is UP ({rises} good checks in a row)",
                        t.route,
                        t.name,
                        b.addr
                    );
                }
            }
            Err(why) => {
                b.checks_failed.fetch_add(1, Ordering::Relaxed);
                b.last_check.store(2, Ordering::Relaxed);
                b.rises.store(0, Ordering::Relaxed);
                let fails = b.fails.fetch_add(1, Ordering::Relaxed) + 1;
                log::debug!(
                    "route {}: backend {} ({}) check failed: {why}",
                    t.route,
                    t.name,
                    b.addr
                );
                if fails >= t.health.fall && b.mark_down() {
                    self.moved.set(true);
                    log::warn!(
                        "route {}: backend {} ({}) is DOWN ({fails} failed checks in a row: {why})",
                        t.route,
                        t.name,
                        b.addr
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_check_verdicts() {
        let ok = |s: &str, eof| judge_answer(s.as_bytes(), eof);
        assert_eq!(ok("HTTP/1.1 200 OK\r\n", false), Some(Ok(())));
        assert_eq!(
            ok("HTTP/1.0 302 Found\r\nLocation: /x\r\n\r\n", false),
            Some(Ok(()))
        );
        assert_eq!(
            ok("HTTP/1.1 503 Service Unavailable\r\n", false),
            Some(Err("HTTP status 503".into()))
        );
        assert_eq!(
            ok("HTTP/1.1 404 Not Found\r\n\r\n", true),
            Some(Err("HTTP status 404".into()))
        );
        // Not yet a whole status line: wait, unless the answer ended.
        assert_eq!(ok("HTTP/1.1 20", false), None);
        assert_eq!(
            ok("HTTP/1.1 20", true),
            Some(Err(
                "the connection closed before an HTTP status line".into()
            ))
        );
        assert_eq!(
            ok("", true),
            Some(Err(
                "the connection closed before an HTTP status line".into()
            ))
        );
        assert!(
            matches!(ok("SSH-2.0-OpenSSH\r\n", false), Some(Err(e)) if e.starts_with("not an HTTP answer"))
        );
        // The status is known as soon as its code is, reason phrase or not,
        // and headers httparse would reject do not change it.
        assert_eq!(ok("HTTP/1.1 204 No Con", false), Some(Ok(())));
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nServer : x\r\n\r\n", false),
            Some(Ok(()))
        );
        assert_eq!(
            ok("HTTP/1.1 500 E\r\nbad header line\r\n\r\n", true),
            Some(Err("HTTP status 500".into()))
        );
        assert_eq!(
            check_request("/health?full=1", "app.internal:8080"),
            b"GET /health?full=1 HTTP/1.0\r\nHost: app.internal:8080\r\nUser-Agent: sluice-health-check\r\nConnection: close\r\n\r\n"
        );
    }
}
