//! End-to-end tests of `parse` and `load`: valid files and their defaults,
//! then each validation rule with the exact location and message it must
//! produce. Files that must exist (`file`, `root`, `fallback_file`) live in
//! a throwaway folder per test.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;

/// A unique temporary folder holding a config's neighbour files, removed on
/// drop: `banner.bin`, `maintenance.http`, `www/index.html`.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("sluice-config-unit-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("www")).unwrap();
        fs::write(dir.join("banner.bin"), b"hello").unwrap();
        fs::write(dir.join("maintenance.http"), b"HTTP/1.1 503 x\r\n\r\n").unwrap();
        fs::write(dir.join("www/index.html"), b"<p>hi</p>").unwrap();
        Dir(dir)
    }

    fn config(&self) -> PathBuf {
        self.0.join("t.toml")
    }

    fn parse(&self, text: &str) -> Result<Config, ConfigError> {
        parse(text, &self.config())
    }

    /// The error for `text`, with the config path prefix replaced by `t.toml`.
    fn fail(&self, text: &str) -> String {
        let err = self
            .parse(text)
            .expect_err("config should be rejected")
            .to_string();
        let prefix = format!("{}:", self.config().display());
        match err.strip_prefix(&prefix) {
            Some(rest) => format!("t.toml:{rest}"),
            None => err,
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const PROXY: &str =
    "[[route]]\nname = \"p\"\nlisten = \"127.0.0.1:7000\"\nbackends = \"127.0.0.1:9000\"\n";
const FILE: &str = "[[route]]\nname = \"f\"\nlisten = \"127.0.0.1:8080\"\nfile = \"banner.bin\"\n";
const ROOT: &str = "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:8081\"\nroot = \"www\"\n";

fn proxy(route: &Route) -> &ProxyRoute {
    match &route.kind {
        RouteKind::Proxy(p) => p,
        RouteKind::File(_) => panic!("not a proxy route"),
    }
}

fn file(route: &Route) -> &FileRoute {
    match &route.kind {
        RouteKind::File(f) => f,
        RouteKind::Proxy(_) => panic!("not a file route"),
    }
}

/// Assert that `text` fails with a message starting with `want`.
#[track_caller]
fn rejects(dir: &Dir, text: &str, want: &str) {
    let got = dir.fail(text);
    assert!(
        got.starts_with(want),
        "\n got: {got}\nwant: {want}...\nfor:\n{text}"
    );
}

#[test]
fn defaults() {
    let dir = Dir::new();
    let cfg = dir.parse(&format!("{PROXY}{FILE}")).unwrap();
    assert_eq!(cfg.global.max_connections, 100_000);
    assert_eq!(cfg.global.max_pipes, 16_384);
    assert_eq!(cfg.global.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(cfg.global.log_level, log::LevelFilter::Info);
    assert_eq!(cfg.global.workers, 1);
    assert_eq!(cfg.global.open_file_cache, 1000);
    assert_eq!(cfg.global.open_file_cache_inactive, Duration::from_secs(20));
    assert_eq!(cfg.global.busy_poll, Duration::ZERO);
    assert!(cfg.admin.is_none());

    let p = &cfg.routes[0];
    assert_eq!(p.name, "p");
    assert_eq!(p.listen, vec!["127.0.0.1:7000".parse().unwrap()]);
    assert_eq!(p.idle_timeout, Duration::from_secs(300));
    assert_eq!(p.max_connections, 100_000);
    assert_eq!(p.max_connections_per_ip, 0);
    assert!(p.allow.is_empty() && p.deny.is_empty());
    assert!(!p.accept_proxy);
    assert_eq!(p.header_timeout, Duration::from_secs(10));
    let pr = proxy(p);
    assert_eq!(pr.backends[0].name, "127.0.0.1:9000");
    assert_eq!(pr.backends[0].addr, "127.0.0.1:9000".parse().unwrap());
    assert_eq!(pr.strategy, ProxyStrategy::Auto);
    assert_eq!(pr.balance, Balance::RoundRobin);
    assert_eq!(pr.connect_timeout, Duration::from_secs(3));
    assert_eq!(pr.pipe_size, 1 << 20);
    assert_eq!(pr.buffer_size, 64 << 10);
    assert_eq!(pr.send_proxy, None);
    assert!(!pr.health.active);
    assert_eq!(pr.health.interval, Duration::from_secs(2));
    assert_eq!(pr.health.timeout, Duration::from_secs(1));
    assert_eq!((pr.health.rise, pr.health.fall), (2, 3));
    assert_eq!(pr.fallback_file, None);
    assert_eq!(pr.file_strategy, FileStrategy::Sendfile);

    let f = &cfg.routes[1];
    assert_eq!(f.idle_timeout, Duration::from_secs(60));
    let fr = file(f);
    let banner = fs::canonicalize(dir.0.join("banner.bin")).unwrap();
    assert_eq!(fr.source, FileSource::File(banner));
    assert_eq!(fr.protocol, Protocol::Http);
    assert_eq!(fr.strategy, FileStrategy::Sendfile);
    assert_eq!(fr.index, None);
    assert_eq!(fr.send_chunk, 2 << 20);
    assert_eq!(fr.pipe_size, 1 << 20);
    assert_eq!(fr.buffer_size, 64 << 10);
    assert!(!fr.dotfiles);
}

#[test]
fn every_key_set() {
    let dir = Dir::new();
    let text = r#"
[global]
max_connections = 500
max_pipes = 64
shutdown_timeout = "0"
log_level = "debug"
workers = 0
open_file_cache = 0
open_file_cache_inactive = "3s"
busy_poll = "50us"

[admin]
listen = "127.0.0.1:9900"

[[route]]
name = "api.v1_x-y"
listen = ["127.0.0.1:7000", "[::1]:7000", "localhost:7001"]
backends = ["127.0.0.1:9000", "localhost:9001"]
strategy = "splice"
balance = "least-connections"
connect_timeout = "250ms"
idle_timeout = "1h30m"
pipe_size = 65536
buffer_size = "16KiB"
max_connections = 7
max_connections_per_ip = 2
allow = ["127.0.0.0/8", "::1"]
deny = "127.0.0.9"
accept_proxy = true
send_proxy = "v2"
header_timeout = "2s"
fallback_file = "maintenance.http"
fallback_strategy = "mmap"

[route.health]
interval = "5s"
timeout = "500ms"
rise = 1
fall = 9

[[route]]
name = "site"
listen = "127.0.0.1:8080"
root = "www/"
protocol = "http"
strategy = "copy"
index = "index.html"
send_chunk = "1MiB"
dotfiles = true
"#;
    let cfg = dir.parse(text).unwrap();
    assert_eq!(cfg.global.max_connections, 500);
    assert_eq!(cfg.global.max_pipes, 64);
    assert_eq!(cfg.global.shutdown_timeout, Duration::ZERO);
    assert_eq!(cfg.global.log_level, log::LevelFilter::Debug);
    assert!(cfg.global.workers >= 1);
    assert_eq!(cfg.global.open_file_cache, 0);
    assert_eq!(cfg.global.open_file_cache_inactive, Duration::from_secs(3));
    assert_eq!(cfg.global.busy_poll, Duration::from_micros(50));
    assert_eq!(
        cfg.admin.as_ref().unwrap().listen,
        "127.0.0.1:9900".parse().unwrap()
    );

    let r = &cfg.routes[0];
    assert_eq!(r.listen.len(), 3);
    assert!(r.listen[2].ip().is_loopback());
    assert_eq!(r.idle_timeout, Duration::from_secs(5400));
    assert_eq!((r.max_connections, r.max_connections_per_ip), (7, 2));
    assert_eq!(
        r.allow,
        vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]
    );
    assert_eq!(r.deny, vec!["127.0.0.9/32".parse().unwrap()]);
    assert!(r.accept_proxy);
    assert_eq!(r.header_timeout, Duration::from_secs(2));
    let p = proxy(r);
    assert_eq!(p.backends[1].name, "localhost:9001");
    assert!(p.backends[1].addr.ip().is_loopback());
    assert_eq!(p.strategy, ProxyStrategy::Splice);
    assert_eq!(p.balance, Balance::LeastConnections);
    assert_eq!(p.connect_timeout, Duration::from_millis(250));
    assert_eq!((p.pipe_size, p.buffer_size), (65536, 16384));
    assert_eq!(p.send_proxy, Some(ProxyVersion::V2));
    assert!(p.health.active);
    assert_eq!(p.health.interval, Duration::from_secs(5));
    assert_eq!(p.health.timeout, Duration::from_millis(500));
    assert_eq!((p.health.rise, p.health.fall), (1, 9));
    let fallback = p.fallback_file.as_ref().unwrap();
    assert!(fallback.is_absolute() && fallback.ends_with("maintenance.http"));
    assert_eq!(p.file_strategy, FileStrategy::Mmap);

    let f = file(&cfg.routes[1]);
    assert_eq!(
        f.source,
        FileSource::Root(fs::canonicalize(dir.0.join("www")).unwrap())
    );
    assert_eq!(f.strategy, FileStrategy::Copy);
    assert_eq!(f.index.as_deref(), Some("index.html"));
    assert_eq!(f.send_chunk, 1 << 20);
    assert!(f.dotfiles);
}

#[test]
fn derived_values() {
    let dir = Dir::new();
    let cfg = dir
        .parse(&format!("[global]\nmax_connections = 100\n{PROXY}"))
        .unwrap();
    assert_eq!(cfg.global.max_pipes, 200);
    assert_eq!(cfg.routes[0].max_connections, 100);
    let cfg = dir
        .parse(&format!("[global]\nworkers = 0\n{PROXY}"))
        .unwrap();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(cfg.global.workers, cpus);
}

#[test]
fn raw_file_route() {
    let dir = Dir::new();
    let cfg = dir
        .parse(&format!(
            "{FILE}protocol = \"raw\"\nstrategy = \"splice\"\n"
        ))
        .unwrap();
    let f = file(&cfg.routes[0]);
    assert_eq!(f.protocol, Protocol::Raw);
    assert_eq!(f.strategy, FileStrategy::Splice);
}

#[test]
fn absolute_paths_are_kept() {
    let dir = Dir::new();
    let abs = dir.0.join("banner.bin");
    let text = format!(
        "[[route]]\nname = \"f\"\nlisten = \"127.0.0.1:1\"\nfile = {:?}\n",
        abs.display().to_string()
    );
    let cfg = parse(&text, Path::new("elsewhere/t.toml")).unwrap();
    assert_eq!(
        file(&cfg.routes[0]).source,
        FileSource::File(fs::canonicalize(abs).unwrap())
    );
}

#[test]
fn summary_line() {
    let dir = Dir::new();
    let text = format!(
        "[global]\nworkers = 2\n[admin]\nlisten = \"127.0.0.1:9900\"\n{PROXY}{FILE}{ROOT}\
         [[route]]\nname = \"q\"\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\nbackends = [\"127.0.0.1:3\", \"127.0.0.1:4\"]\n"
    );
    let cfg = dir.parse(&text).unwrap();
    assert_eq!(
        cfg.summary(),
        format!(
            "config {} ok: 4 routes (2 proxy, 2 file), 5 listeners, 3 backends, 2 workers, admin on 127.0.0.1:9900",
            dir.config().display()
        )
    );
    let cfg = dir.parse(PROXY).unwrap();
    assert!(
        cfg.summary()
            .ends_with("ok: 1 route (1 proxy, 0 file), 1 listener, 1 backend, 1 worker")
    );
}

#[test]
fn whole_file_problems() {
    let dir = Dir::new();
    let want = format!("{}: no routes defined", dir.config().display());
    assert!(dir.parse("").unwrap_err().to_string().starts_with(&want));
    assert!(
        dir.parse("[global]\nworkers = 2\n")
            .unwrap_err()
            .to_string()
            .starts_with(&want)
    );
}

#[test]
fn load_reads_files_and_reports_io_and_encoding() {
    let dir = Dir::new();
    let path = dir.config();
    fs::write(&path, PROXY).unwrap();
    assert_eq!(load(&path).unwrap().routes.len(), 1);

    let missing = dir.0.join("nope.toml");
    let err = load(&missing).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: cannot read: No such file or directory (os error 2)",
            missing.display()
        )
    );

    fs::write(&path, b"[global]\nlog_level = \"\xff\"\n").unwrap();
    let err = load(&path).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}:2:14: the file is not valid UTF-8: expected UTF-8 text",
            path.display()
        )
    );
}

