//! A persons CRUD API (persons with addresses and phones, per tenant),
//! cached end to end: SQLite behind, the cache in front, tenant-scoped
//! keys, invalidation on every write, Prometheus metrics at `/metrics`.
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
//! master Sentinel names; wins over `REDIS_URL`), `CACHE_HEDGE=on` (a
//! lookup slower than the handler lets the handler answer),
//! `CACHE=on|off` (on), `CACHE_TTL_PERSON_SECONDS` (300),
//! `CACHE_TTL_LIST_SECONDS` (60), `CACHE_NAMESPACE` (app),
//! `CACHE_REDIS_TIMEOUT_MS` (100), `CACHE_IN_PROCESS_MS` (off; with a
//! value, both routes are also kept in process for at most that long, the
//! in-process tier), `CACHE_VERIFY_RATE` (0.001: the share of hits also
//! checked against the handler in the background, which counts and heals
//! entries a write outside the API left stale; 0 turns it off),
//! `PERSONS_TOKENS` (`token=tenant,…`; demo
//! tokens when unset), `PERSONS_ADMIN_TOKEN` (the admin endpoints' bearer
//! token; generated and printed when unset), `PERSONS_DB` (a SQLite file; in
//! memory when unset), `PERSONS_SEED` (sample persons per tenant, 2000),
//! `RUST_LOG` (info).
//!
//! Admin endpoints (`Authorization: Bearer <admin token>`, JSON bodies):
//! `POST /cache/invalidate` `{"group":"persons:list","tenant":"acme"}`
//! (tenant optional: every tenant), `POST /cache/purge`
//! `{"path":"/persons/1","tenant":"acme"}`, `POST /cache/warm`
//! `{"paths":["/persons/1","/persons?limit=5"],"tenant":"acme"}`. The
//! operator reads `GET /cache/stats` and `GET /metrics` need the same
//! token (compared in constant time); `/health` and `/cache/health` are
//! open, for probes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use serde_json::{json, Value};
use tower_redis_cache::store::{RedisSource, RedisStore, Store};
use tower_redis_cache::{CacheHandle, CacheLayer, HandleError, Policy, Route, Rule, Scope};

/// The tenant a bearer token belongs to, set by the auth middleware.
#[derive(Clone, Debug)]
struct Tenant(String);

#[derive(Clone)]
struct App {
    db: Arc<Mutex<Connection>>,
    tokens: Arc<HashMap<String, String>>,
    admin_token: Arc<str>,
    cache: Option<CacheHandle>,
    /// The cached routes without authentication, for warming the cache.
    warm_target: Arc<OnceLock<Router>>,
}

/// A 4xx/5xx with a JSON body.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "person not found".into())
}

