//! The background refresh of a stale entry, and the sampled check of a
//! fresh one against the handler.

use super::storable::{collect_capped, entry_of, unstorable_reason};
use crate::entry::{Entry, Slot};
use crate::flight::{Leader, Role};
use crate::key::Binding;
use crate::policy::Policy;
use crate::reason::{HandlerCall, Reason};
use crate::stats::telemetry::{warn_limited, Op};
use crate::store::{CacheKey, Lookup};
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::Body;
use std::time::Instant;
use tower_service::Service;
use tracing::Instrument;

use super::report::store_span;
use super::request::{Call, Ctx};

impl Ctx {
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
    pub(super) fn sample(&self) -> Option<super::verify::Slot> {
        let rate = self.policy.route(self.route).verify;
        if rate <= 0.0 || !crate::sampling::sampled(rate) {
            return None;
        }
        super::verify::Slot::take()
    }

    /// The check of a fresh hit on the entry stored as `raw`, in the
    /// background. Everything it costs beyond a task (decoding, the
    /// flight that keeps it to one check per entry) happens there: the hit
    /// does not wait for it.
    pub(super) fn verification(
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
        let Some(stored) = self.enter_check() else {
            return;
        };
        if std::future::poll_fn(|cx| service.poll_ready(cx))
            .await
            .is_err()
        {
            return;
        }
        let why = match self.check {
            Some(_) => HandlerCall::Verify,
            None => HandlerCall::Refresh,
        };
        self.policy.stats_ref().handler_called(self.route, why);
        let Ok(response) = service.call(request).await else {
            return;
        };
        let made = self.entry_from(response).await;
        if let Some(stored) = &stored {
            if self.same_as_stored(stored, &made) {
                return;
            }
        }
        match made {
            Ok((_, encoded)) => self.write(encoded).await,
            Err(reason) => self.policy.stats_ref().not_stored(self.route, reason),
        }
    }

    /// For a check: the flight of the entry (one check per entry at a
    /// time) and the entry as stored, `Some(None)` for a plain refresh;
    /// `None` when the check must not run.
    fn enter_check(&mut self) -> Option<Option<Entry>> {
        let Some(check) = &self.check else {
            return Some(None);
        };
        let Role::Lead(leader) = self.policy.flights().enter(&self.key, &self.seen) else {
            return None;
        };
        self.leader = Some(leader);
        match crate::entry::decode(check.raw.clone()) {
            Slot::Entry(entry) => Some(Some(entry)),
            _ => None,
        }
    }

    /// The entry the handler's `response` makes, and its stored form; why
    /// it may not be stored.
    async fn entry_from<B: Body>(&self, response: Response<B>) -> Result<(Entry, Bytes), Reason> {
        let route = self.policy.route(self.route);
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
        let body = match refused {
            Some(reason) => return Err(reason),
            None => collect_capped(body, cap).await?,
        };
        let now = crate::clock::shifted(
            crate::clock::unix_ms(),
            self.policy.store().clock_offset_ms(),
        );
        entry_of(
            &self.policy,
            self.binding,
            route.ttl,
            now,
            parts.status,
            &mut parts.headers,
            &body,
        )
    }

    /// Whether a checked entry is what the handler answers now; a
    /// difference is counted and logged.
    fn same_as_stored(&self, stored: &Entry, made: &Result<(Entry, Bytes), Reason>) -> bool {
        // A response that may not be stored differs from an entry that
        // was: another status, a cookie, a body over the cap.
        let same = match made {
            Ok((fresh, _)) => super::verify::same_response(stored, fresh),
            Err(_) => false,
        };
        // How long the entry had been stored: at most how long it was stale.
        let stale_for = (!same).then(|| {
            let now = crate::clock::shifted(
                crate::clock::unix_ms(),
                self.policy.store().clock_offset_ms(),
            );
            std::time::Duration::from_millis(now.saturating_sub(stored.stored_at_ms))
        });
        if self.policy.stats_ref().verified(self.route, stale_for) {
            tracing::warn!(
                route = self.policy.route(self.route).label,
                "a sampled hit differed from the handler's response: the entry was stale (a write no rule invalidates?); replacing it"
            );
        }
        same
    }

    /// Writes the refreshed `entry` under the guards the lookup saw.
    async fn write(&self, entry: Bytes) {
        let route = self.policy.route(self.route);
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
        let stats = self.policy.stats_ref();
        match stored {
            Ok(true) => {
                span.record("outcome", "stored");
                stats.stored(self.route, took);
                tracing::debug!(route = route.label, "stale entry refreshed");
            }
            Ok(false) => {
                span.record("outcome", "raced");
                stats.not_stored(self.route, Reason::Raced);
                tracing::debug!(
                    route = route.label,
                    "stale entry refresh raced an invalidation; not stored"
                );
            }
            Err(err) => {
                span.record("outcome", "error");
                stats.error(self.route, Op::Store, err.kind());
                warn_limited!(route = route.label, error = %err, "stale entry refresh not stored");
            }
        }
    }
}
