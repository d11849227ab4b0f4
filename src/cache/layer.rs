use std::sync::Arc;

use tower_layer::Layer;

use super::service::{Cache, Shared};
use crate::policy::Policy;
use crate::stats::CacheStats;
use crate::store::Store;

/// Applies the [`Cache`] middleware. See the [module docs](super).
#[derive(Clone)]
#[must_use]
pub struct CacheLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheLayer")
            .field("policy", &self.shared.policy)
            .field("store", &self.shared.store.name())
            .finish()
    }
}

impl CacheLayer {
    /// Caches the routes of `policy` in `store`.
    pub fn new(policy: Policy, store: impl Store) -> Self {
        Self::with_shared_store(policy, Arc::new(store))
    }

    /// Like [`CacheLayer::new`], with a store shared with other layers (an
    /// [`InvalidateLayer`](crate::InvalidateLayer), a health endpoint).
    pub fn with_shared_store(policy: Policy, store: Arc<dyn Store>) -> Self {
        let stats = CacheStats::new(policy.route_labels());
        Self {
            shared: Arc::new(Shared {
                policy,
                store,
                stats,
                flights: Default::default(),
            }),
        }
    }

    /// The per-route counters of this layer and every service it made.
    pub fn stats(&self) -> CacheStats {
        self.shared.stats.clone()
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Cache {
            inner,
            shared: self.shared.clone(),
        }
    }
}
