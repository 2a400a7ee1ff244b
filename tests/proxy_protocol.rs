//! PROXY protocol through the real binary: headers sluice sends as a real
//! backend parses them with `ppp` (v1 and v2, IPv4 and IPv6), headers it
//! accepts from a front load balancer (the address they carry reaches the
//! backend, the access log, `deny` and `source-hash`), and headers it must
//! refuse (malformed, too long, too slow) — each closed, logged, counted.

mod common;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::*;

const KIB: u64 = 1024;

/// The fake client a front load balancer reports: documentation ranges,
/// only ever written into headers, never connected to.
const FAKE_SRC: &str = "203.0.113.7:4242";
const FAKE_DST: &str = "192.0.2.1:443";

fn cfg(listen: &str, backends: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "[global]\nworkers = 1\n\n[[route]]\nname = \"pp\"\nlisten = \"{listen}\"\nbackends = [{}]\n{extra}\n",
        list.join(", ")
    )
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn header(version: &str, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    match version {
        "v1" => ppp::v1::Addresses::from((src, dst))
            .to_string()
            .into_bytes(),
        _ => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (src, dst),
        )
        .build()
        .unwrap(),
    }
}

/// send_proxy: connect from `from` to sluice at `listen`; the backend must
/// see a header naming exactly that client socket and sluice's address,
/// before any client byte; then the relay must be byte-exact.
fn send_proxy(version: &str, listen: SocketAddr, from: IpAddr) {
    let b = proxy_backend();
    let sl = Sluice::start(
        &format!("send-{version}"),
        &cfg(
            &listen.to_string(),
            &[b.addr],
            &format!("send_proxy = \"{version}\""),
        ),
    );
    let mut c = connect_from(from, listen);
    let me = c.local_addr().unwrap();
    // Client bytes sent at once must still come after the header.
    c.write_all(b"first client bytes\n").unwrap();
    let kind = match (version, listen.is_ipv6()) {
        ("v1", false) => "TCP4",
        ("v1", true) => "TCP6",
        _ => "PROXY",
    };
    assert_eq!(read_line(&mut c), format!("{version} {kind} {me} {listen}"));
    assert_eq!(read_line(&mut c), "first client bytes");
    assert_echo(c, 11, 512 * KIB);
    let a = sl.wait_access(1, Duration::from_secs(10));
    // The header is sluice's own: not counted as client bytes.
    let first = "first client bytes\n".len() as u64;
    assert_eq!(a[0]["bytes_in"], (512 * KIB + first).to_string());
    assert_eq!(a[0]["client"], me.to_string());
}

#[test]
fn send_proxy_v1_ipv4() {
    send_proxy("v1", v4(free_port()), IpAddr::from([127, 0, 0, 2]));
}

#[test]
fn send_proxy_v2_ipv4() {
    send_proxy("v2", v4(free_port()), IpAddr::from([127, 0, 0, 3]));
}

/// A free port on [::1], or None when this host has no IPv6 loopback.
fn v6_listen() -> Option<SocketAddr> {
    match TcpListener::bind("[::1]:0") {
        Ok(l) => Some(l.local_addr().unwrap()),
        Err(e) => {
            eprintln!("skipping the IPv6 case: cannot bind [::1]: {e}");
            None
        }
    }
}

#[test]
fn send_proxy_v1_ipv6() {
    if let Some(l) = v6_listen() {
        send_proxy("v1", l, "::1".parse().unwrap());
    }
}

#[test]
fn send_proxy_v2_ipv6() {
    if let Some(l) = v6_listen() {
        send_proxy("v2", l, "::1".parse().unwrap());
    }
}

