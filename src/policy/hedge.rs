//! Hedged lookups: when a slow lookup lets the handler answer, and the
//! per-route timing that decides it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// When a slow lookup lets the handler answer (see [`Route::hedge`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Hedge {
    Off,
    /// Within a budget: after the later of the route's lookup p95 and its
    /// handler's time, at least [`HEDGE_FLOOR`], for at most
    /// [`HEDGE_SHARE_MILLI`] of the route's requests.
    Budgeted,
    /// After the route's handler time (a moving average), at least
    /// [`HEDGE_FLOOR`].
    Derived,
    After(Duration),
}

/// The share of a route's requests a budgeted hedge may send to the
/// handler, in thousandths: 5%, as "The Tail at Scale" hedges after the
/// p95. Each request earns this much of a token; a hedge spends one.
pub(crate) const HEDGE_SHARE_MILLI: u64 = 50;

/// The most tokens a route saves up, in thousandths: ten hedges in a row
/// (a stall's first requests) before the 5% applies. A route starts with
/// none: its first hedge comes after 20 requests.
const HEDGE_BURST_MILLI: u64 = 10_000;

/// The lookups a route times before its p95 is trusted: until then a
/// budgeted hedge waits for the lookup (the first lookups of a process,
/// which connect, are no measure of the store).
const LEARNING_LOOKUPS: u32 = 32;

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
    /// An estimate of the p95 of the route's lookups, in nanoseconds
    /// (0: none measured yet).
    lookup_p95_ns: AtomicU64,
    /// Hedges the route may still make, in thousandths ([`Hedge::Budgeted`]).
    tokens: AtomicU64,
    /// Lookups timed so far, up to [`LEARNING_LOOKUPS`].
    timed: AtomicU32,
}

impl HedgeTiming {
    pub(crate) fn new(mode: Hedge) -> Self {
        Self {
            mode,
            handler_us: AtomicU64::new(0),
            slow_lookups: AtomicU32::new(0),
            lookup_p95_ns: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            timed: AtomicU32::new(0),
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
            Hedge::Budgeted if self.timed.load(Relaxed) < LEARNING_LOOKUPS => None,
            Hedge::Budgeted => {
                let handler = Duration::from_micros(self.handler_us.load(Relaxed));
                let p95 = Duration::from_nanos(self.lookup_p95_ns.load(Relaxed));
                Some(handler.max(p95).max(HEDGE_FLOOR))
            }
        }
    }

    /// A request of the route looks its entry up: on a budgeted route it
    /// earns its share of a hedge.
    pub(crate) fn requested(&self) {
        if self.mode == Hedge::Budgeted {
            let _ = self.tokens.fetch_update(Relaxed, Relaxed, |t| {
                (t < HEDGE_BURST_MILLI).then(|| (t + HEDGE_SHARE_MILLI).min(HEDGE_BURST_MILLI))
            });
        }
    }

    /// Whether a lookup that ran past the budget may let the handler
    /// answer now: always, but on a budgeted route only while it has a
    /// hedge to spend (it spends it).
    pub(crate) fn admit(&self) -> bool {
        self.mode != Hedge::Budgeted
            || self
                .tokens
                .fetch_update(Relaxed, Relaxed, |t| t.checked_sub(1000))
                .is_ok()
    }

    /// Moves the p95 estimate towards a lookup that took `took`: up by
    /// 19 steps when it was slower, down by one when not, so it settles
    /// where 5% are slower (a step is 1/16 of the estimate).
    fn observe(&self, took: Duration) {
        if self.timed.load(Relaxed) < LEARNING_LOOKUPS {
            self.timed.fetch_add(1, Relaxed);
        }
        let sample = took.as_nanos().min(u64::MAX as u128) as u64;
        let q = self.lookup_p95_ns.load(Relaxed);
        let next = match q {
            0 => sample.max(1),
            q if sample > q => q.saturating_add((q / 16).max(20) * 19 / 20),
            q => q.saturating_sub((q / 16).max(20) / 20).max(1),
        };
        self.lookup_p95_ns.store(next, Relaxed);
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
        self.observe(took);
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

    #[test]
    fn a_budget_learns_the_p95_then_spends_one_hedge_per_twenty_requests() {
        let timing = HedgeTiming::new(Hedge::Budgeted);
        // Learning: no budget until 32 lookups are timed.
        for i in 0..LEARNING_LOOKUPS {
            assert_eq!(timing.budget(), None, "lookup {i}");
            timing.requested();
            // 95 quick lookups in 100, 5 slow.
            let took = if i % 20 == 0 { 10_000 } else { 1_000 };
            timing.took(Duration::from_micros(took), false);
        }
        for i in 0..20_000u64 {
            let took = if i % 20 == 0 { 10_000 } else { 1_000 };
            timing.took(Duration::from_micros(took), false);
        }
        // The p95 settles between the quick and the slow lookups.
        let budget = timing.budget().unwrap();
        assert!(
            budget > Duration::from_micros(1_000) && budget < Duration::from_micros(10_000),
            "{budget:?}"
        );
        // The 32 requests so far earned one hedge and a part: one admitted.
        assert!(timing.admit());
        assert!(!timing.admit());
        // Then one per 20 requests.
        let mut admitted = 0;
        for _ in 0..400 {
            timing.requested();
            admitted += usize::from(timing.admit());
        }
        assert_eq!(admitted, 20);
        // Saved up to 10 at most.
        for _ in 0..1_000 {
            timing.requested();
        }
        assert_eq!((0..20).filter(|_| timing.admit()).count(), 10);
        // Other modes are never refused.
        assert!(HedgeTiming::new(Hedge::Derived).admit());
    }
}
