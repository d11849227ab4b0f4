use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use super::layer::Shared;
use super::rules::Actions;
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
            pending: Option<(Invalidation, Arc<Shared>)>,
        },
        // The response waits until the store applied the invalidation.
        Invalidating {
            apply: StoreFuture<()>,
            response: Option<Response<B>>,
            invalidation: Invalidation,
            shared: Arc<Shared>,
        },
        Done,
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn new(future: F, pending: Option<(Invalidation, Arc<Shared>)>) -> Self {
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
                    let Some((invalidation, shared)) = pending.take() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    };
                    if !response.status().is_success() {
                        shared.counters.skipped.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(
                            status = response.status().as_u16(),
                            "write failed; nothing invalidated"
                        );
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    }
                    let apply = shared.store.invalidate(&invalidation);
                    this.state.set(State::Invalidating {
                        apply,
                        response: Some(response),
                        invalidation,
                        shared,
                    });
                }
                StateProj::Invalidating {
                    apply,
                    response,
                    invalidation,
                    shared,
                } => {
                    let applied = ready!(apply.as_mut().poll(cx));
                    let actions = Actions(invalidation);
                    match applied {
                        Ok(()) => {
                            shared.counters.applied.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(actions = %actions, "cache invalidated");
                        }
                        Err(err) => {
                            shared.counters.failed.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(actions = %actions, error = %err, "cache invalidation failed");
                        }
                    }
                    let response = response
                        .take()
                        .expect("the invalidating state is left once");
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(response));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}
