//! Validation of one `[[route]]`: decide whether it is a proxy route
//! (`backends`) or a file route (`file` or `root`), reject keys that do not
//! fit that kind, and fill in the per-kind defaults.
//!
//! Checks that involve several routes (unique names, listen conflicts) live
//! in `validate`; this file only sees one route and the global settings.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::error::{ConfigError, Source};
use super::schema::{Backends, RawBackend, RawHealth, RawRoute};
use super::values::{self, Want};
use super::{
    Backend, Balance, FileRoute, FileSource, FileStrategy, Global, Health, Keepalive, Protocol,
    ProxyRoute, ProxyStrategy, ProxyVersion, Route, RouteKind,
};

const MIB: usize = 1 << 20;
/// Largest pipe_size accepted: F_SETPIPE_SZ takes an int, and real kernel
/// limits (fs.pipe-max-size) are far below this anyway.
const MAX_PIPE_SIZE: u64 = 1 << 30;
/// Largest copy buffer: each copying connection holds one or two.
const MAX_BUFFER_SIZE: u64 = 64 << 20;
/// send_chunk bounds: a turn of less than 4 KiB burns CPU in syscalls and
/// wake-ups; one of more than 1 GiB starves every other connection.
const MIN_SEND_CHUNK: u64 = 4 << 10;
const MAX_SEND_CHUNK: u64 = 1 << 30;

pub const PROXY_STRATEGIES: &[(&str, ProxyStrategy)] = &[
    ("splice", ProxyStrategy::Splice),
    ("copy", ProxyStrategy::Copy),
    ("auto", ProxyStrategy::Auto),
];
pub const FILE_STRATEGIES: &[(&str, FileStrategy)] = &[
    ("sendfile", FileStrategy::Sendfile),
    ("mmap", FileStrategy::Mmap),
    ("splice", FileStrategy::Splice),
    ("copy", FileStrategy::Copy),
];
const BALANCES: &[(&str, Balance)] = &[
    ("round-robin", Balance::RoundRobin),
    ("least-connections", Balance::LeastConnections),
    ("source-hash", Balance::SourceHash),
    ("random", Balance::Random),
];
const PROXY_VERSIONS: &[(&str, ProxyVersion)] =
    &[("v1", ProxyVersion::V1), ("v2", ProxyVersion::V2)];
const PROTOCOLS: &[(&str, Protocol)] = &[("http", Protocol::Http), ("raw", Protocol::Raw)];

