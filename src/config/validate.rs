//! From the raw schema to the validated `Config`: defaults, `[global]` and
//! `[admin]`, and the checks that span several routes (unique names, listen
//! addresses that cannot both be bound). One route at a time is `route`'s
//! job.
//!
//! Errors are reported in file order as far as possible, and only the first
//! one: later ones are often consequences of it.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::error::{ConfigError, Source};
use super::net;
use super::route;
use super::schema::{Backends, Dur, RawAdmin, RawConfig, RawGlobal, RawRoute};
use super::values;
use super::{Admin, Config, Global, Route, RouteKind};

const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Files each worker keeps open for file routes (nginx's documented
/// example: `open_file_cache max=1000 inactive=20s`).
const DEFAULT_OPEN_FILE_CACHE: u64 = 1000;
/// Each cached file holds a descriptor: beyond this the cache would compete
/// with connections for the descriptor limit.
const MAX_OPEN_FILE_CACHE: u64 = 1 << 20;
/// `max_pipes = 0` derives the pool cap as `max_connections * 2` (one pipe
/// per direction of a spliced connection), capped at this.
const DERIVED_MAX_PIPES_CAP: usize = 16_384;
/// A sanity bound on `workers`, to catch typos before spawning threads.
const MAX_WORKERS: u64 = 1024;

const LOG_LEVELS: &[(&str, log::LevelFilter)] = &[
    ("error", log::LevelFilter::Error),
    ("warn", log::LevelFilter::Warn),
    ("info", log::LevelFilter::Info),
    ("debug", log::LevelFilter::Debug),
    ("trace", log::LevelFilter::Trace),
    ("off", log::LevelFilter::Off),
];

pub(super) fn validate(src: &Source, raw: RawConfig) -> Result<Config, ConfigError> {
    let base = config_dir(src.path);
    let global = global(src, raw.global.as_ref())?;
    let mut bound = Vec::new();
    let admin = match &raw.admin {
        Some(a) => Some(admin(src, a, &mut bound)?),
        None => None,
    };
    let raw_routes = raw.route.unwrap_or_default();
    if raw_routes.is_empty() {
        return Err(src.whole("no routes defined: expected at least one [[route]] table"));
    }
    let mut names: Vec<Spanned<String>> = Vec::new();
    let mut routes = Vec::with_capacity(raw_routes.len());
    for (i, r) in raw_routes.iter().enumerate() {
        let name = route_name(src, r, i, &names)?;
        let listen = route_listen(src, r, name.get_ref(), &mut bound)?;
        routes.push(route::route(
            src,
            r,
            name.get_ref(),
            listen,
            &global,
            &base,
        )?);
        names.push(name);
    }
    no_loops(src, &raw_routes, &routes)?;
    Ok(Config {
        path: src.path.to_path_buf(),
        global,
        admin,
        routes,
    })
}

/// The folder relative paths in the file are resolved against.
fn config_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn global(src: &Source, raw: Option<&Spanned<RawGlobal>>) -> Result<Global, ConfigError> {
    let g = raw.map(Spanned::get_ref);
    let max_connections = values::count_usize(
        src,
        "max_connections",
        g.and_then(|g| g.max_connections.as_ref()),
        DEFAULT_MAX_CONNECTIONS,
        1,
    )?;
    let max_pipes =
        match values::count_usize(src, "max_pipes", g.and_then(|g| g.max_pipes.as_ref()), 0, 0)? {
            0 => max_connections.saturating_mul(2).min(DERIVED_MAX_PIPES_CAP),
            n => n,
        };
    let workers = match values::count(
        src,
        "workers",
        g.and_then(|g| g.workers.as_ref()),
        1,
        0,
        MAX_WORKERS,
    )? {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => usize::try_from(n).unwrap_or(1),
    };
    Ok(Global {
        max_connections,
        max_pipes,
        shutdown_timeout: values::duration(
            src,
            "shutdown_timeout",
            g.and_then(|g| g.shutdown_timeout.as_ref()),
            Duration::from_secs(30),
        )?,
        log_level: values::choice_or(
            src,
            "log_level",
            g.and_then(|g| g.log_level.as_ref()),
            LOG_LEVELS,
            log::LevelFilter::Info,
        )?,
        workers,
        open_file_cache: values::count(
            src,
            "open_file_cache",
            g.and_then(|g| g.open_file_cache.as_ref()),
            DEFAULT_OPEN_FILE_CACHE,
            0,
            MAX_OPEN_FILE_CACHE,
        )? as usize,
        open_file_cache_inactive: values::duration(
            src,
            "open_file_cache_inactive",
            g.and_then(|g| g.open_file_cache_inactive.as_ref()),
            Duration::from_secs(20),
        )?,
        busy_poll: busy_poll(src, g.and_then(|g| g.busy_poll.as_ref()))?,
    })
}

/// Longest busy-poll window: past a few milliseconds a worker that is
/// meant to sleep between bursts is a spinning core.
const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

fn busy_poll(src: &Source, value: Option<&Spanned<Dur>>) -> Result<Duration, ConfigError> {
    match value {
        Some(v) if v.get_ref().0 > MAX_BUSY_POLL => Err(src.error(
            &v.span(),
            format!(
                "busy_poll of {:?} is too long: expected at most 10ms (\"0\" turns it off; \
                 20us to 200us covers the gaps between events of a busy worker)",
                v.get_ref().0
            ),
        )),
        _ => values::duration(src, "busy_poll", value, Duration::ZERO),
    }
}

fn admin(
    src: &Source,
    raw: &Spanned<RawAdmin>,
    bound: &mut Vec<Bound>,
) -> Result<Admin, ConfigError> {
    let Some(listen) = &raw.get_ref().listen else {
        return Err(src.error(
            &raw.span(),
            "[admin] has no `listen`: expected an address like listen = \"127.0.0.1:9900\"",
        ));
    };
    let addr = values::address(src, "admin listen", listen.get_ref(), &listen.span())?;
    bind(src, bound, addr, "the admin listener", listen.span())?;
    Ok(Admin { listen: addr })
}

/// The route's name: present, well-formed, and not used by an earlier route.
fn route_name(
    src: &Source,
    raw: &Spanned<RawRoute>,
    index: usize,
    earlier: &[Spanned<String>],
) -> Result<Spanned<String>, ConfigError> {
    let Some(name) = &raw.get_ref().name else {
        return Err(src.error(
            &raw.span(),
            format!(
                "[[route]] #{} has no `name`: every route needs a unique name \
                 made of letters, digits, '_', '.' and '-'",
                index + 1
            ),
        ));
    };
    let text = name.get_ref();
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if text.is_empty() || !text.chars().all(valid) {
        return Err(src.error(
            &name.span(),
            format!("invalid route name {text:?}: expected only letters, digits, '_', '.' and '-'"),
        ));
    }
    if let Some(first) = earlier.iter().find(|n| n.get_ref() == text) {
        return Err(src.error(
            &name.span(),
            format!(
                "duplicate route name {text:?} (first defined at line {})",
                src.line(&first.span())
            ),
        ));
    }
    Ok(name.clone())
}

/// The route's listen addresses, resolved and checked against every address
/// bound so far (earlier routes, the admin listener, this route).
fn route_listen(
    src: &Source,
    raw: &Spanned<RawRoute>,
    name: &str,
    bound: &mut Vec<Bound>,
) -> Result<Vec<SocketAddr>, ConfigError> {
    let Some(listen) = &raw.get_ref().listen else {
        return Err(src.error(
            &raw.span(),
            format!(
                "route {name:?} has no `listen`: expected an address or a list of addresses, \
                 like listen = \"127.0.0.1:7000\""
            ),
        ));
    };
    if listen.get_ref().is_empty() {
        return Err(src.error(
            &listen.span(),
            format!(
                "route {name:?} has an empty `listen` list: \
                 expected at least one address like \"127.0.0.1:7000\""
            ),
        ));
    }
    let owner = format!("route {name:?}");
    let mut out = Vec::new();
    for (addr, _, span) in values::addresses(src, "listen", listen)? {
        bind(src, bound, addr, &owner, span)?;
        out.push(addr);
    }
    Ok(out)
}

/// No proxy route may lead back to itself through sluice's own listeners:
/// a backend that is the route's own listen address (or loopback on a
/// port its wildcard listener takes), or another route's that leads back
/// to it, would make each connection come back to sluice and be sent on
/// again, until a limit stopped it. A backend that is another route's
/// address is fine otherwise (a proxy route in front of a file route).
fn no_loops(src: &Source, raw: &[Spanned<RawRoute>], routes: &[Route]) -> Result<(), ConfigError> {
    // A listener on the wildcard address takes the port on loopback too;
    // the same port on another host's address is a real server.
    // sluice's IPv6 listeners are IPV6_V6ONLY: a wildcard takes loopback of
    // its own family only; an IPv4-mapped backend is its IPv4 address.
    let reaches = |l: SocketAddr, b: SocketAddr| {
        let b = match b.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(b, |v4| SocketAddr::new(v4.into(), b.port())),
            _ => b,
        };
        l.port() == b.port()
            && l.is_ipv4() == b.is_ipv4()
            && (l.ip() == b.ip() || (l.ip().is_unspecified() && b.ip().is_loopback()))
    };
    // For each route, its backends that are some route's listener.
    let edges: Vec<Vec<(usize, usize)>> = routes
        .iter()
        .map(|r| match &r.kind {
            RouteKind::Proxy(p) => p
                .backends
                .iter()
                .enumerate()
                .filter_map(|(bi, b)| {
                    let t = routes
                        .iter()
                        .position(|t| t.listen.iter().any(|&l| reaches(l, b.addr)))?;
                    Some((bi, t))
                })
                .collect(),
            RouteKind::File(_) => Vec::new(),
        })
        .collect();
    let leads_to = |from: usize, to: usize| {
        let mut seen = vec![false; routes.len()];
        let mut stack = vec![from];
        while let Some(r) = stack.pop() {
            if r == to {
                return true;
            }
            if !std::mem::replace(&mut seen[r], true) {
                stack.extend(edges[r].iter().map(|&(_, t)| t));
            }
        }
        false
    };
    for (ri, route) in routes.iter().enumerate() {
        for &(bi, t) in &edges[ri] {
            if !leads_to(t, ri) {
                continue;
            }
            let (RouteKind::Proxy(p), Some(list)) = (&route.kind, &raw[ri].get_ref().backends)
            else {
                continue;
            };
            let span = match list.get_ref() {
                Backends::One(_) => list.span(),
                Backends::Many(items) => items[bi].span(),
            };
            let target = &routes[t];
            let how = if t == ri {
                "its own listen address".to_string()
            } else {
                format!(
                    "the listen address of route {:?}, which leads back to it",
                    target.name
                )
            };
            return Err(src.error(
                &span,
                format!(
                    "backend {:?} of route {:?} is {how}: every connection would come back \
                     to sluice and be sent on again; expected the address of another server",
                    p.backends[bi].name, route.name
                ),
            ));
        }
    }
    Ok(())
}

