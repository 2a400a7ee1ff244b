//! Durations and byte sizes as people write them in the config file.
//!
//! These are pure string parsers, kept apart from serde and from the schema
//! so every accepted and rejected spelling can be unit-tested directly. The
//! error strings are complete messages (they name the bad input and say what
//! was expected); the caller only adds the file location.
//!
//! Durations: one or more `<integer><unit>` groups written together, e.g.
//! `250ms`, `3s`, `5m`, `1h30m`; units `ns`, `us` (or `µs`), `ms`, `s`, `m`
//! (minutes), `h`, `d`. A lone `0` means zero. No spaces, no fractions, no
//! sign. (humantime is more permissive, e.g. it takes `3 s` and `2months`;
//! a config file is better off with one spelling per value.)
//!
//! Sizes: a plain integer is bytes; a unit may follow without a space:
//! `B`, `KiB`, `MiB`, `GiB`, `TiB` (binary, case-insensitive). Decimal units
//! (`KB`, `MB`, `k`, `M`, ...) are rejected with a "did you mean KiB?" hint
//! rather than silently read as powers of 1000 or 1024: a pipe or buffer
//! size written `1MB` was almost certainly meant as 1MiB, and guessing either
//! way would surprise someone.

use std::time::Duration;

const DURATION_EXPECTED: &str = "expected a number with a unit like 250ms, 3s, 5m";
const SIZE_EXPECTED: &str =
    "expected a number of bytes, optionally with a unit like 512B, 64KiB, 1MiB, 1GiB";

/// Parse a duration such as `250ms`, `3s`, `5m`, `1h30m` or `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let fail = |hint: &str| format!("invalid duration {text:?}: {DURATION_EXPECTED}{hint}");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err(fail(" (the value is empty)"));
    }
    let mut total: u128 = 0; // nanoseconds
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return Err(fail(&bad_char_hint(rest)));
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after.len() - after.trim_start_matches(char::is_alphabetic).len();
        let (unit, after) = after.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "d" => 86_400 * 1_000_000_000,
            "" if after.is_empty() && total == 0 => {
                return Err(fail(" (a bare number has no unit; write e.g. 3s)"));
            }
            "" if after.is_empty() => return Err(fail(" (the last number has no unit)")),
            "" => return Err(fail(&bad_char_hint(after))),
            other => {
                return Err(fail(&format!(
                    " (unknown unit {other:?}; units are ns, us, ms, s, m, h, d)"
                )));
            }
        };
        let value: u128 = number
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: the number is too large"))?;
        total = value
            .checked_mul(scale)
            .and_then(|n| n.checked_add(total))
            .ok_or_else(|| format!("invalid duration {text:?}: the number is too large"))?;
        rest = after;
    }
    let secs = u64::try_from(total / 1_000_000_000)
        .map_err(|_| format!("invalid duration {text:?}: the number is too large"))?;
    // The remainder is below 10^9, so it always fits in u32.
    let nanos = u32::try_from(total % 1_000_000_000).unwrap_or(0);
    Ok(Duration::new(secs, nanos))
}

/// A hint for a duration that has something other than digits where a
/// number should start.
fn bad_char_hint(rest: &str) -> String {
    match rest.chars().next() {
        Some(' ' | '\t') => " (no spaces allowed)".to_string(),
        Some('.' | ',') => " (fractions are not supported: write 1500ms, not 1.5s)".to_string(),
        Some('-') => " (durations cannot be negative)".to_string(),
        _ => String::new(),
    }
}

