//! Building a policy: the builder, and compiling its routes and rules
//! with every check that can refuse them.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use sha2::Digest;

use super::compile_rule::compile_rule;
use super::compiled::{CompiledRoute, Despite, Group, GroupRef};
use super::hedge::{Hedge, HedgeTiming};
use super::tier;
use super::{
    Policy, PolicyInner, Route, Rule, DEFAULT_COMPRESS_OVER, DEFAULT_LEASE_WAIT,
    DEFAULT_MAX_BODY_BYTES,
};
use crate::error::{validate_namespace, ConfigError};
use crate::flight::FlightTable;
use crate::key::served::shape;
use crate::key::{pattern_params, InputRules, KeyTemplate, Layout, Segment};
use crate::routes::{validate_pattern, RouteTable};
use crate::stats::CacheStats;
use crate::store::{MemoryStore, Store};

/// Builds a [`Policy`].
#[must_use]
pub struct PolicyBuilder {
    pub(super) coding: crate::coding::Coding,
    pub(super) namespace: String,
    pub(super) hosts: Vec<String>,
    pub(super) trusted: Vec<String>,
    pub(super) per_response: Vec<String>,
    pub(super) max_body_bytes: usize,
    pub(super) lease_wait: Duration,
    pub(super) compress_over: usize,
    pub(super) default_ttl: Duration,
    pub(super) routes: Vec<Route>,
    pub(super) rules: Vec<Rule>,
    pub(super) store: Option<Arc<dyn Store>>,
    pub(super) in_process: tier::Bounds,
    pub(super) probe_writes: f64,
    pub(super) hedge_by_default: bool,
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
            in_process: tier::Bounds::default(),
            probe_writes: 0.0,
            hedge_by_default: false,
        }
    }
}

/// The first 8 bytes of the SHA-256 of a route's label (`GET /pattern`).
fn route_id(label: &str) -> [u8; 8] {
    let digest = sha2::Sha256::digest(label.as_bytes());
    let mut id = [0; 8];
    id.copy_from_slice(&digest[..8]);
    id
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
    /// entry is bound to the host it was stored for (see
    /// [what the key covers](https://github.com/tower-redis-cache/tower-redis-cache/blob/main/docs/key.md)).
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

    /// Probes `rate` (0 to 1, default 0: off) of the writes of every rule
    /// without a rate of its own ([`Rule::probe`](crate::Rule::probe)):
    /// about 1 s and 10 s after a sampled write's invalidation, the store
    /// is read again to check that it no longer serves what the write
    /// replaced. A rate outside 0 to 1 fails `build` with
    /// [`ConfigError::ProbeRate`].
    pub fn probe_writes(mut self, rate: f64) -> Self {
        self.probe_writes = rate;
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

    /// Routes that set no hedging of their own hedge within a budget, as
    /// [`Route::hedge_within_budget`] does (by default they do not hedge).
    pub fn hedge_within_budget(mut self) -> Self {
        self.hedge_by_default = true;
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
            table.insert(&Method::GET, &route.pattern, index)?;
            routes.push(compile_route(
                route,
                self.default_ttl,
                self.hedge_by_default,
                &mut groups,
            )?);
        }
        let mut rule_table = RouteTable::default();
        let mut rules = Vec::with_capacity(self.rules.len());
        for (index, rule) in self.rules.iter().enumerate() {
            let (methods, compiled) = compile_rule(rule, &routes, &groups, self.probe_writes)?;
            for method in &methods {
                rule_table.insert(method, compiled.1, index)?;
            }
            rules.push(compiled.0);
        }
        let stats = CacheStats::new(routes.iter().map(|r| r.label.clone()).collect());
        let store = self.store.unwrap_or_else(|| Arc::new(MemoryStore::new()));
        let longest = routes.iter().map(|r| r.ttl + r.stale_window).max();
        store.longest_entry_life(longest.unwrap_or(self.default_ttl));
        let in_process = routes.iter().any(|r| r.in_process.is_some());
        let (store, tier) = tier::attach(store, self.in_process, in_process)?;
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
                tier,
            }),
        })
    }
}

/// Checks one route and compiles it, joining its version group.
fn compile_route(
    route: Route,
    default_ttl: Duration,
    hedge_by_default: bool,
    groups: &mut Vec<Group>,
) -> Result<CompiledRoute, ConfigError> {
    let label = route.label();
    let params = check_names(&route)?;
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
    let ttl = route.ttl.unwrap_or(default_ttl);
    check_settings(&route, &label, ttl)?;
    let group = match &route.version_group {
        Some(name) => {
            let template = KeyTemplate::parse(name, &params, false)?.typed(&route.params);
            let index = join_group(groups, name, &route, ttl, &label)?;
            Some(GroupRef { index, template })
        }
        None => None,
    };
    check_keyed(&route, &label, &params, &key, group.as_ref())?;
    let despite =
        Despite::parse(&route.despite).map_err(|directive| ConfigError::UnknownDirective {
            route: label.clone(),
            directive,
        })?;
    Ok(CompiledRoute {
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
        hedge: HedgeTiming::new(route.hedge.unwrap_or(match hedge_by_default {
            true => Hedge::Budgeted,
            false => Hedge::Off,
        })),
        in_process: route.in_process,
    })
}

/// The pattern, the scope's and `vary_by`'s header names and the typed
/// params; the params the pattern binds.
fn check_names(route: &Route) -> Result<Vec<String>, ConfigError> {
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
    Ok(params)
}

/// The settings that cannot work: a zero TTL, a rate outside 0 to 1, a
/// zero in-process bound, a per-scope route without a group.
fn check_settings(route: &Route, label: &str, ttl: Duration) -> Result<(), ConfigError> {
    if ttl.is_zero() {
        return Err(ConfigError::ZeroTtl {
            route: label.to_owned(),
        });
    }
    if !(0.0..=1.0).contains(&route.verify) {
        return Err(ConfigError::VerifyRate {
            route: label.to_owned(),
            rate: route.verify.to_string(),
        });
    }
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
    Ok(())
}

/// Every param the route matches names its resource (in the key or the
/// group), unless the route says it does not: two resources never share a
/// key.
fn check_keyed(
    route: &Route,
    label: &str,
    params: &[String],
    key: &KeyTemplate,
    group: Option<&GroupRef>,
) -> Result<(), ConfigError> {
    if let Some(name) = route.unkeyed.iter().find(|n| !params.contains(n)) {
        return Err(ConfigError::UnknownParam {
            template: route.pattern.clone(),
            param: name.clone(),
        });
    }
    let keyed = |param: &String| {
        key.params().any(|p| p == param)
            || group.is_some_and(|g| g.template.params().any(|p| p == param))
            || route.unkeyed.contains(param)
    };
    if let Some(param) = params.iter().find(|p| !keyed(p)) {
        return Err(ConfigError::UnkeyedParam {
            route: label.to_owned(),
            param: param.clone(),
        });
    }
    Ok(())
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
