//! The wiring mistakes that used to compile and then serve stale or foreign
//! data, each now impossible to write or refused at build, and the rest of
//! the one-policy API: decoded params, nesting, per-scope groups, bounded
//! version keys, the operator handle. Run over both stores.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use common::{get_req, method_req, router, send, Backend, Db};
use tower_redis_cache::store::{Observed, Store};
use tower_redis_cache::{
    CacheLayer, ConfigError, HandleError, InvalidateLayer, Policy, Reason, Route, Rule, Scope,
};

backend_tests!(
    separate_read_and_write_stacks_share_one_store,
    a_rule_reaches_the_scoped_entry_without_restating_the_scope,
    a_namespace_is_set_once_for_reads_and_writes,
    cache_outside_auth_never_crosses_tenants,
    an_invalidate_layer_outside_auth_leaves_the_write_to_the_inner_layer,
    percent_encoded_spellings_share_one_entry_and_one_invalidation,
    patterns_match_the_path_the_layer_sees_under_nest,
    a_tenant_write_bumps_only_that_tenants_lists,
    the_handle_purges_bumps_and_warms,
);

fn tenant() -> Scope {
    Scope::new().header("x-tenant-id")
}

fn as_tenant(method: &str, uri: &str, tenant: &str) -> axum::http::Request<Body> {
    axum::http::Request::builder()
        .method(method)
        .uri(uri)
        .header("x-tenant-id", tenant)
        .body(Body::empty())
        .unwrap()
}

