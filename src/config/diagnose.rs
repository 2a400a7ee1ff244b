//! Turning toml/serde deserialization errors into messages a person can act
//! on.
//!
//! serde reports `unknown field `stratgy`, expected one of `name`, ...` or
//! `invalid type: string "5", expected u64`, with a byte span but without
//! saying which table the problem is in. Here the document is re-read as a
//! plain spanned tree (`toml::de::DeTable`) to find the key path at the error
//! span, so the message can name the table (`[[route]] "api"`), the key, and
//! what was expected in config-file words (`a non-negative integer`, `a
//! list`), plus a "did you mean" for misspelt keys.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

use super::error::{ConfigError, Source};

/// Convert a deserialization error of `src.text` (already parsed as `doc`)
/// into a located error.
pub(super) fn toml_error(src: &Source, doc: &DeTable, err: &toml::de::Error) -> ConfigError {
    let Some(span) = err.span() else {
        return src.whole(err.message());
    };
    let path = find_path(doc, &span);
    src.error(&span, explain(err.message(), doc, path.as_deref()))
}

/// Check that the schema's tables are tables. Given a list instead (e.g.
/// `[[global]]`), serde would read the list as the struct's fields in order
/// and complain about the first field, which would only confuse.
pub(super) fn check_shape(src: &Source, doc: &DeTable) -> Result<(), ConfigError> {
    let is_list = |v: &&toml::Spanned<DeValue>| matches!(v.get_ref(), DeValue::Array(_));
    let fail = |value: &toml::Spanned<DeValue>, subject: String, section: &[Seg], hint: &str| {
        src.error(
            &value.span(),
            format!(
                "wrong type for {subject}{}: expected a table, found a list ({hint})",
                where_(doc, Some(section))
            ),
        )
    };
    for key in ["global", "admin"] {
        if let Some(v) = doc.get(key).filter(is_list) {
            let hint = format!("write [{key}] with single brackets");
            return Err(fail(v, format!("`{key}`"), &[], &hint));
        }
    }
    let Some(DeValue::Array(routes)) = doc.get("route").map(|r| r.get_ref()) else {
        return Ok(());
    };
    for (i, route) in routes.iter().enumerate() {
        if is_list(&route) {
            let hint = "each route is a table: write [[route]] followed by its keys";
            return Err(fail(route, "an item of `route`".into(), &[], hint));
        }
        if let Some(h) = route.get_ref().get("health").filter(is_list) {
            let section = [Seg::Key("route".into()), Seg::Index(i)];
            let hint = "write [route.health] with single brackets";
            return Err(fail(h, "`health`".into(), &section, hint));
        }
    }
    Ok(())
}

/// A document that is not valid TOML.
pub(super) fn syntax_error(src: &Source, err: &toml::de::Error) -> ConfigError {
    let message = err.message();
    let Some(span) = err.span() else {
        return src.whole(format!("invalid TOML: {message}"));
    };
    if message == "duplicate key" {
        let key = src.text.get(span.clone()).unwrap_or("").trim();
        return src.error(
            &span,
            format!("duplicate key `{key}`: each key or table may be defined only once"),
        );
    }
    src.error(&span, format!("invalid TOML: {message}"))
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// The key path of the deepest key or value whose span contains
/// `span.start` (`route`, 1, `listen`, 0 for the second item of the second
/// route's listen list).
fn find_path(doc: &DeTable, span: &Range<usize>) -> Option<Vec<Seg>> {
    let mut path = Vec::new();
    in_table(doc, span.start, &mut path).then_some(path)
}

fn in_table(table: &DeTable, offset: usize, path: &mut Vec<Seg>) -> bool {
    for (key, value) in table.iter() {
        path.push(Seg::Key(key.get_ref().to_string()));
        if key.span().contains(&offset) || in_value(value, offset, path) {
            return true;
        }
        path.pop();
    }
    false
}

fn in_value(value: &toml::Spanned<DeValue>, offset: usize, path: &mut Vec<Seg>) -> bool {
    match value.get_ref() {
        // A table's entries may lie outside its own span (for `[header]`
        // tables the span is just the header), so always look inside.
        DeValue::Table(table) if in_table(table, offset, path) => return true,
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                if in_value(item, offset, path) {
                    return true;
                }
                path.pop();
            }
        }
        _ => {}
    }
    value.span().contains(&offset)
}

