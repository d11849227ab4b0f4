//! Never slower than no cache: a store that answers slowly, but inside its
//! deadline (Redis with 50 ms added to every reply), in process. A route
//! that hedges lets the handler answer once a lookup took as long as the
//! handler does; every answer is correct, and the breaker still opens on
//! the slow calls. Latencies are printed as figures, never asserted.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use common::{get_req, method_req, revision, router, send, Db};
use tokio::time::Instant;
use tower_redis_cache::store::{
    BreakerConfig, CacheKey, Circuit, Invalidation, Lookup, MemoryStore, Resilient, Store,
    StoreFuture,
};
use tower_redis_cache::{CacheLayer, Policy, Route, Rule};

/// A memory store whose every lookup answers `delay` late.
#[derive(Clone)]
struct Slow {
    inner: MemoryStore,
    delay: Duration,
}

impl Store for Slow {
    fn name(&self) -> &'static str {
        "slow"
    }

    fn lookup(&self, key: &CacheKey) -> StoreFuture<Lookup> {
        let (lookup, delay) = (self.inner.lookup(key), self.delay);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            lookup.await
        })
    }

    fn store(
        &self,
        key: &CacheKey,
        seen: &Lookup,
        value: Bytes,
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

fn app(store: Arc<dyn Store>, db: Db, hedge: bool) -> axum::Router {
    let mut route = Route::get("/persons/{id}")
        .key("person:{id}")
        .ttl(Duration::from_secs(60));
    if hedge {
        route = route.hedge();
    }
    let policy = Policy::builder()
        .store(store)
        .route(route)
        .on(Rule::new("PATCH /persons/{id}").purge("GET /persons/{id}"))
        .build()
        .unwrap();
    router(db).layer(CacheLayer::new(policy))
}

fn p99(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() * 99 / 100]
}

/// 200 reads (a write every 20), each checked against the record; the
/// p99 and how many the handler answered because the lookup was slow.
async fn reads(app: &axum::Router, db: &Db) -> (Duration, usize) {
    let (mut times, mut hedged) = (Vec::new(), 0);
    for i in 0..200 {
        if i % 20 == 0 {
            let (status, _, _) = send(app, method_req("PATCH", "/persons/1")).await;
            assert_eq!(status, StatusCode::OK);
        }
        let started = Instant::now();
        let response = tower::ServiceExt::oneshot(app.clone(), get_req("/persons/1"))
            .await
            .unwrap();
        let status = response
            .headers()
            .get("cache-status")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        times.push(started.elapsed());
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert_eq!(
            revision("/persons/1", &body),
            db.revisions.lock().unwrap()["1"],
            "{status}"
        );
        hedged += usize::from(status.contains("detail=hedged"));
    }
    (p99(times), hedged)
}

#[tokio::test]
async fn a_slow_store_never_makes_a_hedged_route_slower_than_no_cache() {
    let db = Db::default();
    db.set("1", 1);
    let slow = || Slow {
        inner: MemoryStore::new(),
        delay: Duration::from_millis(50),
    };
    // Without the breaker: every lookup slow, every request hedged.
    let (off, _) = reads(&router(db.clone()), &db).await;
    let (plain, plain_hedged) = reads(&app(Arc::new(slow()), db.clone(), false), &db).await;
    let (hedged_p99, hedged) = reads(&app(Arc::new(slow()), db.clone(), true), &db).await;
    eprintln!(
        "lookups +50 ms, 200 reads: p99 {off:?} without the cache, {plain:?} cached, \
         {hedged_p99:?} cached with hedge ({hedged} answered by the handler); goal <= 2 x off + 2 ms = {:?}",
        off * 2 + Duration::from_millis(2)
    );
    assert_eq!(plain_hedged, 0);
    assert_eq!(hedged, 200, "every lookup ran past the budget");

    // Behind the breaker, as a RedisStore is: the slow calls still open it.
    let store = Resilient::new(slow(), BreakerConfig::default());
    let (_, _) = reads(&app(Arc::new(store.clone()), db.clone(), true), &db).await;
    assert_eq!(
        store.health().circuit,
        Circuit::Open,
        "the slow calls were counted"
    );
}
