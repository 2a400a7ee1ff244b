//! A bounded pool of kernel pipes for splice(2), and a pool of copy
//! buffers for the read/write path.
//!
//! Pipes cost two file descriptors and up to `pipe_size` of kernel memory
//! each, so sluice never holds one longer than a burst needs: a flow takes
//! a pipe when it starts moving bytes and gives it back as soon as the pipe
//! is empty again. A pipe that still holds bytes is never returned (it is
//! closed instead), so no connection can ever receive another's data.
//!
//! The cap (`global.max_pipes`) is process-wide, shared by all workers
//! through one atomic counter touched once per burst, not per byte. Each
//! worker keeps its own free list, so the hot path takes no lock.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::sys;

/// Free pipes kept per worker beyond which returned pipes are closed
/// (also never more than the worker's share of the budget, so idle pipes
/// in one worker cannot starve the others).
const MAX_IDLE_PIPES: usize = 256;
/// Free buffers kept per worker and size.
const MAX_IDLE_BUFS: usize = 256;
/// Idle buffers kept of a size the loaded configuration no longer uses,
/// and for how long after the last one came back.
const MAX_IDLE_OLD: usize = 2;
const OLD_IDLE: Duration = Duration::from_secs(10);

/// One pipe: read end, write end, and the capacity the kernel granted.
pub struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
    /// Capacity in bytes as read back with F_GETPIPE_SZ.
    pub cap: usize,
    /// The capacity that was asked for (the pool's free-list key).
    want: usize,
}

impl Pipe {
    pub fn rd(&self) -> BorrowedFd<'_> {
        self.rd.as_fd()
    }
    pub fn wr(&self) -> BorrowedFd<'_> {
        self.wr.as_fd()
    }
}

/// The process-wide pipe budget, shared by every worker's pool.
#[derive(Debug)]
pub struct PipeBudget {
    /// Most pipes in existence at once (`max_pipes`); a reload may change
    /// it. Lowered below `used`, it refuses new pipes until enough of the
    /// existing ones are closed.
    cap: AtomicUsize,
    /// Idle pipes one worker may keep.
    idle_share: AtomicUsize,
    used: AtomicUsize,
}

impl PipeBudget {
    /// A budget of `cap` pipes shared by `workers` workers.
    pub fn new(cap: usize, workers: usize) -> Arc<Self> {
        let b = PipeBudget {
            cap: AtomicUsize::new(0),
            idle_share: AtomicUsize::new(0),
            used: AtomicUsize::new(0),
        };
        b.set_cap(cap, workers);
        Arc::new(b)
    }

    /// Set the cap (at start, and by a reload of `max_pipes`).
    pub fn set_cap(&self, cap: usize, workers: usize) {
        self.cap.store(cap, Ordering::Release);
        // Fewer pipes than workers: none is kept idle, or one worker's
        // idle pipe could shut another out of the budget for good.
        let share = (cap / workers.max(1)).min(MAX_IDLE_PIPES);
        self.idle_share.store(share, Ordering::Relaxed);
    }

    pub fn cap(&self) -> usize {
        self.cap.load(Ordering::Acquire)
    }

    fn take(&self) -> bool {
        let cap = self.cap();
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_ok()
    }
    fn give(&self) {
        self.used.fetch_sub(1, Ordering::AcqRel);
    }
    /// Pipes currently in existence (lent out or idle in a free list).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// One worker's pipe pool.
pub struct PipePool {
    budget: Arc<PipeBudget>,
    /// Free pipes, grouped by requested size.
    free: Vec<(usize, Vec<Pipe>)>,
    idle: usize,
}

impl PipePool {
    pub fn new(budget: Arc<PipeBudget>) -> Self {
        PipePool {
            budget,
            free: Vec::new(),
            idle: 0,
        }
    }

    /// A pipe of (about) `want` bytes, or `None` when the budget is spent
    /// or the kernel refuses to make one (fd or per-user pipe limits).
    pub fn get(&mut self, want: usize) -> Option<Pipe> {
        if let Some((_, list)) = self.free.iter_mut().find(|(w, _)| *w == want)
            && let Some(p) = list.pop()
        {
            self.idle -= 1;
            return Some(p);
        }
        if !self.budget.take() {
            // Budget spent, but an idle pipe of another size can be resized.
            return self.steal(want);
        }
        match Self::make(want) {
            Ok(p) => Some(p),
            Err(e) => {
                self.budget.give();
                log::debug!("cannot create a pipe: {e}");
                None
            }
        }
    }

    fn steal(&mut self, want: usize) -> Option<Pipe> {
        let (_, list) = self.free.iter_mut().find(|(_, l)| !l.is_empty())?;
        let mut p = list.pop()?;
        self.idle -= 1;
        p.cap = sys::set_pipe_size(p.wr(), want).unwrap_or(p.cap);
        p.want = want;
        Some(p)
    }

    fn make(want: usize) -> io::Result<Pipe> {
        let (rd, wr) = sys::pipe()?;
        let cap = sys::set_pipe_size(wr.as_fd(), want)?;
        Ok(Pipe { rd, wr, cap, want })
    }