/// Validate route `raw` (already named `name`; its listen addresses are
/// resolved by the caller and passed in). `base` is the config file's folder.
pub fn route(
    src: &Source,
    raw: &Spanned<RawRoute>,
    name: &str,
    listen: Vec<SocketAddr>,
    global: &Global,
    base: &Path,
) -> Result<Route, ConfigError> {
    let r = raw.get_ref();
    let label = format!("route {name:?}");
    let kind = match (&r.backends, &r.file, &r.root) {
        (_, Some(_), Some(root)) => {
            return Err(src.error(
                &root.span(),
                format!(
                    "{label} has both `file` and `root`: use `file` to serve one file \
                     or `root` to serve a folder, not both"
                ),
            ));
        }
        (Some(_), Some(other), None) | (Some(_), None, Some(other)) => {
            let key = if r.file.is_some() { "file" } else { "root" };
            return Err(src.error(
                &other.span(),
                format!(
                    "{label} has both `backends` and `{key}`: a route either proxies \
                     to backends or serves files, not both"
                ),
            ));
        }
        (None, None, None) => {
            return Err(src.error(
                &raw.span(),
                format!(
                    "{label} has nothing to serve: expected `backends` (a proxy route) \
                     or `file` / `root` (a file route)"
                ),
            ));
        }
        (Some(_), None, None) => proxy(src, r, &label, base)?,
        (None, Some(path), None) => file(src, r, &label, base, Want::File, path)?,
        (None, None, Some(path)) => file(src, r, &label, base, Want::Dir, path)?,
    };
    let default_idle = match kind {
        RouteKind::Proxy(_) => Duration::from_secs(300),
        RouteKind::File(_) => Duration::from_secs(60),
    };
    let accept_proxy = r.accept_proxy.as_ref().is_some_and(|v| *v.get_ref());
    let accept_proxy_from =
        values::networks(src, "accept_proxy_from", r.accept_proxy_from.as_ref())?;
    if let Some(v) = &r.accept_proxy_from
        && accept_proxy_from.is_empty()
    {
        return Err(src.error(
            &v.span(),
            format!(
                "{label} has an empty `accept_proxy_from`: list the balancers' addresses, \
                 or leave the key out to trust anyone who reaches the port"
            ),
        ));
    }
    if let (Some(v), false) = (&r.accept_proxy_from, accept_proxy) {
        return Err(src.error(
            &v.span(),
            format!(
                "`accept_proxy_from` needs `accept_proxy = true`, which {label} does not set \
                 (it lists the balancers allowed to send a PROXY header)"
            ),
        ));
    }
    Ok(Route {
        name: name.to_string(),
        listen,
        kind,
        idle_timeout: values::positive_duration(
            src,
            "idle_timeout",
            r.idle_timeout.as_ref(),
            default_idle,
        )?,
        tcp_keepalive: keepalive(src, r, &label)?,
        max_connections: values::count_usize(
            src,
            "max_connections",
            r.max_connections.as_ref(),
            global.max_connections,
            1,
        )?,
        max_connections_per_ip: values::count_usize(
            src,
            "max_connections_per_ip",
            r.max_connections_per_ip.as_ref(),
            0,
            0,
        )?,
        allow: values::networks(src, "allow", r.allow.as_ref())?,
        deny: values::networks(src, "deny", r.deny.as_ref())?,
        accept_proxy,
        accept_proxy_from,
        header_timeout: values::positive_duration(
            src,
            "header_timeout",
            r.header_timeout.as_ref(),
            Duration::from_secs(10),
        )?,
    })
}

fn span<T>(value: &Option<Spanned<T>>) -> Option<Range<usize>> {
    value.as_ref().map(Spanned::span)
}

/// Reject the first of `keys` that is present: they belong to the other
/// kind of route.
fn reject_keys(
    src: &Source,
    label: &str,
    keys: &[(&str, Option<Range<usize>>)],
    this_kind: &str,
) -> Result<(), ConfigError> {
    let (other_kind, because) = if this_kind == "proxy" {
        ("file", "it has `backends`")
    } else {
        ("proxy", "it has `file` or `root`")
    };
    match keys
        .iter()
        .find_map(|(key, span)| span.as_ref().map(|s| (key, s)))
    {
        Some((key, span)) => Err(src.error(
            span,
            format!(
                "`{key}` only applies to {other_kind} routes; \
                 {label} is a {this_kind} route ({because})"
            ),
        )),
        None => Ok(()),
    }
}

/// The strategy for a route of one kind, with a specific message when the
/// value is valid for the other kind.
fn strategy<T: Copy, U>(
    src: &Source,
    label: &str,
    value: Option<&Spanned<String>>,
    ours: &[(&str, T)],
    theirs: &[(&str, U)],
    kind: (&str, &str),
    default: T,
) -> Result<T, ConfigError> {
    let Some(value) = value else {
        return Ok(default);
    };
    let text = value.get_ref().as_str();
    if let Some((_, s)) = ours.iter().find(|(n, _)| *n == text) {
        return Ok(*s);
    }
    let (this_kind, other_kind) = kind;
    let message = if theirs.iter().any(|(n, _)| *n == text) {
        format!(
            "strategy {text:?} is for {other_kind} routes; \
             {label} is a {this_kind} route: expected one of: {}",
            values::names(ours)
        )
    } else {
        format!(
            "invalid strategy {text:?} for {this_kind} {label}: expected one of: {}",
            values::names(ours)
        )
    };
    Err(src.error(&value.span(), message))
}

