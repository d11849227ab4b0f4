//! Writes that reads see late: a source whose reads lag its writes (a read
//! replica behind its primary). A read right after the write's response
//! fetches the old row and stores it under a valid guard; only
//! `Rule::again_after` removes it before its TTL. On the memory store and
//! a real `redis-server`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use common::{get_req, method_req, send, RedisServer};
use tokio::time::Instant;
use tower_redis_cache::store::{MemoryStore, RedisStore, Store};
use tower_redis_cache::{CacheLayer, Policy, Route, Rule};

/// How far the reads lag the writes.
const LAG: Duration = Duration::from_millis(300);

/// One row whose writes reach the reads `LAG` later, as through a replica.
#[derive(Clone, Default)]
struct LaggingRow {
    /// (revision, readable from).
    versions: Arc<Mutex<Vec<(u64, Instant)>>>,
}

impl LaggingRow {
    fn read(&self) -> u64 {
        let versions = self.versions.lock().unwrap();
        let now = Instant::now();
        versions
            .iter()
            .rev()
            .find(|(_, from)| *from <= now)
            .map_or(0, |(rev, _)| *rev)
    }

    fn write(&self) -> u64 {
        let mut versions = self.versions.lock().unwrap();
        let rev = versions.last().map_or(0, |(rev, _)| *rev) + 1;
        versions.push((rev, Instant::now() + LAG));
        rev
    }
}

fn app(store: Arc<dyn Store>, row: LaggingRow, again: Option<Duration>) -> Router {
    let mut rule = Rule::new("PATCH /rows/{id}").purge("GET /rows/{id}");
    if let Some(delay) = again {
        rule = rule.again_after(delay);
    }
    let policy = Policy::builder()
        .store(store)
        .route(
            Route::get("/rows/{id}")
                .key("row:{id}")
                .ttl(Duration::from_secs(60)),
        )
        .on(rule)
        .build()
        .unwrap();
    Router::new()
        .route(
            "/rows/{id}",
            get(
                |State(row): State<LaggingRow>, Path(_id): Path<String>| async move {
                    Json(serde_json::json!({ "rev": row.read() }))
                },
            )
            .patch(|State(row): State<LaggingRow>| async move {
                row.write();
                axum::http::StatusCode::OK
            }),
        )
        .with_state(row)
        .layer(CacheLayer::new(policy))
}

fn rev(body: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["rev"].as_u64().unwrap()
}

/// A write, a read at once (it stores the lagging row), then reads for a
/// second: how many of those after `LAG + delay` still show the old row.
async fn stale_after_the_lag(store: Arc<dyn Store>, again: Option<Duration>) -> usize {
    let row = LaggingRow::default();
    let app = app(store, row.clone(), again);
    send(&app, get_req("/rows/1")).await;
    let (status, _, _) = send(&app, method_req("PATCH", "/rows/1")).await;
    assert!(status.is_success());
    let wrote = Instant::now();
    // The read that lands in the lag: the old row, stored.
    let (_, x_cache, body) = send(&app, get_req("/rows/1")).await;
    assert_eq!((x_cache.as_str(), rev(&body)), ("MISS", 0));
    let settled = LAG + again.unwrap_or_default() + Duration::from_millis(200);
    let mut stale = 0;
    while wrote.elapsed() < settled + Duration::from_secs(1) {
        let (_, _, body) = send(&app, get_req("/rows/1")).await;
        if wrote.elapsed() > settled && rev(&body) < 1 {
            stale += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stale
}

async fn check(store: impl Fn() -> Arc<dyn Store>) {
    let without = stale_after_the_lag(store(), None).await;
    let with = stale_after_the_lag(store(), Some(LAG + Duration::from_millis(200))).await;
    eprintln!(
        "reads after the lag showing the old row: {without} without again_after, {with} with"
    );
    assert!(without > 0, "the lag never reached the cache");
    assert_eq!(with, 0);
}

#[tokio::test]
async fn again_after_removes_what_a_lagging_read_stored_memory() {
    check(|| Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn again_after_removes_what_a_lagging_read_stored_redis() {
    let server = RedisServer::start();
    check(|| Arc::new(RedisStore::builder(server.url()).build().unwrap())).await;
}
