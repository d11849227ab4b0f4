//! What the cache tells the outside world beyond its in-process counters:
//! metrics through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`; without it every call here is an empty inline function), and
//! rate-limited warnings.
//!
//! Metric handles are registered once, on first use (so a recorder
//! installed before the first request sees everything), and every label
//! value is bounded: a route pattern or an enum value, never a key or an id.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::Probed;
use crate::reason::{HandlerCall, Reason};

/// The store operation an error or a span belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Lookup,
    Store,
    Invalidate,
    Replay,
}

impl Op {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    const ALL: [Op; 4] = [Op::Lookup, Op::Store, Op::Invalidate, Op::Replay];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Store => "store",
            Op::Invalidate => "invalidate",
            Op::Replay => "replay",
        }
    }
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) const ERROR_KINDS: [&str; 8] = [
    "timeout",
    "unreachable",
    "backend",
    "denied",
    "rejected",
    "unconfirmed",
    "circuit-open",
    "pending-invalidations",
];

/// How a write's invalidation ended, as counted in
/// `tower_redis_cache_invalidations_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invalidated {
    Applied,
    Failed,
    Skipped,
    Unscoped,
    Unparsed,
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
impl Invalidated {
    const ALL: [Invalidated; 5] = [
        Invalidated::Applied,
        Invalidated::Failed,
        Invalidated::Skipped,
        Invalidated::Unscoped,
        Invalidated::Unparsed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Invalidated::Applied => "applied",
            Invalidated::Failed => "failed",
            Invalidated::Skipped => "skipped",
            Invalidated::Unscoped => "unscoped",
            Invalidated::Unparsed => "unparsed",
        }
    }
}

/// A circuit state as the `tower_redis_cache_circuit_state` gauge shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CircuitGauge {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

#[cfg(feature = "metrics")]
mod imp {
    use super::*;
    use metrics::{Counter, Gauge, Histogram, SharedString};

    /// Per-route handles of one policy.
    #[derive(Debug)]
    pub(crate) struct Routes {
        routes: Box<[Route]>,
    }

    #[derive(Debug)]
    struct Route {
        label: SharedString,
        handles: OnceLock<Handles>,
        bypass: [OnceLock<Counter>; Reason::ALL.len()],
        not_stored: [OnceLock<Counter>; Reason::ALL.len()],
        calls: [OnceLock<Counter>; HandlerCall::COUNT],
    }

    #[derive(Debug)]
    struct Handles {
        hits: Counter,
        misses: Counter,
        stores: Counter,
        hit_seconds: Histogram,
        miss_seconds: Histogram,
        store_seconds: Histogram,
        verified: Counter,
        verify_mismatches: Counter,
        verify_stale_seconds: Histogram,
    }

    impl Route {
        fn handles(&self) -> &Handles {
            self.handles.get_or_init(|| {
                describe();
                let route = self.label.clone();
                Handles {
                    hits: metrics::counter!("tower_redis_cache_hits_total", "route" => route.clone()),
                    misses: metrics::counter!("tower_redis_cache_misses_total", "route" => route.clone()),
                    stores: metrics::counter!("tower_redis_cache_stores_total", "route" => route.clone()),
                    hit_seconds: metrics::histogram!("tower_redis_cache_hit_duration_seconds", "route" => route.clone()),
                    miss_seconds: metrics::histogram!("tower_redis_cache_miss_duration_seconds", "route" => route.clone()),
                    store_seconds: metrics::histogram!("tower_redis_cache_store_duration_seconds", "route" => route.clone()),
                    verified: metrics::counter!("tower_redis_cache_verified_total", "route" => route.clone()),
                    verify_mismatches: metrics::counter!("tower_redis_cache_verify_mismatches_total", "route" => route.clone()),
                    verify_stale_seconds: metrics::histogram!("tower_redis_cache_verify_stale_seconds", "route" => route),
                }
            })
        }

