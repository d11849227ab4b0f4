//! Bursts on one key: what coalescing costs routes whose responses cannot
//! be stored (hit-for-miss), and single-flight across processes. Handler
//! calls and outcomes are counted exactly; latencies are printed as
//! figures, never asserted.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::StatusCode;
use common::{app, get_req, send, Backend, Db};
use tokio::time::Instant;
use tower_redis_cache::{HandlerCall, Policy};

const ITEM: &str = "GET /persons/{id}";

/// The route's handler calls by why, as (token, count).
fn calls(policy: &Policy, route: &str) -> Vec<(&'static str, u64)> {
    let stats = policy.stats().route(route).unwrap();
    stats
        .handler_calls
        .iter()
        .map(|(why, n)| (why.as_str(), *n))
        .collect()
}

/// `n` concurrent GETs of `uri`; each one's (status, cache-status, time).
async fn burst(
    app: &axum::Router,
    uri: &'static str,
    n: usize,
) -> Vec<(StatusCode, String, Duration)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let response = tower::ServiceExt::oneshot(app, get_req(uri)).await.unwrap();
                let status = response.status();
                let cache_status = response
                    .headers()
                    .get("cache-status")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let _ = axum::body::to_bytes(response.into_body(), usize::MAX).await;
                (status, cache_status, started.elapsed())
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

fn p50(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// A cached route whose handler answers 404 in 50 ms, three bursts of 64:
/// the first coalesces (one leader, then the others call the handler),
/// the next two go straight to the handler (`detail=hit-for-miss`); then
/// the record appears, and the first storable answer ends it.
async fn unstorable_responses_do_not_make_bursts_wait(backend: Backend) {
    const HANDLER: Duration = Duration::from_millis(50);
    let db = Db::default();
    db.read_delay_us
        .store(HANDLER.as_micros() as u64, Ordering::Relaxed);
    let (app, policy) = app(backend.store.clone(), db.clone());
    let mut p50s = Vec::new();
    for round in 0..3 {
        let calls = db.calls();
        let answers = burst(&app, "/persons/404", 64).await;
        assert!(answers
            .iter()
            .all(|(status, ..)| *status == StatusCode::NOT_FOUND));
        assert_eq!(
            db.calls() - calls,
            64,
            "round {round}: each answer from the handler"
        );
        let passed = answers
            .iter()
            .filter(|(_, status, _)| status.contains("detail=hit-for-miss"))
            .count();
        assert_eq!(passed, if round == 0 { 0 } else { 64 }, "round {round}");
        p50s.push(p50(answers.into_iter().map(|(.., took)| took).collect()));
    }
    let ratios: Vec<String> = p50s
        .iter()
        .map(|p| format!("{:.2}x", p.as_secs_f64() / HANDLER.as_secs_f64()))
        .collect();
    eprintln!("404 in 50 ms, bursts of 64: p50 per round {ratios:?} the handler's time");

    // A storable answer ends hit-for-miss: stored, then a hit.
    db.set("404", 1);
    let (_, status, _) = common::send_reading(&app, get_req("/persons/404"), "cache-status").await;
    assert!(status.contains("stored"), "{status}");
    let (_, x_cache, _) = send(&app, get_req("/persons/404")).await;
    assert_eq!(x_cache, "HIT");
    // Every call with its reason: the first burst's leader (a miss), its
    // followers (the leader's 404 could not be shared), the next bursts
    // and the storable answer that ended them (hit-for-miss).
    assert_eq!(
        calls(&policy, ITEM),
        [("miss", 1), ("hit-for-miss", 129), ("unshareable", 63)]
    );
}

/// A warm key under bursts of 64 concurrent readers: no handler call
/// beyond the one that filled it; a request the cache may not serve is
/// counted with its reason.
async fn a_warm_key_calls_no_handler(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let (app, policy) = app(backend.store.clone(), db.clone());
    assert_eq!(send(&app, get_req("/persons/1")).await.1, "MISS");
    for _ in 0..5 {
        let answers = burst(&app, "/persons/1", 64).await;
        assert!(answers
            .iter()
            .all(|(status, cache, _)| *status == StatusCode::OK && cache.contains("hit")));
    }
    assert_eq!(db.calls(), 1);
    assert_eq!(calls(&policy, ITEM), [("miss", 1)]);
    let with_auth = axum::http::Request::get("/persons/1")
        .header("authorization", "Bearer x")
        .body(axum::body::Body::empty())
        .unwrap();
    assert_eq!(send(&app, with_auth).await.0, StatusCode::OK);
    assert_eq!(calls(&policy, ITEM), [("authorization", 1), ("miss", 1)]);
    assert_eq!(
        policy.stats().route(ITEM).unwrap().handler_calls[0].0,
        HandlerCall::Bypass(tower_redis_cache::Reason::Authorization)
    );
    // Another `Host` on the same key: the entry is bound to the first
    // one's, so this request calls the handler, counted as such, and its
    // entry replaces the first (one variant per key).
    let other_host = || {
        axum::http::Request::get("/persons/1")
            .header("host", "b.example")
            .body(axum::body::Body::empty())
            .unwrap()
    };
    assert_eq!(send(&app, other_host()).await.1, "MISS");
    assert_eq!(send(&app, other_host()).await.1, "HIT");
    assert_eq!(
        calls(&policy, ITEM),
        [("authorization", 1), ("miss", 1), ("other-variant", 1)]
    );
}

backend_tests!(
    unstorable_responses_do_not_make_bursts_wait,
    a_warm_key_calls_no_handler,
);

/// Two stacks (two processes) over `server`, reading person 1 from `db`
/// in 200 ms.
fn two_processes(
    server: &common::RedisServer,
    db: &Db,
) -> ((axum::Router, Policy), (axum::Router, Policy)) {
    db.set("1", 1);
    db.read_delay_us.store(200_000, Ordering::Relaxed);
    let process = || {
        let store = tower_redis_cache::store::RedisStore::builder(server.url())
            .build()
            .unwrap();
        app(std::sync::Arc::new(store), db.clone())
    };
    (process(), process())
}

/// Two stacks (two processes) over one redis-server, 32 concurrent cold
/// reads of one person on each, a 200 ms handler: one handler call in all,
/// every answer a 200 with the record. The process that meets the other's
/// lease waits for its fill instead of calling the handler too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_cold_key_costs_one_handler_call_across_processes() {
    let server = common::RedisServer::start();
    let db = Db::default();
    let ((a, on_a_stats), (b, on_b_stats)) = two_processes(&server, &db);
    let (on_a, on_b) = tokio::join!(burst(&a, "/persons/1", 32), burst(&b, "/persons/1", 32));
    let answers: Vec<_> = on_a.into_iter().chain(on_b).collect();
    assert!(answers.iter().all(|(status, ..)| *status == StatusCode::OK));
    let p50 = p50(answers.iter().map(|(.., took)| *took).collect());
    eprintln!(
        "64 cold reads over two processes: {} handler call(s), p50 {p50:?}",
        db.calls()
    );
    assert_eq!(db.calls(), 1);
    let mut both = calls(&on_a_stats, ITEM);
    both.extend(calls(&on_b_stats, ITEM));
    assert_eq!(both, [("miss", 1)]);
}

