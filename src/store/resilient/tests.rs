//! The breaker and the replay queue, in process against faulty stores.

//! The rules, in-process, against a memory store that can be made to
//! fail, stall or crawl.

use std::sync::atomic::AtomicUsize;

use super::*;
use crate::error::ConfigError;

#[test]
fn values_that_cannot_work_are_config_errors() {
    let check = |breaker: BreakerConfig, replay: ReplayConfig| {
        Resilient::new(MemoryStore::new(), breaker, replay).map(|_| ())
    };
    let (breaker, replay) = (BreakerConfig::default(), ReplayConfig::default());
    assert_eq!(check(breaker, replay), Ok(()));
    let zero_window = breaker.slow_calls(Duration::from_millis(10), 50, 0);
    assert!(matches!(
        check(zero_window, replay),
        Err(ConfigError::Breaker { .. })
    ));
    assert!(check(breaker.failure_threshold(0), replay).is_err());
    for share in [0, 101] {
        let refused = check(
            breaker.slow_calls(Duration::from_millis(10), share, 20),
            replay,
        );
        assert!(
            matches!(refused, Err(ConfigError::Breaker { .. })),
            "{share}"
        );
    }
    assert!(matches!(
        check(breaker, replay.max_pending_keys(0)),
        Err(ConfigError::Replay { .. })
    ));
    let err = check(breaker, replay.batch(0)).unwrap_err().to_string();
    assert!(err.contains("replay batch"), "{err}");
    let edge = (
        breaker
            .slow_calls(Duration::ZERO, 100, 1)
            .failure_threshold(1),
        replay.batch(1).max_pending_keys(1),
    );
    assert_eq!(check(edge.0, edge.1), Ok(()));
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
    resilient_with(config, ReplayConfig::default())
}

fn resilient_with(breaker: BreakerConfig, replay: ReplayConfig) -> (Resilient<Faulty>, Faulty) {
    let faulty = Faulty::new();
    let store = Resilient::new(faulty.clone(), breaker, replay).expect("valid settings");
    (store, faulty)
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
        ReplayConfig::default(),
    )
    .unwrap();
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
    let config = BreakerConfig::default().failure_threshold(3);
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
    let config = BreakerConfig::default().slow_calls(Duration::from_millis(10), 50, 4);
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
    let config = BreakerConfig::default().failure_threshold(2);
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
        .open_for(Duration::from_millis(20));
    let (store, faulty) = resilient_with(config, ReplayConfig::default().batch(2));
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
    let replay = ReplayConfig::default().max_pending_keys(2);
    let (store, faulty) = resilient_with(BreakerConfig::default(), replay);
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
