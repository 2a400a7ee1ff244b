//! The admin listener through the real binary: `/metrics` parsed strictly
//! (and by promtool when present) with counters checked against the
//! traffic the test sent, the status page, `/healthz`, bad and slow admin
//! clients, and the admin address across reloads.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::admin::{self, get, parse_response, request, scrape};
use common::*;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A backend that sends `len` bytes (seed 2) while reading everything;
/// its result is the received length.
fn bulk_backend(len: u64) -> Backend {
    Backend::spawn(move |s| {
        let (_sent, got) = exchange(s, 2, len);
        got.len.to_string()
    })
}

#[test]
fn metrics_count_the_traffic_sent() {
    const LEN: u64 = 3 << 20;
    const CONNS: u64 = 3;
    let b = bulk_backend(LEN);
    let (port, aport, cport) = (free_port(), free_port(), free_port());
    let toml = format!(
        "[global]\nworkers = 2\n\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n\
         [[route]]\nname = \"bulk\"\nlisten = \"127.0.0.1:{port}\"\nbackends = [\"{}\"]\nstrategy = \"splice\"\n\n\
         [[route]]\nname = \"idle\"\nlisten = \"127.0.0.1:{}\"\nbackends = [\"127.0.0.1:1\"]\n\n\
         [[route]]\nname = \"copied\"\nlisten = \"127.0.0.1:{cport}\"\nbackends = [\"{}\"]\nstrategy = \"copy\"\n",
        b.addr,
        free_port(),
        b.addr
    );
    let sl = Sluice::start("admin-metrics", &toml);
    let expect_down = send_data(&mut std::io::sink(), 2, LEN);
    for i in 0..CONNS {
        let (sent, got) = exchange(connect(addr(port)), 10 + i, LEN);
        assert_eq!(sent.len, LEN);
        assert_eq!(got, expect_down, "connection {i}: bytes from the backend");
    }
    // One more through the copy route.
    let (_, got) = exchange(connect(addr(cport)), 99, LEN);
    assert_eq!(got, expect_down);
    let got = b.wait_results(CONNS as usize + 1, Duration::from_secs(30));
    assert!(got.iter().all(|r| *r == LEN.to_string()), "{got:?}");
    // Counters are final once every session has closed (access line).
    sl.wait_access(CONNS as usize + 1, Duration::from_secs(10));
    let m = scrape(addr(aport));
    let c = [("route", "copied")];
    assert_eq!(m.get("sluice_route_connections_total", &c), 1.0);
    assert_eq!(m.get("sluice_route_bytes_in_total", &c), LEN as f64);
    assert_eq!(m.get("sluice_route_bytes_out_total", &c), LEN as f64);
    let copied = |s: &str| {
        m.get(
            "sluice_route_strategy_bytes_total",
            &[("route", "copied"), ("strategy", s)],
        )
    };
    assert_eq!(copied("copy"), (2 * LEN) as f64, "every byte copied");
    assert_eq!(copied("splice"), 0.0);

    let m = scrape(addr(aport));
    let r = [("route", "bulk")];
    assert_eq!(m.get("sluice_route_connections_total", &r), CONNS as f64);
    assert_eq!(m.get("sluice_route_connections_active", &r), 0.0);
    assert_eq!(
        m.get("sluice_route_bytes_in_total", &r),
        (CONNS * LEN) as f64
    );
    assert_eq!(
        m.get("sluice_route_bytes_out_total", &r),
        (CONNS * LEN) as f64
    );
    let by = |s: &str| {
        m.get(
            "sluice_route_strategy_bytes_total",
            &[("route", "bulk"), ("strategy", s)],
        )
    };
    assert_eq!(by("splice"), (2 * CONNS * LEN) as f64, "every byte spliced");
    assert_eq!(by("copy"), 0.0);
    assert_eq!(by("sendfile"), 0.0);
    assert_eq!(by("mmap"), 0.0);
    let ended = m.sum("sluice_route_connections_ended_total", &r);
    assert_eq!(ended, CONNS as f64);
    assert_eq!(
        m.get(
            "sluice_route_connections_ended_total",
            &[("route", "bulk"), ("reason", "client_closed")]
        ) + m.get(
            "sluice_route_connections_ended_total",
            &[("route", "bulk"), ("reason", "backend_closed")]
        ),
        CONNS as f64
    );
    assert_eq!(m.get("sluice_route_connections_denied_total", &r), 0.0);
    assert_eq!(m.get("sluice_route_connect_failures_total", &r), 0.0);
    let bl = [
        ("route", "bulk"),
        ("backend", &*b.addr.to_string()),
        ("address", &*b.addr.to_string()),
    ];
    assert_eq!(m.get("sluice_backend_up", &bl), 1.0);
    assert_eq!(m.get("sluice_backend_connections_total", &bl), CONNS as f64);
    assert_eq!(m.get("sluice_backend_connections_active", &bl), 0.0);
    assert_eq!(
        m.get("sluice_backend_last_check", &bl),
        -1.0,
        "no active checks"
    );
    // The other route saw nothing.
    assert_eq!(
        m.get("sluice_route_connections_total", &[("route", "idle")]),
        0.0
    );
    // Process metrics.
    assert_eq!(m.get("sluice_workers", &[]), 2.0);
    assert_eq!(m.get("sluice_config_generation", &[]), 1.0);
    assert_eq!(m.get("sluice_reloads_total", &[("result", "ok")]), 0.0);
    assert_eq!(m.get("sluice_reloads_total", &[("result", "failed")]), 0.0);
    assert_eq!(m.get("sluice_connections_active", &[]), 0.0);
    assert_eq!(m.get("sluice_draining", &[]), 0.0);
    let start = m.get("sluice_start_time_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        start <= now && start > now - 600.0,
        "start time {start}, now {now}"
    );
    assert_eq!(m.types["sluice_backend_up"], "gauge");
    assert_eq!(m.types["sluice_route_bytes_in_total"], "counter");
    admin::promtool_check(&m.text);

    // A failed connect shows on the other route and its backend.
    let mut c = connect(addr(sl_port(&toml, "idle")));
    let mut buf = [0u8; 1];
    assert_eq!(c.read(&mut buf).unwrap_or(0), 0, "closed without a backend");
    sl.wait_access(CONNS as usize + 2, Duration::from_secs(10));
    let m = scrape(addr(aport));
    let r = [("route", "idle")];
    assert_eq!(m.get("sluice_route_connections_total", &r), 1.0);
    assert_eq!(m.get("sluice_route_connect_failures_total", &r), 1.0);
    assert_eq!(m.get("sluice_route_no_backend_total", &r), 1.0);
    assert_eq!(
        m.get(
            "sluice_route_connections_ended_total",
            &[("route", "idle"), ("reason", "connect_failed")]
        ),
        1.0
    );
    let bl = [
        ("route", "idle"),
        ("backend", "127.0.0.1:1"),
        ("address", "127.0.0.1:1"),
    ];
    assert_eq!(m.get("sluice_backend_connect_failures_total", &bl), 1.0);
    admin::promtool_check(&m.text);
}

