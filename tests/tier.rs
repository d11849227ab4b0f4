//! The in-process tier (feature `tier`), over real Redis servers and
//! clusters, with two independent stacks as two processes would have: hits
//! cost no round trip, the writing process reads its own writes, other
//! processes see a write within the publish delay and never after the
//! route's bound, and a lost subscription drops the whole tier.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;
use common::{
    data_commands, get_req, method_req, revision, router, send_reading, Backend, Db, RedisServer,
    TEST_DEADLINE,
};
use tower::ServiceExt;
use tower_redis_cache::store::{
    CacheKey, Invalidation, Lookup, RedisSource, RedisStore, Store, StoreFuture, WatchTask, Watcher,
};
use tower_redis_cache::{CacheLayer, ConfigError, Policy, Route, Rule};

/// The two routes of the suites, both kept in process for `bound`.
fn policy(store: Arc<dyn Store>, bound: Duration) -> Result<Policy, ConfigError> {
    Policy::builder()
        .store(store)
        .route(
            Route::get("/persons/{id}")
                .key("person:{id}")
                .ttl(Duration::from_secs(60))
                .in_process(bound),
        )
        .route(
            Route::get("/persons")
                .key("persons:list:v{version}:{query_hash}")
                .versioned_by("persons:list")
                .ttl(Duration::from_secs(60))
                .in_process(bound),
        )
        .on(Rule::new("PATCH|DELETE /persons/{id}")
            .purge("GET /persons/{id}")
            .bump("persons:list"))
        .build()
}

/// One process: its stack over `store`, and its policy.
struct Process {
    app: axum::Router,
    policy: Policy,
}

impl Process {
    async fn new(store: Arc<dyn Store>, db: &Db, bound: Duration) -> Self {
        let policy = policy(store, bound).unwrap();
        let app = router(db.clone()).layer(CacheLayer::new(policy.clone()));
        let process = Self { app, policy };
        process.wait_live().await;
        process
    }