    /// Close idle pipes beyond this worker's share, and any idle pipe
    /// while more pipes exist than the cap allows (after a reload lowered
    /// `max_pipes`), so no worker is kept under the new cap by pipes
    /// nobody uses.
    pub fn trim(&mut self) {
        let share = self.budget.idle_share.load(Ordering::Relaxed);
        while (self.idle > share || self.budget.used() > self.budget.cap()) && self.close_idle() {}
    }

    /// Out of file descriptors: close half of the idle pipes (two
    /// descriptors each); whether there were any.
    pub fn shed(&mut self) -> bool {
        let n = self.idle.div_ceil(2);
        for _ in 0..n {
            self.close_idle();
        }
        n > 0
    }

    /// Close one idle pipe; false when there is none.
    fn close_idle(&mut self) -> bool {
        let Some(i) = self.free.iter().position(|(_, l)| !l.is_empty()) else {
            return false;
        };
        drop(self.free[i].1.pop());
        if self.free[i].1.is_empty() {
            self.free.swap_remove(i);
        }
        self.idle -= 1;
        self.budget.give();
        true
    }

    /// Give a pipe back. `empty` must be true only when every byte written
    /// into it was read out again; otherwise it is closed, never reused.
    pub fn put(&mut self, pipe: Pipe, empty: bool) {
        if !empty || self.idle >= self.budget.idle_share.load(Ordering::Relaxed) {
            drop(pipe);
            self.budget.give();
            return;
        }
        self.idle += 1;
        match self.free.iter_mut().find(|(w, _)| *w == pipe.want) {
            Some((_, list)) => list.push(pipe),
            None => self.free.push((pipe.want, vec![pipe])),
        }
    }
}

impl Drop for PipePool {
    fn drop(&mut self) {
        for _ in 0..self.idle {
            self.budget.give();
        }
    }
}

/// One worker's pool of copy buffers, grouped by size.
#[derive(Default)]
pub struct BufPool {
    free: Vec<(usize, Vec<Box<[u8]>>)>,
    /// The sizes the current configuration uses: only those are kept
    /// for good (`None` until `keep_sizes`: all).
    sizes: Option<Vec<usize>>,
    /// When the idle buffers of other sizes go (`OLD_IDLE` after the last
    /// one came back): a copy that older connections still run finds one
    /// meanwhile instead of allocating for every fill.
    old_until: Option<Instant>,
}

impl BufPool {
    /// A (re)loaded configuration uses these buffer sizes: of any other
    /// size keep only `MAX_IDLE_OLD` idle buffers, and only until
    /// `OLD_IDLE` after the last one came back, for the connections of
    /// older configurations still copying (a reload that changed
    /// `buffer_size` would otherwise keep up to `MAX_IDLE_BUFS` of the old
    /// size for good).
    pub fn keep_sizes(&mut self, sizes: Vec<usize>) {
        for (s, list) in &mut self.free {
            if !sizes.contains(s) {
                list.truncate(MAX_IDLE_OLD);
            }
        }
        self.free.retain(|(_, list)| !list.is_empty());
        let old = self.free.iter().any(|(s, _)| !sizes.contains(s));
        self.old_until = old.then(|| Instant::now() + OLD_IDLE);
        self.sizes = Some(sizes);
    }

    /// When `sweep` has old buffers to free (None: nothing to do).
    pub fn next_sweep(&self) -> Option<Instant> {
        self.old_until
    }

    /// Free the idle buffers of sizes no longer configured once
    /// `OLD_IDLE` passed without one coming back.
    pub fn sweep(&mut self, now: Instant) {
        if self.old_until.is_some_and(|t| now >= t) {
            let sizes = self.sizes.take();
            if let Some(k) = &sizes {
                self.free.retain(|(s, _)| k.contains(s));
            }
            self.sizes = sizes;
            self.old_until = None;
        }
    }

    /// How many idle buffers of `size` are kept.
    fn cap(&self, size: usize) -> usize {
        match &self.sizes {
            Some(k) if !k.contains(&size) => MAX_IDLE_OLD,
            _ => MAX_IDLE_BUFS,
        }
    }

    pub fn get(&mut self, size: usize) -> Box<[u8]> {
        if let Some((_, list)) = self.free.iter_mut().find(|(s, _)| *s == size)
            && let Some(b) = list.pop()
        {
            return b;
        }
        vec![0u8; size].into_boxed_slice()
    }

