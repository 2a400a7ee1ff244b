//! Test harness shared by the integration tests: start the real `sluice`
//! binary on a config the test writes, read its log, and run real TCP
//! peers (backends, clients) on loopback. Nothing here mocks the kernel.
#![allow(dead_code)]

pub mod admin;

use std::collections::HashMap;
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

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running sluice process and everything it printed.
pub struct Sluice {
    child: Child,
    pub dir: PathBuf,
    pub config: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Sluice {
    /// Write `toml` to a new dir and start `sluice run` on it; wait until
    /// it says it started (panics with its log if it exits instead).
    pub fn start(name: &str, toml: &str) -> Sluice {
        let dir = temp_dir(name);
        Self::start_in(dir, toml, &[])
    }

    pub fn start_in(dir: PathBuf, toml: &str, env: &[(&str, &str)]) -> Sluice {
        let config = dir.join("sluice.toml");
        std::fs::write(&config, toml).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut s = Self::launch(dir, config, cmd);
        s.wait_log("started", Duration::from_secs(10));
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
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
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
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
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
            let mut buf = [0u8; 65536];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            name.to_string()
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
