//! Peer anchor: one JSON endpoint on a plain hyper server, served bare, behind
//! tower-http-cache (Redis or memory backend), behind hitbox (hitbox-tower with
//! the hitbox-redis or hitbox-moka backend), or, built with the `ours`
//! feature, behind tower-redis-cache (Redis or memory store).
//! Usage: peer-harness <nocache|floor-headers|floor-redis|floor-cluster|thc-redis|thc-memory|hbx-redis|hbx-memory|arc-memory|ours-redis|ours-memory|ours-tier|ours-cluster> <port> [redis_url | cluster_urls]
//! (`arc-memory`: axum-response-cache 0.4, which takes axum's request and
//! response types only: the same handler, as an axum service.)
//! (`ours-tier`: tower-redis-cache over Redis with its in-process tier;
//! `ours-cluster`: over a Redis Cluster, whose seed URLs the third argument
//! lists, comma separated.)
//! With PEER_CALLS_PORT=<port> set, a connection to 127.0.0.1:<port> reads
//! how many times the handler ran and how many heap allocations the
//! process made so far (`<calls> <allocations>`, decimal, then the
//! connection closes): a cached mode whose count grows under load is not
//! serving hits. Allocations are counted only between a connection that
//! sends `count` and one that sends `quiet` (counting costs an atomic add
//! per allocation, shared by every thread: never on while throughput is
//! measured). Ours modes add a third word: the handler's calls by why
//! each was made (`miss:1,store-error:12`, tower-redis-cache's
//! `RouteStats::handler_calls` summed over its routes; `-` when none).
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tower::util::BoxCloneService;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_http_cache::prelude::*;

#[derive(Debug)]
struct E(String);
impl std::fmt::Display for E {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(&self.0) }
}
impl std::error::Error for E {}
fn e(err: BoxError) -> E { E(err.to_string()) }

type UnsyncBoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, E>;
type Svc = BoxCloneService<Request<hyper::body::Incoming>, Response<UnsyncBoxBody>, E>;

fn body() -> Bytes {
    Bytes::from(format!(
        "{{\"id\":1,\"name\":\"Ada Lovelace\",\"email\":\"ada@example.com\",\"addresses\":[{{\"id\":1,\"street\":\"Rua Augusta 1\",\"city\":\"Sao Paulo\"}}],\"phones\":[{{\"id\":1,\"number\":\"+55 11 5555-0000\"}}],\"pad\":\"{}\"}}",
        "x".repeat(400)
    ))
}

static HANDLER_CALLS: AtomicU64 = AtomicU64::new(0);

/// The counters of tower-redis-cache's policy, in ours modes.
#[cfg(feature = "ours")]
static OURS: std::sync::OnceLock<tower_redis_cache::CacheStats> = std::sync::OnceLock::new();

