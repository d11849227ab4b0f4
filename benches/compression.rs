//! What compressed entries save and cost, on the persons example's list
//! responses (`GET /persons?limit=20` and `?limit=100`, same shape): the
//! stored bytes with and without compression (printed), and a hit through
//! `CacheLayer` on the memory store: an uncompressed entry; a compressed
//! one decoded for a client that does not accept its coding; and one sent
//! as stored to a client that does (zstd, gzip), with the bytes each sends.
//!
//! Run with `cargo bench --features compression --bench compression`.

use http_body_util::Empty;
use std::convert::Infallible;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};
use tower_redis_cache::store::{MemoryStore, Observed, Store};
use tower_redis_cache::{CacheLayer, Coding, Policy, Route};

/// A persons list page as the example serves it.
fn persons_page(limit: usize) -> Bytes {
    let first = [
        "Ana", "Bruno", "Carla", "Diego", "Elisa", "Fábio", "Gabriela", "Hugo",
    ];
    let last = ["Silva", "Souza", "Oliveira", "Santos", "Lima"];
    let cities = ["São Paulo", "Rio de Janeiro", "Belo Horizonte", "Curitiba"];
    let items: Vec<String> = (0..limit)
        .map(|i| {
            let name = first[i % first.len()];
            format!(
                r#"{{"addresses":[{{"city":"{}","id":{},"street":"Rua {i}"}}],"email":"{}.{i}@acme.example","id":{},"name":"{name} {} {i}","phones":[{{"id":{},"number":"+55 11 9{:04}-{:04}"}}]}}"#,
                cities[i % cities.len()],
                i + 1,
                name.to_lowercase(),
                i + 1,
                last[i % last.len()],
                i + 1,
                (i * 37) % 10_000,
                (i * 91) % 10_000,
            )
        })
        .collect();
    Bytes::from(format!(
        r#"{{"items":[{}],"limit":{limit},"skip":0,"total":2000}}"#,
        items.join(",")
    ))
}

fn layer(compress_over: usize, coding: Coding) -> CacheLayer {
    CacheLayer::new(policy(MemoryStore::new(), compress_over, coding))
}

fn policy(store: MemoryStore, compress_over: usize, coding: Coding) -> Policy {
    Policy::builder()
        .store(store)
        .route(Route::get("/persons").key("persons:list:{query_hash}"))
        .compress_over(compress_over)
        .compress_with(coding)
        .build()
        .unwrap()
}

/// What the handler answers.
type Answer = Result<Response<Full<Bytes>>, Infallible>;

/// A handler that answers `page` as JSON.
fn answering(
    page: Bytes,
) -> impl tower::Service<
    Request<Empty<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = std::future::Ready<Answer>,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |_req: Request<Empty<Bytes>>| {
        let mut response = Response::new(Full::new(page.clone()));
        response
            .headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        std::future::ready(Ok::<_, Infallible>(response))
    })
}

/// The bytes the memory store keeps for `page`, stored compressed (zstd)
/// over `compress_over`: one miss through the layer, then the entry read
/// back through the `Store` API.
async fn stored_bytes(page: Bytes, compress_over: usize) -> usize {
    let store = MemoryStore::new();
    let policy = policy(store.clone(), compress_over, Coding::Zstd);
    let request = || {
        Request::get("/persons")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let cached = CacheLayer::new(policy.clone()).layer(answering(page));
    let response = cached.oneshot(request()).await.unwrap();
    response.into_body().collect().await.unwrap();
    let key = policy.key_for(&request()).unwrap();
    for _ in 0..100 {
        if let Observed::Value(entry) = store.lookup(&key).await.unwrap().entry() {
            if entry.len() > 64 {
                return entry.len();
            }
        }
        tokio::task::yield_now().await;
    }
    unreachable!("the miss stored no entry")
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for limit in [20, 100] {
        let body = persons_page(limit);
        let plain = runtime.block_on(stored_bytes(body.clone(), usize::MAX));
        let packed = runtime.block_on(stored_bytes(body.clone(), 1024));
        println!(
            "persons list, limit={limit}: body {} B; entry {plain} B plain, {packed} B compressed ({:.1}x smaller, {:.0}% saved)",
            body.len(),
            plain as f64 / packed as f64,
            100.0 * (1.0 - packed as f64 / plain as f64),
        );
        let modes = [
            ("plain entry", usize::MAX, Coding::Zstd, "gzip, zstd"),
            (
                "zstd entry, client without zstd",
                1024,
                Coding::Zstd,
                "gzip",
            ),
            (
                "zstd entry, client accepts zstd",
                1024,
                Coding::Zstd,
                "gzip, zstd",
            ),
            ("gzip entry, client without gzip", 1024, Coding::Gzip, ""),
            (
                "gzip entry, client accepts gzip",
                1024,
                Coding::Gzip,
                "gzip",
            ),
        ];
        for (label, compress_over, coding, accept) in modes {
            let cached = layer(compress_over, coding).layer(answering(body.clone()));
            let request = move || {
                let mut request = Request::get(format!("/persons?limit={limit}"));
                if !accept.is_empty() {
                    request = request.header("accept-encoding", accept);
                }
                request.body(Empty::<Bytes>::new()).unwrap()
            };
            let sent = runtime.block_on(async {
                for _ in 0..2 {
                    let response = cached.clone().oneshot(request()).await.unwrap();
                    let sent = response.into_body().collect().await.unwrap().to_bytes();
                    if sent.is_empty() {
                        unreachable!("an empty body");
                    }
                }
                let response = cached.clone().oneshot(request()).await.unwrap();
                response
                    .into_body()
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes()
                    .len()
            });
            println!("persons list, limit={limit}, {label}: {sent} B sent per hit");
            c.bench_function(&format!("hit, persons list limit={limit}, {label}"), |b| {
                b.to_async(&runtime).iter(|| async {
                    let response = cached.clone().oneshot(request()).await.unwrap();
                    response.into_body().collect().await.unwrap()
                })
            });
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
