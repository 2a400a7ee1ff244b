//! A bounded pool of kernel pipes for splice(2), and a pool of copy
//! buffers for the read/write path.
//!
//! Pipes cost two file descriptors and up to `pipe_size` of kernel memory
//! each, so sluice never holds one longer than a burst needs: a flow takes
//! a pipe when it starts moving bytes and gives it back as soon as the pipe
//! is empty again (unless the pool, its idle share full, would close it:
//! then the flow keeps it until its next byte rather than make a new pipe
//! for every burst). A pipe that still holds bytes is never returned (it is
//! closed instead), so no connection can ever receive another's data.
//!
//! The cap (`global.max_pipes`) is process-wide, shared by all workers
//! through one atomic counter touched once per burst, not per byte. Each
//! worker keeps its own free list, so the hot path takes no lock.
//!
//! Idle pipes and buffers are kept for the next burst, not for good: what
//! a free list held idle through a whole `DECAY` period (its low-water
//! mark) was not needed, and goes at the period's end. A spike of
//! connections therefore leaves its pipes and buffers behind for at most
//! two periods, while a steady load keeps what it uses.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::sys;

/// Free pipes kept per worker beyond which returned pipes are closed
/// (also never more than the worker's share of the budget, so idle pipes
/// in one worker cannot starve the others).
const MAX_IDLE_PIPES: usize = 256;
/// Free buffers kept per worker and size.
const MAX_IDLE_BUFS: usize = 256;
/// Idle buffers kept of a size the loaded configuration no longer uses.
const MAX_IDLE_OLD: usize = 2;
/// A pipe came out smaller than asked for, and the log said so (once).
static SMALL_PIPE_TOLD: AtomicBool = AtomicBool::new(false);

/// The period over which a free list's low-water mark is taken.
const DECAY: Duration = Duration::from_secs(10);

/// The low-water mark of one free list over the current `DECAY` period.
#[derive(Debug, Default)]
struct Decay {
    /// The fewest items the list held idle since the period began.
    low: usize,
    /// When the period ends; `None` while the list is empty.
    due: Option<Instant>,
}

impl Decay {
    /// The list holds `idle` items after one was taken or closed.
    fn seen(&mut self, idle: usize) {
        self.low = self.low.min(idle);
        if idle == 0 {
            self.due = None;
        }
    }

    /// The list holds `idle` items after one was added: a period starts
    /// if none runs (the clock is read only then, not per item).
    fn added(&mut self, idle: usize) {
        if self.due.is_none() {
            self.due = Some(Instant::now() + DECAY);
            self.low = idle;
        }
    }

    /// How many of the list's `idle` items to free at `now`: its
    /// low-water mark when the period ended (and the next one starts),
    /// else none.
    fn expired(&mut self, idle: usize, now: Instant) -> usize {
        match self.due {
            Some(t) if now >= t => {
                let n = self.low.min(idle);
                self.low = idle - n;
                self.due = (idle > n).then(|| now + DECAY);
                n
            }
            _ => 0,
        }
    }
}

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
    decay: Decay,
}

impl PipePool {
    pub fn new(budget: Arc<PipeBudget>) -> Self {
        PipePool {
            budget,
            free: Vec::new(),
            idle: 0,
            decay: Decay::default(),
        }
    }

