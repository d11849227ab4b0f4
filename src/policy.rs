//! The one configuration of the cache: store, namespace, cached routes,
//! version groups and the invalidation rules of writes. Both layers and the
//! operator handle are made from it, so they cannot disagree.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, Request};

use crate::error::{validate_namespace, ConfigError};
use crate::flight::FlightTable;
use sha2::Digest;

use crate::key::served::{served_as, shape, stripped_prefix, Served};
use crate::key::{
    hash_field, pattern_params, percent_decode, Binding, Canonical, InputRules, KeyTemplate,
    Layout, Params, QueryRule, Rendered, Scope, Segment,
};
use crate::routes::{validate_pattern, RouteTable};
use crate::stats::{CacheStats, Reason};
use crate::store::{CacheKey, Invalidation, MemoryStore, Store, VersionKey};

/// Default cap on a stored body: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// How long a miss waits, by default, for another process's fill of the
/// entry (see [`PolicyBuilder::lease_wait`]).
pub const DEFAULT_LEASE_WAIT: Duration = Duration::from_secs(1);

/// Bodies longer than this are stored compressed, by default, when the
/// `compression` feature is on (1 KiB); without it, none is.
#[cfg(feature = "compression")]
pub const DEFAULT_COMPRESS_OVER: usize = 1 << 10;
#[cfg(not(feature = "compression"))]
const DEFAULT_COMPRESS_OVER: usize = usize::MAX;

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
    pattern: String,
    key: Option<String>,
    ttl: Option<Duration>,
    stale_window: Duration,
    scope: Scope,
    public: bool,
    query: QueryRule,
    version_group: Option<String>,
    per_scope: bool,
    params: Vec<(String, Canonical)>,
    vary: Vec<HeaderName>,
    invalid_header: Option<String>,
    verify: f64,
    hedge: Hedge,
    unkeyed: Vec<String>,
    despite: Vec<String>,
    #[cfg(feature = "tier")]
    in_process: Option<Duration>,
}

/// When a slow lookup lets the handler answer (see [`Route::hedge`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Hedge {
    Off,
    /// After the route's handler time (a moving average), at least
    /// [`HEDGE_FLOOR`].
    Derived,
    After(Duration),
}

/// The shortest a derived hedge waits for a lookup: a healthy Redis on
/// the same network answers well within it. Tokio's timers tick every
/// millisecond, so a hedge fires 0 to 1 ms after its budget.
pub const HEDGE_FLOOR: Duration = Duration::from_micros(500);

/// After this many lookups in a row of a hedging route ran past its
/// budget, the next ones hedge at once (the store is slow now, not one
/// reply), until one finishes within the budget again.
pub const HEDGE_STREAK: u32 = 2;

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
            hedge: Hedge::Off,
            unkeyed: Vec::new(),
            despite: Vec::new(),
            #[cfg(feature = "tier")]
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
    /// at least [`HEDGE_FLOOR`]) lets the handler answer. The lookup goes
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
    /// Off by default;
    /// before the route's first miss, the floor is the budget. Once
    /// [`HEDGE_STREAK`] lookups in a row ran past the budget, the handler
    /// answers at once, the lookups still going on, until one of them
    /// finishes within the budget.
    pub fn hedge(mut self) -> Self {
        self.hedge = Hedge::Derived;
        self
    }

    /// Like [`hedge`](Self::hedge), with a fixed budget for the lookup.
    pub fn hedge_after(mut self, budget: Duration) -> Self {
        self.hedge = Hedge::After(budget);
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

    fn label(&self) -> String {
        format!("GET {}", self.pattern)
    }
}

/// What a successful write invalidates: the entries of cached routes it
/// purges and the version groups it bumps. Namespace, scope and key layout
/// come from the routes.
///
/// # The write must be readable when its response returns
///
/// The invalidation runs when the handler returns. Data the write changed
/// must be readable by the read handlers by then: a read that lands in a
/// gap after it (a read replica that lags, a transaction a layer outside
/// the cache commits after the response) fetches the old data and stores
/// it under a valid guard, for the entry's whole TTL. Where reads lag,
/// [`Rule::again_after`] invalidates a second time once the lag passed.
///
/// ```
/// use tower_redis_cache::Rule;
///
/// let rule = Rule::new("PATCH|DELETE /persons/{id}")
///     .purge("GET /persons/{id}")
///     .bump("persons:list");
/// # let _ = rule;
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Rule {
    route: String,
    purges: Vec<String>,
    bumps: Vec<String>,
    again_after: Option<Duration>,
}

impl Rule {
    /// A rule for `METHOD[|METHOD…] /path/{pattern}`, such as
    /// `POST /persons` or `PATCH|DELETE /persons/{id}`.
    pub fn new(route: &str) -> Self {
        Self {
            route: route.to_owned(),
            purges: Vec::new(),
            bumps: Vec::new(),
            again_after: None,
        }
    }

    /// Invalidates a second time `delay` after the first (a "delayed
    /// double delete"), for reads that see a write late: a read replica
    /// that lags its primary by up to `delay`, an outbox applied shortly
    /// after. An entry a read stored from lagging data in between is
    /// purged then. The second invalidation is sent from a task of its own
    /// (queued for replay if the store fails), also when the write's
    /// future is dropped; the response does not wait for it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_redis_cache::Rule;
    ///
    /// let rule = Rule::new("PATCH /persons/{id}")
    ///     .purge("GET /persons/{id}")
    ///     .again_after(Duration::from_millis(500));
    /// # let _ = rule;
    /// ```
    pub fn again_after(mut self, delay: Duration) -> Self {
        self.again_after = Some(delay);
        self
    }

    /// Purges the entry the cached route (`GET /persons/{id}`, or just the
    /// pattern) keys for the write's params and scope. The write's path must
    /// bind every param of that route's key. Purging a versioned route bumps
    /// its group.
    pub fn purge(mut self, route: &str) -> Self {
        self.purges.push(route.to_owned());
        self
    }

    /// Bumps the version of this group (see [`Route::versioned_by`]); for a
    /// group versioned [per scope](Route::per_scope), the write's scope only.
    pub fn bump(mut self, group: &str) -> Self {
        self.bumps.push(group.to_owned());
        self
    }
}

/// Response directives a route stores despite themselves
/// ([`Route::store_despite`](crate::Route::store_despite)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Despite {
    pub(crate) max_age_zero: bool,
    pub(crate) s_maxage_zero: bool,
    pub(crate) must_revalidate: bool,
    pub(crate) pragma_no_cache: bool,
}

impl Despite {
    /// From the names a route gave; `Err(name)` for one it does not know.
    pub(crate) fn parse(names: &[String]) -> Result<Self, String> {
        let mut despite = Self::default();
        for name in names {
            let flag = match name.trim().to_ascii_lowercase().as_str() {
                "max-age=0" => &mut despite.max_age_zero,
                "s-maxage=0" => &mut despite.s_maxage_zero,
                "must-revalidate" => &mut despite.must_revalidate,
                "pragma: no-cache" | "pragma:no-cache" => &mut despite.pragma_no_cache,
                _ => return Err(name.clone()),
            };
            *flag = true;
        }
        Ok(despite)
    }
}

/// A compiled route.
#[derive(Debug)]
pub(crate) struct CompiledRoute {
    pub(crate) label: String,
    /// A digest of the label, bound into each entry: fixed length, so the
    /// binding of a short key stays one SHA-256 block.
    id: [u8; 8],
    pattern: String,
    /// The pattern with its param names left out, as the route the
    /// application served is compared with it.
    shape: String,
    key: KeyTemplate,
    /// Path params the key leaves out on purpose: bound into each entry.
    unkeyed: Vec<String>,
    /// Response directives stored despite themselves.
    pub(crate) despite: Despite,
    group: Option<GroupRef>,
    pub(crate) ttl: Duration,
    pub(crate) stale_window: Duration,
    pub(crate) scope: Scope,
    public: bool,
    query: QueryRule,
    /// Request headers the entry is bound to, beyond the scope.
    vary: Vec<HeaderName>,
    /// The share of hits checked against the handler (0: none).
    pub(crate) verify: f64,
    pub(crate) hedge: Hedge,
    /// A moving average of the handler's time on misses, in microseconds
    /// (0: none measured yet).
    handler_us: std::sync::atomic::AtomicU64,
    /// How many lookups in a row ran past the hedge budget.
    slow_lookups: std::sync::atomic::AtomicU32,
    /// The hard bound of the route's entries in the in-process tier.
    #[cfg(feature = "tier")]
    pub(crate) in_process: Option<Duration>,
}

