//! A streamed miss fanned out to the requests of this process that joined
//! its flight, as Varnish streams a fetch to its waiting list: each
//! follower gets the leader's status and headers at once, then every chunk
//! as the leader's client is sent it, and the same end (a complete body,
//! its trailers, or a cut).
//!
//! The chunks are the ones the leader keeps anyway for the entry, so a
//! follower that reads slowly costs no memory while the body is within the
//! policy's body cap. Past the cap (nothing is stored then) the tee keeps
//! only the last cap's worth: a follower further behind than that has its
//! body cut, and a request that would join then calls the handler itself
//! (`unshareable`). The leader's client sets the pace: followers get each
//! chunk when the leader's client is sent it, and a leader whose body is
//! cut (its client gone, the handler's body failing) cuts theirs the same
//! way, with an error (see [`Cut`]), so no client takes a short body for a
//! whole one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::Frame;

use crate::key::Binding;

/// The error a follower's body ends with when the response it shared was
/// cut before its end (or when it fell too far behind past the cap).
#[derive(Debug)]
pub(crate) struct Cut(&'static str);

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Cut {}

/// How the leader's body ended.
#[derive(Debug, Clone)]
enum End {
    Complete,
    Trailers(HeaderMap),
    Cut,
}

/// One streamed response, shared.
pub(crate) struct Tee {
    status: StatusCode,
    headers: HeaderMap,
    /// The request inputs the response was made for (see `entry.rs`).
    binding: Binding,
    /// The most bytes of chunks held at once.
    cap: usize,
    state: Mutex<State>,
}

struct State {
    chunks: VecDeque<Bytes>,
    /// The index, in the whole body, of `chunks[0]`.
    base: usize,
    /// Bytes held in `chunks`.
    held: usize,
    end: Option<End>,
    /// The followers waiting for a chunk, by reader id.
    waiting: HashMap<u64, Waker>,
    readers: u64,
}

impl std::fmt::Debug for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tee")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Tee {
    /// A tee of a response with `status` and `headers`, whose first
    /// chunks are `read`; and the leader's end of it.
    pub(crate) fn new(
        status: StatusCode,
        headers: HeaderMap,
        binding: Binding,
        cap: usize,
        read: impl IntoIterator<Item = Bytes>,
    ) -> (Arc<Tee>, TeeWriter) {
        let tee = Arc::new(Tee {
            status,
            headers,
            binding,
            cap,
            state: Mutex::new(State {
                chunks: VecDeque::new(),
                base: 0,
                held: 0,
                end: None,
                waiting: HashMap::new(),
                readers: 0,
            }),
        });
        let writer = TeeWriter(tee.clone());
        for chunk in read {
            writer.push(&chunk);
        }
        (tee, writer)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the response was made for the same request inputs as a
    /// request bound to `binding` (else that request may not read it).
    pub(crate) fn bound_to(&self, binding: &Binding) -> bool {
        self.binding == *binding
    }

    /// The response's status and headers.
    pub(crate) fn head(&self) -> (StatusCode, HeaderMap) {
        (self.status, self.headers.clone())
    }

    /// A reader from the body's start; `None` once its start is gone
    /// (past the cap) or the body was cut.
    pub(crate) fn reader(self: &Arc<Self>) -> Option<TeeReader> {
        let mut state = self.state();
        if state.base > 0 || matches!(state.end, Some(End::Cut)) {
            return None;
        }
        state.readers += 1;
        Some(TeeReader {
            tee: self.clone(),
            id: state.readers,
            next: 0,
            trailers_sent: false,
        })
    }
}

impl State {
    fn wake_all(&mut self) {
        for (_, waker) in self.waiting.drain() {
            waker.wake();
        }
    }
}

/// The leader's end of a [`Tee`]: each chunk its client is sent, then how
/// the body ended. Dropped before [`end`](Self::end) (the leader's client
/// gone, its body failed), it cuts every follower's body.
pub(crate) struct TeeWriter(Arc<Tee>);

impl TeeWriter {
    /// A chunk of the body, for every follower.
    pub(crate) fn push(&self, data: &Bytes) {
        let mut state = self.0.state();
        state.held += data.len();
        state.chunks.push_back(data.clone());
        // Past the cap, only the last cap's worth stays.
        while state.held > self.0.cap && state.chunks.len() > 1 {
            if let Some(gone) = state.chunks.pop_front() {
                state.held -= gone.len();
                state.base += 1;
            }
        }
        state.wake_all();
    }

    /// The body ended complete.
    pub(crate) fn complete(self) {
        self.end(End::Complete);
    }

    /// The body ended with `trailers`.
    pub(crate) fn trailers(self, trailers: &HeaderMap) {
        self.end(End::Trailers(trailers.clone()));
    }

    fn end(&self, end: End) {
        let mut state = self.0.state();
        if state.end.is_none() {
            state.end = Some(end);
            state.wake_all();
        }
    }
}

impl Drop for TeeWriter {
    fn drop(&mut self) {
        self.end(End::Cut);
    }
}

/// A follower's body: the tee's chunks from the start, then its end.
pub(crate) struct TeeReader {
    tee: Arc<Tee>,
    id: u64,
    /// The index, in the whole body, of the next chunk to send.
    next: usize,
    trailers_sent: bool,
}

impl std::fmt::Debug for TeeReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeeReader")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl TeeReader {
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Cut>>> {
        let mut state = self.tee.state();
        if self.next < state.base {
            state.waiting.remove(&self.id);
            return Poll::Ready(Some(Err(Cut(
                "this request fell too far behind the streamed response it shared",
            ))));
        }
        if let Some(chunk) = state.chunks.get(self.next - state.base) {
            self.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        match &state.end {
            None => {
                state.waiting.insert(self.id, cx.waker().clone());
                Poll::Pending
            }
            Some(End::Complete) => Poll::Ready(None),
            Some(End::Trailers(_)) if self.trailers_sent => Poll::Ready(None),
            Some(End::Trailers(trailers)) => {
                self.trailers_sent = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers.clone()))))
            }
            Some(End::Cut) => Poll::Ready(Some(Err(Cut(
                "the streamed response this request shared was cut before its end",
            )))),
        }
    }

    /// Whether the body ended (its last frame was sent).
    pub(crate) fn is_end_stream(&self) -> bool {
        let state = self.tee.state();
        self.next >= state.base + state.chunks.len()
            && match &state.end {
                Some(End::Complete) => true,
                Some(End::Trailers(_)) => self.trailers_sent,
                _ => false,
            }
    }
}

