//! The plan for one request: which route, which key, and what a write
//! invalidates.

use std::time::Duration;

use http::{Method, Request};
use sha2::Digest;

use super::compiled::GroupRef;
use super::Policy;
#[cfg(doc)]
use super::Rule;
use crate::key::served::{served_as, stripped_prefix, Served};
use crate::key::{
    hash_field, percent_decode, Binding, KeyTemplate, Params, QueryRule, Rendered, Segment,
};
use crate::reason::Reason;
use crate::stats::CacheStats;
use crate::store::{CacheKey, Invalidation, VersionKey};

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
    /// The share of writes probed ([`Rule::probe`]).
    pub(crate) probe: f64,
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
    pub(crate) fn plan<B>(&self, request: &Request<B>) -> Decision {
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
            probe: rule.probe,
        })
    }

    /// What purges the entry `request` would be served from: its key for a
    /// plain route; for a versioned route, a bump of its group (of the
    /// request's scope, for a per-scope group), which is race-free and
    /// reaches every query variant.
    pub(crate) fn purge_for<B>(&self, request: &Request<B>) -> Option<(String, Invalidation)> {
        let Decision::Cache { key, .. } = self.plan(request) else {
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
