//! Every store the crate ships keeps the store rules
//! (`tower_redis_cache::store::conformance`): the memory store, a real
//! `redis-server` (logged in as the README's least-privilege user, behind
//! its breaker) and a real cluster.

mod common;

use common::Backend;
use tower_redis_cache::store::conformance;

backend_tests!(every_store_keeps_the_store_rules);

async fn every_store_keeps_the_store_rules(backend: Backend) {
    conformance::check(&*backend.store, "conformance").await;
    // A second process's store over the same data sees the same.
    conformance::check(&*backend.another_store(), "conformance-other").await;
}
