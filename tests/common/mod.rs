//! Test harness shared by the integration tests: start the real `sluice`
//! binary on a config the test writes, read its log, and run real TCP
//! peers (backends, clients) on loopback. Nothing here mocks the kernel.
#![allow(dead_code)]

pub mod admin;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// A fresh, empty directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "sluice-test-{}-{}-{}",
        name,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A loopback port nobody listens on right now, for sluice to listen on.
///
/// Taken below the kernel's ephemeral range (32768-60999 by default), so
/// no listener a test binds to port 0 and no outgoing connection can take
/// it between this call and sluice's bind, and counted up per process, so
/// two calls never return the same port (the kernel would happily hand a
/// just-freed ephemeral port out twice).
pub fn free_port() -> u16 {
    const LOW: u16 = 20000;
    const HIGH: u16 = 32000;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    // Start each test binary somewhere else, so a port a previous binary's
    // sluice left in TIME_WAIT is not the first one tried.
    let base = (std::process::id() as usize * 7919) % (HIGH - LOW) as usize;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            n < (HIGH - LOW) as usize,
            "no free port left in {LOW}..{HIGH}"
        );
        let port = LOW + ((base + n) % (HIGH - LOW) as usize) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A running sluice process and everything it printed.
pub struct Sluice {
    child: Child,
    pub dir: PathBuf,
    pub config: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    pid: u32,
}

impl Sluice {
    /// Write `toml` to a new dir and start `sluice run` on it; wait until
    /// it says it started (panics with its log if it exits instead).
    pub fn start(name: &str, toml: &str) -> Sluice {
        let dir = temp_dir(name);
        Self::start_in(dir, toml, &[])
    }

    pub fn start_in(dir: PathBuf, toml: &str, env: &[(&str, &str)]) -> Sluice {
        Self::spawn::<&str>(dir, toml, env, &[])
    }

    /// Start sluice under a wrapper command, e.g. `["prlimit",
    /// "--nofile=64:64", "--"]` to run it with few file descriptors.
    pub fn start_wrapped<S: AsRef<OsStr>>(name: &str, toml: &str, wrapper: &[S]) -> Sluice {
        Self::spawn(temp_dir(name), toml, &[], wrapper)
    }

    /// `start_wrapped` in a directory the test prepared (files the config
    /// names must exist before sluice reads it); no wrapper is fine too.
    pub fn start_wrapped_in<S: AsRef<OsStr>>(dir: PathBuf, toml: &str, wrapper: &[S]) -> Sluice {
        Self::spawn(dir, toml, &[], wrapper)
    }

