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
//! So the window adapts, much as Linux's `cpuidle-haltpoll` governor
//! adapts a virtual CPU's halt polling, learning only from idle periods
//! that ended in a poll allowed to sleep: one within `busy_poll` (the
//! most the window may be) grows the window to cover it (the next power
//! of two of its length, so a 50 µs gap costs 64 µs of polling, and an
//! event already queued when the worker went to sleep a microsecond or
//! two, not a fixed share of `busy_poll`); one longer than `busy_poll`
//! halves it, down to nothing below `FLOOR`. An event the polling caught
//! leaves the window as it is.
//! So a worker whose events come far apart, or not at all, soon sleeps at
//! once; one under a steady stream of events polls through the gaps; and
//! request/response traffic with long pauses polls about as long as the
//! backend takes to answer, then sleeps through the pause.
//!
//! The worker calls [`IdlePoll::keep_polling`] each time it finds nothing
//! to do (a zero-timeout poll while it says yes, a sleep after) and
//! [`IdlePoll::woken`] when a poll returns events, saying whether that
//! poll could sleep.

use std::time::{Duration, Instant};

/// The shortest window: below it, polling is not worth a syscall.
const FLOOR: Duration = Duration::from_micros(1);

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

    /// A poll returned events at `now`; `slept`: it was allowed to block
    /// (the window had passed). The idle period, if one was running, ends
    /// here, and one that ended in a sleep sizes the next window.
    pub fn woken(&mut self, now: Instant, slept: bool) {
        if let Some(since) = self.idle_since.take()
            && slept
        {
            self.adapt(now.saturating_duration_since(since));
        }
    }

    fn adapt(&mut self, idle: Duration) {
        if self.max < FLOOR {
            return;
        }
        if idle <= self.max {
            // A sleep that a window this long would have saved.
            let cover = u64::try_from(idle.as_nanos())
                .unwrap_or(u64::MAX)
                .checked_next_power_of_two()
                .map_or(self.max, Duration::from_nanos);
            self.window = self.window.max(cover).clamp(FLOOR, self.max);
        } else {
            // A sleep no allowed window would have saved.
            self.window /= 2;
            if self.window < FLOOR {
                self.window = Duration::ZERO;
            }
        }
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
    /// slept in it, and the window after.
    fn idle_for(p: &mut IdlePoll, t: &mut Instant, idle: Duration) -> (bool, Duration) {
        // The worker polls while told to; the event arrives at t + idle.
        let start = *t;
        let slept = !p.keep_polling(start) || !p.keep_polling(start + idle);
        *t = start + idle;
        p.woken(*t, slept);
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
    fn a_short_sleep_grows_the_window_to_cover_it() {
        let mut p = IdlePoll::new(Duration::from_millis(10));
        let mut t = Instant::now();
        // 12 µs: the next power of two of 12,000 ns is 16,384 ns.
        assert_eq!(
            idle_for(&mut p, &mut t, 12 * US),
            (true, Duration::from_nanos(16_384))
        );
        for _ in 0..5 {
            assert_eq!(
                idle_for(&mut p, &mut t, 12 * US),
                (false, Duration::from_nanos(16_384))
            );
        }
        // A longer one within busy_poll grows it again; never past it.
        let (slept, w) = idle_for(&mut p, &mut t, Duration::from_millis(9));
        assert_eq!((slept, w), (true, Duration::from_millis(10)));
    }

    #[test]
    fn long_gaps_shrink_it_to_nothing() {
        let mut p = IdlePoll::new(20 * US);
        let mut t = Instant::now();
        idle_for(&mut p, &mut t, 15 * US);
        assert_eq!(p.window(), Duration::from_nanos(16_384));
        // Idle periods beyond the most halve it: 8,192 ns ... below 1 µs,
        // none.
        let ms = Duration::from_millis(1);
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(idle_for(&mut p, &mut t, ms).1.as_nanos());
        }
        assert_eq!(seen, [8192, 4096, 2048, 1024, 0, 0]);
    }

    #[test]
    fn an_event_caught_while_polling_teaches_nothing() {
        let mut p = IdlePoll::new(Duration::from_millis(10));
        let mut t = Instant::now();
        idle_for(&mut p, &mut t, 40 * US);
        assert_eq!(p.window(), Duration::from_nanos(65_536));
        // Caught by a zero-timeout poll inside the window: no change.
        assert!(p.keep_polling(t));
        p.woken(t + 3 * US, false);
        assert_eq!(p.window(), Duration::from_nanos(65_536));
    }

    #[test]
    fn an_event_already_queued_teaches_only_its_few_microseconds() {
        // With no window the worker goes to sleep and finds an event
        // already queued: that idle period (3 µs) is what a window would
        // have had to cover, not a share of busy_poll.
        let mut p = IdlePoll::new(Duration::from_millis(10));
        let t = Instant::now();
        assert!(!p.keep_polling(t));
        p.woken(t + 3 * US, true);
        assert_eq!(p.window(), Duration::from_nanos(4_096));
    }

    #[test]
    fn work_without_idling_ends_no_period_and_a_lower_max_caps_the_window() {
        let mut p = IdlePoll::new(40 * US);
        let mut t = Instant::now();
        idle_for(&mut p, &mut t, 30 * US);
        assert_eq!(p.window(), Duration::from_nanos(32_768));
        // Busy without an idle period: nothing to learn.
        p.busy();
        p.woken(t + Duration::from_secs(1), true);
        assert_eq!(p.window(), Duration::from_nanos(32_768));
        p.set_max(8 * US);
        assert_eq!(p.window(), 8 * US);
        p.set_max(Duration::ZERO);
        assert_eq!(idle_for(&mut p, &mut t, US), (true, Duration::ZERO));
    }
}
