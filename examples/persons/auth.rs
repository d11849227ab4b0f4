//! Bearer tokens: each tenant's, which the cache's scope reads through the
//! `Tenant` extension set here, and the admin token of the operator
//! endpoints, compared in constant time.

use std::collections::HashMap;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::ApiError;
use crate::{App, Tenant};

/// Admin endpoints need `Authorization: Bearer <admin token>`.
pub(crate) async fn require_admin(
    State(app): State<App>,
    request: Request,
    next: Next,
) -> Response {
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
pub(crate) fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    let mut differ = given.len() ^ secret.len();
    for (i, &byte) in secret.iter().enumerate() {
        differ |= usize::from(byte ^ given.get(i).copied().unwrap_or(!byte));
    }
    std::hint::black_box(differ) == 0
}

/// `Authorization: Bearer <token>` → the token's tenant; anything else is a 401.
pub(crate) async fn authenticate(
    State(app): State<App>,
    mut request: Request,
    next: Next,
) -> Response {
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

/// A token for the admin endpoints when none is configured.
pub(crate) fn generated_token() -> String {
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

pub(crate) fn parse_tokens(raw: &str) -> HashMap<String, String> {
    raw.split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(token, tenant)| (token.trim().to_owned(), tenant.trim().to_owned()))
        .filter(|(token, tenant)| !token.is_empty() && !tenant.is_empty())
        .collect()
}