impl Drop for TeeReader {
    fn drop(&mut self) {
        self.tee.state().waiting.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(reader: &mut TeeReader) -> Poll<Option<Result<Frame<Bytes>, Cut>>> {
        reader.poll_frame(&mut Context::from_waker(Waker::noop()))
    }

    fn data(poll: Poll<Option<Result<Frame<Bytes>, Cut>>>) -> Bytes {
        match poll {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap(),
            _ => panic!("no data frame"),
        }
    }

    #[test]
    fn followers_get_each_chunk_then_the_end() {
        let (tee, writer) = Tee::new(
            StatusCode::OK,
            HeaderMap::new(),
            Binding::default(),
            100,
            [Bytes::from("a")],
        );
        let mut early = tee.reader().unwrap();
        assert_eq!(data(poll(&mut early)), "a");
        assert!(poll(&mut early).is_pending());
        writer.push(&Bytes::from("b"));
        let mut late = tee.reader().unwrap();
        assert_eq!(data(poll(&mut early)), "b");
        assert_eq!(data(poll(&mut late)), "a");
        assert_eq!(data(poll(&mut late)), "b");
        writer.complete();
        assert!(matches!(poll(&mut early), Poll::Ready(None)));
        assert!(late.is_end_stream());
    }

    #[test]
    fn a_cut_leader_cuts_every_follower_and_admits_no_more() {
        let (tee, writer) = Tee::new(
            StatusCode::OK,
            HeaderMap::new(),
            Binding::default(),
            100,
            [Bytes::from("a")],
        );
        let mut follower = tee.reader().unwrap();
        assert_eq!(data(poll(&mut follower)), "a");
        drop(writer);
        assert!(matches!(poll(&mut follower), Poll::Ready(Some(Err(_)))));
        assert!(tee.reader().is_none());
    }

    #[test]
    fn past_the_cap_only_the_last_caps_worth_is_held() {
        let (tee, writer) = Tee::new(StatusCode::OK, HeaderMap::new(), Binding::default(), 4, []);
        let mut behind = tee.reader().unwrap();
        let mut along = tee.reader().unwrap();
        for chunk in ["ab", "cd", "ef"] {
            writer.push(&Bytes::from(chunk));
            assert_eq!(data(poll(&mut along)), chunk);
        }
        assert_eq!(tee.state().held, 4);
        // "ab" is gone: the reader still at the start is cut, and a new
        // one cannot start.
        assert!(matches!(poll(&mut behind), Poll::Ready(Some(Err(_)))));
        assert!(tee.reader().is_none());
        writer.trailers(&HeaderMap::new());
        assert!(matches!(poll(&mut along), Poll::Ready(Some(Ok(f))) if f.is_trailers()));
        assert!(matches!(poll(&mut along), Poll::Ready(None)));
    }
}
