//! Where entries live: a small async trait and its two backends.
//!
//! [`MemoryStore`] keeps entries in this process (the default when no Redis
//! is configured, and the fast path for tests); `RedisStore` (feature
//! `redis`, on by default) keeps them in Redis with one shared,
//! auto-reconnecting connection.
//!
//! Both implement the same semantics, which the layers rely on:
//!
//! - **Conditional writes that eviction cannot defeat.** A lookup never
//!   leaves its write to compare against "absent": at an empty plain key it
//!   writes a lease unique to this miss, and a missing version key is
//!   created by the lookup itself. [`Store::store`] writes only if every
//!   key still holds exactly what the lookup saw (the lease, a tombstone,
//!   the version). A purge overwrites the lease, a bump changes the
//!   version, and an evicted or expired guard reads absent: each fails the
//!   write. A read that started before an invalidation therefore cannot
//!   store its result after it.
//! - **Versions that cannot lie.** A missing version key is created with the
//!   current time in microseconds and bumped with `INCR`, so a lost key never
//!   restarts at a number already used. A version key lives at least as
//!   long as the longest entry under it (its TTL is renewed by every write).
//! - **Deletes leave a tombstone** for [`Store::tombstone_ttl`], so that a
//!   read which saw the key absent cannot store over the delete.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

pub mod conformance;
mod error;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod resilient;
#[cfg(feature = "tier")]
pub(crate) mod tier;
pub(crate) mod tokens;
mod watch;

pub use crate::key::{CacheKey, VersionKey};
pub use error::StoreError;
pub use memory::MemoryStore;
#[cfg(feature = "cluster")]
pub use redis::ClusterSource;
#[cfg(feature = "redis")]
pub use redis::{
    Connect, Reconnecting, RedisSource, RedisStore, RedisStoreBuilder, DEFAULT_CHANNEL,
    DEFAULT_DEADLINE, DEFAULT_WRITE_DEADLINE,
};
pub use resilient::{BreakerConfig, Circuit, ReplayConfig, Resilient, StoreHealth};
pub use watch::{WatchTask, Watcher};

/// The future every store operation returns.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// Default time a delete's tombstone lives; a miss slower than half of it is
/// not stored.
pub const DEFAULT_TOMBSTONE_TTL: Duration = Duration::from_secs(300);

/// Default time a miss's lease lives: a miss whose handler takes longer is
/// not stored.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);

/// What a lookup found at a key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Observed {
    /// Nothing there.
    Absent,
    /// A string value.
    Value(Bytes),
    /// A value of another Redis type (a list, a hash…).
    WrongType,
}

/// What [`Store::peek`] read at one key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Peeked {
    /// The value as a lookup would serve it.
    pub value: Observed,
    /// The server lifetime that answered (a server's epoch, a cluster
    /// node's id); empty when the store has none. Two reads of a key under
    /// one origin saw one history.
    pub origin: Bytes,
}

impl Peeked {
    /// What a store read at a key, under `origin`. For store
    /// implementations.
    pub fn new(value: Observed, origin: Bytes) -> Self {
        Self { value, origin }
    }
}

/// The result of [`Store::lookup`]; it is handed back to [`Store::store`] so
/// the write happens only if nothing changed in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    versions: Vec<Observed>,
    entry: Observed,
    /// What may be served: the entry, unless the store knows it was written
    /// before the server lost data (then absent).
    payload: Observed,
    /// The server epoch the lookup read under (empty when unknown): a write
    /// under another epoch is refused.
    origin: Bytes,
    /// Whose lease the lookup met where the entry would be.
    lease: LeaseHolder,
    /// The versions read were already current when [`Store::lookup`] was
    /// called: no bump came between the call and the read.
    versions_current_at_call: bool,
}

/// Whose lease a lookup met where the entry would be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseHolder {
    /// None, or the lookup took it.
    Nobody,
    /// Another request of this store (this process): filling the entry, or
    /// gone with its lease left behind.
    Us,
    /// A miss made through another store (another process), filling it.
    Another,
}

impl Lookup {
    /// What a store saw: each version key of the [`CacheKey`] in order (none
    /// for a plain key), then the entry. For store implementations.
    pub fn new(versions: Vec<Observed>, entry: Observed) -> Self {
        Self {
            versions,
            payload: entry.clone(),
            entry,
            origin: Bytes::new(),
            lease: LeaseHolder::Nobody,
            versions_current_at_call: false,
        }
    }