#[test]
fn example_config_is_valid() {
    let dir = Dir::new();
    let path = dir.0.join("config.toml.example");
    fs::write(&path, include_str!("../../config.toml.example")).unwrap();
    fs::write(dir.0.join("README.md"), "# readme\n").unwrap();
    let cfg = load(&path).unwrap();
    let names: Vec<&str> = cfg.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["echo", "echo-copy", "readme"]);
    assert_eq!(proxy(&cfg.routes[0]).strategy, ProxyStrategy::Splice);
    assert_eq!(
        proxy(&cfg.routes[0]).backends[0].addr,
        "127.0.0.1:7001".parse().unwrap()
    );
    assert_eq!(
        cfg.routes[0].listen,
        vec!["127.0.0.1:7000".parse().unwrap()]
    );
    assert_eq!(proxy(&cfg.routes[1]).strategy, ProxyStrategy::Copy);
    let readme = file(&cfg.routes[2]);
    assert_eq!(readme.strategy, FileStrategy::Sendfile);
    assert_eq!(readme.protocol, Protocol::Http);
    assert_eq!(
        readme.source,
        FileSource::File(fs::canonicalize(dir.0.join("README.md")).unwrap())
    );
    assert_eq!(
        cfg.routes[2].listen,
        vec!["127.0.0.1:8080".parse().unwrap()]
    );
    assert_eq!(cfg.admin.unwrap().listen, "127.0.0.1:9900".parse().unwrap());
    for r in &cfg.routes {
        assert!(r.listen.iter().all(|a| a.ip().is_loopback()));
    }
}

