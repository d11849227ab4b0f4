//! A hit is the response the handler gave: every end-to-end header, the
//! variants a route declares, params and scopes as the handler reads them,
//! and an entry served only for the key (and request inputs) it was stored
//! under. Run against the memory store, a real `redis-server` and a real
//! cluster.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use common::Backend;
use tower::ServiceExt;
use tower_redis_cache::store::{CacheKey, Invalidation, Lookup, Observed, Store, StoreFuture};
use tower_redis_cache::{CacheLayer, Canonical, Policy, Route, Rule, Scope};

backend_tests!(
    a_hit_replays_every_end_to_end_header,
    entries_are_bound_to_the_headers_a_route_varies_on,
    a_cors_layer_inside_the_cache_works_once_the_route_varies_on_origin,
    typed_params_share_one_entry_whatever_the_spelling,
    empty_query_values_are_dropped_or_kept_as_the_route_says,
    an_entry_handed_to_another_key_is_a_miss,
    compressed_entries_go_as_stored_to_clients_that_accept_them,
    a_body_encoded_inside_the_cache_is_stored_in_its_coding,
);

/// Revisions by canonical id; the handlers count their calls.
#[derive(Clone, Default)]
struct Rows {
    revisions: Arc<Mutex<HashMap<String, u64>>>,
    calls: Arc<AtomicU64>,
}

impl Rows {
    fn revision(&self, id: &str) -> u64 {
        *self.revisions.lock().unwrap().get(id).unwrap_or(&0)
    }

    fn bump(&self, id: &str) {
        *self
            .revisions
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_default() += 1;
    }
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, String) {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn get_req(uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::get(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::empty()).unwrap()
}

/// The headers of a response as `name: value` lines, without those a hit
/// computes afresh (`date`, `age`, `x-cache`, `cache-status`) and
/// `content-length` (set by hyper on the wire for a miss's full body).
fn replayed(headers: &HeaderMap) -> Vec<String> {
    headers
        .iter()
        .filter(|(name, _)| {
            !["date", "age", "x-cache", "cache-status", "content-length"].contains(&name.as_str())
        })
        .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap()))
        .collect()
}

