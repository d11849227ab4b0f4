//! A write whose request future is dropped after its handler committed (the
//! client went away, a timeout layer fired) still invalidates: in this
//! process at once, and in another process sharing the Redis.

mod common;

use std::time::Duration;

use common::{app, get_req, method_req, send, Backend, Db};

backend_tests!(a_write_dropped_after_its_commit_still_invalidates);

async fn a_write_dropped_after_its_commit_still_invalidates(backend: Backend) {
    let db = Db::default();
    db.set("1", 1);
    let (writer, policy) = app(backend.store.clone(), db.clone());
    // Another process over the same store (for Redis: its own connection,
    // breaker and queue).
    let other_store = backend.another_store();
    let (other, _) = app(other_store, db.clone());
    for app in [&writer, &other] {
        send(app, get_req("/persons/1")).await;
        send(app, get_req("/persons?limit=1")).await;
        assert_eq!(send(app, get_req("/persons/1")).await.1, "HIT");
    }

    let write =
        tower::ServiceExt::oneshot(writer.clone(), method_req("PATCH", "/persons/1?slow=1"));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), write)
            .await
            .is_err(),
        "the client gave up while the handler was still running"
    );
    assert_eq!(db.revisions.lock().unwrap()["1"], 2, "the write committed");

    // The write never answered, so reads may see it a moment late; both
    // processes see it as soon as the background invalidation lands.
    for app in [&writer, &other] {
        let mut fresh = false;
        for _ in 0..100 {
            let (_, _, body) = send(app, get_req("/persons/1")).await;
            let (_, _, list) = send(app, get_req("/persons?limit=1")).await;
            if body == r#"{"id":"1","rev":2}"# && list.contains(r#"["1",2]"#) {
                fresh = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(fresh, "a process still serves the pre-write entry");
    }
    // The background invalidation is counted once it lands.
    for _ in 0..100 {
        if policy.stats().invalidations().applied == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(policy.stats().invalidations().applied, 1);
}