/// Set-up 1: reads and writes in two stacks, each with its own layer. Both
/// layers come from one policy, so they cannot use two stores.
async fn separate_read_and_write_stacks_share_one_store(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let policy = common::policy(backend.store);
    let reads = router(db.clone()).layer(CacheLayer::new(policy.clone()));
    let writes = router(db.clone()).layer(InvalidateLayer::new(policy.clone()));
    send(&reads, get_req("/persons/1")).await;
    assert_eq!(send(&reads, get_req("/persons/1")).await.1, "HIT");
    assert_eq!(
        send(&writes, method_req("PATCH", "/persons/1")).await.0,
        StatusCode::OK
    );
    let (_, x_cache, body) = send(&reads, get_req("/persons/1")).await;
    assert_eq!(
        (x_cache.as_str(), body.as_str()),
        ("MISS", r#"{"id":"1","rev":2}"#)
    );
    assert_eq!(policy.stats().invalidations().applied, 1);
}

/// Set-up 2: the rule names the route; the route's scope applies to the write.
async fn a_rule_reaches_the_scoped_entry_without_restating_the_scope(backend: Backend) {
    let db = Db::default();
    let policy = Policy::builder()
        .store(backend.store)
        .route(
            Route::get("/tenant/{id}")
                .key("tenant:{id}")
                .scope(tenant()),
        )
        .on(Rule::new("PATCH /tenant/{id}").purge("GET /tenant/{id}"))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/tenant/{id}", get(common::tenant).patch(common::update))
        .with_state(db.clone())
        .layer(CacheLayer::new(policy));
    for who in ["acme", "globex"] {
        send(&app, as_tenant("GET", "/tenant/1", who)).await;
        assert_eq!(
            send(&app, as_tenant("GET", "/tenant/1", who)).await.1,
            "HIT"
        );
    }
    send(&app, as_tenant("PATCH", "/tenant/1", "acme")).await;
    assert_eq!(
        send(&app, as_tenant("GET", "/tenant/1", "acme")).await.1,
        "MISS"
    );
    assert_eq!(
        send(&app, as_tenant("GET", "/tenant/1", "globex")).await.1,
        "HIT",
        "another tenant's entry is not the writer's to purge"
    );
}

/// One cached person route at `pattern`, purged by a PATCH of it.
fn person_policy(store: Arc<dyn Store>, namespace: &str, pattern: &str) -> Policy {
    Policy::builder()
        .store(store)
        .namespace(namespace)
        .route(Route::get(pattern).key("person:{id}"))
        .on(Rule::new(&format!("PATCH {pattern}")).purge(&format!("GET {pattern}")))
        .build()
        .unwrap()
}

/// Set-up 3: one namespace, for reads, writes and the handle.
async fn a_namespace_is_set_once_for_reads_and_writes(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let policy = person_policy(backend.store.clone(), "shop", "/persons/{id}");
    let key = policy.key_for(&get_req("/persons/1")).unwrap();
    assert_eq!(key.entry_key(&[]), "shop:person:1");
    let app = router(db.clone()).layer(CacheLayer::new(policy));
    send(&app, get_req("/persons/1")).await;
    assert_ne!(
        *backend.store.lookup(&key).await.unwrap().entry(),
        Observed::Absent
    );
    send(&app, method_req("PATCH", "/persons/1")).await;
    let (_, x_cache, body) = send(&app, get_req("/persons/1")).await;
    assert_eq!(
        (x_cache.as_str(), body.as_str()),
        ("MISS", r#"{"id":"1","rev":2}"#)
    );
}

#[derive(Clone)]
struct Tenant(String);

/// Bearer `<tenant>` → the tenant extension; anything else is a 401.
async fn auth(mut request: Request, next: Next) -> Response {
    let tenant = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    match tenant {
        Some(tenant) => {
            request.extensions_mut().insert(Tenant(tenant));
            next.run(request).await
        }
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

async fn whose(
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "id": id, "tenant": tenant }))
}

/// Set-up 5: the cache layer placed outside the authentication layer. The
/// extension scope reads nothing there, so nothing is shared: every request
/// is authenticated and answered for its own tenant.
async fn cache_outside_auth_never_crosses_tenants(backend: Backend) {
    let policy = Policy::builder()
        .store(backend.store)
        .route(
            Route::get("/items/{id}")
                .key("item:{id}")
                .scope(Scope::new().extension(|ext| ext.get::<Tenant>().map(|t| t.0.clone()))),
        )
        .build()
        .unwrap();
    // The wrong order: in axum the last `.layer` is the outermost.
    let app = Router::new()
        .route("/items/{id}", get(whose))
        .layer(middleware::from_fn(auth))
        .layer(CacheLayer::new(policy.clone()));
    let bearer = |who: &str| {
        axum::http::Request::get("/items/1")
            .header("authorization", format!("Bearer {who}"))
            .body(Body::empty())
            .unwrap()
    };
    for _ in 0..3 {
        let (status, x_cache, body) = send(&app, bearer("a")).await;
        assert_eq!((status, x_cache.as_str()), (StatusCode::OK, "BYPASS"));
        assert!(body.contains(r#""tenant":"a""#), "{body}");
        let (status, x_cache, body) = send(&app, bearer("b")).await;
        assert_eq!((status, x_cache.as_str()), (StatusCode::OK, "BYPASS"));
        assert!(body.contains(r#""tenant":"b""#), "{body}");
        let (status, x_cache, body) = send(&app, get_req("/items/1")).await;
        assert_eq!(
            (status, x_cache.as_str(), body.as_str()),
            (StatusCode::UNAUTHORIZED, "BYPASS", "")
        );
    }
    let stats = policy.stats().route("GET /items/{id}").unwrap();
    assert_eq!((stats.hits, stats.stores), (0, 0));
    assert_eq!(stats.skips, vec![(Reason::ScopeMissing, 9)]);
}

async fn rename(
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
    State(db): State<Db>,
) -> StatusCode {
    *db.revisions
        .lock()
        .unwrap()
        .entry(format!("{tenant}:{id}"))
        .or_insert(0) += 1;
    StatusCode::OK
}

async fn revision_of(
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
    State(db): State<Db>,
) -> Json<serde_json::Value> {
    let rev = db
        .revisions
        .lock()
        .unwrap()
        .get(&format!("{tenant}:{id}"))
        .copied()
        .unwrap_or(0);
    Json(serde_json::json!({ "rev": rev }))
}

/// An `InvalidateLayer` outside authentication cannot read the tenant; the
/// `CacheLayer` of the same policy inside it can, and purges the entry.
async fn an_invalidate_layer_outside_auth_leaves_the_write_to_the_inner_layer(backend: Backend) {
    let db = Db::default();
    let tenant_scope = Scope::new().extension(|ext| ext.get::<Tenant>().map(|t| t.0.clone()));
    let policy = Policy::builder()
        .store(backend.store)
        .route(
            Route::get("/items/{id}")
                .key("item:{id}")
                .scope(tenant_scope),
        )
        .on(Rule::new("PATCH /items/{id}").purge("GET /items/{id}"))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/items/{id}", get(revision_of).patch(rename))
        .with_state(db)
        .layer(CacheLayer::new(policy.clone()))
        .layer(middleware::from_fn(auth))
        .layer(InvalidateLayer::new(policy.clone()));
    let bearer = |method: &str| {
        axum::http::Request::builder()
            .method(method)
            .uri("/items/1")
            .header("authorization", "Bearer a")
            .body(Body::empty())
            .unwrap()
    };
    send(&app, bearer("GET")).await;
    assert_eq!(send(&app, bearer("GET")).await.1, "HIT");
    assert_eq!(send(&app, bearer("PATCH")).await.0, StatusCode::OK);
    let (_, x_cache, body) = send(&app, bearer("GET")).await;
    assert_eq!((x_cache.as_str(), body.as_str()), ("MISS", r#"{"rev":1}"#));
    let counts = policy.stats().invalidations();
    assert_eq!((counts.applied, counts.unscoped), (2, 1), "{counts:?}");
}

/// `/persons/61`, `/persons/%36%31`, `/persons/6%31` are one row to axum's
/// `Path`: one entry, and a write to any spelling invalidates it.
async fn percent_encoded_spellings_share_one_entry_and_one_invalidation(backend: Backend) {
    let db = Db::default();
    db.set("61", 1);
    let (app, _) = common::app(backend.store, db.clone());
    assert_eq!(send(&app, get_req("/persons/61")).await.1, "MISS");
    assert_eq!(send(&app, get_req("/persons/%36%31")).await.1, "HIT");
    assert_eq!(send(&app, get_req("/persons/6%31")).await.1, "HIT");
    send(&app, method_req("PATCH", "/persons/6%31")).await;
    let (_, x_cache, body) = send(&app, get_req("/persons/61")).await;
    assert_eq!(
        (x_cache.as_str(), body.as_str()),
        ("MISS", r#"{"id":"61","rev":2}"#)
    );
    assert_eq!(db.calls(), 2);
}

/// A layer on the outer router sees full paths (`/api/persons/1`); a layer
/// inside `nest` sees the path below the prefix (`/persons/1`), as axum
/// strips it. Patterns are written for the path the layer sees.
async fn patterns_match_the_path_the_layer_sees_under_nest(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let outer = person_policy(backend.store.clone(), "outer", "/api/persons/{id}");
    let app = Router::new()
        .nest("/api", router(db.clone()))
        .layer(CacheLayer::new(outer));
    assert_eq!(send(&app, get_req("/api/persons/1")).await.1, "MISS");
    assert_eq!(send(&app, get_req("/api/persons/1")).await.1, "HIT");
    send(&app, method_req("PATCH", "/api/persons/1")).await;
    let (_, x_cache, body) = send(&app, get_req("/api/persons/1")).await;
    assert_eq!(
        (x_cache.as_str(), body.as_str()),
        ("MISS", r#"{"id":"1","rev":2}"#)
    );

    let inner = common::policy(backend.store);
    let app = Router::new().nest("/api", router(db.clone()).layer(CacheLayer::new(inner)));
    assert_eq!(send(&app, get_req("/api/persons/1")).await.1, "MISS");
    assert_eq!(send(&app, get_req("/api/persons/1")).await.1, "HIT");
    send(&app, method_req("PATCH", "/api/persons/1")).await;
    let (_, x_cache, body) = send(&app, get_req("/api/persons/1")).await;
    assert_eq!(
        (x_cache.as_str(), body.as_str()),
        ("MISS", r#"{"id":"1","rev":3}"#)
    );
}

async fn tenant_list(
    State(db): State<Db>,
    headers: axum::http::HeaderMap,
) -> Json<serde_json::Value> {
    db.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let tenant = headers["x-tenant-id"].to_str().unwrap().to_owned();
    let revision = db
        .revisions
        .lock()
        .unwrap()
        .get(&tenant)
        .copied()
        .unwrap_or(0);
    Json(serde_json::json!({ "tenant": tenant, "rev": revision }))
}

async fn tenant_write(State(db): State<Db>, headers: axum::http::HeaderMap) -> StatusCode {
    let tenant = headers["x-tenant-id"].to_str().unwrap().to_owned();
    *db.revisions.lock().unwrap().entry(tenant).or_insert(0) += 1;
    StatusCode::CREATED
}

fn per_scope_app(store: Arc<dyn Store>, db: Db) -> (Router, Policy) {
    let policy = Policy::builder()
        .store(store)
        .route(
            Route::get("/lists")
                .key("lists:v{version}:{query_hash}")
                .versioned_by("lists")
                .per_scope()
                .scope(tenant()),
        )
        .on(Rule::new("POST /lists").bump("lists"))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/lists", get(tenant_list).post(tenant_write))
        .with_state(db)
        .layer(CacheLayer::new(policy.clone()));
    (app, policy)
}

/// A group versioned per scope: a tenant's write orphans its own lists
/// only; the handle's bump reaches every tenant; a bump for one tenant
/// reaches that tenant.
async fn a_tenant_write_bumps_only_that_tenants_lists(backend: Backend) {
    let db = Db::default();
    let (app, policy) = per_scope_app(backend.store, db.clone());
    let warm = |app: Router| async move {
        for who in ["a", "b"] {
            for page in ["/lists?page=1", "/lists?page=2"] {
                send(&app, as_tenant("GET", page, who)).await;
                assert_eq!(send(&app, as_tenant("GET", page, who)).await.1, "HIT");
            }
        }
    };
    warm(app.clone()).await;
    assert_eq!(
        send(&app, as_tenant("POST", "/lists", "a")).await.0,
        StatusCode::CREATED
    );
    for page in ["/lists?page=1", "/lists?page=2"] {
        let (_, x_cache, body) = send(&app, as_tenant("GET", page, "a")).await;
        assert_eq!(
            (x_cache.as_str(), body.as_str()),
            ("MISS", r#"{"rev":1,"tenant":"a"}"#)
        );
        assert_eq!(
            send(&app, as_tenant("GET", page, "b")).await.1,
            "HIT",
            "{page}"
        );
    }
    let handle = policy.handle();
    handle.bump("lists").await.unwrap();
    for who in ["a", "b"] {
        assert_eq!(
            send(&app, as_tenant("GET", "/lists?page=1", who)).await.1,
            "MISS",
            "{who}"
        );
    }
    warm(app.clone()).await;
    handle
        .bump_for("lists", &as_tenant("GET", "/", "b"))
        .await
        .unwrap();
    assert_eq!(
        send(&app, as_tenant("GET", "/lists?page=1", "a")).await.1,
        "HIT"
    );
    assert_eq!(
        send(&app, as_tenant("GET", "/lists?page=1", "b")).await.1,
        "MISS"
    );
    assert_eq!(
        handle.bump_for("lists", &get_req("/")).await,
        Err(HandleError::ScopeMissing)
    );
}

async fn the_handle_purges_bumps_and_warms(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    db.set("2", 1);
    let (app, policy) = common::app(backend.store, db.clone());
    let handle = policy.handle();
    let report = handle
        .warm(
            app.clone(),
            [
                "/persons/1",
                "/persons/2",
                "/persons?limit=1",
                "/persons/404",
                "/persons/1",
            ]
            .map(get_req),
        )
        .await;
    assert_eq!(
        (
            report.stored,
            report.already_cached,
            report.not_stored,
            report.failed
        ),
        (3, 1, 1, 0)
    );
    assert_eq!(db.calls(), 4);
    for uri in ["/persons/1", "/persons/2", "/persons?limit=1"] {
        assert_eq!(send(&app, get_req(uri)).await.1, "HIT", "{uri}");
    }
    // Data changed behind the cache's back: the operator purges one entry.
    db.set("1", 5);
    assert_eq!(
        handle.purge(&get_req("/persons/1")).await.unwrap(),
        "app:person:1"
    );
    let (_, x_cache, body) = send(&app, get_req("/persons/1")).await;
    assert_eq!(
        (x_cache.as_str(), body.as_str()),
        ("MISS", r#"{"id":"1","rev":5}"#)
    );
    assert_eq!(send(&app, get_req("/persons/2")).await.1, "HIT");
    // A list entry is purged by a bump of its group: every page goes.
    send(&app, get_req("/persons?limit=2")).await;
    let purged = handle.purge(&get_req("/persons?limit=1")).await.unwrap();
    assert_eq!(purged, "{app:persons:list}:ver");
    assert_eq!(send(&app, get_req("/persons?limit=1")).await.1, "MISS");
    assert_eq!(send(&app, get_req("/persons?limit=2")).await.1, "MISS");
    assert_eq!(
        handle.bump("persons:list").await.unwrap(),
        "{app:persons:list}:ver"
    );
    assert_eq!(send(&app, get_req("/persons?limit=1")).await.1, "MISS");
    assert_eq!(
        handle.purge(&get_req("/nothing")).await,
        Err(HandleError::NotCached)
    );
    assert_eq!(
        handle.bump("nope").await,
        Err(HandleError::UnknownGroup("nope".into()))
    );
    let health = handle.health().await;
    assert!(health.reachable, "{health:?}");
}

/// Set-up 4: a rule naming a route or group that does not exist, or a
/// param its path does not bind, is a `ConfigError` at build.
#[test]
fn typos_in_rules_are_refused_at_build() {
    let build = |rule: Rule| {
        Policy::builder()
            .route(Route::get("/persons/{id}").key("person:{id}"))
            .route(
                Route::get("/persons")
                    .key("persons:list:v{version}")
                    .versioned_by("persons:list"),
            )
            .on(rule)
            .build()
    };
    let err = build(Rule::new("PATCH /persons/{id}").purge("GET /persn/{id}")).unwrap_err();
    assert!(matches!(err, ConfigError::UnknownRoute { .. }), "{err}");
    assert!(err.to_string().contains("/persn/{id}"));
    let err = build(Rule::new("POST /persons").bump("persons:lists")).unwrap_err();
    assert!(matches!(err, ConfigError::UnknownGroup { .. }), "{err}");
    let err = build(Rule::new("POST /persons").purge("GET /persons/{id}")).unwrap_err();
    assert!(matches!(err, ConfigError::UnboundParam { .. }), "{err}");
    let err = build(Rule::new("GET /persons/{id}").purge("GET /persons/{id}")).unwrap_err();
    assert!(matches!(err, ConfigError::InvalidRule { .. }), "{err}");
    assert!(build(Rule::new("PATCH /persons/{id}").purge("GET /persons/{id}")).is_ok());
}

const PER_ITEM_READS: usize = 20_000;

/// Reads `/items/0..20 000` once each through a policy with per-item groups.
async fn read_every_item(store: impl Store) {
    let policy = Policy::builder()
        .store(store)
        .route(
            Route::get("/items/{id}")
                .key("item:{id}:v{version}")
                .versioned_by("item:{id}")
                .ttl(Duration::from_secs(60)),
        )
        .build()
        .unwrap();
    let item = |Path(id): Path<String>| async move { Json(serde_json::json!({ "id": id })) };
    let app = Router::new()
        .route("/items/{id}", get(item))
        .layer(CacheLayer::new(policy));
    for id in 0..PER_ITEM_READS {
        let (_, x_cache, _) = send(&app, get_req(&format!("/items/{id}"))).await;
        assert_eq!(x_cache, "MISS");
    }
}

/// 20 000 distinct reads of per-item groups stay inside the memory store's
/// caps: version keys count as entries.
#[tokio::test]
async fn per_item_version_keys_stay_inside_the_memory_caps() {
    let memory = tower_redis_cache::store::MemoryStore::new()
        .max_entries(10_000)
        .max_bytes(4 << 20);
    read_every_item(memory.clone()).await;
    assert!(memory.len() <= 10_000, "{}", memory.len());
    eprintln!("memory store after {PER_ITEM_READS} per-item reads: {memory:?}");
}

/// 20 000 distinct reads of per-item groups leave no Redis key without a TTL.
#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn per_item_version_keys_all_expire_in_redis() {
    let backend = Backend::redis();
    let server = backend.server.as_ref().unwrap();
    read_every_item(backend.store.clone()).await;
    let mut raw = server.raw().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut raw)
        .await
        .unwrap();
    let mut without_ttl = 0;
    let mut version_keys = 0;
    for key in &keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut raw)
            .await
            .unwrap();
        // Gone since KEYS listed it (expired on a slow run): nothing to check.
        if ttl == -2 {
            continue;
        }
        if ttl < 0 {
            without_ttl += 1;
        }
        if key.ends_with(":ver") {
            version_keys += 1;
            assert!(ttl > 0 && ttl <= 60_000, "{key}: {ttl} ms");
        }
    }
    eprintln!("redis after {PER_ITEM_READS} per-item reads: {} keys, {version_keys} version keys, {without_ttl} without a TTL", keys.len());
    assert_eq!(without_ttl, 0);
    assert_eq!(keys.len(), 2 * PER_ITEM_READS);
}