/// The listen port of route `name` in a config written by these tests.
fn sl_port(toml: &str, name: &str) -> u16 {
    let at = toml.find(&format!("name = \"{name}\"")).unwrap();
    let rest = &toml[at..];
    let l = rest.find("listen = \"127.0.0.1:").unwrap() + "listen = \"127.0.0.1:".len();
    rest[l..l + rest[l..].find('"').unwrap()].parse().unwrap()
}

#[test]
fn status_page_shows_routes_and_backend_states() {
    let live = Backend::named("live");
    let dead = free_port();
    let (port, aport) = (free_port(), free_port());
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n\
         [[route]]\nname = \"front-1\"\nlisten = \"127.0.0.1:{port}\"\nbackends = [\"{}\", \"127.0.0.1:{dead}\"]\n\
         [route.health]\ninterval = \"100ms\"\ntimeout = \"200ms\"\nfall = 1\nrise = 1\n",
        live.addr
    );
    let mut sl = Sluice::start("admin-page", &toml);
    sl.wait_log("is DOWN", Duration::from_secs(10));
    let r = get(addr(aport), "/");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "text/html; charset=utf-8");
    let h = &r.body;
    assert!(h.starts_with("<!DOCTYPE html>"), "{h}");
    assert!(
        h.contains("<meta http-equiv=\"refresh\" content=\"5\">"),
        "{h}"
    );
    assert!(h.contains("<caption>route front-1"), "{h}");
    assert_eq!(h.matches("<table>").count(), 1, "one table per route");
    let row = |a: &str| {
        h.lines()
            .find(|l| l.contains(&format!("<td class=\"l\">{a}</td>")) && l.starts_with("<tr>"))
            .unwrap_or_else(|| panic!("no row for {a} in {h}"))
            .to_string()
    };
    assert!(row(&live.addr.to_string()).contains("<td class=\"up\">UP</td>"));
    assert!(row(&format!("127.0.0.1:{dead}")).contains("<td class=\"down\">DOWN</td>"));

    let r = get(addr(aport), "/healthz");
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    // HEAD: the same head, no body.
    let mut s = TcpStream::connect(addr(aport)).unwrap();
    s.write_all(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8(buf).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.contains("Content-Length: 3\r\n") && text.ends_with("\r\n\r\n"),
        "{text}"
    );
}

