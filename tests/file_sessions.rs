//! File sessions at their edges, through the real binary: a file route
//! behind a PROXY header (the handshake consumed the socket's readiness
//! edges, so the session must run without waiting for one), a slow reader
//! that is still reading when the close timer fires (it must get every
//! byte), and the response head leaving with the body (MSG_MORE, seen
//! with strace).

mod common;

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use common::*;

const FAKE_SRC: &str = "203.0.113.7:4242";
const FAKE_DST: &str = "192.0.2.1:443";

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn route(name: &str, port: u16, body: &str) -> String {
    format!("\n[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\n{body}\n")
}

/// Start sluice (under `wrapper`, if any) on `routes`, with a `www`
/// folder made before it reads its config; returns it and that folder.
fn start(
    name: &str,
    routes: &str,
    wrapper: &[&str],
    files: &[(&str, u64, u64)],
) -> (Sluice, std::path::PathBuf) {
    let dir = temp_dir(name);
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    for (f, seed, len) in files {
        gen_file(&www.join(f), *seed, *len);
    }
    let toml = format!("[global]\nlog_level = \"info\"\nworkers = 1\n{routes}");
    (Sluice::start_wrapped_in(dir, &toml, wrapper), www)
}

/// Bytes of the file the fault tests serve (`f.bin`, seed 7).
const FAULT_FILE: u64 = 4 << 20;

/// A raw route on `port` that sends `www/f.bin` with `strategy`, 64 KiB a
/// turn.
fn raw_file_route(port: u16, strategy: &str) -> String {
    route(
        "raw",
        port,
        &format!(
            "file = \"www/f.bin\"\nprotocol = \"raw\"\n{}",
            chunked(strategy)
        ),
    )
}

fn chunked(strategy: &str) -> String {
    format!("strategy = \"{strategy}\"\nsend_chunk = \"64KiB\"")
}

/// `start` with `f.bin` under strace, which makes the `when`-th `call`
/// fail with `errno`.
fn start_faulted(name: &str, routes: &str, call: &str, errno: &str, when: &str) -> Sluice {
    let wrapper = strace_fault_when(call, errno, when);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    start(name, routes, &wrapper, &[("f.bin", 7, FAULT_FILE)]).0
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A PROXY header naming the fake client.
fn header(version: &str) -> Vec<u8> {
    match version {
        "v1" => ppp::v1::Addresses::from((sa(FAKE_SRC), sa(FAKE_DST)))
            .to_string()
            .into_bytes(),
        _ => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (sa(FAKE_SRC), sa(FAKE_DST)),
        )
        .build()
        .unwrap(),
    }
}

/// A v2 header padded with a NOOP TLV to exactly `total` bytes: sluice's
/// handshake reads at most 536 bytes, so a 536-byte header fills that read
/// and leaves whatever follows it in the socket.
fn v2_header_of(total: usize) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // TCP over IPv4
    let len = total - 16;
    h.extend_from_slice(&(len as u16).to_be_bytes());
    h.extend_from_slice(&[203, 0, 113, 7, 192, 0, 2, 1]);
    h.extend_from_slice(&4242u16.to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    let pad = len - 12 - 3;
    h.push(0x04); // PP2_TYPE_NOOP
    h.extend_from_slice(&(pad as u16).to_be_bytes());
    h.extend(std::iter::repeat_n(0u8, pad));
    assert_eq!(h.len(), total);
    h
}

/// A raw file route behind accept_proxy: the client sends the header and
/// nothing else, then reads the whole file (it used to get nothing, then
/// a reset at idle_timeout).
#[test]
fn raw_file_after_proxy_header() {
    let p = free_port();
    let (sl, www) = start(
        "sess-raw-pp",
        &route(
            "raw",
            p,
            "file = \"www/f.bin\"\nprotocol = \"raw\"\naccept_proxy = true\nidle_timeout = \"20s\"",
        ),
        &[],
        &[("f.bin", 7, 300_000)],
    );
    let want = gen_file(&www.join("f.bin"), 7, 300_000);
    let headers = [
        ("v1", header("v1")),
        ("v2", header("v2")),
        ("v2-536", v2_header_of(536)),
    ];
    for (what, h) in &headers {
        let mut c = connect(addr(p));
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(h).unwrap();
        let got = recv_data(&mut c);
        assert_eq!(&got, &want, "{what}: raw file bytes differ");
    }
    let a = sl.wait_access(headers.len(), Duration::from_secs(10));
    for l in &a {
        assert_eq!(l["client"], FAKE_SRC, "{l:?}");
        assert_eq!(l["end"], "ok", "{l:?}");
        assert_eq!(l["body_bytes"], "300000", "{l:?}");
    }
}

