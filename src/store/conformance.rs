//! The rules every [`Store`] keeps, as a suite any store can run: the
//! crate's memory and Redis stores run it in their tests, on one node and
//! on a cluster, and so can a store of your own.
//!
//! ```
//! use tower_redis_cache::store::{conformance, MemoryStore};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! // Keys under the prefix are written: give each run a fresh one.
//! conformance::check(&MemoryStore::new(), "conformance-doc").await;
//! # });
//! ```
//!
//! Each rule is what a guarantee of the README rests on:
//!
//! - a missing entry serves nothing, and a write under the lookup that
//!   found it missing lands and is served next;
//! - an invalidation after a lookup refuses a write made under that lookup
//!   (a read that began before a write never stores after it), and its
//!   tombstone is never served;
//! - a bump moves a versioned key to a version never used before, and a
//!   write under the old version is refused;
//! - the store answers a ping.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::{CacheKey, Invalidation, Lookup, Observed, Store};
use crate::entry::{decode, Entry, Slot};
use crate::key::{Layout, BINDING_LEN};

const TTL: Duration = Duration::from_secs(60);

/// Runs every rule against `store`, with keys under `prefix`; panics
/// naming the first rule the store breaks. Use a prefix no other run
/// wrote under (a store keeps its guards for minutes).
pub async fn check(store: &dyn Store, prefix: &str) {
    let layout = Layout::new(prefix.to_owned());
    a_missing_entry_serves_nothing_and_a_write_lands(store, &layout).await;
    an_invalidation_refuses_an_earlier_write(store, &layout).await;
    a_bump_moves_to_a_new_version(store, &layout).await;
    a_peek_writes_nothing_and_reads_what_a_lookup_serves(store, &layout).await;
    assert!(store.ping().await.is_ok(), "the store answers a ping");
}

async fn a_missing_entry_serves_nothing_and_a_write_lands(store: &dyn Store, layout: &Layout) {
    let key = CacheKey::Plain(layout.entry("conformance:plain", ""));
    let seen = look_up(store, &key, "a lookup of a missing entry").await;
    assert!(
        !serves_an_entry(&mut seen.clone()),
        "a missing entry serves nothing"
    );
    let value = entry(b"{\"n\":1}");
    let wrote = store.store(&key, &seen, value.clone(), TTL).await;
    assert_eq!(
        wrote,
        Ok(true),
        "a write under the lookup that found the entry missing lands"
    );
    let mut again = look_up(store, &key, "a lookup after the write").await;
    assert_eq!(
        again.take_payload(),
        Observed::Value(value),
        "the entry written is served by the next lookup"
    );
}

async fn an_invalidation_refuses_an_earlier_write(store: &dyn Store, layout: &Layout) {
    let key = layout.entry("conformance:purged", "");
    let plain = CacheKey::Plain(key.clone());
    let seen = look_up(store, &plain, "a lookup before the invalidation").await;
    let purge = Invalidation::new(vec![key], Vec::new());
    assert!(
        store.invalidate(&purge).await.is_ok(),
        "an invalidation applies"
    );
    let wrote = store
        .store(&plain, &seen, entry(b"{\"old\":true}"), TTL)
        .await;
    assert_eq!(
        wrote,
        Ok(false),
        "a write under a lookup made before an invalidation is refused"
    );
    let mut after = look_up(store, &plain, "a lookup after the invalidation").await;
    assert!(
        !serves_an_entry(&mut after),
        "nothing written before the invalidation is served after it"
    );
}