async fn page(State(rows): State<Rows>, Path(id): Path<u64>, headers: HeaderMap) -> Response {
    rows.calls.fetch_add(1, Ordering::SeqCst);
    let tenant = headers
        .get("x-tenant-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut response = Json(serde_json::json!({ "id": id, "tenant": tenant })).into_response();
    for (name, value) in [
        ("vary", "x-tenant-id"),
        ("cache-control", "public, max-age=60"),
        ("link", "</items?page=2>; rel=\"next\""),
        ("link", "</items?page=9>; rel=\"last\""),
        ("x-total-count", "42"),
        ("content-language", "pt-BR"),
        ("access-control-allow-origin", "*"),
        ("x-request-id", "per-response-1"),
        ("connection", "x-hop"),
        ("x-hop", "hop-by-hop"),
        ("keep-alive", "timeout=5"),
    ] {
        response
            .headers_mut()
            .append(name, HeaderValue::from_static(value));
    }
    response
}

/// The issue's route: scoped by `x-tenant-id`, with six end-to-end headers
/// a hit used to drop, a per-response header the policy names, and
/// hop-by-hop headers.
async fn a_hit_replays_every_end_to_end_header(backend: Backend) {
    let rows = Rows::default();
    let policy = Policy::builder()
        .store(backend.store.clone())
        .per_response_header("x-request-id")
        .route(
            Route::get("/items/{id}")
                .key("item:{id}")
                .scope(Scope::new().header("x-tenant-id")),
        )
        .build()
        .unwrap();
    let app = Router::new()
        .route("/items/{id}", get(page))
        .with_state(rows.clone())
        .layer(CacheLayer::new(policy));
    let request = || get_req("/items/7", &[("x-tenant-id", "acme")]);
    let (_, miss, miss_body) = send(&app, request()).await;
    let (_, hit, hit_body) = send(&app, request()).await;
    assert_eq!(miss["x-cache"], "MISS");
    assert_eq!(hit["x-cache"], "HIT");
    assert_eq!(hit_body, miss_body);
    assert_eq!(rows.calls.load(Ordering::SeqCst), 1);
    let (miss_lines, hit_lines) = (replayed(&miss), replayed(&hit));
    eprintln!("| header | MISS | HIT |\n| --- | --- | --- |");
    for line in &miss_lines {
        let (name, value) = line.split_once(": ").unwrap();
        let on_hit = hit_lines.iter().any(|l| l == line);
        eprintln!(
            "| {name} | {value} | {} |",
            if on_hit { "same" } else { "-" }
        );
    }
    // The per-response and hop-by-hop headers are the miss's alone.
    let expected_miss_only = [
        "x-request-id: per-response-1",
        "connection: x-hop",
        "x-hop: hop-by-hop",
        "keep-alive: timeout=5",
    ];
    let end_to_end: Vec<&String> = miss_lines
        .iter()
        .filter(|l| !expected_miss_only.contains(&l.as_str()))
        .collect();
    let hit_refs: Vec<&String> = hit_lines.iter().collect();
    assert_eq!(
        hit_refs, end_to_end,
        "the hit replays the miss's end-to-end headers, in order"
    );
    for header in [
        "vary: x-tenant-id",
        "cache-control: public, max-age=60",
        "x-total-count: 42",
        "content-language: pt-BR",
        "access-control-allow-origin: *",
    ] {
        assert!(
            hit_lines.iter().any(|l| l == header),
            "{header} missing on the hit"
        );
    }
    let links: Vec<_> = hit.get_all("link").iter().collect();
    assert_eq!(links.len(), 2, "repeats kept");
    for gone in ["x-request-id", "connection", "x-hop", "keep-alive"] {
        assert!(!hit.contains_key(gone), "{gone} replayed");
    }
    assert!(hit.contains_key("age") && hit.contains_key("content-length"));
}

async fn origin_page(State(rows): State<Rows>, headers: HeaderMap) -> Response {
    rows.calls.fetch_add(1, Ordering::SeqCst);
    let origin = headers.get("origin").cloned();
    let mut response = Json(serde_json::json!({ "ok": true })).into_response();
    if let Some(origin) = origin {
        response
            .headers_mut()
            .insert("access-control-allow-origin", origin);
    }
    response
        .headers_mut()
        .insert("vary", HeaderValue::from_static("origin"));
    response
}

/// A route that varies on `origin` serves an entry only to the origin it
/// was stored for; a route that does not declare it stores nothing.
async fn entries_are_bound_to_the_headers_a_route_varies_on(backend: Backend) {
    let rows = Rows::default();
    let policy = Policy::builder()
        .store(backend.store.clone())
        .route(Route::get("/cors").key("cors").vary_by(["origin"]))
        .route(Route::get("/undeclared").key("undeclared"))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/cors", get(origin_page))
        .route("/undeclared", get(origin_page))
        .with_state(rows.clone())
        .layer(CacheLayer::new(policy));
    let from = |origin: Option<&str>, uri: &str| match origin {
        Some(origin) => get_req(uri, &[("origin", origin)]),
        None => get_req(uri, &[]),
    };
    let mut served = Vec::new();
    for origin in [
        Some("https://a.example"),
        Some("https://a.example"),
        Some("https://b.example"),
        None,
        Some("https://b.example"),
        Some("HTTPS://B.example"),
    ] {
        let (_, headers, _) = send(&app, from(origin, "/cors")).await;
        let allowed = headers
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            allowed.as_deref().map(str::to_ascii_lowercase),
            origin.map(str::to_ascii_lowercase),
            "an entry stored for another origin was served"
        );
        served.push(headers["x-cache"].to_str().unwrap().to_owned());
    }
    // Values are bound as sent: `HTTPS://B.example` is not `https://b.example`
    // to a CORS layer or a handler that compares them exactly.
    assert_eq!(served, ["MISS", "HIT", "MISS", "MISS", "MISS", "MISS"]);
    // Not stored for its `Vary`; then remembered as such (hit-for-miss).
    for detail in ["detail=vary", "detail=hit-for-miss"] {
        let (_, headers, _) = send(&app, from(Some("https://a.example"), "/undeclared")).await;
        assert_eq!(headers["x-cache"], "MISS");
        let status = headers["cache-status"].to_str().unwrap();
        assert!(status.ends_with(detail), "{status}");
    }
}

