//! The behaviour every store must give, run against the memory store and a
//! real `redis-server` (started per test on a free port).

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use common::{app, get_req, method_req, send, Backend, Db, CAP};
use tower_redis_cache::store::{CacheKey, Observed};
use tower_redis_cache::Reason;

backend_tests!(
    miss_then_hit_calls_the_handler_once,
    large_bodies_are_stored_compressed_and_old_entries_still_read,
    entries_expire_after_their_ttl,
    keys_differ_across_params_query_and_scope,
    equivalent_queries_share_an_entry,
    uncacheable_responses_are_never_stored,
    head_is_served_from_the_get_entry,
    large_streamed_body_passes_through_unstored,
    garbage_entry_is_a_miss_and_is_overwritten,
    credentials_without_scope_bypass_the_cache,
    tenants_never_see_each_others_entries,
    a_write_invalidates_the_item_and_every_list,
    a_failed_write_invalidates_nothing,
    a_lost_version_key_never_brings_old_lists_back,
    concurrent_cold_misses_call_the_handler_once,
    concurrent_uncacheable_requests_all_reach_the_handler,
    etags_and_conditional_gets,
    stale_entries_are_served_while_one_refresh_runs,
    stale_entries_are_never_served_past_the_window_or_after_a_write,
    one_bump_reaches_every_scope_of_an_item,
    an_evicted_guard_never_lets_an_old_read_store,
    a_head_request_refreshes_a_stale_entry_with_its_body,
    a_leader_that_disconnects_hands_its_flight_to_one_follower,
    a_not_modified_answer_claims_no_content_length,
);

async fn miss_then_hit_calls_the_handler_once(backend: Backend) {
    let db = Db::default();
    db.set("1", 7);
    let (app, cache) = app(backend.store, db.clone());
    let first = send(&app, get_req("/persons/1")).await;
    let second = send(&app, get_req("/persons/1")).await;
    assert_eq!(
        first,
        (
            StatusCode::OK,
            "MISS".into(),
            r#"{"id":"1","rev":7}"#.into()
        )
    );
    assert_eq!(second, (StatusCode::OK, "HIT".into(), first.2.clone()));
    assert_eq!(db.calls(), 1);
    let stats = cache.stats().route("GET /persons/{id}").unwrap();
    assert_eq!(
        (stats.hits, stats.misses, stats.stores, stats.errors),
        (1, 1, 1, 0)
    );
}

async fn entries_expire_after_their_ttl(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let (app, _) = app(backend.store, db.clone());
    assert_eq!(send(&app, get_req("/short/1")).await.1, "MISS");
    assert_eq!(send(&app, get_req("/short/1")).await.1, "HIT");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(send(&app, get_req("/short/1")).await.1, "MISS");
    assert_eq!(db.calls(), 2);
}

async fn keys_differ_across_params_query_and_scope(backend: Backend) {
    let db = Db::default();
    for id in ["1", "2", "1:x", "*"] {
        db.set(id, 1);
    }
    let (app, _) = app(backend.store, db.clone());
    for uri in [
        "/persons/1",
        "/persons/2",
        "/persons/1:x",
        "/persons/*",
        "/persons?limit=1",
        "/persons?limit=2",
    ] {
        let (status, x_cache, _) = send(&app, get_req(uri)).await;
        assert_eq!(
            (status, x_cache.as_str()),
            (StatusCode::OK, "MISS"),
            "{uri}"
        );
    }
    for tenant in ["a", "b"] {
        let request = axum::http::Request::get("/tenant/1")
            .header("x-tenant-id", tenant)
            .body(Default::default())
            .unwrap();
        assert_eq!(send(&app, request).await.1, "MISS", "tenant {tenant}");
    }
    assert_eq!(db.calls(), 8);
}

async fn equivalent_queries_share_an_entry(backend: Backend) {
    let db = Db::default();
    let (app, _) = app(backend.store, db.clone());
    assert_eq!(send(&app, get_req("/persons?b=2&a=1")).await.1, "MISS");
    assert_eq!(send(&app, get_req("/persons?a=1&b=2&c=")).await.1, "HIT");
    assert_eq!(send(&app, get_req("/persons?a=1&b=3")).await.1, "MISS");
    assert_eq!(db.calls(), 2);
}