/// Longest `tcp_keepalive` and `tcp_keepalive_interval`: the kernel's
/// limit for TCP_KEEPIDLE and TCP_KEEPINTVL.
const MAX_KEEPALIVE_SECS: u64 = 32_767;

/// Largest `tcp_keepalive_count`: the kernel's limit for TCP_KEEPCNT.
const MAX_KEEPALIVE_COUNT: u64 = 127;

/// `tcp_keepalive` (the idle time before the first probe) with
/// `tcp_keepalive_interval` and `tcp_keepalive_count`, which only mean
/// something with it.
fn keepalive(src: &Source, r: &RawRoute, label: &str) -> Result<Option<Keepalive>, ConfigError> {
    let Some(idle) = &r.tcp_keepalive else {
        let lone = [
            (
                "tcp_keepalive_interval",
                r.tcp_keepalive_interval.as_ref().map(|v| v.span()),
            ),
            (
                "tcp_keepalive_count",
                r.tcp_keepalive_count.as_ref().map(|v| v.span()),
            ),
        ];
        if let Some((key, Some(span))) = lone.into_iter().find(|(_, s)| s.is_some()) {
            return Err(src.error(
                &span,
                format!(
                    "`{key}` needs `tcp_keepalive`, which {label} does not set (probes start \
                     only after that long without traffic): add it, or remove `{key}`"
                ),
            ));
        }
        return Ok(None);
    };
    // key, value, the socket option it sets, what it means
    let whole_secs = |key: &str, v: &Spanned<super::schema::Dur>, opt: &str, means: &str| {
        let d = v.get_ref().0;
        if d.subsec_nanos() != 0 {
            return Err(src.error(
                &v.span(),
                format!("{key} is set in whole seconds ({opt}): expected a value like 30s or 2m"),
            ));
        }
        if !(1..=MAX_KEEPALIVE_SECS).contains(&d.as_secs()) {
            return Err(src.error(
                &v.span(),
                format!(
                    "{key} must be from 1s to {MAX_KEEPALIVE_SECS}s (the kernel's limit): {means}"
                ),
            ));
        }
        Ok(d)
    };
    let idle = whole_secs(
        "tcp_keepalive",
        idle,
        "TCP_KEEPIDLE",
        "the time without traffic before the first keepalive probe; leave it out for no probes",
    )?;
    let interval = r
        .tcp_keepalive_interval
        .as_ref()
        .map(|v| {
            whole_secs(
                "tcp_keepalive_interval",
                v,
                "TCP_KEEPINTVL",
                "the time between unanswered keepalive probes",
            )
        })
        .transpose()?;
    let count = r
        .tcp_keepalive_count
        .as_ref()
        .map(|v| {
            values::count(
                src,
                "tcp_keepalive_count",
                Some(v),
                1,
                1,
                MAX_KEEPALIVE_COUNT,
            )
        })
        .transpose()?
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    Ok(Some(Keepalive {
        idle,
        interval,
        count,
    }))
}

/// Largest `weight`, as in HAProxy: enough to express any useful ratio
/// between a handful of servers, small enough that the weighted order stays
/// short.
pub const MAX_WEIGHT: i64 = 256;

/// Largest per-backend `max_connections`: more than one process could hold
/// open (each takes a descriptor).
pub const MAX_BACKEND_CONNECTIONS: i64 = 10_000_000;

