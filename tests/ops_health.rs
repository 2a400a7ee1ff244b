//! Active health checks through the real binary: a dead backend is taken
//! out (metrics say up=0, traffic goes only to the live one) and brought
//! back once it listens again (up=1, traffic resumes); checks follow the
//! backends of a reloaded configuration.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::admin::{Metrics, scrape};
use common::*;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn config(port: u16, aport: u16, backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "[global]\nworkers = 2\n\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n\
         [[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\nbackends = [{}]\n\
         [route.health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 2\n",
        list.join(", ")
    )
}

/// A per-backend metric of route "r".
fn bget(m: &Metrics, name: &str, b: SocketAddr) -> f64 {
    let a = b.to_string();
    m.get(name, &[("route", "r"), ("backend", &a), ("address", &a)])
}

fn up(m: &Metrics, b: SocketAddr) -> f64 {
    bget(m, "sluice_backend_up", b)
}

/// A request head as text, or `None` if the peer went away first.
fn read_request(s: &mut std::net::TcpStream) -> Option<String> {
    use std::io::Read;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.ends_with(b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    Some(String::from_utf8_lossy(&req).into_owned())
}

/// Names the backends answered with for `n` new connections.
fn names(port: u16, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let mut c = connect(addr(port));
            read_line(&mut c)
        })
        .collect()
}

#[test]
fn checks_take_a_dead_backend_out_and_bring_it_back() {
    let live = Backend::named("live");
    // A port with nobody behind it (yet).
    let dead = addr(free_port());
    let (port, aport) = (free_port(), free_port());
    let mut sl = Sluice::start("health", &config(port, aport, &[live.addr, dead]));
    let down = sl.wait_log("is DOWN", Duration::from_secs(10));
    assert!(down.contains(&dead.to_string()), "{down}");
    assert!(down.contains("2 failed checks in a row"), "{down}");
    let m = scrape(addr(aport));
    assert_eq!(up(&m, dead), 0.0);
    assert_eq!(up(&m, live.addr), 1.0);
    assert_eq!(bget(&m, "sluice_backend_last_check", dead), 0.0);
    assert!(
        m.sum(
            "sluice_backend_health_checks_total",
            &[("address", &dead.to_string()), ("result", "failed")]
        ) >= 2.0
    );
    // Traffic goes only to the live backend, and no client sees a failed
    // connect.
    let before = m.get("sluice_route_connect_failures_total", &[("route", "r")]);
    let got = names(port, 10);
    assert!(got.iter().all(|n| n == "live"), "{got:?}");
    let m = scrape(addr(aport));
    assert_eq!(
        m.get("sluice_route_connect_failures_total", &[("route", "r")]),
        before
    );

    // The backend comes to life: `rise` good checks bring it back.
    let l = TcpListener::bind(dead).expect("rebind the dead backend's port");
    let back = Backend::from_listener(l, "back");
    let up_line = sl.wait_log("is UP", Duration::from_secs(10));
    assert!(up_line.contains(&dead.to_string()), "{up_line}");
    let m = scrape(addr(aport));
    assert_eq!(up(&m, dead), 1.0);
    assert_eq!(bget(&m, "sluice_backend_last_check", dead), 1.0);
    let got = names(port, 10);
    let n_back = got.iter().filter(|n| *n == "back").count();
    assert_eq!(n_back, 5, "round robin over both again: {got:?}");
    assert!(back.accepted() >= 5);
}

#[test]
fn checks_follow_the_backends_of_a_reload() {
    let a = Backend::named("a");
    let dead = addr(free_port());
    let (port, aport) = (free_port(), free_port());
    let mut sl = Sluice::start("health-reload", &config(port, aport, &[a.addr]));
    // Wait for a first passing check of "a".
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(addr(aport));
        if bget(&m, "sluice_backend_last_check", a.addr) == 1.0 {
            break;
        }
        assert!(Instant::now() < end, "no check of {}", a.addr);
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&sl.config, config(port, aport, &[a.addr, dead])).unwrap();
    sl.signal("HUP");
    sl.wait_log("reload ok: generation 2", Duration::from_secs(10));
    let line = sl.wait_log("is DOWN", Duration::from_secs(10));
    assert!(line.contains(&dead.to_string()), "{line}");
    let m = scrape(addr(aport));
    assert_eq!(up(&m, dead), 0.0);
    assert_eq!(up(&m, a.addr), 1.0, "state of a kept backend carried over");
    let got = names(port, 6);
    assert!(got.iter().all(|n| n == "a"), "{got:?}");
}

