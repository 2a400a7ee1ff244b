//! File routes through the real binary: every strategy × protocol byte
//! exact (0 B to 256 MiB), concurrency, HTTP semantics (ranges, HEAD,
//! conditionals, errors, keep-alive, pipelining, timeouts), path safety,
//! files that change under a transfer, mmap lease fallback, and a proxy
//! route's fallback file. Results are checked from the bytes received and
//! from sluice's own access log.

mod common;

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::Path;
use std::thread;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const STRATEGIES: [&str; 4] = ["sendfile", "mmap", "splice", "copy"];

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One `[[route]]` table.
fn route(name: &str, port: u16, body: &str) -> String {
    format!("\n[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\n{body}\n")
}

fn start(_name: &str, dir: std::path::PathBuf, routes: &str) -> Sluice {
    let toml = format!("[global]\nlog_level = \"info\"\nworkers = 2\n{routes}");
    Sluice::start_in(dir, &toml, &[])
}

/// Access lines for one route.
fn access_for(sl: &Sluice, route: &str) -> Vec<std::collections::HashMap<String, String>> {
    sl.access()
        .into_iter()
        .filter(|a| a.get("route").map(String::as_str) == Some(route))
        .collect()
}

/// Wait until `route` has logged `n` responses.
fn wait_route(
    sl: &Sluice,
    route: &str,
    n: usize,
) -> Vec<std::collections::HashMap<String, String>> {
    for _ in 0..1000 {
        let a = access_for(sl, route);
        if a.len() >= n {
            return a;
        }
        thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "route {route}: fewer than {n} access lines:\n{}",
        sl.logs().join("\n")
    );
}

#[test]
fn every_strategy_and_protocol_is_byte_exact() {
    let dir = temp_dir("files-exact");
    let root = dir.join("www");
    std::fs::create_dir(&root).unwrap();
    let sizes = [0u64, 1, 1000, MIB + 17];
    let mut digests = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        digests.push(gen_file(&root.join(format!("f{i}.bin")), 10 + i as u64, n));
    }
    let mut routes = String::new();
    let mut ports = Vec::new();
    for s in STRATEGIES {
        let hp = free_port();
        routes += &route(
            &format!("http-{s}"),
            hp,
            &format!("root = \"www\"\nstrategy = \"{s}\"\nsend_chunk = \"64KiB\""),
        );
        let mut raw = Vec::new();
        for i in 0..sizes.len() {
            let rp = free_port();
            routes += &route(
                &format!("raw-{s}-{i}"),
                rp,
                &format!("file = \"www/f{i}.bin\"\nprotocol = \"raw\"\nstrategy = \"{s}\""),
            );
            raw.push(rp);
        }
        ports.push((s, hp, raw));
    }
    let sl = start("files-exact", dir, &routes);
    for (s, hp, raw) in &ports {
        for (i, &n) in sizes.iter().enumerate() {
            let (h, body) = get(addr(*hp), &format!("/f{i}.bin"));
            assert_eq!(h.status, 200, "{s} f{i}");
            assert_eq!(h.content_length(), n);
            assert_eq!(digest_of(&body), digests[i], "{s}: http f{i} bytes differ");
            assert_eq!(h.get("content-type"), Some("application/octet-stream"));

            let mut c = connect(addr(raw[i]));
            let got = recv_data(&mut c);
            assert_eq!(got, digests[i], "{s}: raw f{i} bytes differ");
        }
    }
    for (s, _, _) in &ports {
        let a = wait_route(&sl, &format!("http-{s}"), sizes.len());
        for line in &a {
            assert_eq!(line["status"], "200");
            assert_eq!(line["end"], "ok");
            if line["body_bytes"] != "0" {
                // The strategy that moved the bytes is the one asked for.
                assert_eq!(&line["strategy"], s, "{line:?}");
                assert_eq!(line["fallback"], "-");
            }
        }
        let big: Vec<_> = a.iter().filter(|l| l["path"] == "/f3.bin").collect();
        assert_eq!(big[0]["body_bytes"], (MIB + 17).to_string());
        for (i, size) in sizes.iter().enumerate() {
            let a = wait_route(&sl, &format!("raw-{s}-{i}"), 1);
            assert_eq!(a[0]["body_bytes"], size.to_string());
            assert_eq!(a[0]["status"], "-");
            assert_eq!(a[0]["end"], "ok");
            if *size > 0 {
                assert_eq!(&a[0]["strategy"], s);
            }
        }
    }
}

/// 256 MiB through each strategy over HTTP, hashed on the fly.
#[test]
fn large_file_every_strategy() {
    let dir = temp_dir("files-large");
    let root = dir.join("www");
    std::fs::create_dir(&root).unwrap();
    let want = gen_file(&root.join("big.bin"), 77, 256 * MIB);
    let mut routes = String::new();
    let mut ports = Vec::new();
    for s in STRATEGIES {
        let p = free_port();
        routes += &route(s, p, &format!("root = \"www\"\nstrategy = \"{s}\""));
        ports.push((s, p));
    }
    let sl = start("files-large", dir, &routes);
    for (s, p) in &ports {
        let mut c = connect(addr(*p));
        c.write_all(b"GET /big.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut r = BufReader::new(c);
        let h = read_head(&mut r).unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.content_length(), 256 * MIB);
        let got = recv_data(&mut r);
        assert_eq!(got, want, "{s}: 256 MiB differ");
        let a = wait_route(&sl, s, 1);
        assert_eq!(&a[0]["strategy"], s);
        assert_eq!(a[0]["body_bytes"], (256 * MIB).to_string());
    }
}