    pub fn put(&mut self, buf: Box<[u8]>) {
        let size = buf.len();
        let cap = self.cap(size);
        if cap == MAX_IDLE_OLD {
            self.old_until = Some(Instant::now() + OLD_IDLE);
        }
        match self.free.iter_mut().find(|(s, _)| *s == size) {
            Some((_, list)) if list.len() < cap => list.push(buf),
            Some(_) => {}
            None => self.free.push((size, vec![buf])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_of_sizes_no_longer_used_are_not_kept() {
        let mut pool = BufPool::default();
        let (a, b) = (pool.get(4096), pool.get(8192));
        pool.put(a);
        pool.put(b);
        assert_eq!(pool.free.len(), 2);
        for _ in 0..3 {
            pool.put(vec![0u8; 4096].into_boxed_slice());
        }
        pool.keep_sizes(vec![8192]);
        let idle = |p: &BufPool| -> Vec<(usize, usize)> {
            p.free.iter().map(|(s, l)| (*s, l.len())).collect()
        };
        assert_eq!(idle(&pool), [(4096, 2), (8192, 1)]);
        for _ in 0..3 {
            pool.put(vec![0u8; 4096].into_boxed_slice());
            pool.put(vec![0u8; 8192].into_boxed_slice());
        }
        assert_eq!(idle(&pool), [(4096, 2), (8192, 4)]);
        // The old size goes once nothing came back for OLD_IDLE.
        let due = pool.next_sweep().expect("old buffers to free");
        pool.sweep(due - Duration::from_millis(1));
        assert_eq!(idle(&pool), [(4096, 2), (8192, 4)]);
        pool.sweep(due);
        assert_eq!(idle(&pool), [(8192, 4)]);
        assert_eq!(pool.next_sweep(), None);
    }

    #[test]
    fn budget_caps_pipes_and_dirty_pipes_are_not_reused() {
        let budget = PipeBudget::new(2, 1);
        let mut pool = PipePool::new(budget.clone());
        let a = pool.get(65536).expect("first pipe");
        let b = pool.get(65536).expect("second pipe");
        assert!(pool.get(65536).is_none(), "budget of 2 must refuse a third");
        assert_eq!(budget.used(), 2);
        pool.put(a, false); // dirty: closed, budget returned
        assert_eq!(budget.used(), 1);
        pool.put(b, true); // clean: kept idle, still counted
        assert_eq!(budget.used(), 1);
        let c = pool.get(65536).expect("idle pipe reused");
        assert!(c.cap >= 4096);
        pool.put(c, true);
        drop(pool);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn fewer_pipes_than_workers_are_never_kept_idle() {
        // One pipe for two workers: a pipe given back is closed, so the
        // other worker can make one.
        let budget = PipeBudget::new(1, 2);
        let mut a = PipePool::new(budget.clone());
        let p = a.get(65536).expect("pipe");
        a.put(p, true);
        assert_eq!(budget.used(), 0);
        let mut b = PipePool::new(budget.clone());
        let q = b.get(65536).expect("worker b gets the budget's pipe");
        b.put(q, true);
        assert_eq!(budget.used(), 0);
    }

    /// A pool of `budget` holding `n` idle pipes.
    fn with_idle(budget: &Arc<PipeBudget>, n: usize) -> PipePool {
        let mut a = PipePool::new(budget.clone());
        let p: Vec<Pipe> = (0..n).map(|_| a.get(65536).expect("pipe")).collect();
        for pipe in p {
            a.put(pipe, true);
        }
        a
    }

    #[test]
    fn shed_closes_half_of_the_idle_pipes() {
        let budget = PipeBudget::new(16, 1);
        let mut a = with_idle(&budget, 5);
        assert!(a.shed());
        assert_eq!(budget.used(), 2, "3 of 5 closed");
        assert!(a.shed());
        assert!(a.shed());
        assert_eq!(budget.used(), 0);
        assert!(!a.shed(), "nothing left to shed");
    }

    #[test]
    fn trim_closes_idle_pipes_over_a_lowered_cap() {
        let budget = PipeBudget::new(4, 1);
        let mut a = with_idle(&budget, 3);
        assert_eq!(budget.used(), 3, "three idle");
        budget.set_cap(1, 1);
        a.trim();
        assert_eq!(budget.used(), 1, "down to the new share");
        budget.set_cap(0, 1);
        a.trim();
        assert_eq!(budget.used(), 0);
        assert!(a.get(65536).is_none(), "a cap of 0 makes none");
    }

    #[test]
    fn a_worker_keeps_only_its_share_of_idle_pipes() {
        // 4 pipes for 2 workers: one worker may keep 2 idle, so the other
        // can always make its own.
        let budget = PipeBudget::new(4, 2);
        let _a = with_idle(&budget, 3);
        assert_eq!(budget.used(), 2, "the third idle pipe was closed");
        let mut b = PipePool::new(budget.clone());
        let x = b.get(65536).expect("worker b gets a pipe");
        let y = b.get(65536).expect("and a second");
        assert!(b.get(65536).is_none(), "budget spent: 2 idle in a, 2 in b");
        b.put(x, true);
        b.put(y, true);
    }

    #[test]
    fn pipe_size_is_read_back() {
        let budget = PipeBudget::new(4, 1);
        let mut pool = PipePool::new(budget);
        let p = pool.get(1 << 20).expect("pipe");
        // Root may get 1 MiB; others may be clamped, but never below a page.
        assert!(p.cap >= 4096 && p.cap <= 1 << 20, "cap {}", p.cap);
        pool.put(p, true);
    }
}
