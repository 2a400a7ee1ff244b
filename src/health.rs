//! Backend health: passive marking from real traffic, shared by workers.
//!
//! Every failed connect counts against the backend; `fall` failures in a
//! row mark it down, and balance then skips it. A successful connect
//! resets the count. With active checks enabled (`[route.health]`), only
//! the checker brings a down backend back (after `rise` good checks);
//! without them a down backend is given another chance once `interval`
//! has passed since it went down, so a route never stays dark for good.

use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::route::{BackendRt, RouteRt};

/// Milliseconds since the process started, as a cheap shared clock.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// A connect to backend `i` of `route` failed.
pub fn passive_failure(route: &RouteRt, i: usize) {
    let Some(p) = route.proxy() else { return };
    let b = &route.backends[i];
    let fails = b.fails.fetch_add(1, Ordering::Relaxed) + 1;
    if fails >= p.health.fall && b.up.swap(false, Ordering::Relaxed) {
        b.down_at.store(now_ms(), Ordering::Relaxed);
        b.rises.store(0, Ordering::Relaxed);
        log::warn!(
            "route {}: backend {} ({}) is DOWN after {fails} failed connects in a row",
            route.cfg.name,
            b.name,
            b.addr
        );
    }
}

/// A connect to backend `i` of `route` succeeded.
pub fn passive_success(route: &RouteRt, i: usize) {
    route.backends[i].fails.store(0, Ordering::Relaxed);
}

/// Without active checks, bring a passively downed backend back for
/// another try once `interval` has passed.
pub fn maybe_retry(b: &BackendRt, interval: Duration) -> bool {
    let at = b.down_at.load(Ordering::Relaxed);
    if at != 0 && now_ms().saturating_sub(at) >= interval.as_millis() as u64 {
        b.down_at.store(0, Ordering::Relaxed);
        b.fails.store(0, Ordering::Relaxed);
        b.up.store(true, Ordering::Relaxed);
        log::info!(
            "backend {} ({}) is given another try after {:?} down",
            b.name,
            b.addr,
            interval
        );
        return true;
    }
    false
}