/// tower-http's `CorsLayer` inside the cache adds `Vary: origin, …`: the
/// route stores once it varies on those headers, and each origin gets its
/// own `access-control-allow-origin`.
async fn a_cors_layer_inside_the_cache_works_once_the_route_varies_on_origin(backend: Backend) {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let policy = Policy::builder()
        .store(backend.store.clone())
        .route(Route::get("/cors").key("cors").vary_by([
            "origin",
            "access-control-request-method",
            "access-control-request-headers",
        ]))
        .build()
        .unwrap();
    let cors = CorsLayer::new().allow_origin(AllowOrigin::list([
        HeaderValue::from_static("https://a.example"),
        HeaderValue::from_static("https://b.example"),
    ]));
    let app = Router::new()
        .route(
            "/cors",
            get(|| async { Json(serde_json::json!({ "ok": true })) }),
        )
        .layer(cors)
        .layer(CacheLayer::new(policy));
    for (origin, expected) in [
        ("https://a.example", "MISS"),
        ("https://a.example", "HIT"),
        ("https://b.example", "MISS"),
        ("https://b.example", "HIT"),
        ("https://evil.example", "MISS"),
    ] {
        let (_, headers, _) = send(&app, get_req("/cors", &[("origin", origin)])).await;
        assert_eq!(headers["x-cache"], expected, "{origin}");
        let allowed = headers.get("access-control-allow-origin");
        match origin {
            "https://evil.example" => assert!(allowed.is_none()),
            _ => assert_eq!(allowed.unwrap(), origin),
        }
    }
}

async fn typed_item(State(rows): State<Rows>, Path(id): Path<u64>) -> Json<serde_json::Value> {
    rows.calls.fetch_add(1, Ordering::SeqCst);
    Json(serde_json::json!({ "id": id, "rev": rows.revision(&id.to_string()) }))
}

async fn typed_write(State(rows): State<Rows>, Path(id): Path<u64>) -> StatusCode {
    rows.bump(&id.to_string());
    StatusCode::NO_CONTENT
}

async fn uuid_item(State(rows): State<Rows>, Path(id): Path<String>) -> Response {
    rows.calls.fetch_add(1, Ordering::SeqCst);
    let id = id.to_ascii_lowercase();
    Json(serde_json::json!({ "id": id, "rev": rows.revision(&id) })).into_response()
}

async fn uuid_write(State(rows): State<Rows>, Path(id): Path<String>) -> StatusCode {
    rows.bump(&id.to_ascii_lowercase());
    StatusCode::NO_CONTENT
}

fn rev(body: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(body).unwrap()["rev"]
        .as_u64()
        .unwrap()
}