/// The value at key path `path`, if there is one.
fn value_at<'a>(doc: &'a DeTable, path: &[Seg]) -> Option<&'a DeValue<'a>> {
    let (first, rest) = path.split_first()?;
    let Seg::Key(k) = first else { return None };
    let mut v = doc.get(k.as_str())?.get_ref();
    for seg in rest {
        v = match (seg, v) {
            (Seg::Key(k), DeValue::Table(t)) => t.get(k.as_str())?.get_ref(),
            (Seg::Index(i), DeValue::Array(a)) => a.get(*i)?.get_ref(),
            _ => return None,
        };
    }
    Some(v)
}

/// The message for serde error `message` at key path `path`.
fn explain(message: &str, doc: &DeTable, path: Option<&[Seg]>) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        return unknown_key(rest, doc, path);
    }
    for (prefix, what) in [
        ("invalid type: ", "wrong type"),
        ("invalid value: ", "invalid value"),
    ] {
        if let Some((found, expected)) = message
            .strip_prefix(prefix)
            .and_then(|rest| rest.rsplit_once(", expected "))
        {
            return bad_value(what, found, expected, doc, path);
        }
    }
    // Our own visitors' messages (durations, sizes) are already complete.
    message.to_string()
}

/// `rest` is serde's message after "unknown field `": "KEY`, expected one
/// of `a`, `b`" (or "KEY`, expected `a` or `b`", or "KEY`, there are no
/// fields").
fn unknown_key(rest: &str, doc: &DeTable, path: Option<&[Seg]>) -> String {
    let (key, expected) = match rest.rfind("`, expected ") {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest.split('`').next().unwrap_or(rest), ""),
    };
    // Backquoted names after the key: the known keys of that table.
    let expected = expected.get(2..).unwrap_or(""); // skip "`,"
    let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let section = path.map(|p| &p[..p.len().saturating_sub(1)]);
    let mut out = format!("unknown key `{key}`{}", where_(doc, section));
    if let Some(best) = closest(key, &known) {
        out.push_str(&format!(" (did you mean `{best}`?)"));
    }
    match known.len() {
        0 => {}
        1 => out.push_str(&format!("; expected: {}", known[0])),
        _ => out.push_str(&format!("; expected one of: {}", known.join(", "))),
    }
    out
}

fn bad_value(
    what: &str,
    found: &str,
    expected: &str,
    doc: &DeTable,
    path: Option<&[Seg]>,
) -> String {
    let expected = friendly_expected(expected);
    let mut found = friendly_found(found);
    // TOML's dates and times reach serde as a table of their own.
    if found == "a table"
        && let Some(DeValue::Datetime(_)) = path.and_then(|p| value_at(doc, p))
    {
        found = "a date-time".to_string();
    }
    let Some(path) = path else {
        return format!("{what}: expected {expected}, found {found}");
    };
    // Split the path into the table part and the key (plus list index).
    let key_at = path.iter().enumerate().rev().find_map(|(i, s)| match s {
        Seg::Key(key) => Some((i, key)),
        Seg::Index(_) => None,
    });
    let (section, subject) = match key_at {
        Some((i, key)) => {
            let subject = if i + 1 < path.len() {
                format!("an item of `{key}`")
            } else {
                format!("`{key}`")
            };
            (&path[..i], subject)
        }
        None => (path, "this value".to_string()),
    };
    let mut out = format!(
        "{what} for {subject}{}: expected {expected}, found {found}",
        where_(doc, Some(section))
    );
    if expected == "a list" && found == "a table" {
        let dotted: Vec<&str> = path
            .iter()
            .filter_map(|s| match s {
                Seg::Key(k) => Some(k.as_str()),
                Seg::Index(_) => None,
            })
            .collect();
        let dotted = dotted.join(".");
        out.push_str(&format!(
            " (write [[{dotted}]] with double brackets for each entry)"
        ));
    }
    out
}

fn friendly_expected(expected: &str) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a non-negative integer".to_string(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "an integer".to_string(),
        "a boolean" => "a boolean (true or false)".to_string(),
        "a sequence" => "a list".to_string(),
        "a map" => "a table".to_string(),
        s if s.starts_with("struct ") => "a table".to_string(),
        s => s.to_string(),
    }
}

