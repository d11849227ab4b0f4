//! Many tenants, one version group each: the versions a process remembers
//! are bounded, and a list hit stays one round trip for the groups read.
//! Exact Redis command counts against a real `redis-server`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::Request;
use common::{data_commands, RedisServer};
use tower_redis_cache::store::{CacheKey, RedisStore, Store};
use tower_redis_cache::{Policy, Route, Scope};

const TENANTS: usize = 10_000;

/// The list key of each of `TENANTS` tenants, each versioned per tenant.
fn tenant_list_keys(store: &RedisStore) -> Vec<CacheKey> {
    let policy = Policy::builder()
        .store(Arc::new(store.clone()))
        .route(
            Route::get("/persons")
                .key("persons:list:v{version}:{query_hash}")
                .versioned_by("persons:list")
                .per_scope()
                .scope(Scope::new().header("x-tenant-id"))
                .ttl(Duration::from_secs(60)),
        )
        .build()
        .unwrap();
    (0..TENANTS)
        .map(|tenant| {
            let request = Request::get("/persons?limit=5")
                .header("x-tenant-id", format!("tenant-{tenant}"))
                .body(())
                .unwrap();
            policy.key_for(&request).unwrap()
        })
        .collect()
}

/// Every tenant's list looked up once (versions created and learnt), then
/// again: the Redis commands of the second round, per lookup.
async fn commands_per_lookup(server: &RedisServer, store: RedisStore) -> f64 {
    let keys = tenant_list_keys(&store);
    for key in &keys {
        store.lookup(key).await.unwrap();
    }
    let before = data_commands(server).await;
    for key in &keys {
        store.lookup(key).await.unwrap();
    }
    let after = data_commands(server).await;
    (after - before) as f64 / TENANTS as f64
}

/// 10 000 tenants' groups (20 000 version keys: the group's and the
/// tenant's) fit the default: one `MGET` per list lookup. Before, the
/// remembered versions were cleared whole at 4 096 keys, and every lookup
/// paid a second command.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn ten_thousand_tenants_keep_one_command_per_list_lookup() {
    let server = RedisServer::start();
    let per_lookup =
        commands_per_lookup(&server, RedisStore::builder(server.url()).build().unwrap()).await;
    eprintln!("{TENANTS} tenants, default memory: {per_lookup:.3} commands per list lookup");
    assert_eq!(per_lookup, 1.0);
}

/// Remembering fewer groups than are read evicts some, never all at once:
/// the ones still remembered keep their one command.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_smaller_memory_costs_only_the_groups_it_forgot() {
    let server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .remembered_versions(TENANTS)
        .build()
        .unwrap();
    let per_lookup = commands_per_lookup(&server, store).await;
    eprintln!(
        "{TENANTS} tenants, memory of {TENANTS} keys: {per_lookup:.3} commands per list lookup"
    );
    assert!(per_lookup > 1.0 && per_lookup < 2.0, "{per_lookup}");
}
