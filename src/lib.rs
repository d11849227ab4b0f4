//! A response cache in Redis for any [tower] or [axum] service, for JSON
//! APIs read far more often than they change. One [`Policy`] holds the
//! store, the cached routes, their tenant scopes and what each write
//! invalidates; one layer applies it. It guarantees:
//!
//! - **never another tenant's data**: scopes are hashed into the key, and a
//!   scope that reads nothing bypasses the cache;
//! - **a hit is the handler's response**: status, body, every end-to-end
//!   header;
//! - **no stale data after a write**, in every process sharing the Redis,
//!   whatever Redis evicts, even when the write's future is dropped;
//! - **Redis down or slow means misses, never a 5xx**;
//! - **one Redis command per hit** and per write; no `KEYS`, `SCAN` or
//!   pattern deletes.
//!
//! Each guarantee's bound is in the
//! [README](https://github.com/tower-redis-cache/tower-redis-cache#readme);
//! every option with its default in
//! [configuration](https://github.com/tower-redis-cache/tower-redis-cache/blob/main/docs/configuration.md), and how to deploy, operate and
//! size it in [deploying](https://github.com/tower-redis-cache/tower-redis-cache/blob/main/docs/deploying.md), [operating](https://github.com/tower-redis-cache/tower-redis-cache/blob/main/docs/operating.md)
//! and [capacity](https://github.com/tower-redis-cache/tower-redis-cache/blob/main/docs/capacity.md).
//!
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::get, Json, Router};
//! use tower_redis_cache::{CacheLayer, Policy, Route, Rule};
//!
//! async fn get_person() -> Json<serde_json::Value> { Json(serde_json::json!({"id": 1})) }
//! async fn list_persons() -> Json<serde_json::Value> { Json(serde_json::json!({"items": []})) }
//! async fn update_person() -> Json<serde_json::Value> { Json(serde_json::json!({"id": 1})) }
//!
//! let policy = Policy::builder()
//!     // .store(RedisStore::builder("redis://127.0.0.1/").build()?) — the memory store by default
//!     .route(Route::get("/persons/{id}").key("person:{id}").ttl(Duration::from_secs(300)))
//!     .route(
//!         Route::get("/persons")
//!             .key("persons:list:v{version}:{query_hash}")
//!             .versioned_by("persons:list")
//!             .ttl(Duration::from_secs(60)),
//!     )
//!     .on(Rule::new("POST /persons").bump("persons:list"))
//!     .on(Rule::new("PATCH|DELETE /persons/{id}").purge("GET /persons/{id}").bump("persons:list"))
//!     .build()?;
//!
//! let app: Router = Router::new()
//!     .route("/persons", get(list_persons))
//!     .route("/persons/{id}", get(get_person).patch(update_person))
//!     .layer(CacheLayer::new(policy));
//! # Ok::<(), tower_redis_cache::ConfigError>(())
//! ```
//!
//! - [`CacheLayer`] — cache-aside for reads, and the invalidations of the
//!   writes that pass through it.
//! - [`InvalidateLayer`] — the invalidations alone, for stacks where writes
//!   take another path; made from the same policy.
//! - [`CacheHandle`] — purge, bump, warm, stats and health for operators.
//!
//! # Where the layer goes
//!
//! **Put the cache layer inside (after) the layer that authenticates and
//! sets the tenant**: in axum, `.layer(cache)` first, then `.layer(auth)`
//! (the last `.layer` call is the outermost). A scope that reads nothing
//! bypasses the cache (fail closed), so the wrong order costs the cache,
//! never a tenant's data.
//!
//! On `Router::layer` or `route_layer`, the route axum served picks the
//! cached route and the write rule (feature `axum`, on by default):
//! `/users/me` served by its own handler is not the policy's
//! `/users/{id}`. A router nested under a prefix keeps each prefix's page
//! apart. Outside the router, the policy's own pattern match decides.
//!
//! Keys read like `app:person:42` and `app:persons:list:v1732212345678901:3fa9…`;
//! see [`Route`] for templates, [`Scope`] for tenant/auth scoping, and the
//! [`store`] module for the guarantees that keep the cache from serving
//! stale data after a write.
//!
//! # Examples
//!
//! Runnable, one topic each, in the repository's `examples/` (run with
//! `cargo run --release --example <name>`; `examples/README.md` says what
//! each shows): `memory_store` (axum, the memory store),
//! `redis_tenants` (Redis, a tenant scope, invalidation rules),
//! `plain_hyper` (a tower service on hyper, no axum), `cluster` (a Redis
//! Cluster) and `persons` (a full API over SQLite, with metrics and the
//! operator endpoints).
//!
//! [tower]: https://docs.rs/tower
//! [axum]: https://docs.rs/axum

#![deny(missing_docs, unreachable_pub, unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_debug_implementations)]

mod background;
pub mod cache;
mod clock;
mod coding;
mod entry;
mod error;
mod fanout;
mod flight;
mod handle;
mod headers;
pub mod invalidate;
mod key;
mod policy;
mod reason;
mod routes;
mod sampling;
mod stats;
pub mod store;

pub use cache::{CacheLayer, X_CACHE};

#[cfg(feature = "compression")]
pub use coding::Coding;
pub use error::ConfigError;
pub use handle::{CacheHandle, HandleError, Health, InProcessHealth, WarmReport};
pub use invalidate::InvalidateLayer;
pub use key::{Canonical, Scope};
#[cfg(feature = "compression")]
pub use policy::DEFAULT_COMPRESS_OVER;
pub use policy::{Policy, PolicyBuilder, Route, Rule, DEFAULT_LEASE_WAIT, DEFAULT_MAX_BODY_BYTES};
pub use reason::{HandlerCall, Reason};
pub use stats::{CacheStats, InvalidationStats, ProbeCounts, ProbeStats, RouteStats};
#[cfg(feature = "tier")]
pub use store::tier::{InProcess, DEFAULT_TIER_BYTES, DEFAULT_TIER_ENTRIES};

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The guides' examples, compiled as doctests.
#[cfg(doctest)]
mod guides {
    #[doc = include_str!("../docs/configuration.md")]
    struct Configuration;
    #[doc = include_str!("../docs/deploying.md")]
    struct Deploying;
    #[doc = include_str!("../docs/operating.md")]
    struct Operating;
    #[doc = include_str!("../docs/key.md")]
    struct Key;
    #[doc = include_str!("../docs/capacity.md")]
    struct Capacity;
}
