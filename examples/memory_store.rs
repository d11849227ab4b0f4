//! An axum app cached in this process: the memory store, no Redis.
//!
//! Run:
//!
//! ```sh
//! cargo run --release --example memory_store
//! # then, from another shell:
//! curl -i localhost:3000/notes/1                   # x-cache: MISS
//! curl -i localhost:3000/notes/1                   # x-cache: HIT
//! curl -i -X PUT localhost:3000/notes/1 -d 'new'   # purges /notes/1, bumps the list
//! curl -i localhost:3000/notes/01                  # MISS, then HIT: `01` and `1` are one note
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
use tower_redis_cache::store::MemoryStore;
use tower_redis_cache::{CacheLayer, Canonical, Policy, Route, Rule};

/// The "database": note id to text.
type Notes = Arc<Mutex<BTreeMap<u64, String>>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let notes: Notes = Arc::new(Mutex::new(BTreeMap::from([
        (1, "buy milk".to_owned()),
        (2, "call the bank".to_owned()),
    ])));

    let policy = Policy::builder()
        // 10 000 entries or 64 MiB, whichever comes first.
        .store(MemoryStore::new())
        .route(
            Route::get("/notes/{id}")
                .key("note:{id}")
                // The handler reads `Path<u64>`: `/notes/01` is note 1.
                .param("id", Canonical::integer())
                .ttl(Duration::from_secs(300)),
        )
        .route(
            Route::get("/notes")
                .key("notes:v{version}:{query_hash}")
                .versioned_by("notes")
                .query_allowlist(["limit"]),
        )
        .on(Rule::new("PUT|DELETE /notes/{id}")
            .purge("GET /notes/{id}")
            .bump("notes"))
        .build()?;

    let app = Router::new()
        .route("/notes", get(list))
        .route("/notes/{id}", get(read).put(write).delete(remove))
        .layer(CacheLayer::new(policy))
        .with_state(notes);

    let addr = std::env::var("EXAMPLE_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{addr}");
    axum::serve(listener, app).await?;
    Ok(())
}

async fn read(State(notes): State<Notes>, Path(id): Path<u64>) -> (StatusCode, Json<Value>) {
    match notes.lock().unwrap().get(&id) {
        Some(text) => (StatusCode::OK, Json(json!({ "id": id, "text": text }))),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "no such note" })),
        ),
    }
}

async fn list(State(notes): State<Notes>) -> Json<Value> {
    let notes = notes.lock().unwrap();
    let items: Vec<Value> = notes
        .iter()
        .map(|(id, text)| json!({ "id": id, "text": text }))
        .collect();
    Json(json!({ "items": items }))
}

async fn write(State(notes): State<Notes>, Path(id): Path<u64>, text: String) -> StatusCode {
    notes.lock().unwrap().insert(id, text);
    StatusCode::NO_CONTENT
}

async fn remove(State(notes): State<Notes>, Path(id): Path<u64>) -> StatusCode {
    match notes.lock().unwrap().remove(&id) {
        Some(_) => StatusCode::NO_CONTENT,
        None => StatusCode::NOT_FOUND,
    }
}
