//! The cache under the Redis users operators give it: the README's
//! least-privilege `ACL SETUSER` line as written, Redis's own advice
//! (`+@all -@dangerous`), and a user missing a permission the cache needs.
//! Two stacks (two processes) over one real `redis-server`, a writer on one
//! and a reader on the other; every read after a write is checked.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::{
    app, create_user, get_req, method_req, readme_acl, revision, send, user_url, Db, RedisServer,
    CACHE_USER,
};
use tower_redis_cache::store::{RedisStore, Store, StoreError};

/// Writes on `writer`, reads each write back twice on `reader` (a miss,
/// then a hit) for the item and the list; returns (hits, stale reads).
async fn writes_seen_across_processes(url: &str) -> (usize, usize, [Arc<dyn Store>; 2]) {
    let stores: [Arc<dyn Store>; 2] = [
        Arc::new(common::connected(url).await.expect("the user connects")),
        Arc::new(common::connected(url).await.expect("the user connects")),
    ];
    writes_seen_through(stores).await
}

async fn writes_seen_through(stores: [Arc<dyn Store>; 2]) -> (usize, usize, [Arc<dyn Store>; 2]) {
    let db = Db::default();
    db.set("1", 0);
    let (writer, _) = app(stores[0].clone(), db.clone());
    let (reader, _) = app(stores[1].clone(), db.clone());
    let (mut hits, mut stale) = (0, 0);
    for round in 1..=20u64 {
        let response =
            tower::ServiceExt::oneshot(writer.clone(), method_req("PATCH", "/persons/1"))
                .await
                .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let status = response.headers()["cache-status"].to_str().unwrap();
        assert!(status.contains("detail=invalidated"), "{status}");
        for uri in ["/persons/1", "/persons?limit=5"] {
            for _ in 0..2 {
                let (code, x_cache, body) = send(&reader, get_req(uri)).await;
                assert_eq!(code, StatusCode::OK, "{body}");
                hits += usize::from(x_cache == "HIT");
                stale += usize::from(revision(uri, &body) < round);
            }
        }
    }
    (hits, stale, stores)
}

/// The README's line exactly (namespace `app`, the test app's): hits,
/// invalidations across processes, no stale read, nothing degraded.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn the_readme_user_caches_and_invalidates() {
    let server = RedisServer::start();
    create_user(server.port, CACHE_USER, &readme_acl(), &[]);
    let (hits, stale, stores) =
        writes_seen_across_processes(&user_url(server.port, CACHE_USER)).await;
    eprintln!("README user: 80 reads after 20 writes, {hits} hits, {stale} stale");
    assert_eq!(stale, 0);
    assert_eq!(hits, 40, "every second read is a hit");
    let health = stores[1].health();
    assert_eq!(health.degraded, None);
    assert_eq!(health.persistence, Some("none"), "CONFIG GET is granted");
}

/// Redis's advice for application users denies `INFO` (and `CONFIG`):
/// the cache keeps serving and invalidating, without a server epoch, and
/// says so in its health.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_user_without_dangerous_commands_still_caches_and_says_what_it_lost() {
    let server = RedisServer::start();
    let rules = ["~*", "&*", "+@all", "-@dangerous"].map(str::to_owned);
    create_user(server.port, "app", &rules, &[]);
    let (hits, stale, stores) = writes_seen_across_processes(&user_url(server.port, "app")).await;
    eprintln!("+@all -@dangerous: 80 reads after 20 writes, {hits} hits, {stale} stale");
    assert_eq!(stale, 0);
    assert_eq!(hits, 40);
    let health = stores[0].health();
    let degraded = health.degraded.expect("health says what is lost");
    assert!(degraded.contains("INFO"), "{degraded}");
    assert_eq!(health.persistence, None, "CONFIG GET is denied");
}

/// A user without a permission the cache needs fails `connect` with the
/// command named.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_missing_permission_is_named_at_start_up() {
    let server = RedisServer::start();
    let rules: Vec<String> = readme_acl()
        .into_iter()
        .filter(|rule| rule != "+script|load")
        .collect();
    create_user(server.port, "partial", &rules, &[]);
    let err = common::connected(&user_url(server.port, "partial"))
        .await
        .expect_err("SCRIPT LOAD is denied");
    assert!(matches!(err, StoreError::Denied(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("no permissions") && message.contains("'script|load'"),
        "{message}"
    );
}

/// On a cluster, a user without the commands that only strengthen the
/// guarantee (`CLUSTER MYID`, `CLUSTER SHARDS`, `WAIT`) keeps caching and
/// invalidating, and health says what it lost.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_cluster_user_without_the_strengthening_commands_still_caches() {
    let cluster = common::RedisCluster::start();
    let optional = ["+cluster|myid", "+cluster|shards", "+wait"];
    let rules: Vec<String> = readme_acl()
        .into_iter()
        .filter(|rule| !optional.contains(&rule.as_str()))
        .collect();
    for port in &cluster.ports {
        create_user(*port, "narrow", &rules, &[]);
    }
    let store = || -> Arc<dyn Store> {
        let urls = cluster.ports.iter().map(|port| user_url(*port, "narrow"));
        Arc::new(
            RedisStore::builder(tower_redis_cache::store::RedisSource::cluster(urls))
                .build()
                .unwrap(),
        )
    };
    let (hits, stale, stores) = writes_seen_through([store(), store()]).await;
    eprintln!("cluster, no MYID/SHARDS/WAIT: 80 reads after 20 writes, {hits} hits, {stale} stale");
    assert_eq!(stale, 0);
    assert_eq!(hits, 40);
    let degraded = stores[0]
        .health()
        .degraded
        .expect("health says what is lost");
    assert!(degraded.contains("CLUSTER"), "{degraded}");
}