fn friendly_found(found: &str) -> String {
    match found {
        "map" => "a table".to_string(),
        "sequence" => "a list".to_string(),
        s => s.to_string(),
    }
}

/// " in [[route]] \"api\"", " in [global]", " at the top level", or "" if
/// the place is unknown.
fn where_(doc: &DeTable, section: Option<&[Seg]>) -> String {
    let Some(section) = section else {
        return String::new();
    };
    let keys: Vec<&str> = section
        .iter()
        .filter_map(|s| match s {
            Seg::Key(k) => Some(k.as_str()),
            Seg::Index(_) => None,
        })
        .collect();
    match section {
        [] => " at the top level".to_string(),
        [Seg::Key(r), Seg::Index(i)] if r == "route" => {
            format!(" in [[route]] {}", route_label(doc, *i))
        }
        [Seg::Key(r), Seg::Index(i), Seg::Key(h)] if r == "route" && h == "health" => {
            format!(" in [route.health] of route {}", route_label(doc, *i))
        }
        [Seg::Key(r), Seg::Index(i), Seg::Key(b), Seg::Index(j)]
            if r == "route" && b == "backends" =>
        {
            format!(" in backend #{} of route {}", j + 1, route_label(doc, *i))
        }
        _ => format!(" in [{}]", keys.join(".")),
    }
}

/// `"api"` (the route's name, quoted) or `#2` (1-based position) when the
/// route has no usable name.
fn route_label(doc: &DeTable, index: usize) -> String {
    let name = doc
        .get("route")
        .and_then(|routes| routes.get_ref().get(index))
        .and_then(|route| route.get_ref().get("name"))
        .and_then(|name| name.get_ref().as_str());
    match name {
        Some(name) => format!("{name:?}"),
        None => format!("#{}", index + 1),
    }
}