impl From<rusqlite::Error> for ApiError {
    fn from(err: rusqlite::Error) -> Self {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("database error: {err}"),
        )
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        ApiError(rejection.status(), rejection.body_text())
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn env(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// A comma-separated list, trimmed, without empty items.
fn list(value: &str) -> Vec<&str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

fn env_u64(name: &str, default: u64) -> u64 {
    env(name, &default.to_string()).parse().unwrap_or_else(|_| {
        eprintln!("{name} must be a whole number; using {default}");
        default
    })
}

/// A positive id in its one canonical spelling (`061` and `+61` are
/// refused), so one row has one URL and one cache key.
fn id(raw: &str) -> ApiResult<i64> {
    match raw.parse::<i64>() {
        Ok(id) if id > 0 && id.to_string() == raw => Ok(id),
        _ => Err(bad_request(format!(
            "`{raw}` is not a valid id: use a positive whole number without sign or leading zeros"
        ))),
    }
}

// ---------------------------------------------------------------- database

fn open_db(
    path: Option<&str>,
    per_tenant: u64,
    tenants: &[String],
) -> rusqlite::Result<Connection> {
    let conn = match path {
        Some(path) => Connection::open(path)?,
        None => Connection::open_in_memory()?,
    };
    conn.execute_batch(
        "PRAGMA foreign_keys = ON;
         CREATE TABLE IF NOT EXISTS persons (id INTEGER PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, email TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS addresses (id INTEGER PRIMARY KEY, person_id INTEGER NOT NULL REFERENCES persons(id) ON DELETE CASCADE, street TEXT NOT NULL, city TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS phones (id INTEGER PRIMARY KEY, person_id INTEGER NOT NULL REFERENCES persons(id) ON DELETE CASCADE, number TEXT NOT NULL);",
    )?;
    let existing: i64 = conn.query_row("SELECT COUNT(*) FROM persons", [], |r| r.get(0))?;
    if existing == 0 {
        const FIRST: [&str; 8] = [
            "Ana", "Bruno", "Carla", "Diego", "Elisa", "Fábio", "Gabriela", "Heitor",
        ];
        const LAST: [&str; 6] = ["Silva", "Souza", "Oliveira", "Santos", "Lima", "Costa"];
        let tx = conn.unchecked_transaction()?;
        for tenant in tenants {
            for i in 0..per_tenant as usize {
                let name = format!(
                    "{} {} {i}",
                    FIRST[i % FIRST.len()],
                    LAST[i / FIRST.len() % LAST.len()]
                );
                let email = format!(
                    "{}.{i}@{tenant}.example",
                    FIRST[i % FIRST.len()].to_lowercase()
                );
                tx.execute(
                    "INSERT INTO persons (tenant, name, email) VALUES (?1, ?2, ?3)",
                    params![tenant, name, email],
                )?;
                let person = tx.last_insert_rowid();
                tx.execute(
                    "INSERT INTO addresses (person_id, street, city) VALUES (?1, ?2, 'São Paulo')",
                    params![person, format!("Rua {i}")],
                )?;
            }
        }
        tx.commit()?;
    }
    Ok(conn)
}

/// A person as the API returns it (this is what gets cached).
fn load_person(conn: &Connection, tenant: &str, id: i64) -> ApiResult<Option<Value>> {
    let person = conn
        .query_row(
            "SELECT id, name, email FROM persons WHERE id = ?1 AND tenant = ?2",
            params![id, tenant],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            },
        )
        .optional()?;
    let Some((id, name, email)) = person else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT id, street, city FROM addresses WHERE person_id = ?1 ORDER BY id",
    )?;
    let addresses: Vec<Value> = stmt
        .query_map([id], |r| Ok(json!({"id": r.get::<_, i64>(0)?, "street": r.get::<_, String>(1)?, "city": r.get::<_, String>(2)?})))?
        .collect::<Result<_, _>>()?;
    let mut stmt =
        conn.prepare_cached("SELECT id, number FROM phones WHERE person_id = ?1 ORDER BY id")?;
    let phones: Vec<Value> = stmt
        .query_map([id], |r| {
            Ok(json!({"id": r.get::<_, i64>(0)?, "number": r.get::<_, String>(1)?}))
        })?
        .collect::<Result<_, _>>()?;
    Ok(Some(
        json!({"id": id, "name": name, "email": email, "addresses": addresses, "phones": phones}),
    ))
}

// ---------------------------------------------------------------- handlers

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<String>,
    skip: Option<String>,
    name: Option<String>,
    email: Option<String>,
    sort: Option<String>,
}

fn number(name: &str, raw: Option<&str>, default: i64, max: i64) -> ApiResult<i64> {
    match raw.filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(raw) => match raw.parse::<i64>() {
            Ok(n) if (0..=max).contains(&n) => Ok(n),
            _ => Err(bad_request(format!(
                "`{name}` must be a whole number from 0 to {max}"
            ))),
        },
    }
}

