//! Per-route counters, readable in-process (for a `/cache/stats` endpoint),
//! and their export through the `metrics` facade and `tracing`
//! ([`telemetry`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub(crate) mod telemetry;

use telemetry::{Invalidated, Op};

use crate::reason::{HandlerCall, Reason};

/// Each route's counters are kept in this many copies, one per group of
/// threads, each on its own cache lines: threads serving hits at once do
/// not contend on one counter. A snapshot sums them.
const SHARDS: usize = 8;

/// The copy of the counters this thread updates.
fn shard() -> usize {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) as usize % SHARDS;
    }
    SHARD.with(|shard| *shard)
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Counters {
    hits: AtomicU64,
    in_process_hits: AtomicU64,
    misses: AtomicU64,
    stores: AtomicU64,
    errors: AtomicU64,
    skips: [AtomicU64; Reason::ALL.len()],
    hit_nanos: AtomicU64,
    miss_nanos: AtomicU64,
    verified: AtomicU64,
    verify_mismatches: AtomicU64,
    calls: [AtomicU64; HandlerCall::COUNT],
}

/// A route's verification mismatches: the last one, how stale each entry
/// found was, and the gate of their warnings.
#[derive(Debug)]
struct Mismatches {
    /// Milliseconds since the Unix epoch; 0 for never.
    last_ms: AtomicU64,
    /// Mismatches by the age of the entry found, per [`STALENESS_BOUNDS`].
    staleness: [AtomicU64; STALENESS_BOUNDS.len()],
    warn: telemetry::WarnGate,
}

/// The upper bounds of the buckets [`RouteStats::mismatch_staleness`]
/// counts in; the last takes every age.
pub(crate) const STALENESS_BOUNDS: [Duration; 6] = [
    Duration::from_secs(1),
    Duration::from_secs(10),
    Duration::from_secs(60),
    Duration::from_secs(600),
    Duration::from_secs(3600),
    Duration::MAX,
];

/// How one write probe ([`Rule::probe`](crate::Rule::probe)) check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probed {
    /// The store no longer serves what the write replaced.
    Consistent,
    /// It still does.
    Stale,
    /// The store could not be read.
    Unread,
}

/// The write probes of one check time (1 s or 10 s after the write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ProbeCounts {
    /// Checks that found the store no longer serving what the write
    /// replaced.
    pub consistent: u64,
    /// Checks that found it still serving it (each logged at WARN).
    pub stale: u64,
    /// Checks that could not read the store.
    pub unread: u64,
}

/// Counts of the write probes ([`Rule::probe`](crate::Rule::probe)), by
/// when they checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ProbeStats {
    /// Checked about 1 s after the write's invalidation.
    pub after_1s: ProbeCounts,
    /// Checked about 10 s after it.
    pub after_10s: ProbeCounts,
}

/// Counters for every route of a policy. Cheap to clone; all clones share
/// the same counters.
#[derive(Debug, Clone)]
pub struct CacheStats {
    labels: Arc<[String]>,
    counters: Arc<[Counters]>,
    invalidations: Arc<InvalidationCounters>,
    probes: Arc<[[AtomicU64; 3]; 2]>,
    mismatches: Arc<[Mismatches]>,
    metrics: Arc<telemetry::Routes>,
}

#[derive(Debug, Default)]
struct InvalidationCounters {
    applied: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    unscoped: AtomicU64,
    unparsed: AtomicU64,
}

/// Counts of the invalidations writes caused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct InvalidationStats {
    /// Invalidations the store applied.
    pub applied: u64,
    /// Invalidations the store failed to apply (logged; see the store's
    /// replay queue).
    pub failed: u64,
    /// Writes that matched a rule but did not succeed (not 2xx), so nothing
    /// was invalidated.
    pub skipped: u64,
    /// Successful writes whose purge of a scoped entry was left out because
    /// the route's scope read nothing on the write request.
    pub unscoped: u64,
    /// Successful writes whose purge or bump was left out because a typed
    /// param or scope value of the write's URL did not parse (the entry it
    /// would name cannot exist).
    pub unparsed: u64,
}

