//! `sluice check` against broken configuration files: the real binary must
//! exit non-zero and print `sluice: FILE:LINE:COL: MESSAGE` pointing at the
//! offending key or value, for every class of mistake the loader knows; and
//! a valid file (including `config.toml.example`) must pass and print the
//! one-line summary.
//!
//! Each case writes its config into a fresh folder (std only: temp_dir +
//! pid + counter) next to the files routes may refer to.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// A fresh folder with `banner.bin`, `maintenance.http` and `www/`, removed
/// on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("sluice-config-errors-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("www")).unwrap();
        fs::write(dir.join("banner.bin"), b"banner").unwrap();
        fs::write(
            dir.join("maintenance.http"),
            b"HTTP/1.1 503 Unavailable\r\n\r\n",
        )
        .unwrap();
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn check(config: &Path) -> Output {
    Command::new(BIN)
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("run sluice")
}

/// Write `text` as a config, run `sluice check`, and assert it fails with
/// `sluice: FILE:` + `location` (like "7:12") + a message containing
/// `phrase`.
#[track_caller]
fn rejects(text: &str, location: &str, phrase: &str) {
    let dir = Dir::new();
    let path = dir.0.join("sluice.toml");
    fs::write(&path, text).unwrap();
    let out = check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit status for:\n{text}\nstderr: {stderr}"
    );
    let prefix = format!("sluice: {}:{location}: ", path.display());
    assert!(
        stderr.starts_with(&prefix) && stderr.contains(phrase),
        "\nstderr: {stderr}\n  want: {prefix}...{phrase}...\nconfig:\n{text}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout");
}

/// Write `text` as a config, run `sluice check`, assert it passes, and
/// return what it printed.
#[track_caller]
fn accepts(text: &str) -> String {
    let dir = Dir::new();
    let path = dir.0.join("sluice.toml");
    fs::write(&path, text).unwrap();
    let out = check(&path);
    assert!(
        out.status.success(),
        "stderr: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const PROXY: &str =
    "[[route]]\nname = \"p\"\nlisten = \"127.0.0.1:7000\"\nbackends = \"127.0.0.1:9000\"\n";
const FILE: &str = "[[route]]\nname = \"f\"\nlisten = \"127.0.0.1:8080\"\nfile = \"banner.bin\"\n";
const ROOT: &str = "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:8081\"\nroot = \"www\"\n";

#[test]
fn valid_config_passes_with_summary() {
    let dir = Dir::new();
    let path = dir.0.join("sluice.toml");
    let text = format!(
        "[global]\nworkers = 2\n\n[admin]\nlisten = \"127.0.0.1:9900\"\n\n{PROXY}\n{FILE}\n{ROOT}"
    );
    fs::write(&path, text).unwrap();
    let out = check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim_end(),
        format!(
            "config {} ok: 3 routes (1 proxy, 2 file), 3 listeners, 1 backend, 2 workers, admin on 127.0.0.1:9900",
            path.display()
        )
    );
}

#[test]
fn example_config_passes() {
    let dir = Dir::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml.example");
    let path = dir.0.join("config.toml.example");
    fs::copy(&example, &path).unwrap();
    fs::write(dir.0.join("README.md"), "# sluice\n").unwrap();
    let out = check(&path);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ok: 3 routes (2 proxy, 1 file), 3 listeners, 2 backends, 1 worker, admin on 127.0.0.1:9900"),
        "{stdout}"
    );
}

#[test]
fn unreadable_file() {
    let dir = Dir::new();
    let path = dir.0.join("missing.toml");
    let out = check(&path);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!("sluice: {}: cannot read: ", path.display())),
        "{stderr}"
    );
}

#[test]
fn syntax_errors() {
    rejects("[global]\nworkers = \n", "2:11", "invalid TOML");
    rejects(
        "[[route]]\nname = \"a\"\nname = \"b\"\n",
        "3:1",
        "duplicate key `name`",
    );
}

#[test]
fn unknown_keys() {
    rejects(
        "[global]\nworker = 2\n",
        "2:1",
        "unknown key `worker` in [global] (did you mean `workers`?); expected one of: max_connections, max_pipes, shutdown_timeout, log_level, workers, open_file_cache, open_file_cache_inactive",
    );
    rejects(
        "[admin]\nport = 1\n",
        "2:1",
        "unknown key `port` in [admin]; expected: listen",
    );
    rejects(
        &format!("{PROXY}stratgy = \"copy\"\n"),
        "5:1",
        "unknown key `stratgy` in [[route]] \"p\" (did you mean `strategy`?); expected one of: name, listen, backends,",
    );
    rejects(
        &format!("{PROXY}[route.health]\nintervall = \"1s\"\n"),
        "6:1",
        "unknown key `intervall` in [route.health] of route \"p\" (did you mean `interval`?)",
    );
    rejects(
        "[logging]\n",
        "1:2",
        "unknown key `logging` at the top level; expected one of: global, admin, route",
    );
}

