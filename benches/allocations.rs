//! Heap allocations per request through `CacheLayer` on the memory store:
//! a hit, a hit answered 304, and a miss that stores. Counted with a
//! counting global allocator, not timed, so the figures are exact and
//! repeatable. With `--features metrics` a Prometheus recorder is installed
//! first: the difference is what the metrics cost per request.
//!
//! Run with `cargo bench --bench allocations [--features metrics,tier]`
//! (`tier` adds a hit from the in-process tier).

use bytes::Bytes;
use http_body_util::Empty;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{Layer, Service, ServiceExt};
mod support;
use support::handler;
use tower_redis_cache::{CacheLayer, Policy, Route};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const ROUNDS: u64 = 10_000;

/// Allocations per call of `request()` through `service`, averaged.
async fn per_request<S>(service: &S, mut request: impl FnMut(u64) -> Request<Empty<Bytes>>) -> f64
where
    S: Service<Request<Empty<Bytes>>> + Clone,
    S::Response: IntoBody,
    S::Error: std::fmt::Debug,
{
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for round in 0..ROUNDS {
        let response = service.clone().oneshot(request(round)).await.unwrap();
        response.drain().await;
    }
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / ROUNDS as f64
}

trait IntoBody {
    async fn drain(self);
}

impl<B: http_body::Body> IntoBody for Response<B>
where
    B::Error: std::fmt::Debug,
{
    async fn drain(self) {
        let _ = self.into_body().collect().await.unwrap();
    }
}

fn main() {
    #[cfg(feature = "metrics")]
    let _recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("a recorder");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let policy = Policy::builder()
            .route(Route::get("/persons/{id}").key("person:{id}"))
            .build()
            .unwrap();
        let cached = CacheLayer::new(policy).layer(handler());
        let get = |_| {
            Request::get("/persons/1")
                .body(Empty::<Bytes>::new())
                .unwrap()
        };
        // Warm: the entry is stored, metric handles are registered.
        per_request(&cached, get).await;
        let bare = per_request(&handler(), get).await;
        let hit = per_request(&cached, get).await;
        let response = cached.clone().oneshot(get(0)).await.unwrap();
        let etag = response.headers()["etag"].clone();
        let not_modified = per_request(&cached, |_| {
            Request::get("/persons/1")
                .header("if-none-match", etag.clone())
                .body(Empty::<Bytes>::new())
                .unwrap()
        })
        .await;
        let miss = per_request(&cached, |round| {
            Request::get(format!("/persons/{}", round + 2))
                .body(Empty::<Bytes>::new())
                .unwrap()
        })
        .await;
        // The same hit from the in-process tier (feature `tier`).
        #[cfg(feature = "tier")]
        let in_process = {
            let policy = Policy::builder()
                .route(
                    Route::get("/persons/{id}")
                        .key("person:{id}")
                        .in_process(std::time::Duration::from_secs(60)),
                )
                .build()
                .unwrap();
            let tiered = CacheLayer::new(policy).layer(handler());
            per_request(&tiered, get).await;
            Some(per_request(&tiered, get).await)
        };
        #[cfg(not(feature = "tier"))]
        let in_process: Option<f64> = None;
        let metrics = if cfg!(feature = "metrics") {
            "on"
        } else {
            "off"
        };
        println!(
            "allocations per request (memory store, metrics {metrics}, {ROUNDS} requests each):"
        );
        println!("  bare handler          {bare:.2}");
        println!("  hit                   {hit:.2}");
        println!("  hit, 304              {not_modified:.2}");
        println!("  miss + store          {miss:.2}");
        if let Some(in_process) = in_process {
            println!("  hit, in-process tier  {in_process:.2}");
        }
    });
}