#[test]
fn hundred_concurrent_downloads() {
    let dir = temp_dir("files-conc");
    let root = dir.join("www");
    std::fs::create_dir(&root).unwrap();
    let mut want = Vec::new();
    for i in 0..4u64 {
        want.push(gen_file(
            &root.join(format!("c{i}.bin")),
            100 + i,
            MIB + i * 4099,
        ));
    }
    let mut routes = String::new();
    let mut ports = Vec::new();
    for s in STRATEGIES {
        let p = free_port();
        routes += &route(
            s,
            p,
            &format!("root = \"www\"\nstrategy = \"{s}\"\nsend_chunk = \"128KiB\""),
        );
        ports.push(p);
    }
    let sl = start("files-conc", dir, &routes);
    let clients: Vec<_> = (0..100)
        .map(|i| {
            let port = ports[i % 4];
            let f = (i / 4) % 4;
            thread::spawn(move || {
                let mut c = connect(addr(port));
                write!(c, "GET /c{f}.bin HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
                let mut r = BufReader::new(c);
                let h = read_head(&mut r).unwrap();
                assert_eq!(h.status, 200);
                let body = read_body(&mut r, h.content_length());
                (f, digest_of(&body))
            })
        })
        .collect();
    for c in clients {
        let (f, d) = c.join().unwrap();
        assert_eq!(d, want[f], "download of c{f}.bin differs");
    }
    for s in STRATEGIES {
        let a = wait_route(&sl, s, 25);
        assert!(a.iter().all(|l| l["strategy"] == s && l["status"] == "200"));
    }
}

#[test]
fn ranges_match_file_slices() {
    let dir = temp_dir("files-range");
    let root = dir.join("www");
    std::fs::create_dir(&root).unwrap();
    let mut data = vec![0u8; 100_000];
    DataGen::new(5).fill(&mut data);
    std::fs::write(root.join("r.bin"), &data).unwrap();
    let mut routes = String::new();
    let mut ports = Vec::new();
    for s in STRATEGIES {
        let p = free_port();
        routes += &route(s, p, &format!("root = \"www\"\nstrategy = \"{s}\""));
        ports.push(p);
    }
    let _sl = start("files-range", dir, &routes);
    let n = data.len() as u64;
    let cases: [(&str, u64, u64); 8] = [
        ("bytes=0-0", 0, 1),
        ("bytes=0-", 0, n),
        ("bytes=-1", n - 1, n),
        ("bytes=99999-", n - 1, n),
        ("bytes=1000-1999", 1000, 2000),
        ("bytes=50000-999999999", 50000, n),
        ("bytes=-100", n - 100, n),
        ("bytes=-200000", 0, n),
    ];
    for p in &ports {
        for (range, a, b) in cases {
            let (h, body) = http(
                addr(*p),
                &format!(
                    "GET /r.bin HTTP/1.1\r\nHost: t\r\nRange: {range}\r\nConnection: close\r\n\r\n"
                ),
            );
            assert_eq!(h.status, 206, "{range}");
            assert_eq!(
                h.get("content-range").unwrap(),
                format!("bytes {a}-{}/{n}", b - 1)
            );
            assert_eq!(body, &data[a as usize..b as usize], "{range}");
        }
        for bad in ["bytes=100000-", "bytes=200000-300000", "bytes=-0"] {
            let (h, body) = http(
                addr(*p),
                &format!(
                    "GET /r.bin HTTP/1.1\r\nHost: t\r\nRange: {bad}\r\nConnection: close\r\n\r\n"
                ),
            );
            assert_eq!(h.status, 416, "{bad}");
            assert_eq!(
                h.get("content-range"),
                Some(format!("bytes */{n}").as_str())
            );
            assert!(body.is_empty());
        }
        // Several ranges, or nonsense: the whole file with 200.
        for full in ["bytes=0-1,5-6", "bytes=9-3", "lines=1-2"] {
            let (h, body) = http(
                addr(*p),
                &format!(
                    "GET /r.bin HTTP/1.1\r\nHost: t\r\nRange: {full}\r\nConnection: close\r\n\r\n"
                ),
            );
            assert_eq!(h.status, 200, "{full}");
            assert_eq!(body, data);
        }
        // If-Range with a stale validator: full file.
        let (h, body) = http(
            addr(*p),
            "GET /r.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=0-9\r\nIf-Range: \"old\"\r\nConnection: close\r\n\r\n",
        );
        assert_eq!((h.status, body.len()), (200, data.len()));
    }
}

#[test]
fn head_conditionals_and_keep_alive() {
    let dir = temp_dir("files-head");
    let root = dir.join("www");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("a.txt"), b"hello, sluice\n").unwrap();
    std::fs::write(root.join("b.html"), b"<p>b</p>").unwrap();
    let p = free_port();
    let sl = start("files-head", dir, &route("h", p, "root = \"www\""));

    // HEAD then GET on one connection: HEAD sends no body bytes.
    let mut c = connect(addr(p));
    c.write_all(b"HEAD /a.txt HTTP/1.1\r\nHost: t\r\n\r\nGET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let h = read_head(&mut r).unwrap();
    assert_eq!(h.line, "HTTP/1.1 200 OK");
    assert_eq!(h.content_length(), 14);
    assert_eq!(h.get("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(h.get("server"), Some("sluice"));
    assert!(h.get("date").is_some());
    assert_eq!(h.get("accept-ranges"), Some("bytes"));
    let etag = h.get("etag").unwrap().to_string();
    let lm = h.get("last-modified").unwrap().to_string();
    assert!(etag.starts_with("\"e-"), "{etag}");
    let h2 = read_head(&mut r).unwrap();
    assert_eq!(h2.status, 200);
    assert_eq!(read_body(&mut r, 14), b"hello, sluice\n");

    // Pipelined: three requests in one write, answered in order.
    c.write_all(
        b"GET /b.html HTTP/1.1\r\nHost: t\r\n\r\nGET /nope HTTP/1.1\r\nHost: t\r\n\r\nGET /a.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let h = read_head(&mut r).unwrap();
    assert_eq!(h.get("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(read_body(&mut r, h.content_length()), b"<p>b</p>");
    let h = read_head(&mut r).unwrap();
    assert_eq!(h.status, 404);
    read_body(&mut r, h.content_length());
    let h = read_head(&mut r).unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(h.get("connection"), Some("close"));
    assert_eq!(read_body(&mut r, 14), b"hello, sluice\n");
    assert!(
        read_to_close(&mut r).is_empty(),
        "closed after Connection: close"
    );

    // 304 by If-None-Match and by If-Modified-Since.
    let (h, body) = http(
        addr(p),
        &format!(
            "GET /a.txt HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"x\", {etag}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!((h.status, body.len()), (304, 0));
    assert_eq!(h.get("etag"), Some(etag.as_str()));
    let (h, _) = http(
        addr(p),
        &format!(
            "GET /a.txt HTTP/1.1\r\nHost: t\r\nIf-Modified-Since: {lm}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(h.status, 304);
    let (h, body) = http(
        addr(p),
        "GET /a.txt HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"other\"\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((h.status, body.as_slice()), (200, &b"hello, sluice\n"[..]));
    let (h, _) = http(
        addr(p),
        "GET /a.txt HTTP/1.1\r\nHost: t\r\nIf-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(h.status, 200);

    // 412 by If-Match (strong comparison) and If-Unmodified-Since; a
    // matching If-Match serves, and decides alone over the date.
    let pre = |hdr: String| {
        http(
            addr(p),
            &format!(
                "GET /a.txt HTTP/1.1\r\nHost: t\r\nRange: bytes=0-3\r\n{hdr}\r\nConnection: close\r\n\r\n"
            ),
        )
    };
    let old_date = "Sun, 06 Nov 1994 08:49:37 GMT";
    for hdr in [
        "If-Match: \"nope\"".to_string(),
        format!("If-Match: W/{etag}"),
        format!("If-Unmodified-Since: {old_date}"),
    ] {
        let (h, body) = pre(hdr.clone());
        assert_eq!(
            (h.line.as_str(), body.len()),
            ("HTTP/1.1 412 Precondition Failed", 0),
            "{hdr}"
        );
    }
    for hdr in [
        format!("If-Match: \"x\", {etag}"),
        "If-Match: *".to_string(),
        format!("If-Unmodified-Since: {lm}"),
        format!("If-Match: {etag}\r\nIf-Unmodified-Since: {old_date}"),
    ] {
        let (h, body) = pre(hdr.clone());
        assert_eq!((h.status, body.as_slice()), (206, &b"hell"[..]), "{hdr}");
    }

    // HTTP/1.0: closes unless asked; keep-alive when asked.
    let mut c = connect(addr(p));
    c.write_all(b"GET /a.txt HTTP/1.0\r\n\r\n").unwrap();
    let all = read_to_close(&mut c);
    assert!(all.starts_with(b"HTTP/1.0 200 OK\r\n"));
    assert!(all.ends_with(b"\r\n\r\nhello, sluice\n"));
    let mut c = connect(addr(p));
    c.write_all(b"GET /a.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let h = read_head(&mut r).unwrap();
    assert_eq!(h.get("connection"), Some("keep-alive"));
    read_body(&mut r, 14);
    c.write_all(b"HEAD /a.txt HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(read_head(&mut r).unwrap().status, 200);
    assert!(read_to_close(&mut r).is_empty());
    // `close` wins over `keep-alive`, in whatever order they come.
    let mut c = connect(addr(p));
    c.write_all(b"GET /a.txt HTTP/1.0\r\nConnection: close, keep-alive\r\n\r\n")
        .unwrap();
    let all = String::from_utf8_lossy(&read_to_close(&mut c)).into_owned();
    assert!(all.starts_with("HTTP/1.0 200 OK\r\n"), "{all}");
    assert!(!all.contains("keep-alive"), "{all}");

    let a = sl.wait_access(20, Duration::from_secs(10));
    let statuses: Vec<&str> = a.iter().map(|l| l["status"].as_str()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == "304").count(), 2);
    assert_eq!(statuses.iter().filter(|s| **s == "412").count(), 3);
    assert!(
        a.iter()
            .any(|l| l["method"] == "HEAD" && l["body_bytes"] == "0")
    );
}

/// Send `req`, read everything until the server closes.
fn exchange_raw(a: SocketAddr, req: &[u8]) -> String {
    let mut c = connect(a);
    c.write_all(req).unwrap();
    String::from_utf8_lossy(&read_to_close(&mut c)).into_owned()
}

#[test]
fn bad_requests_get_their_status() {
    let dir = temp_dir("files-bad");
    let root = dir.join("www");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("a.txt"), b"A").unwrap();
    let p = free_port();
    let sl = start(
        "files-bad",
        dir,
        &route(
            "b",
            p,
            "root = \"www\"\nheader_timeout = \"300ms\"\nidle_timeout = \"2s\"",
        ),
    );
    let a = addr(p);

    // 405 keeps the connection; Allow lists what is served.
    let mut c = connect(a);
    c.write_all(b"POST /a.txt HTTP/1.1\r\nHost: t\r\n\r\nGET /a.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(c);
    let h = read_head(&mut r).unwrap();
    assert_eq!(h.line, "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(h.get("allow"), Some("GET, HEAD"));
    read_body(&mut r, h.content_length());
    let h = read_head(&mut r).unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(read_body(&mut r, 1), b"A");

    let out = exchange_raw(a, b"this is not http\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    assert!(out.contains("Connection: close\r\n"));
    let out = exchange_raw(a, b"GET /a.txt HTTP/1.1\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 400 "), "no Host: {out}");

    let long = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "x".repeat(9000));
    let out = exchange_raw(a, long.as_bytes());
    assert!(out.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{out}");

    let big = format!(
        "GET /a.txt HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "y".repeat(20000)
    );
    let mut c = connect(a);
    c.write_all(big.as_bytes()).unwrap();
    let out = String::from_utf8_lossy(&read_to_close(&mut c)).into_owned();
    assert!(
        out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{out}"
    );

    // A Content-Length whose value is not UTF-8 is a bad request: were
    // it skipped, the body would be answered as a second request.
    let out = exchange_raw(
        a,
        b"GET /a.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 37\xff\r\n\r\nGET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    assert_eq!(out.matches("HTTP/1.1").count(), 1, "{out}");

    // Empty lines around requests are ignored (RFC 9112 §2.2): no 408
    // for a stray CRLF after a request, which idles like any other
    // keep-alive connection until idle_timeout closes it with a FIN.
    let mut c = connect(a);
    c.write_all(b"\r\nGET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(c);
    let h = read_head(&mut r).unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(read_body(&mut r, h.content_length()), b"A");
    let (rest, how) = read_to_end_how(&mut r);
    assert_eq!((String::from_utf8_lossy(&rest), how), ("".into(), None));

    // Half a request head, then silence: 408 and close.
    let mut c = connect(a);
    c.write_all(b"GET /a.txt HTTP/1.1\r\nHost: t\r\n").unwrap();
    let out = String::from_utf8_lossy(&read_to_close(&mut c)).into_owned();
    assert!(out.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{out}");
    assert!(out.contains("Connection: close\r\n"));

    // An idle keep-alive connection is closed at idle_timeout with a FIN
    // (a clean end of stream, not a reset), after its response.
    let mut c = connect(a);
    c.write_all(b"GET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(c);
    let h = read_head(&mut r).unwrap();
    assert_eq!(read_body(&mut r, h.content_length()), b"A");
    let mut rest = [0u8; 16];
    assert_eq!(r.read(&mut rest).expect("FIN, not a reset"), 0);

    // A connection that never sends anything is closed without a word.
    let mut c = connect(a);
    assert!(read_to_close(&mut c).is_empty());

    let lines = sl.wait_access(10, Duration::from_secs(10));
    let st: Vec<&str> = lines.iter().map(|l| l["status"].as_str()).collect();
    for want in ["405", "200", "400", "414", "431", "408"] {
        assert!(st.contains(&want), "{want} not logged: {st:?}");
    }
}

#[test]
fn path_escapes_never_leak_a_byte() {
    let dir = temp_dir("files-esc");
    let secret = b"TOP-SECRET-0123456789";
    std::fs::write(dir.join("secret.txt"), secret).unwrap();
    let root = dir.join("www");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/in.txt"), b"inside").unwrap();
    std::fs::write(root.join(".hidden"), b"dot").unwrap();
    std::fs::write(root.join("index.html"), b"<h1>index</h1>").unwrap();
    std::os::unix::fs::symlink(dir.join("secret.txt"), root.join("out-link")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", root.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("sub/in.txt", root.join("in-link")).unwrap();
    std::os::unix::fs::symlink(&dir, root.join("dir-link")).unwrap();
    let p = free_port();
    let p2 = free_port();
    let routes = route("e", p, "root = \"www\"\nindex = \"index.html\"")
        + &route("noindex", p2, "root = \"www/sub\"");
    let sl = start("files-esc", dir.clone(), &routes);
    let abs = dir.join("secret.txt");
    let targets = [
        "/../secret.txt".to_string(),
        "/sub/../../secret.txt".into(),
        "/%2e%2e/secret.txt".into(),
        "/%2E%2E%2Fsecret.txt".into(),
        "/sub%2F..%2F..%2Fsecret.txt".into(),
        "/..%2fsecret.txt".into(),
        abs.display().to_string(),
        format!("http://localhost/..{}", "/secret.txt"),
        format!("http://localhost{}", abs.display()),
        "/out-link".into(),
        "/rel-link".into(),
        "/dir-link/secret.txt".into(),
        "/sub/in.txt%00.html".into(),
        "/.hidden".into(),
        "/%2ehidden".into(),
        "secret.txt".into(),
        "/sub/".into(),
    ];
    for t in &targets {
        let out = exchange_raw(
            addr(p),
            format!("GET {t} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert!(!out.contains("TOP-SECRET"), "{t} leaked the secret: {out}");
        let status: u16 = out.split(' ').nth(1).unwrap().parse().unwrap();
        assert!(status == 404 || status == 400, "{t}: {status}");
    }
    // Raw NUL in the target: rejected by the parser, never a file.
    let out = exchange_raw(addr(p), b"GET /sub/in.txt\0x HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    // Inside the root, links that stay inside work.
    assert_eq!(get(addr(p), "/in-link").1, b"inside");
    assert_eq!(get(addr(p), "/sub//in.txt").1, b"inside");
    assert_eq!(get(addr(p), "/sub%2Fin.txt").1, b"inside");
    // A folder gives its index file, or 404 without one: no listings.
    let (h, body) = get(addr(p), "/");
    assert_eq!((h.status, body.as_slice()), (200, &b"<h1>index</h1>"[..]));
    assert_eq!(get(addr(p2), "/").0.status, 404);
    // A folder named without its slash: 301 to the slash form, keeping the
    // query (as nginx does), re-encoded.
    std::fs::create_dir(root.join("docs")).unwrap();
    std::fs::write(root.join("docs/index.html"), b"docs").unwrap();
    let (h, _) = get(addr(p), "/docs?x=1&y=%20");
    assert_eq!(
        (h.status, h.get("location")),
        (301, Some("/docs/?x=1&y=%20"))
    );
    let (h, _) = get(addr(p), "/docs");
    assert_eq!((h.status, h.get("location")), (301, Some("/docs/")));
    assert_eq!(get(addr(p), "/docs%+1").0.status, 400, "two hex digits");
    assert_eq!(get(addr(p), "/docs/").1, b"docs");
    let (h, _) = get(addr(p), "//evil.example");
    assert_eq!(h.status, 404, "no such folder: no redirect at all");
    assert_eq!(get(addr(p2), "/in.txt").1, b"inside");
    // A file named as a folder is not there (the kernel says ENOTDIR), also
    // right after the plain name put it in the open-file cache. As for a
    // folder's 301, the slash is judged on the target as sent: an encoded
    // one at the end is not a trailing slash.
    assert_eq!(get(addr(p), "/sub/in.txt/").0.status, 404, "fresh");
    assert_eq!(get(addr(p), "/sub/in.txt").1, b"inside");
    assert_eq!(get(addr(p), "/sub/in.txt/").0.status, 404, "cached");
    assert_eq!(get(addr(p), "/sub/in.txt/?q").0.status, 404, "query");
    assert_eq!(get(addr(p), "/in-link/").0.status, 404, "link to a file");
    assert_eq!(get(addr(p), "/sub/in.txt%2F").1, b"inside");
    let all = sl.access();
    assert!(
        all.iter()
            .all(|l| l["body_bytes"] != secret.len().to_string())
    );
}

/// A slow client downloads a large file; the file is truncated meanwhile.
fn truncate_during_download(strategy: &str) {
    let dir = temp_dir(&format!("files-trunc-{strategy}"));
    let root = dir.join("www");
    std::fs::create_dir(&root).unwrap();
    let big = root.join("t.bin");
    let p = free_port();
    let sl = start(
        &format!("trunc-{strategy}"),
        dir,
        &route(
            "t",
            p,
            &format!("root = \"www\"\nstrategy = \"{strategy}\""),
        ),
    );
    // mmap needs a lease, which any process holding the file open for
    // writing denies -- including, for a moment, a child this test binary
    // forks for another test (it inherits our descriptors until exec). If
    // that happened the transfer used sendfile: run it again (bounded).
    for attempt in 0..3 {
        let line = truncate_once(&sl, p, &big);
        if strategy == "mmap" && line["fallback"] == "no_lease" && attempt < 2 {
            continue;
        }
        let end = &line["end"];
        if strategy == "mmap" {
            assert_eq!(end, "lease_break", "{line:?}");
            assert!(sl.count_log("lease break") >= 1);
        } else {
            assert_eq!(end, "truncated", "{line:?}");
        }
        return;
    }
}

/// Write a 64 MiB file, start a slow download, truncate the file
/// mid-transfer; check the client got less, exactly the start of the
/// original bytes, and that the next request gets the new content.
/// Returns the access line of the cut transfer.
fn truncate_once(sl: &Sluice, p: u16, big: &Path) -> HashMap<String, String> {
    let total = 64 * MIB;
    gen_file(big, 3, total);
    let before = access_for(sl, "t").len();
    let mut c = small_buffer_client(addr(p), 64 * 1024);
    c.write_all(b"GET /t.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(c);
    let h = read_head(&mut r).unwrap();
    assert_eq!(h.content_length(), total);
    let first = read_body(&mut r, 100_000);
    assert_eq!(first.len(), 100_000);

    // Truncate while sluice is blocked on the slow client. For mmap the
    // open for writing waits until sluice gives the lease back.
    let new = b"new content after truncation".to_vec();
    let writer = {
        let (big, new) = (big.to_path_buf(), new.clone());
        thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&big)
                .unwrap();
            f.write_all(&new).unwrap();
        })
    };
    let (rest, how) = read_to_end_how(&mut r);
    writer.join().unwrap();
    let got = 100_000 + rest.len() as u64;
    assert!(
        got < total,
        "the whole file arrived ({got} bytes) although it was truncated"
    );
    // Cut short: a reset, never a FIN that could pass for the end.
    assert_eq!(
        how,
        Some(std::io::ErrorKind::ConnectionReset),
        "{got} bytes"
    );
    // What arrived is exactly the start of the original file: no byte of
    // the new content, no zeroes from a truncated page.
    let received = digest_of(&[first, rest].concat());
    assert_eq!(
        received,
        send_data(&mut std::io::sink(), 3, got),
        "the {got} bytes received are not the original file's first {got} bytes"
    );
    let line = wait_route(sl, "t", before + 1)[before].clone();
    // The process lives on and serves the new content.
    let (h, body) = get(addr(p), "/t.bin");
    assert_eq!(h.status, 200);
    assert_eq!(body, new);
    wait_route(sl, "t", before + 2);
    line
}

#[test]
fn truncation_sendfile() {
    truncate_during_download("sendfile");
}
#[test]
fn truncation_mmap() {
    truncate_during_download("mmap");
}
#[test]
fn truncation_splice() {
    truncate_during_download("splice");
}
#[test]
fn truncation_copy() {
    truncate_during_download("copy");
}

#[test]
fn changed_files_are_served_fresh() {
    let dir = temp_dir("files-fresh");
    let root = dir.join("www");
    std::fs::create_dir(&root).unwrap();
    let f = root.join("f.txt");
    std::fs::write(&f, b"one").unwrap();
    let mut routes = String::new();
    let mut ports = Vec::new();
    for s in STRATEGIES {
        let p = free_port();
        routes += &route(s, p, &format!("root = \"www\"\nstrategy = \"{s}\""));
        let rp = free_port();
        routes += &route(
            &format!("raw-{s}"),
            rp,
            &format!("file = \"www/f.txt\"\nprotocol = \"raw\"\nstrategy = \"{s}\""),
        );
        ports.push((p, rp));
    }
    let _sl = start("files-fresh", dir, &routes);
    for (i, (p, rp)) in ports.iter().enumerate() {
        let one = format!("one{i}");
        std::fs::write(&f, &one).unwrap();
        // Keep-alive connection: the same connection sees each change.
        let mut c = connect(addr(*p));
        let mut r = BufReader::new(c.try_clone().unwrap());
        c.write_all(b"GET /f.txt HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let h = read_head(&mut r).unwrap();
        assert_eq!(read_body(&mut r, h.content_length()), one.as_bytes());
        // Grown in place.
        let grown = format!("{one} and more");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&f)
            .unwrap()
            .write_all(b" and more")
            .unwrap();
        c.write_all(b"GET /f.txt HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let h = read_head(&mut r).unwrap();
        assert_eq!(read_body(&mut r, h.content_length()), grown.as_bytes());
        assert_eq!(
            recv_data(&mut connect(addr(*rp))),
            digest_of(grown.as_bytes())
        );
        // Replaced by rename.
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, b"replaced!").unwrap();
        std::fs::rename(&tmp, &f).unwrap();
        c.write_all(b"GET /f.txt HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let h = read_head(&mut r).unwrap();
        assert_eq!(read_body(&mut r, h.content_length()), b"replaced!");
        assert_eq!(recv_data(&mut connect(addr(*rp))), digest_of(b"replaced!"));
        c.shutdown(Shutdown::Write).unwrap();
        assert!(read_to_close(&mut r).is_empty());
    }
}

#[test]
fn mmap_without_lease_falls_back_to_sendfile() {
    let dir = temp_dir("files-nolease");
    let root = dir.join("www");
    std::fs::create_dir(&root).unwrap();
    let path = root.join("w.bin");
    let want = gen_file(&path, 9, 3 * MIB + 5);
    let p = free_port();
    let sl = start(
        "files-nolease",
        dir,
        &route("m", p, "root = \"www\"\nstrategy = \"mmap\""),
    );
    // Download until a transfer runs with mmap; returns the lines so far.
    // (Without a writer one try is enough, but a child forked by another
    // test may hold an inherited write descriptor for a moment.)
    let until_mmap = |seen: usize| {
        for n in seen + 1..seen + 10 {
            let (_, body) = get(addr(p), "/w.bin");
            assert_eq!(digest_of(&body), want);
            let a = wait_route(&sl, "m", n);
            if a[n - 1]["strategy"] == "mmap" {
                assert_eq!(a[n - 1]["fallback"], "-");
                return n;
            }
        }
        panic!("no transfer ran with mmap");
    };
    let seen = until_mmap(0);
    // This process holds the file open for writing: no read lease can be
    // had (EAGAIN, even for root), so sluice must use sendfile.
    let held = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    for _ in 0..3 {
        let (h, body) = get(addr(p), "/w.bin");
        assert_eq!(h.status, 200);
        assert_eq!(digest_of(&body), want, "fallback bytes differ");
    }
    let a = wait_route(&sl, "m", seen + 3);
    for l in &a[seen..] {
        assert_eq!(
            (l["strategy"].as_str(), l["fallback"].as_str()),
            ("sendfile", "no_lease")
        );
    }
    // Writer gone: mmap again.
    drop(held);
    until_mmap(seen + 3);
    // Logged once, not once per transfer.
    assert_eq!(sl.count_log("no read lease for mmap"), 1);
}

#[test]
fn fallback_file_when_backends_are_down() {
    let dir = temp_dir("files-fallback");
    let page = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 12\r\nConnection: close\r\n\r\nmaintenance\n";
    write_file(&dir, "maint.http", page);
    let dead = free_port();
    let mut routes = String::new();
    let mut ports = Vec::new();
    for s in STRATEGIES {
        let p = free_port();
        routes += &route(
            s,
            p,
            &format!(
                "backends = [\"127.0.0.1:{dead}\"]\nfallback_file = \"maint.http\"\nfallback_strategy = \"{s}\""
            ),
        );
        ports.push((s, p));
    }
    let sl = start("files-fallback", dir, &routes);
    for (s, p) in &ports {
        for _ in 0..2 {
            let mut c = connect(addr(*p));
            c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            let got = read_to_close(&mut c);
            assert_eq!(got, page, "{s}");
        }
        let a = wait_route(&sl, s, 2);
        for l in &a {
            assert_eq!(l["end"], "fallback");
            assert_eq!(l["body_bytes"], page.len().to_string());
            assert_eq!(&l["strategy"], s);
        }
    }
}

#[test]
fn raw_route_ignores_input_and_curl_downloads() {
    let dir = temp_dir("files-raw");
    let want = gen_file(&dir.join("blob.bin"), 42, 2 * MIB + 1);
    let p = free_port();
    let hp = free_port();
    let routes = route(
        "raw",
        p,
        "file = \"blob.bin\"\nprotocol = \"raw\"\nidle_timeout = \"5s\"",
    ) + &route("web", hp, "file = \"blob.bin\"");
    let sl = start("files-raw", dir.clone(), &routes);
    // A client that talks first still gets exactly the file, then EOF.
    let mut c = connect(addr(p));
    c.write_all(b"hello?\r\nanyone\r\n").unwrap();
    assert_eq!(recv_data(&mut c), want);
    let a = wait_route(&sl, "raw", 1);
    assert_eq!(a[0]["body_bytes"], (2 * MIB + 1).to_string());

    let has_curl = std::process::Command::new("which")
        .arg("curl")
        .output()
        .is_ok_and(|o| o.status.success());
    if has_curl {
        let out = dir.join("curl.out");
        let st = std::process::Command::new("curl")
            .args(["-sS", "--fail", "--noproxy", "*", "-o"])
            .arg(&out)
            .arg(format!("http://127.0.0.1:{hp}/"))
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(digest_of(&std::fs::read(&out).unwrap()), want);
    } else {
        eprintln!("curl not installed: skipping the curl download");
    }
}

/// A raw route has no length to check a download against: a file that
/// shrinks under a slow client must reach it as a reset, not an EOF that
/// looks like the end of the file. So must a raw file that cannot be
/// opened, which would otherwise look like an empty file.
#[test]
fn raw_route_cut_short_resets_the_client() {
    let dir = temp_dir("files-raw-cut");
    let big = dir.join("big.bin");
    let total = 64 * MIB;
    gen_file(&big, 5, total);
    let (p, gone) = (free_port(), free_port());
    let routes = route("raw", p, "file = \"big.bin\"\nprotocol = \"raw\"")
        + &route("gone", gone, "file = \"gone.bin\"\nprotocol = \"raw\"");
    std::fs::write(dir.join("gone.bin"), b"soon gone").unwrap();
    let sl = start("files-raw-cut", dir.clone(), &routes);
    std::fs::remove_file(dir.join("gone.bin")).unwrap();

    let mut c = small_buffer_client(addr(p), 64 * 1024);
    let mut first = vec![0u8; 100_000];
    c.read_exact(&mut first).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&big)
        .unwrap();
    let (rest, how) = read_to_end_how(&mut c);
    let got = (first.len() + rest.len()) as u64;
    assert!(
        got < total,
        "all {got} bytes arrived despite the truncation"
    );
    assert_eq!(
        digest_of(&[first, rest].concat()),
        send_data(&mut std::io::sink(), 5, got)
    );
    assert_eq!(
        how,
        Some(std::io::ErrorKind::ConnectionReset),
        "{got} bytes"
    );
    let a = wait_route(&sl, "raw", 1);
    assert_eq!(a[0]["end"], "truncated", "{a:?}");

    // The reset may come so soon that the connect itself reports it.
    match std::net::TcpStream::connect_timeout(&addr(gone), Duration::from_secs(5)) {
        Ok(mut c) => {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let (got, how) = read_to_end_how(&mut c);
            assert!(got.is_empty(), "{got:?}");
            assert_eq!(how, Some(std::io::ErrorKind::ConnectionReset));
        }
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "{e}"
        ),
    }
    let a = wait_route(&sl, "gone", 1);
    assert_eq!(a[0]["end"], "open_failed", "{a:?}");
}

#[test]
fn graceful_stop_closes_idle_keep_alive_connections() {
    let dir = temp_dir("files-drain");
    std::fs::write(dir.join("a.txt"), b"abc").unwrap();
    let p = free_port();
    let toml = format!(
        "[global]\nshutdown_timeout = \"60s\"\n{}",
        route("d", p, "file = \"a.txt\"\nidle_timeout = \"60s\"")
    );
    let mut sl = Sluice::start_in(dir, &toml, &[]);
    let mut c = connect(addr(p));
    c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let h = read_head(&mut r).unwrap();
    assert_eq!(read_body(&mut r, h.content_length()), b"abc");
    // Idle keep-alive connection: a stop must not wait 60 s for it.
    sl.signal("TERM");
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert!(
        read_to_close(&mut r).is_empty(),
        "closed with a FIN, nothing sent"
    );
    drop(r);
    drop(c);
    let st = sl
        .wait_exit(Duration::from_secs(20))
        .expect("sluice exits once idle connections closed");
    assert!(st.success(), "{st}");
}

/// A stop does not close a connection whose client has not sent its first
/// request yet: the client cannot know of the stop, and a request sent
/// just then would fail. It is answered (with `Connection: close`), then
/// closed, and sluice exits. (Such connections were closed with the idle
/// keep-alive ones, unanswered: under load, every stop or reload that
/// retired a worker failed a few requests.)
#[test]
fn graceful_stop_answers_a_connection_that_has_not_sent_its_request_yet() {
    let dir = temp_dir("files-drain-fresh");
    std::fs::write(dir.join("a.txt"), b"abc").unwrap();
    let p = free_port();
    let toml = format!(
        "[global]\nshutdown_timeout = \"60s\"\n{}",
        route("d", p, "file = \"a.txt\"")
    );
    let mut sl = Sluice::start_in(dir, &toml, &[]);
    let mut fresh = connect(addr(p));
    // One exchange after it: the worker accepted the fresh one first.
    let (h, body) = get(addr(p), "/");
    assert_eq!((h.status, body.as_slice()), (200, &b"abc"[..]));
    sl.signal("TERM");
    sl.wait_log("stopping", Duration::from_secs(10));
    thread::sleep(Duration::from_millis(300));
    fresh
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(fresh);
    let h = read_head(&mut r).expect("an answer, not a closed connection");
    assert_eq!((h.status, h.get("connection")), (200, Some("close")));
    assert_eq!(read_body(&mut r, h.content_length()), b"abc");
    assert!(read_to_close(&mut r).is_empty());
    let st = sl.wait_exit(Duration::from_secs(20)).expect("sluice exits");
    assert!(st.success(), "{st}");
}

#[test]
fn many_pipelined_requests_answered_in_order() {
    let dir = temp_dir("files-pipe");
    let root = dir.join("www");
    std::fs::create_dir(&root).unwrap();
    for i in 0..3 {
        std::fs::write(
            root.join(format!("p{i}")),
            format!("body of p{i}").repeat(i + 1),
        )
        .unwrap();
    }
    let p = free_port();
    let sl = start(
        "files-pipe",
        dir,
        &route("p", p, "root = \"www\"\nstrategy = \"copy\""),
    );
    let n = 500;
    let mut reqs = String::new();
    for k in 0..n {
        reqs += &format!("GET /p{} HTTP/1.1\r\nHost: t\r\n\r\n", k % 3);
    }
    let c = connect(addr(p));
    let mut w = c.try_clone().unwrap();
    // Write everything while reading (the server stops reading while its
    // replies wait for us).
    let writer = thread::spawn(move || w.write_all(reqs.as_bytes()).unwrap());
    let mut r = BufReader::new(c);
    for k in 0..n {
        let h = read_head(&mut r).unwrap();
        assert_eq!(h.status, 200, "response {k}");
        let i = k % 3;
        let want = format!("body of p{i}").repeat(i + 1);
        assert_eq!(
            read_body(&mut r, h.content_length()),
            want.as_bytes(),
            "response {k}"
        );
    }
    writer.join().unwrap();
    let a = wait_route(&sl, "p", n);
    assert!(
        a.iter()
            .all(|l| l["status"] == "200" && l["strategy"] == "copy")
    );
}

/// Lines of a strace log for `call` on path `name` (quoted as strace
/// prints it, e.g. `"d/index.html"`).
fn calls_on(text: &str, call: &str, name: &str) -> usize {
    let quoted = format!("\"{name}\"");
    text.lines()
        .filter(|l| l.contains(&format!("{call}(")) && l.contains(&quoted))
        .count()
}

/// One keep-alive GET; the head and body.
fn get_on(
    c: &mut std::net::TcpStream,
    r: &mut BufReader<std::net::TcpStream>,
    target: &str,
) -> (HttpHead, Vec<u8>) {
    c.write_all(format!("GET {target} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .unwrap();
    let h = read_head(r).unwrap();
    let body = read_body(r, h.content_length());
    (h, body)
}

/// A one-worker config (so one open-file cache sees every request) with
/// `global` extra `[global]` keys and the given routes.
fn one_worker(global: &str, routes: &str) -> String {
    format!("[global]\nlog_level = \"info\"\nworkers = 1\n{global}{routes}")
}

/// A test folder with `www/f0.txt` .. `www/f{n-1}.txt` ("file 0"...).
fn numbered_files(name: &str, n: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = temp_dir(name);
    let root = dir.join("www");
    std::fs::create_dir_all(&root).unwrap();
    for i in 0..n {
        std::fs::write(root.join(format!("f{i}.txt")), format!("file {i}")).unwrap();
    }
    (dir, root)
}

/// Where the descriptors of process `pid` point (as /proc shows it, with
/// " (deleted)" once a file is gone).
fn fd_links(pid: u32) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect()
}

#[test]
fn open_files_are_reused_and_checked_on_every_request() {
    let dir = temp_dir("files-cache");
    let root = dir.join("www");
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::write(root.join("a.txt"), b"alpha").unwrap();
    std::fs::write(root.join("d/index.html"), b"<p>index</p>").unwrap();
    std::fs::write(root.join("m.txt"), b"mapped").unwrap();
    let big: Vec<u8> = (0..(2 << 20) + 7).map(|i| (i % 251) as u8).collect();
    std::fs::write(root.join("big.bin"), &big).unwrap();
    let (p, pm) = (free_port(), free_port());
    let toml = one_worker(
        "",
        &(route("cached", p, "root = \"www\"\nindex = \"index.html\"")
            + &route("mmap", pm, "root = \"www\"\nstrategy = \"mmap\"")),
    );
    let trace = Strace::new("files-cache", "openat2,newfstatat,close");
    let sl = Sluice::start_wrapped_in(dir.clone(), &toml, &trace.wrapper());
    let mut c = connect(addr(p));
    let mut r = BufReader::new(c.try_clone().unwrap());
    for _ in 0..3 {
        let (h, body) = get_on(&mut c, &mut r, "/a.txt");
        assert_eq!(h.status, 200);
        assert_eq!(body, b"alpha");
    }
    // A folder: its index is cached under the folder's path, and the
    // slash-less form is still sent to the slash form.
    for _ in 0..2 {
        let (h, body) = get_on(&mut c, &mut r, "/d/");
        assert_eq!((h.status, body.as_slice()), (200, &b"<p>index</p>"[..]));
        assert_eq!(h.get("content-type"), Some("text/html; charset=utf-8"));
    }
    let (h, _) = get_on(&mut c, &mut r, "/d");
    assert_eq!((h.status, h.get("location")), (301, Some("/d/")));
    // Changed attributes: opened again. Toggling "others may read" is a
    // change whatever the umask made the mode.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root.join("a.txt"))
        .unwrap()
        .permissions()
        .mode();
    std::fs::set_permissions(
        root.join("a.txt"),
        std::fs::Permissions::from_mode((mode ^ 0o004) & 0o7777),
    )
    .unwrap();
    let (h, body) = get_on(&mut c, &mut r, "/a.txt");
    assert_eq!((h.status, body.as_slice()), (200, &b"alpha"[..]));
    // Deleted: the cached descriptor could still read it, but it is gone.
    std::fs::remove_file(root.join("a.txt")).unwrap();
    let (h, _) = get_on(&mut c, &mut r, "/a.txt");
    assert_eq!(h.status, 404);
    // Over 1 MiB: opened for each request.
    for _ in 0..2 {
        let (h, body) = get_on(&mut c, &mut r, "/big.bin");
        assert_eq!(h.status, 200);
        assert_eq!(digest_of(&body), digest_of(&big));
    }
    // mmap transfers lease their own open file: never cached.
    for _ in 0..2 {
        let (h, body) = http(
            addr(pm),
            "GET /m.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        );
        assert_eq!((h.status, body.as_slice()), (200, &b"mapped"[..]));
    }
    drop((c, r));
    drop(sl);
    let text = trace.text();
    // a.txt: opened for the first request and after the chmod; each use
    // of the cache is one stat of the path (2 hits, then the chmod and
    // the delete each found a changed or missing file).
    assert_eq!(calls_on(&text, "openat2", "a.txt"), 3, "{text}");
    assert_eq!(calls_on(&text, "newfstatat", "a.txt"), 4, "{text}");
    // The folder was opened once, its index once; one stat per later use.
    assert_eq!(calls_on(&text, "openat2", "d"), 1, "{text}");
    assert_eq!(calls_on(&text, "openat2", "d/index.html"), 1, "{text}");
    assert_eq!(calls_on(&text, "newfstatat", "d/index.html"), 2, "{text}");
    assert_eq!(calls_on(&text, "openat2", "m.txt"), 2, "{text}");
    assert_eq!(calls_on(&text, "openat2", "big.bin"), 2, "{text}");
    assert_eq!(calls_on(&text, "newfstatat", "big.bin"), 0, "{text}");
    assert_eq!(calls_on(&text, "newfstatat", "m.txt"), 0, "{text}");
}

/// Descriptors of process `pid` that point at file `path`, deleted or not.
fn fds_on(pid: u32, path: &Path) -> usize {
    // /proc shows the real path: resolve the folder (the file may be gone).
    let dir = path.parent().unwrap().canonicalize().unwrap();
    let want = dir.join(path.file_name().unwrap());
    let want = want.to_string_lossy().to_string();
    fd_links(pid)
        .iter()
        .filter(|l| l.to_string_lossy().starts_with(&want))
        .count()
}

#[test]
fn open_file_cache_is_bounded_swept_and_can_be_turned_off() {
    let dir = temp_dir("files-cache-sweep");
    let root = dir.join("www");
    std::fs::create_dir_all(&root).unwrap();
    let (a, b) = (root.join("a.bin"), root.join("b.bin"));
    std::fs::write(&a, b"aaaa").unwrap();
    std::fs::write(&b, b"bbbb").unwrap();
    let (p, off) = (free_port(), free_port());
    let toml = one_worker(
        "open_file_cache = 1\nopen_file_cache_inactive = \"3s\"\n",
        &route("files", p, "root = \"www\""),
    );
    let sl = Sluice::start_in(dir.clone(), &toml, &[]);
    let pid = sl.pid();
    let get = |port: u16, t: &str| {
        http(
            addr(port),
            &format!("GET {t} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
        )
    };
    assert_eq!(get(p, "/a.bin").1, b"aaaa");
    assert_eq!(
        (fds_on(pid, &a), fds_on(pid, &b)),
        (1, 0),
        "a.bin stays open"
    );
    assert_eq!(get(p, "/b.bin").1, b"bbbb");
    assert_eq!(
        (fds_on(pid, &a), fds_on(pid, &b)),
        (0, 1),
        "one entry: a.bin went"
    );
    // Deleted while cached and never asked for again: the inactive sweep
    // closes it, so its space is released.
    std::fs::remove_file(&b).unwrap();
    assert_eq!(fds_on(pid, &b), 1, "still held right after the delete");
    let mut held = 1;
    for _ in 0..100 {
        held = fds_on(pid, &b);
        if held == 0 {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(held, 0, "the sweep closed the deleted file");
    drop(sl);

    // open_file_cache = 0: nothing stays open after a response.
    let dir = temp_dir("files-cache-off");
    let a = dir.join("www/a.bin");
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(&a, b"aaaa").unwrap();
    let toml = one_worker(
        "open_file_cache = 0\n",
        &route("files", off, "root = \"www\""),
    );
    let sl = Sluice::start_in(dir.clone(), &toml, &[]);
    assert_eq!(get(off, "/a.bin").1, b"aaaa");
    let _ = sl.wait_access(1, Duration::from_secs(5));
    assert_eq!(fds_on(sl.pid(), &a), 0);
}

#[test]
fn open_file_cache_is_capped_by_the_descriptor_limit() {
    let (dir, root) = numbered_files("files-cache-nofile", 30);
    let p = free_port();
    let toml = one_worker("", &route("files", p, "root = \"www\""));
    // 64 descriptors: a quarter over one worker is 16 cached files.
    let mut sl = Sluice::start_wrapped_in(dir.clone(), &toml, &["prlimit", "--nofile=64:64", "--"]);
    let line = sl.wait_log(
        "open_file_cache = 1000 is more than",
        Duration::from_secs(5),
    );
    assert!(
        line.contains("each worker caches at most 16 files"),
        "{line}"
    );
    let mut c = connect(addr(p));
    let mut r = BufReader::new(c.try_clone().unwrap());
    for i in 0..30 {
        let (h, body) = get_on(&mut c, &mut r, &format!("/f{i}.txt"));
        assert_eq!((h.status, body), (200, format!("file {i}").into_bytes()));
    }
    let www = root.canonicalize().unwrap();
    let held = fd_links(sl.pid())
        .iter()
        .filter(|l| l.starts_with(&www) && *l != &www)
        .count();
    assert_eq!(held, 16, "the cache holds its capped size, no more");
}

#[test]
fn a_reload_applies_new_file_rules_to_cached_files() {
    let dir = temp_dir("files-cache-reload");
    let root = dir.join("www");
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::write(root.join("d/index.html"), b"<p>index</p>").unwrap();
    let p = free_port();
    let cfg = |extra: &str| one_worker("", &route("files", p, &format!("root = \"www\"\n{extra}")));
    let mut sl = Sluice::start_in(dir.clone(), &cfg("index = \"index.html\""), &[]);
    let get = || {
        http(
            addr(p),
            "GET /d/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
    };
    for _ in 0..2 {
        let (h, body) = get();
        assert_eq!((h.status, body.as_slice()), (200, &b"<p>index</p>"[..]));
    }
    let index = root.join("d/index.html");
    assert_eq!(fds_on(sl.pid(), &index), 1, "the index is cached");
    // The same folder without an index: the cached index is not served.
    std::fs::write(dir.join("sluice.toml"), cfg("")).unwrap();
    sl.signal("HUP");
    sl.wait_log("reload ok: generation 2", Duration::from_secs(5));
    assert_eq!(get().0.status, 404);
    assert_eq!(fds_on(sl.pid(), &index), 0, "the reload emptied the cache");
}

#[test]
fn clients_come_before_cached_files_when_descriptors_run_out() {
    let (dir, _) = numbered_files("files-cache-emfile", 16);
    let p = free_port();
    // Nothing ages out during the test: only shedding can free a descriptor.
    let toml = one_worker(
        "open_file_cache_inactive = \"10m\"\n",
        &route("files", p, "root = \"www\""),
    );
    // 64 descriptors, of which the cache may take 16.
    let mut sl = Sluice::start_wrapped_in(dir.clone(), &toml, &["prlimit", "--nofile=64:64", "--"]);
    let mut first = connect(addr(p));
    let mut r = BufReader::new(first.try_clone().unwrap());
    for i in 0..16 {
        let (h, _) = get_on(&mut first, &mut r, &format!("/f{i}.txt"));
        assert_eq!(h.status, 200);
    }
    // More clients than the descriptors left beside the full cache (8
    // more), fewer than without it: every one is served, the cache gives
    // way. Counted, not assumed: the environment may have left sluice
    // descriptors of its own.
    let open = fd_links(sl.pid()).len();
    assert!(open + 24 <= 64, "{open} descriptors open already");
    let mut clients = Vec::new();
    for n in 0..(64 - open + 8) {
        let mut c = connect(addr(p));
        let mut cr = BufReader::new(c.try_clone().unwrap());
        let (h, body) = get_on(&mut c, &mut cr, "/f0.txt");
        assert_eq!(
            (h.status, body.as_slice()),
            (200, &b"file 0"[..]),
            "client {n}"
        );
        clients.push((c, cr));
    }
    sl.wait_log("closed half of the open-file cache", Duration::from_secs(5));
}

/// openat2 answers EAGAIN when a rename anywhere races with its walk
/// (injected here by strace): the open is tried again and the file
/// served; a race that outlasts every try is a 503 and a warning, not a
/// 500.
#[test]
fn an_open_racing_with_renames_is_tried_again() {
    for (when, status) in [("1", 200u16), ("1+", 503)] {
        let dir = temp_dir(&format!("fr-eagain-{}", status));
        std::fs::create_dir(dir.join("www")).unwrap();
        std::fs::write(dir.join("www/a.txt"), b"served").unwrap();
        let p = free_port();
        let toml = format!(
            "[global]\nlog_level = \"info\"\nworkers = 1\nopen_file_cache = 0\n{}",
            route("w", p, "root = \"www\"")
        );
        let wrapper = strace_fault_when("openat2", "EAGAIN", when);
        let mut sl = Sluice::start_wrapped_in(dir, &toml, &wrapper);
        let (h, b) = get(addr(p), "/a.txt");
        assert_eq!(h.status, status, "when={when}");
        if status == 200 {
            assert_eq!(b, b"served");
        } else {
            // The line may still be on its way from sluice's stderr.
            let line = sl.wait_log("kept racing with renames", Duration::from_secs(10));
            assert!(line.contains("WARN"), "{line}");
        }
    }
}

/// A deploy that swaps the `current` symlink a route's root names
/// (`ln -sfn`, done atomically by rename): requests go to the new release
/// within a second (nginx resolves its root for each request), through the
/// open-file cache too, and keep working when the old release is deleted.
/// A link that is missing for a moment keeps the last release serving.
#[test]
fn a_root_symlink_swapped_by_a_deploy_is_followed() {
    let (dir, p, sl) = releases(
        "fr-swap",
        &[
            ("r1", "release one"),
            ("r2", "release two"),
            ("r3", "release 3"),
        ],
    );
    let swap = |to: &str| swap_link(&dir, to);
    let body = || {
        let (h, b) = get(addr(p), "/a.txt");
        (h.status, String::from_utf8_lossy(&b).into_owned())
    };
    // Twice: the second from the open-file cache.
    assert_eq!(body(), (200, "release one".to_string()));
    assert_eq!(body(), (200, "release one".to_string()));
    let served = |want: &str| {
        for _ in 0..500 {
            let got = body();
            if got == (200, want.to_string()) {
                return;
            }
            assert!(got.0 == 200, "{got:?}");
            thread::sleep(Duration::from_millis(10));
        }
        panic!("never served {want:?}: {:?}", sl.logs());
    };
    swap("r2");
    served("release two");
    std::fs::remove_dir_all(dir.join("r1")).unwrap();
    assert_eq!(body(), (200, "release two".to_string()));
    // The link goes missing: the last release goes on serving, with a
    // warning; the next link is followed again.
    std::fs::remove_file(dir.join("current")).unwrap();
    let warned = || {
        sl.logs()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("serving from the folder it named before"))
    };
    for _ in 0..500 {
        assert_eq!(body(), (200, "release two".to_string()));
        if warned() {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert!(warned(), "{:?}", sl.logs());
    swap("r3");
    served("release 3");
}

/// A worker's first request after the configuration loaded looks at the
/// root's path at once: a swap (and the removal of the old release) made
/// before it is served from the new release, not from the folder opened
/// at load time.
#[test]
fn the_first_request_after_a_swap_sees_the_new_release() {
    let (dir, p, _sl) = releases(
        "fr-swap-first",
        &[("r1", "release one"), ("r2", "release two")],
    );
    swap_link(&dir, "r2");
    std::fs::remove_dir_all(dir.join("r1")).unwrap();
    let (h, b) = get(addr(p), "/a.txt");
    assert_eq!(
        (h.status, String::from_utf8_lossy(&b).into_owned()),
        (200, "release two".to_string())
    );
}

/// Release folders (`a.txt` holding each body) and a `current` link to the
/// first, served by one worker (each worker looks at the link on its own)
/// with root = "current": the folder, the route's port, sluice.
fn releases(name: &str, bodies: &[(&str, &str)]) -> (std::path::PathBuf, u16, Sluice) {
    let dir = temp_dir(name);
    for (r, body) in bodies {
        std::fs::create_dir(dir.join(r)).unwrap();
        std::fs::write(dir.join(r).join("a.txt"), body).unwrap();
    }
    swap_link(&dir, bodies[0].0);
    let p = free_port();
    let toml = format!(
        "[global]\nlog_level = \"info\"\nworkers = 1\n{}",
        route("w", p, "root = \"current\"")
    );
    let sl = Sluice::start_in(dir.clone(), &toml, &[]);
    (dir, p, sl)
}

/// Point `current` in `dir` at `to` atomically, as `ln -sfn` does (a new
/// link renamed over the old one).
fn swap_link(dir: &Path, to: &str) {
    std::os::unix::fs::symlink(to, dir.join("current.new")).unwrap();
    std::fs::rename(dir.join("current.new"), dir.join("current")).unwrap();
}
