//! How a store tells an in-process tier about invalidations: the store
//! reports, the tier listens. Part of the [`Store`](super::Store) contract
//! in every build, so that a store is written the same way with or without
//! the `tier` feature; only the tier (feature `tier`) makes watchers.

// Without the tier nothing makes a watcher.
#![cfg_attr(not(feature = "tier"), allow(dead_code))]

use std::future::Future;
use std::pin::Pin;
use std::sync::Weak;

/// The task that receives a store's invalidations and reports them to a
/// tier, returned by [`Store::watch`](super::Store::watch); the tier spawns
/// it, and it ends once the tier is gone.
pub type WatchTask = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What a tier does with the reports of its store.
pub(crate) trait Watched: Send + Sync {
    /// Drops every entry; the tier is used again when `live`.
    fn clear(&self, live: bool);
    /// Drops the entries under these keys.
    fn invalidated(&self, keys: &mut dyn Iterator<Item = &str>);
}

/// Where a store reports the invalidations it receives, for an in-process
/// tier (see [`Store::watch`](super::Store::watch)). Each method returns
/// false once the tier is gone: the reporting may stop.
#[derive(Clone)]
pub struct Watcher(Weak<dyn Watched>);

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").finish_non_exhaustive()
    }
}

impl Watcher {
    pub(crate) fn new(tier: Weak<dyn Watched>) -> Self {
        Self(tier)
    }

    /// Invalidations are being received from now on: the tier starts empty.
    pub fn live(&self) -> bool {
        self.0.upgrade().map(|tier| tier.clear(true)).is_some()
    }

    /// Invalidations may have been missed: the tier is dropped and unused
    /// until [`Watcher::live`].
    pub fn lost(&self) -> bool {
        self.0.upgrade().map(|tier| tier.clear(false)).is_some()
    }

    /// These keys were deleted or bumped.
    pub fn invalidated<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> bool {
        self.0
            .upgrade()
            .map(|tier| tier.invalidated(&mut keys.into_iter()))
            .is_some()
    }

    /// Whether the tier still exists.
    pub fn wanted(&self) -> bool {
        self.0.strong_count() > 0
    }
}
