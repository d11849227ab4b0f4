//! Cache-aside for reads: serve cached GET/HEAD routes from the policy's
//! store, fill it on a miss; and apply the invalidations of the writes that
//! pass through (see [`invalidate`](crate::invalidate)).
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::get, Json, Router};
//! use tower_redis_cache::{store::MemoryStore, CacheLayer, Policy, Route, Rule};
//!
//! async fn person() -> Json<serde_json::Value> {
//!     Json(serde_json::json!({ "id": 1, "name": "Ana" }))
//! }
//!
//! let policy = Policy::builder()
//!     .store(MemoryStore::new().max_entries(50_000))
//!     .route(Route::get("/persons/{id}").key("person:{id}").ttl(Duration::from_secs(300)))
//!     .on(Rule::new("PATCH|DELETE /persons/{id}").purge("GET /persons/{id}"))
//!     .build()?;
//! let app: Router = Router::new()
//!     .route("/persons/{id}", get(person).patch(person))
//!     .layer(CacheLayer::new(policy));
//! # Ok::<(), tower_redis_cache::ConfigError>(())
//! ```
//!
//! # Where the layer goes
//!
//! **Inside the layer that authenticates and sets the tenant.** In axum the
//! last `.layer(...)` call is the outermost: write `.layer(CacheLayer::new(policy))`
//! first, then `.layer(auth)`. A hit never calls what is inside the cache
//! layer, so anything that must run on every request (authentication,
//! authorisation) goes outside it. Placed the other way round, a scope that
//! reads the tenant extension reads nothing and every request bypasses the
//! cache (`detail=scope-missing`): the cache is lost, never a tenant's data.
//!
//! # What is stored
//!
//! Only responses to GET on a route of the policy, with status 200, a JSON
//! content type (`application/json` or `…+json`), no `Set-Cookie`, no
//! `Cache-Control: no-store | no-cache | private`, no `Vary` other than on
//! headers the key is scoped by or the route varies on
//! ([`Route::vary_by`](crate::Route::vary_by)), no `Content-Encoding`
//! (compress outside this layer), and a body (plus headers) no larger than
//! the policy's cap. A larger body streams through as it comes; at most the
//! cap is held in memory.
//!
//! # A hit is the response the handler gave
//!
//! The entry keeps the status, the body and every end-to-end header, in
//! order, repeats kept: all but hop-by-hop headers (`Connection` and those
//! it names, `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`,
//! `Proxy-*`), `Date`, `Age`, `Content-Length` and the policy's
//! [per-response headers](crate::PolicyBuilder::per_response_header). A
//! hit replays them, so a CDN in front sees the same `Vary` on a hit as on
//! the miss.
//!
//! # Bound to the request it may be served to
//!
//! Each entry carries a digest of its key and of the request inputs the key
//! does not name: the host, the forwarded headers present, and the headers
//! the route varies on. A hit serves it only to a request with the same
//! digest; any other request misses and its response replaces the entry.
//! Requests the cache cannot cover bypass it: a body on a GET, headers that
//! rewrite the method or path (`X-HTTP-Method-Override`, `X-Original-URL`…),
//! a host outside [`PolicyBuilder::hosts`](crate::PolicyBuilder::hosts).
//! Query parameters the key drops are removed from the request the handler
//! gets. See [what the key covers](https://github.com/tower-redis-cache/tower-redis-cache/blob/main/docs/key.md).
//!
//! # Hits, misses, bypasses
//!
//! On a hit the inner service is not called; HEAD is answered from the GET
//! entry. Every response on a cached route carries `x-cache: HIT | MISS |
//! BYPASS` and an RFC 9211 `cache-status`, such as
//! `tower-redis-cache; hit; ttl=287` or
//! `tower-redis-cache; fwd=uri-miss; fwd-status=200; stored`. Hits also carry
//! `age`.
//!
//! A miss's response is sent once the store acknowledged the write (one round
//! trip, bounded by the store deadline), so the next request finds the entry.
//!
//! # Streamed misses
//!
//! A miss whose body is not all there at once (a handler that streams it,
//! an upstream relayed as it comes) is sent to the client as it arrives,
//! while a copy up to the cap is kept; when the body ends complete within
//! the cap, the entry is written and the body ends once the store answered.
//! Its response goes out before its body is read, so it carries no `ETag`
//! and `cache-status: …; fwd=uri-miss; fwd-status=200; detail=streamed`
//! instead of `stored`; hits on the entry have both. A body that runs over
//! the cap, ends with trailers, fails, or whose client goes away is not
//! stored. A body that is all there at once is read whole first, as above.
//!
//! # ETag and conditional GET
//!
//! A stored response gets a strong `ETag` from its body's SHA-256 (unless the
//! application set one), on the miss that stores it and on every hit. A hit
//! whose `If-None-Match` matches (weak comparison: `W/` tags, `*`, lists) is
//! answered `304 Not Modified`, without the handler.
//!
//! # Single-flight
//!
//! Concurrent misses for the same entry in one process call the inner
//! service once; the others wait and get the same response, with
//! `cache-status: tower-redis-cache; fwd=uri-miss; collapsed`. A flight is
//! named by what its lookup saw (the version, a tombstone), so a request that
//! looked up after an invalidation never joins a flight from before it. When
//! the response cannot be stored (not 200 JSON, too large, a HEAD), the
//! waiting requests call the inner service themselves.
//!
//! Across processes over one Redis, a miss whose lookup finds another
//! process's lease on the entry (that process is filling it) waits for
//! the fill, polling the store, for at most
//! [`PolicyBuilder::lease_wait`](crate::PolicyBuilder::lease_wait) (1 s),
//! then calls the inner service itself; this process's other misses wait
//! with it. A cold key read by a burst on every process costs one call.
//!
//! # Hit-for-miss
//!
//! When a response could not be stored for what it is (its status, a
//! `Set-Cookie`, `no-store`, a body over the cap…), the entry is remembered
//! as such for 10 seconds: its misses call the inner service at once,
//! without waiting for a flight whose answer they could not share
//! (`cache-status: …; fwd=uri-miss; fwd-status=404; detail=hit-for-miss`).
//! The first storable response ends it.
//!
//! # Stale-while-revalidate
//!
//! A route with [`Route::stale_while_revalidate`](crate::Route::stale_while_revalidate)
//! keeps entries for the window past their TTL. A request that finds one
//! stale gets it at once (`cache-status: …; hit; ttl=-3;
//! detail=stale-while-revalidate`) and, unless a refresh is already under
//! way, refreshes it in the background with its own request on the inner
//! service (a Tokio task; the conditional write still applies). Deletes and
//! version bumps reach stale entries like fresh ones.
//!
//! # Credentials and scopes
//!
//! A request with `Authorization` or `Cookie` on a route with no
//! [`Scope`](crate::Scope) bypasses the cache, unless the route is
//! [`public`](crate::Route::public). A request on which a part of the
//! route's scope reads nothing (header or extension absent) bypasses it too
//! (fail closed).
//!
//! # The store is never a dependency
//!
//! A store that fails, times out or returns bytes that do not decode makes a
//! miss (or a bypass), never an error response. The failure is logged with
//! `tracing` and counted in [`CacheStats`](crate::CacheStats).

mod body;
mod decide;
mod future;
mod layer;
mod local;
mod refresh;
mod report;
mod request;
mod service;
mod storable;
mod stream;
mod verify;

pub use crate::headers::X_CACHE;
pub use body::{BodyError, ResponseBody};
pub use future::ResponseFuture;
pub use layer::CacheLayer;
pub use service::Cache;