#[test]
fn unknown_keys_located_with_context() {
    let dir = Dir::new();
    rejects(
        &dir,
        "[admin]\nlisten = \"127.0.0.1:1\"\nlsten = 1\n",
        "t.toml:3:1: unknown key `lsten` in [admin] (did you mean `listen`?); expected: listen",
    );
    rejects(
        &dir,
        &format!("{PROXY}\n[route.health]\nfal = 1\n"),
        "t.toml:7:1: unknown key `fal` in [route.health] of route \"p\" (did you mean `fall`?)",
    );
    rejects(
        &dir,
        &format!("{PROXY}   stratgy = \"copy\"\n"),
        "t.toml:5:4: unknown key `stratgy` in [[route]] \"p\" (did you mean `strategy`?); expected one of: name, listen, backends, strategy, balance,",
    );
}

#[test]
fn bad_enum_values_list_the_valid_ones() {
    let dir = Dir::new();
    rejects(
        &dir,
        &format!("[global]\nlog_level = \"verbose\"\n{PROXY}"),
        "t.toml:2:13: invalid log_level \"verbose\": expected one of: error, warn, info, debug, trace, off",
    );
    rejects(
        &dir,
        &format!("{PROXY}balance = \"rr\"\n"),
        "t.toml:5:11: invalid balance \"rr\": expected one of: round-robin, least-connections, source-hash, random",
    );
    rejects(
        &dir,
        &format!("{PROXY}send_proxy = \"v3\"\n"),
        "t.toml:5:14: invalid send_proxy \"v3\": expected one of: v1, v2",
    );
    rejects(
        &dir,
        &format!("{FILE}protocol = \"ftp\"\n"),
        "t.toml:5:12: invalid protocol \"ftp\": expected one of: http, raw",
    );
    rejects(
        &dir,
        &format!("{PROXY}strategy = \"fast\"\n"),
        "t.toml:5:12: invalid strategy \"fast\" for proxy route \"p\": expected one of: splice, copy, auto",
    );
    rejects(
        &dir,
        &format!("{PROXY}fallback_file = \"maintenance.http\"\nfallback_strategy = \"auto\"\n"),
        "t.toml:6:21: invalid fallback_strategy \"auto\": expected one of: sendfile, mmap, splice, copy",
    );
}

#[test]
fn misspelt_enum_values_get_a_suggestion() {
    let dir = Dir::new();
    rejects(
        &dir,
        &format!("{PROXY}balance = \"roundrobin\"\n"),
        "t.toml:5:11: invalid balance \"roundrobin\": expected one of: round-robin, \
         least-connections, source-hash, random (did you mean \"round-robin\"?)",
    );
    rejects(
        &dir,
        &format!("[global]\nlog_level = \"warning\"\n{PROXY}"),
        "t.toml:2:13: invalid log_level \"warning\": expected one of: error, warn, info, debug, \
         trace, off (did you mean \"warn\"?)",
    );
}

#[test]
fn relative_config_path_resolves_against_its_folder() {
    // A bare file name: its folder is the current directory.
    let text = FILE.replace("banner.bin", "no-such.bin");
    let err = parse(&text, Path::new("t.toml")).unwrap_err().to_string();
    let cwd = std::env::current_dir().unwrap();
    let want = format!(
        "t.toml:4:8: file \"no-such.bin\" does not exist (looked for {})",
        cwd.join("no-such.bin").display()
    );
    assert_eq!(err, want);
}

