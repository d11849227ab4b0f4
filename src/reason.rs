//! Why a request on a cached route did not use the cache: the one list of
//! reasons, shared by the key, the layers, the stats and `cache-status`;
//! and why a cached route's handler was called.

/// Why a response on a cached route was not served from, or stored into,
/// the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The request carried `Authorization` or `Cookie` on a route with no
    /// scope that is not marked public.
    Authorization,
    /// The request had query parameters the key template does not use.
    Query,
    /// A part of the route's scope read nothing on the request (fail closed).
    ScopeMissing,
    /// The store failed or timed out.
    StoreError,
    /// The store's circuit breaker is open: it was not tried.
    CircuitOpen,
    /// Invalidations this process could not apply wait for replay: nothing
    /// is served from the cache until they are applied.
    PendingInvalidations,
    /// The status was not 200.
    Status,
    /// The content type was not JSON.
    NotJson,
    /// The response sets a cookie.
    SetCookie,
    /// `Cache-Control: no-store`, `no-cache` or `private`.
    CacheControl,
    /// `Vary: *`, or a `Vary` on a header the key is not scoped by.
    Vary,
    /// A `Content-Encoding` this build cannot decode (gzip and zstd are
    /// stored with the `compression` feature; compress outside the cache
    /// layer otherwise).
    ContentEncoding,
    /// The body is larger than the cap; it was streamed through.
    TooLarge,
    /// A HEAD miss: the handler sent no body to store.
    Head,
    /// The body ended with trailers.
    Trailers,
    /// The body failed while being read.
    BodyError,
    /// An invalidation happened between the lookup and the write.
    Raced,
    /// The handler took longer than half the tombstone TTL.
    SlowMiss,
    /// The request's host is not one the policy names.
    Host,
    /// The request carries a header that rewrites its path or method in
    /// some frameworks (`X-Original-URL`, `X-HTTP-Method-Override`…).
    Rewrite,
    /// A GET or HEAD that carries a body, which the key cannot cover.
    RequestBody,
    /// A typed path param or scope header does not parse (see
    /// [`Canonical`](crate::Canonical)).
    BadParam,
    /// A header the scope reads was sent more than once: the application
    /// may read either value.
    ScopeAmbiguous,
}

impl Reason {
    /// True for a property of the response itself (its status, headers or
    /// body): the next response for the entry will likely have it too.
    pub(crate) fn is_response(self) -> bool {
        matches!(
            self,
            Reason::Status
                | Reason::NotJson
                | Reason::SetCookie
                | Reason::CacheControl
                | Reason::Vary
                | Reason::ContentEncoding
                | Reason::TooLarge
                | Reason::Trailers
        )
    }

    pub(crate) const ALL: [Reason; 23] = [
        Reason::Authorization,
        Reason::Query,
        Reason::ScopeMissing,
        Reason::StoreError,
        Reason::CircuitOpen,
        Reason::PendingInvalidations,
        Reason::Status,
        Reason::NotJson,
        Reason::SetCookie,
        Reason::CacheControl,
        Reason::Vary,
        Reason::ContentEncoding,
        Reason::TooLarge,
        Reason::Head,
        Reason::Trailers,
        Reason::BodyError,
        Reason::Raced,
        Reason::SlowMiss,
        Reason::Host,
        Reason::Rewrite,
        Reason::RequestBody,
        Reason::BadParam,
        Reason::ScopeAmbiguous,
    ];