/// accept_proxy + send_proxy: the header sluice receives names a client
/// that never connected; the backend sees that client re-sent (with the
/// destination the front balancer reported), the access log names it,
/// and the bytes that came in the same segment as the header are the
/// first the backend gets after its own header.
fn accept_and_resend(inbound: &str, outbound: &str) {
    let b = proxy_backend();
    let port = free_port();
    let sl = Sluice::start(
        &format!("accept-{inbound}-{outbound}"),
        &cfg(
            &v4(port).to_string(),
            &[b.addr],
            &format!("accept_proxy = true\nsend_proxy = \"{outbound}\""),
        ),
    );
    let mut c = connect(v4(port));
    let real = c.local_addr().unwrap();
    let mut first = header(inbound, sa(FAKE_SRC), sa(FAKE_DST));
    first.extend_from_slice(b"early bytes\n");
    c.write_all(&first).unwrap();
    let kind = if outbound == "v1" { "TCP4" } else { "PROXY" };
    assert_eq!(
        read_line(&mut c),
        format!("{outbound} {kind} {FAKE_SRC} {FAKE_DST}")
    );
    assert_eq!(read_line(&mut c), "early bytes");
    assert_echo(c, 12, 256 * KIB);
    let a = sl.wait_access(1, Duration::from_secs(10));
    assert_eq!(a[0]["client"], FAKE_SRC, "{a:?}");
    assert_eq!(a[0]["via"], real.to_string(), "{a:?}");
    assert_eq!(a[0]["bytes_in"], (256 * KIB + 12).to_string());
}

#[test]
fn accepts_v1_and_resends_v1() {
    accept_and_resend("v1", "v1");
}

#[test]
fn accepts_v1_and_resends_v2() {
    accept_and_resend("v1", "v2");
}

#[test]
fn accepts_v2_and_resends_v1() {
    accept_and_resend("v2", "v1");
}

#[test]
fn accepts_v2_and_resends_v2() {
    accept_and_resend("v2", "v2");
}

/// Without send_proxy the header is stripped: the backend's stream starts
/// with the client's first byte after it, even when a large payload came
/// in the same write as the header and the route splices.
#[test]
fn accepted_header_is_stripped_and_nothing_after_it_is_lost() {
    let b = Backend::spawn(|s| {
        let d = recv_data(&mut &s);
        format!("{}:{:x?}", d.len, d.sha)
    });
    let port = free_port();
    let sl = Sluice::start(
        "accept-strip",
        &cfg(
            &v4(port).to_string(),
            &[b.addr],
            "accept_proxy = true\nstrategy = \"splice\"",
        ),
    );
    for (i, version) in ["v1", "v2"].iter().enumerate() {
        let mut c = connect(v4(port));
        let len = 2 * 1024 * KIB;
        let mut data = header(version, sa(FAKE_SRC), sa(FAKE_DST));
        let hl = data.len();
        let mut body = Vec::new();
        let want = send_data(&mut body, 20 + i as u64, len);
        data.extend_from_slice(&body);
        c.write_all(&data).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let r = b.wait_results(i + 1, Duration::from_secs(20));
        assert_eq!(
            r[i],
            format!("{}:{:x?}", want.len, want.sha),
            "{version}: header of {hl} bytes"
        );
    }
    let a = sl.wait_access(2, Duration::from_secs(10));
    assert!(a.iter().all(|l| l["client"] == FAKE_SRC), "{a:?}");
}

/// A header that arrives in pieces is still read whole.
#[test]
fn a_header_split_over_several_segments_is_assembled() {
    let b = proxy_backend();
    let port = free_port();
    let _sl = Sluice::start(
        "accept-split",
        &cfg(
            &v4(port).to_string(),
            &[b.addr],
            "accept_proxy = true\nsend_proxy = \"v2\"",
        ),
    );
    for version in ["v1", "v2"] {
        let mut c = connect(v4(port));
        c.set_nodelay(true).unwrap();
        let h = header(version, sa(FAKE_SRC), sa(FAKE_DST));
        for piece in h.chunks(5) {
            c.write_all(piece).unwrap();
            // Let each piece leave as its own segment (if it coalesces,
            // the test is only less strict, never wrong).
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            read_line(&mut c),
            format!("v2 PROXY {FAKE_SRC} {FAKE_DST}"),
            "{version}"
        );
        assert_echo(c, 13, 64 * KIB);
    }
}