#[test]
fn strategy_must_fit_the_route_kind() {
    let dir = Dir::new();
    rejects(
        &dir,
        &format!("{PROXY}strategy = \"sendfile\"\n"),
        "t.toml:5:12: strategy \"sendfile\" is for file routes; route \"p\" is a proxy route: expected one of: splice, copy, auto",
    );
    rejects(
        &dir,
        &format!("{FILE}strategy = \"auto\"\n"),
        "t.toml:5:12: strategy \"auto\" is for proxy routes; route \"f\" is a file route: expected one of: sendfile, mmap, splice, copy",
    );
}

#[test]
fn route_names() {
    let dir = Dir::new();
    let second =
        "[[route]]\nname = \"p\"\nlisten = \"127.0.0.1:7001\"\nbackends = \"127.0.0.1:9000\"\n";
    rejects(
        &dir,
        &format!("{PROXY}{second}"),
        "t.toml:6:8: duplicate route name \"p\" (first defined at line 2)",
    );
    rejects(
        &dir,
        "[[route]]\nname = \"a b\"\n",
        "t.toml:2:8: invalid route name \"a b\": expected only letters, digits",
    );
    rejects(
        &dir,
        "[[route]]\nname = \"\"\n",
        "t.toml:2:8: invalid route name \"\"",
    );
    rejects(
        &dir,
        &format!("{PROXY}[[route]]\nlisten = \"127.0.0.1:1\"\n"),
        "t.toml:5:1: [[route]] #2 has no `name`: every route needs a unique name",
    );
}

#[test]
fn listen_required_and_valid() {
    let dir = Dir::new();
    rejects(
        &dir,
        "[[route]]\nname = \"a\"\nbackends = \"127.0.0.1:1\"\n",
        "t.toml:1:1: route \"a\" has no `listen`: expected an address or a list of addresses",
    );
    rejects(
        &dir,
        "[[route]]\nname = \"a\"\nlisten = []\n",
        "t.toml:3:10: route \"a\" has an empty `listen` list",
    );
    rejects(
        &dir,
        "[[route]]\nname = \"a\"\nlisten = [\"127.0.0.1:1\", \"127.0.0.1\"]\n",
        "t.toml:3:26: invalid listen address \"127.0.0.1\": the port is missing: expected IP:PORT or HOST:PORT, like 127.0.0.1:7000",
    );
    rejects(
        &dir,
        "[admin]\nlisten = \"::1:80\"\n",
        "t.toml:2:10: invalid admin listen address \"::1:80\": IPv6 addresses need brackets",
    );
    rejects(&dir, "[admin]\n", "t.toml:1:1: [admin] has no `listen`");
}

#[test]
fn listen_conflicts() {
    let dir = Dir::new();
    let route = |name: &str, listen: &str| {
        format!("[[route]]\nname = \"{name}\"\nlisten = {listen}\nbackends = \"127.0.0.1:9000\"\n")
    };
    // The same address on two routes.
    let text = format!(
        "{}{}",
        route("a", "\"127.0.0.1:7000\""),
        route("b", "[\"127.0.0.1:7001\", \"127.0.0.1:7000\"]")
    );
    rejects(
        &dir,
        &text,
        "t.toml:7:29: listen address 127.0.0.1:7000 of route \"b\" is already used by route \"a\" (at line 3, column 10)",
    );
    // Twice in one route.
    let text = route("a", "[\"127.0.0.1:7000\", \"127.0.0.1:7000\"]");
    rejects(
        &dir,
        &text,
        "t.toml:3:29: listen address 127.0.0.1:7000 appears twice in route \"a\" (first at line 3, column 11)",
    );
    // A wildcard and a specific address of the same family and port.
    let text = format!(
        "{}{}",
        route("a", "\"127.0.0.1:7000\""),
        route("b", "\"0.0.0.0:7000\"")
    );
    rejects(
        &dir,
        &text,
        "t.toml:7:10: listen address 0.0.0.0:7000 of route \"b\" conflicts with 127.0.0.1:7000 of route \"a\" (at line 3, column 10): the wildcard address 0.0.0.0 takes port 7000",
    );
    let text = route("a", "[\"[::]:7000\", \"[::1]:7000\"]");
    rejects(
        &dir,
        &text,
        "t.toml:3:24: listen address [::1]:7000 of route \"a\" conflicts with [::]:7000 of the same route",
    );
    // Port 0 and IPv4-mapped IPv6 addresses cannot be listened on as meant.
    rejects(
        &dir,
        &route("a", "\"127.0.0.1:0\""),
        "t.toml:3:10: listen address 127.0.0.1:0 of route \"a\" has port 0: expected a port from 1 to 65535",
    );
    rejects(
        &dir,
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        "t.toml:2:10: listen address 127.0.0.1:0 of the admin listener has port 0",
    );
    rejects(
        &dir,
        &route("a", "\"[::ffff:127.0.0.1]:7000\""),
        "t.toml:3:10: listen address [::ffff:127.0.0.1]:7000 of route \"a\" is an IPv4-mapped IPv6 address, which cannot be listened on: write it as 127.0.0.1:7000",
    );
    // A route on the admin listener's address.
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:9900\"\n{}",
        route("a", "\"localhost:9900\"")
    );
    rejects(
        &dir,
        &text,
        "t.toml:5:10: listen address 127.0.0.1:9900 of route \"a\" is already used by the admin listener (at line 2, column 10)",
    );
    // These do not conflict: other port, other IP, other family.
    let text = format!(
        "{}{}{}{}",
        route("a", "\"127.0.0.1:7000\""),
        route("b", "\"127.0.0.1:7001\""),
        route("c", "\"127.0.0.2:7000\""),
        route("d", "\"[::]:7000\"")
    );
    assert_eq!(dir.parse(&text).unwrap().routes.len(), 4);
}