    /// The same lookup, whose entry is the lease `holder` took.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn with_lease(mut self, holder: LeaseHolder) -> Self {
        self.lease = holder;
        self
    }

    /// True when another process's miss is filling the entry.
    pub(crate) fn foreign_lease(&self) -> bool {
        self.lease == LeaseHolder::Another
    }

    /// Whose lease the lookup met where the entry would be.
    pub(crate) fn lease_holder(&self) -> LeaseHolder {
        self.lease
    }

    /// The same lookup, made under the server epoch `origin`.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn with_origin(mut self, origin: Bytes) -> Self {
        self.origin = origin;
        self
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn origin(&self) -> &Bytes {
        &self.origin
    }

    /// The same lookup, serving `payload` instead of the raw entry (which
    /// conditional writes still compare against).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn with_payload(mut self, payload: Observed) -> Self {
        self.payload = payload;
        self
    }

    /// The same lookup in buffers of its own, for a holder that keeps it
    /// while a handler runs: a store may answer with slices of a larger
    /// read buffer, which it would keep alive meanwhile.
    pub(crate) fn detached(self) -> Self {
        let own = |seen: Observed| match seen {
            Observed::Value(value) => Observed::Value(Bytes::copy_from_slice(&value)),
            other => other,
        };
        Self {
            versions: self.versions.into_iter().map(own).collect(),
            entry: own(self.entry),
            payload: own(self.payload),
            origin: self.origin,
            lease: self.lease,
            versions_current_at_call: self.versions_current_at_call,
        }
    }

    /// What may be served from this lookup, taken out of it (the lookup
    /// keeps what conditional writes compare against).
    pub(crate) fn take_payload(&mut self) -> Observed {
        std::mem::replace(&mut self.payload, Observed::Absent)
    }

    /// What each version key held.
    pub fn versions(&self) -> &[Observed] {
        &self.versions
    }

    /// What the entry key held (absent when a version was missing).
    pub fn entry(&self) -> &Observed {
        &self.entry
    }

    /// The same lookup, whose versions were already current when
    /// [`Store::lookup`] was called (read then, or read again unchanged
    /// from what the store had read before under the same epoch).
    pub(crate) fn with_versions_current_at_call(mut self) -> Self {
        self.versions_current_at_call = true;
        self
    }

    /// True when the write also guards a read made after the lookup was
    /// called but before it ran (a hedged miss's handler):
    /// - a plain key whose lookup found a miss's lease: every invalidation
    ///   since the lease was minted replaced it, and the write is refused;
    /// - a versioned key whose versions were current at the call: the
    ///   write is refused if they were bumped since.
    ///
    /// A lookup that ran after an invalidation and found its tombstone, or
    /// new versions, says nothing of a read made before it ran.
    pub(crate) fn guards_an_earlier_read(&self) -> bool {
        match self.versions.is_empty() {
            true => {
                matches!(&self.entry, Observed::Value(raw) if crate::store::tokens::is_lease(raw))
            }
            false => self.versions_current_at_call,
        }
    }

    /// The version values, when every version key held one.
    pub(crate) fn version_values(&self) -> Option<Vec<&[u8]>> {
        self.versions
            .iter()
            .map(|v| match v {
                Observed::Value(v) => Some(v.as_ref()),
                _ => None,
            })
            .collect()
    }
}

/// One request's invalidation, applied in one round trip. Built by the
/// crate only (from a [`Policy`](crate::Policy) rule or the
/// [`CacheHandle`](crate::CacheHandle)), so every delete carries a
/// tombstone unique to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    deletes: Vec<String>,
    bumps: Vec<VersionKey>,
    tombstone: Bytes,
}

impl Invalidation {
    pub(crate) fn new(deletes: Vec<String>, bumps: Vec<VersionKey>) -> Self {
        Self {
            deletes,
            bumps,
            tombstone: crate::store::tokens::tombstone(),
        }
    }

    /// Entry keys to delete (replaced by the tombstone).
    pub fn deletes(&self) -> &[String] {
        &self.deletes
    }

    /// Version keys to bump.
    pub fn bumps(&self) -> &[VersionKey] {
        &self.bumps
    }

