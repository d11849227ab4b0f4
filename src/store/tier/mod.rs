//! The in-process tier (feature `tier`): entries of the routes that opt in
//! ([`Route::in_process`](crate::Route::in_process)) kept in this process
//! too, so that a hit there costs no round trip.
//!
//! # What keeps it coherent
//!
//! - **Every invalidation is published by the store that applies it**, in
//!   the same step: Redis's invalidation script `PUBLISH`es the keys it
//!   deleted and bumped, atomically with the deletes and bumps. Each
//!   process subscribes and drops the entries those keys guard.
//! - **The writing process drops its own copies** before it sends the
//!   invalidation and again once the store applied it, before the write's
//!   response: read-your-writes in the writing process.
//! - **A fill that raced an invalidation is never kept.** Each lookup reads
//!   a generation counter before it asks the store; an entry is kept (and
//!   served) only if no invalidation of its key or group arrived since.
//! - **The tier is only used while the subscription is up.** When the
//!   subscription connection drops, fails a ping, or subscribes again, the
//!   whole tier is dropped and fills under way are refused: invalidations
//!   published meanwhile were missed.
//! - **Entries live at most the route's hard bound** (`Route::in_process`),
//!   and never past their freshness; stale entries are served from the
//!   store, which refreshes them.
//!
//! So other processes see a write within the publish delay (measured in
//! `benches/README.md`: under a millisecond on loopback), and never later than the hard bound, even when a message is
//! lost on a connection that looks healthy.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::entry::Entry;
use crate::store::watch::{WatchTask, Watched, Watcher};
use crate::store::{CacheKey, Invalidation, Lookup, Store, StoreFuture, StoreHealth};
use http::{HeaderMap, HeaderValue};

/// Default bound on the number of entries the tier holds.
pub const DEFAULT_TIER_ENTRIES: usize = 10_000;

/// Default bound on the bytes the tier holds: 64 MiB.
pub const DEFAULT_TIER_BYTES: usize = 64 << 20;

/// How many generation slots keys hash into: a collision only drops an
/// entry early.
const SLOTS: usize = 4096;

/// Entries each thread keeps its own copy of, per tier: a hit on a shared
/// entry touches its reference counts and the shard's lock, which threads
/// serving the same hot entry at once contend on.
const NEAR_ENTRIES: usize = 64;

/// Tiers (policies) a thread keeps copies for before it starts over.
const NEAR_TIERS: usize = 8;

/// Entries larger than this are only shared, never copied per thread.
const NEAR_MAX_BYTES: usize = 16 << 10;

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static NEAR: std::cell::RefCell<Near> = std::cell::RefCell::default();
}

/// One thread's copies of the tier's hottest entries: at most
/// [`NEAR_ENTRIES`] per tier, each at most [`NEAR_MAX_BYTES`]; started over
/// when full. A copy is served under exactly the checks of the entry it
/// copies (the same generation and bound), so it is as coherent.
#[derive(Default)]
struct Near {
    tiers: Vec<(u64, std::collections::HashMap<CacheKey, Local>)>,
}

impl Near {
    fn get(&self, tier: u64, key: &CacheKey) -> Option<&Local> {
        let (_, entries) = self.tiers.iter().find(|(id, _)| *id == tier)?;
        entries.get(key)
    }

    fn put(&mut self, tier: u64, key: &CacheKey, local: Local) {
        let at = match self.tiers.iter().position(|(id, _)| *id == tier) {
            Some(at) => at,
            None => {
                // Tiers of dropped policies leave their copies behind.
                if self.tiers.len() >= NEAR_TIERS {
                    self.tiers.clear();
                }
                self.tiers.push((tier, std::collections::HashMap::new()));
                self.tiers.len() - 1
            }
        };
        let entries = &mut self.tiers[at].1;
        if entries.len() >= NEAR_ENTRIES {
            entries.clear();
        }
        entries.insert(key.clone(), local);
    }
}

