//! The layer in a plain tower stack (no axum), with a `Buffer` under it:
//! the service `poll_ready` readied is the one called after the store lookup.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_redis_cache::store::MemoryStore;
use tower_redis_cache::{CacheLayer, Policy, Route};

#[tokio::test]
async fn works_over_a_buffer_of_one() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let handler = tower::service_fn(move |req: Request<()>| {
        let calls = counted.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let body = format!("{{\"path\":\"{}\"}}", req.uri().path());
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok::<_, Infallible>(response)
        }
    });
    let policy = Policy::builder()
        .store(MemoryStore::new())
        .route(
            Route::get("/items/{id}")
                .key("item:{id}")
                .ttl(Duration::from_secs(60)),
        )
        .build()
        .unwrap();
    let mut service = ServiceBuilder::new()
        .layer(CacheLayer::new(policy))
        .buffer(1)
        .service(handler);

    for round in 0..3 {
        for id in 0..4 {
            let uri = format!("/items/{id}");
            let response = service
                .ready()
                .await
                .unwrap()
                .call(Request::get(&uri).body(()).unwrap())
                .await
                .unwrap();
            let expected = if round == 0 { "MISS" } else { "HIT" };
            assert_eq!(
                response.headers()["x-cache"],
                expected,
                "{uri} round {round}"
            );
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, format!("{{\"path\":\"{uri}\"}}"));
        }
    }
    // Uncached paths go through the buffer too.
    let response = service
        .ready()
        .await
        .unwrap()
        .call(Request::get("/other").body(()).unwrap())
        .await
        .unwrap();
    assert!(response.headers().get("x-cache").is_none());
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}
