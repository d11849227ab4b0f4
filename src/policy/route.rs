//! A cached route as the user declares it.

use std::time::Duration;

use http::HeaderName;

use super::hedge::Hedge;
#[cfg(doc)]
use super::Rule;
use crate::key::{Canonical, QueryRule, Scope};
#[cfg(doc)]
use crate::ConfigError;

/// One cached GET route (HEAD is served from the same entries).
///
/// ```
/// use std::time::Duration;
/// use tower_redis_cache::{Route, Scope};
///
/// let item = Route::get("/persons/{id}")
///     .key("person:{id}")
///     .ttl(Duration::from_secs(300))
///     .scope(Scope::new().header("x-tenant-id"));
///
/// let list = Route::get("/persons")
///     .key("persons:list:v{version}:{query_hash}")
///     .versioned_by("persons:list")
///     .per_scope()
///     .query_allowlist(["limit", "skip", "name", "email", "sort"])
///     .ttl(Duration::from_secs(60))
///     .scope(Scope::new().header("x-tenant-id"));
/// # let _ = (item, list);
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Route {
    pub(super) pattern: String,
    pub(super) key: Option<String>,
    pub(super) ttl: Option<Duration>,
    pub(super) stale_window: Duration,
    pub(super) scope: Scope,
    pub(super) public: bool,
    pub(super) query: QueryRule,
    pub(super) version_group: Option<String>,
    pub(super) per_scope: bool,
    pub(super) params: Vec<(String, Canonical)>,
    pub(super) vary: Vec<HeaderName>,
    pub(super) invalid_header: Option<String>,
    pub(super) verify: f64,
    /// `None`: the policy's default (see [`PolicyBuilder::hedge_within_budget`](crate::PolicyBuilder::hedge_within_budget)).
    pub(super) hedge: Option<Hedge>,
    pub(super) unkeyed: Vec<String>,
    pub(super) despite: Vec<String>,
    pub(super) in_process: Option<Duration>,
}

impl Route {
    /// A cached `GET` route for a matchit path pattern (`/persons/{id}`,
    /// `/files/{*path}`), the syntax axum uses. The pattern matches the path
    /// the layer sees: the full path for a layer on the outer router, the
    /// path below the prefix for a layer inside a `nest` (the prefix is
    /// then bound into each entry). Where the request carries axum's
    /// `MatchedPath` (a layer on `Router::layer` or `route_layer`, feature
    /// `axum`), the pattern applies only to the route axum served:
    /// `/users/me` served by its own handler passes through a policy that
    /// names `/users/{id}`, and a rule's pattern likewise.
    pub fn get(pattern: &str) -> Self {
        Self {
            pattern: pattern.to_owned(),
            key: None,
            ttl: None,
            stale_window: Duration::ZERO,
            scope: Scope::new(),
            public: false,
            query: QueryRule::default(),
            version_group: None,
            per_scope: false,
            params: Vec::new(),
            vary: Vec::new(),
            invalid_header: None,
            verify: 0.0,
            hedge: None,
            unkeyed: Vec::new(),
            despite: Vec::new(),
            in_process: None,
        }
    }

    /// The key template: literal text, path params by name (`{id}`),
    /// `{query_hash}` for the normalised query and `{version}` for the
    /// version of the group set with [`Route::versioned_by`]. The namespace
    /// is prepended, the scope appended.
    ///
    /// Path params are keyed as the handler sees them: percent-decoded, as
    /// axum's `Path` decodes them, so `/persons/61` and `/persons/%36%31`
    /// share one entry; and in their canonical form when the route types
    /// them ([`Route::param`]).
    ///
    /// `{query_hash}` is the SHA-256 of the normalised query: pairs
    /// form-decoded, **empty values dropped** (`?a=1&b=` is `?a=1`, unless
    /// [`keep_empty_query_values`](Route::keep_empty_query_values)), only the
    /// [allowlist](Route::query_allowlist) when set, sorted by name. What the
    /// key drops is removed from the request the handler gets, so the
    /// handler reads no query input the key ignores.
    ///
    /// A template without `{query_hash}` serves only requests without (allowed)
    /// query parameters; others bypass the cache.
    ///
    /// # Templates cannot collide
    ///
    /// Every path param of the pattern must be in the key (or in the
    /// version group's name), or `build()` refuses the policy
    /// ([`ConfigError::UnkeyedParam`]) unless the route declares it with
    /// [`unkeyed_param`](Route::unkeyed_param). Two values need a separator
    /// between them that is not a letter or digit (`repo:{owner}:{repo}`,
    /// `repo:{owner}-{repo}`); a separator inside a value is escaped, so
    /// `a-b`/`c` and `a`/`b-c` never share a key. And each entry is bound to
    /// its route (method and pattern): two routes with one template, or two
    /// services on one Redis and namespace, never serve each other's
    /// entries (they only share the key's slot).
    pub fn key(mut self, template: &str) -> Self {
        self.key = Some(template.to_owned());
        self
    }