/// The known name (key or enum value) closest to a misspelt one, if it is
/// close enough to be a plausible typo.
pub(super) fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let limit = (key.chars().count() / 3).clamp(1, 3);
    let score = |k: &str| {
        // "warning" for "warn", "shutdown" for "shutdown_timeout".
        let prefix = key.len().min(k.len()) >= 3 && (key.starts_with(k) || k.starts_with(key));
        if prefix { 0 } else { edit_distance(key, k) }
    };
    known
        .iter()
        .map(|k| (score(k), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            let next = (row[j] + 1).min(row[j + 1] + 1).min(diagonal + cost);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn check(text: &str) -> String {
        let src = Source {
            path: Path::new("t.toml"),
            text,
        };
        let doc = match DeTable::parse(text) {
            Ok(doc) => doc,
            Err(e) => return syntax_error(&src, &e).to_string(),
        };
        if let Err(e) = check_shape(&src, doc.get_ref()) {
            return e.to_string();
        }
        let err = super::super::schema::from_str(text).unwrap_err();
        toml_error(&src, doc.get_ref(), &err).to_string()
    }

    #[test]
    fn unknown_key_in_named_route() {
        let text = "[[route]]\nname = \"a\"\n\n[[route]]\nname = \"api\"\nstratgy = \"copy\"\n";
        let msg = check(text);
        assert!(
            msg.starts_with("t.toml:6:1: unknown key `stratgy` in [[route]] \"api\" (did you mean `strategy`?); expected one of: name, listen, backends, strategy,"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_key_in_each_table() {
        let cases = [
            (
                "bogus = 1\n",
                "t.toml:1:1: unknown key `bogus` at the top level; expected one of: global, admin, route",
            ),
            (
                "[global]\nworker = 2\n",
                "t.toml:2:1: unknown key `worker` in [global] (did you mean `workers`?)",
            ),
            (
                "[admin]\nlisten = \"x\"\nport = 1\n",
                "t.toml:3:1: unknown key `port` in [admin]; expected: listen",
            ),
            (
                "[[route]]\nlisten = \"x\"\nnope = 1\n",
                "t.toml:3:1: unknown key `nope` in [[route]] #1;",
            ),
            (
                "[[route]]\nname = \"r\"\n[route.health]\nrisee = 1\n",
                "t.toml:4:1: unknown key `risee` in [route.health] of route \"r\" (did you mean `rise`?); expected one of: interval, timeout, rise, fall",
            ),
            (
                "route = [{name = \"r\", x = 1}]\n",
                "t.toml:1:23: unknown key `x` in [[route]] \"r\"",
            ),
        ];
        for (text, want) in cases {
            let msg = check(text);
            assert!(msg.starts_with(want), "{text:?}\n got: {msg}\nwant: {want}");
        }
    }

    #[test]
    fn wrong_types_name_key_and_expectation() {
        let cases = [
            (
                "[global]\nmax_connections = \"5\"\n",
                "t.toml:2:19: wrong type for `max_connections` in [global]: expected a non-negative integer, found string \"5\"",
            ),
            (
                "[global]\nworkers = -1\n",
                "t.toml:2:11: invalid value for `workers` in [global]: expected a non-negative integer, found integer `-1`",
            ),
            (
                "[[route]]\nname = \"a\"\nlisten = [\"x\", 2]\n",
                "t.toml:3:16: wrong type for an item of `listen` in [[route]] \"a\": expected a string, found integer `2`",
            ),
            (
                "[[route]]\nname = \"a\"\naccept_proxy = \"yes\"\n",
                "t.toml:3:16: wrong type for `accept_proxy` in [[route]] \"a\": expected a boolean (true or false)",
            ),
            (
                "[[route]]\nlisten = 5\n",
                "t.toml:2:10: wrong type for `listen` in [[route]] #1: expected a string or a list of strings, found integer `5`",
            ),
            (
                "[route]\nname = \"a\"\n",
                "t.toml:1:1: wrong type for `route` at the top level: expected a list, found a table (write [[route]] with double brackets for each entry)",
            ),
            (
                "[[global]]\n",
                "t.toml:1:1: wrong type for `global` at the top level: expected a table, found a list (write [global] with single brackets)",
            ),
            (
                "[[route]]\n[[route.health]]\n",
                "t.toml:2:1: wrong type for `health` in [[route]] #1: expected a table, found a list (write [route.health] with single brackets)",
            ),
            (
                "route = [[]]\n",
                "t.toml:1:10: wrong type for an item of `route` at the top level: expected a table, found a list (each route is a table",
            ),
            (
                "[[route]]\n[route.health]\nrise = 1.5\n",
                "t.toml:3:8: wrong type for `rise` in [route.health] of route #1: expected a non-negative integer, found floating point `1.5`",
            ),
        ];
        for (text, want) in cases {
            let msg = check(text);
            assert!(msg.starts_with(want), "{text:?}\n got: {msg}\nwant: {want}");
        }
    }

    #[test]
    fn value_errors_keep_their_own_message() {
        let msg = check("[[route]]\nidle_timeout = \"3 s\"\n");
        assert_eq!(
            msg,
            "t.toml:2:16: invalid duration \"3 s\": expected a number with a unit like 250ms, 3s, 5m (no spaces allowed)"
        );
    }

    #[test]
    fn syntax_errors() {
        let msg = check("[global]\nmax_connections = \n");
        assert!(msg.starts_with("t.toml:2:19: invalid TOML: "), "{msg}");
        let msg = check("[[route]]\nname = \"a\"\nname = \"b\"\n");
        assert!(msg.starts_with("t.toml:3:1: duplicate key `name`"), "{msg}");
        let msg = check("[global]\n[global]\n");
        assert!(
            msg.starts_with("t.toml:2:2: duplicate key `global`"),
            "{msg}"
        );
        let msg = check("[global\n");
        assert!(msg.starts_with("t.toml:1:"), "{msg}");
    }

    #[test]
    fn edit_distance_and_suggestions() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("stratgy", "strategy"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(closest("stratgy", &["name", "strategy"]), Some("strategy"));
        assert_eq!(closest("zzz", &["name", "strategy"]), None);
        assert_eq!(closest("x", &[]), None);
        assert_eq!(closest("warning", &["error", "warn"]), Some("warn"));
        assert_eq!(
            closest("shutdown", &["max_pipes", "shutdown_timeout"]),
            Some("shutdown_timeout")
        );
        assert_eq!(closest("ab", &["abc"]), Some("abc")); // by distance, not prefix
    }
}
