//! The in-process store: the default without Redis, and the fast path of
//! tests; the same guarantees as Redis within one process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

#[cfg(test)]
use super::VersionKey;
use super::{
    fresh_version, CacheKey, Invalidation, Lookup, Observed, Store, StoreFuture,
    DEFAULT_TOMBSTONE_TTL,
};

/// An in-process store on a concurrent cache ([quick_cache], sharded, with
/// an eviction policy that keeps hot keys over a scan), bounded in entries
/// and bytes, expiring by TTL.
///
/// Version keys live in the same cache, inside the same bounds, with a TTL
/// renewed by each write under them; a lost one restarts above any value it
/// had, so its eviction only turns the entries it guarded into misses.
///
/// A hit reads without a lock. The writes that must be atomic over several
/// keys (a conditional store: the version keys and the entry; a lookup that
/// leaves a lease) hold the lock of their keys' slot: one of 64, chosen as
/// Redis Cluster chooses a slot, so a version key and its entries share one.
///
/// ```
/// use tower_redis_cache::store::{MemoryStore, Store};
///
/// let store = MemoryStore::new().max_entries(10_000).max_bytes(64 << 20);
/// assert_eq!(store.name(), "memory");
/// ```
///
/// [quick_cache]: https://docs.rs/quick_cache
#[derive(Clone)]
pub struct MemoryStore {
    items: Arc<Items>,
    /// Serialises the multi-key operations of one slot.
    stripes: Arc<[Mutex<()>; STRIPES]>,
    /// The last version a missing version key was created with.
    last_fresh_version: Arc<AtomicU64>,
    max_entries: usize,
    max_bytes: usize,
    tombstone_ttl: Duration,
    lease_ttl: Duration,
    /// The tiers told of each invalidation.
    watchers: Arc<Mutex<Vec<crate::store::Watcher>>>,
}

const STRIPES: usize = 64;

type Items = quick_cache::sync::Cache<String, Item, Weigh, quick_cache::DefaultHashBuilder>;

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.items.len())
            .field("weight", &self.items.weight())
            .field("max_entries", &self.max_entries)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

#[derive(Clone)]
struct Item {
    value: Bytes,
    expires_at: Instant,
}

/// Weighs an item by the bytes of its key and value, but at least `floor`
/// (the byte bound over the entry bound), so that one weight keeps both
/// bounds.
#[derive(Clone)]
struct Weigh {
    floor: u64,
}

impl quick_cache::Weighter<String, Item> for Weigh {
    fn weight(&self, key: &String, item: &Item) -> u64 {
        ((key.len() + item.value.len()) as u64).max(self.floor)
    }
}