    /// The reason as a short token, as used in `cache-status` `detail=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Authorization => "authorization",
            Reason::Query => "query",
            Reason::ScopeMissing => "scope-missing",
            Reason::StoreError => "store-error",
            Reason::CircuitOpen => "circuit-open",
            Reason::PendingInvalidations => "pending-invalidations",
            Reason::Status => "status",
            Reason::NotJson => "not-json",
            Reason::SetCookie => "set-cookie",
            Reason::CacheControl => "cache-control",
            Reason::Vary => "vary",
            Reason::ContentEncoding => "content-encoding",
            Reason::TooLarge => "too-large",
            Reason::Head => "head",
            Reason::Trailers => "trailers",
            Reason::BodyError => "body-error",
            Reason::Raced => "raced",
            Reason::SlowMiss => "slow-miss",
            Reason::Host => "host",
            Reason::Rewrite => "rewrite",
            Reason::RequestBody => "request-body",
            Reason::BadParam => "bad-param",
            Reason::ScopeAmbiguous => "scope-ambiguous",
        }
    }

    /// Position in [`Reason::ALL`], which lists the variants in declaration order.
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Why a cached route's handler was called: every call is counted once,
/// with one of these, in [`RouteStats::handler_calls`](crate::RouteStats)
/// and `tower_redis_cache_handler_calls_total{route, reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HandlerCall {
    /// Nothing servable was stored: this request fills the entry.
    Miss,
    /// The key held an entry bound to other request inputs (another
    /// `Host`, another value of a [`Route::vary_by`](crate::Route::vary_by)
    /// header): one variant per key at a time, so requests that alternate
    /// between two variants replace each other's entry.
    OtherVariant,
    /// The request did not use the cache, for this reason (the lookup
    /// failed or timed out, the circuit is open, a scope read nothing…).
    Bypass(Reason),
    /// The entry's responses could not be stored lately: the miss went to
    /// the handler without waiting for another (hit-for-miss).
    HitForMiss,
    /// A HEAD miss: it neither fills the entry nor waits for a fill.
    HeadMiss,
    /// Another process was filling the entry and did not finish within
    /// [`PolicyBuilder::lease_wait`](crate::PolicyBuilder::lease_wait).
    LeaseWaitOver,
    /// The fill this request waited on in this process gave a response
    /// that could not be shared.
    Unshareable,
    /// The lookup ran past the route's hedge budget
    /// ([`Route::hedge`](crate::Route::hedge)).
    Hedged,
    /// A stale entry's background refresh
    /// ([`Route::stale_while_revalidate`](crate::Route::stale_while_revalidate)).
    Refresh,
    /// A sampled hit's background check ([`Route::verify`](crate::Route::verify)).
    Verify,
}

impl HandlerCall {
    /// The calls that are not bypasses, after [`Reason::ALL`] in the
    /// counters.
    const OWN: [HandlerCall; 9] = [
        HandlerCall::Miss,
        HandlerCall::OtherVariant,
        HandlerCall::HitForMiss,
        HandlerCall::HeadMiss,
        HandlerCall::LeaseWaitOver,
        HandlerCall::Unshareable,
        HandlerCall::Hedged,
        HandlerCall::Refresh,
        HandlerCall::Verify,
    ];

    /// How many counters the calls take: one per bypass reason, one per
    /// other kind.
    pub(crate) const COUNT: usize = Reason::ALL.len() + Self::OWN.len();

    /// The call counted at `index` (see [`index`](Self::index)).
    pub(crate) fn at(index: usize) -> Self {
        match Reason::ALL.get(index) {
            Some(reason) => HandlerCall::Bypass(*reason),
            None => Self::OWN[index - Reason::ALL.len()],
        }
    }

    /// Where the call is counted: a bypass at its reason's place, the
    /// others after every reason.
    pub(crate) fn index(self) -> usize {
        match self {
            HandlerCall::Bypass(reason) => reason.index(),
            own => Reason::ALL.len() + Self::OWN.iter().position(|c| *c == own).unwrap_or_default(),
        }
    }

    /// The call as a short token: `miss`, `other-variant`, `hit-for-miss`, `head-miss`,
    /// `lease-wait-over`, `unshareable`, `hedged`, `refresh`, `verify`, or a
    /// bypass's reason (`store-error`, `circuit-open`…).
    pub fn as_str(self) -> &'static str {
        match self {
            HandlerCall::Miss => "miss",
            HandlerCall::OtherVariant => "other-variant",
            HandlerCall::Bypass(reason) => reason.as_str(),
            HandlerCall::HitForMiss => "hit-for-miss",
            HandlerCall::HeadMiss => "head-miss",
            HandlerCall::LeaseWaitOver => "lease-wait-over",
            HandlerCall::Unshareable => "unshareable",
            HandlerCall::Hedged => "hedged",
            HandlerCall::Refresh => "refresh",
            HandlerCall::Verify => "verify",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_handler_call_has_its_own_counter() {
        let all: Vec<HandlerCall> = (0..HandlerCall::COUNT).map(HandlerCall::at).collect();
        for (index, call) in all.iter().enumerate() {
            assert_eq!(call.index(), index, "{call:?}");
        }
        let tokens: std::collections::HashSet<&str> = all.iter().map(|c| c.as_str()).collect();
        assert_eq!(tokens.len(), all.len(), "each call has a token of its own");
    }
}
