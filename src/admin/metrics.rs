//! `GET /metrics`: the Prometheus text exposition format, version 0.0.4.
//!
//! Every family gets its `# HELP` and `# TYPE` lines once, followed by its
//! samples for every route (or backend) of the current generation; label
//! values are escaped as the format requires (`\\`, `\"`, `\n`). Counters
//! are summed over the per-worker slots when read, so scraping costs the
//! workers nothing. Names follow Prometheus conventions: `_total` for
//! counters, base units (bytes, seconds).

use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use super::View;
use crate::conn::End;
use crate::route::{BackendRt, RouteRt};
use crate::stats::{BUCKETS_US, Counters, Snapshot, le_label};

/// Builds the exposition text one family at a time.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// The `_bucket` (cumulative, `le` in seconds), `_sum` and `_count`
    /// samples of one histogram.
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Snapshot) {
        let bucket = format!("{name}_bucket");
        let mut seen = 0;
        for (i, n) in h.counts.iter().enumerate() {
            seen += n;
            let le = BUCKETS_US
                .get(i)
                .map_or("+Inf".to_string(), |&us| le_label(us));
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, seen);
        }
        let sum = h.sum_us as f64 / 1e6;
        self.sample(&format!("{name}_sum"), labels, format!("{sum:.6}"));
        self.sample(&format!("{name}_count"), labels, seen);
    }
}

/// Escape a label value: backslash, double quote and newline.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for ch in v.chars() {
        match ch {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A per-route counter: name, help, and which counter to sum.
type RouteCounter = (&'static str, &'static str, fn(&Counters) -> &AtomicU64);

const ROUTE_COUNTERS: [RouteCounter; 12] = [
    (
        "sluice_route_connections_total",
        "Client connections accepted, including those then refused.",
        |c| &c.conns,
    ),
    (
        "sluice_route_connections_denied_total",
        "Client connections refused by allow/deny.",
        |c| &c.denied,
    ),
    (
        "sluice_route_connections_limited_total",
        "Client connections refused by a connection limit.",
        |c| &c.limited,
    ),
    (
        "sluice_route_bytes_in_total",
        "Bytes received from clients (client to backend).",
        |c| &c.bytes_in,
    ),
    (
        "sluice_route_bytes_out_total",
        "Bytes sent to clients (backend or file to client).",
        |c| &c.bytes_out,
    ),
    (
        "sluice_route_mmap_lease_breaks_total",
        "mmap strategy: file leases broken while a transfer ran.",
        |c| &c.lease_breaks,
    ),
    (
        "sluice_route_mmap_lease_fallbacks_total",
        "mmap strategy: transfers that could not take a lease and used sendfile.",
        |c| &c.lease_fallbacks,
    ),
    (
        "sluice_route_file_truncated_total",
        "File transfers cut short because the file shrank while it was sent.",
        |c| &c.file_truncated,
    ),
    (
        "sluice_route_file_read_errors_total",
        "File transfers cut short because reading the file failed (EIO and the like).",
        |c| &c.file_errors,
    ),
    (
        "sluice_route_proxy_header_errors_total",
        "accept_proxy: connections closed for a malformed, oversized or late PROXY header.",
        |c| &c.proxy_header_errors,
    ),
    (
        "sluice_route_connect_failures_total",
        "Backend connect attempts that failed (refused or timed out).",
        |c| &c.connect_failures,
    ),
    (
        "sluice_route_no_backend_total",
        "Client connections no backend served: none was up, every connect failed, or every backend stayed full for queue_timeout.",
        |c| &c.no_backend,
    ),
];

/// Render every metric of the current generation.
pub fn render(v: &View) -> String {
    let mut o = Out(String::with_capacity(16 * 1024));
    process(&mut o, v);
    let routes = &v.generation.routes;

    o.family(
        "sluice_route_connections_active",
        "gauge",
        "Client connections open now.",
    );
    for r in routes {
        o.sample(
            "sluice_route_connections_active",
            &[("route", &r.cfg.name)],
            r.shared.stats.active(),
        );
    }
    o.family(
        "sluice_route_connections_waiting",
        "gauge",
        "Client connections waiting for a backend below its max_connections.",
    );
    for r in routes.iter().filter(|r| r.proxy().is_some()) {
        o.sample(
            "sluice_route_connections_waiting",
            &[("route", &r.cfg.name)],
            r.shared.waiting.load(Ordering::Relaxed),
        );
    }
    for (name, help, f) in ROUTE_COUNTERS {
        o.family(name, "counter", help);
        for r in routes {
            o.sample(name, &[("route", &r.cfg.name)], r.shared.stats.sum(f));
        }
    }
    labelled(
        &mut o,
        routes,
        "sluice_route_strategy_bytes_total",
        "Bytes moved by each strategy, both directions together.",
        "strategy",
        &[
            ("splice", |c| &c.bytes_splice),
            ("copy", |c| &c.bytes_copy),
            ("sendfile", |c| &c.bytes_sendfile),
            ("mmap", |c| &c.bytes_mmap),
        ],
    );
    labelled(
        &mut o,
        routes,
        "sluice_route_splice_fallbacks_total",
        "Connections that wanted to splice but copied, by reason.",
        "reason",
        &[
            ("no_pipe", |c| &c.fallback_no_pipe),
            ("refused", |c| &c.fallback_refused),
            ("memory", |c| &c.fallback_memory),
            ("file_blocked", |c| &c.fallback_file_blocked),
        ],
    );
    o.family(
        "sluice_route_connections_ended_total",
        "counter",
        "Client connections ended, by reason.",
    );
    for r in routes {
        for end in End::ALL {
            let n = r.shared.stats.sum(|c| &c.ends[end as usize]);
            o.sample(
                "sluice_route_connections_ended_total",
                &[("route", &r.cfg.name), ("reason", end.as_str())],
                n,
            );
        }
    }
    o.family(
        "sluice_route_http_responses_total",
        "counter",
        "HTTP responses sent by file routes, by status class.",
    );
    for r in routes {
        for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
            let n = r.shared.stats.sum(|c| &c.http_status[i + 1]);
            o.sample(
                "sluice_route_http_responses_total",
                &[("route", &r.cfg.name), ("class", class)],
                n,
            );
        }
    }
    let name = "sluice_route_connection_duration_seconds";
    o.family(
        name,
        "histogram",
        "How long client connections lived, from accept to close, whatever their end.",
    );
    for r in routes {
        let h = r.shared.stats.histogram(|c| &c.lifetime);
        o.histogram(name, &[("route", &r.cfg.name)], &h);
    }
    let name = "sluice_route_queue_seconds";
    o.family(
        name,
        "histogram",
        "How long clients that had to wait for a backend below its max_connections waited in all (clients that never waited are not counted).",
    );
    for r in routes.iter().filter(|r| r.proxy().is_some()) {
        let h = r.shared.stats.histogram(|c| &c.queued);
        o.histogram(name, &[("route", &r.cfg.name)], &h);
    }
    backends(&mut o, routes);
    o.0
}

