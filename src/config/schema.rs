//! The raw TOML schema: what the file may contain, before any meaning is
//! checked.
//!
//! Every struct denies unknown keys, and every value is wrapped in
//! `toml::Spanned` so that `validate` can point at the exact value it
//! rejects. All keys are optional here: "missing" is a semantic error that
//! `validate` reports itself (at the table's header), with a better message
//! than serde's "missing field".
//!
//! Field order matters a little: serde lists the known keys in declaration
//! order when it reports an unknown one, and that list is shown to the user.

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

use super::units;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub global: Option<Spanned<RawGlobal>>,
    pub admin: Option<Spanned<RawAdmin>>,
    pub route: Option<Vec<Spanned<RawRoute>>>,
}

/// `[global]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGlobal {
    pub max_connections: Option<Spanned<u64>>,
    pub max_pipes: Option<Spanned<u64>>,
    pub shutdown_timeout: Option<Spanned<Dur>>,
    pub log_level: Option<Spanned<String>>,
    pub workers: Option<Spanned<u64>>,
    pub open_file_cache: Option<Spanned<u64>>,
    pub open_file_cache_inactive: Option<Spanned<Dur>>,
    pub busy_poll: Option<Spanned<Dur>>,
}

/// `[admin]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<Spanned<String>>,
}

/// One `[[route]]`: the union of proxy and file route keys; `validate`
/// decides the kind and rejects keys that do not fit it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<Spanned<String>>,
    pub listen: Option<Spanned<OneOrMany>>,
    pub backends: Option<Spanned<Backends>>,
    pub strategy: Option<Spanned<String>>,
    pub balance: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<Dur>>,
    pub queue_timeout: Option<Spanned<Dur>>,
    pub idle_timeout: Option<Spanned<Dur>>,
    pub tcp_keepalive: Option<Spanned<Dur>>,
    pub tcp_keepalive_interval: Option<Spanned<Dur>>,
    pub tcp_keepalive_count: Option<Spanned<u64>>,
    pub pipe_size: Option<Spanned<Size>>,
    pub buffer_size: Option<Spanned<Size>>,
    pub max_connections: Option<Spanned<u64>>,
    pub max_connections_per_ip: Option<Spanned<u64>>,
    pub allow: Option<Spanned<OneOrMany>>,
    pub deny: Option<Spanned<OneOrMany>>,
    pub accept_proxy: Option<Spanned<bool>>,
    pub accept_proxy_from: Option<Spanned<OneOrMany>>,
    pub send_proxy: Option<Spanned<String>>,
    pub header_timeout: Option<Spanned<Dur>>,
    pub fallback_file: Option<Spanned<String>>,
    pub fallback_strategy: Option<Spanned<String>>,
    pub root: Option<Spanned<String>>,
    pub file: Option<Spanned<String>>,
    pub protocol: Option<Spanned<String>>,
    pub index: Option<Spanned<String>>,
    pub send_chunk: Option<Spanned<Size>>,
    pub dotfiles: Option<Spanned<bool>>,
    pub health: Option<Spanned<RawHealth>>,
}

/// `[route.health]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub interval: Option<Spanned<Dur>>,
    pub timeout: Option<Spanned<Dur>>,
    pub rise: Option<Spanned<u64>>,
    pub fall: Option<Spanned<u64>>,
    pub http_path: Option<Spanned<String>>,
}

/// Deserialize the raw schema. Errors are toml's; `locate` turns them into
/// `ConfigError`s.
pub fn from_str(text: &str) -> Result<RawConfig, toml::de::Error> {
    toml::from_str(text)
}

/// A duration written as a string (`"3s"`), see `units::parse_duration`.
/// The integer `0` is also accepted, as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string like \"250ms\", \"3s\" or \"5m\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Dur, E> {
                units::parse_duration(s).map(Dur).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Dur, E> {
                if n == 0 {
                    Ok(Dur(Duration::ZERO))
                } else {
                    Err(E::custom(format!(
                        "invalid duration {n}: a duration needs a unit and quotes, like \"{}s\"",
                        n.unsigned_abs()
                    )))
                }
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Dur, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
            }
        }
        d.deserialize_any(V)
    }
}

/// A byte size: a TOML integer (bytes) or a string like `"64KiB"`, see
/// `units::parse_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like \"64KiB\", \"1MiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Size, E> {
                units::parse_size(s).map(Size).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Size, E> {
                u64::try_from(n)
                    .map(Size)
                    .map_err(|_| E::custom(format!("invalid size {n}: sizes cannot be negative")))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Size, E> {
                Ok(Size(n))
            }
        }
        d.deserialize_any(V)
    }
}

/// A string or a list of strings (`listen`, `backends`, `allow`, `deny`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OneOrMany {
    One(String),
    Many(Vec<Spanned<String>>),
}