#[test]
fn route_kind_is_backends_or_files() {
    let dir = Dir::new();
    rejects(
        &dir,
        &format!("{PROXY}file = \"banner.bin\"\n"),
        "t.toml:5:8: route \"p\" has both `backends` and `file`: a route either proxies to backends or serves files, not both",
    );
    rejects(
        &dir,
        &format!("{PROXY}root = \"www\"\n"),
        "t.toml:5:8: route \"p\" has both `backends` and `root`",
    );
    rejects(
        &dir,
        &format!("{FILE}root = \"www\"\n"),
        "t.toml:5:8: route \"f\" has both `file` and `root`",
    );
    rejects(
        &dir,
        "[[route]]\nname = \"n\"\nlisten = \"127.0.0.1:1\"\n",
        "t.toml:1:1: route \"n\" has nothing to serve: expected `backends` (a proxy route) or `file` / `root` (a file route)",
    );
}

#[test]
fn backends_must_be_usable() {
    let dir = Dir::new();
    rejects(
        &dir,
        "[[route]]\nname = \"p\"\nlisten = \"127.0.0.1:1\"\nbackends = []\n",
        "t.toml:4:12: route \"p\" has an empty `backends` list",
    );
    rejects(
        &dir,
        "[[route]]\nname = \"p\"\nlisten = \"127.0.0.1:1\"\nbackends = [\"127.0.0.1:0\"]\n",
        "t.toml:4:13: backend \"127.0.0.1:0\" has port 0",
    );
    rejects(
        &dir,
        "[[route]]\nname = \"p\"\nlisten = \"127.0.0.1:1\"\nbackends = [\"app:x\"]\n",
        "t.toml:4:13: invalid backend address \"app:x\": invalid port \"x\"",
    );
}

#[test]
fn backend_tables_set_weight_and_backup() {
    let dir = Dir::new();
    let text = "[[route]]\nname = \"p\"\nlisten = \"127.0.0.1:1\"\n\
                backends = [\"127.0.0.1:2\", { address = \"127.0.0.1:3\", weight = 256 },\n\
                { address = \"127.0.0.1:4\", backup = true }]\n";
    let cfg = dir.parse(text).unwrap();
    let b = &proxy(&cfg.routes[0]).backends;
    let got: Vec<(&str, u32, bool)> = b
        .iter()
        .map(|b| (b.name.as_str(), b.weight, b.backup))
        .collect();
    assert_eq!(
        got,
        [
            ("127.0.0.1:2", 1, false),
            ("127.0.0.1:3", 256, false),
            ("127.0.0.1:4", 1, true)
        ]
    );
    // One backend may be a table on its own, like a single address.
    let one = "[[route]]\nname = \"p\"\nlisten = \"127.0.0.1:1\"\n\
               backends = { address = \"127.0.0.1:5\", weight = 4 }\n";
    let one = dir.parse(one).unwrap();
    let b = &proxy(&one.routes[0]).backends;
    assert_eq!(
        (b.len(), b[0].name.as_str(), b[0].weight),
        (1, "127.0.0.1:5", 4)
    );
    let route = "[[route]]\nname = \"p\"\nlisten = \"127.0.0.1:1\"\n";
    for (backends, want) in [
        (
            "[{ address = \"127.0.0.1:2\", weight = 0 }]",
            "t.toml:4:49: weight 0 of backend \"127.0.0.1:2\" is out of range: expected 1 to 256",
        ),
        (
            "[{ address = \"127.0.0.1:2\", weight = 257 }]",
            "t.toml:4:49: weight 257 of backend \"127.0.0.1:2\" is out of range",
        ),
        (
            "[{ weight = 2 }]",
            "t.toml:4:13: a backend table of route \"p\" has no `address`: expected { address = \"HOST:PORT\", weight = 1, backup = false, max_connections = 100 }",
        ),
        (
            "[\"127.0.0.1:2\", { address = \"127.0.0.1:2\", weigth = 2 }]",
            "t.toml:4:55: unknown key `weigth` in backend #2 of route \"p\" (did you mean `weight`?); expected one of: address, weight, backup, max_connections",
        ),
        (
            "[{ address = \"127.0.0.1:2\", backup = true }]",
            "t.toml:4:12: every backend of route \"p\" is a backup: expected at least one without `backup = true`",
        ),
        (
            "[{ address = \"127.0.0.1:0\" }]",
            "t.toml:4:25: backend \"127.0.0.1:0\" has port 0",
        ),
        (
            "[\"127.0.0.1:2\", { address = \"127.0.0.1:2\", backup = true }]",
            "t.toml:4:28: backend \"127.0.0.1:2\" is listed twice in route \"p\": list each server once (use `weight` to give it a larger share)",
        ),
        (
            "[\"127.0.0.1:2\", \"localhost:2\"]",
            "t.toml:4:28: backends \"127.0.0.1:2\" and \"localhost:2\" are the same address 127.0.0.1:2 in route \"p\"",
        ),
        (
            "[\"127.0.0.1:2\", 7]",
            "t.toml:4:28: wrong type for an item of `backends` in [[route]] \"p\": expected an address like \"127.0.0.1:9000\" or a table like { address = \"127.0.0.1:9000\", weight = 2 }, found integer `7`",
        ),
        (
            "[{ address = \"127.0.0.1:2\", weight = \"2\" }]",
            "t.toml:4:49: wrong type for `weight` in backend #1 of route \"p\": expected an integer, found string \"2\"",
        ),
    ] {
        rejects(&dir, &format!("{route}backends = {backends}\n"), want);
    }
}

