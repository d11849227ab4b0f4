//! The persons example end to end: the real server binary on a real TCP
//! port, its SQLite database, a real `redis-server`, walked through the
//! whole persons scenario (reads, writes, tenants, admin endpoints, metrics), including another tenant and Redis stopping and
//! restarting under the running server.
//!
//! The test builds the example binary itself (`cargo build --example persons`).

mod common;

use std::time::Duration;

use common::http::{http, Reply, Server};
use common::{RedisCluster, RedisServer, Sentinel};

const ACME: &str = "Bearer demo-token-acme";
const GLOBEX: &str = "Bearer demo-token-globex";

/// The example with these environment variables set too.
fn start_env(vars: &[(&str, &str)]) -> Server {
    let mut all = vec![
        ("PERSONS_SEED", "200"),
        ("CACHE_REDIS_TIMEOUT_MS", "1000"),
        ("PERSONS_ADMIN_TOKEN", "test-admin"),
    ];
    all.extend_from_slice(vars);
    common::http::spawn("persons", "PERSONS_ADDR", &all)
}

fn start(redis_url: &str) -> Server {
    start_with("REDIS_URL", redis_url)
}

/// The example with `store_var` (`REDIS_URL`, `REDIS_CLUSTER_URLS`) set to
/// `value`.
fn start_with(store_var: &str, value: &str) -> Server {
    start_env(&[(store_var, value)])
}

fn get(server: &Server, path: &str, auth: &str) -> Reply {
    http(server, "GET", path, Some(auth), None)
}

/// The value of the sample of `name` whose labels include all of `labels`.
fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let bare = series.split('{').next()?;
        (bare == name && labels.iter().all(|l| series.contains(l))).then(|| value.parse().ok())?
    })
}