/// The bounds of the in-process tier, for
/// [`PolicyBuilder::in_process`](crate::PolicyBuilder::in_process).
///
/// ```
/// use tower_redis_cache::InProcess;
///
/// let tier = InProcess::new().max_entries(50_000).max_bytes(256 << 20);
/// # let _ = tier;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct InProcess {
    max_entries: usize,
    max_bytes: usize,
}

impl Default for InProcess {
    fn default() -> Self {
        Self::new()
    }
}

impl InProcess {
    /// At most [`DEFAULT_TIER_ENTRIES`] entries and [`DEFAULT_TIER_BYTES`].
    pub fn new() -> Self {
        Self {
            max_entries: DEFAULT_TIER_ENTRIES,
            max_bytes: DEFAULT_TIER_BYTES,
        }
    }

    /// The most entries kept (least recently useful ones go first).
    pub fn max_entries(mut self, max: usize) -> Self {
        self.max_entries = max;
        self
    }

    /// The most bytes kept (entry and key sizes).
    pub fn max_bytes(mut self, max: usize) -> Self {
        self.max_bytes = max;
        self
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.max_entries == 0 || self.max_bytes == 0
    }
}

/// One entry kept in the tier, decoded: a hit clones it (no parsing).
#[derive(Clone)]
struct Local {
    entry: Entry,
    /// The entry's size as stored, for the byte bound.
    size: usize,
    /// The generation the lookup that found it read before asking the store.
    generation: u64,
    /// Past this, the entry is not served (hard bound, or staleness).
    until: Instant,
}

/// Weighs an entry by its bytes, but at least `floor` (the byte bound over
/// the entry bound), so that both bounds hold with one weight.
#[derive(Clone)]
struct Weigh {
    floor: u64,
}

impl quick_cache::Weighter<CacheKey, Local> for Weigh {
    fn weight(&self, key: &CacheKey, local: &Local) -> u64 {
        let key_len = match key {
            CacheKey::Plain(key) => key.len(),
            CacheKey::Versioned { prefix, suffix, .. } => prefix.len() + suffix.len(),
        };
        ((local.size + key_len) as u64).max(self.floor)
    }
}

/// The tier of one policy. Cloning shares it.
#[derive(Clone)]
pub(crate) struct Tier {
    state: Arc<State>,
    /// The subscription task, spawned on first use within a runtime.
    task: Arc<Mutex<Option<WatchTask>>>,
}

struct State {
    /// Unique to this tier in the process: keys the threads' own copies.
    id: u64,
    entries: quick_cache::sync::Cache<CacheKey, Local, Weigh>,
    /// The generation of the last invalidation or clear this process saw.
    clock: AtomicU64,
    /// The generation of the last clear: entries filled before it are void.
    cleared: AtomicU64,
    /// Whether invalidations are being received.
    live: AtomicBool,
    /// Per key hash, the generation of the last invalidation of a key with
    /// that hash.
    slots: Box<[AtomicU64]>,
    hasher: quick_cache::DefaultHashBuilder,
}

impl State {
    fn slot(&self, key: &str) -> &AtomicU64 {
        let at = self.hasher.hash_one(key) as usize % SLOTS;
        &self.slots[at]
    }

    /// Whether an entry filled at `generation` for `key` may still be used.
    fn valid(&self, key: &CacheKey, generation: u64) -> bool {
        if !self.live.load(Ordering::Acquire) || generation < self.cleared.load(Ordering::Acquire) {
            return false;
        }
        let newer = |guard: &str| self.slot(guard).load(Ordering::Acquire) > generation;
        match key {
            CacheKey::Plain(key) => !newer(key),
            CacheKey::Versioned { versions, .. } => !versions.iter().any(|v| newer(v.key())),
        }
    }

    fn invalidated<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        let generation = self.clock.fetch_add(1, Ordering::AcqRel) + 1;
        for key in keys {
            self.slot(key).fetch_max(generation, Ordering::AcqRel);
        }
    }

    fn clear(&self, live: bool) {
        if !live {
            self.live.store(false, Ordering::Release);
        }
        let generation = self.clock.fetch_add(1, Ordering::AcqRel) + 1;
        self.cleared.fetch_max(generation, Ordering::AcqRel);
        self.entries.clear();
        if live {
            self.live.store(true, Ordering::Release);
        }
    }
}

