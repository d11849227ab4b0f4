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
use common::http::http;
use common::{get_req, method_req, revision, router, send, send_reading, Db};
use tokio::time::Instant;
use tower_redis_cache::store::{
    BreakerConfig, CacheKey, Circuit, Invalidation, Lookup, MemoryStore, ReplayConfig, Resilient,
    Store, StoreFuture,
};
use tower_redis_cache::{CacheLayer, Policy, Route, Rule};

/// A memory store whose every lookup answers `delay` late: run at once
/// (a slow reply), or run itself `delay` late when `late` (a request slow
/// on its way to Redis: the lookup runs after the handler read).
#[derive(Clone)]
struct Slow {
    inner: MemoryStore,
    delay: Duration,
    late: bool,
}

impl Slow {
    fn new(delay: Duration) -> Self {
        Self {
            inner: MemoryStore::new(),
            delay,
            late: false,
        }
    }
}

impl Store for Slow {
    fn name(&self) -> &'static str {
        "slow"
    }

    fn lookup(&self, key: &CacheKey) -> StoreFuture<Lookup> {
        let (inner, key, delay) = (self.inner.clone(), key.clone(), self.delay);
        let now = (!self.late).then(|| inner.lookup(&key));
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            match now {
                Some(lookup) => lookup.await,
                None => inner.lookup(&key).await,
            }
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

/// A person (a plain key) and the list (versioned), hedged or not; a
/// `PATCH` purges the one and bumps the other.
fn app(store: Arc<dyn Store>, db: Db, hedge: bool) -> axum::Router {
    app_and_policy(store, db, hedge).0
}

fn app_and_policy(store: Arc<dyn Store>, db: Db, hedge: bool) -> (axum::Router, Policy) {
    let hedged = |route: Route| {
        if hedge {
            route.hedge()
        } else {
            route.no_hedge()
        }
    };
    let policy = Policy::builder()
        .store(store)
        .route(hedged(
            Route::get("/persons/{id}")
                .key("person:{id}")
                .ttl(Duration::from_secs(60)),
        ))
        .route(hedged(
            Route::get("/persons")
                .key("persons:list:v{version}")
                .versioned_by("persons:list")
                .ttl(Duration::from_secs(60)),
        ))
        .on(Rule::new("PATCH /persons/{id}")
            .purge("GET /persons/{id}")
            .bump("persons:list"))
        .build()
        .unwrap();
    (router(db).layer(CacheLayer::new(policy.clone())), policy)
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
        let (_, status, body) = send_reading(app, get_req("/persons/1"), "cache-status").await;
        times.push(started.elapsed());
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
    let slow = || Slow::new(Duration::from_millis(50));
    // Without the breaker: every lookup slow, every request hedged.
    let (off, _) = reads(&router(db.clone()), &db).await;
    let (plain, plain_hedged) = reads(&app(Arc::new(slow()), db.clone(), false), &db).await;
    let (hedging, policy) = app_and_policy(Arc::new(slow()), db.clone(), true);
    let (hedged_p99, hedged) = reads(&hedging, &db).await;
    eprintln!(
        "lookups +50 ms, 200 reads: p99 {off:?} without the cache, {plain:?} cached, \
         {hedged_p99:?} cached with hedge ({hedged} answered by the handler); goal <= 2 x off + 2 ms = {:?}",
        off * 2 + Duration::from_millis(2)
    );
    assert_eq!(plain_hedged, 0);
    assert_eq!(hedged, 200, "every lookup ran past the budget");
    // Within the budget: the route learns that every lookup takes 50 ms,
    // hedges within its budget meanwhile (one in 20 requests at most, none
    // in the first 32 lookups), then waits for the lookups.
    let budget = Policy::builder()
        .store(Arc::new(slow()))
        .route(
            Route::get("/persons/{id}")
                .key("person:{id}")
                .ttl(Duration::from_secs(60))
                .hedge_within_budget(),
        )
        .on(Rule::new("PATCH /persons/{id}").purge("GET /persons/{id}"))
        .build()
        .unwrap();
    let within = router(db.clone()).layer(CacheLayer::new(budget.clone()));
    let (_, budget_hedged) = reads(&within, &db).await;
    let calls = budget
        .stats()
        .route("GET /persons/{id}")
        .unwrap()
        .handler_calls;
    let from_hedges: u64 = calls
        .iter()
        .filter(|(why, _)| *why == tower_redis_cache::HandlerCall::Hedged)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(from_hedges as usize, budget_hedged);
    assert!(
        budget_hedged <= 200 / 20,
        "{budget_hedged} hedged within the budget"
    );
    let calls = policy
        .stats()
        .route("GET /persons/{id}")
        .unwrap()
        .handler_calls;
    assert_eq!(calls, [(tower_redis_cache::HandlerCall::Hedged, 200)]);

    // Behind the breaker, as a RedisStore is: the slow calls still open it.
    // This store's writes are quick (only its lookups are slow): the quick
    // purge every 20 reads closes the circuit, and an entry write admitted
    // as the probe would too, so the circuit stays open past the test and
    // is read once the hedged lookups still under way have ended.
    let breaker = BreakerConfig::default().open_for(Duration::from_secs(3600));
    let store = Resilient::new(slow(), breaker, ReplayConfig::default()).unwrap();
    let (_, _) = reads(&app(Arc::new(store.clone()), db.clone(), true), &db).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        store.health().circuit,
        Circuit::Open,
        "the slow calls were counted"
    );
}

