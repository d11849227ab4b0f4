//! A miss whose handler streams its body (a large export, an upstream
//! relayed as it comes): the client gets the head and the first chunk
//! as they come, the whole body intact, and the next read is a hit; a
//! client that goes away mid-way stores nothing. On every store.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, Response};
use axum::routing::get;
use axum::Router;
use common::{send, Backend};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower_redis_cache::store::Store;
use tower_redis_cache::{CacheLayer, Policy, Route};

const CHUNKS: usize = 10;
const APART: Duration = Duration::from_millis(50);

/// `[0,1,…]` as JSON, one element per chunk, `apart` between chunks;
/// `produced` runs as each chunk is made.
fn chunked(apart: Duration, produced: impl Fn() + Clone + Send + Sync + 'static) -> Response<Body> {
    let chunks = futures_util::stream::unfold(0, move |i| {
        let produced = produced.clone();
        async move {
            if i > CHUNKS {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(apart).await;
            }
            produced();
            let chunk = match i {
                0 => "[".to_owned(),
                i if i == CHUNKS => format!("{}]", i - 1),
                i => format!("{},", i - 1),
            };
            Some((Ok::<_, std::io::Error>(chunk), i + 1))
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(chunks))
        .unwrap()
}

/// The export, `APART` between chunks, its calls counted.
fn export(calls: Arc<AtomicUsize>) -> Response<Body> {
    calls.fetch_add(1, Ordering::SeqCst);
    chunked(APART, || {})
}

fn whole() -> String {
    let items: Vec<String> = (0..CHUNKS).map(|i| i.to_string()).collect();
    format!("[{}]", items.join(","))
}

fn app(backend: &Backend, calls: Arc<AtomicUsize>) -> Router {
    cached(
        backend,
        get(move || {
            let calls = calls.clone();
            async move { export(calls) }
        }),
    )
}

/// `/export/{n}` cached 60 s under `export:{n}`.
fn export_policy(backend: &Backend) -> Policy {
    Policy::builder()
        .store(backend.store.clone())
        .route(
            Route::get("/export/{n}")
                .key("export:{n}")
                .ttl(Duration::from_secs(60)),
        )
        .build()
        .unwrap()
}

/// `/export/{n}` served by `handler` behind `policy`.
fn served(policy: &Policy, handler: axum::routing::MethodRouter) -> Router {
    Router::new()
        .route("/export/{n}", handler)
        .layer(CacheLayer::new(policy.clone()))
}

/// `/export/{n}` served by `handler`, cached 60 s under `export:{n}`.
fn cached(backend: &Backend, handler: axum::routing::MethodRouter) -> Router {
    served(&export_policy(backend), handler)
}

fn export_req(n: usize) -> Request<Body> {
    Request::get(format!("/export/{n}"))
        .body(Body::empty())
        .unwrap()
}

/// How long the first body chunk of a read of `/export/{n}` takes.
async fn first_chunk(app: &Router, n: usize) -> Duration {
    let started = Instant::now();
    let response = tower::ServiceExt::oneshot(app.clone(), export_req(n))
        .await
        .unwrap();
    let mut body = response.into_body();
    loop {
        let frame = body.frame().await.expect("a chunk").unwrap();
        if frame.is_data() {
            return started.elapsed();
        }
    }
}

/// `app` served over HTTP/1.1 on a loopback port, as a client meets it.
async fn serve(app: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// How long a client waits for the first body chunk of `/export/{n}` over
/// a fresh connection to `addr` (the request sent to the `[` received).
async fn first_chunk_over_http(addr: std::net::SocketAddr, n: usize) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let request = format!("GET /export/{n} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    let started = Instant::now();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0; 4096];
    loop {
        let read = stream.read(&mut buf).await.unwrap();
        assert!(read > 0, "the response ended before its first chunk");
        seen.extend_from_slice(&buf[..read]);
        let head_end = seen.windows(4).position(|w| w == b"\r\n\r\n");
        if head_end.is_some_and(|end| seen[end + 4..].contains(&b'[')) {
            return started.elapsed();
        }
    }
}

/// The median of `reads` times, `read(n)` timing a cold read of key `n`
/// from `from` on (a key each, the client gone after the first chunk).
async fn median_of<F: std::future::Future<Output = Duration>>(
    from: usize,
    reads: usize,
    read: impl Fn(usize) -> F,
) -> Duration {
    let mut times = Vec::new();
    for n in from..from + reads {
        times.push(read(n).await);
    }
    times.sort();
    times[times.len() / 2]
}

/// The time to the first body chunk, and the whole body.
async fn first_chunk_then_all(app: &Router, n: usize) -> (Duration, String, String) {
    let started = Instant::now();
    let response = tower::ServiceExt::oneshot(app.clone(), export_req(n))
        .await
        .unwrap();
    let status = response
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let mut body = response.into_body();
    let mut all = Vec::new();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            first.get_or_insert_with(|| started.elapsed());
            all.extend_from_slice(&data);
        }
    }
    (first.unwrap(), status, String::from_utf8(all).unwrap())
}

async fn a_streamed_miss_reaches_the_client_as_it_comes(backend: Backend) {
    let calls = Arc::new(AtomicUsize::new(0));
    let bare = Router::new().route(
        "/export/{n}",
        get({
            let calls = calls.clone();
            move || {
                let calls = calls.clone();
                async move { export(calls) }
            }
        }),
    );
    // A connection up, as on a server that has been serving.
    backend.store.ping().await.unwrap();
    let app = app(&backend, calls.clone());
    // Warm both paths, then time cold keys: a key each, 15 reads, in
    // process and over HTTP.
    first_chunk(&bare, 0).await;
    first_chunk(&app, 0).await;
    let without = median_of(1, 15, |n| first_chunk(&bare, n)).await;
    let through = median_of(1, 15, |n| first_chunk(&app, n)).await;
    let (bare_addr, app_addr) = (serve(bare.clone()).await, serve(app.clone()).await);
    first_chunk_over_http(bare_addr, 20).await;
    first_chunk_over_http(app_addr, 20).await;
    let http_without = median_of(21, 15, |n| first_chunk_over_http(bare_addr, n)).await;
    let http_through = median_of(21, 15, |n| first_chunk_over_http(app_addr, n)).await;
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-6);
    eprintln!(
        "first chunk of a cold read, median of 15: in process {through:?} through the cache, \
         {without:?} without ({:.2}x); over HTTP {http_through:?}, {http_without:?} without \
         ({:.2}x); the whole body takes {:?}",
        ratio(through, without),
        ratio(http_through, http_without),
        APART * CHUNKS as u32
    );
    calls.store(0, Ordering::SeqCst);
    let (_, status, body) = first_chunk_then_all(&app, 100).await;
    assert!(status.contains("detail=streamed"), "{status}");
    assert_eq!(body, whole(), "the body intact");
    // The entry is written once the body ended.
    let mut x_cache = String::new();
    for _ in 0..100 {
        let (_, seen, body) = send(&app, export_req(100)).await;
        x_cache = seen;
        if x_cache == "HIT" {
            assert_eq!(body, whole());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(x_cache, "HIT");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one call for the miss and the hits after it"
    );
}

async fn a_stream_the_client_dropped_stores_nothing(backend: Backend) {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = app(&backend, calls.clone());
    let response = tower::ServiceExt::oneshot(app.clone(), export_req(1))
        .await
        .unwrap();
    let mut body = response.into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    drop(body);
    tokio::time::sleep(APART * CHUNKS as u32).await;
    let (_, x_cache, _) = send(&app, export_req(1)).await;
    assert_eq!(x_cache, "MISS", "a cut body was stored");
}

/// A handler streaming `CHUNKS` chunks `apart`, counting its calls and the
/// chunks it produced so far.
#[derive(Default)]
struct Producer {
    calls: AtomicUsize,
    produced: AtomicUsize,
}

fn app_streaming(backend: &Backend, producer: Arc<Producer>, apart: Duration) -> Router {
    cached(
        backend,
        get(move || {
            let producer = producer.clone();
            async move {
                producer.calls.fetch_add(1, Ordering::SeqCst);
                chunked(apart, move || {
                    producer.produced.fetch_add(1, Ordering::SeqCst);
                })
            }
        }),
    )
}

/// Eight readers arriving 20 ms apart on a cold key whose handler streams
/// for 2 s: one handler call; the seven that joined its flight get the
/// leader's body as it comes (their first chunk while the handler has
/// most of its body still to produce), each body whole. First-chunk times
/// are printed, never asserted.
async fn followers_of_a_streamed_miss_read_it_as_it_comes(backend: Backend) {
    const READERS: usize = 8;
    let producer = Arc::new(Producer::default());
    backend.store.ping().await.unwrap();
    let app = app_streaming(&backend, producer.clone(), Duration::from_millis(200));
    let started = Instant::now();
    let readers: Vec<_> = (0..READERS)
        .map(|i| {
            let (app, producer) = (app.clone(), producer.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20) * i as u32).await;
                let response = tower::ServiceExt::oneshot(app, export_req(1))
                    .await
                    .unwrap();
                let status = response
                    .headers()
                    .get("cache-status")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let mut body = response.into_body();
                let (mut all, mut first) = (Vec::new(), None);
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.unwrap().into_data() {
                        first.get_or_insert_with(|| {
                            (started.elapsed(), producer.produced.load(Ordering::SeqCst))
                        });
                        all.extend_from_slice(&data);
                    }
                }
                (status, first.unwrap(), String::from_utf8(all).unwrap())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for reader in readers {
        answers.push(reader.await.unwrap());
    }
    assert_eq!(producer.calls.load(Ordering::SeqCst), 1, "one handler call");
    let leader = answers
        .iter()
        .position(|(status, ..)| status.contains("detail=streamed"))
        .expect("a leader");
    let leader_first = answers[leader].1 .0;
    let mut lags = Vec::new();
    for (i, (status, (first, produced), body)) in answers.iter().enumerate() {
        assert_eq!(*body, whole(), "reader {i}: {status}");
        if i != leader {
            assert!(status.contains("collapsed"), "reader {i}: {status}");
            assert!(
                *produced < CHUNKS,
                "reader {i} got its first chunk only once {produced} of {} were produced",
                CHUNKS + 1
            );
            lags.push(first.saturating_sub(leader_first.max(Duration::from_millis(20) * i as u32)));
        }
    }
    eprintln!(
        "streamed miss, {READERS} readers 20 ms apart, 2 s body: followers' first chunk \
         {lags:?} after the later of the leader's first chunk and their arrival"
    );
}

/// A leader whose client goes away mid-stream cuts its followers' bodies
/// with an error (never a short body that looks whole), and nothing is
/// stored: the next read is a miss.
async fn a_cut_stream_cuts_its_followers_too(backend: Backend) {
    let producer = Arc::new(Producer::default());
    backend.store.ping().await.unwrap();
    let app = app_streaming(&backend, producer.clone(), Duration::from_millis(50));
    let leader = tower::ServiceExt::oneshot(app.clone(), export_req(2))
        .await
        .unwrap();
    let mut leader = leader.into_body();
    leader.frame().await.unwrap().unwrap();
    let mut followers = Vec::new();
    for _ in 0..3 {
        let response = tower::ServiceExt::oneshot(app.clone(), export_req(2))
            .await
            .unwrap();
        let status = response.headers()["cache-status"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(status.contains("collapsed"), "{status}");
        let mut body = response.into_body();
        body.frame().await.unwrap().unwrap();
        followers.push(body);
    }
    leader.frame().await.unwrap().unwrap();
    drop(leader);
    for mut body in followers {
        let ended = loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(err)) => break Some(err.to_string()),
                None => break None,
            }
        };
        let err = ended.expect("a follower's body ended as if whole");
        assert!(err.contains("cut"), "{err}");
    }
    assert_eq!(producer.calls.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, x_cache, body) = send(&app, export_req(2)).await;
    assert_eq!(
        (x_cache.as_str(), body),
        ("MISS", whole()),
        "a cut body was stored"
    );
}

