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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{CacheKey, Invalidation, Lookup, Store, StoreError, StoreFuture, VersionKey};
use crate::error::ConfigError;
use crate::stats::telemetry::{self, warn_limited, CircuitGauge, Op};

/// Thresholds of the circuit breaker and the invalidation queue: by-value
/// setters from [`BreakerConfig::default`]; a value that cannot work (a
/// zero window, threshold or batch) is a [`ConfigError`].
///
/// ```
/// use std::time::Duration;
/// use tower_redis_cache::store::BreakerConfig;
///
/// let config = BreakerConfig::default()
///     .failure_threshold(3)?
///     .slow_calls(Duration::from_millis(50), 50, 20)?
///     .open_for(Duration::from_secs(2));
/// assert!(BreakerConfig::default().replay_batch(0).is_err());
/// # let _ = config;
/// # Ok::<(), tower_redis_cache::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failed operations that open the circuit (default 5).
    failure_threshold: u32,
    /// How long the circuit stays open before one probe is let through
    /// (default 1 s).
    open_for: Duration,
    /// A call slower than this counts as slow, even when it succeeds
    /// (default 25 ms).
    slow_call: Duration,
    /// The share of slow calls, in percent, among the last `window` calls
    /// that opens the circuit (default 50).
    slow_call_percent: u8,
    /// How many recent calls the slow-call rate is taken over (default 20).
    window: usize,
    /// Most distinct keys kept for replay (default 10 000).
    max_pending_keys: usize,
    /// Most keys one replay sends, so one lookup's work stays bounded
    /// (default 64).
    replay_batch: usize,
    /// When the queue overflows, invalidations were lost: the cache is not
    /// served from for this long at most (default 1 h). A policy lowers it
    /// to its longest entry life (TTL plus stale window), past which no
    /// entry the lost invalidations should have removed can remain.
    overflow_hold: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(1),
            slow_call: Duration::from_millis(25),
            slow_call_percent: 50,
            window: 20,
            max_pending_keys: 10_000,
            replay_batch: 64,
            overflow_hold: Duration::from_secs(3600),
        }
    }
}

impl BreakerConfig {
    /// Sets the consecutive failures that open the circuit (at least 1).
    pub fn failure_threshold(mut self, failures: u32) -> Result<Self, ConfigError> {
        if failures == 0 {
            return Err(breaker(
                "a failure threshold of 0 opens the circuit on every call",
            ));
        }
        self.failure_threshold = failures;
        Ok(self)
    }

    /// Sets how long the circuit stays open before a probe.
    pub fn open_for(mut self, open_for: Duration) -> Self {
        self.open_for = open_for;
        self
    }

    /// Sets what counts as a slow call and the share of them, in percent
    /// (1 to 100) of the last `window` calls (at least 1), that opens the
    /// circuit.
    pub fn slow_calls(
        mut self,
        slow_call: Duration,
        percent: u8,
        window: usize,
    ) -> Result<Self, ConfigError> {
        if !(1..=100).contains(&percent) {
            return Err(breaker("the slow-call share is a percentage from 1 to 100"));
        }
        if window == 0 {
            return Err(breaker(
                "a slow-call window of 0 calls opens the circuit on every call",
            ));
        }
        self.slow_call = slow_call;
        self.slow_call_percent = percent;
        self.window = window;
        Ok(self)
    }

    /// Sets the most distinct keys kept for replay (at least 1).
    pub fn max_pending_keys(mut self, keys: usize) -> Result<Self, ConfigError> {
        if keys == 0 {
            return Err(breaker(
                "a replay queue of 0 keys loses every failed invalidation",
            ));
        }
        self.max_pending_keys = keys;
        Ok(self)
    }

    /// Sets the most keys one replay sends (at least 1).
    pub fn replay_batch(mut self, keys: usize) -> Result<Self, ConfigError> {
        if keys == 0 {
            return Err(breaker(
                "a replay batch of 0 keys never empties the queue, so the cache stays off",
            ));
        }
        self.replay_batch = keys;
        Ok(self)
    }

    /// Sets the longest the cache stays off after the queue overflowed.
    pub fn overflow_hold(mut self, hold: Duration) -> Self {
        self.overflow_hold = hold;
        self
    }
}

fn breaker(reason: &str) -> ConfigError {
    ConfigError::Breaker {
        reason: reason.to_owned(),
    }
}