#[test]
fn backend_max_connections_and_queue_timeout() {
    let dir = Dir::new();
    let text = "[[route]]\nname = \"p\"\nlisten = \"127.0.0.1:1\"\nconnect_timeout = \"2s\"\n\
                backends = [\"127.0.0.1:2\", { address = \"127.0.0.1:3\", max_connections = 50 }]\n";
    let cfg = dir.parse(text).unwrap();
    let p = proxy(&cfg.routes[0]);
    let max: Vec<usize> = p.backends.iter().map(|b| b.max_connections).collect();
    assert_eq!(max, [0, 50], "no limit unless set");
    // A client waits for a free backend as long as for a connect, unless
    // queue_timeout says otherwise; 0 turns it away at once.
    assert_eq!(p.queue_timeout, Duration::from_secs(2));
    for (value, want) in [("\"750ms\"", 750), ("0", 0)] {
        let cfg = dir
            .parse(&format!("{PROXY}queue_timeout = {value}\n"))
            .unwrap();
        assert_eq!(
            proxy(&cfg.routes[0]).queue_timeout,
            Duration::from_millis(want)
        );
    }
    let route = "[[route]]\nname = \"p\"\nlisten = \"127.0.0.1:1\"\n";
    for (backends, want) in [
        (
            "[{ address = \"127.0.0.1:2\", max_connections = 0 }]",
            "t.toml:4:58: max_connections 0 of backend \"127.0.0.1:2\" is out of range: expected 1 to 10000000 (leave it out for no limit)",
        ),
        (
            "[{ address = \"127.0.0.1:2\", max_connections = -5 }]",
            "t.toml:4:58: max_connections -5 of backend \"127.0.0.1:2\" is out of range",
        ),
        (
            "[{ address = \"127.0.0.1:2\", max_connection = 5 }]",
            "t.toml:4:40: unknown key `max_connection` in backend #1 of route \"p\" (did you mean `max_connections`?)",
        ),
    ] {
        rejects(&dir, &format!("{route}backends = {backends}\n"), want);
    }
    rejects(
        &dir,
        &format!("{PROXY}queue_timeout = \"8d\"\n"),
        "t.toml:5:17: queue_timeout of 691200s is too long: expected at most 7d",
    );
}

#[test]
fn tcp_keepalive_is_whole_seconds_on_any_route() {
    let dir = Dir::new();
    for (route, value, want) in [(PROXY, "\"90s\"", 90), (FILE, "\"2h\"", 7200)] {
        let cfg = dir
            .parse(&format!("{route}tcp_keepalive = {value}\n"))
            .unwrap();
        let want = Keepalive {
            idle: Duration::from_secs(want),
            interval: None,
            count: None,
        };
        assert_eq!(cfg.routes[0].tcp_keepalive, Some(want));
    }
    assert_eq!(dir.parse(PROXY).unwrap().routes[0].tcp_keepalive, None);
    rejects(
        &dir,
        &format!("{PROXY}tcp_keepalive = \"0s\"\n"),
        "t.toml:5:17: tcp_keepalive must be from 1s to 32767s",
    );
    rejects(
        &dir,
        &format!("{PROXY}tcp_keepalive = \"1500ms\"\n"),
        "t.toml:5:17: tcp_keepalive is set in whole seconds",
    );
}

#[test]
fn tcp_keepalive_interval_and_count_come_with_tcp_keepalive() {
    let dir = Dir::new();
    let cfg = dir
        .parse(&format!(
            "{FILE}tcp_keepalive = \"1m\"\ntcp_keepalive_interval = \"10s\"\ntcp_keepalive_count = 4\n"
        ))
        .unwrap();
    let want = Keepalive {
        idle: Duration::from_secs(60),
        interval: Some(Duration::from_secs(10)),
        count: Some(4),
    };
    assert_eq!(cfg.routes[0].tcp_keepalive, Some(want));
    let cfg = dir
        .parse(&format!(
            "{PROXY}tcp_keepalive = \"30s\"\ntcp_keepalive_count = 127\n"
        ))
        .unwrap();
    let k = cfg.routes[0].tcp_keepalive.unwrap();
    assert_eq!((k.interval, k.count), (None, Some(127)));
    rejects(
        &dir,
        &format!("{PROXY}tcp_keepalive_interval = \"10s\"\n"),
        "t.toml:5:26: `tcp_keepalive_interval` needs `tcp_keepalive`, which route \"p\" does not set",
    );
    rejects(
        &dir,
        &format!("{PROXY}tcp_keepalive_count = 3\n"),
        "t.toml:5:23: `tcp_keepalive_count` needs `tcp_keepalive`",
    );
    let ka = format!("{PROXY}tcp_keepalive = \"30s\"\n");
    rejects(
        &dir,
        &format!("{ka}tcp_keepalive_interval = \"0s\"\n"),
        "t.toml:6:26: tcp_keepalive_interval must be from 1s to 32767s (the kernel's limit): \
         the time between unanswered keepalive probes",
    );
    rejects(
        &dir,
        &format!("{ka}tcp_keepalive_interval = \"2500ms\"\n"),
        "t.toml:6:26: tcp_keepalive_interval is set in whole seconds (TCP_KEEPINTVL)",
    );
    rejects(
        &dir,
        &format!("{ka}tcp_keepalive_count = 0\n"),
        "t.toml:6:23: tcp_keepalive_count must be greater than zero, found 0",
    );
    rejects(
        &dir,
        &format!("{ka}tcp_keepalive_count = 128\n"),
        "t.toml:6:23: tcp_keepalive_count must be at most 127, found 128",
    );
}

#[test]
fn accept_proxy_from_needs_accept_proxy_and_networks() {
    let dir = Dir::new();
    let cfg = dir
        .parse(&format!(
            "{PROXY}accept_proxy = true\naccept_proxy_from = [\"10.0.0.0/8\", \"192.0.2.7\"]\n"
        ))
        .unwrap();
    let from: Vec<String> = cfg.routes[0]
        .accept_proxy_from
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(from, ["10.0.0.0/8", "192.0.2.7/32"]);
    rejects(
        &dir,
        &format!("{PROXY}accept_proxy_from = \"10.0.0.0/8\"\n"),
        "t.toml:5:21: `accept_proxy_from` needs `accept_proxy = true`, which route \"p\" does not set",
    );
    rejects(
        &dir,
        &format!("{PROXY}accept_proxy = true\naccept_proxy_from = []\n"),
        "t.toml:6:21: route \"p\" has an empty `accept_proxy_from`: list the balancers' addresses",
    );
    rejects(
        &dir,
        &format!("{PROXY}accept_proxy = true\naccept_proxy_from = [\"10.0.0/8\"]\n"),
        "t.toml:6:22: invalid network \"10.0.0/8\" in `accept_proxy_from`: expected an IP address or CIDR",
    );
}

