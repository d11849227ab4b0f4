//! The response future of a cached route: a short state machine (lookup,
//! flight, handler, fill) whose every outcome is decided in `decide.rs`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::{to_bytes, ResponseBody};
use super::request::{Call, Ctx, Next, Outcome};
use crate::flight::Wait;

use crate::reason::Reason;
use crate::store::{Lookup, StoreFuture};

pin_project! {
    /// Response future of [`Cache`](super::Cache).
    pub struct ResponseFuture<F, S, ReqBody, ResBody>
    where
        ResBody: Body,
    {
        #[pin]
        kind: Kind<F, S, ReqBody, ResBody>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, S, ReqBody, ResBody>
    where
        ResBody: Body,
    {
        // Not a cached route: the inner future, untouched.
        Pass { #[pin] future: F },
        // Answered at once (from the in-process tier).
        Served { response: Option<Response<ResponseBody<ResBody>>> },
        // A cached route: its context (boxed: the future is moved whole
        // a few times per request, and this is its largest part) and
        // where it stands.
        Cached {
            ctx: Box<Ctx>,
            #[pin]
            state: State<F, S, ReqBody, ResBody>,
        },
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, S, ReqBody, ResBody>
    where
        ResBody: Body,
    {
        // Waiting for the store; a clone of the inner service waits with the
        // request, unreadied: a hit holds none of its capacity.
        Lookup {
            lookup: StoreFuture<Lookup>,
            call: Option<Call<S, ReqBody>>,
            // On a route that hedges: when the handler answers instead.
            hedge: Option<Pin<Box<tokio::time::Sleep>>>,
        },
        // The lookup was slow: the inner service is readied, then called,
        // while the lookup goes on.
        Hedge {
            lookup: Option<StoreFuture<Lookup>>,
            call: Option<Call<S, ReqBody>>,
        },
        Hedging {
            #[pin]
            future: F,
            lookup: Option<StoreFuture<Lookup>>,
        },
        // Another request for the same entry is calling the inner service.
        Join {
            wait: Wait,
            call: Option<Call<S, ReqBody>>,
        },
        // Another process fills the entry: looked up again after `sleep`,
        // until `until`.
        // (The timer is boxed: only such a miss pays for it.)
        Fill {
            sleep: Pin<Box<tokio::time::Sleep>>,
            lookup: Option<StoreFuture<Lookup>>,
            pause: Duration,
            until: tokio::time::Instant,
            call: Option<Call<S, ReqBody>>,
        },
        // A miss: the inner service is readied, then called.
        Ready { call: Option<Call<S, ReqBody>> },
        Inner { #[pin] future: F },
        // Reading a storable body, up to the cap.
        Collect { collect: Option<Collecting<ResBody>> },
        // Writing the entry; the response goes out once the store answered,
        // so the next request for the key finds it.
        Write {
            write: StoreFuture<bool>,
            response: Option<Response<ResponseBody<ResBody>>>,
        },
        Done,
    }
}

/// A storable response whose body is being read.
struct Collecting<B> {
    parts: http::response::Parts,
    body: Pin<Box<B>>,
    frames: VecDeque<Frame<Bytes>>,
    size: usize,
}

impl<F, S, ReqBody, ResBody: Body> ResponseFuture<F, S, ReqBody, ResBody> {
    /// Not a cached route.
    pub(crate) fn pass(future: F) -> Self {
        Self {
            kind: Kind::Pass { future },
        }
    }

    /// A cached route that bypasses the store.
    pub(crate) fn bypass(future: F, ctx: Ctx) -> Self {
        Self {
            kind: Kind::Cached {
                ctx: Box::new(ctx),
                state: State::Inner { future },
            },
        }
    }

    /// A response ready at once.
    pub(crate) fn served(response: Response<ResponseBody<ResBody>>) -> Self {
        Self {
            kind: Kind::Served {
                response: Some(response),
            },
        }
    }

    pub(crate) fn lookup(
        lookup: StoreFuture<Lookup>,
        call: Call<S, ReqBody>,
        mut ctx: Ctx,
    ) -> Self {
        let hedge = ctx.hedge_timer();
        Self {
            kind: Kind::Cached {
                ctx: Box::new(ctx),
                state: State::Lookup {
                    lookup,
                    call: Some(call),
                    hedge,
                },
            },
        }
    }
}

impl<F, S, ReqBody, ResBody, E> Future for ResponseFuture<F, S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>, Error = E, Future = F>
        + Send
        + 'static,
    F: Future<Output = Result<Response<ResBody>, E>> + Send,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
{
    type Output = Result<Response<ResponseBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Pass { future } => future
                .poll(cx)
                .map(|done| done.map(|response| response.map(ResponseBody::inner))),
            KindProj::Served { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => panic!("ResponseFuture polled after completion"),
            },
            KindProj::Cached { ctx, mut state } => loop {
                let (next, output) = ready!(step(ctx, state.as_mut(), cx))?;
                state.set(next);
                if let Some(response) = output {
                    return Poll::Ready(Ok(response));
                }
            },
        }
    }
}

type Stepped<F, S, ReqBody, ResBody> = (
    State<F, S, ReqBody, ResBody>,
    Option<Response<ResponseBody<ResBody>>>,
);

/// One transition of a cached route's state: the next state, and the
/// response when there is one. Pending while the current state waits.
fn step<F, S, ReqBody, ResBody, E>(
    ctx: &mut Ctx,
    state: Pin<&mut State<F, S, ReqBody, ResBody>>,
    cx: &mut Context<'_>,
) -> Poll<Result<Stepped<F, S, ReqBody, ResBody>, E>>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>, Error = E, Future = F>
        + Send
        + 'static,
    F: Future<Output = Result<Response<ResBody>, E>> + Send,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
{
    let stepped = match state.project() {
        StateProj::Lookup {
            lookup,
            call,
            hedge,
        } => ready!(poll_lookup(ctx, lookup, hedge, call, cx)),
        StateProj::Fill {
            sleep,
            lookup,
            pause,
            until,
            call,
        } => {
            let next = ready!(poll_fill(ctx, sleep, lookup, cx));
            after_fill(ctx, next, *pause, *until, call.take())
        }
        StateProj::Join { wait, call } => {
            after_join(ctx.landed(ready!(wait.as_mut().poll(cx))), call.take())
        }
        StateProj::Hedge { lookup, call } => match ready!(call_when_ready(call, cx))? {
            Some(future) => {
                ctx.policy
                    .stats_ref()
                    .handler_called(ctx.route, crate::reason::HandlerCall::Hedged);
                let lookup = lookup.take();
                (State::Hedging { future, lookup }, None)
            }
            None => (State::Done, None),
        },
        StateProj::Hedging { future, lookup } => {
            let response = ready!(future.poll(cx))?;
            let response = match lookup.take() {
                Some(lookup) => ctx.hedged(response, lookup),
                None => response.map(ResponseBody::inner),
            };
            (State::Done, Some(response))
        }
        StateProj::Ready { call } => match ready!(call_when_ready(call, cx))? {
            Some(future) => {
                ctx.calling();
                (State::Inner { future }, None)
            }
            None => (State::Done, None),
        },
        StateProj::Inner { future } => {
            let response = ready!(future.poll(cx))?;
            ctx.answered();
            after_handler(ctx, response)
        }
        StateProj::Collect { collect } => match collect.as_mut() {
            Some(reading) => {
                let gave_up = ready!(read_capped(reading, ctx.body_cap(), cx));
                let done = collect.take();
                done.map_or((State::Done, None), |done| collected(ctx, done, gave_up))
            }
            None => (State::Done, None),
        },
        StateProj::Write { write, response } => {
            let written = ready!(ctx.in_span(|| write.as_mut().poll(cx)));
            (
                State::Done,
                response.take().map(|r| ctx.written(r, written)),
            )
        }
        StateProj::Done => panic!("ResponseFuture polled after completion"),
    };
    Poll::Ready(Ok(stepped))
}

/// Where a request goes once the lookup (or the flight it joined) said
/// `next`: served, joining a flight, waiting for another process's fill,
/// or on to the handler.
fn after_lookup<F, S, ReqBody, ResBody>(
    next: Next<ResBody>,
    call: Option<Call<S, ReqBody>>,
) -> Stepped<F, S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
{
    match next {
        Next::Serve(response, refresh) => {
            if let (Some(refresh), Some(call)) = (refresh, call) {
                refresh.start(call);
            }
            (State::Done, Some(response))
        }
        Next::Join(wait) => (State::Join { wait, call }, None),
        Next::AwaitFill(until) => (fill(FIRST_PAUSE, until, call), None),
        Next::Call => (State::Ready { call }, None),
    }
}

/// Polls the store's lookup; once past the hedge budget, the handler
/// answers while the lookup goes on.
fn poll_lookup<F, S, ReqBody, ResBody>(
    ctx: &mut Ctx,
    lookup: &mut StoreFuture<Lookup>,
    hedge: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    call: &mut Option<Call<S, ReqBody>>,
    cx: &mut Context<'_>,
) -> Poll<Stepped<F, S, ReqBody, ResBody>>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
{
    let polled = {
        let _span = ctx.span.enter();
        lookup.as_mut().poll(cx)
    };
    match polled {
        Poll::Ready(found) => {
            ctx.looked_up();
            Poll::Ready(after_lookup(ctx.decide(found), call.take()))
        }
        Poll::Pending => match hedge.as_mut().map(|h| h.as_mut().poll(cx)) {
            Some(Poll::Ready(())) if !ctx.admit_hedge() => {
                // No hedge left to spend: the lookup is waited for.
                *hedge = None;
                Poll::Pending
            }
            Some(Poll::Ready(())) => {
                let going_on = std::mem::replace(lookup, Box::pin(std::future::pending()));
                let lookup = Some(ctx.hedging(going_on));
                Poll::Ready((
                    State::Hedge {
                        lookup,
                        call: call.take(),
                    },
                    None,
                ))
            }
            _ => Poll::Pending,
        },
    }
}

/// Waits out the pause, then looks the entry another process fills up
/// again.
fn poll_fill<B: Body>(
    ctx: &mut Ctx,
    sleep: &mut Pin<Box<tokio::time::Sleep>>,
    lookup: &mut Option<StoreFuture<Lookup>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Next<B>>> {
    if lookup.is_none() {
        ready!(sleep.as_mut().poll(cx));
        *lookup = ctx.look_again();
    }
    Poll::Ready(match lookup.as_mut() {
        Some(pending) => ctx.filled(ready!(pending.as_mut().poll(cx))),
        None => Some(Next::Call),
    })
}

/// Where a request goes once another process's fill was looked up again:
/// served, waiting a longer pause (until `until`), or on to the handler.
fn after_fill<F, S, ReqBody, ResBody: Body>(
    ctx: &mut Ctx,
    next: Option<Next<ResBody>>,
    pause: Duration,
    until: tokio::time::Instant,
    call: Option<Call<S, ReqBody>>,
) -> Stepped<F, S, ReqBody, ResBody> {
    match next {
        Some(Next::Serve(response, _)) => (State::Done, Some(response)),
        None if tokio::time::Instant::now() < until => {
            (fill((pause * 2).min(LAST_PAUSE), until, call), None)
        }
        None => {
            ctx.why = Some(crate::reason::HandlerCall::LeaseWaitOver);
            (State::Ready { call }, None)
        }
        Some(_) => (State::Ready { call }, None),
    }
}

/// Where a request that joined a flight goes once it landed: served,
/// joining the next flight, or on to the handler.
fn after_join<F, S, ReqBody, ResBody: Body>(
    next: Next<ResBody>,
    call: Option<Call<S, ReqBody>>,
) -> Stepped<F, S, ReqBody, ResBody> {
    match next {
        Next::Serve(response, _) => (State::Done, Some(response)),
        Next::Join(wait) => (State::Join { wait, call }, None),
        Next::AwaitFill(_) | Next::Call => (State::Ready { call }, None),
    }
}

/// Readies the inner service, then calls it with the request; `None` when
/// the call was made already.
fn call_when_ready<S, ReqBody>(
    call: &mut Option<Call<S, ReqBody>>,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<S::Future>, S::Error>>
where
    S: Service<Request<ReqBody>>,
{
    if let Some(pending) = call.as_mut() {
        ready!(pending.service.poll_ready(cx))?;
    }
    Poll::Ready(Ok(call.take().map(
        |Call {
             mut service,
             request,
         }| service.call(request),
    )))
}

/// The handler answered: its response goes out as it is, or its body is
/// read for the store.
fn after_handler<F, S, ReqBody, ResBody: Body>(
    ctx: &mut Ctx,
    response: Response<ResBody>,
) -> Stepped<F, S, ReqBody, ResBody> {
    if let Err(outcome) = ctx.storable(&response) {
        let response = response.map(ResponseBody::inner);
        return (State::Done, Some(ctx.finish(response, outcome)));
    }
    let (parts, body) = response.into_parts();
    let collect = Collecting {
        parts,
        body: Box::pin(body),
        frames: VecDeque::new(),
        size: 0,
    };
    let collect = Some(collect);
    (State::Collect { collect }, None)
}

/// The first pause before looking an entry another process fills up
/// again, and the longest: the pause doubles from one to the other.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
const LAST_PAUSE: Duration = Duration::from_millis(50);

/// Waiting `pause` (not past `until`) before looking the entry up again.
fn fill<F, S, ReqBody, ResBody: Body>(
    pause: Duration,
    until: tokio::time::Instant,
    call: Option<Call<S, ReqBody>>,
) -> State<F, S, ReqBody, ResBody> {
    let wake = (tokio::time::Instant::now() + pause).min(until);
    State::Fill {
        sleep: Box::pin(tokio::time::sleep_until(wake)),
        lookup: None,
        pause,
        until,
        call,
    }
}

/// Reads frames until the body ends (`None`) or must not be stored: over
/// the cap, trailers, an error (`Some`, with the error to hand on).
fn read_capped<B: Body>(
    reading: &mut Collecting<B>,
    cap: usize,
    cx: &mut Context<'_>,
) -> Poll<Option<Stop<B::Error>>> {
    loop {
        let frame = match reading.body.as_mut().poll_frame(cx) {
            // Not all there at once: sent as it comes (see `stream.rs`).
            Poll::Pending => return Poll::Ready(Some(Stop::Streaming)),
            Poll::Ready(frame) => frame,
        };
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    let data = data.copy_to_bytes(data.remaining());
                    reading.size += data.len();
                    reading.frames.push_back(Frame::data(data));
                    if reading.size > cap {
                        return Poll::Ready(Some(Stop::Refused(Reason::TooLarge, None)));
                    }
                }
                Err(trailers) => {
                    reading.frames.push_back(to_bytes(trailers));
                    return Poll::Ready(Some(Stop::Refused(Reason::Trailers, None)));
                }
            },
            Some(Err(err)) => {
                return Poll::Ready(Some(Stop::Refused(Reason::BodyError, Some(err))))
            }
            None => return Poll::Ready(None),
        }
    }
}

/// Why a body stopped being read before its end.
enum Stop<E> {
    /// It may not be stored: over the cap, trailers, an error (to hand on).
    Refused(Reason, Option<E>),
    /// It is not all there at once: it streams to the client, copied.
    Streaming,
}

/// A body read whole (stored, then sent), given up on (sent as read, then
/// the rest streamed through), or streaming (sent as it comes, stored at
/// its end).
fn collected<F, S, ReqBody, ResBody>(
    ctx: &mut Ctx,
    done: Collecting<ResBody>,
    gave_up: Option<Stop<ResBody::Error>>,
) -> Stepped<F, S, ReqBody, ResBody>
where
    ResBody: Body,
{
    let Collecting {
        mut parts,
        body,
        frames,
        size,
    } = done;
    match gave_up {
        Some(Stop::Refused(reason, error)) => {
            let response = Response::from_parts(parts, ResponseBody::prefixed(frames, error, body));
            return (
                State::Done,
                Some(ctx.finish(response, Outcome::NotStored(reason))),
            );
        }
        Some(Stop::Streaming) => {
            let body = match ctx.filling(&parts) {
                Some(mut filling) => {
                    for frame in &frames {
                        if let Some(data) = frame.data_ref() {
                            filling.keep(data);
                        }
                    }
                    let read = frames.iter().filter_map(|f| f.data_ref().cloned());
                    let tee = filling.fan_out(&parts, read);
                    ResponseBody::teeing(frames, body, filling, tee)
                }
                None => ResponseBody::prefixed(frames, None, body),
            };
            let response = Response::from_parts(parts, body);
            return (State::Done, Some(ctx.finish(response, Outcome::Streamed)));
        }
        None => {}
    }
    let body = concat(frames, size);
    let made = super::storable::entry_of(
        ctx.policy(),
        ctx.binding(),
        ctx.ttl(),
        ctx.now_ms(),
        parts.status,
        &mut parts.headers,
        &body,
    );
    let response = Response::from_parts(parts, ResponseBody::full(body));
    let (entry, encoded) = match made {
        Ok(made) => made,
        Err(reason) => {
            return (
                State::Done,
                Some(ctx.finish(response, Outcome::NotStored(reason))),
            )
        }
    };
    ctx.share(&encoded);
    match ctx.write(&entry, encoded) {
        Ok(write) => (
            State::Write {
                write,
                response: Some(response),
            },
            None,
        ),
        Err(reason) => (
            State::Done,
            Some(ctx.finish(response, Outcome::NotStored(reason))),
        ),
    }
}

fn concat(mut frames: VecDeque<Frame<Bytes>>, size: usize) -> Bytes {
    if frames.len() == 1 {
        if let Some(Ok(data)) = frames.pop_front().map(Frame::into_data) {
            return data;
        }
    }
    let mut out = BytesMut::with_capacity(size);
    for frame in frames {
        if let Ok(data) = frame.into_data() {
            out.extend_from_slice(&data);
        }
    }
    out.freeze()
}