/// Reads through one spelling of an id, a write through another, reads
/// again: every read after the write serves the written revision.
async fn typed_params_share_one_entry_whatever_the_spelling(backend: Backend) {
    let rows = Rows::default();
    let policy = Policy::builder()
        .store(backend.store.clone())
        .route(
            Route::get("/items/{id}")
                .key("item:{id}")
                .param("id", Canonical::integer()),
        )
        .route(
            Route::get("/things/{id}")
                .key("thing:{id}")
                .param("id", Canonical::uuid()),
        )
        .on(Rule::new("PATCH /items/{id}").purge("GET /items/{id}"))
        .on(Rule::new("PATCH /things/{id}").purge("GET /things/{id}"))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/items/{id}", get(typed_item).patch(typed_write))
        .route("/things/{id}", get(uuid_item).patch(uuid_write))
        .with_state(rows.clone())
        .layer(CacheLayer::new(policy.clone()));
    let (one, two) = (
        "67e55044-10b1-426f-9247-bb680e5fe0c8",
        "a1a2a3a4-b1b2-c1c2-d1d2-d3d4d5d6d7d8",
    );
    let cases = [
        ("/items/01", "/items/1"),
        ("/items/2", "/items/02"),
        ("/items/+3", "/items/3"),
        ("/items/4", "/items/004"),
        (
            &*format!("/things/{one}"),
            &*format!("/things/{}", one.to_ascii_uppercase()),
        ),
        (
            &*format!("/things/{}", two.to_ascii_uppercase()),
            &*format!("/things/{two}"),
        ),
    ]
    .map(|(a, b)| (a.to_owned(), b.to_owned()));
    let mut stale = 0;
    eprintln!(
        "| read | written | x-cache before | served after the write |\n| --- | --- | --- | --- |"
    );
    for (read, written) in &cases {
        for expected in ["MISS", "HIT"] {
            let (_, headers, _) = send(&app, get_req(read, &[])).await;
            assert_eq!(headers["x-cache"], expected, "{read}");
        }
        let (_, _, before) = send(&app, get_req(read, &[])).await;
        let write = Request::patch(written.as_str())
            .body(Body::empty())
            .unwrap();
        let (status, _, _) = send(&app, write).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        for uri in [read, written] {
            let (_, headers, body) = send(&app, get_req(uri, &[])).await;
            let fresh = rev(&body) == rev(&before) + 1;
            stale += usize::from(!fresh);
            eprintln!(
                "| {read} | {written} | HIT rev {} | {uri}: rev {} ({}) |",
                rev(&before),
                rev(&body),
                headers["x-cache"].to_str().unwrap()
            );
        }
    }
    assert_eq!(
        stale, 0,
        "reads after a write served the pre-write revision"
    );
    // A value the handler refuses bypasses the cache; a write with one
    // names no entry, and is counted.
    let (status, headers, _) = send(&app, get_req("/items/abc", &[])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        headers["cache-status"],
        "tower-redis-cache; fwd=bypass; detail=bad-param"
    );
    let unparsed_before = policy.stats().invalidations().unparsed;
    let write = Request::patch("/things/not-a-uuid")
        .body(Body::empty())
        .unwrap();
    let _ = send(&app, write).await;
    assert_eq!(policy.stats().invalidations().unparsed, unparsed_before + 1);
}

async fn search(
    State(rows): State<Rows>,
    Query(q): Query<HashMap<String, String>>,
    RawQuery(raw): RawQuery,
) -> Json<serde_json::Value> {
    rows.calls.fetch_add(1, Ordering::SeqCst);
    Json(serde_json::json!({
        "name": q.get("name"),
        "raw": raw,
    }))
}

/// By default `?name=` is dropped from the key and from the request the
/// handler gets; a route that keeps empty values keys them apart.
async fn empty_query_values_are_dropped_or_kept_as_the_route_says(backend: Backend) {
    let rows = Rows::default();
    let policy = Policy::builder()
        .store(backend.store.clone())
        .route(Route::get("/search").key("search:{query_hash}"))
        .route(
            Route::get("/strict")
                .key("strict:{query_hash}")
                .keep_empty_query_values(),
        )
        .build()
        .unwrap();
    let app = Router::new()
        .route("/search", get(search))
        .route("/strict", get(search))
        .with_state(rows.clone())
        .layer(CacheLayer::new(policy));
    let body = |b: &str| serde_json::from_str::<serde_json::Value>(b).unwrap();
    // Dropped: both spellings are one entry, and the handler never sees
    // the empty value it is not keyed by.
    let (_, first, with_empty) = send(&app, get_req("/search?a=1&name=", &[])).await;
    let (_, second, without) = send(&app, get_req("/search?a=1", &[])).await;
    assert_eq!(
        (
            first["x-cache"].to_str().unwrap(),
            second["x-cache"].to_str().unwrap()
        ),
        ("MISS", "HIT")
    );
    assert_eq!(body(&with_empty)["name"], serde_json::Value::Null);
    assert_eq!(body(&with_empty)["raw"], "a=1");
    assert_eq!(with_empty, without);
    // Kept: two entries, each with its own answer.
    let (_, first, with_empty) = send(&app, get_req("/strict?a=1&name=", &[])).await;
    let (_, second, without) = send(&app, get_req("/strict?a=1", &[])).await;
    assert_eq!(
        (
            first["x-cache"].to_str().unwrap(),
            second["x-cache"].to_str().unwrap()
        ),
        ("MISS", "MISS")
    );
    assert_eq!(body(&with_empty)["name"], "");
    assert_eq!(body(&without)["name"], serde_json::Value::Null);
    let (_, again, body_again) = send(&app, get_req("/strict?name=&a=1", &[])).await;
    assert_eq!(
        (again["x-cache"].to_str().unwrap(), body_again),
        ("HIT", with_empty)
    );
}