/// Ours modes: the handler's calls by why, summed over the routes.
fn reasons() -> String {
    #[cfg(feature = "ours")]
    if let Some(stats) = OURS.get() {
        let mut sums: Vec<(&'static str, u64)> = Vec::new();
        for route in stats.snapshot() {
            for (why, n) in route.handler_calls {
                match sums.iter_mut().find(|(w, _)| *w == why.as_str()) {
                    Some((_, total)) => *total += n,
                    None => sums.push((why.as_str(), n)),
                }
            }
        }
        if !sums.is_empty() {
            return sums.iter().map(|(w, n)| format!("{w}:{n}")).collect::<Vec<_>>().join(",");
        }
    }
    "-".to_owned()
}

/// The system allocator, counting allocations once asked to.
struct Counting;

static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        std::alloc::System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        std::alloc::System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        std::alloc::System.realloc(ptr, layout, size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Generic over the request body only because hitbox hands its upstream a
/// `Request<BufferedBody<Incoming>>`; every mode runs this same function.
async fn handler<B>(_req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    HANDLER_CALLS.fetch_add(1, Ordering::Relaxed);
    Ok(Response::builder().header("content-type", "application/json").body(Full::new(body())).unwrap())
}

#[tokio::main]
async fn main() {
    use http_body_util::BodyExt;
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_else(|| "nocache".into());
    let port: u16 = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(3100);
    let base = tower::service_fn(handler::<hyper::body::Incoming>);
    let svc: Svc = match mode.as_str() {
        "nocache" => BoxCloneService::new(
            base.map_response(|r: Response<Full<Bytes>>| r.map(|b| b.map_err(|x| match x {}).boxed_unsync()))
                .map_err(|x: Infallible| -> E { match x {} }),
        ),
        "thc-memory" => {
            let layer = CacheLayer::builder(InMemoryBackend::new(10_000)).ttl(Duration::from_secs(300)).build();
            BoxCloneService::new(
                ServiceBuilder::new().layer(layer).service(base)
                    .map_response(|r| r.map(|b| b.map_err(|x| e(x.into())).boxed_unsync()))
                    .map_err(|x| e(x.into())),
            )
        }
        "thc-redis" => {
            let url = args.get(3).cloned().unwrap_or_else(|| "redis://127.0.0.1:6379/0".into());
            let client = redis::Client::open(url).expect("redis url");
            let manager = client.get_connection_manager().await.expect("connect");
            let layer = CacheLayer::builder(RedisBackend::new(manager)).ttl(Duration::from_secs(300)).build();
            BoxCloneService::new(
                ServiceBuilder::new().layer(layer).service(base)
                    .map_response(|r| r.map(|b| b.map_err(|x| e(x.into())).boxed_unsync()))
                    .map_err(|x| e(x.into())),
            )
        }
        "hbx-memory" | "hbx-redis" => hbx(&mode, args.get(3).cloned()),
        "arc-memory" => arc(),
        "floor-headers" | "floor-redis" | "floor-cluster" => floor(&mode, args.get(3).cloned()).await,
        "ours-memory" | "ours-redis" | "ours-tier" | "ours-cluster" => ours(&mode, args.get(3).cloned(), base),
        other => panic!("unknown mode {other}"),
    };
    if let Some(calls_port) = std::env::var("PEER_CALLS_PORT").ok().and_then(|p| p.parse::<u16>().ok()) {
        let calls = tokio::net::TcpListener::bind(("127.0.0.1", calls_port)).await.unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut stream, _)) = calls.accept().await {
                // `count` turns allocation counting on, `quiet` off;
                // anything else (or nothing, within 50 ms) just reads.
                let mut ask = [0u8; 5];
                if let Ok(Ok(5)) = tokio::time::timeout(Duration::from_millis(50), stream.read_exact(&mut ask)).await {
                    match &ask {
                        b"count" => COUNTING.store(true, Ordering::Relaxed),
                        b"quiet" => COUNTING.store(false, Ordering::Relaxed),
                        _ => {}
                    }
                }
                let count = format!(
                    "{} {} {}",
                    HANDLER_CALLS.load(Ordering::Relaxed),
                    ALLOCATIONS.load(Ordering::Relaxed),
                    reasons()
                );
                let _ = stream.write_all(count.as_bytes()).await;
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let svc = svc.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
            let _ = conn.await;
        });
    }
}

/// The headers a hit from tower-redis-cache's in-process tier adds to the
/// handler's (the values of the harness's `/item`): every floor mode sends them.
const HIT_HEADERS: [(&str, &str); 4] = [
    ("etag", "\"913ac1094e741ba8cf4bff87fcc979ac\""),
    ("age", "0"),
    ("x-cache", "HIT"),
    ("cache-status", "tower-redis-cache; hit; ttl=300; detail=in-process"),
];