async fn uncacheable_responses_are_never_stored(backend: Backend) {
    let db = Db::default();
    let (app, cache) = app(backend.store, db.clone());
    let cases = [
        ("html", StatusCode::OK, Reason::NotJson),
        ("created", StatusCode::CREATED, Reason::Status),
        ("error", StatusCode::INTERNAL_SERVER_ERROR, Reason::Status),
        ("nothing", StatusCode::NOT_FOUND, Reason::Status),
        ("cookie", StatusCode::OK, Reason::SetCookie),
        ("no-store", StatusCode::OK, Reason::CacheControl),
        ("private", StatusCode::OK, Reason::CacheControl),
        ("vary-star", StatusCode::OK, Reason::Vary),
    ];
    for (kind, status, _) in cases {
        let uri = format!("/shape/{kind}");
        for _ in 0..2 {
            let (got, x_cache, _) = send(&app, get_req(&uri)).await;
            assert_eq!((got, x_cache.as_str()), (status, "MISS"), "{kind}");
        }
    }
    assert_eq!(db.calls(), 2 * cases.len());
    let skips = cache.stats().route("GET /shape/{kind}").unwrap().skips;
    for (kind, _, reason) in cases {
        assert!(
            skips.iter().any(|(r, n)| *r == reason && *n > 0),
            "{kind}: {skips:?}"
        );
    }
    // The control: a plain JSON 200 is stored.
    send(&app, get_req("/shape/ok")).await;
    assert_eq!(send(&app, get_req("/shape/ok")).await.1, "HIT");
}

async fn head_is_served_from_the_get_entry(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let (app, _) = app(backend.store, db.clone());
    // A HEAD miss has no body to store.
    assert_eq!(send(&app, method_req("HEAD", "/persons/1")).await.1, "MISS");
    let (_, x_cache, body) = send(&app, get_req("/persons/1")).await;
    assert_eq!(x_cache, "MISS");
    let response = tower::ServiceExt::oneshot(app.clone(), method_req("HEAD", "/persons/1"))
        .await
        .unwrap();
    assert_eq!(response.headers()["x-cache"], "HIT");
    assert_eq!(
        response.headers()["content-length"],
        body.len().to_string().as_str()
    );
    let head_body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    assert!(head_body.is_empty());
    assert_eq!(db.calls(), 2);
}

async fn large_streamed_body_passes_through_unstored(backend: Backend) {
    let db = Db::default();
    let (app, cache) = app(backend.store, db.clone());
    for _ in 0..2 {
        let (status, x_cache, body) = send(&app, get_req("/shape/big")).await;
        assert_eq!((status, x_cache.as_str()), (StatusCode::OK, "MISS"));
        assert_eq!(body.len(), 16 * 1024);
        assert!(body.len() > CAP);
        let expected: String = (0..16u8)
            .map(|i| String::from((b'a' + i) as char).repeat(1024))
            .collect();
        assert_eq!(body, expected, "every byte arrives, in order");
    }
    let skips = cache.stats().route("GET /shape/{kind}").unwrap().skips;
    assert_eq!(skips, vec![(Reason::TooLarge, 2)]);
}

