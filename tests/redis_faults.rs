//! What only a real Redis can do to us: stop, restart, hold keys of the
//! wrong type. Every response stays correct; none is a 5xx.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::{app, get_req, method_req, send, Db, RedisCluster, RedisServer};
use tower_redis_cache::store::{BreakerConfig, Circuit, RedisStore, Store, StoreError};
use tower_redis_cache::Reason;

/// Requests `/persons/1` until it is a hit (at most 5 s), asserting every
/// answer is a 200 with `body`: the cache came back without serving wrong data.
async fn until_hit(app: &axum::Router, body: &str) -> bool {
    for _ in 0..100 {
        let (status, x_cache, got) = send(app, get_req("/persons/1")).await;
        assert_eq!((status, got.as_str()), (StatusCode::OK, body), "{x_cache}");
        if x_cache == "HIT" {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn redis_app(server: &RedisServer, db: Db) -> axum::Router {
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::builder(server.url())
            .deadline(common::TEST_DEADLINE)
            .build()
            .unwrap(),
    );
    app(store, db).0
}

#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn redis_stopped_and_restarted_the_handler_answers_and_caching_resumes() {
    let mut server = RedisServer::start();
    let db = Db::default();
    db.set("1", 1);
    let app = redis_app(&server, db.clone());
    send(&app, get_req("/persons/1")).await;
    assert_eq!(send(&app, get_req("/persons/1")).await.1, "HIT");

    server.stop();
    db.set("1", 2);
    for _ in 0..3 {
        let (status, x_cache, body) = send(&app, get_req("/persons/1")).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, r#"{"id":"1","rev":2}"#)
        );
        assert_eq!(x_cache, "BYPASS");
    }
    assert_eq!(
        send(&app, method_req("PATCH", "/persons/1")).await.0,
        StatusCode::OK
    );

    server.restart();
    let resumed = until_hit(&app, r#"{"id":"1","rev":3}"#).await;
    assert!(
        resumed,
        "caching resumed after the restart, without a new store"
    );
}

#[tokio::test]
async fn a_building_layer_needs_no_running_redis() {
    // Nothing listens on port 1.
    let store: Arc<dyn Store> =
        Arc::new(RedisStore::builder("redis://127.0.0.1:1/").build().unwrap());
    let db = Db::default();
    db.set("1", 1);
    let (app, cache) = app(store, db);
    let (status, x_cache, _) = send(&app, get_req("/persons/1")).await;
    assert_eq!((status, x_cache.as_str()), (StatusCode::OK, "BYPASS"));
    assert_eq!(cache.stats().route("GET /persons/{id}").unwrap().errors, 1);
}

#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn wrong_redis_types_are_misses_and_get_overwritten() {
    let server = RedisServer::start();
    let db = Db::default();
    db.set("1", 1);
    let app = redis_app(&server, db.clone());
    wrong_types(&app, &mut server.raw().await).await;
}

#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn wrong_redis_types_on_a_cluster_are_misses_and_get_overwritten() {
    let cluster = RedisCluster::start();
    let db = Db::default();
    db.set("1", 1);
    let (app, _) = app(Arc::new(cluster.store()), db.clone());
    wrong_types(&app, &mut cluster.raw().await).await;
}