/// Floors, no cache: what a hit cannot cost less than. `floor-headers`:
/// the handler's response plus the headers a hit carries. `floor-redis`
/// and `floor-cluster`: the body read with one `GET` per request through
/// one redis-rs multiplexed connection (a cluster connection for
/// `floor-cluster`), sent with those headers; the handler does not run.
async fn floor(mode: &str, url: Option<String>) -> Svc {
    match mode {
        "floor-headers" => BoxCloneService::new(tower::service_fn(|req: Request<hyper::body::Incoming>| async move {
            Ok(with_hit_headers(handler(req).await.map_err(|x| -> E { match x {} })?))
        })),
        "floor-redis" => {
            let url = url.unwrap_or_else(|| "redis://127.0.0.1:6379/0".into());
            let client = redis::Client::open(url).expect("redis url");
            let conn = client.get_multiplexed_async_connection().await.expect("connect");
            BoxCloneService::new(floor_get(conn, "floor:item").await)
        }
        _ => {
            let seeds = url.expect("cluster seed URLs, comma separated");
            let client = redis::cluster::ClusterClient::new(seeds.split(',').collect::<Vec<_>>()).expect("cluster seeds");
            let conn = client.get_async_connection().await.expect("connect");
            BoxCloneService::new(floor_get(conn, "{floor}item").await)
        }
    }
}

