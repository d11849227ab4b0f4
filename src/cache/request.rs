//! The state of one request on a cached route, and the one place where a
//! lookup's outcome is decided ([`Ctx::decide`]): a hit, a flight to join,
//! or the handler to call; then how the request ended (`x-cache`,
//! `cache-status`, counters).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;

use super::body::ResponseBody;
use super::storable::{collect_capped, declared_length, entry_of, unstorable_reason};
use crate::coding::{etag_for, Accepts};
use crate::entry::{Entry, Slot};
use crate::flight::{Landed, Leader, Role};
use crate::key::{Binding, BINDING_LEN};
use crate::policy::Policy;
use crate::reason::Reason;
use crate::stats::telemetry::{warn_limited, Op};
use crate::store::{CacheKey, Lookup, Observed, StoreError, StoreFuture};
use tracing::Instrument;

/// The `cache-status` cache name (RFC 9211).
const CACHE_NAME: &str = "tower-redis-cache";

use crate::headers::{CACHE_STATUS, X_CACHE_NAME};

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
    policy: Policy,
    route: usize,
    key: Option<CacheKey>,
    head: bool,
    seen: Option<Lookup>,
    bypass: Option<Reason>,
    started: Instant,
    /// When the entry write started, for the store latency.
    write_started: Option<Instant>,
    leader: Option<Leader>,
    /// The entry's response could not be stored lately: this miss did
    /// not wait for a flight (hit-for-miss).
    passed: bool,
    /// The store is slow for the route: the hedge runs out at once.
    at_once: bool,
    /// When the inner service was called, on a miss.
    called_at: Option<Instant>,
    if_none_match: Option<HeaderValue>,
    /// What an entry must be bound to, to be served to this request.
    binding: Binding,
    /// The content codings the request accepts.
    accepts: Accepts,
    /// The largest body stored for this response: the cap less its headers.
    body_cap: usize,
    /// The span of the store operation under way (disabled unless a
    /// subscriber wants DEBUG spans).
    pub(crate) span: tracing::Span,
    /// On a route kept in process too: the tier's generation read before
    /// the store was asked; and whether the tier answered.
    #[cfg(feature = "tier")]
    local: Local,
}

/// Where a request on a route kept in process stands with the tier.
#[cfg(feature = "tier")]
#[derive(Default)]
struct Local {
    generation: Option<u64>,
    served: bool,
    /// The entry this miss stored and its stored size, kept in process
    /// once the store wrote it.
    stored: Option<(Entry, usize)>,
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