/// Keys of the wrong type where the cache reads and writes: misses, then
/// overwritten; a garbage version restarts the group.
async fn wrong_types(app: &axum::Router, raw: &mut impl redis::aio::ConnectionLike) {
    let _: () = redis::cmd("LPUSH")
        .arg("app:person:1")
        .arg("x")
        .query_async(raw)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("{app:persons:list}:ver")
        .arg("a")
        .arg("b")
        .query_async(raw)
        .await
        .unwrap();
    for uri in ["/persons/1", "/persons"] {
        let (status, x_cache, _) = send(app, get_req(uri)).await;
        assert_eq!(
            (status, x_cache.as_str()),
            (StatusCode::OK, "MISS"),
            "{uri}"
        );
        assert_eq!(send(app, get_req(uri)).await.1, "HIT", "{uri}");
    }
    // A bump over a garbage version string starts a fresh version.
    let _: () = redis::cmd("SET")
        .arg("{app:persons:list}:ver")
        .arg("garbage")
        .query_async(raw)
        .await
        .unwrap();
    assert_eq!(
        send(app, method_req("POST", "/persons?2")).await.0,
        StatusCode::CREATED
    );
    let (_, x_cache, body) = send(app, get_req("/persons")).await;
    assert_eq!(x_cache, "MISS");
    assert!(body.contains(r#"["2",1]"#), "{body}");
}

fn guarded_store(server: &RedisServer) -> RedisStore {
    RedisStore::builder(server.url())
        .deadline(Duration::from_millis(50))
        .breaker(
            BreakerConfig::default()
                .failure_threshold(3)
                .open_for(Duration::from_millis(300)),
        )
        .build()
        .unwrap()
}

#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn hung_redis_costs_the_deadline_then_nothing_and_lost_invalidations_replay() {
    let server = RedisServer::start();
    let store = guarded_store(&server);
    let db = Db::default();
    db.set("1", 1);
    let (app, cache) = app(Arc::new(store.clone()), db.clone());
    send(&app, get_req("/persons/1")).await;
    assert_eq!(send(&app, get_req("/persons/1")).await.1, "HIT");

    server.pause();
    // The first requests pay the deadline, then the circuit opens.
    for _ in 0..3 {
        let (status, x_cache, body) = send(&app, get_req("/persons/1")).await;
        assert_eq!(
            (status, x_cache.as_str(), body.as_str()),
            (StatusCode::OK, "BYPASS", r#"{"id":"1","rev":1}"#)
        );
    }
    assert_eq!(store.health().circuit, Circuit::Open);
    // A write while Redis hangs: it tries within its own budget (the open
    // circuit does not refuse it), then answers, saying its invalidation is
    // pending, kept for replay.
    let write = tower::ServiceExt::oneshot(app.clone(), method_req("PATCH", "/persons/1"))
        .await
        .unwrap();
    assert_eq!(write.status(), StatusCode::OK);
    assert_eq!(
        write.headers()["cache-status"],
        "tower-redis-cache; fwd=method; detail=invalidation-pending"
    );
    assert_eq!(cache.stats().invalidations().failed, 1);
    for _ in 0..20 {
        let (status, x_cache, body) = send(&app, get_req("/persons/1")).await;
        assert_eq!(
            (status, x_cache.as_str(), body.as_str()),
            (StatusCode::OK, "BYPASS", r#"{"id":"1","rev":2}"#)
        );
    }
    assert!(store.health().pending_invalidations > 0);
    // Reads are answered by the handler without a store call while the
    // write's invalidation waits for replay.
    let skips = cache.stats().route("GET /persons/{id}").unwrap().skips;
    assert!(
        skips.contains(&(Reason::PendingInvalidations, 20)),
        "{skips:?}"
    );

    // Redis answers again: the probe replays the lost invalidation before
    // anything is served, so the old entry (rev 1) never comes back.
    server.resume();
    let hit = until_hit(&app, r#"{"id":"1","rev":2}"#).await;
    assert!(hit, "caching resumed");
    assert_eq!(store.health().circuit, Circuit::Closed);
    assert_eq!(store.health().pending_invalidations, 0);
}

#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn client_kill_of_our_connection_reconnects() {
    let server = RedisServer::start();
    let mut raw = server.raw().await;
    let db = Db::default();
    db.set("1", 1);
    let app = redis_app(&server, db.clone());
    send(&app, get_req("/persons/1")).await;
    assert_eq!(send(&app, get_req("/persons/1")).await.1, "HIT");
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(killed >= 1);
    let hit = until_hit(&app, r#"{"id":"1","rev":1}"#).await;
    assert!(hit, "the connection came back by itself");
}

#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn client_kill_on_every_cluster_node_reconnects() {
    let cluster = RedisCluster::start();
    let db = Db::default();
    db.set("1", 1);
    let (app, _) = app(Arc::new(cluster.store()), db.clone());
    send(&app, get_req("/persons/1")).await;
    assert_eq!(send(&app, get_req("/persons/1")).await.1, "HIT");
    for port in &cluster.ports {
        let killed = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "client", "kill", "type", "normal"])
            .output()
            .unwrap();
        assert!(killed.status.success());
    }
    let hit = until_hit(&app, r#"{"id":"1","rev":1}"#).await;
    assert!(hit, "the cluster connection came back by itself");
}

#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn out_of_memory_writes_fail_without_stale_reads() {
    let server = RedisServer::start();
    let mut raw = server.raw().await;
    let db = Db::default();
    db.set("1", 1);
    db.set("2", 1);
    let store = RedisStore::builder(server.url())
        .deadline(common::TEST_DEADLINE)
        .build()
        .unwrap();
    let (app, cache) = app(Arc::new(store.clone()), db.clone());
    send(&app, get_req("/persons/1")).await;
    assert_eq!(send(&app, get_req("/persons/1")).await.1, "HIT");

    let config = |value: &'static str| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET").arg("maxmemory").arg(value);
        cmd
    };
    let _: () = config("1").query_async(&mut raw).await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut raw)
        .await
        .unwrap();

    // Writes fail with OOM: misses are answered, nothing is stored.
    for _ in 0..2 {
        let (status, x_cache, body) = send(&app, get_req("/persons/2")).await;
        assert_eq!(
            (status, x_cache.as_str(), body.as_str()),
            (StatusCode::OK, "MISS", r#"{"id":"2","rev":1}"#)
        );
    }
    assert_eq!(cache.stats().route("GET /persons/{id}").unwrap().stores, 1);
    // An invalidation fails too: until it is applied, nothing is served from
    // the cache, so the old entry of person 1 is never returned.
    assert_eq!(
        send(&app, method_req("PATCH", "/persons/1")).await.0,
        StatusCode::OK
    );
    for _ in 0..3 {
        let (status, x_cache, body) = send(&app, get_req("/persons/1")).await;
        assert_eq!(
            (status, x_cache.as_str(), body.as_str()),
            (StatusCode::OK, "BYPASS", r#"{"id":"1","rev":2}"#)
        );
    }
    assert_eq!(
        store.health().circuit,
        Circuit::Closed,
        "OOM is not an outage"
    );

    // Room again: the queued invalidation is replayed in the background,
    // then caching resumes, never with the old entry.
    let _: () = config("0").query_async(&mut raw).await.unwrap();
    assert!(until_hit(&app, r#"{"id":"1","rev":2}"#).await);
}

#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_wrong_password_opens_the_circuit_and_health_says_why() {
    let server = RedisServer::start();
    require_password(&server, "s3cret").await;
    let url = format!("redis://:wrong@127.0.0.1:{}/0", server.port);
    let store = RedisStore::builder(&url)
        .deadline(common::TEST_DEADLINE)
        .breaker(BreakerConfig::default().failure_threshold(3))
        .build()
        .unwrap();
    let db = Db::default();
    db.set("1", 1);
    let (app, policy) = app(Arc::new(store), db);
    for _ in 0..10 {
        let (status, x_cache, body) = send(&app, get_req("/persons/1")).await;
        assert_eq!((status, x_cache.as_str()), (StatusCode::OK, "BYPASS"));
        assert_eq!(body, r#"{"id":"1","rev":1}"#);
    }
    let stats = policy.stats().route("GET /persons/{id}").unwrap();
    assert_eq!(
        stats.errors, 3,
        "the store was tried until the circuit opened"
    );
    let skips: std::collections::HashMap<_, _> = stats.skips.into_iter().collect();
    assert_eq!(skips.get(&Reason::CircuitOpen), Some(&7));
    let health = policy.handle().health().await;
    assert_eq!(health.details.circuit, Circuit::Open);
    let error = health.error.unwrap();
    assert!(error.contains("credentials"), "{error}");
}

#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn connect_fails_fast_with_the_reason_and_succeeds_on_a_running_server() {
    let server = RedisServer::start();
    assert!(common::connected(&server.url()).await.is_ok());
    require_password(&server, "s3cret").await;
    let wrong = format!("redis://:wrong@127.0.0.1:{}/0", server.port);
    let denied = common::connected(&wrong).await.unwrap_err();
    assert!(matches!(denied, StoreError::Denied(_)), "{denied}");
    let right = format!("redis://:s3cret@127.0.0.1:{}/0", server.port);
    assert!(common::connected(&right).await.is_ok());
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let refused = common::connected(&format!("redis://127.0.0.1:{nobody}/0"))
        .await
        .unwrap_err();
    assert!(matches!(refused, StoreError::Unreachable(_)), "{refused}");
}

/// Makes `server` require `password` from new connections.
async fn require_password(server: &RedisServer, password: &str) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(password)
        .query_async(&mut server.raw().await)
        .await
        .unwrap();
}

/// Field `name` of the `section` of `INFO` on `conn`'s server.
async fn info_field(
    conn: &mut redis::aio::MultiplexedConnection,
    section: &str,
    name: &str,
) -> String {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn concurrent_lookups_go_out_in_few_batches_and_each_gets_its_own_reply() {
    const N: usize = 64;
    let server = RedisServer::start();
    let mut raw = server.raw().await;
    let db = Db::default();
    for id in 1..=N {
        db.set(&id.to_string(), id as u64 * 10);
    }
    let app = redis_app(&server, db.clone());
    for id in 1..=N {
        send(&app, get_req(&format!("/persons/{id}"))).await;
    }
    // One entry of the wrong type: its lookup fails inside the batch,
    // and the other lookups of that batch must not notice.
    let _: () = redis::cmd("DEL")
        .arg("app:person:7")
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: () = redis::cmd("LPUSH")
        .arg("app:person:7")
        .arg("x")
        .query_async(&mut raw)
        .await
        .unwrap();
    let calls = db.calls();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut raw)
        .await
        .unwrap();

    // Every request is runnable at once, as after one poll of many sockets.
    let requests = (1..=N).map(|id| {
        let app = app.clone();
        tokio::spawn(async move { (id, send(&app, get_req(&format!("/persons/{id}"))).await) })
    });
    let answers = futures_util::future::join_all(requests).await;

    let reads: u64 = info_field(&mut raw, "stats", "total_reads_processed")
        .await
        .parse()
        .unwrap();
    let reads = reads - 1; // this INFO
    let lookups = info_field(&mut raw, "commandstats", "cmdstat_set").await;
    for answer in answers {
        let (id, (status, x_cache, body)) = answer.unwrap();
        let expected = format!(r#"{{"id":"{id}","rev":{}}}"#, id * 10);
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, expected.as_str()),
            "/persons/{id}"
        );
        let expected_cache = if id == 7 { "MISS" } else { "HIT" };
        assert_eq!(x_cache, expected_cache, "/persons/{id}");
    }
    assert_eq!(
        db.calls() - calls,
        1,
        "only the entry of the wrong type was a miss"
    );
    // N lookups (`SET … NX GET`), and the `SET` in person 7's write.
    assert!(
        lookups.starts_with(&format!("calls={},", N + 1)),
        "{lookups}"
    );
    // One by one they would be up to N reads in Redis (N writes on our
    // side); the multiplexed connection writes what is queued together.
    // The bound leaves room for a loaded machine, where a write may be cut
    // short by a thread losing its core.
    assert!(
        reads <= N as u64 / 4,
        "{N} concurrent lookups took {reads} reads in Redis"
    );
}

