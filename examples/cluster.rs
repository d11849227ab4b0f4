//! A Redis Cluster behind the cache (feature `cluster`). Keys are laid out
//! so that a version key and every entry under it share one slot: a hit is
//! still one round trip, to the node that owns the entry.
//!
//! Run, with the cluster's seed nodes (see `docs/deploying.md` for a loopback
//! cluster of three masters; `REDIS_CLUSTER_URLS` is required):
//!
//! ```sh
//! REDIS_CLUSTER_URLS=redis://127.0.0.1:7000,redis://127.0.0.1:7001 cargo run --release --example cluster
//! # then, from another shell:
//! curl -i localhost:3000/articles/hello                  # x-cache: MISS
//! curl -i localhost:3000/articles/hello                  # x-cache: HIT
//! curl -i -X PUT localhost:3000/articles/hello -d 'Hi!'  # purges it, bumps the index
//! curl -i localhost:3000/articles                        # the index, fresh
//! ```
//!
//! `EXAMPLE_ADDR` sets the address (default `127.0.0.1:3000`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tower_redis_cache::store::{RedisSource, RedisStore};
use tower_redis_cache::{CacheLayer, Policy, Route, Rule};

/// Articles by slug.
type Articles = Arc<Mutex<BTreeMap<String, String>>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seeds = std::env::var("REDIS_CLUSTER_URLS")
        .map_err(|_| "set REDIS_CLUSTER_URLS to the cluster's seed nodes")?;
    // Fails here, with the reason, when no seed answers.
    let store = RedisStore::builder(RedisSource::cluster(seeds.split(','))).build()?;
    store.connect().await?;
    let policy = Policy::builder()
        .store(store)
        .route(
            Route::get("/articles/{slug}")
                .key("article:{slug}")
                .ttl(Duration::from_secs(600)),
        )
        .route(
            Route::get("/articles")
                .key("articles:v{version}")
                .versioned_by("articles"),
        )
        .on(Rule::new("PUT /articles/{slug}")
            .purge("GET /articles/{slug}")
            .bump("articles"))
        .build()?;

    let articles: Articles = Arc::new(Mutex::new(BTreeMap::from([(
        "hello".to_owned(),
        "Hello, world".to_owned(),
    )])));
    let app = Router::new()
        .route("/articles", get(index))
        .route("/articles/{slug}", get(read).put(write))
        .layer(CacheLayer::new(policy))
        .with_state(articles);

    let addr = std::env::var("EXAMPLE_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{addr}");
    axum::serve(listener, app).await?;
    Ok(())
}

async fn read(State(db): State<Articles>, Path(slug): Path<String>) -> (StatusCode, Json<Value>) {
    match db.lock().unwrap().get(&slug) {
        Some(text) => (StatusCode::OK, Json(json!({ "slug": slug, "text": text }))),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "no such article" })),
        ),
    }
}

async fn index(State(db): State<Articles>) -> Json<Value> {
    Json(json!({ "slugs": db.lock().unwrap().keys().collect::<Vec<_>>() }))
}

async fn write(State(db): State<Articles>, Path(slug): Path<String>, text: String) -> StatusCode {
    db.lock().unwrap().insert(slug, text);
    StatusCode::NO_CONTENT
}