        fn reason<'a>(
            &self,
            slots: &'a [OnceLock<Counter>; Reason::ALL.len()],
            name: &'static str,
            reason: Reason,
        ) -> &'a Counter {
            slots[reason as usize].get_or_init(|| {
                describe();
                metrics::counter!(name, "route" => self.label.clone(), "reason" => reason.as_str())
            })
        }
    }

    impl Routes {
        pub(crate) fn new(labels: &[String]) -> Self {
            let routes = labels
                .iter()
                .map(|label| Route {
                    label: SharedString::from(label.clone()),
                    handles: OnceLock::new(),
                    bypass: std::array::from_fn(|_| OnceLock::new()),
                    not_stored: std::array::from_fn(|_| OnceLock::new()),
                    calls: std::array::from_fn(|_| OnceLock::new()),
                })
                .collect();
            Self { routes }
        }

        pub(crate) fn hit(&self, route: usize, took: Duration) {
            let h = self.routes[route].handles();
            h.hits.increment(1);
            h.hit_seconds.record(took.as_secs_f64());
        }

        pub(crate) fn miss(&self, route: usize, took: Duration) {
            let h = self.routes[route].handles();
            h.misses.increment(1);
            h.miss_seconds.record(took.as_secs_f64());
        }

        pub(crate) fn stored(&self, route: usize, took: Duration) {
            let h = self.routes[route].handles();
            h.stores.increment(1);
            h.store_seconds.record(took.as_secs_f64());
        }

        pub(crate) fn verified(&self, route: usize, stale_for: Option<Duration>) {
            let h = self.routes[route].handles();
            h.verified.increment(1);
            if let Some(stale_for) = stale_for {
                h.verify_mismatches.increment(1);
                h.verify_stale_seconds.record(stale_for.as_secs_f64());
            }
        }

        pub(crate) fn handler_called(&self, route: usize, why: HandlerCall) {
            let r = &self.routes[route];
            r.calls[why.index()]
                .get_or_init(|| {
                    describe();
                    metrics::counter!("tower_redis_cache_handler_calls_total", "route" => r.label.clone(), "reason" => why.as_str())
                })
                .increment(1);
        }

        pub(crate) fn bypass(&self, route: usize, reason: Reason) {
            let r = &self.routes[route];
            r.reason(&r.bypass, "tower_redis_cache_bypasses_total", reason)
                .increment(1);
        }

        pub(crate) fn not_stored(&self, route: usize, reason: Reason) {
            let r = &self.routes[route];
            r.reason(&r.not_stored, "tower_redis_cache_not_stored_total", reason)
                .increment(1);
        }
    }

    /// Process-wide handles: store errors, invalidations, the breaker.
    struct Global {
        errors: [[Counter; ERROR_KINDS.len()]; Op::ALL.len()],
        invalidations: [Counter; Invalidated::ALL.len()],
        probes: [[Counter; 3]; 2],
        circuit: Gauge,
        pending: Gauge,
    }

    fn global() -> &'static Global {
        static GLOBAL: OnceLock<Global> = OnceLock::new();
        GLOBAL.get_or_init(|| {
            describe();
            Global {
                errors: Op::ALL.map(|op| {
                    ERROR_KINDS.map(|kind| {
                        metrics::counter!("tower_redis_cache_store_errors_total", "op" => op.as_str(), "kind" => kind)
                    })
                }),
                invalidations: Invalidated::ALL.map(|outcome| {
                    metrics::counter!("tower_redis_cache_invalidations_total", "outcome" => outcome.as_str())
                }),
                probes: ["1s", "10s"].map(|after| {
                    ["consistent", "stale", "unread"].map(|outcome| {
                        metrics::counter!("tower_redis_cache_write_probes_total", "after" => after, "outcome" => outcome)
                    })
                }),
                circuit: metrics::gauge!("tower_redis_cache_circuit_state"),
                pending: metrics::gauge!("tower_redis_cache_pending_invalidations"),
            }
        })
    }

    pub(crate) fn store_error(op: Op, kind: &'static str) {
        let at = ERROR_KINDS.iter().position(|k| *k == kind).unwrap_or(0);
        global().errors[op as usize][at].increment(1);
    }

    pub(crate) fn invalidation(outcome: Invalidated) {
        global().invalidations[outcome as usize].increment(1);
    }

    pub(crate) fn circuit(state: CircuitGauge) {
        global().circuit.set(state as u8 as f64);
    }

    pub(crate) fn probed(window: usize, outcome: Probed) {
        global().probes[window][outcome as usize].increment(1);
    }

    pub(crate) fn pending_invalidations(keys: usize) {
        global().pending.set(keys as f64);
    }

    /// Help texts, given to the recorder once.
    fn describe() {
        static DESCRIBED: std::sync::Once = std::sync::Once::new();
        DESCRIBED.call_once(|| {
            use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
            describe_counter!(
                "tower_redis_cache_verified_total",
                "Hits checked against the handler (Route::verify), by route."
            );
            describe_counter!(
                "tower_redis_cache_verify_mismatches_total",
                "Checked hits whose entry differed from the handler's response, by route."
            );
            describe_histogram!(
                "tower_redis_cache_verify_stale_seconds",
                Unit::Seconds,
                "How long a checked hit's entry that differed from the handler's response had been stored, by route."
            );
            describe_counter!(
                "tower_redis_cache_write_probes_total",
                "Write probes (Rule::probe): checks about 1 s and 10 s after a write's invalidation, by when and outcome."
            );
            describe_counter!(
                "tower_redis_cache_handler_calls_total",
                "Calls of a cached route's handler, by route and why each was made."
            );
            describe_counter!(
                "tower_redis_cache_hits_total",
                "Responses served from the cache, by route."
            );
            describe_counter!(
                "tower_redis_cache_misses_total",
                "Lookups that found nothing usable, by route."
            );
            describe_counter!(
                "tower_redis_cache_stores_total",
                "Responses written to the cache, by route."
            );
            describe_counter!(
                "tower_redis_cache_bypasses_total",
                "Requests on cached routes that did not use the cache, by route and reason."
            );
            describe_counter!(
                "tower_redis_cache_not_stored_total",
                "Misses whose response was not stored, by route and reason."
            );
            describe_histogram!(
                "tower_redis_cache_hit_duration_seconds",
                Unit::Seconds,
                "Time to answer a hit, by route."
            );
            describe_histogram!(
                "tower_redis_cache_miss_duration_seconds",
                Unit::Seconds,
                "Time to answer a miss, handler included, by route."
            );
            describe_histogram!(
                "tower_redis_cache_store_duration_seconds",
                Unit::Seconds,
                "Time to write an entry, by route."
            );
            describe_counter!(
                "tower_redis_cache_store_errors_total",
                "Store operations that failed, by operation and kind."
            );
            describe_counter!(
                "tower_redis_cache_invalidations_total",
                "Invalidations caused by writes, by outcome."
            );
            describe_gauge!(
                "tower_redis_cache_circuit_state",
                "The store's circuit breaker: 0 closed, 1 half-open, 2 open."
            );
            describe_gauge!(
                "tower_redis_cache_pending_invalidations",
                Unit::Count,
                "Invalidated keys waiting for replay."
            );
        });
    }
}

