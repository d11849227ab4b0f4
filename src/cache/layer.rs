//! The [`CacheLayer`]: wraps a service in [`Cache`] with one policy.

use tower_layer::Layer;

use super::service::Cache;
use crate::invalidate::Invalidate;
use crate::policy::Policy;
use crate::stats::CacheStats;

/// Applies the [`Cache`] middleware. See the [module docs](super).
#[derive(Debug, Clone)]
#[must_use]
pub struct CacheLayer {
    policy: Policy,
}

impl CacheLayer {
    /// Caches the routes of `policy` in its store and applies its rules to
    /// the writes that pass through.
    pub fn new(policy: Policy) -> Self {
        Self { policy }
    }

    /// The per-route counters of every layer made from this policy.
    pub fn stats(&self) -> CacheStats {
        self.policy.stats()
    }

    /// The operator handle of the policy.
    pub fn handle(&self) -> crate::CacheHandle {
        self.policy.handle()
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Cache {
            inner: Invalidate::new(inner, self.policy.clone()),
        }
    }
}
