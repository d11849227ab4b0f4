//! What hedging costs the database and buys the tail, at steady state: a
//! store whose every lookup answers 1 ms or 50 ms late (inside the
//! deadline), in front of a handler that takes 0.2 ms or 20 ms, with the
//! route hedging within its 5% budget (`Route::hedge_within_budget`),
//! always (`Route::hedge`) and never (the default), beside no cache.
//!
//! 32 clients read 50 warm items; after 600 reads of warm-up (the route
//! learns its lookups' p95 and its handler's time), 2 000 reads are
//! measured: the handler calls hedging made (as a share of the reads), and
//! the reads' p50 and p99. Prints a Markdown table.
//!
//! Run with `cargo bench --bench hedging`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};
use tower_redis_cache::store::{CacheKey, Invalidation, Lookup, MemoryStore, Store, StoreFuture};
use tower_redis_cache::{CacheLayer, HandlerCall, Policy, Route};

const CLIENTS: usize = 32;
const ITEMS: usize = 50;
const WARM_UP: usize = 600;
const MEASURED: usize = 2_000;
const ROUTE: &str = "GET /items/{id}";

/// A memory store whose lookups answer `delay` late.
#[derive(Clone)]
struct Slow {
    inner: MemoryStore,
    delay: Duration,
}

impl Store for Slow {
    fn name(&self) -> &'static str {
        "slow"
    }

    fn lookup(&self, key: &CacheKey) -> StoreFuture<Lookup> {
        let (lookup, delay) = (self.inner.lookup(key), self.delay);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            lookup.await
        })
    }

    fn store(
        &self,
        key: &CacheKey,
        seen: &Lookup,
        value: Bytes,
        ttl: Duration,
    ) -> StoreFuture<bool> {
        self.inner.store(key, seen, value, ttl)
    }

    fn invalidate(&self, invalidation: &Invalidation) -> StoreFuture<()> {
        self.inner.invalidate(invalidation)
    }

    fn ping(&self) -> StoreFuture<()> {
        self.inner.ping()
    }
}

type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
type Svc = BoxCloneSyncService<Request<Empty<Bytes>>, Response<Body>, Infallible>;

/// A handler that takes `took` (a blocking wait on its own thread, as a
/// database call would: precise below tokio's 1 ms timer).
fn handler(took: Duration) -> Svc {
    BoxCloneSyncService::new(tower::service_fn(
        move |_req: Request<Empty<Bytes>>| async move {
            tokio::task::spawn_blocking(move || std::thread::sleep(took))
                .await
                .unwrap();
            let body = Full::new(Bytes::from_static(br#"{"id":1}"#));
            let mut response = Response::new(body.map_err(|never| match never {}).boxed_unsync());
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok::<_, Infallible>(response)
        },
    ))
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    NoCache,
    Budget,
    Always,
    Never,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::NoCache => "no cache",
            Mode::Budget => "`hedge_within_budget()`",
            Mode::Always => "`hedge()`",
            Mode::Never => "none (the default)",
        }
    }
}

/// The service for `mode`, and its policy (none without a cache).
fn service(mode: Mode, delay: Duration, took: Duration) -> (Svc, Option<Policy>) {
    let route = Route::get("/items/{id}")
        .key("item:{id}")
        .ttl(Duration::from_secs(600));
    let route = match mode {
        Mode::NoCache => return (handler(took), None),
        Mode::Budget => route.hedge_within_budget(),
        Mode::Always => route.hedge(),
        Mode::Never => route,
    };
    let store = Slow {
        inner: MemoryStore::new(),
        delay,
    };
    let policy = Policy::builder()
        .store(Arc::new(store))
        .route(route)
        .build()
        .unwrap();
    let layer = CacheLayer::new(policy.clone());
    let svc = layer
        .layer(handler(took))
        .map_response(|response| response.map(|body| body.map_err(Into::into).boxed_unsync()));
    (BoxCloneSyncService::new(svc), Some(policy))
}

/// `reads` reads over `CLIENTS` clients; each read's time.
async fn reads(svc: &Svc, reads: usize) -> Vec<Duration> {
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(reads / CLIENTS + 1);
                for i in (client..reads).step_by(CLIENTS) {
                    let uri = format!("/items/{}", i % ITEMS);
                    let request = Request::get(uri).body(Empty::new()).unwrap();
                    let started = Instant::now();
                    let response = svc.clone().oneshot(request).await.unwrap();
                    let _ = response.into_body().collect().await;
                    times.push(started.elapsed());
                }
                times
            })
        })
        .collect();
    let mut times = Vec::with_capacity(reads);
    for task in tasks {
        times.extend(task.await.unwrap());
    }
    times
}

fn hedged(policy: &Option<Policy>) -> u64 {
    policy
        .as_ref()
        .and_then(|policy| policy.stats().route(ROUTE))
        .map(|route| {
            route
                .handler_calls
                .iter()
                .filter(|(why, _)| *why == HandlerCall::Hedged)
                .map(|(_, n)| n)
                .sum()
        })
        .unwrap_or(0)
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("| lookups | handler | hedging | handler calls from hedges | p50 ms | p99 ms |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for delay in [Duration::from_millis(1), Duration::from_millis(50)] {
        for took in [Duration::from_micros(200), Duration::from_millis(20)] {
            for mode in [Mode::NoCache, Mode::Budget, Mode::Always, Mode::Never] {
                let (svc, policy) = service(mode, delay, took);
                let mut times = runtime.block_on(async {
                    reads(&svc, WARM_UP).await;
                    let before = hedged(&policy);
                    let times = reads(&svc, MEASURED).await;
                    // Hedged lookups still under way are not waited for:
                    // the count is of handler calls, made already.
                    (times, hedged(&policy) - before)
                });
                let (times, calls) = (&mut times.0, times.1);
                times.sort();
                let share = match mode {
                    Mode::NoCache => "every read".to_owned(),
                    _ => format!("{calls} ({:.1}%)", 100.0 * calls as f64 / MEASURED as f64),
                };
                println!(
                    "| +{} ms | {} ms | {} | {share} | {} | {} |",
                    delay.as_millis(),
                    ms(took),
                    mode.name(),
                    ms(times[times.len() / 2]),
                    ms(times[times.len() * 99 / 100]),
                );
            }
        }
    }
}
