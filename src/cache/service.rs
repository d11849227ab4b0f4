//! The cache layer's service: it decides what a request does with the
//! cache (pass, bypass, look up) and hands the rest to its future.

use std::task::{Context, Poll};

use http::{Method, Request, Response};
use http_body::Body;
use tower_service::Service;

use super::body::ResponseBody;
use super::future::ResponseFuture;
use super::request::{Call, Ctx};
use crate::invalidate::Invalidate;
use crate::key::served::{strip_original_query, with_query};
use crate::policy::Decision;
use crate::reason::Reason;

/// Middleware that serves cached GET/HEAD routes from a store, fills it on
/// a miss, and applies the invalidations of successful writes. See the
/// [module docs](super) for details.
#[derive(Clone)]
pub struct Cache<S> {
    // Holds the policy too: one reference count per clone (services are
    // cloned per request, and threads contend on that count).
    pub(crate) inner: Invalidate<S>,
}

impl<S> std::fmt::Debug for Cache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("policy", self.inner.policy())
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Cache<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Body + Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<
        <Invalidate<S> as Service<Request<ReqBody>>>::Future,
        Invalidate<S>,
        ReqBody,
        ResBody,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let head = request.method() == Method::HEAD;
        let policy = self.inner.policy();
        let decision = match policy.plan(&request) {
            // The key cannot cover a body: a GET or HEAD with one (whatever
            // its headers say) bypasses.
            Decision::Cache { route, .. } if !is_empty(request.body()) => Decision::Bypass {
                route,
                reason: Reason::RequestBody,
            },
            decision => decision,
        };
        match decision {
            Decision::Pass => ResponseFuture::pass(self.inner.call(request)),
            Decision::Bypass { route, reason } => {
                let why = crate::reason::HandlerCall::Bypass(reason);
                policy.stats_ref().handler_called(route, why);
                let ctx = Ctx::bypassing(policy, route, head, reason);
                ResponseFuture::bypass(self.inner.call(request), ctx)
            }
            Decision::Cache {
                route,
                key,
                binding,
                query,
            } => {
                let mut request = request;
                strip_original_query(&mut request, query.as_deref(), |original| {
                    policy.stripped_query(route, original)
                });
                if let Some(query) = query {
                    if let Some(uri) = with_query(request.uri(), &query) {
                        *request.uri_mut() = uri;
                    }
                }
                // The store answers before the inner service may be called,
                // and a hit never calls it. The readiness `poll_ready`
                // reserved (a concurrency permit, a buffer slot) is given
                // back at once, with the service that holds it; the future
                // readies an unreserved clone only on a miss, so a hit
                // holds none of the inner capacity while the store answers.
                // (The released service's policy becomes the request's: no
                // shared reference count is touched for it.)
                let unreserved = self.inner.clone();
                let (reserved, policy) =
                    std::mem::replace(&mut self.inner, unreserved).into_parts();
                drop(reserved);
                let mut ctx = Ctx::looking_up(policy, route, head, binding, request.headers());
                let key = match ctx.local_hit(key) {
                    Ok(response) => return ResponseFuture::served(response),
                    Err(key) => key,
                };
                let lookup = ctx.look_up(key);
                let service = self.inner.clone();
                ResponseFuture::lookup(lookup, Call { service, request }, ctx)
            }
        }
    }
}

/// Whether a request body is known to be empty: at its end already, or
/// sized zero. A body of unknown length (HTTP/2 DATA frames, a chunked
/// upload, an in-process stream) is not, whatever the headers say.
fn is_empty<B: Body>(body: &B) -> bool {
    body.is_end_stream() || body.size_hint().exact() == Some(0)
}