fn items(max_entries: usize, max_bytes: usize) -> Arc<Items> {
    // Rounded up: `max_bytes / floor` items at most, never more than
    // `max_entries`.
    let floor = max_bytes.div_ceil(max_entries).max(1) as u64;
    Arc::new(quick_cache::sync::Cache::with(
        max_entries,
        max_bytes as u64,
        Weigh { floor },
        quick_cache::DefaultHashBuilder::default(),
        Default::default(),
    ))
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store holding at most 10 000 entries and 64 MiB.
    pub fn new() -> Self {
        let (max_entries, max_bytes) = (10_000, 64 << 20);
        Self {
            items: items(max_entries, max_bytes),
            stripes: Arc::new(std::array::from_fn(|_| Mutex::new(()))),
            last_fresh_version: Arc::default(),
            max_entries,
            max_bytes,
            tombstone_ttl: DEFAULT_TOMBSTONE_TTL,
            lease_ttl: super::DEFAULT_LEASE_TTL,
            watchers: Arc::default(),
        }
    }

    /// Caps the number of entries (tombstones, leases and version keys
    /// count). Set it before the store is used: it starts empty again.
    pub fn max_entries(mut self, max: usize) -> Self {
        self.max_entries = max.max(1);
        self.items = items(self.max_entries, self.max_bytes);
        self
    }

    /// Caps the bytes of keys and values held. Set it before the store is
    /// used: it starts empty again.
    pub fn max_bytes(mut self, max: usize) -> Self {
        self.max_bytes = max.max(1);
        self.items = items(self.max_entries, self.max_bytes);
        self
    }

    /// How long a delete's tombstone lives (default 5 minutes).
    pub fn tombstone_ttl(mut self, ttl: Duration) -> Self {
        self.tombstone_ttl = ttl;
        self
    }

    /// How long a miss's lease lives (default 60 s): a miss whose handler
    /// takes longer is not stored.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Number of live keys (entries, tombstones, leases, version keys).
    pub fn len(&self) -> usize {
        let now = Instant::now();
        let expired: Vec<String> = self
            .items
            .iter()
            .filter(|(_, item)| item.expires_at <= now)
            .map(|(key, _)| key)
            .collect();
        for key in &expired {
            self.items.remove(key);
        }
        self.items.len()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes `key` (an entry, a tombstone, a version key), as an eviction
    /// or a restart of a store without persistence would; for tests of what
    /// a lost guard can do.
    pub fn evict(&self, key: &str) {
        self.items.remove(key);
    }

    /// The lock of `key`'s slot.
    fn lock(&self, key: &str) -> MutexGuard<'_, ()> {
        let stripe = usize::from(crate::store::slot(key.as_bytes())) % STRIPES;
        // The lock guards no data: a panic while holding it leaves nothing
        // half-updated.
        self.stripes[stripe]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The live value at `key`.
    fn get(&self, key: &str) -> Observed {
        match self.items.get(key) {
            Some(item) if item.expires_at > Instant::now() => Observed::Value(item.value),
            _ => Observed::Absent,
        }
    }

    /// Writes `key`. Over a key already there (a lease, a tombstone, a
    /// version renewed) the write leaves the key's standing in the eviction
    /// policy as it was: only reads make a key hot, so a miss's lease then
    /// its entry do not count as two uses.
    fn insert(&self, key: String, value: Bytes, ttl: Duration) {
        let item = Item {
            value,
            expires_at: Instant::now() + ttl,
        };
        if let Err((key, item)) = self.items.replace(key, item, true) {
            self.items.insert(key, item);
        }
    }

    /// Time left before `key` expires (zero when absent).
    fn remaining(&self, key: &str) -> Duration {
        self.items.peek(key).map_or(Duration::ZERO, |item| {
            item.expires_at.saturating_duration_since(Instant::now())
        })
    }

    /// A version for a missing version key: the time in microseconds,
    /// above every version this store created or bumped.
    fn fresh_version(&self) -> Bytes {
        let fresh = fresh_version();
        let last = self.last_fresh_version.fetch_max(fresh, Ordering::AcqRel);
        let fresh = match last >= fresh {
            true => self.last_fresh_version.fetch_add(1, Ordering::AcqRel) + 1,
            false => fresh,
        };
        Bytes::from(fresh.to_string())
    }

    /// Reads the entry; like Redis, never leaves the write to compare
    /// against "absent": an empty plain key gets this miss's lease, a
    /// missing version key is created. A hit takes no lock.
    fn lookup_now(&self, key: &CacheKey) -> Lookup {
        if let Some(found) = self.lookup_present(key) {
            return found;
        }
        let guard_key = key
            .versions()
            .first()
            .map_or_else(|| key.entry_key(&[]), |v| v.key().to_owned());
        let _slot = self.lock(&guard_key);
        let mut versions = Vec::with_capacity(key.versions().len());
        for version in key.versions() {
            let value = match self.get(version.key()) {
                Observed::Value(value) => value,
                _ => {
                    let fresh = self.fresh_version();
                    self.insert(version.key().to_owned(), fresh.clone(), version.ttl());
                    fresh
                }
            };
            versions.push(Observed::Value(value));
        }
        let entry = match key {
            CacheKey::Plain(key) => match self.get(key) {
                Observed::Absent => {
                    let lease = crate::store::tokens::lease();
                    self.insert(key.clone(), lease.clone(), self.lease_ttl);
                    Observed::Value(lease)
                }
                found => found,
            },
            versioned => self.get(&versioned.entry_key(&version_values(&versions))),
        };
        Lookup::new(versions, entry)
    }

    /// The lookup, when every key it reads is there (nothing to create).
    fn lookup_present(&self, key: &CacheKey) -> Option<Lookup> {
        let mut versions = Vec::with_capacity(key.versions().len());
        for version in key.versions() {
            match self.get(version.key()) {
                Observed::Value(value) => versions.push(Observed::Value(value)),
                _ => return None,
            }
        }
        let entry = match key {
            CacheKey::Plain(key) => match self.get(key) {
                Observed::Absent => return None,
                found => found,
            },
            versioned => self.get(&versioned.entry_key(&version_values(&versions))),
        };
        Some(Lookup::new(versions, entry))
    }

    fn store_now(&self, key: &CacheKey, seen: &Lookup, value: Bytes, ttl: Duration) -> bool {
        let version_keys = key.versions();
        let Some(values) = seen.version_values() else {
            return false;
        };
        if values.len() != version_keys.len() {
            return false;
        }
        let entry_key = key.entry_key(&values);
        let _slot = self.lock(version_keys.first().map_or(&entry_key, |v| v.key()));
        for (version_key, value) in version_keys.iter().zip(&values) {
            if !matches!(self.get(version_key.key()), Observed::Value(v) if v == value) {
                return false;
            }
        }
        if version_keys.is_empty() {
            let current = self.get(&entry_key);
            if current == Observed::Absent || current != *seen.entry() {
                return false;
            }
        }
        // Version keys outlive the entries they guard: renewed on each write.
        for (version_key, value) in version_keys.iter().zip(values) {
            let keep = self.remaining(version_key.key()).max(version_key.ttl());
            self.insert(
                version_key.key().to_owned(),
                Bytes::copy_from_slice(value),
                keep,
            );
        }
        self.insert(entry_key, value, ttl);
        true
    }

    fn invalidate_now(&self, invalidation: &Invalidation) {
        for key in invalidation.deletes() {
            let _slot = self.lock(key);
            let tombstone = invalidation.tombstone().clone();
            self.insert(key.clone(), tombstone, self.tombstone_ttl);
        }
        for bump in invalidation.bumps() {
            let _slot = self.lock(bump.key());
            let current = match self.get(bump.key()) {
                Observed::Value(v) => std::str::from_utf8(&v)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok()),
                _ => None,
            };
            let (next, ttl) = match current {
                Some(n) => {
                    // A recreated version must start above every value used.
                    self.last_fresh_version.fetch_max(n + 1, Ordering::AcqRel);
                    (Bytes::from((n + 1).to_string()), self.remaining(bump.key()))
                }
                None => (self.fresh_version(), bump.ttl()),
            };
            self.insert(bump.key().to_owned(), next, ttl);
        }
    }
}