async fn a_peek_writes_nothing_and_reads_what_a_lookup_serves(store: &dyn Store, layout: &Layout) {
    let key = layout.entry("conformance:peeked", "");
    let peek = |what: &'static str| {
        let read = store.peek(std::slice::from_ref(&key));
        async move {
            match read {
                Some(read) => Some(read.await.unwrap_or_else(|err| panic!("{what}: {err}"))),
                None => None,
            }
        }
    };
    // A store that cannot peek has its writes left unprobed.
    let Some(first) = peek("a peek of a missing key").await else {
        return;
    };
    let values = |peeked: Option<Vec<super::Peeked>>| {
        peeked.map(|all| all.into_iter().map(|p| p.value).collect::<Vec<_>>())
    };
    assert_eq!(
        values(Some(first)),
        Some(vec![Observed::Absent]),
        "a missing key peeks absent"
    );
    assert_eq!(
        values(peek("a second peek").await),
        Some(vec![Observed::Absent]),
        "a peek writes nothing (a lookup's lease would show here)"
    );
    let plain = CacheKey::Plain(key.clone());
    let seen = look_up(store, &plain, "a lookup before the write").await;
    let value = entry(b"{\"peeked\":1}");
    assert_eq!(
        store.store(&plain, &seen, value.clone(), TTL).await,
        Ok(true)
    );
    assert_eq!(
        values(peek("a peek after the write").await),
        Some(vec![Observed::Value(value)]),
        "a peek reads the entry as a lookup serves it"
    );
}

async fn a_bump_moves_to_a_new_version(store: &dyn Store, layout: &Layout) {
    let group = layout.version("conformance:group", "", TTL);
    let key = layout.versioned("list:v", ":all", "", vec![group.clone()]);
    let before = look_up(store, &key, "a lookup of a versioned entry").await;
    let old = version_of(&before);
    let wrote = store.store(&key, &before, entry(b"[1]"), TTL).await;
    assert_eq!(wrote, Ok(true), "a write under the current version lands");
    let bump = Invalidation::new(Vec::new(), vec![group]);
    assert!(store.invalidate(&bump).await.is_ok(), "a bump applies");
    let mut after = look_up(store, &key, "a lookup after the bump").await;
    assert_ne!(version_of(&after), old, "a bump moves to a new version");
    assert!(
        !serves_an_entry(&mut after),
        "an entry of the old version is not served"
    );
    let wrote = store.store(&key, &before, entry(b"[0]"), TTL).await;
    assert_eq!(
        wrote,
        Ok(false),
        "a write under a version bumped since is refused"
    );
}

async fn look_up(store: &dyn Store, key: &CacheKey, what: &str) -> Lookup {
    match store.lookup(key).await {
        Ok(found) => found,
        Err(err) => panic!("{what} failed: {err}"),
    }
}

/// Whether the lookup would serve an entry (not a guard, not nothing).
fn serves_an_entry(found: &mut Lookup) -> bool {
    match found.take_payload() {
        Observed::Value(raw) => matches!(decode(raw), Slot::Entry(_)),
        _ => false,
    }
}

fn version_of(found: &Lookup) -> Vec<u8> {
    match found.version_values() {
        Some(values) if values.len() == 1 => values[0].to_vec(),
        _ => panic!("a lookup of a versioned key reads its version"),
    }
}

/// A stored entry with `body`, as the layers write them.
fn entry(body: &'static [u8]) -> Bytes {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Entry::new(
        [0; BINDING_LEN],
        StatusCode::OK,
        headers,
        Bytes::from_static(body),
        TTL,
        crate::clock::unix_ms(),
    )
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn the_memory_store_conforms() {
        check(&MemoryStore::new(), "conformance-unit").await;
    }

    /// A store that writes whatever happened since the lookup.
    struct Careless(MemoryStore);

    impl Store for Careless {
        fn name(&self) -> &'static str {
            "careless"
        }

        fn lookup(&self, key: &CacheKey) -> super::super::StoreFuture<Lookup> {
            self.0.lookup(key)
        }

        fn store(
            &self,
            key: &CacheKey,
            _: &Lookup,
            value: Bytes,
            ttl: Duration,
        ) -> super::super::StoreFuture<bool> {
            let (inner, key) = (self.0.clone(), key.clone());
            Box::pin(async move {
                let now = inner.lookup(&key).await?;
                inner.store(&key, &now, value, ttl).await
            })
        }

        fn invalidate(&self, invalidation: &Invalidation) -> super::super::StoreFuture<()> {
            self.0.invalidate(invalidation)
        }

        fn ping(&self) -> super::super::StoreFuture<()> {
            self.0.ping()
        }
    }

    #[tokio::test]
    #[should_panic(expected = "a write under a lookup made before an invalidation is refused")]
    async fn a_store_that_ignores_its_guards_fails() {
        check(&Careless(MemoryStore::new()), "conformance-careless").await;
    }
}