    /// The timer after which a lookup still under way lets the handler
    /// answer (see [`Route::hedge`](crate::Route::hedge)).
    /// While the store is slow for the route (see
    /// [`HEDGE_STREAK`](crate::HEDGE_STREAK)), it runs out at once: the
    /// lookup is sent, then the handler answers.
    pub(crate) fn hedge_timer(&mut self) -> Option<std::pin::Pin<Box<tokio::time::Sleep>>> {
        let route = self.policy.route(self.route);
        let budget = route.hedge.budget()?;
        self.at_once = route.hedge.at_once();
        let budget = if self.at_once { Duration::ZERO } else { budget };
        Some(Box::pin(tokio::time::sleep_until(
            tokio::time::Instant::from_std(self.started) + budget,
        )))
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

    /// The inner service is called now.
    pub(crate) fn calling(&mut self) {
        self.called_at = Some(Instant::now());
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
            Some(filling) => ResponseBody::teeing(Default::default(), Box::pin(body), filling),
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

    fn owning(policy: Policy, route: usize, head: bool) -> Self {
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
            if_none_match: None,
            binding: [0; BINDING_LEN],
            accepts: Accepts::default(),
            body_cap,
            span: tracing::Span::none(),
            #[cfg(feature = "tier")]
            local: Local::default(),
        }
    }

    /// The response from the in-process tier, when the route uses it and
    /// holds a servable entry for `key`; else `key` back, for the store.
    /// Reads the tier's generation first, for the fill once the store
    /// answered.
    #[cfg(feature = "tier")]
    pub(crate) fn local_hit<B: Body>(
        &mut self,
        key: CacheKey,
    ) -> Result<Response<ResponseBody<B>>, CacheKey> {
        let tier = match (self.policy.route(self.route).in_process, self.policy.tier()) {
            (Some(_), Some(tier)) => tier,
            _ => return Err(key),
        };
        self.local.generation = Some(tier.generation());
        let found = tier
            .get(&key, self.started)
            .filter(|entry| entry.binding == self.binding)
            .and_then(|entry| self.representation(entry));
        match found {
            Some(entry) => {
                self.key = Some(key);
                self.local.served = true;
                Ok(self.hit(entry, self.now_ms()))
            }
            None => Err(key),
        }
    }

    /// Keeps `entry` (`size` bytes stored), fresh for `fresh_for`, in the
    /// in-process tier, unless an invalidation of its key or group arrived
    /// since the lookup began.
    #[cfg(feature = "tier")]
    fn fill_local(&self, entry: Entry, size: usize, fresh_for: Duration) {
        let (Some(generation), Some(key), Some(tier)) =
            (self.local.generation, &self.key, self.policy.tier())
        else {
            return;
        };
        if let Some(bound) = self.policy.route(self.route).in_process {
            let until = self.started + bound.min(fresh_for);
            tier.fill(key, entry, size, generation, until);
        }
    }

    /// Starts the span of a store operation on this route.
    fn start_span(&mut self, op: Op) {
        self.span = store_span(op, &self.policy.route(self.route).label);
    }

    /// Ends the lookup's span with its outcome (the clock is read only
    /// when a subscriber records the span).
    fn end_lookup_span(&self, outcome: &'static str) {
        if !self.span.is_disabled() {
            self.end_span(outcome, self.started.elapsed());
        }
    }

    /// Ends the current store operation's span with its outcome.
    fn end_span(&self, outcome: &'static str, took: Duration) {
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

    /// The entry as this request gets it: as stored when its body is in a
    /// coding the request accepts (or in none), else decoded. `None` when
    /// the stored stream does not decode: a miss.
    fn representation(&self, entry: Entry) -> Option<Entry> {
        match entry.coding {
            Some((coding, _)) if !self.accepts.accepts(coding) => entry.identity(),
            _ => Some(entry),
        }
    }

    /// The entry in `raw`, when it is one bound to this request: an entry
    /// stored for another key or other request inputs is a miss.
    fn servable(&self, raw: Bytes) -> Option<Entry> {
        match crate::entry::decode(raw) {
            Slot::Entry(entry) if entry.binding == self.binding => Some(entry),
            Slot::Entry(_) => {
                tracing::debug!(route = self.label(), key = %self.key_text(), "entry bound to other request inputs; a miss");
                None
            }
            _ => None,
        }
    }

    pub(crate) fn policy(&self) -> &Policy {
        &self.policy
    }

    fn label(&self) -> &str {
        &self.policy.route(self.route).label
    }

    /// The key for log events, formatted only if an event is emitted.
    fn key_text(&self) -> KeyText<'_> {
        KeyText(self.key.as_ref())
    }

    /// The response of a hit on `entry`, at `now_ms`: the wall clock at the
    /// request's start, derived from the instant read then (see
    /// [`unix_ms_at`](crate::clock::unix_ms_at)).
    pub(crate) fn hit<B: Body>(&mut self, entry: Entry, now_ms: u64) -> Response<ResponseBody<B>> {
        let (ttl, age, stale) = (
            entry.remaining_ttl_s(now_ms),
            entry.age_s(now_ms),
            self.is_stale(&entry, now_ms),
        );
        let mut response = self.entry_response(entry);
        let not_modified = match (&self.if_none_match, response.headers().get(header::ETAG)) {
            (Some(condition), Some(etag)) => crate::entry::none_match(condition, etag),
            _ => false,
        };
        if not_modified {
            // RFC 9110 15.4.5: the validator and caching headers, no content.
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            *response.body_mut() = ResponseBody::unsized_empty();
            let headers = response.headers_mut();
            for name in [
                header::CONTENT_LENGTH,
                header::CONTENT_TYPE,
                header::CONTENT_LANGUAGE,
                header::CONTENT_ENCODING,
            ] {
                headers.remove(name);
            }
        }
        #[cfg(feature = "tier")]
        let local = self.local.served;
        #[cfg(not(feature = "tier"))]
        let local = false;
        self.finish(
            response,
            Outcome::Hit {
                ttl,
                age,
                stale,
                local,
            },
        )
    }

    /// The one place a lookup's outcome is decided: a hit (fresh, or stale
    /// with its background refresh), joining the flight already calling the
    /// inner service, or calling it.
    pub(crate) fn decide<B: Body>(&mut self, found: Result<Lookup, StoreError>) -> Next<B> {
        let mut found = match found {
            Ok(found) => found,
            Err(err) => {
                self.end_lookup_span("error");
                self.lookup_failed(&err);
                return Next::Call;
            }
        };
        if let Observed::Value(raw) = found.take_payload() {
            #[cfg(feature = "tier")]
            let size = raw.len();
            // On a route that verifies, a sampled hit keeps the stored bytes
            // (a reference count, not a copy) for its check.
            let sample = self.sample().map(|slot| (raw.clone(), slot));
            if let Some(stored) = self.servable(raw) {
                let now_ms = self.now_ms();
                let stale = self.is_stale(&stored, now_ms);
                #[cfg(feature = "tier")]
                let keep = (!stale && self.local.generation.is_some())
                    .then(|| (stored.clone(), stored.fresh_for(now_ms)));
                if let Some(entry) = self.representation(stored) {
                    let refresh = match (stale, sample) {
                        (true, _) => self.refresh(&found),
                        (false, Some((raw, slot))) => self.verification(found, raw, slot),
                        (false, None) => None,
                    };
                    self.end_lookup_span(if stale && refresh.is_some() {
                        "stale"
                    } else {
                        "hit"
                    });
                    #[cfg(feature = "tier")]
                    if let Some((entry, fresh_for)) = keep {
                        self.fill_local(entry, size, fresh_for);
                    }
                    return Next::Serve(self.hit(entry, now_ms), refresh);
                }
            }
        }
        self.end_lookup_span("miss");
        let foreign = found.foreign_lease();
        match self.missed(found) {
            Some(wait) => Next::Join(wait),
            None if foreign && self.leader.is_some() && !self.policy.lease_wait().is_zero() => {
                Next::AwaitFill(tokio::time::Instant::now() + self.policy.lease_wait())
            }
            None => Next::Call,
        }
    }

    /// Looks the entry up again while another process fills it.
    pub(crate) fn look_again(&mut self) -> Option<StoreFuture<Lookup>> {
        let key = self.key.as_ref()?;
        Some(self.policy.store().lookup(key))
    }

    /// What a lookup made while another process fills the entry found:
    /// the entry (served, and shared with this process's waiting misses),
    /// the other's lease still (`None`: wait on), or anything else (the
    /// holder gave up, the entry was purged, the store failed: call the
    /// inner service, with this lookup as what the write compares against).
    pub(crate) fn filled<B: Body>(&mut self, found: Result<Lookup, StoreError>) -> Option<Next<B>> {
        let Ok(mut found) = found else {
            return Some(Next::Call);
        };
        if found.foreign_lease() {
            return None;
        }
        match found.take_payload() {
            Observed::Value(raw) => match self
                .servable(raw.clone())
                .and_then(|e| self.representation(e))
            {
                Some(entry) => {
                    self.share(&raw);
                    Some(Next::Serve(self.collapsed(entry), None))
                }
                None => {
                    self.seen = Some(found.detached());
                    Some(Next::Call)
                }
            },
            _ => {
                self.seen = Some(found.detached());
                Some(Next::Call)
            }
        }
    }

    /// How the flight this request waited on landed: its response shared,
    /// or the inner service to call, or (its leader gone) the flight to
    /// take over or to wait on again.
    pub(crate) fn landed<B: Body>(&mut self, landed: Option<Landed>) -> Next<B> {
        match landed {
            Some(Landed::Entry(raw)) => {
                match self.servable(raw).and_then(|e| self.representation(e)) {
                    Some(entry) => Next::Serve(self.collapsed(entry), None),
                    None => Next::Call,
                }
            }
            Some(Landed::Unshareable) => Next::Call,
            None => match self.rejoin() {
                Some(wait) => Next::Join(wait),
                None => Next::Call,
            },
        }
    }

    /// The response a follower of a flight gets: the leader's, shared.
    pub(crate) fn collapsed<B: Body>(&mut self, entry: Entry) -> Response<ResponseBody<B>> {
        let response = self.entry_response(entry);
        self.finish(response, Outcome::Collapsed)
    }

    /// The response of `entry` in the representation
    /// [`representation`](Self::representation) chose: a body in a coding
    /// goes with its `Content-Encoding`, its own ETag and `Vary:
    /// accept-encoding`.
    fn entry_response<B: Body>(&self, entry: Entry) -> Response<ResponseBody<B>> {
        let length = entry.body.len() as u64;
        let body = if self.head {
            ResponseBody::empty()
        } else {
            ResponseBody::full(entry.body)
        };
        let mut response = Response::new(body);
        *response.status_mut() = entry.status;
        let headers = response.headers_mut();
        *headers = entry.headers;
        headers.insert(header::CONTENT_LENGTH, decimal_value(length));
        if let Some((coding, _)) = entry.coding {
            headers.insert(header::CONTENT_ENCODING, coding.header_value());
            if let Some(etag) = headers.get(header::ETAG).and_then(|e| etag_for(e, coding)) {
                headers.insert(header::ETAG, etag);
            }
        }
        response
    }

    /// Records what the lookup saw, then leads the flight for this entry or
    /// returns the wait of the flight already under way. A HEAD neither
    /// leads (its response has no body to share) nor waits.
    pub(crate) fn missed(&mut self, found: Lookup) -> Option<crate::flight::Wait> {
        let flights = self.policy.flights();
        let role = match (&self.key, self.head) {
            (Some(key), false) if flights.passes(key, &found) => {
                self.passed = true;
                None
            }
            (Some(key), false) => Some(flights.enter(key, &found)),
            _ => None,
        };
        self.seen = Some(found.detached());
        match role? {
            Role::Lead(leader) => {
                self.leader = Some(leader);
                None
            }
            Role::Join(wait) => Some(wait),
        }
    }

    /// The flight this request waited on lost its leader: lead it now, or
    /// wait on the follower that took it over first.
    pub(crate) fn rejoin(&mut self) -> Option<crate::flight::Wait> {
        let (Some(key), Some(seen)) = (&self.key, &self.seen) else {
            return None;
        };
        match self.policy.flights().enter(key, seen) {
            Role::Lead(leader) => {
                self.leader = Some(leader);
                None
            }
            Role::Join(wait) => Some(wait),
        }
    }

    /// True when `entry` is past its TTL on a route that serves stale
    /// entries while refreshing them.
    pub(crate) fn is_stale(&self, entry: &Entry, now_ms: u64) -> bool {
        !self.policy.route(self.route).stale_window.is_zero() && entry.is_stale(now_ms)
    }

    /// The background refresh of a stale entry, unless one is under way.
    pub(crate) fn refresh(&self, seen: &Lookup) -> Option<Refresh> {
        let key = self.key.clone()?;
        match self.policy.flights().enter(&key, seen) {
            Role::Lead(leader) => Some(Refresh {
                policy: self.policy.clone(),
                route: self.route,
                key,
                binding: self.binding,
                seen: seen.clone().detached(),
                check: None,
                leader: Some(leader),
            }),
            Role::Join(_) => None,
        }
    }

    /// A place for the check of this hit, when the route verifies, the hit
    /// is sampled and the process has a place for one more check.
    fn sample(&self) -> Option<super::verify::Slot> {
        let rate = self.policy.route(self.route).verify;
        if rate <= 0.0 || !super::verify::sampled(rate) {
            return None;
        }
        super::verify::Slot::take()
    }

    /// The check of a fresh hit on the entry stored as `raw`, in the
    /// background. Everything it costs beyond a task (decoding, the
    /// flight that keeps it to one check per entry) happens there: the hit
    /// does not wait for it.
    fn verification(
        &self,
        found: Lookup,
        raw: Bytes,
        slot: super::verify::Slot,
    ) -> Option<Refresh> {
        Some(Refresh {
            policy: self.policy.clone(),
            route: self.route,
            key: self.key.clone()?,
            binding: self.binding,
            seen: found,
            check: Some(Check { raw, _slot: slot }),
            leader: None,
        })
    }

    /// Gives the stored form of the response to the requests waiting on it.
    pub(crate) fn share(&mut self, entry: &Bytes) {
        if let Some(leader) = self.leader.take() {
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
    fn body_cap_for(&self, headers: &HeaderMap) -> Option<usize> {
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

    fn max_body_bytes(&self) -> usize {
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

    #[cfg_attr(not(feature = "tier"), allow(unused_variables))]
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
        match (&self.key, &self.seen) {
            (Some(key), Some(seen)) => {
                #[cfg(feature = "tier")]
                if self.local.generation.is_some() {
                    self.local.stored = Some((entry.clone(), value.len()));
                }
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
                #[cfg(feature = "tier")]
                if let Some((entry, size)) = self.local.stored.take() {
                    self.fill_local(entry, size, self.ttl());
                }
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

    /// Sets `x-cache` and `cache-status`, counts and logs the outcome.
    pub(crate) fn finish<B>(&mut self, mut response: Response<B>, outcome: Outcome) -> Response<B> {
        // Followers still waiting go to the inner service themselves; the
        // misses after them too, for a while, when the response itself
        // could not be stored.
        let led = self.leader.take().map(Leader::unshareable).is_some();
        if let (Some(key), Some(seen)) = (&self.key, &self.seen) {
            match &outcome {
                Outcome::NotStored(reason) if (led || self.passed) && reason.is_response() => {
                    self.policy.flights().unstorable(key, seen);
                }
                Outcome::Stored => self.policy.flights().stored(key, seen),
                _ => {}
            }
        }
        let stats = self.policy.stats_ref();
        let took = self.started.elapsed();
        let status = response.status().as_u16();
        let route = self.label();
        let key = self.key_text();
        let (x_cache, cache_status) = match outcome {
            Outcome::Hit {
                ttl,
                age,
                stale,
                local,
            } => {
                stats.hit(self.route, took, local);
                response
                    .headers_mut()
                    .insert(header::AGE, decimal_value(age));
                tracing::debug!(route, key = %key, stale, "cache hit");
                let detail = match (stale, local) {
                    (true, _) => "; detail=stale-while-revalidate",
                    (false, true) => "; detail=in-process",
                    (false, false) => "",
                };
                ("HIT", hit_status(ttl, detail))
            }
            Outcome::Collapsed => {
                stats.miss(self.route, took);
                tracing::debug!(route, key = %key, "cache miss, collapsed into a flight under way");
                (
                    "MISS",
                    Some(HeaderValue::from_static(
                        "tower-redis-cache; fwd=uri-miss; collapsed",
                    )),
                )
            }
            Outcome::Stored => {
                stats.miss(self.route, took);
                tracing::debug!(route, key = %key, "cache miss, stored");
                (
                    "MISS",
                    header_value(format_args!(
                        "{CACHE_NAME}; fwd=uri-miss; fwd-status={status}; stored"
                    )),
                )
            }
            Outcome::Hedged => {
                stats.miss(self.route, took);
                tracing::debug!(route, key = %key, "cache lookup slow, the handler answered");
                (
                    "MISS",
                    header_value(format_args!(
                        "{CACHE_NAME}; fwd=uri-miss; fwd-status={status}; detail=hedged"
                    )),
                )
            }
            Outcome::Streamed => {
                stats.miss(self.route, took);
                tracing::debug!(route, key = %key, "cache miss, streamed");
                (
                    "MISS",
                    header_value(format_args!(
                        "{CACHE_NAME}; fwd=uri-miss; fwd-status={status}; detail=streamed"
                    )),
                )
            }
            Outcome::NotStored(reason) => {
                stats.miss(self.route, took);
                stats.not_stored(self.route, reason);
                let reason = match self.passed {
                    true => "hit-for-miss",
                    false => reason.as_str(),
                };
                tracing::debug!(route, key = %key, reason, "cache miss, not stored");
                (
                    "MISS",
                    header_value(format_args!(
                        "{CACHE_NAME}; fwd=uri-miss; fwd-status={status}; detail={reason}"
                    )),
                )
            }
            Outcome::Bypass(reason) => {
                stats.bypass(self.route, reason);
                let reason = reason.as_str();
                tracing::debug!(route, reason, "cache bypassed");
                (
                    "BYPASS",
                    header_value(format_args!("{CACHE_NAME}; fwd=bypass; detail={reason}")),
                )
            }
        };
        let headers = response.headers_mut();
        headers.insert(X_CACHE_NAME, HeaderValue::from_static(x_cache));
        if let Some(value) = cache_status {
            headers.insert(CACHE_STATUS, value);
        }
        response
    }
}

/// The `cache-status` of a hit with `ttl` seconds left: formatted once per
/// thread for each distinct value (hits on hot entries repeat it until the
/// next second), then cloned.
fn hit_status(ttl: i64, detail: &'static str) -> Option<HeaderValue> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(i64, &'static str, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((seen, seen_detail, value)) = last.as_ref() {
            // The details are a few literals: the same one is the same
            // pointer, compared without reading the bytes.
            if *seen == ttl && std::ptr::eq(*seen_detail, detail) {
                return Some(value.clone());
            }
        }
        let value = header_value(format_args!("{CACHE_NAME}; hit; ttl={ttl}{detail}"))?;
        *last = Some((ttl, detail, value.clone()));
        Some(value)
    })
}

/// `n` as a header value (`content-length`, `age`): one below 1000 is a
/// slice of a static table, without an allocation (`HeaderValue::from`
/// makes two).
fn decimal_value(n: u64) -> HeaderValue {
    static DIGITS: [u8; 3000] = three_digits();
    if n < 1000 {
        let at = 3 * n as usize;
        let skip = usize::from(n < 100) + usize::from(n < 10);
        let digits = Bytes::from_static(&DIGITS[at + skip..at + 3]);
        if let Ok(value) = HeaderValue::from_maybe_shared(digits) {
            return value;
        }
    }
    header_value(format_args!("{n}")).unwrap_or_else(|| HeaderValue::from(n))
}

/// `000`, `001`, … `999`, one after the other.
const fn three_digits() -> [u8; 3000] {
    let mut digits = [0u8; 3000];
    let mut n = 0;
    while n < 1000 {
        digits[3 * n] = b'0' + (n / 100) as u8;
        digits[3 * n + 1] = b'0' + (n / 10 % 10) as u8;
        digits[3 * n + 2] = b'0' + (n % 10) as u8;
        n += 1;
    }
    digits
}

/// A header value formatted on the stack and copied once (a `String`
/// would grow, then be copied again).
fn header_value(args: std::fmt::Arguments<'_>) -> Option<HeaderValue> {
    use std::io::Write;
    let mut buf = [0u8; 128];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    cursor.write_fmt(args).ok()?;
    let len = cursor.position() as usize;
    HeaderValue::from_bytes(&buf[..len]).ok()
}

/// The span of one store operation: `op` (`lookup`, `store`), the route,
/// then its `outcome` and `duration_us` once it ended.
pub(crate) fn store_span(op: Op, route: &str) -> tracing::Span {
    tracing::debug_span!(
        "cache.store",
        op = op.as_str(),
        route,
        outcome = tracing::field::Empty,
        duration_us = tracing::field::Empty,
    )
}

/// A cache key as logs show it: `app:person:42`, `app:persons:list:v{version}:…`.
struct KeyText<'a>(Option<&'a CacheKey>);

impl std::fmt::Display for KeyText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(CacheKey::Plain(key)) => f.write_str(key),
            Some(CacheKey::Versioned { prefix, suffix, .. }) => {
                write!(f, "{prefix}{{version}}{suffix}")
            }
            None => Ok(()),
        }
    }
}

/// A stale entry's refresh: the inner service called in the background with
/// the request that found the entry stale, its response stored if it may be.
/// Holding the flight keeps other stale hits from refreshing too. With a
/// [`Check`], the verification of a fresh hit: the response replaces the
/// entry only when it differs from it.
pub(crate) struct Refresh {
    policy: Policy,
    route: usize,
    key: CacheKey,
    binding: Binding,
    seen: Lookup,
    check: Option<Check>,
    /// The flight that keeps others from refreshing (or checking) this
    /// entry meanwhile; a check enters it in the background.
    leader: Option<Leader>,
}

/// A sampled hit's entry as stored, to compare with the handler's
/// response, and the process's place for the check while it runs.
pub(crate) struct Check {
    raw: Bytes,
    _slot: super::verify::Slot,
}

impl Refresh {
    /// Runs in the background, with the request that found the entry stale
    /// (as a GET: a HEAD's answer has no body to store) on the clone of the
    /// inner service it waited with.
    pub(crate) fn start<S, ReqBody, ResBody>(self, call: Call<S, ReqBody>)
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
        S::Future: Send,
        ReqBody: Send + 'static,
        ResBody: Body + Send + 'static,
        ResBody::Data: Send,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Call {
            service,
            mut request,
        } = call;
        if request.method() == Method::HEAD {
            *request.method_mut() = Method::GET;
        }
        match self.check.is_some() {
            // A check is queued: the hit does not pay for waking a thread.
            true => {
                let background = self.policy.clone();
                background
                    .background()
                    .push(Box::pin(self.run(service, request)));
            }
            false => {
                runtime.spawn(self.run(service, request));
            }
        }
    }