/// The values of version keys a lookup read, in order.
fn version_values(versions: &[Observed]) -> Vec<&[u8]> {
    versions
        .iter()
        .map(|v| match v {
            Observed::Value(v) => v.as_ref(),
            _ => &[][..],
        })
        .collect()
}

impl Store for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn lookup(&self, key: &CacheKey) -> StoreFuture<Lookup> {
        // Read at the call.
        let found = self.lookup_now(key).with_versions_current_at_call();
        Box::pin(async move { Ok(found) })
    }

    fn store(
        &self,
        key: &CacheKey,
        seen: &Lookup,
        value: Bytes,
        ttl: Duration,
    ) -> StoreFuture<bool> {
        let written = self.store_now(key, seen, value, ttl);
        Box::pin(async move { Ok(written) })
    }

    fn invalidate(&self, invalidation: &Invalidation) -> StoreFuture<()> {
        self.invalidate_now(invalidation);
        {
            let keys = || {
                let deletes = invalidation.deletes().iter().map(String::as_str);
                deletes.chain(invalidation.bumps().iter().map(|b| b.key()))
            };
            let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
            watchers.retain(|watcher| watcher.invalidated(keys()));
        }
        Box::pin(async { Ok(()) })
    }

    /// Every tier over this store hears each invalidation as it is applied.
    fn watch(&self, watcher: crate::store::Watcher) -> Option<crate::store::WatchTask> {
        watcher.live();
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        watchers.retain(crate::store::Watcher::wanted);
        watchers.push(watcher);
        Some(Box::pin(async {}))
    }

    fn ping(&self) -> StoreFuture<()> {
        Box::pin(async { Ok(()) })
    }

    fn peek(&self, keys: &[String]) -> Option<StoreFuture<Vec<crate::store::Peeked>>> {
        let seen = keys
            .iter()
            .map(|key| crate::store::Peeked::new(self.get(key), Bytes::new()))
            .collect();
        Some(Box::pin(async move { Ok(seen) }))
    }

    fn tombstone_ttl(&self) -> Duration {
        self.tombstone_ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(key: &str) -> CacheKey {
        CacheKey::Plain(key.to_owned())
    }

    #[test]
    fn the_entry_cap_holds() {
        let store = MemoryStore::new().max_entries(100);
        let ttl = Duration::from_secs(60);
        for i in 0..1000 {
            let key = plain(&format!("k{i}"));
            let seen = store.lookup_now(&key);
            store.store_now(&key, &seen, Bytes::from_static(b"v"), ttl);
        }
        assert!(store.len() <= 100, "{}", store.len());
        assert!(store.len() >= 50, "{}", store.len());
    }

    #[test]
    fn byte_cap_holds() {
        let store = MemoryStore::new().max_bytes(1000);
        let ttl = Duration::from_secs(60);
        for i in 0..100 {
            let key = plain(&format!("k{i}"));
            let seen = store.lookup_now(&key);
            store.store_now(&key, &seen, Bytes::from(vec![0; 30]), ttl);
        }
        assert!(store.items.weight() <= 1000, "{}", store.items.weight());
    }

    #[test]
    fn a_store_after_a_delete_is_refused() {
        let store = MemoryStore::new();
        let key = plain("app:person:1");
        let seen = store.lookup_now(&key);
        store.invalidate_now(&Invalidation::new(vec!["app:person:1".into()], vec![]));
        assert!(!store.store_now(
            &key,
            &seen,
            Bytes::from_static(b"old"),
            Duration::from_secs(60)
        ));
    }

    fn version(store: &MemoryStore, key: &str) -> u64 {
        let Observed::Value(v) = store.get(key) else {
            panic!("no version at {key}");
        };
        std::str::from_utf8(&v).unwrap().parse().unwrap()
    }

    #[test]
    fn a_lost_version_restarts_above_every_used_one() {
        let store = MemoryStore::new();
        let bump = Invalidation::new(
            vec![],
            vec![VersionKey::new("v".into(), Duration::from_secs(60))],
        );
        store.invalidate_now(&bump);
        store.invalidate_now(&bump);
        let before = version(&store, "v");
        store.evict("v");
        store.invalidate_now(&bump);
        assert!(version(&store, "v") > before);
    }

    #[test]
    fn version_keys_count_in_the_caps_and_expire() {
        let store = MemoryStore::new().max_entries(100);
        for i in 0..1000 {
            let key = CacheKey::Versioned {
                versions: vec![VersionKey::new(
                    format!("item:{i}:ver"),
                    Duration::from_millis(50),
                )],
                prefix: format!("item:{i}:v"),
                suffix: String::new(),
            };
            let seen = store.lookup_now(&key);
            assert!(store.store_now(
                &key,
                &seen,
                Bytes::from_static(b"x"),
                Duration::from_millis(20)
            ));
        }
        assert!(store.len() <= 100, "{}", store.len());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(store.len(), 0, "version keys expire after their entries");
    }
}
