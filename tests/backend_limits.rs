//! Per-backend `max_connections` and the wait for a free backend
//! (`queue_timeout`), through the real binary: a full backend never holds
//! more connections than its limit, waiting clients are served as slots
//! free (also across workers), a client that waits too long is turned
//! away (or sent the fallback file), and a full backend's share goes to
//! the others.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::admin::{Metrics, scrape, scrape_until};
use common::*;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A per-backend metric of route `route`.
fn bget(m: &Metrics, route: &str, name: &str, b: SocketAddr) -> f64 {
    let a = b.to_string();
    m.get(name, &[("route", route), ("backend", &a), ("address", &a)])
}

/// A config with `workers` workers, the admin listener on `aport`, and
/// one route "r" on `port`; `route` is the rest of the route's table.
fn config(workers: usize, aport: u16, port: u16, route: &str) -> String {
    format!(
        "[global]\nworkers = {workers}\n\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n\
         [[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\n{route}\n"
    )
}

/// A backend entry that holds one connection at most.
fn one_slot(b: SocketAddr) -> String {
    format!("{{ address = \"{b}\", max_connections = 1 }}")
}

fn waiting(m: &Metrics, route: &str) -> f64 {
    m.get("sluice_route_connections_waiting", &[("route", route)])
}

/// A backend that sends `name` and a newline, then echoes; it records
/// how many connections it holds at once, and the most it ever held.
struct Counted {
    backend: Backend,
    now: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

fn counted(name: &'static str) -> Counted {
    let now = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (n2, m2) = (now.clone(), most.clone());
    let backend = Backend::spawn(move |mut s| {
        let held = n2.fetch_add(1, Ordering::SeqCst) + 1;
        m2.fetch_max(held, Ordering::SeqCst);
        let _ = s.write_all(format!("{name}\n").as_bytes());
        echo(&mut s);
        n2.fetch_sub(1, Ordering::SeqCst);
        name.to_string()
    });
    Counted { backend, now, most }
}

#[test]
fn clients_wait_for_a_full_backend_and_are_served_in_turn() {
    let b = counted("b");
    let (port, aport) = (free_port(), free_port());
    // Two workers: a slot freed on one must reach clients waiting on the
    // other (a missed wake-up would leave them to the 20 s queue_timeout,
    // and they would be turned away without an answer).
    let backends = format!("backends = [{}]", one_slot(b.backend.addr));
    let toml = config(
        2,
        aport,
        port,
        &format!("queue_timeout = \"20s\"\n{backends}"),
    );
    let sl = Sluice::start("limits-queue", &toml);
    let mut first = connect(addr(port));
    assert_eq!(read_line(&mut first), "b");
    // Twelve more clients: none reaches the backend while the first holds it.
    let clients: Vec<TcpStream> = (0..12).map(|_| connect(addr(port))).collect();
    let m = scrape_until(addr(aport), "12 waiting", |m| waiting(m, "r") == 12.0);
    assert_eq!(
        bget(&m, "r", "sluice_backend_connections_active", b.backend.addr),
        1.0
    );
    assert_eq!(
        bget(&m, "r", "sluice_backend_max_connections", b.backend.addr),
        1.0
    );
    assert_eq!(b.backend.accepted(), 1);
    let page = common::admin::get(addr(aport), "/").body;
    assert!(page.contains("<td>1 / 1</td>"), "{page}");
    assert!(page.contains("12 waiting for a backend"), "{page}");

    // Each client, once through, exchanges 64 KiB and closes: the next
    // one gets the slot.
    let served: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(k, mut c)| {
            thread::spawn(move || {
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let name = read_line(&mut c);
                let seed = 100 + k as u64;
                let want = {
                    let mut g = DataGen::new(seed);
                    let mut v = vec![0u8; 65536];
                    g.fill(&mut v);
                    v
                };
                c.write_all(&want).unwrap();
                let mut got = vec![0u8; want.len()];
                c.read_exact(&mut got).unwrap();
                (name, digest_of(&got) == digest_of(&want))
            })
        })
        .collect();
    drop(first);
    for t in served {
        assert_eq!(t.join().unwrap(), ("b".to_string(), true));
    }
    assert_eq!(b.most.load(Ordering::SeqCst), 1, "never two at once");
    assert_eq!(b.backend.accepted(), 13);
    let a = sl.wait_access(13, Duration::from_secs(10));
    assert!(a.iter().all(|l| l["end"] != "queue_timeout"), "{a:?}");
    // Everyone connected (connect_ms is a number); the twelve who came
    // after the first waited, and the access log says so.
    assert!(
        a.iter().all(|l| l["connect_ms"].parse::<u64>().is_ok()),
        "{a:?}"
    );
    let waited: Vec<_> = a.iter().filter(|l| l["queue_ms"] != "0").collect();
    assert!(waited.len() >= 11, "{a:?}");
    // Connect time starts when the wait ends: it is not the wait again.
    for l in waited {
        let (q, c): (u64, u64) = (
            l["queue_ms"].parse().unwrap(),
            l["connect_ms"].parse().unwrap(),
        );
        assert!(c < q, "{l:?}");
        assert_eq!(l["retries"], "0");
    }
    // The kernel spread the clients over both workers, so some were woken
    // by a slot freed on the other one.
    let on = |w: &str| a.iter().filter(|l| l["worker"] == w).count();
    assert!(on("0") > 0 && on("1") > 0, "{a:?}");
    let m = scrape_until(addr(aport), "nobody waiting", |m| waiting(m, "r") == 0.0);
    assert_eq!(
        m.get(
            "sluice_route_connections_ended_total",
            &[("route", "r"), ("reason", "queue_timeout")]
        ),
        0.0
    );
    assert_eq!(b.now.load(Ordering::SeqCst), 0);
}