    fn spawn<S: AsRef<OsStr>>(
        dir: PathBuf,
        toml: &str,
        env: &[(&str, &str)],
        wrapper: &[S],
    ) -> Sluice {
        let config = dir.join("sluice.toml");
        std::fs::write(&config, toml).unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args.iter().map(AsRef::as_ref)).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut s = Self::launch(dir, config, cmd);
        s.wait_started();
        s
    }

    /// Run `cmd` (which runs sluice on `config`, perhaps through a
    /// wrapper such as systemd-socket-activate) and collect its stderr;
    /// does not wait for anything.
    pub fn launch(dir: PathBuf, config: PathBuf, mut cmd: Command) -> Sluice {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn sluice");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l2 = log.clone();
        let reader = thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("SLUICE_TEST_ECHO").is_some() {
                    eprintln!("sluice| {line}");
                }
                l2.lock().unwrap().push(line);
            }
        });
        Sluice {
            child,
            dir,
            config,
            log,
            reader: Some(reader),
            pid: 0,
        }
    }

    /// The process the harness spawned (sluice itself, without a wrapper),
    /// before it said it started.
    pub fn child_pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for sluice's "started (pid N)" line and remember N (the
    /// process a wrapper such as systemd-socket-activate started).
    pub fn wait_started(&mut self) {
        let line = self.wait_log("started (pid ", Duration::from_secs(10));
        let tail = &line[line.find("started (pid ").unwrap() + 13..];
        self.pid = tail[..tail.find(')').unwrap()].parse().unwrap();
    }

    /// For a sluice launched without a wrapper and too quiet to say it
    /// started: its process id is the child's. Waits for `port` to accept.
    pub fn wait_listening(&mut self, port: u16) {
        self.pid = self.child.id();
        let end = Instant::now() + Duration::from_secs(10);
        let a = SocketAddr::from(([127, 0, 0, 1], port));
        while TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_err() {
            assert!(Instant::now() < end, "sluice never listened on {a}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The sluice process id (not the wrapper's, when there is one).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// CPU time (user + system, all threads) the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the parenthesised command name; utime and stime
        // are fields 14 and 15 of the whole line, in clock ticks.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        let hz = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(100);
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// Access lines with `end=END`.
    pub fn ends(&self, end: &str) -> usize {
        self.access().iter().filter(|l| l["end"] == end).count()
    }

    /// Wait until `n` access lines say `end=END`; returns all lines.
    pub fn wait_ends(
        &self,
        end: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<HashMap<String, String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let a = self.access();
            if a.iter().filter(|l| l["end"] == end).count() >= n {
                return a;
            }
            if Instant::now() > deadline {
                panic!(
                    "fewer than {n} access lines with end={end}:\n{}",
                    self.logs().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn logs(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Wait for a log line containing `needle`; panics with the log.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            if let Some(l) = self.logs().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                // Everything it printed is in once its stderr closes (the
                // line may have come just before the exit); a grandchild
                // may hold stderr open, so wait a bounded time.
                let until = Instant::now() + Duration::from_secs(2);
                while self.reader.as_ref().is_some_and(|r| !r.is_finished())
                    && Instant::now() < until
                {
                    thread::sleep(Duration::from_millis(10));
                }
                if let Some(l) = self.logs().into_iter().find(|l| l.contains(needle)) {
                    return l;
                }
                panic!(
                    "sluice exited ({st}) before logging {needle:?}:\n{}",
                    self.logs().join("\n")
                );
            }
            if Instant::now() > end {
                panic!(
                    "no log line with {needle:?} within {timeout:?}:\n{}",
                    self.logs().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Count of log lines containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.logs().iter().filter(|l| l.contains(needle)).count()
    }

    /// Access-log lines parsed into key → value.
    pub fn access(&self) -> Vec<HashMap<String, String>> {
        self.logs()
            .iter()
            .filter(|l| l.contains(" access]"))
            .map(|l| parse_kv(&l[l.find(" access]").unwrap() + 8..]))
            .collect()
    }

    /// Wait until at least `n` access lines were logged and return them.
    pub fn wait_access(&self, n: usize, timeout: Duration) -> Vec<HashMap<String, String>> {
        let end = Instant::now() + timeout;
        loop {
            let a = self.access();
            if a.len() >= n {
                return a;
            }
            if Instant::now() > end {
                panic!(
                    "{} access lines, wanted {n}:\n{}",
                    a.len(),
                    self.logs().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: &str) {
        // pid 0 would signal the whole process group, test runner included.
        assert_ne!(self.pid, 0, "signal before sluice said it started");
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid.to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return Some(st);
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if self.pid != 0 && self.pid != self.child.id() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(self.pid.to_string())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("---- sluice log ----\n{}", self.logs().join("\n"));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Parse `k=v k2="v with spaces"` pairs.
pub fn parse_kv(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_string();
        rest = &rest[eq + 1..];
        let val;
        if let Some(r) = rest.strip_prefix('"') {
            let end = r.find('"').unwrap_or(r.len());
            val = r[..end].to_string();
            rest = r.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            val = rest[..end].to_string();
            rest = &rest[end..];
        }
        out.insert(key, val);
        rest = rest.trim_start();
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift64*), fast enough for
/// hundreds of MiB in a test.
pub struct DataGen(u64);

impl DataGen {
    pub fn new(seed: u64) -> Self {
        DataGen(seed | 1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// What one side of a transfer saw: byte count and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest256 {
    pub len: u64,
    pub sha: [u8; 32],
}

/// Send `len` generated bytes (seed) to `w`, returning their digest.
pub fn send_data(w: &mut impl Write, seed: u64, len: u64) -> Digest256 {
    let mut g = DataGen::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        g.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        w.write_all(&buf[..n]).expect("send");
        left -= n as u64;
    }
    Digest256 {
        len,
        sha: h.finalize().into(),
    }
}

/// Read `r` to end of stream, returning the digest of what came.
pub fn recv_data(r: &mut impl Read) -> Digest256 {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut len = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("recv after {len} bytes: {e}"),
        }
    }
    Digest256 {
        len,
        sha: h.finalize().into(),
    }
}

/// Exchange data both ways at once on `s`: send `len` bytes (seed) and
/// shut down writing, while reading to EOF. Returns (sent, received).
pub fn exchange(s: TcpStream, seed: u64, len: u64) -> (Digest256, Digest256) {
    let mut w = s.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let d = send_data(&mut w, seed, len);
        w.shutdown(Shutdown::Write).unwrap();
        d
    });
    let mut r = s;
    let got = recv_data(&mut r);
    (sender.join().unwrap(), got)
}

/// A backend that accepts connections and, for each, runs `f` on its own
/// thread. Returns the address and a handle whose results arrive in order
/// of completion.
pub struct Backend {
    pub addr: SocketAddr,
    results: Arc<Mutex<Vec<String>>>,
    accepted: Arc<AtomicUsize>,
}

impl Backend {
    pub fn spawn<F>(f: F) -> Backend
    where
        F: Fn(TcpStream) -> String + Send + Sync + 'static,
    {
        Self::spawn_on(TcpListener::bind("127.0.0.1:0").unwrap(), f)
    }

    /// Like `spawn`, on a listener the test bound (a chosen port).
    pub fn spawn_on<F>(l: TcpListener, f: F) -> Backend
    where
        F: Fn(TcpStream) -> String + Send + Sync + 'static,
    {
        let addr = l.local_addr().unwrap();
        let results = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (r2, a2) = (results.clone(), accepted.clone());
        let f = Arc::new(f);
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                a2.fetch_add(1, Ordering::SeqCst);
                let (f, r) = (f.clone(), r2.clone());
                thread::spawn(move || {
                    let out = f(s);
                    r.lock().unwrap().push(out);
                });
            }
        });
        Backend {
            addr,
            results,
            accepted,
        }
    }

    /// A backend that sends its `name` and a newline, then echoes.
    pub fn named(name: &'static str) -> Backend {
        Self::from_listener(TcpListener::bind("127.0.0.1:0").unwrap(), name)
    }

    /// `named`, on a listener the test bound.
    pub fn from_listener(l: TcpListener, name: &'static str) -> Backend {
        Backend::spawn_on(l, move |mut s| {
            let _ = s.write_all(format!("{name}\n").as_bytes());
            echo(&mut s);
            name.to_string()
        })
    }

    /// A backend that reads each connection to its end; the result is
    /// "BYTES HOW" (`read_until_end`: "eof" for a FIN, else the error's
    /// kind, "ConnectionReset" for a reset).
    pub fn reader() -> Backend {
        Backend::spawn(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let (got, how) = read_until_end(&mut s);
            format!("{} {how}", got.len())
        })
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn results(&self) -> Vec<String> {
        self.results.lock().unwrap().clone()
    }

    /// Wait for `n` finished connections.
    pub fn wait_results(&self, n: usize, timeout: Duration) -> Vec<String> {
        let end = Instant::now() + timeout;
        loop {
            let r = self.results();
            if r.len() >= n {
                return r;
            }
            assert!(Instant::now() < end, "backend finished {} of {n}", r.len());
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Echo everything read from `s` back to it until EOF or an error.
pub fn echo(s: &mut TcpStream) {
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// The wrapper that runs sluice under strace with a real kernel error
/// injected into one syscall: `strace_fault("splice", "EINVAL")`.
pub fn strace_fault(syscall: &str, errno: &str) -> Vec<String> {
    strace_fault_when(syscall, errno, "1+")
}

/// `strace_fault` on the calls strace's `when=` names (`3`: the third
/// call only; `1+`: every call).
pub fn strace_fault_when(syscall: &str, errno: &str, when: &str) -> Vec<String> {
    require_strace();
    let mut v: Vec<String> = ["strace", "-f", "-o", "/dev/null", "-e"]
        .iter()
        .map(|x| x.to_string())
        .collect();
    v.push(format!("trace={syscall}"));
    v.push("-e".into());
    v.push(format!("inject={syscall}:error={errno}:when={when}"));
    v.push("--".into());
    v
}

/// strace attached to one worker thread of a running sluice (its calls
/// alone are counted, so `when=N` is that thread's Nth call), tracing one
/// syscall and injecting a fault as `-e inject=` takes it (e.g.
/// "epoll_ctl:error=ENOMEM:when=2").
pub struct ThreadTrace {
    child: Child,
    out: PathBuf,
}

impl ThreadTrace {
    /// Attach to worker `worker` of `sl`; returns once strace is attached.
    pub fn attach(sl: &Sluice, worker: usize, syscall: &str, inject: &str) -> ThreadTrace {
        require_strace();
        let task = worker_task(sl.pid(), worker);
        let tid = task.file_name().unwrap().to_str().unwrap().to_string();
        let out = sl.dir.join(format!("strace-{tid}.txt"));
        let mut child = Command::new("strace")
            .args(["-p", &tid, "-e", &format!("trace={syscall}")])
            .args(["-e", &format!("inject={inject}"), "-o"])
            .arg(&out)
            .stderr(Stdio::piped())
            .spawn()
            .expect("strace");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        assert!(
            line.contains("attached"),
            "strace could not attach to the worker thread (it needs ptrace rights over \
             another process: root, or kernel.yama.ptrace_scope=0): {line}"
        );
        ThreadTrace { child, out }
    }

    /// Detach and return what strace wrote.
    pub fn finish(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.out).unwrap()
    }
}

/// Fail the test, not skip it, when strace is missing: `.ci/run`
/// installs it, and the tests that need it check kernel behaviour that
/// nothing else shows.
fn require_strace() {
    if Command::new("strace").arg("-V").output().is_err() {
        panic!("strace is required for this test (.ci/run installs it)");
    }
}

/// A log of the syscalls sluice makes, by strace: start sluice under
/// `wrapper()`, drop it (strace writes its last lines as the process
/// ends), then read `text()`. Lives in its own directory, since sluice's
/// goes away with it.
pub struct Strace {
    dir: PathBuf,
    file: PathBuf,
    trace: String,
    inject: Option<String>,
}

impl Strace {
    /// Trace the comma-separated `syscalls` (e.g. "sendto,splice").
    pub fn new(name: &str, syscalls: &str) -> Strace {
        require_strace();
        let dir = temp_dir(&format!("{name}-trace"));
        let file = dir.join("trace.txt");
        Strace {
            dir,
            file,
            trace: format!("trace={syscalls}"),
            inject: None,
        }
    }

    /// Also inject a fault, as strace's `-e inject=` takes it (e.g.
    /// "epoll_ctl:error=ENOMEM:when=6"); the log marks it "(INJECTED)".
    pub fn inject(mut self, spec: &str) -> Strace {
        self.inject = Some(format!("inject={spec}"));
        self
    }

    /// The command to start sluice under: every thread, strings up to 64
    /// bytes, one line per call.
    pub fn wrapper(&self) -> Vec<String> {
        let file = self.file.to_str().unwrap();
        let mut v: Vec<String> = ["strace", "-f", "-qq", "-s", "64", "-e", &self.trace]
            .iter()
            .map(|x| x.to_string())
            .collect();
        if let Some(i) = &self.inject {
            v.extend(["-e".to_string(), i.clone()]);
        }
        v.extend(["-o", file, "--"].map(String::from));
        v
    }

    /// What strace wrote; the traced sluice must have been dropped.
    pub fn text(self) -> String {
        let text = std::fs::read_to_string(&self.file).unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
        text
    }
}

/// A listener whose accept queue is full: further SYNs are dropped, so a
/// connect to it hangs until the proxy's connect_timeout. Keep all three
/// parts alive as long as the hole is needed.
pub fn blackhole() -> (SocketAddr, Vec<TcpStream>, socket2::Socket) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    s.listen(0).unwrap();
    let a = s.local_addr().unwrap().as_socket().unwrap();
    let mut fill = Vec::new();
    for _ in 0..4 {
        if let Ok(c) = TcpStream::connect_timeout(&a, Duration::from_millis(200)) {
            fill.push(c);
        }
    }
    (a, fill, s)
}

/// A client with a receive buffer of `rcvbuf` bytes, so what a server
/// sends piles up on the server's side as soon as the client stops
/// reading. Reads time out after 60 s.
pub fn small_buffer_client(addr: SocketAddr, rcvbuf: usize) -> TcpStream {
    try_small_buffer_client(addr, rcvbuf).unwrap()
}

/// `small_buffer_client` for a server that may reset the connection at
/// once: the reset can land before the connect is seen to complete, and
/// the connect then fails with it.
pub fn try_small_buffer_client(addr: SocketAddr, rcvbuf: usize) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(rcvbuf).unwrap();
    s.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    Ok(s)
}

/// Read a raw route's whole stream as `read_to_end_how` does; a reset
/// that came before the connect completed reads as nothing, then the
/// reset.
pub fn read_raw_how(addr: SocketAddr, rcvbuf: usize) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    match try_small_buffer_client(addr, rcvbuf) {
        Ok(mut c) => read_to_end_how(&mut c),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => (Vec::new(), Some(e.kind())),
        Err(e) => panic!("connect to {addr}: {e}"),
    }
}

/// Connect with a timeout and read/write timeouts so a broken proxy
/// fails the test instead of hanging it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to sluice");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// Read one line (up to '\n') byte by byte.
pub fn read_line(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap_or(0) == 1 {
        if b[0] == b'\n' {
            break;
        }
        out.push(b[0]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// Connect to `addr` from the local address `from` (any port).
pub fn connect_from(from: std::net::IpAddr, addr: SocketAddr) -> TcpStream {
    try_connect_from(from, addr).expect("connect to sluice")
}

/// Connect to `addr` from `from`; a client that is refused at once may
/// see its connect fail with a reset.
pub fn try_connect_from(from: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    Ok(s)
}

/// Assert that sluice closed `s` (EOF or reset) without sending a byte,
/// within a bounded wait.
pub fn assert_closed(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: got {n} bytes, wanted a close"),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset) => {}
        Err(e) => panic!("{what}: not closed: {e}"),
    }
}

/// A PROXY header as a backend received it, parsed with `ppp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenHeader {
    /// "v1" or "v2".
    pub version: &'static str,
    /// "PROXY"/"LOCAL" (v2), "TCP4"/"TCP6"/"UNKNOWN" (v1).
    pub kind: String,
    pub src: Option<SocketAddr>,
    pub dst: Option<SocketAddr>,
}

impl std::fmt::Display for SeenHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = |x: &Option<SocketAddr>| x.map(|a| a.to_string()).unwrap_or("-".into());
        write!(
            f,
            "{} {} {} {}",
            self.version,
            self.kind,
            a(&self.src),
            a(&self.dst)
        )
    }
}

/// Read exactly one PROXY header (v1 or v2) from `s`, byte by byte so not
/// one byte of the stream behind it is consumed, and parse it with `ppp`.
pub fn read_proxy_header(s: &mut TcpStream) -> Result<SeenHeader, String> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(1) => buf.push(b[0]),
            Ok(_) => return Err(format!("EOF after {} header bytes: {buf:?}", buf.len())),
            Err(e) => return Err(format!("read after {} header bytes: {e}", buf.len())),
        }
        if buf.len() > 600 {
            return Err(format!("no header in {buf:?}"));
        }
        if buf[0] == b'P' {
            // v1: a line; parse it once complete.
            if b[0] != b'\n' {
                continue;
            }
            let h = ppp::v1::Header::try_from(buf.as_slice()).map_err(|e| format!("{e}"))?;
            let (kind, src, dst) = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => (
                    "TCP4",
                    Some(SocketAddr::from((a.source_address, a.source_port))),
                    Some(SocketAddr::from((
                        a.destination_address,
                        a.destination_port,
                    ))),
                ),
                ppp::v1::Addresses::Tcp6(a) => (
                    "TCP6",
                    Some(SocketAddr::from((a.source_address, a.source_port))),
                    Some(SocketAddr::from((
                        a.destination_address,
                        a.destination_port,
                    ))),
                ),
                ppp::v1::Addresses::Unknown => ("UNKNOWN", None, None),
            };
            return Ok(SeenHeader {
                version: "v1",
                kind: kind.into(),
                src,
                dst,
            });
        }
        match ppp::v2::Header::try_from(buf.as_slice()) {
            Ok(h) => {
                let (src, dst) = match h.addresses {
                    ppp::v2::Addresses::IPv4(a) => (
                        Some(SocketAddr::from((a.source_address, a.source_port))),
                        Some(SocketAddr::from((
                            a.destination_address,
                            a.destination_port,
                        ))),
                    ),
                    ppp::v2::Addresses::IPv6(a) => (
                        Some(SocketAddr::from((a.source_address, a.source_port))),
                        Some(SocketAddr::from((
                            a.destination_address,
                            a.destination_port,
                        ))),
                    ),
                    _ => (None, None),
                };
                let kind = match h.command {
                    ppp::v2::Command::Proxy => "PROXY",
                    ppp::v2::Command::Local => "LOCAL",
                };
                return Ok(SeenHeader {
                    version: "v2",
                    kind: kind.into(),
                    src,
                    dst,
                });
            }
            Err(ppp::v2::ParseError::Incomplete(_)) | Err(ppp::v2::ParseError::Partial(..)) => {}
            Err(e) => return Err(format!("{e} in {buf:?}")),
        }
    }
}

