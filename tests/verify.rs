//! Sampled verification of hits (`Route::verify`): a write that bypasses
//! every rule (here, the database changed directly) is found by a sampled
//! hit, counted, and healed; a hit that matches the handler changes
//! nothing. On the memory store, one redis-server and a 3-master cluster.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::{get_req, send, Backend, Db};
use tower_redis_cache::store::Store;
use tower_redis_cache::{CacheLayer, ConfigError, Policy, Route, RouteStats, Rule};

backend_tests!(
    a_write_outside_every_rule_is_found_by_a_sampled_hit_and_healed,
    a_list_changed_outside_every_rule_is_healed_too,
);

/// Every hit of both routes checked against the handler.
fn verifying(store: Arc<dyn Store>) -> Policy {
    Policy::builder()
        .store(store)
        .route(
            Route::get("/persons/{id}")
                .key("person:{id}")
                .ttl(Duration::from_secs(60))
                .verify(1.0),
        )
        .route(
            Route::get("/persons")
                .key("persons:list:v{version}:{query_hash}")
                .versioned_by("persons:list")
                .verify(1.0),
        )
        .on(Rule::new("PATCH /persons/{id}")
            .purge("GET /persons/{id}")
            .bump("persons:list"))
        .build()
        .unwrap()
}

fn app(store: Arc<dyn Store>, db: Db) -> (axum::Router, Policy) {
    let policy = verifying(store);
    (
        common::router(db).layer(CacheLayer::new(policy.clone())),
        policy,
    )
}

/// The route's counters once `done` holds of them (verifications run in
/// the background), within 10 s.
async fn stats_when(
    policy: &Policy,
    route: &str,
    done: impl Fn(&RouteStats) -> bool,
) -> RouteStats {
    for _ in 0..1000 {
        let stats = policy.stats().route(route).unwrap();
        if done(&stats) {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{route}: {:?}", policy.stats().route(route));
}

async fn a_write_outside_every_rule_is_found_by_a_sampled_hit_and_healed(backend: Backend) {
    const ROUTE: &str = "GET /persons/{id}";
    let db = Db::default();
    db.set("1", 1);
    let (app, policy) = app(backend.store.clone(), db.clone());
    assert_eq!(send(&app, get_req("/persons/1")).await.1, "MISS");
    let hit = send(&app, get_req("/persons/1")).await;
    assert_eq!(
        hit,
        (StatusCode::OK, "HIT".into(), r#"{"id":"1","rev":1}"#.into())
    );
    // The hit was checked: the same response, nothing counted or stored.
    let stats = stats_when(&policy, ROUTE, |s| s.verified == 1).await;
    assert_eq!((stats.verify_mismatches, stats.stores), (0, 1));
    assert_eq!(stats.last_mismatch, None);

    // The row changes behind the cache's back: no rule runs.
    db.set("1", 2);
    let stale = send(&app, get_req("/persons/1")).await;
    assert_eq!(stale.1, "HIT");
    assert_eq!(
        stale.2, r#"{"id":"1","rev":1}"#,
        "the sampled hit is served as cached"
    );
    let stats = stats_when(&policy, ROUTE, |s| {
        s.verify_mismatches == 1 && s.stores == 2
    })
    .await;
    assert!(stats.last_mismatch.is_some());
    // Healed: every later hit is the new row.
    for _ in 0..3 {
        let fresh = send(&app, get_req("/persons/1")).await;
        assert_eq!(
            fresh,
            (StatusCode::OK, "HIT".into(), r#"{"id":"1","rev":2}"#.into())
        );
    }
    let stats = stats_when(&policy, ROUTE, |s| s.verified >= 3).await;
    assert_eq!(stats.verify_mismatches, 1, "{stats:?}");
}

async fn a_list_changed_outside_every_rule_is_healed_too(backend: Backend) {
    const ROUTE: &str = "GET /persons";
    let db = Db::default();
    db.set("1", 1);
    let (app, policy) = app(backend.store.clone(), db.clone());
    send(&app, get_req("/persons")).await;
    assert_eq!(send(&app, get_req("/persons")).await.1, "HIT");
    stats_when(&policy, ROUTE, |s| s.verified == 1).await;
    db.set("2", 5);
    let stale = send(&app, get_req("/persons")).await;
    assert!(!stale.2.contains(r#"["2",5]"#), "{}", stale.2);
    stats_when(&policy, ROUTE, |s| {
        s.verify_mismatches == 1 && s.stores == 2
    })
    .await;
    let fresh = send(&app, get_req("/persons")).await;
    assert_eq!(fresh.1, "HIT");
    assert!(fresh.2.contains(r#"["2",5]"#), "{}", fresh.2);
}

#[test]
fn a_rate_outside_zero_to_one_is_a_config_error() {
    for rate in [-0.1, 1.5, f64::NAN] {
        let built = Policy::builder()
            .route(Route::get("/persons/{id}").key("person:{id}").verify(rate))
            .build();
        assert!(
            matches!(built, Err(ConfigError::VerifyRate { .. })),
            "{rate}: {built:?}"
        );
    }
    for rate in [0.0, 0.001, 1.0] {
        let built = Policy::builder()
            .route(Route::get("/persons/{id}").key("person:{id}").verify(rate))
            .build();
        assert!(built.is_ok(), "{rate}");
    }
}