#[test]
fn bad_admin_requests_get_clear_errors() {
    let aport = free_port();
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{}\"\nbackends = \"127.0.0.1:1\"\n",
        free_port()
    );
    let _sl = Sluice::start("admin-bad", &toml);
    let a = addr(aport);
    assert_eq!(get(a, "/nope").status, 404);
    assert_eq!(get(a, "/metrics/x").status, 404);
    assert_eq!(
        get(a, "/metrics?x=1").status,
        200,
        "a query string is ignored"
    );
    let r = request(a, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "GET, HEAD");
    assert_eq!(request(a, b"DELETE / HTTP/1.1\r\n\r\n").status, 405);
    // HEAD gets the head alone, whatever the answer.
    for (path, status) in [("/nope", "404"), ("/healthz", "200")] {
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
        assert!(
            text.ends_with("\r\n\r\n"),
            "HEAD {path} had a body: {text:?}"
        );
    }
    assert_eq!(
        request(a, b"GARBAGE\x01\x02 / HTTP/1.1\r\n\r\n").status,
        400
    );
    let mut huge = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 20_000));
    huge.extend(b"\r\n\r\n");
    // The server answers as soon as its bounded buffer is full; it may
    // close before reading the rest, so the client may see a reset after
    // the answer: read what arrives.
    let mut s = TcpStream::connect(a).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&huge);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        buf.starts_with(b"HTTP/1.1 431 "),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
}

#[test]
fn slow_admin_clients_stall_nothing() {
    let echo = Backend::named("echo");
    let (port, aport) = (free_port(), free_port());
    let toml = format!(
        "[global]\nworkers = 1\n\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\nbackends = \"{}\"\n",
        echo.addr
    );
    let _sl = Sluice::start("admin-slow", &toml);
    // Ten clients that send half a request head and then nothing.
    let mut slow: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = TcpStream::connect(addr(aport)).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: sl").unwrap();
            s
        })
        .collect();
    // Proxy traffic and other admin requests go on meanwhile.
    for i in 0..5 {
        let mut c = connect(addr(port));
        assert_eq!(read_line(&mut c), "echo");
        let (sent, got) = exchange(c, i, 64 * 1024);
        assert_eq!(got, sent, "echoed through the proxy");
        let r = get(addr(aport), "/healthz");
        assert_eq!(r.status, 200);
    }
    // Each slow client is closed once the header timeout passes.
    let t0 = Instant::now();
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "a slow client gets no answer, only a close");
    }
    assert!(t0.elapsed() < Duration::from_secs(20));
}