#[test]
fn a_client_that_waits_past_queue_timeout_is_turned_away() {
    let dir = temp_dir("limits-timeout");
    let page = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nbusy\n";
    write_file(&dir, "busy.http", page);
    let b = counted("b");
    let (wait_port, now_port, fb_port, aport) =
        (free_port(), free_port(), free_port(), free_port());
    let route = |name: &str, port: u16, extra: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\n{extra}\n\
             backends = [{}]\n\n",
            one_slot(b.backend.addr)
        )
    };
    let toml = format!(
        "[global]\nworkers = 1\n\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n{}{}{}",
        route("wait", wait_port, "queue_timeout = \"300ms\""),
        route("now", now_port, "queue_timeout = 0"),
        route(
            "fb",
            fb_port,
            "queue_timeout = \"200ms\"\nfallback_file = \"busy.http\""
        ),
    );
    let sl = Sluice::start_in(dir, &toml, &[]);
    // Each route counts its own connections to the backend: one client
    // each fills it.
    let mut holders = Vec::new();
    for p in [wait_port, now_port, fb_port] {
        let mut c = connect(addr(p));
        assert_eq!(read_line(&mut c), "b");
        holders.push(c);
    }
    for p in [wait_port, now_port] {
        let mut c = connect(addr(p));
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.write_all(b"hello");
        let mut got = Vec::new();
        // Turned away: closed (a FIN, or a reset) without a byte.
        let _ = c.read_to_end(&mut got);
        assert!(got.is_empty(), "{got:?}");
    }
    let mut c = connect(addr(fb_port));
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, page);
    drop(c);
    let a = sl.wait_access(3, Duration::from_secs(10));
    let ends: Vec<(&str, &str, &str)> = a
        .iter()
        .map(|l| {
            let get = |k: &str| l.get(k).map_or("", String::as_str);
            (get("route"), get("end"), get("backend"))
        })
        .collect();
    assert!(ends.contains(&("wait", "queue_timeout", "-")), "{ends:?}");
    assert!(ends.contains(&("now", "queue_timeout", "-")), "{ends:?}");
    assert!(ends.contains(&("fb", "fallback", "")), "{ends:?}");
    let fb = a
        .iter()
        .find(|l| l.get("route").map(String::as_str) == Some("fb"))
        .unwrap();
    assert_eq!(fb["reason"], "queue_timeout", "{fb:?}");
    let fb_waited: u64 = fb["queue_ms"].parse().unwrap();
    assert!(fb_waited >= 200, "{fb:?}");
    // The fallback session counts why no backend served once it ends.
    let m = scrape_until(addr(aport), "fb ended", |m| {
        m.get(
            "sluice_route_connections_ended_total",
            &[("route", "fb"), ("reason", "queue_timeout")],
        ) == 1.0
    });
    for r in ["wait", "now", "fb"] {
        assert_eq!(
            m.get(
                "sluice_route_connections_ended_total",
                &[("route", r), ("reason", "queue_timeout")]
            ),
            1.0,
            "{r}"
        );
        assert_eq!(
            m.get("sluice_route_no_backend_total", &[("route", r)]),
            1.0,
            "{r}"
        );
        assert_eq!(waiting(&m, r), 0.0);
    }
    // The queue histogram: the clients that waited, each once, and not
    // under their queue_timeout; "now" turned its client away unwaited.
    let q = |r: &str, what: &str| {
        m.get(
            &format!("sluice_route_queue_seconds{what}"),
            &[("route", r)],
        )
    };
    let le = |r: &str, le: &str| {
        m.get(
            "sluice_route_queue_seconds_bucket",
            &[("route", r), ("le", le)],
        )
    };
    assert_eq!(
        [q("wait", "_count"), q("now", "_count"), q("fb", "_count")],
        [1.0, 0.0, 1.0]
    );
    assert_eq!([le("wait", "0.25"), le("wait", "2.5")], [0.0, 1.0]);
    assert_eq!([le("fb", "0.1"), le("fb", "+Inf")], [0.0, 1.0]);
    assert!(
        q("wait", "_sum") >= 0.3 && q("fb", "_sum") >= 0.2,
        "{}",
        m.text
    );
    assert_eq!(b.backend.accepted(), 3, "nobody got past a full backend");
    drop(holders);
}