    async fn run<S, ReqBody, ResBody>(mut self, mut service: S, request: Request<ReqBody>)
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: Body,
    {
        // A check: one per entry at a time, and only of an entry it reads.
        let mut stored = None;
        if let Some(check) = &self.check {
            let Role::Lead(leader) = self.policy.flights().enter(&self.key, &self.seen) else {
                return;
            };
            self.leader = Some(leader);
            match crate::entry::decode(check.raw.clone()) {
                Slot::Entry(entry) => stored = Some(entry),
                _ => return,
            }
        }
        let route = self.policy.route(self.route);
        if std::future::poll_fn(|cx| service.poll_ready(cx))
            .await
            .is_err()
        {
            return;
        }
        let Ok(response) = service.call(request).await else {
            return;
        };
        let refused = unstorable_reason(
            response.status(),
            response.headers(),
            |h| route.varies_on(h),
            route.despite,
        );
        let (mut parts, body) = response.into_parts();
        let cap = self
            .policy
            .max_body_bytes()
            .saturating_sub(crate::entry::headers_len(&crate::entry::stored_headers(
                &parts.headers,
                self.policy.per_response(),
            )));
        let collected = match refused {
            Some(reason) => Err(reason),
            None => collect_capped(body, cap).await,
        };
        let made = collected.and_then(|body| {
            entry_of(
                &self.policy,
                self.binding,
                route.ttl,
                crate::clock::shifted(
                    crate::clock::unix_ms(),
                    self.policy.store().clock_offset_ms(),
                ),
                parts.status,
                &mut parts.headers,
                &body,
            )
        });
        if let Some(stored) = &stored {
            // A response that may not be stored differs from an entry that
            // was: another status, a cookie, a body over the cap.
            let same = match &made {
                Ok((fresh, _)) => super::verify::same_response(stored, fresh),
                Err(_) => false,
            };
            if self.policy.stats_ref().verified(self.route, !same) {
                tracing::warn!(
                    route = route.label,
                    "a sampled hit differed from the handler's response: the entry was stale (a write no rule invalidates?); replacing it"
                );
            }
            if same {
                return;
            }
        }
        let entry = match made {
            Ok((_, encoded)) => encoded,
            Err(reason) => {
                self.policy.stats_ref().not_stored(self.route, reason);
                return;
            }
        };
        let span = store_span(Op::Store, &route.label);
        let started = Instant::now();
        let stored = self
            .policy
            .store()
            .store(&self.key, &self.seen, entry, route.ttl + route.stale_window)
            .instrument(span.clone())
            .await;
        let took = started.elapsed();
        span.record("duration_us", took.as_micros() as u64);
        match stored {
            Ok(true) => {
                span.record("outcome", "stored");
                self.policy.stats_ref().stored(self.route, took);
                tracing::debug!(route = route.label, "stale entry refreshed");
            }
            Ok(false) => {
                span.record("outcome", "raced");
                self.policy
                    .stats_ref()
                    .not_stored(self.route, Reason::Raced);
                tracing::debug!(
                    route = route.label,
                    "stale entry refresh raced an invalidation; not stored"
                );
            }
            Err(err) => {
                span.record("outcome", "error");
                self.policy
                    .stats_ref()
                    .error(self.route, Op::Store, err.kind());
                warn_limited!(route = route.label, error = %err, "stale entry refresh not stored");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_values_read_as_their_numbers() {
        for n in (0..=1100).chain([9_999, 123_456, u64::MAX]) {
            assert_eq!(decimal_value(n).to_str().unwrap(), n.to_string(), "{n}");
        }
    }

    #[test]
    fn every_cache_status_fits_the_stack_buffer() {
        for reason in Reason::ALL {
            let reason = reason.as_str();
            let value = header_value(format_args!(
                "{CACHE_NAME}; fwd=uri-miss; fwd-status=599; detail={reason}"
            ));
            assert!(value.is_some(), "{reason}");
        }
        let hit = header_value(format_args!(
            "{CACHE_NAME}; hit; ttl={}; detail=stale-while-revalidate",
            i64::MIN
        ));
        assert!(hit.is_some());
    }
}
