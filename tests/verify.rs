//! What an operator sees of consistency in production.
//!
//! Sampled verification of hits (`Route::verify`): a write that bypasses
//! every rule (here, the database changed directly) is found by a sampled
//! hit, counted with how long the entry had been stored, and healed; a hit
//! that matches the handler changes nothing. On the memory store, one
//! redis-server and a 3-master cluster.
//!
//! Write probes (`Rule::probe`): a confirmed write whose purge and bump
//! the store then lost (as a failover that loses them would) is found by
//! its probe 1 s and 10 s later; a write the store kept is counted
//! consistent; a probe writes nothing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::{get_req, method_req, revision, send, send_reading, Backend, Db};
use tower_redis_cache::store::Store;
use tower_redis_cache::{CacheLayer, ConfigError, Policy, ProbeStats, Route, RouteStats, Rule};

backend_tests!(
    a_write_outside_every_rule_is_found_by_a_sampled_hit_and_healed,
    a_list_changed_outside_every_rule_is_healed_too,
);

/// Every hit of both routes checked against the handler.
fn verifying(store: Arc<dyn Store>) -> Policy {
    Policy::builder()
        .store(store)
        .route(
            Route::get("/persons/{id}")
                .key("person:{id}")
                .ttl(Duration::from_secs(60))
                .verify(1.0),
        )
        .route(
            Route::get("/persons")
                .key("persons:list:v{version}:{query_hash}")
                .versioned_by("persons:list")
                .verify(1.0),
        )
        .on(Rule::new("PATCH /persons/{id}")
            .purge("GET /persons/{id}")
            .bump("persons:list"))
        .build()
        .unwrap()
}

fn app(store: Arc<dyn Store>, db: Db) -> (axum::Router, Policy) {
    let policy = verifying(store);
    (
        common::router(db).layer(CacheLayer::new(policy.clone())),
        policy,
    )
}

