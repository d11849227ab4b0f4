//! The response body of a cached route: a stored body, the handler's body
//! passed through, the handler's body copied into the entry as it streams,
//! or another request's streamed body, shared.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::stream::{Filling, Writing};
use crate::fanout::{TeeReader, TeeWriter};

/// The error of a [`ResponseBody`]: the handler's body's error, boxed, or,
/// for a request that shared another's streamed response, why its body
/// was cut (that response was cut before its end).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// Response body of [`Cache`](super::Cache): a stored body, the inner
    /// body untouched, the frames read while trying to store followed by
    /// the rest of the inner body, or the streamed body of the request
    /// whose flight this one joined. Its error is a [`BodyError`].
    #[project = BodyProj]
    pub struct ResponseBody<B>
    where
        B: Body,
    {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B>
    where
        B: Body,
    {
        Full { data: Option<Bytes> },
        // No body, and no claim about the representation's length (a 304).
        Unsized,
        Inner { #[pin] body: B },
        Prefixed {
            frames: VecDeque<Frame<Bytes>>,
            error: Option<B::Error>,
            failed: bool,
            body: Pin<Box<B>>,
        },
        // A streamed miss: `frames` first, then the rest of `body`, a copy
        // of each data frame kept for the entry while `filling` lasts.
        Teeing {
            frames: VecDeque<Frame<Bytes>>,
            body: Pin<Box<B>>,
            filling: Option<Box<Filling>>,
            // The entry's write, awaited before the body ends.
            writing: Option<Writing>,
            // The followers' end of it (see `fanout.rs`).
            tee: Option<TeeWriter>,
        },
        // A follower of a streamed miss: the leader's chunks as they come.
        Fanned { reader: TeeReader },
    }
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full { data: Some(data) },
        }
    }

    pub(crate) fn empty() -> Self {
        Self {
            kind: Kind::Full { data: None },
        }
    }

    /// No body, with no exact size: nothing downstream (axum, hyper) adds
    /// a `content-length` that would describe an empty representation.
    pub(crate) fn unsized_empty() -> Self {
        Self {
            kind: Kind::Unsized,
        }
    }

    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    /// `frames` (already copied into `filling`) first, then the rest of
    /// `body`, copied into `filling`, which is stored when the body ends
    /// complete within its cap.
    pub(crate) fn teeing(
        frames: VecDeque<Frame<Bytes>>,
        body: Pin<Box<B>>,
        filling: Filling,
        tee: Option<TeeWriter>,
    ) -> Self {
        Self {
            kind: Kind::Teeing {
                frames,
                body,
                filling: Some(Box::new(filling)),
                writing: None,
                tee,
            },
        }
    }

    /// The streamed body of the flight this request joined.
    pub(crate) fn fanned(reader: TeeReader) -> Self {
        Self {
            kind: Kind::Fanned { reader },
        }
    }

    /// `frames` first, then `error` if any, else the rest of `body`.
    pub(crate) fn prefixed(
        frames: VecDeque<Frame<Bytes>>,
        error: Option<B::Error>,
        body: Pin<Box<B>>,
    ) -> Self {
        Self {
            kind: Kind::Prefixed {
                frames,
                error,
                failed: false,
                body,
            },
        }
    }
}

pub(crate) fn to_bytes<D: Buf>(frame: Frame<D>) -> Frame<Bytes> {
    frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
}

/// A frame of the handler's body, its data as `Bytes` and its error boxed.
fn boxed<D: Buf, E: Into<BodyError>>(
    frame: Option<Result<Frame<D>, E>>,
) -> Option<Result<Frame<Bytes>, BodyError>> {
    frame.map(|f| f.map(to_bytes).map_err(Into::into))
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.project().kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Unsized => Poll::Ready(None),
            KindProj::Inner { body } => body.poll_frame(cx).map(boxed),
            KindProj::Fanned { reader } => reader
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(Into::into))),
            KindProj::Prefixed {
                frames,
                error,
                failed,
                body,
            } => {
                if let Some(frame) = frames.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                if let Some(error) = error.take() {
                    *failed = true;
                    return Poll::Ready(Some(Err(error.into())));
                }
                if *failed {
                    // The inner body already failed; it is not polled again.
                    return Poll::Ready(None);
                }
                body.as_mut().poll_frame(cx).map(boxed)
            }
            KindProj::Teeing {
                frames,
                body,
                filling,
                writing,
                tee,
            } => {
                if let Some(frame) = frames.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                if let Some(write) = writing.as_mut() {
                    std::task::ready!(write.as_mut().poll(cx));
                    *writing = None;
                    return Poll::Ready(None);
                }
                let frame = match body.as_mut().poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(frame) => boxed(frame),
                };
                match &frame {
                    Some(Ok(frame)) => match frame.data_ref() {
                        Some(data) => {
                            if let Some(tee) = tee.as_ref() {
                                tee.push(data);
                            }
                            if filling.as_mut().is_some_and(|f| !f.keep(data)) {
                                *filling = None;
                            }
                        }
                        // Trailers are not stored.
                        None => {
                            if let (Some(tee), Some(trailers)) = (tee.take(), frame.trailers_ref())
                            {
                                tee.trailers(trailers);
                            }
                            *filling = None;
                        }
                    },
                    // The followers' bodies are cut too.
                    Some(Err(_)) => {
                        *tee = None;
                        *filling = None;
                    }
                    None => {
                        if let Some(tee) = tee.take() {
                            tee.complete();
                        }
                        if let Some(mut write) = filling.take().and_then(|f| f.complete()) {
                            if write.as_mut().poll(cx).is_pending() {
                                *writing = Some(write);
                                return Poll::Pending;
                            }
                        }
                    }
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Unsized => true,
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Prefixed {
                frames,
                error,
                failed,
                body,
            } => frames.is_empty() && error.is_none() && (*failed || body.is_end_stream()),
            // Polled to its end, so that the copy is stored.
            Kind::Teeing { .. } => false,
            Kind::Fanned { reader } => reader.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Inner { body } => body.size_hint(),
            Kind::Unsized | Kind::Prefixed { .. } | Kind::Teeing { .. } | Kind::Fanned { .. } => {
                SizeHint::default()
            }
        }
    }
}