#[test]
fn http_path_must_be_a_plain_path() {
    let dir = Dir::new();
    let cfg = dir
        .parse(&format!(
            "{PROXY}[route.health]\nhttp_path = \"/health?x=1\"\n"
        ))
        .unwrap();
    assert_eq!(
        proxy(&cfg.routes[0]).health.http_path.as_deref(),
        Some("/health?x=1")
    );
    assert_eq!(dir.parse(PROXY).unwrap().routes.len(), 1);
    assert!(
        proxy(&dir.parse(PROXY).unwrap().routes[0])
            .health
            .http_path
            .is_none()
    );
    for bad in ["health", "/a b", "/caf\u{e9}", ""] {
        rejects(
            &dir,
            &format!("{PROXY}[route.health]\nhttp_path = \"{bad}\"\n"),
            &format!(
                "t.toml:6:13: invalid http_path {bad:?}: expected a path that starts with \"/\""
            ),
        );
    }
}

#[test]
fn keys_of_the_other_kind_are_rejected() {
    let dir = Dir::new();
    for (key, value) in [
        ("index", "\"index.html\""),
        ("send_chunk", "\"1MiB\""),
        ("dotfiles", "true"),
        ("protocol", "\"http\""),
    ] {
        let want = format!(
            "t.toml:5:{}: `{key}` only applies to file routes; route \"p\" is a proxy route (it has `backends`)",
            key.len() + 4
        );
        rejects(&dir, &format!("{PROXY}{key} = {value}\n"), &want);
    }
    for (key, value) in [
        ("balance", "\"random\""),
        ("connect_timeout", "\"1s\""),
        ("queue_timeout", "\"1s\""),
        ("send_proxy", "\"v1\""),
        ("fallback_file", "\"maintenance.http\""),
        ("fallback_strategy", "\"copy\""),
    ] {
        let want = format!(
            "t.toml:5:{}: `{key}` only applies to proxy routes; route \"f\" is a file route (it has `file` or `root`)",
            key.len() + 4
        );
        rejects(&dir, &format!("{FILE}{key} = {value}\n"), &want);
    }
    rejects(
        &dir,
        &format!("{FILE}[route.health]\nrise = 1\n"),
        "t.toml:5:1: `health` only applies to proxy routes",
    );
}

#[test]
fn file_route_rules() {
    let dir = Dir::new();
    rejects(
        &dir,
        &format!("{ROOT}protocol = \"raw\"\n"),
        "t.toml:5:12: protocol \"raw\" needs `file`",
    );
    rejects(
        &dir,
        &format!("{FILE}index = \"index.html\"\n"),
        "t.toml:5:9: `index` only applies to routes that serve a folder (`root`); route \"f\" serves one `file`",
    );
    rejects(
        &dir,
        &format!("{FILE}dotfiles = true\n"),
        "t.toml:5:12: `dotfiles` only applies to routes that serve a folder",
    );
    rejects(
        &dir,
        &format!("{ROOT}index = \"a/b.html\"\n"),
        "t.toml:5:9: invalid index \"a/b.html\": expected a file name",
    );
    rejects(
        &dir,
        &format!("{ROOT}index = \"a\\u0000b\"\n"),
        "t.toml:5:9: invalid index \"a\\0b\": expected a file name like \"index.html\" (no '/', no control characters)",
    );
    rejects(
        &dir,
        &format!("{PROXY}fallback_strategy = \"mmap\"\n"),
        "t.toml:5:21: `fallback_strategy` needs `fallback_file`",
    );
}

#[test]
fn paths_must_exist_with_the_right_type() {
    let dir = Dir::new();
    let looked = dir.0.join("nope.bin");
    rejects(
        &dir,
        "[[route]]\nname = \"f\"\nlisten = \"127.0.0.1:1\"\nfile = \"nope.bin\"\n",
        &format!(
            "t.toml:4:8: file \"nope.bin\" does not exist (looked for {})",
            looked.display()
        ),
    );
    rejects(
        &dir,
        "[[route]]\nname = \"f\"\nlisten = \"127.0.0.1:1\"\nfile = \"www\"\n",
        "t.toml:4:8: file \"www\" is a directory: expected a regular file",
    );
    rejects(
        &dir,
        "[[route]]\nname = \"f\"\nlisten = \"127.0.0.1:1\"\nroot = \"banner.bin\"\n",
        "t.toml:4:8: root \"banner.bin\" is not a directory",
    );
    rejects(
        &dir,
        "[[route]]\nname = \"f\"\nlisten = \"127.0.0.1:1\"\nroot = \"/nonexistent-sluice-dir\"\n",
        "t.toml:4:8: root \"/nonexistent-sluice-dir\" does not exist",
    );
    rejects(
        &dir,
        &format!("{PROXY}fallback_file = \"gone.http\"\n"),
        "t.toml:5:17: fallback_file \"gone.http\" does not exist",
    );
    rejects(
        &dir,
        &format!("{PROXY}fallback_file = \"www\"\n"),
        "t.toml:5:17: fallback_file \"www\" is a directory",
    );
    rejects(
        &dir,
        &format!("{PROXY}fallback_file = \"\"\n"),
        "t.toml:5:17: fallback_file is empty",
    );
}

