//! Socket addresses and networks as written in the config file.
//!
//! Addresses are `IP:PORT` (`[v6]:PORT` for IPv6) or `HOST:PORT`; host names
//! are resolved once, at load, and the first address is used. The syntax is
//! checked before any lookup so that a typo gets a precise message instead
//! of a resolver error (and never leaves the machine as a DNS query).
//! `overlaps` is the rule for two listeners that cannot both be bound.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use ipnet::IpNet;

/// The expected form, appended to messages about a malformed address.
const FORMAT: &str = "expected IP:PORT or HOST:PORT, like 127.0.0.1:7000 or [::1]:7000";

/// Why an address could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrError {
    /// Not of the form IP:PORT / HOST:PORT; the text says what is wrong.
    Syntax(String),
    /// Well-formed host name that did not resolve; the resolver's message.
    Resolve(String),
}

/// Parse `IP:PORT`, or resolve `HOST:PORT` to its first address.
pub fn resolve(text: &str) -> Result<SocketAddr, AddrError> {
    let syntax = |why: String| Err(AddrError::Syntax(why));
    if text.is_empty() {
        return syntax(format!("the address is empty: {FORMAT}"));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some(rest) = text.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((ip, "")) if ip.parse::<std::net::Ipv6Addr>().is_ok() => {
                syntax(format!("the port is missing: {FORMAT}"))
            }
            Some((ip, port)) if ip.parse::<std::net::Ipv6Addr>().is_ok() => {
                let port = port.strip_prefix(':').unwrap_or(port);
                syntax(format!(
                    "invalid port {port:?}: expected a number from 0 to 65535"
                ))
            }
            Some((ip, _)) => syntax(format!("invalid IPv6 address {ip:?}")),
            None => syntax("missing ']' after the IPv6 address".into()),
        };
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return syntax(format!("the port is missing: {FORMAT}"));
    };
    if host.contains(':') {
        return syntax("IPv6 addresses need brackets, like [::1]:7000".into());
    }
    let Ok(port) = port.parse::<u16>() else {
        return syntax(format!(
            "invalid port {port:?}: expected a number from 0 to 65535"
        ));
    };
    if host.is_empty() {
        return syntax(format!("the host is missing: {FORMAT}"));
    }
    if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return syntax(format!("invalid IPv4 address {host:?}"));
    }
    if !valid_host_name(host) {
        return syntax(format!(
            "invalid host name {host:?}: expected letters, digits, '-' and '.'"
        ));
    }
    match (host, port).to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| AddrError::Resolve(format!("{host:?} has no addresses"))),
        Err(err) => Err(AddrError::Resolve(err.to_string())),
    }
}

/// RFC 1123 host name (underscores tolerated, as resolvers do).
fn valid_host_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// A CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a bare IP (a /32 or /128).
pub fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Whether two listen addresses cannot both be bound: the same port and
/// family, and the same IP or either one the wildcard (0.0.0.0 / ::), which
/// takes the port on every local address. Port 0 (the kernel picks a free
/// port) never conflicts.
pub fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn literal_addresses() {
        assert_eq!(resolve("127.0.0.1:7000"), Ok(addr("127.0.0.1:7000")));
        assert_eq!(resolve("[::1]:7000"), Ok(addr("[::1]:7000")));
        assert_eq!(resolve("0.0.0.0:0"), Ok(addr("0.0.0.0:0")));
    }

    #[test]
    fn localhost_resolves_to_loopback() {
        let a = resolve("localhost:7000").unwrap();
        assert!(a.ip().is_loopback(), "{a}");
        assert_eq!(a.port(), 7000);
    }

    #[test]
    fn syntax_errors_say_what_is_wrong() {
        let cases = [
            ("", "empty"),
            ("127.0.0.1", "port is missing"),
            ("localhost", "port is missing"),
            ("::1:7000", "need brackets"),
            ("[::1]", "port is missing"),
            ("[::1]:x", "invalid port \"x\""),
            ("[::zz]:1", "invalid IPv6 address"),
            ("[::1:1", "missing ']'"),
            ("127.0.0.1:70000", "invalid port \"70000\""),
            ("127.0.0.1:", "invalid port \"\""),
            (":7000", "host is missing"),
            ("300.1.1.1:80", "invalid IPv4 address"),
            ("bad host:80", "invalid host name"),
            ("a..b:80", "invalid host name"),
            ("-a:80", "invalid host name"),
        ];
        for (text, phrase) in cases {
            match resolve(text) {
                Err(AddrError::Syntax(why)) => assert!(why.contains(phrase), "{text}: {why}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn host_names() {
        assert!(valid_host_name("app2.internal"));
        assert!(valid_host_name("a_b.example.com."));
        assert!(!valid_host_name("a.-b"));
        assert!(!valid_host_name(&"a".repeat(64)));
    }

    #[test]
    fn networks() {
        assert_eq!(parse_net("127.0.0.0/8"), "127.0.0.0/8".parse().ok());
        assert_eq!(parse_net("10.1.2.3"), "10.1.2.3/32".parse().ok());
        assert_eq!(parse_net("::1"), "::1/128".parse().ok());
        assert_eq!(parse_net("10.0.0.0/33"), None);
        assert_eq!(parse_net("nope"), None);
    }

    #[test]
    fn overlap_rule() {
        assert!(overlaps(addr("127.0.0.1:80"), addr("127.0.0.1:80")));
        assert!(overlaps(addr("0.0.0.0:80"), addr("127.0.0.1:80")));
        assert!(overlaps(addr("127.0.0.1:80"), addr("0.0.0.0:80")));
        assert!(overlaps(addr("[::]:80"), addr("[::1]:80")));
        assert!(!overlaps(addr("127.0.0.1:80"), addr("127.0.0.2:80")));
        assert!(!overlaps(addr("127.0.0.1:80"), addr("127.0.0.1:81")));
        assert!(!overlaps(addr("0.0.0.0:80"), addr("[::1]:80")));
        assert!(!overlaps(addr("127.0.0.1:0"), addr("127.0.0.1:0")));
    }
}
