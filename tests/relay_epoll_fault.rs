//! Relay tests that inject a kernel fault by counting syscalls (strace
//! `when=`, attached to the one worker thread): in a file of their own,
//! so their test binary runs alone and no other test's load reorders the
//! calls they count.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use common::*;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The tests of this file take turns: each counts its own sluice's
/// calls, which another test's load can reorder.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn proxy_config(port: u16, backends: &[String], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "[global]\nlog_level = \"info\"\n\n[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\nbackends = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// One worker (so one thread to trace) relaying route "r" on `port` to
/// `b`, with the admin endpoint on `aport`.
fn one_worker(port: u16, aport: u16, b: &Backend, extra: &str) -> String {
    format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n",
        proxy_config(port, &[b.addr.to_string()], extra)
    )
    .replacen("[global]\n", "[global]\nworkers = 1\n", 1)
}

/// When the kernel refuses to watch a socket again (epoll_ctl fails after
/// sluice stopped watching it for readable), the connection could wait
/// forever: sluice must end it, reset both peers (both streams are cut),
/// say why, and go on serving. The failure is real: a download stalls on
/// a client with a small window, so the pipe fills and sluice stops
/// watching the backend for readable; then strace is attached to the
/// worker thread and fails one epoll_ctl with ENOMEM, and the client
/// reads until the backend runs dry, so the worker watches it again. Which call comes first
/// once the client reads can differ (the client's own interests may
/// change before), so the strace log says which call failed, and the
/// attempt is repeated (aiming at the first to third call) if it was not
/// that re-watch.
#[test]
fn a_socket_that_cannot_be_watched_again_ends_its_connection() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // First more than the kernel will ever buffer between sluice and the
    // client (a send buffer grows up to net.ipv4.tcp_wmem's 4 MiB; on
    // loopback a fresh one can start above 1 MiB, more when the kernel's
    // cached TCP metrics for 127.0.0.1 say the path reorders), so the pipe
    // fills and waits for the client whatever the buffers; then a trickle,
    // so once the client reads, the backend runs dry and must be watched
    // again.
    let (burst, trickle) = (8 << 20, 512 * 1024);
    let len = burst + trickle;
    let b = Backend::spawn_on(small_mss_listener(), move |mut s| {
        s.set_nodelay(true).unwrap();
        let chunk = [1u8; 2048];
        for i in 0..len / chunk.len() {
            if s.write_all(&chunk).is_err() {
                return "cut".to_string();
            }
            if i * chunk.len() >= burst {
                thread::sleep(Duration::from_millis(1));
            }
        }
        "done".to_string()
    });
    let whens = [1, 2, 1, 3, 2, 1, 2, 3, 1, 2];
    for (attempt, when) in whens.into_iter().enumerate() {
        let (port, aport) = (free_port(), free_port());
        let sl = Sluice::start(
            &format!("unwatchable-{attempt}"),
            &one_worker(
                port,
                aport,
                &b,
                "strategy = \"splice\"\npipe_size = \"64KiB\"",
            ),
        );
        let mut c = small_window_client(port);
        thread::sleep(Duration::from_millis(500));
        let strace = ThreadTrace::attach(
            &sl,
            0,
            "epoll_ctl",
            &format!("epoll_ctl:error=ENOMEM:when={when}"),
        );
        let (got, how) = read_until_end(&mut c);
        drop(c);
        sl.wait_access(1, Duration::from_secs(10));
        // The worker goes on: the next connection gets everything.
        let mut c = connect(addr(port));
        let (next, next_how) = read_until_end(&mut c);
        drop(c);
        let a = sl.wait_access(2, Duration::from_secs(10));
        let text = strace.finish();
        let logs = sl.logs();
        drop(sl);
        let injected = text.lines().find(|l| l.contains("INJECTED")).unwrap_or("");
        let rewatch = injected.contains("EPOLL_CTL_MOD")
            && injected.contains("EPOLLIN")
            && injected.contains("u32=1,");
        if !rewatch || a[0]["end"] != "backend_error" {
            eprintln!(
                "attempt {attempt}: the failed call was not the stalled download's \
                 re-watch: {injected:?}, ends {:?} / {:?}",
                a[0]["end"], a[1]["end"]
            );
            continue;
        }
        assert_eq!(
            (next.len(), next.iter().all(|&b| b == 1), next_how.as_str()),
            (len, true, "eof"),
            "the next connection gets everything"
        );
        // Cut short, and the client is told so by a reset, not a FIN that
        // would make the cut stream look complete.
        assert_eq!(how, "ConnectionReset", "after {} bytes", got.len());
        let out: usize = a[0]["bytes_out"].parse().unwrap();
        assert!(
            got.len() <= out && out < len,
            "{} read, {out} sent of {len}",
            got.len()
        );
        assert!(
            logs.iter()
                .any(|l| l.contains("cannot watch the Backend socket")),
            "{logs:?}"
        );
        assert_eq!(a[1]["end"], "backend_closed", "{:?}", a[1]);
        return;
    }
    panic!(
        "in {} attempts the injected failure never hit the re-watch",
        whens.len()
    );
}

