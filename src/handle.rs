//! The operator handle: purge what a request would hit, bump a group, warm
//! entries, read stats and health. Made from the [`Policy`], so it uses the
//! same store and key layout as the layers.

use std::future::{poll_fn, Future};
use std::sync::Arc;

use http::{Request, Response};
use tower_service::Service;

use crate::policy::Policy;
use crate::stats::CacheStats;
use crate::store::{Invalidation, Store, StoreError, StoreHealth, VersionKey};

/// Operator actions on a policy's cache, for admin endpoints and jobs.
///
/// ```
/// use tower_redis_cache::{Policy, Route};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let policy = Policy::builder()
///     .route(Route::get("/persons/{id}").key("person:{id}"))
///     .route(Route::get("/persons").key("persons:list:v{version}:{query_hash}").versioned_by("persons:list"))
///     .build()?;
/// let handle = policy.handle();
/// let purged = handle.purge(&http::Request::get("/persons/7").body(())?).await?;
/// assert_eq!(purged, "app:person:7");
/// assert_eq!(handle.bump("persons:list").await?, "{app:persons:list}:ver");
/// assert!(handle.health().await.reachable);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct CacheHandle {
    policy: Policy,
}

/// Why an operator action did nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandleError {
    /// The request is not cached by any route (or bypasses the cache, for
    /// example because its scope reads nothing).
    NotCached,
    /// No cached route reads this group, or its name binds path params
    /// (purge a request of one of its routes instead).
    UnknownGroup(String),
    /// The group is versioned per scope and the request carries no scope.
    ScopeMissing,
    /// The store failed.
    Store(StoreError),
}

impl std::fmt::Display for HandleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotCached => write!(f, "the request is not served from the cache"),
            Self::UnknownGroup(group) => write!(
                f,
                "no cached route reads group `{group}`, or it binds path params (purge a request of its route instead)"
            ),
            Self::ScopeMissing => write!(f, "the request carries no value for the group's scope"),
            Self::Store(err) => write!(f, "{err}"),
        }
    }
}

impl std::error::Error for HandleError {}

impl From<StoreError> for HandleError {
    fn from(err: StoreError) -> Self {
        Self::Store(err)
    }
}

/// What [`CacheHandle::warm`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct WarmReport {
    /// Requests whose response was stored.
    pub stored: usize,
    /// Requests already served from the cache.
    pub already_cached: usize,
    /// Requests whose response could not be stored (not cached, not 200
    /// JSON, a store failure…).
    pub not_stored: usize,
    /// Requests the service failed.
    pub failed: usize,
}

/// The cache's health, for a health endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// The store's name: `memory`, `redis`.
    pub store: &'static str,
    /// Whether the store answered a ping.
    pub reachable: bool,
    /// The ping's error, when it failed.
    pub error: Option<String>,
    /// Circuit breaker and replay queue.
    pub details: StoreHealth,
    /// The in-process tier, when a route uses it.
    pub in_process: Option<InProcessHealth>,
}

/// The in-process tier's state (feature `tier`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct InProcessHealth {
    /// Whether invalidations are being received, so the tier serves hits.
    /// Off until the subscription is up, and after it dropped until it is
    /// up again.
    pub live: bool,
    /// Entries held (some may be void, awaiting eviction).
    pub entries: usize,
}

impl CacheHandle {
    pub(crate) fn new(policy: Policy) -> Self {
        Self { policy }
    }