/// A backend that expects a PROXY header: it parses it, answers with one
/// line describing it (`SeenHeader`'s Display, or `ERR ...`), then echoes
/// the stream that follows. Its result is that same line.
pub fn proxy_backend() -> Backend {
    Backend::spawn(|mut s| {
        let line = match read_proxy_header(&mut s) {
            Ok(h) => h.to_string(),
            Err(e) => format!("ERR {e}"),
        };
        let _ = s.write_all(format!("{line}\n").as_bytes());
        echo(&mut s);
        let _ = s.shutdown(Shutdown::Write);
        line
    })
}

/// Send `len` bytes (seed) through an echo path on `s` and check every
/// byte came back in order.
pub fn assert_echo(s: TcpStream, seed: u64, len: u64) {
    let (sent, got) = exchange(s, seed, len);
    assert_eq!(sent, got, "echo differs from what was sent");
}

/// Digest of bytes in memory (to compare with `recv_data`).
pub fn digest_of(data: &[u8]) -> Digest256 {
    Digest256 {
        len: data.len() as u64,
        sha: Sha256::digest(data).into(),
    }
}

/// A response head as a test client reads it.
#[derive(Debug, Clone)]
pub struct HttpHead {
    pub status: u16,
    /// The status line, e.g. "HTTP/1.1 200 OK".
    pub line: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl HttpHead {
    pub fn get(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn content_length(&self) -> u64 {
        self.get("content-length")
            .expect("Content-Length")
            .parse()
            .unwrap()
    }
}

/// Read one response head; `None` when the server closed first.
pub fn read_head(r: &mut impl BufRead) -> Option<HttpHead> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let status_line = line.trim_end().to_string();
    let status = status_line.split(' ').nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        assert!(
            r.read_line(&mut l).unwrap() > 0,
            "EOF inside a response head"
        );
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').expect("header line");
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Some(HttpHead {
        status,
        line: status_line,
        headers,
    })
}

/// Read exactly `n` body bytes.
pub fn read_body(r: &mut impl Read, n: u64) -> Vec<u8> {
    let mut b = Vec::new();
    r.take(n).read_to_end(&mut b).unwrap();
    assert_eq!(b.len() as u64, n, "body cut short");
    b
}

/// Send one request on a new connection and read one response (the body
/// per Content-Length, none for HEAD/304).
pub fn http(addr: SocketAddr, req: &str) -> (HttpHead, Vec<u8>) {
    let mut s = connect(addr);
    s.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let h = read_head(&mut r).expect("a response");
    let body = if req.starts_with("HEAD ") || h.status == 304 {
        Vec::new()
    } else {
        read_body(&mut r, h.content_length())
    };
    (h, body)
}

/// `GET path` as HTTP/1.1 with Connection: close.
pub fn get(addr: SocketAddr, path: &str) -> (HttpHead, Vec<u8>) {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
    )
}

