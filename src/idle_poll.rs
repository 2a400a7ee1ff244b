//! How long a worker that ran out of work polls before it sleeps.
//!
//! A worker that blocks in `epoll_wait` must be woken by whoever sends it
//! the next event: on a virtual machine that is an inter-processor
//! interrupt and an exit to the host, paid on the sender's CPU. When
//! events follow each other a few microseconds apart (short connections:
//! a backend's response, the next client), a worker that polls a little
//! longer finds them awake and spares the sender that cost; when they do
//! not, polling is CPU thrown away.
//!
//! So the window adapts, the way Linux's `cpuidle-haltpoll` governor
//! adapts a virtual CPU's halt polling: an idle period longer than the
//! window but within `busy_poll` (the most it may be) doubles the window,
//! one longer than `busy_poll` halves it (down to nothing), and one the
//! window covered leaves it as it is. A worker whose events come far
//! apart, or not at all, soon polls for nothing and sleeps at once; one
//! under a steady stream of events polls through the gaps.
//!
//! The worker calls [`IdlePoll::keep_polling`] each time it finds nothing
//! to do (a zero-timeout poll while it says yes, a sleep after) and
//! [`IdlePoll::woken`] when a poll returns events.

use std::time::{Duration, Instant};

/// The adaptive polling window of one worker.
#[derive(Debug)]
pub struct IdlePoll {
    /// `busy_poll`: the most the window may grow to; zero never polls.
    max: Duration,
    /// How long the worker polls now after it runs out of work.
    window: Duration,
    /// When the current idle period began (the worker last ran out of
    /// work), until an event ends it.
    idle_since: Option<Instant>,
}

impl IdlePoll {
    pub fn new(max: Duration) -> IdlePoll {
        IdlePoll {
            max,
            window: Duration::ZERO,
            idle_since: None,
        }
    }

    /// A reload's `busy_poll`.
    pub fn set_max(&mut self, max: Duration) {
        self.max = max;
        self.window = self.window.min(max);
    }

    /// The worker has nothing to do at `now`: true while it should poll
    /// without sleeping, false once it may sleep.
    pub fn keep_polling(&mut self, now: Instant) -> bool {
        let since = *self.idle_since.get_or_insert(now);
        now.saturating_duration_since(since) < self.window
    }

    /// The worker has work without having been idle (a ready list, a
    /// backlog): no idle period is running.
    pub fn busy(&mut self) {
        self.idle_since = None;
    }

    /// A poll returned events at `now`: the idle period, if one was
    /// running, ends here and sizes the next window.
    pub fn woken(&mut self, now: Instant) {
        if let Some(since) = self.idle_since.take() {
            self.adapt(now.saturating_duration_since(since));
        }
    }

    fn adapt(&mut self, idle: Duration) {
        if idle <= self.window {
            // The poll caught the event: the window is right.
        } else if idle <= self.max {
            // A sleep that a longer window would have saved.
            self.window = (self.window * 2).max(self.grow_start()).min(self.max);
        } else {
            // A sleep no allowed window would have saved.
            self.window /= 2;
            if self.window < self.grow_start() {
                self.window = Duration::ZERO;
            }
        }
    }

    /// The first window after none: a quarter of the most, as the
    /// haltpoll governor's defaults have it (50 of 200 µs).
    fn grow_start(&self) -> Duration {
        self.max / 4
    }

    #[cfg(test)]
    fn window(&self) -> Duration {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    /// Runs one idle period of `idle` and returns whether the worker
    /// would have slept in it, and the window after.
    fn idle_for(p: &mut IdlePoll, t: &mut Instant, idle: Duration) -> (bool, Duration) {
        let mut slept = false;
        // The worker polls while told to; the event arrives at t + idle.
        let start = *t;
        if !p.keep_polling(start) || !p.keep_polling(start + idle) {
            slept = true;
        }
        *t = start + idle;
        p.woken(*t);
        (slept, p.window())
    }

    #[test]
    fn off_never_polls() {
        let mut p = IdlePoll::new(Duration::ZERO);
        let mut t = Instant::now();
        for _ in 0..10 {
            assert_eq!(idle_for(&mut p, &mut t, 3 * US), (true, Duration::ZERO));
        }
    }

    #[test]
    fn short_gaps_grow_the_window_until_it_covers_them() {
        let mut p = IdlePoll::new(20 * US);
        let mut t = Instant::now();
        // 5, 10, then 20 µs (capped): a 12 µs gap is covered from the third.
        assert_eq!(idle_for(&mut p, &mut t, 12 * US), (true, 5 * US));
        assert_eq!(idle_for(&mut p, &mut t, 12 * US), (true, 10 * US));
        assert_eq!(idle_for(&mut p, &mut t, 12 * US), (true, 20 * US));
        for _ in 0..5 {
            assert_eq!(idle_for(&mut p, &mut t, 12 * US), (false, 20 * US));
        }
    }

    #[test]
    fn long_gaps_shrink_it_to_nothing() {
        let mut p = IdlePoll::new(20 * US);
        let mut t = Instant::now();
        for _ in 0..3 {
            idle_for(&mut p, &mut t, 15 * US);
        }
        assert_eq!(p.window(), 20 * US);
        // Idle periods beyond the most: 10, then 5, then 2.5 < 5 = none.
        let ms = Duration::from_millis(1);
        assert_eq!(idle_for(&mut p, &mut t, ms), (true, 10 * US));
        assert_eq!(idle_for(&mut p, &mut t, ms), (true, 5 * US));
        assert_eq!(idle_for(&mut p, &mut t, ms), (true, Duration::ZERO));
        assert_eq!(idle_for(&mut p, &mut t, ms), (true, Duration::ZERO));
    }

    #[test]
    fn work_without_idling_ends_no_period_and_a_lower_max_caps_the_window() {
        let mut p = IdlePoll::new(40 * US);
        let mut t = Instant::now();
        for _ in 0..4 {
            idle_for(&mut p, &mut t, 30 * US);
        }
        assert_eq!(p.window(), 40 * US);
        // Busy without an idle period: nothing to learn.
        p.busy();
        p.woken(t + Duration::from_secs(1));
        assert_eq!(p.window(), 40 * US);
        p.set_max(8 * US);
        assert_eq!(p.window(), 8 * US);
        p.set_max(Duration::ZERO);
        assert_eq!(idle_for(&mut p, &mut t, US), (true, Duration::ZERO));
    }
}
