//! Where a request's outcome is decided: what the lookup found (a hit, a
//! stale entry to refresh, a guard, nothing), what a flight or another
//! process's fill brought, and the response a hit becomes.

use super::body::ResponseBody;
use crate::coding::etag_for;
use crate::entry::{Entry, Slot};
use crate::flight::{Landed, Role};
use crate::store::{LeaseHolder, Lookup, Observed, StoreError, StoreFuture};
use bytes::Bytes;
use http::header::{self};
use http::{Response, StatusCode};
use http_body::Body;

use super::report::decimal_value;
use super::request::{Ctx, Next, Outcome};

impl Ctx {
    /// The entry as this request gets it: as stored when its body is in a
    /// coding the request accepts (or in none), else decoded. `None` when
    /// the stored stream does not decode: a miss.
    pub(super) fn representation(&self, entry: Entry) -> Option<Entry> {
        match entry.coding {
            Some((coding, _)) if !self.accepts.accepts(coding) => entry.identity(),
            _ => Some(entry),
        }
    }

    /// The entry in `raw`, when it is one bound to this request: an entry
    /// stored for another key or other request inputs is a miss (and the
    /// handler call it costs says so).
    pub(super) fn servable(&mut self, raw: Bytes) -> Option<Entry> {
        match crate::entry::decode(raw) {
            Slot::Entry(entry) if entry.binding == self.binding => Some(entry),
            Slot::Entry(_) => {
                tracing::debug!(route = self.label(), key = %self.key_text(), "entry bound to other request inputs; a miss");
                self.why = Some(crate::reason::HandlerCall::OtherVariant);
                None
            }
            _ => None,
        }
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
        let local = self.served_locally();
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
            let size = raw.len();
            // On a route that verifies, a sampled hit keeps the stored bytes
            // (a reference count, not a copy) for its check.
            let sample = self.sample().map(|slot| (raw.clone(), slot));
            if let Some(stored) = self.servable(raw) {
                let now_ms = self.now_ms();
                let stale = self.is_stale(&stored, now_ms);
                let keep = match stale {
                    true => None,
                    false => self.to_keep(&stored, size, now_ms),
                };
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
                    if let Some(kept) = keep {
                        self.keep(kept);
                    }
                    return Next::Serve(self.hit(entry, now_ms), refresh);
                }
            }
        }
        self.end_lookup_span("miss");
        let holder = found.lease_holder();
        match self.missed(found) {
            Some(wait) => Next::Join(wait),
            // Another process fills the entry: wait for it, polling.
            None if holder == LeaseHolder::Another
                && self.leader.is_some()
                && !self.policy.lease_wait().is_zero() =>
            {
                Next::AwaitFill(tokio::time::Instant::now() + self.policy.lease_wait())
            }
            // A lease of this process, and no flight for it: the flight
            // landed between this lookup and now (a fast handler), or its
            // request went away. One more look tells: the entry, or the
            // same lease again, which `filled` answers with a call.
            None if holder == LeaseHolder::Us && self.leader.is_some() => {
                Next::AwaitFill(tokio::time::Instant::now())
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
            Some(Landed::Unshareable) => {
                self.why = Some(crate::reason::HandlerCall::Unshareable);
                Next::Call
            }
            Some(Landed::Streaming(tee)) if !tee.bound_to(&self.binding) => {
                self.why = Some(crate::reason::HandlerCall::OtherVariant);
                Next::Call
            }
            // The leader's body streams: read as it comes, from its start
            // (gone past the cap: the handler answers this one).
            Some(Landed::Streaming(tee)) => match tee.reader() {
                Some(reader) => {
                    let (status, headers) = tee.head();
                    let mut response = Response::new(ResponseBody::fanned(reader));
                    *response.status_mut() = status;
                    *response.headers_mut() = headers;
                    Next::Serve(self.finish(response, Outcome::Collapsed), None)
                }
                None => {
                    self.why = Some(crate::reason::HandlerCall::Unshareable);
                    Next::Call
                }
            },
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
    pub(super) fn entry_response<B: Body>(&self, entry: Entry) -> Response<ResponseBody<B>> {
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
}