/// A snapshot of one route's counters.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RouteStats {
    /// The route, as `GET /persons/{id}`.
    pub route: String,
    /// Responses served from the cache.
    pub hits: u64,
    /// Of the hits, those served from the in-process tier (no round trip).
    pub in_process_hits: u64,
    /// Lookups that found nothing usable.
    pub misses: u64,
    /// Responses written to the cache.
    pub stores: u64,
    /// Store operations that failed or timed out.
    pub errors: u64,
    /// Responses neither served from nor stored into the cache, by reason.
    pub skips: Vec<(Reason, u64)>,
    /// Calls of the route's handler, by why each was made (the kinds
    /// never seen left out).
    pub handler_calls: Vec<(HandlerCall, u64)>,
    /// `hits / (hits + misses)`, 0 when there was no lookup.
    pub hit_rate: f64,
    /// Mean time to answer a hit.
    pub mean_hit_latency: Duration,
    /// Mean time to answer a miss, handler included.
    pub mean_miss_latency: Duration,
    /// Hits checked against the handler ([`Route::verify`](crate::Route::verify)).
    pub verified: u64,
    /// Of those, the hits whose entry differed from the handler's response.
    pub verify_mismatches: u64,
    /// When the last mismatch was found.
    pub last_mismatch: Option<SystemTime>,
    /// Of the verified hits, the share whose entry matched the handler's
    /// response; `None` before the first.
    pub verify_match_ratio: Option<f64>,
    /// The mismatches by how long the entry found had been stored (an
    /// upper bound of how long it had been stale), as (bucket upper bound,
    /// count): 1 s, 10 s, 1 min, 10 min, 1 h, then every age
    /// (`Duration::MAX`).
    pub mismatch_staleness: Vec<(Duration, u64)>,
}

impl CacheStats {
    pub(crate) fn new(labels: Vec<String>) -> Self {
        let counters = (0..labels.len() * SHARDS)
            .map(|_| Counters::default())
            .collect();
        Self {
            metrics: Arc::new(telemetry::Routes::new(&labels)),
            mismatches: labels
                .iter()
                .map(|_| Mismatches {
                    last_ms: AtomicU64::new(0),
                    staleness: Default::default(),
                    warn: telemetry::WarnGate::new(),
                })
                .collect(),
            labels: labels.into(),
            counters,
            invalidations: Arc::default(),
            probes: Arc::default(),
        }
    }

    /// A write probe's check `window` (0: after 1 s, 1: after 10 s) ended
    /// as `outcome`.
    pub(crate) fn probed(&self, window: usize, outcome: Probed) {
        self.probes[window][outcome as usize].fetch_add(1, Ordering::Relaxed);
        telemetry::probed(window, outcome);
    }

    /// The write probes so far ([`Rule::probe`](crate::Rule::probe)).
    pub fn probes(&self) -> ProbeStats {
        let counts = |window: &[AtomicU64; 3]| ProbeCounts {
            consistent: window[Probed::Consistent as usize].load(Ordering::Relaxed),
            stale: window[Probed::Stale as usize].load(Ordering::Relaxed),
            unread: window[Probed::Unread as usize].load(Ordering::Relaxed),
        };
        ProbeStats {
            after_1s: counts(&self.probes[0]),
            after_10s: counts(&self.probes[1]),
        }
    }

    /// This thread's copy of `route`'s counters.
    fn counters(&self, route: usize) -> &Counters {
        &self.counters[route * SHARDS + shard()]
    }

    pub(crate) fn invalidation_applied(&self) {
        self.invalidations.applied.fetch_add(1, Ordering::Relaxed);
        telemetry::invalidation(Invalidated::Applied);
    }

    pub(crate) fn invalidation_failed(&self) {
        self.invalidations.failed.fetch_add(1, Ordering::Relaxed);
        telemetry::invalidation(Invalidated::Failed);
    }

    pub(crate) fn invalidation_skipped(&self) {
        self.invalidations.skipped.fetch_add(1, Ordering::Relaxed);
        telemetry::invalidation(Invalidated::Skipped);
    }

    pub(crate) fn invalidation_unscoped(&self) {
        self.invalidations.unscoped.fetch_add(1, Ordering::Relaxed);
        telemetry::invalidation(Invalidated::Unscoped);
    }

    pub(crate) fn invalidation_unparsed(&self) {
        self.invalidations.unparsed.fetch_add(1, Ordering::Relaxed);
        telemetry::invalidation(Invalidated::Unparsed);
    }

    /// The invalidations writes caused so far.
    pub fn invalidations(&self) -> InvalidationStats {
        let c = &self.invalidations;
        InvalidationStats {
            applied: c.applied.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            skipped: c.skipped.load(Ordering::Relaxed),
            unscoped: c.unscoped.load(Ordering::Relaxed),
            unparsed: c.unparsed.load(Ordering::Relaxed),
        }
    }

    /// A hit, from the in-process tier when `local`.
    pub(crate) fn hit(&self, route: usize, took: Duration, local: bool) {
        let c = self.counters(route);
        c.hits.fetch_add(1, Ordering::Relaxed);
        if local {
            c.in_process_hits.fetch_add(1, Ordering::Relaxed);
        }
        c.hit_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        self.metrics.hit(route, took);
    }

    pub(crate) fn miss(&self, route: usize, took: Duration) {
        let c = self.counters(route);
        c.misses.fetch_add(1, Ordering::Relaxed);
        c.miss_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        self.metrics.miss(route, took);
    }

    /// An entry written; `took` is the write alone.
    pub(crate) fn stored(&self, route: usize, took: Duration) {
        self.counters(route).stores.fetch_add(1, Ordering::Relaxed);
        self.metrics.stored(route, took);
    }

