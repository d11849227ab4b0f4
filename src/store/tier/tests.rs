//! The in-process tier's own tests: coherence under invalidations,
//! fills that race them, and the bounds.

use super::*;
use crate::store::VersionKey;

fn tier() -> Tier {
    let tier = Tier::new(InProcess::new());
    watcher_of(&tier.state).live();
    tier
}

fn list_key(version_key: &str) -> CacheKey {
    CacheKey::Versioned {
        versions: vec![VersionKey::new(
            version_key.to_owned(),
            Duration::from_secs(60),
        )],
        prefix: "app:persons:list:v".to_owned(),
        suffix: ":q".to_owned(),
    }
}

fn entry(body: &'static str) -> Entry {
    let body = Bytes::from_static(body.as_bytes());
    Entry::new(
        [0; crate::key::BINDING_LEN],
        http::StatusCode::OK,
        http::HeaderMap::new(),
        body,
        Duration::from_secs(60),
        crate::clock::unix_ms(),
    )
}

fn body(found: Option<Entry>) -> Option<Bytes> {
    found.map(|entry| entry.body)
}

fn later() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

#[test]
fn a_fill_is_served_until_its_key_is_invalidated() {
    let tier = tier();
    let key = CacheKey::Plain("app:person:1".to_owned());
    tier.fill(&key, entry("v1"), 2, tier.generation(), later());
    assert_eq!(
        body(tier.get(&key, Instant::now())).as_deref(),
        Some(&b"v1"[..])
    );
    tier.evict(&Invalidation::new(vec!["app:person:1".to_owned()], vec![]));
    assert_eq!(tier.get(&key, Instant::now()), None);
}

#[test]
fn a_fill_that_raced_an_invalidation_is_refused() {
    let tier = tier();
    let key = list_key("{app:persons:list}:ver");
    let before = tier.generation();
    tier.evict(&Invalidation::new(
        vec![],
        vec![VersionKey::new(
            "{app:persons:list}:ver".to_owned(),
            Duration::from_secs(60),
        )],
    ));
    tier.fill(&key, entry("old"), 2, before, later());
    assert_eq!(tier.get(&key, Instant::now()), None);
    tier.fill(&key, entry("new"), 2, tier.generation(), later());
    assert_eq!(
        body(tier.get(&key, Instant::now())).as_deref(),
        Some(&b"new"[..])
    );
}

#[test]
fn another_group_or_key_leaves_an_entry_alone() {
    let tier = tier();
    let key = list_key("{app:persons:list}:ver:scope=a");
    let before = tier.generation();
    tier.evict(&Invalidation::new(
        vec!["app:person:2".to_owned()],
        vec![VersionKey::new(
            "{app:persons:list}:ver:scope=b".to_owned(),
            Duration::from_secs(60),
        )],
    ));
    tier.fill(&key, entry("v"), 2, before, later());
    // A hash collision would drop it; with 4096 slots these two do not.
    assert!(tier.get(&key, Instant::now()).is_some());
}

#[test]
fn a_lost_subscription_drops_everything_and_refuses_fills_under_way() {
    let tier = tier();
    let watcher = watcher_of(&tier.state);
    let key = CacheKey::Plain("app:person:1".to_owned());
    tier.fill(&key, entry("v1"), 2, tier.generation(), later());
    // Served once: this thread now holds its own copy too.
    assert!(tier.get(&key, Instant::now()).is_some());
    let under_way = tier.generation();
    watcher.lost();
    assert_eq!(tier.get(&key, Instant::now()), None);
    assert_eq!(tier.len(), 0);
    tier.fill(&key, entry("v1"), 2, tier.generation(), later());
    assert_eq!(tier.get(&key, Instant::now()), None, "not live");
    watcher.live();
    tier.fill(&key, entry("v1"), 2, under_way, later());
    assert_eq!(
        tier.get(&key, Instant::now()),
        None,
        "filled across the gap"
    );
    tier.fill(&key, entry("v2"), 2, tier.generation(), later());
    assert_eq!(
        body(tier.get(&key, Instant::now())).as_deref(),
        Some(&b"v2"[..])
    );
}

#[test]
fn an_entry_is_not_served_past_its_bound() {
    let tier = tier();
    let key = CacheKey::Plain("app:person:1".to_owned());
    let until = Instant::now() + Duration::from_millis(10);
    tier.fill(&key, entry("v1"), 2, tier.generation(), until);
    assert!(tier.get(&key, until - Duration::from_millis(1)).is_some());
    assert_eq!(tier.get(&key, until), None);
}

#[test]
fn both_bounds_hold() {
    let tier = Tier::new(InProcess::new().max_entries(100).max_bytes(10_000));
    watcher_of(&tier.state).live();
    let fill = |name: &str, size: usize| {
        for i in 0..1000 {
            let key = CacheKey::Plain(format!("app:{name}:{i}"));
            tier.fill(&key, entry("x"), size, tier.generation(), later());
            assert!(tier.len() <= 100, "{} entries", tier.len());
            assert!(tier.state.entries.weight() <= 10_000);
        }
    };
    fill("small", 10);
    fill("big", 1000);
    let key = CacheKey::Plain("app:big:last".to_owned());
    tier.state.clear(true);
    tier.fill(&key, entry("x"), 1000, tier.generation(), later());
    assert!(
        tier.get(&key, Instant::now()).is_some(),
        "a 1 KB entry fits"
    );
}

#[test]
fn a_watcher_outliving_its_tier_says_so() {
    let tier = tier();
    let watcher = watcher_of(&tier.state);
    assert!(watcher.invalidated(["app:person:1"]));
    drop(tier);
    assert!(!watcher.wanted());
    assert!(!watcher.invalidated(["app:person:1"]));
}