async fn list_persons(
    State(app): State<App>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = query.map_err(|e| bad_request(e.body_text()))?;
    let limit = number("limit", q.limit.as_deref(), 20, 100)?;
    let skip = number("skip", q.skip.as_deref(), 0, i64::MAX)?;
    let order = match q.sort.as_deref().filter(|s| !s.is_empty()).unwrap_or("id") {
        "id" => "id",
        "-id" => "id DESC",
        "name" => "name, id",
        "-name" => "name DESC, id",
        "email" => "email, id",
        "-email" => "email DESC, id",
        other => {
            return Err(bad_request(format!(
                "unknown sort `{other}`; use id, name or email, optionally with `-`"
            )))
        }
    };
    let like = |v: &Option<String>| format!("%{}%", v.as_deref().unwrap_or(""));
    let conn = app.db.lock().unwrap();
    let filter = "tenant = ?1 AND name LIKE ?2 AND email LIKE ?3";
    let total: i64 = conn.query_row(
        &format!("SELECT COUNT(*) FROM persons WHERE {filter}"),
        params![tenant, like(&q.name), like(&q.email)],
        |r| r.get(0),
    )?;
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT id FROM persons WHERE {filter} ORDER BY {order} LIMIT ?4 OFFSET ?5"
    ))?;
    let ids: Vec<i64> = stmt
        .query_map(
            params![tenant, like(&q.name), like(&q.email), limit, skip],
            |r| r.get(0),
        )?
        .collect::<Result<_, _>>()?;
    let items: Vec<Value> = ids
        .into_iter()
        .map(|id| load_person(&conn, &tenant, id))
        .collect::<ApiResult<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    Ok(Json(
        json!({"items": items, "total": total, "limit": limit, "skip": skip}),
    ))
}

#[derive(Deserialize)]
struct NewPerson {
    name: String,
    email: String,
}

fn check_text(field: &str, value: &str) -> ApiResult<()> {
    if value.trim().is_empty() || value.len() > 200 {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("`{field}` must be 1 to 200 characters"),
        ));
    }
    Ok(())
}

async fn create_person(
    State(app): State<App>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    body: Result<Json<NewPerson>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(new) = body?;
    check_text("name", &new.name)?;
    check_text("email", &new.email)?;
    let conn = app.db.lock().unwrap();
    conn.execute(
        "INSERT INTO persons (tenant, name, email) VALUES (?1, ?2, ?3)",
        params![tenant, new.name, new.email],
    )?;
    let person = load_person(&conn, &tenant, conn.last_insert_rowid())?.ok_or_else(not_found)?;
    Ok((StatusCode::CREATED, Json(person)))
}

async fn get_person(
    State(app): State<App>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(raw): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = id(&raw)?;
    let conn = app.db.lock().unwrap();
    load_person(&conn, &tenant, id)?
        .map(Json)
        .ok_or_else(not_found)
}

#[derive(Deserialize)]
struct PersonPatch {
    name: Option<String>,
    email: Option<String>,
}

async fn update_person(
    State(app): State<App>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(raw): Path<String>,
    body: Result<Json<PersonPatch>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let id = id(&raw)?;
    let Json(patch) = body?;
    let conn = app.db.lock().unwrap();
    load_person(&conn, &tenant, id)?.ok_or_else(not_found)?;
    if let Some(name) = &patch.name {
        check_text("name", name)?;
        conn.execute(
            "UPDATE persons SET name = ?1 WHERE id = ?2",
            params![name, id],
        )?;
    }
    if let Some(email) = &patch.email {
        check_text("email", email)?;
        conn.execute(
            "UPDATE persons SET email = ?1 WHERE id = ?2",
            params![email, id],
        )?;
    }
    load_person(&conn, &tenant, id)?
        .map(Json)
        .ok_or_else(not_found)
}

async fn delete_person(
    State(app): State<App>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(raw): Path<String>,
) -> ApiResult<StatusCode> {
    let id = id(&raw)?;
    let conn = app.db.lock().unwrap();
    match conn.execute(
        "DELETE FROM persons WHERE id = ?1 AND tenant = ?2",
        params![id, tenant],
    )? {
        0 => Err(not_found()),
        _ => Ok(StatusCode::NO_CONTENT),
    }
}

#[derive(Deserialize)]
struct NewAddress {
    street: String,
    city: String,
}

#[derive(Deserialize)]
struct NewPhone {
    number: String,
}

/// Adds a row under a person of the tenant and answers with the person.
fn add_child(
    app: &App,
    tenant: &str,
    raw: &str,
    insert: impl FnOnce(&Connection, i64) -> rusqlite::Result<usize>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let id = id(raw)?;
    let conn = app.db.lock().unwrap();
    load_person(&conn, tenant, id)?.ok_or_else(not_found)?;
    insert(&conn, id)?;
    let person = load_person(&conn, tenant, id)?.ok_or_else(not_found)?;
    Ok((StatusCode::CREATED, Json(person)))
}

