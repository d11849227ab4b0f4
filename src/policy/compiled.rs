//! A policy's routes, rules and groups once built: what a request is
//! planned against.

use std::time::Duration;

use http::HeaderName;

use super::hedge::HedgeTiming;
use crate::key::{Canonical, KeyTemplate, QueryRule, Scope};

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
    pub(super) id: [u8; 8],
    pub(super) pattern: String,
    /// The pattern with its param names left out, as the route the
    /// application served is compared with it.
    pub(super) shape: String,
    pub(super) key: KeyTemplate,
    /// Path params the key leaves out on purpose: bound into each entry.
    pub(super) unkeyed: Vec<String>,
    /// Response directives stored despite themselves.
    pub(crate) despite: Despite,
    pub(super) group: Option<GroupRef>,
    pub(crate) ttl: Duration,
    pub(crate) stale_window: Duration,
    pub(crate) scope: Scope,
    pub(super) public: bool,
    pub(super) query: QueryRule,
    /// Request headers the entry is bound to, beyond the scope.
    pub(super) vary: Vec<HeaderName>,
    /// The share of hits checked against the handler (0: none).
    pub(crate) verify: f64,
    pub(crate) hedge: HedgeTiming,
    /// The hard bound of the route's entries in the in-process tier.
    pub(crate) in_process: Option<Duration>,
}

impl CompiledRoute {
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
pub(super) struct GroupRef {
    pub(super) index: usize,
    pub(super) template: KeyTemplate,
}

/// A version group, shared by the routes that read it.
#[derive(Debug)]
pub(crate) struct Group {
    pub(super) name: String,
    pub(super) per_scope: bool,
    /// The scope of the routes reading it (the same for all when per scope).
    pub(super) scope: Scope,
    /// The longest entry life of the routes reading it.
    pub(super) ttl: Duration,
    /// The canonical forms of its typed params, from the routes reading it.
    pub(super) types: Vec<(String, Canonical)>,
}

#[derive(Debug)]
pub(super) struct CompiledRule {
    /// The rule's pattern with its param names left out.
    pub(super) shape: String,
    /// Plain routes whose entry the write purges.
    pub(super) purges: Vec<usize>,
    pub(super) bumps: Vec<GroupRef>,
    /// When to invalidate again, for reads that see writes late.
    pub(super) again_after: Option<Duration>,
    /// The share of writes probed after their invalidation (0: none).
    pub(super) probe: f64,
}