fn process(o: &mut Out, v: &View) {
    let start = v
        .started
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    o.family(
        "sluice_start_time_seconds",
        "gauge",
        "Start time of the process since the Unix epoch, in seconds.",
    );
    o.sample("sluice_start_time_seconds", &[], format!("{start:.3}"));
    o.family(
        "sluice_config_generation",
        "gauge",
        "Configuration generation in use: 1 at start, +1 per successful reload.",
    );
    o.sample("sluice_config_generation", &[], v.generation.id);
    o.family(
        "sluice_reloads_total",
        "counter",
        "Configuration reloads (SIGHUP), by result.",
    );
    let p = v.process;
    o.sample(
        "sluice_reloads_total",
        &[("result", "ok")],
        p.reloads_ok.load(Ordering::Relaxed),
    );
    o.sample(
        "sluice_reloads_total",
        &[("result", "failed")],
        p.reloads_failed.load(Ordering::Relaxed),
    );
    o.family(
        "sluice_workers",
        "gauge",
        "Worker threads serving the listeners (retiring ones: sluice_workers_retiring).",
    );
    o.sample("sluice_workers", &[], v.workers);
    o.family(
        "sluice_workers_retiring",
        "gauge",
        "Worker threads a reload that lowered `workers` retired, still finishing their connections.",
    );
    o.sample("sluice_workers_retiring", &[], v.retiring);
    o.family(
        "sluice_connections_active",
        "gauge",
        "Client connections open now, all routes together.",
    );
    o.sample(
        "sluice_connections_active",
        &[],
        v.shared.active.load(Ordering::Relaxed),
    );
    o.family(
        "sluice_pipes_in_use",
        "gauge",
        "Kernel pipes in existence for splice (lent out or pooled).",
    );
    o.sample("sluice_pipes_in_use", &[], v.shared.pipes.used());
    o.family(
        "sluice_draining",
        "gauge",
        "1 while a graceful stop is in progress.",
    );
    o.sample(
        "sluice_draining",
        &[],
        u8::from(v.shared.draining.load(Ordering::Relaxed)),
    );
}