/// A reader on another `Host` that arrives while a streamed miss of the
/// same key is under way never reads that stream: the entry is bound to
/// the leader's `Host`, so it calls the handler itself and gets its own
/// body, whatever the two bodies say.
async fn a_follower_on_another_host_gets_its_own_stream(backend: Backend) {
    use futures_util::StreamExt;
    let calls = Arc::new(AtomicUsize::new(0));
    backend.store.ping().await.unwrap();
    let counted = calls.clone();
    let policy = export_policy(&backend);
    let handler = get(move |headers: axum::http::HeaderMap| {
        let calls = counted.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let host = headers[header::HOST].to_str().unwrap().to_owned();
            let chunks = [format!("[\"{host}\""), ",\"a\"".into(), ",\"b\"]".into()];
            let chunks = futures_util::stream::iter(chunks).then(|chunk| async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok::<_, std::io::Error>(chunk)
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from_stream(chunks))
                .unwrap()
        }
    });
    let app = served(&policy, handler);
    let read = |host: &'static str, after: Duration| {
        let app = app.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let request = Request::get("/export/3")
                .header(header::HOST, host)
                .body(Body::empty())
                .unwrap();
            let response = tower::ServiceExt::oneshot(app, request).await.unwrap();
            let status = response.headers()["cache-status"]
                .to_str()
                .unwrap()
                .to_owned();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(body.to_vec()).unwrap())
        })
    };
    let leader = read("a.example", Duration::ZERO);
    let other = read("b.example", Duration::from_millis(20));
    let (leader, other) = (leader.await.unwrap(), other.await.unwrap());
    assert_eq!(leader.1, r#"["a.example","a","b"]"#, "{}", leader.0);
    assert_eq!(other.1, r#"["b.example","a","b"]"#, "{}", other.0);
    assert!(leader.0.contains("detail=streamed"), "{}", leader.0);
    assert!(!other.0.contains("collapsed"), "{}", other.0);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let why: Vec<_> = policy
        .stats()
        .route("GET /export/{n}")
        .unwrap()
        .handler_calls
        .iter()
        .map(|(why, n)| (why.as_str(), *n))
        .collect();
    assert_eq!(why, [("miss", 1), ("other-variant", 1)]);
}

backend_tests!(
    a_streamed_miss_reaches_the_client_as_it_comes,
    a_stream_the_client_dropped_stores_nothing,
    followers_of_a_streamed_miss_read_it_as_it_comes,
    a_cut_stream_cuts_its_followers_too,
    a_follower_on_another_host_gets_its_own_stream,
);
