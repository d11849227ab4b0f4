use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::{to_bytes, ResponseBody};
use super::flight::{Landed, Wait};
use super::service::{Ctx, Outcome};
use crate::entry::{self, Entry, Slot};
use crate::stats::Reason;
use crate::store::{Lookup, Observed, StoreFuture};

pin_project! {
    /// Response future of [`Cache`](super::Cache).
    pub struct ResponseFuture<F, S, ReqBody, ResBody>
    where
        ResBody: Body,
    {
        #[pin]
        state: State<F, S, ReqBody, ResBody>,
        ctx: Option<Ctx>,
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
            service: Option<S>,
            request: Option<Request<ReqBody>>,
        },
        // Another request for the same entry is calling the inner service.
        Join {
            wait: Wait,
            service: Option<S>,
            request: Option<Request<ReqBody>>,
        },
        // A miss: the inner service is readied, then called.
        Ready {
            service: Option<S>,
            request: Option<Request<ReqBody>>,
        },
        Inner { #[pin] future: F },
        // Reading a storable body, up to the cap.
        Collect {
            parts: Option<http::response::Parts>,
            body: Option<Pin<Box<ResBody>>>,
            frames: VecDeque<Frame<Bytes>>,
            size: usize,
        },
        // Writing the entry; the response goes out once the store answered,
        // so the next request for the key finds it.
        Write {
            write: StoreFuture<bool>,
            response: Option<Response<ResponseBody<ResBody>>>,
        },
        Done,
    }
}

impl<F, S, ReqBody, ResBody: Body> ResponseFuture<F, S, ReqBody, ResBody> {
    /// Not a cached route, or a cached route that bypasses the store.
    pub(crate) fn inner(future: F, ctx: Option<Ctx>) -> Self {
        Self {
            state: State::Inner { future },
            ctx,
        }
    }

