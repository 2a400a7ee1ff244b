//! systemd integration through the real binary: socket activation under
//! `systemd-socket-activate` (the listener comes from systemd, and a
//! client that connected before sluice ran is served), and the unit files
//! checked by `systemd-analyze verify` (systemd/verify).

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::*;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn socket_activation_takes_listeners_from_systemd() {
    if !have("systemd-socket-activate") {
        eprintln!("systemd-socket-activate not installed (apt-get install systemd): skipped");
        return;
    }
    let b = Backend::named("b");
    // Route "r" listens on three addresses; systemd passes two of them
    // (both named "r": matched by name and address) and a socket under a
    // name no route has.
    let (passed, passed2, own, stray) = (free_port(), free_port(), free_port(), free_port());
    let dir = temp_dir("activate");
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[[route]]\nname = \"r\"\nlisten = [\"127.0.0.1:{passed}\", \"127.0.0.1:{passed2}\", \"127.0.0.1:{own}\"]\nbackends = \"{}\"\n",
            b.addr
        ),
    )
    .unwrap();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("-l")
        .arg(format!("127.0.0.1:{passed}"))
        .arg("-l")
        .arg(format!("127.0.0.1:{stray}"))
        .arg("-l")
        .arg(format!("127.0.0.1:{passed2}"))
        .arg("--fdname=r:stray:r")
        .arg("-E")
        .arg("RUST_LOG=info")
        .arg(BIN)
        .arg("run")
        .arg("--config")
        .arg(&config);
    let mut sl = Sluice::launch(dir, config, cmd);
    sl.wait_log(
        &format!("Listening on 127.0.0.1:{stray}"),
        Duration::from_secs(10),
    );
    assert_eq!(
        sl.count_log("sluice 0.1.0 started"),
        0,
        "not started before a client"
    );

    // This client connects and sends before sluice even runs: systemd
    // holds it in the socket's backlog and starts sluice for it.
    let mut c = connect(addr(passed));
    c.write_all(b"early bytes\n").unwrap();
    sl.wait_started();
    assert_eq!(read_line(&mut c), "b", "the early client is served");
    assert_eq!(
        read_line(&mut c),
        "early bytes",
        "and its early bytes arrive"
    );
    let from_systemd =
        format!("route r: listening on 127.0.0.1:{passed} with a socket from systemd (fd 3)");
    assert_eq!(sl.count_log(&from_systemd), 1, "{:?}", sl.logs());
    let second =
        format!("route r: listening on 127.0.0.1:{passed2} with a socket from systemd (fd 5)");
    assert_eq!(sl.count_log(&second), 1, "{:?}", sl.logs());
    assert_eq!(sl.count_log("with a socket from systemd"), 2);
    let mut c2 = connect(addr(passed2));
    assert_eq!(read_line(&mut c2), "b");
    drop(c2);
    let (sent, got) = exchange(c, 5, 1 << 20);
    assert_eq!(sent, got);

    // The address systemd did not pass is bound by sluice itself.
    let mut c = connect(addr(own));
    assert_eq!(read_line(&mut c), "b");
    drop(c);
    // The stray socket was refused by name, logged and closed.
    let warn = sl.wait_log("named \"stray\"", Duration::from_secs(5));
    assert!(
        warn.contains("WARN") && warn.contains(&format!("127.0.0.1:{stray}")),
        "{warn}"
    );
    let r = TcpStream::connect_timeout(&addr(stray), Duration::from_secs(2));
    assert!(r.is_err(), "the stray socket is closed: {r:?}");

    // A reload that drops a systemd socket from the route, then one that
    // brings it back: the socket stays sluice's (as systemd keeps it
    // open), so a client that connected in between is served after.
    let cfg = |listen: &[u16]| {
        let l: Vec<String> = listen
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect();
        format!(
            "[[route]]\nname = \"r\"\nlisten = [{}]\nbackends = \"{}\"\n",
            l.join(", "),
            b.addr
        )
    };
    std::fs::write(&sl.config, cfg(&[passed, own])).unwrap();
    sl.signal("HUP");
    sl.wait_log("reload ok: generation 2", Duration::from_secs(10));
    let mut waiting = connect(addr(passed2));
    std::fs::write(&sl.config, cfg(&[passed, passed2, own])).unwrap();
    sl.signal("HUP");
    sl.wait_log("reload ok: generation 3", Duration::from_secs(10));
    assert_eq!(
        read_line(&mut waiting),
        "b",
        "queued client served after the route came back"
    );
    drop(waiting);

    // Stop sluice (a child of systemd-socket-activate) gracefully.
    sl.signal("TERM");
    sl.wait_log("all connections finished", Duration::from_secs(10));
    // systemd-socket-activate waits for sluice and exits with its status.
    let st = sl.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(st.code(), Some(0));
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        eprintln!("systemd-analyze not installed (apt-get install systemd): skipped");
        return;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/verify");
    let out = Command::new(&script)
        .env("SLUICE_BIN", BIN)
        .output()
        .expect("run systemd/verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("sluice.service and sluice.socket ok"),
        "{text}"
    );
}

#[test]
fn passed_descriptors_that_are_not_listeners_are_refused() {
    let b = Backend::named("b");
    let port = free_port();
    let dir = temp_dir("activate-bad");
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\nbackends = \"{}\"\n",
            b.addr
        ),
    )
    .unwrap();
    let not_a_socket = write_file(&dir, "plain.txt", b"not a socket");
    // fd 3 is a regular file, announced as route r's socket, with the
    // right LISTEN_PID (the shell execs sluice in its own process).
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(
            "exec 3<\"$2\"; export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=r; \
             exec \"$0\" run --config \"$1\"",
        )
        .arg(BIN)
        .arg(&config)
        .arg(&not_a_socket)
        .env("RUST_LOG", "info");
    let mut sl = Sluice::launch(dir, config, cmd);
    sl.wait_started();
    let warn = sl.wait_log("fd 3 (\"r\") is not usable", Duration::from_secs(5));
    assert!(
        warn.contains("is not usable: not a socket; closing it"),
        "{warn}"
    );
    assert_eq!(sl.count_log("with a socket from systemd"), 0);
    // The route binds its address itself and serves.
    let mut c = connect(addr(port));
    assert_eq!(read_line(&mut c), "b");

    // LISTEN_PID naming another process: the variables are ignored.
    let port = free_port();
    let dir = temp_dir("activate-otherpid");
    let mut sl = Sluice::start_in(
        dir,
        &format!(
            "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\nbackends = \"{}\"\n",
            b.addr
        ),
        &[
            ("LISTEN_PID", "1"),
            ("LISTEN_FDS", "1"),
            ("LISTEN_FDNAMES", "r"),
        ],
    );
    let mut c = connect(addr(port));
    assert_eq!(read_line(&mut c), "b");
    assert_eq!(sl.count_log("socket activation"), 0, "{:?}", sl.logs());
    assert_eq!(sl.count_log("with a socket from systemd"), 0);
    drop(c);
    sl.signal("TERM");
    assert_eq!(
        sl.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()),
        Some(0)
    );
}
