//! `GET /`: the status page an operator reads at a glance, in the spirit
//! of HAProxy's stats page: one table per route with its backends, their
//! state (UP green, DOWN red), connections and traffic. It refreshes
//! itself every 5 seconds; every name from the configuration is
//! HTML-escaped.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::View;
use crate::config::{Balance, FileStrategy, Protocol, ProxyStrategy, RouteKind};
use crate::route::RouteRt;
use crate::stats::Counters;

const STYLE: &str = "body{font-family:sans-serif;margin:1em;color:#222}\
table{border-collapse:collapse;margin-bottom:1.5em;min-width:60em}\
th,td{border:1px solid #999;padding:3px 8px;text-align:right}\
th{background:#dde}td.l,th.l{text-align:left}\
caption{text-align:left;font-weight:bold;padding:4px 0}\
.up{background:#8d8;font-weight:bold;text-align:center}\
.down{background:#e66;color:#fff;font-weight:bold;text-align:center}\
.drain{background:#fc6;padding:4px}.sum td{background:#eef}";

/// Escape text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Bytes in a unit a person reads at a glance.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn render(v: &View) -> String {
    let mut h = String::with_capacity(8 * 1024);
    let uptime = SystemTime::now()
        .duration_since(v.started)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <title>sluice status</title><style>{STYLE}</style></head><body>\n\
         <h1>sluice {}</h1>\n<p>up {}h{:02}m{:02}s · configuration generation {} · \
         reloads {} ok, {} failed · {} workers{} · {} connections open · {} pipes in use</p>\n",
        env!("CARGO_PKG_VERSION"),
        uptime / 3600,
        uptime / 60 % 60,
        uptime % 60,
        v.generation.id,
        v.process.reloads_ok.load(Ordering::Relaxed),
        v.process.reloads_failed.load(Ordering::Relaxed),
        v.workers,
        match v.retiring {
            0 => String::new(),
            n => format!(" (and {n} retiring)"),
        },
        v.shared.active.load(Ordering::Relaxed),
        v.shared.pipes.used(),
    );
    if v.shared.draining.load(Ordering::Relaxed) {
        h.push_str("<p class=\"drain\">Draining: not accepting new connections.</p>\n");
    }
    for r in &v.generation.routes {
        route(&mut h, r);
    }
    h.push_str("</body></html>\n");
    h
}

fn route(h: &mut String, r: &RouteRt) {
    let s = &r.shared.stats;
    let listen: Vec<String> = r.cfg.listen.iter().map(|a| a.to_string()).collect();
    let what = match &r.cfg.kind {
        RouteKind::Proxy(p) => {
            let strategy = match p.strategy {
                ProxyStrategy::Splice => "splice",
                ProxyStrategy::Copy => "copy",
                ProxyStrategy::Auto => "auto",
            };
            let balance = match p.balance {
                Balance::RoundRobin => "round-robin",
                Balance::LeastConnections => "least-connections",
                Balance::SourceHash => "source-hash",
                Balance::Random => "random",
            };
            let health = if p.health.active {
                format!("checks every {:?}", p.health.interval)
            } else {
                "passive checks".to_string()
            };
            format!("proxy, strategy {strategy}, balance {balance}, {health}")
        }
        RouteKind::File(f) => {
            let strategy = match f.strategy {
                FileStrategy::Sendfile => "sendfile",
                FileStrategy::Mmap => "mmap",
                FileStrategy::Splice => "splice",
                FileStrategy::Copy => "copy",
            };
            let protocol = match f.protocol {
                Protocol::Http => "http",
                Protocol::Raw => "raw",
            };
            format!("file ({protocol}), strategy {strategy}")
        }
    };
    let _ = write!(
        h,
        "<table>\n<caption>route {} — {} — {}</caption>\n\
         <tr><th class=\"l\">backend</th><th class=\"l\">address</th><th>state</th>\
         <th>weight</th><th>active</th><th>connections</th><th>connect failures</th>\
         <th>last check</th><th>checks ok / failed</th></tr>\n",
        esc(&r.cfg.name),
        esc(&listen.join(", ")),
        esc(&what),
    );
    for (i, b) in r.backends.iter().enumerate() {
        let up = b.is_up();
        let weight = match r.proxy().map(|p| &p.backends[i]) {
            Some(c) if c.backup => format!("{} (backup)", c.weight),
            Some(c) => c.weight.to_string(),
            None => "-".into(),
        };
        // "3 / 10" against a max_connections, else just the count.
        let active = match r.proxy().map(|p| p.backends[i].max_connections) {
            Some(max) if max > 0 => format!("{} / {max}", b.active.load(Ordering::Relaxed)),
            _ => b.active.load(Ordering::Relaxed).to_string(),
        };
        let last = match b.last_check.load(Ordering::Relaxed) {
            1 => "passed",
            2 => "failed",
            _ => "-",
        };
        let _ = writeln!(
            h,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"{}\">{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td></tr>",
            esc(r.backend_name(i)),
            esc(&b.addr.to_string()),
            if up { "up" } else { "down" },
            if up { "UP" } else { "DOWN" },
            weight,
            active,
            b.total.load(Ordering::Relaxed),
            b.failures.load(Ordering::Relaxed),
            last,
            b.checks_ok.load(Ordering::Relaxed),
            b.checks_failed.load(Ordering::Relaxed),
        );
    }
    let sum = |f: fn(&Counters) -> &std::sync::atomic::AtomicU64| s.sum(f);
    let by_strategy: Vec<String> = [
        ("splice", sum(|c| &c.bytes_splice)),
        ("copy", sum(|c| &c.bytes_copy)),
        ("sendfile", sum(|c| &c.bytes_sendfile)),
        ("mmap", sum(|c| &c.bytes_mmap)),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(k, n)| format!("{k} {}", bytes(n)))
    .collect();
    let by_strategy = if by_strategy.is_empty() {
        String::new()
    } else {
        format!(" ({})", by_strategy.join(", "))
    };
    let _ = writeln!(
        h,
        "<tr class=\"sum\"><td class=\"l\" colspan=\"4\">route total: {} in, {} out{}; \
         {} denied, {} limited, {} without backend{}</td><td>{}</td><td>{}</td><td>{}</td>\
         <td colspan=\"2\"></td></tr>\n</table>",
        bytes(sum(|c| &c.bytes_in)),
        bytes(sum(|c| &c.bytes_out)),
        esc(&by_strategy),
        sum(|c| &c.denied),
        sum(|c| &c.limited),
        sum(|c| &c.no_backend),
        match r.shared.waiting.load(Ordering::Relaxed) {
            0 => String::new(),
            n => format!(", {n} waiting for a backend"),
        },
        s.active(),
        sum(|c| &c.conns),
        sum(|c| &c.connect_failures),
    );
}

#[cfg(test)]
mod tests {
    use super::{bytes, esc};

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            esc("<b>\"x\" & 'y'</b>"),
            "&lt;b&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/b&gt;"
        );
        assert_eq!(esc("app2.internal:9000"), "app2.internal:9000");
    }

    #[test]
    fn bytes_read_at_a_glance() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