/// The p99 of 300 sequential reads of one person (a rename every 30,
/// each read checked for the latest name) from the persons example with
/// `vars`, and how many said `detail=hedged`.
fn persons_reads(redis_url: &str, vars: &[(&str, &str)]) -> (Duration, usize) {
    let mut all = vec![("PERSONS_SEED", "20"), ("REDIS_URL", redis_url)];
    all.extend_from_slice(vars);
    let server = common::http::spawn("persons", "PERSONS_ADDR", &all);
    let auth = Some("Bearer demo-token-acme");
    let (mut times, mut hedged, mut name) = (Vec::new(), 0, String::new());
    for i in 0..300 {
        if i % 30 == 0 {
            name = format!("Ana {i}");
            let body = format!(r#"{{"name":"{name}"}}"#);
            let renamed = http(&server, "PATCH", "/persons/1", auth, Some(&body));
            assert_eq!(renamed.status, 200, "{}", renamed.body);
        }
        let started = std::time::Instant::now();
        let reply = http(&server, "GET", "/persons/1", auth, None);
        times.push(started.elapsed());
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(reply.body.contains(&name), "{name}: {}", reply.body);
        let status = reply.header("cache-status").unwrap_or("");
        hedged += usize::from(status.contains("detail=hedged"));
    }
    (p99(times), hedged)
}

/// The persons example over a Redis whose every reply comes 50 ms late
/// (a delaying proxy, inside the example's 100 ms deadline): without the
/// cache, cached, and cached with `CACHE_HEDGE=on`. Figures printed; every
/// answer checked.
#[test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
fn the_persons_example_over_a_slow_redis() {
    let redis = common::RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let slow = runtime.block_on(common::delaying_proxy(
        redis.port,
        Duration::ZERO,
        Duration::from_millis(50),
    ));
    let slow = format!("redis://127.0.0.1:{slow}/");
    let (off, _) = persons_reads(&slow, &[("CACHE", "off")]);
    let (never, never_hedged) = persons_reads(&slow, &[]);
    let (cached, budget_hedged) = persons_reads(&slow, &[("CACHE_HEDGE", "budget")]);
    let (hedged_p99, hedged) = persons_reads(&slow, &[("CACHE_HEDGE", "on")]);
    eprintln!(
        "persons, Redis replies +50 ms, 300 reads: p99 {off:?} with CACHE=off, {never:?} as \
         shipped, {cached:?} with CACHE_HEDGE=budget ({budget_hedged} hedged), \
         {hedged_p99:?} with CACHE_HEDGE=on ({hedged} hedged); goal <= 2 x off + 2 ms = {:?}",
        off * 2 + Duration::from_millis(2)
    );
    assert_eq!(never_hedged, 0);
    assert!(hedged > 0, "no lookup ran past the budget");
    // The budget: at most 1 in 20 reads, and none before 20 requests.
    assert!(
        budget_hedged <= 300 / 20,
        "{budget_hedged} hedged within the budget"
    );
}

/// A hedged miss whose lookup runs after a write's invalidation (it was
/// slow on its way): the handler read before the write, so its response
/// is not stored under what that lookup found (the write's tombstone).
#[tokio::test]
async fn a_hedged_miss_whose_lookup_ran_after_a_write_stores_nothing() {
    let db = Db::default();
    db.set("1", 1);
    let late = Slow {
        late: true,
        ..Slow::new(Duration::from_millis(100))
    };
    let memory = late.inner.clone();
    let hedged = app(Arc::new(late), db.clone(), true);
    // The handler answers once the lookup took 0.5 ms; the lookup runs at 100 ms.
    let (status, x_cache, body) = send(&hedged, get_req("/persons/1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(x_cache, "MISS");
    assert_eq!(revision("/persons/1", &body), 1);
    // The write lands, and invalidates, before that lookup runs.
    let (status, _, _) = send(&hedged, method_req("PATCH", "/persons/1")).await;
    assert_eq!(status, StatusCode::OK);
    let written = db.revisions.lock().unwrap()["1"];
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A process on the same store, with quick lookups: never the old read.
    let quick = app(Arc::new(memory), db.clone(), false);
    for _ in 0..2 {
        let (status, x_cache, body) = send(&quick, get_req("/persons/1")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(revision("/persons/1", &body), written, "{x_cache}: stale");
    }
}

/// A hedged miss of a versioned route (the list) still fills: the store
/// read its versions when the lookup was called, before the handler ran,
/// so the write is guarded by them. The next read through a quick store
/// is a HIT with the record.
#[tokio::test]
async fn a_hedged_miss_of_a_versioned_route_still_fills() {
    let db = Db::default();
    db.set("1", 1);
    let slow = Slow::new(Duration::from_millis(50));
    let memory = slow.inner.clone();
    let hedged = app(Arc::new(slow), db.clone(), true);
    let (status, x_cache, body) = send(&hedged, get_req("/persons")).await;
    assert_eq!((status, x_cache.as_str()), (StatusCode::OK, "MISS"));
    assert_eq!(revision("/persons", &body), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let quick = app(Arc::new(memory), db.clone(), false);
    let (status, x_cache, body) = send(&quick, get_req("/persons")).await;
    assert_eq!((status, x_cache.as_str()), (StatusCode::OK, "HIT"));
    assert_eq!(revision("/persons", &body), 1);
    assert_eq!(db.calls(), 1);
}

/// Two processes over one redis-server; A's requests reach Redis 100 ms
/// late (a slow link), so its hedged list lookups run after its handler
/// read. B writes between A's read and A's lookup: A's lookup reads the
/// bumped version, and A stores nothing (B reads the write, twice). With
/// no write in between, A's hedged fill is stored and B's next read is a
/// HIT with the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_hedged_list_read_stores_only_under_versions_current_before_its_handler() {
    let redis = common::RedisServer::start();
    let late = common::delaying_proxy(redis.port, Duration::from_millis(100), Duration::ZERO).await;
    let db = Db::default();
    db.set("1", 1);
    let open = |url: &str| {
        let store = tower_redis_cache::store::RedisStore::builder(url)
            .deadline(common::TEST_DEADLINE)
            .write_deadline(common::TEST_DEADLINE)
            .breaker(common::test_breaker())
            .build()
            .unwrap();
        Arc::new(store) as Arc<dyn Store>
    };
    let a = app(
        open(&format!("redis://127.0.0.1:{late}/")),
        db.clone(),
        true,
    );
    let b = app(open(&redis.url()), db.clone(), false);
    let list = |app: &axum::Router| {
        let app = app.clone();
        async move {
            let (status, x_cache, body) = send(&app, get_req("/persons")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            (x_cache, revision("/persons", &body))
        }
    };
    let settle = || tokio::time::sleep(Duration::from_secs(1));

    // A learns the list's version (a first lookup has nothing to compare).
    list(&a).await;
    settle().await;
    // A's handler reads revision 1; B's write lands before A's lookup runs.
    assert_eq!(list(&a).await.1, 1);
    let (status, _, _) = send(&b, method_req("PATCH", "/persons/1")).await;
    assert_eq!(status, StatusCode::OK);
    settle().await;
    for _ in 0..2 {
        let (x_cache, rev) = list(&b).await;
        assert_eq!(rev, 2, "{x_cache}: stale");
    }

    // No write in between: A's hedged fill is stored.
    let (status, _, _) = send(&b, method_req("PATCH", "/persons/1")).await;
    assert_eq!(status, StatusCode::OK);
    list(&a).await;
    settle().await;
    assert_eq!(list(&a).await.1, 3);
    settle().await;
    assert_eq!(list(&b).await, ("HIT".to_owned(), 3));
}