/// v2 LOCAL and v1 UNKNOWN: the connection is the balancer's own; sluice
/// uses the real socket addresses.
#[test]
fn local_and_unknown_headers_use_the_socket_address() {
    let b = proxy_backend();
    let port = free_port();
    let sl = Sluice::start(
        "accept-local",
        &cfg(
            &v4(port).to_string(),
            &[b.addr],
            "accept_proxy = true\nsend_proxy = \"v1\"",
        ),
    );
    let local = ppp::v2::Builder::new(
        ppp::v2::Version::Two | ppp::v2::Command::Local,
        ppp::v2::AddressFamily::Unspecified | ppp::v2::Protocol::Unspecified,
    )
    .build()
    .unwrap();
    // Addresses of another transport (UDP) are not this connection's.
    let udp = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Datagram,
        (sa(FAKE_SRC), sa(FAKE_DST)),
    )
    .build()
    .unwrap();
    let headers = [
        local,
        b"PROXY UNKNOWN\r\n".to_vec(),
        // Anything after UNKNOWN is ignored, however many words.
        b"PROXY UNKNOWN a b c d e f\r\n".to_vec(),
        udp,
    ];
    for (i, h) in headers.iter().enumerate() {
        let mut c = connect(v4(port));
        let me = c.local_addr().unwrap();
        c.write_all(h).unwrap();
        assert_eq!(read_line(&mut c), format!("v1 TCP4 {me} {}", v4(port)));
        assert_echo(c, 14, 16 * KIB);
        let a = sl.wait_access(i + 1, Duration::from_secs(10));
        assert_eq!(a[i]["client"], me.to_string());
        assert!(!a[i].contains_key("via"), "{a:?}");
    }
}

/// `deny` judges the address in the header, not the balancer's.
#[test]
fn deny_applies_to_the_address_in_the_header() {
    let b = proxy_backend();
    let port = free_port();
    let sl = Sluice::start(
        "accept-deny",
        &cfg(
            &v4(port).to_string(),
            &[b.addr],
            "accept_proxy = true\nsend_proxy = \"v1\"\ndeny = [\"203.0.113.0/24\"]",
        ),
    );
    for version in ["v1", "v2"] {
        let mut c = connect(v4(port));
        c.write_all(&header(version, sa(FAKE_SRC), sa(FAKE_DST)))
            .unwrap();
        assert_closed(&mut c, version);
    }
    let a = sl.wait_ends("denied", 2, Duration::from_secs(5));
    assert!(
        a.iter()
            .filter(|l| l["end"] == "denied")
            .all(|l| l["client"] == FAKE_SRC && l.contains_key("via")),
        "{a:?}"
    );
    assert_eq!(b.accepted(), 0, "no backend connect for a denied client");
    // Another address through the same balancer is let in.
    let mut c = connect(v4(port));
    c.write_all(&header("v2", sa("198.51.100.9:5000"), sa(FAKE_DST)))
        .unwrap();
    assert_eq!(
        read_line(&mut c),
        format!("v1 TCP4 198.51.100.9:5000 {FAKE_DST}")
    );
    assert_echo(c, 15, 4 * KIB);
}

#[test]
fn only_the_listed_balancers_may_send_a_header() {
    let b = proxy_backend();
    let port = free_port();
    let sl = Sluice::start(
        "accept-from",
        &cfg(
            &v4(port).to_string(),
            &[b.addr],
            "accept_proxy = true\naccept_proxy_from = [\"127.0.0.2/32\", \"10.0.0.0/8\"]\nsend_proxy = \"v1\"",
        ),
    );
    // A balancer on the list names its client.
    let mut c = connect_from([127, 0, 0, 2].into(), v4(port));
    c.write_all(&header("v1", sa(FAKE_SRC), sa(FAKE_DST)))
        .unwrap();
    assert_eq!(read_line(&mut c), format!("v1 TCP4 {FAKE_SRC} {FAKE_DST}"));
    assert_echo(c, 16, 4 * KIB);
    // Anyone else is refused before a byte is read: a valid header does
    // not get them in, and no backend is connected.
    for (i, from) in [[127, 0, 0, 1], [127, 0, 0, 3]].into_iter().enumerate() {
        // Refused at once: even the connect may already see the reset.
        let Ok(mut c) = try_connect_from(from.into(), v4(port)) else {
            continue;
        };
        let _ = c.write_all(&header("v2", sa(FAKE_SRC), sa(FAKE_DST)));
        assert_closed(&mut c, &format!("untrusted sender {i}"));
    }
    let a = sl.wait_ends("denied", 2, Duration::from_secs(5));
    let denied: Vec<&str> = a
        .iter()
        .filter(|l| l["end"] == "denied")
        .map(|l| l["client"].as_str())
        .collect();
    assert_eq!(denied.len(), 2, "{a:?}");
    assert!(
        denied[0].starts_with("127.0.0.1:") && denied[1].starts_with("127.0.0.3:"),
        "the sender's own address is logged: {denied:?}"
    );
    assert_eq!(
        b.accepted(),
        1,
        "only the trusted balancer's client reached it"
    );
}