impl OneOrMany {
    /// The items with their spans; a single string takes `outer`, the span
    /// of the whole value.
    pub fn items(&self, outer: &Range<usize>) -> Vec<(&str, Range<usize>)> {
        match self {
            OneOrMany::One(s) => vec![(s.as_str(), outer.clone())],
            OneOrMany::Many(list) => list
                .iter()
                .map(|s| (s.get_ref().as_str(), s.span()))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, OneOrMany::Many(list) if list.is_empty())
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(s.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<String>>()? {
                    items.push(item);
                }
                Ok(OneOrMany::Many(items))
            }
        }
        d.deserialize_any(V)
    }
}

/// `backends`: one backend (an address or a table
/// `{ address = "...", weight = 2, backup = true }`), or a list of them.
#[derive(Debug)]
pub enum Backends {
    One(RawBackend),
    Many(Vec<Spanned<RawBackend>>),
}

/// One item of a `backends` list.
#[derive(Debug)]
pub enum RawBackend {
    Address(String),
    Table(RawBackendTable),
}

/// A backend written as a table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackendTable {
    pub address: Option<Spanned<String>>,
    pub weight: Option<Spanned<i64>>,
    pub backup: Option<Spanned<bool>>,
    pub max_connections: Option<Spanned<i64>>,
}

impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawBackend;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an address like \"127.0.0.1:9000\" or a table like \
                     { address = \"127.0.0.1:9000\", weight = 2 }",
                )
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawBackend, E> {
                Ok(RawBackend::Address(s.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawBackend, A::Error> {
                RawBackendTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawBackend::Table)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Backends {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Backends;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address, a backend table, or a list of them")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Backends, E> {
                Ok(Backends::One(RawBackend::Address(s.to_string())))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Backends, A::Error> {
                RawBackendTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|t| Backends::One(RawBackend::Table(t)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Backends, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<RawBackend>>()? {
                    items.push(item);
                }
                Ok(Backends::Many(items))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_route_deserializes_with_spans() {
        let text = r#"
[global]
max_connections = 10
shutdown_timeout = "1s"

[[route]]
name = "a"
listen = "127.0.0.1:1"
backends = ["x:1", "y:2"]
pipe_size = "1MiB"
buffer_size = 4096
connect_timeout = 0

[route.health]
rise = 5
"#;
        let raw = from_str(text).unwrap();
        let routes = raw.route.unwrap();
        let r = routes[0].get_ref();
        assert_eq!(&text[routes[0].span()], "[[route]]");
        let listen = r.listen.as_ref().unwrap();
        let items = listen.get_ref().items(&listen.span());
        assert_eq!(items[0].0, "127.0.0.1:1");
        assert_eq!(&text[items[0].1.clone()], "\"127.0.0.1:1\"");
        let backends = r.backends.as_ref().unwrap();
        let Backends::Many(items) = backends.get_ref() else {
            panic!("a list")
        };
        assert_eq!(&text[items[1].span()], "\"y:2\"");
        assert_eq!(r.pipe_size.as_ref().unwrap().get_ref(), &Size(1 << 20));
        assert_eq!(r.buffer_size.as_ref().unwrap().get_ref(), &Size(4096));
        assert_eq!(
            r.connect_timeout.as_ref().unwrap().get_ref(),
            &Dur(Duration::ZERO)
        );
        assert_eq!(
            *r.health
                .as_ref()
                .unwrap()
                .get_ref()
                .rise
                .as_ref()
                .unwrap()
                .get_ref(),
            5
        );
        let g = raw.global.unwrap();
        assert_eq!(
            g.get_ref().shutdown_timeout.as_ref().unwrap().get_ref(),
            &Dur(Duration::from_secs(1))
        );
    }

    #[test]
    fn bad_values_carry_the_value_span() {
        let text = "[[route]]\nidle_timeout = \"3 s\"\n";
        let err = from_str(text).unwrap_err();
        assert_eq!(&text[err.span().unwrap()], "\"3 s\"");
        assert!(
            err.message().starts_with("invalid duration \"3 s\""),
            "{}",
            err.message()
        );

        let text = "[[route]]\npipe_size = -1\n";
        let err = from_str(text).unwrap_err();
        assert_eq!(&text[err.span().unwrap()], "-1");
        assert!(err.message().contains("cannot be negative"));

        let text = "[[route]]\nconnect_timeout = 3\n";
        let err = from_str(text).unwrap_err();
        assert!(err.message().contains("like \"3s\""), "{}", err.message());
    }

    #[test]
    fn unknown_keys_are_denied_everywhere() {
        for text in [
            "bogus = 1",
            "[global]\nbogus = 1",
            "[admin]\nbogus = 1",
            "[[route]]\nbogus = 1",
            "[[route]]\n[route.health]\nbogus = 1",
        ] {
            let err = from_str(text).unwrap_err();
            assert!(
                err.message().starts_with("unknown field `bogus`"),
                "{text}: {}",
                err.message()
            );
            assert_eq!(&text[err.span().unwrap()], "bogus");
        }
    }

    #[test]
    fn empty_list_is_empty() {
        assert!(OneOrMany::Many(vec![]).is_empty());
        assert!(!OneOrMany::One(String::new()).is_empty());
    }
}