    /// Until the tier receives invalidations (it is unused before).
    async fn wait_live(&self) {
        let until = Instant::now() + Duration::from_secs(10);
        while !self.policy.handle().in_process().unwrap().live {
            assert!(Instant::now() < until, "the tier never subscribed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// (status, cache-status, body)
    async fn get(&self, uri: &str) -> (StatusCode, String, String) {
        send_reading(&self.app, get_req(uri), "cache-status").await
    }

    async fn patch(&self, uri: &str) {
        let response = self.app.clone().oneshot(method_req("PATCH", uri)).await;
        assert_eq!(response.unwrap().status(), StatusCode::OK);
    }

    fn in_process_hits(&self) -> u64 {
        let stats = self.policy.stats().snapshot();
        stats.iter().map(|r| r.in_process_hits).sum()
    }
}

const BOUND: Duration = Duration::from_secs(5);

async fn hits_after_the_first_cost_no_round_trip(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let a = Process::new(backend.store.clone(), &db, BOUND).await;
    for uri in ["/persons/1", "/persons?limit=5"] {
        let (_, status, _) = a.get(uri).await;
        assert!(status.contains("stored"), "{uri}: {status}");
    }
    let before = match &backend.server {
        Some(server) => Some(data_commands(server).await),
        None => None,
    };
    for _ in 0..50 {
        for uri in ["/persons/1", "/persons?limit=5"] {
            let (code, status, body) = a.get(uri).await;
            assert_eq!(code, StatusCode::OK);
            assert!(
                status.contains("hit") && status.contains("detail=in-process"),
                "{status}"
            );
            assert_eq!(revision(uri, &body), 1);
        }
    }
    assert_eq!(a.in_process_hits(), 100);
    assert_eq!(db.calls(), 2, "the handler ran for the two misses only");
    if let (Some(server), Some(before)) = (&backend.server, before) {
        let after = data_commands(server).await;
        // INFO itself is not counted among these.
        assert_eq!(
            after - before,
            0,
            "100 in-process hits sent commands to Redis"
        );
    }
}

async fn the_writer_reads_its_write_and_the_other_process_soon_after(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let writer = Process::new(backend.store.clone(), &db, BOUND).await;
    let reader = Process::new(backend.another_store(), &db, BOUND).await;
    for uri in ["/persons/1", "/persons?limit=5"] {
        for process in [&writer, &reader] {
            process.get(uri).await;
            let (_, status, _) = process.get(uri).await;
            assert!(status.contains("in-process"), "warm: {status}");
        }
    }
    writer.patch("/persons/1").await;
    for uri in ["/persons/1", "/persons?limit=5"] {
        let (_, status, body) = writer.get(uri).await;
        assert_eq!(
            revision(uri, &body),
            2,
            "{uri}: the writer read its own write ({status})"
        );
    }
    let until = Instant::now() + BOUND;
    for uri in ["/persons/1", "/persons?limit=5"] {
        loop {
            let (_, _, body) = reader.get(uri).await;
            if revision(uri, &body) == 2 {
                break;
            }
            assert!(Instant::now() < until, "{uri}: still old after the bound");
            tokio::task::yield_now().await;
        }
    }
}

/// A write whose future is dropped after its handler committed still
/// reaches every tier: the writer's own (the invalidation sent from the
/// dropped future evicts around it) and the other process's (published),
/// well before a bound of a minute.
async fn a_dropped_write_still_reaches_every_tier(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let bound = Duration::from_secs(60);
    let writer = Process::new(backend.store.clone(), &db, bound).await;
    let other = Process::new(backend.another_store(), &db, bound).await;
    for process in [&writer, &other] {
        for uri in ["/persons/1", "/persons?limit=1"] {
            process.get(uri).await;
            let (_, status, _) = process.get(uri).await;
            assert!(status.contains("in-process"), "warm: {status}");
        }
    }
    let write = writer
        .app
        .clone()
        .oneshot(method_req("PATCH", "/persons/1?slow=1"));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), write)
            .await
            .is_err(),
        "the client gave up while the handler was still running"
    );
    assert_eq!(db.revisions.lock().unwrap()["1"], 2, "the write committed");
    for process in [&writer, &other] {
        let until = Instant::now() + Duration::from_secs(2);
        loop {
            let (_, _, item) = process.get("/persons/1").await;
            let (_, _, list) = process.get("/persons?limit=1").await;
            if revision("/persons/1", &item) == 2 && revision("/persons?limit=1", &list) == 2 {
                break;
            }
            assert!(
                Instant::now() < until,
                "a tier still serves the pre-write entry"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

backend_tests!(
    hits_after_the_first_cost_no_round_trip,
    the_writer_reads_its_write_and_the_other_process_soon_after,
    a_dropped_write_still_reaches_every_tier,
);

/// Readers on both processes while the second writes: every read the
/// writing process starts after a write returned shows it (0 stale), and
/// the other process never shows a write older than the bound. Prints the
/// other process's stale reads within the publish delay.
async fn concurrent(backend: Backend) {
    let db = Db::default();
    db.set("1", 0);
    db.read_delay_us.store(300, Ordering::Relaxed);
    let bound = Duration::from_millis(500);
    let writer = Arc::new(Process::new(backend.store.clone(), &db, bound).await);
    let other = Arc::new(Process::new(backend.another_store(), &db, bound).await);
    // When each revision's write returned.
    let commits = Arc::new(std::sync::Mutex::new(vec![Instant::now()]));
    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (process, uri) in [
        (writer.clone(), "/persons/1"),
        (writer.clone(), "/persons?limit=10"),
        (other.clone(), "/persons/1"),
        (other.clone(), "/persons?limit=10"),
    ] {
        let (commits, done, reads) = (commits.clone(), done.clone(), reads.clone());
        let mine = Arc::ptr_eq(&process, &writer);
        tasks.push(tokio::spawn(async move {
            let (mut stale, mut late, mut n) = (0u64, 0u64, 0u64);
            while !done.load(Ordering::SeqCst) {
                let started = Instant::now();
                let floor = commits.lock().unwrap().len() as u64 - 1;
                let (code, _, body) = process.get(uri).await;
                assert_eq!(code, StatusCode::OK);
                let seen = revision(uri, &body);
                if seen < floor {
                    stale += 1;
                    // Past the bound after the write that made it stale.
                    let made_stale = commits.lock().unwrap()[seen as usize + 1];
                    if started.duration_since(made_stale) > bound {
                        late += 1;
                    }
                }
                n += 1;
                reads.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
            (mine, n, stale, late)
        }));
    }
    let mut rev = 0;
    while rev < 100 || reads.load(Ordering::Relaxed) < 3000 {
        rev += 1;
        writer.patch("/persons/1").await;
        commits.lock().unwrap().push(Instant::now());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    done.store(true, Ordering::SeqCst);
    let (mut writer_stale, mut other_stale, mut late, mut total) = (0, 0, 0, 0);
    for task in tasks {
        let (mine, n, stale, past) = task.await.unwrap();
        total += n;
        late += past;
        match mine {
            true => writer_stale += stale,
            false => other_stale += stale,
        }
    }
    let local = writer.in_process_hits() + other.in_process_hits();
    eprintln!(
        "{rev} writes, {total} reads ({local} in-process hits): writer stale {writer_stale}, \
         other process stale {other_stale} (within the publish delay), past the bound {late}"
    );
    assert!(local > 0, "the tier served some reads");
    assert_eq!(writer_stale, 0, "the writing process read old data");
    assert_eq!(late, 0, "a read past the bound was stale");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn concurrent_writes_redis() {
    concurrent(Backend::redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn concurrent_writes_cluster() {
    concurrent(Backend::cluster()).await;
}

/// How long after a write's response the other process stops serving the
/// old entry from its tier: it polls (each poll an in-process hit, a few
/// microseconds) until a read shows the write, and the delay runs to the
/// start of that read. Prints the percentiles; every delay must stay under
/// the bound.
async fn publish_delay(backend: Backend) {
    let db = Db::default();
    db.set("1", 0);
    let writer = Process::new(backend.store.clone(), &db, BOUND).await;
    let other = Process::new(backend.another_store(), &db, BOUND).await;
    // The reads and writes run on a thread of their own, so that the
    // runtime's workers idle as a server's do and handle each message as
    // it comes (a task polling in a loop would hold a worker).
    let runtime = tokio::runtime::Handle::current();
    let delays = tokio::task::spawn_blocking(move || {
        let mut delays = Vec::new();
        for rev in 1..=300u64 {
            for _ in 0..2 {
                runtime.block_on(other.get("/persons/1"));
            }
            runtime.block_on(writer.patch("/persons/1"));
            let written = Instant::now();
            loop {
                // Measured to the start of the read that shows the write:
                // the old entry was gone by then.
                let polled = Instant::now();
                let (_, _, body) = runtime.block_on(other.get("/persons/1"));
                if revision("/persons/1", &body) == rev {
                    delays.push(polled - written);
                    break;
                }
                // Published within a millisecond or two; waiting for
                // the bound (5 s) would mean the tier expired the entry
                // instead, 300 times over.
                assert!(
                    written.elapsed() < Duration::from_secs(1),
                    "not published: still old a second after the write"
                );
                // Spinning would take the core the subscriber needs.
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        delays
    })
    .await
    .unwrap();
    let mut delays = delays;
    delays.sort();
    let at = |q: f64| delays[((delays.len() as f64 * q) as usize).min(delays.len() - 1)];
    eprintln!(
        "publish delay over {} writes: p50 {:?}, p99 {:?}, max {:?}",
        delays.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn publish_delay_redis() {
    publish_delay(Backend::redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn publish_delay_cluster() {
    publish_delay(Backend::cluster()).await;
}

/// Invalidations published while a process's subscription was down never
/// reach it: its whole tier is dropped when the connection drops, and it
/// is used again only once subscribed again.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_lost_subscription_drops_the_tier() {
    let backend = Backend::redis();
    let server = backend.server.as_ref().unwrap();
    let db = Db::default();
    db.set("1", 1);
    let writer = Process::new(backend.store.clone(), &db, BOUND).await;
    let reader = Process::new(backend.another_store(), &db, BOUND).await;
    reader.get("/persons/1").await;
    let (_, status, _) = reader.get("/persons/1").await;
    assert!(status.contains("in-process"), "{status}");
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut server.raw().await)
        .await
        .unwrap();
    assert_eq!(killed, 2, "one subscription per process");
    // Published while nobody listens.
    writer.patch("/persons/1").await;
    let (_, status, body) = reader.get("/persons/1").await;
    assert_eq!(
        revision("/persons/1", &body),
        2,
        "served old data: {status}"
    );
    reader.wait_live().await;
    let (_, _, body) = reader.get("/persons/1").await;
    assert_eq!(revision("/persons/1", &body), 2);
}

/// A writer whose store publishes nothing (misconfigured, or an old
/// version): other processes still see its write once the route's bound
/// passed.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn an_unpublished_write_is_seen_once_the_bound_passed() {
    let server = RedisServer::start();
    let db = Db::default();
    db.set("1", 1);
    let bound = Duration::from_millis(300);
    let silent: Arc<dyn Store> = Arc::new(
        RedisStore::builder(server.url())
            .deadline(TEST_DEADLINE)
            .channel("")
            .build()
            .unwrap(),
    );
    let silent_writer = router(db.clone()).layer(CacheLayer::new(
        Policy::builder()
            .store(silent)
            .route(Route::get("/persons/{id}").key("person:{id}"))
            .on(Rule::new("PATCH /persons/{id}").purge("GET /persons/{id}"))
            .build()
            .unwrap(),
    ));
    let store = Arc::new(
        RedisStore::builder(server.url())
            .deadline(TEST_DEADLINE)
            .build()
            .unwrap(),
    );
    let reader = Process::new(store, &db, bound).await;
    reader.get("/persons/1").await;
    let filled = Instant::now();
    let response = silent_writer
        .oneshot(method_req("PATCH", "/persons/1"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (_, status, body) = reader.get("/persons/1").await;
    if filled.elapsed() < bound {
        assert!(status.contains("in-process"), "{status}");
        assert_eq!(
            revision("/persons/1", &body),
            1,
            "no message, so still the old entry"
        );
    }
    tokio::time::sleep(bound.saturating_sub(filled.elapsed())).await;
    let (_, status, body) = reader.get("/persons/1").await;
    assert_eq!(revision("/persons/1", &body), 2, "past the bound: {status}");
}

#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_tier_needs_a_store_that_publishes() {
    let server = RedisServer::start();
    let conn = server.raw().await;
    let err = policy(
        Arc::new(
            RedisStore::builder(RedisSource::connection(conn.clone()))
                .build()
                .unwrap(),
        ),
        BOUND,
    )
    .unwrap_err();
    assert!(matches!(err, ConfigError::InProcess { .. }), "{err}");
    assert!(err.to_string().contains("subscribe_via"), "{err}");
    let client = redis::Client::open(server.url()).unwrap();
    let store = RedisStore::builder(RedisSource::connection(conn))
        .subscribe_via([client])
        .build()
        .unwrap();
    assert!(policy(Arc::new(store), BOUND).is_ok());
    let silent = RedisStore::builder(server.url())
        .channel("")
        .build()
        .unwrap();
    assert!(policy(Arc::new(silent), BOUND).is_err());
    let zero = policy(
        Arc::new(tower_redis_cache::store::MemoryStore::new()),
        Duration::ZERO,
    );
    assert!(matches!(zero, Err(ConfigError::InProcess { .. })));
}

/// A store whose lookups, while `hold` is on, finish in Redis and then wait
/// for `release` before answering: a lookup that read an entry just before
/// a write, and lands just after it.
#[derive(Clone)]
struct Held {
    inner: Arc<dyn Store>,
    hold: Arc<AtomicBool>,
    waiting: Arc<AtomicU64>,
    release: Arc<tokio::sync::Semaphore>,
}

impl Store for Held {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn lookup(&self, key: &CacheKey) -> StoreFuture<Lookup> {
        let found = self.inner.lookup(key);
        let held = self.hold.load(Ordering::SeqCst);
        let (waiting, release) = (self.waiting.clone(), self.release.clone());
        Box::pin(async move {
            let found = found.await;
            if held {
                waiting.fetch_add(1, Ordering::SeqCst);
                let _ = release.acquire().await.map(|permit| permit.forget());
            }
            found
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

    fn watch(&self, watcher: Watcher) -> Option<WatchTask> {
        self.inner.watch(watcher)
    }
}

/// A lookup that found the pre-write entry in Redis and lands after the
/// write's invalidation reached this process answers with it (it started
/// first), but its entry is not kept in process: the next read shows the
/// write, though the bound is a minute.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_fill_that_raced_a_write_is_not_kept() {
    let backend = Backend::redis();
    let db = Db::default();
    db.set("1", 1);
    let bound = Duration::from_secs(60);
    let writer = Process::new(backend.store.clone(), &db, bound).await;
    let held = Held {
        inner: backend.another_store(),
        hold: Arc::default(),
        waiting: Arc::default(),
        release: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let reader = Arc::new(Process::new(Arc::new(held.clone()), &db, bound).await);
    let uris: [&'static str; 2] = ["/persons/1", "/persons?limit=5"];
    for uri in uris {
        let (_, status, _) = writer.get(uri).await;
        assert!(status.contains("stored"), "{uri}: {status}");
    }
    held.hold.store(true, Ordering::SeqCst);
    let racing: Vec<_> = uris
        .into_iter()
        .map(|uri| {
            let reader = reader.clone();
            tokio::spawn(async move { reader.get(uri).await })
        })
        .collect();
    while held.waiting.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    held.hold.store(false, Ordering::SeqCst);
    writer.patch("/persons/1").await;
    // The published invalidation reaches the reader within a millisecond
    // (`publish_delay_redis`); a late one fails this test, never passes it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    held.release.add_permits(2);
    for (uri, racing) in uris.iter().zip(racing) {
        let (_, status, body) = racing.await.unwrap();
        assert_eq!(
            revision(uri, &body),
            1,
            "{uri}: read before the write: {status}"
        );
    }
    for uri in uris {
        let (_, status, body) = reader.get(uri).await;
        assert_eq!(
            revision(uri, &body),
            2,
            "{uri}: kept the raced fill: {status}"
        );
        assert!(!status.contains("in-process"), "{uri}: {status}");
    }
}

/// A Redis that stops answering (frozen, or a link that died silently)
/// publishes nothing, so the tier cannot know what it missed: the failed
/// ping of its subscription drops the tier within two seconds, and a write
/// made meanwhile shows on the other process long before the bound.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_frozen_redis_drops_the_tier() {
    let backend = Backend::redis();
    let server = backend.server.as_ref().unwrap();
    let db = Db::default();
    db.set("1", 1);
    let bound = Duration::from_secs(60);
    let writer = Process::new(backend.store.clone(), &db, bound).await;
    let reader = Process::new(backend.another_store(), &db, bound).await;
    reader.get("/persons/1").await;
    let (_, status, _) = reader.get("/persons/1").await;
    assert!(status.contains("in-process"), "{status}");
    server.pause();
    writer.patch("/persons/1").await;
    let until = Instant::now() + Duration::from_secs(6);
    loop {
        let (_, status, body) = reader.get("/persons/1").await;
        if revision("/persons/1", &body) == 2 {
            assert!(!reader.policy.handle().in_process().unwrap().live);
            break;
        }
        assert!(
            Instant::now() < until,
            "still the pre-write entry: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.resume();
    reader.wait_live().await;
}

/// Subscribers of `channel` on the server behind `server`.
async fn subscribers(server: &RedisServer) -> i64 {
    let (_, count): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(tower_redis_cache::store::DEFAULT_CHANNEL)
        .query_async(&mut server.raw().await)
        .await
        .unwrap();
    count
}

/// Reads `/persons/1` on `process` until it shows `revision` (at most
/// `within`); whether it did.
async fn shows(process: &Process, revision_wanted: u64, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        let (_, _, body) = process.get("/persons/1").await;
        if revision("/persons/1", &body) == revision_wanted {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A master and its replica, the tier given both (the replica first): it
/// subscribes on the master, since a replica never hears what its master
/// publishes, and another process's write reaches it well before the
/// route's bound. When the two swap roles (a failover), the subscription
/// moves to the new master and the tier is live again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_tier_subscribes_on_the_master_and_follows_it() {
    let (first, second) = (RedisServer::start(), RedisServer::start());
    let replicaof = |of: Option<&RedisServer>| {
        let mut cmd = redis::cmd("REPLICAOF");
        match of {
            Some(master) => cmd.arg("127.0.0.1").arg(master.port),
            None => cmd.arg("NO").arg("ONE"),
        };
        cmd
    };
    let _: () = replicaof(Some(&first))
        .query_async(&mut second.raw().await)
        .await
        .unwrap();
    let client = |server: &RedisServer| redis::Client::open(server.url()).unwrap();
    let reader_store = RedisStore::builder(first.url())
        .subscribe_via([client(&second), client(&first)])
        .build()
        .unwrap();
    let db = Db::default();
    db.set("1", 1);
    let reader = Process::new(Arc::new(reader_store), &db, BOUND).await;
    assert_eq!(
        (subscribers(&first).await, subscribers(&second).await),
        (1, 0)
    );
    let writer = Process::new(
        Arc::new(RedisStore::builder(first.url()).build().unwrap()),
        &db,
        BOUND,
    )
    .await;
    reader.get("/persons/1").await;
    let (_, status, _) = reader.get("/persons/1").await;
    assert!(status.contains("in-process"), "{status}");
    writer.patch("/persons/1").await;
    assert!(
        shows(&reader, 2, BOUND / 2).await,
        "the write reached the reader's tier only through its bound"
    );

    // The roles swap: the subscription leaves the server that is now a
    // replica for the new master.
    let _: () = replicaof(None)
        .query_async(&mut second.raw().await)
        .await
        .unwrap();
    let _: () = replicaof(Some(&second))
        .query_async(&mut first.raw().await)
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while subscribers(&second).await == 0 {
        assert!(Instant::now() < until, "the subscription never moved");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(subscribers(&first).await, 0);
    reader.wait_live().await;
}
