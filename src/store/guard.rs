//! What keeps a remote store from hurting requests: a circuit breaker, so a
//! down or hung store costs nothing per request once detected, and a queue
//! of invalidations that could not be applied, replayed before this process
//! serves from the cache again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Invalidation, StoreError, VersionKey};

/// Thresholds of the circuit breaker and the invalidation queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Consecutive failed operations that open the circuit (default 5).
    pub failure_threshold: u32,
    /// How long the circuit stays open before one probe is let through
    /// (default 1 s).
    pub open_for: Duration,
    /// Most distinct keys kept for replay (default 10 000).
    pub max_pending_keys: usize,
    /// When the queue overflows, invalidations were lost: the cache is not
    /// served from for this long, which should exceed the longest TTL
    /// (default 1 h).
    pub overflow_hold: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(1),
            max_pending_keys: 10_000,
            overflow_hold: Duration::from_secs(3600),
        }
    }
}

impl BreakerConfig {
    /// Sets the failures that open the circuit.
    pub fn failure_threshold(mut self, failures: u32) -> Self {
        self.failure_threshold = failures.max(1);
        self
    }

    /// Sets how long the circuit stays open before a probe.
    pub fn open_for(mut self, open_for: Duration) -> Self {
        self.open_for = open_for;
        self
    }

    /// Sets the most distinct keys kept for replay.
    pub fn max_pending_keys(mut self, keys: usize) -> Self {
        self.max_pending_keys = keys.max(1);
        self
    }

    /// Sets how long the cache stays off after the queue overflowed.
    pub fn overflow_hold(mut self, hold: Duration) -> Self {
        self.overflow_hold = hold;
        self
    }
}

/// The state of a store's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Circuit {
    /// Operations go to the store.
    #[default]
    Closed,
    /// The store failed repeatedly; operations are refused without trying.
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
}

/// Whether an operation may go to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    Go,
    Probe,
}