async fn garbage_entry_is_a_miss_and_is_overwritten(backend: Backend) {
    let db = Db::default();
    db.set("1", 3);
    let key = CacheKey::Plain("app:person:1".into());
    for garbage in [&b"not an entry"[..], b"\x01\x00", b"\x09future format"] {
        // The key is empty: the lookup leaves this writer's lease there.
        let absent = backend.store.lookup(&key).await.unwrap();
        assert!(matches!(absent.entry(), Observed::Value(lease) if !lease.is_empty()));
        let written = backend
            .store
            .store(
                &key,
                &absent,
                Bytes::copy_from_slice(garbage),
                Duration::from_secs(60),
            )
            .await;
        assert_eq!(written, Ok(true));
        let (app, _) = app(backend.store.clone(), db.clone());
        let first = send(&app, get_req("/persons/1")).await;
        assert_eq!(
            first,
            (
                StatusCode::OK,
                "MISS".into(),
                r#"{"id":"1","rev":3}"#.into()
            )
        );
        assert_eq!(send(&app, get_req("/persons/1")).await.1, "HIT");
        let stale = backend.store.lookup(&key).await.unwrap();
        // Reset the key to garbage for the next round, over the stored entry.
        backend
            .store
            .store(
                &key,
                &stale,
                Bytes::from_static(b""),
                Duration::from_millis(1),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn credentials_without_scope_bypass_the_cache(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let (app, _) = app(backend.store, db.clone());
    let with = |uri: &str, name: &str| {
        axum::http::Request::get(uri)
            .header(name, "secret")
            .body(axum::body::Body::empty())
            .unwrap()
    };
    for header in ["authorization", "cookie"] {
        for _ in 0..2 {
            assert_eq!(send(&app, with("/persons/1", header)).await.1, "BYPASS");
        }
    }
    assert_eq!(db.calls(), 4);
    // A public route shares its entries whatever the credentials.
    assert_eq!(
        send(&app, with("/public/1", "authorization")).await.1,
        "MISS"
    );
    assert_eq!(send(&app, with("/public/1", "cookie")).await.1, "HIT");
    // Nothing was stored for the bypassed requests.
    assert_eq!(send(&app, get_req("/persons/1")).await.1, "MISS");
}

async fn tenants_never_see_each_others_entries(backend: Backend) {
    let db = Db::default();
    let (app, _) = app(backend.store, db.clone());
    let as_tenant = |tenant: &str| {
        axum::http::Request::get("/tenant/1")
            .header("x-tenant-id", tenant)
            .body(axum::body::Body::empty())
            .unwrap()
    };
    // A credential the scope does not read is not covered by the key.
    let mut with_credential = as_tenant("acme");
    with_credential
        .headers_mut()
        .insert("authorization", "Bearer x".parse().unwrap());
    assert_eq!(send(&app, with_credential).await.1, "BYPASS");
    assert_eq!(send(&app, as_tenant("acme")).await.1, "MISS");
    let (_, x_cache, body) = send(&app, as_tenant("globex")).await;
    assert_eq!(x_cache, "MISS");
    assert!(body.contains("globex"), "{body}");
    let (_, x_cache, body) = send(&app, as_tenant("acme")).await;
    assert_eq!(x_cache, "HIT");
    assert!(body.contains("acme"), "{body}");
}

async fn a_write_invalidates_the_item_and_every_list(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    db.set("2", 1);
    let (app, invalidate) = app(backend.store, db.clone());
    for uri in [
        "/persons/1",
        "/persons/2",
        "/persons?limit=1",
        "/persons?limit=2",
    ] {
        send(&app, get_req(uri)).await;
        assert_eq!(send(&app, get_req(uri)).await.1, "HIT", "{uri}");
    }
    let write = tower::ServiceExt::oneshot(app.clone(), method_req("PATCH", "/persons/1"))
        .await
        .unwrap();
    assert_eq!(write.status(), StatusCode::OK);
    assert_eq!(
        write.headers()["cache-status"],
        "tower-redis-cache; fwd=method; detail=invalidated"
    );
    assert_eq!(invalidate.stats().invalidations().applied, 1);
    let (_, x_cache, body) = send(&app, get_req("/persons/1")).await;
    assert_eq!(
        (x_cache.as_str(), body.as_str()),
        ("MISS", r#"{"id":"1","rev":2}"#)
    );
    assert_eq!(
        send(&app, get_req("/persons/2")).await.1,
        "HIT",
        "other items still hit"
    );
    for uri in ["/persons?limit=1", "/persons?limit=2"] {
        let (_, x_cache, body) = send(&app, get_req(uri)).await;
        assert_eq!(x_cache, "MISS", "{uri}");
        assert!(body.contains(r#"["1",2]"#), "{body}");
    }
    // A create bumps the lists only.
    assert_eq!(
        send(&app, method_req("POST", "/persons?3")).await.0,
        StatusCode::CREATED
    );
    assert_eq!(send(&app, get_req("/persons?limit=1")).await.1, "MISS");
    assert_eq!(send(&app, get_req("/persons/1")).await.1, "HIT");
}

async fn a_failed_write_invalidates_nothing(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let (app, invalidate) = app(backend.store, db.clone());
    send(&app, get_req("/persons/1")).await;
    send(&app, get_req("/persons")).await;
    let (status, _, _) = send(&app, method_req("PATCH", "/persons/1?fail=1")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(send(&app, get_req("/persons/1")).await.1, "HIT");
    assert_eq!(send(&app, get_req("/persons")).await.1, "HIT");
    assert_eq!(
        (
            invalidate.stats().invalidations().applied,
            invalidate.stats().invalidations().skipped
        ),
        (0, 1)
    );
}

async fn a_lost_version_key_never_brings_old_lists_back(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let (app, _) = app(backend.store.clone(), db.clone());
    // Lists cached at the first version, then a write bumps it.
    assert_eq!(send(&app, get_req("/persons")).await.1, "MISS");
    assert_eq!(
        send(&app, method_req("PATCH", "/persons/1")).await.0,
        StatusCode::OK
    );
    let (_, x_cache, fresh) = send(&app, get_req("/persons")).await;
    assert_eq!(x_cache, "MISS");
    // The version key is lost: the next version must not be the first one again.
    backend.evict("{app:persons:list}:ver").await;
    assert_eq!(
        send(&app, method_req("PATCH", "/persons/1")).await.0,
        StatusCode::OK
    );
    let (_, x_cache, body) = send(&app, get_req("/persons")).await;
    assert_eq!(x_cache, "MISS");
    assert!(body.contains(r#"["1",3]"#) && body != fresh, "{body}");
    // Lost without a write in between: still a miss, never an old page.
    backend.evict("{app:persons:list}:ver").await;
    let (_, x_cache, body) = send(&app, get_req("/persons")).await;
    assert_eq!(
        (x_cache.as_str(), body.contains(r#"["1",3]"#)),
        ("MISS", true)
    );
}

/// `n` concurrent GETs of `uri`; returns the `cache-status` of each.
async fn concurrently(app: &axum::Router, uri: &str, n: usize) -> Vec<String> {
    let requests = (0..n).map(|_| {
        let app = app.clone();
        let uri = uri.to_owned();
        tokio::spawn(async move {
            let response = tower::ServiceExt::oneshot(app, get_req(&uri))
                .await
                .unwrap();
            assert!(response.status().is_success() || response.status().is_client_error());
            response
                .headers()
                .get("cache-status")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        })
    });
    let mut statuses = Vec::new();
    for request in requests.collect::<Vec<_>>() {
        statuses.push(request.await.unwrap());
    }
    statuses
}

async fn concurrent_cold_misses_call_the_handler_once(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    db.read_delay_us
        .store(200_000, std::sync::atomic::Ordering::Relaxed);
    let (app, _) = app(backend.store, db.clone());
    let statuses = concurrently(&app, "/persons/1", 200).await;
    assert_eq!(
        db.calls(),
        1,
        "one handler call for 200 concurrent cold requests"
    );
    assert_eq!(statuses.iter().filter(|s| s.contains("stored")).count(), 1);
    assert_eq!(
        statuses.iter().filter(|s| s.ends_with("collapsed")).count(),
        199,
        "{statuses:?}"
    );
}

async fn concurrent_uncacheable_requests_all_reach_the_handler(backend: Backend) {
    let db = Db::default();
    db.read_delay_us
        .store(100_000, std::sync::atomic::Ordering::Relaxed);
    let (app, _) = app(backend.store, db.clone());
    concurrently(&app, "/shape/html", 50).await;
    assert_eq!(db.calls(), 50);
    concurrently(&app, "/persons/404", 50).await;
    assert_eq!(db.calls(), 100);
}

async fn etags_and_conditional_gets(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let (app, _) = app(backend.store, db.clone());
    let miss = tower::ServiceExt::oneshot(app.clone(), get_req("/persons/1"))
        .await
        .unwrap();
    let etag = miss.headers()["etag"].to_str().unwrap().to_owned();
    let hit = tower::ServiceExt::oneshot(app.clone(), get_req("/persons/1"))
        .await
        .unwrap();
    assert_eq!(
        hit.headers()["etag"],
        etag.as_str(),
        "the same strong ETag on miss and hit"
    );
    let conditional = |tag: &str| {
        axum::http::Request::get("/persons/1")
            .header("if-none-match", tag)
            .body(axum::body::Body::empty())
            .unwrap()
    };
    for matching in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"other\", {etag}"),
        "*".to_owned(),
    ] {
        let response = tower::ServiceExt::oneshot(app.clone(), conditional(&matching))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED, "{matching}");
        assert_eq!(response.headers()["etag"], etag.as_str());
        assert_eq!(response.headers()["x-cache"], "HIT");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        assert!(body.is_empty());
    }
    let (status, x_cache, body) = send(&app, conditional("\"stale\"")).await;
    assert_eq!(
        (status, x_cache.as_str(), body.as_str()),
        (StatusCode::OK, "HIT", r#"{"id":"1","rev":1}"#)
    );
    assert_eq!(db.calls(), 1, "conditional hits never reach the handler");
    // After a write the tag changes and the old one no longer matches.
    send(&app, method_req("PATCH", "/persons/1")).await;
    let (status, _, body) = send(&app, conditional(&etag)).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, r#"{"id":"1","rev":2}"#)
    );
}

async fn stale_entries_are_served_while_one_refresh_runs(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let (app, policy) = app(backend.store, db.clone());
    assert_eq!(send(&app, get_req("/swr/1")).await.1, "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    db.set("1", 2);
    // The refresh takes a while: every request meanwhile gets the stale entry at once.
    db.read_delay_us
        .store(300_000, std::sync::atomic::Ordering::Relaxed);
    let statuses = concurrently(&app, "/swr/1", 20).await;
    assert!(
        statuses
            .iter()
            .all(|s| s.contains("detail=stale-while-revalidate")),
        "{statuses:?}"
    );
    assert_eq!(db.calls(), 2, "one background refresh for 20 stale hits");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, x_cache, body) = send(&app, get_req("/swr/1")).await;
    assert_eq!(
        (x_cache.as_str(), body.as_str()),
        ("HIT", r#"{"id":"1","rev":2}"#),
        "refreshed"
    );
    assert_eq!(db.calls(), 2);
    let calls = policy.stats().route("GET /swr/{id}").unwrap().handler_calls;
    assert_eq!(
        calls,
        [
            (tower_redis_cache::HandlerCall::Miss, 1),
            (tower_redis_cache::HandlerCall::Refresh, 1)
        ]
    );
}

async fn stale_entries_are_never_served_past_the_window_or_after_a_write(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let (app, _) = app(backend.store, db.clone());
    send(&app, get_req("/swr-short/1")).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        send(&app, get_req("/swr-short/1")).await.1,
        "MISS",
        "past TTL + window"
    );

    send(&app, get_req("/swr/1")).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        send(&app, method_req("PATCH", "/swr/1")).await.0,
        StatusCode::OK
    );
    let (_, x_cache, body) = send(&app, get_req("/swr/1")).await;
    assert_eq!(
        (x_cache.as_str(), body.as_str()),
        ("MISS", r#"{"id":"1","rev":2}"#),
        "never stale after a write"
    );
}

async fn one_bump_reaches_every_scope_of_an_item(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    db.set("2", 1);
    let (app, _) = app(backend.store, db.clone());
    let as_tenant = |method: &str, uri: &str, tenant: &str| {
        axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header("x-tenant-id", tenant)
            .body(axum::body::Body::empty())
            .unwrap()
    };
    let tenants = ["a", "b", "c"];
    for tenant in tenants {
        for uri in ["/scoped/1", "/scoped/2"] {
            send(&app, as_tenant("GET", uri, tenant)).await;
            assert_eq!(send(&app, as_tenant("GET", uri, tenant)).await.1, "HIT");
        }
    }
    // An edit by tenant a (an admin, say) reaches every tenant's entry of item 1.
    assert_eq!(
        send(&app, as_tenant("PATCH", "/scoped/1", "a")).await.0,
        StatusCode::OK
    );
    for tenant in tenants {
        let (_, x_cache, body) = send(&app, as_tenant("GET", "/scoped/1", tenant)).await;
        assert_eq!(
            (x_cache.as_str(), body.as_str()),
            ("MISS", r#"{"id":"1","rev":2}"#),
            "tenant {tenant}"
        );
        assert_eq!(
            send(&app, as_tenant("GET", "/scoped/2", tenant)).await.1,
            "HIT",
            "item 2 untouched"
        );
    }
}

/// A miss that read old data must not store it after a write, even when the
/// guard its conditional write relies on (the tombstone, the version key) is
/// evicted between its lookup and its store.
async fn an_evicted_guard_never_lets_an_old_read_store(backend: Backend) {
    let db = Db::default();
    db.set("9", 1);
    let (app, policy) = app(backend.store.clone(), db.clone());
    let handle = policy.handle();
    // The entries a miss stored at revision 1 (what an old read would
    // write), taken out of the store; then the row changes and both go.
    let item = policy.key_for(&get_req("/persons/9")).unwrap();
    let list = policy.key_for(&get_req("/persons")).unwrap();
    send(&app, get_req("/persons/9")).await;
    send(&app, get_req("/persons")).await;
    let old_item = common::stored_entry(&*backend.store, &item).await;
    let old_list = common::stored_entry(&*backend.store, &list).await;
    db.set("9", 2);
    handle.purge(&get_req("/persons/9")).await.unwrap();
    handle.bump("persons:list").await.unwrap();

    // An item: the lookup, then a write's purge, then its tombstone evicted.
    let seen = backend.store.lookup(&item).await.unwrap();
    handle.purge(&get_req("/persons/9")).await.unwrap();
    backend.evict("app:person:9").await;
    let written = backend
        .store
        .store(&item, &seen, old_item, Duration::from_secs(60))
        .await;
    assert_eq!(written, Ok(false), "stored over an evicted tombstone");

    // A list whose version key was missing at lookup; a bump recreates it,
    // and it is evicted again before the store.
    backend.evict("{app:persons:list}:ver").await;
    let seen = backend.store.lookup(&list).await.unwrap();
    handle.bump("persons:list").await.unwrap();
    backend.evict("{app:persons:list}:ver").await;
    let written = backend
        .store
        .store(&list, &seen, old_list, Duration::from_secs(60))
        .await;
    assert_eq!(written, Ok(false), "stored over an evicted version key");

    let (_, _, body) = send(&app, get_req("/persons/9")).await;
    assert_eq!(body, r#"{"id":"9","rev":2}"#);
    let (_, _, body) = send(&app, get_req("/persons")).await;
    assert!(body.contains(r#"["9",2]"#), "{body}");
}

/// A HEAD that finds a stale entry refreshes it with a GET: the refreshed
/// entry keeps its body (a HEAD answer has none). The layer wraps the whole
/// router here, where axum has already stripped HEAD bodies.
async fn a_head_request_refreshes_a_stale_entry_with_its_body(backend: Backend) {
    use tower::{Layer, ServiceExt};
    let db = Db::default();
    db.set("1", 1);
    let policy = common::policy(backend.store);
    let svc = tower_redis_cache::CacheLayer::new(policy).layer(common::router(db.clone()));
    let request = |method: &'static str| {
        let svc = svc.clone();
        async move {
            let response = svc.oneshot(method_req(method, "/swr/1")).await.unwrap();
            let x_cache = response.headers()["x-cache"].to_str().unwrap().to_owned();
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .unwrap()
                .to_bytes();
            (x_cache, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    assert_eq!(request("GET").await.0, "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    db.set("1", 2);
    assert_eq!(request("HEAD").await, ("HIT".to_owned(), String::new()));
    for _ in 0..100 {
        if db.calls() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        request("GET").await,
        ("HIT".to_owned(), r#"{"id":"1","rev":2}"#.to_owned())
    );
}

/// The request leading a flight is cancelled (its client went away) while
/// 50 others wait on it: one of them takes the flight over, the rest wait
/// for it. Two handler calls in all, not 51.
async fn a_leader_that_disconnects_hands_its_flight_to_one_follower(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    db.read_delay_us
        .store(300_000, std::sync::atomic::Ordering::Relaxed);
    let (app, _) = app(backend.store, db.clone());
    let leader = tokio::spawn(tower::ServiceExt::oneshot(
        app.clone(),
        get_req("/persons/1"),
    ));
    while db.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let followers = tokio::spawn({
        let app = app.clone();
        async move { concurrently(&app, "/persons/1", 50).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    leader.abort();
    let statuses = followers.await.unwrap();
    assert_eq!(db.calls(), 2, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| s.contains("stored")).count(), 1);
    assert_eq!(
        statuses.iter().filter(|s| s.ends_with("collapsed")).count(),
        49
    );
}

/// A 304 (to a GET or a HEAD) carries no body and claims no length: not
/// `content-length: 0`, which would describe an empty representation.
async fn a_not_modified_answer_claims_no_content_length(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let (app, _) = app(backend.store, db.clone());
    let miss = tower::ServiceExt::oneshot(app.clone(), get_req("/persons/1"))
        .await
        .unwrap();
    let etag = miss.headers()["etag"].clone();
    for method in ["GET", "HEAD"] {
        let request = axum::http::Request::builder()
            .method(method)
            .uri("/persons/1")
            .header("if-none-match", etag.clone())
            .body(axum::body::Body::empty())
            .unwrap();
        let response = tower::ServiceExt::oneshot(app.clone(), request)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED, "{method}");
        assert_eq!(response.headers().get("content-length"), None, "{method}");
    }
}

/// With the `compression` feature (the test package turns it on), bodies
/// over `compress_over` (1 KiB by default) are stored compressed and served
/// whole; an entry stored uncompressed (before the feature was on) is
/// still a hit; an entry in an earlier version's format is a miss, then
/// overwritten.
async fn large_bodies_are_stored_compressed_and_old_entries_still_read(backend: Backend) {
    let db = Db::default();
    let (app, _) = app(backend.store.clone(), db.clone());
    let large = common::large_json();
    assert!(large.len() > 3000 && large.len() < CAP);
    for expected in ["MISS", "HIT"] {
        let (status, x_cache, body) = send(&app, get_req("/shape/large-json")).await;
        assert_eq!((status, x_cache.as_str()), (StatusCode::OK, expected));
        assert!(body == large, "the body served on a {expected} differs");
    }
    let key = CacheKey::Plain("app:shape:large-json".into());
    let raw = common::stored_entry(&*backend.store, &key).await;
    assert_eq!(raw[0], 0x07, "the compressed entry format");
    assert!(
        raw.len() * 3 < large.len(),
        "{} stored bytes for a {} byte body",
        raw.len(),
        large.len()
    );

    // A small body is stored uncompressed (format 0x06), and read so.
    let key = CacheKey::Plain("app:shape:ok".into());
    assert_eq!(send(&app, get_req("/shape/ok")).await.1, "MISS");
    let uncompressed = common::stored_entry(&*backend.store, &key).await;
    assert_eq!(uncompressed[0], 0x06, "the uncompressed entry format");
    assert_eq!(send(&app, get_req("/shape/ok")).await.1, "HIT");

    // The same entry in the format of an earlier version (first byte 0x01).
    let mut old = uncompressed.to_vec();
    old[0] = 0x01;
    plant(&backend, &key, Bytes::from(old)).await;
    for expected in ["MISS", "HIT"] {
        let (status, x_cache, _) = send(&app, get_req("/shape/ok")).await;
        assert_eq!((status, x_cache.as_str()), (StatusCode::OK, expected));
    }
    assert_eq!(
        db.calls(),
        3,
        "the large-json miss, the small one's and the old entry's"
    );
}

/// Writes `value` at the plain `key`, as a miss would.
async fn plant(backend: &Backend, key: &CacheKey, value: Bytes) {
    let seen = backend.store.lookup(key).await.unwrap();
    let written = backend
        .store
        .store(key, &seen, value, Duration::from_secs(60))
        .await;
    assert_eq!(written, Ok(true));
}