#[test]
fn admin_listener_survives_reloads_and_can_move() {
    let (a1, a2) = (free_port(), free_port());
    let route = format!(
        "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{}\"\nbackends = \"127.0.0.1:1\"\n",
        free_port()
    );
    let mut sl = Sluice::start(
        "admin-reload",
        &format!("[admin]\nlisten = \"127.0.0.1:{a1}\"\n\n{route}"),
    );
    // A request begun before the reload completes after it, on the same
    // listener.
    let mut s = TcpStream::connect(addr(a1)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    std::fs::write(
        &sl.config,
        format!("[admin]\nlisten = \"127.0.0.1:{a1}\"\n\n{route}"),
    )
    .unwrap();
    sl.signal("HUP");
    sl.wait_log("reload ok: generation 2", Duration::from_secs(10));
    s.write_all(b"\r\n").unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    assert_eq!(parse_response(&buf).status, 200);
    assert_eq!(
        scrape(addr(a1)).get("sluice_reloads_total", &[("result", "ok")]),
        1.0
    );

    // Move it.
    std::fs::write(
        &sl.config,
        format!("[admin]\nlisten = \"127.0.0.1:{a2}\"\n\n{route}"),
    )
    .unwrap();
    sl.signal("HUP");
    sl.wait_log("reload ok: generation 3", Duration::from_secs(10));
    let m = scrape(addr(a2));
    assert_eq!(m.get("sluice_config_generation", &[]), 3.0);
    assert_eq!(m.get("sluice_reloads_total", &[("result", "ok")]), 2.0);
    let refused = TcpStream::connect_timeout(&addr(a1), Duration::from_secs(2));
    assert!(refused.is_err(), "the old admin address is closed");
}

/// 64 admin connections at most: past that, a new client evicts the
/// oldest one that has not sent a whole request head, so idle clients can
/// never lock a monitor out of /healthz.
#[test]
fn idle_admin_clients_cannot_lock_out_healthz() {
    const HOGS: usize = 70;
    let aport = free_port();
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{}\"\nbackends = \"127.0.0.1:1\"\n",
        free_port()
    );
    let sl = Sluice::start("admin-cap", &toml);
    // More clients than slots, each with half a request head, or none.
    let mut hogs: Vec<TcpStream> = (0..HOGS)
        .map(|i| {
            let mut s = TcpStream::connect(addr(aport)).unwrap();
            if i % 2 == 0 {
                s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
            }
            s
        })
        .collect();
    // /healthz answers every time while they are all still connected.
    const ASKS: usize = 5;
    for _ in 0..ASKS {
        let r = get(addr(aport), "/healthz");
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    }
    // The hogs beyond the 64 slots, then one more for the first ask, were
    // closed, oldest first, and logged; each later ask took the slot the
    // one before it left (it is closed once answered).
    let evicted = HOGS - 64 + 1;
    let end = Instant::now() + Duration::from_secs(10);
    while sl.count_log("(no request yet)") < evicted && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        sl.count_log("(no request yet)"),
        evicted,
        "{}",
        sl.logs().join("\n")
    );
    for (i, s) in hogs.iter_mut().take(evicted).enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "hog {i}: evicted without an answer");
    }
}