/// `response` with the headers a hit carries added, as static values (no
/// allocation: the floor's own cost is the least it can be).
fn with_hit_headers(mut response: Response<Full<Bytes>>) -> Response<UnsyncBoxBody> {
    use http::header::{HeaderName, HeaderValue};
    use http_body_util::BodyExt;
    let headers = response.headers_mut();
    for (name, value) in HIT_HEADERS {
        headers.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    response.map(|body| body.map_err(|x| match x {}).boxed_unsync())
}

/// Stores the handler's body under `key`, then serves `GET key` per request.
async fn floor_get<C>(mut conn: C, key: &'static str) -> impl tower::Service<
    Request<hyper::body::Incoming>, Response = Response<UnsyncBoxBody>, Error = E, Future: Send> + Clone + Send + Sync + 'static
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    use redis::AsyncCommands;
    let _: () = conn.set(key, body().to_vec()).await.expect("SET");
    tower::service_fn(move |_req: Request<hyper::body::Incoming>| {
        let mut conn = conn.clone();
        async move {
            let body: Vec<u8> = conn.get(key).await.map_err(|x| E(x.to_string()))?;
            let response = Response::builder().header("content-type", "application/json");
            Ok(with_hit_headers(response.body(Full::new(Bytes::from(body))).unwrap()))
        }
    })
}

/// axum-response-cache on the same handler, kept 300 s: the layer wants
/// axum's `Request<Body>` and `axum::response::Response`, so the handler
/// runs as an axum service (its body boxed into axum's `Body`), and hyper's
/// request body becomes an axum `Body` on the way in.
fn arc() -> Svc {
    use http_body_util::BodyExt;
    let inner = tower::service_fn(|req: Request<axum::body::Body>| async move {
        let response = handler(req).await?;
        Ok::<_, Infallible>(response.map(axum::body::Body::new))
    });
    let cached = ServiceBuilder::new()
        .layer(axum_response_cache::CacheLayer::with_lifespan(Duration::from_secs(300)))
        .service(inner);
    BoxCloneService::new(
        cached
            .map_request(|req: Request<hyper::body::Incoming>| req.map(axum::body::Body::new))
            .map_response(|r: axum::response::Response| r.map(|b| b.map_err(|x| E(x.to_string())).boxed_unsync()))
            .map_err(|x: Infallible| -> E { match x {} }),
    )
}

/// hitbox on the same handler: GET /item and GET /list (request predicates:
/// method GET, path `/{route:item|list}`), 200 responses only, kept 300 s.
/// hitbox caches nothing unless told: its config builder needs a request
/// predicate, a response predicate and a key extractor. The key holds the
/// method and the path pattern's captures only (here `route`, `item` or
/// `list`), so the path predicate is what keeps other routes off these
/// entries. /list is a plain entry to hitbox (it has no versioned routes).
/// Both backends store serialized entries and decode one per hit; bincode
/// for both (hitbox-redis's default and the format hitbox recommends;
/// hitbox-moka defaults to JSON, about a third of bincode's req/s).
fn hbx(mode: &str, url: Option<String>) -> Svc {
    use http_body_util::BodyExt;
    use hitbox::policy::PolicyConfig;
    use hitbox::Config;
    use hitbox_http::extractors::{path::PathExtractor as _, Method as MethodKey};
    use hitbox_http::predicates::request::{Method, PathPredicate as _};
    use hitbox_http::predicates::response::StatusCode;
    use hitbox_http::BufferedBody;
    use hitbox_tower::Cache;
    const ROUTES: &str = "/{route:item|list}";
    let base = tower::service_fn(handler::<BufferedBody<hyper::body::Incoming>>);
    let config = Config::builder()
        .request_predicate(Method::new(http::Method::GET).expect("method").path(ROUTES.to_string()))
        .response_predicate(StatusCode::new(http::StatusCode::OK))
        .extractor(MethodKey::new().path(ROUTES))
        .policy(PolicyConfig::builder().ttl(Duration::from_secs(300)).build())
        .build();
    macro_rules! boxed {
        ($layer:expr) => {
            BoxCloneService::new(
                ServiceBuilder::new().layer($layer).service(base)
                    .map_response(|r| r.map(|b| b.map_err(|x: Infallible| -> E { match x {} }).boxed_unsync()))
                    .map_err(|x: Infallible| -> E { match x {} }),
            )
        };
    }
    match mode {
        "hbx-memory" => {
            let backend = hitbox_moka::MokaBackend::builder()
                .max_entries(10_000)
                .value_format(hitbox_backend::format::BincodeFormat)
                .build();
            boxed!(Cache::builder().backend(backend).config(config).build())
        }
        _ => {
            let url = url.unwrap_or_else(|| "redis://127.0.0.1:6379/0".into());
            let backend = hitbox_redis::RedisBackend::builder()
                .connection(hitbox_redis::ConnectionMode::single(url))
                .build()
                .expect("redis backend");
            boxed!(Cache::builder().backend(backend).config(config).build())
        }
    }
}

/// tower-redis-cache on the same handler: `/item`, kept 300 s under the key
/// `<mode>:item`, and `/list`, a versioned route (group `list`) as list
/// endpoints use. `ours-tier` keeps both in process too, for at most 1 s;
/// `ours-cluster` stores them on a Redis Cluster.
#[cfg(feature = "ours")]
fn ours<S>(mode: &str, url: Option<String>, base: S) -> Svc
where
    S: tower::Service<Request<hyper::body::Incoming>, Response = Response<Full<Bytes>>, Error = Infallible>
        + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    use http_body_util::BodyExt;
    use tower_redis_cache::store::{MemoryStore, RedisSource, RedisStore};
    use tower_redis_cache::{CacheLayer, Policy, Route};
    let tier = |route: Route| match mode {
        "ours-tier" => route.in_process(Duration::from_secs(1)),
        _ => route,
    };
    // Each mode its own namespace: entries are bound to the request's
    // `Host`, which names each mode's port, so two modes over one Redis
    // sharing `app:item` would replace each other's entry every round
    // (handler calls counted as `other-variant`).
    let builder = Policy::builder()
        .namespace(mode)
        .route(tier(Route::get("/item").key("item").ttl(Duration::from_secs(300))))
        .route(tier(
            Route::get("/list")
                .key("list:v{version}")
                .versioned_by("list")
                .ttl(Duration::from_secs(300)),
        ));
    let builder = match mode {
        "ours-memory" => builder.store(MemoryStore::new()),
        "ours-cluster" => {
            let seeds = url.expect("cluster seed URLs, comma separated");
            builder.store(RedisStore::builder(RedisSource::cluster(seeds.split(','))).build().expect("cluster seeds"))
        }
        _ => {
            let url = url.unwrap_or_else(|| "redis://127.0.0.1:6379/0".into());
            builder.store(RedisStore::builder(&url).build().expect("redis url"))
        }
    };
    let policy = builder.build().expect("policy");
    let _ = OURS.set(policy.stats());
    let layer = CacheLayer::new(policy);
    BoxCloneService::new(
        ServiceBuilder::new().layer(layer).service(base)
            .map_response(|r| r.map(|b| b.map_err(e).boxed_unsync()))
            .map_err(|x: Infallible| -> E { match x {} }),
    )
}

#[cfg(not(feature = "ours"))]
fn ours<S>(mode: &str, _url: Option<String>, _base: S) -> Svc {
    panic!("mode {mode} needs the `ours` feature and a tower-redis-cache dependency (see Cargo.toml)")
}