/// The state of a store's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Circuit {
    /// Operations go to the store.
    #[default]
    Closed,
    /// The store failed or was slow repeatedly; reads are refused without
    /// trying.
    Open,
    /// One probe is under way to find out whether the store is back.
    HalfOpen,
}

impl Circuit {
    /// `closed`, `open` or `half-open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half-open",
        }
    }
}

/// A store's health, for a health endpoint and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct StoreHealth {
    /// The circuit breaker's state.
    pub circuit: Circuit,
    /// Keys of invalidations waiting for replay.
    pub pending_invalidations: usize,
    /// True while the cache is off because the invalidation queue overflowed.
    pub overflowed: bool,
    /// Operations sent to the store.
    pub operations: u64,
    /// Operations that failed or timed out.
    pub failures: u64,
    /// The server's persistence when the store could read it (`none`,
    /// `rdb`, `aof`, `rdb+aof`). With persistence, a restart reloads old
    /// data; `RedisStore::open` never serves entries written before it.
    pub persistence: Option<&'static str>,
    /// A guarantee the store cannot keep, and why: e.g. a Redis user that
    /// may not run `INFO` (see the README's least-privilege section).
    pub degraded: Option<&'static str>,
}

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
/// use tower_redis_cache::store::{BreakerConfig, MemoryStore, Resilient, Store};
///
/// let store = Resilient::new(MemoryStore::new(), BreakerConfig::default());
/// assert_eq!(store.name(), "memory");
/// ```
#[derive(Debug, Clone)]
pub struct Resilient<S> {
    inner: S,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: BreakerConfig,
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

#[derive(Debug, Default)]
struct Breaker {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    probing: bool,
    /// Whether each of the last calls was slow.
    recent: VecDeque<bool>,
    /// How many of them were.
    slow: usize,
}

impl Breaker {
    /// Adds one call to the window of the last `window` calls.
    fn push(&mut self, slow: bool, window: usize) {
        self.recent.push_back(slow);
        self.slow += usize::from(slow);
        while self.recent.len() > window {
            if self.recent.pop_front() == Some(true) {
                self.slow -= 1;
            }
        }
    }

