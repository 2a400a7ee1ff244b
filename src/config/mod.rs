//! Configuration: the TOML schema sluice reads, and the validated form the
//! engine runs on.
//!
//! Loading happens in two steps. `schema` deserializes the file into raw,
//! span-carrying structs (so every later complaint can point at a line and
//! column), then `validate` turns those into the plain types below, resolving
//! hostnames, relative paths and defaults. The engine only ever sees the
//! validated types: it never has to re-check a value.
//!
//! Files: `schema` (raw serde structs), `units` (durations and sizes),
//! `diagnose` (toml/serde errors → located messages), `validate` (global,
//! admin, cross-route checks), `route` (one route), `values` and `net`
//! (checked conversions of single values), `error` (`ConfigError`, offsets
//! → line/column). Every error is `FILE:LINE:COL: MESSAGE`, see `error`.

mod diagnose;
mod error;
mod net;
mod route;
mod schema;
#[cfg(test)]
mod tests;
mod units;
mod validate;
mod values;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::ConfigError;
pub use ipnet::IpNet;

/// Read and validate the configuration file at `path`.
///
/// Relative paths inside the file (`file`, `root`, `fallback_file`) are
/// resolved against the file's folder. Errors name `path` as given.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError::io(path, e))?;
    match std::str::from_utf8(&bytes) {
        Ok(text) => parse(text, path),
        Err(e) => {
            // Point at the first bad byte; the text before it is valid.
            let valid = &bytes[..e.valid_up_to()];
            let text = std::str::from_utf8(valid).unwrap_or_default();
            Err(ConfigError::at(
                path,
                text,
                text.len(),
                "the file is not valid UTF-8: expected UTF-8 text",
            ))
        }
    }
}

/// Validate configuration `text` as if read from `path` (used for messages
/// and to resolve relative paths; the file itself is not read).
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let src = error::Source { path, text };
    let doc = toml::de::DeTable::parse(text).map_err(|e| diagnose::syntax_error(&src, &e))?;
    diagnose::check_shape(&src, doc.get_ref())?;
    let raw = schema::from_str(text).map_err(|e| diagnose::toml_error(&src, doc.get_ref(), &e))?;
    validate::validate(&src, raw)
}

impl Config {
    /// One line for `sluice check`, e.g. `config /etc/sluice/sluice.toml
    /// ok: 3 routes (2 proxy, 1 file), 5 listeners, 4 backends, 2 workers`,
    /// followed by `, admin on ADDR` when there is an admin listener.
    /// Listeners counts the routes' listen addresses.
    pub fn summary(&self) -> String {
        let proxies: Vec<&ProxyRoute> = self
            .routes
            .iter()
            .filter_map(|r| match &r.kind {
                RouteKind::Proxy(p) => Some(p),
                RouteKind::File(_) => None,
            })
            .collect();
        let files = self.routes.len() - proxies.len();
        let listeners: usize = self.routes.iter().map(|r| r.listen.len()).sum();
        let backends: usize = proxies.iter().map(|p| p.backends.len()).sum();
        let admin = self
            .admin
            .as_ref()
            .map(|a| format!(", admin on {}", a.listen))
            .unwrap_or_default();
        format!(
            "config {} ok: {} ({} proxy, {} file), {}, {}, {}{admin}",
            self.path.display(),
            plural(self.routes.len(), "route"),
            proxies.len(),
            files,
            plural(listeners, "listener"),
            plural(backends, "backend"),
            plural(self.global.workers, "worker"),
        )
    }
}

fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A fully validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages).
    pub path: PathBuf,
    pub global: Global,
    pub admin: Option<Admin>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone)]
pub struct Global {
    /// Whole-process connection cap (client connections).
    pub max_connections: usize,
    /// Pipe pool cap, already derived when the file said 0.
    pub max_pipes: usize,
    pub shutdown_timeout: Duration,
    pub log_level: log::LevelFilter,
    /// Worker threads, already resolved (0 in the file = one per CPU).
    pub workers: usize,
    /// Files each worker keeps open for file routes (validated by one
    /// stat on every use); 0 = none.
    pub open_file_cache: usize,
    /// A cached file unused for this long is closed.
    pub open_file_cache_inactive: Duration,
    /// After a poll that found events, a worker polls without sleeping
    /// for this long before it blocks; zero = never (the default).
    pub busy_poll: Duration,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub listen: SocketAddr,
}

