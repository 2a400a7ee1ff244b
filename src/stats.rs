//! Counters, aggregated without locks.
//!
//! Each route owns one `Stats`; inside it each worker the route was built
//! for has its own cache-line-aligned slot of atomics, so the hot path
//! never contends on a shared line. Worker `id` writes slot `id % slots`:
//! after a reload that changed `workers` some workers share a slot (still
//! exact: every counter is atomic). The admin page and the
//! Prometheus exporter sum the slots when they are read. Stats outlive
//! reloads: a route that keeps its name keeps its counters.
//!
//! `Histogram` counts durations into fixed buckets for the exporter's
//! latency families (connect, queue and connection times).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the histogram buckets, in microseconds. From half a millisecond,
/// where a connect on a local network lands, to an hour, where a long
/// download or an idle-timeout of a kept connection lands.
pub const BUCKETS_US: [u64; 19] = [
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
    900_000_000,
    3_600_000_000,
];

/// A bucket bound as its Prometheus `le` label: seconds, shortest form
/// ("0.0005", "1", "2.5").
pub fn le_label(us: u64) -> String {
    (us as f64 / 1e6).to_string()
}

/// Durations counted into `BUCKETS_US` (plus one bucket past the last
/// bound), with their sum. Each observation is two relaxed atomic adds;
/// the exporter makes the buckets cumulative when it reads them.
pub struct Histogram {
    counts: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKETS_US.partition_point(|&b| b < us);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Add this histogram's counts (per bucket, not cumulative) and sum
    /// into `into`.
    pub fn add_to(&self, into: &mut Snapshot) {
        for (n, c) in into.counts.iter_mut().zip(&self.counts) {
            *n += c.load(Ordering::Relaxed);
        }
        into.sum_us = into
            .sum_us
            .wrapping_add(self.sum_us.load(Ordering::Relaxed));
    }
}

/// A histogram read out: counts per bucket (the last one past every
/// bound) and the sum in microseconds.
#[derive(Default)]
pub struct Snapshot {
    pub counts: [u64; BUCKETS_US.len() + 1],
    pub sum_us: u64,
}

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
    /// splice(2) from a socket said ENOMEM, so a chunk was copied.
    pub fallback_memory: AtomicU64,
    /// File routes: splice bodies whose file would not fill the pipe
    /// (EAGAIN) and went on with sendfile.
    pub fallback_file_blocked: AtomicU64,
    /// mmap strategy: leases broken under a transfer, and transfers that
    /// could not get a lease and used sendfile instead.
    pub lease_breaks: AtomicU64,
    pub lease_fallbacks: AtomicU64,
    /// File routes: transfers ended because the file shrank under them.
    pub file_truncated: AtomicU64,
    /// File routes: transfers ended because reading the file failed.
    pub file_errors: AtomicU64,
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
    /// How long client connections lived, accept to close, whatever
    /// their end (one observation per `ends` increment).
    pub lifetime: Histogram,
    /// How long clients that had to wait for a backend slot waited in
    /// all (`queue_ms` of the access log); clients that never waited
    /// are not observed.
    pub queued: Histogram,
}

/// Number of distinct `conn::End` reasons.
pub const END_KINDS: usize = 15;

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        if n > 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A client connection ended: count its reason (an index into
    /// `ends`, `conn::End as usize`) and how long it lived.
    pub fn ended(&self, end: usize, lived: Duration) {
        Counters::inc(&self.ends[end]);
        self.lifetime.observe(lived);
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

    /// One histogram summed over all slots.
    pub fn histogram(&self, f: impl Fn(&Counters) -> &Histogram) -> Snapshot {
        let mut s = Snapshot::default();
        for c in self.slots.iter() {
            f(c).add_to(&mut s);
        }
        s
    }

    /// Open connections, all workers together.
    pub fn active(&self) -> i64 {
        self.slots
            .iter()
            .map(|c| c.active.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_inclusive_upper_bounds() {
        let h = Histogram::default();
        for us in [0, 500, 501, 1_000, 3_600_000_000, 3_600_000_001] {
            h.observe(Duration::from_micros(us));
        }
        let mut s = Snapshot::default();
        h.add_to(&mut s);
        // le=0.0005 takes 0 and 500 µs; 501 and 1000 µs go to le=0.001;
        // an hour is the last bound; past it is +Inf.
        assert_eq!(s.counts[0], 2);
        assert_eq!(s.counts[1], 2);
        assert_eq!(s.counts[BUCKETS_US.len() - 1], 1);
        assert_eq!(s.counts[BUCKETS_US.len()], 1);
        assert_eq!(s.counts.iter().sum::<u64>(), 6);
        assert_eq!(s.sum_us, 500 + 501 + 1_000 + 3_600_000_000 + 3_600_000_001);
        let labels: Vec<String> = BUCKETS_US.iter().map(|&us| le_label(us)).collect();
        assert_eq!(labels[..3], ["0.0005", "0.001", "0.0025"]);
        assert_eq!(labels[10..12], ["1", "2.5"]);
        assert_eq!(labels[18], "3600");
    }
}
