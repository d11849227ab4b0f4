//! The state of one request on a cached route, and the one place where a
//! lookup's outcome is decided ([`Ctx::decide`]): a hit, a flight to join,
//! or the handler to call; then how the request ended (`x-cache`,
//! `cache-status`, counters).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response};
use http_body::Body;

use super::body::ResponseBody;
use super::storable::{declared_length, unstorable_reason};
use crate::coding::Accepts;
use crate::entry::Entry;
use crate::flight::Leader;
use crate::key::{Binding, BINDING_LEN};
use crate::policy::Policy;
use crate::reason::{HandlerCall, Reason};
use crate::stats::telemetry::{warn_limited, Op};
use crate::store::{CacheKey, Lookup, StoreError, StoreFuture};

use super::local::Local;
use super::refresh::Refresh;
use super::report::{store_span, KeyText};

/// A call of the inner service, waiting for the store to say whether it is
/// needed.
pub(crate) struct Call<S, ReqBody> {
    pub(crate) service: S,
    pub(crate) request: Request<ReqBody>,
}

/// What a request on a cached route does next, once the store (or the
/// flight it waited on) answered.
// Short-lived and moved once; boxing the response would cost every hit an
// allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Next<B: Body> {
    /// Answer with this response; start this refresh of a stale entry.
    Serve(Response<ResponseBody<B>>, Option<Refresh>),
    /// Wait for the request already calling the inner service.
    Join(crate::flight::Wait),
    /// Wait for another process's fill of the entry (its lease), until
    /// this instant; the other misses of this process wait on this one.
    AwaitFill(tokio::time::Instant),
    /// Call the inner service.
    Call,
}

/// How one request on a cached route ended.
pub(crate) enum Outcome {
    Hit {
        ttl: i64,
        age: u64,
        stale: bool,
        local: bool,
    },
    Collapsed,
    Stored,
    /// A miss sent as its body arrived; stored later if it ends complete.
    Streamed,
    /// The lookup was slow: the handler answered (stored in the background).
    Hedged,
    NotStored(Reason),
    Bypass(Reason),
}

/// Per-request state of a cached route.
pub(crate) struct Ctx {
    pub(super) policy: Policy,
    pub(super) route: usize,
    pub(super) key: Option<CacheKey>,
    pub(super) head: bool,
    pub(super) seen: Option<Lookup>,
    pub(super) bypass: Option<Reason>,
    pub(super) started: Instant,
    /// When the entry write started, for the store latency.
    pub(super) write_started: Option<Instant>,
    pub(super) leader: Option<Leader>,
    /// The entry's response could not be stored lately: this miss did
    /// not wait for a flight (hit-for-miss).
    pub(super) passed: bool,
    /// The store is slow for the route: the hedge runs out at once.
    pub(super) at_once: bool,
    /// When the inner service was called, on a miss.
    pub(super) called_at: Option<Instant>,
    /// Why the handler is called, when the request's other state does not
    /// tell (see [`calling`](Self::calling)).
    pub(super) why: Option<HandlerCall>,
    pub(super) if_none_match: Option<HeaderValue>,
    /// What an entry must be bound to, to be served to this request.
    pub(super) binding: Binding,
    /// The content codings the request accepts.
    pub(super) accepts: Accepts,
    /// The largest body stored for this response: the cap less its headers.
    pub(super) body_cap: usize,
    /// The span of the store operation under way (disabled unless a
    /// subscriber wants DEBUG spans).
    pub(crate) span: tracing::Span,
    /// On a route kept in process too: the tier's generation read before
    /// the store was asked; and whether the tier answered.
    pub(super) local: Local,
}

impl Ctx {
    /// A request on `route` that bypasses the cache for `reason`.
    pub(crate) fn bypassing(policy: &Policy, route: usize, head: bool, reason: Reason) -> Self {
        let mut ctx = Self::owning(policy.clone(), route, head);
        ctx.bypass = Some(reason);
        ctx
    }