#[test]
fn a_full_backend_hands_its_clients_to_the_others() {
    let a = counted("a");
    let b = Backend::named("b");
    let (port, aport) = (free_port(), free_port());
    let backends = format!(
        "backends = [{{ address = \"{}\", max_connections = 2 }}, \"{}\"]",
        a.backend.addr, b.addr
    );
    let toml = config(1, aport, port, &backends);
    let _sl = Sluice::start("limits-spill", &toml);
    // Round-robin: a, b, a, then a is full and everything goes to b.
    let mut held = Vec::new();
    let mut names = Vec::new();
    for _ in 0..10 {
        let mut c = connect(addr(port));
        names.push(read_line(&mut c));
        held.push(c);
    }
    assert_eq!(names.iter().filter(|n| *n == "a").count(), 2, "{names:?}");
    assert_eq!(names.iter().filter(|n| *n == "b").count(), 8, "{names:?}");
    assert_eq!(a.most.load(Ordering::SeqCst), 2);
    let m = scrape(addr(aport));
    assert_eq!(waiting(&m, "r"), 0.0, "nobody waits while b has room");
    assert_eq!(
        bget(&m, "r", "sluice_backend_connections_active", a.backend.addr),
        2.0
    );
    // Freed slots take clients again.
    held.clear();
    scrape_until(addr(aport), "a empty", |m| {
        bget(m, "r", "sluice_backend_connections_active", a.backend.addr) == 0.0
    });
    let names: Vec<String> = (0..4)
        .map(|_| {
            let mut c = connect(addr(port));
            read_line(&mut c)
        })
        .collect();
    assert!(names.iter().any(|n| n == "a"), "{names:?}");
}

#[test]
fn a_backend_that_comes_up_takes_the_waiting_clients() {
    let a = counted("a");
    // The second backend's port has nobody behind it yet.
    let late = addr(free_port());
    let (port, aport) = (free_port(), free_port());
    let route = format!(
        "queue_timeout = \"20s\"\n\
         backends = [{}, \"{late}\"]\n\
         [route.health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 1",
        one_slot(a.backend.addr)
    );
    let toml = config(2, aport, port, &route);
    let mut sl = Sluice::start("limits-rise", &toml);
    sl.wait_log("is DOWN", Duration::from_secs(10));
    let mut holder = connect(addr(port));
    assert_eq!(read_line(&mut holder), "a");
    let mut waiters: Vec<TcpStream> = (0..3).map(|_| connect(addr(port))).collect();
    scrape_until(addr(aport), "3 waiting", |m| waiting(m, "r") == 3.0);
    // Nothing ends on `a`: only the health check that brings `late` up
    // can tell the waiting clients there is room now.
    let l = std::net::TcpListener::bind(late).expect("rebind the late backend's port");
    let _late = Backend::from_listener(l, "late");
    for c in &mut waiters {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(read_line(c), "late");
    }
    // (The backend also sees health checks: count relayed connections.)
    let m = scrape(addr(aport));
    assert_eq!(
        bget(&m, "r", "sluice_backend_connections_total", a.backend.addr),
        1.0
    );
    assert_eq!(waiting(&m, "r"), 0.0);
    assert_eq!(
        bget(&m, "r", "sluice_backend_connections_active", late),
        3.0
    );
    drop(holder);
}