/// The route's counters once `done` holds of them (verifications run in
/// the background), within 10 s.
async fn stats_when(
    policy: &Policy,
    route: &str,
    done: impl Fn(&RouteStats) -> bool,
) -> RouteStats {
    for _ in 0..1000 {
        let stats = policy.stats().route(route).unwrap();
        if done(&stats) {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{route}: {:?}", policy.stats().route(route));
}

async fn a_write_outside_every_rule_is_found_by_a_sampled_hit_and_healed(backend: Backend) {
    const ROUTE: &str = "GET /persons/{id}";
    let db = Db::default();
    db.set("1", 1);
    let (app, policy) = app(backend.store.clone(), db.clone());
    assert_eq!(send(&app, get_req("/persons/1")).await.1, "MISS");
    let hit = send(&app, get_req("/persons/1")).await;
    assert_eq!(
        hit,
        (StatusCode::OK, "HIT".into(), r#"{"id":"1","rev":1}"#.into())
    );
    // The hit was checked: the same response, nothing counted or stored.
    let stats = stats_when(&policy, ROUTE, |s| s.verified == 1).await;
    assert_eq!((stats.verify_mismatches, stats.stores), (0, 1));
    assert_eq!(stats.last_mismatch, None);

    // The row changes behind the cache's back: no rule runs.
    db.set("1", 2);
    let stale = send(&app, get_req("/persons/1")).await;
    assert_eq!(stale.1, "HIT");
    assert_eq!(
        stale.2, r#"{"id":"1","rev":1}"#,
        "the sampled hit is served as cached"
    );
    let stats = stats_when(&policy, ROUTE, |s| {
        s.verify_mismatches == 1 && s.stores == 2
    })
    .await;
    assert!(stats.last_mismatch.is_some());
    // Stored just before: the entry was stale for less than a second.
    assert_eq!(stats.mismatch_staleness[0], (Duration::from_secs(1), 1));
    assert_eq!(
        stats.mismatch_staleness.iter().map(|(_, n)| n).sum::<u64>(),
        1
    );
    assert_eq!(stats.verify_match_ratio, Some(0.5), "{stats:?}");
    // Healed: every later hit is the new row.
    for _ in 0..3 {
        let fresh = send(&app, get_req("/persons/1")).await;
        assert_eq!(
            fresh,
            (StatusCode::OK, "HIT".into(), r#"{"id":"1","rev":2}"#.into())
        );
    }
    let stats = stats_when(&policy, ROUTE, |s| s.verified >= 3).await;
    assert_eq!(stats.verify_mismatches, 1, "{stats:?}");
    // Every check called the handler, counted as a verification (once
    // the checks under way have ended).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = policy.stats().route(ROUTE).unwrap();
    let verify_calls = stats
        .handler_calls
        .iter()
        .find(|(why, _)| *why == tower_redis_cache::HandlerCall::Verify)
        .map(|(_, n)| *n);
    assert_eq!(verify_calls, Some(stats.verified), "{stats:?}");
}

async fn a_list_changed_outside_every_rule_is_healed_too(backend: Backend) {
    const ROUTE: &str = "GET /persons";
    let db = Db::default();
    db.set("1", 1);
    let (app, policy) = app(backend.store.clone(), db.clone());
    send(&app, get_req("/persons")).await;
    assert_eq!(send(&app, get_req("/persons")).await.1, "HIT");
    stats_when(&policy, ROUTE, |s| s.verified == 1).await;
    db.set("2", 5);
    let stale = send(&app, get_req("/persons")).await;
    assert!(!stale.2.contains(r#"["2",5]"#), "{}", stale.2);
    stats_when(&policy, ROUTE, |s| {
        s.verify_mismatches == 1 && s.stores == 2
    })
    .await;
    let fresh = send(&app, get_req("/persons")).await;
    assert_eq!(fresh.1, "HIT");
    assert!(fresh.2.contains(r#"["2",5]"#), "{}", fresh.2);
}

#[test]
fn a_rate_outside_zero_to_one_is_a_config_error() {
    for rate in [-0.1, 1.5, f64::NAN] {
        let built = Policy::builder()
            .route(Route::get("/persons/{id}").key("person:{id}").verify(rate))
            .build();
        assert!(
            matches!(built, Err(ConfigError::VerifyRate { .. })),
            "{rate}: {built:?}"
        );
    }
    for rate in [0.0, 0.001, 1.0] {
        let built = Policy::builder()
            .route(Route::get("/persons/{id}").key("person:{id}").verify(rate))
            .build();
        assert!(built.is_ok(), "{rate}");
    }
}

#[test]
fn a_probe_rate_outside_zero_to_one_is_a_config_error() {
    let routes = || {
        Policy::builder().route(
            Route::get("/persons/{id}")
                .key("person:{id}")
                .ttl(Duration::from_secs(60)),
        )
    };
    let rule = || Rule::new("PATCH /persons/{id}").purge("GET /persons/{id}");
    for rate in [-0.1, 1.5, f64::NAN] {
        let by_rule = routes().on(rule().probe(rate)).build();
        let by_policy = routes().probe_writes(rate).on(rule()).build();
        for built in [by_rule, by_policy] {
            assert!(
                matches!(built, Err(ConfigError::ProbeRate { .. })),
                "{rate}: {built:?}"
            );
        }
    }
    // A rule's own rate overrides the policy's.
    let built = routes().probe_writes(2.0).on(rule().probe(0.5)).build();
    assert!(built.is_ok(), "{built:?}");
}

/// A writer whose every write is probed, and a reader, as two processes
/// over one Redis (or one cluster).
fn probing(writer: Arc<dyn Store>, reader: Arc<dyn Store>, db: &Db) -> [(axum::Router, Policy); 2] {
    [writer, reader].map(|store| {
        let policy = Policy::builder()
            .store(store)
            .probe_writes(1.0)
            .route(
                Route::get("/persons/{id}")
                    .key("person:{id}")
                    .ttl(Duration::from_secs(60)),
            )
            .route(
                Route::get("/persons")
                    .key("persons:list:v{version}:{query_hash}")
                    .versioned_by("persons:list"),
            )
            .on(Rule::new("PATCH /persons/{id}")
                .purge("GET /persons/{id}")
                .bump("persons:list"))
            .build()
            .unwrap();
        (
            common::router(db.clone()).layer(CacheLayer::new(policy.clone())),
            policy,
        )
    })
}

/// The write probes once `done` holds of them, within 15 s.
async fn probes_when(policy: &Policy, done: impl Fn(&ProbeStats) -> bool) -> ProbeStats {
    for _ in 0..1500 {
        let probes = policy.stats().probes();
        if done(&probes) {
            return probes;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{:?}", policy.stats().probes());
}

/// Raw commands on the server (or cluster) behind `backend`.
async fn raw(backend: &Backend, command: &redis::Cmd) -> redis::Value {
    match (&backend.server, &backend.cluster) {
        (Some(server), _) => command.query_async(&mut server.raw().await).await.unwrap(),
        (None, Some(cluster)) => command.query_async(&mut cluster.raw().await).await.unwrap(),
        (None, None) => unreachable!("a Redis backend"),
    }
}

const ENTRY: &str = "app:person:1";
const VERSION: &str = "{app:persons:list}:ver";

async fn a_write_probe_finds_what_the_store_lost(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let [(writer, probed), (reader, _)] =
        probing(backend.store.clone(), backend.another_store(), &db);
    assert_eq!(send(&reader, get_req("/persons/1")).await.1, "MISS");
    assert_eq!(send(&reader, get_req("/persons")).await.1, "MISS");
    assert_eq!(send(&reader, get_req("/persons/1")).await.1, "HIT");
    // What a failover that loses the write's invalidation brings back.
    let mut lost = Vec::new();
    for key in [ENTRY, VERSION] {
        lost.push(raw(&backend, redis::cmd("DUMP").arg(key)).await);
    }
    assert!(lost.iter().all(|v| *v != redis::Value::Nil), "{lost:?}");
    // Older than the probe's clock slack when the write comes.
    tokio::time::sleep(Duration::from_millis(150)).await;

    let write = send_reading(&writer, method_req("PATCH", "/persons/1"), "cache-status").await;
    assert!(write.1.contains("detail=invalidated"), "{write:?}");
    for (key, dump) in [ENTRY, VERSION].iter().zip(&lost) {
        let redis::Value::BulkString(dump) = dump else {
            panic!("{dump:?}")
        };
        let restore = redis::cmd("RESTORE")
            .arg(key)
            .arg(0)
            .arg(dump.as_slice())
            .arg("REPLACE")
            .clone();
        raw(&backend, &restore).await;
    }
    // The reader serves what the write replaced: the probe must say so.
    let stale = send(&reader, get_req("/persons/1")).await;
    assert_eq!(
        (stale.1.as_str(), revision("/persons/1", &stale.2)),
        ("HIT", 1)
    );

    // A second write the store keeps.
    db.set("2", 1);
    let write = send_reading(&writer, method_req("PATCH", "/persons/2"), "cache-status").await;
    assert!(write.1.contains("detail=invalidated"), "{write:?}");

    let probes = probes_when(&probed, |p| p.after_1s.consistent + p.after_1s.stale == 2).await;
    assert_eq!(
        (
            probes.after_1s.stale,
            probes.after_1s.consistent,
            probes.after_1s.unread
        ),
        (1, 1, 0),
        "{probes:?}"
    );
    let probes = probes_when(&probed, |p| p.after_10s.consistent + p.after_10s.stale == 2).await;
    assert_eq!(
        (
            probes.after_10s.stale,
            probes.after_10s.consistent,
            probes.after_10s.unread
        ),
        (1, 1, 0),
        "{probes:?}"
    );
}

async fn a_probe_writes_nothing(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let [(writer, probed), _] = probing(backend.store.clone(), backend.another_store(), &db);
    let write = send_reading(&writer, method_req("PATCH", "/persons/1"), "cache-status").await;
    assert!(write.1.contains("detail=invalidated"), "{write:?}");
    // The tombstone is gone (evicted): a lookup there would write a lease.
    backend.evict(ENTRY).await;
    let probes = probes_when(&probed, |p| p.after_1s.consistent == 1).await;
    assert_eq!(probes.after_1s.stale, 0);
    let exists = raw(&backend, redis::cmd("EXISTS").arg(ENTRY)).await;
    assert_eq!(exists, redis::Value::Int(0), "the probe wrote at {ENTRY}");
}

#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_write_probe_finds_what_one_node_lost() {
    a_write_probe_finds_what_the_store_lost(Backend::redis()).await;
}

#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_write_probe_finds_what_a_cluster_lost() {
    a_write_probe_finds_what_the_store_lost(Backend::cluster()).await;
}

#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_probe_writes_nothing_on_one_node() {
    a_probe_writes_nothing(Backend::redis()).await;
}

#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_probe_writes_nothing_on_a_cluster() {
    a_probe_writes_nothing(Backend::cluster()).await;
}

/// A restart from a snapshot taken before the write brings its bumped
/// version back down, but under a new server lifetime: nothing stored
/// before it is served, so the probe counts the write consistent, as the
/// readers see it.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_probe_across_a_restart_from_an_old_snapshot_counts_what_readers_see() {
    let backend = Backend::redis();
    // As the default user: a restart forgets the ACL user the backend's
    // stores log in as.
    let url = backend.server.as_ref().unwrap().url();
    let store = || -> Arc<dyn Store> {
        Arc::new(
            tower_redis_cache::store::RedisStore::builder(url.as_str())
                .build()
                .unwrap(),
        )
    };
    let db = Db::default();
    db.set("1", 1);
    let [(writer, probed), (reader, _)] = probing(store(), store(), &db);
    assert_eq!(send(&reader, get_req("/persons")).await.1, "MISS");
    assert_eq!(send(&reader, get_req("/persons")).await.1, "HIT");
    let old_version = raw(&backend, redis::cmd("GET").arg(VERSION)).await;
    backend.server.as_ref().unwrap().snapshot();
    let write = send_reading(&writer, method_req("PATCH", "/persons/1"), "cache-status").await;
    assert!(write.1.contains("detail=invalidated"), "{write:?}");
    // The probe reads the bumped version right after the write.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut backend = backend;
    backend.server.as_mut().unwrap().restart();
    assert_eq!(
        raw(&backend, redis::cmd("GET").arg(VERSION)).await,
        old_version,
        "the snapshot's version is back"
    );
    // Both processes meet the new server lifetime; the reader's old page
    // is not served.
    for app in [&writer, &reader] {
        let read = send(app, get_req("/persons")).await;
        assert_eq!(read.0, StatusCode::OK);
        assert_ne!(read.1, "HIT", "an entry of the old lifetime served");
    }
    // (The 1 s check may meet the reconnection and read nothing.)
    let probes = probes_when(&probed, |p| p.after_10s != Default::default()).await;
    assert_eq!(probes.after_1s.stale, 0, "{probes:?}");
    assert_eq!(
        (probes.after_10s.consistent, probes.after_10s.stale),
        (1, 0),
        "{probes:?}"
    );
}