/// Removes a row under a person of the tenant.
fn remove_child(
    app: &App,
    tenant: &str,
    raw: &str,
    raw_child: &str,
    table: &str,
) -> ApiResult<StatusCode> {
    let (id, child) = (id(raw)?, id(raw_child)?);
    let conn = app.db.lock().unwrap();
    load_person(&conn, tenant, id)?.ok_or_else(not_found)?;
    let sql = format!("DELETE FROM {table} WHERE id = ?1 AND person_id = ?2");
    match conn.execute(&sql, params![child, id])? {
        0 => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("{table} entry not found"),
        )),
        _ => Ok(StatusCode::NO_CONTENT),
    }
}

async fn add_address(
    State(app): State<App>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(raw): Path<String>,
    body: Result<Json<NewAddress>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(a) = body?;
    check_text("street", &a.street)?;
    check_text("city", &a.city)?;
    add_child(&app, &tenant, &raw, |conn, id| {
        conn.execute(
            "INSERT INTO addresses (person_id, street, city) VALUES (?1, ?2, ?3)",
            params![id, a.street, a.city],
        )
    })
}

async fn add_phone(
    State(app): State<App>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(raw): Path<String>,
    body: Result<Json<NewPhone>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(p) = body?;
    check_text("number", &p.number)?;
    add_child(&app, &tenant, &raw, |conn, id| {
        conn.execute(
            "INSERT INTO phones (person_id, number) VALUES (?1, ?2)",
            params![id, p.number],
        )
    })
}

