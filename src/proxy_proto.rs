//! PROXY protocol (v1 text, v2 binary): reading the header a front load
//! balancer puts before the client's bytes (`accept_proxy`), and writing
//! one to a backend (`send_proxy`).
//!
//! Both directions go through the `ppp` crate; this module only adds what
//! a proxy needs around it: a bound on how many bytes a header may take
//! before the connection is refused, the choice of which addresses count
//! (a `LOCAL` or `UNKNOWN` header, or a v2 one for another transport,
//! means "use the real socket"), a v1 line judged once its LF is in (a
//! finished line the parser still calls incomplete is refused at once),
//! the v1 `UNKNOWN` line `ppp` refuses when five or more words follow it,
//! and address pairs of one family for the header sluice sends.
//!
//! Size bounds. v1: at most 107 bytes including CRLF, as the spec says
//! (`ppp` refuses longer lines). v2: 16 fixed bytes plus the length field;
//! the field allows 64 KiB, but sluice accepts at most `MAX_HEADER` (536)
//! bytes in all: room for the largest address block (216 bytes, AF_UNIX)
//! plus the TLVs load balancers really send (AWS NLB, GCP), and small
//! enough to sit in a fixed buffer per connection in its handshake. A
//! longer header is refused as too long instead of being buffered.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ppp::v2;
use ppp::{HeaderResult, PartialResult};

use crate::config::ProxyVersion;

/// The most bytes a received header may take (v2; v1 is capped at 107).
pub const MAX_HEADER: usize = 536;

/// Length of the fixed part of a v2 header.
const V2_FIXED: usize = 16;
/// Longest v1 header, CRLF included.
const V1_MAX: usize = 107;

/// A complete header, as far as the proxy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Header length in bytes; what follows is the client's stream.
    pub len: usize,
    /// `v1` or `v2`, for the log.
    pub version: ProxyVersion,
    /// Source and destination the header carries; `None` for v2 `LOCAL`,
    /// v1 `UNKNOWN` and anything but TCP over IPv4/IPv6 (another family,
    /// or a v2 transport other than STREAM): then the real socket
    /// addresses apply.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
}

/// Why a received header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Not a PROXY header, or a broken one (the parser's reason).
    Malformed(String),
    /// Longer than the limit (bytes) for its version: 107 for v1 (the
    /// spec's), `MAX_HEADER` for v2 (see the module doc).
    TooLong(usize),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Malformed(why) => write!(f, "malformed PROXY header: {why}"),
            HeaderError::TooLong(max) => {
                write!(f, "PROXY header longer than the {max} bytes allowed")
            }
        }
    }
}

/// Parse the start of a client stream. `Ok(None)`: not complete yet, read
/// more (the caller refuses when its `MAX_HEADER` buffer is full).
pub fn parse(buf: &[u8]) -> Result<Option<Received>, HeaderError> {
    // A v1 line is judged once its LF is in: `ppp` takes a line cut just
    // after a space ("... 4242 ") for a bad port rather than a partial one.
    let v1_line = buf.starts_with(b"PROXY");
    let Some(lf) = buf.iter().position(|&b| b == b'\n').filter(|_| v1_line) else {
        if v1_line {
            return match buf.len() >= V1_MAX {
                true => Err(HeaderError::TooLong(V1_MAX)),
                false => Ok(None),
            };
        }
        return parse_ppp(buf, false);
    };
    if lf >= V1_MAX {
        return Err(HeaderError::TooLong(V1_MAX));
    }
    if let Some(r) = unknown_v1(&buf[..=lf]) {
        return r;
    }
    parse_ppp(buf, true)
}

/// `PROXY UNKNOWN`, then anything up to the CRLF, which the receiver
/// ignores (spec 2.1). Taken here because `ppp` splits a v1 line into at
/// most seven words and so refuses one with five or more after UNKNOWN.
fn unknown_v1(line: &[u8]) -> Option<Result<Option<Received>, HeaderError>> {
    let rest = line.strip_prefix(b"PROXY UNKNOWN")?;
    if !(rest.starts_with(b"\r\n") || rest.starts_with(b" ")) {
        return None; // "PROXY UNKNOWNX": let the parser say what is wrong
    }
    Some(match rest.ends_with(b"\r\n") {
        true => Ok(Some(Received {
            len: line.len(),
            version: ProxyVersion::V1,
            addrs: None,
        })),
        false => Err(HeaderError::Malformed(
            "the v1 line does not end with CRLF".into(),
        )),
    })
}

