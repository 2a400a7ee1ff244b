//! Hostile input through the real binary, over real sockets: hundreds of
//! malformed, oversized, truncated, abandoned and reset requests against an
//! HTTP file route; PROXY headers that are not headers against an
//! `accept_proxy` route; junk and idle clients against the admin listener.
//! Each case runs on its own connection and must get a well-formed HTTP/1.x
//! status of the expected class, or a close, promptly: never a hang.
//!
//! Afterwards the process must be alive and serving (a byte-exact GET),
//! every bad request logged (access lines) and counted (`/metrics`, exact
//! deltas where the code makes them deterministic), no descriptor left open
//! (`/proc/PID/fd`, with the open-file cache off so the count is exact) and
//! the process must not spin (CPU time over one second with clients stalled
//! in every waiting state, and over one second with none).
//!
//! Cases come from a seeded generator (`common::DataGen`): the seed is
//! printed; `SLUICE_HOSTILE_SEED=0x... cargo test --test hostile_input`
//! replays another one. A failure lists each failing case with its bytes.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::admin::{self, Metrics, scrape, scrape_until};
use common::*;

const DEFAULT_SEED: u64 = 0x5EED_4057_11E5_0001;
/// The file every valid request asks for (and the GET at the end checks).
const KNOWN_LEN: u64 = 10_000;
/// Large enough that a response cannot sit whole in the socket buffers
/// when the client resets in the middle of it.
const BIG_LEN: u64 = 32 << 20;
/// Written outside the route's root: no response may ever contain it.
const SECRET: &[u8] = b"TOP-SECRET-hostile-input-7f3a";
/// The file route's header_timeout (a stalled request head gets 408).
const HEADER_TIMEOUT: Duration = Duration::from_millis(700);
/// Client threads running the cases.
const CLIENTS: usize = 8;
/// sluice's limits (src/http/mod.rs), tested at their edges.
const MAX_TARGET: usize = 8 * 1024;
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// The admin listener's limit on a request head.
const ADMIN_MAX_REQUEST: usize = 8 * 1024;
/// Statuses a hostile request may get from the file route when what it
/// turns into is not fully predictable (random bytes): all refusals.
const REFUSED: &[u16] = &[400, 404, 405, 414, 431];

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Deterministic choices on top of the harness's xorshift generator.
struct Rng(DataGen);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(DataGen::new(seed))
    }
    fn next(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.0.fill(&mut b);
        u64::from_le_bytes(b)
    }
    /// In 0..n (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// In lo..=hi.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.0.fill(&mut v);
        v
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    fn of_set(&mut self, set: &[u8], n: usize) -> Vec<u8> {
        (0..n).map(|_| *self.pick(set)).collect()
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Http,
    Proxy,
    Admin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Send, shut down writing, read until sluice closes.
    HalfClose,
    /// Send, then read until sluice closes without shutting down (a
    /// client that stalls in the middle of its request).
    KeepOpen,
    /// Send, then close at once without reading anything.
    Abandon,
    /// Send, read the head of the first response, then reset (SO_LINGER 0)
    /// while the body is still coming.
    ResetAfterHead,
    /// Send, then reset at once (SO_LINGER 0).
    ResetAfterSend,
    /// Send one byte per segment, 2 ms apart, then as `HalfClose`.
    Drip,
}

/// Which file a 200 must carry, byte for byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    Known,
    Inner,
}

struct Case {
    target: Target,
    what: String,
    bytes: Vec<u8>,
    mode: Mode,
    /// Responses that must come back, in order: the statuses allowed for each.
    must: Vec<Vec<u16>>,
    /// Then at most one more, with one of these statuses.
    may: Vec<u16>,
    /// The responses have no body (HEAD requests that parse).
    head: bool,
    /// The request line says HTTP/1.0, so a status line may too.
    http10: bool,
    /// The `end=` reason sluice must log and count for the connection;
    /// None: `client_closed` or `client_reset` (a race with the client).
    end: Option<&'static str>,
    /// A response sluice sends (and counts) that the client never reads.
    unread: Option<u16>,
    /// What a 200 carries (None: any file inside the root).
    body: Option<Body>,
    /// Check 206/416 answers against the known file.
    range: bool,
}

