//! The one configuration of the cache: store, namespace, cached routes,
//! version groups and the invalidation rules of writes. Both layers and the
//! operator handle are made from it, so they cannot disagree.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Request};

use crate::flight::FlightTable;
use crate::key::{InputRules, Layout};
use crate::routes::RouteTable;
use crate::stats::CacheStats;
use crate::store::{CacheKey, Store};

mod build;
mod compile_rule;
mod compiled;
mod hedge;
mod plan;
mod route;
mod rule;
#[cfg(test)]
mod tests;
mod tier;

pub use build::PolicyBuilder;
pub(crate) use compiled::{CompiledRoute, Despite};
use compiled::{CompiledRule, Group};
pub(crate) use plan::{Decision, WriteInvalidation};
pub use route::Route;
pub use rule::Rule;

/// Default cap on a stored body: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// How long a miss waits, by default, for another process's fill of the
/// entry (see [`PolicyBuilder::lease_wait`]).
pub const DEFAULT_LEASE_WAIT: Duration = Duration::from_secs(1);

/// Bodies longer than this are stored compressed, by default, when the
/// `compression` feature is on (1 KiB); without it, none is.
#[cfg(feature = "compression")]
pub const DEFAULT_COMPRESS_OVER: usize = 1 << 10;
#[cfg(not(feature = "compression"))]
const DEFAULT_COMPRESS_OVER: usize = usize::MAX;

/// The whole configuration, built with [`Policy::builder`]: the store, the
/// namespace, the cached routes and the rules of writes.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_cache::{Policy, Route, Rule};
///
/// let policy = Policy::builder()
///     .namespace("app")
///     .route(Route::get("/persons/{id}").key("person:{id}").ttl(Duration::from_secs(300)))
///     .on(Rule::new("PATCH /persons/{id}").purge("GET /persons/{id}"))
///     .build()?;
/// assert_eq!(policy.namespace(), "app");
///
/// let err = Policy::builder()
///     .route(Route::get("/persons/{id}").key("person:{id}"))
///     .on(Rule::new("PATCH /persons/{id}").purge("GET /persn/{id}"))
///     .build()
///     .unwrap_err();
/// assert!(err.to_string().contains("/persn/{id}"));
/// # Ok::<(), tower_redis_cache::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Policy {
    inner: Arc<PolicyInner>,
}

struct PolicyInner {
    coding: crate::coding::Coding,
    layout: Layout,
    inputs: InputRules,
    per_response: Vec<HeaderName>,
    max_body_bytes: usize,
    lease_wait: Duration,
    compress_over: usize,
    routes: Vec<CompiledRoute>,
    table: RouteTable,
    groups: Vec<Group>,
    rules: Vec<CompiledRule>,
    rule_table: RouteTable,
    store: Arc<dyn Store>,
    stats: CacheStats,
    flights: FlightTable,
    background: crate::background::Background,
    tier: tier::Attached,
}

impl std::fmt::Debug for PolicyInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("namespace", &self.layout.namespace())
            .field("routes", &self.routes.len())
            .field("rules", &self.rules.len())
            .field("store", &self.store.name())
            .field("tier", &self.tier)
            .finish()
    }
}

impl Policy {
    /// The namespace every key starts with.
    pub fn namespace(&self) -> &str {
        self.inner.layout.namespace()
    }

    /// The largest body that is stored; larger ones stream through.
    pub fn max_body_bytes(&self) -> usize {
        self.inner.max_body_bytes
    }

    /// How long a miss waits for another process's fill.
    pub(crate) fn lease_wait(&self) -> Duration {
        self.inner.lease_wait
    }

    /// Bodies longer than this are stored compressed (`usize::MAX`: never).
    pub(crate) fn compress_over(&self) -> usize {
        self.inner.compress_over
    }

    /// The coding compressed entries are stored in.
    pub(crate) fn coding(&self) -> crate::coding::Coding {
        self.inner.coding
    }

    /// Route labels (`GET /persons/{id}`), in declaration order.
    pub fn route_labels(&self) -> Vec<String> {
        self.inner.routes.iter().map(|r| r.label.clone()).collect()
    }

    /// The per-route counters and the invalidation counts, shared by every
    /// layer made from this policy.
    pub fn stats(&self) -> CacheStats {
        self.inner.stats.clone()
    }

    /// The operator handle: purge, bump, warm, stats, health.
    pub fn handle(&self) -> crate::CacheHandle {
        crate::CacheHandle::new(self.clone())
    }

    /// The key `request` would be cached under, or `None` when it is not
    /// cached (no route, a method other than GET/HEAD, or a bypass such as
    /// credentials on an unscoped route). Useful to check a policy.
    ///
    /// ```
    /// use http::Request;
    /// use tower_redis_cache::{store::CacheKey, Policy, Route};
    ///
    /// let policy = Policy::builder()
    ///     .route(Route::get("/persons/{id}").key("person:{id}"))
    ///     .build()?;
    /// let request = Request::get("/persons/1:x").body(())?;
    /// assert_eq!(policy.key_for(&request), Some(CacheKey::Plain("app:person:1%3Ax".into())));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn key_for<B>(&self, request: &Request<B>) -> Option<CacheKey> {
        match self.plan(request) {
            Decision::Cache { key, .. } => Some(key),
            _ => None,
        }
    }

    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub(crate) fn stats_ref(&self) -> &CacheStats {
        &self.inner.stats
    }

    pub(crate) fn flights(&self) -> &FlightTable {
        &self.inner.flights
    }

    /// Work that hits hand off to run after them.
    pub(crate) fn background(&self) -> &crate::background::Background {
        &self.inner.background
    }

    pub(crate) fn route(&self, index: usize) -> &CompiledRoute {
        &self.inner.routes[index]
    }

    pub(crate) fn same(&self, other: &Policy) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Response headers never stored: they belong to one response (a
    /// request id), not to the entry.
    pub(crate) fn per_response(&self) -> &[HeaderName] {
        &self.inner.per_response
    }
}