type Labelled = (&'static str, fn(&Counters) -> &AtomicU64);

fn labelled(
    o: &mut Out,
    routes: &[std::sync::Arc<RouteRt>],
    name: &str,
    help: &str,
    label: &str,
    values: &[Labelled],
) {
    o.family(name, "counter", help);
    for r in routes {
        for (value, f) in values {
            o.sample(
                name,
                &[("route", &r.cfg.name), (label, value)],
                r.shared.stats.sum(f),
            );
        }
    }
}

/// A per-backend metric: name, type, help, value (from the live state or
/// from the route's configuration of that backend).
type BackendMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&BackendRt, &crate::config::Backend) -> i64,
);

const BACKEND_METRICS: [BackendMetric; 8] = [
    (
        "sluice_backend_up",
        "gauge",
        "1 if the backend is up (health checks and passive marking), 0 if down.",
        |b, _| i64::from(b.is_up()),
    ),
    (
        "sluice_backend_connections_active",
        "gauge",
        "Connections open to the backend now.",
        |b, _| b.active.load(Ordering::Relaxed) as i64,
    ),
    (
        "sluice_backend_connections_total",
        "counter",
        "Connections established to the backend.",
        |b, _| b.total.load(Ordering::Relaxed) as i64,
    ),
    (
        "sluice_backend_connect_failures_total",
        "counter",
        "Connect attempts to the backend that failed.",
        |b, _| b.failures.load(Ordering::Relaxed) as i64,
    ),
    (
        "sluice_backend_last_check",
        "gauge",
        "Result of the last active health check: 1 passed, 0 failed, -1 none yet.",
        |b, _| match b.last_check.load(Ordering::Relaxed) {
            1 => 1,
            2 => 0,
            _ => -1,
        },
    ),
    (
        "sluice_backend_weight",
        "gauge",
        "The backend's weight: its share of new connections relative to its route's other backends of the same rank.",
        |_, c| i64::from(c.weight),
    ),
    (
        "sluice_backend_backup",
        "gauge",
        "1 for a backup backend, used only while no primary backend of its route is up.",
        |_, c| i64::from(c.backup),
    ),
    (
        "sluice_backend_max_connections",
        "gauge",
        "The backend's max_connections: most connections open to it at once (0: no limit).",
        |_, c| c.max_connections as i64,
    ),
];

fn backends(o: &mut Out, routes: &[std::sync::Arc<RouteRt>]) {
    // Each backend once: a route cannot list a server twice (config error).
    let each = || {
        routes
            .iter()
            .filter_map(|r| r.proxy().map(|p| (r, p)))
            .flat_map(|(r, p)| {
                r.backends
                    .iter()
                    .zip(&p.backends)
                    .map(move |(b, c)| (r, b, c))
            })
    };
    for (name, kind, help, f) in BACKEND_METRICS {
        o.family(name, kind, help);
        for (r, b, c) in each() {
            let addr = b.addr.to_string();
            o.sample(
                name,
                &[
                    ("route", &r.cfg.name),
                    ("backend", &c.name),
                    ("address", &addr),
                ],
                f(b, c),
            );
        }
    }
    let name = "sluice_backend_connect_seconds";
    o.family(
        name,
        "histogram",
        "How long successful connects to the backend took, one attempt each.",
    );
    for (r, b, c) in each() {
        let addr = b.addr.to_string();
        let mut h = Snapshot::default();
        b.connect_time.add_to(&mut h);
        o.histogram(
            name,
            &[
                ("route", &r.cfg.name),
                ("backend", &c.name),
                ("address", &addr),
            ],
            &h,
        );
    }
    let name = "sluice_backend_health_checks_total";
    o.family(
        name,
        "counter",
        "Active health checks of the backend, by result.",
    );
    for (r, b, c) in each() {
        let addr = b.addr.to_string();
        for (result, n) in [("ok", &b.checks_ok), ("failed", &b.checks_failed)] {
            o.sample(
                name,
                &[
                    ("route", &r.cfg.name),
                    ("backend", &c.name),
                    ("address", &addr),
                    ("result", result),
                ],
                n.load(Ordering::Relaxed),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("plain-name_1.x:80"), "plain-name_1.x:80");
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("line\nbreak"), "line\\nbreak");
    }
}
