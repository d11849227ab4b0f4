//! The response future of a write: the handler's answer, then the
//! invalidation it owes, sent before the response (and still sent when the
//! future is dropped once the handler ran).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::Response;
use pin_project_lite::pin_project;

use crate::headers::CACHE_STATUS;
use crate::policy::{Policy, WriteInvalidation};
use crate::stats::telemetry::{self, warn_limited, Op};
use crate::store::{Invalidation, StoreError, StoreFuture};

/// On a write whose invalidation the store confirmed.
const INVALIDATED: &str = "tower-redis-cache; fwd=method; detail=invalidated";

/// On a write whose invalidation failed within its budget: queued for
/// replay; other processes may serve the old entry until it lands.
const PENDING: &str = "tower-redis-cache; fwd=method; detail=invalidation-pending";

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
            owed: Owed,
        },
        // The response waits until the store applied the invalidation.
        Invalidating {
            apply: StoreFuture<()>,
            response: Option<Response<B>>,
            owed: Owed,
            span: tracing::Span,
            started: Instant,
        },
        Done,
    }
}

/// The invalidation a matched write owes from the moment its handler is
/// called. The future pays it; if the future is dropped first (the client
/// went away, a timeout fired), dropping this sends it from a spawned task.
/// The handler may not have committed then: an extra invalidation is
/// harmless, a missed one is not. With a delay ([`Rule::again_after`]),
/// it is sent again that long after it was paid.
///
/// [`Rule::again_after`]: crate::Rule::again_after
pub(crate) struct Owed {
    owed: Option<(Invalidation, Policy)>,
    /// What a drop sends instead, when it is less (see
    /// [`WriteInvalidation::on_drop`]).
    on_drop: Option<Invalidation>,
    again: Option<Duration>,
    probe: Probing,
}

/// Whether a write is probed once its invalidation is confirmed
/// ([`Rule::probe`](crate::Rule::probe)), and when its handler was called
/// (on the store's clock).
#[derive(Clone, Copy, Default)]
struct Probing {
    rate: f64,
    began_ms: u64,
}

impl Owed {
    pub(crate) fn new(write: WriteInvalidation, policy: Policy) -> Self {
        let began_ms = match write.probe > 0.0 {
            true => {
                crate::clock::shifted(crate::clock::unix_ms(), policy.store().clock_offset_ms())
            }
            false => 0,
        };
        Self {
            owed: Some((write.invalidation, policy)),
            on_drop: write.on_drop,
            again: write.again,
            probe: Probing {
                rate: write.probe,
                began_ms,
            },
        }
    }

    /// What the write owes once its handler answered (what it owed on
    /// drop no longer counts).
    fn paid(&self, invalidation: Invalidation, policy: Policy) -> Self {
        Self {
            owed: Some((invalidation, policy)),
            on_drop: None,
            again: self.again,
            probe: self.probe,
        }
    }

    /// Nothing is owed (the write failed, or was paid).
    fn settle(&mut self) -> Option<(Invalidation, Policy)> {
        self.owed.take()
    }

    /// Sends `invalidation` again after the delay, if the rule asks for it.
    fn schedule_again(&self, invalidation: &Invalidation, policy: &Policy) {
        let Some(delay) = self.again else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (invalidation, policy) = (invalidation.reissued(), policy.clone());
        runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            let applied = policy.store().invalidate(&invalidation).await;
            tracing::debug!(actions = %Actions(&invalidation), "invalidated again after the read lag");
            record(&policy, &invalidation, applied);
        });
    }
}

impl Drop for Owed {
    fn drop(&mut self) {
        let Some((mut invalidation, policy)) = self.owed.take() else {
            return;
        };
        if let Some(less) = self.on_drop.take() {
            tracing::debug!(
                "write without a scope cancelled before its handler answered; every scope's versions are left alone"
            );
            invalidation = less;
            if invalidation.is_empty() {
                return;
            }
        }
        self.schedule_again(&invalidation, &policy);
        // Stores apply or queue an invalidation when it is issued; the
        // future only sends it (and replays the queue).
        let invalidation = invalidation.reissued();
        let apply = policy.store().invalidate(&invalidation);
        tracing::info!(actions = %Actions(&invalidation), "write cancelled after its handler was called; invalidating anyway");
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { record(&policy, &invalidation, apply.await) });
        }
    }
}