    /// A request on `route` that looks the cache up, for entries bound to
    /// `binding`, with the request's `headers` (the codings it accepts, its
    /// `If-None-Match`).
    pub(crate) fn looking_up(
        policy: Policy,
        route: usize,
        head: bool,
        binding: Binding,
        headers: &HeaderMap,
    ) -> Self {
        let mut ctx = Self::owning(policy, route, head);
        ctx.binding = binding;
        ctx.accepts = Accepts::of(headers);
        ctx.if_none_match = headers.get(header::IF_NONE_MATCH).cloned();
        ctx
    }

    /// When this request started, on the store's clock (the one clock of
    /// every process: see [`Store::clock_offset_ms`](crate::store::Store::clock_offset_ms)).
    pub(crate) fn now_ms(&self) -> u64 {
        let local = crate::clock::unix_ms_at(self.started);
        crate::clock::shifted(local, self.policy.store().clock_offset_ms())
    }

    /// Runs `poll` inside the span of the store operation under way.
    pub(crate) fn in_span<T>(&self, poll: impl FnOnce() -> T) -> T {
        let _span = self.span.enter();
        poll()
    }

    /// The timer after which a lookup still under way lets the handler
    /// answer (see [`Route::hedge`](crate::Route::hedge)).
    /// While the store is slow for the route (see
    /// two), it runs out at once: the
    /// lookup is sent, then the handler answers.
    pub(crate) fn hedge_timer(&mut self) -> Option<std::pin::Pin<Box<tokio::time::Sleep>>> {
        let route = self.policy.route(self.route);
        route.hedge.requested();
        let budget = route.hedge.budget()?;
        self.at_once = route.hedge.at_once();
        let budget = if self.at_once { Duration::ZERO } else { budget };
        Some(Box::pin(tokio::time::sleep_until(
            tokio::time::Instant::from_std(self.started) + budget,
        )))
    }

    /// The hedge ran out: whether the handler may answer now (a route
    /// hedging within a budget spends one of its hedges, and has none
    /// left past 5% of its requests: the lookup is then waited for).
    pub(crate) fn admit_hedge(&self) -> bool {
        self.policy.route(self.route).hedge.admit()
    }

    /// This request's lookup ended now (on a hedging route: its time
    /// feeds the streak of slow lookups).
    pub(crate) fn looked_up(&self) {
        let route = self.policy.route(self.route);
        if route.hedge.is_on() {
            route.hedge.took(self.started.elapsed(), false);
        }
    }

    /// The hedge ran out, the lookup still under way: returns `lookup`,
    /// going on, timed when it ends. One that ran past the budget counts
    /// as slow now; one sent at once (the store being slow), when it ends.
    pub(crate) fn hedging(&self, lookup: StoreFuture<Lookup>) -> StoreFuture<Lookup> {
        let (policy, route, started) = (self.policy.clone(), self.route, self.started);
        let counted = !self.at_once;
        if counted {
            policy.route(route).hedge.ran_past();
        }
        Box::pin(async move {
            let found = lookup.await;
            policy.route(route).hedge.took(started.elapsed(), counted);
            found
        })
    }

    /// The inner service is called now: counted with why.
    pub(crate) fn calling(&mut self) {
        self.called_at = Some(Instant::now());
        let why = match (self.bypass, self.why) {
            (Some(reason), _) => HandlerCall::Bypass(reason),
            (None, Some(why)) => why,
            (None, None) if self.passed => HandlerCall::HitForMiss,
            (None, None) if self.head => HandlerCall::HeadMiss,
            (None, None) => HandlerCall::Miss,
        };
        self.policy.stats_ref().handler_called(self.route, why);
    }

    /// The inner service answered: its time feeds the route's hedge.
    pub(crate) fn answered(&mut self) {
        if let Some(at) = self.called_at.take() {
            self.policy
                .route(self.route)
                .hedge
                .handler_took(at.elapsed());
        }
    }