/// An HTTP file route behind accept_proxy: the request after the header
/// is answered whether it comes in its own write, in the header's write,
/// or waits in the socket behind a header that filled the handshake's
/// read exactly.
#[test]
fn http_file_after_proxy_header() {
    let p = free_port();
    let (sl, www) = start(
        "sess-http-pp",
        &route(
            "http",
            p,
            "root = \"www\"\naccept_proxy = true\nidle_timeout = \"20s\"\nheader_timeout = \"20s\"",
        ),
        &[],
        &[],
    );
    let body = b"behind a load balancer\n";
    write_file(&www, "a.txt", body);
    let req = b"GET /a.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let cases: [(&str, Vec<u8>, bool); 5] = [
        ("v1 separate", header("v1"), true),
        ("v1 together", header("v1"), false),
        ("v2 separate", header("v2"), true),
        ("v2 together", header("v2"), false),
        ("v2-536 together", v2_header_of(536), false),
    ];
    for (what, h, separate) in &cases {
        let mut c = connect(addr(p));
        c.set_nodelay(true).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if *separate {
            c.write_all(h).unwrap();
            c.write_all(req).unwrap();
        } else {
            c.write_all(&[&h[..], &req[..]].concat()).unwrap();
        }
        let mut r = BufReader::new(c);
        let head = read_head(&mut r).unwrap_or_else(|| panic!("{what}: no response"));
        assert_eq!(head.status, 200, "{what}");
        assert_eq!(read_body(&mut r, head.content_length()), body, "{what}");
    }
    let a = sl.wait_access(cases.len(), Duration::from_secs(10));
    for l in &a {
        assert_eq!(
            (
                l["client"].as_str(),
                l["status"].as_str(),
                l["end"].as_str()
            ),
            (FAKE_SRC, "200", "ok"),
            "{l:?}"
        );
    }
}

/// A client that reads slowly gets every byte of a raw file, although
/// sluice has handed the last byte to the kernel long before the client
/// read it and the close timer (min(5 s, idle_timeout)) fires meanwhile.
#[test]
fn slow_reader_gets_the_whole_file() {
    let p = free_port();
    let (sl, www) = start(
        "sess-slow",
        &route(
            "raw",
            p,
            "file = \"www/big.bin\"\nprotocol = \"raw\"\nidle_timeout = \"1s\"",
        ),
        &[],
        &[("big.bin", 11, 3_000_000)],
    );
    let total = 3_000_000u64;
    let want = gen_file(&www.join("big.bin"), 11, total);
    let mut c: TcpStream = connect(addr(p));
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // About 1 MB/s: the transfer outlasts the 1 s close timer, which
    // starts once the file is all in the socket buffers.
    let mut h = sha2_stream();
    let mut buf = vec![0u8; 16 * 1024];
    let mut len = 0u64;
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                len += n as u64;
            }
            Err(e) => panic!("read after {len} of {total} bytes: {e}"),
        }
        thread::sleep(Duration::from_millis(15));
    }
    assert_eq!(h.finish(len), want, "the slow reader lost bytes");
    let a = sl.wait_access(1, Duration::from_secs(10));
    assert_eq!(a[0]["end"], "ok", "{:?}", a[0]);
    assert_eq!(a[0]["body_bytes"], total.to_string());
}

/// A SHA-256 over a stream read piecemeal, ending in a `Digest256`.
struct Sha(sha2::Sha256);

fn sha2_stream() -> Sha {
    use sha2::Digest;
    Sha(sha2::Sha256::new())
}

