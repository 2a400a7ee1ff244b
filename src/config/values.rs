//! Checked conversions from one raw (spanned) value to its validated form:
//! enum choices, non-zero durations and sizes, counts, paths that must exist,
//! address and network lists. Each helper takes the key name so its error
//! can say which setting is wrong, and reports at the value's span.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use super::diagnose;
use super::error::{ConfigError, Source};
use super::net::{self, AddrError};
use super::schema::{Dur, OneOrMany, Size};
use super::units::format_size;

/// Look `value` up in `options` (spelled exactly as in the file).
pub fn choice<T: Copy>(
    src: &Source,
    key: &str,
    value: &Spanned<String>,
    options: &[(&str, T)],
) -> Result<T, ConfigError> {
    let text = value.get_ref().as_str();
    options
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let known: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            let hint = diagnose::closest(text, &known)
                .map(|best| format!(" (did you mean {best:?}?)"))
                .unwrap_or_default();
            src.error(
                &value.span(),
                format!(
                    "invalid {key} {text:?}: expected one of: {}{hint}",
                    known.join(", ")
                ),
            )
        })
}

/// "a, b, c" from a choice table.
pub fn names<T>(options: &[(&str, T)]) -> String {
    options
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// An optional choice with a default.
pub fn choice_or<T: Copy>(
    src: &Source,
    key: &str,
    value: Option<&Spanned<String>>,
    options: &[(&str, T)],
    default: T,
) -> Result<T, ConfigError> {
    value.map_or(Ok(default), |v| choice(src, key, v, options))
}

/// Longest duration any timeout or interval may be set to: 7 days. Far
/// beyond any sane setting, and far from overflowing `Instant` arithmetic
/// (a deadline is always `now + setting`).
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A duration that must not be zero (nor more than `MAX_DURATION`).
pub fn positive_duration(
    src: &Source,
    key: &str,
    value: Option<&Spanned<Dur>>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        Some(v) if v.get_ref().0.is_zero() => Err(src.error(
            &v.span(),
            format!("{key} must be greater than zero: expected a duration like 250ms, 3s, 5m"),
        )),
        _ => duration(src, key, value, default),
    }
}

/// A duration of at most `MAX_DURATION` (zero allowed).
pub fn duration(
    src: &Source,
    key: &str,
    value: Option<&Spanned<Dur>>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) if v.get_ref().0 > MAX_DURATION => Err(src.error(
            &v.span(),
            format!(
                "{key} of {:?} is too long: expected at most 7d (604800s)",
                v.get_ref().0
            ),
        )),
        Some(v) => Ok(v.get_ref().0),
    }
}

/// A byte size that must be at least 1 and at most `max`.
pub fn size(
    src: &Source,
    key: &str,
    value: Option<&Spanned<Size>>,
    default: usize,
    max: u64,
) -> Result<usize, ConfigError> {
    size_in(src, key, value, default, 1, max)
}

/// A byte size that must be at least `min` (at least 1) and at most `max`.
pub fn size_in(
    src: &Source,
    key: &str,
    value: Option<&Spanned<Size>>,
    default: usize,
    min: u64,
    max: u64,
) -> Result<usize, ConfigError> {
    let Some(v) = value else {
        return Ok(default);
    };
    let bytes = v.get_ref().0;
    if bytes == 0 {
        return Err(src.error(
            &v.span(),
            format!("{key} must be greater than zero: expected a size like 64KiB or 1MiB"),
        ));
    }
    if bytes < min {
        return Err(src.error(
            &v.span(),
            format!(
                "{key} {} is too small: expected at least {}",
                format_size(bytes),
                format_size(min)
            ),
        ));
    }
    if bytes > max {
        return Err(src.error(
            &v.span(),
            format!(
                "{key} {} is too large: expected at most {}",
                format_size(bytes),
                format_size(max)
            ),
        ));
    }
    usize::try_from(bytes)
        .map_err(|_| src.error(&v.span(), format!("{key} is too large for this machine")))
}

/// A non-negative count with a lower bound (`min` = 1 for "zero makes no
/// sense here") and an upper bound.
pub fn count(
    src: &Source,
    key: &str,
    value: Option<&Spanned<u64>>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let Some(v) = value else {
        return Ok(default);
    };
    let n = *v.get_ref();
    if n < min {
        let why = if min == 1 {
            "greater than zero".to_string()
        } else {
            format!("at least {min}")
        };
        return Err(src.error(&v.span(), format!("{key} must be {why}, found {n}")));
    }
    if n > max {
        return Err(src.error(&v.span(), format!("{key} must be at most {max}, found {n}")));
    }
    Ok(n)
}

