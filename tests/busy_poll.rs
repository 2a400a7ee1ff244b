//! `busy_poll` through the real binary: with it set (here by a reload),
//! the worker stays awake through short gaps between events instead of
//! sleeping in each, and once traffic stops it sleeps again rather than
//! spin. Seen from outside: the worker thread's voluntary context
//! switches (/proc/PID/task/TID/status), which grow only when it blocks,
//! and the process's CPU time while idle. Every exchange checks the
//! bytes echoed back.
//!
//! A file of its own, its tests one at a time (`ONE_AT_A_TIME`): the
//! test binary then runs alone, so the gaps it leaves are the gaps sluice
//! sees.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use common::*;

/// The tests of this file take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

const EXCHANGES: usize = 40;
const GAP: Duration = Duration::from_millis(2);

fn config(port: u16, backend: SocketAddr, busy_poll: &str) -> String {
    format!(
        "[global]\nbusy_poll = \"{busy_poll}\"\n\n[[route]]\nname = \"r\"\n\
         listen = \"127.0.0.1:{port}\"\nbackends = [\"{backend}\"]\n"
    )
}

/// CPU time of worker 0 so far, in clock ticks (utime + stime).
fn worker_ticks(sl: &Sluice) -> u64 {
    let stat = std::fs::read_to_string(worker_task(sl.pid(), 0).join("stat")).unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// One connection through the proxy: `n` small echoes, `gap` apart;
/// returns how often worker 0 slept meanwhile.
fn spaced_exchanges(sl: &Sluice, port: u16, n: usize, gap: Duration) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_nodelay(true).unwrap();
    assert_eq!(read_line(&mut s), "b");
    let before = worker_sleeps(sl.pid(), 0);
    for i in 0..n {
        let msg = format!("exchange {i:04}\n");
        s.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg.as_bytes(), "echo {i}");
        thread::sleep(gap);
    }
    worker_sleeps(sl.pid(), 0) - before
}

#[test]
fn busy_poll_keeps_the_worker_awake_through_short_gaps_then_sleeps() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let b = Backend::named("b");
    let port = free_port();
    let mut sl = Sluice::start("busy-poll", &config(port, b.addr, "0"));

    // Off: every gap, and every wait for the backend's echo, is a sleep.
    let off = spaced_exchanges(&sl, port, EXCHANGES, GAP);
    assert!(
        off >= EXCHANGES as u64,
        "with busy_poll off the worker slept only {off} times in {EXCHANGES} spaced exchanges"
    );

    std::fs::write(&sl.config, config(port, b.addr, "10ms")).unwrap();
    sl.signal("HUP");
    sl.wait_log("reload ok: generation 2", Duration::from_secs(10));

    // On, with a window five times the gap: the worker stays awake. A
    // few sleeps are allowed for a gap stretched by the scheduler.
    let on = spaced_exchanges(&sl, port, EXCHANGES, GAP);
    assert!(
        on <= EXCHANGES as u64 / 4,
        "with busy_poll = 10ms the worker slept {on} times in {EXCHANGES} exchanges {GAP:?} apart \
         (off: {off})"
    );

    // Idle again: the window is at most 10 ms, so from 200 ms on the worker must be asleep, not spinning: over the next
    // half second it may use a tick or two, where a spinning one uses
    // most of 50 (clock ticks, 10 ms at the usual 100 Hz).
    thread::sleep(Duration::from_millis(200));
    let (ticks, sleeps) = (worker_ticks(&sl), worker_sleeps(sl.pid(), 0));
    thread::sleep(Duration::from_millis(500));
    let used = worker_ticks(&sl) - ticks;
    assert!(
        used <= 5,
        "idle for 500 ms with busy_poll = 10ms, the worker used {used} ticks of CPU"
    );
    let woke = worker_sleeps(sl.pid(), 0) - sleeps;
    assert!(woke <= 1, "an idle worker woke up {woke} times");
}

#[test]
fn busy_poll_stops_polling_when_the_gaps_outlast_it() {
    // Gaps longer than busy_poll: no window would save a sleep there. The
    // window learns only the backend's answer (well under a millisecond),
    // so the worker polls about that long in each gap, then sleeps; it
    // used to spin the whole 10 ms after every event (300 ms of CPU, 30
    // ticks at 100 Hz, here), then a quarter of it (7 ticks).
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const N: usize = 30;
    let b = Backend::named("b");
    let port = free_port();
    let sl = Sluice::start("busy-poll-long", &config(port, b.addr, "10ms"));
    let ticks = worker_ticks(&sl);
    let slept = spaced_exchanges(&sl, port, N, Duration::from_millis(25));
    let used = worker_ticks(&sl) - ticks;
    assert!(
        slept >= N as u64,
        "with gaps of 25 ms, longer than busy_poll = 10ms, the worker slept only {slept} times \
         in {N} exchanges"
    );
    assert!(
        used <= 4,
        "{N} exchanges 25 ms apart with busy_poll = 10ms used {used} ticks of worker CPU"
    );
}