impl CompiledRoute {
    /// How long a lookup may take before the handler answers; `None`: as
    /// long as it takes.
    pub(crate) fn hedge_budget(&self) -> Option<Duration> {
        match self.hedge {
            Hedge::Off => None,
            Hedge::After(budget) => Some(budget),
            Hedge::Derived => {
                let us = self.handler_us.load(std::sync::atomic::Ordering::Relaxed);
                Some(Duration::from_micros(us).max(HEDGE_FLOOR))
            }
        }
    }

    /// A lookup of this (hedging) route ran past its budget.
    pub(crate) fn lookup_ran_past(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = self
            .slow_lookups
            .fetch_update(Relaxed, Relaxed, |n| n.checked_add(1));
    }

    /// A lookup of this (hedging) route finished `took` after its request
    /// started; `counted`: as slow already, when it ran past the budget.
    pub(crate) fn lookup_took(&self, took: Duration, counted: bool) {
        match self.hedge_budget() {
            Some(budget) if took > budget && !counted => self.lookup_ran_past(),
            Some(budget) if took > budget => {}
            Some(_) => self
                .slow_lookups
                .store(0, std::sync::atomic::Ordering::Relaxed),
            None => {}
        }
    }

    /// Whether the store is slow for this route now: the handler answers
    /// without waiting for the budget.
    pub(crate) fn hedges_at_once(&self) -> bool {
        self.hedge != Hedge::Off
            && self.slow_lookups.load(std::sync::atomic::Ordering::Relaxed) >= HEDGE_STREAK
    }

    /// The handler answered a miss in `took`.
    pub(crate) fn handler_took(&self, took: Duration) {
        let sample = took.as_micros().min(u64::MAX as u128) as u64;
        let average = &self.handler_us;
        let old = average.load(std::sync::atomic::Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        average.store(new.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a response may vary on request header `name`: the key is
    /// scoped by it, or entries are bound to it.
    pub(crate) fn varies_on(&self, name: &str) -> bool {
        // Every representation this cache serves is one the request
        // accepts (a stored coding is decoded for those that do not).
        name.eq_ignore_ascii_case("accept-encoding")
            || self.scope.covers_header(name)
            || self
                .vary
                .iter()
                .any(|h| h.as_str().eq_ignore_ascii_case(name))
    }
}

/// A version group as one route or rule renders it.
#[derive(Debug)]
struct GroupRef {
    index: usize,
    template: KeyTemplate,
}

/// A version group, shared by the routes that read it.
#[derive(Debug)]
pub(crate) struct Group {
    name: String,
    per_scope: bool,
    /// The scope of the routes reading it (the same for all when per scope).
    scope: Scope,
    /// The longest entry life of the routes reading it.
    ttl: Duration,
    /// The canonical forms of its typed params, from the routes reading it.
    types: Vec<(String, Canonical)>,
}

#[derive(Debug)]
struct CompiledRule {
    /// The rule's pattern with its param names left out.
    shape: String,
    /// Plain routes whose entry the write purges.
    purges: Vec<usize>,
    bumps: Vec<GroupRef>,
    /// When to invalidate again, for reads that see writes late.
    again_after: Option<Duration>,
}

/// The whole configuration, built with [`Policy::builder`]: the store, the
/// namespace, the cached routes and the rules of writes.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_cache::{Policy, Route, Rule};
///
/// let policy = Policy::builder()
///     .namespace("app")
///     .route(Route::get("/persons/{id}").key("person:{id}").ttl(Duration::from_secs(300)))
///     .on(Rule::new("PATCH /persons/{id}").purge("GET /persons/{id}"))
///     .build()?;
/// assert_eq!(policy.namespace(), "app");
///
/// let err = Policy::builder()
///     .route(Route::get("/persons/{id}").key("person:{id}"))
///     .on(Rule::new("PATCH /persons/{id}").purge("GET /persn/{id}"))
///     .build()
///     .unwrap_err();
/// assert!(err.to_string().contains("/persn/{id}"));
/// # Ok::<(), tower_redis_cache::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Policy {
    inner: Arc<PolicyInner>,
}

struct PolicyInner {
    coding: crate::coding::Coding,
    layout: Layout,
    inputs: InputRules,
    per_response: Vec<HeaderName>,
    max_body_bytes: usize,
    lease_wait: Duration,
    compress_over: usize,
    routes: Vec<CompiledRoute>,
    table: RouteTable,
    groups: Vec<Group>,
    rules: Vec<CompiledRule>,
    rule_table: RouteTable,
    store: Arc<dyn Store>,
    stats: CacheStats,
    flights: FlightTable,
    background: crate::background::Background,
    #[cfg(feature = "tier")]
    tier: Option<crate::store::tier::Tier>,
}

impl std::fmt::Debug for PolicyInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("namespace", &self.layout.namespace())
            .field("routes", &self.routes.len())
            .field("rules", &self.rules.len())
            .field("store", &self.store.name())
            .finish()
    }
}

/// Builds a [`Policy`].
#[must_use]
pub struct PolicyBuilder {
    coding: crate::coding::Coding,
    namespace: String,
    hosts: Vec<String>,
    trusted: Vec<String>,
    per_response: Vec<String>,
    max_body_bytes: usize,
    lease_wait: Duration,
    compress_over: usize,
    default_ttl: Duration,
    routes: Vec<Route>,
    rules: Vec<Rule>,
    store: Option<Arc<dyn Store>>,
    #[cfg(feature = "tier")]
    in_process: crate::store::tier::InProcess,
}

impl std::fmt::Debug for PolicyBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyBuilder")
            .field("namespace", &self.namespace)
            .field("routes", &self.routes)
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

/// What a write that matches a rule owes.
pub(crate) struct WriteInvalidation {
    /// What the write invalidates once its handler succeeded.
    pub(crate) invalidation: Invalidation,
    /// What it invalidates when its future is dropped before the handler
    /// answered, if that is less: a write whose scope reads nothing bumps
    /// every scope's version of a per-scope group only on the handler's
    /// success, so an anonymous client's cancelled writes never empty
    /// every tenant's entries.
    pub(crate) on_drop: Option<Invalidation>,
    /// False when a scoped purge was left out (the scope read nothing).
    pub(crate) complete: bool,
    /// When to invalidate again ([`Rule::again_after`]).
    pub(crate) again: Option<Duration>,
}

/// What the cache layer does with one request.
pub(crate) enum Decision {
    /// Not a cached route: pass through untouched.
    Pass,
    /// A cached route, but this request must not use the cache.
    Bypass { route: usize, reason: Reason },
    /// Look up `key`; an entry must carry `binding` to be served. `query`
    /// is the query the handler gets, when the key dropped parts of it.
    Cache {
        route: usize,
        key: CacheKey,
        binding: Binding,
        query: Option<String>,
    },
}

impl Policy {
    /// A builder with namespace `app`, a 60 s default TTL, a 1 MiB body cap
    /// and the in-process [`MemoryStore`] unless a store is given.
    pub fn builder() -> PolicyBuilder {
        PolicyBuilder {
            coding: crate::coding::Coding::Zstd,
            namespace: "app".to_owned(),
            hosts: Vec::new(),
            trusted: Vec::new(),
            per_response: Vec::new(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            lease_wait: DEFAULT_LEASE_WAIT,
            compress_over: DEFAULT_COMPRESS_OVER,
            default_ttl: Duration::from_secs(60),
            routes: Vec::new(),
            rules: Vec::new(),
            store: None,
            #[cfg(feature = "tier")]
            in_process: crate::store::tier::InProcess::new(),
        }
    }

    /// The namespace every key starts with.
    pub fn namespace(&self) -> &str {
        self.inner.layout.namespace()
    }

    /// The largest body that is stored; larger ones stream through.
    pub fn max_body_bytes(&self) -> usize {
        self.inner.max_body_bytes
    }

    /// How long a miss waits for another process's fill.
    pub(crate) fn lease_wait(&self) -> Duration {
        self.inner.lease_wait
    }

    /// Bodies longer than this are stored compressed (`usize::MAX`: never).
    pub(crate) fn compress_over(&self) -> usize {
        self.inner.compress_over
    }

    /// The coding compressed entries are stored in.
    pub(crate) fn coding(&self) -> crate::coding::Coding {
        self.inner.coding
    }

    /// Route labels (`GET /persons/{id}`), in declaration order.
    pub fn route_labels(&self) -> Vec<String> {
        self.inner.routes.iter().map(|r| r.label.clone()).collect()
    }

    /// The per-route counters and the invalidation counts, shared by every
    /// layer made from this policy.
    pub fn stats(&self) -> CacheStats {
        self.inner.stats.clone()
    }

    /// The operator handle: purge, bump, warm, stats, health.
    pub fn handle(&self) -> crate::CacheHandle {
        crate::CacheHandle::new(self.clone())
    }

    /// The key `request` would be cached under, or `None` when it is not
    /// cached (no route, a method other than GET/HEAD, or a bypass such as
    /// credentials on an unscoped route). Useful to check a policy.
    ///
    /// ```
    /// use http::Request;
    /// use tower_redis_cache::{store::CacheKey, Policy, Route};
    ///
    /// let policy = Policy::builder()
    ///     .route(Route::get("/persons/{id}").key("person:{id}"))
    ///     .build()?;
    /// let request = Request::get("/persons/1:x").body(())?;
    /// assert_eq!(policy.key_for(&request), Some(CacheKey::Plain("app:person:1%3Ax".into())));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn key_for<B>(&self, request: &Request<B>) -> Option<CacheKey> {
        match self.decide(request) {
            Decision::Cache { key, .. } => Some(key),
            _ => None,
        }
    }

    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The in-process tier, when a route uses it.
    #[cfg(feature = "tier")]
    pub(crate) fn tier(&self) -> Option<&crate::store::tier::Tier> {
        self.inner.tier.as_ref()
    }