/// 64 clients that ask for /metrics and do not read their answer (it is
/// bigger than what the sockets hold: 100 routes, a small receive window)
/// must not hold every admin slot: a new client evicts the oldest of them,
/// and /healthz answers.
#[test]
fn clients_that_do_not_read_cannot_lock_out_healthz() {
    let aport = free_port();
    let mut toml = format!("[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n");
    for i in 0..100 {
        toml.push_str(&format!(
            "[[route]]\nname = \"r{i}\"\nlisten = \"127.0.0.1:{}\"\n\
             backends = [\"127.0.0.1:1\", \"127.0.0.1:2\", {{ address = \"127.0.0.1:3\", backup = true }}]\n\n",
            free_port()
        ));
    }
    let mut sl = Sluice::start("admin-nonreaders", &toml);
    let hogs: Vec<TcpStream> = (0..64)
        .map(|_| {
            let sock =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            sock.set_recv_buffer_size(1024).unwrap();
            sock.set_tcp_mss(536).unwrap();
            sock.connect(&addr(aport).into()).unwrap();
            let mut s: TcpStream = sock.into();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    // Each is being answered (its first byte came), then reads no more.
    for h in &hogs {
        let mut b = [0u8; 1];
        (&*h).read_exact(&mut b).unwrap();
    }
    let r = get(addr(aport), "/healthz");
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    // The line may still be on its way from sluice's stderr.
    sl.wait_log("(not reading its answer)", Duration::from_secs(10));
    assert_eq!(
        sl.count_log("(not reading its answer)"),
        1,
        "{:?}",
        sl.logs()
    );
    // A monitor that has just connected, and not yet sent its request, is
    // not the one the next newcomer evicts: the non-readers have been stuck
    // longer.
    let mut monitor = TcpStream::connect(addr(aport)).unwrap();
    monitor
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // (It takes the slot the first /healthz left; let sluice accept it.)
    std::thread::sleep(Duration::from_millis(200));
    let _newcomer = TcpStream::connect(addr(aport)).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while sl.count_log("admin connections open") < 2 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    monitor
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = monitor.read_to_end(&mut buf);
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "{:?}\n{:?}",
        String::from_utf8_lossy(&buf),
        sl.logs()
    );
    assert_eq!(
        sl.count_log("(not reading its answer)"),
        2,
        "{:?}",
        sl.logs()
    );
    drop(hogs);
}

#[test]
fn a_client_that_half_closes_after_its_request_is_answered() {
    let aport = free_port();
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{}\"\nbackends = \"127.0.0.1:1\"\n",
        free_port()
    );
    let _sl = Sluice::start("admin-halfclose", &toml);
    let mut s = TcpStream::connect(addr(aport)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let r = parse_response(&buf);
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    // Half a request and a half-close: closed without an answer.
    let mut s = TcpStream::connect(addr(aport)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.0\r\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    assert!(buf.is_empty(), "{:?}", String::from_utf8_lossy(&buf));
}

/// A client that sends a byte after its request (a body, a pipelined
/// request) still gets the whole answer: sluice drains it and closes at
/// the client's FIN, instead of a close with unread bytes, which resets
/// the connection and discards the answer's unsent tail.
#[test]
fn bytes_after_the_request_do_not_cut_the_answer() {
    let aport = free_port();
    // 600 backends make /metrics about a megabyte.
    let backends: Vec<String> = (1..=600)
        .map(|i| format!("\"127.0.{}.{}:80\"", i / 250, i % 250 + 1))
        .collect();
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{}\"\nbackends = [{}]\n",
        free_port(),
        backends.join(", ")
    );
    let _sl = Sluice::start("admin-extra-bytes", &toml);
    let mut s = small_buffer_client(addr(aport), 8 * 1024);
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 1024];
    s.read_exact(&mut first).unwrap();
    // The answer is on its way; one more byte arrives after the request.
    s.write_all(b"x").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("the whole answer, then a FIN");
    let all = [&first[..], &rest].concat();
    let r = parse_response(&all);
    assert_eq!(r.status, 200);
    assert!(r.body.len() > 500_000, "{} bytes", r.body.len());
    assert!(r.body.ends_with('\n'));
    let m = common::admin::parse_metrics(&r.body);
    assert_eq!(
        m.sum("sluice_backend_up", &[("route", "r")]),
        600.0,
        "every backend's sample arrived"
    );
}