fn record(policy: &Policy, invalidation: &Invalidation, applied: Result<(), StoreError>) {
    let actions = Actions(invalidation);
    match applied {
        Ok(()) => {
            policy.stats_ref().invalidation_applied();
            tracing::debug!(actions = %actions, "cache invalidated");
        }
        Err(err) => {
            policy.stats_ref().invalidation_failed();
            telemetry::store_error(Op::Invalidate, err.kind());
            warn_limited!(actions = %actions, error = %err, "cache invalidation failed; queued for replay");
        }
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn new(future: F, owed: Option<Owed>) -> Self {
        let owed = owed.unwrap_or(Owed {
            owed: None,
            on_drop: None,
            again: None,
            probe: Probing::default(),
        });
        Self {
            state: State::Inner { future, owed },
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
                StateProj::Inner { future, owed } => {
                    let response = match ready!(future.poll(cx)) {
                        Ok(response) => response,
                        // The handler may have committed before it failed.
                        Err(err) => return Poll::Ready(Err(err)),
                    };
                    let Some((invalidation, policy)) = owed.settle() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    };
                    if !succeeded(response.status()) {
                        policy.stats_ref().invalidation_skipped();
                        tracing::debug!(
                            status = response.status().as_u16(),
                            "write failed; nothing invalidated"
                        );
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    }
                    let apply = policy.store().invalidate(&invalidation);
                    let keys = invalidation.deletes().len() + invalidation.bumps().len();
                    let paid = owed.paid(invalidation, policy);
                    let span = tracing::debug_span!(
                        "cache.store",
                        op = Op::Invalidate.as_str(),
                        keys,
                        outcome = tracing::field::Empty,
                        duration_us = tracing::field::Empty,
                    );
                    this.state.set(State::Invalidating {
                        apply,
                        response: Some(response),
                        owed: paid,
                        span,
                        started: Instant::now(),
                    });
                }
                StateProj::Invalidating {
                    apply,
                    response,
                    owed,
                    span,
                    started,
                } => {
                    let applied = {
                        let _span = span.enter();
                        ready!(apply.as_mut().poll(cx))
                    };
                    span.record("duration_us", started.elapsed().as_micros() as u64);
                    let status = match applied {
                        Ok(()) => {
                            span.record("outcome", "applied");
                            INVALIDATED
                        }
                        Err(_) => {
                            span.record("outcome", "failed");
                            PENDING
                        }
                    };
                    if let Some((invalidation, policy)) = owed.settle() {
                        owed.schedule_again(&invalidation, &policy);
                        let probed = applied.is_ok() && crate::sampling::sampled(owed.probe.rate);
                        record(&policy, &invalidation, applied);
                        if probed {
                            super::probe::start(policy, &invalidation, owed.probe.began_ms);
                        }
                    }
                    let response = response.take();
                    this.state.set(State::Done);
                    if let Some(mut response) = response {
                        response
                            .headers_mut()
                            .insert(CACHE_STATUS, HeaderValue::from_static(status));
                        return Poll::Ready(Ok(response));
                    }
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// Whether a write answered `status` took effect: a 2xx, or a redirect
/// to another resource that a client follows with a GET (301, 302, 303:
/// the post/redirect/get pattern). 307 and 308 ask to repeat the write
/// elsewhere, so it may not have happened.
fn succeeded(status: http::StatusCode) -> bool {
    status.is_success() || matches!(status.as_u16(), 301..=303)
}

/// `del app:person:42, incr {app:persons:list}:ver`, for logs; formatted
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