    pub(crate) fn stats_ref(&self) -> &CacheStats {
        &self.inner.stats
    }

    pub(crate) fn flights(&self) -> &FlightTable {
        &self.inner.flights
    }

    /// Work that hits hand off to run after them.
    pub(crate) fn background(&self) -> &crate::background::Background {
        &self.inner.background
    }

    pub(crate) fn route(&self, index: usize) -> &CompiledRoute {
        &self.inner.routes[index]
    }

    pub(crate) fn same(&self, other: &Policy) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    pub(crate) fn decide<B>(&self, request: &Request<B>) -> Decision {
        let method = request.method();
        if method != Method::GET && method != Method::HEAD {
            return Decision::Pass;
        }
        let Some((index, params)) = self.inner.table.at(&Method::GET, request.uri().path()) else {
            return Decision::Pass;
        };
        let route = &self.inner.routes[index];
        // The route the application served decides, where it says which:
        // `/users/me` served by its own handler is not `/users/{id}`.
        if served_as(request.extensions(), &route.shape) == Served::Other {
            return Decision::Pass;
        }
        let bypass = |reason| Decision::Bypass {
            route: index,
            reason,
        };
        let inputs = match self.inner.inputs.scan(request) {
            Ok(inputs) => inputs,
            Err(reason) => return bypass(reason),
        };
        if !route.public && !route.scope.covers_credentials(request.headers()) {
            return bypass(Reason::Authorization);
        }
        let scope = match route.scope.key_suffix(request) {
            Ok(scope) => scope,
            Err(reason) => return bypass(reason),
        };
        let (query, stripped) = route.query.read(request.uri().query());
        if !query.is_empty() && !route.key.has(&Segment::QueryHash) {
            return bypass(Reason::Query);
        }
        if stripped.is_some() && route.query.bypass_dropped {
            return bypass(Reason::Query);
        }
        let query_hash = if route.key.has(&Segment::QueryHash) {
            QueryRule::hash(&query)
        } else {
            String::new()
        };
        let layout = &self.inner.layout;
        let key = match (route.key.render(&params, &query_hash), &route.group) {
            (None, _) => return bypass(Reason::BadParam),
            (Some(Rendered::Whole(key)), _) => CacheKey::Plain(layout.entry(&key, &scope)),
            (Some(Rendered::Split(before, after)), Some(group)) => {
                let Some(versions) = self.group_versions(group, &params, Some(&scope)) else {
                    return bypass(Reason::BadParam);
                };
                layout.versioned(&before, &after, &scope, versions)
            }
            // Rejected when the policy is built.
            (Some(Rendered::Split(..)), None) => return Decision::Pass,
        };
        let binding = self
            .inner
            .inputs
            .binding(&key, request, inputs, &route.vary, |hasher| {
                // The route, the prefix a nested router stripped and the
                // params the key leaves out: an entry is served only for
                // what it was stored for.
                hasher.update(route.id);
                match stripped_prefix(request) {
                    Some(prefix) => {
                        hasher.update([1]);
                        hash_field(hasher, &percent_decode(prefix));
                    }
                    None => hasher.update([0]),
                }
                for name in &route.unkeyed {
                    hash_field(hasher, &percent_decode(params.get(name).unwrap_or("")));
                }
            });
        Decision::Cache {
            route: index,
            key,
            binding,
            query: stripped,
        }
    }

    /// What the handler gets of `query` on `route`, when the key drops
    /// part of it.
    pub(crate) fn stripped_query(&self, route: usize, query: Option<&str>) -> Option<String> {
        self.inner.routes[route].query.read(query).1
    }

    /// Response headers never stored: they belong to one response (a
    /// request id), not to the entry.
    pub(crate) fn per_response(&self) -> &[HeaderName] {
        &self.inner.per_response
    }

    /// The version keys a read of `group` embeds, or a write bumps.
    /// `scope` is the request's scope suffix (`None` when it read nothing);
    /// a write to a per-scope group bumps the scope's key, or the group's
    /// own key (every scope) when the write has no scope. `None` when a
    /// typed param of the group does not parse.
    fn group_versions(
        &self,
        group: &GroupRef,
        params: &Params<'_>,
        scope: Option<&str>,
    ) -> Option<Vec<VersionKey>> {
        let compiled = &self.inner.groups[group.index];
        let name = render_whole(&group.template, params)?;
        let layout = &self.inner.layout;
        let all = layout.version(&name, "", compiled.ttl);
        Some(match (compiled.per_scope, scope) {
            (true, Some(scope)) => vec![all, layout.version(&name, scope, compiled.ttl)],
            _ => vec![all],
        })
    }

    /// What a successful `request` must invalidate, if it matches a rule;
    /// whether that is complete: false when a scoped purge was left out
    /// because the route's scope read nothing on the request; and when to
    /// send it again ([`Rule::again_after`]). A purge or bump whose typed
    /// param or scope value does not parse names no entry that can exist:
    /// it is left out and counted.
    pub(crate) fn invalidation<B>(&self, request: &Request<B>) -> Option<WriteInvalidation> {
        let (index, params) = self
            .inner
            .rule_table
            .at(request.method(), request.uri().path())?;
        let rule = &self.inner.rules[index];
        // `PATCH /users/bulk` served by its own handler is not
        // `PATCH /users/{id}`.
        if served_as(request.extensions(), &rule.shape) == Served::Other {
            return None;
        }
        let stats = &self.inner.stats;
        let mut deletes = Vec::with_capacity(rule.purges.len());
        let mut complete = true;
        for &route in &rule.purges {
            let route = &self.inner.routes[route];
            match route.scope.key_suffix(request) {
                Ok(scope) => match render_whole(&route.key, &params) {
                    Some(key) => deletes.push(self.inner.layout.entry(&key, &scope)),
                    None => unparsed(stats, &route.label),
                },
                Err(Reason::BadParam) => unparsed(stats, &route.label),
                Err(_) => {
                    complete = false;
                    stats.invalidation_unscoped();
                    tracing::warn!(
                        route = route.label,
                        "write without the route's scope; its scoped entry cannot be purged"
                    );
                }
            }
        }
        let mut bumps = Vec::with_capacity(rule.bumps.len());
        let mut every_scope = Vec::new();
        for group in &rule.bumps {
            let compiled = &self.inner.groups[group.index];
            let scope = compiled.scope.key_suffix(request).ok();
            match self.group_versions(group, &params, scope.as_deref()) {
                // A per-scope write bumps its scope's key only; one without
                // a scope, every scope's.
                Some(mut versions) if compiled.per_scope && scope.is_none() => {
                    every_scope.extend(versions.pop())
                }
                Some(mut versions) => bumps.extend(versions.pop()),
                None => unparsed(stats, &compiled.name),
            }
        }
        let on_drop =
            (!every_scope.is_empty()).then(|| Invalidation::new(deletes.clone(), bumps.clone()));
        bumps.extend(every_scope);
        Some(WriteInvalidation {
            invalidation: Invalidation::new(deletes, bumps),
            on_drop,
            complete,
            again: rule.again_after,
        })
    }