/// `source-hash` balances on the address in the header: every connection
/// comes from 127.0.0.1, yet different header addresses spread over the
/// backends, and each sticks to one.
#[test]
fn source_hash_uses_the_address_in_the_header() {
    let names = ["a", "b", "c"];
    let bs: Vec<Backend> = names.iter().map(|n| Backend::named(n)).collect();
    let port = free_port();
    let addrs: Vec<SocketAddr> = bs.iter().map(|b| b.addr).collect();
    let _sl = Sluice::start(
        "accept-hash",
        &cfg(
            &v4(port).to_string(),
            &addrs,
            "accept_proxy = true\nbalance = \"source-hash\"",
        ),
    );
    let pick = |ip: Ipv4Addr, sport: u16| {
        let mut c = connect(v4(port));
        c.write_all(&header("v1", SocketAddr::from((ip, sport)), sa(FAKE_DST)))
            .unwrap();
        read_line(&mut c)
    };
    let mut seen = std::collections::HashSet::new();
    for i in 1..=12u8 {
        let ip = Ipv4Addr::new(203, 0, 113, i);
        let first = pick(ip, 1000);
        assert!(names.contains(&first.as_str()), "{first:?}");
        for sport in [2000, 3000] {
            assert_eq!(pick(ip, sport), first, "{ip} moved to another backend");
        }
        seen.insert(first);
    }
    assert!(seen.len() >= 2, "all 12 addresses on one backend: {seen:?}");
}

/// Headers that are not headers: each connection is closed without a
/// backend connect, logged with its reason, and counted.
#[test]
fn malformed_and_oversized_headers_are_refused() {
    let b = proxy_backend();
    let port = free_port();
    let mut sl = Sluice::start(
        "accept-bad",
        &cfg(
            &v4(port).to_string(),
            &[b.addr],
            "accept_proxy = true\nsend_proxy = \"v1\"",
        ),
    );
    let mut bad_version = header("v2", sa(FAKE_SRC), sa(FAKE_DST));
    bad_version[12] = 0x31; // version 3
    let mut huge_v2 = ppp::v2::PROTOCOL_PREFIX.to_vec();
    huge_v2.extend([0x21, 0x11, 0x07, 0xd0]); // announces 2000 bytes
    let mut long_v1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 443".to_vec();
    long_v1.extend([b' '; 100]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "http",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "starts with neither",
        ),
        (
            "bad address",
            b"PROXY TCP4 203.0.113.999 192.0.2.1 4242 443\r\n".to_vec(),
            "invalid IP address",
        ),
        ("v2 version 3", bad_version, "version"),
        // Its line is over: refused at once, not at header_timeout.
        (
            "v1 line cut short",
            b"PROXY TCP4 203.0.113.7\r\n".to_vec(),
            "the v1 line ended early",
        ),
        (
            "v1 UNKNOWN without CR",
            b"PROXY UNKNOWN 203.0.113.7\n".to_vec(),
            "does not end with CRLF",
        ),
        ("v2 too long", huge_v2, "longer than"),
        ("v1 too long", long_v1, "longer than"),
    ];
    for (i, (what, bytes, why)) in cases.iter().enumerate() {
        let mut c = connect(v4(port));
        c.write_all(bytes).unwrap();
        assert_closed(&mut c, what);
        let a = sl.wait_ends("bad_proxy_header", i + 1, Duration::from_secs(5));
        let line = a.iter().filter(|l| l["end"] == "bad_proxy_header").nth(i);
        let err = &line.unwrap()["error"];
        assert!(err.contains(why), "{what}: error={err}");
    }
    assert_eq!(b.accepted(), 0, "no backend connect for a bad header");
    assert!(sl.count_log("PROXY header") >= cases.len());
    // The route still works for a good header.
    let mut c = connect(v4(port));
    c.write_all(&header("v1", sa(FAKE_SRC), sa(FAKE_DST)))
        .unwrap();
    assert_eq!(read_line(&mut c), format!("v1 TCP4 {FAKE_SRC} {FAKE_DST}"));
    drop(c);
    sl.wait_log("client_closed", Duration::from_secs(5));
}

