//! `tcp_keepalive`, through the real binary: the kernel's own view of
//! sluice's sockets (/proc/net/tcp) shows the keepalive timer armed on the
//! client socket and the backend socket of a route that sets it, with the
//! configured idle time, and no timer on a route that does not; a reload
//! turns it off for new clients. Between two network namespaces of the
//! test's own, a peer that vanishes is dropped after the configured
//! interval and count of unanswered probes.

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

/// Two test hosts of this test's own, network namespaces joined by a veth
/// pair: `a` (10.203.0.1) runs sluice, `b` (10.203.0.2) the far peers.
/// Taking b's end of the link down makes whatever a sends vanish without
/// an answer, as a crashed host or a NAT that forgot the flow would.
/// Removed on drop (deleting a namespace deletes its end of the veth).
struct Hosts {
    a: String,
    b: String,
}

impl Hosts {
    fn new() -> Hosts {
        let uid = std::process::Command::new("id").arg("-u").output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "this test builds network namespaces (ip netns): run the tests as root, \
             as .ci/run does"
        );
        let id = std::process::id();
        let hosts = Hosts {
            a: format!("sl-ka-a-{id}"),
            b: format!("sl-ka-b-{id}"),
        };
        let (va, vb) = (format!("ska{id}"), format!("skb{id}"));
        for cmd in [
            format!("netns add {}", hosts.a),
            format!("netns add {}", hosts.b),
            format!(
                "link add {va} netns {} type veth peer name {vb} netns {}",
                hosts.a, hosts.b
            ),
            format!("-n {} addr add 10.203.0.1/30 dev {va}", hosts.a),
            format!("-n {} addr add 10.203.0.2/30 dev {vb}", hosts.b),
            format!("-n {} link set {va} up", hosts.a),
            format!("-n {} link set {vb} up", hosts.b),
            format!("-n {} link set lo up", hosts.a),
            format!("-n {} link set lo up", hosts.b),
        ] {
            ip(&cmd);
        }
        hosts
    }

    /// The wrapper that runs a command on host `ns`.
    fn on(ns: &str) -> Vec<String> {
        ["ip", "netns", "exec", ns].map(String::from).to_vec()
    }

    /// A client on host `ns` that connects to `to` and then stays quiet
    /// (bash's /dev/tcp: no tool to install).
    fn quiet_client(ns: &str, to: &str) -> Quiet {
        let (host, port) = to.split_once(':').unwrap();
        Quiet(
            std::process::Command::new("ip")
                .args(["netns", "exec", ns, "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/{host}/{port} && exec sleep 120"))
                .spawn()
                .unwrap(),
        )
    }

    /// Host b stops answering: its end of the link goes down.
    fn cut(&self) {
        let id = std::process::id();
        ip(&format!("-n {} link set skb{id} down", self.b));
    }
}

/// A quiet client process, killed when the test ends however it ends (it
/// would keep its namespace alive otherwise).
struct Quiet(std::process::Child);

impl Drop for Quiet {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

fn ip(args: &str) {
    let out = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("ip (iproute2) is required for this test (.ci/run installs it)");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A peer that vanished is found dead after `tcp_keepalive +
/// tcp_keepalive_interval * tcp_keepalive_count`, on either socket: the
/// client socket (set on the listener, inherited) and the backend
/// socket. With the system's interval and count (75 s x 9) it would take
/// over 11 minutes.
#[test]
fn a_vanished_peer_is_dropped_after_the_keepalive_probes_go_unanswered() {
    let hosts = Hosts::new();
    let ka = "tcp_keepalive = \"1s\"\ntcp_keepalive_interval = \"1s\"\ntcp_keepalive_count = 3\n";
    // A file route that waits an hour for a request head: a peer that
    // holds a connection open and quiet.
    let hold = |name: &str, listen: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"{listen}\"\nfile = \"hold.txt\"\n\
             header_timeout = \"1h\"\nidle_timeout = \"1h\"\n\n"
        )
    };
    let dir_a = temp_dir("keepalive-vanish-a");
    write_file(&dir_a, "hold.txt", b"held\n");
    let sl = Sluice::start_wrapped_in(
        dir_a,
        &format!(
            "[global]\nworkers = 1\n\n\
             [[route]]\nname = \"front\"\nlisten = \"10.203.0.1:7000\"\n\
             backends = [\"127.0.0.1:7001\"]\n{ka}\n\
             [[route]]\nname = \"back\"\nlisten = \"127.0.0.1:7002\"\n\
             backends = [\"10.203.0.2:7003\"]\n{ka}\n{}",
            hold("hold-a", "127.0.0.1:7001")
        ),
        &Hosts::on(&hosts.a),
    );
    let dir_b = temp_dir("keepalive-vanish-b");
    write_file(&dir_b, "hold.txt", b"held\n");
    let far = Sluice::start_wrapped_in(
        dir_b,
        &format!(
            "[global]\nworkers = 1\n\n{}",
            hold("hold-b", "10.203.0.2:7003")
        ),
        &Hosts::on(&hosts.b),
    );
    // A client on b through "front" (its client socket faces b), and a
    // client on a through "back" (its backend socket faces b).
    let _clients = [
        Hosts::quiet_client(&hosts.b, "10.203.0.1:7000"),
        Hosts::quiet_client(&hosts.a, "127.0.0.1:7002"),
    ];
    // Answered probes keep quiet connections up: longer than unanswered
    // ones would last.
    thread::sleep(Duration::from_millis(5500));
    assert_eq!(sl.access().len(), 0, "{}", sl.logs().join("\n"));
    assert_eq!(far.access().len(), 0, "{}", far.logs().join("\n"));

    let cut = Instant::now();
    hosts.cut();
    let lines = sl.wait_access(2, Duration::from_secs(30));
    let took = cut.elapsed();
    let by_route = |r: &str| {
        lines
            .iter()
            .find(|l| l.get("route").map(String::as_str) == Some(r))
            .unwrap_or_else(|| panic!("no access line for {r}: {lines:?}"))
            .clone()
    };
    let (front, back) = (by_route("front"), by_route("back"));
    for (line, end) in [(&front, "client_error"), (&back, "backend_error")] {
        assert_eq!(line["end"], end, "{line:?}");
        assert_eq!(
            line["error"], "Connection timed out (os error 110)",
            "{line:?}"
        );
    }
    // Three unanswered probes a second apart after a second of quiet: 3 to
    // 4 s after the cut. Not before about 3 s (one probe would end it in
    // 1-2 s), nor as late as five probes would (5-6 s).
    assert!(
        (Duration::from_millis(2500)..Duration::from_millis(4900)).contains(&took),
        "ended after {took:?}: {lines:?}"
    );
}
