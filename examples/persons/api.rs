//! The persons API: its handlers (SQLite behind, JSON out) and its errors,
//! a 4xx or 5xx with a JSON body. The handlers know nothing of the cache.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use rusqlite::{params, Connection};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::db::load_person;
use crate::{App, Tenant};

/// A 4xx/5xx with a JSON body.
pub(crate) struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

pub(crate) fn not_found() -> ApiError {
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

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// A positive id in its one canonical spelling (`061` and `+61` are
/// refused), so one row has one URL and one cache key.
pub(crate) fn id(raw: &str) -> ApiResult<i64> {
    match raw.parse::<i64>() {
        Ok(id) if id > 0 && id.to_string() == raw => Ok(id),
        _ => Err(bad_request(format!(
            "`{raw}` is not a valid id: use a positive whole number without sign or leading zeros"
        ))),
    }
}

#[derive(Deserialize)]
pub(crate) struct ListQuery {
    limit: Option<String>,
    skip: Option<String>,
    name: Option<String>,
    email: Option<String>,
    sort: Option<String>,
}

pub(crate) fn number(name: &str, raw: Option<&str>, default: i64, max: i64) -> ApiResult<i64> {
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

pub(crate) async fn list_persons(
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
pub(crate) struct NewPerson {
    name: String,
    email: String,
}

pub(crate) fn check_text(field: &str, value: &str) -> ApiResult<()> {
    if value.trim().is_empty() || value.len() > 200 {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("`{field}` must be 1 to 200 characters"),
        ));
    }
    Ok(())
}

pub(crate) async fn create_person(
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

pub(crate) async fn get_person(
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
pub(crate) struct PersonPatch {
    name: Option<String>,
    email: Option<String>,
}

pub(crate) async fn update_person(
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

pub(crate) async fn delete_person(
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
pub(crate) struct NewAddress {
    street: String,
    city: String,
}

#[derive(Deserialize)]
pub(crate) struct NewPhone {
    number: String,
}

/// Adds a row under a person of the tenant and answers with the person.
pub(crate) fn add_child(
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
pub(crate) fn remove_child(
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

pub(crate) async fn add_address(
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

pub(crate) async fn add_phone(
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

pub(crate) async fn delete_address(
    State(app): State<App>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path((raw, child)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    remove_child(&app, &tenant, &raw, &child, "addresses")
}

pub(crate) async fn delete_phone(
    State(app): State<App>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path((raw, child)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    remove_child(&app, &tenant, &raw, &child, "phones")
}
