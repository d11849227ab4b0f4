//! Hit ratio of the memory store on a skewed workload, beside an exact LRU
//! of the same size on the same trace: 200 000 reads of 10 000 items drawn
//! from Zipf(0.99), through `CacheLayer`, the store capped at 1 000 entries.
//!
//! Run with `cargo bench --bench hit_ratio`.

use bytes::Bytes;
use http_body_util::Empty;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use tower::{Layer, ServiceExt};
mod support;
use support::handler;
use tower_redis_cache::store::MemoryStore;
use tower_redis_cache::{CacheLayer, Policy, Route};

const ITEMS: usize = 10_000;
const READS: usize = 200_000;
const CAPACITY: usize = 1_000;
const SKEW: f64 = 0.99;

/// A Zipf(`SKEW`) trace of item ids, from a fixed seed.
fn trace() -> Vec<usize> {
    let weights: Vec<f64> = (1..=ITEMS).map(|k| 1.0 / (k as f64).powf(SKEW)).collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(ITEMS);
    let mut running = 0.0;
    for weight in weights {
        running += weight / total;
        cdf.push(running);
    }
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..READS)
        .map(|_| {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let uniform =
                (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
            cdf.partition_point(|&c| c < uniform).min(ITEMS - 1)
        })
        .collect()
}

/// Hits of an exact LRU of `CAPACITY` items on `trace`.
fn lru_hits(trace: &[usize]) -> usize {
    let mut last_used: HashMap<usize, u64> = HashMap::new();
    let mut order: BTreeMap<u64, usize> = BTreeMap::new();
    let mut hits = 0;
    for (clock, &item) in trace.iter().enumerate() {
        let clock = clock as u64;
        match last_used.insert(item, clock) {
            Some(previous) => {
                hits += 1;
                order.remove(&previous);
            }
            None if last_used.len() > CAPACITY => {
                if let Some((_, oldest)) = order.pop_first() {
                    last_used.remove(&oldest);
                }
            }
            None => {}
        }
        order.insert(clock, item);
    }
    hits
}

fn main() {
    let trace = trace();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let policy = Policy::builder()
        .store(MemoryStore::new().max_entries(CAPACITY).max_bytes(64 << 20))
        .route(
            Route::get("/persons/{id}")
                .key("person:{id}")
                .ttl(Duration::from_secs(3600)),
        )
        .build()
        .unwrap();
    let stats = policy.stats();
    let service = CacheLayer::new(policy).layer(handler());
    runtime.block_on(async {
        for &item in &trace {
            let request = Request::get(format!("/persons/{item}"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let response = service.clone().oneshot(request).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
    });
    let route = stats.route("GET /persons/{id}").unwrap();
    let ours = route.hits as f64 / READS as f64;
    let lru = lru_hits(&trace) as f64 / READS as f64;
    println!(
        "Zipf({SKEW}) over {ITEMS} items, {READS} reads, {CAPACITY} entries: memory store hit ratio {ours:.3}, exact LRU {lru:.3} ({:+.3})",
        ours - lru
    );
}
