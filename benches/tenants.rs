//! A versioned list lookup through `RedisStore` as the number of tenants
//! (one version group each) grows: the versions the store remembers are
//! bounded and evicted per key, so the cost per lookup stays flat instead
//! of doubling past a threshold. The connection is an in-process stand-in
//! that answers `MGET` like Redis (the versions and an entry), so the
//! figures are the store's own cost, without the network.
//!
//! Run with `cargo bench --bench tenants`.

use bytes::Bytes;
use http_body_util::Empty;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::Request;
use redis::aio::ConnectionLike;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use tower_redis_cache::store::{CacheKey, RedisSource, RedisStore, Store};
use tower_redis_cache::{Policy, Route, Scope};

/// Answers every `MGET` with version "1" for each version key and an entry
/// for the entry key; counts the commands.
#[derive(Clone, Default)]
struct Versions {
    commands: Arc<AtomicU64>,
}

impl ConnectionLike for Versions {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.commands.fetch_add(1, Ordering::Relaxed);
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => bytes.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let reply = match args.first().map(Vec::as_slice) {
            Some(b"MGET") => Value::Array(
                args[1..]
                    .iter()
                    .map(|key| {
                        match key.ends_with(b":ver") || key.windows(5).any(|w| w == b":ver:") {
                            true => Value::BulkString(b"1".to_vec()),
                            false => Value::BulkString(b"entry".to_vec()),
                        }
                    })
                    .collect(),
            ),
            Some(b"GET") => Value::BulkString(b"entry".to_vec()),
            _ => Value::Nil,
        };
        Box::pin(async move { Ok(reply) })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        _pipeline: &'a Pipeline,
        _offset: usize,
        _count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

fn keys(store: &RedisStore<Versions>, tenants: usize) -> Vec<CacheKey> {
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
    (0..tenants)
        .map(|tenant| {
            let request = Request::get("/persons?limit=5")
                .header("x-tenant-id", format!("tenant-{tenant}"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            policy.key_for(&request).unwrap()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("list lookup, tenants");
    for tenants in [100, 4_000, 10_000, 40_000] {
        let conn = Versions::default();
        let store = RedisStore::builder(RedisSource::connection(conn.clone()))
            .build()
            .unwrap();
        let keys = keys(&store, tenants);
        // Versions learnt once, as a process that served every tenant.
        runtime.block_on(async {
            for key in &keys {
                store.lookup(key).await.unwrap();
            }
        });
        let before = conn.commands.load(Ordering::Relaxed);
        runtime.block_on(async {
            for key in &keys {
                store.lookup(key).await.unwrap();
            }
        });
        let per_lookup = (conn.commands.load(Ordering::Relaxed) - before) as f64 / tenants as f64;
        eprintln!("{tenants} tenants: {per_lookup:.2} commands per list lookup");
        let mut next = 0;
        group.bench_with_input(BenchmarkId::from_parameter(tenants), &keys, |b, keys| {
            b.to_async(&runtime).iter(|| {
                next = (next + 1) % keys.len();
                let key = &keys[next];
                let store = &store;
                async move { store.lookup(key).await.unwrap() }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
