//! Response heads. Every response carries Date and `Server: sluice`, a
//! Content-Length (so keep-alive works without chunking), and says
//! `Connection: close` when sluice will close afterwards (or
//! `Connection: keep-alive` to an HTTP/1.0 client that asked for it).

use std::fmt::Write;
use std::time::SystemTime;

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        301 => "Moved Permanently",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        414 => "URI Too Long",
        412 => "Precondition Failed",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The Date header's value, formatted once per second per thread (as
/// nginx does): a busy file route sends thousands of heads a second.
struct DateCache {
    second: u64,
    text: String,
}

impl DateCache {
    fn now(&mut self) -> &str {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text = httpdate::fmt_http_date(now);
        }
        &self.text
    }
}

thread_local! {
    static DATE: std::cell::RefCell<DateCache> = const {
        std::cell::RefCell::new(DateCache { second: 0, text: String::new() })
    };
}

/// A response head under construction.
pub struct Head {
    buf: String,
}

impl Head {
    /// Status line, Date and Server. `minor` is the request's HTTP minor
    /// version (the reply uses the same, as nginx does).
    pub fn new(minor: u8, status: u16) -> Head {
        let mut buf = String::with_capacity(256);
        let _ = write!(
            buf,
            "HTTP/1.{} {status} {}\r\nServer: sluice\r\nDate: ",
            minor.min(1),
            reason(status),
        );
        DATE.with(|d| buf.push_str(d.borrow_mut().now()));
        buf.push_str("\r\n");
        Head { buf }
    }

    pub fn header(mut self, name: &str, value: impl std::fmt::Display) -> Head {
        let _ = write!(self.buf, "{name}: {value}\r\n");
        self
    }

    /// End the head; `keep_alive` as decided for this exchange.
    pub fn finish(mut self, minor: u8, keep_alive: bool) -> Vec<u8> {
        if !keep_alive {
            self.buf.push_str("Connection: close\r\n");
        } else if minor == 0 {
            self.buf.push_str("Connection: keep-alive\r\n");
        }
        self.buf.push_str("\r\n");
        self.buf.into_bytes()
    }
}

/// A complete error response with a one-line text body (omitted for HEAD).
pub fn error(minor: u8, status: u16, keep_alive: bool, head_only: bool) -> Vec<u8> {
    let body = format!("{status} {}\n", reason(status));
    let mut h = Head::new(minor, status)
        .header("Content-Type", "text/plain; charset=utf-8")
        .header("Content-Length", body.len());
    if status == 405 {
        h = h.header("Allow", "GET, HEAD");
    }
    let mut out = h.finish(minor, keep_alive);
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// 301 to `location` (already safe to put in a header).
pub fn redirect(minor: u8, location: &str, keep_alive: bool, head_only: bool) -> Vec<u8> {
    let body = format!("301 Moved Permanently: {location}\n");
    let mut out = Head::new(minor, 301)
        .header("Location", location)
        .header("Content-Type", "text/plain; charset=utf-8")
        .header("Content-Length", body.len())
        .finish(minor, keep_alive);
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// Content-Type for a file name (mime_guess); text gets `charset=utf-8`.
pub fn content_type(path: &std::path::Path) -> String {
    let m = mime_guess::from_path(path).first_or_octet_stream();
    if m.type_() == mime_guess::mime::TEXT {
        format!("{m}; charset=utf-8")
    } else {
        m.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let h = String::from_utf8(error(1, 405, true, false)).unwrap();
        assert!(h.starts_with("HTTP/1.1 405 Method Not Allowed\r\nServer: sluice\r\nDate: "));
        assert!(h.contains("\r\nAllow: GET, HEAD\r\n"));
        assert!(h.contains("\r\nContent-Length: 23\r\n"));
        assert!(h.ends_with("\r\n\r\n405 Method Not Allowed\n"));
        assert!(!h.contains("Connection"));
        let h = String::from_utf8(error(0, 400, false, true)).unwrap();
        assert!(h.starts_with("HTTP/1.0 400 "));
        assert!(h.ends_with("Connection: close\r\n\r\n"));
        let h = String::from_utf8(Head::new(0, 200).finish(0, true)).unwrap();
        assert!(h.ends_with("Connection: keep-alive\r\n\r\n"));
        assert_eq!(
            content_type("a/README.md".as_ref()),
            "text/markdown; charset=utf-8"
        );
        assert_eq!(content_type("x.bin".as_ref()), "application/octet-stream");
    }

    /// The cached Date is the current time, to the second, on every head.
    #[test]
    fn date_is_now() {
        for _ in 0..2 {
            let before = SystemTime::now() - std::time::Duration::from_secs(1);
            let h = String::from_utf8(Head::new(1, 200).finish(1, true)).unwrap();
            let date = h
                .lines()
                .find_map(|l| l.strip_prefix("Date: "))
                .expect("a Date header");
            let t = httpdate::parse_http_date(date).expect("an HTTP date");
            let after = SystemTime::now();
            assert!(before <= t && t <= after, "{date}");
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
    }
}
