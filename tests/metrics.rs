//! `/metrics` counters against the traffic the test caused, through the
//! real binary: refusals (limits, deny), splice fallbacks by reason and
//! pipes in use, mmap lease breaks and fallbacks, truncated files, PROXY
//! header errors, and HTTP responses by status class. Every value is
//! checked exactly, with the strict parser in `common::admin`.

mod common;

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::admin::{Metrics, scrape, scrape_until, scrape_within};
use common::*;

const MIB: u64 = 1 << 20;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One `[[route]]` table.
fn route(name: &str, port: u16, body: &str) -> String {
    format!("\n[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\n{body}\n")
}

/// A config with one worker, an admin listener on `aport`, and `routes`.
fn config(global: &str, aport: u16, routes: &str) -> String {
    format!(
        "[global]\nworkers = 1\nlog_level = \"info\"\n{global}\n\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n{routes}"
    )
}

/// A fresh dir with a `www` folder (files made by `files`), then sluice.
fn start(name: &str, toml: &str, files: impl FnOnce(&Path)) -> Sluice {
    let dir = temp_dir(name);
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    files(&www);
    Sluice::start_in(dir, toml, &[])
}

fn route_metric(m: &Metrics, name: &str, route: &str) -> f64 {
    m.get(name, &[("route", route)])
}

fn fallbacks(m: &Metrics, route: &str, reason: &str) -> f64 {
    m.get(
        "sluice_route_splice_fallbacks_total",
        &[("route", route), ("reason", reason)],
    )
}

/// Access lines of one route.
fn access_for(sl: &Sluice, route: &str) -> Vec<HashMap<String, String>> {
    sl.access()
        .into_iter()
        .filter(|a| a["route"] == route)
        .collect()
}

