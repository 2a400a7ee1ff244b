//! Live reload (SIGHUP) and the systemd notifications around it, through
//! the real binary: READY/RELOADING/STOPPING on a NOTIFY_SOCKET the test
//! binds, 20 reloads under a client loop with zero failures, a bad config
//! that leaves the old one serving, a reload short of file descriptors
//! that fails whole, a reload that changes backends and routes while a
//! connection stays open on the old ones, and a worker whose epoll
//! refuses a listening socket trying again until it serves it.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::admin::scrape;
use common::*;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn route(name: &str, port: u16, backend: SocketAddr) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nbackends = \"{backend}\"\n\n"
    )
}

/// One notification datagram, as text.
fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

#[test]
fn notifies_ready_reloading_ready_stopping() {
    let dir = temp_dir("notify");
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let b = Backend::named("b");
    let port = free_port();
    let mut sl = Sluice::start_in(
        dir,
        &route("r", port, b.addr),
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    assert_eq!(recv(&sock), "READY=1\n");
    // READY comes after the listeners are bound: a client is served now.
    let mut c = connect(addr(port));
    assert_eq!(read_line(&mut c), "b");

    let mut last = 0u64;
    for generation in 2..=3 {
        sl.signal("HUP");
        // RELOADING=1 and MONOTONIC_USEC in one datagram, then READY=1.
        let msg = recv(&sock);
        let lines: Vec<&str> = msg.lines().collect();
        assert_eq!(lines.len(), 2, "{msg:?}");
        assert_eq!(lines[0], "RELOADING=1");
        let usec: u64 = lines[1]
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("{msg:?}"))
            .parse()
            .unwrap();
        assert!(
            usec > last,
            "MONOTONIC_USEC moves forward: {usec} after {last}"
        );
        last = usec;
        assert_eq!(recv(&sock), "READY=1\n");
        sl.wait_log(
            &format!("reload ok: generation {generation}"),
            Duration::from_secs(5),
        );
    }
    // A failed reload is bracketed the same way.
    std::fs::write(&sl.config, "[[route]\n").unwrap();
    sl.signal("HUP");
    assert!(recv(&sock).starts_with("RELOADING=1\nMONOTONIC_USEC="));
    assert_eq!(recv(&sock), "READY=1\n");
    sl.wait_log("reload failed", Duration::from_secs(5));

    drop(c);
    sl.signal("TERM");
    assert_eq!(recv(&sock), "STOPPING=1\n");
    let st = sl.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(st.code(), Some(0));
}

/// Connect, read the backend's name, echo 4 KiB, close; the name.
fn round_trip(port: u16, seed: u64) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr(port), Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = read_line(&mut s);
    if name.is_empty() {
        return Err("no greeting (closed or reset)".into());
    }
    let mut data = vec![0u8; 4096];
    DataGen::new(seed).fill(&mut data);
    s.write_all(&data).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    if back != data {
        return Err("echo differs".into());
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .map_err(|e| format!("read to end: {e}"))?;
    if !rest.is_empty() {
        return Err("bytes after the echo".into());
    }
    Ok(name)
}