/// The header through `ppp`. `line_done`: a v1 line's LF is in, so what
/// the parser calls incomplete is a line that ended too soon.
fn parse_ppp(buf: &[u8], line_done: bool) -> Result<Option<Received>, HeaderError> {
    let v2_sig = v2::PROTOCOL_PREFIX;
    let res = if buf.starts_with(v2_sig) || v2_sig.starts_with(buf) {
        HeaderResult::V2(v2::Header::try_from(buf))
    } else if buf.starts_with(b"PROXY") || b"PROXY".starts_with(buf) {
        HeaderResult::V1(ppp::v1::Header::try_from(buf))
    } else {
        return Err(HeaderError::Malformed(
            "the stream starts with neither \"PROXY\" (v1) nor the v2 signature".into(),
        ));
    };
    if res.is_incomplete() {
        if line_done && let HeaderResult::V1(Err(e)) = &res {
            return Err(HeaderError::Malformed(format!(
                "the v1 line ended early: {e}"
            )));
        }
        // A v2 header announces its length up front: refuse a long one at
        // once rather than waiting for bytes that would not fit.
        if let HeaderResult::V2(Err(v2::ParseError::Partial(_, len))) = &res
            && V2_FIXED + len > MAX_HEADER
        {
            return Err(HeaderError::TooLong(MAX_HEADER));
        }
        return Ok(None);
    }
    match res {
        HeaderResult::V1(Ok(h)) => {
            let addrs = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                ppp::v1::Addresses::Tcp6(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                ppp::v1::Addresses::Unknown => None,
            };
            Ok(Some(Received {
                len: h.header.len(),
                version: ProxyVersion::V1,
                addrs,
            }))
        }
        HeaderResult::V2(Ok(h)) => {
            let addrs = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                // Addresses of another transport (UDP) are not this TCP
                // connection's, as HAProxy also judges.
                (v2::Command::Proxy, _) if h.protocol != v2::Protocol::Stream => None,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                (v2::Command::Proxy, _) => None,
            };
            Ok(Some(Received {
                len: h.header.len(),
                version: ProxyVersion::V2,
                addrs,
            }))
        }
        HeaderResult::V1(Err(ppp::v1::BinaryParseError::Parse(
            ppp::v1::ParseError::HeaderTooLong,
        ))) => Err(HeaderError::TooLong(V1_MAX)),
        HeaderResult::V1(Err(e)) => Err(HeaderError::Malformed(e.to_string())),
        HeaderResult::V2(Err(e)) => Err(HeaderError::Malformed(e.to_string())),
    }
}

/// The header to send a backend for a connection from `src` to `dst`.
pub fn build(version: ProxyVersion, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    match version {
        ProxyVersion::V1 => ppp::v1::Addresses::from((src, dst))
            .to_string()
            .into_bytes(),
        ProxyVersion::V2 => {
            let addrs = v2::Addresses::from((src, dst));
            v2::Builder::with_addresses(
                v2::Version::Two | v2::Command::Proxy,
                v2::Protocol::Stream,
                addrs,
            )
            .build()
            // Only a payload over 64 KiB can fail, and two addresses are
            // 36 bytes at most.
            .unwrap_or_default()
        }
    }
}

/// The header a connection of sluice's own sends a backend that expects
/// one (a health check): v1 `UNKNOWN`, v2 `LOCAL`, which tell the backend
/// to take the connection's own addresses, as the protocol's
/// specification recommends for health checks.
pub fn build_local(version: ProxyVersion) -> Vec<u8> {
    match version {
        ProxyVersion::V1 => ppp::v1::Addresses::Unknown.to_string().into_bytes(),
        ProxyVersion::V2 => v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Local,
            v2::Protocol::Unspecified,
            v2::Addresses::Unspecified,
        )
        .build()
        // No payload: cannot fail.
        .unwrap_or_default(),
    }
}

