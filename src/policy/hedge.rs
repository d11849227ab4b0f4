//! Hedged lookups: when a slow lookup lets the handler answer, and the
//! per-route timing that decides it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// When a slow lookup lets the handler answer (see [`Route::hedge`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Hedge {
    Off,
    /// After the route's handler time (a moving average), at least
    /// [`HEDGE_FLOOR`].
    Derived,
    After(Duration),
}

/// The shortest a derived hedge waits for a lookup: a healthy Redis on
/// the same network answers well within it. Tokio's timers tick every
/// millisecond, so a hedge fires 0 to 1 ms after its budget.
pub(crate) const HEDGE_FLOOR: Duration = Duration::from_micros(500);

/// After this many lookups in a row of a hedging route ran past its
/// budget, the next ones hedge at once (the store is slow now, not one
/// reply), until one finishes within the budget again.
pub(crate) const HEDGE_STREAK: u32 = 2;

/// A route's hedging: its mode and the timings it learns.
#[derive(Debug)]
pub(crate) struct HedgeTiming {
    mode: Hedge,
    /// A moving average of the handler's time on misses, in microseconds
    /// (0: none measured yet).
    handler_us: AtomicU64,
    /// How many lookups in a row ran past the hedge budget.
    slow_lookups: AtomicU32,
}

impl HedgeTiming {
    pub(crate) fn new(mode: Hedge) -> Self {
        Self {
            mode,
            handler_us: AtomicU64::new(0),
            slow_lookups: AtomicU32::new(0),
        }
    }

    /// Whether the route hedges at all.
    pub(crate) fn is_on(&self) -> bool {
        self.mode != Hedge::Off
    }

    /// How long a lookup may take before the handler answers; `None`: as
    /// long as it takes.
    pub(crate) fn budget(&self) -> Option<Duration> {
        match self.mode {
            Hedge::Off => None,
            Hedge::After(budget) => Some(budget),
            Hedge::Derived => {
                let us = self.handler_us.load(Relaxed);
                Some(Duration::from_micros(us).max(HEDGE_FLOOR))
            }
        }
    }

    /// A lookup of this (hedging) route ran past its budget.
    pub(crate) fn ran_past(&self) {
        let _ = self
            .slow_lookups
            .fetch_update(Relaxed, Relaxed, |n| n.checked_add(1));
    }

    /// A lookup of this (hedging) route finished `took` after its request
    /// started; `counted`: as slow already, when it ran past the budget.
    pub(crate) fn took(&self, took: Duration, counted: bool) {
        match self.budget() {
            Some(budget) if took > budget && !counted => self.ran_past(),
            Some(budget) if took > budget => {}
            Some(_) => self.slow_lookups.store(0, Relaxed),
            None => {}
        }
    }

    /// Whether the store is slow for this route now: the handler answers
    /// without waiting for the budget.
    pub(crate) fn at_once(&self) -> bool {
        self.is_on() && self.slow_lookups.load(Relaxed) >= HEDGE_STREAK
    }

    /// The handler answered a miss in `took`.
    pub(crate) fn handler_took(&self, took: Duration) {
        let sample = took.as_micros().min(u64::MAX as u128) as u64;
        let old = self.handler_us.load(Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.handler_us.store(new.max(1), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Policy, Route};

    #[test]
    fn a_streak_of_slow_lookups_hedges_at_once_until_one_is_quick() {
        let policy = Policy::builder()
            .route(
                Route::get("/persons/{id}")
                    .key("person:{id}")
                    .hedge_after(Duration::from_millis(10)),
            )
            .route(Route::get("/other").key("other"))
            .build()
            .unwrap();
        let (route, plain) = (policy.route(0), policy.route(1));
        let (slow, quick) = (Duration::from_millis(11), Duration::from_millis(9));
        for _ in 1..HEDGE_STREAK {
            // Counted when the hedge runs out, not again when it ends.
            route.hedge.ran_past();
            route.hedge.took(slow, true);
            assert!(!route.hedge.at_once(), "one slow reply is not a slow store");
        }
        route.hedge.ran_past();
        assert!(route.hedge.at_once());
        // Sent at once: counted when it ends.
        route.hedge.took(slow, false);
        assert!(route.hedge.at_once());
        route.hedge.took(quick, false);
        assert!(!route.hedge.at_once(), "a quick lookup ends it");
        // A route that does not hedge never does.
        for _ in 0..HEDGE_STREAK {
            plain.hedge.took(slow, false);
        }
        assert!(!plain.hedge.at_once());
    }
}
