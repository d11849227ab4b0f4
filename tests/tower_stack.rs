//! The layer in a plain tower stack (no axum), with a `Buffer` under it:
//! the service `poll_ready` readied is the one called after the store lookup.

use http_body_util::Empty;
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
    let handler = tower::service_fn(move |req: Request<Empty<Bytes>>| {
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
                .call(Request::get(&uri).body(Empty::<Bytes>::new()).unwrap())
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
        .call(Request::get("/other").body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    assert!(response.headers().get("x-cache").is_none());
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

/// A memory store whose lookups, once `gate` is set, each wait until
/// `waiting` lookups are in flight at once.
#[derive(Clone)]
struct Gated {
    inner: tower_redis_cache::store::MemoryStore,
    gate: Arc<std::sync::atomic::AtomicBool>,
    barrier: Arc<tokio::sync::Barrier>,
}

impl tower_redis_cache::store::Store for Gated {
    fn name(&self) -> &'static str {
        "gated"
    }

    fn lookup(
        &self,
        key: &tower_redis_cache::store::CacheKey,
    ) -> tower_redis_cache::store::StoreFuture<tower_redis_cache::store::Lookup> {
        let found = self.inner.lookup(key);
        let (gate, barrier) = (self.gate.clone(), self.barrier.clone());
        Box::pin(async move {
            if gate.load(Ordering::SeqCst) {
                barrier.wait().await;
            }
            found.await
        })
    }

    fn store(
        &self,
        key: &tower_redis_cache::store::CacheKey,
        seen: &tower_redis_cache::store::Lookup,
        value: Bytes,
        ttl: Duration,
    ) -> tower_redis_cache::store::StoreFuture<bool> {
        self.inner.store(key, seen, value, ttl)
    }

    fn invalidate(
        &self,
        invalidation: &tower_redis_cache::store::Invalidation,
    ) -> tower_redis_cache::store::StoreFuture<()> {
        self.inner.invalidate(invalidation)
    }

    fn ping(&self) -> tower_redis_cache::store::StoreFuture<()> {
        self.inner.ping()
    }
}

/// Hits do not hold the inner service's readiness while the store answers:
/// under a `ConcurrencyLimit(1)`, four hits are in their lookups at once.
#[tokio::test]
async fn hits_do_not_hold_the_inner_service_while_the_store_answers() {
    const HITS: usize = 4;
    let store = Gated {
        inner: MemoryStore::new(),
        gate: Arc::default(),
        barrier: Arc::new(tokio::sync::Barrier::new(HITS)),
    };
    let handler = json_handler();
    let policy = Policy::builder()
        .store(store.clone())
        .route(Route::get("/items/{id}").key("item:{id}"))
        .build()
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(CacheLayer::new(policy))
        .concurrency_limit(1)
        .service(handler);
    let response = service
        .clone()
        .oneshot(
            Request::get("/items/1")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.headers()["x-cache"], "MISS");
    store.gate.store(true, Ordering::SeqCst);
    let hits = (0..HITS).map(|_| {
        let service = service.clone();
        tokio::spawn(async move {
            service
                .oneshot(
                    Request::get("/items/1")
                        .body(Empty::<Bytes>::new())
                        .unwrap(),
                )
                .await
                .unwrap()
        })
    });
    let all = futures_util::future::join_all(hits);
    let responses = tokio::time::timeout(Duration::from_secs(5), all)
        .await
        .expect("the hits' lookups ran at once, not one behind the other");
    for response in responses {
        assert_eq!(response.unwrap().headers()["x-cache"], "HIT");
    }
}

/// A handler answering `{}` as JSON.
fn json_handler() -> impl Service<
    Request<Empty<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
> + Clone {
    tower::service_fn(|_req: Request<Empty<Bytes>>| async {
        let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
        response
            .headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        Ok::<_, Infallible>(response)
    })
}

/// An in-process hit (feature `tier`) gives back the readiness it was
/// called with: under a `ConcurrencyLimit(1)`, a hit answered while its
/// service is kept does not keep the permit from the next request.
#[tokio::test]
async fn an_in_process_hit_holds_no_inner_capacity() {
    let policy = Policy::builder()
        .route(
            Route::get("/items/{id}")
                .key("item:{id}")
                .in_process(Duration::from_secs(60)),
        )
        .build()
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(CacheLayer::new(policy))
        .concurrency_limit(1)
        .service(json_handler());
    for _ in 0..2 {
        let request = Request::get("/items/1")
            .body(Empty::<Bytes>::new())
            .unwrap();
        service.clone().oneshot(request).await.unwrap();
    }
    let mut kept = service.clone();
    kept.ready().await.unwrap();
    let response = kept
        .call(
            Request::get("/items/1")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.headers()["cache-status"].to_str().unwrap();
    assert!(status.contains("in-process"), "{status}");
    let mut next = service.clone();
    tokio::time::timeout(Duration::from_secs(2), next.ready())
        .await
        .expect("the in-process hit kept the permit")
        .unwrap();
    drop(kept);
}