    /// What purges the entry `request` would be served from: its key for a
    /// plain route; for a versioned route, a bump of its group (of the
    /// request's scope, for a per-scope group), which is race-free and
    /// reaches every query variant.
    pub(crate) fn purge_for<B>(&self, request: &Request<B>) -> Option<(String, Invalidation)> {
        let Decision::Cache { key, .. } = self.decide(request) else {
            return None;
        };
        match key {
            CacheKey::Plain(key) => Some((key.clone(), Invalidation::new(vec![key], Vec::new()))),
            CacheKey::Versioned { mut versions, .. } => {
                let version = versions.pop()?;
                Some((
                    version.key().to_owned(),
                    Invalidation::new(Vec::new(), vec![version]),
                ))
            }
        }
    }

    /// The version key of `group` for every scope, or for the scope
    /// `request` carries. `None` for an unknown group or one whose name
    /// binds path params (bump those through a purge of a request).
    pub(crate) fn group_bump<B>(
        &self,
        group: &str,
        request: Option<&Request<B>>,
    ) -> Option<VersionKey> {
        let (index, compiled) = self
            .inner
            .groups
            .iter()
            .enumerate()
            .find(|(_, g)| g.name == group)?;
        let template = KeyTemplate::parse(group, &[], false).ok()?;
        let group_ref = GroupRef { index, template };
        let scope = request.and_then(|r| compiled.scope.key_suffix(r).ok());
        if request.is_some() && compiled.per_scope && scope.is_none() {
            return None;
        }
        self.group_versions(&group_ref, &Params::default(), scope.as_deref())?
            .pop()
    }

    /// Groups by name, and whether each is versioned per scope.
    pub(crate) fn group_names(&self) -> impl Iterator<Item = (&str, bool)> {
        self.inner
            .groups
            .iter()
            .map(|g| (g.name.as_str(), g.per_scope))
    }
}

/// The first 8 bytes of the SHA-256 of a route's label (`GET /pattern`).
fn route_id(label: &str) -> [u8; 8] {
    let digest = sha2::Sha256::digest(label.as_bytes());
    let mut id = [0; 8];
    id.copy_from_slice(&digest[..8]);
    id
}

fn render_whole(template: &KeyTemplate, params: &Params<'_>) -> Option<String> {
    match template.render(params, "")? {
        Rendered::Whole(key) | Rendered::Split(key, _) => Some(key),
    }
}

/// Counts and logs a write whose URL names its entry with a typed value
/// that does not parse.
fn unparsed(stats: &CacheStats, target: &str) {
    stats.invalidation_unparsed();
    tracing::debug!(
        target,
        "write with a typed value that does not parse; it names no entry"
    );
}

fn header_name(name: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::try_from(name).map_err(|_| ConfigError::InvalidHeaderName(name.to_owned()))
}

/// A host as requests are compared with it: lower-cased, port 80 dropped.
fn canonical_host(host: &str) -> Result<String, ConfigError> {
    let parsed: http::uri::Authority = host
        .parse()
        .map_err(|_| ConfigError::InvalidHost(host.to_owned()))?;
    let mut host = parsed.as_str().to_ascii_lowercase();
    if host.ends_with(":80") {
        host.truncate(host.len() - 3);
    }
    Ok(host)
}

impl PolicyBuilder {
    /// The prefix of every key (default `app`); keys read `app:person:42`.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.to_owned();
        self
    }

    /// The hosts this application serves (`api.example.com`,
    /// `api.example.com:8443`): a request for any other host bypasses the
    /// cache (reason `host`). Without this, any host is served, and each
    /// entry is bound to the host it was stored for (see the README's
    /// table of what the key covers).
    pub fn hosts<I, S>(mut self, hosts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.hosts
            .extend(hosts.into_iter().map(|h| h.as_ref().to_owned()));
        self
    }

    /// A forwarded header (`x-forwarded-proto`, `forwarded`…) that the
    /// deployment's own proxy always sets, overwriting what clients send:
    /// constant, so it is left out of the entry's binding. Every other
    /// forwarded header is bound into the entries when present.
    pub fn trusted_header(mut self, name: &str) -> Self {
        self.trusted.push(name.to_owned());
        self
    }

    /// A response header that belongs to one response, not to the entry
    /// (a request id, a timing header): never stored, so a hit does not
    /// replay the miss's value. `Date`, `Age` and hop-by-hop headers are
    /// never stored anyway.
    pub fn per_response_header(mut self, name: &str) -> Self {
        self.per_response.push(name.to_owned());
        self
    }

    /// Where entries live (default: a [`MemoryStore`] in this process). The
    /// store is shared by every layer and handle made from the policy.
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// The largest body stored (default 1 MiB). Larger bodies are streamed
    /// to the client as they come and not stored.
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = max;
        self
    }

    /// Stores bodies longer than `bytes` compressed, in the coding of
    /// [`compress_with`](Self::compress_with) (default
    /// [`DEFAULT_COMPRESS_OVER`], 1 KiB; `usize::MAX` turns it off). Smaller
    /// bodies, and bodies compression would not shrink, are stored as they
    /// are. A hit goes as stored to the clients that accept the coding and
    /// is decoded for the others. Entries stored uncompressed stay readable
    /// after this is turned on; a process built without the feature reads
    /// compressed ones as misses.
    #[cfg(feature = "compression")]
    pub fn compress_over(mut self, bytes: usize) -> Self {
        self.compress_over = bytes;
        self
    }

    /// The content coding compressed entries are stored in (default
    /// [`Coding::Zstd`](crate::Coding::Zstd)). A hit is sent as stored to a
    /// request whose `Accept-Encoding` accepts the coding (with its
    /// `Content-Encoding`, an ETag of its own and `Vary: accept-encoding`),
    /// and decoded for the others. [`Coding::Gzip`](crate::Coding::Gzip) is
    /// accepted by every HTTP client; zstd costs less to decode for those
    /// that do not accept it.
    #[cfg(feature = "compression")]
    pub fn compress_with(mut self, coding: crate::Coding) -> Self {
        self.coding = coding;
        self
    }

    /// How long a miss that finds another process filling the entry (its
    /// lease, on a shared store) waits for that fill before calling the
    /// handler itself (default [`DEFAULT_LEASE_WAIT`], 1 s; zero: never
    /// waits). It polls the store meanwhile, 5 ms after the lookup and
    /// then twice as long each time, up to 50 ms apart. The other misses
    /// of this process wait with it, so a burst on a cold key costs one
    /// handler call across processes; a lease holder that died costs at
    /// most this once per process, and the entry is then filled here.
    pub fn lease_wait(mut self, wait: Duration) -> Self {
        self.lease_wait = wait;
        self
    }

    /// The TTL of routes that set none (default 60 s).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// Adds a cached route.
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// The bounds of the in-process tier that routes marked
    /// [`Route::in_process`] share (default [`InProcess::new`](crate::InProcess::new)).
    #[cfg(feature = "tier")]
    pub fn in_process(mut self, bounds: crate::store::tier::InProcess) -> Self {
        self.in_process = bounds;
        self
    }

    /// Adds what a write invalidates.
    pub fn on(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Validates every route and rule and builds the policy.
    pub fn build(self) -> Result<Policy, ConfigError> {
        validate_namespace(&self.namespace)?;
        if self.max_body_bytes == 0 {
            return Err(ConfigError::ZeroBodyCap);
        }
        let inputs = InputRules {
            hosts: self
                .hosts
                .iter()
                .map(|h| canonical_host(h))
                .collect::<Result<_, _>>()?,
            trusted: self
                .trusted
                .iter()
                .map(|name| header_name(name))
                .collect::<Result<_, _>>()?,
        };
        let per_response = self
            .per_response
            .iter()
            .map(|name| header_name(name))
            .collect::<Result<_, _>>()?;
        let mut table = RouteTable::default();
        let mut routes = Vec::with_capacity(self.routes.len());
        let mut groups: Vec<Group> = Vec::new();
        for (index, route) in self.routes.into_iter().enumerate() {
            let label = route.label();
            validate_pattern(&route.pattern)?;
            route.scope.validate()?;
            if let Some(name) = &route.invalid_header {
                return Err(ConfigError::InvalidHeaderName(name.clone()));
            }
            let params = pattern_params(&route.pattern);
            if let Some((name, _)) = route.params.iter().find(|(n, _)| !params.contains(n)) {
                return Err(ConfigError::UnknownParam {
                    template: route.pattern.clone(),
                    param: name.clone(),
                });
            }
            let template = route
                .key
                .as_deref()
                .ok_or_else(|| ConfigError::MissingKey {
                    route: label.clone(),
                })?;
            let key = KeyTemplate::parse(template, &params, true)?.typed(&route.params);
            if key.has(&Segment::Version) != route.version_group.is_some() {
                return Err(ConfigError::VersionMismatch { route: label });
            }
            let ttl = route.ttl.unwrap_or(self.default_ttl);
            if ttl.is_zero() {
                return Err(ConfigError::ZeroTtl { route: label });
            }
            if !(0.0..=1.0).contains(&route.verify) {
                return Err(ConfigError::VerifyRate {
                    route: label,
                    rate: route.verify.to_string(),
                });
            }
            #[cfg(feature = "tier")]
            if route.in_process.is_some_and(|bound| bound.is_zero()) {
                return Err(ConfigError::InProcess {
                    reason: format!("route `{label}` keeps entries in process for 0 s"),
                });
            }
            if route.per_scope && route.version_group.is_none() {
                return Err(ConfigError::GroupScope {
                    group: String::new(),
                    reason: format!("route `{label}` is per scope without `versioned_by`"),
                });
            }
            let group = match &route.version_group {
                Some(name) => {
                    let template = KeyTemplate::parse(name, &params, false)?.typed(&route.params);
                    let index = join_group(&mut groups, name, &route, ttl, &label)?;
                    Some(GroupRef { index, template })
                }
                None => None,
            };
            if let Some(name) = route.unkeyed.iter().find(|n| !params.contains(n)) {
                return Err(ConfigError::UnknownParam {
                    template: route.pattern.clone(),
                    param: name.clone(),
                });
            }
            // Every param the route matches names its resource, unless the
            // route says it does not: two resources never share a key.
            let keyed = |param: &String| {
                key.params().any(|p| p == param)
                    || group
                        .as_ref()
                        .is_some_and(|g| g.template.params().any(|p| p == param))
                    || route.unkeyed.contains(param)
            };
            if let Some(param) = params.iter().find(|p| !keyed(p)) {
                return Err(ConfigError::UnkeyedParam {
                    route: label,
                    param: param.clone(),
                });
            }
            let despite = Despite::parse(&route.despite).map_err(|directive| {
                ConfigError::UnknownDirective {
                    route: label.clone(),
                    directive,
                }
            })?;
            table.insert(&Method::GET, &route.pattern, index)?;
            routes.push(CompiledRoute {
                id: route_id(&label),
                label,
                shape: shape(&route.pattern),
                pattern: route.pattern,
                key,
                unkeyed: route.unkeyed,
                despite,
                group,
                ttl,
                stale_window: route.stale_window,
                scope: route.scope,
                public: route.public,
                query: route.query,
                vary: route.vary,
                verify: route.verify,
                hedge: route.hedge,
                handler_us: std::sync::atomic::AtomicU64::new(0),
                slow_lookups: std::sync::atomic::AtomicU32::new(0),
                #[cfg(feature = "tier")]
                in_process: route.in_process,
            });
        }
        let mut rule_table = RouteTable::default();
        let mut rules = Vec::with_capacity(self.rules.len());
        for (index, rule) in self.rules.iter().enumerate() {
            let (methods, compiled) = compile_rule(rule, &routes, &groups)?;
            for method in &methods {
                rule_table.insert(method, compiled.1, index)?;
            }
            rules.push(compiled.0);
        }
        let stats = CacheStats::new(routes.iter().map(|r| r.label.clone()).collect());
        let store = self.store.unwrap_or_else(|| Arc::new(MemoryStore::new()));
        let longest = routes.iter().map(|r| r.ttl + r.stale_window).max();
        store.longest_entry_life(longest.unwrap_or(self.default_ttl));
        #[cfg(feature = "tier")]
        let (store, tier) = match routes.iter().any(|r| r.in_process.is_some()) {
            true => {
                let (store, tier) = tiered(store, self.in_process)?;
                (store, Some(tier))
            }
            false => (store, None),
        };
        Ok(Policy {
            inner: Arc::new(PolicyInner {
                coding: self.coding,
                layout: Layout::new(self.namespace),
                inputs,
                per_response,
                max_body_bytes: self.max_body_bytes,
                lease_wait: self.lease_wait,
                compress_over: self.compress_over,
                routes,
                table,
                groups,
                rules,
                rule_table,
                store,
                stats,
                flights: FlightTable::default(),
                background: Default::default(),
                #[cfg(feature = "tier")]
                tier,
            }),
        })
    }
}