/// Sequential requests over one node cost one round trip each, upkeep
/// included: the store's periodic re-reads (the server's epoch, its clock,
/// its replica count, every second) ride in the pipeline of a request's
/// command, so over 2.5 s of writes and hits Redis reads exactly one
/// batch per request.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn sequential_requests_cost_one_round_trip_each_upkeep_included() {
    const ROUNDS: u64 = 20;
    let server = RedisServer::start();
    let mut raw = server.raw().await;
    let db = Db::default();
    db.set("1", 1);
    db.set("2", 2);
    let app = redis_app(&server, db.clone());
    // Connected, scripts loaded, /persons/2 stored.
    assert_eq!(
        send(&app, method_req("PATCH", "/persons/1")).await.0,
        StatusCode::OK
    );
    assert_eq!(send(&app, get_req("/persons/2")).await.1, "MISS");
    assert_eq!(send(&app, get_req("/persons/2")).await.1, "HIT");
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut raw)
        .await
        .unwrap();
    let began = std::time::Instant::now();
    for round in 0..ROUNDS {
        let (status, detail, _) =
            common::send_reading(&app, method_req("PATCH", "/persons/1"), "cache-status").await;
        assert_eq!(status, StatusCode::OK, "round {round}");
        assert!(
            detail.contains("detail=invalidated"),
            "round {round}: {detail}"
        );
        assert_eq!(
            send(&app, get_req("/persons/2")).await.1,
            "HIT",
            "round {round}"
        );
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    let took = began.elapsed();
    let reads: u64 = info_field(&mut raw, "stats", "total_reads_processed")
        .await
        .parse()
        .unwrap();
    let upkeep = info_field(&mut raw, "commandstats", "cmdstat_time").await;
    assert!(
        took > Duration::from_secs(2),
        "the rounds span at least two upkeeps, one a second ({took:?})"
    );
    assert!(!upkeep.is_empty(), "the clock was read meanwhile");
    // One read per write and per hit; the last one is this INFO.
    assert_eq!(reads - 1, 2 * ROUNDS, "upkeep: {upkeep}");
}