/// `count` for values held as `usize`.
pub fn count_usize(
    src: &Source,
    key: &str,
    value: Option<&Spanned<u64>>,
    default: usize,
    min: u64,
) -> Result<usize, ConfigError> {
    let max = u64::try_from(usize::MAX).unwrap_or(u64::MAX);
    let n = count(
        src,
        key,
        value,
        u64::try_from(default).unwrap_or(max),
        min,
        max,
    )?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

/// What a path setting must name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    File,
    Dir,
}

/// Resolve a path setting against `base` (the config file's folder),
/// require it to exist as `want` and be readable, and return it absolute
/// (its symlinks kept).
pub fn existing_path(
    src: &Source,
    key: &str,
    value: &Spanned<String>,
    base: &Path,
    want: Want,
) -> Result<PathBuf, ConfigError> {
    let text = value.get_ref().as_str();
    let err = |msg: String| src.error(&value.span(), msg);
    if text.is_empty() {
        return Err(err(format!("{key} is empty: expected a path")));
    }
    let joined = base.join(text);
    let shown = if Path::new(text).is_absolute() {
        String::new()
    } else {
        let shown = std::path::absolute(&joined).unwrap_or_else(|_| joined.clone());
        format!(" (looked for {})", shown.display())
    };
    let path = fs::canonicalize(&joined).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => err(format!("{key} {text:?} does not exist{shown}")),
        _ => err(format!("cannot access {key} {text:?}{shown}: {e}")),
    })?;
    let meta = fs::metadata(&path)
        .map_err(|e| err(format!("cannot access {key} {text:?}{shown}: {e}")))?;
    match want {
        Want::File if !meta.is_file() => {
            let is = if meta.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            };
            return Err(err(format!(
                "{key} {text:?} is {is}: expected a regular file"
            )));
        }
        Want::Dir if !meta.is_dir() => {
            return Err(err(format!(
                "{key} {text:?} is not a directory: expected a folder to serve"
            )));
        }
        Want::File => fs::File::open(&path).map(drop),
        Want::Dir => fs::read_dir(&path).map(drop),
    }
    .map_err(|e| err(format!("cannot open {key} {text:?}: {e}")))?;
    // The path as written (made absolute), not the one its symlinks lead to
    // now: files and roots are opened by it later, so a deploy that swaps
    // a link is followed (see `file_conn::roots`).
    Ok(std::path::absolute(&joined).unwrap_or(path))
}

/// Resolve one address (`IP:PORT` or `HOST:PORT`); `what` names it in
/// messages ("listen", "backend", "admin listen").
pub fn address(
    src: &Source,
    what: &str,
    text: &str,
    span: &Range<usize>,
) -> Result<SocketAddr, ConfigError> {
    net::resolve(text).map_err(|e| match e {
        AddrError::Syntax(why) => {
            src.error(span, format!("invalid {what} address {text:?}: {why}"))
        }
        AddrError::Resolve(why) => src.error(
            span,
            format!("cannot resolve {what} address {text:?}: {why}"),
        ),
    })
}

/// Resolve each address of a list (`listen`, `backends`): returns each
/// address with the text it came from and its span.
pub fn addresses(
    src: &Source,
    what: &str,
    value: &Spanned<OneOrMany>,
) -> Result<Vec<(SocketAddr, String, Range<usize>)>, ConfigError> {
    let mut out = Vec::new();
    for (text, span) in value.get_ref().items(&value.span()) {
        let addr = address(src, what, text, &span)?;
        out.push((addr, text.to_string(), span));
    }
    Ok(out)
}

/// Parse an `allow`/`deny` list of CIDRs or bare IPs.
pub fn networks(
    src: &Source,
    key: &str,
    value: Option<&Spanned<OneOrMany>>,
) -> Result<Vec<IpNet>, ConfigError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    value
        .get_ref()
        .items(&value.span())
        .into_iter()
        .map(|(text, span)| {
            net::parse_net(text).ok_or_else(|| {
                src.error(
                    &span,
                    format!(
                        "invalid network {text:?} in `{key}`: expected an IP address or CIDR \
                         like 10.0.0.0/8, 192.168.1.5 or 2001:db8::/32"
                    ),
                )
            })
        })
        .collect()
}