    /// A pipe of (about) `want` bytes, or `None` when the budget is spent
    /// or the kernel refuses to make one (fd or per-user pipe limits).
    pub fn get(&mut self, want: usize) -> Option<Pipe> {
        if let Some((_, list)) = self.free.iter_mut().find(|(w, _)| *w == want)
            && let Some(p) = list.pop()
        {
            self.idle -= 1;
            self.decay.seen(self.idle);
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
        self.decay.seen(self.idle);
        p.cap = sys::set_pipe_size(p.wr(), want).unwrap_or(p.cap);
        p.want = want;
        Some(p)
    }

    fn make(want: usize) -> io::Result<Pipe> {
        let (rd, wr) = sys::pipe()?;
        let cap = sys::set_pipe_size(wr.as_fd(), want)?;
        if cap < want && !SMALL_PIPE_TOLD.swap(true, Ordering::Relaxed) {
            // Still correct, only slower: each splice moves at most `cap`.
            log::warn!(
                "the kernel gave a pipe of {cap} bytes, not the {want} pipe_size asks for; \
                 splice goes on in smaller steps. Over fs.pipe-max-size, or past \
                 fs.pipe-user-pages-soft (all pipes of this user, in pages), the kernel \
                 refuses larger pipes to processes without CAP_SYS_RESOURCE: raise those \
                 sysctls or lower pipe_size (said once)"
            );
        }
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
        self.decay.seen(self.idle);
        self.budget.give();
        true
    }

    /// When `sweep` may have idle pipes to close (None: none idle).
    pub fn next_sweep(&self) -> Option<Instant> {
        self.decay.due
    }

    /// Close the idle pipes that were not needed through a whole period.
    pub fn sweep(&mut self, now: Instant) {
        for _ in 0..self.decay.expired(self.idle, now) {
            self.close_idle();
        }
    }

    /// Whether an empty pipe given back now would be pooled (not closed).
    pub fn would_pool(&self) -> bool {
        self.idle < self.budget.idle_share.load(Ordering::Relaxed)
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
        self.decay.added(self.idle);
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
    free: Vec<BufList>,
    /// The sizes the current configuration uses: of other sizes only
    /// `MAX_IDLE_OLD` are kept (`None` until `keep_sizes`: all sizes).
    sizes: Option<Vec<usize>>,
}

/// The idle buffers of one size.
struct BufList {
    size: usize,
    bufs: Vec<Box<[u8]>>,
    decay: Decay,
}

impl BufPool {
    /// A (re)loaded configuration uses these buffer sizes: of any other
    /// size keep only `MAX_IDLE_OLD` idle buffers, for the connections of
    /// older configurations still copying; they go as the decay frees
    /// them once no such connection needs them.
    pub fn keep_sizes(&mut self, sizes: Vec<usize>) {
        for l in &mut self.free {
            if !sizes.contains(&l.size) {
                l.bufs.truncate(MAX_IDLE_OLD);
                l.decay.seen(l.bufs.len());
            }
        }
        self.free.retain(|l| !l.bufs.is_empty());
        self.sizes = Some(sizes);
    }

    /// When `sweep` may have idle buffers to free (None: none idle).
    pub fn next_sweep(&self) -> Option<Instant> {
        self.free.iter().filter_map(|l| l.decay.due).min()
    }

    /// Free the idle buffers that were not needed through a whole period.
    pub fn sweep(&mut self, now: Instant) {
        // Called every loop turn: nothing to do until a period ends. Lists
        // a burst emptied stay between sweeps, so giving a buffer back does
        // not allocate a list again.
        if self.next_sweep().is_none_or(|t| now < t) {
            return;
        }
        for l in &mut self.free {
            let n = l.decay.expired(l.bufs.len(), now);
            l.bufs.truncate(l.bufs.len() - n);
        }
        self.free.retain(|l| !l.bufs.is_empty());
    }

    /// How many idle buffers of `size` are kept.
    fn cap(&self, size: usize) -> usize {
        match &self.sizes {
            Some(k) if !k.contains(&size) => MAX_IDLE_OLD,
            _ => MAX_IDLE_BUFS,
        }
    }

    pub fn get(&mut self, size: usize) -> Box<[u8]> {
        if let Some(l) = self.free.iter_mut().find(|l| l.size == size)
            && let Some(b) = l.bufs.pop()
        {
            l.decay.seen(l.bufs.len());
            return b;
        }
        vec![0u8; size].into_boxed_slice()
    }

    pub fn put(&mut self, buf: Box<[u8]>) {
        let size = buf.len();
        let cap = self.cap(size);
        let i = match self.free.iter().position(|l| l.size == size) {
            Some(i) => i,
            None => {
                self.free.push(BufList {
                    size,
                    bufs: Vec::new(),
                    decay: Decay::default(),
                });
                self.free.len() - 1
            }
        };
        let l = &mut self.free[i];
        if l.bufs.len() < cap {
            l.bufs.push(buf);
            l.decay.added(l.bufs.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle(p: &BufPool) -> Vec<(usize, usize)> {
        p.free.iter().map(|l| (l.size, l.bufs.len())).collect()
    }

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
        assert_eq!(idle(&pool), [(4096, 2), (8192, 1)]);
        for _ in 0..3 {
            pool.put(vec![0u8; 4096].into_boxed_slice());
            pool.put(vec![0u8; 8192].into_boxed_slice());
        }
        assert_eq!(idle(&pool), [(4096, 2), (8192, 4)]);
        // Nothing is taken: within two periods both lists are gone (the
        // first period began with the first buffer given back, so only
        // that one sat idle through all of it).
        let due = pool.next_sweep().expect("idle buffers");
        pool.sweep(due - Duration::from_millis(1));
        assert_eq!(idle(&pool), [(4096, 2), (8192, 4)]);
        // (Each list's period began with its own first buffer.)
        pool.sweep(due + Duration::from_secs(1));
        assert_eq!(idle(&pool), [(4096, 1), (8192, 3)]);
        pool.sweep(pool.next_sweep().expect("the next period"));
        assert_eq!((idle(&pool), pool.next_sweep()), (vec![], None));
    }

    #[test]
    fn idle_buffers_decay_to_what_the_load_uses() {
        let mut pool = BufPool::default();
        let t0 = Instant::now();
        // A steady load of 3 buffers at a time.
        let steady = |pool: &mut BufPool| {
            for _ in 0..5 {
                let held: Vec<_> = (0..3).map(|_| pool.get(4096)).collect();
                for b in held {
                    pool.put(b);
                }
            }
        };
        // A spike of 10 buffers at once, all given back: the period
        // starts with the first, the only one idle through all of it.
        let spike: Vec<_> = (0..10).map(|_| pool.get(4096)).collect();
        for b in spike {
            pool.put(b);
        }
        steady(&mut pool);
        assert_eq!(idle(&pool), [(4096, 10)]);
        let due = pool.next_sweep().expect("a period runs");
        assert!(due >= t0 + DECAY);
        pool.sweep(due);
        assert_eq!(idle(&pool), [(4096, 9)]);
        // Through the next period the load keeps using 3: the 6 it never
        // touched go, the 3 stay.
        steady(&mut pool);
        pool.sweep(pool.next_sweep().expect("the next period"));
        assert_eq!(idle(&pool), [(4096, 3)]);
        // Unused through a period, they go too, and nothing is due.
        pool.sweep(pool.next_sweep().expect("a third period"));
        assert_eq!((idle(&pool), pool.next_sweep()), (vec![], None));
    }

    #[test]
    fn idle_pipes_decay_and_give_their_budget_back() {
        let budget = PipeBudget::new(16, 1);
        let mut a = with_idle(&budget, 6);
        let due = a.next_sweep().expect("a period runs");
        a.sweep(due - Duration::from_millis(1));
        assert_eq!(budget.used(), 6);
        // The period began with the first pipe given back.
        a.sweep(due);
        assert_eq!(budget.used(), 5);
        // Through the next one, 2 are taken and given back: of the 5, the
        // 3 that stayed idle close.
        let p = a.get(65536).expect("pipe");
        let q = a.get(65536).expect("pipe");
        a.put(p, true);
        a.put(q, true);
        a.sweep(a.next_sweep().expect("the next period"));
        assert_eq!(budget.used(), 2);
        a.sweep(a.next_sweep().expect("a third period"));
        assert_eq!((budget.used(), a.next_sweep()), (0, None));
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