/// The line of `CLIENT LIST` for the connection of `user`.
async fn connection_of(raw: &mut redis::aio::MultiplexedConnection, user: &str) -> Option<String> {
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(raw)
        .await
        .unwrap();
    clients
        .lines()
        .find(|line| line.contains(&format!(" user={user} ")))
        .map(str::to_owned)
}

/// The store's connection authenticates as the URL's user and selects the
/// URL's database: hits are read where the entries are written.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn the_store_connects_as_the_urls_user_on_its_database() {
    let server = RedisServer::start();
    let mut raw = server.raw().await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "app", "on", ">app-s3cret", "~*", "&*", "+@all"])
        .query_async(&mut raw)
        .await
        .unwrap();
    require_password(&server, "other").await;
    let url = format!("redis://app:app-s3cret@127.0.0.1:{}/3", server.port);
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::builder(&url)
            .deadline(common::TEST_DEADLINE)
            .build()
            .unwrap(),
    );
    let db = Db::default();
    db.set("1", 1);
    let (app, _) = app(store, db.clone());
    assert_eq!(send(&app, get_req("/persons/1")).await.1, "MISS");
    assert_eq!(send(&app, get_req("/persons/1")).await.1, "HIT");
    let line = connection_of(&mut raw, "app")
        .await
        .expect("the store's connection");
    assert!(line.contains(" user=app "), "{line}");
    assert!(line.contains(" db=3 "), "{line}");
    assert!(line.contains(" cmd=set "), "the hit was read here: {line}");
    let _: () = redis::cmd("SELECT")
        .arg(3)
        .query_async(&mut raw)
        .await
        .unwrap();
    let stored: bool = redis::cmd("EXISTS")
        .arg("app:person:1")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(stored, "the entry was written to database 3");
    // A list hit is one MGET on the same connection.
    send(&app, get_req("/persons")).await;
    assert_eq!(send(&app, get_req("/persons")).await.1, "HIT");
    let line = connection_of(&mut raw, "app")
        .await
        .expect("the store's connection");
    assert!(line.contains(" cmd=mget "), "{line}");
    assert_eq!(db.calls(), 2);
}