/// A backend that sends `name` and a newline, then echoes, whose
/// listening socket closes when the returned flag is set (connections
/// already accepted stay): to a health check it goes down.
fn stoppable(name: &'static str) -> (SocketAddr, Arc<AtomicBool>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    thread::spawn(move || {
        while !s2.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    thread::spawn(move || {
                        let _ = s.write_all(format!("{name}\n").as_bytes());
                        echo(&mut s);
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    (a, stop)
}

/// Clients wait for the one slot of a primary; a health check then finds
/// the primary down. Its waiting clients go to the backup at once (they
/// came first: newcomers go there too), not at the end of queue_timeout
/// (20 s here); on a route with no other backend, they are told at once
/// (no_backend) rather than held.
#[test]
fn a_primary_that_goes_down_hands_its_waiting_clients_to_the_backup() {
    let (primary, stop) = stoppable("primary");
    let (lone, stop_lone) = stoppable("lone");
    let backup = Backend::named("backup");
    let (port, port2, aport) = (free_port(), free_port(), free_port());
    let health = "[route.health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 1";
    let toml = format!(
        "{}\n[[route]]\nname = \"r2\"\nlisten = \"127.0.0.1:{port2}\"\n\
         queue_timeout = \"20s\"\nbackends = [{}]\n{health}\n",
        config(
            2,
            aport,
            port,
            &format!(
                "queue_timeout = \"20s\"\n\
                 backends = [{}, {{ address = \"{}\", backup = true }}]\n{health}",
                one_slot(primary),
                backup.addr
            )
        ),
        one_slot(lone)
    );
    let sl = Sluice::start("limits-down", &toml);
    let mut holders = [connect(addr(port)), connect(addr(port2))];
    assert_eq!(read_line(&mut holders[0]), "primary");
    assert_eq!(read_line(&mut holders[1]), "lone");
    let mut waiters: Vec<TcpStream> = (0..2).map(|_| connect(addr(port))).collect();
    let mut lone_waiter = connect(addr(port2));
    scrape_until(addr(aport), "3 waiting", |m| {
        waiting(m, "r") == 2.0 && waiting(m, "r2") == 1.0
    });
    stop.store(true, Ordering::SeqCst);
    stop_lone.store(true, Ordering::SeqCst);
    for c in &mut waiters {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(read_line(c), "backup");
    }
    lone_waiter
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 8];
    assert!(matches!(lone_waiter.read(&mut buf), Ok(0) | Err(_)));
    let a = sl.wait_access(1, Duration::from_secs(5));
    assert_eq!(
        (a[0]["route"].as_str(), a[0]["end"].as_str()),
        ("r2", "no_backend"),
        "{a:?}"
    );
    let m = scrape(addr(aport));
    assert_eq!((waiting(&m, "r"), waiting(&m, "r2")), (0.0, 0.0));
    assert_eq!(
        bget(&m, "r", "sluice_backend_connections_active", backup.addr),
        2.0
    );
}

#[test]
fn a_crowd_that_times_out_leaves_the_queue_clean() {
    let b = counted("b");
    let (port, aport) = (free_port(), free_port());
    let backends = format!("backends = [{}]", one_slot(b.backend.addr));
    let toml = config(
        1,
        aport,
        port,
        &format!("queue_timeout = \"3s\"\n{backends}"),
    );
    let sl = Sluice::start("limits-crowd", &toml);
    let mut holder = connect(addr(port));
    assert_eq!(read_line(&mut holder), "b");
    // 150 clients wait; a third of them give up (reset) first.
    let mut crowd: Vec<TcpStream> = (0..150).map(|_| connect(addr(port))).collect();
    scrape_until(addr(aport), "150 waiting", |m| waiting(m, "r") == 150.0);
    for c in crowd.iter().step_by(3) {
        socket2::SockRef::from(c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    let mut k = 0;
    crowd.retain(|_| {
        k += 1;
        (k - 1) % 3 != 0
    });
    let m = scrape_until(addr(aport), "everyone gone", |m| waiting(m, "r") == 0.0);
    let ended = |m: &Metrics, why: &str| {
        m.get(
            "sluice_route_connections_ended_total",
            &[("route", "r"), ("reason", why)],
        )
    };
    assert_eq!(ended(&m, "client_reset"), 50.0);
    assert_eq!(ended(&m, "queue_timeout"), 100.0);
    // Each turned-away client waited its whole queue_timeout and never
    // connected.
    let lines = sl.wait_access(150, Duration::from_secs(10));
    let timed_out: Vec<_> = lines
        .iter()
        .filter(|l| l["end"] == "queue_timeout")
        .collect();
    assert_eq!(timed_out.len(), 100);
    for l in timed_out {
        let waited: u64 = l["queue_ms"].parse().unwrap();
        assert!(waited >= 3000, "{l:?}");
        assert_eq!(
            (l["connect_ms"].as_str(), l["backend"].as_str()),
            ("-", "-")
        );
    }
    for c in &mut crowd {
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        assert!(got.is_empty());
    }
    // Nothing left to do: the worker sleeps.
    let cpu = sl.cpu_time();
    thread::sleep(Duration::from_millis(500));
    assert!(
        sl.cpu_time() - cpu < Duration::from_millis(100),
        "busy while idle"
    );
    // The slot frees: the next client goes straight through.
    drop(holder);
    scrape_until(addr(aport), "b free", |m| {
        bget(m, "r", "sluice_backend_connections_active", b.backend.addr) == 0.0
    });
    let mut c = connect(addr(port));
    assert_eq!(read_line(&mut c), "b");
    assert_eq!(b.backend.accepted(), 2);
}

#[test]
fn full_primaries_make_clients_wait_instead_of_spilling_to_a_backup() {
    let p = counted("primary");
    let backup = Backend::named("backup");
    let (port, aport) = (free_port(), free_port());
    let route = format!(
        "queue_timeout = \"20s\"\nbackends = [{}, {{ address = \"{}\", backup = true }}]",
        one_slot(p.backend.addr),
        backup.addr
    );
    let toml = config(1, aport, port, &route);
    let _sl = Sluice::start("limits-backup", &toml);
    let mut holder = connect(addr(port));
    assert_eq!(read_line(&mut holder), "primary");
    let mut next = connect(addr(port));
    scrape_until(addr(aport), "1 waiting", |m| waiting(m, "r") == 1.0);
    assert_eq!(
        backup.accepted(),
        0,
        "the backup stands in for a down primary only"
    );
    drop(holder);
    assert_eq!(read_line(&mut next), "primary");
    assert_eq!(backup.accepted(), 0);
}

#[test]
fn clients_waiting_across_a_reload_keep_the_limit_they_came_under() {
    let b = counted("b");
    let (port, aport) = (free_port(), free_port());
    let cfg = |max: usize| {
        let backends = format!(
            "backends = [{{ address = \"{}\", max_connections = {max} }}]",
            b.backend.addr
        );
        config(
            1,
            aport,
            port,
            &format!("queue_timeout = \"20s\"\n{backends}"),
        )
    };
    let mut sl = Sluice::start("limits-reload", &cfg(2));
    let mut holders: Vec<TcpStream> = (0..2).map(|_| connect(addr(port))).collect();
    for h in &mut holders {
        assert_eq!(read_line(h), "b");
    }
    let old: Vec<TcpStream> = (0..2).map(|_| connect(addr(port))).collect();
    scrape_until(addr(aport), "2 waiting", |m| waiting(m, "r") == 2.0);
    // The reload lowers the limit to 1 and keeps the backend (same
    // address: same connection count) and the waiting clients.
    std::fs::write(&sl.config, cfg(1)).unwrap();
    sl.signal("HUP");
    sl.wait_log("reload ok: generation 2", Duration::from_secs(10));
    let new: Vec<TcpStream> = (0..2).map(|_| connect(addr(port))).collect();
    scrape_until(addr(aport), "4 waiting", |m| waiting(m, "r") == 4.0);
    // One slot frees: 1 open. An old client (limit 2) may take it, a new
    // one (limit 1) may not.
    holders.pop();
    let m = scrape_until(addr(aport), "3 waiting", |m| waiting(m, "r") == 3.0);
    assert_eq!(
        bget(&m, "r", "sluice_backend_connections_active", b.backend.addr),
        2.0
    );
    let has_answer = |c: &TcpStream, wait: Duration| {
        c.set_read_timeout(Some(wait)).unwrap();
        let mut byte = [0u8; 1];
        matches!(c.peek(&mut byte), Ok(1))
    };
    // One old client is served (3 waiting): its greeting is on the way,
    // however slowly. A new client, which may not be served, gets no byte.
    let end = Instant::now() + Duration::from_secs(10);
    let old_served = loop {
        let n = old
            .iter()
            .filter(|c| has_answer(c, Duration::from_millis(100)))
            .count();
        if n > 0 || Instant::now() > end {
            break n;
        }
    };
    let new_served = new
        .iter()
        .filter(|c| has_answer(c, Duration::from_millis(300)))
        .count();
    assert_eq!((old_served, new_served), (1, 0));
    // Everyone leaves in turn: all are served, never more than 2 at once.
    drop(holders);
    let all: Vec<_> = old
        .into_iter()
        .chain(new)
        .map(|mut c| {
            thread::spawn(move || {
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let name = read_line(&mut c);
                drop(c);
                name
            })
        })
        .collect();
    for t in all {
        assert_eq!(t.join().unwrap(), "b");
    }
    assert_eq!(b.backend.accepted(), 6);
    assert!(b.most.load(Ordering::SeqCst) <= 2, "never above the limit");
    let m = scrape_until(addr(aport), "nobody waiting", |m| waiting(m, "r") == 0.0);
    assert_eq!(
        m.get(
            "sluice_route_connections_ended_total",
            &[("route", "r"), ("reason", "queue_timeout")]
        ),
        0.0
    );
}

#[test]
fn a_failover_counts_its_retries_and_connect_time() {
    let live = Backend::named("live");
    // Nobody listens on the first backend: its connects are refused.
    let dead = addr(free_port());
    let port = free_port();
    let toml = format!(
        "[global]\nworkers = 1\n\n[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\n\
         backends = [\"{dead}\", \"{}\"]\n",
        live.addr
    );
    let sl = Sluice::start("limits-retries", &toml);
    // Round-robin: one of two clients tries the dead backend first.
    for _ in 0..2 {
        let mut c = connect(addr(port));
        assert_eq!(read_line(&mut c), "live");
    }
    let a = sl.wait_access(2, Duration::from_secs(10));
    let mut retries: Vec<&str> = a.iter().map(|l| l["retries"].as_str()).collect();
    retries.sort();
    assert_eq!(retries, ["0", "1"], "{a:?}");
    for l in &a {
        assert_eq!(l["backend"], live.addr.to_string());
        assert!(l["connect_ms"].parse::<u64>().is_ok(), "{l:?}");
        assert_eq!(l["queue_ms"], "0");
    }
}

#[test]
fn without_checks_waiting_clients_retry_a_downed_backend_when_due() {
    let a = counted("a");
    // The second backend's port has nobody behind it yet.
    let late = addr(free_port());
    let (port, aport) = (free_port(), free_port());
    // No [route.health]: passive marking only (3 failed connects make a
    // backend DOWN; one client may retry it each 2 s interval).
    let route = format!(
        "queue_timeout = \"20s\"\n\
         backends = [{}, \"{late}\"]",
        one_slot(a.backend.addr)
    );
    let toml = config(1, aport, port, &route);
    let mut sl = Sluice::start("limits-passive", &toml);
    let mut holder = connect(addr(port));
    assert_eq!(read_line(&mut holder), "a");
    // Three clients fail over from the dead backend to a full one: it goes
    // DOWN and they wait.
    let mut waiters: Vec<TcpStream> = (0..3).map(|_| connect(addr(port))).collect();
    sl.wait_log("is DOWN after 3 failed connects", Duration::from_secs(10));
    scrape_until(addr(aport), "3 waiting", |m| waiting(m, "r") == 3.0);
    // It comes back. Nothing ends on `a` and no new client arrives: only a
    // waiting client's own retry can find out.
    let l = std::net::TcpListener::bind(late).expect("rebind the late backend's port");
    let _late = Backend::from_listener(l, "late");
    for c in &mut waiters {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(read_line(c), "late");
    }
    sl.wait_log("is UP again", Duration::from_secs(10));
    let m = scrape(addr(aport));
    assert_eq!(waiting(&m, "r"), 0.0);
    drop(holder);
}

/// Clients that reset while sluice connects to a backend for them end at
/// once (the edge will not come again); and a waiting client whose own
/// timer tries a downed backend (passive health), and whose connect then
/// fails back onto a full one, waits in the queue again: the slot freed
/// next is its own, not left idle until its queue_timeout.
#[test]
fn a_client_that_fails_back_into_the_wait_is_queued_again() {
    let a = counted("a");
    let (hole, _fill, _l) = blackhole();
    let (port, aport) = (free_port(), free_port());
    let route = format!(
        "connect_timeout = \"1500ms\"\nqueue_timeout = \"5300ms\"\n\
         backends = [{}, \"{hole}\"]",
        one_slot(a.backend.addr)
    );
    // Timing: W waits at t; at t+2s (the passive health interval) its
    // timer tries the hole, which times out at t+3.5s, too soon for
    // another try (one per interval), so W waits again. Its queue_timeout
    // ends the wait at t+5.3s, before its own next look at t+5.5s: only a
    // freed slot reaching it through the queue serves it. The test acts
    // within 1.5 s (the hole's connect) and 1.8 s (the rest of the wait).
    let mut sl = Sluice::start("limits-rewait", &config(1, aport, port, &route));
    let mut holder = connect(addr(port));
    assert_eq!(read_line(&mut holder), "a");
    // Three clients time out on the hole: it is marked DOWN. They reset
    // (some are connecting to the hole again, some waiting): all three end
    // now, none lingers to a queue_timeout.
    let doomed: Vec<TcpStream> = (0..3).map(|_| connect(addr(port))).collect();
    sl.wait_log("is DOWN after 3 failed connects", Duration::from_secs(10));
    for c in doomed {
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    sl.wait_ends("client_reset", 3, Duration::from_secs(10));
    assert_eq!(sl.ends("queue_timeout"), 0);
    assert_eq!(waiting(&scrape(addr(aport)), "r"), 0.0);
    let (timeouts, tries) = (
        sl.count_log("connect_timeout expired"),
        sl.count_log("is given another try"),
    );
    // W waits, and Y behind it; after the health interval W's own timer
    // tries the hole.
    let mut w = connect(addr(port));
    w.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    scrape_until(addr(aport), "W waiting", |m| waiting(m, "r") == 1.0);
    let mut y = connect(addr(port));
    scrape_until(addr(aport), "Y waiting", |m| waiting(m, "r") == 2.0);
    let until = |what: &str, n: usize| {
        let end = Instant::now() + Duration::from_secs(10);
        while sl.count_log(what) <= n {
            assert!(Instant::now() < end, "no new {what:?}");
            thread::sleep(Duration::from_millis(10));
        }
    };
    until("is given another try", tries);
    // Meanwhile the slot frees: W is connecting, not waiting, so the
    // queue passes over W's place and Y takes the slot.
    drop(holder);
    assert_eq!(read_line(&mut y), "a");
    // W's try times out; it fails over to the full backend and waits
    // again. Then Y leaves: its slot is W's.
    until("connect_timeout expired", timeouts);
    scrape_until(addr(aport), "W waiting again", |m| waiting(m, "r") == 1.0);
    drop(y);
    assert_eq!(read_line(&mut w), "a", "W was not served by the freed slot");
    let m = scrape(addr(aport));
    assert_eq!(waiting(&m, "r"), 0.0);
}

/// A reload drops a backend, and a later one brings it back while a
/// connection of the first configuration still holds its one slot: the
/// backend takes up its count, so a new client waits (queue_timeout, then
/// turned away) instead of making two connections to a backend allowed
/// one. The same for a route that a reload drops and a later one brings
/// back: its `max_connections` counts the connection still open.
#[test]
fn a_backend_or_route_dropped_and_brought_back_keeps_its_count() {
    let b = counted("b");
    let other = Backend::named("other");
    let (port, port2, aport) = (free_port(), free_port(), free_port());
    let cfg = |with: bool| {
        let list = if with {
            one_slot(b.backend.addr)
        } else {
            format!("\"{}\"", other.addr)
        };
        let second = if with {
            format!(
                "\n[[route]]\nname = \"r2\"\nlisten = \"127.0.0.1:{port2}\"\n\
                 max_connections = 1\nbackends = [\"{}\"]\n",
                other.addr
            )
        } else {
            String::new()
        };
        config(
            1,
            aport,
            port,
            &format!("queue_timeout = \"500ms\"\nbackends = [{list}]\n{second}"),
        )
    };
    let mut sl = Sluice::start("limits-readd", &cfg(true));
    let mut holder = connect(addr(port));
    assert_eq!(read_line(&mut holder), "b");
    let mut holder2 = connect(addr(port2));
    assert_eq!(read_line(&mut holder2), "other");
    for (g, with) in [(2, false), (3, true)] {
        std::fs::write(&sl.config, cfg(with)).unwrap();
        sl.signal("HUP");
        sl.wait_log(
            &format!("reload ok: generation {g}"),
            Duration::from_secs(10),
        );
    }
    let mut second = connect(addr(port));
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(read_line(&mut second), "", "served past max_connections");
    // Refused with a reset, which can come before connect returns.
    if let Ok(mut third) = TcpStream::connect(addr(port2)) {
        third
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(
            read_line(&mut third),
            "",
            "route r2 served past max_connections"
        );
    }
    let m = scrape(addr(aport));
    assert_eq!(
        bget(&m, "r", "sluice_backend_connections_active", b.backend.addr),
        1.0
    );
    assert_eq!(b.most.load(Ordering::SeqCst), 1);
    let ends: Vec<String> = sl
        .wait_access(2, Duration::from_secs(5))
        .iter()
        .map(|a| a["end"].clone())
        .collect();
    assert_eq!(ends, ["queue_timeout", "limit"], "{:?}", sl.access());
    drop((holder, holder2));
}

/// A backend dropped by one reload while it was down, and brought back by
/// a later one after it recovered (while a connection of the first still
/// holds its count): nothing checked it in between, so it comes back with
/// fresh health (up), as a new backend does, not with the old DOWN.
#[test]
fn a_backend_brought_back_after_a_gap_starts_with_fresh_health() {
    let (a, stop) = stoppable("b");
    let other = Backend::named("other");
    let (port, aport) = (free_port(), free_port());
    let health = "[route.health]\ninterval = \"100ms\"\ntimeout = \"300ms\"\nrise = 10\nfall = 1";
    let cfg = |list: String| config(1, aport, port, &format!("backends = [{list}]\n{health}"));
    let mut sl = Sluice::start("review-health", &cfg(format!("\"{a}\"")));
    let mut holder = connect(addr(port));
    assert_eq!(read_line(&mut holder), "b");
    stop.store(true, Ordering::SeqCst);
    sl.wait_log("is DOWN", Duration::from_secs(10));
    std::fs::write(&sl.config, cfg(format!("\"{}\"", other.addr))).unwrap();
    sl.signal("HUP");
    sl.wait_log("reload ok: generation 2", Duration::from_secs(10));
    // The backend recovers (same address) while no configuration lists it.
    thread::sleep(Duration::from_millis(200));
    let l = std::net::TcpListener::bind(a).unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let mut s = s.unwrap();
            thread::spawn(move || {
                let _ = s.write_all(b"b\n");
                echo(&mut s);
            });
        }
    });
    std::fs::write(&sl.config, cfg(format!("\"{a}\""))).unwrap();
    sl.signal("HUP");
    sl.wait_log("reload ok: generation 3", Duration::from_secs(10));
    let mut c = connect(addr(port));
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(read_line(&mut c), "b", "{:?}", sl.access());
    drop(holder);
}
