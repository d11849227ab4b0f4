//! A miss whose handler streams its body (a large export, an upstream
//! relayed as it comes): the client gets the head and the first chunk
//! as they come, the whole body intact, and the next read is a hit; a
//! client that goes away mid-way stores nothing. On every store.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, Response};
use axum::routing::get;
use axum::Router;
use common::{send, Backend};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower_redis_cache::store::Store;
use tower_redis_cache::{CacheLayer, Policy, Route};

const CHUNKS: usize = 10;
const APART: Duration = Duration::from_millis(50);

/// `[0,1,…]` as JSON, one element per chunk, `APART` between chunks.
fn export(calls: Arc<AtomicUsize>) -> Response<Body> {
    calls.fetch_add(1, Ordering::SeqCst);
    let chunks = futures_util::stream::unfold(0, |i| async move {
        if i > CHUNKS {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(APART).await;
        }
        let chunk = match i {
            0 => "[".to_owned(),
            i if i == CHUNKS => format!("{}]", i - 1),
            i => format!("{},", i - 1),
        };
        Some((Ok::<_, std::io::Error>(chunk), i + 1))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(chunks))
        .unwrap()
}

fn whole() -> String {
    let items: Vec<String> = (0..CHUNKS).map(|i| i.to_string()).collect();
    format!("[{}]", items.join(","))
}

fn app(backend: &Backend, calls: Arc<AtomicUsize>) -> Router {
    let handler = move || {
        let calls = calls.clone();
        async move { export(calls) }
    };
    let policy = Policy::builder()
        .store(backend.store.clone())
        .route(
            Route::get("/export")
                .key("export")
                .ttl(Duration::from_secs(60)),
        )
        .build()
        .unwrap();
    Router::new()
        .route("/export", get(handler))
        .layer(CacheLayer::new(policy))
}

/// The time to the first body chunk, and the whole body.
async fn first_chunk_then_all(app: &Router) -> (Duration, String, String) {
    let started = Instant::now();
    let response = tower::ServiceExt::oneshot(
        app.clone(),
        Request::get("/export").body(Body::empty()).unwrap(),
    )
    .await
    .unwrap();
    let status = response
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let mut body = response.into_body();
    let mut all = Vec::new();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            first.get_or_insert_with(|| started.elapsed());
            all.extend_from_slice(&data);
        }
    }
    (first.unwrap(), status, String::from_utf8(all).unwrap())
}

async fn a_streamed_miss_reaches_the_client_as_it_comes(backend: Backend) {
    let calls = Arc::new(AtomicUsize::new(0));
    let bare = Router::new().route(
        "/export",
        get({
            let calls = calls.clone();
            move || {
                let calls = calls.clone();
                async move { export(calls) }
            }
        }),
    );
    let (without, _, _) = first_chunk_then_all(&bare).await;
    // A connection up, as on a server that has been serving.
    backend.store.ping().await.unwrap();
    let app = app(&backend, calls.clone());
    let (first, status, body) = first_chunk_then_all(&app).await;
    eprintln!(
        "first chunk: {first:?} through the cache, {without:?} without ({:.2}x); the whole body takes {:?}",
        first.as_secs_f64() / without.as_secs_f64().max(1e-6),
        APART * CHUNKS as u32
    );
    assert!(status.contains("detail=streamed"), "{status}");
    assert_eq!(body, whole(), "the body intact");
    // The entry is written once the body ended.
    let mut x_cache = String::new();
    for _ in 0..100 {
        let (_, seen, body) =
            send(&app, Request::get("/export").body(Body::empty()).unwrap()).await;
        x_cache = seen;
        if x_cache == "HIT" {
            assert_eq!(body, whole());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(x_cache, "HIT");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "once bare, once through the cache"
    );
}

async fn a_stream_the_client_dropped_stores_nothing(backend: Backend) {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = app(&backend, calls.clone());
    let response = tower::ServiceExt::oneshot(
        app.clone(),
        Request::get("/export").body(Body::empty()).unwrap(),
    )
    .await
    .unwrap();
    let mut body = response.into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    drop(body);
    tokio::time::sleep(APART * CHUNKS as u32).await;
    let (_, x_cache, _) = send(&app, Request::get("/export").body(Body::empty()).unwrap()).await;
    assert_eq!(x_cache, "MISS", "a cut body was stored");
}

backend_tests!(
    a_streamed_miss_reaches_the_client_as_it_comes,
    a_stream_the_client_dropped_stores_nothing,
);
