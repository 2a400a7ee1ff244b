//! Conditional requests and byte ranges (RFC 9110 §13 and §14).
//!
//! sluice serves one range at most: a single `bytes=a-b`, `a-` or `-n`
//! becomes a 206; a set that cannot be satisfied a 416; a request for
//! several ranges, or a Range header sluice does not understand, gets the
//! whole file with 200 (which RFC 9110 allows: a server may ignore Range).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What a file is known by for validators.
#[derive(Debug, Clone)]
pub struct Validators {
    /// Strong ETag, quotes included: `"size-mtime"` in hex (nanoseconds).
    pub etag: String,
    /// Modification time rounded down to seconds.
    pub mtime: SystemTime,
}

impl Validators {
    pub fn new(size: u64, mtime: SystemTime) -> Self {
        let d = mtime.duration_since(UNIX_EPOCH).unwrap_or_default();
        Validators {
            etag: format!("\"{size:x}-{:x}\"", d.as_nanos()),
            // An HTTP date has four digits of year (httpdate panics past
            // 9999, and anyone can touch a file into year 10000).
            mtime: UNIX_EPOCH + Duration::from_secs(d.as_secs().min(LAST_HTTP_DATE)),
        }
    }

    pub fn last_modified(&self) -> String {
        httpdate::fmt_http_date(self.mtime)
    }
}

/// 9999-12-31T23:59:59Z, the last instant an HTTP date can name.
const LAST_HTTP_DATE: u64 = 253_402_300_799;

/// Whether a precondition fails (answer 412): If-Match, or when it is
/// absent If-Unmodified-Since (RFC 9110 §13.2.2). If-Match compares
/// strongly: a weak tag never matches; `*` matches any file.
pub fn precondition_failed(v: &Validators, im: Option<&str>, ius: Option<&str>) -> bool {
    if let Some(list) = im {
        return !list
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || t == v.etag);
    }
    if let Some(since) = ius.and_then(|s| httpdate::parse_http_date(s).ok()) {
        return v.mtime > since;
    }
    false
}

/// Whether the client's copy is current (answer 304). If-None-Match wins
/// over If-Modified-Since when both are present.
pub fn not_modified(v: &Validators, inm: Option<&str>, ims: Option<&str>) -> bool {
    if let Some(list) = inm {
        return list.split(',').map(str::trim).any(|t| {
            // Weak comparison: W/"x" matches "x".
            t == "*" || t.strip_prefix("W/").unwrap_or(t) == v.etag
        });
    }
    if let Some(since) = ims.and_then(|s| httpdate::parse_http_date(s).ok()) {
        return v.mtime <= since;
    }
    false
}

/// What to send of a file of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// 200, the whole file.
    Full,
    /// 206, bytes `[start, end)`.
    Part(u64, u64),
    /// 416.
    Unsatisfiable,
}