#[test]
fn twenty_reloads_refuse_and_reset_nothing() {
    let (a, b) = (Backend::named("a"), Backend::named("b"));
    let (port, other) = (free_port(), free_port());
    // Every other generation also has a second route, so listeners are
    // bound and closed around the one that must never blink.
    let cfg = |generation: u64| {
        let backend = if generation % 2 == 1 { a.addr } else { b.addr };
        let extra = if generation.is_multiple_of(2) {
            route("other", other, a.addr)
        } else {
            String::new()
        };
        format!(
            "[global]\nworkers = 2\n\n{}{extra}",
            route("r", port, backend)
        )
    };
    let mut sl = Sluice::start("reload-loop", &cfg(1));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..2)
        .map(|t| {
            let (stop, ok) = (stop.clone(), ok.clone());
            thread::spawn(move || {
                let mut fails = Vec::new();
                let mut names = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match round_trip(port, t * 1_000_000 + i) {
                        Ok(n) => {
                            names.push(n);
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => fails.push(e),
                    }
                    i += 1;
                }
                (fails, names)
            })
        })
        .collect();
    for generation in 2..=21u64 {
        let before = ok.load(Ordering::Relaxed);
        std::fs::write(&sl.config, cfg(generation)).unwrap();
        sl.signal("HUP");
        sl.wait_log(
            &format!("reload ok: generation {generation}"),
            Duration::from_secs(10),
        );
        // Let traffic flow on the new generation before the next reload.
        let end = Instant::now() + Duration::from_secs(10);
        while ok.load(Ordering::Relaxed) < before + 4 {
            assert!(Instant::now() < end, "no traffic after reload {generation}");
            thread::sleep(Duration::from_millis(2));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut seen = std::collections::HashSet::new();
    for c in clients {
        let (fails, names) = c.join().unwrap();
        assert!(
            fails.is_empty(),
            "failed exchanges during reloads: {fails:?}"
        );
        total += names.len();
        seen.extend(names);
    }
    assert!(total >= 80, "{total} exchanges");
    assert_eq!(seen.len(), 2, "both generations' backends served: {seen:?}");
    let access = sl.wait_access(total, Duration::from_secs(10));
    // Read once the access lines are in: the log arrives through a pipe.
    assert_eq!(sl.count_log("reload ok"), 20);
    for l in &access {
        assert!(
            l["end"] == "client_closed" || l["end"] == "backend_closed",
            "connection ended badly: {l:?}"
        );
    }
}

#[test]
fn bad_reload_keeps_the_old_config_serving() {
    let (a, b) = (Backend::named("a"), Backend::named("b"));
    let (port, aport) = (free_port(), free_port());
    let admin = format!("[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n");
    let mut sl = Sluice::start(
        "reload-bad",
        &format!("{admin}{}", route("r", port, a.addr)),
    );
    // Syntax error on line 4, then a semantic error.
    let bad = format!(
        "{admin}[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\nbackends = \"{}\"\n",
        b.addr
    );
    std::fs::write(&sl.config, bad).unwrap();
    sl.signal("HUP");
    let line = sl.wait_log("reload failed", Duration::from_secs(10));
    let at = line.find("sluice.toml:").expect("the file is named") + "sluice.toml:".len();
    let loc: Vec<&str> = line[at..].splitn(3, ':').collect();
    assert_eq!(loc[0], "6", "line of the error: {line}");
    assert!(loc[1].parse::<u32>().is_ok(), "column of the error: {line}");
    assert!(
        line.contains("still serving the previous configuration"),
        "{line}"
    );
    let mut c = connect(addr(port));
    assert_eq!(read_line(&mut c), "a", "old backend still used");

    let semantic = format!("{admin}{}", route("r", port, b.addr)).replace("backends", "backend");
    std::fs::write(&sl.config, semantic).unwrap();
    sl.signal("HUP");
    let end = Instant::now() + Duration::from_secs(10);
    while sl.count_log("reload failed") < 2 {
        assert!(Instant::now() < end);
        thread::sleep(Duration::from_millis(10));
    }
    let mut c = connect(addr(port));
    assert_eq!(read_line(&mut c), "a");
    let m = scrape(addr(aport));
    assert_eq!(m.get("sluice_reloads_total", &[("result", "failed")]), 2.0);
    assert_eq!(m.get("sluice_reloads_total", &[("result", "ok")]), 0.0);
    assert_eq!(m.get("sluice_config_generation", &[]), 1.0);
}

/// Moving a port from 127.0.0.1 to every address (0.0.0.0) cannot be
/// done by one reload: the running configuration's socket holds the port
/// while the new one binds. The reload fails whole, says why and what to
/// do; the two reloads it suggests get there.
#[test]
fn moving_a_port_to_another_address_says_how() {
    let a = Backend::named("a");
    let port = free_port();
    let mut sl = Sluice::start("reload-move-port", &route("r", port, a.addr));
    let moved = route("r", port, a.addr).replace(
        &format!("listen = \"127.0.0.1:{port}\""),
        &format!("listen = \"0.0.0.0:{port}\""),
    );
    std::fs::write(&sl.config, &moved).unwrap();
    sl.signal("HUP");
    let line = sl.wait_log("reload failed", Duration::from_secs(10));
    assert!(
        line.contains(&format!("cannot listen on 0.0.0.0:{port}"))
            && line.contains(&format!(
                "sluice itself listens on 127.0.0.1:{port}, which this configuration drops"
            )),
        "{line}"
    );
    assert_eq!(read_line(&mut connect(addr(port))), "a");
    // Without the port, then on every address.
    let other = free_port();
    std::fs::write(&sl.config, route("r", other, a.addr)).unwrap();
    sl.signal("HUP");
    sl.wait_log("reload ok: generation 2", Duration::from_secs(10));
    std::fs::write(&sl.config, &moved).unwrap();
    sl.signal("HUP");
    sl.wait_log("reload ok: generation 3", Duration::from_secs(10));
    assert_eq!(read_line(&mut connect(addr(port))), "a");
}

#[test]
fn reload_changes_backends_and_routes_but_not_open_connections() {
    let (a, b) = (Backend::named("a"), Backend::named("b"));
    let (p, old, new) = (free_port(), free_port(), free_port());
    let mut sl = Sluice::start(
        "reload-change",
        &format!("{}{}", route("r", p, a.addr), route("old", old, a.addr)),
    );
    let mut held = connect(addr(p));
    assert_eq!(read_line(&mut held), "a");

    std::fs::write(
        &sl.config,
        format!("{}{}", route("r", p, b.addr), route("new", new, b.addr)),
    )
    .unwrap();
    sl.signal("HUP");
    sl.wait_log("reload ok: generation 2", Duration::from_secs(10));

    // New connections use the new backend, and the new route serves.
    for _ in 0..3 {
        let mut c = connect(addr(p));
        assert_eq!(read_line(&mut c), "b");
    }
    let mut c = connect(addr(new));
    assert_eq!(read_line(&mut c), "b");
    drop(c);
    // The removed route stops accepting (once every worker let go).
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect_timeout(&addr(old), Duration::from_secs(1)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => {
                assert!(Instant::now() < end, "route \"old\" still accepts");
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
    // The connection opened before the reload still talks to "a", and
    // finishes byte-exact.
    let (sent, got) = exchange(held, 7, 2 << 20);
    assert_eq!(sent, got, "echo from the old backend");
    let r = a.wait_results(1, Duration::from_secs(10));
    assert_eq!(r, vec!["a".to_string()]);
    let access = sl.wait_access(5, Duration::from_secs(10));
    let held_line = access
        .iter()
        .find(|l| l["backend"] == a.addr.to_string())
        .expect("access line of the held connection");
    assert_eq!(held_line["bytes_in"], (2u64 << 20).to_string());
    assert_eq!(held_line["end"], "client_closed");
}

/// `log_level` raised by a reload takes effect (the logger itself must
/// not keep the start level as a floor): access lines appear only after
/// the reload to "info". Runs without RUST_LOG, which would win.
#[test]
fn a_reload_can_raise_the_log_level() {
    let a = Backend::named("a");
    let (port, aport) = (free_port(), free_port());
    let toml = |level: &str| {
        format!(
            "[global]\nlog_level = \"{level}\"\n\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n{}",
            route("r", port, a.addr)
        )
    };
    let dir = temp_dir("reload-log-level");
    let config = dir.join("sluice.toml");
    std::fs::write(&config, toml("warn")).unwrap();
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG");
    let mut sl = Sluice::launch(dir, config, cmd);
    sl.wait_listening(aport);
    let served = |sl: &Sluice, n: f64| {
        let mut c = connect(addr(port));
        assert_eq!(read_line(&mut c), "a");
        drop(c);
        common::admin::scrape_until(addr(aport), "the client's end counted", |m| {
            m.sum("sluice_route_connections_ended_total", &[("route", "r")]) >= n
        });
        sl.access().len()
    };
    assert_eq!(served(&sl, 1.0), 0, "no access line at warn");
    std::fs::write(&sl.config, toml("info")).unwrap();
    sl.signal("HUP");
    common::admin::scrape_until(addr(aport), "the reload", |m| {
        m.get("sluice_reloads_total", &[("result", "ok")]) == 1.0
    });
    served(&sl, 2.0);
    let a = sl.wait_access(1, Duration::from_secs(10));
    assert_eq!(a.len(), 1, "one access line at info: {a:?}");
    sl.wait_log("reload ok", Duration::from_secs(5));
}

/// RUST_LOG that names only some targets leaves the others at
/// `log_level`: `RUST_LOG=sluice=debug` adds debug lines and keeps the
/// access log (target `access`) at the configured "info".
#[test]
fn rust_log_for_some_targets_keeps_log_level_for_the_rest() {
    let a = Backend::named("a");
    let port = free_port();
    let toml = format!(
        "[global]\nlog_level = \"info\"\n\n{}",
        route("r", port, a.addr)
    );
    let sl = Sluice::start_in(
        temp_dir("rust-log-targets"),
        &toml,
        &[("RUST_LOG", "sluice=debug")],
    );
    let mut c = connect(addr(port));
    assert_eq!(read_line(&mut c), "a");
    drop(c);
    let lines = sl.wait_access(1, Duration::from_secs(10));
    assert_eq!(lines[0]["route"], "r");
    assert!(
        sl.logs().iter().any(|l| l.contains(" DEBUG ")),
        "RUST_LOG's own directive applies too"
    );
}

/// Each worker needs its own descriptor of every listening socket. When
/// the process cannot make them, the reload fails as a whole, with a
/// message that says why and what to do, and every worker keeps the
/// previous configuration. (Each worker used to make its own and, on
/// failure, stay behind on the old listeners while the log said "reload
/// ok": two workers could serve two configurations.)
#[test]
fn a_reload_short_of_descriptors_fails_whole() {
    let (a, b) = (Backend::named("a"), Backend::named("b"));
    let (p1, p2, aport) = (free_port(), free_port(), free_port());
    let head = format!("[global]\nworkers = 2\n\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n");
    let mut sl = Sluice::start(
        "reload-fds",
        &format!(
            "{head}{}{}",
            route("r1", p1, a.addr),
            route("r2", p2, a.addr)
        ),
    );
    std::fs::write(
        &sl.config,
        format!(
            "{head}{}{}",
            route("r1", p1, b.addr),
            route("r2", p2, a.addr)
        ),
    )
    .unwrap();

    // Room for reading the file, not for the four duplicates (2 workers
    // x 2 listeners) the new generation needs.
    let pid = sl.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let (soft, hard) = fd_limits(pid);
    // The soft limit only: raising a hard limit again needs
    // CAP_SYS_RESOURCE, which a container may not have.
    let tight = (open + 2).to_string();
    set_fd_limits(pid, &tight, &hard);
    let now = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert_eq!(now, open, "sluice opened a descriptor meanwhile");
    sl.signal("HUP");
    let line = sl.wait_log("reload failed", Duration::from_secs(10));
    set_fd_limits(pid, &soft, &hard);
    assert!(
        line.contains("cannot give 2 worker(s) their own descriptors of 2 listening socket(s)")
            && line.contains("out of file descriptors")
            && line.contains("still serving the previous configuration"),
        "{line}"
    );
    assert_eq!(sl.count_log("reload ok"), 0);

    // Both workers still serve generation 1: every client of r1 meets a.
    for i in 0..16 {
        let mut c = connect(addr(p1));
        assert_eq!(read_line(&mut c), "a", "client {i} after the failed reload");
    }
    let m = scrape(addr(aport));
    assert_eq!(m.get("sluice_reloads_total", &[("result", "failed")]), 1.0);
    assert_eq!(m.get("sluice_config_generation", &[]), 1.0);

    // With descriptors to spare, the same file loads.
    sl.signal("HUP");
    sl.wait_log("reload ok: generation 2", Duration::from_secs(10));
    for i in 0..16 {
        let mut c = connect(addr(p1));
        assert_eq!(read_line(&mut c), "b", "client {i} after the good reload");
    }
    let mut c = connect(addr(p2));
    assert_eq!(read_line(&mut c), "a");
}

/// Descriptors held by the open-file cache come back before a reload
/// gives up for want of them: every worker empties its cache (a reload
/// empties it anyway) and the reload tries once more.
#[test]
fn a_reload_short_of_descriptors_first_empties_the_file_caches() {
    use common::admin::request;
    let dir = temp_dir("reload-fds-cache");
    let www = dir.join("www");
    std::fs::create_dir(&www).unwrap();
    for i in 0..24 {
        std::fs::write(www.join(format!("f{i:02}.txt")), format!("file {i:02}\n")).unwrap();
    }
    let (a, b) = (Backend::named("a"), Backend::named("b"));
    let (files, p) = (free_port(), free_port());
    let cfg = |backend: SocketAddr| {
        format!(
            "[global]\nopen_file_cache = 100\n\n[[route]]\nname = \"files\"\n\
             listen = \"127.0.0.1:{files}\"\nroot = \"www\"\n\n{}",
            route("r", p, backend)
        )
    };
    let mut sl = Sluice::start_in(dir, &cfg(a.addr), &[]);
    let pid = sl.pid();
    let now = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    // Once sluice has closed what the last client left behind.
    let count = || loop {
        let n = now();
        thread::sleep(Duration::from_millis(50));
        if now() == n {
            return n;
        }
    };
    let fetch = |i: usize| {
        let r = request(
            addr(files),
            format!("GET /f{i:02}.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, format!("file {i:02}\n").as_str())
        );
    };
    let before = count();
    for i in 0..24 {
        fetch(i);
    }
    let cached = count() - before;
    assert!(
        cached >= 20,
        "the cache holds {cached} more descriptors after 24 files"
    );

    std::fs::write(&sl.config, cfg(b.addr)).unwrap();
    let open = count();
    let (soft, hard) = fd_limits(pid);
    set_fd_limits(pid, &(open + 1).to_string(), &hard);
    assert_eq!(now(), open, "sluice opened a descriptor meanwhile");
    sl.signal("HUP");
    sl.wait_log("reload ok: generation 2", Duration::from_secs(10));
    set_fd_limits(pid, &soft, &hard);
    assert_eq!(
        sl.count_log("files the workers had cached, trying again"),
        1
    );
    assert_eq!(sl.count_log("reload failed"), 0);
    let mut c = connect(addr(p));
    assert_eq!(read_line(&mut c), "b");
    for i in [0, 23] {
        fetch(i);
    }
}

/// A reload reads its file (and resolves its host names) off the main
/// thread: the admin endpoint answers while a reload is still reading
/// (a debug-build failpoint makes reading take 2 s), and a SIGHUP that
/// comes meanwhile makes one more reload follow, for a file changed again.
#[test]
fn the_admin_endpoint_answers_while_a_reload_reads_its_file() {
    let (a, b, c) = (
        Backend::named("a"),
        Backend::named("b"),
        Backend::named("c"),
    );
    let (port, aport) = (free_port(), free_port());
    let admin = format!("[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n");
    let dir = temp_dir("reload-slow");
    let mut sl = Sluice::start_in(
        dir,
        &format!("{admin}{}", route("r", port, a.addr)),
        &[("SLUICE_FAILPOINT", "slow_reload")],
    );
    std::fs::write(&sl.config, format!("{admin}{}", route("r", port, b.addr))).unwrap();
    sl.signal("HUP");
    sl.wait_log("failpoint slow_reload: file read", Duration::from_secs(10));
    let h = common::admin::get(addr(aport), "/healthz");
    assert_eq!(h.status, 200);
    assert_eq!(
        sl.count_log("reload ok"),
        0,
        "/healthz was answered only after the reload"
    );
    // Clients are served meanwhile, on the running configuration.
    let mut cl = connect(addr(port));
    assert_eq!(read_line(&mut cl), "a");

    // Changed again during the reload: a second SIGHUP queues one more,
    // which reads the file again (the first read it before the change).
    // Written whole by a rename, so no read sees it half written.
    let next = sl.dir.join("next.toml");
    std::fs::write(&next, format!("{admin}{}", route("r", port, c.addr))).unwrap();
    std::fs::rename(&next, &sl.config).unwrap();
    sl.signal("HUP");
    sl.wait_log("reloading again after it", Duration::from_secs(10));
    sl.wait_log("reload ok: generation 2", Duration::from_secs(20));
    let mut cl = connect(addr(port));
    assert_eq!(
        read_line(&mut cl),
        "b",
        "generation 2 is the file as first read"
    );
    sl.wait_log("reload ok: generation 3", Duration::from_secs(20));
    assert_eq!(sl.count_log("reload ok"), 2);
    let mut cl = connect(addr(port));
    assert_eq!(read_line(&mut cl), "c");
    let m = scrape(addr(aport));
    assert_eq!(m.get("sluice_reloads_total", &[("result", "ok")]), 2.0);
    assert_eq!(m.get("sluice_config_generation", &[]), 3.0);
}

/// A stop signal during a reload that is still reading its file drops the
/// reload: with a connection keeping the drain going past the read, the
/// new file (one more route) is not applied and its port never listens.
#[test]
fn a_stop_during_a_reload_drops_the_reload() {
    let (a, b) = (Backend::named("a"), Backend::named("b"));
    let (port, port2) = (free_port(), free_port());
    let head = "[global]\nshutdown_timeout = \"6s\"\n\n";
    let mut sl = Sluice::start_in(
        temp_dir("reload-stop"),
        &format!("{head}{}", route("r", port, a.addr)),
        &[("SLUICE_FAILPOINT", "slow_reload")],
    );
    let mut held = connect(addr(port));
    assert_eq!(read_line(&mut held), "a");
    std::fs::write(
        &sl.config,
        format!(
            "{head}{}{}",
            route("r", port, a.addr),
            route("r2", port2, b.addr)
        ),
    )
    .unwrap();
    sl.signal("HUP");
    sl.wait_log("reloading", Duration::from_secs(10));
    sl.signal("TERM");
    // Past the 2 s the read takes, the drain still going.
    thread::sleep(Duration::from_secs(3));
    assert_eq!(
        sl.count_log("reload ok"),
        0,
        "a reload was applied during the drain"
    );
    assert_eq!(sl.count_log("reload failed"), 0);
    assert!(
        TcpStream::connect(addr(port2)).is_err(),
        "the new route listened during the drain"
    );
    drop(held);
    let st = sl
        .wait_exit(Duration::from_secs(10))
        .expect("sluice stops once the held connection is gone");
    assert!(st.success(), "{st}");
}

/// A worker whose epoll refuses to watch a listening socket (ENOMEM, or
/// fs.epoll.max_user_watches reached) tries again until it can. With two
/// workers that socket is this worker's own in the address's SO_REUSEPORT
/// group, where the kernel queues a share of the clients: they used to
/// wait there unanswered for good. The failure is real: strace, attached
/// to worker 0's thread alone, makes its second epoll_ctl after the
/// reload's (the one that watches the listener again, after the one that
/// stopped watching the old generation's) fail with ENOMEM.
#[test]
fn a_listener_a_worker_cannot_watch_is_tried_again() {
    let b = Backend::named("b");
    let port = free_port();
    let mut sl = Sluice::start(
        "reload-unwatched",
        &format!("[global]\nworkers = 2\n\n{}", route("r", port, b.addr)),
    );
    let strace = ThreadTrace::attach(&sl, 0, "epoll_ctl", "epoll_ctl:error=ENOMEM:when=2");

    sl.signal("HUP");
    sl.wait_log("reload ok: generation 2", Duration::from_secs(10));
    sl.wait_log(
        &format!("worker 0: watching 127.0.0.1:{port} now"),
        Duration::from_secs(5),
    );
    let trace = strace.finish();
    assert!(
        trace.contains("EPOLL_CTL_ADD")
            && trace.contains("ENOMEM (Cannot allocate memory) (INJECTED)"),
        "the listener's epoll_ctl was not the one that failed:\n{trace}"
    );
    let refused = sl.logs().join("\n");
    assert!(
        refused.contains(&format!("worker 0: cannot watch 127.0.0.1:{port}: ")),
        "{refused}"
    );

    // Every client is served, by both workers.
    let n = 40;
    for i in 0..n {
        let mut c = connect(addr(port));
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(read_line(&mut c), "b", "client {i} was not served");
    }
    let lines = sl.wait_access(n, Duration::from_secs(10));
    for w in ["0", "1"] {
        assert!(
            lines.iter().any(|l| l["worker"] == w),
            "worker {w} served none of {n}: {lines:?}"
        );
    }
}

/// Start sluice on a configuration file that is a FIFO no one writes yet
/// (in life: host names that take seconds to resolve, a hung network
/// filesystem), and return once it sits in the FIFO's open (its handlers,
/// if it installs them first, are in by then), with the FIFO's path.
fn start_reading_a_fifo(name: &str) -> (Sluice, std::path::PathBuf) {
    let dir = temp_dir(name);
    let config = dir.join("sluice.toml");
    let st = std::process::Command::new("mkfifo")
        .arg(&config)
        .status()
        .unwrap();
    assert!(st.success());
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info");
    let sl = Sluice::launch(dir, config.clone(), cmd);
    let pid = sl.child_pid();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        if wchan.contains("wait_for_partner") || wchan.contains("fifo") {
            return (sl, config);
        }
        assert!(
            Instant::now() < end,
            "sluice never blocked in the FIFO: {wchan:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Send `sig` to a sluice that has not said it started yet.
fn signal_child(sl: &Sluice, sig: &str) {
    let st = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(sl.child_pid().to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

/// A SIGTERM (a service manager's stop) or SIGINT (Ctrl-C) while the
/// configuration is still being read (a FIFO no one writes; in life, host
/// names that take long to resolve, or a hung network filesystem) ends
/// sluice at once: only SIGHUP waits for the server (found by review: the
/// first version of the early handlers made the stop wait for the read,
/// then start serving, then drain).
#[test]
fn a_stop_signal_while_starting_ends_sluice_at_once() {
    for sig in ["TERM", "INT"] {
        let (mut sl, _) = start_reading_a_fifo(&format!("stop-at-start-{sig}"));
        signal_child(&sl, sig);
        let st = sl.wait_exit(Duration::from_secs(3));
        assert!(
            st.is_some_and(|st| !st.success()),
            "SIG{sig} while the configuration was read: {st:?}"
        );
    }
}

/// A SIGHUP while sluice still reads its configuration (here a FIFO the
/// test has not written yet; in life, host names that take seconds to
/// resolve) waits for the server and then reloads it. Before, the
/// handlers went in after the read, and SIGHUP's default action ended
/// the process.
#[test]
fn a_sighup_while_starting_is_a_reload_not_the_end() {
    let (mut sl, config) = start_reading_a_fifo("sighup-at-start");
    let b = Backend::named("b");
    let port = free_port();
    let toml = format!(
        "[global]\nworkers = 1\n\n[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\n\
         backends = [\"{}\"]\n",
        b.addr
    );
    signal_child(&sl, "HUP");
    assert_eq!(
        sl.wait_exit(Duration::from_millis(300)),
        None,
        "a SIGHUP before the configuration was read ended sluice"
    );
    std::fs::write(&config, &toml).unwrap();
    sl.wait_started();
    // The SIGHUP that waited: a reload, which reads the FIFO again.
    let (cfg2, toml2) = (config.clone(), toml.clone());
    thread::spawn(move || std::fs::write(cfg2, toml2));
    sl.wait_log("reload ok: generation 2", Duration::from_secs(10));
    let mut c = connect(SocketAddr::from(([127, 0, 0, 1], port)));
    assert_eq!(read_line(&mut c), "b");
}

/// The names of sluice's worker threads, sorted.
fn worker_threads(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("sluice-w"))
        .collect();
    names.sort();
    names
}

/// Listening IPv4 sockets on `port` (state 0A in /proc/net/tcp).
fn listening(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[3] == "0A"
                && f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|h| u16::from_str_radix(h, 16).ok())
                    == Some(port)
        })
        .count()
}

/// `workers` and an admin listener, then `routes`.
fn workers_config(workers: usize, aport: u16, routes: &str) -> String {
    format!(
        "[global]\nworkers = {workers}\nlog_level = \"info\"\n\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n{routes}"
    )
}

/// `n` open connections to `port`, each greeted.
fn greeted(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut c = connect(addr(port));
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(read_line(&mut c), "b");
            c
        })
        .collect()
}

/// Write `config` and reload; returns once the log says `wait_for`.
fn reload(sl: &mut Sluice, config: &str, wait_for: &str) {
    std::fs::write(&sl.config, config).unwrap();
    sl.signal("HUP");
    sl.wait_log(wait_for, Duration::from_secs(10));
}

/// `n` clients of `port` each served the backend's greeting; the set of
/// workers (access lines' `worker`) that served them.
fn served_by(sl: &Sluice, port: u16, n: usize) -> std::collections::BTreeSet<String> {
    let before = sl.access().len();
    for _ in 0..n {
        let mut c = connect(addr(port));
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(read_line(&mut c), "b", "port {port}");
    }
    let a = sl.wait_access(before + n, Duration::from_secs(10));
    a[before..].iter().map(|l| l["worker"].clone()).collect()
}

/// A reload that raises `workers` starts the new workers at once, and the
/// kernel spreads new clients over all of them: an address that already
/// had a socket per worker (SO_REUSEPORT) gets one more per new worker,
/// and an address the reload adds gets one per worker. 100 clients on
/// each spread over the 4 workers (by connection hash: that one of the 4
/// gets none of 100 is about 1 in 10^12).
#[test]
fn a_reload_that_raises_workers_starts_them_and_spreads_clients() {
    let b = Backend::named("b");
    let (p1, p2, aport) = (free_port(), free_port(), free_port());
    let mut sl = Sluice::start(
        "workers-up",
        &workers_config(2, aport, &route("one", p1, b.addr)),
    );
    assert_eq!(worker_threads(sl.pid()), ["sluice-w0", "sluice-w1"]);
    // A reload that fails (its new route's port is taken) leaves the
    // workers and the sockets as they were: no socket joins the group
    // that no worker would watch.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    let routes = format!("{}{}", route("one", p1, b.addr), route("two", busy, b.addr));
    reload(&mut sl, &workers_config(4, aport, &routes), "reload failed");
    assert_eq!(worker_threads(sl.pid()), ["sluice-w0", "sluice-w1"]);
    assert_eq!(listening(p1), 2);
    assert_eq!(served_by(&sl, p1, 40).len(), 2);
    drop(taken);

    let routes = format!("{}{}", route("one", p1, b.addr), route("two", p2, b.addr));
    reload(&mut sl, &workers_config(4, aport, &routes), "reload ok");
    assert_eq!(
        sl.count_log("reload: workers 2 -> 4: started worker(s) 2, 3"),
        1
    );
    assert_eq!(
        worker_threads(sl.pid()),
        ["sluice-w0", "sluice-w1", "sluice-w2", "sluice-w3"]
    );
    // One listening socket per worker on both addresses.
    assert_eq!((listening(p1), listening(p2)), (4, 4));
    let all: Vec<&str> = vec!["0", "1", "2", "3"];
    for port in [p1, p2] {
        let by = served_by(&sl, port, 100);
        assert_eq!(
            by.iter().map(String::as_str).collect::<Vec<_>>(),
            all,
            "port {port}"
        );
    }
    let m = scrape(addr(aport));
    assert_eq!(
        (
            m.get("sluice_workers", &[]),
            m.get("sluice_workers_retiring", &[])
        ),
        (4.0, 0.0)
    );
}

/// A reload that lowers `workers` retires the extra workers as a stop
/// would, without stopping anything else: they accept no more and finish
/// their connections, which go on working (60 open ones, spread over 4
/// workers, each echo a line after the reload); the worker that stays
/// serves every socket of the address, its own and the retired ones'
/// (the kernel goes on giving each its share of new clients: with one of
/// them unwatched, about 3 in 4 of 60 new clients would hang). Once their
/// clients are gone the retired workers end. A later reload that raises
/// `workers` again starts workers with new ids.
#[test]
fn a_reload_that_lowers_workers_retires_them_gracefully() {
    let b = Backend::named("b");
    let (port, aport) = (free_port(), free_port());
    let mut sl = Sluice::start(
        "workers-down",
        &workers_config(4, aport, &route("one", port, b.addr)),
    );
    let mut open = greeted(port, 60);
    reload(
        &mut sl,
        &workers_config(1, aport, &route("one", port, b.addr)),
        "reload ok",
    );
    assert_eq!(
        sl.count_log("reload: workers 4 -> 1: worker(s) 1, 2, 3 accept no more"),
        1
    );
    let m = scrape(addr(aport));
    assert_eq!(
        (
            m.get("sluice_workers", &[]),
            m.get("sluice_workers_retiring", &[])
        ),
        (1.0, 3.0)
    );
    assert_eq!(
        served_by(&sl, port, 60).into_iter().collect::<Vec<_>>(),
        ["0"]
    );
    for (i, c) in open.iter_mut().enumerate() {
        let line = format!("still here {i}");
        c.write_all(format!("{line}\n").as_bytes()).unwrap();
        assert_eq!(read_line(c), line);
    }
    assert_eq!(
        worker_threads(sl.pid()).len(),
        4,
        "the retired still serve theirs"
    );
    drop(open);
    let until = Instant::now() + Duration::from_secs(10);
    while worker_threads(sl.pid()).len() > 1 {
        assert!(Instant::now() < until, "{:?}", worker_threads(sl.pid()));
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(worker_threads(sl.pid()), ["sluice-w0"]);
    sl.wait_log("worker 3 retired", Duration::from_secs(5));
    let m = scrape(addr(aport));
    assert_eq!(m.get("sluice_workers_retiring", &[]), 0.0);

    // Up again: the new worker gets a new id, and takes half the sockets.
    reload(
        &mut sl,
        &workers_config(2, aport, &route("one", port, b.addr)),
        "started worker(s) 4",
    );
    assert_eq!(worker_threads(sl.pid()), ["sluice-w0", "sluice-w4"]);
    assert_eq!(
        served_by(&sl, port, 100).into_iter().collect::<Vec<_>>(),
        ["0", "4"]
    );
}

/// "refused", "served", "closed", "reset" or "hangs" (the handshake done,
/// nobody accepts): what a new client of `port` meets.
fn probe(port: u16) -> &'static str {
    match TcpStream::connect_timeout(&addr(port), Duration::from_secs(2)) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused",
        Err(e) => panic!("connect: {e}"),
        Ok(mut c) => {
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut b = [0u8; 2];
            match c.read(&mut b) {
                Ok(n) if n > 0 => "served",
                Ok(_) => "closed",
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    "hangs"
                }
                Err(_) => "reset",
            }
        }
    }
}