#[test]
fn with_active_checks_only_the_checker_brings_a_backend_back() {
    let live = Backend::named("live");
    // Nobody listens on "flaky" at first; later it comes up on that port.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let flaky = l.local_addr().unwrap();
    drop(l);
    let (port, aport) = (free_port(), free_port());
    let toml = format!(
        "[global]\nworkers = 1\n\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n\
         [[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\nbackends = [\"{}\", \"{flaky}\"]\n\
         [route.health]\ninterval = \"300ms\"\ntimeout = \"300ms\"\nrise = 6\nfall = 1\n",
        live.addr
    );
    let mut sl = Sluice::start("health-rise", &toml);
    sl.wait_log("is DOWN", Duration::from_secs(10));
    // It listens again. Passive-only health would retry it after
    // `interval` (300ms); with active checks it stays out until 6 good
    // checks in a row (at least 1.5s from now).
    let relisten = Instant::now();
    let back = Backend::from_listener(TcpListener::bind(flaky).unwrap(), "flaky");
    std::thread::sleep(Duration::from_millis(700));
    let got = names(port, 6);
    let early = sl.count_log("is UP");
    assert_eq!(early, 0, "UP too early");
    assert!(got.iter().all(|n| n == "live"), "{got:?}");
    let up_line = sl.wait_log("is UP", Duration::from_secs(10));
    assert!(up_line.contains("6 good checks in a row"), "{up_line}");
    assert!(relisten.elapsed() >= Duration::from_millis(1500));
    assert_eq!(up(&scrape(addr(aport)), flaky), 1.0);
    let got = names(port, 4);
    assert_eq!(got.iter().filter(|n| *n == "flaky").count(), 2, "{got:?}");
    assert!(back.accepted() >= 2);
}

#[test]
fn a_backup_serves_only_while_no_primary_is_up() {
    let backup = Backend::named("backup");
    // The primary's port has nobody behind it (yet).
    let primary = addr(free_port());
    let (port, aport) = (free_port(), free_port());
    let toml = format!(
        "[global]\nworkers = 2\n\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n\
         [[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\n\
         backends = [\"{primary}\", {{ address = \"{}\", backup = true, weight = 7 }}]\n\
         [route.health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 2\n",
        backup.addr
    );
    let mut sl = Sluice::start("backup", &toml);
    let m = scrape(addr(aport));
    assert_eq!(bget(&m, "sluice_backend_backup", backup.addr), 1.0);
    assert_eq!(bget(&m, "sluice_backend_backup", primary), 0.0);
    assert_eq!(bget(&m, "sluice_backend_weight", backup.addr), 7.0);
    assert_eq!(bget(&m, "sluice_backend_weight", primary), 1.0);
    let page = common::admin::get(addr(aport), "/").body;
    assert!(page.contains("<td>7 (backup)</td>"), "{page}");

    // The primary is down: every client is served by the backup.
    sl.wait_log("is DOWN", Duration::from_secs(10));
    let got = names(port, 6);
    assert!(got.iter().all(|n| n == "backup"), "{got:?}");
    let sent = |m: &Metrics| bget(m, "sluice_backend_connections_total", backup.addr);
    assert_eq!(sent(&scrape(addr(aport))), 6.0);

    // The primary comes up: the backup gets no new client.
    let l = TcpListener::bind(primary).expect("rebind the primary's port");
    let live = Backend::from_listener(l, "primary");
    let up_line = sl.wait_log("is UP", Duration::from_secs(10));
    assert!(up_line.contains(&primary.to_string()), "{up_line}");
    let got = names(port, 6);
    assert!(got.iter().all(|n| n == "primary"), "{got:?}");
    assert_eq!(
        sent(&scrape(addr(aport))),
        6.0,
        "no new client for the backup"
    );
    assert!(live.accepted() >= 6);
}

