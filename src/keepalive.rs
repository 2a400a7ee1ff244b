//! TCP keepalive on sluice's sockets (`tcp_keepalive`,
//! `tcp_keepalive_interval`, `tcp_keepalive_count`).
//!
//! Backend sockets are new for every connection: they get what the route
//! sets, and a companion the route leaves out stays unset, so the kernel
//! applies its sysctl when it probes.
//!
//! Listening sockets outlive reloads, and their clients inherit their
//! options, so they are set once per generation instead of per client.
//! A listening socket may also come from systemd with its unit's
//! `KeepAlive=` settings. So the first time sluice touches one it notes
//! what the socket had (`Untouched`); a key the route leaves out keeps
//! that value, and a reload that removes `tcp_keepalive` gives all of it
//! back. Only options that differ are written: one never set stays unset
//! (following its sysctl) until sluice changes it; given back after that,
//! it holds the sysctl's value of when sluice first touched the socket, as
//! Linux has no way to unset it.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

use crate::config::Keepalive;

/// The keepalive options a backend socket gets.
pub fn backend_params(k: &Keepalive) -> TcpKeepalive {
    let mut ka = TcpKeepalive::new().with_time(k.idle);
    if let Some(d) = k.interval {
        ka = ka.with_interval(d);
    }
    if let Some(n) = k.count {
        ka = ka.with_retries(n);
    }
    ka
}

/// A listening socket's keepalive options before sluice first set them
/// (for an option never set, the kernel reports the sysctl's value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Untouched {
    on: bool,
    idle: Duration,
    interval: Duration,
    count: u32,
}

/// Give the sockets listening on `addr` the route's keepalive (`want`),
/// or back what they had when a reload drops it. `noted` holds, for every
/// address sluice set keepalive on, what its sockets had before: noted
/// the first time, forgotten once given back. A failure is logged; the
/// clients then keep the previous setting.
pub fn set_listener(
    noted: &mut HashMap<SocketAddr, Untouched>,
    addr: SocketAddr,
    socks: &[Arc<TcpListener>],
    want: Option<&Keepalive>,
    route: &str,
) {
    let before = match (want, noted.get(&addr)) {
        (None, None) => return,
        (_, Some(b)) => *b,
        (Some(_), None) => match Untouched::read(SockRef::from(&*socks[0])) {
            Ok(b) => b,
            Err(e) => {
                log::warn!(
                    "route {route}: cannot read the keepalive options of {addr}: {e}; \
                     tcp_keepalive not set there"
                );
                return;
            }
        },
    };
    for s in socks {
        if let Err(e) = apply(SockRef::from(&**s), want, &before) {
            log::warn!(
                "route {route}: cannot set tcp_keepalive on {addr}: {e}; clients keep the \
                 previous setting"
            );
        }
    }
    match want {
        Some(_) => noted.insert(addr, before),
        None => noted.remove(&addr),
    };
}

impl Untouched {
    fn read(sock: SockRef<'_>) -> io::Result<Untouched> {
        Ok(Untouched {
            on: sock.keepalive()?,
            idle: sock.tcp_keepalive_time()?,
            interval: sock.tcp_keepalive_interval()?,
            count: sock.tcp_keepalive_retries()?,
        })
    }
}

/// Give a listening socket the route's keepalive (`Some`) or what it had
/// before (`None`), writing only the options that differ.
fn apply(sock: SockRef<'_>, want: Option<&Keepalive>, before: &Untouched) -> io::Result<()> {
    let (on, idle, interval, count) = match want {
        Some(k) => (
            true,
            k.idle,
            k.interval.unwrap_or(before.interval),
            k.count.unwrap_or(before.count),
        ),
        None => (before.on, before.idle, before.interval, before.count),
    };
    let mut params = TcpKeepalive::new();
    let mut change = false;
    if sock.tcp_keepalive_time()? != idle {
        (params, change) = (params.with_time(idle), true);
    }
    if sock.tcp_keepalive_interval()? != interval {
        (params, change) = (params.with_interval(interval), true);
    }
    if sock.tcp_keepalive_retries()? != count {
        (params, change) = (params.with_retries(count), true);
    }
    if change {
        // Also turns SO_KEEPALIVE on: set to what is wanted just below.
        sock.set_tcp_keepalive(&params)?;
    }
    if change || sock.keepalive()? != on {
        sock.set_keepalive(on)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").unwrap()
    }

    fn now(l: &TcpListener) -> Untouched {
        Untouched::read(SockRef::from(l)).unwrap()
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_fresh_socket_gets_the_route_and_then_all_it_had_back() {
        let l = listener();
        let before = now(&l);
        assert!(!before.on);
        let k = Keepalive {
            idle: secs(30),
            interval: Some(secs(5)),
            count: Some(4),
        };
        apply(SockRef::from(&l), Some(&k), &before).unwrap();
        let set = Untouched {
            on: true,
            idle: secs(30),
            interval: secs(5),
            count: 4,
        };
        assert_eq!(now(&l), set);
        // A reload that drops the interval and count: the system's again.
        let idle_only = Keepalive {
            idle: secs(30),
            interval: None,
            count: None,
        };
        apply(SockRef::from(&l), Some(&idle_only), &before).unwrap();
        let want = Untouched {
            interval: before.interval,
            count: before.count,
            ..set
        };
        assert_eq!(now(&l), want);
        // One that drops tcp_keepalive: off, and as it was.
        apply(SockRef::from(&l), None, &before).unwrap();
        assert_eq!(now(&l), before);
    }

    #[test]
    fn a_socket_unit_keeps_what_the_route_leaves_out() {
        // As systemd passes it with KeepAlive=yes, KeepAliveTimeSec=100,
        // KeepAliveIntervalSec=7, KeepAliveProbes=2.
        let l = listener();
        let unit = TcpKeepalive::new()
            .with_time(secs(100))
            .with_interval(secs(7))
            .with_retries(2);
        SockRef::from(&l).set_tcp_keepalive(&unit).unwrap();
        let before = now(&l);
        let k = Keepalive {
            idle: secs(20),
            interval: None,
            count: Some(9),
        };
        apply(SockRef::from(&l), Some(&k), &before).unwrap();
        let want = Untouched {
            on: true,
            idle: secs(20),
            interval: secs(7),
            count: 9,
        };
        assert_eq!(now(&l), want);
        apply(SockRef::from(&l), None, &before).unwrap();
        assert_eq!(now(&l), before, "the unit's settings, on");
    }
}
