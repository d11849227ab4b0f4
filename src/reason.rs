//! Why a request on a cached route did not use the cache: the one list of
//! reasons, shared by the key, the layers, the stats and `cache-status`.

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
