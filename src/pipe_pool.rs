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

use crate::sys;

/// Free pipes kept per worker beyond which returned pipes are closed.
const MAX_IDLE_PIPES: usize = 256;
/// Free buffers kept per worker and size.
const MAX_IDLE_BUFS: usize = 256;

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
    cap: usize,
    used: AtomicUsize,
}

impl PipeBudget {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(PipeBudget {
            cap,
            used: AtomicUsize::new(0),
        })
    }
    fn take(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.cap).then_some(n + 1)
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

    /// Give a pipe back. `empty` must be true only when every byte written
    /// into it was read out again; otherwise it is closed, never reused.
    pub fn put(&mut self, pipe: Pipe, empty: bool) {
        if !empty || self.idle >= MAX_IDLE_PIPES {
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
}

impl BufPool {
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
        match self.free.iter_mut().find(|(s, _)| *s == size) {
            Some((_, list)) if list.len() < MAX_IDLE_BUFS => list.push(buf),
            Some(_) => {}
            None => self.free.push((size, vec![buf])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_caps_pipes_and_dirty_pipes_are_not_reused() {
        let budget = PipeBudget::new(2);
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
    fn pipe_size_is_read_back() {
        let budget = PipeBudget::new(4);
        let mut pool = PipePool::new(budget);
        let p = pool.get(1 << 20).expect("pipe");
        // Root may get 1 MiB; others may be clamped, but never below a page.
        assert!(p.cap >= 4096 && p.cap <= 1 << 20, "cap {}", p.cap);
        pool.put(p, true);
    }
}
