//! Invalidation driven by writes: after a mutating request succeeds, purge
//! the entries and bump the version groups its [`Rule`](crate::Rule) names.
//!
//! A [`CacheLayer`](crate::CacheLayer) already does this for the writes that
//! pass through it. Use an [`InvalidateLayer`], made from the **same**
//! [`Policy`](crate::Policy), where writes reach the application by another
//! stack; it shares the policy's store, namespace, scopes and key layout by
//! construction. Stacked with a `CacheLayer` of the same policy, only the
//! outer of the two invalidates.
//!
//! ```
//! use axum::{routing::patch, Router};
//! use tower_redis_cache::{InvalidateLayer, Policy, Route, Rule};
//!
//! async fn update_person() -> &'static str { "ok" }
//!
//! let policy = Policy::builder()
//!     .route(Route::get("/persons/{id}").key("person:{id}"))
//!     .route(Route::get("/persons").key("persons:list:v{version}:{query_hash}").versioned_by("persons:list"))
//!     .on(Rule::new("POST /persons").bump("persons:list"))
//!     .on(Rule::new("PATCH|DELETE /persons/{id}").purge("GET /persons/{id}").bump("persons:list"))
//!     .on(Rule::new("POST /persons/{id}/addresses").purge("GET /persons/{id}").bump("persons:list"))
//!     .build()?;
//! let writes: Router = Router::new()
//!     .route("/persons/{id}", patch(update_person))
//!     .layer(InvalidateLayer::new(policy));
//! # Ok::<(), tower_redis_cache::ConfigError>(())
//! ```
//!
//! # After the handler, and only on success
//!
//! The actions run once the inner service answered with a 2xx status, before
//! the response is returned: when the client sees the response, no later
//! read returns data from before the write. A 4xx or 5xx invalidates nothing.
//!
//! # Cancelled writes still invalidate
//!
//! From the moment a matched write's handler is called, its invalidation is
//! owed: if the request future is dropped (the client went away, a timeout
//! layer fired) before the invalidation was applied, it is issued on drop
//! and sent from a spawned task. The handler may not have committed then;
//! an extra invalidation is harmless, a missed one is not.
//!
//! # One round trip, no scans
//!
//! All the actions of one request go to the store together (one `EVALSHA` in
//! Redis). A purge writes a short-lived tombstone at the key; a bump
//! increments the group's version key, which orphans every entry keyed with
//! the old version at once. Nothing ever runs `KEYS`, `SCAN` or a pattern
//! delete.
//!
//! # Reaching every scope
//!
//! A purge reaches the entry of the writer's own scope (the route's
//! [`Scope`](crate::Scope) applied to the write request). To reach every
//! scoped variant of an entry, version the route by a per-item group
//! (`Route::versioned_by("person:{id}")`) and purge or bump it: one `INCR`
//! whatever the number of scopes. A group versioned
//! [per scope](crate::Route::per_scope) is bumped for the writer's scope
//! only; [`CacheHandle::bump`](crate::CacheHandle::bump) reaches all scopes.
//!
//! # A failed invalidation
//!
//! The write's response waits for its invalidation, within the store's
//! write budget (`RedisStore::write_deadline`, 1 s: up to three tries, sent even
//! while the read circuit is open), and says how it went in `cache-status`:
//! `detail=invalidated`, or `detail=invalidation-pending` when the store
//! could not be reached. A pending invalidation is logged, counted, queued
//! and replayed (see [`Resilient`](crate::store::Resilient)); until it is
//! applied, this process serves nothing from the cache. Another process
//! sharing the Redis may serve the entry it should have removed until the
//! replay lands or the entry's TTL ends, whichever comes first.

mod future;
mod layer;
mod probe;

pub use future::ResponseFuture;
pub use layer::{Invalidate, InvalidateLayer};