/// Read to EOF, tolerating a reset (returns what arrived before it).
pub fn read_to_close(s: &mut impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Read until the stream ends; returns the bytes and how it ended:
/// `None` for an orderly EOF (a FIN), else the error (a reset, a timeout).
pub fn read_to_end_how(s: &mut impl Read) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (out, Some(e.kind())),
        }
    }
}

/// Write `len` generated bytes (seed) to a file; returns their digest.
pub fn gen_file(path: &Path, seed: u64, len: u64) -> Digest256 {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let d = send_data(&mut f, seed, len);
    f.flush().unwrap();
    d
}

/// A backend listener whose connections use 1 KiB segments: sluice's
/// socket buffers toward it stay small, and each write arrives on its own.
pub fn small_mss_listener() -> std::net::TcpListener {
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.set_tcp_mss(1024).unwrap();
    l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    l.listen(16).unwrap();
    l.into()
}

/// A client with 1 KiB segments and a 16 KiB receive window, so what
/// sluice holds for it fills soon when it does not read.
pub fn small_window_client(port: u16) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(16 * 1024).unwrap();
    s.set_tcp_mss(1024).unwrap();
    s.connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)).into(),
        Duration::from_secs(5),
    )
    .unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Read `c` until the stream ends: the bytes, and how it ended ("eof" or
/// the error kind, e.g. "ConnectionReset").
pub fn read_until_end(c: &mut TcpStream) -> (Vec<u8>, String) {
    let (got, how) = read_to_end_how(c);
    (got, how.map_or("eof".to_string(), |k| format!("{k:?}")))
}

/// Soft and hard RLIMIT_NOFILE of a process, from /proc/PID/limits.
pub fn fd_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].to_string(), f[4].to_string())
}

pub fn set_fd_limits(pid: u32, soft: &str, hard: &str) {
    let st = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:{hard}"))
        .status()
        .expect("prlimit (util-linux)");
    assert!(st.success(), "prlimit --pid={pid} --nofile={soft}:{hard}");
}

/// /proc/PID/task/TID of sluice process `pid`'s worker `n` (the thread
/// named `sluice-wN`).
pub fn worker_task(pid: u32, n: usize) -> PathBuf {
    let want = format!("sluice-w{n}");
    let tasks = format!("/proc/{pid}/task");
    for t in std::fs::read_dir(&tasks).unwrap() {
        let dir = t.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() == want {
            return dir;
        }
    }
    panic!("no thread {want} under {tasks}");
}

/// Voluntary context switches of worker `n` so far: how often it went to
/// sleep and was woken again.
pub fn worker_sleeps(pid: u32, n: usize) -> u64 {
    let status = std::fs::read_to_string(worker_task(pid, n).join("status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("voluntary_ctxt_switches in /proc/PID/task/TID/status")
}

/// Open descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Pipe descriptors of process `pid` (splice pipes, and a few of its own).
pub fn pipe_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("pipe:"))
        .count()
}
