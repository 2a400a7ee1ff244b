//! Graceful stop through the real binary: SIGTERM stops accepting, lets a
//! long transfer finish byte-exact while /healthz says 503, and exits 0;
//! `shutdown_timeout` closes what is left; a second signal exits at once.
//! A panic on any thread takes the whole process down (logged first), so
//! a service manager restarts it.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::admin::{get, scrape, scrape_until};
use common::*;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn config(port: u16, aport: u16, backend: SocketAddr, timeout: &str) -> String {
    format!(
        "[global]\nworkers = 2\nshutdown_timeout = \"{timeout}\"\n\n[admin]\nlisten = \"127.0.0.1:{aport}\"\n\n\
         [[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\nbackends = \"{backend}\"\n"
    )
}

/// Wait until connecting to `a` is refused by the kernel.
fn wait_refused(a: SocketAddr) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect_timeout(&a, Duration::from_secs(1)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            Ok(mut s) => {
                // Queued in the backlog just before the socket closed: it
                // must never be served.
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut b = [0u8; 1];
                assert!(
                    !matches!(s.read(&mut b), Ok(1)),
                    "a connection made during the drain was served"
                );
            }
            Err(_) => {}
        }
        assert!(Instant::now() < end, "{a} still accepts during the drain");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn drain_lets_a_long_transfer_finish_then_exits() {
    const LEN: u64 = 48 << 20;
    let go = Arc::new(AtomicBool::new(false));
    let g2 = go.clone();
    // Sends LEN bytes once told to, then closes.
    let b = Backend::spawn(move |mut s| {
        while !g2.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(5));
        }
        let d = send_data(&mut s, 3, LEN);
        let _ = s.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        d.len.to_string()
    });
    let (port, aport) = (free_port(), free_port());
    let mut sl = Sluice::start("drain-long", &config(port, aport, b.addr, "60s"));
    assert_eq!(get(addr(aport), "/healthz").status, 200);
    let c = connect(addr(port));
    let end = Instant::now() + Duration::from_secs(10);
    while b.accepted() == 0 {
        assert!(Instant::now() < end, "backend never connected");
        thread::sleep(Duration::from_millis(5));
    }

    sl.signal("TERM");
    sl.wait_log("stopping", Duration::from_secs(10));
    let h = get(addr(aport), "/healthz");
    assert_eq!((h.status, h.body.as_str()), (503, "draining\n"));
    assert_eq!(scrape(addr(aport)).get("sluice_draining", &[]), 1.0);
    wait_refused(addr(port));

    // Now the transfer runs, during the drain, and completes.
    go.store(true, Ordering::SeqCst);
    let reader = thread::spawn(move || {
        let mut c = c;
        let got = recv_data(&mut c);
        let _ = c.shutdown(Shutdown::Write);
        got
    });
    // The admin listener keeps answering while bytes flow.
    assert_eq!(get(addr(aport), "/healthz").status, 503);
    let got = reader.join().unwrap();
    assert_eq!(got, send_data(&mut std::io::sink(), 3, LEN), "byte-exact");
    let st = sl
        .wait_exit(Duration::from_secs(30))
        .expect("exits after the drain");
    assert_eq!(st.code(), Some(0));
    assert_eq!(sl.count_log("all connections finished"), 1);
    let a = sl.access();
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0]["bytes_out"], LEN.to_string());
    assert_eq!(a[0]["end"], "backend_closed");
}

#[test]
fn shutdown_timeout_closes_what_is_left() {
    let b = Backend::named("b");
    let (port, aport) = (free_port(), free_port());
    let mut sl = Sluice::start("drain-timeout", &config(port, aport, b.addr, "300ms"));
    let mut idle: Vec<TcpStream> = (0..3).map(|_| connect(addr(port))).collect();
    for c in &mut idle {
        assert_eq!(read_line(c), "b");
    }
    let t0 = Instant::now();
    sl.signal("TERM");
    let st = sl.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(st.code(), Some(0));
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "waited for the timeout"
    );
    for c in &mut idle {
        let mut buf = [0u8; 16];
        // Closed (reset): never left hanging.
        assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)));
    }
    let a = sl.access();
    assert_eq!(a.len(), 3);
    assert!(a.iter().all(|l| l["end"] == "shutdown"), "{a:?}");
}