/// epoll refuses a new backend socket (ENOSPC: past
/// fs.epoll.max_user_watches; injected by strace, attached to the worker
/// thread alone, into its second epoll_ctl: the first client's, then its
/// backend's): that is this machine's limit, not the backend's fault. The
/// client is closed (end=connect_failed), the backend gets no failure
/// against it, and the next client is served by it. Before, the failure
/// counted against the backend and, repeated `fall` times, took a healthy
/// one out.
#[test]
fn a_backend_socket_epoll_refuses_is_not_held_against_the_backend() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let b = Backend::named("b");
    let (port, aport) = (free_port(), free_port());
    let sl = Sluice::start("epoll-enospc", &one_worker(port, aport, &b, ""));
    let strace = ThreadTrace::attach(&sl, 0, "epoll_ctl", "epoll_ctl:error=ENOSPC:when=2");
    let mut c = connect(addr(port));
    assert_eq!(
        read_to_close(&mut c),
        b"",
        "the first client is closed unserved"
    );
    let a = sl.wait_access(1, Duration::from_secs(10));
    assert_eq!(a[0]["end"], "connect_failed", "{:?}", a[0]);
    let mut c = connect(addr(port));
    assert_eq!(read_line(&mut c), "b", "the next client is served");
    let text = strace.finish();
    let injected = text.lines().find(|l| l.contains("INJECTED")).unwrap_or("");
    assert!(
        injected.contains("EPOLL_CTL_ADD") && injected.contains("u32=1,"),
        "the fault hit another call: {injected:?}"
    );
    let m = common::admin::scrape(addr(aport));
    let ab = b.addr.to_string();
    let labels = [
        ("route", "r"),
        ("backend", ab.as_str()),
        ("address", ab.as_str()),
    ];
    assert_eq!(
        (
            m.get("sluice_backend_connect_failures_total", &labels),
            m.get("sluice_backend_up", &labels)
        ),
        (0.0, 1.0)
    );
    let logs = sl.logs();
    assert!(
        logs.iter()
            .any(|l| l.contains("cannot open a socket to a backend") && l.contains("No space")),
        "{logs:?}"
    );
    // The worker names what ran out, and rests its listeners a moment.
    assert!(
        logs.iter().any(|l| l.contains(
            "worker 0: out of epoll watches (fs.epoll.max_user_watches); pausing accepts"
        )) && !logs.iter().any(|l| l.contains("out of file descriptors")),
        "{logs:?}"
    );
}

/// A splice from a socket that says ENOMEM (the kernel short of memory
/// for a moment) loses nothing. strace makes the worker thread's first
/// two splice calls fail with ENOMEM; both are reads from the backend
/// into an empty pipe (the client sends nothing, and nothing is written
/// before it was read). Each time that chunk is copied through a buffer
/// and the next one is spliced again: the client gets every byte and then
/// the FIN, the access line says `fallback=memory` with bytes both
/// spliced and copied, and the metric counts one connection. Before, the
/// first ENOMEM ended the connection with a read error.
#[test]
fn a_splice_short_of_memory_copies_that_chunk_and_loses_nothing() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let data: Vec<u8> = (0..4usize << 20).map(|i| (i * 7 % 251) as u8).collect();
    let want = digest_of(&data);
    let b = Backend::spawn(move |mut s| {
        if s.write_all(&data).is_err() {
            return "cut".to_string();
        }
        "sent".to_string()
    });
    let (port, aport) = (free_port(), free_port());
    let sl = Sluice::start(
        "splice-enomem",
        &one_worker(port, aport, &b, "strategy = \"splice\""),
    );
    let strace = ThreadTrace::attach(&sl, 0, "splice", "splice:error=ENOMEM:when=1..2");
    let mut c = connect(addr(port));
    let got = read_to_close(&mut c);
    assert_eq!((got.len(), digest_of(&got)), (4 << 20, want));
    drop(c);
    let a = sl.wait_access(1, Duration::from_secs(10));
    let text = strace.finish();
    let injected: Vec<&str> = text.lines().filter(|l| l.contains("INJECTED")).collect();
    assert_eq!(injected.len(), 2, "{text}");
    let (spliced, copied): (u64, u64) = (
        a[0]["spliced"].parse().unwrap(),
        a[0]["copied"].parse().unwrap(),
    );
    assert_eq!(
        (
            a[0]["end"].as_str(),
            a[0]["fallback"].as_str(),
            a[0]["bytes_out"].as_str()
        ),
        ("backend_closed", "memory", "4194304"),
        "{:?}",
        a[0]
    );
    assert!(
        spliced > 0 && copied > 0 && spliced + copied == 4 << 20,
        "{:?}",
        a[0]
    );
    let m = common::admin::scrape(addr(aport));
    assert_eq!(
        m.get(
            "sluice_route_splice_fallbacks_total",
            &[("route", "r"), ("reason", "memory")]
        ),
        1.0
    );
}
