//! The database: SQLite, in memory or in a file (`PERSONS_DB`), seeded with
//! sample persons per tenant on first start.

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};

use crate::api::ApiResult;

pub(crate) fn open_db(
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
pub(crate) fn load_person(conn: &Connection, tenant: &str, id: i64) -> ApiResult<Option<Value>> {
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