async fn delete_address(
    State(app): State<App>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path((raw, child)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    remove_child(&app, &tenant, &raw, &child, "addresses")
}

async fn delete_phone(
    State(app): State<App>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path((raw, child)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    remove_child(&app, &tenant, &raw, &child, "phones")
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn cache_health(State(app): State<App>) -> Json<Value> {
    let Some(handle) = &app.cache else {
        return Json(json!({"cache": "off"}));
    };
    let health = handle.health().await;
    let mut body = json!({
        "cache": "on",
        "store": health.store,
        "circuit": health.details.circuit.as_str(),
        "pending_invalidations": health.details.pending_invalidations,
    });
    body["redis"] = json!(match (health.store, health.reachable) {
        ("redis", true) => "ok",
        ("redis", false) => "down",
        _ => "not-configured",
    });
    if let Some(persistence) = health.details.persistence {
        body["persistence"] = json!(persistence);
    }
    if let Some(degraded) = health.details.degraded {
        body["degraded"] = json!(degraded);
    }
    if let Some(error) = health.error {
        body["error"] = json!(error);
    }
    if let Some(tier) = health.in_process {
        body["in_process"] = json!({"live": tier.live, "entries": tier.entries});
    }
    Json(body)
}

async fn cache_stats(State(app): State<App>) -> Json<Value> {
    let Some(handle) = &app.cache else {
        return Json(json!({"cache": "off"}));
    };
    let stats = handle.stats();
    let routes: Vec<Value> = stats
        .snapshot()
        .into_iter()
        .map(|r| {
            let skips: serde_json::Map<String, Value> = r
                .skips
                .iter()
                .map(|(reason, n)| (reason.as_str().to_owned(), json!(n)))
                .collect();
            json!({
                "route": r.route, "hits": r.hits, "in_process_hits": r.in_process_hits,
                "misses": r.misses, "stores": r.stores,
                "errors": r.errors, "skips": skips, "hit_rate": r.hit_rate,
                "mean_hit_us": r.mean_hit_latency.as_micros() as u64,
                "mean_miss_us": r.mean_miss_latency.as_micros() as u64,
                "verified": r.verified, "verify_mismatches": r.verify_mismatches,
                "last_mismatch_unix_ms": r.last_mismatch
                    .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|since| since.as_millis() as u64),
            })
        })
        .collect();
    let inv = stats.invalidations();
    Json(json!({
        "cache": "on",
        "routes": routes,
        "invalidations": {
            "applied": inv.applied, "failed": inv.failed,
            "skipped": inv.skipped, "unscoped": inv.unscoped,
        },
    }))
}

// ---------------------------------------------------------------- admin

#[derive(Deserialize)]
struct InvalidateBody {
    group: String,
    tenant: Option<String>,
}

#[derive(Deserialize)]
struct PurgeBody {
    path: String,
    tenant: Option<String>,
}

#[derive(Deserialize)]
struct WarmBody {
    paths: Vec<String>,
    tenant: Option<String>,
}

/// A GET of `path` as `tenant` would send it once authenticated.
fn tenant_request(path: &str, tenant: Option<&str>) -> ApiResult<Request> {
    let mut request = Request::get(path)
        .body(axum::body::Body::empty())
        .map_err(|_| bad_request(format!("`{path}` is not a valid path")))?;
    if !path.starts_with('/') {
        return Err(bad_request(format!("`{path}` must start with `/`")));
    }
    if let Some(tenant) = tenant {
        request.extensions_mut().insert(Tenant(tenant.to_owned()));
    }
    Ok(request)
}

fn cache_on(app: &App) -> ApiResult<&CacheHandle> {
    app.cache
        .as_ref()
        .ok_or_else(|| ApiError(StatusCode::CONFLICT, "the cache is off (CACHE=off)".into()))
}

fn handle_error(err: HandleError) -> ApiError {
    match err {
        HandleError::Store(err) => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the cache store failed: {err}"),
        ),
        HandleError::ScopeMissing | HandleError::NotCached => bad_request(format!(
            "{err}; cached routes are per tenant: give `tenant` and a cached path"
        )),
        other => bad_request(other.to_string()),
    }
}

/// `POST /cache/invalidate`: bumps a group, for one tenant or all.
async fn admin_invalidate(
    State(app): State<App>,
    body: Result<Json<InvalidateBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(body) = body?;
    let handle = cache_on(&app)?;
    let bumped = match &body.tenant {
        Some(tenant) => {
            let request = tenant_request("/", Some(tenant))?;
            handle.bump_for(&body.group, &request).await
        }
        None => handle.bump(&body.group).await,
    }
    .map_err(handle_error)?;
    Ok(Json(json!({
        "bumped": bumped, "group": body.group,
        "tenant": body.tenant.as_deref().unwrap_or("*"),
    })))
}

/// `POST /cache/purge`: purges the entry a GET of `path` would hit.
async fn admin_purge(
    State(app): State<App>,
    body: Result<Json<PurgeBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(body) = body?;
    let handle = cache_on(&app)?;
    let request = tenant_request(&body.path, body.tenant.as_deref())?;
    let purged = handle.purge(&request).await.map_err(handle_error)?;
    Ok(Json(json!({"purged": purged, "path": body.path})))
}

/// `POST /cache/warm`: fills the entries of `paths`, through the cached
/// routes, as `tenant`. Entries are bound to the host (and forwarded
/// headers) of the request that stored them: the warm requests carry those
/// of this admin request, which reaches the server the way clients do.
async fn admin_warm(
    State(app): State<App>,
    headers: axum::http::HeaderMap,
    body: Result<Json<WarmBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(body) = body?;
    let handle = cache_on(&app)?;
    let Some(tenant) = body.tenant.as_deref() else {
        return Err(bad_request(
            "`tenant` is required: cached routes are per tenant",
        ));
    };
    if body.paths.len() > 1000 {
        return Err(bad_request("at most 1000 paths per call"));
    }
    let requests = body
        .paths
        .iter()
        .map(|path| {
            let mut request = tenant_request(path, Some(tenant))?;
            for (name, value) in &headers {
                let name_text = name.as_str();
                if name_text == "host"
                    || name_text == "forwarded"
                    || name_text.starts_with("x-forwarded-")
                {
                    request.headers_mut().append(name.clone(), value.clone());
                }
            }
            Ok(request)
        })
        .collect::<ApiResult<Vec<_>>>()?;
    let Some(target) = app.warm_target.get().cloned() else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting up".into(),
        ));
    };
    let report = handle.warm(target, requests).await;
    Ok(Json(json!({
        "requested": body.paths.len(), "stored": report.stored,
        "already_cached": report.already_cached, "not_stored": report.not_stored,
        "failed": report.failed,
    })))
}