/// Parse a size such as `4096`, `512B`, `64KiB`, `1MiB` or `1GiB` into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let fail = |hint: &str| format!("invalid size {text:?}: {SIZE_EXPECTED}{hint}");
    let digits = text.len() - text.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 {
        let hint = match text.chars().next() {
            None => " (the value is empty)",
            Some('-') => " (sizes cannot be negative)",
            _ => "",
        };
        return Err(fail(hint));
    }
    let (number, unit) = text.split_at(digits);
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        decimal @ ("k" | "kb" | "m" | "mb" | "g" | "gb" | "t" | "tb") => {
            let binary = match decimal.as_bytes().first() {
                Some(b'k') => "KiB",
                Some(b'm') => "MiB",
                Some(b'g') => "GiB",
                _ => "TiB",
            };
            return Err(format!(
                "invalid size {text:?}: did you mean \"{number}{binary}\"? \
                 sizes use binary units (1KiB = 1024 bytes); \
                 decimal units like KB and MB are not accepted"
            ));
        }
        _ if unit.starts_with(' ') => return Err(fail(" (no space between number and unit)")),
        _ => return Err(fail("")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("invalid size {text:?}: the number is too large"))
}

/// Render a byte count the way the config file would spell it (for docs
/// and messages): `1MiB`, `64KiB`, `1000`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (scale, unit) in UNITS {
        if bytes >= scale && bytes.is_multiple_of(scale) {
            return format!("{}{unit}", bytes / scale);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accepted() {
        let ok = [
            ("0", Duration::ZERO),
            ("250ms", Duration::from_millis(250)),
            ("3s", Duration::from_secs(3)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("2d", Duration::from_secs(172_800)),
            ("1h30m", Duration::from_secs(5400)),
            ("1s500ms", Duration::from_millis(1500)),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
            ("0s", Duration::ZERO),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn durations_rejected_with_reason() {
        let bad = [
            ("3 s", "no spaces"),
            (" 3s", "no spaces"),
            ("3", "bare number"),
            ("", "empty"),
            ("3S", "unknown unit \"S\""),
            ("3sec", "unknown unit \"sec\""),
            ("1.5s", "fractions"),
            ("-3s", "negative"),
            ("s", DURATION_EXPECTED),
            ("3s ", "no spaces"),
            ("1h30", "last number has no unit"),
            ("99999999999999999999999999999999999999999d", "too large"),
            ("999999999999999999999d", "too large"),
        ];
        for (text, phrase) in bad {
            let err = parse_duration(text).expect_err(text);
            assert!(err.contains(phrase), "{text}: {err}");
            assert!(
                err.starts_with(&format!("invalid duration {text:?}")),
                "{err}"
            );
        }
        assert_eq!(
            parse_duration("3 s").unwrap_err(),
            "invalid duration \"3 s\": expected a number with a unit like 250ms, 3s, 5m (no spaces allowed)"
        );
    }

    #[test]
    fn sizes_accepted() {
        let ok = [
            ("4096", 4096),
            ("512B", 512),
            ("512b", 512),
            ("64KiB", 65536),
            ("64kib", 65536),
            ("1MiB", 1 << 20),
            ("1GiB", 1 << 30),
            ("2TiB", 2 << 40),
            ("0", 0),
        ];
        for (text, want) in ok {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn sizes_rejected_with_reason() {
        let bad = [
            ("1MB", "did you mean \"1MiB\"?"),
            ("64KB", "did you mean \"64KiB\"?"),
            ("64k", "did you mean \"64KiB\"?"),
            ("2g", "did you mean \"2GiB\"?"),
            ("64 KiB", "no space"),
            ("", "empty"),
            ("-1", "negative"),
            ("KiB", SIZE_EXPECTED),
            ("1.5MiB", SIZE_EXPECTED),
            ("1XiB", SIZE_EXPECTED),
            ("99999999999999999999", "too large"),
            ("17179869184GiB", "too large"),
        ];
        for (text, phrase) in bad {
            let err = parse_size(text).expect_err(text);
            assert!(err.contains(phrase), "{text}: {err}");
        }
    }

    #[test]
    fn sizes_format_back() {
        assert_eq!(format_size(1 << 20), "1MiB");
        assert_eq!(format_size(65536), "64KiB");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(3 << 30), "3GiB");
    }
}