/// The lease holder's request is dropped mid-handler (its client went
/// away): the other process waits for the fill at most `lease_wait` (1 s),
/// then calls the handler once itself; every answer is a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_lease_holder_that_went_away_costs_at_most_the_wait() {
    let server = common::RedisServer::start();
    let db = Db::default();
    let ((a, on_a), (b, on_b)) = two_processes(&server, &db);
    let dropped = tokio::time::timeout(
        Duration::from_millis(50),
        tower::ServiceExt::oneshot(a.clone(), get_req("/persons/1")),
    )
    .await;
    assert!(dropped.is_err(), "A's request went away mid-handler");
    let started = Instant::now();
    let answers = burst(&b, "/persons/1", 32).await;
    let took = started.elapsed();
    assert!(answers.iter().all(|(status, ..)| *status == StatusCode::OK));
    eprintln!(
        "lease holder gone: B's burst answered in {took:?}, {} handler calls",
        db.calls()
    );
    assert_eq!(db.calls(), 2, "A's (dropped) and one on B");
    assert_eq!(calls(&on_a, ITEM), [("miss", 1)]);
    assert_eq!(calls(&on_b, ITEM), [("lease-wait-over", 1)]);
    let (_, x_cache, _) = send(&b, get_req("/persons/1")).await;
    assert_eq!(x_cache, "HIT", "B filled the entry");
}

/// Bursts of 64 concurrent cold reads, a handler that answers at once,
/// over one redis-server: one handler call per key. The leader lands its
/// flight within a few microseconds, before some of its followers have
/// read their lookup's reply (this process's lease, from the same
/// pipeline); they look again instead of taking a landed flight's lease
/// for one its request left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_cold_key_with_a_fast_handler_costs_one_handler_call() {
    let server = common::RedisServer::start();
    let store = tower_redis_cache::store::RedisStore::builder(server.url())
        .build()
        .unwrap();
    let db = Db::default();
    let (app, policy) = app(std::sync::Arc::new(store), db.clone());
    let uris: Vec<&'static str> = (1..=20)
        .map(|id| &*Box::leak(format!("/persons/{id}").into_boxed_str()))
        .collect();
    for (id, _) in uris.iter().enumerate() {
        db.set(&(id + 1).to_string(), 1);
    }
    for uri in &uris {
        let answers = burst(&app, uri, 64).await;
        assert!(answers.iter().all(|(status, ..)| *status == StatusCode::OK));
    }
    eprintln!("20 bursts of 64 cold reads: {} handler calls", db.calls());
    assert_eq!(calls(&policy, ITEM), [("miss", 20)]);
    assert_eq!(db.calls(), 20);
}
