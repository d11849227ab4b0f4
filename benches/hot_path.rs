//! In-process cost of the cache layer: policy match with key rendering,
//! and a hit (with and without sampled verification) and a miss through
//! `CacheLayer` with the memory store, against the bare handler.
//!
//! Run with `cargo bench --bench hot_path` (`--features tier` adds a hit
//! from the in-process tier).

use http_body_util::Empty;
use std::time::Duration;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::Request;
use http_body_util::BodyExt;
use tower::{Layer, ServiceExt};
mod support;
use support::handler;
use tower_redis_cache::{CacheLayer, Policy, Route, Rule};

fn policy(ttl: Duration) -> Policy {
    Policy::builder()
        .route(Route::get("/persons/{id}").key("person:{id}").ttl(ttl))
        .build()
        .unwrap()
}

fn pieces(c: &mut Criterion) {
    let policy = Policy::builder()
        .route(Route::get("/persons/{id}").key("person:{id}"))
        .route(
            Route::get("/persons")
                .key("persons:list:v{version}:{query_hash}")
                .versioned_by("persons:list")
                .query_allowlist(["limit", "skip", "name", "email", "sort"]),
        )
        .build()
        .unwrap();
    let item = Request::get("/persons/42")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let list = Request::get("/persons?sort=-name&name=Ana&limit=20&utm=x")
        .body(Empty::<Bytes>::new())
        .unwrap();
    c.bench_function("policy match + item key", |b| {
        b.iter(|| policy.key_for(black_box(&item)))
    });
    c.bench_function("policy match + list key (query hash)", |b| {
        b.iter(|| policy.key_for(black_box(&list)))
    });
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bare = handler();
    c.bench_function("bare handler", |b| {
        b.to_async(&runtime).iter(|| get_one(&bare))
    });

    let cached = CacheLayer::new(policy(Duration::from_secs(3600))).layer(handler());
    c.bench_function("hit, memory store", |b| {
        b.to_async(&runtime).iter(|| get_one(&cached))
    });

    // The same hit with the layer on an axum `Router` (`MatchedPath`,
    // `OriginalUri` on the request), beside the bare router.
    let router = || {
        axum::Router::new().route(
            "/persons/{id}",
            axum::routing::get(|| async {
                (
                    [("content-type", "application/json")],
                    r#"{"id":1,"name":"Ana"}"#,
                )
            }),
        )
    };
    let bare_router = router();
    c.bench_function("bare axum router", |b| {
        b.to_async(&runtime).iter(|| get_one(&bare_router))
    });
    let cached_router = router().layer(CacheLayer::new(policy(Duration::from_secs(3600))));
    c.bench_function("hit, memory store, axum router", |b| {
        b.to_async(&runtime).iter(|| get_one(&cached_router))
    });

    // A hit on a route that checks every hit against the handler, beside
    // the same hit on a route that checks none, back to back on a
    // two-thread runtime (as in a server): the checks run beside the hits.
    let threads = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // With write probes on too (they run after writes, never on a hit).
    for (label, rate, probes) in [
        ("off", 0.0, 0.0),
        ("every hit", 1.0, 0.0),
        ("0.001, write probes on", 0.001, 1.0),
    ] {
        let policy = Policy::builder()
            .probe_writes(probes)
            .route(
                Route::get("/persons/{id}")
                    .key("person:{id}")
                    .ttl(Duration::from_secs(3600))
                    .verify(rate),
            )
            .on(Rule::new("PATCH /persons/{id}").purge("GET /persons/{id}"))
            .build()
            .unwrap();
        let cached = CacheLayer::new(policy).layer(handler());
        c.bench_function(&format!("hit, memory store, verification {label}"), |b| {
            b.to_async(&threads).iter(|| get_one(&cached))
        });
    }

    // The same hit from the in-process tier (over the memory store, which
    // reports its invalidations at once): what a Redis-backed route kept in
    // process costs per hit.
    #[cfg(feature = "tier")]
    {
        let policy = Policy::builder()
            .route(
                Route::get("/persons/{id}")
                    .key("person:{id}")
                    .ttl(Duration::from_secs(3600))
                    .in_process(Duration::from_secs(3600)),
            )
            .build()
            .unwrap();
        let tiered = CacheLayer::new(policy).layer(handler());
        c.bench_function("hit, in-process tier", |b| {
            b.to_async(&runtime).iter(|| get_one(&tiered))
        });
    }

    let uncached = CacheLayer::new(policy(Duration::from_secs(3600))).layer(handler());
    let mut id = 0u64;
    c.bench_function("miss and store, memory store", |b| {
        b.to_async(&runtime).iter(|| {
            id += 1;
            let request = Request::get(format!("/persons/{id}"))
                .body(Empty::<Bytes>::new())
                .unwrap();
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

/// One `GET /persons/1` through `service`, its body read. With a `Host`, as
/// every request a server hands on carries one (entries are bound to it).
async fn get_one<S, B>(service: &S) -> Bytes
where
    S: tower::Service<Request<Empty<Bytes>>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let request = Request::get("/persons/1")
        .header("host", "api.example.com")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = service.clone().oneshot(request).await.unwrap();
    response.into_body().collect().await.unwrap().to_bytes()
}

criterion_group!(benches, pieces, bench);
criterion_main!(benches);