impl Case {
    fn new(target: Target, what: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Case {
        Case {
            target,
            what: what.into(),
            bytes: bytes.into(),
            mode: Mode::HalfClose,
            must: Vec::new(),
            may: Vec::new(),
            head: false,
            http10: false,
            end: Some(match target {
                Target::Proxy => "bad_proxy_header",
                _ => "client_closed",
            }),
            unread: None,
            body: None,
            range: false,
        }
    }
    fn http(what: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Case {
        Case::new(Target::Http, what, bytes)
    }
    fn mode(mut self, m: Mode) -> Case {
        self.mode = m;
        self
    }
    fn must(mut self, statuses: &[u16]) -> Case {
        self.must.push(statuses.to_vec());
        self
    }
    fn may(mut self, statuses: &[u16]) -> Case {
        self.may = statuses.to_vec();
        self
    }
    fn end(mut self, end: Option<&'static str>) -> Case {
        self.end = end;
        self
    }
    fn body(mut self, b: Body) -> Case {
        self.body = Some(b);
        self
    }
    fn http10(mut self) -> Case {
        self.http10 = true;
        self
    }
    fn head(mut self) -> Case {
        self.head = true;
        self
    }
}

/// `METHOD target HTTP/1.1` with a Host and `extra` header lines.
fn req(method: &str, target: &[u8], extra: &str) -> Vec<u8> {
    let mut r = format!("{method} ").into_bytes();
    r.extend_from_slice(target);
    r.extend_from_slice(format!(" HTTP/1.1\r\nHost: t\r\n{extra}\r\n").as_bytes());
    r
}

fn get_known(extra: &str) -> Vec<u8> {
    req("GET", b"/known.txt", extra)
}

/// `get_known` with header bytes that need not be UTF-8.
fn get_known_raw(extra: &[u8]) -> Vec<u8> {
    let mut r = b"GET /known.txt HTTP/1.1\r\nHost: t\r\n".to_vec();
    r.extend_from_slice(extra);
    r.extend_from_slice(b"\r\n");
    r
}

/// At most 160 bytes of `b`, escaped, for a failure message.
fn preview(b: &[u8]) -> String {
    let shown: String = b
        .iter()
        .take(160)
        .flat_map(|c| c.escape_ascii())
        .map(char::from)
        .collect();
    if b.len() > 160 {
        format!("\"{shown}\"... ({} bytes)", b.len())
    } else {
        format!("\"{shown}\"")
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------
// What sluice's documented path rules answer (README, config.toml.example:
// "`..`, escapes and symlinks leading out get 404"; dotfiles off; no index).
// ---------------------------------------------------------------------------

/// The status (and file, for 200) a GET of `target` must get on the test
/// root, which holds `known.txt` and `sub/in.txt`.
fn path_model(target: &[u8]) -> (u16, Option<Body>) {
    if target.len() > MAX_TARGET {
        return (414, None);
    }
    // Not a request-target byte at all: the request line does not parse.
    if target.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return (400, None);
    }
    let Ok(t) = std::str::from_utf8(target) else {
        return (400, None);
    };
    // origin-form, or absolute-form with an http(s) scheme.
    let lower = t.to_ascii_lowercase();
    let path = if t.starts_with('/') {
        t
    } else if let Some(n) = ["http://", "https://"]
        .iter()
        .find(|s| lower.starts_with(**s))
        .map(|s| s.len())
    {
        let rest = &t[n..];
        rest.find('/').map(|i| &rest[i..]).unwrap_or("/")
    } else {
        return (400, None);
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    let mut decoded = Vec::new();
    let p = path.as_bytes();
    let mut i = 0;
    while i < p.len() {
        if p[i] == b'%' {
            let hex = p
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => decoded.push(b),
                None => return (400, None),
            }
            i += 3;
        } else {
            decoded.push(p[i]);
            i += 1;
        }
    }
    if decoded.contains(&0) {
        return (404, None);
    }
    let mut comps: Vec<&[u8]> = Vec::new();
    for c in decoded.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return (404, None),
            c if c[0] == b'.' => return (404, None),
            c => comps.push(c),
        }
    }
    // A file named as a folder (`/known.txt/`) is not found; the slash is
    // judged on the target as sent, so `%2f` does not count.
    if path.ends_with('/') {
        return (404, None);
    }
    match comps.as_slice() {
        [b"known.txt"] => (200, Some(Body::Known)),
        [b"sub", b"in.txt"] => (200, Some(Body::Inner)),
        _ => (404, None),
    }
}

// ---------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------

fn http_cases(rng: &mut Rng, secret_path: &str) -> Vec<Case> {
    let mut v = Vec::new();

    // Random bytes.
    for i in 0..50 {
        let n = if rng.chance(80) {
            rng.range(1, 300)
        } else {
            rng.range(301, 6000)
        };
        v.push(Case::http(format!("random bytes #{i}"), rng.bytes(n)).may(REFUSED));
    }

    // Random request-like lines: odd methods, targets, versions, headers.
    const METHODS: &[&str] = &[
        "GET", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "CONNECT", "PATCH", "get", "G\0T",
        "GET\t", "", "BREW", "M-SEARCH", "GET GET",
    ];
    const VERSIONS: &[&str] = &[
        "HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/2.0", "HTTP/0.9", "http/1.1", "HTTP/1.",
        "HTTP/11", "",
    ];
    let target_set: &[u8] =
        b"/abcdekntx0123456789.-_~%?#&=+;:@!$'()*,\\[]{}|^`\"<> \x00\x7f\xc3\xa9\xff";
    let header_set: &[u8] = b"abcXYZ-_:; =,\"\t0123456789\x00\x01\r\n\x7f\xff";
    for i in 0..40 {
        let method = *rng.pick(METHODS);
        let version = *rng.pick(VERSIONS);
        let n = rng.range(0, 60);
        let target = rng.of_set(target_set, n);
        let eol: &[u8] = if rng.chance(85) { b"\r\n" } else { b"\n" };
        let mut b = format!("{method} ").into_bytes();
        b.extend_from_slice(&target);
        b.push(b' ');
        b.extend_from_slice(version.as_bytes());
        b.extend_from_slice(eol);
        if rng.chance(60) {
            b.extend_from_slice(b"Host: t");
            b.extend_from_slice(eol);
        }
        for _ in 0..rng.range(0, 6) {
            let n = rng.range(1, 40);
            b.extend(rng.of_set(header_set, n));
            b.extend_from_slice(eol);
        }
        if rng.chance(85) {
            b.extend_from_slice(eol);
        }
        let mut c = Case::http(format!("request-like #{i}"), b)
            .may(&[200, 206, 304, 400, 404, 405, 414, 416, 431]);
        c.http10 = version == "HTTP/1.0";
        v.push(c);
    }

    // Truncated requests: every prefix of a request is incomplete.
    let full: [&[u8]; 2] = [
        b"GET /known.txt HTTP/1.1\r\nHost: t\r\nRange: bytes=1-2\r\nUser-Agent: hostile\r\n\r\n",
        b"GET /sub/in.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    ];
    for i in 0..25 {
        let f = rng.pick(&full);
        let cut = rng.range(1, f.len() - 1);
        v.push(Case::http(
            format!("truncated at {cut}, then EOF #{i}"),
            &f[..cut],
        ));
    }
    // ... and a client that stalls there gets 408 at header_timeout.
    for i in 0..8 {
        let f = rng.pick(&full);
        let cut = rng.range(1, f.len() - 1);
        v.push(
            Case::http(format!("truncated at {cut}, then silence #{i}"), &f[..cut])
                .mode(Mode::KeepOpen)
                .must(&[408]),
        );
    }
    // ... or resets there.
    for i in 0..4 {
        let f = rng.pick(&full);
        let cut = rng.range(1, f.len() - 1);
        v.push(
            Case::http(format!("truncated at {cut}, then reset #{i}"), &f[..cut])
                .mode(Mode::ResetAfterSend)
                .end(Some("client_reset")),
        );
    }
    // A request that comes one byte per segment is assembled.
    for (i, f) in full.iter().enumerate() {
        let mut c = Case::http(format!("one byte at a time #{i}"), *f)
            .mode(Mode::Drip)
            .must(&[if i == 0 { 206 } else { 200 }]);
        c.range = i == 0;
        c.http10 = i == 1;
        v.push(c);
    }
    // ... and one that sends half a request then closes.
    for i in 0..8 {
        let f = rng.pick(&full);
        let cut = rng.range(1, f.len() - 1);
        v.push(
            Case::http(
                format!("half a request ({cut} bytes), then close #{i}"),
                &f[..cut],
            )
            .mode(Mode::Abandon),
        );
    }

    // Limits, at and past their edges.
    for i in 0..4 {
        let n = rng.range(MAX_HEAD, 200 * 1024);
        let big = format!("X-Big: {}\r\n", "y".repeat(n));
        v.push(Case::http(format!("{n}-byte header #{i}"), get_known(&big)).must(&[431]));
    }
    for i in 0..3 {
        let n = rng.range(MAX_HEADERS + 1, 400);
        let many: String = (0..n).map(|k| format!("X-{k}: v\r\n")).collect();
        v.push(Case::http(format!("{n} more headers #{i}"), get_known(&many)).must(&[431]));
    }
    let many: String = (1..MAX_HEADERS).map(|k| format!("X-{k}: v\r\n")).collect();
    v.push(
        Case::http("exactly MAX_HEADERS headers", get_known(&many))
            .must(&[200])
            .body(Body::Known),
    );
    let many: String = (0..MAX_HEADERS).map(|k| format!("X-{k}: v\r\n")).collect();
    v.push(Case::http("MAX_HEADERS + 1 headers", get_known(&many)).must(&[431]));
    for (len, status) in [(MAX_HEAD, 200), (MAX_HEAD + 1, 431)] {
        let base = get_known("X-Pad: \r\n").len();
        let pad = format!("X-Pad: {}\r\n", "p".repeat(len - base));
        let r = get_known(&pad);
        assert_eq!(r.len(), len);
        let mut c = Case::http(format!("a {len}-byte request head"), r).must(&[status]);
        c.body = Some(Body::Known);
        v.push(c);
    }
    for (len, status) in [(MAX_TARGET, 404), (MAX_TARGET + 1, 414)] {
        let t = format!("/{}", "a".repeat(len - 1));
        v.push(
            Case::http(format!("a {len}-byte target"), req("GET", t.as_bytes(), ""))
                .must(&[status]),
        );
    }
    for i in 0..3 {
        let n = rng.range(MAX_TARGET + 1, 60_000);
        let t = format!("/{}", "b".repeat(n - 1));
        v.push(
            Case::http(
                format!("a {n}-byte target #{i}"),
                req("GET", t.as_bytes(), ""),
            )
            .must(&[414]),
        );
    }
    v.push(
        Case::http(
            "a 5000-byte method",
            req(&"M".repeat(5000), b"/known.txt", ""),
        )
        .must(&[405]),
    );
    v.push(
        Case::http(
            "a 9000-byte method",
            req(&"M".repeat(9000), b"/known.txt", ""),
        )
        .must(&[405]),
    );
    // Past the longest target while still incomplete: refused.
    v.push(
        Case::http(
            "a 20000-byte method",
            req(&"M".repeat(20000), b"/known.txt", ""),
        )
        .must(&[400, 414, 431]),
    );

    // Bad methods.
    for (what, bytes, status) in [
        ("G(T", req("G(T", b"/known.txt", ""), 400),
        ("lower-case get", req("get", b"/known.txt", ""), 405),
        ("DELETE", req("DELETE", b"/known.txt", ""), 405),
        (
            "PUT with a body",
            req("PUT", b"/known.txt", "Content-Length: 5\r\n"),
            405,
        ),
        ("OPTIONS *", req("OPTIONS", b"*", ""), 405),
        ("CONNECT", req("CONNECT", b"127.0.0.1:1", ""), 405),
        ("TRACE", req("TRACE", b"/", ""), 405),
        (
            "leading space",
            b" GET /known.txt HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            400,
        ),
        ("NUL method", req("\0GET", b"/known.txt", ""), 400),
        ("DEL in method", req("GET\x7f", b"/known.txt", ""), 400),
        ("space inside method", req("GE T", b"/known.txt", ""), 400),
        (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            400,
        ),
        (
            "TLS ClientHello",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n".to_vec(),
            400,
        ),
    ] {
        v.push(Case::http(format!("method: {what}"), bytes).must(&[status]));
    }
    let mut post = req("POST", b"/known.txt", "Content-Length: 5\r\n");
    post.extend_from_slice(b"hello");
    v.push(Case::http("POST with its body", post).must(&[405]));
    v.push(
        Case::http(
            "DELETE over HTTP/1.0",
            b"DELETE /known.txt HTTP/1.0\r\n\r\n".to_vec(),
        )
        .must(&[405])
        .http10(),
    );
    let mut blank = b"\r\n".to_vec();
    blank.extend(get_known(""));
    v.push(
        Case::http("a blank line first", blank)
            .must(&[200, 400])
            .body(Body::Known),
    );

    // Paths: traversal, escapes, NUL, backslashes, odd forms.
    let secret_abs = secret_path.to_string();
    let fixed: Vec<Vec<u8>> = [
        "/..",
        "/../secret.txt",
        "/../../../../../../etc/passwd",
        "/sub/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2e%2Fsecret.txt",
        "/sub%2F..%2F..%2Fsecret.txt",
        "/..%2fsecret.txt",
        "/%2e%2e%5csecret.txt",
        "/..\\secret.txt",
        "/\\..\\..\\secret.txt",
        "\\..\\secret.txt",
        "/..%5c..%5csecret.txt",
        "/.%2e/secret.txt",
        "/%2e./secret.txt",
        "/%c0%ae%c0%ae/secret.txt",
        "/%252e%252e/secret.txt",
        "/known.txt%00",
        "/known.txt%00.html",
        "/%00",
        "/sub/in.txt%00/../../secret.txt",
        "/%",
        "/%2",
        "/%zz",
        "/%%32%65",
        "*",
        "secret.txt",
        "../secret.txt",
        "http://localhost/../secret.txt",
        "http:/known.txt",
        "//../secret.txt",
        "/./../secret.txt",
        "/.hidden",
        "/%2ehidden",
        "/sub",
        "/sub/",
        "/",
        "/known.txt/",
        "/known.txt/..",
        "/known.txt?../../secret.txt",
        "/known.txt#/../../secret.txt",
        "/k%6eown.txt",
        "HTTP://H/known.txt",
        "/sub//in.txt",
        "/secret-link",
        "/sub/../secret-link",
        secret_abs.as_str(),
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .chain([
        b"/known.txt\0".to_vec(),
        b"/\xff\xfe".to_vec(),
        format!("/{}", "../".repeat(2000)).into_bytes(),
        format!("/{}secret.txt", "%2e%2e/".repeat(1100)).into_bytes(),
        format!("/{}", "x".repeat(300)).into_bytes(),
    ])
    .collect();
    for t in fixed {
        let (status, body) = path_model(&t);
        let mut c = Case::http(format!("path {}", preview(&t)), req("GET", &t, "")).must(&[status]);
        c.body = body;
        v.push(c);
    }
    const SEGMENTS: &[&str] = &[
        "..",
        "%2e%2e",
        "%2E%2e",
        ".%2e",
        "%2e.",
        "...",
        ".",
        "%2e",
        "sub",
        "known.txt",
        "in.txt",
        "%00",
        "\\",
        "..\\..",
        "%5c",
        "%2f",
        "%2F..%2F",
        "",
        "secret.txt",
        ".hidden",
        "%2ehidden",
        "%c0%ae",
        "%ff",
        "%",
        "%2",
        "%zz",
        "a?b",
        "#f",
        "%3f",
        "k%6eown.txt",
        "é",
        "%e9",
        "sub%2fin.txt",
    ];
    const PREFIXES: &[&str] = &["/", "//", "/./", "http://h/", "HTTPS://h:1/", "", "*", "\\"];
    for i in 0..60 {
        let mut t = rng.pick(PREFIXES).to_string();
        let n = rng.range(1, 6);
        for k in 0..n {
            if k > 0 {
                t.push_str(rng.pick::<&str>(&["/", "/", "/", "\\", "%2f"]));
            }
            t.push_str(rng.pick::<&str>(SEGMENTS));
        }
        let (status, body) = path_model(t.as_bytes());
        // (An empty target does not parse: its 400 has a body even to HEAD.)
        let head = rng.chance(25) && !t.is_empty();
        let method = if head { "HEAD" } else { "GET" };
        let mut c = Case::http(
            format!("{method} random path #{i} {t:?}"),
            req(method, t.as_bytes(), ""),
        )
        .must(&[status]);
        c.body = body;
        c.head = head;
        v.push(c);
    }

    // Range headers: odd but valid requests get 200, 206 or 416.
    let exact: [(&str, u16); 16] = [
        ("bytes=0-0", 206),
        ("bytes=-1", 206),
        ("bytes=0-", 206),
        ("bytes=9999-", 206),
        ("bytes=10000-", 416),
        ("bytes=-0", 416),
        ("bytes=5-1", 200),
        ("items=0-1", 200),
        ("bytes=0-1,5-6", 200),
        ("bytes=99999999999999999999999-", 416),
        ("bytes=9999-99999999999999999999999", 206),
        ("bytes=-99999999999999999999999", 206),
        ("bytes=18446744073709551615-18446744073709551615", 416),
        ("bytes=", 200),
        ("bytes=-", 200),
        ("bytes=abc", 200),
    ];
    for (spec, status) in exact {
        let mut c = Case::http(
            format!("Range: {spec}"),
            get_known(&format!("Range: {spec}\r\n")),
        )
        .must(&[status])
        .body(Body::Known);
        c.range = true;
        v.push(c);
    }
    const RANGE_PARTS: &[&str] = &[
        "0",
        "1",
        "9",
        "42",
        "9999",
        "10000",
        "10001",
        "18446744073709551615",
        "18446744073709551616",
        "-",
        "-",
        "-",
        ",",
        " ",
        "\t",
        "+",
        "x",
        "0x10",
        "=",
        "bytes=",
        "00000000000000000000000001",
    ];
    for i in 0..30 {
        let unit = *rng.pick::<&str>(&[
            "bytes=", "bytes=", "bytes=", "BYTES=", "bytes =", " bytes=", "",
        ]);
        let mut spec = unit.to_string();
        for _ in 0..rng.range(1, 5) {
            spec.push_str(rng.pick::<&str>(RANGE_PARTS));
        }
        let mut extra = format!("Range: {spec}\r\n");
        if rng.chance(20) {
            extra.push_str(rng.pick::<&str>(&[
                "If-Range: garbage\r\n",
                "If-Range: \"0-0\"\r\n",
                "If-Range: Sun, 06 Nov 1994 08:49:37 GMT\r\n",
                "Range: bytes=0-0\r\n",
            ]));
        }
        let mut c = Case::http(format!("random Range #{i}: {spec:?}"), get_known(&extra))
            .must(&[200, 206, 416])
            .body(Body::Known);
        c.range = true;
        v.push(c);
    }
    let mut c = Case::http(
        "Range: bytes=0-0, if-range garbage",
        get_known("Range: bytes=0-0\r\nIf-Range: garbage\r\n"),
    )
    .must(&[200])
    .body(Body::Known);
    c.range = true;
    v.push(c);
    let mut c = Case::http(
        "HEAD with a Range",
        req("HEAD", b"/known.txt", "Range: bytes=3-7\r\n"),
    )
    .must(&[206])
    .head();
    c.range = true;
    v.push(c);
    let mut c = Case::http(
        "a Range that is not UTF-8",
        get_known_raw(b"Range: bytes=\xff0-1\r\n"),
    )
    .must(&[200])
    .body(Body::Known);
    c.range = true;
    v.push(c);

    // Invalid HTTP versions.
    for ver in [
        "HTTP/1.2",
        "HTTP/2.0",
        "HTTP/3",
        "HTTP/1",
        "http/1.1",
        "HTTP/1.1 x",
        "HTTP/0.9",
        "HTTP/1.10",
        "HTTP/11",
        "HTTP/",
        "HTTPS/1.1",
        "HTTP/1.1\0",
        "HTTP/1.1\r\r",
        "HTTP/-1.1",
    ] {
        let b = format!("GET /known.txt {ver}\r\nHost: t\r\n\r\n");
        v.push(Case::http(format!("version {ver:?}"), b).must(&[400]));
    }
    v.push(
        Case::http(
            "no version (HTTP/0.9 style)",
            &b"GET /known.txt\r\n\r\n"[..],
        )
        .must(&[400]),
    );
    v.push(
        Case::http(
            "bare LF line ends",
            &b"GET /known.txt HTTP/1.1\nHost: t\n\n"[..],
        )
        .must(&[200, 400])
        .body(Body::Known),
    );

    // Header oddities.
    for (what, extra, status) in [
        ("two Hosts", "Host: u\r\n", 400),
        ("no colon", "Bad header\r\n", 400),
        ("space in a name", "Bad Name: x\r\n", 400),
        ("obs-fold", "X-A: a\r\n b\r\n", 400),
        ("NUL in a value", "X-A: a\0b\r\n", 400),
        ("Content-Length -1", "Content-Length: -1\r\n", 400),
        ("Content-Length 1e3", "Content-Length: 1e3\r\n", 400),
        (
            "Content-Length too big",
            "Content-Length: 99999999999999999999999\r\n",
            400,
        ),
        (
            "two Content-Lengths",
            "Content-Length: 1\r\nContent-Length: x\r\n",
            400,
        ),
        ("Content-Length 0", "Content-Length: 0\r\n", 200),
        (
            "odd Connection",
            "Connection: close, close, keep-alive, upgrade\r\n",
            200,
        ),
        (
            "bad If-Modified-Since",
            "If-Modified-Since: yesterday\r\n",
            200,
        ),
        ("If-None-Match: *", "If-None-Match: *\r\n", 304),
    ] {
        v.push(
            Case::http(format!("header: {what}"), get_known(extra))
                .must(&[status])
                .body(Body::Known),
        );
    }
    v.push(
        Case::http(
            "a value that is not UTF-8",
            get_known_raw(b"X-A: \xff\xfe\r\n"),
        )
        .must(&[200])
        .body(Body::Known),
    );
    v.push(Case::http("no Host", &b"GET /known.txt HTTP/1.1\r\n\r\n"[..]).must(&[400]));
    v.push(
        Case::http(
            "empty Host",
            &b"GET /known.txt HTTP/1.1\r\nHost:\r\n\r\n"[..],
        )
        .must(&[200, 400])
        .body(Body::Known),
    );

    // A 400 that keeps the connection (no Connection: close) must leave it
    // in step: the next request is answered.
    for t in ["/%zz", "*", "secret.txt", "/%2"] {
        let mut b = req("GET", t.as_bytes(), "");
        b.extend(get_known(""));
        v.push(
            Case::http(format!("400 for {t:?}, then a good one"), b)
                .must(&[400])
                .must(&[200])
                .body(Body::Known),
        );
    }

    // Pipelined garbage after a valid request.
    for i in 0..15 {
        let mut b = get_known("");
        if rng.chance(50) {
            let n = rng.range(1, 500);
            b.extend(rng.bytes(n));
        } else {
            let n = rng.range(1, 80);
            b.extend(rng.of_set(b"abcXYZ /:%\x00\xff\t", n));
            b.extend_from_slice(b"\r\n\r\n");
        }
        v.push(
            Case::http(format!("valid, then garbage #{i}"), b)
                .must(&[200])
                .may(REFUSED)
                .body(Body::Known),
        );
    }
    let mut b = get_known("");
    b.extend(req("GET", b"/sub/in.txt", ""));
    b.extend_from_slice(b"\x00\x01\x02 garbage\r\n\r\n");
    v.push(
        Case::http("two valid, then garbage", b)
            .must(&[200])
            .must(&[200])
            .must(&[400]),
    );
    let mut b = Vec::new();
    for _ in 0..40 {
        b.extend(get_known(""));
    }
    b.extend_from_slice(b"GARBAGE\x7f\r\n\r\n");
    let mut c = Case::http("40 pipelined, then garbage", b).must(&[400]);
    c.must = vec![vec![200]; 40];
    c.must.push(vec![400]);
    c.body = Some(Body::Known);
    v.push(c);
    let mut b = get_known("Connection: close\r\n");
    b.extend(get_known(""));
    b.extend_from_slice(b"garbage\r\n\r\n");
    v.push(
        Case::http("Connection: close, then more requests", b)
            .must(&[200])
            .body(Body::Known),
    );
    let mut b = b"GET /known.txt HTTP/1.0\r\n\r\n".to_vec();
    b.extend_from_slice(b"\x00garbage\r\n\r\n");
    v.push(
        Case::http("HTTP/1.0, then garbage", b)
            .must(&[200])
            .body(Body::Known)
            .http10(),
    );
    // A request hidden in a body is never taken for a second request.
    let hidden = req("GET", b"/sub/in.txt", "");
    let mut b = get_known(&format!("Content-Length: {}\r\n", hidden.len()));
    b.extend(&hidden);
    v.push(
        Case::http("a request hidden in a body", b)
            .must(&[200])
            .body(Body::Known),
    );
    let mut b = get_known("Transfer-Encoding: chunked\r\n");
    b.extend(format!("{:x}\r\n", hidden.len()).as_bytes());
    b.extend(&hidden);
    b.extend_from_slice(b"\r\n0\r\n\r\n");
    v.push(
        Case::http("a request hidden in a chunked body", b)
            .must(&[200])
            .body(Body::Known),
    );

    // Clients that leave: after the whole request (never reading the
    // answer), or reset in the middle of a large response.
    for i in 0..5 {
        let mut c = Case::http(format!("request, then close unread #{i}"), get_known(""))
            .mode(Mode::Abandon)
            .end(None);
        c.unread = Some(200);
        v.push(c);
    }
    for i in 0..6 {
        let (extra, status) = if i % 2 == 0 {
            ("", 200)
        } else {
            ("Range: bytes=1000-\r\n", 206)
        };
        v.push(
            Case::http(
                format!("reset mid-response #{i}"),
                req("GET", b"/big.bin", extra),
            )
            .mode(Mode::ResetAfterHead)
            .must(&[status])
            .end(Some("client_reset")),
        );
    }
    v
}

fn v1_header(src: &str, dst: &str) -> Vec<u8> {
    let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    ppp::v1::Addresses::from((s, d)).to_string().into_bytes()
}

fn v2_header(src: &str, dst: &str) -> Vec<u8> {
    let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (s, d),
    )
    .build()
    .unwrap()
}

/// Whether `b` starts with a whole, valid PROXY header (v1 or v2), as the
/// `ppp` crate sluice uses reads it.
fn proxy_valid(b: &[u8]) -> bool {
    ppp::v1::Header::try_from(b).is_ok() || ppp::v2::Header::try_from(b).is_ok()
}

fn proxy_cases(rng: &mut Rng) -> Vec<Case> {
    let valid = [
        v1_header("203.0.113.7:4242", "192.0.2.1:443"),
        v1_header("[2001:db8::7]:4242", "[2001:db8::1]:443"),
        v2_header("203.0.113.7:4242", "192.0.2.1:443"),
        v2_header("[2001:db8::7]:4242", "[2001:db8::1]:443"),
    ];
    let mut v = Vec::new();
    // Push a bad header made by `make`, regenerating the rare one that
    // happens to be valid (it would rightly reach the backend).
    fn bad(v: &mut Vec<Case>, rng: &mut Rng, what: String, make: &dyn Fn(&mut Rng) -> Vec<u8>) {
        for _ in 0..100 {
            let b = make(rng);
            if !b.is_empty() && !proxy_valid(&b) {
                v.push(Case::new(Target::Proxy, what, b));
                return;
            }
        }
        panic!("{what}: no invalid header in 100 tries");
    }
    for i in 0..30 {
        bad(&mut v, rng, format!("random bytes #{i}"), &|r| {
            let n = r.range(1, 700);
            r.bytes(n)
        });
    }
    for i in 0..24 {
        let h = &valid[i % valid.len()];
        let cut = rng.range(1, h.len() - 1);
        bad(
            &mut v,
            rng,
            format!("header {} cut at {cut}", i % 4),
            &|_| h[..cut].to_vec(),
        );
    }
    for i in 0..20 {
        let h = &valid[i % 2];
        bad(&mut v, rng, format!("v1 mutated #{i}"), &|r| {
            let mut b = h.clone();
            let at = r.below(b.len() - 2);
            match r.below(3) {
                0 => b[at] = *r.pick(b"\x00\r\n :.xZ9-\xff"),
                1 => {
                    b.insert(at, *r.pick(b" :.\x00\xffA"));
                }
                _ => {
                    b.remove(at);
                }
            }
            b
        });
    }
    for i in 0..10 {
        bad(&mut v, rng, format!("v1 random line #{i}"), &|r| {
            let mut b = b"PROXY ".to_vec();
            let n = r.range(0, 95);
            b.extend(r.of_set(b"TCP46UNKOW 0123456789.:abcdef\t-", n));
            b.extend_from_slice(b"\r\n");
            b
        });
    }
    for i in 0..8 {
        let n = rng.range(108, 600);
        bad(&mut v, rng, format!("v1 of {n} bytes #{i}"), &|r| {
            let mut b = v1_header("203.0.113.7:4242", "192.0.2.1:443");
            b.truncate(b.len() - 2);
            let pad = n.saturating_sub(b.len() + 2);
            b.extend(std::iter::repeat_n(b' ', pad));
            if r.chance(50) {
                b.extend_from_slice(b"\r\n");
            }
            b
        });
    }
    for i in 0..16 {
        let h = &valid[2 + i % 2];
        bad(&mut v, rng, format!("v2 corrupted #{i}"), &|r| {
            let mut b = h.clone();
            match r.below(4) {
                0 => b[r.below(12)] ^= 1u8 << r.below(8),
                1 => b[12] = *r.pick(&[0x00, 0x10, 0x11, 0x22, 0x2f, 0x31, 0xff]),
                2 => b[13] = *r.pick(&[0x40, 0x13, 0x1f, 0x51, 0xff, 0x23]),
                _ => {
                    // Shorter than the address block its family needs.
                    let len = r.below(if b[13] >> 4 == 1 { 12 } else { 36 }) as u16;
                    b[14..16].copy_from_slice(&len.to_be_bytes());
                }
            }
            b
        });
    }
    for i in 0..6 {
        bad(&mut v, rng, format!("v2 announcing too much #{i}"), &|r| {
            let mut b = ppp::v2::PROTOCOL_PREFIX.to_vec();
            let len = r.range(521, 65535) as u16;
            b.extend([0x21, 0x11]);
            b.extend(len.to_be_bytes());
            let n = r.range(0, 100);
            b.extend(r.bytes(n));
            b
        });
    }
    // A whole v2 header over sluice's 536 bytes: valid to ppp, refused
    // by sluice as too long.
    let mut b = ppp::v2::PROTOCOL_PREFIX.to_vec();
    b.extend([0x21, 0x11]);
    b.extend(600u16.to_be_bytes());
    b.extend([203, 0, 113, 7, 192, 0, 2, 1, 0x10, 0x92, 0x01, 0xbb]);
    b.extend(std::iter::repeat_n(0u8, 600 - 12));
    assert!(proxy_valid(&b));
    v.push(Case::new(Target::Proxy, "a whole 616-byte v2 header", b));
    for what in [
        "GET / HTTP/1.1\r\nHost: t\r\n\r\n",
        "\r\n\r\n\r\n",
        "proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    ] {
        v.push(Case::new(
            Target::Proxy,
            format!("not a header: {what:?}"),
            what,
        ));
    }
    // Not errors: a client that connects and leaves (a TCP health check),
    // and one that resets in the middle of its header.
    for i in 0..4 {
        v.push(
            Case::new(Target::Proxy, format!("connect and close #{i}"), Vec::new())
                .mode(Mode::Abandon)
                .end(Some("client_closed")),
        );
    }
    for (i, h) in valid.iter().enumerate() {
        let cut = rng.range(1, h.len() - 1);
        v.push(
            Case::new(
                Target::Proxy,
                format!("header {i} cut at {cut}, then reset"),
                &h[..cut],
            )
            .mode(Mode::ResetAfterSend)
            .end(Some("client_reset")),
        );
    }
    v
}

fn admin_cases(rng: &mut Rng) -> Vec<Case> {
    let a = |what: String, b: &[u8]| Case::new(Target::Admin, what, b).end(None);
    let mut v = Vec::new();
    for i in 0..20 {
        let n = rng.range(1, 600);
        v.push(a(format!("random bytes #{i}"), &rng.bytes(n)).may(&[400, 404, 405, 431]));
    }
    let full = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
    for i in 0..12 {
        let cut = rng.range(1, full.len() - 1);
        v.push(a(format!("truncated at {cut} #{i}"), &full[..cut]));
    }
    let many: String = (0..40).map(|k| format!("X-{k}: v\r\n")).collect();
    let mut pipelined = full.to_vec();
    pipelined.extend_from_slice(b"\x00\xffGARBAGE\r\n\r\n");
    for (what, bytes, status) in [
        (
            "POST /metrics",
            b"POST /metrics HTTP/1.1\r\n\r\n".to_vec(),
            405,
        ),
        ("DELETE /", b"DELETE / HTTP/1.1\r\n\r\n".to_vec(), 405),
        ("unknown path", b"GET /nope HTTP/1.1\r\n\r\n".to_vec(), 404),
        (
            "traversal",
            b"GET /../metrics HTTP/1.1\r\n\r\n".to_vec(),
            404,
        ),
        ("HTTP/2.0", b"GET /metrics HTTP/2.0\r\n\r\n".to_vec(), 400),
        (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            400,
        ),
        (
            "TLS ClientHello",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03".to_vec(),
            400,
        ),
        (
            "NUL in the line",
            b"GET\x00/healthz HTTP/1.1\r\n\r\n".to_vec(),
            400,
        ),
        (
            "NUL in a value",
            b"GET /healthz HTTP/1.1\r\nX: \x00\r\n\r\n".to_vec(),
            400,
        ),
        (
            "40 headers",
            format!("GET /healthz HTTP/1.1\r\n{many}\r\n").into_bytes(),
            400,
        ),
        (
            "query junk",
            b"GET /healthz?%00%ff<>\"' HTTP/1.1\r\n\r\n".to_vec(),
            200,
        ),
        ("one request per connection", pipelined, 200),
    ] {
        v.push(a(what.to_string(), &bytes).must(&[status]));
    }
    v.push(
        a("HEAD /metrics".into(), b"HEAD /metrics HTTP/1.1\r\n\r\n")
            .must(&[200])
            .head(),
    );
    v.push(a("blank lines only".into(), b"\r\n\r\n").may(&[400]));
    // Heads over 8 KiB: 431, though sluice stops reading there, so the
    // answer may be lost to the reset its close then sends.
    for n in [ADMIN_MAX_REQUEST + 100, 100 * 1024] {
        let big = format!("GET /healthz HTTP/1.1\r\nX-Big: {}\r\n\r\n", "z".repeat(n));
        v.push(a(format!("{n}-byte header"), big.as_bytes()).may(&[431]));
    }
    for i in 0..3 {
        let cut = rng.range(1, full.len() - 1);
        v.push(a(format!("reset after {cut} bytes #{i}"), &full[..cut]).mode(Mode::ResetAfterSend));
    }
    v
}

// ---------------------------------------------------------------------------
// Running a case and judging what came back
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Resp {
    status: u16,
    minor: u8,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Outcome {
    responses: Vec<Resp>,
}

/// "HTTP/1.x NNN Reason" → (minor, status).
fn status_line(line: &str) -> Result<(u8, u16), String> {
    let mut p = line.splitn(3, ' ');
    let minor = match p.next() {
        Some("HTTP/1.1") => 1,
        Some("HTTP/1.0") => 0,
        _ => return Err(format!("bad status line {line:?}")),
    };
    let code = p.next().unwrap_or("");
    let reason = p.next().unwrap_or("");
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad status code in {line:?}"));
    }
    let status: u16 = code.parse().unwrap();
    if !(100..600).contains(&status) {
        return Err(format!("status out of range in {line:?}"));
    }
    if reason.is_empty() || !reason.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(format!("bad reason phrase in {line:?}"));
    }
    Ok((minor, status))
}

/// Split `buf` into whole responses (head, then Content-Length bytes of
/// body unless `head_only` or 304); anything left over is an error.
fn parse_responses(buf: &[u8], head_only: bool) -> Result<Vec<Resp>, String> {
    let mut rest = buf;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let end = find(rest, b"\r\n\r\n")
            .ok_or_else(|| format!("bytes that are not a response head: {}", preview(rest)))?;
        let head = std::str::from_utf8(&rest[..end])
            .map_err(|_| format!("response head not UTF-8: {}", preview(&rest[..end])))?;
        let mut lines = head.split("\r\n");
        let (minor, status) = status_line(lines.next().unwrap_or(""))?;
        let mut headers = Vec::new();
        for l in lines {
            let (n, val) = l
                .split_once(": ")
                .ok_or_else(|| format!("bad header line {l:?}"))?;
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(format!("bad header name in {l:?}"));
            }
            headers.push((n.to_ascii_lowercase(), val.to_string()));
        }
        rest = &rest[end + 4..];
        let cl = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| {
                v.parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {v:?}"))
            })
            .transpose()?;
        let body = if head_only || status == 304 {
            Vec::new()
        } else {
            let cl = cl.ok_or_else(|| format!("{status} without Content-Length"))?;
            if rest.len() < cl {
                return Err(format!(
                    "{status}: body cut short: {} of {cl} bytes",
                    rest.len()
                ));
            }
            let (b, r) = rest.split_at(cl);
            rest = r;
            b.to_vec()
        };
        out.push(Resp {
            status,
            minor,
            headers,
            body,
        });
    }
    Ok(out)
}

