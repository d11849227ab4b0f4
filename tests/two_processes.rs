//! Read-after-write across processes over one real `redis-server`, under
//! faults. Two independent stacks (each its own `RedisStore`: connection,
//! breaker, replay queue) share one database, as two app processes with one
//! `PERSONS_DB` would: a writer on A, readers on B. A read that starts after
//! a write returned must show that write or a later one; every other read
//! is counted as stale, exactly.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::{app, get_req, method_req, revision, send, Db, RedisServer};
use tower_redis_cache::store::{RedisStore, Store};

/// A process: its own store over `url`, the shared database.
fn process(url: &str, db: &Db) -> axum::Router {
    let store: Arc<dyn Store> = Arc::new(RedisStore::builder(url).build().unwrap());
    app(store, db.clone()).0
}

#[derive(Debug, Default)]
struct Tally {
    writes: u64,
    reads: u64,
    hits: u64,
    stale: u64,
}

/// Runs a writer on `writer` and two readers on `reader` for `run`, while
/// `fault` runs; returns what the readers saw.
async fn read_after_write<F, Fut>(
    writer: axum::Router,
    reader: axum::Router,
    db: Db,
    run: Duration,
    fault: F,
) -> Tally
where
    F: FnOnce(Arc<AtomicBool>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // Both processes have been serving for a while: connections are up.
    db.set("1", 0);
    send(&writer, method_req("PATCH", "/persons/1")).await;
    send(&reader, get_req("/persons/1")).await;
    let committed = Arc::new(AtomicU64::new(1));
    let done = Arc::new(AtomicBool::new(false));
    let fault = tokio::spawn(fault(done.clone()));
    let mut readers = Vec::new();
    for uri in ["/persons/1", "/persons?limit=10"] {
        let (reader, committed, done) = (reader.clone(), committed.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while !done.load(Ordering::SeqCst) {
                let floor = committed.load(Ordering::SeqCst);
                let (status, x_cache, body) = send(&reader, get_req(uri)).await;
                assert_eq!(status, StatusCode::OK, "{body}");
                tally.reads += 1;
                tally.hits += u64::from(x_cache == "HIT");
                if revision(uri, &body) < floor {
                    tally.stale += 1;
                }
            }
            tally
        }));
    }
    let started = tokio::time::Instant::now();
    let mut writes = 0;
    while started.elapsed() < run {
        let (status, _, _) = send(&writer, method_req("PATCH", "/persons/1")).await;
        assert_eq!(status, StatusCode::OK);
        writes += 1;
        let revision = db.revisions.lock().unwrap()["1"];
        committed.fetch_max(revision, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done.store(true, Ordering::SeqCst);
    fault.await.unwrap();
    let mut tally = Tally {
        writes,
        ..Tally::default()
    };
    for reader in readers {
        let t = reader.await.unwrap();
        tally.reads += t.reads;
        tally.hits += t.hits;
        tally.stale += t.stale;
    }
    tally
}

async fn every(period: Duration, done: Arc<AtomicBool>, mut act: impl FnMut()) {
    while !done.load(Ordering::SeqCst) {
        tokio::time::sleep(period).await;
        act();
    }
}

/// The writer on A and readers on B while `command` is sent to Redis every
/// `period`; asserts no stale read and some hits.
async fn under_a_periodic_command(label: &str, period: Duration, command: &'static [&'static str]) {
    let server = RedisServer::start();
    let db = Db::default();
    let (a, b) = (process(&server.url(), &db), process(&server.url(), &db));
    let url = server.url();
    let tally = read_after_write(a, b, db, RUN, |done| async move {
        every(period, done, || redis_cmd(&url, command)).await
    })
    .await;
    report(label, &tally);
    assert_eq!(tally.stale, 0, "{tally:?}");
    assert!(tally.hits > 0, "{tally:?}");
}

fn redis_cmd(url: &str, args: &[&str]) {
    let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    let _: redis::Value = cmd.query(&mut conn).unwrap_or(redis::Value::Nil);
}

const RUN: Duration = Duration::from_secs(3);

