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
}

/// What the bytes received so far hold.
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
    };
    let mut host = false;
    let mut has_body = false;
    for h in req.headers.iter() {
        let Ok(v) = std::str::from_utf8(h.value) else {
            continue; // not a header we read; opaque bytes are allowed
        };
        let v = v.trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            if host {
                return Parsed::Error(400); // RFC 9112 §3.2: exactly one Host
            }
            host = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for t in v.split(',').map(str::trim) {
                if t.eq_ignore_ascii_case("close") {
                    r.keep_alive = false;
                } else if t.eq_ignore_ascii_case("keep-alive") && minor == 0 {
                    r.keep_alive = true;
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
        } else if name.eq_ignore_ascii_case("content-length") {
            match v.parse::<u64>() {
                Ok(0) => {}
                Ok(_) => has_body = true,
                Err(_) => return Parsed::Error(400),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            has_body = true;
        }
    }
    if minor >= 1 && !host {
        return Parsed::Error(400);
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
    }
}