#[test]
fn without_checks_a_downed_primary_gets_its_traffic_back_from_the_backup() {
    let backup = Backend::named("backup");
    let primary = addr(free_port());
    let port = free_port();
    // No [route.health]: passive marking only (3 failed connects make a
    // backend DOWN; one client tries it again each 2 s interval).
    let toml = format!(
        "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\n\
         backends = [\"{primary}\", {{ address = \"{}\", backup = true }}]\n",
        backup.addr
    );
    let mut sl = Sluice::start("backup-passive", &toml);
    // Every client is served: the refused primary fails over to the backup.
    let got = names(port, 5);
    assert!(got.iter().all(|n| n == "backup"), "{got:?}");
    sl.wait_log("is DOWN after 3 failed connects", Duration::from_secs(5));
    let l = TcpListener::bind(primary).expect("rebind the primary's port");
    let _live = Backend::from_listener(l, "primary");
    // Once the retry interval has passed, one client tries the primary
    // again; it connects, so the primary is up and keeps the traffic.
    let end = Instant::now() + Duration::from_secs(10);
    while names(port, 1) != ["primary"] {
        assert!(Instant::now() < end, "the primary never got another try");
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = names(port, 4);
    assert!(got.iter().all(|n| n == "primary"), "{got:?}");
    sl.wait_log("is given another try", Duration::from_secs(1));
    sl.wait_log("is UP again: a connect succeeded", Duration::from_secs(1));
}

#[test]
fn http_checks_judge_the_status_not_just_the_connect() {
    use std::io::Write;
    use std::sync::atomic::{AtomicU16, Ordering};
    use std::sync::{Arc, Mutex};
    // A backend that accepts every connect but answers the check with the
    // status the test sets, and remembers the requests it got.
    let status = Arc::new(AtomicU16::new(503));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let (st, sn) = (status.clone(), seen.clone());
    let b = Backend::spawn(move |mut s| {
        let Some(req) = read_request(&mut s) else {
            return String::new();
        };
        let code = st.load(Ordering::SeqCst);
        if req.starts_with("GET /health") {
            sn.lock().unwrap().push(req);
            let _ = write!(s, "HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
        } else {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        }
        String::new()
    });
    let (port, aport) = (free_port(), free_port());
    let toml = format!(
        "[global]\nworkers = 1\n\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n\
         [[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\nbackends = [\"{}\"]\n\
         [route.health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 2\n\
         http_path = \"/health?deep=1\"\n",
        b.addr
    );
    let mut sl = Sluice::start("http-check", &toml);
    // It connects fine, but answers 503: down.
    let down = sl.wait_log("is DOWN", Duration::from_secs(10));
    assert!(down.contains("HTTP status 503"), "{down}");
    let m = scrape(addr(aport));
    assert_eq!(up(&m, b.addr), 0.0);
    {
        let seen = seen.lock().unwrap();
        let first = seen.first().expect("a check request");
        assert!(
            first.starts_with("GET /health?deep=1 HTTP/1.0\r\n"),
            "{first:?}"
        );
        assert!(
            first.contains(&format!("\r\nHost: {}\r\n", b.addr)),
            "{first:?}"
        );
    }
    // Healthy again: 200 brings it back after `rise` checks.
    status.store(200, Ordering::SeqCst);
    let up_line = sl.wait_log("is UP", Duration::from_secs(10));
    assert!(up_line.contains("2 good checks"), "{up_line}");
    assert_eq!(up(&scrape(addr(aport)), b.addr), 1.0);
    // A redirect passes too; a 404 does not.
    status.store(301, Ordering::SeqCst);
    let m = scrape(addr(aport));
    let ok = |m: &Metrics| {
        m.sum(
            "sluice_backend_health_checks_total",
            &[("address", &b.addr.to_string()), ("result", "ok")],
        )
    };
    let ok0 = ok(&m);
    let end = Instant::now() + Duration::from_secs(5);
    while ok(&scrape(addr(aport))) < ok0 + 3.0 {
        assert!(Instant::now() < end, "301 checks did not pass");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(up(&scrape(addr(aport)), b.addr), 1.0);
    status.store(404, Ordering::SeqCst);
    let down = sl.wait_log("HTTP status 404", Duration::from_secs(10));
    assert!(down.contains("is DOWN"), "{down}");
}

#[test]
fn an_http_check_answer_split_over_several_segments_passes() {
    use std::io::{Read, Write};
    // The status line arrives in pieces: the check must wait for the rest
    // (edge-triggered: each piece is a new readable event).
    let b = Backend::spawn(|mut s| {
        let _ = s.set_nodelay(true);
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        for piece in [
            &b"HTTP/1.1 2"[..],
            b"00 O",
            b"K\r\nContent-Length: 0\r\n\r\n",
        ] {
            if s.write_all(piece).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        String::new()
    });
    let (port, aport) = (free_port(), free_port());
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n\
         [[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\nbackends = [\"{}\"]\n\
         [route.health]\ninterval = \"100ms\"\ntimeout = \"800ms\"\nhttp_path = \"/\"\n",
        b.addr
    );
    let _sl = Sluice::start("http-check-split", &toml);
    let count = |result: &str| {
        scrape(addr(aport)).sum(
            "sluice_backend_health_checks_total",
            &[("address", &b.addr.to_string()), ("result", result)],
        )
    };
    let end = Instant::now() + Duration::from_secs(10);
    while count("ok") < 3.0 {
        assert!(Instant::now() < end, "split answers never passed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(count("failed"), 0.0, "no split answer was judged early");
}

/// A backend renamed by a reload (the same address written another way)
/// keeps its health and counters, but takes its new name everywhere: the
/// metrics' `backend` label and the `Host:` of its HTTP checks.
#[test]
fn a_reload_that_renames_a_backend_renames_it_everywhere() {
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    let hosts = Arc::new(Mutex::new(Vec::<String>::new()));
    let h2 = hosts.clone();
    let b = Backend::spawn(move |mut s| {
        let Some(req) = read_request(&mut s) else {
            return String::new();
        };
        if let Some(h) = req.lines().find_map(|l| l.strip_prefix("Host: ")) {
            h2.lock().unwrap().push(h.to_string());
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        String::new()
    });
    let (port, aport) = (free_port(), free_port());
    let toml = |name: &str| {
        format!(
            "[global]\nworkers = 1\n\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n\
             [[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\nbackends = [\"{name}\"]\n\
             [route.health]\ninterval = \"100ms\"\nhttp_path = \"/\"\n"
        )
    };
    let old = format!("localhost:{}", b.addr.port());
    let new = b.addr.to_string();
    let sl = Sluice::start("health-rename", &toml(&old));
    let label = |m: &Metrics, name: &str| {
        m.sum(
            "sluice_backend_up",
            &[("route", "r"), ("backend", name), ("address", &new)],
        )
    };
    let m = common::admin::scrape_until(addr(aport), "checked", |m| {
        m.sum("sluice_backend_health_checks_total", &[("result", "ok")]) >= 1.0
    });
    assert_eq!(label(&m, &old), 1.0);
    assert!(hosts.lock().unwrap().iter().all(|h| *h == old));
    std::fs::write(&sl.config, toml(&new)).unwrap();
    sl.signal("HUP");
    let m = common::admin::scrape_until(addr(aport), "the reload", |m| {
        m.get("sluice_reloads_total", &[("result", "ok")]) == 1.0
    });
    assert_eq!((label(&m, &new), label(&m, &old)), (1.0, 0.0), "{}", m.text);
    let seen = hosts.lock().unwrap().len();
    let end = Instant::now() + Duration::from_secs(10);
    while hosts.lock().unwrap().len() < seen + 2 {
        assert!(Instant::now() < end, "no checks after the reload");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(hosts.lock().unwrap().last().unwrap(), &new);
}

/// A check sluice cannot even start (the process is out of descriptors) is
/// skipped with a warning, not counted against the backend: the backend
/// is not taken out for sluice's own shortage, as with passive checks.
#[test]
fn a_check_sluice_cannot_start_is_not_held_against_the_backend() {
    let b = Backend::named("b");
    let (port, aport) = (free_port(), free_port());
    let mut sl = Sluice::start("health-emfile", &config(port, aport, &[b.addr]));
    assert_eq!(up(&scrape(addr(aport)), b.addr), 1.0);
    let pid = sl.pid();
    let (soft, hard) = fd_limits(pid);
    set_fd_limits(pid, "3", &hard);
    let end = Instant::now() + Duration::from_secs(10);
    while sl.count_log("check skipped") < 4 {
        assert!(Instant::now() < end, "{:?}", sl.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    set_fd_limits(pid, &soft, &hard);
    let line = sl.wait_log("check skipped", Duration::from_secs(1));
    assert!(
        line.contains("WARN") && line.contains("Too many open files"),
        "{line}"
    );
    assert_eq!(sl.count_log("is DOWN"), 0, "{:?}", sl.logs());
    assert_eq!(up(&scrape(addr(aport)), b.addr), 1.0);
    let mut c = connect(addr(port));
    assert_eq!(read_line(&mut c), "b");
}

/// A route that sends PROXY headers has backends that refuse connections
/// without one (nginx `listen ... proxy_protocol`, sluice's own
/// `accept_proxy`): its checks send one too, v1 `UNKNOWN` or v2 `LOCAL`
/// (take the connection's own addresses), ahead of the HTTP check's GET or
/// before a TCP check closes. So the backend stays up, while clients'
/// connections still carry the clients' addresses.
#[test]
fn checks_on_a_send_proxy_route_send_a_local_header() {
    use std::io::{Read, Write};
    for (version, http, local) in [
        ("v1", true, "UNKNOWN"),
        ("v2", true, "LOCAL"),
        ("v1", false, "UNKNOWN"),
        ("v2", false, "LOCAL"),
    ] {
        let b = Backend::spawn(|mut s| {
            let h = match read_proxy_header(&mut s) {
                Ok(h) => h,
                Err(e) => return format!("ERR {e}"),
            };
            let first = match read_request(&mut s) {
                Some(req) => {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                    req.lines().next().unwrap_or("").to_string()
                }
                None => "EOF".to_string(),
            };
            format!("{} {} {:?} {first}", h.version, h.kind, h.src)
        });
        let (port, aport) = (free_port(), free_port());
        let path = if http {
            "http_path = \"/health\"\n"
        } else {
            ""
        };
        let toml = format!(
            "[global]\nworkers = 1\n\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n\
             [[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\nbackends = [\"{}\"]\n\
             send_proxy = \"{version}\"\n\
             [route.health]\ninterval = \"50ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 2\n{path}",
            b.addr
        );
        let sl = Sluice::start(&format!("check-send-proxy-{version}-{http}"), &toml);
        let ok = |m: &Metrics| {
            m.sum(
                "sluice_backend_health_checks_total",
                &[("address", &b.addr.to_string()), ("result", "ok")],
            )
        };
        common::admin::scrape_until(addr(aport), "4 good checks", |m| ok(m) >= 4.0);
        let m = scrape(addr(aport));
        assert_eq!(up(&m, b.addr), 1.0, "{version} http={http}");
        assert_eq!(
            m.sum(
                "sluice_backend_health_checks_total",
                &[("address", &b.addr.to_string()), ("result", "failed")],
            ),
            0.0,
            "{version} http={http}: {:?}",
            b.results()
        );
        // A client's connection carries the client's address.
        let mut c = connect(addr(port));
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert!(got.ends_with(b"\r\n\r\nok"), "{got:?}");
        let client = format!("{:?}", Some(c.local_addr().unwrap()));
        let proxied = if version == "v1" { "TCP4" } else { "PROXY" };
        let want_client = format!("{version} {proxied} {client} GET / HTTP/1.1");
        // The backend notes the client once its handler returns, a moment
        // after the client saw the close. sluice runs on meanwhile, so no
        // probe is cut before its header (stopping it could).
        let end = Instant::now() + Duration::from_secs(5);
        while !b.results().contains(&want_client) {
            assert!(Instant::now() < end, "{:?}", b.results());
            std::thread::sleep(Duration::from_millis(10));
        }
        let results = b.results();
        drop(sl);
        let want_check = if http {
            format!("{version} {local} None GET /health HTTP/1.0")
        } else {
            format!("{version} {local} None EOF")
        };
        let checks = results.iter().filter(|r| **r == want_check).count();
        assert!(checks >= 4, "{version} http={http}: {results:?}");
        assert!(
            results
                .iter()
                .all(|r| *r == want_check || *r == want_client)
                && results.contains(&want_client),
            "{version} http={http}: {results:?}"
        );
    }
}
