//! A persons CRUD API (persons with addresses and phones, per tenant),
//! cached end to end: SQLite behind, the cache in front, tenant-scoped
//! keys, invalidation on every write, Prometheus metrics at `/metrics`.
//!
//! The cache set-up is all in `cache.rs`; `main.rs` wires the router (the
//! cache inside authentication) and shuts down as a production server
//! should; `api.rs` holds the handlers, `db.rs` SQLite, `auth.rs` the
//! tokens, `admin.rs` the probes and operator endpoints.
//!
//! Run with:
//!
//! ```sh
//! cargo run --release --example persons
//! # with Redis instead of the in-process store:
//! REDIS_URL=redis://127.0.0.1:6379/0 cargo run --release --example persons
//! # with a Redis Cluster (comma-separated seed nodes):
//! REDIS_CLUSTER_URLS=redis://127.0.0.1:7000,redis://127.0.0.1:7001 cargo run --release --example persons
//! ```
//!
//! Environment (all optional): `PERSONS_ADDR` (127.0.0.1:3000), `REDIS_URL`,
//! `REDIS_CLUSTER_URLS` (cluster seeds; wins over `REDIS_URL`),
//! `REDIS_SENTINEL_URLS` and `REDIS_SENTINEL_MASTER` (`mymaster`: the
//! master Sentinel names; wins over `REDIS_URL`), `REDIS_SUBSCRIBE_URLS`
//! (with Sentinel and `CACHE_IN_PROCESS_MS`: the servers of the master's
//! replication group the tier hears invalidations through), `CACHE_HEDGE` (`off`;
//! `budget`: a lookup slower than the later of the lookups' p95 and the
//! handler's time lets the handler answer, for at most 5% of a route's
//! requests; `on`: every lookup slower than the handler),
//! `CACHE=on|off` (on), `CACHE_TTL_PERSON_SECONDS` (300),
//! `CACHE_TTL_LIST_SECONDS` (60), `CACHE_NAMESPACE` (app),
//! `CACHE_REDIS_TIMEOUT_MS` (100), `CACHE_IN_PROCESS_MS` (off; with a
//! value, both routes are also kept in process for at most that long, the
//! in-process tier), `CACHE_VERIFY_RATE` (0.001: the share of hits also
//! checked against the handler in the background, which counts and heals
//! entries a write outside the API left stale; 0 turns it off),
//! `CACHE_PROBE_RATE` (0.01: the share of writes whose invalidation is
//! read back 1 s and 10 s later; 0 turns it off),
//! `PERSONS_TOKENS` (`token=tenant,…`; demo
//! tokens when unset), `PERSONS_ADMIN_TOKEN` (the admin endpoints' bearer
//! token; generated and printed when unset), `PERSONS_DB` (a SQLite file; in
//! memory when unset), `PERSONS_SEED` (sample persons per tenant, 2000),
//! `PERSONS_DRAIN_SECONDS` (10), `RUST_LOG` (info).
//!
//! Admin endpoints (`Authorization: Bearer <admin token>`, JSON bodies):
//! `POST /cache/invalidate` `{"group":"persons:list","tenant":"acme"}`
//! (tenant optional: every tenant), `POST /cache/purge`
//! `{"path":"/persons/1","tenant":"acme"}`, `POST /cache/warm`
//! `{"paths":["/persons/1","/persons?limit=5"],"tenant":"acme"}`. The
//! operator reads `GET /cache/stats` and `GET /metrics` need the same
//! token (compared in constant time); `/health` and `/cache/health` are
//! open, for probes.
//!
//! On SIGTERM or Ctrl-C it stops accepting connections, lets the requests
//! in flight finish (a write's invalidation with it), then waits up to
//! `PERSONS_DRAIN_SECONDS` (10) for the invalidations Redis did not confirm
//! to be replayed, and exits: a rolling deploy loses no write's
//! invalidation while Redis answers within that time.

mod admin;
mod api;
mod auth;
mod cache;
mod db;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::middleware;
use axum::routing::{delete, get, post};
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rusqlite::Connection;
use tower_redis_cache::{CacheHandle, CacheLayer, Policy};

/// The tenant a bearer token belongs to, set by the auth middleware.
#[derive(Clone, Debug)]
pub(crate) struct Tenant(pub(crate) String);

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct App {
    pub(crate) db: Arc<Mutex<Connection>>,
    pub(crate) tokens: Arc<HashMap<String, String>>,
    pub(crate) admin_token: Arc<str>,
    pub(crate) cache: Option<CacheHandle>,
    /// The cached routes without authentication, for warming the cache.
    pub(crate) warm_target: Arc<OnceLock<Router>>,
}