#[test]
fn wrong_types() {
    rejects(
        "[global]\nmax_connections = \"many\"\n",
        "2:19",
        "wrong type for `max_connections` in [global]: expected a non-negative integer, found string \"many\"",
    );
    rejects(
        &format!("{PROXY}accept_proxy = \"yes\"\n"),
        "5:16",
        "wrong type for `accept_proxy` in [[route]] \"p\": expected a boolean",
    );
    rejects(
        "[[route]]\nname = \"p\"\nlisten = [7000]\n",
        "3:11",
        "wrong type for an item of `listen` in [[route]] \"p\": expected a string, found integer `7000`",
    );
    rejects(
        "[route]\nname = \"p\"\n",
        "1:1",
        "wrong type for `route` at the top level: expected a list, found a table",
    );
    // TOML's dates reach serde as tables: named as what they are.
    rejects(
        &format!("{PROXY}idle_timeout = 1979-05-27\n"),
        "5:16",
        "wrong type for `idle_timeout` in [[route]] \"p\": expected a duration string like \"250ms\", \"3s\" or \"5m\", found a date-time",
    );
}

#[test]
fn bad_enum_values() {
    rejects(
        "[global]\nlog_level = \"loud\"\n",
        "2:13",
        "invalid log_level \"loud\": expected one of: error, warn, info, debug, trace, off",
    );
    rejects(
        &format!("{PROXY}balance = \"fair\"\n"),
        "5:11",
        "invalid balance \"fair\": expected one of: round-robin, least-connections, source-hash, random",
    );
    rejects(
        &format!("{PROXY}send_proxy = \"v3\"\n"),
        "5:14",
        "invalid send_proxy \"v3\": expected one of: v1, v2",
    );
    rejects(
        &format!("{FILE}protocol = \"gopher\"\n"),
        "5:12",
        "invalid protocol \"gopher\": expected one of: http, raw",
    );
    rejects(
        &format!("{PROXY}strategy = \"zerocopy\"\n"),
        "5:12",
        "invalid strategy \"zerocopy\" for proxy route \"p\": expected one of: splice, copy, auto",
    );
}

#[test]
fn duplicate_route_names() {
    let second =
        "[[route]]\nname = \"p\"\nlisten = \"127.0.0.1:7001\"\nbackends = \"127.0.0.1:9000\"\n";
    rejects(
        &format!("{PROXY}\n{second}"),
        "7:8",
        "duplicate route name \"p\" (first defined at line 2)",
    );
}

#[test]
fn listen_conflicts() {
    let route = |name: &str, listen: &str| {
        format!("[[route]]\nname = \"{name}\"\nlisten = {listen}\nbackends = \"127.0.0.1:9000\"\n")
    };
    rejects(
        &format!(
            "{}{}",
            route("a", "\"127.0.0.1:7000\""),
            route("b", "\"127.0.0.1:7000\"")
        ),
        "7:10",
        "listen address 127.0.0.1:7000 of route \"b\" is already used by route \"a\" (at line 3, column 10)",
    );
    rejects(
        &route("a", "[\"127.0.0.1:7000\", \"127.0.0.1:7000\"]"),
        "3:29",
        "listen address 127.0.0.1:7000 appears twice in route \"a\"",
    );
    rejects(
        &format!(
            "{}{}",
            route("a", "\"127.0.0.1:7000\""),
            route("b", "\"0.0.0.0:7000\"")
        ),
        "7:10",
        "listen address 0.0.0.0:7000 of route \"b\" conflicts with 127.0.0.1:7000 of route \"a\"",
    );
    rejects(
        &format!(
            "[admin]\nlisten = \"0.0.0.0:9900\"\n{}",
            route("a", "\"127.0.0.1:9900\"")
        ),
        "5:10",
        "listen address 127.0.0.1:9900 of route \"a\" conflicts with 0.0.0.0:9900 of the admin listener",
    );
}

