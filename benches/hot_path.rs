//! In-process cost of the cache layer: a hit and a miss through
//! `CacheLayer` with the memory store, against the bare handler.
//!
//! Run with `cargo bench --bench hot_path`.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_redis_cache::store::MemoryStore;
use tower_redis_cache::{CacheLayer, Policy, Route};

fn handler() -> impl Service<
    Request<()>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(|_req: Request<()>| async {
        let mut response =
            Response::new(Full::new(Bytes::from_static(br#"{"id":1,"name":"Ana"}"#)));
        response
            .headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        Ok::<_, Infallible>(response)
    })
}

fn policy(ttl: Duration) -> Policy {
    Policy::builder()
        .route(Route::get("/persons/{id}").key("person:{id}").ttl(ttl))
        .build()
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bare = handler();
    c.bench_function("bare handler", |b| {
        b.to_async(&runtime).iter(|| async {
            let response = bare
                .clone()
                .oneshot(Request::get("/persons/1").body(()).unwrap())
                .await
                .unwrap();
            response.into_body().collect().await.unwrap()
        })
    });

    let cached =
        CacheLayer::new(policy(Duration::from_secs(3600)), MemoryStore::new()).layer(handler());
    c.bench_function("hit, memory store", |b| {
        b.to_async(&runtime).iter(|| async {
            let response = cached
                .clone()
                .oneshot(Request::get("/persons/1").body(()).unwrap())
                .await
                .unwrap();
            response.into_body().collect().await.unwrap()
        })
    });

    let uncached =
        CacheLayer::new(policy(Duration::from_secs(3600)), MemoryStore::new()).layer(handler());
    let mut id = 0u64;
    c.bench_function("miss and store, memory store", |b| {
        b.to_async(&runtime).iter(|| {
            id += 1;
            let request = Request::get(format!("/persons/{id}")).body(()).unwrap();
            let service = uncached.clone();
            async move {
                service
                    .oneshot(request)
                    .await
                    .unwrap()
                    .into_body()
                    .collect()
                    .await
                    .unwrap()
            }
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
