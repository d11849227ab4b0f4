//! Web cache poisoning: a handler that reflects a request input the key
//! does not name, one client's odd request on a cold key, then a clean
//! client on the same path. The clean client never gets the odd input back,
//! on the memory store, a real `redis-server` and a real cluster. Each case
//! prints its name and what both clients got.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use common::Backend;
use tower::ServiceExt;
use tower_redis_cache::store::Store;
use tower_redis_cache::{CacheLayer, Policy, Route};

backend_tests!(
    no_odd_input_reaches_a_clean_client,
    per_client_headers_are_served_only_to_their_value,
    a_policy_that_names_its_hosts_bypasses_the_others,
);

const MARK: &str = "evil";

/// The inputs the reflecting handler echoes, besides its id.
const REFLECTED: [&str; 18] = [
    "host",
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-prefix",
    "x-forwarded-port",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-forwarded-uri",
    "x-host",
    "x-original-host",
    "x-url-scheme",
    "front-end-https",
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-method-override",
];

#[derive(Clone, Default)]
struct Calls(Arc<AtomicU64>);

/// Echoes what frameworks and servers read to build absolute URLs, route
/// or override a method: the host, forwarded and rewriting headers, the
/// query and the body.
async fn reflect(
    State(calls): State<Calls>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Json<serde_json::Value> {
    calls.0.fetch_add(1, Ordering::SeqCst);
    let mut echoed = serde_json::Map::new();
    for name in REFLECTED.iter().chain(["x-http-method"].iter()) {
        if let Some(value) = headers.get(*name) {
            echoed.insert((*name).to_owned(), value.to_str().unwrap_or("").into());
        }
    }
    Json(serde_json::json!({
        "id": id,
        "headers": echoed,
        "query": query,
        "body": String::from_utf8_lossy(&body),
    }))
}

/// Echoes a header that differs per client, and says so with `Vary`.
async fn per_client(
    State(calls): State<Calls>,
    Path((name, _)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    calls.0.fetch_add(1, Ordering::SeqCst);
    let value = headers
        .get(&name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut response = Json(serde_json::json!({ "seen": value })).into_response();
    response
        .headers_mut()
        .insert("vary", HeaderValue::from_str(&name).unwrap());
    response
}

fn app(store: Arc<dyn Store>, policy: tower_redis_cache::PolicyBuilder) -> Router {
    let policy = policy
        .store(store)
        .route(Route::get("/page/{id}").key("page:{id}"))
        .route(
            Route::get("/list/{id}")
                .key("list:{id}:{query_hash}")
                .query_allowlist(["limit"]),
        )
        .route(Route::get("/per-client/{name}/{id}").key("plain:{name}:{id}"))
        .route(
            Route::get("/vary/{name}/{id}")
                .key("vary:{name}:{id}")
                .vary_by(["origin", "referer", "user-agent"]),
        )
        .build()
        .unwrap();
    Router::new()
        .route("/page/{id}", get(reflect))
        .route("/list/{id}", get(reflect))
        .route("/per-client/{name}/{id}", get(per_client))
        .route("/vary/{name}/{id}", get(per_client))
        .with_state(Calls::default())
        .layer(CacheLayer::new(policy))
}

/// A request with `headers` (a clean one names host `api.example` only).
fn request(uri: &str, headers: &[(&str, &str)], body: &'static str) -> Request<Body> {
    let mut builder = Request::get(uri);
    if !headers.iter().any(|(n, _)| *n == "host") {
        builder = builder.header("host", "api.example");
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    if !body.is_empty() {
        builder = builder.header("content-length", body.len().to_string());
    }
    builder.body(Body::from(body)).unwrap()
}

async fn send(app: &Router, request: Request<Body>) -> (String, String) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// One case: the odd request's path and inputs, and the clean request's.
struct Case {
    name: String,
    path: String,
    odd: Vec<(String, String)>,
    clean: Vec<(String, String)>,
    body: &'static str,
    query: &'static str,
    /// The odd request's URI is absolute (`http://api.example/…`).
    absolute: bool,
}

fn cases() -> Vec<Case> {
    let header = |name: &str, value: &str| Case {
        name: format!("{name}: {value}"),
        path: "/page".into(),
        odd: vec![(name.into(), value.into())],
        clean: vec![],
        body: "",
        query: "",
        absolute: false,
    };
    let mut cases = vec![Case {
        name: "host: evil.example (clean: api.example)".into(),
        path: "/page".into(),
        odd: vec![("host".into(), "evil.example".into())],
        clean: vec![],
        body: "",
        query: "",
        absolute: false,
    }];
    cases.push(Case {
        name: "absolute URI http://api.example with host: evil.example".into(),
        path: "/page".into(),
        odd: vec![("host".into(), "evil.example".into())],
        clean: vec![],
        body: "",
        query: "",
        absolute: true,
    });
    for name in &REFLECTED[2..14] {
        cases.push(header(name, "evil.example"));
    }
    cases.push(header(
        "forwarded",
        "for=1.2.3.4;host=evil.example;proto=https",
    ));
    cases.push(header("forwarded", "proto=evil"));
    for name in [
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ] {
        cases.push(header(name, "/evil"));
    }
    cases.push(Case {
        name: "?callback=evil outside the allowlist [limit]".into(),
        path: "/list".into(),
        odd: vec![],
        clean: vec![],
        body: "",
        query: "limit=5&callback=evil",
        absolute: false,
    });
    cases.push(Case {
        name: "GET with a body".into(),
        path: "/page".into(),
        odd: vec![],
        clean: vec![],
        body: "evil body",
        query: "",
        absolute: false,
    });
    cases
}

async fn no_odd_input_reaches_a_clean_client(backend: Backend) {
    let app = app(backend.store.clone(), Policy::builder());
    let mut poisoned = Vec::new();
    for (id, case) in cases().into_iter().enumerate() {
        let query = match case.query {
            "" => String::new(),
            q => format!("?{q}"),
        };
        let origin = if case.absolute {
            "http://api.example"
        } else {
            ""
        };
        let odd_uri = format!("{origin}{}/{id}{query}", case.path);
        let clean_query = if case.query.is_empty() {
            ""
        } else {
            "?limit=5"
        };
        let clean_uri = format!("{}/{id}{clean_query}", case.path);
        let pairs = |p: &[(String, String)]| -> Vec<(String, String)> { p.to_vec() };
        let odd: Vec<(&str, &str)> = pairs(&case.odd)
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|(n, v)| (leak(n), leak(v)))
            .collect();
        let clean: Vec<(&str, &str)> = case.clean.iter().map(|(n, v)| (leak(n), leak(v))).collect();
        let (odd_status, _) = send(&app, request(&odd_uri, &odd, case.body)).await;
        let (clean_status, clean_body) = send(&app, request(&clean_uri, &clean, "")).await;
        let bad = clean_body.contains(MARK);
        eprintln!(
            "{} | odd: {odd_status} | clean: {clean_status} | {}",
            case.name,
            if bad { "POISONED" } else { "ok" }
        );
        if bad {
            poisoned.push(case.name);
        }
    }
    assert!(
        poisoned.is_empty(),
        "clean clients got odd inputs: {poisoned:?}"
    );
}

fn leak(text: &str) -> &'static str {
    Box::leak(text.to_owned().into_boxed_str())
}

/// Headers that differ per client cannot be keyed without ruining the hit
/// ratio: a handler that reflects one says so with `Vary`. Such a response
/// is stored as a variant (a route that varies on it) or not at all, and
/// never served to another value.
async fn per_client_headers_are_served_only_to_their_value(backend: Backend) {
    let app = app(backend.store.clone(), Policy::builder());
    let mut poisoned = Vec::new();
    for (id, name) in ["origin", "referer", "user-agent"].into_iter().enumerate() {
        for prefix in ["per-client", "vary"] {
            let uri = format!("/{prefix}/{name}/{id}");
            let (odd_status, _) =
                send(&app, request(&uri, &[(name, "https://evil.example")], "")).await;
            let (clean_status, clean_body) =
                send(&app, request(&uri, &[(name, "https://good.example")], "")).await;
            let (again, _) = send(&app, request(&uri, &[(name, "https://good.example")], "")).await;
            let bad = clean_body.contains(MARK);
            eprintln!(
                "{name} on /{prefix} | odd: {odd_status} | clean: {clean_status} | clean again: {again} | {}",
                if bad { "POISONED" } else { "ok" }
            );
            if bad {
                poisoned.push(format!("{name} on /{prefix}"));
            }
            match prefix {
                "vary" => assert!(again.contains("; hit"), "{again}"),
                _ => assert!(odd_status.ends_with("detail=vary"), "{odd_status}"),
            }
        }
    }
    // A cookie on a route with no scope is never served from a shared entry.
    let (status, _) = send(
        &app,
        request("/page/cookie", &[("cookie", "session=evil")], ""),
    )
    .await;
    assert_eq!(
        status,
        "tower-redis-cache; fwd=bypass; detail=authorization"
    );
    assert!(poisoned.is_empty(), "{poisoned:?}");
}

async fn a_policy_that_names_its_hosts_bypasses_the_others(backend: Backend) {
    let app = app(
        backend.store.clone(),
        Policy::builder().hosts(["api.example"]),
    );
    let (status, _) = send(&app, request("/page/1", &[("host", "evil.example")], "")).await;
    assert_eq!(status, "tower-redis-cache; fwd=bypass; detail=host");
    let (first, _) = send(&app, request("/page/1", &[("host", "API.example:80")], "")).await;
    let (second, body) = send(&app, request("/page/1", &[], "")).await;
    assert!(first.ends_with("; stored"), "{first}");
    assert!(second.contains("; hit"), "{second}");
    assert!(!body.contains(MARK));
}

/// Two processes over one Redis (two independent stores and layers): an
/// odd request on one, then clean ones on the other, and the other way
/// round. The binding travels with the entry, so no process serves
/// another's odd response.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn no_odd_input_crosses_processes() {
    let server = common::RedisServer::start();
    let process = || {
        let store = tower_redis_cache::store::RedisStore::builder(server.url())
            .deadline(common::TEST_DEADLINE)
            .breaker(common::test_breaker())
            .build()
            .unwrap();
        app(Arc::new(store), Policy::builder())
    };
    let (a, b) = (process(), process());
    let mut poisoned = Vec::new();
    for (id, case) in cases().into_iter().enumerate() {
        let query = match case.query {
            "" => String::new(),
            q => format!("?{q}"),
        };
        let clean_query = if case.query.is_empty() {
            ""
        } else {
            "?limit=5"
        };
        let odd: Vec<(&str, &str)> = case.odd.iter().map(|(n, v)| (leak(n), leak(v))).collect();
        for (writer, reader) in [(&a, &b), (&b, &a)] {
            let origin = if case.absolute {
                "http://api.example"
            } else {
                ""
            };
            let odd_uri = format!("{origin}{}/{id}{query}", case.path);
            let clean_uri = format!("{}/{id}{clean_query}", case.path);
            let _ = send(writer, request(&odd_uri, &odd, case.body)).await;
            for _ in 0..2 {
                let (_, body) = send(reader, request(&clean_uri, &[], "")).await;
                if body.contains(MARK) {
                    poisoned.push(case.name.clone());
                }
            }
        }
    }
    eprintln!(
        "two processes: {} cases, poisoned: {poisoned:?}",
        cases().len()
    );
    assert!(poisoned.is_empty(), "{poisoned:?}");
}