#[test]
fn missing_or_empty_required_keys() {
    rejects(
        "[[route]]\nlisten = \"127.0.0.1:1\"\nbackends = \"127.0.0.1:2\"\n",
        "1:1",
        "[[route]] #1 has no `name`",
    );
    rejects(
        "[[route]]\nname = \"p\"\nbackends = \"127.0.0.1:2\"\n",
        "1:1",
        "route \"p\" has no `listen`",
    );
    rejects(
        "[[route]]\nname = \"p\"\nlisten = []\n",
        "3:10",
        "route \"p\" has an empty `listen` list",
    );
    rejects(
        "[[route]]\nname = \"p\"\nlisten = \"127.0.0.1:1\"\nbackends = []\n",
        "4:12",
        "route \"p\" has an empty `backends` list",
    );
    rejects(
        "[[route]]\nname = \"p\"\nlisten = \"127.0.0.1:1\"\n",
        "1:1",
        "route \"p\" has nothing to serve: expected `backends` (a proxy route) or `file` / `root` (a file route)",
    );
}

#[test]
fn route_kind_conflicts() {
    rejects(
        &format!("{PROXY}file = \"banner.bin\"\n"),
        "5:8",
        "route \"p\" has both `backends` and `file`",
    );
    rejects(
        &format!("{PROXY}root = \"www\"\n"),
        "5:8",
        "route \"p\" has both `backends` and `root`",
    );
    rejects(
        &format!("{FILE}root = \"www\"\n"),
        "5:8",
        "route \"f\" has both `file` and `root`",
    );
}

#[test]
fn strategy_must_fit_the_kind() {
    rejects(
        &format!("{PROXY}strategy = \"sendfile\"\n"),
        "5:12",
        "strategy \"sendfile\" is for file routes; route \"p\" is a proxy route: expected one of: splice, copy, auto",
    );
    rejects(
        &format!("{FILE}strategy = \"auto\"\n"),
        "5:12",
        "strategy \"auto\" is for proxy routes; route \"f\" is a file route: expected one of: sendfile, mmap, splice, copy",
    );
}

#[test]
fn keys_that_do_not_fit_the_kind() {
    rejects(
        &format!("{ROOT}protocol = \"raw\"\n"),
        "5:12",
        "protocol \"raw\" needs `file`",
    );
    rejects(
        &format!("{PROXY}index = \"index.html\"\n"),
        "5:9",
        "`index` only applies to file routes; route \"p\" is a proxy route",
    );
    rejects(
        &format!("{PROXY}send_chunk = \"1MiB\"\n"),
        "5:14",
        "`send_chunk` only applies to file routes",
    );
    rejects(
        &format!("{PROXY}dotfiles = true\n"),
        "5:12",
        "`dotfiles` only applies to file routes",
    );
    rejects(
        &format!("{FILE}index = \"index.html\"\n"),
        "5:9",
        "`index` only applies to routes that serve a folder (`root`)",
    );
    rejects(
        &format!("{FILE}send_proxy = \"v1\"\n"),
        "5:14",
        "`send_proxy` only applies to proxy routes; route \"f\" is a file route",
    );
    rejects(
        &format!("{FILE}fallback_file = \"maintenance.http\"\n"),
        "5:17",
        "`fallback_file` only applies to proxy routes",
    );
    rejects(
        &format!("{FILE}balance = \"random\"\n"),
        "5:11",
        "`balance` only applies to proxy routes",
    );
    rejects(
        &format!("{FILE}connect_timeout = \"1s\"\n"),
        "5:19",
        "`connect_timeout` only applies to proxy routes",
    );
}

#[test]
fn zero_values() {
    rejects(
        &format!("{PROXY}pipe_size = 0\n"),
        "5:13",
        "pipe_size must be greater than zero",
    );
    rejects(
        &format!("{PROXY}buffer_size = \"0B\"\n"),
        "5:15",
        "buffer_size must be greater than zero",
    );
    rejects(
        &format!("{FILE}send_chunk = 0\n"),
        "5:14",
        "send_chunk must be greater than zero",
    );
    rejects(
        &format!("{PROXY}[route.health]\nrise = 0\n"),
        "6:8",
        "rise must be greater than zero",
    );
    rejects(
        &format!("{PROXY}[route.health]\nfall = 0\n"),
        "6:8",
        "fall must be greater than zero",
    );
    rejects(
        &format!("{PROXY}[route.health]\ninterval = \"0s\"\n"),
        "6:12",
        "interval must be greater than zero",
    );
}