/// A listen address already claimed, for the conflict check.
struct Bound {
    addr: SocketAddr,
    owner: String,
    span: Range<usize>,
}

/// Claim `addr` for `owner`, or explain which earlier address it collides
/// with.
fn bind(
    src: &Source,
    bound: &mut Vec<Bound>,
    addr: SocketAddr,
    owner: &str,
    span: Range<usize>,
) -> Result<(), ConfigError> {
    if addr.port() == 0 {
        return Err(src.error(
            &span,
            format!(
                "listen address {addr} of {owner} has port 0: expected a port from 1 to 65535 \
                 (no client could know a port the kernel picks, and each worker would get \
                 its own)"
            ),
        ));
    }
    if let IpAddr::V6(v6) = addr.ip()
        && let Some(v4) = v6.to_ipv4_mapped()
    {
        return Err(src.error(
            &span,
            format!(
                "listen address {addr} of {owner} is an IPv4-mapped IPv6 address, which \
                 cannot be listened on: write it as {v4}:{}",
                addr.port()
            ),
        ));
    }
    if let Some(b) = bound.iter().find(|b| net::overlaps(addr, b.addr)) {
        let at = src.position(&b.span);
        let message = if addr == b.addr && b.owner == owner {
            format!("listen address {addr} appears twice in {owner} (first at {at})")
        } else if addr == b.addr {
            format!(
                "listen address {addr} of {owner} is already used by {} (at {at})",
                b.owner
            )
        } else {
            let other = if b.owner == owner {
                "the same route"
            } else {
                b.owner.as_str()
            };
            let wildcard = if addr.ip().is_unspecified() {
                addr.ip()
            } else {
                b.addr.ip()
            };
            format!(
                "listen address {addr} of {owner} conflicts with {} of {other} (at {at}): \
                 the wildcard address {wildcard} takes port {} on every local address",
                b.addr,
                addr.port()
            )
        };
        return Err(src.error(&span, message));
    }
    bound.push(Bound {
        addr,
        owner: owner.to_string(),
        span,
    });
    Ok(())
}