#[test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
fn the_persons_scenario_on_sqlite_and_redis() {
    let mut redis = RedisServer::start();
    let server = start(&redis.url());

    // Item and list, miss then hit.
    let first = get(&server, "/persons/1", ACME);
    assert_eq!(
        (first.status, first.x_cache()),
        (200, "MISS"),
        "{}",
        first.body
    );
    let second = get(&server, "/persons/1", ACME);
    assert_eq!((second.status, second.x_cache()), (200, "HIT"));
    assert_eq!(first.body, second.body);
    assert!(second.header("cache-status").unwrap().contains("hit"));
    let list = "/persons?limit=5&sort=-name&name=Ana";
    assert_eq!(get(&server, list, ACME).x_cache(), "MISS");
    let same_list = "/persons?name=Ana&sort=-name&limit=5&email=";
    assert_eq!(
        get(&server, same_list, ACME).x_cache(),
        "HIT",
        "normalised query"
    );

    // The keys are readable, under the `app:` namespace.
    let mut raw = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut raw).unwrap();
    assert!(
        keys.iter().any(|k| k.starts_with("app:person:1:scope=")),
        "{keys:?}"
    );
    assert!(
        keys.iter().any(|k| k == "{app:persons:list}:ver"),
        "{keys:?}"
    );
    assert!(
        keys.iter()
            .any(|k| k.starts_with("{app:persons:list}:persons:list:v") && k.contains(":scope=")),
        "{keys:?}"
    );
    assert!(
        keys.iter().all(|k| !k.contains("acme")),
        "scopes are hashed: {keys:?}"
    );

    // Another tenant neither sees acme's cached person nor shares its lists.
    let foreign = get(&server, "/persons/1", GLOBEX);
    assert_eq!(foreign.status, 404, "{}", foreign.body);
    assert_ne!(foreign.x_cache(), "HIT");
    assert_eq!(get(&server, list, GLOBEX).x_cache(), "MISS");
    // No or bad token: 401, never cached.
    for _ in 0..2 {
        let denied = http(&server, "GET", "/persons/1", None, None);
        assert_eq!((denied.status, denied.x_cache()), (401, ""));
    }

    // A PATCH deletes the item and bumps the lists.
    let patched = http(
        &server,
        "PATCH",
        "/persons/1",
        Some(ACME),
        Some(r#"{"name":"Ana Atualizada"}"#),
    );
    assert_eq!(patched.status, 200, "{}", patched.body);
    let after = get(&server, "/persons/1", ACME);
    assert_eq!(after.x_cache(), "MISS");
    assert!(after.body.contains("Ana Atualizada"), "{}", after.body);
    assert_eq!(get(&server, same_list, ACME).x_cache(), "MISS");
    assert_eq!(
        get(&server, list, GLOBEX).x_cache(),
        "HIT",
        "acme's write bumps acme's lists only"
    );
    assert_eq!(get(&server, "/persons/2", ACME).x_cache(), "MISS");
    assert_eq!(get(&server, "/persons/2", ACME).x_cache(), "HIT");

    // Sub-resources invalidate the person too.
    get(&server, "/persons/1", ACME);
    let phone = http(
        &server,
        "POST",
        "/persons/1/phones",
        Some(ACME),
        Some(r#"{"number":"+55 11 5555-0001"}"#),
    );
    assert_eq!(phone.status, 201, "{}", phone.body);
    let with_phone = get(&server, "/persons/1", ACME);
    assert_eq!(with_phone.x_cache(), "MISS");
    assert!(with_phone.body.contains("5555-0001"));
    let address = http(
        &server,
        "POST",
        "/persons/1/addresses",
        Some(ACME),
        Some(r#"{"street":"Av. Paulista 1000","city":"São Paulo"}"#),
    );
    assert_eq!(address.status, 201);
    assert!(get(&server, "/persons/1", ACME).body.contains("Paulista"));

    // A failed write invalidates nothing; bad input is a 4xx JSON error.
    assert_eq!(get(&server, "/persons/1", ACME).x_cache(), "HIT");
    let bad = http(
        &server,
        "PATCH",
        "/persons/1",
        Some(ACME),
        Some("{not json"),
    );
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("error"));
    assert_eq!(get(&server, "/persons/1", ACME).x_cache(), "HIT");
    for (path, status) in [
        ("/persons?limit=abc", 400),
        ("/persons?sort=age", 400),
        ("/persons/abc", 400),
        ("/persons/999999", 404),
    ] {
        for _ in 0..2 {
            let reply = get(&server, path, ACME);
            assert_eq!(reply.status, status, "{path}: {}", reply.body);
            assert_ne!(reply.x_cache(), "HIT", "{path}");
            assert!(
                reply.body.starts_with("{\"error\""),
                "{path}: {}",
                reply.body
            );
        }
    }

    // One row, one URL: non-canonical ids are a 400, never cached.
    for path in ["/persons/01", "/persons/+1", "/persons/0", "/persons/%2B1"] {
        let reply = get(&server, path, ACME);
        assert_eq!(reply.status, 400, "{path}: {}", reply.body);
        assert!(
            reply.body.starts_with("{\"error\""),
            "{path}: {}",
            reply.body
        );
    }

    // Admin endpoints: behind the admin token, JSON in and out.
    const ADMIN: &str = "Bearer test-admin";
    let admin =
        |path: &str, body: &str, auth: &str| http(&server, "POST", path, Some(auth), Some(body));
    let denied = admin("/cache/invalidate", r#"{"group":"persons:list"}"#, ACME);
    assert_eq!(denied.status, 401, "{}", denied.body);
    assert_eq!(get(&server, list, ACME).x_cache(), "MISS");
    assert_eq!(get(&server, list, GLOBEX).x_cache(), "HIT");
    let bumped = admin(
        "/cache/invalidate",
        r#"{"group":"persons:list","tenant":"acme"}"#,
        ADMIN,
    );
    assert_eq!(bumped.status, 200, "{}", bumped.body);
    assert!(
        bumped
            .body
            .starts_with(r#"{"bumped":"{app:persons:list}:ver:scope="#),
        "{}",
        bumped.body
    );
    println!("POST /cache/invalidate (acme) → {}", bumped.body);
    assert_eq!(get(&server, list, ACME).x_cache(), "MISS");
    assert_eq!(get(&server, list, GLOBEX).x_cache(), "HIT");
    let all = admin("/cache/invalidate", r#"{"group":"persons:list"}"#, ADMIN);
    println!("POST /cache/invalidate (all) → {}", all.body);
    assert_eq!(
        all.body,
        r#"{"bumped":"{app:persons:list}:ver","group":"persons:list","tenant":"*"}"#
    );
    assert_eq!(get(&server, list, GLOBEX).x_cache(), "MISS");
    assert_eq!(get(&server, "/persons/2", ACME).x_cache(), "HIT");
    let purged = admin(
        "/cache/purge",
        r#"{"path":"/persons/2","tenant":"acme"}"#,
        ADMIN,
    );
    println!("POST /cache/purge → {}", purged.body);
    assert!(
        purged
            .body
            .starts_with(r#"{"path":"/persons/2","purged":"app:person:2:scope="#),
        "{}",
        purged.body
    );
    assert_eq!(get(&server, "/persons/2", ACME).x_cache(), "MISS");
    let warmed = admin(
        "/cache/warm",
        r#"{"paths":["/persons/3","/persons/4","/persons/999999","/persons?limit=3"],"tenant":"acme"}"#,
        ADMIN,
    );
    println!("POST /cache/warm → {}", warmed.body);
    assert_eq!(
        warmed.body,
        r#"{"already_cached":0,"failed":0,"not_stored":1,"requested":4,"stored":3}"#
    );
    for path in ["/persons/3", "/persons/4", "/persons?limit=3"] {
        assert_eq!(get(&server, path, ACME).x_cache(), "HIT", "{path}");
    }
    for (path, body) in [
        ("/cache/invalidate", r#"{"group":"nope"}"#),
        ("/cache/purge", r#"{"path":"/persons/1"}"#),
        ("/cache/warm", r#"{"paths":["/persons/1"]}"#),
        ("/cache/purge", "{not json"),
    ] {
        let reply = admin(path, body, ADMIN);
        assert_eq!(reply.status / 100, 4, "{path} {body}: {}", reply.body);
        assert!(reply.body.starts_with("{\"error\""), "{}", reply.body);
    }

    // Health and stats.
    let health = http(&server, "GET", "/cache/health", None, None);
    assert_eq!(
        health.body,
        r#"{"cache":"on","circuit":"closed","pending_invalidations":0,"persistence":"none","redis":"ok","store":"redis"}"#
    );
    let stats = http(
        &server,
        "GET",
        "/cache/stats",
        Some("Bearer test-admin"),
        None,
    );
    assert!(
        stats.body.contains(r#""route":"GET /persons/{id}""#),
        "{}",
        stats.body
    );
    assert!(stats.body.contains("hit_rate"));

    // The operator reads are not open to anonymous clients, nor to a
    // tenant's token.
    for path in ["/cache/stats", "/metrics"] {
        for auth in [None, Some(ACME), Some("Bearer test-admin-")] {
            let refused = http(&server, "GET", path, auth, None);
            assert_eq!(refused.status, 401, "{path} with {auth:?}");
        }
    }

    // The same counts at /metrics, in Prometheus text, with the admin token.
    let scraped = http(&server, "GET", "/metrics", Some("Bearer test-admin"), None);
    assert_eq!(scraped.status, 200);
    println!("GET /metrics (excerpt):");
    for line in scraped.body.lines().filter(|l| {
        l.starts_with("tower_redis_cache_") && !l.contains("_bucket") && l.contains("/persons/{id}")
            || l.starts_with("tower_redis_cache_invalidations_total")
            || l.starts_with("tower_redis_cache_circuit_state")
    }) {
        println!("  {line}");
    }
    let stats: serde_json::Value = serde_json::from_str(&stats.body).unwrap();
    let item = stats["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "GET /persons/{id}")
        .unwrap();
    let item_route = r#"route="GET /persons/{id}""#;
    for (metric, field) in [
        ("tower_redis_cache_hits_total", "hits"),
        ("tower_redis_cache_misses_total", "misses"),
        ("tower_redis_cache_stores_total", "stores"),
    ] {
        assert_eq!(
            metric_value(&scraped.body, metric, &[item_route]),
            item[field].as_f64(),
            "{metric} against /cache/stats {field}"
        );
    }
    assert_eq!(
        metric_value(
            &scraped.body,
            "tower_redis_cache_hit_duration_seconds_count",
            &[item_route]
        ),
        item["hits"].as_f64(),
    );
    assert_eq!(
        metric_value(
            &scraped.body,
            "tower_redis_cache_invalidations_total",
            &[r#"outcome="applied""#]
        ),
        stats["invalidations"]["applied"].as_f64(),
    );
    assert_eq!(
        metric_value(&scraped.body, "tower_redis_cache_circuit_state", &[]),
        Some(0.0)
    );
    assert!(scraped
        .body
        .contains("# TYPE tower_redis_cache_hit_duration_seconds histogram"));

    // Redis stops under the running server: every answer still correct.
    redis.stop();
    let down = http(&server, "GET", "/cache/health", None, None);
    assert!(down.body.contains(r#""redis":"down""#), "{}", down.body);
    let renamed = http(
        &server,
        "PATCH",
        "/persons/1",
        Some(ACME),
        Some(r#"{"name":"Ana Sem Redis"}"#),
    );
    assert_eq!(renamed.status, 200);
    for _ in 0..3 {
        let reply = get(&server, "/persons/1", ACME);
        assert_eq!(reply.status, 200);
        assert!(reply.body.contains("Ana Sem Redis"), "{}", reply.body);
        assert_eq!(reply.x_cache(), "BYPASS");
    }

    // And comes back: caching resumes without a restart of the server.
    redis.restart();
    let mut resumed = false;
    for _ in 0..50 {
        let reply = get(&server, "/persons/1", ACME);
        assert_eq!(reply.status, 200);
        assert!(reply.body.contains("Ana Sem Redis"));
        if reply.x_cache() == "HIT" {
            resumed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(resumed, "caching resumed after Redis came back");

    // Every series the Grafana dashboard queries is in the exporter's
    // output, after a run with hits, misses, writes and an outage.
    let scraped = http(&server, "GET", "/metrics", Some("Bearer test-admin"), None).body;
    let dashboard = include_str!("../dashboards/tower-redis-cache.json");
    let queried = dashboard_metrics(dashboard);
    assert!(queried.len() >= 10, "{queried:?}");
    for metric in &queried {
        assert!(
            scraped
                .lines()
                .any(|line| line.split(['{', ' ']).next() == Some(metric.as_str())),
            "the dashboard queries {metric}, which /metrics does not export"
        );
    }
}

/// The metric names a dashboard's queries use.
fn dashboard_metrics(dashboard: &str) -> std::collections::BTreeSet<String> {
    let json: serde_json::Value = serde_json::from_str(dashboard).expect("valid JSON");
    let mut names = std::collections::BTreeSet::new();
    for panel in json["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            let mut rest = expr;
            while let Some(at) = rest.find("tower_redis_cache_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                names.insert(name);
            }
        }
    }
    names
}

#[test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
fn the_example_runs_on_a_cluster() {
    let cluster = RedisCluster::start();
    let server = start_with("REDIS_CLUSTER_URLS", &cluster.urls().join(","));
    // The item and the tenant's lists live in different slots: both are
    // invalidated.
    reads_a_write_back(&server, "Ana no Cluster");
}

#[test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
fn the_example_runs_on_sentinel() {
    let (master, replica) = (RedisServer::start(), RedisServer::start());
    let mut conn = redis::Client::open(replica.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(master.port)
        .query(&mut conn)
        .unwrap();
    let sentinel = Sentinel::start(master.port);
    let server = start_env(&[
        ("REDIS_SENTINEL_URLS", &sentinel.url()),
        ("REDIS_SENTINEL_MASTER", "mymaster"),
    ]);
    reads_a_write_back(&server, "Ana via Sentinel");
}

/// Miss then hit for a person and the tenant's list; a rename; both read
/// back fresh; health on Redis.
fn reads_a_write_back(server: &Server, name: &str) {
    for path in ["/persons/1", "/persons?limit=5"] {
        assert_eq!(get(server, path, ACME).x_cache(), "MISS", "{path}");
        assert_eq!(get(server, path, ACME).x_cache(), "HIT", "{path}");
    }
    let body = format!(r#"{{"name":"{name}"}}"#);
    let renamed = http(server, "PATCH", "/persons/1", Some(ACME), Some(&body));
    assert_eq!(renamed.status, 200, "{}", renamed.body);
    for path in ["/persons/1", "/persons?limit=5"] {
        let reply = get(server, path, ACME);
        assert_eq!(reply.x_cache(), "MISS", "{path}");
        assert!(reply.body.contains(name), "{path}: {}", reply.body);
    }
    let health = http(server, "GET", "/cache/health", None, None);
    assert!(health.body.contains(r#""redis":"ok""#), "{}", health.body);
    assert!(
        health.body.contains(r#""store":"redis""#),
        "{}",
        health.body
    );
}

/// Two example processes over one Redis and one SQLite file, both routes
/// kept in process for a minute: a write on one shows at once on it, and
/// on the other well within the minute, so through the published
/// invalidation, for the item and the tenant's list alike.
#[test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
fn two_processes_with_the_in_process_tier() {
    let redis = RedisServer::start();
    let db = std::env::temp_dir().join(format!("persons-tier-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&db);
    let vars = [
        ("REDIS_URL", redis.url()),
        ("PERSONS_DB", db.display().to_string()),
        ("CACHE_IN_PROCESS_MS", "60000".to_owned()),
    ];
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let writer = start_env(&vars);
    // The first process created and seeded the file.
    assert_eq!(get(&writer, "/persons/1", ACME).status, 200);
    let other = start_env(&vars);
    for server in [&writer, &other] {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !http(server, "GET", "/cache/health", None, None)
            .body
            .contains(r#""live":true"#)
        {
            assert!(
                std::time::Instant::now() < until,
                "the tier never subscribed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for path in ["/persons/1", "/persons?limit=5"] {
        for server in [&writer, &other] {
            get(server, path, ACME);
            let reply = get(server, path, ACME);
            let status = reply.header("cache-status").unwrap_or_default().to_owned();
            assert!(status.contains("in-process"), "{path}: {status}");
        }
    }
    let renamed = http(
        &writer,
        "PATCH",
        "/persons/1",
        Some(ACME),
        Some(r#"{"name":"Ana em Dois Processos"}"#),
    );
    assert_eq!(renamed.status, 200, "{}", renamed.body);
    for path in ["/persons/1", "/persons?limit=5"] {
        let reply = get(&writer, path, ACME);
        assert!(
            reply.body.contains("Ana em Dois Processos"),
            "writer, {path}: {}",
            reply.body
        );
        let until = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let reply = get(&other, path, ACME);
            if reply.body.contains("Ana em Dois Processos") {
                break;
            }
            assert!(
                std::time::Instant::now() < until,
                "other process, {path}: still old 2 s after the write: {}",
                reply.body
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let stats = http(
        &other,
        "GET",
        "/cache/stats",
        Some("Bearer test-admin"),
        None,
    );
    assert!(
        stats.body.contains(r#""in_process_hits":"#),
        "{}",
        stats.body
    );
    drop((writer, other));
    let _ = std::fs::remove_file(&db);
}

/// A row changed in the SQLite file directly (a batch job, a migration: no
/// API call, no rule) is found by a sampled hit, counted, and healed: the
/// hit after it serves the new row, and so does every later one.
#[test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
fn a_row_changed_behind_the_api_is_found_by_verification_and_healed() {
    let redis = RedisServer::start();
    let db = std::env::temp_dir().join(format!("persons-verify-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&db);
    let url = redis.url();
    let path = db.display().to_string();
    let server = start_env(&[
        ("REDIS_URL", url.as_str()),
        ("PERSONS_DB", path.as_str()),
        ("CACHE_VERIFY_RATE", "1"),
    ]);
    assert_eq!(get(&server, "/persons/1", ACME).x_cache(), "MISS");
    let cached = get(&server, "/persons/1", ACME);
    assert_eq!(cached.x_cache(), "HIT");
    assert!(!cached.body.contains("Direct Write"));
    // That hit's own check (in the background) found nothing to change.
    let stats = item_stats_when(&server, |s| s["verified"] == 1);
    assert_eq!(stats["verify_mismatches"], 0, "{stats}");

    let sqlite = rusqlite::Connection::open(&db).unwrap();
    sqlite.busy_timeout(Duration::from_secs(5)).unwrap();
    let changed = sqlite
        .execute("UPDATE persons SET name = 'Direct Write' WHERE id = 1", [])
        .unwrap();
    assert_eq!(changed, 1);

    // The sampled hit is served as cached; its check finds the change.
    let stale = get(&server, "/persons/1", ACME);
    assert_eq!(
        (stale.x_cache(), stale.body.as_str()),
        ("HIT", cached.body.as_str())
    );
    let stats = item_stats_when(&server, |s| s["verify_mismatches"] == 1 && s["stores"] == 2);
    assert!(stats["last_mismatch_unix_ms"].as_u64().is_some(), "{stats}");
    println!("GET /cache/stats, the item route: {stats}");
    for _ in 0..3 {
        let fresh = get(&server, "/persons/1", ACME);
        assert_eq!(fresh.x_cache(), "HIT");
        assert!(fresh.body.contains("Direct Write"), "{}", fresh.body);
    }
    let scraped = http(&server, "GET", "/metrics", Some("Bearer test-admin"), None).body;
    let item = r#"route="GET /persons/{id}""#;
    println!("GET /metrics (excerpt):");
    for line in scraped
        .lines()
        .filter(|l| l.contains("verif") && !l.starts_with('#'))
    {
        println!("  {line}");
    }
    assert_eq!(
        metric_value(
            &scraped,
            "tower_redis_cache_verify_mismatches_total",
            &[item]
        ),
        Some(1.0)
    );
    assert!(
        metric_value(&scraped, "tower_redis_cache_verified_total", &[item]).unwrap_or(0.0) >= 2.0
    );
    let _ = std::fs::remove_file(&db);
}

/// `/cache/stats` of the item route once `done` holds of it (checks run
/// in the background), within 10 s.
fn item_stats_when(
    server: &Server,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = http(
            server,
            "GET",
            "/cache/stats",
            Some("Bearer test-admin"),
            None,
        )
        .body;
        let all: serde_json::Value = serde_json::from_str(&body).unwrap();
        let item = all["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["route"] == "GET /persons/{id}")
            .unwrap()
            .clone();
        if done(&item) {
            return item;
        }
        assert!(std::time::Instant::now() < until, "{item}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A rolling deploy stops a process with SIGTERM while a write is in
/// flight and Redis is not answering: the write still gets its response,
/// and the process replays the write's unconfirmed invalidation before it
/// exits, so another process started after it never serves the entry the
/// write replaced.
#[test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
fn a_sigterm_finishes_writes_in_flight_and_replays_their_invalidations() {
    let redis = RedisServer::start();
    let db = std::env::temp_dir().join(format!("persons-drain-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&db);
    let vars = [
        ("REDIS_URL", redis.url()),
        ("PERSONS_DB", db.display().to_string()),
        ("PERSONS_DRAIN_SECONDS", "20".to_owned()),
    ];
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut old = start_env(&vars);
    let before = get(&old, "/persons/1", ACME).body;
    assert_eq!(get(&old, "/persons/1", ACME).x_cache(), "HIT");

    // Redis stops answering; a write starts; the process is told to stop
    // while the write waits for its invalidation.
    redis.pause();
    let write = std::thread::scope(|scope| {
        let write = scope.spawn(|| {
            http(
                &old,
                "PATCH",
                "/persons/1",
                Some(ACME),
                Some(r#"{"name":"Renamed In Flight"}"#),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        old.terminate();
        write.join().expect("the write got a response")
    });
    assert_eq!(write.status, 200, "{}", write.body);
    assert!(write.body.contains("Renamed In Flight"), "{}", write.body);
    // Its invalidation could not be confirmed: the process waits for Redis.
    assert_eq!(old.exited_within(Duration::from_secs(1)), None);
    redis.resume();
    let status = old.exited_within(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "exits cleanly once the invalidation is replayed: {status:?}"
    );

    // The next process over the same Redis and database reads the write.
    let new = start_env(&vars);
    let after = get(&new, "/persons/1", ACME);
    assert_eq!(after.status, 200);
    assert!(
        after.body.contains("Renamed In Flight"),
        "served the pre-write entry {before} as {}: {}",
        after.x_cache(),
        after.body
    );
    let _ = std::fs::remove_file(&db);
}

/// `GET path` on `addr` over HTTP/1.1: (status, body).
fn get_from(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
    // Prometheus answers in chunks: keep the JSON only.
    let body = match (body.find('{'), body.rfind('}')) {
        (Some(start), Some(end)) => body[start..=end].to_owned(),
        _ => body.to_owned(),
    };
    (status, body)
}

/// A real Prometheus (Debian's package) scrapes the persons example, with
/// the admin token, while it serves a healthy mix of hits, misses and
/// writes and nothing bypasses; every query of every dashboard panel is
/// valid PromQL, and the panels an operator opens first show data.
#[test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
#[cfg_attr(prometheus_missing, ignore = "prometheus is not on PATH")]
fn every_dashboard_panel_runs_on_a_real_prometheus() {
    let redis = RedisServer::start();
    // Every write probed and a tenth of the hits checked, so that the
    // consistency panels have data within the test.
    let server = start_env(&[
        ("REDIS_URL", &redis.url()),
        ("CACHE_PROBE_RATE", "1"),
        ("CACHE_VERIFY_RATE", "0.1"),
    ]);
    let dir = std::env::temp_dir().join(format!("persons-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n\
             - job_name: persons\n  \
               authorization: {{credentials: test-admin}}\n  \
               static_configs: [{{targets: ['{}']}}]\n",
            server.addr
        ),
    )
    .unwrap();
    let prometheus_addr = format!("127.0.0.1:{}", common::free_port());
    let mut prometheus = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={prometheus_addr}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus starts");
    let ready = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        std::net::TcpStream::connect(&prometheus_addr).is_ok()
            && get_from(&prometheus_addr, "/-/ready").0 == 200
    });
    assert!(ready, "prometheus did not get ready");

    // Healthy traffic for a few scrapes: misses, hits, writes; no bypass.
    let started = std::time::Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(8) {
        for path in ["/persons/1", "/persons/2", "/persons?limit=5"] {
            assert_eq!(get(&server, path, ACME).status, 200);
        }
        if round % 10 == 0 {
            let body = format!(r#"{{"name":"Round {round}"}}"#);
            let write = http(&server, "PATCH", "/persons/2", Some(ACME), Some(&body));
            assert_eq!(write.status, 200, "{}", write.body);
        }
        round += 1;
        std::thread::sleep(Duration::from_millis(20));
    }

    let dashboard = include_str!("../dashboards/tower-redis-cache.json");
    let json: serde_json::Value = serde_json::from_str(dashboard).unwrap();
    // The panels an operator opens first: on a healthy deployment each
    // shows data.
    let first = [
        "Hit ratio per route",
        "Requests per route by outcome",
        "Hit latency (p50, p99)",
        "Miss latency (p50, p99)",
        "Circuit breaker",
        "Invalidations: applied, failed, skipped, unscoped",
        "Invalidations queued for replay",
        "Writes consistent within 1 s / 10 s (nines, last hour)",
        "Stale hits found (nines, last hour)",
        "Handler calls by reason",
    ];
    let mut empty_first = Vec::new();
    for panel in json["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap_or("");
        let mut shows_data = false;
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "20s");
            let encoded: String = expr
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            let (status, body) =
                get_from(&prometheus_addr, &format!("/api/v1/query?query={encoded}"));
            let reply: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|_| panic!("{title}: {expr}: not JSON: {body}"));
            assert_eq!(
                (status, reply["status"].as_str()),
                (200, Some("success")),
                "{title}: {expr}: {body}"
            );
            let results = reply["data"]["result"].as_array().unwrap();
            shows_data |= results
                .iter()
                .any(|r| r["value"][1].as_str().is_some_and(|v| v != "NaN"));
            // Nines are proven by checks: a healthy run shows more than 0
            // (the 10 s probes come after the test's 8 s).
            if title.contains("nines") {
                let nines: Vec<f64> = results
                    .iter()
                    .filter_map(|r| r["value"][1].as_str()?.parse().ok())
                    .collect();
                assert!(nines.iter().any(|n| *n > 0.5), "{title}: {expr}: {body}");
            }
        }
        if first.contains(&title) && !shows_data {
            empty_first.push(title.to_owned());
        }
    }
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        empty_first,
        Vec::<String>::new(),
        "panels without data on a healthy deployment"
    );
}
