//! An invalidation rule as the user declares it.

use std::time::Duration;

#[cfg(doc)]
use super::Route;

/// What a successful write invalidates: the entries of cached routes it
/// purges and the version groups it bumps. Namespace, scope and key layout
/// come from the routes.
///
/// # The write must be readable when its response returns
///
/// The invalidation runs when the handler returns. Data the write changed
/// must be readable by the read handlers by then: a read that lands in a
/// gap after it (a read replica that lags, a transaction a layer outside
/// the cache commits after the response) fetches the old data and stores
/// it under a valid guard, for the entry's whole TTL. Where reads lag,
/// [`Rule::again_after`] invalidates a second time once the lag passed.
///
/// ```
/// use tower_redis_cache::Rule;
///
/// let rule = Rule::new("PATCH|DELETE /persons/{id}")
///     .purge("GET /persons/{id}")
///     .bump("persons:list");
/// # let _ = rule;
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Rule {
    pub(super) route: String,
    pub(super) purges: Vec<String>,
    pub(super) bumps: Vec<String>,
    pub(super) again_after: Option<Duration>,
    pub(super) probe: Option<f64>,
}

impl Rule {
    /// A rule for `METHOD[|METHOD…] /path/{pattern}`, such as
    /// `POST /persons` or `PATCH|DELETE /persons/{id}`.
    pub fn new(route: &str) -> Self {
        Self {
            route: route.to_owned(),
            purges: Vec::new(),
            bumps: Vec::new(),
            again_after: None,
            probe: None,
        }
    }

    /// Probes `rate` (0 to 1) of this rule's writes, overriding
    /// [`PolicyBuilder::probe_writes`](crate::PolicyBuilder::probe_writes):
    /// about 1 s and again 10 s after the store confirmed a sampled write's
    /// invalidation, a task reads every key it purged or bumped, writing
    /// nothing, and checks that the store no longer serves what the write
    /// replaced (no entry stored before the invalidation at a purged key;
    /// no bumped version below the one the bump made). Counted in
    /// [`CacheStats::probes`](crate::CacheStats::probes) and the metric
    /// `tower_redis_cache_write_probes_total`; each stale probe is logged
    /// at WARN with its key and timing. The write does not wait for it;
    /// a probe costs one `GET` per key at each check, off every request's
    /// path.
    ///
    /// ```
    /// use tower_redis_cache::Rule;
    ///
    /// let rule = Rule::new("PATCH /persons/{id}")
    ///     .purge("GET /persons/{id}")
    ///     .probe(0.01);
    /// # let _ = rule;
    /// ```
    pub fn probe(mut self, rate: f64) -> Self {
        self.probe = Some(rate);
        self
    }

    /// Invalidates a second time `delay` after the first (a "delayed
    /// double delete"), for reads that see a write late: a read replica
    /// that lags its primary by up to `delay`, an outbox applied shortly
    /// after. An entry a read stored from lagging data in between is
    /// purged then. The second invalidation is sent from a task of its own
    /// (queued for replay if the store fails), also when the write's
    /// future is dropped; the response does not wait for it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_redis_cache::Rule;
    ///
    /// let rule = Rule::new("PATCH /persons/{id}")
    ///     .purge("GET /persons/{id}")
    ///     .again_after(Duration::from_millis(500));
    /// # let _ = rule;
    /// ```
    pub fn again_after(mut self, delay: Duration) -> Self {
        self.again_after = Some(delay);
        self
    }

    /// Purges the entry the cached route (`GET /persons/{id}`, or just the
    /// pattern) keys for the write's params and scope. The write's path must
    /// bind every param of that route's key. Purging a versioned route bumps
    /// its group.
    pub fn purge(mut self, route: &str) -> Self {
        self.purges.push(route.to_owned());
        self
    }

    /// Bumps the version of this group (see [`Route::versioned_by`]); for a
    /// group versioned [per scope](Route::per_scope), the write's scope only.
    pub fn bump(mut self, group: &str) -> Self {
        self.bumps.push(group.to_owned());
        self
    }
}