pub(crate) fn env(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// A comma-separated list, trimmed, without empty items.
pub(crate) fn list(value: &str) -> Vec<&str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

pub(crate) fn env_u64(name: &str, default: u64) -> u64 {
    env(name, &default.to_string()).parse().unwrap_or_else(|_| {
        eprintln!("{name} must be a whole number; using {default}");
        default
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // Installed before the policy serves anything: the cache registers its
    // metric handles on first use.
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("duration_seconds".into()),
            &[
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full("tower_redis_cache_verify_stale_seconds".into()),
            &[1.0, 10.0, 60.0, 600.0, 3600.0],
        )?
        .install_recorder()?;
    let addr = env("PERSONS_ADDR", "127.0.0.1:3000");
    let tokens = auth::parse_tokens(&env(
        "PERSONS_TOKENS",
        "demo-token-acme=acme,demo-token-globex=globex",
    ));
    if tokens.is_empty() {
        return Err("PERSONS_TOKENS has no `token=tenant` pair".into());
    }
    let mut tenants: Vec<String> = tokens.values().cloned().collect();
    tenants.sort();
    tenants.dedup();
    let db_path = std::env::var("PERSONS_DB").ok().filter(|p| !p.is_empty());
    let db = db::open_db(db_path.as_deref(), env_u64("PERSONS_SEED", 2000), &tenants)?;

    let cache = cache::from_env()?;
    let policy = cache.as_ref().map(|(policy, _)| policy.clone());
    let (admin_token, admin_generated) = match std::env::var("PERSONS_ADMIN_TOKEN") {
        Ok(token) if !token.is_empty() => (token, false),
        _ => (auth::generated_token(), true),
    };
    let app = App {
        db: Arc::new(Mutex::new(db)),
        tokens: Arc::new(tokens.clone()),
        admin_token: admin_token.clone().into(),
        cache: policy.as_ref().map(Policy::handle),
        warm_target: Arc::default(),
    };
    let router = router(&app, policy.as_ref(), prometheus);

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("persons API on http://{}", listener.local_addr()?);
    match &cache {
        Some((_, store)) => println!("cache: on, store: {store}"),
        None => println!("cache: off, store: memory"),
    }
    let per_tenant = env_u64("PERSONS_SEED", 2000);
    let mut tenant_list: Vec<_> = tokens.iter().collect();
    tenant_list.sort_by(|a, b| a.1.cmp(b.1));
    for (token, tenant) in tenant_list {
        // Ids are assigned tenant by tenant, in name order, on a fresh database.
        let first = tenants.iter().position(|t| t == tenant).unwrap_or(0) as u64 * per_tenant + 1;
        println!(
            "  curl -H 'Authorization: Bearer {token}' http://{addr}/persons/{first}   # tenant {tenant}"
        );
    }
    if admin_generated {
        println!("admin token (set PERSONS_ADMIN_TOKEN to choose one): {admin_token}");
    }
    println!(
        "  curl -X POST -H 'Authorization: Bearer {admin_token}' -H 'content-type: application/json' -d '{{\"group\":\"persons:list\"}}' http://{addr}/cache/invalidate"
    );
    // Stops accepting on SIGTERM or Ctrl-C; returns once the requests in
    // flight have answered.
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    if let Some(handle) = &app.cache {
        let within = Duration::from_secs(env_u64("PERSONS_DRAIN_SECONDS", 10));
        match handle.drain(within).await {
            0 => println!("shut down: every invalidation applied"),
            left => eprintln!(
                "shut down with {left} invalidation keys not applied: other processes may serve them until their entries expire"
            ),
        }
    }
    Ok(())
}

/// The routes: the persons API behind authentication, the cache inside it
/// (`.layer(cache)` before `.layer(auth)`, so every request, hit or miss,
/// is authenticated first and carries its tenant); the operator endpoints
/// behind the admin token; the probes open.
fn router(app: &App, policy: Option<&Policy>, prometheus: PrometheusHandle) -> Router {
    let mut persons = Router::new()
        .route("/persons", get(api::list_persons).post(api::create_person))
        .route(
            "/persons/{id}",
            get(api::get_person)
                .patch(api::update_person)
                .delete(api::delete_person),
        )
        .route("/persons/{id}/addresses", post(api::add_address))
        .route(
            "/persons/{id}/addresses/{address_id}",
            delete(api::delete_address),
        )
        .route("/persons/{id}/phones", post(api::add_phone))
        .route("/persons/{id}/phones/{phone_id}", delete(api::delete_phone));
    if let Some(policy) = policy {
        persons = persons.layer(CacheLayer::new(policy.clone()));
    }
    let _ = app.warm_target.set(persons.clone().with_state(app.clone()));
    let admin = Router::new()
        .route("/cache/invalidate", post(admin::admin_invalidate))
        .route("/cache/purge", post(admin::admin_purge))
        .route("/cache/warm", post(admin::admin_warm))
        // Operator reads need the admin token too: counters per route and
        // Prometheus text (scrape with `authorization: {credentials: ...}`).
        .route("/cache/stats", get(admin::cache_stats))
        .route(
            "/metrics",
            get(move || std::future::ready(prometheus.render())),
        )
        .layer(middleware::from_fn_with_state(
            app.clone(),
            auth::require_admin,
        ));
    persons
        .layer(middleware::from_fn_with_state(
            app.clone(),
            auth::authenticate,
        ))
        .merge(admin)
        .route("/health", get(admin::health))
        .route("/cache/health", get(admin::cache_health))
        .with_state(app.clone())
}

/// SIGTERM (what an orchestrator sends) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    println!("shutting down: finishing the requests in flight");
}