impl Sha {
    fn update(&mut self, b: &[u8]) {
        use sha2::Digest;
        self.0.update(b);
    }
    fn finish(self, len: u64) -> Digest256 {
        use sha2::Digest;
        Digest256 {
            len,
            sha: self.0.finalize().into(),
        }
    }
}

/// The response head is sent with MSG_MORE, and the next call on that
/// socket sends the body: the kernel holds the head back and sends head
/// and the start of the body in one segment. Checked with strace on every
/// strategy (the body call differs: sendfile, send from the mapping,
/// splice, send).
#[test]
fn response_head_is_sent_with_msg_more() {
    let strategies = ["sendfile", "mmap", "splice", "copy"];
    let mut routes = String::new();
    let mut ports = Vec::new();
    for s in strategies {
        let p = free_port();
        routes += &route(s, p, &format!("root = \"www\"\nstrategy = \"{s}\""));
        ports.push((s, p));
    }
    // Only the one worker makes these calls (logging is write(2), not
    // traced), so no call's line is split by another thread's.
    let trace = Strace::new("sess-more", "sendto,sendmsg,sendfile,splice");
    let wrapper = trace.wrapper();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let (sl, www) = start("sess-more", &routes, &wrapper, &[]);
    let body = b"a small file that fits in the first segment\n";
    write_file(&www, "s.txt", body);
    for (s, p) in &ports {
        let (h, got) = get(addr(*p), "/s.txt");
        assert_eq!((h.status, &got[..]), (200, &body[..]), "{s}");
    }
    let a = sl.wait_access(ports.len(), Duration::from_secs(10));
    drop(sl);
    let text = trace.text();
    let lines: Vec<&str> = text.lines().collect();
    let heads: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("\"HTTP/1.1 200 OK"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(heads.len(), ports.len(), "one head per request:\n{text}");
    let mut seen = Vec::new();
    for i in heads {
        let l = lines[i];
        assert!(
            l.contains("sendto(") && l.contains("MSG_MORE"),
            "head sent without MSG_MORE: {l}"
        );
        // pid, then `sendto(FD, `: the body call that follows on that
        // thread and socket.
        let pid = l.split_whitespace().next().unwrap();
        let fd = &l[l.find("sendto(").unwrap() + 7..];
        let fd = &fd[..fd.find(',').unwrap()];
        let next = lines[i + 1..]
            .iter()
            .find(|n| {
                n.starts_with(pid)
                    && (n.contains(&format!("({fd},")) || n.contains(&format!(", {fd},")))
            })
            .unwrap_or_else(|| panic!("no body call after {l}:\n{text}"));
        let call = next.split_whitespace().nth(1).unwrap();
        let call = &call[..call.find('(').unwrap()];
        assert!(
            !next.contains("MSG_MORE"),
            "the body's last call must push: {next}"
        );
        assert!(
            next.contains(&format!("= {}", body.len())),
            "the whole small body in the call after the head: {next}"
        );
        seen.push(call.to_string());
    }
    seen.sort();
    // The call each strategy sends a body with (an mmap transfer that
    // found no lease says strategy=sendfile).
    let mut want: Vec<&str> = a
        .iter()
        .map(|l| match l["strategy"].as_str() {
            // Send from the mapping; std's write on a socket is send(2).
            "mmap" | "copy" => "sendto",
            s => s,
        })
        .collect();
    want.sort();
    assert_eq!(seen, want, "{a:?}");
    assert!(seen.contains(&"splice".to_string()), "{seen:?}");
}

/// splice from a file that answers EAGAIN (injected by strace into every
/// splice call, or only from the third on, after one pipe-full went) must
/// not spin: the body goes on with sendfile, byte-exact, logged as
/// fallback=file_blocked and counted; what was spliced before the switch
/// counts as spliced.
#[test]
fn splice_from_a_blocked_file_falls_back_to_sendfile() {
    for when in [None, Some("3")] {
        let (p, aport) = (free_port(), free_port());
        let routes = format!(
            "\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n{}",
            route(
                "spl",
                p,
                "root = \"www\"\nstrategy = \"splice\"\nidle_timeout = \"5s\"\n\
                 pipe_size = \"64KiB\""
            )
        );
        let wrapper = match when {
            None => strace_fault("splice", "EAGAIN"),
            Some(w) => strace_fault_when("splice", "EAGAIN", &format!("{w}+")),
        };
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let name = format!("sess-eagain-{}", when.unwrap_or("all"));
        let (sl, _www) = start(&name, &routes, &wrapper, &[("f.bin", 5, 1 << 20)]);
        let (h, body) = get(addr(p), "/f.bin");
        assert_eq!(h.status, 200);
        assert_eq!(
            digest_of(&body),
            send_data(&mut std::io::sink(), 5, 1 << 20)
        );
        let a = sl.wait_access(1, Duration::from_secs(10));
        assert_eq!(
            (
                a[0]["strategy"].as_str(),
                a[0]["fallback"].as_str(),
                a[0]["end"].as_str()
            ),
            ("sendfile", "file_blocked", "ok"),
            "{when:?}: {:?}",
            a[0]
        );
        let m = common::admin::scrape(addr(aport));
        let r = |reason| [("route", "spl"), ("reason", reason)];
        assert_eq!(
            m.get("sluice_route_splice_fallbacks_total", &r("file_blocked")),
            1.0
        );
        assert_eq!(
            m.get("sluice_route_splice_fallbacks_total", &r("no_pipe")),
            0.0
        );
        let bytes = |s| {
            m.get(
                "sluice_route_strategy_bytes_total",
                &[("route", "spl"), ("strategy", s)],
            )
        };
        // From the third call: one pipe-full went by splice (file to pipe,
        // pipe to socket) before the file blocked.
        let spliced = if when.is_some() { 65536.0 } else { 0.0 };
        assert_eq!(
            (bytes("splice"), bytes("sendfile")),
            (spliced, (1 << 20) as f64 - spliced),
            "{when:?}"
        );
    }
}

/// Reading the file fails (EIO, injected by strace into the strategy's
/// file read: the third sendfile or pread, mid-body; the first splice,
/// which always fills the pipe from the file): the transfer is cut and the
/// client reset, on a raw route (no length to check a short file against)
/// and on HTTP, with end=file_error, a warning, and the counter. Before,
/// the client got a clean FIN and the line blamed it (client_error).
/// sendfile's ENOMEM ("insufficient memory to read from in_fd") and EINVAL
/// (no mmap-like reading of in_fd) are the file's side too, as its manual
/// says.
#[test]
fn a_file_read_error_resets_the_client() {
    let total = FAULT_FILE;
    for (strategy, call, when, errno) in [
        ("sendfile", "sendfile", "3", "EIO"),
        ("sendfile", "sendfile", "3", "ENOMEM"),
        ("sendfile", "sendfile", "3", "EINVAL"),
        ("copy", "pread64", "3", "EIO"),
        ("splice", "splice", "1", "EIO"),
    ] {
        let (raw, http, aport) = (free_port(), free_port(), free_port());
        let routes = format!(
            "\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n{}{}",
            raw_file_route(raw, strategy),
            route(
                "web",
                http,
                &format!("root = \"www\"\n{}", chunked(strategy))
            ),
        );
        let sl = start_faulted(
            &format!("sess-{errno}-{strategy}"),
            &routes,
            call,
            errno,
            when,
        );
        // The reset may come before the connect is seen to complete.
        let (got, how) = read_raw_how(addr(raw), 64 << 10);
        let a = sl.wait_access(1, Duration::from_secs(10));
        assert_eq!(
            (how, a[0]["route"].as_str(), a[0]["end"].as_str()),
            (
                Some(std::io::ErrorKind::ConnectionReset),
                "raw",
                "file_error"
            ),
            "{strategy}: got {} bytes; {:?}",
            got.len(),
            a[0]
        );
        assert!((got.len() as u64) < total, "{strategy}");
        // The fault was injected once: HTTP is served whole.
        let (h, b) = get(addr(http), "/f.bin");
        assert_eq!((h.status, b.len() as u64), (200, total), "{strategy}");
        assert!(
            sl.logs()
                .iter()
                .any(|l| l.contains("WARN") && l.contains("reading the file for")),
            "{strategy}"
        );
        let m = common::admin::scrape(addr(aport));
        let r = |route| [("route", route)];
        assert_eq!(
            (
                m.get("sluice_route_file_read_errors_total", &r("raw")),
                m.get("sluice_route_file_read_errors_total", &r("web")),
                m.get("sluice_route_file_truncated_total", &r("raw")),
            ),
            (1.0, 0.0, 0.0),
            "{strategy}"
        );
    }
}

/// A client that pipelines many requests and reads nothing for longer
/// than header_timeout: sluice stops on the full socket (backpressure)
/// and goes on when the client reads, every answer delivered. A response
/// waits under idle_timeout from the moment its request is whole, not
/// under the header_timeout that ran while the request was read.
#[test]
fn a_blocked_pipelined_response_waits_for_idle_timeout() {
    use std::io::{Read, Write};
    let dir = temp_dir("sessions-blocked-head");
    std::fs::create_dir_all(dir.join("www")).unwrap();
    // Empty: every response is a head alone, so sluice blocks on heads.
    std::fs::write(dir.join("www/tiny"), b"").unwrap();
    let p = free_port();
    let toml = format!(
        "[global]\nworkers = 1\n\n[[route]]\nname = \"t\"\nlisten = \"127.0.0.1:{p}\"\n\
         root = \"www\"\nheader_timeout = \"300ms\"\nidle_timeout = \"20s\"\n"
    );
    let _sl = Sluice::start_in(dir, &toml, &[]);
    let mut c = small_buffer_client(std::net::SocketAddr::from(([127, 0, 0, 1], p)), 4096);
    // More answers than the socket buffers hold (a few MiB at most).
    const N: usize = 40_000;
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let one = b"GET /tiny HTTP/1.1\r\nHost: t\r\n\r\n";
        let all: Vec<u8> = one.iter().copied().cycle().take(one.len() * N).collect();
        w.write_all(&all).unwrap();
    });
    // Longer than header_timeout: sluice is blocked on a full socket.
    std::thread::sleep(Duration::from_secs(1));
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    let (mut answers, mut scanned) = (0usize, 0usize);
    while answers < N {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                let from = scanned.saturating_sub(11);
                answers += got[from..]
                    .windows(12)
                    .filter(|w| *w == b"HTTP/1.1 200")
                    .count();
                scanned = got.len();
                // Keep only a tail: the count is what matters.
                if got.len() > 1 << 20 {
                    got.drain(..got.len() - 64);
                    scanned = got.len();
                }
            }
            Err(e) => panic!("after {answers} answers: {e}"),
        }
    }
    writer.join().unwrap();
    assert_eq!(answers, N);
    // The last answer is whole: a head with nothing after it.
    assert!(
        got.ends_with(b"Accept-Ranges: bytes\r\n\r\n"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
}

/// A TCP socket whose peer vanished reports the last ICMP error it got
/// after a retransmission or keepalive timeout (tcp_write_err: sk_err =
/// sk_err_soft ?: ETIMEDOUT): ECONNREFUSED from a firewall's
/// port-unreachable, EPROTO. sendfile returns it (injected by strace
/// here); the file still reads, so it is the client's error, not a file
/// error. The body is cut all the same: the client gets a reset, never a
/// FIN that would make a short raw file look whole (a socket that really
/// failed loses nothing by it).
#[test]
fn a_socket_soft_error_is_not_a_file_error() {
    for errno in ["ECONNREFUSED", "EPROTO"] {
        let raw = free_port();
        let sl = start_faulted(
            &format!("sess-soft-{errno}"),
            &raw_file_route(raw, "sendfile"),
            "sendfile",
            errno,
            "3",
        );
        // The reset may come before the connect is seen to complete.
        let (got, how) = read_raw_how(addr(raw), 64 << 10);
        let a = sl.wait_access(1, Duration::from_secs(10));
        assert_eq!(a[0]["end"], "client_error", "{errno}: {:?}", a[0]);
        assert_eq!(
            how,
            Some(std::io::ErrorKind::ConnectionReset),
            "{errno}: after {} bytes",
            got.len()
        );
        assert!((got.len() as u64) < FAULT_FILE, "{errno}");
        assert!(
            !sl.logs().iter().any(|l| l.contains("reading the file for")),
            "{errno}: {:?}",
            sl.logs()
        );
    }
}