    /// How long entries live (the policy default if unset).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Serves an entry for up to `window` after its TTL, at once, while one
    /// request refreshes it in the background (`stale-while-revalidate`).
    /// Never past the window, never after an invalidation. Off by default.
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.stale_window = window;
        self
    }

    /// The request parts that scope the key (tenant, user…). A request on
    /// which a part reads nothing bypasses the cache (see [`Scope`]).
    pub fn scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// Shares entries between requests that carry `Authorization` or
    /// `Cookie` although the route has no scope. Without this, such requests
    /// bypass the cache.
    pub fn public(mut self) -> Self {
        self.public = true;
        self
    }

    /// Only these query parameters count towards `{query_hash}`. The
    /// others are removed from the request the handler gets (what the key
    /// does not cover, the handler does not read), unless
    /// [`bypass_dropped_query`](Route::bypass_dropped_query) makes such a
    /// request bypass the cache instead.
    pub fn query_allowlist<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.query.allowlist = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Keys empty query values too: `?name=` and no `name` become two
    /// entries, for a handler that tells them apart (axum's
    /// `Query<Option<String>>` reads `?name=` as `Some("")`). By default
    /// empty values are dropped from the key and from the request the
    /// handler gets.
    pub fn keep_empty_query_values(mut self) -> Self {
        self.query.keep_empty = true;
        self
    }

    /// A request with query parameters the key drops (outside the
    /// allowlist, or empty values) bypasses the cache (reason `query`),
    /// instead of reaching the handler without them.
    pub fn bypass_dropped_query(mut self) -> Self {
        self.query.bypass_dropped = true;
        self
    }

    /// The handler reads path param `name` in a canonical form (see
    /// [`Canonical`]): the key, and the purges rules render from a write's
    /// URL, use that form, so `/items/01` and `/items/1` share an entry
    /// and a write through either spelling purges it. A value that does not
    /// parse bypasses the cache (reason `bad-param`).
    pub fn param(mut self, name: &str, canonical: Canonical) -> Self {
        self.params.retain(|(n, _)| n != name);
        self.params.push((name.to_owned(), canonical));
        self
    }

    /// Request headers the response varies on beyond the scope, such as
    /// `origin` (a CORS layer inside the cache) or `accept-language`. The
    /// entry is bound to the request's values of each, as sent (only
    /// `accept-encoding` is read as a set of codings), so it is served only
    /// to requests that send the same values; a request with other values
    /// is a miss whose response replaces the entry. A response whose `Vary`
    /// names a header the route neither scopes nor varies on is not stored.
    ///
    /// One entry per key holds one variant at a time: vary on headers that
    /// take few values on one URL in practice. To keep each value apart
    /// (a tenant per value), scope by the header instead
    /// ([`Scope::header`]).
    pub fn vary_by<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for name in names {
            match HeaderName::try_from(name.as_ref()) {
                Ok(name) if !self.vary.contains(&name) => self.vary.push(name),
                Ok(_) => {}
                Err(_) => self.invalid_header = Some(name.as_ref().to_owned()),
            }
        }
        self
    }

    /// The group whose version `{version}` embeds. Its version key is
    /// `<namespace>:<group>:ver`; bumping it (see [`Rule::bump`]) orphans
    /// every entry of the group at once. The group may name path params:
    /// `person:{id}`. A version key lives as long as the longest entry of
    /// the routes that read it (TTL plus stale window), renewed by each
    /// write.
    pub fn versioned_by(mut self, group: &str) -> Self {
        self.version_group = Some(group.to_owned());
        self
    }

    /// Versions the group per scope: a write bumps only the lists of its
    /// own scope (tenant), and [`CacheHandle::bump`](crate::CacheHandle::bump)
    /// still reaches every scope at once. Every route reading the group must
    /// then declare the same [`Scope`]: build it once and clone it.
    pub fn per_scope(mut self) -> Self {
        self.per_scope = true;
        self
    }

    /// Also keeps this route's entries in this process, for at most
    /// `bound` each (and never past their TTL), in the policy's
    /// [`InProcess`](crate::InProcess) tier: a hit there costs no round
    /// trip (feature `tier`). The store must publish its invalidations (a
    /// `RedisStore` does): the writing process reads its own writes, other
    /// processes see a write once its invalidation reaches them (the
    /// publish delay, under a millisecond on loopback), and never later
    /// than `bound`.
    #[cfg(feature = "tier")]
    pub fn in_process(mut self, bound: Duration) -> Self {
        self.in_process = Some(bound);
        self
    }

    /// Checks a sample of this route's hits against the handler: a sampled
    /// hit (a `rate` of them, from 0 to 1; 0, the default, turns it off) is
    /// answered from the cache as usual, and the handler is also called in
    /// the background with the same request. A response that differs from
    /// the entry (status, body, or the headers a hit replays) is counted
    /// ([`RouteStats::verify_mismatches`](crate::RouteStats), the metric
    /// `tower_redis_cache_verify_mismatches_total`), logged at WARN with the
    /// route (at most once per route every 10 s), and replaces the entry
    /// when it may be stored, by the same conditional write as a miss: an
    /// invalidation since the lookup still wins. So writes that bypass
    /// every rule (a batch job, a migration, a route without its rule) show
    /// up, and their stale entries heal.
    ///
    /// Bounded: at most one verification per entry and 16 per process run
    /// at once; the hit does not wait for it. Only hits read from the
    /// store are sampled (not those of the in-process tier). **A route
    /// whose handler has side effects on reads must not verify.** A rate
    /// outside 0 to 1 is a [`ConfigError::VerifyRate`] at `build()`.
    ///
    /// ```
    /// use tower_redis_cache::Route;
    ///
    /// // One hit in a thousand is checked against the handler.
    /// let route = Route::get("/persons/{id}").key("person:{id}").verify(0.001);
    /// # let _ = route;
    /// ```
    pub fn verify(mut self, rate: f64) -> Self {
        self.verify = rate;
        self
    }

    /// Never slower than no cache: a lookup still under way once it took
    /// as long as the route's handler does (a moving average of its misses,
    /// at least 0.5 ms) lets the handler answer. The lookup goes
    /// on: it is still counted (the breaker still opens on slow calls), and
    /// the handler's response is stored under what it read, in the
    /// background, when that guards a read made before the lookup ran
    /// (the handler's, which may come first):
    /// - on an item route, a miss's lease (every invalidation since it was
    ///   minted replaced it);
    /// - on a versioned route, versions the store knew before the lookup
    ///   was called and read again unchanged (a bump since refuses the
    ///   write).
    ///
    /// Otherwise it is not stored. Such a response says `detail=hedged`.
    /// Before the route's first miss, the floor is the budget. Once
    /// two lookups in a row ran past the budget, the handler
    /// answers at once, the lookups still going on, until one of them
    /// finishes within the budget.
    ///
    /// Every request may hedge this way, however slow the store is: for
    /// routes whose handler the database can serve at every request. Off
    /// by default (see [`hedge_within_budget`](Self::hedge_within_budget)
    /// for a bounded one, and docs/operating.md for what each costs).
    pub fn hedge(mut self) -> Self {
        self.hedge = Some(Hedge::Derived);
        self
    }

    /// Like [`hedge`](Self::hedge), with a fixed budget for the lookup.
    pub fn hedge_after(mut self, budget: Duration) -> Self {
        self.hedge = Some(Hedge::After(budget));
        self
    }

    /// Hedges within a budget: a lookup still under way after the later of
    /// the route's own lookups' p95 and its handler's usual time (at least
    /// 0.5 ms) lets the handler answer, as [`hedge`](Self::hedge) does,
    /// for at most 5% of the route's requests (each earns 1/20 of a
    /// hedge, 10 saved at most; none until the route has timed 32
    /// lookups). A stall's first requests are answered by the handler; a
    /// store steadily slower than the handler is not hedged once the p95
    /// has moved there, so it never sends more than 5% of the route's
    /// reads to the database.
    pub fn hedge_within_budget(mut self) -> Self {
        self.hedge = Some(Hedge::Budgeted);
        self
    }

    /// Never hedges: a lookup is waited for up to the store's deadline,
    /// whatever the policy's default (see
    /// [`PolicyBuilder::hedge_within_budget`](crate::PolicyBuilder::hedge_within_budget)).
    pub fn no_hedge(mut self) -> Self {
        self.hedge = Some(Hedge::Off);
        self
    }

    /// Leaves path param `name` out of the key on purpose: the resource is
    /// the same whatever its value (an id unique across orgs in
    /// `/orgs/{org}/items/{id}`, a cosmetic slug). Requests that differ in
    /// it share one key; each entry is still bound to the value it was
    /// stored for, so it is never served for another value (a request
    /// with another value is a miss that replaces it).
    pub fn unkeyed_param(mut self, name: &str) -> Self {
        if !self.unkeyed.iter().any(|n| n == name) {
            self.unkeyed.push(name.to_owned());
        }
        self
    }

    /// Stores responses despite what they say of themselves, by name:
    /// `"max-age=0"`, `"s-maxage=0"`, `"must-revalidate"` (with no
    /// positive `max-age` or `s-maxage`) and `"pragma: no-cache"` each keep
    /// a response out of the cache unless named here. (`no-store`,
    /// `no-cache` and `private` are always refused.) Another name is a
    /// [`ConfigError::UnknownDirective`] at `build()`.
    ///
    /// ```
    /// use tower_redis_cache::Route;
    ///
    /// // The handler says `max-age=0` to browsers; this cache may keep it.
    /// let route = Route::get("/feed").key("feed").store_despite(["max-age=0"]);
    /// # let _ = route;
    /// ```
    pub fn store_despite<I, S>(mut self, directives: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.despite
            .extend(directives.into_iter().map(|d| d.as_ref().to_owned()));
        self
    }

    pub(super) fn label(&self) -> String {
        format!("GET {}", self.pattern)
    }
}
