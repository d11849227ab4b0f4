//! The cache on a plain tower service served by hyper: no axum. The layers
//! match paths themselves, so any `Service<Request<B>>` can be cached.
//!
//! Run:
//!
//! ```sh
//! cargo run --release --example plain_hyper
//! # then, from another shell:
//! curl -i localhost:3000/prices/EUR                  # x-cache: MISS
//! curl -i localhost:3000/prices/EUR                  # x-cache: HIT
//! curl -i -X POST localhost:3000/prices/EUR -d 1.10  # purges it
//! curl -i localhost:3000/prices/EUR                  # MISS, the new price
//! ```
//!
//! `EXAMPLE_ADDR` sets the address (default `127.0.0.1:3000`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_redis_cache::{CacheLayer, Canonical, Policy, Route, Rule};

/// Prices per currency code, in cents.
type Prices = Arc<Mutex<HashMap<String, u64>>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prices: Prices = Arc::new(Mutex::new(HashMap::from([("EUR".to_owned(), 108)])));
    let policy = Policy::builder() // no store: the memory store
        .route(
            Route::get("/prices/{code}")
                .key("price:{code}")
                // The handler upper-cases the code: `eur` and `EUR` are one entry.
                .param(
                    "code",
                    Canonical::with(|code| Some(code.to_ascii_uppercase())),
                )
                .ttl(Duration::from_secs(30)),
        )
        .on(Rule::new("POST /prices/{code}").purge("GET /prices/{code}"))
        .build()?;
    let service = ServiceBuilder::new()
        .layer(CacheLayer::new(policy))
        .service_fn(move |request| handle(prices.clone(), request));

    let addr = std::env::var("EXAMPLE_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{addr}");
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(err) = connection.await {
                eprintln!("connection: {err}");
            }
        });
    }
}

async fn handle(
    prices: Prices,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let code = match request.uri().path().strip_prefix("/prices/") {
        Some(code) if !code.is_empty() => code.to_ascii_uppercase(),
        _ => {
            return Ok(json(
                StatusCode::NOT_FOUND,
                r#"{"error":"not found"}"#.into(),
            ))
        }
    };
    if request.method() == Method::POST {
        let body = request.into_body().collect().await.map(|b| b.to_bytes());
        let cents = body
            .ok()
            .and_then(|b| std::str::from_utf8(&b).ok()?.trim().parse::<f64>().ok());
        return Ok(match cents {
            Some(price) if price >= 0.0 => {
                prices
                    .lock()
                    .unwrap()
                    .insert(code, (price * 100.0).round() as u64);
                json(StatusCode::OK, r#"{"updated":true}"#.into())
            }
            _ => json(
                StatusCode::BAD_REQUEST,
                r#"{"error":"a price, such as 1.10"}"#.into(),
            ),
        });
    }
    let price = prices.lock().unwrap().get(&code).copied();
    Ok(match price {
        Some(cents) => json(
            StatusCode::OK,
            format!(r#"{{"code":"{code}","cents":{cents}}}"#),
        ),
        None => json(
            StatusCode::NOT_FOUND,
            r#"{"error":"no such currency"}"#.into(),
        ),
    })
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}