/// Decide from the Range and If-Range headers.
pub fn span(range: Option<&str>, if_range: Option<&str>, v: &Validators, size: u64) -> Span {
    let Some(range) = range else {
        return Span::Full;
    };
    if let Some(ir) = if_range {
        // Only a strong, exact validator keeps the range (RFC 9110 §13.1.5).
        let date_ok = httpdate::parse_http_date(ir).is_ok_and(|d| d == v.mtime);
        if ir != v.etag && !date_ok {
            return Span::Full;
        }
    }
    let Some(spec) = range.trim().strip_prefix("bytes=") else {
        return Span::Full;
    };
    if spec.contains(',') {
        return Span::Full; // several ranges: documented as served in full
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Span::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            // Too many digits for u64: larger than any file.
            Some(s.parse().unwrap_or(u64::MAX))
        }
    };
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Span::Full,
        (true, false) => match num(b) {
            None => Span::Full,
            Some(0) => Span::Unsatisfiable,
            Some(_) if size == 0 => Span::Unsatisfiable,
            Some(n) => Span::Part(size - n.min(size), size),
        },
        (false, _) => {
            let Some(start) = num(a) else {
                return Span::Full;
            };
            let last = if b.is_empty() {
                u64::MAX
            } else {
                match num(b) {
                    Some(l) if l >= start => l,
                    _ => return Span::Full, // invalid: ignore the header
                }
            };
            if start >= size {
                Span::Unsatisfiable
            } else {
                Span::Part(start, last.min(size - 1) + 1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_past_year_9999_are_clamped() {
        let far = UNIX_EPOCH + Duration::from_secs(300_000_000_000);
        let v = Validators::new(1, far);
        assert_eq!(v.last_modified(), "Fri, 31 Dec 9999 23:59:59 GMT");
        assert!(v.etag.starts_with("\"1-"));
    }

    fn v() -> Validators {
        Validators::new(100, UNIX_EPOCH + Duration::from_millis(1_700_000_000_500))
    }

    #[test]
    fn ranges() {
        let v = v();
        let s = |r: &str| span(Some(r), None, &v, 100);
        assert_eq!(span(None, None, &v, 100), Span::Full);
        assert_eq!(s("bytes=0-0"), Span::Part(0, 1));
        assert_eq!(s("bytes=0-99"), Span::Part(0, 100));
        assert_eq!(s("bytes=10-1000"), Span::Part(10, 100));
        assert_eq!(s("bytes=99-"), Span::Part(99, 100));
        assert_eq!(s("bytes=-1"), Span::Part(99, 100));
        assert_eq!(s("bytes=-100"), Span::Part(0, 100));
        assert_eq!(s("bytes=-500"), Span::Part(0, 100));
        assert_eq!(s("bytes=100-"), Span::Unsatisfiable);
        assert_eq!(s("bytes=100-200"), Span::Unsatisfiable);
        assert_eq!(s("bytes=-0"), Span::Unsatisfiable);
        assert_eq!(s("bytes=99999999999999999999999-"), Span::Unsatisfiable);
        assert_eq!(s("bytes=5-4"), Span::Full);
        assert_eq!(s("bytes=0-1,5-6"), Span::Full);
        assert_eq!(s("items=0-1"), Span::Full);
        assert_eq!(s("bytes=a-b"), Span::Full);
        assert_eq!(s("bytes=-"), Span::Full);
        assert_eq!(span(Some("bytes=-5"), None, &v, 0), Span::Unsatisfiable);
        assert_eq!(span(Some("bytes=0-"), None, &v, 0), Span::Unsatisfiable);
    }

    #[test]
    fn if_range() {
        let v = v();
        let e = v.etag.clone();
        assert_eq!(span(Some("bytes=0-0"), Some(&e), &v, 100), Span::Part(0, 1));
        assert_eq!(span(Some("bytes=0-0"), Some("\"x\""), &v, 100), Span::Full);
        assert_eq!(span(Some("bytes=0-0"), Some(""), &v, 100), Span::Full);
        let lm = v.last_modified();
        assert_eq!(
            span(Some("bytes=0-0"), Some(&lm), &v, 100),
            Span::Part(0, 1)
        );
    }

    #[test]
    fn preconditions() {
        let v = v();
        let e = v.etag.clone();
        let lm = v.last_modified();
        let failed = |im: Option<&str>, ius: Option<&str>| precondition_failed(&v, im, ius);
        assert!(!failed(None, None));
        assert!(
            failed(Some(""), None),
            "an If-Match that lists nothing readable"
        );
        assert!(!failed(Some(&e), None));
        assert!(!failed(Some("*"), None));
        assert!(!failed(Some(&format!("\"a\", {e}")), None));
        assert!(failed(Some("\"nope\""), None));
        assert!(failed(Some(&format!("W/{e}")), None), "strong comparison");
        assert!(!failed(None, Some(&lm)), "unmodified since its own date");
        assert!(failed(None, Some("Sun, 06 Nov 1994 08:49:37 GMT")));
        assert!(!failed(None, Some("garbage")), "an invalid date is ignored");
        // If-Match decides alone when present.
        assert!(!failed(Some(&e), Some("Sun, 06 Nov 1994 08:49:37 GMT")));
    }

    #[test]
    fn conditionals() {
        let v = v();
        assert!(v.etag.starts_with("\"64-"));
        assert!(not_modified(&v, Some(&v.etag), None));
        assert!(not_modified(
            &v,
            Some(&format!("\"a\", W/{}", v.etag)),
            None
        ));
        assert!(not_modified(&v, Some("*"), None));
        assert!(!not_modified(
            &v,
            Some("\"nope\""),
            Some(&v.last_modified())
        ));
        assert!(not_modified(&v, None, Some(&v.last_modified())));
        assert!(!not_modified(
            &v,
            None,
            Some("Sun, 06 Nov 1994 08:49:37 GMT")
        ));
        assert!(!not_modified(&v, None, Some("garbage")));
        assert!(!not_modified(&v, None, None));
        // An If-None-Match that lists nothing readable matches nothing,
        // and still takes precedence over If-Modified-Since.
        assert!(!not_modified(&v, Some(""), Some(&v.last_modified())));
    }
}
