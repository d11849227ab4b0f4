//! One primary with replicas: what a write guarantees when the servers
//! change roles under the cache. Real `redis-server` processes on
//! loopback; stale reads are counted exactly.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::{app, get_req, method_req, revision, send, send_reading, Db, RedisServer};
use tower_redis_cache::store::{RedisStore, Store};

/// Runs `args` on the server at `port` as the default user.
async fn command(port: u16, args: &[&str]) -> redis::Value {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(&mut conn).await.unwrap()
}

/// Waits until the server at `port`, a replica, has synced with its master.
async fn synced(port: u16) {
    for _ in 0..500 {
        let info = command(port, &["INFO", "replication"]).await;
        let info: String = redis::from_redis_value(info).unwrap();
        if info.contains("master_link_status:up") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the replica on {port} never synced");
}

/// A master demoted in place: B, a replica of A, is promoted while its link
/// is down (it misses the write's purge), then A is made B's replica
/// without closing the cache's connection to A, and loads B's data, the
/// pre-write list page included. List hits (`MGET`) work on a replica and
/// never meet a `READONLY`: only the periodic epoch check (1 s) tells the
/// cache that A's history changed. Reads from 3 s after the demotion on
/// are never stale.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_master_demoted_in_place_is_noticed_within_the_bound() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    command(b.port, &["REPLICAOF", "127.0.0.1", &a.port.to_string()]).await;
    synced(b.port).await;
    let db = Db::default();
    db.set("1", 1);
    let store: Arc<dyn Store> = Arc::new(RedisStore::builder(a.url()).build().unwrap());
    let (app, _) = app(store, db.clone());
    let list = "/persons?limit=5";
    send(&app, get_req(list)).await;
    let (_, x_cache, _) = send(&app, get_req(list)).await;
    assert_eq!(x_cache, "HIT");
    let acked: i64 =
        redis::from_redis_value(command(a.port, &["WAIT", "1", "2000"]).await).unwrap();
    assert_eq!(acked, 1, "B holds the page");

    command(b.port, &["REPLICAOF", "NO", "ONE"]).await;
    let response = tower::ServiceExt::oneshot(app.clone(), method_req("PATCH", "/persons/1"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // A lost its only replica when B was promoted: when the store had read
    // B online (its first read of A may come before B's sync ends), the
    // purge A took cannot be confirmed and the write says
    // `invalidation-pending`; either way it is the reads below that count.
    let status = response.headers()["cache-status"].to_str().unwrap();
    assert!(
        status.contains("detail=invalidated") || status.contains("detail=invalidation-pending"),
        "{status}"
    );
    command(a.port, &["REPLICAOF", "127.0.0.1", &b.port.to_string()]).await;
    synced(a.port).await;
    let demoted = tokio::time::Instant::now();

    let (mut stale_within, mut stale_after, mut reads_after) = (0, 0, 0);
    while demoted.elapsed() < Duration::from_secs(4) {
        let (code, _, body) = send(&app, get_req(list)).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        let stale = revision(list, &body) < 2;
        if demoted.elapsed() < Duration::from_secs(3) {
            stale_within += usize::from(stale);
        } else {
            reads_after += 1;
            stale_after += usize::from(stale);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "demoted in place: {stale_within} stale reads in the first 3 s, \
         {stale_after} of {reads_after} after"
    );
    assert!(reads_after > 0);
    assert_eq!(stale_after, 0, "the demotion went unnoticed");
}

/// The master Sentinel names now, by port.
async fn named_master(sentinel: u16) -> Option<u16> {
    let reply = command(
        sentinel,
        &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
    )
    .await;
    let addr: Vec<String> = redis::from_redis_value(reply).ok()?;
    addr.get(1)?.parse().ok()
}

/// One master, one replica synced to it, and a Sentinel that knows both.
async fn sentinel_pair() -> (RedisServer, RedisServer, common::Sentinel) {
    let (master, replica) = (RedisServer::start(), RedisServer::start());
    command(
        replica.port,
        &["REPLICAOF", "127.0.0.1", &master.port.to_string()],
    )
    .await;
    synced(replica.port).await;
    let sentinel = common::Sentinel::start(master.port);
    // Sentinel learns of the replica from the master's INFO.
    for _ in 0..500 {
        let known = command(sentinel.port, &["SENTINEL", "REPLICAS", "mymaster"]).await;
        if matches!(known, redis::Value::Array(ref r) if !r.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (master, replica, sentinel)
}

/// A store over the master `sentinel` names.
fn sentinel_store(sentinel: &common::Sentinel) -> Arc<dyn Store> {
    Arc::new(
        RedisStore::builder(tower_redis_cache::store::RedisSource::sentinel(
            "mymaster",
            [sentinel.url()],
        ))
        .build()
        .unwrap(),
    )
}

/// The role (`master`, `slave`) the server at `port` reports.
async fn role(port: u16) -> String {
    let info = command(port, &["INFO", "replication"]).await;
    let info: String = redis::from_redis_value(info).unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("role:"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Asks Sentinel to fail its master over to the server at `to` (it refuses
/// while the previous failover is still ending) and waits until it names it.
async fn fail_over(sentinel: u16, to: u16) {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{sentinel}/"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for _ in 0..250 {
        let asked: redis::RedisResult<redis::Value> = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg("mymaster")
            .query_async(&mut conn)
            .await;
        if asked.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..500 {
        if named_master(sentinel).await == Some(to) && role(to).await == "master" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("Sentinel never failed over to {to}");
}

/// Two Sentinel failovers a few seconds apart: B is promoted, and before
/// Sentinel demotes A (it waits 8 s for that) A is promoted back. A never
/// changed (same `run_id`, same `master_replid`) and still holds the entry
/// of the item from before the write, whose purge went to B. Sentinel's
/// configuration epoch, part of every entry's epoch over Sentinel, is what
/// changed: the item is read fresh after the second failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_master_failed_over_and_back_before_its_demotion_serves_nothing_from_before() {
    let (a, b, sentinel) = sentinel_pair().await;
    let db = Db::default();
    db.set("1", 0);
    let (writer, _) = app(sentinel_store(&sentinel), db.clone());
    let (reader, _) = app(sentinel_store(&sentinel), db.clone());
    let item = "/persons/1";
    send(&reader, get_req(item)).await;
    assert_eq!(send(&reader, get_req(item)).await.1, "HIT", "kept on A");

    fail_over(sentinel.port, b.port).await;
    // Each store asks Sentinel every second: the writer is on B after that.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, cache_status, _) =
        send_reading(&writer, method_req("PATCH", item), "cache-status").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        cache_status.contains("detail=invalidated"),
        "the write's purge reached B: {cache_status}"
    );
    assert_eq!(
        role(a.port).await,
        "master",
        "Sentinel demoted A already: the case under test did not arise"
    );

    fail_over(sentinel.port, a.port).await;
    let last = db.revisions.lock().unwrap()["1"];
    let began = tokio::time::Instant::now();
    let mut stale = 0;
    while began.elapsed() < Duration::from_secs(3) {
        let (code, _, body) = send(&reader, get_req(item)).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        stale += usize::from(revision(item, &body) < last);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stale, 0, "reads of the item from before the write");
}

/// Two processes on a store that follows Sentinel (one master, one
/// replica, one sentinel on loopback): a writer on one, readers of the item
/// and the list on the other, while Sentinel fails the master over mid-run.
/// Every answer is a 200, and a read that starts after a write returned
/// shows it; once the new master serves, hits come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn a_sentinel_failover_mid_run_leaves_every_answer_correct() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let (_master, replica, sentinel) = sentinel_pair().await;
    let store = || sentinel_store(&sentinel);
    let db = Db::default();
    db.set("1", 0);
    let (writer, _) = app(store(), db.clone());
    let (reader, _) = app(store(), db.clone());
    let uris = ["/persons/1", "/persons?limit=5"];
    for uri in uris {
        send(&reader, get_req(uri)).await;
        assert_eq!(send(&reader, get_req(uri)).await.1, "HIT", "{uri}");
    }

    let committed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for uri in uris {
        let (reader, committed, done) = (reader.clone(), committed.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let (mut reads, mut stale) = (0u64, Vec::new());
            while !done.load(Ordering::SeqCst) {
                let floor = committed.load(Ordering::SeqCst);
                let began = tokio::time::Instant::now();
                let (code, _, body) = send(&reader, get_req(uri)).await;
                assert_eq!(code, StatusCode::OK, "{uri}: {body}");
                reads += 1;
                if revision(uri, &body) < floor {
                    stale.push(began);
                }
            }
            (reads, stale)
        }));
    }
    let started = tokio::time::Instant::now();
    let mut failed_over = None;
    while started.elapsed() < Duration::from_secs(5) {
        if failed_over.is_none() && started.elapsed() > Duration::from_secs(1) {
            let ok = command(sentinel.port, &["SENTINEL", "FAILOVER", "mymaster"]).await;
            assert_eq!(ok, redis::Value::Okay);
            failed_over = Some(tokio::time::Instant::now());
        }
        let write = method_req("PATCH", "/persons/1");
        let (status, cache_status, _) = send_reading(&writer, write, "cache-status").await;
        assert_eq!(status, StatusCode::OK);
        // Only a write that answered `invalidated` binds the readers: one
        // that answered `invalidation-pending` is the documented exception.
        if cache_status.contains("detail=invalidated") {
            committed.fetch_max(db.revisions.lock().unwrap()["1"], Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done.store(true, Ordering::SeqCst);
    let (mut reads, mut stale) = (0, Vec::new());
    for reader in readers {
        let (r, s) = reader.await.unwrap();
        reads += r;
        stale.extend(s);
    }
    assert_eq!(
        named_master(sentinel.port).await,
        Some(replica.port),
        "failed over"
    );
    // Each process asks Sentinel every second: one still on the old master
    // moves within that (plus Sentinel's own second to promote).
    let failed_over = failed_over.expect("the failover ran");
    let bound = Duration::from_secs(2);
    let late: Vec<Duration> = stale
        .iter()
        .filter(|at| **at > failed_over + bound || **at < failed_over)
        .map(|at| at.duration_since(failed_over))
        .collect();
    eprintln!(
        "sentinel failover mid-run: {reads} reads on the other process, {} stale within {bound:?} of the failover, {} outside",
        stale.len() - late.len(),
        late.len()
    );
    assert_eq!(
        late,
        Vec::<Duration>::new(),
        "stale reads outside the failover's bound"
    );

    // The new master serves hits, with the last write.
    let last = db.revisions.lock().unwrap()["1"];
    for uri in uris {
        let mut x_cache = String::new();
        for _ in 0..100 {
            let (_, seen, body) = send(&reader, get_req(uri)).await;
            assert_eq!(revision(uri, &body), last, "{uri}");
            x_cache = seen;
            if x_cache == "HIT" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(x_cache, "HIT", "{uri} after the failover");
    }
}