/// Wait until `route` has `n` access lines.
fn wait_route(sl: &Sluice, route: &str, n: usize) -> Vec<HashMap<String, String>> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let a = access_for(sl, route);
        if a.len() >= n {
            return a;
        }
        assert!(
            Instant::now() < end,
            "route {route}: fewer than {n} access lines:\n{}",
            sl.logs().join("\n")
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Connect to `a` and see sluice close the connection without a byte (a
/// client refused at once may see its connect itself fail with a reset).
fn assert_refused(a: SocketAddr, what: &str) {
    match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
        Ok(mut s) => assert_closed(&mut s, what),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{what}: {e}"),
    }
}

/// Refusals: over a route's max_connections, over max_connections_per_ip,
/// and by `deny`, each counted once per refused client, admitted ones not.
#[test]
fn refused_connections_are_counted_by_cause() {
    let echo = Backend::named("echo");
    let (lp, ip_port, dp, aport) = (free_port(), free_port(), free_port(), free_port());
    let b = echo.addr;
    let routes = route(
        "lim",
        lp,
        &format!("backends = \"{b}\"\nmax_connections = 1"),
    ) + &route(
        "perip",
        ip_port,
        &format!("backends = \"{b}\"\nmax_connections_per_ip = 2"),
    ) + &route(
        "deny",
        dp,
        &format!("backends = \"{b}\"\ndeny = [\"127.0.0.0/8\"]"),
    );
    let _sl = start("metrics-refused", &config("", aport, &routes), |_| {});
    // lim: one admitted and held; three refused.
    let mut held = vec![connect(addr(lp))];
    assert_eq!(read_line(&mut held[0]), "echo");
    for i in 0..3 {
        assert_refused(addr(lp), &format!("lim extra {i}"));
    }
    // perip: two admitted and held; two refused.
    for _ in 0..2 {
        let mut c = connect(addr(ip_port));
        assert_eq!(read_line(&mut c), "echo");
        held.push(c);
    }
    for i in 0..2 {
        assert_refused(addr(ip_port), &format!("perip extra {i}"));
    }
    // deny: every client refused.
    for i in 0..4 {
        assert_refused(addr(dp), &format!("denied {i}"));
    }
    let m = scrape_until(addr(aport), "4 denied", |m| {
        route_metric(m, "sluice_route_connections_denied_total", "deny") >= 4.0
    });
    let limited = |r| route_metric(&m, "sluice_route_connections_limited_total", r);
    let denied = |r| route_metric(&m, "sluice_route_connections_denied_total", r);
    assert_eq!(
        [limited("lim"), limited("perip"), limited("deny")],
        [3.0, 2.0, 0.0]
    );
    assert_eq!(
        [denied("lim"), denied("perip"), denied("deny")],
        [0.0, 0.0, 4.0]
    );
    // Accepted connections count, refused or not; only admitted ones are
    // active.
    let conns = |r| route_metric(&m, "sluice_route_connections_total", r);
    assert_eq!(
        [conns("lim"), conns("perip"), conns("deny")],
        [4.0, 4.0, 4.0]
    );
    let active = |r| route_metric(&m, "sluice_route_connections_active", r);
    assert_eq!([active("lim"), active("perip")], [1.0, 2.0]);
    drop(held);
}

/// Pipes a burst of splice downloads leaves idle in the pool close once
/// no transfer needed them through a whole decay period (10 s; within
/// two of them): the gauge returns to 0 and the descriptors are given
/// back, where before they stayed pooled for good.
#[test]
fn idle_pipes_close_after_a_burst() {
    const N: usize = 4;
    let (p, aport) = (free_port(), free_port());
    let routes = route("spl", p, "root = \"www\"\nstrategy = \"splice\"");
    let mut big = None;
    let sl = start("metrics-pipe-decay", &config("", aport, &routes), |www| {
        big = Some(gen_file(&www.join("big.bin"), 3, 8 * MIB));
    });
    // N downloads stalled at once: each holds a pipe.
    let mut readers = Vec::new();
    for _ in 0..N {
        let mut c = small_buffer_client(addr(p), 64 * 1024);
        c.write_all(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut r = BufReader::new(c);
        let h = read_head(&mut r).unwrap();
        assert_eq!(h.content_length(), 8 * MIB);
        readers.push(r);
    }
    scrape_until(addr(aport), "a pipe per stalled download", |m| {
        m.get("sluice_pipes_in_use", &[]) == N as f64
    });
    let pipes_lent = pipe_fds(sl.pid());
    // Each read to its end: the pipe comes back empty and is pooled.
    for mut r in readers {
        let body = read_body(&mut r, 8 * MIB);
        assert_eq!(Some(digest_of(&body)), big);
    }
    let a = wait_route(&sl, "spl", N);
    assert!(a.iter().all(|l| l["end"] == "ok"), "{a:?}");
    let m = scrape(addr(aport));
    assert_eq!(m.get("sluice_pipes_in_use", &[]), N as f64, "pooled");
    let m = scrape_within(
        addr(aport),
        "the idle pipes closed",
        Duration::from_secs(30),
        |m| m.get("sluice_pipes_in_use", &[]) == 0.0,
    );
    assert_eq!(m.get("sluice_connections_active", &[]), 0.0);
    let pipes = pipe_fds(sl.pid());
    assert_eq!(
        pipes + 2 * N,
        pipes_lent,
        "pipe descriptors after the pipes closed, against while {N} were lent"
    );
}

/// A connection that goes idle gives its pipes back. Two echo
/// connections exchange a line each and stay open, idle, with a budget
/// of two pipes: a third connection's 1 MiB echo still splices both ways
/// with the pooled ones. (An idle connection used to keep an empty pipe
/// in each direction until its next byte: the third copied, no_pipe, with
/// pipes_in_use at 2 and none of them pooled.)
#[test]
fn idle_connections_hold_no_pipes() {
    let b = Backend::spawn(|mut s| {
        echo(&mut s);
        String::new()
    });
    let (p, aport) = (free_port(), free_port());
    let routes = route(
        "r",
        p,
        &format!(
            "backends = [\"{}\"]\nstrategy = \"splice\"\npipe_size = \"64KiB\"",
            b.addr
        ),
    );
    let sl = start(
        "metrics-idle-pipes",
        &config("max_pipes = 2", aport, &routes),
        |_| {},
    );
    let idle: Vec<TcpStream> = (0..2)
        .map(|i| {
            let mut c = connect(addr(p));
            let line = format!("hello {i}");
            c.write_all(format!("{line}\n").as_bytes()).unwrap();
            assert_eq!(read_line(&mut c), line);
            c
        })
        .collect();
    let m = scrape(addr(aport));
    assert_eq!(m.get("sluice_connections_active", &[]), 2.0);
    assert_echo(connect(addr(p)), 7, 1 << 20);
    let a = sl.wait_access(1, Duration::from_secs(10));
    assert_eq!(
        (
            a[0]["strategy"].as_str(),
            a[0]["fallback"].as_str(),
            a[0]["spliced"].as_str()
        ),
        ("splice", "-", "2097152"),
        "{:?}",
        a[0]
    );
    let m = scrape(addr(aport));
    assert_eq!(fallbacks(&m, "r", "no_pipe"), 0.0);
    drop(idle);
}

/// A splice file route with a budget of one pipe: a stalled download
/// holds it (pipes_in_use 1), so a second download goes with sendfile and
/// counts one no_pipe fallback.
#[test]
fn pipes_in_use_and_no_pipe_fallbacks() {
    let (p, aport) = (free_port(), free_port());
    let routes = route("spl", p, "root = \"www\"\nstrategy = \"splice\"");
    let mut small = None;
    let sl = start(
        "metrics-pipes",
        &config("max_pipes = 1", aport, &routes),
        |www| {
            gen_file(&www.join("big.bin"), 1, 64 * MIB);
            small = Some(gen_file(&www.join("small.bin"), 2, 300_000));
        },
    );
    let m = scrape(addr(aport));
    assert_eq!(m.get("sluice_pipes_in_use", &[]), 0.0, "no pipe before use");

    // A client that reads the head and a little, then stops reading: the
    // transfer blocks on a full socket while holding the pipe.
    let mut stalled = small_buffer_client(addr(p), 64 * 1024);
    stalled
        .write_all(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(stalled);
    let h = read_head(&mut r).unwrap();
    assert_eq!(h.content_length(), 64 * MIB);
    read_body(&mut r, 1000);
    let m = scrape(addr(aport));
    assert_eq!(m.get("sluice_pipes_in_use", &[]), 1.0);

    let (h, body) = get(addr(p), "/small.bin");
    assert_eq!(h.status, 200);
    assert_eq!(Some(digest_of(&body)), small);
    let a = wait_route(&sl, "spl", 1);
    assert_eq!(
        (a[0]["strategy"].as_str(), a[0]["fallback"].as_str()),
        ("sendfile", "no_pipe"),
        "{:?}",
        a[0]
    );
    let m = scrape(addr(aport));
    assert_eq!(fallbacks(&m, "spl", "no_pipe"), 1.0);
    assert_eq!(fallbacks(&m, "spl", "refused"), 0.0);
    assert_eq!(fallbacks(&m, "spl", "file_blocked"), 0.0);
    assert_eq!(
        m.get("sluice_pipes_in_use", &[]),
        1.0,
        "still the stalled one's"
    );
    assert_eq!(
        m.get(
            "sluice_route_strategy_bytes_total",
            &[("route", "spl"), ("strategy", "sendfile")]
        ),
        300_000.0
    );

    // A reload that raises max_pipes lets the next download splice,
    // while the stalled one still holds its pipe.
    std::fs::write(&sl.config, config("max_pipes = 4", aport, &routes)).unwrap();
    sl.signal("HUP");
    scrape_until(addr(aport), "the reload", |m| {
        m.get("sluice_reloads_total", &[("result", "ok")]) == 1.0
    });
    let (h, body) = get(addr(p), "/small.bin");
    assert_eq!(h.status, 200);
    assert_eq!(Some(digest_of(&body)), small);
    let a = wait_route(&sl, "spl", 2);
    assert_eq!(
        (a[1]["strategy"].as_str(), a[1]["fallback"].as_str()),
        ("splice", "-"),
        "{:?}",
        a[1]
    );
    let m = scrape(addr(aport));
    assert_eq!(fallbacks(&m, "spl", "no_pipe"), 1.0);
    assert_eq!(m.get("sluice_pipes_in_use", &[]), 2.0, "stalled + pooled");
    // Lowered to 1 again: the pooled pipe is closed at once; the stalled
    // transfer keeps its own.
    std::fs::write(&sl.config, config("max_pipes = 1", aport, &routes)).unwrap();
    sl.signal("HUP");
    scrape_until(addr(aport), "the pooled pipe closed", |m| {
        m.get("sluice_reloads_total", &[("result", "ok")]) == 2.0
            && m.get("sluice_pipes_in_use", &[]) == 1.0
    });
    drop(r);
}

/// splice refused by the kernel (EINVAL, injected by strace) on a proxy
/// route: one connection, one `refused` fallback, no other reason.
#[test]
fn splice_refused_fallbacks_are_counted() {
    let b = Backend::spawn(|s| {
        let d = recv_data(&mut &s);
        d.len.to_string()
    });
    let (p, aport) = (free_port(), free_port());
    let toml = config(
        "",
        aport,
        &route(
            "px",
            p,
            &format!("backends = \"{}\"\nstrategy = \"splice\"", b.addr),
        ),
    );
    let dir = temp_dir("metrics-refused-splice");
    let sl = Sluice::start_wrapped_in(dir, &toml, &strace_fault("splice", "EINVAL"));
    let mut c = connect(addr(p));
    send_data(&mut c, 4, 2 * MIB);
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_close(&mut c), b"");
    assert_eq!(
        b.wait_results(1, Duration::from_secs(20))[0],
        (2 * MIB).to_string()
    );
    let a = sl.wait_access(1, Duration::from_secs(10));
    assert_eq!(a[0]["fallback"], "splice_refused", "{:?}", a[0]);
    let m = scrape(addr(aport));
    assert_eq!(fallbacks(&m, "px", "refused"), 1.0);
    assert_eq!(fallbacks(&m, "px", "no_pipe"), 0.0);
    assert_eq!(fallbacks(&m, "px", "file_blocked"), 0.0);
}

/// Download a 64 MiB file slowly and truncate it mid-transfer; returns
/// the transfer's access line.
fn truncated_download(sl: &Sluice, p: u16, route: &str, file: &Path) -> HashMap<String, String> {
    let total = 64 * MIB;
    gen_file(file, 3, total);
    let before = access_for(sl, route).len();
    let mut c = small_buffer_client(addr(p), 64 * 1024);
    let name = file.file_name().unwrap().to_str().unwrap();
    c.write_all(format!("GET /{name} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .unwrap();
    let mut r = BufReader::new(c);
    let h = read_head(&mut r).unwrap();
    assert_eq!(h.content_length(), total);
    let first = read_body(&mut r, 100_000);
    // For mmap the open for writing waits until sluice gives the lease up.
    let writer = {
        let file = file.to_path_buf();
        thread::spawn(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&file)
                .unwrap()
                .write_all(b"short now")
                .unwrap();
        })
    };
    let rest = read_to_close(&mut r);
    writer.join().unwrap();
    let got = (first.len() + rest.len()) as u64;
    assert!(
        got < total,
        "all {got} bytes arrived despite the truncation"
    );
    assert_eq!(
        digest_of(&[first, rest].concat()),
        send_data(&mut std::io::sink(), 3, got)
    );
    wait_route(sl, route, before + 1)[before].clone()
}

/// file_truncated counts files that shrank under a transfer (sendfile,
/// splice, copy); an mmap transfer ends on the lease break instead
/// (lease_breaks) and one that found the file open for writing counts a
/// lease fallback. Expected values follow the access lines, since a
/// lease is denied while any process (a child forked by another test,
/// for a moment) holds the file open for writing.
#[test]
fn truncations_lease_breaks_and_lease_fallbacks() {
    let (tp, mp, aport) = (free_port(), free_port(), free_port());
    let routes = route("t", tp, "root = \"www\"\nstrategy = \"sendfile\"")
        + &route("m", mp, "root = \"www\"\nstrategy = \"mmap\"");
    let sl = start("metrics-trunc", &config("", aport, &routes), |_| {});
    let www = sl.dir.join("www");

    let line = truncated_download(&sl, tp, "t", &www.join("t.bin"));
    assert_eq!(line["end"], "truncated", "{line:?}");
    let m = scrape(addr(aport));
    assert_eq!(
        route_metric(&m, "sluice_route_file_truncated_total", "t"),
        1.0
    );
    assert_eq!(
        route_metric(&m, "sluice_route_mmap_lease_breaks_total", "t"),
        0.0
    );

    // mmap: truncated under a lease, until one transfer really ran with
    // mmap (bounded).
    let mut breaks = 0;
    for _ in 0..3 {
        let line = truncated_download(&sl, mp, "m", &www.join("m.bin"));
        if line["strategy"] == "mmap" {
            assert_eq!(line["end"], "lease_break", "{line:?}");
            breaks += 1;
            break;
        }
    }
    assert_eq!(breaks, 1, "no transfer ran with mmap");
    // And one with the file held open for writing here: no lease.
    let path = www.join("w.bin");
    let want = gen_file(&path, 9, 200_000);
    let held = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    let (h, body) = get(addr(mp), "/w.bin");
    assert_eq!(h.status, 200);
    assert_eq!(digest_of(&body), want);
    drop(held);
    let lines = wait_route(&sl, "m", 2);
    let last = lines.last().unwrap();
    assert_eq!(
        (last["strategy"].as_str(), last["fallback"].as_str()),
        ("sendfile", "no_lease")
    );
    let no_lease = lines.iter().filter(|l| l["fallback"] == "no_lease").count();
    let shrunk = lines.iter().filter(|l| l["end"] == "truncated").count();
    let m = scrape(addr(aport));
    let on_m = |name| route_metric(&m, name, "m");
    assert_eq!(on_m("sluice_route_mmap_lease_breaks_total"), 1.0);
    assert_eq!(
        on_m("sluice_route_mmap_lease_fallbacks_total"),
        no_lease as f64
    );
    // Transfers that fell back to sendfile end as plain truncations.
    assert_eq!(on_m("sluice_route_file_truncated_total"), shrunk as f64);
    assert_eq!(
        route_metric(&m, "sluice_route_file_truncated_total", "t"),
        1.0
    );
}

/// PROXY header errors are counted per bad header (a client that connects
/// and closes without a byte is a health check, not an error); HTTP
/// responses by status class match the requests sent.
#[test]
fn proxy_header_errors_and_http_classes() {
    let (pp, hp, aport) = (free_port(), free_port(), free_port());
    let routes = route(
        "pp",
        pp,
        "root = \"www\"\naccept_proxy = true\nheader_timeout = \"20s\"",
    ) + &route("h", hp, "root = \"www\"\nindex = \"index.html\"");
    let sl = start("metrics-classes", &config("", aport, &routes), |www| {
        std::fs::write(www.join("a.txt"), b"0123456789").unwrap();
        std::fs::create_dir(www.join("dir")).unwrap();
        std::fs::write(www.join("dir/index.html"), b"<p>dir</p>").unwrap();
    });
    // Two bad headers, one silent client, one good header and request.
    for bad in [
        &b"GARBAGE / HTTP/1.1\r\n\r\n"[..],
        &b"PROXY TCP4 203.0.113.999 192.0.2.1 4242 443\r\n"[..],
    ] {
        let mut c = connect(addr(pp));
        c.write_all(bad).unwrap();
        assert_closed(&mut c, "bad PROXY header");
    }
    drop(connect(addr(pp)));
    let mut c = connect(addr(pp));
    c.write_all(
        b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 443\r\nGET /a.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut r = BufReader::new(c);
    let h = read_head(&mut r).unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(read_body(&mut r, 10), b"0123456789");

    // Route h: 2xx twice, 3xx twice, 4xx three times.
    let req = |extra: &str, path: &str| {
        http(
            addr(hp),
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{extra}\r\n"),
        )
        .0
    };
    assert_eq!(req("", "/a.txt").status, 200);
    let etag = req("", "/a.txt").get("etag").unwrap().to_string();
    assert_eq!(req("Range: bytes=2-4\r\n", "/a.txt").status, 206);
    assert_eq!(
        req(&format!("If-None-Match: {etag}\r\n"), "/a.txt").status,
        304
    );
    assert_eq!(req("", "/dir").status, 301);
    assert_eq!(req("", "/missing.txt").status, 404);
    assert_eq!(req("Range: bytes=50-60\r\n", "/a.txt").status, 416);
    let mut bad = connect(addr(hp));
    bad.write_all(b"NOT HTTP AT ALL\r\n\r\n").unwrap();
    let head = read_head(&mut BufReader::new(bad)).unwrap();
    assert_eq!(head.status, 400);

    wait_route(&sl, "h", 8);
    wait_route(&sl, "pp", 1);
    let m = scrape_until(addr(aport), "2 header errors", |m| {
        route_metric(m, "sluice_route_proxy_header_errors_total", "pp") >= 2.0
    });
    assert_eq!(
        route_metric(&m, "sluice_route_proxy_header_errors_total", "pp"),
        2.0
    );
    assert_eq!(
        route_metric(&m, "sluice_route_proxy_header_errors_total", "h"),
        0.0
    );
    let class = |r: &str, c: &str| {
        m.get(
            "sluice_route_http_responses_total",
            &[("route", r), ("class", c)],
        )
    };
    let h: Vec<f64> = ["1xx", "2xx", "3xx", "4xx", "5xx"]
        .iter()
        .map(|c| class("h", c))
        .collect();
    assert_eq!(h, [0.0, 3.0, 2.0, 3.0, 0.0], "route h by class");
    let pp: Vec<f64> = ["1xx", "2xx", "3xx", "4xx", "5xx"]
        .iter()
        .map(|c| class("pp", c))
        .collect();
    assert_eq!(pp, [0.0, 1.0, 0.0, 0.0, 0.0], "route pp by class");
}

/// A file that cannot be opened for a reason other than "missing" or
/// "forbidden" gets 500: strace makes every openat2 (sluice opens request
/// paths with it, and nothing else) fail with EIO.
#[test]
fn server_errors_are_counted_as_5xx() {
    let (hp, aport) = (free_port(), free_port());
    let toml = config("", aport, &route("h", hp, "root = \"www\""));
    let dir = temp_dir("metrics-5xx");
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(dir.join("www/a.txt"), b"a").unwrap();
    let sl = Sluice::start_wrapped_in(dir, &toml, &strace_fault("openat2", "EIO"));
    for _ in 0..2 {
        assert_eq!(get(addr(hp), "/a.txt").0.status, 500);
    }
    wait_route(&sl, "h", 2);
    let m = scrape(addr(aport));
    let class = |c| {
        m.get(
            "sluice_route_http_responses_total",
            &[("route", "h"), ("class", c)],
        )
    };
    assert_eq!([class("2xx"), class("4xx"), class("5xx")], [0.0, 0.0, 2.0]);
}

/// The latency histograms against what the test made happen: a client
/// that waited at least 300 ms for the only slot of a backend, the
/// lifetimes of three clients (two of which lived at least 300 ms), one
/// timed connect per served client and none for a refused connect.
#[test]
fn connect_queue_and_lifetime_histograms() {
    let echo = Backend::named("echo");
    let dead = free_port(); // nothing listens: connects are refused
    let (hp, fp, aport) = (free_port(), free_port(), free_port());
    let routes = route(
        "h",
        hp,
        &format!(
            "backends = [{{ address = \"{}\", max_connections = 1 }}]\nqueue_timeout = \"10s\"",
            echo.addr
        ),
    ) + &route("f", fp, &format!("backends = \"127.0.0.1:{dead}\""));
    let sl = start("metrics-histograms", &config("", aport, &routes), |_| {});

    // A holds the slot for 300 ms while B waits for it; C comes after.
    let mut a = connect(addr(hp));
    assert_eq!(read_line(&mut a), "echo");
    let mut b = connect(addr(hp));
    scrape_until(addr(aport), "B waiting", |m| {
        m.get("sluice_route_connections_waiting", &[("route", "h")]) == 1.0
    });
    thread::sleep(Duration::from_millis(300));
    drop(a);
    assert_eq!(read_line(&mut b), "echo");
    drop(b);
    // C comes once B's slot is free, so it does not wait.
    wait_route(&sl, "h", 2);
    let mut c = connect(addr(hp));
    assert_eq!(read_line(&mut c), "echo");
    drop(c);
    // D is refused by the dead backend.
    let mut d = connect(addr(fp));
    assert_closed(&mut d, "client of a dead backend");
    wait_route(&sl, "h", 3);
    wait_route(&sl, "f", 1);

    let m = scrape(addr(aport));
    let h = |name: &str, labels: &[(&str, &str)]| m.get(name, labels);
    let le = |name: &str, route: &str, le: &str| {
        h(&format!("{name}_bucket"), &[("route", route), ("le", le)])
    };

    // Lifetimes: A and B lived 300 ms or more, C did not have to.
    let life = "sluice_route_connection_duration_seconds";
    assert_eq!(h(&format!("{life}_count"), &[("route", "h")]), 3.0);
    assert!(le(life, "h", "0.25") <= 1.0, "{}", m.text);
    assert!(h(&format!("{life}_sum"), &[("route", "h")]) >= 0.6);
    assert_eq!(h(&format!("{life}_count"), &[("route", "f")]), 1.0);

    // Queue: only B waited, 300 ms or more.
    let q = "sluice_route_queue_seconds";
    assert_eq!(h(&format!("{q}_count"), &[("route", "h")]), 1.0);
    assert_eq!(le(q, "h", "0.25"), 0.0);
    assert_eq!(le(q, "h", "10"), 1.0);
    let waited = h(&format!("{q}_sum"), &[("route", "h")]);
    assert!((0.3..10.0).contains(&waited), "queue sum {waited}");
    assert_eq!(h(&format!("{q}_count"), &[("route", "f")]), 0.0);

    // Connects: three timed to the echo backend, none to the dead one,
    // whose failure is counted where failures are.
    let (ea, da) = (echo.addr.to_string(), format!("127.0.0.1:{dead}"));
    fn backend<'a>(route: &'a str, a: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![("route", route), ("backend", a), ("address", a)]
    }
    let cs = "sluice_backend_connect_seconds";
    assert_eq!(h(&format!("{cs}_count"), &backend("h", &ea)), 3.0);
    assert_eq!(h(&format!("{cs}_count"), &backend("f", &da)), 0.0);
    assert!(h("sluice_backend_connect_failures_total", &backend("f", &da)) >= 1.0);
    let mut l = backend("h", &ea);
    l.push(("le", "+Inf"));
    assert_eq!(h(&format!("{cs}_bucket"), &l), 3.0);
}