#[test]
fn zero_and_out_of_range_values() {
    let dir = Dir::new();
    rejects(
        &dir,
        &format!("[global]\nbusy_poll = \"11ms\"\n{PROXY}"),
        "t.toml:2:13: busy_poll of 11ms is too long: expected at most 10ms",
    );
    assert_eq!(
        dir.parse(&format!("[global]\nbusy_poll = \"10ms\"\n{PROXY}"))
            .unwrap()
            .global
            .busy_poll,
        Duration::from_millis(10)
    );
    rejects(
        &dir,
        &format!("{PROXY}pipe_size = 0\n"),
        "t.toml:5:13: pipe_size must be greater than zero",
    );
    rejects(
        &dir,
        &format!("{PROXY}buffer_size = \"0KiB\"\n"),
        "t.toml:5:15: buffer_size must be greater than zero",
    );
    rejects(
        &dir,
        &format!("{FILE}send_chunk = \"0\"\n"),
        "t.toml:5:14: send_chunk must be greater than zero",
    );
    rejects(
        &dir,
        &format!("{PROXY}pipe_size = \"2GiB\"\n"),
        "t.toml:5:13: pipe_size 2GiB is too large: expected at most 1GiB",
    );
    rejects(
        &dir,
        &format!("{PROXY}connect_timeout = \"0s\"\n"),
        "t.toml:5:19: connect_timeout must be greater than zero",
    );
    rejects(
        &dir,
        &format!("{PROXY}idle_timeout = 0\n"),
        "t.toml:5:16: idle_timeout must be greater than zero",
    );
    rejects(
        &dir,
        &format!("{PROXY}header_timeout = \"0ms\"\n"),
        "t.toml:5:18: header_timeout must be greater than zero",
    );
    rejects(
        &dir,
        &format!("{PROXY}max_connections = 0\n"),
        "t.toml:5:19: max_connections must be greater than zero, found 0",
    );
    rejects(
        &dir,
        &format!("{PROXY}[route.health]\nrise = 0\n"),
        "t.toml:6:8: rise must be greater than zero, found 0",
    );
    rejects(
        &dir,
        &format!("{PROXY}[route.health]\nfall = 0\n"),
        "t.toml:6:8: fall must be greater than zero, found 0",
    );
    rejects(
        &dir,
        &format!("{PROXY}[route.health]\nfall = 4294967296\n"),
        "t.toml:6:8: fall must be at most 4294967295",
    );
    rejects(
        &dir,
        &format!("{PROXY}[route.health]\ninterval = \"0\"\n"),
        "t.toml:6:12: interval must be greater than zero",
    );
    rejects(
        &dir,
        &format!("{PROXY}[route.health]\ntimeout = \"0s\"\n"),
        "t.toml:6:11: timeout must be greater than zero",
    );
    rejects(
        &dir,
        &format!("[global]\nmax_connections = 0\n{PROXY}"),
        "t.toml:2:19: max_connections must be greater than zero",
    );
    rejects(
        &dir,
        &format!("[global]\nworkers = 5000\n{PROXY}"),
        "t.toml:2:11: workers must be at most 1024, found 5000",
    );
    rejects(
        &dir,
        &format!("[global]\nopen_file_cache = 2000000\n{PROXY}"),
        "t.toml:2:19: open_file_cache must be at most 1048576, found 2000000",
    );
}

#[test]
fn unit_errors_are_located() {
    let dir = Dir::new();
    rejects(
        &dir,
        &format!("{PROXY}connect_timeout = \"3 s\"\n"),
        "t.toml:5:19: invalid duration \"3 s\": expected a number with a unit like 250ms, 3s, 5m",
    );
    rejects(
        &dir,
        &format!("{PROXY}pipe_size = \"1MB\"\n"),
        "t.toml:5:13: invalid size \"1MB\": did you mean \"1MiB\"?",
    );
    rejects(
        &dir,
        &format!("[global]\nshutdown_timeout = 30\n{PROXY}"),
        "t.toml:2:20: invalid duration 30: a duration needs a unit and quotes, like \"30s\"",
    );
}

#[test]
fn networks_must_parse() {
    let dir = Dir::new();
    rejects(
        &dir,
        &format!("{PROXY}allow = [\"10.0.0.0/8\", \"10.0.0/8\"]\n"),
        "t.toml:5:24: invalid network \"10.0.0/8\" in `allow`: expected an IP address or CIDR",
    );
    rejects(
        &dir,
        &format!("{PROXY}deny = \"nope\"\n"),
        "t.toml:5:8: invalid network \"nope\" in `deny`",
    );
}

#[test]
fn wrong_types_are_located() {
    let dir = Dir::new();
    rejects(
        &dir,
        &format!("{PROXY}accept_proxy = 1\n"),
        "t.toml:5:16: wrong type for `accept_proxy` in [[route]] \"p\": expected a boolean (true or false), found integer `1`",
    );
    rejects(
        &dir,
        &format!("{PROXY}backends = 1\n"),
        "t.toml:5:1: duplicate key `backends`",
    );
    rejects(
        &dir,
        "[[route]]\nname = \"p\"\nbackends = [\"127.0.0.1:1\", 2]\n",
        "t.toml:3:28: wrong type for an item of `backends` in [[route]] \"p\": expected an address like \"127.0.0.1:9000\" or a table like { address = \"127.0.0.1:9000\", weight = 2 }, found integer `2`",
    );
}

#[test]
fn no_panics_on_odd_input() {
    let dir = Dir::new();
    let odd = [
        "\u{feff}",
        "=",
        "[[route]]\n[[route]]\n",
        "route = []",
        "route = [1]",
        "route = [{}]",
        "[route.health]",
        "[[route.health]]",
        "[global.x]\ny = 1",
        "global = {}\n[[route]]",
        "\"\u{1F600}\" = 1",
        "[[route]]\nname = \"é\"\nlisten = \"é:1\"",
        "[[route]]\nname = \"x\"\nlisten = \"[::1]:65536\"",
        "[[route]]\nname = \"x\"\nlisten = \"127.0.0.1:1\"\nfile = \"\\u0000\"",
    ];
    for text in odd {
        let _ = dir.parse(text);
    }
}