/// A store that hands the last entry it read to the next lookup that finds
/// none: a reply delivered to the wrong request, as a proxy or a
/// bookkeeping bug could.
struct CrossedReplies {
    inner: Arc<dyn Store>,
    last: Arc<Mutex<Option<Lookup>>>,
}

impl Store for CrossedReplies {
    fn name(&self) -> &'static str {
        "crossed"
    }

    fn lookup(&self, key: &CacheKey) -> StoreFuture<Lookup> {
        let (lookup, last) = (self.inner.lookup(key), self.last.clone());
        Box::pin(async move {
            let found = lookup.await?;
            let mut last = last.lock().unwrap();
            match found.entry() {
                // Leases and tombstones are 29 bytes; entries are longer.
                Observed::Value(value) if value.len() > 40 => {
                    *last = Some(found.clone());
                    Ok(found)
                }
                _ => Ok(last.clone().unwrap_or(found)),
            }
        })
    }

    fn store(
        &self,
        key: &CacheKey,
        seen: &Lookup,
        value: bytes::Bytes,
        ttl: Duration,
    ) -> StoreFuture<bool> {
        self.inner.store(key, seen, value, ttl)
    }

    fn invalidate(&self, invalidation: &Invalidation) -> StoreFuture<()> {
        self.inner.invalidate(invalidation)
    }

    fn ping(&self) -> StoreFuture<()> {
        self.inner.ping()
    }
}

async fn an_entry_handed_to_another_key_is_a_miss(backend: Backend) {
    let db = common::Db::default();
    let store = CrossedReplies {
        inner: backend.store.clone(),
        last: Arc::default(),
    };
    let (app, _) = common::app(Arc::new(store), db);
    let as_tenant = |tenant: &str| {
        Request::get("/tenant/1")
            .header("x-tenant-id", tenant)
            .body(Body::empty())
            .unwrap()
    };
    for expected in ["MISS", "HIT"] {
        let (_, x_cache, body) = common::send(&app, as_tenant("acme")).await;
        assert_eq!(x_cache, expected);
        assert!(body.contains("acme"), "{body}");
    }
    // globex's lookup finds nothing of its own; the store hands it acme's.
    let (_, x_cache, body) = common::send(&app, as_tenant("globex")).await;
    assert_eq!(x_cache, "MISS");
    assert!(body.contains("globex") && !body.contains("acme"), "{body}");
}

fn gunzip(data: &[u8]) -> String {
    use std::io::Read;
    let mut out = String::new();
    flate2::read::GzDecoder::new(data)
        .read_to_string(&mut out)
        .unwrap();
    out
}

fn unzstd(data: &[u8]) -> String {
    String::from_utf8(zstd::stream::decode_all(data).unwrap()).unwrap()
}

/// The body as the client reads it once it undid `content-encoding`.
fn decoded(headers: &HeaderMap, body: &[u8]) -> String {
    match headers.get("content-encoding").map(|v| v.to_str().unwrap()) {
        Some("gzip") => gunzip(body),
        Some("zstd") => unzstd(body),
        None => String::from_utf8(body.to_vec()).unwrap(),
        Some(other) => panic!("unexpected coding {other}"),
    }
}

async fn send_raw(app: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    (parts.status, parts.headers, body.to_vec())
}

