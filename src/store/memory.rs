use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

#[cfg(test)]
use super::VersionKey;
use super::{
    fresh_version, CacheKey, Invalidation, Lookup, Observed, Store, StoreFuture,
    DEFAULT_TOMBSTONE_TTL,
};

/// An in-process store, bounded in entries and bytes, expiring by TTL.
///
/// Version keys live in the same map, inside the same caps, with a TTL
/// renewed by each write under them; a lost one restarts above any value it
/// had, so its eviction only turns the entries it guarded into misses.
///
/// ```
/// use tower_redis_cache::store::{MemoryStore, Store};
///
/// let store = MemoryStore::new().max_entries(10_000).max_bytes(64 << 20);
/// assert_eq!(store.name(), "memory");
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    max_entries: usize,
    max_bytes: usize,
    tombstone_ttl: Duration,
    lease_ttl: Duration,
    /// The tiers told of each invalidation (feature `tier`).
    #[cfg(feature = "tier")]
    watchers: Arc<Mutex<Vec<crate::tier::Watcher>>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryStore")
            .field("entries", &state.entries.len())
            .field("bytes", &state.bytes)
            .field("max_entries", &self.max_entries)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Item>,
    /// Insertion order, oldest first, for eviction.
    order: BTreeMap<u64, String>,
    next_seq: u64,
    bytes: usize,
    last_fresh_version: u64,
}

struct Item {
    value: Bytes,
    expires_at: Instant,
    seq: u64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store holding at most 10 000 entries and 64 MiB.
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            max_entries: 10_000,
            max_bytes: 64 << 20,
            tombstone_ttl: DEFAULT_TOMBSTONE_TTL,
            lease_ttl: super::DEFAULT_LEASE_TTL,
            #[cfg(feature = "tier")]
            watchers: Arc::default(),
        }
    }

    /// Caps the number of entries; the oldest are evicted first.
    pub fn max_entries(mut self, max: usize) -> Self {
        self.max_entries = max.max(1);
        self
    }

    /// Caps the bytes of keys and values held; the oldest are evicted first.
    pub fn max_bytes(mut self, max: usize) -> Self {
        self.max_bytes = max.max(1);
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
        let mut state = self.lock();
        let now = Instant::now();
        let expired: Vec<String> = state
            .entries
            .iter()
            .filter(|(_, item)| item.expires_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            state.remove(&key);
        }
        state.entries.len()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes `key` (an entry, a tombstone, a version key), as an eviction
    /// or a restart of a store without persistence would; for tests of what
    /// a lost guard can do.
    pub fn evict(&self, key: &str) {
        self.lock().remove(key);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way that matters to a cache; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the entry; like Redis, never leaves the write to compare
    /// against "absent": an empty plain key gets this miss's lease, a
    /// missing version key is created.
    fn lookup_now(&self, key: &CacheKey) -> Lookup {
        let mut state = self.lock();
        let caps = (self.max_entries, self.max_bytes);
        let mut versions = Vec::with_capacity(key.versions().len());
        for version in key.versions() {
            let value = match state.get(version.key()) {
                Observed::Value(value) => value,
                _ => {
                    let fresh = state.fresh_version();
                    state.insert(version.key().to_owned(), fresh.clone(), version.ttl(), caps);
                    fresh
                }
            };
            versions.push(Observed::Value(value));
        }
        let entry = match key {
            CacheKey::Plain(key) => match state.get(key) {
                Observed::Absent => {
                    let lease = crate::entry::lease();
                    state.insert(key.clone(), lease.clone(), self.lease_ttl, caps);
                    Observed::Value(lease)
                }
                found => found,
            },
            versioned => {
                let values: Vec<&[u8]> = versions
                    .iter()
                    .map(|v| match v {
                        Observed::Value(v) => v.as_ref(),
                        _ => &[][..],
                    })
                    .collect();
                state.get(&versioned.entry_key(&values))
            }
        };
        Lookup::new(versions, entry)
    }

    fn store_now(&self, key: &CacheKey, seen: &Lookup, value: Bytes, ttl: Duration) -> bool {
        let mut state = self.lock();
        let caps = (self.max_entries, self.max_bytes);
        let version_keys = key.versions();
        let Some(values) = seen.version_values() else {
            return false;
        };
        if values.len() != version_keys.len() {
            return false;
        }
        for (version_key, value) in version_keys.iter().zip(&values) {
            if !matches!(state.get(version_key.key()), Observed::Value(v) if v == value) {
                return false;
            }
        }
        let entry_key = key.entry_key(&values);
        if version_keys.is_empty() {
            let current = state.get(&entry_key);
            if current == Observed::Absent || current != *seen.entry() {
                return false;
            }
        }
        // Version keys outlive the entries they guard: renewed on each write.
        for (version_key, value) in version_keys.iter().zip(values) {
            let keep = state.remaining(version_key.key()).max(version_key.ttl());
            let value = Bytes::copy_from_slice(value);
            state.insert(version_key.key().to_owned(), value, keep, caps);
        }
        state.insert(entry_key, value, ttl, caps);
        true
    }

    fn invalidate_now(&self, invalidation: &Invalidation) {
        let mut state = self.lock();
        let caps = (self.max_entries, self.max_bytes);
        for key in invalidation.deletes() {
            let tombstone = invalidation.tombstone().clone();
            state.insert(key.clone(), tombstone, self.tombstone_ttl, caps);
        }
        for bump in invalidation.bumps() {
            let current = match state.get(bump.key()) {
                Observed::Value(v) => std::str::from_utf8(&v)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok()),
                _ => None,
            };
            let (next, ttl) = match current {
                Some(n) => {
                    // A recreated version must start above every value used.
                    state.last_fresh_version = state.last_fresh_version.max(n + 1);
                    (
                        Bytes::from((n + 1).to_string()),
                        state.remaining(bump.key()),
                    )
                }
                None => (state.fresh_version(), bump.ttl()),
            };
            state.insert(bump.key().to_owned(), next, ttl, caps);
        }
    }
}