#[test]
fn bad_units() {
    rejects(
        &format!("{PROXY}connect_timeout = \"3 s\"\n"),
        "5:19",
        "invalid duration \"3 s\": expected a number with a unit like 250ms, 3s, 5m",
    );
    rejects(
        &format!("{PROXY}pipe_size = \"1MB\"\n"),
        "5:13",
        "invalid size \"1MB\": did you mean \"1MiB\"?",
    );
}

#[test]
fn paths_must_exist() {
    rejects(
        "[[route]]\nname = \"f\"\nlisten = \"127.0.0.1:1\"\nfile = \"nope.bin\"\n",
        "4:8",
        "file \"nope.bin\" does not exist (looked for ",
    );
    rejects(
        "[[route]]\nname = \"f\"\nlisten = \"127.0.0.1:1\"\nfile = \"www\"\n",
        "4:8",
        "file \"www\" is a directory: expected a regular file",
    );
    rejects(
        "[[route]]\nname = \"f\"\nlisten = \"127.0.0.1:1\"\nroot = \"nope\"\n",
        "4:8",
        "root \"nope\" does not exist",
    );
    rejects(
        "[[route]]\nname = \"f\"\nlisten = \"127.0.0.1:1\"\nroot = \"banner.bin\"\n",
        "4:8",
        "root \"banner.bin\" is not a directory",
    );
    rejects(
        &format!("{PROXY}fallback_file = \"gone.http\"\n"),
        "5:17",
        "fallback_file \"gone.http\" does not exist",
    );
}

#[test]
fn bad_addresses() {
    rejects(
        "[[route]]\nname = \"p\"\nlisten = \"127.0.0.1:1\"\nbackends = [\"app:port\"]\n",
        "4:13",
        "invalid backend address \"app:port\": invalid port \"port\"",
    );
    rejects(
        "[[route]]\nname = \"p\"\nlisten = \"127.0.0.1\"\nbackends = \"127.0.0.1:1\"\n",
        "3:10",
        "invalid listen address \"127.0.0.1\": the port is missing",
    );
    // No test resolves an unknown host name: that would send a DNS query
    // off this machine. Name resolution itself is exercised with
    // `localhost`, which /etc/hosts answers.
    rejects(
        &format!("{PROXY}allow = [\"10.0.0.0/33\"]\n"),
        "5:10",
        "invalid network \"10.0.0.0/33\" in `allow`",
    );
}

/// A backend that leads back to its own route through sluice's listeners
/// (its own listen address, loopback on a port its wildcard listener
/// takes, or another route's address that leads back) would make every
/// connection loop through sluice; one that is no single host's address
/// (any, broadcast, multicast) cannot be connected to. Both are refused at
/// the backend. A proxy route in front of another route, the same port on
/// another host behind a wildcard listener, and the other family's
/// loopback behind a wildcard (IPv6 listeners are IPV6_V6ONLY) are fine.
#[test]
fn backends_that_loop_back_or_are_no_host() {
    let route = |name: &str, listen: &str, backends: &str| {
        format!("[[route]]\nname = \"{name}\"\nlisten = \"{listen}\"\nbackends = {backends}\n")
    };
    rejects(
        &route("a", "127.0.0.1:7000", "\"127.0.0.1:7000\""),
        "4:12",
        "backend \"127.0.0.1:7000\" of route \"a\" is its own listen address: every connection would come back to sluice",
    );
    rejects(
        &route(
            "a",
            "0.0.0.0:7000",
            "[\"10.0.0.1:7000\", \"127.0.0.1:7000\"]",
        ),
        "4:30",
        "backend \"127.0.0.1:7000\" of route \"a\" is its own listen address",
    );
    // An IPv4-mapped address is its IPv4 address.
    rejects(
        &route("a", "127.0.0.1:7000", "\"[::ffff:127.0.0.1]:7000\""),
        "4:12",
        "of route \"a\" is its own listen address",
    );
    rejects(
        &format!(
            "{}{}",
            route("a", "127.0.0.1:7000", "\"127.0.0.1:7001\""),
            route("b", "127.0.0.1:7001", "\"127.0.0.1:7000\"")
        ),
        "4:12",
        "backend \"127.0.0.1:7001\" of route \"a\" is the listen address of route \"b\", which leads back to it",
    );
    for (backend, what) in [
        (
            "0.0.0.0:80",
            "\"any address\", which only a listener can use",
        ),
        ("[::]:80", "\"any address\""),
        ("255.255.255.255:80", "a broadcast or multicast address"),
        ("224.0.0.1:80", "a broadcast or multicast address"),
    ] {
        let text = route("a", "127.0.0.1:7000", &format!("\"{backend}\""));
        rejects(
            &text,
            "4:12",
            &format!("backend {backend:?} is not one host's address"),
        );
        rejects(&text, "4:12", what);
    }
    for ok in [
        route("a", "0.0.0.0:7000", "\"10.0.0.1:7000\""),
        // sluice's IPv6 listeners are IPV6_V6ONLY: a wildcard of one family
        // does not take the other's loopback.
        route("a", "[::]:7000", "\"127.0.0.1:7000\""),
        route("a", "0.0.0.0:7000", "\"[::1]:7000\""),
        format!(
            "{}[[route]]\nname = \"f\"\nlisten = \"127.0.0.1:7001\"\nfile = \"banner.bin\"\n",
            route("a", "127.0.0.1:7000", "\"127.0.0.1:7001\"")
        ),
    ] {
        accepts(&ok);
    }
}

