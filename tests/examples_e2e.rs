//! Every small example as a user runs it: built by cargo, started on a
//! free port against what it needs (nothing, a `redis-server`, a 3-master
//! cluster), then one miss, one hit, one write and the fresh read after it.

mod common;

use common::http::{http, spawn, Reply, Server};
use common::{RedisCluster, RedisServer};

/// GET `path` twice (a miss, then a hit with the same body), then the
/// write, then GET again: a miss that shows `fresh`.
fn miss_hit_write_fresh(
    server: &Server,
    auth: Option<&str>,
    path: &str,
    write: (&str, &str, &str),
    fresh: &str,
) {
    let get = || http(server, "GET", path, auth, None);
    let first = get();
    assert_eq!(
        (first.status, first.x_cache()),
        (200, "MISS"),
        "{}",
        first.body
    );
    let second = get();
    assert_eq!((second.status, second.x_cache()), (200, "HIT"), "{path}");
    assert_eq!(first.body, second.body);
    let (method, target, body) = write;
    let written: Reply = http(server, method, target, auth, Some(body));
    assert!((200..300).contains(&written.status), "{}", written.body);
    let after = get();
    assert_eq!(after.x_cache(), "MISS", "the write invalidated {path}");
    assert!(after.body.contains(fresh), "{}", after.body);
}

#[test]
fn memory_store() {
    let server = spawn("memory_store", "EXAMPLE_ADDR", &[]);
    miss_hit_write_fresh(
        &server,
        None,
        "/notes/1",
        ("PUT", "/notes/1", "call mum"),
        "call mum",
    );
    // The handler reads `Path<u64>`: `01` is note 1, purged by the write to `1`.
    assert_eq!(
        http(&server, "GET", "/notes/01", None, None).x_cache(),
        "HIT"
    );
    miss_hit_write_fresh(&server, None, "/notes", ("PUT", "/notes/7", "new"), "new");
}

#[test]
fn plain_hyper() {
    let server = spawn("plain_hyper", "EXAMPLE_ADDR", &[]);
    miss_hit_write_fresh(
        &server,
        None,
        "/prices/EUR",
        ("POST", "/prices/eur", "1.25"),
        "125",
    );
}

#[test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
fn redis_tenants() {
    let redis = RedisServer::start();
    let server = spawn(
        "redis_tenants",
        "EXAMPLE_ADDR",
        &[("REDIS_URL", redis.url().as_str())],
    );
    let (acme, globex) = (Some("Bearer acme"), Some("Bearer globex"));
    assert_eq!(
        http(&server, "GET", "/projects", globex, None).x_cache(),
        "MISS"
    );
    miss_hit_write_fresh(
        &server,
        acme,
        "/projects",
        ("POST", "/projects", "launch"),
        "launch",
    );
    // Acme's write left globex's page alone, and never showed it acme's.
    let other = http(&server, "GET", "/projects", globex, None);
    assert_eq!(other.x_cache(), "HIT");
    assert!(!other.body.contains("launch"), "{}", other.body);
    assert_eq!(http(&server, "GET", "/projects", None, None).status, 401);
}

#[test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
fn cluster() {
    let cluster = RedisCluster::start();
    let seeds = cluster.urls().join(",");
    let server = spawn(
        "cluster",
        "EXAMPLE_ADDR",
        &[("REDIS_CLUSTER_URLS", seeds.as_str())],
    );
    miss_hit_write_fresh(
        &server,
        None,
        "/articles/hello",
        ("PUT", "/articles/hello", "Hi!"),
        "Hi!",
    );
    miss_hit_write_fresh(
        &server,
        None,
        "/articles",
        ("PUT", "/articles/news", "x"),
        "news",
    );
}