/// Both addresses in one family, as PROXY headers need: IPv4-mapped IPv6
/// pairs become IPv4; a mixed pair maps its IPv4 side into IPv6.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (s, d) = (canonical(src), canonical(dst));
    match (s.ip(), d.ip()) {
        (IpAddr::V4(a), IpAddr::V6(_)) => (SocketAddr::from((a.to_ipv6_mapped(), s.port())), d),
        (IpAddr::V6(_), IpAddr::V4(b)) => (s, SocketAddr::from((b.to_ipv6_mapped(), d.port()))),
        _ => (s, d),
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is (so allow/deny,
/// per-IP limits and logs see one form of each client).
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_and_v2_round_trip_through_ppp() {
        for v in [ProxyVersion::V1, ProxyVersion::V2] {
            for (s, d) in [
                ("203.0.113.7:4242", "127.0.0.1:80"),
                ("[2001:db8::7]:4242", "[::1]:443"),
            ] {
                let mut h = build(v, sa(s), sa(d));
                let len = h.len();
                h.extend_from_slice(b"client bytes");
                let r = parse(&h).unwrap().unwrap();
                assert_eq!(r.len, len);
                assert_eq!(r.version, v);
                assert_eq!(r.addrs, Some((sa(s), sa(d))));
            }
        }
    }

    #[test]
    fn local_headers_parse_as_local() {
        assert_eq!(build_local(ProxyVersion::V1), b"PROXY UNKNOWN\r\n");
        let v2 = build_local(ProxyVersion::V2);
        assert_eq!(
            v2.len(),
            16,
            "signature, version and command, family, length 0"
        );
        let h = v2::Header::try_from(v2.as_slice()).unwrap();
        assert_eq!(h.command, v2::Command::Local);
        assert_eq!(h.addresses, v2::Addresses::Unspecified);
        // And sluice's own parser takes both as "use the socket's".
        for b in [build_local(ProxyVersion::V1), v2] {
            let r = parse(&b).unwrap().unwrap();
            assert_eq!((r.len, r.addrs), (b.len(), None), "{b:?}");
        }
    }

    #[test]
    fn v1_text_is_exact() {
        let h = build(ProxyVersion::V1, sa("203.0.113.7:4242"), sa("127.0.0.1:80"));
        assert_eq!(h, b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\n");
    }

    #[test]
    fn mixed_families_are_made_one() {
        let h = build(ProxyVersion::V1, sa("203.0.113.7:1"), sa("[::1]:2"));
        assert_eq!(h, b"PROXY TCP6 ::ffff:203.0.113.7 ::1 1 2\r\n");
        let h = build(
            ProxyVersion::V1,
            sa("[::ffff:203.0.113.7]:1"),
            sa("[::ffff:127.0.0.1]:2"),
        );
        assert_eq!(h, b"PROXY TCP4 203.0.113.7 127.0.0.1 1 2\r\n");
    }

    #[test]
    fn partial_headers_ask_for_more() {
        let full = build(ProxyVersion::V2, sa("203.0.113.7:1"), sa("127.0.0.1:2"));
        for n in 0..full.len() {
            assert_eq!(parse(&full[..n]), Ok(None), "v2 prefix of {n} bytes");
        }
        let full = b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\n";
        for n in 0..full.len() {
            assert_eq!(parse(&full[..n]), Ok(None), "v1 prefix of {n} bytes");
        }
    }

    #[test]
    fn local_and_unknown_use_the_socket() {
        let r = parse(b"PROXY UNKNOWN\r\nhello").unwrap().unwrap();
        assert_eq!((r.len, r.addrs), (15, None));
        let local = v2::Builder::new(
            v2::Version::Two | v2::Command::Local,
            v2::AddressFamily::Unspecified | v2::Protocol::Unspecified,
        )
        .build()
        .unwrap();
        let r = parse(&local).unwrap().unwrap();
        assert_eq!((r.len, r.addrs), (16, None));
    }

    #[test]
    fn unknown_ignores_the_rest_of_its_line() {
        for line in [
            &b"PROXY UNKNOWN a b c d e f\r\n"[..],
            b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2 and more\r\n",
        ] {
            let mut buf = line.to_vec();
            buf.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let r = parse(&buf).unwrap().unwrap();
            assert_eq!((r.len, r.addrs), (line.len(), None));
        }
        assert!(matches!(
            parse(b"PROXY UNKNOWN a\n"),
            Err(HeaderError::Malformed(_))
        ));
    }

    #[test]
    fn a_finished_v1_line_with_fields_missing_is_refused_at_once() {
        for line in [
            &b"PROXY TCP4 1.2.3.4\r\nGET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4\r\n",
            b"PROXY TCP6 ::1 ::1 1\r\n",
        ] {
            assert!(
                matches!(parse(line), Err(HeaderError::Malformed(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(line),
                parse(line)
            );
        }
    }

    #[test]
    fn v2_addresses_of_another_transport_are_not_used() {
        let udp = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Datagram,
            (sa("203.0.113.7:1"), sa("127.0.0.1:2")),
        )
        .build()
        .unwrap();
        let r = parse(&udp).unwrap().unwrap();
        assert_eq!((r.len, r.addrs), (udp.len(), None));
    }

    #[test]
    fn garbage_and_oversize_are_refused() {
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n"),
            Err(HeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 1.2.3 127.0.0.1 1 2\r\n"),
            Err(HeaderError::Malformed(_))
        ));
        let long = [b'P'; 120];
        assert!(parse(&long).is_err());
        let mut v1 = b"PROXY TCP4 ".to_vec();
        v1.extend([b'1'; 110]);
        assert!(matches!(parse(&v1), Err(HeaderError::TooLong(_))));
        // A v2 header announcing 1000 bytes is refused before they arrive.
        let mut v2 = v2::PROTOCOL_PREFIX.to_vec();
        v2.extend([0x21, 0x11, 0x03, 0xe8]);
        assert_eq!(parse(&v2), Err(HeaderError::TooLong(MAX_HEADER)));
    }
}
