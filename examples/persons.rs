//! The persons API of seed 000, cached end to end: SQLite behind, the cache
//! in front, tenant-scoped keys, invalidation on every write.
//!
//! Run with:
//!
//! ```sh
//! cargo run --release --example persons
//! # with Redis instead of the in-process store:
//! REDIS_URL=redis://127.0.0.1:6379/0 cargo run --release --example persons
//! ```
//!
//! Environment (all optional): `PERSONS_ADDR` (127.0.0.1:3000), `REDIS_URL`,
//! `CACHE=on|off` (on), `CACHE_TTL_PERSON_SECONDS` (300),
//! `CACHE_TTL_LIST_SECONDS` (60), `CACHE_NAMESPACE` (app),
//! `CACHE_REDIS_TIMEOUT_MS` (100), `PERSONS_TOKENS` (`token=tenant,…`; demo
//! tokens when unset), `PERSONS_DB` (a SQLite file; in memory when unset),
//! `PERSONS_SEED` (sample persons per tenant, 2000).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use serde_json::{json, Value};
use tower_redis_cache::store::{MemoryStore, RedisStore, Store};
use tower_redis_cache::{
    CacheLayer, CacheStats, InvalidateLayer, Policy, Route, Rule, Rules, Scope,
};

/// The tenant a bearer token belongs to, set by the auth middleware.
#[derive(Clone, Debug)]
struct Tenant(String);

#[derive(Clone)]
struct App {
    db: Arc<Mutex<Connection>>,
    tokens: Arc<HashMap<String, String>>,
    cache: Option<(Arc<dyn Store>, CacheStats)>,
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

fn env_u64(name: &str, default: u64) -> u64 {
    env(name, &default.to_string()).parse().unwrap_or_else(|_| {
        eprintln!("{name} must be a whole number; using {default}");
        default
    })
}

fn id(raw: &str) -> ApiResult<i64> {
    raw.parse()
        .map_err(|_| bad_request(format!("`{raw}` is not a valid id")))
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
    let Some((store, _)) = &app.cache else {
        return Json(json!({"cache": "off"}));
    };
    let reachable = store.ping().await.is_ok();
    let state = if reachable { "ok" } else { "down" };
    let health = store.health();
    let mut body = json!({
        "cache": "on",
        "store": store.name(),
        "circuit": health.circuit.as_str(),
        "pending_invalidations": health.pending_invalidations,
    });
    body["redis"] = json!(if store.name() == "redis" {
        state
    } else {
        "not-configured"
    });
    Json(body)
}

async fn cache_stats(State(app): State<App>) -> Json<Value> {
    let Some((_, stats)) = &app.cache else {
        return Json(json!({"cache": "off"}));
    };
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
                "route": r.route, "hits": r.hits, "misses": r.misses, "stores": r.stores,
                "errors": r.errors, "skips": skips, "hit_rate": r.hit_rate,
                "mean_hit_us": r.mean_hit_latency.as_micros() as u64,
                "mean_miss_us": r.mean_miss_latency.as_micros() as u64,
            })
        })
        .collect();
    Json(json!({"cache": "on", "routes": routes}))
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

fn cache_layers(
    namespace: &str,
    person_ttl: u64,
    list_ttl: u64,
    store: Arc<dyn Store>,
) -> (CacheLayer, InvalidateLayer) {
    let policy = Policy::builder()
        .namespace(namespace)
        .route(
            Route::get("/persons/{id}")
                .key("person:{id}")
                .ttl(Duration::from_secs(person_ttl))
                .scope(tenant_scope()),
        )
        .route(
            Route::get("/persons")
                .key("persons:list:v{version}:{query_hash}")
                .versioned_by("persons:list")
                .query_allowlist(["limit", "skip", "name", "email", "sort"])
                .ttl(Duration::from_secs(list_ttl))
                .scope(tenant_scope()),
        )
        .build()
        .expect("the persons policy is valid");
    let item_and_lists = |route: &str| {
        Rule::new(route)
            .delete("person:{id}")
            .bump("persons:list")
            .scope(tenant_scope())
    };
    let rules = Rules::builder()
        .namespace(namespace)
        .rule(Rule::new("POST /persons").bump("persons:list"))
        .rule(item_and_lists("PATCH|DELETE /persons/{id}"))
        .rule(item_and_lists("POST /persons/{id}/addresses"))
        .rule(item_and_lists(
            "DELETE /persons/{id}/addresses/{address_id}",
        ))
        .rule(item_and_lists("POST /persons/{id}/phones"))
        .rule(item_and_lists("DELETE /persons/{id}/phones/{phone_id}"))
        .build()
        .expect("the persons rules are valid");
    (
        CacheLayer::with_shared_store(policy, store.clone()),
        InvalidateLayer::with_shared_store(rules, store),
    )
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
    let store: Arc<dyn Store> =
        match std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) {
            Some(url) => Arc::new(RedisStore::open(&url)?.deadline(Duration::from_millis(
                env_u64("CACHE_REDIS_TIMEOUT_MS", 100),
            ))),
            None => Arc::new(MemoryStore::new()),
        };
    let layers = cache_on.then(|| {
        cache_layers(
            &env("CACHE_NAMESPACE", "app"),
            env_u64("CACHE_TTL_PERSON_SECONDS", 300),
            env_u64("CACHE_TTL_LIST_SECONDS", 60),
            store.clone(),
        )
    });
    let app = App {
        db: Arc::new(Mutex::new(db)),
        tokens: Arc::new(tokens.clone()),
        cache: layers
            .as_ref()
            .map(|(cache, _)| (store.clone(), cache.stats())),
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
    if let Some((cache, invalidate)) = layers {
        persons = persons.layer(cache).layer(invalidate);
    }
    let router = persons
        .layer(middleware::from_fn_with_state(app.clone(), authenticate))
        .route("/health", get(health))
        .route("/cache/health", get(cache_health))
        .route("/cache/stats", get(cache_stats))
        .with_state(app);

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("persons API on http://{}", listener.local_addr()?);
    println!(
        "cache: {}, store: {}",
        if cache_on { "on" } else { "off" },
        store.name()
    );
    for (token, tenant) in &tokens {
        println!(
            "  curl -H 'Authorization: Bearer {token}' http://{addr}/persons/1   # tenant {tenant}"
        );
    }
    axum::serve(listener, router).await?;
    Ok(())
}