/// An entry stored compressed goes as stored to a request that accepts its
/// coding (with its own ETag, `Vary: accept-encoding`, and a 304 on that
/// ETag), and decoded to the others; an outer `CompressionLayer` leaves an
/// encoded hit alone.
async fn compressed_entries_go_as_stored_to_clients_that_accept_them(backend: Backend) {
    use tower_http::compression::CompressionLayer;
    use tower_redis_cache::Coding;
    let large = common::large_json();
    for coding in [Coding::Gzip, Coding::Zstd] {
        let page = large.clone();
        let policy = Policy::builder()
            .store(backend.store.clone())
            .namespace(&format!("{coding:?}").to_ascii_lowercase())
            .compress_with(coding)
            .route(Route::get("/big").key("big"))
            .build()
            .unwrap();
        let name = match coding {
            Coding::Gzip => "gzip",
            _ => "zstd",
        };
        let handler = move || {
            let page = page.clone();
            async move { ([("content-type", "application/json")], page) }
        };
        let app = Router::new()
            .route("/big", get(handler))
            .layer(CacheLayer::new(policy));
        let (_, miss, body) = send_raw(&app, get_req("/big", &[])).await;
        assert_eq!(miss["x-cache"], "MISS");
        assert_eq!(decoded(&miss, &body), large);
        assert!(miss.get_all("vary").iter().any(|v| v == "accept-encoding"));
        let identity_etag = miss["etag"].to_str().unwrap().to_owned();

        let accepting = [("accept-encoding", "gzip, deflate, br, zstd")];
        let (_, hit, packed) = send_raw(&app, get_req("/big", &accepting)).await;
        assert_eq!(hit["x-cache"], "HIT");
        assert_eq!(hit["content-encoding"], name);
        assert_eq!(hit["content-length"], packed.len().to_string().as_str());
        assert!(
            packed.len() * 4 < large.len(),
            "{} bytes sent",
            packed.len()
        );
        assert_eq!(decoded(&hit, &packed), large);
        let coded_etag = hit["etag"].to_str().unwrap().to_owned();
        assert_ne!(coded_etag, identity_etag);
        assert!(hit.get_all("vary").iter().any(|v| v == "accept-encoding"));

        let (status, _, _) = send_raw(
            &app,
            get_req("/big", &[accepting[0], ("if-none-match", &coded_etag)]),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        let (_, plain, body) = send_raw(&app, get_req("/big", &[("accept-encoding", "br")])).await;
        assert_eq!(plain["x-cache"], "HIT");
        assert!(plain.get("content-encoding").is_none());
        assert_eq!(plain["etag"], identity_etag.as_str());
        assert_eq!(String::from_utf8(body).unwrap(), large);

        // An outer CompressionLayer leaves the encoded hit alone, and
        // compresses the decoded one itself.
        let outer = app.clone().layer(CompressionLayer::new());
        let (_, hit, packed) = send_raw(&outer, get_req("/big", &accepting)).await;
        assert_eq!(hit["content-encoding"], name);
        assert_eq!(decoded(&hit, &packed), large, "encoded twice");
    }
}

/// A `CompressionLayer` inside the cache: its gzip body is stored as is,
/// sent as stored to the clients that accept gzip and decoded for the
/// others.
async fn a_body_encoded_inside_the_cache_is_stored_in_its_coding(backend: Backend) {
    use tower_http::compression::CompressionLayer;
    let large = common::large_json();
    let page = large.clone();
    let rows = Rows::default();
    let calls = rows.calls.clone();
    let handler = move || {
        let page = page.clone();
        calls.fetch_add(1, Ordering::SeqCst);
        async move { ([("content-type", "application/json")], page) }
    };
    let policy = Policy::builder()
        .store(backend.store.clone())
        .route(Route::get("/big").key("inner-big"))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/big", get(handler))
        .layer(CompressionLayer::new())
        .layer(CacheLayer::new(policy));
    let gzip = [("accept-encoding", "gzip")];
    let (_, miss, body) = send_raw(&app, get_req("/big", &gzip)).await;
    assert_eq!(miss["x-cache"], "MISS");
    assert_eq!(miss["content-encoding"], "gzip");
    assert!(miss["cache-status"].to_str().unwrap().ends_with("; stored"));
    assert_eq!(decoded(&miss, &body), large);
    let (_, hit, body) = send_raw(&app, get_req("/big", &gzip)).await;
    assert_eq!(
        (
            hit["x-cache"].to_str().unwrap(),
            hit["content-encoding"].to_str().unwrap()
        ),
        ("HIT", "gzip")
    );
    assert_eq!(decoded(&hit, &body), large);
    let (_, plain, body) = send_raw(&app, get_req("/big", &[])).await;
    assert_eq!(plain["x-cache"], "HIT");
    assert!(plain.get("content-encoding").is_none());
    assert_eq!(String::from_utf8(body).unwrap(), large);
    assert_eq!(rows.calls.load(Ordering::SeqCst), 1);
}
