//! Parse one request head from the bytes received so far (httparse), and
//! keep only what a static file server needs.

use super::{MAX_HEAD, MAX_HEADERS, MAX_TARGET};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    /// Anything else that is a valid token: answered 405.
    Other,
}

/// The parts of a request the file session uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The method as sent, for the access log.
    pub method_name: String,
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    pub range: Option<String>,
    pub if_range: Option<String>,
    pub if_none_match: Option<String>,
    pub if_modified_since: Option<String>,
    pub if_match: Option<String>,
    pub if_unmodified_since: Option<String>,
}

/// What the bytes received so far hold.
// Returned once per request and taken apart at once: boxing the request
// would cost an allocation per request to save a move of 200 bytes.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole head of `len` bytes.
    Complete(Request, usize),
    /// More bytes needed.
    Partial,
    /// Answer with this status, then close.
    Error(u16),
}

/// Parse the head at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            let line_end = buf.iter().position(|&b| b == b'\n');
            if line_end.is_none_or(|e| e > MAX_TARGET + 32) && buf.len() > MAX_TARGET + 32 {
                // Still inside an over-long request line.
                return Parsed::Error(414);
            }
            if buf.len() > MAX_HEAD {
                return Parsed::Error(431);
            }
            Parsed::Partial
        }
        Ok(httparse::Status::Complete(len)) => {
            let target = req.path.unwrap_or_default();
            if target.len() > MAX_TARGET {
                return Parsed::Error(414);
            }
            if len > MAX_HEAD {
                return Parsed::Error(431);
            }
            build(&req, len)
        }
        Err(httparse::Error::TooManyHeaders) => Parsed::Error(431),
        Err(_) => Parsed::Error(400),
    }
}