fn report(fault: &str, tally: &Tally) {
    eprintln!(
        "{fault}: {} writes, {} reads on the other process ({} hits), {} stale",
        tally.writes, tally.reads, tally.hits, tally.stale
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn redis_stalls_longer_than_the_read_deadline() {
    let stall = &["DEBUG", "SLEEP", "0.2"];
    under_a_periodic_command(
        "DEBUG SLEEP 0.2 every 0.5 s",
        Duration::from_millis(500),
        stall,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn connections_killed_every_400_ms() {
    let kill = &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"];
    under_a_periodic_command(
        "CLIENT KILL TYPE normal every 0.4 s",
        Duration::from_millis(400),
        kill,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn the_writer_alone_on_a_slow_link() {
    let server = RedisServer::start();
    let db = Db::default();
    let slow = common::delaying_proxy(
        server.port,
        Duration::from_millis(150),
        Duration::from_millis(150),
    )
    .await;
    let a = process(&format!("redis://127.0.0.1:{slow}/"), &db);
    let b = process(&server.url(), &db);
    let tally = read_after_write(a, b, db, RUN, |_| async {}).await;
    report("writer's link +150 ms each way", &tally);
    assert_eq!(tally.stale, 0, "{tally:?}");
    assert!(tally.hits > 0, "{tally:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn flushall_and_evictions_under_load() {
    let server = RedisServer::start();
    // Everything may be evicted at random, guards and version keys included.
    redis_cmd(
        &server.url(),
        &["CONFIG", "SET", "maxmemory-policy", "allkeys-random"],
    );
    redis_cmd(&server.url(), &["CONFIG", "SET", "maxmemory", "1500000"]);
    let db = Db::default();
    let (a, b) = (process(&server.url(), &db), process(&server.url(), &db));
    let url = server.url();
    let tally = read_after_write(a, b, db, RUN, |done| async move {
        let mut round = 0;
        every(Duration::from_millis(100), done, || {
            round += 1;
            if round % 7 == 0 {
                redis_cmd(&url, &["FLUSHALL"]);
            } else {
                // Filler that pushes the cache's keys out.
                for i in 0..50 {
                    let key = format!("filler:{round}:{i}");
                    redis_cmd(&url, &["SET", &key, &"x".repeat(4096)]);
                }
            }
        })
        .await
    })
    .await;
    report("FLUSHALL every 0.7 s, allkeys-random eviction", &tally);
    assert_eq!(tally.stale, 0, "{tally:?}");
}

/// A Redis with persistence: a snapshot, then writes, then a restart that
/// reloads the snapshot. The entries it brings back are from before the
/// writes, and their version numbers repeat: none may be served.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_restart_that_reloads_a_snapshot_serves_nothing_from_before() {
    let mut server = RedisServer::start();
    let db = Db::default();
    db.set("1", 1);
    let (a, b) = (process(&server.url(), &db), process(&server.url(), &db));
    for app in [&a, &b] {
        for uri in ["/persons/1", "/persons?limit=10"] {
            send(app, get_req(uri)).await;
            assert_eq!(send(app, get_req(uri)).await.1, "HIT", "{uri}");
        }
    }
    server.snapshot();
    assert_eq!(
        send(&a, method_req("PATCH", "/persons/1")).await.0,
        StatusCode::OK
    );
    server.restart();
    for app in [&b, &a] {
        for _ in 0..3 {
            for uri in ["/persons/1", "/persons?limit=10"] {
                let (status, _, body) = send(app, get_req(uri)).await;
                if status == StatusCode::OK {
                    assert_eq!(revision(uri, &body), 2, "{uri}: {body}");
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // And caching resumes on the restarted server.
    let mut hit = false;
    for _ in 0..50 {
        let (_, x_cache, body) = send(&b, get_req("/persons/1")).await;
        assert_eq!(revision("/persons/1", &body), 2);
        if x_cache == "HIT" {
            hit = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(hit);
}

/// A miss in flight across a restart that reloads a snapshot: what its
/// lookup saw (its lease, a version) may be back in the reloaded data, but
/// it belongs to the old server lifetime, so its write is refused.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_miss_in_flight_across_a_restart_does_not_store() {
    let mut server = RedisServer::start();
    let store = RedisStore::builder(server.url()).build().unwrap();
    let db = Db::default();
    db.set("1", 1);
    let (app, policy) = app(Arc::new(store.clone()), db);
    send(&app, get_req("/persons/1")).await;
    let stored = policy.key_for(&get_req("/persons/1")).unwrap();
    let entry = common::stored_entry(&store, &stored).await;
    for uri in ["/persons/1", "/persons?limit=10"] {
        let key = policy.key_for(&get_req(uri)).unwrap();
        let seen = store.lookup(&key).await.unwrap();
        server.snapshot();
        server.restart();
        // Reconnected to the new server lifetime.
        let mut up = false;
        for _ in 0..100 {
            if store.ping().await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(up);
        let written = store
            .store(&key, &seen, entry.clone(), Duration::from_secs(60))
            .await;
        assert_eq!(written, Ok(false), "{uri}");
    }
}