/// A header that never completes is cut at header_timeout; a client that
/// connects and leaves without a byte (a TCP health check) is not counted
/// as a bad header.
#[test]
fn slow_or_missing_headers_time_out() {
    let b = proxy_backend();
    let port = free_port();
    let sl = Sluice::start(
        "accept-slow",
        &cfg(
            &v4(port).to_string(),
            &[b.addr],
            "accept_proxy = true\nheader_timeout = \"300ms\"",
        ),
    );
    let t = Instant::now();
    let mut silent = connect(v4(port));
    let mut partial = connect(v4(port));
    partial.write_all(b"PROXY TCP4 203.0.113.7 ").unwrap();
    assert_closed(&mut silent, "silent client");
    assert_closed(&mut partial, "partial header");
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "closed before header_timeout: {:?}",
        t.elapsed()
    );
    let a = sl.wait_ends("bad_proxy_header", 2, Duration::from_secs(5));
    for l in a.iter().filter(|l| l["end"] == "bad_proxy_header") {
        assert!(l["error"].contains("header_timeout"), "{l:?}");
    }
    assert!(
        a.iter().any(|l| l["error"].contains("23 bytes received")),
        "{a:?}"
    );
    // Connect and close at once: an empty connection, not an error.
    drop(connect(v4(port)));
    let a = sl.wait_ends("client_closed", 1, Duration::from_secs(5));
    assert_eq!(
        a.iter().filter(|l| l["end"] == "bad_proxy_header").count(),
        2
    );
    assert_eq!(b.accepted(), 0);
}

/// An IPv6 client named in the header of an IPv4 connection is re-sent
/// as TCP6 (v1) / an IPv6 block (v2).
#[test]
fn an_ipv6_client_in_the_header_is_resent_as_ipv6() {
    let b = proxy_backend();
    let port = free_port();
    let src = sa("[2001:db8::7]:4242");
    let dst = sa("[2001:db8::1]:443");
    for outbound in ["v1", "v2"] {
        let _sl = Sluice::start(
            &format!("accept-v6-{outbound}"),
            &cfg(
                &v4(port).to_string(),
                &[b.addr],
                &format!(
                    "accept_proxy = true\nsend_proxy = \"{outbound}\"\ndeny = [\"2001:db8::/64\"]\nallow = [\"2001:db8::/32\"]"
                ),
            ),
        );
        // Denied by the /64, whatever the socket's address.
        let mut c = connect(v4(port));
        c.write_all(&header("v2", src, dst)).unwrap();
        assert_closed(&mut c, "2001:db8::7 is denied");
        // Allowed outside it.
        let other = sa("[2001:db8:1::9]:4242");
        let mut c = connect(v4(port));
        c.write_all(&header("v1", other, dst)).unwrap();
        let kind = if outbound == "v1" { "TCP6" } else { "PROXY" };
        assert_eq!(
            read_line(&mut c),
            format!("{outbound} {kind} {other} {dst}")
        );
        assert_echo(c, 16, 8 * KIB);
    }
}

/// The header goes to the backend that answered, once, even after a
/// failed connect to another.
#[test]
fn send_proxy_survives_failover_and_is_sent_once() {
    let dead = v4(free_port());
    let b = proxy_backend();
    let port = free_port();
    let sl = Sluice::start(
        "send-failover",
        &cfg(
            &v4(port).to_string(),
            &[dead, b.addr],
            "send_proxy = \"v2\"\nbalance = \"round-robin\"",
        ),
    );
    for i in 0..2 {
        let mut c = connect(v4(port));
        let me = c.local_addr().unwrap();
        c.write_all(b"PROXY-looking client bytes\n").unwrap();
        assert_eq!(read_line(&mut c), format!("v2 PROXY {me} {}", v4(port)));
        // What follows the header is the client's, untouched.
        assert_eq!(read_line(&mut c), "PROXY-looking client bytes");
        assert_echo(c, 17 + i, 32 * KIB);
    }
    let a = sl.wait_access(2, Duration::from_secs(10));
    assert!(
        a.iter().all(|l| l["backend"] == b.addr.to_string()),
        "{a:?}"
    );
    assert!(
        sl.count_log("connect failed") >= 1,
        "the dead backend was tried"
    );
}