    /// The tombstone written at each deleted key, unique to this invalidation.
    pub fn tombstone(&self) -> &Bytes {
        &self.tombstone
    }

    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.deletes.is_empty() && self.bumps.is_empty()
    }

    /// The same actions with a fresh tombstone, for sending them again: a
    /// late copy of an earlier send must never carry a tombstone a read may
    /// have seen since.
    pub(crate) fn reissued(&self) -> Self {
        Self::new(self.deletes.clone(), self.bumps.clone())
    }

    /// The Redis Cluster slot of the first key: the slot of every key in a
    /// part made by [`split_by_slot`](Self::split_by_slot).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn slot(&self) -> Option<u16> {
        let first = self.deletes.first().map(String::as_str);
        let first = first.or_else(|| self.bumps.first().map(VersionKey::key))?;
        Some(slot(first.as_bytes()))
    }

    /// The same actions, one invalidation per Redis Cluster slot (in the
    /// order their first key appears), each with this tombstone. One part
    /// when every key hashes to one slot.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn split_by_slot(&self) -> Vec<Self> {
        let mut parts: Vec<(u16, Self)> = Vec::new();
        let mut part = |key: &str| -> usize {
            let slot = slot(key.as_bytes());
            parts
                .iter()
                .position(|(s, _)| *s == slot)
                .unwrap_or_else(|| {
                    let empty = Self {
                        deletes: Vec::new(),
                        bumps: Vec::new(),
                        tombstone: self.tombstone.clone(),
                    };
                    parts.push((slot, empty));
                    parts.len() - 1
                })
        };
        let deletes: Vec<usize> = self.deletes.iter().map(|k| part(k)).collect();
        let bumps: Vec<usize> = self.bumps.iter().map(|b| part(b.key())).collect();
        for (key, at) in self.deletes.iter().zip(deletes) {
            parts[at].1.deletes.push(key.clone());
        }
        for (bump, at) in self.bumps.iter().zip(bumps) {
            parts[at].1.bumps.push(bump.clone());
        }
        parts.into_iter().map(|(_, part)| part).collect()
    }
}

/// A place to keep cache entries.
///
/// Implementations must give the guarantees listed in the
/// [module docs](self): conditional writes, versions that never repeat, and
/// tombstones on delete.
///
/// # Writing a store
///
/// A store is an extension point: five methods are required (`name`,
/// `lookup`, `store`, `invalidate`, `ping`); the others have defaults that
/// fit a store in one place, and a store that wraps another forwards them.
/// Run [`conformance::check`] in its tests: it fails, naming the rule, when
/// the store would let the cache serve stale or foreign data.
pub trait Store: Send + Sync + 'static {
    /// A short name for health output: `memory`, `redis`.
    fn name(&self) -> &'static str;

    /// Reads the entry at `key` (and its version, for a versioned key) in one
    /// round trip.
    fn lookup(&self, key: &CacheKey) -> StoreFuture<Lookup>;

    /// Writes `value` with `ttl` if the key still looks as `seen` describes.
    /// Returns whether it wrote.
    fn store(
        &self,
        key: &CacheKey,
        seen: &Lookup,
        value: Bytes,
        ttl: Duration,
    ) -> StoreFuture<bool>;

    /// Applies every delete and bump of `invalidation` in one round trip.
    fn invalidate(&self, invalidation: &Invalidation) -> StoreFuture<()>;

    /// Checks that the store answers.
    fn ping(&self) -> StoreFuture<()>;

    /// How long a delete's tombstone lives.
    fn tombstone_ttl(&self) -> Duration {
        DEFAULT_TOMBSTONE_TTL
    }

    /// The breaker's state and the invalidations waiting for replay (an
    /// in-process store is always healthy).
    fn health(&self) -> StoreHealth {
        StoreHealth::default()
    }

    /// Milliseconds to add to this process's wall clock to read the
    /// store's: an entry's stored-at time, its TTL, stale window and `Age`
    /// are all judged on that one clock, so processes whose clocks
    /// disagree still agree on them. 0 (this process's clock) by default.
    fn clock_offset_ms(&self) -> i64 {
        0
    }

    /// Told by the [`Policy`](crate::Policy) when it is built: the longest
    /// an entry lives (TTL plus stale window). A store that holds the cache
    /// off after losing invalidations needs to hold it no longer.
    fn longest_entry_life(&self, life: Duration) {
        let _ = life;
    }

    /// The parts `invalidation` goes out as, when more than one (a cluster
    /// store: one per slot), so that a decorator can queue and replay each
    /// on its own (see [`Resilient`]). `None`: one part.
    fn parts(&self, invalidation: &Invalidation) -> Option<Vec<Invalidation>> {
        let _ = invalidation;
        None
    }

    /// Reports every invalidation applied to this store, whichever process
    /// sent it, to `watcher` (for the in-process tier), from the task
    /// returned, which the tier spawns. `None`: this store cannot, so no
    /// route may use the tier over it. A store that wraps another
    /// forwards this call to it.
    fn watch(&self, watcher: Watcher) -> Option<WatchTask> {
        let _ = watcher;
        None
    }

    /// Reads what each of `keys` holds, writing nothing (a lookup may
    /// write a lease), for the write probes
    /// ([`Rule::probe`](crate::Rule::probe)): an entry as a lookup would
    /// serve it (one written under another server lifetime reads absent),
    /// anything else as it is, each with the server lifetime that
    /// answered. `None`: this store cannot, and no write is probed over
    /// it. A store that wraps another forwards this call.
    fn peek(&self, keys: &[String]) -> Option<StoreFuture<Vec<Peeked>>> {
        let _ = keys;
        None
    }
}

impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn lookup(&self, key: &CacheKey) -> StoreFuture<Lookup> {
        (**self).lookup(key)
    }

    fn store(
        &self,
        key: &CacheKey,
        seen: &Lookup,
        value: Bytes,
        ttl: Duration,
    ) -> StoreFuture<bool> {
        (**self).store(key, seen, value, ttl)
    }

    fn invalidate(&self, invalidation: &Invalidation) -> StoreFuture<()> {
        (**self).invalidate(invalidation)
    }

    fn ping(&self) -> StoreFuture<()> {
        (**self).ping()
    }

    fn tombstone_ttl(&self) -> Duration {
        (**self).tombstone_ttl()
    }

    fn health(&self) -> StoreHealth {
        (**self).health()
    }

    fn longest_entry_life(&self, life: Duration) {
        (**self).longest_entry_life(life);
    }

    fn clock_offset_ms(&self) -> i64 {
        (**self).clock_offset_ms()
    }

    fn parts(&self, invalidation: &Invalidation) -> Option<Vec<Invalidation>> {
        (**self).parts(invalidation)
    }

    fn watch(&self, watcher: Watcher) -> Option<WatchTask> {
        (**self).watch(watcher)
    }

    fn peek(&self, keys: &[String]) -> Option<StoreFuture<Vec<Peeked>>> {
        (**self).peek(keys)
    }
}

/// Runs `futures` concurrently and returns their outputs, in order.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) async fn all<T>(mut futures: Vec<StoreFuture<T>>) -> Vec<Result<T, StoreError>> {
    let mut done: Vec<Option<Result<T, StoreError>>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (future, out) in futures.iter_mut().zip(done.iter_mut()) {
            if out.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(result) => *out = Some(result),
                    std::task::Poll::Pending => waiting = true,
                }
            }
        }
        match waiting {
            true => std::task::Poll::Pending,
            false => std::task::Poll::Ready(()),
        }
    })
    .await;
    done.into_iter().flatten().collect()
}

/// The first version a missing version key gets: the current time in
/// microseconds, above any value a lost counter can have reached by `INCR`.
pub(crate) fn fresh_version() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the
/// text between the first `{` and the next `}`, when not empty), else of
/// the whole key, modulo 16384.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) % 16384
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_redis_cluster_hash_tags() {
        // Reference values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(
            slot(b"foo{}{bar}"),
            slot(b"bar"),
            "an empty tag hashes the whole key"
        );
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    /// A detached lookup shares no buffer with the reply it came from.
    #[test]
    fn a_detached_lookup_owns_its_bytes() {
        let reply = Bytes::from_static(b"1.lease-or-entry");
        let seen = Lookup::new(
            vec![Observed::Value(reply.slice(0..1))],
            Observed::Value(reply.slice(2..)),
        );
        let detached = seen.clone().detached();
        assert_eq!(detached, seen);
        let ptr = |seen: &Observed| match seen {
            Observed::Value(value) => value.as_ptr(),
            _ => std::ptr::null(),
        };
        assert_ne!(ptr(detached.entry()), ptr(seen.entry()));
        assert_ne!(ptr(&detached.versions()[0]), ptr(&seen.versions()[0]));
    }

    #[test]
    fn an_invalidation_splits_into_one_part_per_slot_with_its_tombstone() {
        let ttl = Duration::from_secs(60);
        let invalidation = Invalidation::new(
            vec!["app:person:1".to_owned()],
            vec![
                VersionKey::new("{app:persons:list}:ver".to_owned(), ttl),
                VersionKey::new("{app:persons:list}:ver:scope=ab".to_owned(), ttl),
            ],
        );
        let parts = invalidation.split_by_slot();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].deletes(), ["app:person:1"]);
        assert!(parts[0].bumps().is_empty());
        assert!(parts[1].deletes().is_empty());
        assert_eq!(
            parts[1].bumps().len(),
            2,
            "a group's version keys share a slot"
        );
        assert!(parts
            .iter()
            .all(|p| p.tombstone() == invalidation.tombstone()));
    }
}
