//! The [`InvalidateLayer`] and its service: writes matched against the
//! policy's rules.

use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::future::{Owed, ResponseFuture};
use crate::policy::Policy;

/// Applies the [`Invalidate`] middleware. See the [module docs](super).
#[derive(Debug, Clone)]
#[must_use]
pub struct InvalidateLayer {
    policy: Policy,
}

impl InvalidateLayer {
    /// Applies the rules of `policy` to its store.
    pub fn new(policy: Policy) -> Self {
        Self { policy }
    }
}

impl<S> Layer<S> for InvalidateLayer {
    type Service = Invalidate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Invalidate::new(inner, self.policy.clone())
    }
}

/// Middleware that invalidates cache entries after successful writes.
/// See the [module docs](super).
#[derive(Debug, Clone)]
pub struct Invalidate<S> {
    inner: S,
    policy: Policy,
}

/// Set on a request by the outermost layer that will fully invalidate for
/// it, so that a second layer of the same policy further in does not repeat
/// it.
#[derive(Clone)]
struct Claimed(Policy);

impl<S> Invalidate<S> {
    pub(crate) fn new(inner: S, policy: Policy) -> Self {
        Self { inner, policy }
    }

    /// The policy, shared with the cache layer wrapping this one.
    pub(crate) fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The inner service and the policy.
    pub(crate) fn into_parts(self) -> (S, Policy) {
        (self.inner, self.policy)
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

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let claimed = request
            .extensions()
            .get::<Claimed>()
            .is_some_and(|c| c.0.same(&self.policy));
        let owed = match claimed {
            true => None,
            false => self.policy.invalidation(&request),
        };
        // A layer further in may read the scope this one could not (it sits
        // inside authentication): leave the write to it too.
        if owed.as_ref().is_some_and(|owed| owed.complete) {
            request
                .extensions_mut()
                .insert(Claimed(self.policy.clone()));
        }
        let future = self.inner.call(request);
        let owed = owed.map(|owed| Owed::new(owed, self.policy.clone()));
        ResponseFuture::new(future, owed)
    }
}