fn build(req: &httparse::Request, len: usize) -> Parsed {
    let method_name = req.method.unwrap_or_default();
    let method = match method_name {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => Method::Other,
    };
    let minor = req.version.unwrap_or(0);
    let mut r = Request {
        method,
        method_name: method_name.to_string(),
        target: req.path.unwrap_or_default().to_string(),
        minor,
        keep_alive: minor >= 1,
        range: None,
        if_range: None,
        if_none_match: None,
        if_modified_since: None,
        if_match: None,
        if_unmodified_since: None,
    };
    let mut host = false;
    let mut has_body = false;
    let mut length: Option<u64> = None;
    let (mut close, mut keep) = (false, false);
    for h in req.headers.iter() {
        let name = h.name;
        // The fields that frame the message are judged by name first:
        // one whose value cannot be read must not be skipped, or its
        // body would be taken for the next request (smuggling).
        let framing = name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding");
        if name.eq_ignore_ascii_case("host") {
            if host {
                return Parsed::Error(400); // RFC 9112 §3.2: exactly one Host
            }
            host = true;
            continue; // counted, whatever its bytes; its value is not used
        }
        let Ok(v) = std::str::from_utf8(h.value) else {
            if framing {
                return Parsed::Error(400);
            }
            // Validators sluice cannot read match none of its own
            // (ASCII) ETags or dates: the condition is there and matches
            // nothing, never ignored (If-Match fails, If-None-Match and
            // If-Range do not match, so the whole current file is sent).
            if name.eq_ignore_ascii_case("if-match") {
                r.if_match.get_or_insert_with(String::new);
            } else if name.eq_ignore_ascii_case("if-none-match") {
                r.if_none_match.get_or_insert_with(String::new);
            } else if name.eq_ignore_ascii_case("if-range") {
                r.if_range = Some(String::new());
            }
            continue; // not a header we read; opaque bytes are allowed
        };
        let v = v.trim();
        if name.eq_ignore_ascii_case("connection") {
            for t in v.split(',').map(str::trim) {
                if t.eq_ignore_ascii_case("close") {
                    close = true;
                } else if t.eq_ignore_ascii_case("keep-alive") {
                    keep = true;
                }
            }
        } else if name.eq_ignore_ascii_case("range") {
            r.range = Some(v.to_string());
        } else if name.eq_ignore_ascii_case("if-range") {
            r.if_range = Some(v.to_string());
        } else if name.eq_ignore_ascii_case("if-none-match") {
            // Several fields combine into one list.
            r.if_none_match = Some(match r.if_none_match.take() {
                Some(prev) => format!("{prev}, {v}"),
                None => v.to_string(),
            });
        } else if name.eq_ignore_ascii_case("if-modified-since") {
            r.if_modified_since = Some(v.to_string());
        } else if name.eq_ignore_ascii_case("if-match") {
            r.if_match = Some(match r.if_match.take() {
                Some(prev) => format!("{prev}, {v}"),
                None => v.to_string(),
            });
        } else if name.eq_ignore_ascii_case("if-unmodified-since") {
            r.if_unmodified_since = Some(v.to_string());
        } else if name.eq_ignore_ascii_case("content-length") {
            // RFC 9112 §6.3: 1*DIGIT, and every field the same value.
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Parsed::Error(400);
            }
            let Ok(n) = v.parse::<u64>() else {
                return Parsed::Error(400);
            };
            if length.is_some_and(|l| l != n) {
                return Parsed::Error(400);
            }
            length = Some(n);
            has_body |= n > 0;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            has_body = true;
        }
    }
    if minor >= 1 && !host {
        return Parsed::Error(400);
    }
    // `close` wins over `keep-alive`, whatever their order; keep-alive
    // only matters to HTTP/1.0, where it is not the default.
    if close {
        r.keep_alive = false;
    } else if keep && minor == 0 {
        r.keep_alive = true;
    }
    if has_body {
        // sluice does not read request bodies: answer, then close, so the
        // unread body can never be taken for the next request.
        r.keep_alive = false;
    }
    Parsed::Complete(r, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> (Request, usize) {
        match parse(s.as_bytes()) {
            Parsed::Complete(r, n) => (r, n),
            other => panic!("{s:?}: {other:?}"),
        }
    }

    #[test]
    fn keep_alive_defaults() {
        let (r, n) = ok("GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET");
        assert_eq!(n, 28);
        assert!(r.keep_alive);
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.target, "/a");
        let (r, _) = ok("GET / HTTP/1.0\r\n\r\n");
        assert!(!r.keep_alive);
        let (r, _) = ok("HEAD / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(r.keep_alive);
        assert_eq!(r.method, Method::Head);
        let (r, _) = ok("GET / HTTP/1.1\r\nHost: x\r\nConnection: foo, close\r\n\r\n");
        assert!(!r.keep_alive);
        let (r, _) = ok("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n");
        assert!(!r.keep_alive, "a request with a body closes after");
        let (r, _) = ok("GET / HTTP/1.0\r\nConnection: close, keep-alive\r\n\r\n");
        assert!(!r.keep_alive, "close wins, whatever the order");
        let (r, _) = ok("GET / HTTP/1.0\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n");
        assert!(!r.keep_alive, "close wins across fields too");
    }

    #[test]
    fn framing_fields_cannot_be_hidden() {
        // A value httparse accepts but that is not UTF-8 must not make
        // sluice skip the field and read the body as the next request.
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 44\xff\r\n\r\n"),
            Parsed::Error(400)
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\xff\r\n\r\n"),
            Parsed::Error(400)
        );
        for bad in ["+5", "-1", "5 5", "0x10", ""] {
            let req = format!("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: {bad}\r\n\r\n");
            assert_eq!(parse(req.as_bytes()), Parsed::Error(400), "{bad:?}");
        }
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Parsed::Error(400),
            "two different lengths"
        );
        let (r, _) =
            ok("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n");
        assert!(r.keep_alive, "an empty body, stated twice, is still empty");
        // A Host that is not UTF-8 still counts as the one Host.
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\nHost: \xff\r\n\r\n"),
            Parsed::Error(400)
        );
        // Opaque bytes elsewhere are fine.
        match parse(b"GET / HTTP/1.1\r\nHost: x\r\nX-Note: caf\xe9\r\n\r\n") {
            Parsed::Complete(r, _) => assert!(r.keep_alive),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_and_limits() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost"), Parsed::Partial);
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n\r\n"),
            Parsed::Error(400),
            "no Host"
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            Parsed::Error(400)
        );
        assert_eq!(parse(b"G(T / HTTP/1.1\r\n\r\n"), Parsed::Error(400));
        assert_eq!(parse(b"GET / HTTP/2.0\r\n\r\n"), Parsed::Error(400));
        assert_eq!(parse(b"\x00\x01garbage\r\n\r\n"), Parsed::Error(400));
        let long = format!(
            "GET /{} HTTP/1.1\r\nHost: x\r\n\r\n",
            "a".repeat(MAX_TARGET)
        );
        assert_eq!(parse(long.as_bytes()), Parsed::Error(414));
        let long = format!("GET /{}", "a".repeat(MAX_TARGET + 100));
        assert_eq!(parse(long.as_bytes()), Parsed::Error(414), "partial line");
        let big = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n",
            "b".repeat(MAX_HEAD)
        );
        assert_eq!(parse(big.as_bytes()), Parsed::Error(431));
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X{i}: 1\r\n"))
            .collect();
        let req = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        assert_eq!(parse(req.as_bytes()), Parsed::Error(431));
        let (r, _) = ok("DELETE / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(r.method, Method::Other);
        assert_eq!(r.method_name, "DELETE");
    }

    #[test]
    fn validators_and_range_kept() {
        let (r, _) = ok(
            "GET / HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\nIf-None-Match: \"a\"\r\nIf-None-Match: \"b\"\r\nIf-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n",
        );
        assert_eq!(r.range.as_deref(), Some("bytes=0-1"));
        assert_eq!(r.if_none_match.as_deref(), Some("\"a\", \"b\""));
        assert!(r.if_modified_since.is_some());
        let (r, _) = ok(
            "GET / HTTP/1.1\r\nHost: x\r\nIf-Match: \"a\"\r\nIf-Match: \"b\"\r\nIf-Unmodified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n",
        );
        assert_eq!(r.if_match.as_deref(), Some("\"a\", \"b\""));
        assert!(r.if_unmodified_since.is_some());
        // An If-Match that is not UTF-8 is still a precondition (that
        // matches nothing), never ignored.
        match parse(b"GET / HTTP/1.1\r\nHost: x\r\nIf-Match: \"\xe9\"\r\nIf-None-Match: \"\xe9\"\r\nIf-Range: \"\xe9\"\r\n\r\n") {
            Parsed::Complete(r, _) => {
                assert_eq!(r.if_match.as_deref(), Some(""));
                assert_eq!(r.if_none_match.as_deref(), Some(""));
                assert_eq!(r.if_range.as_deref(), Some(""));
            }
            other => panic!("{other:?}"),
        }
    }
}