/// `store` behind an in-process tier of `bounds`, which the store tells of
/// every invalidation.
#[cfg(feature = "tier")]
fn tiered(
    store: Arc<dyn Store>,
    bounds: crate::store::tier::InProcess,
) -> Result<(Arc<dyn Store>, crate::store::tier::Tier), ConfigError> {
    if bounds.is_empty() {
        return Err(ConfigError::InProcess {
            reason: "the in-process tier holds no entry or no byte".to_owned(),
        });
    }
    let tier = crate::store::tier::Tier::new(bounds);
    if !tier.watch(&*store) {
        return Err(ConfigError::InProcess {
            reason: format!(
                "the {} store does not report invalidations (a RedisStore over its own connection needs `subscribe_via`, and a channel)",
                store.name()
            ),
        });
    }
    let store: Arc<dyn Store> = Arc::new(crate::store::tier::Tiered {
        inner: store,
        tier: tier.clone(),
    });
    Ok((store, tier))
}

/// Adds `route` to the group `name` (creating it), checking that per-scope
/// groups agree on their scope. Returns the group's index.
fn join_group(
    groups: &mut Vec<Group>,
    name: &str,
    route: &Route,
    ttl: Duration,
    label: &str,
) -> Result<usize, ConfigError> {
    let life = ttl + route.stale_window;
    let bad = |reason: String| ConfigError::GroupScope {
        group: name.to_owned(),
        reason,
    };
    if route.per_scope && route.scope.is_empty() {
        return Err(bad(format!(
            "route `{label}` is per scope but has no scope"
        )));
    }
    match groups.iter().position(|g| g.name == name) {
        Some(index) => {
            let group = &mut groups[index];
            if group.per_scope != route.per_scope {
                return Err(bad(format!(
                    "route `{label}` disagrees with another route on `per_scope`"
                )));
            }
            if group.per_scope && !group.scope.same_as(&route.scope) {
                return Err(bad(format!(
                    "route `{label}` reads it with another scope; build the scope once and `.clone()` it for each route"
                )));
            }
            group.ttl = group.ttl.max(life);
            for (param, canonical) in &route.params {
                match group.types.iter().find(|(p, _)| p == param) {
                    Some((_, known)) if !known.same_as(canonical) => {
                        return Err(bad(format!(
                            "route `{label}` reads param `{param}` in another canonical form"
                        )))
                    }
                    Some(_) => {}
                    None => group.types.push((param.clone(), canonical.clone())),
                }
            }
            Ok(index)
        }
        None => {
            groups.push(Group {
                name: name.to_owned(),
                per_scope: route.per_scope,
                scope: route.scope.clone(),
                ttl: life,
                types: route.params.clone(),
            });
            Ok(groups.len() - 1)
        }
    }
}

