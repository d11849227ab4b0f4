//! The invalidation replay queue: invalidations the store did not
//! confirm, held until they are replayed, and the cache held off meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{lock, Admit, Resilient, Shared};
use crate::error::ConfigError;
use crate::stats::telemetry::{self, warn_limited, Op};
use crate::store::{Invalidation, Store, StoreFuture, VersionKey};

/// The invalidation replay queue's bounds: by-value setters from
/// [`ReplayConfig::default`], checked where the store is built
/// ([`RedisStoreBuilder::build`](crate::store::RedisStoreBuilder::build),
/// [`Resilient::new`](crate::store::Resilient::new)): a zero queue or batch
/// is a [`ConfigError::Replay`] there.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_cache::store::ReplayConfig;
///
/// let config = ReplayConfig::default()
///     .max_pending_keys(50_000)
///     .batch(128)
///     .overflow_hold(Duration::from_secs(600));
/// # let _ = config;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayConfig {
    /// Most distinct keys kept for replay (default 10 000).
    pub(super) max_pending_keys: usize,
    /// Most keys one replay sends, so one lookup's work stays bounded
    /// (default 64).
    pub(super) batch: usize,
    /// When the queue overflows, invalidations were lost: the cache is not
    /// served from for this long at most (default 1 h). A policy lowers it
    /// to its longest entry life (TTL plus stale window), past which no
    /// entry the lost invalidations should have removed can remain.
    pub(super) overflow_hold: Duration,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            max_pending_keys: 10_000,
            batch: 64,
            overflow_hold: Duration::from_secs(3600),
        }
    }
}

impl ReplayConfig {
    /// Sets the most distinct keys kept for replay (at least 1).
    pub fn max_pending_keys(mut self, keys: usize) -> Self {
        self.max_pending_keys = keys;
        self
    }

    /// Sets the most keys one replay sends (at least 1).
    pub fn batch(mut self, keys: usize) -> Self {
        self.batch = keys;
        self
    }

    /// Sets the longest the cache stays off after the queue overflowed.
    pub fn overflow_hold(mut self, hold: Duration) -> Self {
        self.overflow_hold = hold;
        self
    }

    /// Refuses the values that cannot work.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        let refuse = |reason: &str| {
            Err(ConfigError::Replay {
                reason: reason.to_owned(),
            })
        };
        if self.max_pending_keys == 0 {
            return refuse("a replay queue of 0 keys loses every failed invalidation");
        }
        if self.batch == 0 {
            return refuse(
                "a replay batch of 0 keys never empties the queue, so the cache stays off",
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    Delete,
    Bump(Duration),
}

/// Invalidations waiting for replay: one action per key (the latest),
/// oldest first.
#[derive(Debug, Default)]
pub(super) struct Queue {
    pub(super) by_key: HashMap<String, (u64, Action)>,
    pub(super) order: BTreeMap<u64, String>,
    pub(super) next: u64,
    pub(super) hold_until: Option<Instant>,
}

/// Keys sent together, with the sequence each had in the queue.
pub(super) type Sent = Vec<(String, u64)>;

impl<S: Store + Clone> Resilient<S> {
    /// One invalidation sent as one store call; queued if it fails.
    pub(super) fn invalidate_one(&self, invalidation: &Invalidation) -> StoreFuture<()> {
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
    pub(super) fn schedule_replay(&self) {
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
    pub(super) fn settle_queue(&self, queue: &Queue) {
        let clear = queue.by_key.is_empty() && queue.hold_until.is_none();
        self.queue_clear.store(clear, Ordering::Release);
    }

    pub(super) fn enqueue(&self, invalidation: &Invalidation) -> Sent {
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
        if queue.by_key.len() > self.replay.max_pending_keys {
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
    pub(super) fn hold(&self) -> Duration {
        match self.entry_life_ms.load(Ordering::Relaxed) {
            0 => self.replay.overflow_hold,
            life => self.replay.overflow_hold.min(Duration::from_millis(life)),
        }
    }

    /// The oldest queued keys, at most one batch, as one invalidation with
    /// a fresh tombstone (never one a read may have seen).
    pub(super) fn batch(&self) -> Option<(Invalidation, Sent)> {
        let queue = lock(&self.queue);
        let (mut deletes, mut bumps, mut sent) = (Vec::new(), Vec::new(), Vec::new());
        for (seq, key) in queue.order.iter().take(self.replay.batch) {
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
    pub(super) fn mark(&self) -> u64 {
        lock(&self.queue).next
    }

    /// A send of `invalidation` that started after `mark` landed: it covers
    /// what was queued for its keys up to then.
    pub(super) fn superseded(&self, invalidation: &Invalidation, mark: u64) {
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
    pub(super) fn applied(&self, sent: &Sent) {
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
    pub(super) fn holding(&self) -> bool {
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
    pub(super) fn clear(&self) -> bool {
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
pub(super) struct Unconfirmed<S: Store + Clone> {
    pub(super) store: Resilient<S>,
    pub(super) invalidation: Option<Invalidation>,
}

impl<S: Store + Clone> Unconfirmed<S> {
    pub(super) fn queue(&mut self) {
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