    /// Purges the entry `request` would be served from, in the request's
    /// scope, and returns the key it invalidated. For a plain route that is
    /// the entry's key (a tombstone); for a versioned route, the group's
    /// version key (of the request's scope, for a per-scope group): the
    /// bump is race-free and reaches every query variant. The request is
    /// never sent anywhere, and it is read before the returned future
    /// starts, so a body that is not `Sync` still gives a `Send` future.
    pub fn purge<B>(
        &self,
        request: &Request<B>,
    ) -> impl Future<Output = Result<String, HandleError>> + Send + 'static {
        let purge = self.policy.purge_for(request);
        let store = self.policy.store().clone();
        async move {
            let (key, invalidation) = purge.ok_or(HandleError::NotCached)?;
            store.invalidate(&invalidation).await?;
            Ok(key)
        }
    }

    /// Bumps `group` for every scope at once; returns the version key.
    pub async fn bump(&self, group: &str) -> Result<String, HandleError> {
        let version = self
            .policy
            .group_bump::<()>(group, None)
            .ok_or_else(|| HandleError::UnknownGroup(group.to_owned()))?;
        apply_bump(self.policy.store().clone(), version).await
    }

    /// Bumps `group` for the scope `request` carries only (a tenant's
    /// lists) when the group is versioned per scope, for every scope
    /// otherwise; returns the version key. As with [`CacheHandle::purge`],
    /// the request is read before the future starts.
    pub fn bump_for<B>(
        &self,
        group: &str,
        request: &Request<B>,
    ) -> impl Future<Output = Result<String, HandleError>> + Send + 'static {
        let version = match self.policy.group_names().any(|(name, _)| name == group) {
            false => Err(HandleError::UnknownGroup(group.to_owned())),
            true => self
                .policy
                .group_bump(group, Some(request))
                .ok_or(HandleError::ScopeMissing),
        };
        let store = self.policy.store().clone();
        async move { apply_bump(store, version?).await }
    }

    /// Sends each request through `service` (a stack with a
    /// [`CacheLayer`](crate::CacheLayer) of this policy), so that the
    /// entries they key are filled; one at a time, so the handler sees no
    /// burst. Entries are bound to the host and forwarded headers of the
    /// request that stored them (see [what the key covers](https://github.com/tower-redis-cache/tower-redis-cache/blob/main/docs/key.md)):
    /// give the warm requests the `Host` your clients send.
    pub async fn warm<S, B, ResBody, I>(&self, mut service: S, requests: I) -> WarmReport
    where
        S: Service<Request<B>, Response = Response<ResBody>>,
        I: IntoIterator<Item = Request<B>>,
    {
        let mut report = WarmReport::default();
        for request in requests {
            if poll_fn(|cx| service.poll_ready(cx)).await.is_err() {
                report.failed += 1;
                continue;
            }
            let Ok(response) = service.call(request).await else {
                report.failed += 1;
                continue;
            };
            let status = response
                .headers()
                .get("cache-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if status.ends_with("; stored") {
                report.stored += 1;
            } else if status.contains("; hit") {
                report.already_cached += 1;
            } else {
                report.not_stored += 1;
            }
        }
        report
    }

    /// The per-route counters and the invalidation counts.
    pub fn stats(&self) -> CacheStats {
        self.policy.stats()
    }

    /// Pings the store and reports its breaker and replay queue.
    pub async fn health(&self) -> Health {
        let store = self.policy.store();
        let ping = store.ping().await;
        Health {
            store: store.name(),
            reachable: ping.is_ok(),
            error: ping.err().map(|e| e.to_string()),
            details: store.health(),
            in_process: self.in_process(),
        }
    }

    /// Waits, for at most `within`, until no invalidation waits for replay
    /// (the ones the store did not confirm, replayed in the background), and
    /// returns how many keys still wait (0: every write's invalidation is
    /// applied). What a server calls on shutdown once its requests in
    /// flight have answered, so that its last writes' invalidations are not
    /// lost with the process.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_redis_cache::{Policy, Route};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_redis_cache::ConfigError> {
    /// # let policy = Policy::builder().route(Route::get("/a").key("a")).build()?;
    /// let left = policy.handle().drain(Duration::from_secs(10)).await;
    /// assert_eq!(left, 0);
    /// # Ok(()) }
    /// ```
    pub async fn drain(&self, within: std::time::Duration) -> usize {
        let until = tokio::time::Instant::now() + within;
        loop {
            let pending = self.policy.store().health().pending_invalidations;
            if pending == 0 || tokio::time::Instant::now() >= until {
                return pending;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// The in-process tier's state, when a route uses it.
    pub fn in_process(&self) -> Option<InProcessHealth> {
        self.policy.in_process_health()
    }

    /// The version groups of the policy, and whether each is per scope.
    pub fn groups(&self) -> Vec<(String, bool)> {
        self.policy
            .group_names()
            .map(|(name, per_scope)| (name.to_owned(), per_scope))
            .collect()
    }
}

async fn apply_bump(store: Arc<dyn Store>, version: VersionKey) -> Result<String, HandleError> {
    let key = version.key().to_owned();
    let invalidation = Invalidation::new(Vec::new(), vec![version]);
    store.invalidate(&invalidation).await?;
    Ok(key)
}