/// The `backends` list: addresses, or tables with an address, a weight and
/// a backup flag.
fn backends(
    src: &Source,
    label: &str,
    list: &Spanned<Backends>,
) -> Result<Vec<Backend>, ConfigError> {
    let items: Vec<(&RawBackend, Range<usize>)> = match list.get_ref() {
        Backends::One(item) => vec![(item, list.span())],
        Backends::Many(items) => items.iter().map(|i| (i.get_ref(), i.span())).collect(),
    };
    if items.is_empty() {
        return Err(src.error(
            &list.span(),
            format!(
                "{label} has an empty `backends` list: \
                 expected at least one address like \"127.0.0.1:9000\""
            ),
        ));
    }
    let mut out = Vec::new();
    let mut spans = Vec::new();
    for (item, span) in items {
        spans.push(span.clone());
        out.push(match item {
            RawBackend::Address(text) => backend(src, text, &span, 1, false)?,
            RawBackend::Table(t) => {
                let Some(address) = &t.address else {
                    return Err(src.error(
                        &span,
                        format!(
                            "a backend table of {label} has no `address`: expected \
                             {{ address = \"HOST:PORT\", weight = 1, backup = false, \
                             max_connections = 100 }}"
                        ),
                    ));
                };
                let weight = match &t.weight {
                    Some(w) if !(1..=MAX_WEIGHT).contains(w.get_ref()) => {
                        return Err(src.error(
                            &w.span(),
                            format!(
                                "weight {} of backend {:?} is out of range: expected 1 to \
                                 {MAX_WEIGHT} (its share of new connections relative to the \
                                 other backends)",
                                w.get_ref(),
                                address.get_ref()
                            ),
                        ));
                    }
                    Some(w) => *w.get_ref() as u32,
                    None => 1,
                };
                let backup = t.backup.as_ref().is_some_and(|b| *b.get_ref());
                let max_connections = match &t.max_connections {
                    Some(m) if !(1..=MAX_BACKEND_CONNECTIONS).contains(m.get_ref()) => {
                        return Err(src.error(
                            &m.span(),
                            format!(
                                "max_connections {} of backend {:?} is out of range: expected \
                                 1 to {MAX_BACKEND_CONNECTIONS} (leave it out for no limit)",
                                m.get_ref(),
                                address.get_ref()
                            ),
                        ));
                    }
                    Some(m) => *m.get_ref() as usize,
                    None => 0,
                };
                let mut b = backend(src, address.get_ref(), &address.span(), weight, backup)?;
                b.max_connections = max_connections;
                b
            }
        });
    }
    // One entry per server: its weight says how much it gets, and its
    // health and counters are one state (two entries would split them).
    for (k, b) in out.iter().enumerate() {
        if let Some(first) = out[..k].iter().find(|o| o.addr == b.addr) {
            let same = if first.name == b.name {
                format!("backend {:?} is listed twice", b.name)
            } else {
                format!(
                    "backends {:?} and {:?} are the same address {}",
                    first.name, b.name, b.addr
                )
            };
            return Err(src.error(
                &spans[k],
                format!("{same} in {label}: list each server once (use `weight` to give it a larger share)"),
            ));
        }
    }
    if out.iter().all(|b| b.backup) {
        return Err(src.error(
            &list.span(),
            format!(
                "every backend of {label} is a backup: expected at least one without \
                 `backup = true` (backups only take connections when no other backend can)"
            ),
        ));
    }
    Ok(out)
}

fn backend(
    src: &Source,
    text: &str,
    span: &Range<usize>,
    weight: u32,
    backup: bool,
) -> Result<Backend, ConfigError> {
    let addr = values::address(src, "backend", text, span)?;
    if addr.port() == 0 {
        return Err(src.error(
            span,
            format!("backend {text:?} has port 0: expected a port from 1 to 65535"),
        ));
    }
    let ip = addr.ip();
    let not_a_host = ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast());
    if not_a_host {
        return Err(src.error(
            span,
            format!(
                "backend {text:?} is not one host's address ({ip} is {}): expected the \
                 address of a server, like \"127.0.0.1:9000\"",
                if ip.is_unspecified() {
                    "\"any address\", which only a listener can use"
                } else {
                    "a broadcast or multicast address"
                }
            ),
        ));
    }
    Ok(Backend {
        name: text.to_string(),
        addr,
        weight,
        backup,
        max_connections: 0,
    })
}