    /// The handler's response to a request whose lookup was slow: sent as
    /// it comes, stored in the background under what `lookup` (still under
    /// way) reads, when storable.
    pub(crate) fn hedged<B: Body + Send + 'static>(
        &mut self,
        response: Response<B>,
        lookup: StoreFuture<Lookup>,
    ) -> Response<ResponseBody<B>> {
        self.end_lookup_span("hedged");
        let storable = self.storable(&response);
        let filling = match (&self.key, storable) {
            (Some(key), Ok(())) => Some(super::stream::Filling {
                policy: self.policy.clone(),
                route: self.route,
                key: key.clone(),
                seen: super::stream::Seen::Pending(lookup),
                detached: true,
                leader: None,
                binding: self.binding,
                ttl: self.ttl(),
                status: response.status(),
                headers: response.headers().clone(),
                started: self.started,
                copy: Vec::new(),
                size: 0,
                cap: self.body_cap,
            }),
            _ => {
                // Still counted, for the breaker's slow-call rate.
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(lookup);
                }
                None
            }
        };
        let (parts, body) = response.into_parts();
        let body = match filling {
            Some(filling) => {
                ResponseBody::teeing(Default::default(), Box::pin(body), filling, None)
            }
            None => ResponseBody::inner(body),
        };
        self.finish(Response::from_parts(parts, body), Outcome::Hedged)
    }

    /// Starts the store's lookup of `key`.
    pub(crate) fn look_up(&mut self, key: CacheKey) -> StoreFuture<Lookup> {
        let lookup = self.policy.store().lookup(&key);
        self.key = Some(key);
        self.start_span(Op::Lookup);
        lookup
    }

    pub(super) fn owning(policy: Policy, route: usize, head: bool) -> Self {
        let body_cap = policy.max_body_bytes();
        Self {
            policy,
            route,
            key: None,
            head,
            seen: None,
            bypass: None,
            started: Instant::now(),
            write_started: None,
            leader: None,
            passed: false,
            at_once: false,
            called_at: None,
            why: None,
            if_none_match: None,
            binding: [0; BINDING_LEN],
            accepts: Accepts::default(),
            body_cap,
            span: tracing::Span::none(),
            local: Local::default(),
        }
    }

    /// Starts the span of a store operation on this route.
    pub(super) fn start_span(&mut self, op: Op) {
        self.span = store_span(op, &self.policy.route(self.route).label);
    }

    /// Ends the lookup's span with its outcome (the clock is read only
    /// when a subscriber records the span).
    pub(super) fn end_lookup_span(&self, outcome: &'static str) {
        if !self.span.is_disabled() {
            self.end_span(outcome, self.started.elapsed());
        }
    }

    /// Ends the current store operation's span with its outcome.
    pub(super) fn end_span(&self, outcome: &'static str, took: Duration) {
        self.span.record("outcome", outcome);
        self.span.record("duration_us", took.as_micros() as u64);
    }

    pub(crate) fn ttl(&self) -> Duration {
        self.policy.route(self.route).ttl
    }

    /// The largest body stored for the response being read.
    pub(crate) fn body_cap(&self) -> usize {
        self.body_cap
    }

    /// The binding entries this request stores carry.
    pub(crate) fn binding(&self) -> Binding {
        self.binding
    }

    pub(crate) fn policy(&self) -> &Policy {
        &self.policy
    }

    pub(super) fn label(&self) -> &str {
        &self.policy.route(self.route).label
    }

    /// The key for log events, formatted only if an event is emitted.
    pub(super) fn key_text(&self) -> KeyText<'_> {
        KeyText(self.key.as_ref())
    }

    /// Gives the stored form of the response to the requests waiting on
    /// it, and to those that join until this request ends (its write done).
    pub(crate) fn share(&mut self, entry: &Bytes) {
        if let Some(leader) = &mut self.leader {
            leader.share(entry.clone());
        }
    }

    pub(crate) fn lookup_failed(&mut self, err: &StoreError) {
        match err {
            StoreError::CircuitOpen => {
                self.bypass = Some(Reason::CircuitOpen);
                return;
            }
            StoreError::PendingInvalidations => {
                self.bypass = Some(Reason::PendingInvalidations);
                return;
            }
            _ => {}
        }
        self.policy
            .stats_ref()
            .error(self.route, Op::Lookup, err.kind());
        warn_limited!(route = self.label(), key = %self.key_text(), error = %err, "cache lookup failed; serving from the handler");
        self.bypass = Some(Reason::StoreError);
    }

    /// Whether the response may be stored, decided from its head alone.
    /// Sets the body cap for the response: the policy's, less what its
    /// stored headers take.
    pub(crate) fn storable<B: Body>(&mut self, response: &Response<B>) -> Result<(), Outcome> {
        if let Some(reason) = self.bypass {
            return Err(Outcome::Bypass(reason));
        }
        let route = self.policy.route(self.route);
        let reason = match unstorable_reason(
            response.status(),
            response.headers(),
            |name| route.varies_on(name),
            route.despite,
        ) {
            Some(reason) => reason,
            None if self.head => Reason::Head,
            None => match self.body_cap_for(response.headers()) {
                Some(cap) if declared_length(response) <= cap as u64 => {
                    self.body_cap = cap;
                    return Ok(());
                }
                _ => Reason::TooLarge,
            },
        };
        Err(Outcome::NotStored(reason))
    }

    /// The policy's cap less the bytes the stored headers of `headers`
    /// take; `None` when they alone exceed it.
    pub(super) fn body_cap_for(&self, headers: &HeaderMap) -> Option<usize> {
        let per_response = self.policy.per_response();
        let (mut count, mut bytes) = (0, 0);
        for (name, value) in headers {
            if crate::entry::is_stored_header(name, headers, per_response) {
                count += 1;
                bytes += 6 + name.as_str().len() + value.len();
            }
        }
        if count > crate::entry::MAX_HEADERS {
            return None;
        }
        self.max_body_bytes().checked_sub(bytes)
    }

    pub(super) fn max_body_bytes(&self) -> usize {
        self.policy.max_body_bytes()
    }

    /// Writes `value`, the stored form of `entry` (which the in-process
    /// tier keeps once the store wrote it).
    /// What storing the body of this miss needs once it ended, as it
    /// streams to the client: the flight's lead goes with it. `None` when
    /// nothing may be stored (no key or lookup, a bypass).
    pub(crate) fn filling(
        &mut self,
        parts: &http::response::Parts,
    ) -> Option<super::stream::Filling> {
        let (Some(key), Some(seen)) = (&self.key, &self.seen) else {
            return None;
        };
        Some(super::stream::Filling {
            policy: self.policy.clone(),
            route: self.route,
            key: key.clone(),
            seen: super::stream::Seen::Known(seen.clone()),
            detached: false,
            leader: self.leader.take(),
            binding: self.binding,
            ttl: self.ttl(),
            status: parts.status,
            headers: parts.headers.clone(),
            started: self.started,
            copy: Vec::new(),
            size: 0,
            cap: self.body_cap,
        })
    }

    pub(crate) fn write(
        &mut self,
        entry: &Entry,
        value: Bytes,
    ) -> Result<StoreFuture<bool>, Reason> {
        let store = self.policy.store();
        // A delete's tombstone guards a key for `tombstone_ttl`; a miss slower
        // than half of it might store over an expired tombstone.
        if self.started.elapsed() > store.tombstone_ttl() / 2 {
            return Err(Reason::SlowMiss);
        }
        let ttl = self.ttl() + self.policy.route(self.route).stale_window;
        if self.key.is_some() && self.seen.is_some() {
            self.storing(entry, value.len());
        }
        let store = self.policy.store();
        match (&self.key, &self.seen) {
            (Some(key), Some(seen)) => {
                let write = store.store(key, seen, value, ttl);
                self.write_started = Some(Instant::now());
                self.start_span(Op::Store);
                Ok(write)
            }
            _ => Err(Reason::StoreError),
        }
    }

    pub(crate) fn written<B>(
        &mut self,
        response: Response<B>,
        written: Result<bool, StoreError>,
    ) -> Response<B> {
        let took = self
            .write_started
            .map(|at| at.elapsed())
            .unwrap_or_default();
        let outcome = match written {
            Ok(true) => {
                self.stored_locally();
                self.end_span("stored", took);
                self.policy.stats_ref().stored(self.route, took);
                Outcome::Stored
            }
            Ok(false) => {
                self.end_span("raced", took);
                Outcome::NotStored(Reason::Raced)
            }
            Err(err) => {
                self.end_span("error", took);
                self.policy
                    .stats_ref()
                    .error(self.route, Op::Store, err.kind());
                warn_limited!(route = self.label(), key = %self.key_text(), error = %err, "cache store failed");
                Outcome::NotStored(Reason::StoreError)
            }
        };
        self.finish(response, outcome)
    }
}
