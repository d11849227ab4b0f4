use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use crate::policy::Policy;
use crate::store::{Invalidation, StoreFuture};

pin_project! {
    /// Response future of [`Invalidate`](super::Invalidate).
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        Inner {
            #[pin]
            future: F,
            pending: Option<(Invalidation, Policy)>,
        },
        // The response waits until the store applied the invalidation.
        Invalidating {
            apply: StoreFuture<()>,
            response: Option<Response<B>>,
            invalidation: Invalidation,
            policy: Policy,
        },
        Done,
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn new(future: F, pending: Option<(Invalidation, Policy)>) -> Self {
        Self {
            state: State::Inner { future, pending },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Inner { future, pending } => {
                    let response = ready!(future.poll(cx))?;
                    let Some((invalidation, policy)) = pending.take() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    };
                    if !response.status().is_success() {
                        policy.stats_ref().invalidation_skipped();
                        tracing::debug!(
                            status = response.status().as_u16(),
                            "write failed; nothing invalidated"
                        );
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    }
                    let apply = policy.store().invalidate(&invalidation);
                    this.state.set(State::Invalidating {
                        apply,
                        response: Some(response),
                        invalidation,
                        policy,
                    });
                }
                StateProj::Invalidating {
                    apply,
                    response,
                    invalidation,
                    policy,
                } => {
                    let applied = ready!(apply.as_mut().poll(cx));
                    let actions = Actions(invalidation);
                    match applied {
                        Ok(()) => {
                            policy.stats_ref().invalidation_applied();
                            tracing::debug!(actions = %actions, "cache invalidated");
                        }
                        Err(err) => {
                            policy.stats_ref().invalidation_failed();
                            tracing::warn!(actions = %actions, error = %err, "cache invalidation failed");
                        }
                    }
                    let response = response.take();
                    this.state.set(State::Done);
                    if let Some(response) = response {
                        return Poll::Ready(Ok(response));
                    }
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// `del app:person:42, incr app:persons:list:ver`, for logs; formatted
/// only if an event is emitted.
struct Actions<'a>(&'a Invalidation);

impl std::fmt::Display for Actions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let deletes = self.0.deletes().iter().map(|k| ("del", k.as_str()));
        let bumps = self.0.bumps().iter().map(|k| ("incr", k.key()));
        for (i, (verb, key)) in deletes.chain(bumps).enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{verb} {key}")?;
        }
        Ok(())
    }
}
