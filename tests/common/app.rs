//! The test app: records with revisions, the policy and router most
//! suites use, and helpers to send requests through it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tower::ServiceExt;
use tower_redis_cache::store::Store;
use tower_redis_cache::{CacheLayer, Policy, Route, Rule, Scope};

/// The records the test app serves: id → revision.
#[derive(Clone, Default)]
pub struct Db {
    pub revisions: Arc<Mutex<HashMap<String, u64>>>,
    pub calls: Arc<AtomicUsize>,
    /// Microseconds a read handler waits between reading and answering,
    /// which widens the cache-aside race window.
    pub read_delay_us: Arc<std::sync::atomic::AtomicU64>,
}

impl Db {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    async fn pause(&self) {
        let delay = self.read_delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
    }

    pub fn set(&self, id: &str, revision: u64) {
        self.revisions
            .lock()
            .unwrap()
            .insert(id.to_owned(), revision);
    }
}

pub const CAP: usize = 4096;

pub fn policy(store: Arc<dyn Store>) -> Policy {
    let json_route = |path: &str, key: &str| Route::get(path).key(key).ttl(Duration::from_secs(60));
    Policy::builder()
        .store(store)
        .max_body_bytes(CAP)
        .route(json_route("/persons/{id}", "person:{id}"))
        .route(
            Route::get("/persons")
                .key("persons:list:v{version}:{query_hash}")
                .versioned_by("persons:list")
                .ttl(Duration::from_secs(60)),
        )
        .route(json_route("/short/{id}", "short:{id}").ttl(Duration::from_secs(1)))
        .route(json_route("/tenant/{id}", "tenant:{id}").scope(Scope::new().header("x-tenant-id")))
        .route(json_route("/public/{id}", "public:{id}").public())
        .route(
            json_route("/scoped/{id}", "scoped:{id}:v{version}")
                .versioned_by("scoped:{id}")
                .scope(Scope::new().header("x-tenant-id")),
        )
        .route(json_route("/shape/{kind}", "shape:{kind}"))
        .route(
            json_route("/swr/{id}", "swr:{id}")
                .ttl(Duration::from_secs(1))
                .stale_while_revalidate(Duration::from_secs(30)),
        )
        .route(
            json_route("/swr-short/{id}", "swr-short:{id}")
                .ttl(Duration::from_secs(1))
                .stale_while_revalidate(Duration::from_secs(1)),
        )
        .on(Rule::new("POST /persons").bump("persons:list"))
        .on(Rule::new("PATCH /swr/{id}").purge("GET /swr/{id}"))
        .on(Rule::new("PATCH /scoped/{id}").purge("GET /scoped/{id}"))
        .on(Rule::new("PATCH|DELETE /persons/{id}")
            .purge("GET /persons/{id}")
            .bump("persons:list"))
        .build()
        .unwrap()
}

async fn person(State(db): State<Db>, Path(id): Path<String>) -> Response<Body> {
    db.calls.fetch_add(1, Ordering::SeqCst);
    let revision = db.revisions.lock().unwrap().get(&id).copied();
    db.pause().await;
    match revision {
        Some(rev) => Json(serde_json::json!({ "id": id, "rev": rev })).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": "not found" })),
        )
            .into_response(),
    }
}

async fn list(State(db): State<Db>, RawQuery(query): RawQuery) -> Json<serde_json::Value> {
    db.calls.fetch_add(1, Ordering::SeqCst);
    let mut items: Vec<(String, u64)> = db
        .revisions
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    items.sort();
    db.pause().await;
    Json(serde_json::json!({ "items": items, "query": query }))
}

