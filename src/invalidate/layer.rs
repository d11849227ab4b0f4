use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::future::ResponseFuture;
use super::rules::Rules;
use crate::store::Store;

/// Applies the [`Invalidate`] middleware. See the [module docs](super).
#[derive(Clone)]
#[must_use]
pub struct InvalidateLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for InvalidateLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvalidateLayer")
            .field("rules", &self.shared.rules)
            .field("store", &self.shared.store.name())
            .finish()
    }
}

pub(crate) struct Shared {
    pub(crate) rules: Rules,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) counters: Counters,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) applied: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) skipped: AtomicU64,
}

/// Counts of an [`InvalidateLayer`]'s work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct InvalidationStats {
    /// Invalidations the store applied.
    pub applied: u64,
    /// Invalidations the store failed to apply (entries then live until their TTL).
    pub failed: u64,
    /// Matching requests whose response was not a success, so nothing was invalidated.
    pub skipped: u64,
}

impl InvalidateLayer {
    /// Applies `rules` to `store`.
    pub fn new(rules: Rules, store: impl Store) -> Self {
        Self::with_shared_store(rules, Arc::new(store))
    }

    /// Like [`InvalidateLayer::new`], with a store shared with a
    /// [`CacheLayer`](crate::CacheLayer).
    pub fn with_shared_store(rules: Rules, store: Arc<dyn Store>) -> Self {
        Self {
            shared: Arc::new(Shared {
                rules,
                store,
                counters: Counters::default(),
            }),
        }
    }

    /// What this layer has done so far.
    pub fn stats(&self) -> InvalidationStats {
        let c = &self.shared.counters;
        InvalidationStats {
            applied: c.applied.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            skipped: c.skipped.load(Ordering::Relaxed),
        }
    }
}

impl<S> Layer<S> for InvalidateLayer {
    type Service = Invalidate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Invalidate {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Middleware that invalidates cache entries after successful writes.
/// See the [module docs](super).
#[derive(Clone)]
pub struct Invalidate<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for Invalidate<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidate")
            .field("rules", &self.shared.rules)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Invalidate<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let invalidation = self.shared.rules.invalidation(&request);
        let future = self.inner.call(request);
        ResponseFuture::new(future, invalidation.map(|inv| (inv, self.shared.clone())))
    }
}