/// Workers a reload retired hold no listening socket: a stop while they
/// still finish their connections refuses new clients (none wait in a
/// queue nobody accepts from), a route a reload drops while they retire
/// stops listening, and one brought back listens again. (A retired
/// worker kept the generation it last loaded, and with it the sockets:
/// each case left 4 sockets listening that nobody accepted on, and
/// bringing the route back failed with EADDRINUSE.)
#[test]
fn retired_workers_hold_no_listening_socket() {
    let b = Backend::named("b");
    let (p1, p2, aport) = (free_port(), free_port(), free_port());
    let both = format!("{}{}", route("one", p1, b.addr), route("two", p2, b.addr));
    let mut sl = Sluice::start("workers-retired-sockets", &workers_config(4, aport, &both));
    let _open = greeted(p1, 40);
    // Fewer workers and no route "two", in one reload.
    reload(
        &mut sl,
        &workers_config(1, aport, &route("one", p1, b.addr)),
        "reload ok: generation 2",
    );
    assert_eq!(
        sl.count_log("worker(s) 1, 2, 3 accept no more"),
        1,
        "the 40 connections keep the retired workers busy"
    );
    thread::sleep(Duration::from_millis(300));
    assert_eq!((listening(p2), probe(p2)), (0, "refused"));
    // Back again while they still retire.
    reload(
        &mut sl,
        &workers_config(1, aport, &both),
        "reload ok: generation 3",
    );
    assert_eq!((listening(p2), probe(p2)), (1, "served"));
    // A stop now leaves nothing listening.
    sl.signal("TERM");
    sl.wait_log("stopping", Duration::from_secs(10));
    thread::sleep(Duration::from_millis(300));
    assert_eq!((listening(p1), probe(p1), listening(p2)), (0, "refused", 0));
}

