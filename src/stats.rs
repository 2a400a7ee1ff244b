//! Counters, aggregated without locks.
//!
//! Each route owns one `Stats`; inside it every worker has its own
//! cache-line-aligned slot of atomics that only that worker writes, so the
//! hot path never contends on a shared line. The admin page and the
//! Prometheus exporter sum the slots when they are read. Stats outlive
//! reloads: a route that keeps its name keeps its counters.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Counters one worker keeps for one route.
#[derive(Default)]
#[repr(align(128))]
pub struct Counters {
    /// Client connections accepted (including those then refused).
    pub conns: AtomicU64,
    /// Client connections open now (gauge).
    pub active: AtomicI64,
    /// Refused by allow/deny.
    pub denied: AtomicU64,
    /// Refused by a connection limit.
    pub limited: AtomicU64,
    /// Bytes client → backend (or request bytes for file routes).
    pub bytes_in: AtomicU64,
    /// Bytes backend → client (or response bytes for file routes).
    pub bytes_out: AtomicU64,
    /// Bytes moved by each strategy (both directions).
    pub bytes_splice: AtomicU64,
    pub bytes_copy: AtomicU64,
    pub bytes_sendfile: AtomicU64,
    pub bytes_mmap: AtomicU64,
    /// Connections that wanted to splice but had to copy, by reason.
    pub fallback_no_pipe: AtomicU64,
    pub fallback_refused: AtomicU64,
    /// File routes: splice bodies whose file would not fill the pipe
    /// (EAGAIN) and went on with sendfile.
    pub fallback_file_blocked: AtomicU64,
    /// mmap strategy: leases broken under a transfer, and transfers that
    /// could not get a lease and used sendfile instead.
    pub lease_breaks: AtomicU64,
    pub lease_fallbacks: AtomicU64,
    /// File routes: transfers ended because the file shrank under them.
    pub file_truncated: AtomicU64,
    /// Backend connect attempts that failed (refused, timed out).
    pub connect_failures: AtomicU64,
    /// Connections that found no backend to talk to.
    pub no_backend: AtomicU64,
    /// `accept_proxy`: connections closed for a malformed, too long or
    /// missing (timed out) PROXY header.
    pub proxy_header_errors: AtomicU64,
    /// Connections ended by each reason (indexed by `conn::End as usize`).
    pub ends: [AtomicU64; END_KINDS],
    /// HTTP responses by status class (1xx..5xx at index 1..5).
    pub http_status: [AtomicU64; 6],
}

/// Number of distinct `conn::End` reasons.
pub const END_KINDS: usize = 14;

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        if n > 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// One route's counters, one slot per worker.
pub struct Stats {
    slots: Box<[Counters]>,
}

impl Stats {
    pub fn new(workers: usize) -> Self {
        Stats {
            slots: (0..workers.max(1)).map(|_| Counters::default()).collect(),
        }
    }

    /// The slot a worker writes. Workers index by their id; anything else
    /// (the main thread, health checks) may use any slot, which is still
    /// correct because every counter is atomic.
    pub fn slot(&self, worker: usize) -> &Counters {
        &self.slots[worker % self.slots.len()]
    }

    /// Sum of one counter over all slots.
    pub fn sum(&self, f: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        self.slots
            .iter()
            .map(|c| f(c).load(Ordering::Relaxed))
            .sum()
    }

    /// Open connections, all workers together.
    pub fn active(&self) -> i64 {
        self.slots
            .iter()
            .map(|c| c.active.load(Ordering::Relaxed))
            .sum()
    }
}