    pub(crate) fn lookup(
        lookup: StoreFuture<Lookup>,
        service: S,
        request: Request<ReqBody>,
        ctx: Ctx,
    ) -> Self {
        Self {
            state: State::Lookup {
                lookup,
                service: Some(service),
                request: Some(request),
            },
            ctx: Some(ctx),
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
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Lookup {
                    lookup,
                    service,
                    request,
                } => {
                    let found = ready!(lookup.as_mut().poll(cx));
                    let ctx = this.ctx.as_mut().expect("a lookup always has a context");
                    match found {
                        Ok(found) => {
                            if let Observed::Value(raw) = found.payload() {
                                if let Slot::Entry(entry) = entry::decode(raw.clone()) {
                                    if ctx.is_stale(&entry) {
                                        refresh_in_background(ctx, &found, service, request);
                                    }
                                    let response = ctx.hit(entry);
                                    this.state.set(State::Done);
                                    return Poll::Ready(Ok(response));
                                }
                            }
                            if let Some(wait) = ctx.missed(found) {
                                let (service, request) = (service.take(), request.take());
                                this.state.set(State::Join {
                                    wait,
                                    service,
                                    request,
                                });
                                continue;
                            }
                        }
                        Err(err) => ctx.lookup_failed(&err),
                    }
                    let (service, request) = (service.take(), request.take());
                    this.state.set(State::Ready { service, request });
                }
                StateProj::Join {
                    wait,
                    service,
                    request,
                } => {
                    let landed = ready!(wait.as_mut().poll(cx));
                    let ctx = this.ctx.as_mut().expect("a join always has a context");
                    match landed {
                        Some(Landed::Entry(raw)) => {
                            if let Slot::Entry(entry) = entry::decode(raw) {
                                let response = ctx.collapsed(entry);
                                this.state.set(State::Done);
                                return Poll::Ready(Ok(response));
                            }
                        }
                        Some(Landed::Unshareable) => {}
                        // The leader went away: take the flight over, or
                        // wait on the follower that did.
                        None => {
                            if let Some(next) = ctx.rejoin() {
                                *wait = next;
                                continue;
                            }
                        }
                    }
                    let (service, request) = (service.take(), request.take());
                    this.state.set(State::Ready { service, request });
                }
                StateProj::Ready { service, request } => {
                    if let Some(inner) = service.as_mut() {
                        ready!(inner.poll_ready(cx))?;
                    }
                    let future = call_readied(service, request);
                    this.state.set(State::Inner { future });
                }
                StateProj::Inner { future } => {
                    let response = ready!(future.poll(cx))?;
                    this.state.set(State::Done);
                    let Some(ctx) = this.ctx.as_mut() else {
                        return Poll::Ready(Ok(response.map(ResponseBody::inner)));
                    };
                    if let Err(outcome) = ctx.storable(&response) {
                        let response = response.map(ResponseBody::inner);
                        return Poll::Ready(Ok(ctx.finish(response, outcome)));
                    }
                    let (parts, body) = response.into_parts();
                    this.state.set(State::Collect {
                        parts: Some(parts),
                        body: Some(Box::pin(body)),
                        frames: VecDeque::new(),
                        size: 0,
                    });
                }
                StateProj::Collect {
                    parts,
                    body,
                    frames,
                    size,
                } => {
                    let ctx = this.ctx.as_mut().expect("a collect always has a context");
                    let Some(inner) = body.as_mut() else {
                        unreachable!("the collect state is left once");
                    };
                    let gave_up = match ready!(inner.as_mut().poll_frame(cx)) {
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(mut data) => {
                                let data = data.copy_to_bytes(data.remaining());
                                *size += data.len();
                                frames.push_back(Frame::data(data));
                                if *size <= ctx.max_body_bytes() {
                                    continue;
                                }
                                Some((Reason::TooLarge, None))
                            }
                            Err(trailers) => {
                                frames.push_back(to_bytes(trailers));
                                Some((Reason::Trailers, None))
                            }
                        },
                        Some(Err(err)) => Some((Reason::BodyError, Some(err))),
                        None => None,
                    };
                    let (Some(parts), Some(inner)) = (parts.take(), body.take()) else {
                        unreachable!("the collect state is left once");
                    };
                    if let Some((reason, error)) = gave_up {
                        let frames = std::mem::take(frames);
                        let body = ResponseBody::prefixed(frames, error, inner);
                        let response = Response::from_parts(parts, body);
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(ctx.finish(response, Outcome::NotStored(reason))));
                    }
                    let body = concat(std::mem::take(frames), *size);
                    let mut parts = parts;
                    entry::ensure_etag(&mut parts.headers, &body);
                    let entry = Entry::new(parts.status, &parts.headers, body.clone(), ctx.ttl());
                    let response = Response::from_parts(parts, ResponseBody::full(body));
                    let encoded = entry.encode();
                    ctx.share(&encoded);
                    match ctx.write(encoded) {
                        Ok(write) => this.state.set(State::Write {
                            write,
                            response: Some(response),
                        }),
                        Err(reason) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(
                                ctx.finish(response, Outcome::NotStored(reason))
                            ));
                        }
                    }
                }
                StateProj::Write { write, response } => {
                    let written = ready!(write.as_mut().poll(cx));
                    let ctx = this.ctx.as_mut().expect("a write always has a context");
                    let response = response.take().expect("the write state is left once");
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(ctx.written(response, written)));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// Calls the service the `Ready` state readied.
fn call_readied<S, ReqBody>(
    service: &mut Option<S>,
    request: &mut Option<Request<ReqBody>>,
) -> S::Future
where
    S: Service<Request<ReqBody>>,
{
    let (Some(mut service), Some(request)) = (service.take(), request.take()) else {
        unreachable!("the service is called once");
    };
    service.call(request)
}

/// Starts the refresh of a stale entry with the request that found it (as
/// a GET), on the clone of the inner service it waited with (readied by
/// the refresh), unless a refresh is under way.
fn refresh_in_background<S, ReqBody, ResBody>(
    ctx: &Ctx,
    found: &Lookup,
    service: &mut Option<S>,
    request: &mut Option<Request<ReqBody>>,
) where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if let (Some(refresh), Some(service), Some(mut request)) =
        (ctx.refresh(found), service.take(), request.take())
    {
        // The entry is the GET's: a HEAD's answer has no body to store.
        if request.method() == http::Method::HEAD {
            *request.method_mut() = http::Method::GET;
        }
        runtime.spawn(refresh.run(service, request));
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