pub async fn tenant(
    State(db): State<Db>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Json<serde_json::Value> {
    db.calls.fetch_add(1, Ordering::SeqCst);
    let tenant = headers
        .get("x-tenant-id")
        .map(|v| v.to_str().unwrap().to_owned());
    Json(serde_json::json!({ "id": id, "tenant": tenant }))
}

/// Responses of every shape the cache must refuse (or accept).
/// A list response of about 3.5 KiB (under `CAP`), as JSON APIs send them.
pub fn large_json() -> String {
    let items: Vec<String> = (0..40)
        .map(|i| format!(r#"{{"id":{i},"name":"Person {i}","email":"person{i}@example.com","tenant":"acme"}}"#))
        .collect();
    format!(r#"{{"items":[{}],"total":40}}"#, items.join(","))
}

async fn shape(State(db): State<Db>, Path(kind): Path<String>) -> Response<Body> {
    db.calls.fetch_add(1, Ordering::SeqCst);
    db.pause().await;
    let json = [(header::CONTENT_TYPE, "application/json")];
    match kind.as_str() {
        "ok" => (json, "{\"ok\":true}").into_response(),
        "html" => ([(header::CONTENT_TYPE, "text/html")], "<p>hi</p>").into_response(),
        "created" => (StatusCode::CREATED, json, "{}").into_response(),
        "error" => (StatusCode::INTERNAL_SERVER_ERROR, json, "{\"error\":1}").into_response(),
        "cookie" => (json, [(header::SET_COOKIE, "s=1")], "{}").into_response(),
        "no-store" => (json, [(header::CACHE_CONTROL, "no-store")], "{}").into_response(),
        "private" => (json, [(header::CACHE_CONTROL, "private, max-age=60")], "{}").into_response(),
        "vary-star" => (json, [(header::VARY, "*")], "{}").into_response(),
        "large-json" => (json, large_json()).into_response(),
        "big" => {
            // 16 chunks of 1 KiB, streamed, with no length announced.
            let chunks = (0..16).map(|i| Ok::<_, std::io::Error>(vec![b'a' + i as u8; 1024]));
            let body = Body::from_stream(futures_util::stream::iter(chunks.collect::<Vec<_>>()));
            (json, body).into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

pub async fn update(
    State(db): State<Db>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> StatusCode {
    if q.as_deref() == Some("fail=1") {
        return StatusCode::UNPROCESSABLE_ENTITY;
    }
    *db.revisions.lock().unwrap().entry(id).or_insert(0) += 1;
    // `slow=1`: the commit is done, then the handler still awaits something
    // (a client that disconnects now drops the write's future).
    if q.as_deref() == Some("slow=1") {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    StatusCode::OK
}

async fn create(State(db): State<Db>, RawQuery(q): RawQuery) -> StatusCode {
    let id = q.unwrap_or_default();
    db.revisions.lock().unwrap().insert(id, 1);
    StatusCode::CREATED
}

/// The test app behind one cache layer; the policy gives its stats.
pub fn app(store: Arc<dyn Store>, db: Db) -> (Router, Policy) {
    let policy = policy(store);
    (router(db).layer(CacheLayer::new(policy.clone())), policy)
}

/// The test app's routes, without a cache.
pub fn router(db: Db) -> Router {
    Router::new()
        .route("/persons", get(list).post(create))
        .route("/persons/{id}", get(person).patch(update).delete(update))
        .route("/short/{id}", get(person))
        .route("/swr/{id}", get(person).patch(update))
        .route("/swr-short/{id}", get(person))
        .route("/tenant/{id}", get(tenant))
        .route("/public/{id}", get(person))
        .route("/scoped/{id}", get(person).patch(update))
        .route("/shape/{kind}", get(shape))
        .with_state(db)
}

/// One request through `app`: (status, x-cache, body).
pub async fn send(app: &Router, request: Request<Body>) -> (StatusCode, String, String) {
    send_reading(app, request, "x-cache").await
}

/// One request through `app`: (status, the header `name`, body).
pub async fn send_reading(
    app: &Router,
    request: Request<Body>,
    name: &str,
) -> (StatusCode, String, String) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let x_cache = response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, x_cache, String::from_utf8_lossy(&body).into_owned())
}

pub fn get_req(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

pub fn method_req(method: &str, uri: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap()
}

/// The revision of record 1 in an item or list body.
pub fn revision(uri: &str, body: &str) -> u64 {
    let marker = if uri.starts_with("/persons/") {
        "\"rev\":"
    } else {
        "[\"1\","
    };
    let start = body.find(marker).unwrap_or_else(|| panic!("{uri}: {body}")) + marker.len();
    body[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// What `store` holds at `key` as a hit would serve it: the entry's own
/// bytes, without the epoch stamp a Redis store puts in front (0x04, a
/// length, the epoch). Read through the public `Store` API, waiting out a
/// miss's write still under way (a lease, first byte 0x03, until then).
pub async fn stored_entry(
    store: &dyn Store,
    key: &tower_redis_cache::store::CacheKey,
) -> bytes::Bytes {
    for _ in 0..200 {
        let seen = store.lookup(key).await.unwrap();
        if let tower_redis_cache::store::Observed::Value(stored) = seen.entry() {
            let raw = match stored[0] {
                0x04 => stored.slice(2 + usize::from(stored[1])..),
                _ => stored.clone(),
            };
            if matches!(raw.first(), Some(0x06 | 0x07)) {
                return raw;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no entry at {key:?}");
}