/// `tcp_keepalive` and its two companions: when a quiet connection is
/// probed, and how a peer that stopped answering is found dead (after
/// `idle + interval * count` without an answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// No traffic for this long before the first probe (TCP_KEEPIDLE).
    pub idle: Duration,
    /// Between unanswered probes (TCP_KEEPINTVL); `None`: the system's
    /// `net.ipv4.tcp_keepalive_intvl`.
    pub interval: Option<Duration>,
    /// Unanswered probes before the connection is dropped (TCP_KEEPCNT);
    /// `None`: the system's `net.ipv4.tcp_keepalive_probes`.
    pub count: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    pub kind: RouteKind,
    /// Close a connection with no traffic either way for this long
    /// (for HTTP file routes: keep-alive idle between requests).
    pub idle_timeout: Duration,
    /// TCP keepalive probes, on client sockets (set on the listener,
    /// which accepted sockets inherit) and backend sockets; `None`: off.
    pub tcp_keepalive: Option<Keepalive>,
    /// Per-route cap on open client connections.
    pub max_connections: usize,
    /// Per client IP cap; 0 = unlimited.
    pub max_connections_per_ip: usize,
    /// Empty = allow everyone (unless denied).
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    /// Expect a PROXY protocol header from the client first.
    pub accept_proxy: bool,
    /// With `accept_proxy`: the only peers allowed to send one (the
    /// balancers); empty = anyone who can reach the port.
    pub accept_proxy_from: Vec<IpNet>,
    /// HTTP: time to receive a whole request head; PROXY: time to receive
    /// the PROXY header.
    pub header_timeout: Duration,
}

#[derive(Debug, Clone)]
pub enum RouteKind {
    Proxy(ProxyRoute),
    File(FileRoute),
}

#[derive(Debug, Clone)]
pub struct Backend {
    /// As written in the file ("app2.internal:9000"), for logs and metrics.
    pub name: String,
    /// Resolved at load.
    pub addr: SocketAddr,
    /// Share of new connections relative to the others (1 to 256).
    pub weight: u32,
    /// Used only while no other backend of the route can be.
    pub backup: bool,
    /// Most connections open to it at once, all workers together
    /// (0: no limit). A client that finds every backend full waits for
    /// one (`queue_timeout`).
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct ProxyRoute {
    pub backends: Vec<Backend>,
    pub strategy: ProxyStrategy,
    pub balance: Balance,
    pub connect_timeout: Duration,
    /// How long a client may wait for a backend below its
    /// `max_connections`; zero: turned away at once.
    pub queue_timeout: Duration,
    /// Requested pipe size in bytes (F_SETPIPE_SZ; the kernel may clamp it).
    pub pipe_size: usize,
    /// Copy buffer size in bytes, per direction.
    pub buffer_size: usize,
    pub send_proxy: Option<ProxyVersion>,
    pub health: Health,
    /// Sent to the client when no backend can be connected.
    pub fallback_file: Option<PathBuf>,
    /// How `fallback_file` is sent.
    pub file_strategy: FileStrategy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyStrategy {
    Splice,
    Copy,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConnections,
    SourceHash,
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

#[derive(Debug, Clone)]
pub struct Health {
    /// Active checks enabled (a `[route.health]` table was given).
    pub active: bool,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// HTTP checks: the path to GET; a 2xx or 3xx answer passes. `None`:
    /// a completed TCP connect passes.
    pub http_path: Option<String>,
}

#[derive(Debug, Clone)]
pub struct FileRoute {
    pub source: FileSource,
    pub protocol: Protocol,
    pub strategy: FileStrategy,
    /// HTTP with `root`: file served for a directory request.
    pub index: Option<String>,
    /// Most bytes sent for one connection per turn.
    pub send_chunk: usize,
    pub pipe_size: usize,
    pub buffer_size: usize,
    /// Serve names starting with '.' (default false).
    pub dotfiles: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSource {
    File(PathBuf),
    Root(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileStrategy {
    Sendfile,
    Mmap,
    Splice,
    Copy,
}