/// Admin endpoints need `Authorization: Bearer <admin token>`.
async fn require_admin(State(app): State<App>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !given.is_some_and(|given| same_secret(given.as_bytes(), app.admin_token.as_bytes())) {
        return ApiError(StatusCode::UNAUTHORIZED, "admin token required".into()).into_response();
    }
    next.run(request).await
}

/// Compares a secret in time that does not depend on where the two first
/// differ, so response times do not reveal the token byte by byte.
fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    let mut differ = given.len() ^ secret.len();
    for (i, &byte) in secret.iter().enumerate() {
        differ |= usize::from(byte ^ given.get(i).copied().unwrap_or(!byte));
    }
    std::hint::black_box(differ) == 0
}

/// `Authorization: Bearer <token>` → the token's tenant; anything else is a 401.
async fn authenticate(State(app): State<App>, mut request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token.and_then(|t| app.tokens.get(t)) {
        Some(tenant) => {
            request.extensions_mut().insert(Tenant(tenant.clone()));
            next.run(request).await
        }
        None => ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or unknown bearer token".into(),
        )
        .into_response(),
    }
}

// ---------------------------------------------------------------- wiring

fn tenant_scope() -> Scope {
    Scope::new().extension(|ext| ext.get::<Tenant>().map(|t| t.0.clone()))
}

/// The whole cache configuration: tenant-scoped items and per-tenant list
/// groups, and what each write invalidates.
fn cache_policy(
    namespace: &str,
    person_ttl: u64,
    list_ttl: u64,
    in_process: Option<Duration>,
    verify_rate: f64,
    hedge: bool,
    redis: Option<Arc<dyn Store>>,
) -> Result<Policy, tower_redis_cache::ConfigError> {
    // The in-process tier, when asked for: each route's entries also kept
    // in this process for at most `bound`. A share of the hits checked
    // against the handler: the handlers only read.
    let local = |route: Route| {
        let route = route.verify(verify_rate);
        // A slow Redis never makes a request slower than no cache.
        let route = if hedge { route.hedge() } else { route };
        match in_process {
            Some(bound) => route.in_process(bound),
            None => route,
        }
    };
    let item_and_lists = |route: &str| {
        Rule::new(route)
            .purge("GET /persons/{id}")
            .bump("persons:list")
    };
    let mut policy = Policy::builder()
        .namespace(namespace)
        .route(local(
            Route::get("/persons/{id}")
                .key("person:{id}")
                .ttl(Duration::from_secs(person_ttl))
                .scope(tenant_scope()),
        ))
        .route(local(
            Route::get("/persons")
                .key("persons:list:v{version}:{query_hash}")
                .versioned_by("persons:list")
                .per_scope()
                .query_allowlist(["limit", "skip", "name", "email", "sort"])
                .ttl(Duration::from_secs(list_ttl))
                .scope(tenant_scope()),
        ))
        .on(Rule::new("POST /persons").bump("persons:list"))
        .on(item_and_lists("PATCH|DELETE /persons/{id}"))
        .on(item_and_lists("POST /persons/{id}/addresses"))
        .on(item_and_lists(
            "DELETE /persons/{id}/addresses/{address_id}",
        ))
        .on(item_and_lists("POST /persons/{id}/phones"))
        .on(item_and_lists("DELETE /persons/{id}/phones/{phone_id}"));
    if let Some(redis) = redis {
        policy = policy.store(redis);
    }
    policy.build()
}

/// A token for the admin endpoints when none is configured.
fn generated_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    let second = std::collections::hash_map::RandomState::new().hash_one(hasher.finish());
    format!("admin-{:016x}{second:016x}", hasher.finish())
}

