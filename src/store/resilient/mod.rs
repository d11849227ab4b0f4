//! What keeps a remote store from hurting requests, as a decorator any
//! [`Store`] can wear: a circuit breaker, so a down, hung or slow store costs
//! nothing per read once detected, and a queue of invalidations that could
//! not be applied, replayed before this process serves from the cache again.
//!
//! The ordering rules live here, in one place:
//!
//! - an invalidation that fails, or whose future is dropped before the
//!   store answered, is queued for replay before anything else happens;
//! - reads and writes of entries go through the breaker; invalidations do
//!   not (a write has its own budget, see the inner store's write deadline);
//! - while anything is queued, nothing is served from the cache; a
//!   background task replays the queue in bounded batches;
//! - every operation the breaker admits is recorded exactly once, even when
//!   its future is dropped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{CacheKey, Invalidation, Lookup, Store, StoreError, StoreFuture};
use crate::error::ConfigError;

mod breaker;
mod health;
mod replay;
#[cfg(test)]
mod tests;

use breaker::Breaker;
pub use breaker::{BreakerConfig, Circuit};
pub use health::StoreHealth;
use replay::Queue;
pub use replay::ReplayConfig;

/// A store behind a circuit breaker and an invalidation replay queue;
/// `RedisStore` wears one. The rules it keeps:
///
/// - an invalidation that fails, or whose future is dropped before the
///   store answered, is queued for replay (reads concurrent with it may
///   still be served: only a write that returned must be seen);
/// - reads and entry writes go through the breaker (it opens on repeated
///   timeouts or connection failures, or on a high share of slow calls);
///   invalidations do not, since a write has its own budget;
/// - while anything is queued, nothing is served from the cache; a
///   background task replays the queue in bounded batches, at once and
///   again every `open_for` while the store fails;
/// - every operation the breaker admits is recorded exactly once, even when
///   its future is dropped.
///
/// ```
/// use tower_redis_cache::store::{BreakerConfig, MemoryStore, ReplayConfig, Resilient, Store};
///
/// let store = Resilient::new(MemoryStore::new(), BreakerConfig::default(), ReplayConfig::default())?;
/// assert_eq!(store.name(), "memory");
/// # Ok::<(), tower_redis_cache::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Resilient<S> {
    inner: S,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: BreakerConfig,
    replay: ReplayConfig,
    breaker: Mutex<Breaker>,
    queue: Mutex<Queue>,
    /// What the locked state says, for the path of every lookup: the
    /// circuit is closed; closed, and a healthy fast call changes nothing
    /// (no failure counted, the window full of fast calls); nothing is
    /// queued and nothing lost. Written under the lock they mirror.
    closed: AtomicBool,
    quiet: AtomicBool,
    queue_clear: AtomicBool,
    replaying: AtomicBool,
    /// The longest life of an entry, in ms, once a policy told us.
    entry_life_ms: AtomicU64,
    operations: AtomicU64,
    failures: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether an operation may go to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    Go,
    Probe,
}

