//! Invalidation driven by writes: after a mutating request succeeds, delete
//! the entries and bump the versions its rule names.
//!
//! ```
//! use axum::{routing::patch, Router};
//! use tower_redis_cache::{store::MemoryStore, InvalidateLayer, Rule, Rules};
//!
//! async fn update_person() -> &'static str { "ok" }
//!
//! let rules = Rules::builder()
//!     .rule(Rule::new("POST /persons").bump("persons:list"))
//!     .rule(Rule::new("PATCH|DELETE /persons/{id}").delete("person:{id}").bump("persons:list"))
//!     .rule(Rule::new("POST /persons/{id}/addresses").delete("person:{id}").bump("persons:list"))
//!     .build()?;
//! let app: Router = Router::new()
//!     .route("/persons/{id}", patch(update_person))
//!     .layer(InvalidateLayer::new(rules, MemoryStore::new()));
//! # Ok::<(), tower_redis_cache::ConfigError>(())
//! ```
//!
//! # After the handler, and only on success
//!
//! The actions run once the inner service answered with a 2xx status, before
//! the response is returned: when the client sees the response, no later
//! read returns data from before the write. A 4xx or 5xx invalidates nothing.
//!
//! # One round trip, no scans
//!
//! All the actions of one request go to the store together (one `EVALSHA` in
//! Redis). A delete writes a short-lived tombstone at the key; a bump
//! increments the group's version key, which orphans every entry keyed with
//! the old version at once. Nothing ever runs `KEYS`, `SCAN` or a pattern
//! delete.
//!
//! # Reaching every scope
//!
//! A delete reaches the entry of the requester's own scope (set the rule's
//! [`Scope`](crate::Scope) to the route's). To reach every scoped variant of
//! an entry without knowing the scopes, version the route by a per-item
//! group (`Route::versioned_by("person:{id}")`) and bump it: one `INCR`
//! whatever the number of scopes.
//!
//! # A failed invalidation
//!
//! If the store fails, the error is logged and counted, and the response is
//! returned unchanged. `RedisStore` keeps the failed actions in a bounded
//! queue and replays them before its next lookup; until they are applied,
//! this process serves nothing from the cache. Another process sharing the
//! Redis may still serve an entry the lost invalidation should have removed,
//! for at most that entry's TTL. If the queue overflows, this process serves
//! nothing from the cache for [`BreakerConfig::overflow_hold`](crate::store::BreakerConfig).

mod future;
mod layer;
mod rules;

pub use future::ResponseFuture;
pub use layer::{Invalidate, InvalidateLayer, InvalidationStats};
pub use rules::{Rule, Rules, RulesBuilder};