/// A reload that would raise `workers` but fails (its last route's port is
/// taken) resets no client of the running address. The sockets it binds
/// for the new workers listen only once the generation stands: one that
/// listened at once got its share of new clients, and closing it when the
/// reload failed reset them (about 150 of a steady stream over 20 such
/// reloads, with 40 routes before the failing one to widen the window).
#[test]
fn a_failed_reload_that_raises_workers_resets_no_client() {
    let b = Backend::named("b");
    let port = free_port();
    let sl = Sluice::start(
        "workers-failed-grow",
        &format!(
            "[global]\nworkers = 2\nlog_level = \"info\"\n\n{}",
            route("one", port, b.addr)
        ),
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    let mut bad = route("one", port, b.addr);
    for i in 0..40 {
        bad.push_str(&route(&format!("x{i}"), free_port(), b.addr));
    }
    bad.push_str(&route("last", busy, b.addr));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, errs) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (stop, ok, errs) = (stop.clone(), ok.clone(), errs.clone());
            thread::spawn(move || {
                let mut first = None;
                while !stop.load(Ordering::Relaxed) {
                    let r = (|| -> std::io::Result<()> {
                        let mut c =
                            TcpStream::connect_timeout(&addr(port), Duration::from_secs(5))?;
                        c.set_read_timeout(Some(Duration::from_secs(5)))?;
                        let mut buf = [0u8; 2];
                        c.read_exact(&mut buf)?;
                        Ok(())
                    })();
                    match r {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            first.get_or_insert(e.to_string());
                            errs.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                first
            })
        })
        .collect();
    std::fs::write(
        &sl.config,
        format!("[global]\nworkers = 8\nlog_level = \"info\"\n\n{bad}"),
    )
    .unwrap();
    for n in 1..=20 {
        sl.signal("HUP");
        let until = Instant::now() + Duration::from_secs(10);
        while sl.count_log("reload failed") < n {
            assert!(Instant::now() < until, "reload {n} did not fail in time");
            thread::sleep(Duration::from_millis(5));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let firsts: Vec<_> = clients.into_iter().map(|t| t.join().unwrap()).collect();
    drop(taken);
    assert_eq!(listening(port), 2);
    assert!(ok.load(Ordering::Relaxed) > 0);
    assert_eq!(errs.load(Ordering::Relaxed), 0, "{firsts:?}");
}
