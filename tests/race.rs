//! The cache-aside race: a read that started before a write must not store
//! its old result after the write's invalidation. A writer updates a record
//! through the layers while readers read it through the cache; every read
//! that starts after a write returned must show that write or a later one.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::{app, get_req, method_req, revision, send, Backend, Db};

const MIN_WRITES: u64 = 150;
const MIN_READS: u64 = 3000;
const READERS: usize = 8;

async fn no_stale_reads(backend: Backend) {
    let db = Db::default();
    db.set("1", 0);
    db.read_delay_us.store(300, Ordering::Relaxed);
    let (app, cache) = app(backend.store, db.clone());
    let committed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let total_reads = Arc::new(AtomicU64::new(0));

    let mut readers = Vec::new();
    for reader in 0..READERS {
        let (app, committed, done) = (app.clone(), committed.clone(), done.clone());
        let total_reads = total_reads.clone();
        readers.push(tokio::spawn(async move {
            let uri = if reader % 2 == 0 {
                "/persons/1"
            } else {
                "/persons?limit=10"
            };
            let (mut reads, mut stale) = (0u64, 0u64);
            while done.load(Ordering::SeqCst) == 0 {
                let floor = committed.load(Ordering::SeqCst);
                let (status, _, body) = send(&app, get_req(uri)).await;
                assert_eq!(status, StatusCode::OK);
                if revision(uri, &body) < floor {
                    stale += 1;
                }
                reads += 1;
                total_reads.fetch_add(1, Ordering::Relaxed);
                // A hit from the memory store never waits; let the writer run.
                tokio::task::yield_now().await;
            }
            (reads, stale)
        }));
    }
    let mut rev = 0;
    while rev < MIN_WRITES || total_reads.load(Ordering::Relaxed) < MIN_READS {
        rev += 1;
        let (status, _, _) = send(&app, method_req("PATCH", "/persons/1")).await;
        assert_eq!(status, StatusCode::OK);
        committed.store(rev, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    done.store(1, Ordering::SeqCst);
    let (mut reads, mut stale) = (0, 0);
    for reader in readers {
        let (r, s) = reader.await.unwrap();
        reads += r;
        stale += s;
    }
    let hits: u64 = cache.stats().snapshot().iter().map(|r| r.hits).sum();
    let raced: u64 = cache
        .stats()
        .snapshot()
        .iter()
        .flat_map(|r| r.skips.clone())
        .filter(|(reason, _)| *reason == tower_redis_cache::Reason::Raced)
        .map(|(_, n)| n)
        .sum();
    eprintln!("reads {reads}, stale {stale}, hits {hits}, stores refused as raced {raced}");
    assert!(reads >= MIN_READS, "only {reads} reads");
    assert!(hits > 0, "the cache served some reads");
    assert_eq!(
        stale, 0,
        "{stale} of {reads} reads returned data older than a completed write"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_stale_reads_memory() {
    no_stale_reads(Backend::memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn no_stale_reads_redis() {
    let backend = Backend::redis();
    no_stale_reads(backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn no_stale_reads_cluster() {
    let backend = Backend::cluster();
    no_stale_reads(backend).await;
}