fn proxy(src: &Source, r: &RawRoute, label: &str, base: &Path) -> Result<RouteKind, ConfigError> {
    reject_keys(
        src,
        label,
        &[
            ("protocol", span(&r.protocol)),
            ("index", span(&r.index)),
            ("send_chunk", span(&r.send_chunk)),
            ("dotfiles", span(&r.dotfiles)),
        ],
        "proxy",
    )?;
    let backends = match &r.backends {
        Some(list) => backends(src, label, list)?,
        None => Vec::new(),
    };
    let fallback_file = match &r.fallback_file {
        Some(v) => Some(values::existing_path(
            src,
            "fallback_file",
            v,
            base,
            Want::File,
        )?),
        None => None,
    };
    if let (Some(v), None) = (&r.fallback_strategy, &fallback_file) {
        return Err(src.error(
            &v.span(),
            format!("`fallback_strategy` needs `fallback_file`, which {label} does not set"),
        ));
    }
    let connect_timeout = values::positive_duration(
        src,
        "connect_timeout",
        r.connect_timeout.as_ref(),
        Duration::from_secs(3),
    )?;
    // As HAProxy's `timeout queue`: a client may wait for a free backend
    // as long as it would wait for a connect.
    Ok(RouteKind::Proxy(ProxyRoute {
        backends,
        strategy: strategy(
            src,
            label,
            r.strategy.as_ref(),
            PROXY_STRATEGIES,
            FILE_STRATEGIES,
            ("proxy", "file"),
            ProxyStrategy::Auto,
        )?,
        balance: values::choice_or(
            src,
            "balance",
            r.balance.as_ref(),
            BALANCES,
            Balance::RoundRobin,
        )?,
        connect_timeout,
        queue_timeout: values::duration(
            src,
            "queue_timeout",
            r.queue_timeout.as_ref(),
            connect_timeout,
        )?,
        pipe_size: values::size(src, "pipe_size", r.pipe_size.as_ref(), MIB, MAX_PIPE_SIZE)?,
        buffer_size: values::size(
            src,
            "buffer_size",
            r.buffer_size.as_ref(),
            64 * 1024,
            MAX_BUFFER_SIZE,
        )?,
        send_proxy: match &r.send_proxy {
            Some(v) => Some(values::choice(src, "send_proxy", v, PROXY_VERSIONS)?),
            None => None,
        },
        health: health(src, r.health.as_ref())?,
        fallback_file,
        file_strategy: values::choice_or(
            src,
            "fallback_strategy",
            r.fallback_strategy.as_ref(),
            FILE_STRATEGIES,
            FileStrategy::Sendfile,
        )?,
    }))
}

fn health(src: &Source, raw: Option<&Spanned<RawHealth>>) -> Result<Health, ConfigError> {
    let h = raw.map(Spanned::get_ref);
    let max = u64::from(u32::MAX);
    let to_u32 = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    Ok(Health {
        active: raw.is_some(),
        interval: values::positive_duration(
            src,
            "interval",
            h.and_then(|h| h.interval.as_ref()),
            Duration::from_secs(2),
        )?,
        timeout: values::positive_duration(
            src,
            "timeout",
            h.and_then(|h| h.timeout.as_ref()),
            Duration::from_secs(1),
        )?,
        rise: to_u32(values::count(
            src,
            "rise",
            h.and_then(|h| h.rise.as_ref()),
            2,
            1,
            max,
        )?),
        fall: to_u32(values::count(
            src,
            "fall",
            h.and_then(|h| h.fall.as_ref()),
            3,
            1,
            max,
        )?),
        http_path: match h.and_then(|h| h.http_path.as_ref()) {
            Some(p) => Some(http_path(src, p)?),
            None => None,
        },
    })
}

/// Longest `http_path`: it goes into one small request.
const MAX_HTTP_PATH: usize = 1024;

