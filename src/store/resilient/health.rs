//! What a store reports of its health.

use super::breaker::Circuit;

/// A store's health, for a health endpoint and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct StoreHealth {
    /// The circuit breaker's state.
    pub circuit: Circuit,
    /// Keys of invalidations waiting for replay.
    pub pending_invalidations: usize,
    /// True while the cache is off because the invalidation queue overflowed.
    pub overflowed: bool,
    /// Operations sent to the store.
    pub operations: u64,
    /// Operations that failed or timed out.
    pub failures: u64,
    /// The server's persistence when the store could read it (`none`,
    /// `rdb`, `aof`, `rdb+aof`). With persistence, a restart reloads old
    /// data; a `RedisStore` over a URL or Sentinel never serves entries written before it.
    pub persistence: Option<&'static str>,
    /// A guarantee the store cannot keep, and why: e.g. a Redis user that
    /// may not run `INFO` (see the least-privilege section of
    /// [deploying](https://github.com/tower-redis-cache/tower-redis-cache/blob/main/docs/deploying.md#least-privilege)).
    pub degraded: Option<&'static str>,
}