impl Tier {
    pub(crate) fn new(bounds: InProcess) -> Self {
        let floor = bounds.max_bytes.div_ceil(bounds.max_entries.max(1)).max(1) as u64;
        let entries = quick_cache::sync::Cache::with_weighter(
            bounds.max_entries,
            bounds.max_bytes as u64,
            Weigh { floor },
        );
        Self {
            state: Arc::new(State {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                entries,
                clock: AtomicU64::new(0),
                cleared: AtomicU64::new(0),
                live: AtomicBool::new(false),
                slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
                hasher: quick_cache::DefaultHashBuilder::default(),
            }),
            task: Arc::default(),
        }
    }

    /// Asks `store` to report its invalidations to this tier. False when it
    /// cannot.
    pub(crate) fn watch(&self, store: &dyn Store) -> bool {
        let watcher = watcher_of(&self.state);
        match store.watch(watcher) {
            Some(task) => {
                *lock(&self.task) = Some(task);
                self.start();
                true
            }
            None => false,
        }
    }

    /// Spawns the subscription task, once, when a runtime is at hand.
    fn start(&self) {
        let mut task = lock(&self.task);
        if task.is_some() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                if let Some(task) = task.take() {
                    runtime.spawn(task);
                }
            }
        }
    }

    /// The generation a lookup reads before it asks the store.
    pub(crate) fn generation(&self) -> u64 {
        self.state.clock.load(Ordering::Acquire)
    }

    /// The entry kept for `key`, if it may be served at `now`.
    pub(crate) fn get(&self, key: &CacheKey, now: Instant) -> Option<Entry> {
        if !self.state.live.load(Ordering::Acquire) {
            self.start();
            return None;
        }
        let usable = |local: &Local| now < local.until && self.state.valid(key, local.generation);
        let id = self.state.id;
        let near = NEAR.with(|near| {
            let near = near.borrow();
            near.get(id, key)
                .filter(|l| usable(l))
                .map(|l| l.entry.to_serve())
        });
        if near.is_some() {
            return near;
        }
        let local = self.state.entries.get(key)?;
        if !usable(&local) {
            return None;
        }
        if local.size <= NEAR_MAX_BYTES {
            let own = Local {
                entry: local.entry.deep_copy(),
                ..local
            };
            let entry = own.entry.to_serve();
            NEAR.with(|near| near.borrow_mut().put(id, key, own));
            return Some(entry);
        }
        Some(local.entry.to_serve())
    }

    /// Keeps `entry` (`size` bytes as stored) for `key` until `until`,
    /// unless an invalidation of its key or group arrived since
    /// `generation` was read (then the store may have answered with what it
    /// invalidated).
    pub(crate) fn fill(
        &self,
        key: &CacheKey,
        entry: Entry,
        size: usize,
        generation: u64,
        until: Instant,
    ) {
        if !self.state.valid(key, generation) {
            return;
        }
        // In buffers of its own: an entry read from Redis may be a slice
        // of a whole read buffer, which it would keep alive here.
        let local = Local {
            entry: entry.deep_copy(),
            size,
            generation,
            until,
        };
        self.state.entries.insert(key.clone(), local);
    }

    /// Drops what `invalidation` invalidates.
    pub(crate) fn evict(&self, invalidation: &Invalidation) {
        let keys = invalidation.deletes().iter().map(String::as_str);
        let bumps = invalidation.bumps().iter().map(|b| b.key());
        self.state.invalidated(keys.chain(bumps));
    }

    /// How many entries the tier holds (some may be void).
    pub(crate) fn len(&self) -> usize {
        self.state.entries.len()
    }

    /// Whether invalidations are being received, so the tier is used.
    pub(crate) fn is_live(&self) -> bool {
        self.state.live.load(Ordering::Acquire)
    }
}

/// The watcher a store reports to for the tier of `state`.
fn watcher_of(state: &Arc<State>) -> Watcher {
    let tier: Arc<dyn Watched> = state.clone();
    Watcher::new(Arc::downgrade(&tier))
}

