//! Talking to sluice's admin listener: a tiny HTTP/1.1 client and a
//! strict parser of the Prometheus text exposition format (0.0.4), so
//! tests check `/metrics` as a scraper would read it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A response: status code, headers (lower-case names), body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// Send `raw` as the whole request and read the response to EOF.
pub fn request(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(raw).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read admin response");
    parse_response(&buf)
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
    )
}

pub fn parse_response(buf: &[u8]) -> Response {
    let text = String::from_utf8(buf.to_vec()).expect("utf-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts.next().unwrap().parse().unwrap();
    let headers: HashMap<String, String> = lines
        .map(|l| {
            let (k, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header {l:?}"));
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    if let Some(n) = headers.get("content-length") {
        assert_eq!(n.parse::<usize>().unwrap(), body.len(), "content-length");
    }
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

/// One scrape of `/metrics`, parsed and checked.
/// A sample's name and labels.
type Key = (String, BTreeMap<String, String>);

#[derive(Debug)]
pub struct Metrics {
    /// (name, labels) → value.
    pub samples: HashMap<Key, f64>,
    pub types: HashMap<String, String>,
    pub text: String,
}

pub fn scrape(addr: SocketAddr) -> Metrics {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    parse_metrics(&r.body)
}

/// Scrape until `f` holds (counters of a closing connection land a moment
/// after the client sees the close), failing after 10 s with the last
/// scrape; returns the scrape that held.
pub fn scrape_until(addr: SocketAddr, what: &str, f: impl Fn(&Metrics) -> bool) -> Metrics {
    scrape_within(addr, what, Duration::from_secs(10), f)
}

/// `scrape_until` with a time limit of its own.
pub fn scrape_within(
    addr: SocketAddr,
    what: &str,
    limit: Duration,
    f: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let end = std::time::Instant::now() + limit;
    loop {
        let m = scrape(addr);
        if f(&m) {
            return m;
        }
        assert!(
            std::time::Instant::now() < end,
            "metrics never showed {what}:\n{}",
            m.text
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn valid_name(n: &str) -> bool {
    let mut ch = n.chars();
    matches!(ch.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && ch.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parse the text format strictly: every line is `# HELP`, `# TYPE` or
/// `name{labels} value`; each family has HELP and TYPE once, before its
/// samples, and its samples are contiguous; no sample appears twice;
/// counters end in `_total`.
pub fn parse_metrics(text: &str) -> Metrics {
    assert!(text.ends_with('\n'), "exposition must end with a newline");
    let mut samples = HashMap::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    for (no, line) in text.lines().enumerate() {
        let no = no + 1;
        assert!(!line.is_empty(), "line {no}: empty line");
        if let Some(rest) = line.strip_prefix("# ") {
            let mut p = rest.splitn(3, ' ');
            let kw = p.next().unwrap();
            let name = p
                .next()
                .unwrap_or_else(|| panic!("line {no}: {line}"))
                .to_string();
            let arg = p.next().unwrap_or_else(|| panic!("line {no}: {line}"));
            assert!(valid_name(&name), "line {no}: bad name {name:?}");
            if current.as_deref() != Some(&name) {
                if let Some(c) = current.take() {
                    done.insert(c);
                }
                assert!(!done.contains(&name), "line {no}: family {name} split up");
                current = Some(name.clone());
            }
            match kw {
                "HELP" => {
                    assert!(!arg.is_empty(), "line {no}: empty HELP");
                    assert!(
                        helps.insert(name.clone()),
                        "line {no}: second HELP for {name}"
                    );
                }
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg),
                        "line {no}: bad type {arg}"
                    );
                    if arg == "counter" {
                        assert!(
                            name.ends_with("_total"),
                            "line {no}: counter {name} without _total"
                        );
                    }
                    assert!(
                        types.insert(name.clone(), arg.to_string()).is_none(),
                        "line {no}: second TYPE for {name}"
                    );
                }
                _ => panic!("line {no}: unknown comment {line:?}"),
            }
            continue;
        }
        assert!(!line.starts_with('#'), "line {no}: bad comment {line:?}");
        let (name, labels, value) = parse_sample(line, no);
        // A histogram's samples are its name plus _bucket, _sum, _count.
        let family = match current.as_deref() {
            Some(f) if types.get(f).map(String::as_str) == Some("histogram") => {
                let suffix = name.strip_prefix(f).unwrap_or("");
                assert!(
                    ["_bucket", "_sum", "_count"].contains(&suffix),
                    "line {no}: {name} is not a sample of histogram {f}"
                );
                assert_eq!(
                    suffix == "_bucket",
                    labels.contains_key("le"),
                    "line {no}: `le` belongs on buckets and only there"
                );
                f.to_string()
            }
            _ => name.clone(),
        };
        assert_eq!(
            current.as_deref(),
            Some(family.as_str()),
            "line {no}: sample of {name} outside its family"
        );
        assert!(types.contains_key(&family), "line {no}: {name} has no TYPE");
        assert!(helps.contains(&family), "line {no}: {name} has no HELP");
        let prev = samples.insert((name.clone(), labels.clone()), value);
        assert!(
            prev.is_none(),
            "line {no}: duplicate sample {name}{labels:?}"
        );
    }
    check_histograms(&samples, &types);
    Metrics {
        samples,
        types,
        text: text.to_string(),
    }
}

/// Every histogram series: buckets cumulative in `le` order, ending at
/// `+Inf`, which equals `_count`; `_sum` present and not negative.
fn check_histograms(samples: &HashMap<Key, f64>, types: &HashMap<String, String>) {
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let count = format!("{family}_count");
        for ((n, labels), total) in samples.iter().filter(|((n, _), _)| *n == count) {
            let mut buckets: Vec<(f64, f64)> = samples
                .iter()
                .filter(|((bn, bl), _)| {
                    *bn == format!("{family}_bucket")
                        && bl.len() == labels.len() + 1
                        && labels.iter().all(|(k, v)| bl.get(k) == Some(v))
                })
                .map(|((_, bl), v)| {
                    let le = match bl["le"].as_str() {
                        "+Inf" => f64::INFINITY,
                        le => le.parse().expect("numeric le"),
                    };
                    (le, *v)
                })
                .collect();
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(!buckets.is_empty(), "{n}{labels:?}: no buckets");
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family}{labels:?}: buckets not cumulative: {buckets:?}"
            );
            let last = buckets.last().unwrap();
            assert!(last.0.is_infinite(), "{family}{labels:?}: no +Inf bucket");
            assert_eq!(last.1, *total, "{family}{labels:?}: +Inf bucket != _count");
            let sum = samples
                .get(&(format!("{family}_sum"), labels.clone()))
                .unwrap_or_else(|| panic!("{family}{labels:?}: no _sum"));
            assert!(*sum >= 0.0, "{family}{labels:?}: negative _sum");
        }
    }
}

fn parse_sample(line: &str, no: usize) -> (String, BTreeMap<String, String>, f64) {
    let end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("line {no}: no value: {line:?}"));
    let name = line[..end].to_string();
    assert!(valid_name(&name), "line {no}: bad metric name {name:?}");
    let mut rest = &line[end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut r = r;
        loop {
            let eq = r
                .find('=')
                .unwrap_or_else(|| panic!("line {no}: bad labels"));
            let key = &r[..eq];
            assert!(
                valid_name(key) && !key.contains(':'),
                "line {no}: bad label name {key:?}"
            );
            r = r[eq + 1..]
                .strip_prefix('"')
                .unwrap_or_else(|| panic!("line {no}: label value not quoted"));
            let mut val = String::new();
            let mut chars = r.char_indices();
            let close = loop {
                let (i, c) = chars
                    .next()
                    .unwrap_or_else(|| panic!("line {no}: open quote"));
                match c {
                    '"' => break i,
                    '\\' => match chars.next().map(|x| x.1) {
                        Some('\\') => val.push('\\'),
                        Some('"') => val.push('"'),
                        Some('n') => val.push('\n'),
                        other => panic!("line {no}: bad escape {other:?}"),
                    },
                    '\n' => panic!("line {no}: raw newline in label"),
                    c => val.push(c),
                }
            };
            assert!(
                labels.insert(key.to_string(), val).is_none(),
                "line {no}: label {key} twice"
            );
            r = &r[close + 1..];
            if let Some(x) = r.strip_prefix(',') {
                r = x;
            } else if let Some(x) = r.strip_prefix('}') {
                rest = x;
                break;
            } else {
                panic!("line {no}: expected , or }} in {line:?}");
            }
        }
    }
    let value = rest
        .strip_prefix(' ')
        .unwrap_or_else(|| panic!("line {no}: expected one space before the value"));
    assert!(!value.contains(' '), "line {no}: trailing fields {value:?}");
    let v = match value {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        _ => value
            .parse()
            .unwrap_or_else(|_| panic!("line {no}: bad value {value:?}")),
    };
    (name, labels, v)
}

impl Metrics {
    /// The value of one sample; panics (with the exposition) if absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        *self
            .samples
            .get(&(name.to_string(), key))
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{}", self.text))
    }

    /// Sum of a metric over every sample whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| *v)
            .sum()
    }
}

/// `promtool`, if this machine has it (PATH, `$PROMTOOL`, or where
/// `tests/tools/install-promtool` puts it).
pub fn promtool() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("PROMTOOL") {
        return Some(p.into());
    }
    let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/promtool");
    if local.exists() {
        return Some(local);
    }
    std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| "promtool".into())
}

/// Check an exposition with Prometheus' own parser (`promtool check
/// metrics`); returns false when promtool is not installed.
pub fn promtool_check(text: &str) -> bool {
    let Some(tool) = promtool() else {
        eprintln!("promtool not found: skipping the check with Prometheus' parser");
        return false;
    };
    let mut child = std::process::Command::new(tool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}