/// Read until sluice closes (EOF or reset) or `wait` passes (an error: a
/// hang). Returns the bytes and whether the close was a reset.
fn read_to_close_within(s: &mut TcpStream, wait: Duration) -> Result<(Vec<u8>, bool), String> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "HANG: not closed within {wait:?}; {} bytes came: {}",
                out.len(),
                preview(&out)
            ));
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Ok((out, false)),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok((out, true)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

struct Known {
    file: Vec<u8>,
    inner: Vec<u8>,
}

fn run_case(c: &Case, to: SocketAddr, k: &Known) -> Result<Outcome, String> {
    // Well under every timeout sluice applies to these clients (header
    // timeouts 4 s and 5 s, linger 5 s): a case still open then is stuck.
    let wait = match c.target {
        Target::Http => Duration::from_secs(4),
        Target::Proxy => Duration::from_secs(2),
        Target::Admin => Duration::from_secs(3),
    };
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let sent = if c.mode == Mode::Drip {
        s.set_nodelay(true).unwrap();
        c.bytes.iter().try_for_each(|b| {
            thread::sleep(Duration::from_millis(2));
            s.write_all(&[*b])
        })
    } else {
        s.write_all(&c.bytes)
    };
    if let Err(e) = sent {
        // A file route lingers to read what a refused client still sends;
        // the others may close in its face.
        if c.target == Target::Http {
            return Err(format!("write: {e}"));
        }
    }
    let (buf, was_reset) = match c.mode {
        Mode::Abandon => {
            drop(s);
            return Ok(Outcome::default());
        }
        Mode::ResetAfterSend => {
            reset(s);
            return Ok(Outcome::default());
        }
        Mode::ResetAfterHead => {
            let mut r = BufReader::new(s);
            let mut head = Vec::new();
            let deadline = Instant::now() + wait;
            while !head.ends_with(b"\r\n\r\n") {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(format!("HANG: no response head within {wait:?}"));
                }
                r.get_ref().set_read_timeout(Some(left)).unwrap();
                match r.read_until(b'\n', &mut head) {
                    Ok(0) => return Err(format!("closed inside the head: {}", preview(&head))),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
            reset(r.into_inner());
            let rs = parse_responses(&head, true)?;
            check_statuses(c, &rs)?;
            return Ok(Outcome { responses: rs });
        }
        Mode::HalfClose | Mode::Drip => {
            let _ = s.shutdown(Shutdown::Write);
            read_to_close_within(&mut s, wait)?
        }
        Mode::KeepOpen => read_to_close_within(&mut s, wait)?,
    };
    match c.target {
        Target::Proxy => {
            if !buf.is_empty() {
                return Err(format!(
                    "the client got bytes (the backend's?): {}",
                    preview(&buf)
                ));
            }
            Ok(Outcome::default())
        }
        Target::Admin => {
            if was_reset && c.bytes.len() <= ADMIN_MAX_REQUEST {
                return Err(format!(
                    "reset after {} bytes came: {}",
                    buf.len(),
                    preview(&buf)
                ));
            }
            let rs = parse_responses(&buf, c.head)?;
            check_statuses(c, &rs)?;
            for r in &rs {
                if r.minor != 1 {
                    return Err("admin answered with HTTP/1.0".into());
                }
                if r.header("connection") != Some("close") {
                    return Err(format!("admin {} without Connection: close", r.status));
                }
            }
            Ok(Outcome { responses: rs })
        }
        Target::Http => {
            // A file route ends every response with a FIN: a reset could
            // destroy an answer still in flight.
            if was_reset {
                return Err(format!(
                    "reset after {} bytes came: {}",
                    buf.len(),
                    preview(&buf)
                ));
            }
            let rs = parse_responses(&buf, c.head)?;
            check_statuses(c, &rs)?;
            for r in &rs {
                check_http_response(c, r, k)?;
            }
            Ok(Outcome { responses: rs })
        }
    }
}

/// The responses are those the case allows, in order and in number.
fn check_statuses(c: &Case, rs: &[Resp]) -> Result<(), String> {
    let got: Vec<u16> = rs.iter().map(|r| r.status).collect();
    let max = c.must.len() + usize::from(!c.may.is_empty());
    let ok = rs.len() >= c.must.len()
        && rs.len() <= max
        && rs.iter().enumerate().all(|(i, r)| match c.must.get(i) {
            Some(allowed) => allowed.contains(&r.status),
            None => c.may.contains(&r.status),
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "statuses {got:?}, wanted {:?} then at most one of {:?}",
            c.must, c.may
        ))
    }
}

fn check_http_response(c: &Case, r: &Resp, k: &Known) -> Result<(), String> {
    if r.minor == 0 && !c.http10 {
        return Err(format!("HTTP/1.0 {} to an HTTP/1.1 request", r.status));
    }
    if find(&r.body, SECRET).is_some() {
        return Err(format!(
            "LEAK: the secret outside the root was sent ({})",
            r.status
        ));
    }
    // sluice closes after these (a head it could not read, or none in
    // time): it must say so. (A 400 for a target that parsed but cannot
    // name a file keeps the connection: see the "then a good one" cases.)
    if matches!(r.status, 408 | 414 | 431) && r.header("connection") != Some("close") {
        return Err(format!("{} without Connection: close", r.status));
    }
    if c.head {
        return Ok(());
    }
    let len = k.file.len();
    match r.status {
        200 => {
            let ok = match c.body {
                Some(Body::Known) => r.body == k.file,
                Some(Body::Inner) => r.body == k.inner,
                None => r.body == k.file || r.body == k.inner,
            };
            if !ok {
                return Err(format!(
                    "200 with a body that is not the file: {}",
                    preview(&r.body)
                ));
            }
        }
        206 => {
            let cr = r.header("content-range").unwrap_or("");
            let parsed = cr
                .strip_prefix("bytes ")
                .and_then(|x| x.split_once('/'))
                .and_then(|(span, total)| {
                    let (a, b) = span.split_once('-')?;
                    Some((
                        a.parse::<usize>().ok()?,
                        b.parse::<usize>().ok()?,
                        total.parse::<usize>().ok()?,
                    ))
                });
            match parsed {
                Some((a, b, total))
                    if total == len && a <= b && b < len && r.body == k.file[a..=b] => {}
                _ => {
                    return Err(format!(
                        "206 with Content-Range {cr:?} and {} body bytes",
                        r.body.len()
                    ));
                }
            }
        }
        416 if r.header("content-range") != Some(&format!("bytes */{len}"))
            || !r.body.is_empty() =>
        {
            return Err(format!(
                "416 with {:?} and a body of {}",
                r.header("content-range"),
                r.body.len()
            ));
        }
        _ => {}
    }
    if matches!(r.status, 206 | 416) && !c.range {
        return Err(format!("{} to a request without Range", r.status));
    }
    Ok(())
}

/// Run every case, `CLIENTS` at a time; each result in the case's slot.
fn run_all(cases: &[Case], addrs: [SocketAddr; 3], k: &Known) -> Vec<Result<Outcome, String>> {
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<Outcome, String>>>> =
        cases.iter().map(|_| Mutex::new(None)).collect();
    thread::scope(|s| {
        for _ in 0..CLIENTS {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(c) = cases.get(i) else { break };
                    let to = match c.target {
                        Target::Http => addrs[0],
                        Target::Proxy => addrs[1],
                        Target::Admin => addrs[2],
                    };
                    let r = run_case(c, to, k);
                    *results[i].lock().unwrap() = Some(r);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|m| m.into_inner().unwrap().expect("every case ran"))
        .collect()
}

// ---------------------------------------------------------------------------
// Process-level checks
// ---------------------------------------------------------------------------

/// The descriptor count once it holds still for 100 ms.
fn settled_fds(pid: u32) -> usize {
    let mut last = fd_count(pid);
    loop {
        thread::sleep(Duration::from_millis(100));
        let now = fd_count(pid);
        if now == last {
            return now;
        }
        last = now;
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

fn route_sum(m: &Metrics, name: &str, route: &str) -> f64 {
    m.sum(name, &[("route", route)])
}

/// No connection open, and every one accepted has ended, on both routes.
fn all_settled(m: &Metrics) -> bool {
    m.get("sluice_connections_active", &[]) == 0.0
        && ["h", "pp"].iter().all(|r| {
            route_sum(m, "sluice_route_connections_active", r) == 0.0
                && route_sum(m, "sluice_route_connections_ended_total", r)
                    == route_sum(m, "sluice_route_connections_total", r)
        })
}

/// Clients that stop half-way in every state sluice waits in, held open.
fn stalled_clients(h: SocketAddr, pp: SocketAddr, a: SocketAddr) -> Vec<TcpStream> {
    let send = |to: SocketAddr, b: &[u8]| {
        let mut s = connect(to);
        s.write_all(b).unwrap();
        s
    };
    let half_closed = send(h, &req("GET", b"/big.bin", ""));
    half_closed.shutdown(Shutdown::Write).unwrap();
    vec![
        send(h, b"GET /known.txt HTTP/1.1\r\nHost: t\r\n"),
        send(h, &get_known("")),
        send(h, &req("GET", b"/big.bin", "")),
        half_closed,
        connect(h),
        send(pp, b"PROXY TCP4 203.0.113.7 "),
        send(pp, &v2_header("203.0.113.7:1", "192.0.2.1:2")[..20]),
        send(a, b"GET /metrics HTTP/1.1\r\n"),
        connect(a),
    ]
}

fn seed() -> u64 {
    match std::env::var("SLUICE_HOSTILE_SEED") {
        Ok(s) => {
            let s = s.trim();
            s.strip_prefix("0x")
                .map(|h| u64::from_str_radix(h, 16))
                .unwrap_or_else(|| s.parse())
                .expect("SLUICE_HOSTILE_SEED: a number (decimal or 0x hex)")
        }
        Err(_) => DEFAULT_SEED,
    }
}

#[test]
fn hostile_input_closes_only_its_own_connection() {
    let t0 = Instant::now();
    let seed = seed();
    eprintln!("hostile_input: seed {seed:#x} (SLUICE_HOSTILE_SEED={seed:#x} replays it)");

    let dir = temp_dir("hostile");
    let www = dir.join("www");
    std::fs::create_dir_all(www.join("sub")).unwrap();
    let known_digest = gen_file(&www.join("known.txt"), seed ^ 1, KNOWN_LEN);
    let known = Known {
        file: std::fs::read(www.join("known.txt")).unwrap(),
        inner: b"inner file\n".to_vec(),
    };
    std::fs::write(www.join("sub/in.txt"), &known.inner).unwrap();
    std::fs::write(www.join(".hidden"), SECRET).unwrap();
    gen_file(&www.join("big.bin"), seed ^ 2, BIG_LEN);
    let secret = dir.join("secret.txt");
    std::fs::write(&secret, SECRET).unwrap();
    std::os::unix::fs::symlink(&secret, www.join("secret-link")).unwrap();

    let backend = Backend::named("backend");
    let (hp, pp, ap) = (free_port(), free_port(), free_port());
    let toml = format!(
        r#"[global]
workers = 2
log_level = "info"
# Off, so the descriptor count before and after is exact.
open_file_cache = 0

[admin]
listen = "127.0.0.1:{ap}"

[[route]]
name = "h"
listen = "127.0.0.1:{hp}"
root = "www"
protocol = "http"
strategy = "sendfile"
header_timeout = "{}ms"
idle_timeout = "10s"

[[route]]
name = "pp"
listen = "127.0.0.1:{pp}"
backends = ["{}"]
strategy = "copy"
accept_proxy = true
header_timeout = "4s"
"#,
        HEADER_TIMEOUT.as_millis(),
        backend.addr
    );
    let sl = Sluice::start_in(dir.clone(), &toml, &[]);
    let pid = sl.pid();
    let (h_addr, pp_addr, a_addr) = (addr(hp), addr(pp), addr(ap));

    // Warm-up: each route and the admin listener serve once, so anything
    // made on first use exists before the descriptors are counted.
    let (head, body) = get(h_addr, "/known.txt");
    assert_eq!(head.status, 200);
    assert_eq!(digest_of(&body), known_digest);
    let mut c = connect(pp_addr);
    c.write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 443\r\nping\n")
        .unwrap();
    assert_eq!(read_line(&mut c), "backend");
    assert_eq!(read_line(&mut c), "ping");
    drop(c);
    assert_eq!(admin::get(a_addr, "/healthz").status, 200);
    let m0 = scrape_until(a_addr, "the warm-up connections closed", all_settled);
    let fds0 = settled_fds(pid);
    let backend0 = backend.accepted();
    assert_eq!(backend0, 1, "the warm-up reached the backend");
    let access0 = sl.access().len();

    // The cases, in a seeded order that mixes the three listeners.
    let mut rng = Rng::new(seed);
    let mut cases = http_cases(&mut rng, &secret.display().to_string());
    cases.extend(proxy_cases(&mut rng));
    cases.extend(admin_cases(&mut rng));
    rng.shuffle(&mut cases);
    let count = |t: Target| cases.iter().filter(|c| c.target == t).count();
    let (n_http, n_proxy, n_admin) = (
        count(Target::Http),
        count(Target::Proxy),
        count(Target::Admin),
    );
    eprintln!("hostile_input: {n_http} HTTP, {n_proxy} PROXY, {n_admin} admin cases");

    let t_barrage = Instant::now();
    let results = run_all(&cases, [h_addr, pp_addr, a_addr], &known);
    eprintln!("hostile_input: cases ran in {:?}", t_barrage.elapsed());
    let failures: Vec<String> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let c = &cases[i];
            r.as_ref().err().map(|e| {
                format!(
                    "case {i} [{:?} {:?}] {}: {e}\n      sent {}",
                    c.target,
                    c.mode,
                    c.what,
                    preview(&c.bytes)
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed (seed {seed:#x}; SLUICE_HOSTILE_SEED={seed:#x} replays them):\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert!(alive(pid), "sluice died during the barrage");
    assert_eq!(sl.count_log("panicked"), 0, "a thread panicked");

    // What the cases say sluice must count and log.
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut http_ends: BTreeMap<&str, usize> = BTreeMap::new();
    let mut proxy_ends: BTreeMap<&str, usize> = BTreeMap::new();
    let mut either_end = 0;
    let mut must_4xx = 0;
    for (c, r) in cases.iter().zip(&results) {
        let out = r.as_ref().unwrap();
        match c.target {
            Target::Http => {
                for resp in &out.responses {
                    *statuses.entry(resp.status).or_default() += 1;
                }
                if let Some(s) = c.unread {
                    *statuses.entry(s).or_default() += 1;
                }
                match c.end {
                    Some(e) => *http_ends.entry(e).or_default() += 1,
                    None => either_end += 1,
                }
                must_4xx += c
                    .must
                    .iter()
                    .filter(|set| set.iter().all(|s| (400..500).contains(s)))
                    .count();
            }
            Target::Proxy => *proxy_ends.entry(c.end.unwrap()).or_default() += 1,
            Target::Admin => {}
        }
    }
    let class_of = |lo: u16| -> f64 {
        statuses
            .iter()
            .filter(|(s, _)| (lo..lo + 100).contains(*s))
            .map(|(_, n)| *n as f64)
            .sum()
    };
    let responses: usize = statuses.values().sum();
    let bytes_sent: usize = cases
        .iter()
        .filter(|c| c.target == Target::Http)
        .map(|c| c.bytes.len())
        .sum();
    eprintln!("hostile_input: file route statuses {statuses:?}");

    let m1 = scrape_until(a_addr, "every hostile connection closed", all_settled);
    let d = |name: &str, labels: &[(&str, &str)]| m1.sum(name, labels) - m0.sum(name, labels);

    // File route: one connection per case, each ended once, for the reason
    // the case dictates; every response counted by class.
    assert_eq!(
        d("sluice_route_connections_total", &[("route", "h")]),
        n_http as f64
    );
    for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
        let lo = class[..1].parse::<u16>().unwrap() * 100;
        assert_eq!(
            d(
                "sluice_route_http_responses_total",
                &[("route", "h"), ("class", class)]
            ),
            class_of(lo),
            "route h: {class} responses (seed {seed:#x})"
        );
    }
    assert!(
        class_of(400) >= must_4xx as f64,
        "fewer 4xx ({}) than the cases require ({must_4xx})",
        class_of(400)
    );
    let ended = |route: &str, reason: &str| {
        d(
            "sluice_route_connections_ended_total",
            &[("route", route), ("reason", reason)],
        )
    };
    let closed = ended("h", "client_closed");
    let reset_n = ended("h", "client_reset");
    let want_closed = http_ends.get("client_closed").copied().unwrap_or(0) as f64;
    let want_reset = http_ends.get("client_reset").copied().unwrap_or(0) as f64;
    assert!(
        closed >= want_closed
            && reset_n >= want_reset
            && closed + reset_n == want_closed + want_reset + either_end as f64,
        "route h ended: client_closed {closed}, client_reset {reset_n}; wanted {want_closed} and {want_reset} plus {either_end} of either"
    );
    for reason in [
        "idle_timeout",
        "client_error",
        "shutdown",
        "limit",
        "denied",
    ] {
        assert_eq!(ended("h", reason), 0.0, "route h: end={reason}");
    }
    let bytes_in = d("sluice_route_bytes_in_total", &[("route", "h")]);
    assert!(
        bytes_in >= n_http as f64 && bytes_in <= bytes_sent as f64,
        "route h read {bytes_in} request bytes of {bytes_sent} sent by {n_http} clients"
    );

    // PROXY route: every bad header refused and counted, none reached the
    // backend; clients that left early are not errors.
    let bad = proxy_ends["bad_proxy_header"] as f64;
    assert_eq!(
        d("sluice_route_connections_total", &[("route", "pp")]),
        n_proxy as f64
    );
    assert_eq!(
        d("sluice_route_proxy_header_errors_total", &[("route", "pp")]),
        bad
    );
    for (reason, n) in &proxy_ends {
        assert_eq!(ended("pp", reason), *n as f64, "route pp: end={reason}");
    }
    assert_eq!(
        backend.accepted(),
        backend0,
        "a bad PROXY header reached the backend"
    );
    assert_eq!(
        d("sluice_backend_connections_total", &[("route", "pp")]),
        0.0
    );
    assert_eq!(
        d("sluice_route_connect_failures_total", &[("route", "pp")]),
        0.0
    );

    // Logged: one access line per file-route response, with the same
    // statuses, and one per PROXY connection with its reason.
    let deadline = Instant::now() + Duration::from_secs(10);
    let want_lines = responses + n_proxy;
    while sl.access().len() < access0 + want_lines && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let lines = sl.access();
    let new = &lines[access0..];
    let mut logged: BTreeMap<u16, usize> = BTreeMap::new();
    for l in new.iter().filter(|l| l["route"] == "h") {
        *logged.entry(l["status"].parse().unwrap()).or_default() += 1;
    }
    assert_eq!(
        logged, statuses,
        "route h: access-log statuses vs responses"
    );
    let pp_lines: Vec<_> = new.iter().filter(|l| l["route"] == "pp").collect();
    assert_eq!(
        pp_lines.len(),
        n_proxy,
        "route pp: one access line per connection"
    );
    let bad_lines: Vec<_> = pp_lines
        .iter()
        .filter(|l| l["end"] == "bad_proxy_header")
        .collect();
    assert_eq!(bad_lines.len() as f64, bad);
    assert!(
        bad_lines
            .iter()
            .all(|l| l.get("error").is_some_and(|e| !e.is_empty())),
        "a bad_proxy_header line without its error"
    );

    // Admin: clients that connect and say nothing cannot lock out /healthz
    // (past 64, the oldest silent one is closed for the newcomer).
    let idle: Vec<TcpStream> = (0..70).map(|_| connect(a_addr)).collect();
    let t = Instant::now();
    let r = admin::get(a_addr, "/healthz");
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "/healthz took {:?}",
        t.elapsed()
    );
    for (i, mut s) in idle.into_iter().enumerate().take(7) {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 1];
        let r = s.read(&mut b);
        assert!(
            matches!(r, Ok(0))
                || r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "idle admin client {i} was not the one closed: {r:?}"
        );
    }
    // (The other 63 idle clients are closed by being dropped above.)

    // No spin while clients sit in every waiting state: mid-header (408
    // due, then lingering for the FIN), blocked on a full send buffer
    // (also half-closed), idle keep-alive, before a first byte, and in
    // the middle of a PROXY header or an admin request.
    let stalled = stalled_clients(h_addr, pp_addr, a_addr);
    thread::sleep(Duration::from_millis(300));
    let cpu0 = sl.cpu_time();
    thread::sleep(Duration::from_secs(1));
    let spent = sl.cpu_time() - cpu0;
    assert!(
        spent < Duration::from_millis(50),
        "sluice used {spent:?} of CPU in 1 s with {} stalled clients",
        stalled.len()
    );
    eprintln!(
        "hostile_input: {spent:?} of CPU in 1 s with {} stalled clients",
        stalled.len()
    );
    drop(stalled);

    // No descriptor left behind by anything above.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut fds1 = fd_count(pid);
    while fds1 != fds0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        fds1 = fd_count(pid);
    }
    assert_eq!(fds1, fds0, "descriptors before the barrage vs after it");

    // No spin: an idle second costs (next to) nothing.
    let cpu0 = sl.cpu_time();
    thread::sleep(Duration::from_secs(1));
    let spent = sl.cpu_time() - cpu0;
    eprintln!("hostile_input: {spent:?} of CPU in 1 s idle");
    assert!(
        spent < Duration::from_millis(50),
        "idle sluice used {spent:?} of CPU in 1 s"
    );

    // Still serving, byte for byte.
    assert!(alive(pid), "sluice died");
    let (head, body) = get(h_addr, "/known.txt");
    assert_eq!(head.status, 200);
    assert_eq!(digest_of(&body), known_digest);
    assert_eq!(admin::get(a_addr, "/healthz").status, 200);
    scrape(a_addr);
    assert_eq!(sl.count_log("panicked"), 0);
    eprintln!("hostile_input: done in {:?}", t0.elapsed());
}