fn parse_tokens(raw: &str) -> HashMap<String, String> {
    raw.split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(token, tenant)| (token.trim().to_owned(), tenant.trim().to_owned()))
        .filter(|(token, tenant)| !token.is_empty() && !tenant.is_empty())
        .collect()
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
        .install_recorder()?;
    let addr = env("PERSONS_ADDR", "127.0.0.1:3000");
    let tokens = parse_tokens(&env(
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
    let db = open_db(db_path.as_deref(), env_u64("PERSONS_SEED", 2000), &tenants)?;

    let cache_on = !env("CACHE", "on").eq_ignore_ascii_case("off");
    let deadline = Duration::from_millis(env_u64("CACHE_REDIS_TIMEOUT_MS", 100));
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (redis, store_name): (Option<Arc<dyn Store>>, _) = match (
        var("REDIS_CLUSTER_URLS"),
        var("REDIS_SENTINEL_URLS"),
        var("REDIS_URL"),
    ) {
        (Some(seeds), _, _) => {
            let store = RedisStore::builder(RedisSource::cluster(list(&seeds)))
                .deadline(deadline)
                .build()?;
            (Some(Arc::new(store)), "redis cluster")
        }
        (None, Some(sentinels), _) => {
            let master = env("REDIS_SENTINEL_MASTER", "mymaster");
            let store = RedisStore::builder(RedisSource::sentinel(&master, list(&sentinels)))
                .deadline(deadline)
                .build()?;
            (Some(Arc::new(store)), "redis sentinel")
        }
        (None, None, Some(url)) => {
            let store = RedisStore::builder(&url).deadline(deadline).build()?;
            (Some(Arc::new(store)), "redis")
        }
        (None, None, None) => (None, "memory"),
    };
    let verify_rate: f64 = env("CACHE_VERIFY_RATE", "0.001")
        .parse()
        .map_err(|_| "CACHE_VERIFY_RATE: a number from 0 to 1")?;
    let policy = match cache_on {
        true => Some(cache_policy(
            &env("CACHE_NAMESPACE", "app"),
            env_u64("CACHE_TTL_PERSON_SECONDS", 300),
            env_u64("CACHE_TTL_LIST_SECONDS", 60),
            Some(env_u64("CACHE_IN_PROCESS_MS", 0))
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis),
            verify_rate,
            env("CACHE_HEDGE", "off").eq_ignore_ascii_case("on"),
            redis,
        )?),
        false => None,
    };
    let (admin_token, admin_generated) = match std::env::var("PERSONS_ADMIN_TOKEN") {
        Ok(token) if !token.is_empty() => (token, false),
        _ => (generated_token(), true),
    };
    let app = App {
        db: Arc::new(Mutex::new(db)),
        tokens: Arc::new(tokens.clone()),
        admin_token: admin_token.clone().into(),
        cache: policy.as_ref().map(Policy::handle),
        warm_target: Arc::default(),
    };

    let mut persons = Router::new()
        .route("/persons", get(list_persons).post(create_person))
        .route(
            "/persons/{id}",
            get(get_person).patch(update_person).delete(delete_person),
        )
        .route("/persons/{id}/addresses", post(add_address))
        .route(
            "/persons/{id}/addresses/{address_id}",
            delete(delete_address),
        )
        .route("/persons/{id}/phones", post(add_phone))
        .route("/persons/{id}/phones/{phone_id}", delete(delete_phone));
    // The cache goes inside authentication: `.layer(cache)` before
    // `.layer(auth)`, so every request, hit or miss, is authenticated first
    // and carries its tenant.
    if let Some(policy) = &policy {
        persons = persons.layer(CacheLayer::new(policy.clone()));
    }
    let _ = app.warm_target.set(persons.clone().with_state(app.clone()));
    let admin = Router::new()
        .route("/cache/invalidate", post(admin_invalidate))
        .route("/cache/purge", post(admin_purge))
        .route("/cache/warm", post(admin_warm))
        // Operator reads need the admin token too: counters per route and
        // Prometheus text (scrape with `authorization: {credentials: ...}`).
        .route("/cache/stats", get(cache_stats))
        .route(
            "/metrics",
            get(move || std::future::ready(prometheus.render())),
        )
        .layer(middleware::from_fn_with_state(app.clone(), require_admin));
    let router = persons
        .layer(middleware::from_fn_with_state(app.clone(), authenticate))
        .merge(admin)
        .route("/health", get(health))
        .route("/cache/health", get(cache_health))
        .with_state(app);

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("persons API on http://{}", listener.local_addr()?);
    println!(
        "cache: {}, store: {store_name}",
        if cache_on { "on" } else { "off" }
    );
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
    axum::serve(listener, router).await?;
    Ok(())
}