impl Watched for State {
    fn clear(&self, live: bool) {
        State::clear(self, live);
    }

    fn invalidated(&self, keys: &mut dyn Iterator<Item = &str>) {
        State::invalidated(self, keys);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The policy's store with the tier's own evictions around every
/// invalidation: before it is sent (fills under way are refused) and once
/// the store answered (fills that read the store before it applied are
/// refused, and the write's response waits for this).
pub(crate) struct Tiered {
    pub(crate) inner: Arc<dyn Store>,
    pub(crate) tier: Tier,
}

/// Evicts again when the invalidation is done, or dropped.
struct EvictAfter {
    tier: Tier,
    invalidation: Invalidation,
}

impl Drop for EvictAfter {
    fn drop(&mut self) {
        self.tier.evict(&self.invalidation);
    }
}

impl Store for Tiered {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn lookup(&self, key: &CacheKey) -> StoreFuture<Lookup> {
        self.inner.lookup(key)
    }

    fn store(
        &self,
        key: &CacheKey,
        seen: &Lookup,
        value: Bytes,
        ttl: Duration,
    ) -> StoreFuture<bool> {
        self.inner.store(key, seen, value, ttl)
    }

    fn invalidate(&self, invalidation: &Invalidation) -> StoreFuture<()> {
        self.tier.evict(invalidation);
        let apply = self.inner.invalidate(invalidation);
        let after = EvictAfter {
            tier: self.tier.clone(),
            invalidation: invalidation.clone(),
        };
        Box::pin(async move {
            let applied = apply.await;
            drop(after);
            applied
        })
    }

    fn ping(&self) -> StoreFuture<()> {
        self.inner.ping()
    }

    fn tombstone_ttl(&self) -> Duration {
        self.inner.tombstone_ttl()
    }

    fn health(&self) -> StoreHealth {
        self.inner.health()
    }

    fn longest_entry_life(&self, life: Duration) {
        self.inner.longest_entry_life(life);
    }

    fn clock_offset_ms(&self) -> i64 {
        self.inner.clock_offset_ms()
    }

    fn parts(&self, invalidation: &Invalidation) -> Option<Vec<Invalidation>> {
        self.inner.parts(invalidation)
    }

    fn watch(&self, watcher: Watcher) -> Option<WatchTask> {
        self.inner.watch(watcher)
    }

    /// What the shared store holds: a write probe checks what every
    /// process reads from.
    fn peek(&self, keys: &[String]) -> Option<StoreFuture<Vec<crate::store::Peeked>>> {
        self.inner.peek(keys)
    }
}

/// The copies of an entry only the tier makes.
impl Entry {
    /// A copy to answer with: its header map has room for the headers a
    /// hit adds (a clone's would grow, reallocating, on the first insert).
    pub(crate) fn to_serve(&self) -> Self {
        let mut headers =
            HeaderMap::with_capacity(self.headers.len() + crate::entry::ADDED_HEADERS);
        for (name, value) in &self.headers {
            headers.append(name.clone(), value.clone());
        }
        Self {
            binding: self.binding,
            coding: self.coding,
            status: self.status,
            headers,
            body: self.body.clone(),
            stored_at_ms: self.stored_at_ms,
            ttl_s: self.ttl_s,
        }
    }

    /// The same entry in buffers of its own: clones of it share no
    /// reference count with clones of `self` (a thread's own copy).
    pub(crate) fn deep_copy(&self) -> Self {
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            let mut copy =
                HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            copy.set_sensitive(value.is_sensitive());
            headers.append(name.clone(), copy);
        }
        Self {
            binding: self.binding,
            coding: self.coding,
            status: self.status,
            headers,
            body: Bytes::copy_from_slice(&self.body),
            stored_at_ms: self.stored_at_ms,
            ttl_s: self.ttl_s,
        }
    }

    /// How long the entry stays fresh after `now_ms`.
    pub(crate) fn fresh_for(&self, now_ms: u64) -> Duration {
        Duration::from_millis(self.fresh_until_ms().saturating_sub(now_ms))
    }
}

#[cfg(test)]
mod tests;