/// Requests dropped while their lookups are out (clients gone) leave
/// nothing behind on the lookup connection: every other request, then and
/// after, gets its own entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn dropped_lookups_never_hand_their_replies_to_other_requests() {
    const N: usize = 64;
    let server = RedisServer::start();
    let db = Db::default();
    for id in 1..=N {
        db.set(&id.to_string(), id as u64 * 10);
    }
    let app = redis_app(&server, db.clone());
    for id in 1..=N {
        send(&app, get_req(&format!("/persons/{id}"))).await;
    }
    let calls = db.calls();
    let body = |id: usize| format!(r#"{{"id":"{id}","rev":{}}}"#, id * 10);
    for round in 0..4 {
        let requests: Vec<_> = (1..=N)
            .map(|id| {
                let app = app.clone();
                tokio::spawn(async move { send(&app, get_req(&format!("/persons/{id}"))).await })
            })
            .collect();
        tokio::task::yield_now().await;
        for (i, request) in requests.iter().enumerate() {
            if i % 2 == 1 {
                request.abort();
            }
        }
        for (i, request) in requests.into_iter().enumerate() {
            let id = i + 1;
            match request.await {
                Ok((status, x_cache, got)) => {
                    assert_eq!((status, got), (StatusCode::OK, body(id)), "round {round}");
                    assert_eq!(x_cache, "HIT", "round {round}, /persons/{id}");
                }
                Err(err) => assert!(err.is_cancelled() && i % 2 == 1, "{err}"),
            }
        }
    }
    for id in 1..=N {
        let (status, x_cache, got) = send(&app, get_req(&format!("/persons/{id}"))).await;
        assert_eq!(
            (status, x_cache.as_str(), got),
            (StatusCode::OK, "HIT", body(id))
        );
    }
    assert_eq!(db.calls(), calls, "every request was a hit");
}