impl State {
    fn get(&mut self, key: &str) -> Observed {
        match self.entries.get(key) {
            Some(item) if item.expires_at > Instant::now() => Observed::Value(item.value.clone()),
            Some(_) => {
                self.remove(key);
                Observed::Absent
            }
            None => Observed::Absent,
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(item) = self.entries.remove(key) {
            self.order.remove(&item.seq);
            self.bytes -= key.len() + item.value.len();
        }
    }

    /// Time left before `key` expires (zero when absent).
    fn remaining(&self, key: &str) -> Duration {
        self.entries.get(key).map_or(Duration::ZERO, |item| {
            item.expires_at.saturating_duration_since(Instant::now())
        })
    }

    fn insert(&mut self, key: String, value: Bytes, ttl: Duration, caps: (usize, usize)) {
        let (max_entries, max_bytes) = caps;
        self.remove(&key);
        let size = key.len() + value.len();
        if size > max_bytes {
            return;
        }
        while self.entries.len() + 1 > max_entries || self.bytes + size > max_bytes {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.remove(&oldest);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += size;
        self.order.insert(seq, key.clone());
        self.entries.insert(
            key,
            Item {
                value,
                expires_at: Instant::now() + ttl,
                seq,
            },
        );
    }

    fn fresh_version(&mut self) -> Bytes {
        let fresh = fresh_version().max(self.last_fresh_version + 1);
        self.last_fresh_version = fresh;
        Bytes::from(fresh.to_string())
    }
}

impl Store for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn lookup(&self, key: &CacheKey) -> StoreFuture<Lookup> {
        let found = self.lookup_now(key);
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
        #[cfg(feature = "tier")]
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
    #[cfg(feature = "tier")]
    fn watch(&self, watcher: crate::tier::Watcher) -> Option<crate::tier::WatchTask> {
        watcher.live();
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        watchers.retain(crate::tier::Watcher::wanted);
        watchers.push(watcher);
        Some(Box::pin(async {}))
    }

    fn ping(&self) -> StoreFuture<()> {
        Box::pin(async { Ok(()) })
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
    fn evicts_oldest_past_the_entry_cap() {
        let store = MemoryStore::new().max_entries(2);
        let ttl = Duration::from_secs(60);
        for key in ["a", "b", "c"] {
            let seen = store.lookup_now(&plain(key));
            assert!(store.store_now(&plain(key), &seen, Bytes::from_static(b"v"), ttl));
        }
        assert_eq!(store.len(), 2);
        let evicted = store.lookup_now(&plain("a")).entry;
        assert!(matches!(evicted, Observed::Value(v) if v.as_ref() != b"v"));
    }

    #[test]
    fn byte_cap_holds() {
        let store = MemoryStore::new().max_bytes(100);
        let ttl = Duration::from_secs(60);
        for i in 0..10 {
            let key = plain(&format!("k{i}"));
            let seen = store.lookup_now(&key);
            store.store_now(&key, &seen, Bytes::from(vec![0; 30]), ttl);
        }
        assert!(store.lock().bytes <= 100);
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
        let Observed::Value(v) = store.lock().get(key) else {
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
