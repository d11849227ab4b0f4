//! Configuration errors.

use std::fmt;

/// A policy or rule set that cannot work, reported when it is built.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A path pattern that the router does not accept.
    InvalidPattern {
        /// The pattern as written.
        pattern: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The same method and path pattern declared twice.
    DuplicateRoute {
        /// The method and pattern, as `GET /persons/{id}`.
        route: String,
    },
    /// A key template that does not parse.
    InvalidKeyTemplate {
        /// The template as written.
        template: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A key template names a parameter the route pattern does not bind.
    UnknownParam {
        /// The template as written.
        template: String,
        /// The parameter it names.
        param: String,
    },
    /// A route without a key template.
    MissingKey {
        /// The route, as `GET /persons/{id}`.
        route: String,
    },
    /// A template uses `{version}` without naming the group it comes from, or
    /// names a group without using `{version}`.
    VersionMismatch {
        /// The route, as `GET /persons`.
        route: String,
    },
    /// A verification rate ([`Route::verify`](crate::Route::verify)) that
    /// is not a number from 0 to 1.
    VerifyRate {
        /// The route, as `GET /persons/{id}`.
        route: String,
        /// The rate as given.
        rate: String,
    },
    /// A write-probe rate ([`Rule::probe`](crate::Rule::probe),
    /// [`PolicyBuilder::probe_writes`](crate::PolicyBuilder::probe_writes))
    /// that is not a number from 0 to 1.
    ProbeRate {
        /// The rule, as `PATCH /persons/{id}`.
        rule: String,
        /// The rate as given.
        rate: String,
    },
    /// A TTL of zero, which would store entries that can never be served.
    ZeroTtl {
        /// The route, as `GET /persons/{id}`.
        route: String,
    },
    /// A namespace that is empty or holds whitespace or braces.
    InvalidNamespace(String),
    /// A body cap of zero bytes.
    ZeroBodyCap,
    /// A header name that is not valid HTTP.
    InvalidHeaderName(String),
    /// A [`BreakerConfig`](crate::store::BreakerConfig) value that cannot
    /// work.
    Breaker {
        /// Why it cannot work.
        reason: String,
    },
    /// A [`ReplayConfig`](crate::store::ReplayConfig) value that cannot
    /// work.
    Replay {
        /// Why it cannot work.
        reason: String,
    },
    /// A Redis address or client that cannot work (a URL that does not
    /// parse, a Sentinel or cluster client that cannot be built).
    RedisSource {
        /// Why it cannot work.
        reason: String,
    },
    /// A host given to [`PolicyBuilder::hosts`](crate::PolicyBuilder::hosts)
    /// that is not a valid `host[:port]`.
    InvalidHost(String),
    /// An in-process tier that cannot work: a zero bound, no room, or a
    /// store that does not report invalidations.
    InProcess {
        /// Why it cannot work.
        reason: String,
    },
    /// A rule with no action, or a method that cannot be used.
    InvalidRule {
        /// The rule, as `POST /persons`.
        rule: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A rule purges a route the policy does not cache.
    UnknownRoute {
        /// The rule, as `PATCH /persons/{id}`.
        rule: String,
        /// The route it names.
        route: String,
    },
    /// A rule bumps a group no route reads.
    UnknownGroup {
        /// The rule, as `PATCH /persons/{id}`.
        rule: String,
        /// The group it names.
        group: String,
    },
    /// A rule's path does not bind a param the purged key or bumped group
    /// needs.
    UnboundParam {
        /// The rule, as `POST /persons`.
        rule: String,
        /// The route or group it names.
        target: String,
        /// The param the rule's path does not bind.
        param: String,
    },
    /// A group versioned per scope whose routes cannot agree on one scope.
    GroupScope {
        /// The group.
        group: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The key template of `route` leaves out path param `param`: two
    /// resources the route serves would share one key. Name it in the
    /// template (or the group), or declare it with
    /// [`Route::unkeyed_param`](crate::Route::unkeyed_param).
    UnkeyedParam {
        /// The route, as `GET /pattern`.
        route: String,
        /// The param the key leaves out.
        param: String,
    },
    /// [`Route::store_despite`](crate::Route::store_despite) names a
    /// directive the cache does not refuse, or does not know.
    UnknownDirective {
        /// The route, as `GET /pattern`.
        route: String,
        /// The name as given.
        directive: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidPattern { pattern, reason } => {
                write!(f, "invalid path pattern `{pattern}`: {reason}")
            }
            Self::DuplicateRoute { route } => write!(f, "route `{route}` is declared twice"),
            Self::InvalidKeyTemplate { template, reason } => {
                write!(f, "invalid key template `{template}`: {reason}")
            }
            Self::UnknownParam { template, param } => write!(
                f,
                "key template `{template}` names `{{{param}}}`, which the route pattern does not bind"
            ),
            Self::MissingKey { route } => write!(f, "route `{route}` has no key template"),
            Self::VersionMismatch { route } => write!(
                f,
                "route `{route}`: a key with `{{version}}` needs `versioned_by(group)`, and a group needs `{{version}}` in the key"
            ),
            Self::ZeroTtl { route } => write!(f, "route `{route}` has a TTL of zero"),
            Self::VerifyRate { route, rate } => write!(
                f,
                "route `{route}` verifies at rate {rate}: a rate is a number from 0 to 1"
            ),
            Self::ProbeRate { rule, rate } => write!(
                f,
                "rule `{rule}` probes writes at rate {rate}: a rate is a number from 0 to 1"
            ),
            Self::InvalidNamespace(ns) => write!(
                f,
                "namespace `{ns}` must be non-empty, without whitespace or braces"
            ),
            Self::ZeroBodyCap => write!(f, "the body cap must be at least one byte"),
            Self::InvalidHeaderName(name) => write!(f, "`{name}` is not a valid header name"),
            Self::InvalidHost(host) => write!(f, "`{host}` is not a valid host[:port]"),
            Self::Breaker { reason } => write!(f, "circuit breaker: {reason}"),
            Self::Replay { reason } => write!(f, "invalidation replay queue: {reason}"),
            Self::RedisSource { reason } => write!(f, "redis source: {reason}"),
            Self::InProcess { reason } => write!(f, "in-process tier: {reason}"),
            Self::InvalidRule { rule, reason } => write!(f, "invalid rule `{rule}`: {reason}"),
            Self::UnknownRoute { rule, route } => write!(
                f,
                "rule `{rule}` purges `{route}`, which is not a cached route of the policy"
            ),
            Self::UnknownGroup { rule, group } => write!(
                f,
                "rule `{rule}` bumps group `{group}`, which no cached route reads"
            ),
            Self::UnboundParam {
                rule,
                target,
                param,
            } => write!(
                f,
                "rule `{rule}` invalidates `{target}`, which needs `{{{param}}}`; the rule's path does not bind it"
            ),
            Self::GroupScope { group, reason } => {
                write!(f, "group `{group}` is versioned per scope: {reason}")
            }
            Self::UnkeyedParam { route, param } => write!(
                f,
                "route `{route}`: the key template leaves out path param `{{{param}}}`, so two resources would share a key; name it in the key, or declare it with `unkeyed_param(\"{param}\")`"
            ),
            Self::UnknownDirective { route, directive } => write!(
                f,
                "route `{route}`: `store_despite(\"{directive}\")` names no directive the cache refuses (max-age=0, s-maxage=0, must-revalidate, pragma: no-cache)"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

pub(crate) fn validate_namespace(namespace: &str) -> Result<(), ConfigError> {
    let bad = |c: char| c.is_whitespace() || c.is_control() || c == '{' || c == '}';
    if namespace.is_empty() || namespace.chars().any(bad) {
        return Err(ConfigError::InvalidNamespace(namespace.to_owned()));
    }
    Ok(())
}