impl<S> Resilient<S> {
    /// The store inside.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Store + Clone> Resilient<S> {
    /// `inner` behind a breaker and a replay queue with these settings;
    /// fails when either holds a value that cannot work.
    pub fn new(
        inner: S,
        breaker: BreakerConfig,
        replay: ReplayConfig,
    ) -> Result<Self, ConfigError> {
        breaker.check()?;
        replay.check()?;
        Ok(Self {
            inner,
            shared: Arc::new(Shared {
                config: breaker,
                replay,
                breaker: Mutex::default(),
                queue: Mutex::default(),
                closed: AtomicBool::new(true),
                quiet: AtomicBool::new(false),
                queue_clear: AtomicBool::new(true),
                replaying: AtomicBool::new(false),
                entry_life_ms: AtomicU64::new(0),
                operations: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
        })
    }
}

/// An admitted store operation. Recorded once: by [`Permit::record`], or on
/// drop as abandoned (the request was cancelled mid-operation).
#[derive(Debug)]
struct Permit {
    shared: Arc<Shared>,
    admit: Option<Admit>,
    started: Instant,
}

impl Permit {
    fn new(shared: &Arc<Shared>) -> Result<Self, StoreError> {
        Ok(Self {
            admit: Some(shared.admit()?),
            shared: shared.clone(),
            started: Instant::now(),
        })
    }

    fn record<T>(mut self, result: &Result<T, StoreError>) {
        if let Some(admit) = self.admit.take() {
            self.shared.record(admit, result, self.started.elapsed());
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(admit) = self.admit.take() {
            self.shared.abandoned(admit, self.started.elapsed());
        }
    }
}

impl<S: Store + Clone> Store for Resilient<S> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn lookup(&self, key: &CacheKey) -> StoreFuture<Lookup> {
        // Invalidations that failed earlier go first: nothing is served from
        // the cache before they are all applied. They are replayed in the
        // background, so a read never pays a write's budget.
        if !self.shared.clear() {
            self.schedule_replay();
            return Box::pin(async { Err(StoreError::PendingInvalidations) });
        }
        let permit = match Permit::new(&self.shared) {
            Ok(permit) => permit,
            Err(err) => return Box::pin(async move { Err(err) }),
        };
        let lookup = self.inner.lookup(key);
        Box::pin(async move {
            let result = lookup.await;
            permit.record(&result);
            result
        })
    }

    fn store(
        &self,
        key: &CacheKey,
        seen: &Lookup,
        value: Bytes,
        ttl: Duration,
    ) -> StoreFuture<bool> {
        if !self.shared.clear() {
            return Box::pin(async { Err(StoreError::PendingInvalidations) });
        }
        let permit = match Permit::new(&self.shared) {
            Ok(permit) => permit,
            Err(err) => return Box::pin(async move { Err(err) }),
        };
        let write = self.inner.store(key, seen, value, ttl);
        Box::pin(async move {
            let result = write.await;
            permit.record(&result);
            result
        })
    }

    /// Sends `invalidation`, or each of its parts (one per cluster slot)
    /// concurrently, every part queued for replay on its own if it fails.
    fn invalidate(&self, invalidation: &Invalidation) -> StoreFuture<()> {
        match self.inner.parts(invalidation) {
            None => self.invalidate_one(invalidation),
            Some(parts) => {
                let sends = parts.iter().map(|part| self.invalidate_one(part)).collect();
                Box::pin(async move { super::all(sends).await.into_iter().collect() })
            }
        }
    }

    fn ping(&self) -> StoreFuture<()> {
        self.inner.ping()
    }

    fn tombstone_ttl(&self) -> Duration {
        self.inner.tombstone_ttl()
    }

    fn watch(&self, watcher: crate::store::Watcher) -> Option<crate::store::WatchTask> {
        self.inner.watch(watcher)
    }

    fn peek(&self, keys: &[String]) -> Option<StoreFuture<Vec<crate::store::Peeked>>> {
        self.inner.peek(keys)
    }

    fn clock_offset_ms(&self) -> i64 {
        self.inner.clock_offset_ms()
    }

    fn longest_entry_life(&self, life: Duration) {
        let millis = u64::try_from(life.as_millis()).unwrap_or(u64::MAX).max(1);
        self.shared.entry_life_ms.store(millis, Ordering::Relaxed);
        self.inner.longest_entry_life(life);
    }

    fn health(&self) -> StoreHealth {
        let circuit = {
            let breaker = lock(&self.shared.breaker);
            match (breaker.open_until, breaker.probing) {
                (None, _) => Circuit::Closed,
                (Some(_), true) => Circuit::HalfOpen,
                (Some(_), false) => Circuit::Open,
            }
        };
        let overflowed = self.shared.holding();
        let pending_invalidations = lock(&self.shared.queue).by_key.len();
        StoreHealth {
            circuit,
            pending_invalidations,
            overflowed,
            operations: self.shared.operations.load(Ordering::Relaxed),
            failures: self.shared.failures.load(Ordering::Relaxed),
            persistence: None,
            degraded: None,
        }
    }
}