/// A stop that runs out of time cuts an upload: the backend is reset,
/// not sent a FIN that would make the cut upload look whole.
#[test]
fn shutdown_timeout_resets_the_backend_of_a_cut_upload() {
    let b = Backend::reader();
    let (port, aport) = (free_port(), free_port());
    let mut sl = Sluice::start("drain-cut-upload", &config(port, aport, b.addr, "300ms"));
    let mut c = connect(addr(port));
    c.write_all(&[7u8; 1000]).unwrap();
    // Sluice has relayed the bytes before the stop.
    scrape_until(addr(aport), "1000 bytes relayed", |m| {
        m.get("sluice_route_bytes_in_total", &[("route", "r")]) == 1000.0
    });
    sl.signal("TERM");
    let backend = b.wait_results(1, Duration::from_secs(10));
    let (_, client_how) = read_until_end(&mut c);
    sl.wait_exit(Duration::from_secs(10)).expect("exits");
    let a = sl.access();
    assert_eq!(
        (
            backend[0].as_str(),
            client_how.as_str(),
            a[0]["end"].as_str()
        ),
        ("1000 ConnectionReset", "ConnectionReset", "shutdown")
    );
}

#[test]
fn a_second_signal_exits_at_once() {
    let b = Backend::named("b");
    let (port, aport) = (free_port(), free_port());
    let mut sl = Sluice::start("drain-twice", &config(port, aport, b.addr, "1h"));
    let mut c = connect(addr(port));
    assert_eq!(read_line(&mut c), "b");
    sl.signal("TERM");
    sl.wait_log("stopping", Duration::from_secs(10));
    assert!(
        sl.wait_exit(Duration::from_millis(500)).is_none(),
        "still draining"
    );
    sl.signal("INT");
    let st = sl
        .wait_exit(Duration::from_secs(10))
        .expect("exits at once");
    assert_eq!(st.code(), Some(0));
    assert_eq!(sl.count_log("second stop signal"), 1);
    // The connection cut by the exit is reset, never closed with a FIN
    // that would make a cut stream look complete, and it is logged.
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (rest, how) = read_to_end_how(&mut c);
    assert_eq!(
        (rest.len(), how),
        (0, Some(std::io::ErrorKind::ConnectionReset))
    );
    let a = sl.access();
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0]["end"], "shutdown");
}

/// A thread that panics (a debug-build failpoint) aborts the process,
/// with the panic logged at error level and the standard message kept;
/// without the hook, the process would run on with the thread gone.
#[test]
fn a_panicking_thread_aborts_the_process() {
    use std::os::unix::process::ExitStatusExt;
    let dir = temp_dir("panic-abort");
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[global]\nworkers = 1\n\n[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{}\"\nbackends = \"127.0.0.1:1\"\n",
            free_port()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("SLUICE_FAILPOINT", "panic");
    let mut sl = Sluice::launch(dir, config, cmd);
    let st = sl
        .wait_exit(Duration::from_secs(20))
        .expect("the process must end after a thread panics");
    assert_eq!(st.signal(), Some(6), "aborted (SIGABRT): {st}");
    let logs = sl.logs();
    let error = logs
        .iter()
        .find(|l| l.contains("ERROR") && l.contains("failpoint: SLUICE_FAILPOINT=panic"))
        .unwrap_or_else(|| panic!("no error line:\n{}", logs.join("\n")));
    assert!(
        error.contains("thread 'failpoint'") && error.contains("aborting"),
        "{error}"
    );
    // The standard hook's message is still there.
    assert!(
        logs.iter()
            .any(|l| l.starts_with("thread 'failpoint'") && l.contains("panicked at")),
        "{}",
        logs.join("\n")
    );
}