#[cfg(not(feature = "metrics"))]
mod imp {
    use super::*;

    /// Without the `metrics` feature: nothing to record.
    #[derive(Debug)]
    pub(crate) struct Routes;

    impl Routes {
        pub(crate) fn new(_: &[String]) -> Self {
            Self
        }
        #[inline]
        pub(crate) fn hit(&self, _: usize, _: Duration) {}
        #[inline]
        pub(crate) fn miss(&self, _: usize, _: Duration) {}
        #[inline]
        pub(crate) fn stored(&self, _: usize, _: Duration) {}
        #[inline]
        pub(crate) fn verified(&self, _: usize, _: Option<Duration>) {}
        #[inline]
        pub(crate) fn handler_called(&self, _: usize, _: HandlerCall) {}
        #[inline]
        pub(crate) fn bypass(&self, _: usize, _: Reason) {}
        #[inline]
        pub(crate) fn not_stored(&self, _: usize, _: Reason) {}
    }

    #[inline]
    pub(crate) fn store_error(_: Op, _: &'static str) {}
    #[inline]
    pub(crate) fn invalidation(_: Invalidated) {}
    #[inline]
    pub(crate) fn circuit(_: CircuitGauge) {}
    #[inline]
    pub(crate) fn probed(_: usize, _: Probed) {}
    #[inline]
    pub(crate) fn pending_invalidations(_: usize) {}
}

pub(crate) use imp::{circuit, invalidation, pending_invalidations, probed, store_error, Routes};

/// How often a repeated warning is let through.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(10);

/// Lets one warning through per [`WARN_EVERY`] and counts the ones it held
/// back, so a failing store logs a line every few seconds, not one per
/// request. One gate per call site, shared by the whole process.
#[derive(Debug)]
pub(crate) struct WarnGate {
    /// Milliseconds since [`epoch`] before which nothing is let through.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl WarnGate {
    pub(crate) const fn new() -> Self {
        Self {
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this warning may be logged, `n` being how many were
    /// held back since the last one; `None` when it must be dropped.
    pub(crate) fn pass(&self) -> Option<u64> {
        self.pass_at(epoch().elapsed())
    }

    fn pass_at(&self, now: Duration) -> Option<u64> {
        let now_ms = now.as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        let open = now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + WARN_EVERY.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok();
        if open {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Logs a WARN through a [`WarnGate`] declared at the call site, with a
/// `suppressed` field counting the warnings held back before it.
macro_rules! warn_limited {
    ($($field:tt)*) => {{
        static GATE: $crate::stats::telemetry::WarnGate = $crate::stats::telemetry::WarnGate::new();
        if let Some(suppressed) = GATE.pass() {
            tracing::warn!(suppressed, $($field)*);
        }
    }};
}
pub(crate) use warn_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_lets_one_warning_through_per_interval_and_counts_the_rest() {
        let gate = WarnGate::new();
        let at = |ms: u64| gate.pass_at(Duration::from_millis(ms));
        assert_eq!(at(1_000), Some(0));
        for ms in 1_001..1_051 {
            assert_eq!(at(ms), None);
        }
        assert_eq!(at(1_000 + WARN_EVERY.as_millis() as u64 - 1), None);
        assert_eq!(at(1_000 + WARN_EVERY.as_millis() as u64), Some(51));
        assert_eq!(at(1_000 + WARN_EVERY.as_millis() as u64 + 1), None);
    }
}
