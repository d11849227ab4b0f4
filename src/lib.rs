//! A Redis response cache for any [tower] or [axum] service, with per-route
//! policies and invalidation driven by writes.
//!
//! Two layers:
//!
//! - [`CacheLayer`] — cache-aside for reads: cached GET routes are answered
//!   from the store; on a miss the handler runs and a storable response is
//!   written back.
//! - [`InvalidateLayer`] — after a mutating request succeeds, deletes the
//!   entries and bumps the list versions its rule names.
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use axum::{routing::get, Json, Router};
//! use tower_redis_cache::{
//!     store::{MemoryStore, Store}, CacheLayer, InvalidateLayer, Policy, Route, Rule, Rules,
//! };
//!
//! async fn get_person() -> Json<serde_json::Value> { Json(serde_json::json!({"id": 1})) }
//! async fn list_persons() -> Json<serde_json::Value> { Json(serde_json::json!({"items": []})) }
//! async fn update_person() -> Json<serde_json::Value> { Json(serde_json::json!({"id": 1})) }
//!
//! let policy = Policy::builder()
//!     .namespace("app")
//!     .route(Route::get("/persons/{id}").key("person:{id}").ttl(Duration::from_secs(300)))
//!     .route(
//!         Route::get("/persons")
//!             .key("persons:list:v{version}:{query_hash}")
//!             .versioned_by("persons:list")
//!             .ttl(Duration::from_secs(60)),
//!     )
//!     .build()?;
//! let rules = Rules::builder()
//!     .namespace("app")
//!     .rule(Rule::new("POST /persons").bump("persons:list"))
//!     .rule(Rule::new("PATCH|DELETE /persons/{id}").delete("person:{id}").bump("persons:list"))
//!     .build()?;
//!
//! // With the `redis` feature: `RedisStore::open("redis://127.0.0.1/")?`.
//! let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
//! let app: Router = Router::new()
//!     .route("/persons", get(list_persons))
//!     .route("/persons/{id}", get(get_person).patch(update_person))
//!     .layer(CacheLayer::with_shared_store(policy, store.clone()))
//!     .layer(InvalidateLayer::with_shared_store(rules, store));
//! # Ok::<(), tower_redis_cache::ConfigError>(())
//! ```
//!
//! Keys read like `app:person:42` and `app:persons:list:v1732212345678901:3fa9…`;
//! see [`Route`] for templates, [`Scope`] for tenant/auth scoping, and the
//! [`store`] module for the guarantees that keep the cache from serving
//! stale data after a write.
//!
//! [tower]: https://docs.rs/tower
//! [axum]: https://docs.rs/axum

#![deny(missing_docs, unreachable_pub, unsafe_code)]
#![warn(missing_debug_implementations)]

pub mod cache;
mod entry;
mod error;
pub mod invalidate;
mod key;
mod policy;
mod routes;
mod stats;
pub mod store;

pub use cache::{CacheLayer, X_CACHE};

/// Entry points for the benchmarks in `benches/`; not part of the API.
#[doc(hidden)]
pub mod bench_support {
    use std::time::Duration;

    use bytes::Bytes;

    /// Encodes a 200 JSON response with `body` as a stored entry.
    pub fn encode_entry(body: Bytes) -> Bytes {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        crate::entry::Entry::new(
            http::StatusCode::OK,
            &headers,
            body,
            Duration::from_secs(60),
        )
        .encode()
    }

    /// Decodes a stored value; true when it is an entry.
    pub fn decode_entry(raw: Bytes) -> bool {
        matches!(crate::entry::decode(raw), crate::entry::Slot::Entry(_))
    }
}
pub use error::ConfigError;
pub use invalidate::{InvalidateLayer, Rule, Rules};
pub use key::Scope;
pub use policy::{Policy, PolicyBuilder, Route, DEFAULT_MAX_BODY_BYTES};
pub use stats::{CacheStats, Reason, RouteStats};
