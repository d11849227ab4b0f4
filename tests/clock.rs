//! One clock for every process: two persons processes over one Redis and
//! one SQLite file, one of them with its clock 30 s ahead (libfaketime).
//! An entry either one stores is judged by the other as the writer would:
//! the same TTL left, an `Age` of about 0, a hit and not an expired miss.

mod common;

use common::http::{http_for, spawn_with, Reply, Server};
use common::RedisServer;

const ACME: &str = "Bearer demo-token-acme";

/// The host both processes serve, as behind one load balancer.
const HOST: &str = "api.example";

fn persons(redis: &RedisServer, db: &str, wrapper: &[&str]) -> Server {
    let url = redis.url();
    spawn_with(
        wrapper,
        "persons",
        "PERSONS_ADDR",
        &[
            ("REDIS_URL", url.as_str()),
            ("PERSONS_DB", db),
            ("PERSONS_SEED", "50"),
            ("CACHE_TTL_PERSON_SECONDS", "20"),
            ("CACHE_REDIS_TIMEOUT_MS", "1000"),
        ],
    )
}

/// The `ttl=` of a hit's `cache-status`, and its `Age`.
fn ttl_and_age(reply: &Reply) -> (i64, u64) {
    let status = reply.header("cache-status").unwrap_or_default();
    let ttl = status
        .split(';')
        .find_map(|p| p.trim().strip_prefix("ttl="))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no ttl: {status}"));
    let age = reply.header("age").and_then(|a| a.parse().ok()).unwrap();
    (ttl, age)
}

#[test]
#[cfg_attr(
    any(redis_missing, faketime_missing),
    ignore = "needs redis-server and faketime"
)]
fn processes_whose_clocks_disagree_judge_entries_alike() {
    let redis = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("persons-clock-{}", redis.port));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("persons.db");
    let db = db.to_str().unwrap();
    let on_time = persons(&redis, db, &[]);
    // Seeded by the first; the second opens the same file.
    let ahead = persons(
        &redis,
        db,
        &["faketime", "--exclude-monotonic", "-f", "+30s"],
    );
    for (writer, reader, path) in [
        (&on_time, &ahead, "/persons/1"),
        (&ahead, &on_time, "/persons/2"),
    ] {
        let stored = http_for(HOST, writer, "GET", path, Some(ACME), None);
        assert_eq!(stored.x_cache(), "MISS", "{path}");
        let hit = http_for(HOST, reader, "GET", path, Some(ACME), None);
        assert_eq!(
            hit.x_cache(),
            "HIT",
            "{path}: {:?}",
            hit.header("cache-status")
        );
        let (ttl, age) = ttl_and_age(&hit);
        eprintln!("{path}: stored by one process, read by the other: ttl={ttl}, age={age}");
        assert!((18..=20).contains(&ttl), "{path}: ttl {ttl}");
        assert!(age <= 2, "{path}: age {age}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
