//! Map a request target to a relative path beneath a route's root.
//!
//! The target is taken apart before any file is touched: the query is
//! dropped, percent escapes are decoded (so `%2e%2e` is `..` and `%2F` a
//! separator), and the result is split into components. Empty and `.`
//! components are skipped; a `..`, a NUL byte, or (unless `dotfiles`) a
//! name starting with `.` refuses the request with 404, so sluice never
//! says whether such a file exists. What remains is joined into a relative
//! path that the session opens with openat2(RESOLVE_BENEATH), which also
//! stops symlinks from leading outside: two independent guards.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// The relative path for `target` (`.` for the root itself), or the
/// status to answer with.
pub fn resolve(target: &str, dotfiles: bool) -> Result<PathBuf, u16> {
    let path = origin_path(target).ok_or(400u16)?;
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let bytes = decode(path.as_bytes()).ok_or(400u16)?;
    if bytes.contains(&0) {
        return Err(404);
    }
    let mut out = PathBuf::new();
    for comp in bytes.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => return Err(404),
            c if c[0] == b'.' && !dotfiles => return Err(404),
            c => out.push(OsString::from_vec(c.to_vec())),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    Ok(out)
}

/// The absolute path, with a trailing slash, of the folder `rel` (as
/// `resolve` returned it), percent-encoded: the Location of a redirect.
pub fn dir_location(rel: &Path) -> String {
    let mut out = String::from("/");
    if rel != Path::new(".") {
        for &b in rel.as_os_str().as_bytes() {
            if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out.push('/');
    }
    out
}

/// `loc` with the query of `target` (after `?`, before `#`) appended, as
/// nginx's folder redirect keeps it. The query is copied byte by byte,
/// and anything outside the characters a query may hold is
/// percent-encoded, so it can add nothing to the header but a query.
pub fn with_query(mut loc: String, target: &str) -> String {
    let Some((_, query)) = target.split('#').next().and_then(|t| t.split_once('?')) else {
        return loc;
    };
    loc.push('?');
    for &b in query.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b) {
            loc.push(b as char);
        } else {
            loc.push_str(&format!("%{b:02X}"));
        }
    }
    loc
}

/// The path part of an origin-form (`/a/b`) or absolute-form
/// (`http://host/a/b`) target; `None` for anything else (`*`, `a/b`).
fn origin_path(target: &str) -> Option<&str> {
    if target.starts_with('/') {
        return Some(target);
    }
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &target[7..]
    } else if lower.starts_with("https://") {
        &target[8..]
    } else {
        return None;
    };
    Some(rest.find('/').map(|i| &rest[i..]).unwrap_or("/"))
}

/// Percent-decode; `None` on a malformed escape.
fn decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            // Two hex digits, nothing else (from_str_radix takes "+1").
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(t: &str) -> String {
        resolve(t, false).unwrap().to_string_lossy().into_owned()
    }

    #[test]
    fn plain_paths() {
        assert_eq!(ok("/"), ".");
        assert_eq!(ok("/a/b.txt"), "a/b.txt");
        assert_eq!(ok("//a//./b?x=/../..#f"), "a/b");
        assert_eq!(ok("/sp%20ace"), "sp ace");
        assert_eq!(ok("/a%2Fb"), "a/b");
        assert_eq!(ok("http://Host:1/x/y"), "x/y");
        assert_eq!(ok("HTTPS://h"), ".");
    }

    #[test]
    fn escapes_refused() {
        for t in [
            "/../etc/passwd",
            "/a/../../x",
            "/%2e%2e/x",
            "/%2E%2E%2Fx",
            "/a%2F..%2F..%2Fx",
            "/..",
            "/x%00.txt",
            "/.hidden",
            "/a/.git/config",
            "http://h/../x",
        ] {
            assert_eq!(resolve(t, false), Err(404), "{t}");
        }
        assert_eq!(resolve("/%zz", false), Err(400));
        assert_eq!(resolve("/%2", false), Err(400));
        assert_eq!(resolve("/%+1", false), Err(400));
        assert_eq!(resolve("/%-1", false), Err(400));
        assert_eq!(resolve("*", false), Err(400));
        assert_eq!(resolve("etc/passwd", false), Err(400));
        assert_eq!(
            resolve("/.well-known/x", true).unwrap(),
            PathBuf::from(".well-known/x")
        );
        assert_eq!(resolve("/../x", true), Err(404), "dotfiles never allows ..");
    }

    #[test]
    fn redirect_locations() {
        let loc = |t: &str| dir_location(&resolve(t, false).unwrap());
        assert_eq!(loc("/docs"), "/docs/");
        assert_eq!(loc("//evil.com"), "/evil.com/", "never protocol-relative");
        assert_eq!(loc("/a%20b/c?q=1"), "/a%20b/c/");
        assert_eq!(loc("/"), "/");
        assert_eq!(with_query("/d/".into(), "/d?a=1&b=%20#f"), "/d/?a=1&b=%20");
        assert_eq!(with_query("/d/".into(), "/d?x\"<>"), "/d/?x%22%3C%3E");
        assert_eq!(with_query("/d/".into(), "/d#f?x"), "/d/");
        assert_eq!(with_query("/d/".into(), "/d"), "/d/");
    }
}