    /// True when the window is full and slow calls reach the threshold.
    fn too_slow(&self, config: &BreakerConfig) -> bool {
        self.recent.len() >= config.window
            && self.slow * 100 >= self.recent.len() * usize::from(config.slow_call_percent)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Delete,
    Bump(Duration),
}

/// Invalidations waiting for replay: one action per key (the latest),
/// oldest first.
#[derive(Debug, Default)]
struct Queue {
    by_key: HashMap<String, (u64, Action)>,
    order: BTreeMap<u64, String>,
    next: u64,
    hold_until: Option<Instant>,
}

/// Keys sent together, with the sequence each had in the queue.
type Sent = Vec<(String, u64)>;

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

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Store + Clone> Resilient<S> {
    /// `inner` behind a breaker and a replay queue configured by `config`.
    pub fn new(inner: S, config: BreakerConfig) -> Self {
        Self {
            inner,
            shared: Arc::new(Shared {
                config,
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
        }
    }

    /// One invalidation sent as one store call; queued if it fails.
    fn invalidate_one(&self, invalidation: &Invalidation) -> StoreFuture<()> {
        if invalidation.is_empty() {
            return Box::pin(async { Ok(()) });
        }
        // What was queued before this send; what it supersedes if it lands.
        let mark = self.shared.mark();
        // Queued if it fails, or if its future is dropped first.
        let owed = Unconfirmed {
            store: self.clone(),
            invalidation: Some(invalidation.clone()),
        };
        self.shared.operations.fetch_add(1, Ordering::Relaxed);
        let apply = self.inner.invalidate(invalidation);
        Box::pin(async move {
            let mut owed = owed;
            let started = Instant::now();
            let result = apply.await;
            let shared = &owed.store.shared;
            shared.record(Admit::Go, &result, started.elapsed());
            match &result {
                Ok(()) => {
                    if let Some(invalidation) = owed.invalidation.take() {
                        shared.superseded(&invalidation, mark);
                    }
                }
                Err(err) if err.is_transient() => {
                    warn_limited!(error = %err, "invalidation queued for replay");
                    owed.queue();
                }
                // Sending it again cannot succeed: queued, it would hold the
                // cache off for ever.
                Err(err) => {
                    owed.invalidation = None;
                    warn_limited!(error = %err, "invalidation refused by the store; not replayed");
                }
            }
            result
        })
    }

    /// Sends queued invalidations every `open_for` until none is left, from
    /// one background task, so a process that serves no reads still replays.
    fn schedule_replay(&self) {
        if self.shared.replaying.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.shared.replaying.store(false, Ordering::Release);
            return;
        };
        let (inner, shared) = (self.inner.clone(), self.shared.clone());
        runtime.spawn(async move {
            // Batch after batch while the store takes them; after a failure,
            // again once `open_for` has passed.
            while let Some((batch, sent)) = shared.batch() {
                let started = Instant::now();
                shared.operations.fetch_add(1, Ordering::Relaxed);
                let result = inner.invalidate(&batch).await;
                shared.record(Admit::Go, &result, started.elapsed());
                match result {
                    Ok(()) => {
                        shared.applied(&sent);
                        tracing::info!(keys = sent.len(), "queued invalidations replayed");
                    }
                    Err(err) if err.is_transient() => {
                        telemetry::store_error(Op::Replay, err.kind());
                        tokio::time::sleep(shared.config.open_for).await
                    }
                    // Sending it again cannot succeed: dropped, not retried
                    // for ever with the cache held off.
                    Err(err) => {
                        telemetry::store_error(Op::Replay, err.kind());
                        shared.applied(&sent);
                        tracing::error!(keys = sent.len(), error = %err, "queued invalidations refused by the store; dropped");
                    }
                }
            }
            shared.replaying.store(false, Ordering::Release);
            // An invalidation queued after the last batch was taken.
            if !lock(&shared.queue).by_key.is_empty() {
                Resilient { inner, shared }.schedule_replay();
            }
        });
    }
}

impl Shared {
    fn admit(&self) -> Result<Admit, StoreError> {
        if self.closed.load(Ordering::Acquire) {
            self.operations.fetch_add(1, Ordering::Relaxed);
            return Ok(Admit::Go);
        }
        let mut breaker = lock(&self.breaker);
        let admit = match breaker.open_until {
            None => Admit::Go,
            Some(until) if Instant::now() >= until && !breaker.probing => {
                breaker.probing = true;
                telemetry::circuit(CircuitGauge::HalfOpen);
                Admit::Probe
            }
            Some(_) => return Err(StoreError::CircuitOpen),
        };
        self.operations.fetch_add(1, Ordering::Relaxed);
        Ok(admit)
    }

    /// Records how an operation ended and how long it took. Timeouts,
    /// unreachable stores and refused credentials count towards the failure
    /// threshold, slow calls towards the slow-call rate; other server errors
    /// (`OOM`, `WRONGTYPE`…) towards neither.
    fn record<T>(&self, admit: Admit, result: &Result<T, StoreError>, took: Duration) {
        let unhealthy = matches!(
            result,
            Err(StoreError::Timeout | StoreError::Unreachable(_) | StoreError::Denied(_))
        );
        if result.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let config = &self.config;
        let slow = took > config.slow_call;
        // A fast healthy call into a window of fast calls changes nothing.
        if admit == Admit::Go && !unhealthy && !slow && self.quiet.load(Ordering::Acquire) {
            return;
        }
        let mut breaker = lock(&self.breaker);
        if admit == Admit::Probe {
            breaker.probing = false;
        }
        breaker.push(slow, config.window);
        breaker.consecutive_failures = match unhealthy {
            true => breaker.consecutive_failures.saturating_add(1),
            false => 0,
        };
        let too_slow = breaker.too_slow(config);
        let trip = too_slow
            || (admit == Admit::Probe && (unhealthy || slow))
            || (unhealthy && breaker.consecutive_failures >= config.failure_threshold);
        if trip {
            if breaker.open_until.is_none() || admit == Admit::Probe {
                tracing::warn!(open_for = ?config.open_for, slow = too_slow, "cache store unhealthy; circuit open");
            }
            breaker.open_until = Some(Instant::now() + config.open_for);
            breaker.recent.clear();
            breaker.slow = 0;
            telemetry::circuit(CircuitGauge::Open);
        } else if !unhealthy && !slow && breaker.open_until.take().is_some() {
            tracing::info!("cache store healthy again; circuit closed");
            telemetry::circuit(CircuitGauge::Closed);
        }
        self.settle_breaker(&breaker);
    }

    fn settle_breaker(&self, breaker: &Breaker) {
        let closed = breaker.open_until.is_none();
        let quiet = closed
            && breaker.consecutive_failures == 0
            && breaker.slow == 0
            && breaker.recent.len() >= self.config.window;
        self.closed.store(closed, Ordering::Release);
        self.quiet.store(quiet, Ordering::Release);
    }

    fn settle_queue(&self, queue: &Queue) {
        let clear = queue.by_key.is_empty() && queue.hold_until.is_none();
        self.queue_clear.store(clear, Ordering::Release);
    }

    /// An operation whose future was dropped before the store answered:
    /// a probe gives its turn back, and the time it waited still counts
    /// towards the slow-call rate (a caller's timeout shorter than ours must
    /// not hide a slow store).
    fn abandoned(&self, admit: Admit, waited: Duration) {
        let config = &self.config;
        let mut breaker = lock(&self.breaker);
        if admit == Admit::Probe {
            breaker.probing = false;
        }
        breaker.push(waited > config.slow_call, config.window);
        if breaker.too_slow(config) {
            tracing::warn!(open_for = ?config.open_for, "cache store slow; circuit open");
            breaker.open_until = Some(Instant::now() + config.open_for);
            breaker.recent.clear();
            breaker.slow = 0;
            telemetry::circuit(CircuitGauge::Open);
        }
        self.settle_breaker(&breaker);
    }

    fn enqueue(&self, invalidation: &Invalidation) -> Sent {
        let mut queue = lock(&self.queue);
        let actions = invalidation
            .deletes()
            .iter()
            .map(|key| (key.as_str(), Action::Delete))
            .chain(
                invalidation
                    .bumps()
                    .iter()
                    .map(|b| (b.key(), Action::Bump(b.ttl()))),
            );
        let mut sent =
            Vec::with_capacity(invalidation.deletes().len() + invalidation.bumps().len());
        for (key, action) in actions {
            queue.next += 1;
            let seq = queue.next;
            if let Some((old, _)) = queue.by_key.insert(key.to_owned(), (seq, action)) {
                queue.order.remove(&old);
            }
            queue.order.insert(seq, key.to_owned());
            sent.push((key.to_owned(), seq));
        }
        if queue.by_key.len() > self.config.max_pending_keys {
            let hold = self.hold();
            tracing::error!(?hold, "invalidation queue overflowed; serving nothing from the cache until entries that may be stale expired");
            queue.by_key.clear();
            queue.order.clear();
            queue.hold_until = Some(Instant::now() + hold);
        }
        self.settle_queue(&queue);
        telemetry::pending_invalidations(queue.by_key.len());
        sent
    }

    /// How long the cache stays off after lost invalidations.
    fn hold(&self) -> Duration {
        match self.entry_life_ms.load(Ordering::Relaxed) {
            0 => self.config.overflow_hold,
            life => self.config.overflow_hold.min(Duration::from_millis(life)),
        }
    }

    /// The oldest queued keys, at most one batch, as one invalidation with
    /// a fresh tombstone (never one a read may have seen).
    fn batch(&self) -> Option<(Invalidation, Sent)> {
        let queue = lock(&self.queue);
        let (mut deletes, mut bumps, mut sent) = (Vec::new(), Vec::new(), Vec::new());
        for (seq, key) in queue.order.iter().take(self.config.replay_batch) {
            match queue.by_key.get(key) {
                Some((_, Action::Delete)) => deletes.push(key.clone()),
                Some((_, Action::Bump(ttl))) => bumps.push(VersionKey::new(key.clone(), *ttl)),
                None => continue,
            }
            sent.push((key.clone(), *seq));
        }
        (!sent.is_empty()).then(|| (Invalidation::new(deletes, bumps), sent))
    }

    /// The sequence of the latest queued action.
    fn mark(&self) -> u64 {
        lock(&self.queue).next
    }

    /// A send of `invalidation` that started after `mark` landed: it covers
    /// what was queued for its keys up to then.
    fn superseded(&self, invalidation: &Invalidation, mark: u64) {
        let mut queue = lock(&self.queue);
        let keys = invalidation
            .deletes()
            .iter()
            .map(String::as_str)
            .chain(invalidation.bumps().iter().map(|b| b.key()));
        for key in keys {
            if let Some(&(seq, _)) = queue.by_key.get(key) {
                if seq <= mark {
                    queue.by_key.remove(key);
                    queue.order.remove(&seq);
                }
            }
        }
        self.settle_queue(&queue);
        telemetry::pending_invalidations(queue.by_key.len());
    }

    /// Forgets what was applied, keeping keys queued again since.
    fn applied(&self, sent: &Sent) {
        let mut queue = lock(&self.queue);
        for (key, seq) in sent {
            if queue.by_key.get(key).is_some_and(|(s, _)| s == seq) {
                queue.by_key.remove(key);
                queue.order.remove(seq);
            }
        }
        self.settle_queue(&queue);
        telemetry::pending_invalidations(queue.by_key.len());
    }

    /// True while lost invalidations keep the cache off.
    fn holding(&self) -> bool {
        let mut queue = lock(&self.queue);
        match queue.hold_until {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                queue.hold_until = None;
                self.settle_queue(&queue);
                false
            }
            None => false,
        }
    }

    /// Nothing queued and nothing lost: the cache may be used. No lock
    /// unless something is (or was).
    fn clear(&self) -> bool {
        if self.queue_clear.load(Ordering::Acquire) {
            return true;
        }
        let mut queue = lock(&self.queue);
        if let Some(until) = queue.hold_until {
            if Instant::now() < until {
                return false;
            }
            queue.hold_until = None;
            self.settle_queue(&queue);
        }
        queue.by_key.is_empty()
    }
}

/// An invalidation sent but not confirmed: queued for replay if it fails,
/// or if its future is dropped before the store answered.
struct Unconfirmed<S: Store + Clone> {
    store: Resilient<S>,
    invalidation: Option<Invalidation>,
}

impl<S: Store + Clone> Unconfirmed<S> {
    fn queue(&mut self) {
        if let Some(invalidation) = self.invalidation.take() {
            self.store.shared.enqueue(&invalidation);
            self.store.schedule_replay();
        }
    }
}

impl<S: Store + Clone> Drop for Unconfirmed<S> {
    fn drop(&mut self) {
        self.queue();
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

    #[cfg(feature = "tier")]
    fn watch(&self, watcher: crate::store::Watcher) -> Option<crate::store::WatchTask> {
        self.inner.watch(watcher)
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

#[cfg(test)]
mod tests {
    //! The rules, in-process, against a memory store that can be made to
    //! fail, stall or crawl.

    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn values_that_cannot_work_are_config_errors() {
        let default = BreakerConfig::default();
        let zero_window = default.slow_calls(Duration::from_millis(10), 50, 0);
        assert!(matches!(zero_window, Err(ConfigError::Breaker { .. })));
        assert!(default.replay_batch(0).is_err());
        assert!(default.failure_threshold(0).is_err());
        assert!(default.max_pending_keys(0).is_err());
        assert!(default
            .slow_calls(Duration::from_millis(10), 0, 20)
            .is_err());
        assert!(default
            .slow_calls(Duration::from_millis(10), 101, 20)
            .is_err());
        let set = default
            .replay_batch(1)
            .unwrap()
            .slow_calls(Duration::ZERO, 100, 1)
            .unwrap();
        assert_eq!(
            (set.replay_batch, set.window, set.slow_call_percent),
            (1, 1, 100)
        );
        let err = default.replay_batch(0).unwrap_err().to_string();
        assert!(err.contains("replay batch"), "{err}");
    }
    use crate::store::{MemoryStore, Observed};

    #[derive(Debug, Clone, Copy)]
    enum Mode {
        Up,
        Down,
        /// Every operation refused as this error (`Denied`, `Rejected`).
        Refuse(fn(String) -> StoreError),
        Slow(Duration),
        Hung,
    }

    /// A memory store with a switch, counting the calls that reach it.
    #[derive(Clone)]
    struct Faulty {
        inner: MemoryStore,
        mode: Arc<Mutex<Mode>>,
        calls: Arc<AtomicUsize>,
    }

    impl Faulty {
        fn new() -> Self {
            Self {
                inner: MemoryStore::new(),
                mode: Arc::new(Mutex::new(Mode::Up)),
                calls: Arc::default(),
            }
        }

        fn set(&self, mode: Mode) {
            *lock(&self.mode) = mode;
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn run<T: Send + 'static>(&self, op: StoreFuture<T>) -> StoreFuture<T> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mode = *lock(&self.mode);
            Box::pin(async move {
                match mode {
                    Mode::Up => op.await,
                    Mode::Down => Err(StoreError::Unreachable("down".into())),
                    Mode::Refuse(error) => Err(error("refused".into())),
                    Mode::Slow(by) => {
                        tokio::time::sleep(by).await;
                        op.await
                    }
                    Mode::Hung => std::future::pending().await,
                }
            })
        }
    }

    impl Store for Faulty {
        fn name(&self) -> &'static str {
            "faulty"
        }

        fn lookup(&self, key: &CacheKey) -> StoreFuture<Lookup> {
            self.run(self.inner.lookup(key))
        }

        fn store(
            &self,
            key: &CacheKey,
            seen: &Lookup,
            value: Bytes,
            ttl: Duration,
        ) -> StoreFuture<bool> {
            self.run(self.inner.store(key, seen, value, ttl))
        }

        fn invalidate(&self, invalidation: &Invalidation) -> StoreFuture<()> {
            // A down store applies nothing.
            let mode = *lock(&self.mode);
            match mode {
                Mode::Up | Mode::Slow(_) => self.run(self.inner.invalidate(invalidation)),
                _ => self.run(Box::pin(async { Ok(()) })),
            }
        }

        fn ping(&self) -> StoreFuture<()> {
            self.run(self.inner.ping())
        }
    }

    fn key(name: &str) -> CacheKey {
        CacheKey::Plain(name.to_owned())
    }

    fn deletes(keys: &[&str]) -> Invalidation {
        Invalidation::new(keys.iter().map(|k| (*k).to_owned()).collect(), Vec::new())
    }

    fn resilient(config: BreakerConfig) -> (Resilient<Faulty>, Faulty) {
        let faulty = Faulty::new();
        (Resilient::new(faulty.clone(), config), faulty)
    }

    /// A store whose invalidations go out one part per deleted key, and
    /// fail for the part holding `failing`.
    #[derive(Clone)]
    struct OnePartFails {
        inner: MemoryStore,
        failing: &'static str,
    }

    impl Store for OnePartFails {
        fn name(&self) -> &'static str {
            "one-part-fails"
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
            if invalidation.deletes().iter().any(|k| k == self.failing) {
                return Box::pin(async { Err(StoreError::Unreachable("node down".into())) });
            }
            self.inner.invalidate(invalidation)
        }
        fn ping(&self) -> StoreFuture<()> {
            self.inner.ping()
        }
        fn parts(&self, invalidation: &Invalidation) -> Option<Vec<Invalidation>> {
            Some(
                invalidation
                    .deletes()
                    .iter()
                    .map(|k| deletes(&[k.as_str()]))
                    .collect(),
            )
        }
    }

    #[tokio::test]
    async fn each_part_of_an_invalidation_is_queued_on_its_own() {
        let store = Resilient::new(
            OnePartFails {
                inner: MemoryStore::new(),
                failing: "b",
            },
            BreakerConfig::default(),
        );
        assert!(store.invalidate(&deletes(&["a", "b", "c"])).await.is_err());
        assert_eq!(
            lock(&store.shared.queue)
                .by_key
                .keys()
                .cloned()
                .collect::<Vec<_>>(),
            ["b"],
            "only the failed part waits for replay"
        );
    }

    #[tokio::test]
    async fn refused_credentials_open_the_circuit() {
        let config = BreakerConfig::default().failure_threshold(3).unwrap();
        let (store, faulty) = resilient(config);
        faulty.set(Mode::Refuse(StoreError::Denied));
        for _ in 0..3 {
            assert!(matches!(
                store.lookup(&key("a")).await,
                Err(StoreError::Denied(_))
            ));
        }
        assert_eq!(store.lookup(&key("a")).await, Err(StoreError::CircuitOpen));
        assert_eq!(faulty.calls(), 3);
    }

    #[tokio::test]
    async fn a_refused_invalidation_is_not_queued_and_never_holds_the_cache_off() {
        let (store, faulty) = resilient(BreakerConfig::default());
        faulty.set(Mode::Refuse(StoreError::Rejected));
        assert!(matches!(
            store.invalidate(&deletes(&["a", "b"])).await,
            Err(StoreError::Rejected(_))
        ));
        assert_eq!(store.health().pending_invalidations, 0);
        faulty.set(Mode::Up);
        assert!(store.lookup(&key("a")).await.is_ok(), "reads go on");
        // A transient failure is still queued.
        faulty.set(Mode::Down);
        let _ = store.invalidate(&deletes(&["c"])).await;
        assert_eq!(store.health().pending_invalidations, 1);
    }

    #[tokio::test]
    async fn opens_after_consecutive_failures_and_refuses_reads_without_trying() {
        let config = BreakerConfig::default()
            .failure_threshold(3)
            .unwrap()
            .open_for(Duration::from_millis(50));
        let (store, faulty) = resilient(config);
        faulty.set(Mode::Down);
        for _ in 0..3 {
            assert!(matches!(
                store.lookup(&key("a")).await,
                Err(StoreError::Unreachable(_))
            ));
        }
        assert_eq!(store.lookup(&key("a")).await, Err(StoreError::CircuitOpen));
        assert_eq!(faulty.calls(), 3, "refused without trying");
        assert_eq!(store.health().circuit, Circuit::Open);
        faulty.set(Mode::Up);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(
            store.lookup(&key("a")).await.is_ok(),
            "one probe, which closes it"
        );
        assert_eq!(store.health().circuit, Circuit::Closed);
    }

    #[tokio::test]
    async fn opens_on_slow_calls_that_succeed() {
        let config = BreakerConfig::default()
            .slow_calls(Duration::from_millis(10), 50, 4)
            .unwrap()
            .open_for(Duration::from_secs(60));
        let (store, faulty) = resilient(config);
        faulty.set(Mode::Slow(Duration::from_millis(20)));
        for _ in 0..4 {
            assert!(store.lookup(&key("a")).await.is_ok());
        }
        assert_eq!(store.lookup(&key("a")).await, Err(StoreError::CircuitOpen));
        assert_eq!(faulty.calls(), 4);
    }

    #[tokio::test]
    async fn fast_calls_keep_it_closed() {
        let config = BreakerConfig::default()
            .slow_calls(Duration::from_millis(10), 50, 4)
            .unwrap();
        let (store, _) = resilient(config);
        for _ in 0..20 {
            assert!(store.lookup(&key("a")).await.is_ok());
        }
        assert_eq!(store.health().circuit, Circuit::Closed);
    }

    #[tokio::test]
    async fn fast_calls_skipped_past_the_lock_still_fill_the_slow_call_window() {
        // Once the window is full of fast calls, a fast call takes no lock;
        // the rate must come out as if each had been counted.
        let config = BreakerConfig::default()
            .slow_calls(Duration::from_millis(10), 50, 8)
            .unwrap()
            .open_for(Duration::from_secs(60));
        let (store, faulty) = resilient(config);
        for _ in 0..30 {
            assert!(store.lookup(&key("a")).await.is_ok());
        }
        faulty.set(Mode::Slow(Duration::from_millis(20)));
        for _ in 0..3 {
            assert!(store.lookup(&key("a")).await.is_ok());
        }
        assert_eq!(store.health().circuit, Circuit::Closed, "3 slow of 8");
        assert!(store.lookup(&key("a")).await.is_ok());
        assert_eq!(store.health().circuit, Circuit::Open, "4 slow of 8");
        // A failure after fast calls counts too.
        let config = BreakerConfig::default().failure_threshold(2).unwrap();
        let (store, faulty) = resilient(config);
        for _ in 0..30 {
            assert!(store.lookup(&key("a")).await.is_ok());
        }
        faulty.set(Mode::Down);
        for _ in 0..2 {
            assert!(store.lookup(&key("a")).await.is_err());
        }
        assert_eq!(store.health().circuit, Circuit::Open);
        assert_eq!(store.lookup(&key("a")).await, Err(StoreError::CircuitOpen));
    }

    /// A store whose circuit one failure opened, for `open_for`.
    async fn opened(open_for: Duration) -> (Resilient<Faulty>, Faulty) {
        let config = BreakerConfig::default()
            .failure_threshold(1)
            .unwrap()
            .open_for(open_for);
        let (store, faulty) = resilient(config);
        faulty.set(Mode::Down);
        assert!(store.lookup(&key("a")).await.is_err());
        assert_eq!(store.health().circuit, Circuit::Open);
        (store, faulty)
    }

    #[tokio::test]
    async fn a_dropped_probe_gives_its_turn_back() {
        let (store, faulty) = opened(Duration::from_millis(20)).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        faulty.set(Mode::Hung);
        let probe = store.lookup(&key("a"));
        assert_eq!(store.health().circuit, Circuit::HalfOpen);
        assert!(tokio::time::timeout(Duration::from_millis(5), probe)
            .await
            .is_err());
        faulty.set(Mode::Up);
        assert!(
            store.lookup(&key("a")).await.is_ok(),
            "the next request probes"
        );
        assert_eq!(store.health().circuit, Circuit::Closed);
    }

    #[tokio::test]
    async fn invalidations_go_through_an_open_circuit() {
        let (store, faulty) = opened(Duration::from_secs(60)).await;
        faulty.set(Mode::Up);
        assert_eq!(store.lookup(&key("a")).await, Err(StoreError::CircuitOpen));
        assert_eq!(store.invalidate(&deletes(&["a"])).await, Ok(()));
        assert_eq!(store.health().pending_invalidations, 0);
        assert_eq!(
            store.health().circuit,
            Circuit::Closed,
            "a success closes it"
        );
    }

    #[tokio::test]
    async fn failed_invalidations_replay_in_bounded_batches_before_any_read() {
        let config = BreakerConfig::default()
            .failure_threshold(100)
            .unwrap()
            .replay_batch(2)
            .unwrap()
            .open_for(Duration::from_millis(20));
        let (store, faulty) = resilient(config);
        let entry = crate::entry::testing::encode(Bytes::from_static(b"{}"));
        let seen = store.lookup(&key("k0")).await.unwrap();
        assert!(store
            .store(&key("k0"), &seen, entry, Duration::from_secs(60))
            .await
            .unwrap());
        faulty.set(Mode::Down);
        let keys = ["k0", "k1", "k2", "k3", "k4"];
        assert!(store.invalidate(&deletes(&keys)).await.is_err());
        assert_eq!(store.health().pending_invalidations, 5);
        // Reads are not served, and cost the store nothing, until replayed.
        let before = faulty.calls();
        assert_eq!(
            store.lookup(&key("k0")).await,
            Err(StoreError::PendingInvalidations)
        );
        faulty.set(Mode::Up);
        for _ in 0..100 {
            if store.health().pending_invalidations == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(store.health().pending_invalidations, 0);
        let found = store.lookup(&key("k0")).await.unwrap();
        assert!(
            !matches!(found.entry(), Observed::Value(v) if crate::entry::testing::is_entry(v.clone()))
        );
        // Failed tries while down, then three batches of at most two keys,
        // then the lookup: the batches are bounded.
        let replays = faulty.calls() - before - 1;
        assert!(replays >= 3, "{replays}");
    }

    #[tokio::test]
    async fn a_process_without_reads_still_replays() {
        let config = BreakerConfig::default().open_for(Duration::from_millis(20));
        let (store, faulty) = resilient(config);
        faulty.set(Mode::Down);
        assert!(store.invalidate(&deletes(&["a", "b"])).await.is_err());
        faulty.set(Mode::Up);
        for _ in 0..50 {
            if store.health().pending_invalidations == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.health().pending_invalidations, 0);
    }

    #[tokio::test]
    async fn an_overflow_holds_the_cache_off_for_the_longest_entry_life_only() {
        let config = BreakerConfig::default().max_pending_keys(2).unwrap();
        let (store, faulty) = resilient(config);
        store.longest_entry_life(Duration::from_millis(50));
        faulty.set(Mode::Down);
        assert!(store.invalidate(&deletes(&["a", "b", "c"])).await.is_err());
        faulty.set(Mode::Up);
        assert!(store.health().overflowed);
        assert_eq!(
            store.lookup(&key("a")).await,
            Err(StoreError::PendingInvalidations)
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(store.lookup(&key("a")).await.is_ok());
    }

    #[test]
    fn keys_named_again_after_a_send_stay_queued() {
        let (store, _) = resilient(BreakerConfig::default());
        let shared = &store.shared;
        shared.enqueue(&deletes(&["a"]));
        let (_, sent) = shared.batch().unwrap();
        shared.enqueue(&deletes(&["a"]));
        shared.applied(&sent);
        assert_eq!(lock(&shared.queue).by_key.len(), 1);
        let (batch, sent) = shared.batch().unwrap();
        let (again, _) = shared.batch().unwrap();
        assert_ne!(
            batch.tombstone(),
            again.tombstone(),
            "a fresh tombstone per send"
        );
        shared.applied(&sent);
        assert!(shared.clear());
    }
}
