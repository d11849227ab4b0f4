//! Redis, one cache for many tenants: each tenant's entries are keyed by
//! its scope, and a tenant's write invalidates that tenant's pages only.
//!
//! Run (a redis-server 7.0 or later on localhost; `REDIS_URL` defaults to
//! `redis://127.0.0.1:6379/0`):
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379/0 cargo run --release --example redis_tenants
//! # then, from another shell:
//! curl -i -H 'authorization: Bearer acme' localhost:3000/projects      # MISS, then HIT
//! curl -i -H 'authorization: Bearer globex' localhost:3000/projects    # MISS: another tenant
//! curl -i -X POST -H 'authorization: Bearer acme' localhost:3000/projects -d 'launch'
//! curl -i -H 'authorization: Bearer acme' localhost:3000/projects      # MISS: acme's write
//! curl -i -H 'authorization: Bearer globex' localhost:3000/projects    # still a HIT
//! ```
//!
//! `EXAMPLE_ADDR` sets the address (default `127.0.0.1:3000`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde_json::{json, Value};
use tower_redis_cache::store::RedisStore;
use tower_redis_cache::{CacheLayer, Policy, Route, Rule, Scope};

/// The tenant the authentication layer found, for the handlers and the
/// cache's scope alike.
#[derive(Clone)]
struct Tenant(String);

/// Projects per tenant.
type Projects = Arc<Mutex<HashMap<String, Vec<String>>>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    // Fails here, with the reason, when Redis is unreachable or refuses us.
    let store = RedisStore::builder(&url).build()?;
    store.connect().await?;
    let tenant = || Scope::new().extension(|ext| ext.get::<Tenant>().map(|t| t.0.clone()));
    let policy = Policy::builder()
        .store(store)
        .route(
            Route::get("/projects")
                .key("projects:v{version}")
                .versioned_by("projects")
                .per_scope()
                .ttl(Duration::from_secs(60))
                .scope(tenant()),
        )
        .route(
            Route::get("/projects/{n}")
                .key("project:{n}")
                .scope(tenant()),
        )
        .on(Rule::new("POST /projects").bump("projects"))
        .build()?;

    let app = Router::new()
        .route("/projects", get(list).post(create))
        .route("/projects/{n}", get(read))
        // Inside authentication: every request carries its tenant here.
        .layer(CacheLayer::new(policy))
        .layer(middleware::from_fn(authenticate))
        .with_state(Projects::default());

    let addr = std::env::var("EXAMPLE_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{addr}, cache in {url}");
    axum::serve(listener, app).await?;
    Ok(())
}

/// A stand-in for real authentication: the bearer token names the tenant.
async fn authenticate(mut request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric()));
    match token {
        Some(tenant) => {
            let tenant = Tenant(tenant.to_owned());
            request.extensions_mut().insert(tenant);
            next.run(request).await
        }
        None => (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": "bearer token required" })),
        )
            .into_response(),
    }
}

async fn list(State(db): State<Projects>, Extension(t): Extension<Tenant>) -> Json<Value> {
    let names = db.lock().unwrap().get(&t.0).cloned().unwrap_or_default();
    Json(json!({ "tenant": t.0, "projects": names }))
}

async fn read(
    State(db): State<Projects>,
    Extension(t): Extension<Tenant>,
    Path(n): Path<usize>,
) -> (StatusCode, Json<Value>) {
    match db.lock().unwrap().get(&t.0).and_then(|names| names.get(n)) {
        Some(name) => (StatusCode::OK, Json(json!({ "n": n, "name": name }))),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "no such project" })),
        ),
    }
}

async fn create(
    State(db): State<Projects>,
    Extension(t): Extension<Tenant>,
    name: String,
) -> StatusCode {
    db.lock().unwrap().entry(t.0).or_default().push(name);
    StatusCode::CREATED
}
