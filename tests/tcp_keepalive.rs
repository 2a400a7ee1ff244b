//! `tcp_keepalive`, through the real binary: the kernel's own view of
//! sluice's sockets (/proc/net/tcp) shows the keepalive timer armed on the
//! client socket and the backend socket of a route that sets it, with the
//! configured idle time, and no timer on a route that does not; a reload
//! turns it off for new clients.

mod common;

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One established IPv4 socket from /proc/net/tcp.
#[derive(Debug)]
struct TcpRow {
    local_port: u16,
    remote_port: u16,
    /// Active timer: 0 none, 1 retransmit, 2 keepalive (or another
    /// sk_timer), 3 TIME_WAIT, 4 zero-window probe.
    timer: u8,
    /// When it fires, in clock ticks (USER_HZ, 100 a second) from now.
    when: u64,
}

fn established() -> Vec<TcpRow> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = |s: &str| u16::from_str_radix(s.split(':').nth(1)?, 16).ok();
            if f.get(3) != Some(&"01") {
                return None;
            }
            let (tr, when) = f.get(5)?.split_once(':')?;
            Some(TcpRow {
                local_port: port(f[1])?,
                remote_port: port(f[2])?,
                timer: u8::from_str_radix(tr, 16).ok()?,
                when: u64::from_str_radix(when, 16).ok()?,
            })
        })
        .collect()
}

/// sluice's two sockets of one connection: the one accepted on route port
/// `port` from the test client's `client_port`, and the one to backend
/// port `bport` from `via` (the peer port the backend saw). Waits until
/// no other timer (a delayed ACK) is pending on them.
fn sluice_sockets(port: u16, client_port: u16, bport: u16, via: u16) -> (TcpRow, TcpRow) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = established();
        let client = rows
            .iter()
            .position(|r| r.local_port == port && r.remote_port == client_port);
        let backend = rows
            .iter()
            .position(|r| r.remote_port == bport && r.local_port == via);
        if let (Some(c), Some(b)) = (client, backend) {
            let settled = |r: &TcpRow| r.timer == 0 || r.when > 100;
            if settled(&rows[c]) && settled(&rows[b]) {
                let mut rows = rows;
                let (c, b) = if c > b {
                    let c = rows.remove(c);
                    (c, rows.remove(b))
                } else {
                    let b = rows.remove(b);
                    (rows.remove(c), b)
                };
                return (c, b);
            }
        }
        assert!(Instant::now() < end, "sluice's sockets not found: {rows:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A backend that sends "b" and a newline, then echoes; it records the
/// peer port of each connection (sluice's backend socket).
fn backend() -> (Backend, std::sync::Arc<std::sync::Mutex<Vec<u16>>>) {
    let ports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let p2 = ports.clone();
    let b = Backend::spawn(move |mut s| {
        p2.lock().unwrap().push(s.peer_addr().unwrap().port());
        let _ = std::io::Write::write_all(&mut s, b"b\n");
        echo(&mut s);
        String::new()
    });
    (b, ports)
}

#[test]
fn keepalive_is_armed_on_both_sockets_of_a_route_that_sets_it() {
    let (b, via) = backend();
    let (on, off) = (free_port(), free_port());
    let cfg = |keepalive: &str| {
        format!(
            "[global]\nworkers = 1\n\n\
             [[route]]\nname = \"on\"\nlisten = \"127.0.0.1:{on}\"\nbackends = [\"{}\"]\n{keepalive}\n\n\
             [[route]]\nname = \"off\"\nlisten = \"127.0.0.1:{off}\"\nbackends = [\"{}\"]\n",
            b.addr, b.addr
        )
    };
    let mut sl = Sluice::start("keepalive", &cfg("tcp_keepalive = \"45s\""));
    let bport = b.addr.port();
    // The sockets of the connection just made through `port`.
    let through = |port: u16| {
        let mut c = connect(addr(port));
        assert_eq!(read_line(&mut c), "b");
        let last = *via.lock().unwrap().last().unwrap();
        let rows = sluice_sockets(port, c.local_addr().unwrap().port(), bport, last);
        (c, rows)
    };

    let (_c1, (client, backend)) = through(on);
    for (side, r) in [("client", &client), ("backend", &backend)] {
        assert_eq!(r.timer, 2, "{side}: keepalive timer armed: {r:?}");
        // 45 s from the last traffic, in clock ticks.
        assert!((3500..=4500).contains(&r.when), "{side}: {r:?}");
    }
    let (_c2, (client, backend)) = through(off);
    assert_eq!(
        (client.timer, backend.timer),
        (0, 0),
        "{client:?} {backend:?}"
    );

    // A reload that drops the key turns it off for new clients (the
    // listening socket is kept, its option changed); the client already
    // connected keeps it.
    std::fs::write(&sl.config, cfg("")).unwrap();
    sl.signal("HUP");
    sl.wait_log("reload ok: generation 2", Duration::from_secs(10));
    let (_c3, (client, backend)) = through(on);
    assert_eq!(
        (client.timer, backend.timer),
        (0, 0),
        "{client:?} {backend:?}"
    );
    let first = sluice_sockets(
        on,
        _c1.local_addr().unwrap().port(),
        bport,
        via.lock().unwrap()[0],
    );
    assert_eq!(first.0.timer, 2, "{first:?}");
}

#[test]
fn tcp_keepalive_out_of_range_is_a_config_error() {
    let b = free_port();
    for (value, col) in [("\"0s\"", 17), ("\"10h\"", 17)] {
        let dir = temp_dir("keepalive-bad");
        let path = dir.join("sluice.toml");
        std::fs::write(
            &path,
            format!(
                "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:1\"\nbackends = [\"127.0.0.1:{b}\"]\n\
                 tcp_keepalive = {value}\n"
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!(
                "sluice.toml:5:{col}: tcp_keepalive must be from 1s to 32767s"
            )),
            "{err}"
        );
    }
}