/// Validates one rule against the routes and groups: its methods, its
/// pattern and its compiled actions.
fn compile_rule<'r>(
    rule: &'r Rule,
    routes: &[CompiledRoute],
    groups: &[Group],
) -> Result<(Vec<Method>, (CompiledRule, &'r str)), ConfigError> {
    let invalid = |reason: String| ConfigError::InvalidRule {
        rule: rule.route.clone(),
        reason,
    };
    let (method_list, pattern) = rule
        .route
        .split_once(' ')
        .ok_or_else(|| invalid("expected `METHOD /path`".to_owned()))?;
    let pattern = pattern.trim();
    validate_pattern(pattern)?;
    if rule.purges.is_empty() && rule.bumps.is_empty() {
        return Err(invalid("no purge or bump".to_owned()));
    }
    if rule.again_after == Some(Duration::ZERO) {
        return Err(invalid(
            "again_after(0) would invalidate twice at once; give the lag of the reads".to_owned(),
        ));
    }
    let mut methods = Vec::new();
    for method in method_list.split('|') {
        let method = Method::from_bytes(method.trim().as_bytes())
            .map_err(|_| invalid(format!("unknown method `{method}`")))?;
        if method.is_safe() {
            return Err(invalid(format!(
                "{method} is a safe method: reads do not invalidate"
            )));
        }
        methods.push(method);
    }
    let params = pattern_params(pattern);
    let bound = |target: &str, template: &KeyTemplate| match template
        .params()
        .find(|p| !params.iter().any(|b| b == p))
    {
        Some(param) => Err(ConfigError::UnboundParam {
            rule: rule.route.clone(),
            target: target.to_owned(),
            param: param.to_owned(),
        }),
        None => Ok(()),
    };
    let mut compiled = CompiledRule {
        shape: shape(pattern),
        purges: Vec::new(),
        bumps: Vec::new(),
        again_after: rule.again_after,
    };
    for target in &rule.purges {
        let wanted = target.strip_prefix("GET ").unwrap_or(target).trim();
        let index = routes
            .iter()
            .position(|r| r.pattern == wanted)
            .ok_or_else(|| ConfigError::UnknownRoute {
                rule: rule.route.clone(),
                route: target.clone(),
            })?;
        let route = &routes[index];
        match &route.group {
            // Its entries embed a version: purging them is bumping it.
            Some(group) => {
                bound(target, &group.template)?;
                let template = KeyTemplate::parse(group.template.source(), &params, false)?
                    .typed(&groups[group.index].types);
                compiled.bumps.push(GroupRef {
                    index: group.index,
                    template,
                });
            }
            None if route.key.has(&Segment::QueryHash) => {
                return Err(invalid(format!(
                    "`{target}` is keyed by its query, so no write can name its entries; version it with `versioned_by` and bump the group"
                )));
            }
            None => {
                bound(target, &route.key)?;
                compiled.purges.push(index);
            }
        }
    }
    for name in &rule.bumps {
        let index = groups.iter().position(|g| g.name == *name).ok_or_else(|| {
            ConfigError::UnknownGroup {
                rule: rule.route.clone(),
                group: name.clone(),
            }
        })?;
        let template = KeyTemplate::parse(name, &params, false)
            .map_err(|err| match err {
                ConfigError::UnknownParam { param, .. } => ConfigError::UnboundParam {
                    rule: rule.route.clone(),
                    target: name.clone(),
                    param,
                },
                other => other,
            })?
            .typed(&groups[index].types);
        compiled.bumps.push(GroupRef { index, template });
    }
    Ok((methods, (compiled, pattern)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::builder()
            .route(Route::get("/persons/{id}").key("person:{id}"))
            .route(
                Route::get("/persons")
                    .key("persons:list:v{version}:{query_hash}")
                    .versioned_by("persons:list"),
            )
            .route(
                Route::get("/tenants/{t}/persons/{id}")
                    .key("tenant:{t}:person:{id}")
                    .scope(Scope::new().header("x-tenant-id")),
            )
            .build()
            .unwrap()
    }

    fn key_of(policy: &Policy, request: Request<()>) -> Option<CacheKey> {
        match policy.decide(&request) {
            Decision::Cache { key, .. } => Some(key),
            _ => None,
        }
    }

    fn get(uri: &str) -> Request<()> {
        Request::get(uri).body(()).unwrap()
    }

    #[test]
    fn item_keys_read_namespace_then_template() {
        assert_eq!(
            key_of(&policy(), get("/persons/42")),
            Some(CacheKey::Plain("app:person:42".into()))
        );
    }

    #[test]
    fn list_keys_are_versioned() {
        let Some(CacheKey::Versioned {
            versions,
            prefix,
            suffix,
        }) = key_of(&policy(), get("/persons?limit=5"))
        else {
            panic!("expected a versioned key");
        };
        assert_eq!(versions.len(), 1);
        assert_eq!(versions[0].key(), "{app:persons:list}:ver");
        assert_eq!(versions[0].ttl(), Duration::from_secs(60));
        assert_eq!(prefix, "{app:persons:list}:persons:list:v");
        assert!(suffix.starts_with(':') && suffix.len() == 33, "{suffix}");
    }

    fn tenant() -> Scope {
        Scope::new().header("x-tenant-id")
    }

    fn tenant_policy() -> Policy {
        Policy::builder()
            .route(
                Route::get("/persons/{id}")
                    .key("person:{id}")
                    .scope(tenant()),
            )
            .route(
                Route::get("/persons")
                    .key("persons:list:v{version}:{query_hash}")
                    .versioned_by("persons:list")
                    .per_scope()
                    .ttl(Duration::from_secs(30))
                    .stale_while_revalidate(Duration::from_secs(15))
                    .scope(tenant()),
            )
            .on(Rule::new("POST /persons").bump("persons:list"))
            .on(Rule::new("PATCH|DELETE /persons/{id}")
                .purge("GET /persons/{id}")
                .bump("persons:list"))
            .build()
            .unwrap()
    }

    fn as_tenant(method: &str, uri: &str, tenant: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("x-tenant-id", tenant)
            .body(())
            .unwrap()
    }

    #[test]
    fn rules_take_namespace_scope_and_layout_from_the_routes() {
        let p = tenant_policy();
        let read = key_of(&p, as_tenant("GET", "/persons/42", "acme")).unwrap();
        let owed = p
            .invalidation(&as_tenant("PATCH", "/persons/42", "acme"))
            .unwrap();
        assert!(owed.complete && owed.on_drop.is_none());
        let write = owed.invalidation;
        assert_eq!(write.deletes(), [read.entry_key(&[])]);
        let CacheKey::Versioned { versions, .. } =
            key_of(&p, as_tenant("GET", "/persons", "acme")).unwrap()
        else {
            panic!("versioned");
        };
        // A tenant's write bumps that tenant's lists only.
        assert_eq!(write.bumps(), &versions[1..]);
        assert!(versions[1]
            .key()
            .starts_with("{app:persons:list}:ver:scope="));
        assert_eq!(versions[0].key(), "{app:persons:list}:ver");
        assert_eq!(
            versions[1].ttl(),
            Duration::from_secs(45),
            "TTL + stale window"
        );
        let other = p
            .invalidation(&as_tenant("POST", "/persons", "globex"))
            .unwrap()
            .invalidation;
        assert_ne!(other.bumps(), write.bumps());
        assert!(p.invalidation(&get("/persons/42")).is_none());
    }

    #[test]
    fn a_write_without_scope_bumps_every_scope_and_purges_nothing() {
        let p = tenant_policy();
        let owed = p
            .invalidation(&Request::patch("/persons/42").body(()).unwrap())
            .unwrap();
        let write = owed.invalidation;
        assert!(write.deletes().is_empty() && !owed.complete);
        assert_eq!(write.bumps()[0].key(), "{app:persons:list}:ver");
        assert_eq!(p.stats().invalidations().unscoped, 1);
        // Cancelled before its handler answered, it bumps no scope's lists:
        // a client without a scope cannot empty every tenant's entries.
        assert!(owed.on_drop.is_some_and(|less| less.is_empty()));
    }

    #[test]
    fn a_scope_that_reads_nothing_bypasses() {
        assert!(matches!(
            tenant_policy().decide(&get("/persons/1")),
            Decision::Bypass {
                reason: Reason::ScopeMissing,
                ..
            }
        ));
    }

    #[test]
    fn percent_encoded_spellings_of_one_param_share_a_key() {
        let p = policy();
        let key = key_of(&p, get("/persons/61"));
        assert_eq!(key_of(&p, get("/persons/%36%31")), key);
        assert_eq!(key_of(&p, get("/persons/6%31")), key);
        assert_ne!(key_of(&p, get("/persons/6%2531")), key);
    }

    #[test]
    fn bad_rules_are_config_errors() {
        let build = |rule: Rule| {
            Policy::builder()
                .route(Route::get("/p/{id}").key("p:{id}"))
                .route(Route::get("/q").key("q:{query_hash}"))
                .route(Route::get("/l").key("l:v{version}").versioned_by("l"))
                .on(rule)
                .build()
                .unwrap_err()
        };
        assert!(matches!(
            build(Rule::new("POST /p")),
            ConfigError::InvalidRule { .. }
        ));
        assert!(matches!(
            build(Rule::new("GET /p").bump("l")),
            ConfigError::InvalidRule { .. }
        ));
        assert!(matches!(
            build(Rule::new("/p").bump("l")),
            ConfigError::InvalidRule { .. }
        ));
        assert!(matches!(
            build(Rule::new("POST /p").bump("l").again_after(Duration::ZERO)),
            ConfigError::InvalidRule { .. }
        ));
        assert!(matches!(
            build(Rule::new("POST /p/{x}").purge("GET /persn/{id}")),
            ConfigError::UnknownRoute { .. }
        ));
        assert!(matches!(
            build(Rule::new("POST /p/{x}").purge("GET /p/{id}")),
            ConfigError::UnboundParam { .. }
        ));
        assert!(matches!(
            build(Rule::new("POST /p/{id}").bump("nope")),
            ConfigError::UnknownGroup { .. }
        ));
        assert!(matches!(
            build(Rule::new("POST /p/{id}").purge("/q")),
            ConfigError::InvalidRule { .. }
        ));
        let dup = Policy::builder()
            .route(Route::get("/l").key("l:v{version}").versioned_by("l"))
            .on(Rule::new("POST /p").bump("l"))
            .on(Rule::new("POST|PUT /p").bump("l"))
            .build()
            .unwrap_err();
        assert!(matches!(dup, ConfigError::DuplicateRoute { .. }));
    }

    #[test]
    fn per_scope_groups_need_one_scope() {
        let other_tenant = || Scope::new().header("x-org");
        let err = Policy::builder()
            .route(
                Route::get("/a")
                    .key("a:v{version}")
                    .versioned_by("g")
                    .per_scope()
                    .scope(tenant()),
            )
            .route(
                Route::get("/b")
                    .key("b:v{version}")
                    .versioned_by("g")
                    .per_scope()
                    .scope(other_tenant()),
            )
            .build()
            .unwrap_err();
        assert!(matches!(err, ConfigError::GroupScope { .. }), "{err}");
        let err = Policy::builder()
            .route(
                Route::get("/a")
                    .key("a:v{version}")
                    .versioned_by("g")
                    .per_scope(),
            )
            .build()
            .unwrap_err();
        assert!(matches!(err, ConfigError::GroupScope { .. }), "{err}");
    }

    #[test]
    fn unmatched_and_mutating_requests_pass() {
        let p = policy();
        assert!(matches!(p.decide(&get("/other")), Decision::Pass));
        let post = Request::post("/persons/1").body(()).unwrap();
        assert!(matches!(p.decide(&post), Decision::Pass));
    }

    #[test]
    fn credentials_without_scope_bypass() {
        let p = policy();
        for header in ["authorization", "cookie"] {
            let req = Request::get("/persons/1")
                .header(header, "x")
                .body(())
                .unwrap();
            assert!(matches!(
                p.decide(&req),
                Decision::Bypass {
                    reason: Reason::Authorization,
                    ..
                }
            ));
        }
    }

    #[test]
    fn query_on_a_key_without_query_hash_bypasses() {
        assert!(matches!(
            policy().decide(&get("/persons/1?x=1")),
            Decision::Bypass {
                reason: Reason::Query,
                ..
            }
        ));
        assert!(key_of(&policy(), get("/persons/1?x=")).is_some());
    }

    #[test]
    fn scope_values_are_hashed_not_stored() {
        let p = policy();
        let a = Request::get("/tenants/t/persons/1")
            .header("x-tenant-id", "acme")
            .body(())
            .unwrap();
        let b = Request::get("/tenants/t/persons/1")
            .header("x-tenant-id", "other")
            .body(())
            .unwrap();
        let (ka, kb) = (key_of(&p, a).unwrap(), key_of(&p, b).unwrap());
        assert_ne!(ka, kb);
        assert!(!format!("{ka:?}").contains("acme"));
    }

    #[test]
    fn templates_name_every_param_the_route_matches() {
        let build = |route: Route| Policy::builder().route(route).build();
        let err = build(Route::get("/orgs/{org}/items/{id}").key("item:{id}")).unwrap_err();
        assert_eq!(
            err,
            ConfigError::UnkeyedParam {
                route: "GET /orgs/{org}/items/{id}".to_owned(),
                param: "org".to_owned(),
            }
        );
        assert!(err.to_string().contains("unkeyed_param(\"org\")"), "{err}");
        // Named in the group, or declared on purpose.
        assert!(build(
            Route::get("/orgs/{org}/items")
                .key("items:v{version}:{query_hash}")
                .versioned_by("org:{org}:items")
        )
        .is_ok());
        let declared = build(
            Route::get("/orgs/{org}/items/{id}")
                .key("item:{id}")
                .unkeyed_param("org"),
        )
        .unwrap();
        // Never served for another org: the value is bound into the entry.
        let decide = |uri: &str| match declared.decide(&get(uri)) {
            Decision::Cache { key, binding, .. } => (key, binding),
            _ => panic!("cached"),
        };
        let (x, y) = (decide("/orgs/x/items/1"), decide("/orgs/y/items/1"));
        assert_eq!(x.0, y.0);
        assert_ne!(x.1, y.1);
        assert!(matches!(
            build(Route::get("/a/{id}").key("a:{id}").unkeyed_param("nope")),
            Err(ConfigError::UnknownParam { .. })
        ));
    }

    #[test]
    fn two_values_need_a_separator_and_it_is_escaped_in_them() {
        let build = |template: &str| {
            Policy::builder()
                .route(Route::get("/repos/{o}/{r}").key(template))
                .build()
        };
        for refused in ["repo:{o}{r}", "repo:{o}x{r}", "repo:{o}%{r}"] {
            assert!(
                matches!(build(refused), Err(ConfigError::InvalidKeyTemplate { .. })),
                "{refused}"
            );
        }
        for template in [
            "repo:{o}-{r}",
            "repo:{o}.{r}",
            "repo:{o}_{r}",
            "repo:{o}:{r}",
        ] {
            let policy = build(template).unwrap();
            let key = |uri: &str| policy.key_for(&get(uri)).unwrap();
            assert_ne!(key("/repos/a-b/c"), key("/repos/a/b-c"), "{template}");
            assert_ne!(key("/repos/a.b/c"), key("/repos/a/b.c"), "{template}");
            assert_ne!(key("/repos/a_b/c"), key("/repos/a/b_c"), "{template}");
        }
        // A value's own `-` stays as it is where no separator needs it.
        assert_eq!(
            key_of(&policy(), get("/persons/a-b")),
            Some(CacheKey::Plain("app:person:a-b".into()))
        );
    }

    #[test]
    fn two_routes_with_one_template_never_serve_each_other() {
        let p = Policy::builder()
            .route(Route::get("/users/{id}").key("item:{id}"))
            .route(Route::get("/products/{id}").key("item:{id}"))
            .build()
            .unwrap();
        let decide = |uri: &str| match p.decide(&get(uri)) {
            Decision::Cache { key, binding, .. } => (key, binding),
            _ => panic!("cached"),
        };
        let (user, product) = (decide("/users/1"), decide("/products/1"));
        assert_eq!(user.0, product.0, "one key");
        assert_ne!(user.1, product.1, "bound to its route");
    }

    #[test]
    fn a_response_directive_a_route_names_must_be_one_it_refuses() {
        let err = Policy::builder()
            .route(Route::get("/a").key("a").store_despite(["no-store"]))
            .build()
            .unwrap_err();
        assert!(matches!(err, ConfigError::UnknownDirective { .. }), "{err}");
    }

    #[test]
    fn config_errors_are_typed() {
        let build = |route: Route| Policy::builder().route(route).build().unwrap_err();
        assert!(matches!(
            build(Route::get("/p/{id}").key("p:{nope}")),
            ConfigError::UnknownParam { .. }
        ));
        assert!(matches!(
            build(Route::get("/p/{id}").key("p:{id}").ttl(Duration::ZERO)),
            ConfigError::ZeroTtl { .. }
        ));
        assert!(matches!(
            build(Route::get("/p")),
            ConfigError::MissingKey { .. }
        ));
        assert!(matches!(
            build(Route::get("/p").key("p:v{version}")),
            ConfigError::VersionMismatch { .. }
        ));
        assert!(matches!(
            build(
                Route::get("/p")
                    .key("p")
                    .scope(Scope::new().header("bad header"))
            ),
            ConfigError::InvalidHeaderName(_)
        ));
        let dup = Policy::builder()
            .route(Route::get("/p").key("a"))
            .route(Route::get("/p").key("b"))
            .build()
            .unwrap_err();
        assert!(matches!(dup, ConfigError::DuplicateRoute { .. }));
        assert!(matches!(
            Policy::builder().namespace("").build().unwrap_err(),
            ConfigError::InvalidNamespace(_)
        ));
        assert!(matches!(
            Policy::builder().max_body_bytes(0).build().unwrap_err(),
            ConfigError::ZeroBodyCap
        ));
    }

    #[test]
    fn a_streak_of_slow_lookups_hedges_at_once_until_one_is_quick() {
        let policy = Policy::builder()
            .route(
                Route::get("/persons/{id}")
                    .key("person:{id}")
                    .hedge_after(Duration::from_millis(10)),
            )
            .route(Route::get("/other").key("other"))
            .build()
            .unwrap();
        let (route, plain) = (policy.route(0), policy.route(1));
        let (slow, quick) = (Duration::from_millis(11), Duration::from_millis(9));
        for _ in 1..HEDGE_STREAK {
            // Counted when the hedge runs out, not again when it ends.
            route.lookup_ran_past();
            route.lookup_took(slow, true);
            assert!(
                !route.hedges_at_once(),
                "one slow reply is not a slow store"
            );
        }
        route.lookup_ran_past();
        assert!(route.hedges_at_once());
        // Sent at once: counted when it ends.
        route.lookup_took(slow, false);
        assert!(route.hedges_at_once());
        route.lookup_took(quick, false);
        assert!(!route.hedges_at_once(), "a quick lookup ends it");
        // A route that does not hedge never does.
        for _ in 0..HEDGE_STREAK {
            plain.lookup_took(slow, false);
        }
        assert!(!plain.hedges_at_once());
    }
}

#[cfg(test)]
mod hostile_input {
    //! No two distinct requests map to the same key, whatever they carry;
    //! nothing panics; keys stay short.

    use proptest::prelude::*;

    use super::*;

    const MAX_KEY_LEN: usize = 256;

    fn policy() -> Policy {
        Policy::builder()
            .route(Route::get("/p/{id}").key("person:{id}"))
            .route(Route::get("/l").key("list:{query_hash}"))
            .route(
                Route::get("/t/{id}")
                    .key("t:{id}")
                    .scope(Scope::new().header("x-tenant-id").header("authorization")),
            )
            .build()
            .unwrap()
    }

    /// Percent-encodes every byte outside `[A-Za-z0-9]`, so any string fits a URI.
    fn uri_encode(raw: &str) -> String {
        raw.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    fn key_of(request: Request<()>) -> String {
        match policy().decide(&request) {
            Decision::Cache { key, .. } => {
                let text = format!("{key:?}");
                assert!(
                    text.len() <= MAX_KEY_LEN + 64,
                    "key too long: {} bytes",
                    text.len()
                );
                text
            }
            _ => panic!("expected a cacheable request"),
        }
    }

    fn param() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9:*{}/%~.\\-_ \n\t]{0,12}",
            any::<String>(),
            Just("1:x".to_owned()),
            Just("*".to_owned()),
            "[a-z]{1}".prop_map(|c| c.repeat(10_000)),
            "[a-z]{1}".prop_map(|c| c.repeat(10_000) + "x"),
        ]
    }

    /// The reference model of normalisation: sorted by name (values of a
    /// repeated name in order), empty values dropped.
    fn normalised(pairs: &[(String, String)]) -> Vec<(String, String)> {
        let mut kept: Vec<_> = pairs
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .cloned()
            .collect();
        kept.sort_by(|a, b| a.0.cmp(&b.0));
        kept
    }

    fn query(pairs: &[(String, String)]) -> String {
        pairs
            .iter()
            .map(|(k, v)| format!("{}={}", uri_encode(k), uri_encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// Literals a template may put around and between two params.
    fn literal() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[-._:/@x%~]{1,3}",
            Just("-".to_owned()),
            Just("x".to_owned()),
            Just("_v".to_owned()),
        ]
    }

    /// Whether a literal between two params holds a character no encoded
    /// value does (letters, digits, `%`, `~` are in values).
    fn separates(literal: &str) -> bool {
        literal
            .bytes()
            .any(|b| !b.is_ascii_alphanumeric() && b != b'%' && b != b'~')
    }

    proptest! {
        #[test]
        fn two_param_tuples_never_share_a_key(
            (before, between, after, swapped) in (literal(), literal(), literal(), any::<bool>()),
            a in (param(), param()),
            b in (param(), param()),
        ) {
            let (first, second) = if swapped { ("r", "o") } else { ("o", "r") };
            let template = format!("k{before}{{{first}}}{between}{{{second}}}{after}");
            let built = Policy::builder()
                .route(Route::get("/repos/{o}/{r}").key(&template))
                .build();
            // Refused exactly when nothing can separate the two values.
            prop_assert_eq!(built.is_ok(), separates(&between), "{}", template);
            let Ok(policy) = built else { return Ok(()) };
            prop_assume!(![&a.0, &a.1, &b.0, &b.1].iter().any(|v| v.is_empty()));
            let key = |(o, r): &(String, String)| {
                let uri = format!("/repos/{}/{}", uri_encode(o), uri_encode(r));
                policy.key_for(&Request::get(uri).body(()).unwrap())
            };
            let (ka, kb) = (key(&a), key(&b));
            prop_assert!(ka.is_some() && kb.is_some());
            prop_assert_eq!(a == b, ka == kb, "{} {:?} {:?}", template, ka, kb);
        }

        #[test]
        fn distinct_path_params_never_share_a_key(a in param(), b in param()) {
            // An empty segment matches no route: nothing to key.
            prop_assume!(!a.is_empty() && !b.is_empty());
            let ka = key_of(Request::get(format!("/p/{}", uri_encode(&a))).body(()).unwrap());
            let kb = key_of(Request::get(format!("/p/{}", uri_encode(&b))).body(()).unwrap());
            prop_assert_eq!(a == b, ka == kb);
        }

        #[test]
        fn queries_share_a_key_exactly_when_they_normalise_alike(
            a in proptest::collection::vec(("[a-c&=+%]{1,2}", "[x-z&=+%]{0,2}"), 0..5),
            b in proptest::collection::vec(("[a-c&=+%]{1,2}", "[x-z&=+%]{0,2}"), 0..5),
        ) {
            let ka = key_of(Request::get(format!("/l?{}", query(&a))).body(()).unwrap());
            let kb = key_of(Request::get(format!("/l?{}", query(&b))).body(()).unwrap());
            prop_assert_eq!(normalised(&a) == normalised(&b), ka == kb);
        }

        #[test]
        fn distinct_scopes_never_share_a_key(
            a in ("[ -~]{0,20}", proptest::option::weighted(0.9, "[ -~]{0,20}")),
            b in ("[ -~]{0,20}", proptest::option::weighted(0.9, "[ -~]{0,20}")),
        ) {
            let request = |(tenant, auth): &(String, Option<String>)| {
                let mut builder = Request::get("/t/1").header("x-tenant-id", tenant.as_str());
                if let Some(auth) = auth {
                    builder = builder.header("authorization", auth.as_str());
                }
                builder.body(()).unwrap()
            };
            // A scope part that reads nothing (absent or empty) never
            // shares an entry.
            let reads_nothing =
                |side: &(String, Option<String>)| side.0.is_empty() || side.1.as_deref().is_none_or(str::is_empty);
            for side in [&a, &b] {
                if reads_nothing(side) {
                    let bypassed = matches!(
                        policy().decide(&request(side)),
                        Decision::Bypass { reason: Reason::ScopeMissing, .. }
                    );
                    prop_assert!(bypassed);
                }
            }
            prop_assume!(!reads_nothing(&a) && !reads_nothing(&b));
            let (ka, kb) = (key_of(request(&a)), key_of(request(&b)));
            prop_assert_eq!(a == b, ka == kb);
        }

        #[test]
        fn huge_or_odd_queries_never_panic(raw in "[ -~]{0,300}", repeat in 0usize..400) {
            let mut uri = format!("/l?{}", uri_encode(&raw).repeat(repeat.max(1)));
            // `http` refuses URIs of 64 KiB and more before any layer sees them.
            uri.truncate(60_000);
            while uri.ends_with('%') || uri.as_bytes()[uri.len() - 2] == b'%' {
                uri.pop();
            }
            let request = Request::get(uri).body(()).unwrap();
            let _ = key_of(request);
        }
    }

    #[test]
    fn a_60_kb_query_gives_a_short_key() {
        // The largest query `http` accepts (URIs stop short of 64 KiB).
        let uri = format!("/l?q={}", "a".repeat(60_000));
        let _ = key_of(Request::get(uri).body(()).unwrap());
    }
}