    /// A store operation failed; `kind` is [`StoreError::kind`](crate::store::StoreError::kind).
    pub(crate) fn error(&self, route: usize, op: Op, kind: &'static str) {
        self.counters(route).errors.fetch_add(1, Ordering::Relaxed);
        telemetry::store_error(op, kind);
    }

    /// A hit checked against the handler; `stale_for` when they differed:
    /// how long the entry had been stored. True when a warning about it
    /// may be logged (once per route every 10 s).
    pub(crate) fn verified(&self, route: usize, stale_for: Option<Duration>) -> bool {
        let c = self.counters(route);
        c.verified.fetch_add(1, Ordering::Relaxed);
        self.metrics.verified(route, stale_for);
        let Some(stale_for) = stale_for else {
            return false;
        };
        c.verify_mismatches.fetch_add(1, Ordering::Relaxed);
        let state = &self.mismatches[route];
        let bucket = STALENESS_BOUNDS
            .iter()
            .position(|bound| stale_for <= *bound)
            .unwrap_or(STALENESS_BOUNDS.len() - 1);
        state.staleness[bucket].fetch_add(1, Ordering::Relaxed);
        state
            .last_ms
            .store(crate::clock::unix_ms(), Ordering::Relaxed);
        state.warn.pass().is_some()
    }

    /// The route's handler was called, for `why`.
    pub(crate) fn handler_called(&self, route: usize, why: HandlerCall) {
        self.counters(route).calls[why.index()].fetch_add(1, Ordering::Relaxed);
        self.metrics.handler_called(route, why);
    }

    /// A request that did not use the cache.
    pub(crate) fn bypass(&self, route: usize, reason: Reason) {
        self.counters(route).skips[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.metrics.bypass(route, reason);
    }

    /// A miss whose response was not stored.
    pub(crate) fn not_stored(&self, route: usize, reason: Reason) {
        self.counters(route).skips[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.metrics.not_stored(route, reason);
    }

    /// The counters of every route, in policy order.
    pub fn snapshot(&self) -> Vec<RouteStats> {
        self.labels
            .iter()
            .zip(self.counters.chunks(SHARDS))
            .map(|(label, shards)| {
                let sum = |read: &dyn Fn(&Counters) -> &AtomicU64| -> u64 {
                    shards.iter().map(|c| read(c).load(Ordering::Relaxed)).sum()
                };
                let (hits, misses) = (sum(&|c| &c.hits), sum(&|c| &c.misses));
                let mean =
                    |nanos: u64, n: u64| Duration::from_nanos(nanos.checked_div(n).unwrap_or(0));
                RouteStats {
                    route: label.clone(),
                    hits,
                    in_process_hits: sum(&|c| &c.in_process_hits),
                    misses,
                    stores: sum(&|c| &c.stores),
                    errors: sum(&|c| &c.errors),
                    skips: Reason::ALL
                        .iter()
                        .map(|r| (*r, sum(&|c| &c.skips[r.index()])))
                        .filter(|(_, n)| *n > 0)
                        .collect(),
                    handler_calls: (0..HandlerCall::COUNT)
                        .map(|i| (HandlerCall::at(i), sum(&|c| &c.calls[i])))
                        .filter(|(_, n)| *n > 0)
                        .collect(),
                    hit_rate: if hits + misses == 0 {
                        0.0
                    } else {
                        hits as f64 / (hits + misses) as f64
                    },
                    mean_hit_latency: mean(sum(&|c| &c.hit_nanos), hits),
                    mean_miss_latency: mean(sum(&|c| &c.miss_nanos), misses),
                    verified: sum(&|c| &c.verified),
                    verify_mismatches: sum(&|c| &c.verify_mismatches),
                    last_mismatch: None,
                    verify_match_ratio: None,
                    mismatch_staleness: Vec::new(),
                }
            })
            .zip(self.mismatches.iter())
            .map(|(mut stats, mismatches)| {
                let last_ms = mismatches.last_ms.load(Ordering::Relaxed);
                stats.last_mismatch =
                    (last_ms > 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_millis(last_ms));
                stats.verify_match_ratio = (stats.verified > 0).then(|| {
                    stats.verified.saturating_sub(stats.verify_mismatches) as f64
                        / stats.verified as f64
                });
                stats.mismatch_staleness = mismatches
                    .staleness
                    .iter()
                    .zip(STALENESS_BOUNDS)
                    .map(|(n, bound)| (bound, n.load(Ordering::Relaxed)))
                    .collect();
                stats
            })
            .collect()
    }

    /// The snapshot of one route, by its label (`GET /persons/{id}`).
    pub fn route(&self, label: &str) -> Option<RouteStats> {
        self.snapshot().into_iter().find(|r| r.route == label)
    }
}

#[cfg(test)]
mod tests {
    use super::Reason;

    #[test]
    fn all_lists_the_variants_in_declaration_order() {
        for (position, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), position, "{reason:?}");
        }
    }
}