/// Values `check` once accepted that crashed the process: durations that
/// overflow a deadline (`now + timeout`), buffers too large to allocate,
/// a send_chunk so small the worker spins in syscalls. Each bound is
/// reported at the value.
#[test]
fn values_past_their_bounds() {
    rejects(
        &format!("[global]\nshutdown_timeout = \"8d\"\n{PROXY}"),
        "2:20",
        "shutdown_timeout of 691200s is too long: expected at most 7d (604800s)",
    );
    rejects(
        &format!("{PROXY}connect_timeout = \"9300000000000000000s\"\n"),
        "5:19",
        "connect_timeout of 9300000000000000000s is too long: expected at most 7d",
    );
    rejects(
        &format!("{PROXY}idle_timeout = \"7d1s\"\n"),
        "5:16",
        "idle_timeout of 604801s is too long: expected at most 7d",
    );
    // A value just past the bound shows what is past it.
    rejects(
        &format!("{PROXY}idle_timeout = \"7d1ns\"\n"),
        "5:16",
        "idle_timeout of 604800.000000001s is too long: expected at most 7d",
    );
    rejects(
        &format!("{FILE}idle_timeout = \"8d\"\n"),
        "5:16",
        "idle_timeout of 691200s is too long",
    );
    rejects(
        &format!("{ROOT}header_timeout = \"1000d\"\n"),
        "5:18",
        "header_timeout of 86400000s is too long",
    );
    rejects(
        &format!("{PROXY}[route.health]\ninterval = \"8d\"\n"),
        "6:12",
        "interval of 691200s is too long",
    );
    rejects(
        &format!("{PROXY}[route.health]\ntimeout = \"8d\"\n"),
        "6:11",
        "timeout of 691200s is too long",
    );
    rejects(
        &format!("{PROXY}buffer_size = \"64TiB\"\n"),
        "5:15",
        "buffer_size 64TiB is too large: expected at most 64MiB",
    );
    rejects(
        &format!("{FILE}strategy = \"copy\"\nbuffer_size = \"65MiB\"\n"),
        "6:15",
        "buffer_size 65MiB is too large: expected at most 64MiB",
    );
    rejects(
        &format!("{FILE}send_chunk = 4095\n"),
        "5:14",
        "send_chunk 4095 is too small: expected at least 4KiB",
    );
    rejects(
        &format!("{ROOT}send_chunk = \"1\"\n"),
        "5:14",
        "send_chunk 1 is too small: expected at least 4KiB",
    );
    rejects(
        &format!("{FILE}send_chunk = \"2GiB\"\n"),
        "5:14",
        "send_chunk 2GiB is too large: expected at most 1GiB",
    );
    rejects(
        &format!("{PROXY}pipe_size = \"2GiB\"\n"),
        "5:13",
        "pipe_size 2GiB is too large: expected at most 1GiB",
    );
}

/// Every bound itself is accepted.
#[test]
fn values_at_their_bounds_pass() {
    let text = format!(
        "[global]\nshutdown_timeout = \"7d\"\n\n{PROXY}connect_timeout = \"7d\"\nidle_timeout = \"604800s\"\n\
         header_timeout = \"7d\"\nbuffer_size = \"64MiB\"\npipe_size = \"1GiB\"\n\
         [route.health]\ninterval = \"7d\"\ntimeout = \"7d\"\n\n\
         {FILE}send_chunk = \"4KiB\"\nidle_timeout = \"7d\"\n\n{ROOT}send_chunk = \"1GiB\"\n"
    );
    let stdout = accepts(&text);
    assert!(
        stdout.contains("ok: 3 routes (1 proxy, 2 file)"),
        "{stdout}"
    );
}
