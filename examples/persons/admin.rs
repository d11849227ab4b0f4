//! Probes (`/health`, `/cache/health`) and the operator endpoints, which
//! drive the cache through its [`CacheHandle`]: stats, invalidate a group,
//! purge a path, warm paths.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;
use tower_redis_cache::{CacheHandle, HandleError};

use crate::api::{bad_request, ApiError, ApiResult};
use crate::{App, Tenant};

pub(crate) async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub(crate) async fn cache_health(State(app): State<App>) -> Json<Value> {
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

pub(crate) async fn cache_stats(State(app): State<App>) -> Json<Value> {
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
            let calls: serde_json::Map<String, Value> = r
                .handler_calls
                .iter()
                .map(|(why, n)| (why.as_str().to_owned(), json!(n)))
                .collect();
            json!({
                "route": r.route, "hits": r.hits, "in_process_hits": r.in_process_hits,
                "misses": r.misses, "stores": r.stores,
                "errors": r.errors, "skips": skips, "handler_calls": calls,
                "hit_rate": r.hit_rate,
                "mean_hit_us": r.mean_hit_latency.as_micros() as u64,
                "mean_miss_us": r.mean_miss_latency.as_micros() as u64,
                "verified": r.verified, "verify_mismatches": r.verify_mismatches,
                "verify_match_ratio": r.verify_match_ratio,
                "mismatch_staleness": r.mismatch_staleness.iter()
                    .map(|(bound, n)| json!({
                        "le_seconds": (*bound != Duration::MAX).then_some(bound.as_secs()),
                        "count": n,
                    }))
                    .collect::<Vec<_>>(),
                "last_mismatch_unix_ms": r.last_mismatch
                    .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|since| since.as_millis() as u64),
            })
        })
        .collect();
    let inv = stats.invalidations();
    let probes = stats.probes();
    let window = |c: tower_redis_cache::ProbeCounts| json!({"consistent": c.consistent, "stale": c.stale, "unread": c.unread});
    Json(json!({
        "cache": "on",
        "routes": routes,
        "invalidations": {
            "applied": inv.applied, "failed": inv.failed,
            "skipped": inv.skipped, "unscoped": inv.unscoped,
        },
        "write_probes": {
            "after_1s": window(probes.after_1s),
            "after_10s": window(probes.after_10s),
        },
    }))
}

#[derive(Deserialize)]
pub(crate) struct InvalidateBody {
    group: String,
    tenant: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct PurgeBody {
    path: String,
    tenant: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct WarmBody {
    paths: Vec<String>,
    tenant: Option<String>,
}

/// A GET of `path` as `tenant` would send it once authenticated.
pub(crate) fn tenant_request(path: &str, tenant: Option<&str>) -> ApiResult<Request> {
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

pub(crate) fn cache_on(app: &App) -> ApiResult<&CacheHandle> {
    app.cache
        .as_ref()
        .ok_or_else(|| ApiError(StatusCode::CONFLICT, "the cache is off (CACHE=off)".into()))
}

pub(crate) fn handle_error(err: HandleError) -> ApiError {
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
pub(crate) async fn admin_invalidate(
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
pub(crate) async fn admin_purge(
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
pub(crate) async fn admin_warm(
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
