//! The in-process tier as one request sees it (feature `tier`): a hit from
//! the tier before the store is asked, and the entries a request leaves
//! there (a hit's, a stored miss's). The cache's one seam for the tier:
//! without the feature every call here is a no-op and `Local` is empty.

#[cfg(feature = "tier")]
use std::time::Duration;

use http::Response;
use http_body::Body;

use super::body::ResponseBody;
use super::request::Ctx;
use crate::entry::Entry;
use crate::store::CacheKey;

/// Where a request on a route kept in process stands with the tier.
#[derive(Debug, Default)]
pub(super) struct Local {
    /// The tier's generation read before the store was asked.
    #[cfg(feature = "tier")]
    generation: Option<u64>,
    /// Whether the tier answered.
    #[cfg(feature = "tier")]
    served: bool,
    /// The entry this miss stored and its stored size, kept in process
    /// once the store wrote it.
    #[cfg(feature = "tier")]
    stored: Option<(Entry, usize)>,
}

/// A hit's entry to keep in process, fresh for how long, and its stored
/// size.
pub(super) struct Kept {
    #[cfg(feature = "tier")]
    entry: Entry,
    #[cfg(feature = "tier")]
    fresh_for: Duration,
    #[cfg(feature = "tier")]
    size: usize,
}

#[cfg(feature = "tier")]
impl Ctx {
    /// The response from the in-process tier, when the route uses it and
    /// holds a servable entry for `key`; else `key` back, for the store.
    /// Reads the tier's generation first, for the fill once the store
    /// answered.
    pub(crate) fn local_hit<B: Body>(
        &mut self,
        key: CacheKey,
    ) -> Result<Response<ResponseBody<B>>, CacheKey> {
        let tier = match (self.policy.route(self.route).in_process, self.policy.tier()) {
            (Some(_), Some(tier)) => tier,
            _ => return Err(key),
        };
        self.local.generation = Some(tier.generation());
        let found = tier
            .get(&key, self.started)
            .filter(|entry| entry.binding == self.binding)
            .and_then(|entry| self.representation(entry));
        match found {
            Some(entry) => {
                self.key = Some(key);
                self.local.served = true;
                Ok(self.hit(entry, self.now_ms()))
            }
            None => Err(key),
        }
    }

    /// Whether the tier answered this request.
    pub(super) fn served_locally(&self) -> bool {
        self.local.served
    }

    /// What of a fresh hit's `stored` entry (`size` bytes stored) to keep
    /// in process, on a route that does.
    pub(super) fn to_keep(&self, stored: &Entry, size: usize, now_ms: u64) -> Option<Kept> {
        self.local.generation.map(|_| Kept {
            entry: stored.clone(),
            fresh_for: stored.fresh_for(now_ms),
            size,
        })
    }

    /// Keeps a hit's entry in process.
    pub(super) fn keep(&self, kept: Kept) {
        self.fill_local(kept.entry, kept.size, kept.fresh_for);
    }

    /// The entry a miss sends to the store (`size` bytes), to keep in
    /// process once the store wrote it.
    pub(super) fn storing(&mut self, entry: &Entry, size: usize) {
        if self.local.generation.is_some() {
            self.local.stored = Some((entry.clone(), size));
        }
    }

    /// The store wrote the miss's entry: it is kept in process too.
    pub(super) fn stored_locally(&mut self) {
        if let Some((entry, size)) = self.local.stored.take() {
            self.fill_local(entry, size, self.ttl());
        }
    }

    /// Keeps `entry` (`size` bytes stored), fresh for `fresh_for`, in the
    /// in-process tier, unless an invalidation of its key or group arrived
    /// since the lookup began.
    fn fill_local(&self, entry: Entry, size: usize, fresh_for: Duration) {
        let (Some(generation), Some(key), Some(tier)) =
            (self.local.generation, &self.key, self.policy.tier())
        else {
            return;
        };
        if let Some(bound) = self.policy.route(self.route).in_process {
            let until = self.started + bound.min(fresh_for);
            tier.fill(key, entry, size, generation, until);
        }
    }
}

#[cfg(not(feature = "tier"))]
impl Local {
    fn served(&self) -> bool {
        false
    }
}

#[cfg(not(feature = "tier"))]
impl Ctx {
    /// Without the tier: always the store.
    pub(crate) fn local_hit<B: Body>(
        &mut self,
        key: CacheKey,
    ) -> Result<Response<ResponseBody<B>>, CacheKey> {
        Err(key)
    }

    pub(super) fn served_locally(&self) -> bool {
        self.local.served()
    }

    pub(super) fn to_keep(&self, _: &Entry, _: usize, _: u64) -> Option<Kept> {
        None
    }

    pub(super) fn keep(&self, _: Kept) {}

    pub(super) fn storing(&mut self, _: &Entry, _: usize) {}

    pub(super) fn stored_locally(&mut self) {}
}