/// An origin-form request target: starts with `/`, printable ASCII, no
/// spaces, so that the request line stays one valid line.
fn http_path(src: &Source, v: &Spanned<String>) -> Result<String, ConfigError> {
    let p = v.get_ref();
    let ok =
        p.starts_with('/') && p.len() <= MAX_HTTP_PATH && p.bytes().all(|b| b.is_ascii_graphic());
    if !ok {
        return Err(src.error(
            &v.span(),
            format!(
                "invalid http_path {p:?}: expected a path that starts with \"/\", like \
                 \"/health\" (printable ASCII, no spaces, at most {MAX_HTTP_PATH} bytes; \
                 percent-encode anything else)"
            ),
        ));
    }
    Ok(p.clone())
}

/// A file route serving `path`: one file (`Want::File`, from `file`) or a
/// folder (`Want::Dir`, from `root`).
fn file(
    src: &Source,
    r: &RawRoute,
    label: &str,
    base: &Path,
    want: Want,
    path: &Spanned<String>,
) -> Result<RouteKind, ConfigError> {
    reject_keys(
        src,
        label,
        &[
            ("balance", span(&r.balance)),
            ("connect_timeout", span(&r.connect_timeout)),
            ("queue_timeout", span(&r.queue_timeout)),
            ("send_proxy", span(&r.send_proxy)),
            ("fallback_file", span(&r.fallback_file)),
            ("fallback_strategy", span(&r.fallback_strategy)),
            ("health", span(&r.health)),
        ],
        "file",
    )?;
    let protocol = values::choice_or(
        src,
        "protocol",
        r.protocol.as_ref(),
        PROTOCOLS,
        Protocol::Http,
    )?;
    let source = match want {
        Want::File => FileSource::File(values::existing_path(src, "file", path, base, want)?),
        Want::Dir => {
            if let (Protocol::Raw, Some(p)) = (protocol, &r.protocol) {
                return Err(src.error(
                    &p.span(),
                    format!(
                        "protocol \"raw\" needs `file`: a raw route sends one file as-is, \
                         it cannot serve a folder (`root`); {label} sets `root`"
                    ),
                ));
            }
            FileSource::Root(values::existing_path(src, "root", path, base, want)?)
        }
    };
    let root_only = |key: &str, value: Option<Range<usize>>| match (want, value) {
        (Want::File, Some(span)) => Err(src.error(
            &span,
            format!(
                "`{key}` only applies to routes that serve a folder (`root`); \
                 {label} serves one `file`"
            ),
        )),
        _ => Ok(()),
    };
    root_only("index", span(&r.index))?;
    root_only("dotfiles", span(&r.dotfiles))?;
    let index = match &r.index {
        Some(v) => {
            let name = v.get_ref();
            if name.is_empty()
                || name.contains('/')
                || name.chars().any(char::is_control)
                || name == "."
                || name == ".."
            {
                return Err(src.error(
                    &v.span(),
                    format!(
                        "invalid index {name:?}: expected a file name like \"index.html\" \
                         (no '/', no control characters)"
                    ),
                ));
            }
            Some(name.clone())
        }
        None => None,
    };
    Ok(RouteKind::File(FileRoute {
        source,
        protocol,
        strategy: strategy(
            src,
            label,
            r.strategy.as_ref(),
            FILE_STRATEGIES,
            PROXY_STRATEGIES,
            ("file", "proxy"),
            FileStrategy::Sendfile,
        )?,
        index,
        send_chunk: values::size_in(
            src,
            "send_chunk",
            r.send_chunk.as_ref(),
            2 * MIB,
            MIN_SEND_CHUNK,
            MAX_SEND_CHUNK,
        )?,
        pipe_size: values::size(src, "pipe_size", r.pipe_size.as_ref(), MIB, MAX_PIPE_SIZE)?,
        buffer_size: values::size(
            src,
            "buffer_size",
            r.buffer_size.as_ref(),
            64 * 1024,
            MAX_BUFFER_SIZE,
        )?,
        dotfiles: r.dotfiles.as_ref().is_some_and(|v| *v.get_ref()),
    }))
}