#[derive(Debug, Default)]
struct BreakerState {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

#[derive(Debug, Default)]
struct Pending {
    /// Key → generation of the latest invalidation that named it.
    deletes: HashMap<String, u64>,
    bumps: HashMap<String, (u64, Duration)>,
    generation: u64,
    tombstone: Bytes,
    overflowed_until: Option<Instant>,
}

#[derive(Debug, Default)]
pub(crate) struct Guard {
    config: BreakerConfig,
    breaker: Mutex<BreakerState>,
    pending: Mutex<Pending>,
    operations: AtomicU64,
    failures: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Guard {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// Lets an operation through, lets one probe through an open circuit
    /// whose time is up, or refuses at once.
    pub(crate) fn admit(&self) -> Result<Admit, StoreError> {
        let mut state = lock(&self.breaker);
        let admit = match state.open_until {
            None => Admit::Go,
            Some(until) if Instant::now() >= until && !state.probing => {
                state.probing = true;
                Admit::Probe
            }
            Some(_) => return Err(StoreError::CircuitOpen),
        };
        self.operations.fetch_add(1, Ordering::Relaxed);
        Ok(admit)
    }

    /// Like [`Guard::admit`], as a permit that is recorded exactly once:
    /// with the operation's result, or as abandoned when dropped first.
    pub(crate) fn permit(self: &Arc<Self>) -> Result<Permit, StoreError> {
        Ok(Permit {
            guard: self.clone(),
            admit: Some(self.admit()?),
        })
    }

    /// An admitted operation whose future was dropped before it ended: no
    /// news of the store. A probe gives its turn back, so the next request
    /// probes; the circuit never stays half-open.
    fn abandoned(&self, admit: Admit) {
        if admit == Admit::Probe {
            lock(&self.breaker).probing = false;
        }
    }

    /// Records how an admitted operation ended. Only failures that say the
    /// store is unreachable or slow count towards opening the circuit.
    pub(crate) fn record<T>(&self, admit: Admit, result: &Result<T, StoreError>) {
        let unhealthy = matches!(
            result,
            Err(StoreError::Timeout | StoreError::Unreachable(_))
        );
        if result.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let mut state = lock(&self.breaker);
        if admit == Admit::Probe {
            state.probing = false;
        }
        if !unhealthy {
            *state = BreakerState::default();
            return;
        }
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        if admit == Admit::Probe || state.consecutive_failures >= self.config.failure_threshold {
            if state.open_until.is_none() || admit == Admit::Probe {
                tracing::warn!(open_for = ?self.config.open_for, "cache store unhealthy; circuit open");
            }
            state.open_until = Some(Instant::now() + self.config.open_for);
        }
    }

    /// Adds `invalidation` to the queue and returns everything queued, to be
    /// sent as one, with the generation to hand back to [`Guard::applied`].
    pub(crate) fn enqueue(&self, invalidation: &Invalidation) -> (Invalidation, u64) {
        let mut pending = lock(&self.pending);
        pending.generation += 1;
        let generation = pending.generation;
        for key in &invalidation.deletes {
            pending.deletes.insert(key.clone(), generation);
        }
        for bump in &invalidation.bumps {
            pending
                .bumps
                .insert(bump.key().to_owned(), (generation, bump.ttl()));
        }
        pending.tombstone = invalidation.tombstone.clone();
        if pending.deletes.len() + pending.bumps.len() > self.config.max_pending_keys {
            tracing::error!(
                hold = ?self.config.overflow_hold,
                "invalidation queue overflowed; serving nothing from the cache until entries expire"
            );
            pending.deletes.clear();
            pending.bumps.clear();
            pending.overflowed_until = Some(Instant::now() + self.config.overflow_hold);
        }
        (snapshot(&pending), generation)
    }

    /// What must happen before this process reads the cache: an error while
    /// lost invalidations keep it off, else everything queued for replay.
    pub(crate) fn before_read(&self) -> Result<Option<(Invalidation, u64)>, StoreError> {
        let mut pending = lock(&self.pending);
        if overflow_active(&mut pending) {
            return Err(StoreError::PendingInvalidations);
        }
        if pending.deletes.is_empty() && pending.bumps.is_empty() {
            return Ok(None);
        }
        Ok(Some((snapshot(&pending), pending.generation)))
    }

    /// True when nothing waits for replay and nothing was lost: a write may go.
    pub(crate) fn clear(&self) -> bool {
        let mut pending = lock(&self.pending);
        !overflow_active(&mut pending) && pending.deletes.is_empty() && pending.bumps.is_empty()
    }

    /// Forgets what `sent` applied, keeping keys named again since.
    pub(crate) fn applied(&self, sent: &Invalidation, generation: u64) {
        let mut pending = lock(&self.pending);
        for key in &sent.deletes {
            if pending.deletes.get(key).is_some_and(|g| *g <= generation) {
                pending.deletes.remove(key);
            }
        }
        for bump in &sent.bumps {
            if pending
                .bumps
                .get(bump.key())
                .is_some_and(|(g, _)| *g <= generation)
            {
                pending.bumps.remove(bump.key());
            }
        }
    }

    /// True while lost invalidations keep the cache off.
    pub(crate) fn overflowed(&self) -> bool {
        overflow_active(&mut lock(&self.pending))
    }

    pub(crate) fn health(&self) -> StoreHealth {
        let circuit = {
            let state = lock(&self.breaker);
            match (state.open_until, state.probing) {
                (None, _) => Circuit::Closed,
                (Some(_), true) => Circuit::HalfOpen,
                (Some(_), false) => Circuit::Open,
            }
        };
        let pending_invalidations = {
            let pending = lock(&self.pending);
            pending.deletes.len() + pending.bumps.len()
        };
        StoreHealth {
            circuit,
            pending_invalidations,
            overflowed: self.overflowed(),
            operations: self.operations.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

/// An admitted store operation. Recorded once: by [`Permit::record`], or on
/// drop as abandoned (the request was cancelled mid-operation).
#[derive(Debug)]
pub(crate) struct Permit {
    guard: Arc<Guard>,
    admit: Option<Admit>,
}

impl Permit {
    pub(crate) fn record<T>(mut self, result: &Result<T, StoreError>) {
        if let Some(admit) = self.admit.take() {
            self.guard.record(admit, result);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(admit) = self.admit.take() {
            self.guard.abandoned(admit);
        }
    }
}

fn overflow_active(pending: &mut Pending) -> bool {
    match pending.overflowed_until {
        Some(until) if Instant::now() < until => true,
        Some(_) => {
            pending.overflowed_until = None;
            false
        }
        None => false,
    }
}

fn snapshot(pending: &Pending) -> Invalidation {
    let mut deletes: Vec<String> = pending.deletes.keys().cloned().collect();
    let mut bumps: Vec<VersionKey> = pending
        .bumps
        .iter()
        .map(|(key, (_, ttl))| VersionKey::new(key.clone(), *ttl))
        .collect();
    deletes.sort();
    bumps.sort_by(|a, b| a.key().cmp(b.key()));
    Invalidation {
        deletes,
        bumps,
        tombstone: pending.tombstone.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard::new(
            BreakerConfig::default()
                .failure_threshold(3)
                .open_for(Duration::from_millis(50)),
        )
    }

    fn fail(guard: &Guard) {
        let admit = guard.admit().unwrap();
        guard.record::<()>(admit, &Err(StoreError::Timeout));
    }

    #[test]
    fn opens_after_the_threshold_and_refuses_without_trying() {
        let guard = guard();
        for _ in 0..3 {
            fail(&guard);
        }
        assert_eq!(guard.health().circuit, Circuit::Open);
        let before = guard.health().operations;
        for _ in 0..100 {
            assert_eq!(guard.admit(), Err(StoreError::CircuitOpen));
        }
        assert_eq!(
            guard.health().operations,
            before,
            "no operation attempted while open"
        );
    }

    #[test]
    fn one_probe_after_the_pause_closes_it_on_success() {
        let guard = guard();
        for _ in 0..3 {
            fail(&guard);
        }
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(guard.admit(), Ok(Admit::Probe));
        assert_eq!(
            guard.admit(),
            Err(StoreError::CircuitOpen),
            "one probe at a time"
        );
        guard.record(Admit::Probe, &Ok(()));
        assert_eq!(guard.health().circuit, Circuit::Closed);
        assert_eq!(guard.admit(), Ok(Admit::Go));
    }

    #[test]
    fn a_failed_probe_reopens() {
        let guard = guard();
        for _ in 0..3 {
            fail(&guard);
        }
        std::thread::sleep(Duration::from_millis(60));
        let probe = guard.admit().unwrap();
        guard.record::<()>(probe, &Err(StoreError::Unreachable("refused".into())));
        assert_eq!(guard.admit(), Err(StoreError::CircuitOpen));
    }

    #[test]
    fn server_errors_do_not_open_the_circuit() {
        let guard = guard();
        for _ in 0..10 {
            let admit = guard.admit().unwrap();
            guard.record::<()>(admit, &Err(StoreError::Backend("OOM".into())));
        }
        assert_eq!(guard.health().circuit, Circuit::Closed);
    }

    #[test]
    fn a_dropped_probe_gives_its_turn_back() {
        let guard = Arc::new(guard());
        for _ in 0..3 {
            fail(&guard);
        }
        std::thread::sleep(Duration::from_millis(60));
        let probe = guard.permit().unwrap();
        assert_eq!(guard.health().circuit, Circuit::HalfOpen);
        assert_eq!(guard.permit().unwrap_err(), StoreError::CircuitOpen);
        drop(probe);
        let next = guard.permit().expect("the next request probes");
        next.record::<()>(&Ok(()));
        assert_eq!(guard.health().circuit, Circuit::Closed);
    }

    #[test]
    fn the_queue_keeps_keys_named_again_after_a_send() {
        let guard = guard();
        let list = VersionKey::new("list".into(), Duration::from_secs(60));
        let inv = |key: &str| Invalidation::new(vec![key.into()], vec![list.clone()]);
        let (sent, generation) = guard.enqueue(&inv("a"));
        guard.enqueue(&inv("a"));
        guard.applied(&sent, generation);
        let (left, generation) = guard.before_read().unwrap().unwrap();
        assert_eq!(left.deletes, vec!["a".to_owned()]);
        assert_eq!(left.bumps, vec![list]);
        guard.applied(&left, generation);
        assert_eq!(guard.before_read(), Ok(None));
        assert!(guard.clear());
    }

    #[test]
    fn an_overflowing_queue_turns_the_cache_off() {
        let guard = Guard::new(BreakerConfig::default().max_pending_keys(2));
        guard.enqueue(&Invalidation::new(
            vec!["a".into(), "b".into(), "c".into()],
            vec![],
        ));
        assert!(guard.overflowed());
        assert!(guard.health().overflowed);
        assert_eq!(guard.before_read(), Err(StoreError::PendingInvalidations));
        assert!(!guard.clear());
    }
}
