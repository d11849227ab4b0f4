//! A miss whose body is not all there at once: sent to the client as it
//! arrives, while a copy (up to the cap) is kept and stored once the body
//! ended complete.
//!
//! Such a response goes out before its body is read, so it carries no
//! `ETag` and no `stored` in `cache-status` (`detail=streamed` instead);
//! the entry, stored when the body ends, has its ETag for every hit. A
//! body that runs over the cap, ends with trailers or fails is not stored,
//! and neither is one whose client went away before its end. Misses of this
//! process waiting on the flight read the body as it comes (see
//! `fanout.rs`), or, for a body in a coding, get the entry when it is
//! stored, or call the inner service themselves when it is not.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};

use crate::flight::Leader;
use crate::key::Binding;
use crate::policy::Policy;
use crate::stats::telemetry::{warn_limited, Op};
use crate::store::{CacheKey, Lookup, StoreFuture};

/// What the write compares against: the lookup's result, or the lookup
/// still under way (a hedged miss).
pub(crate) enum Seen {
    Known(Lookup),
    Pending(StoreFuture<Lookup>),
}

/// The write of a streamed body's entry, and its counting.
pub(crate) type Writing = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// What storing a streamed body needs once it ended.
pub(crate) struct Filling {
    pub(crate) policy: Policy,
    pub(crate) route: usize,
    pub(crate) key: CacheKey,
    pub(crate) seen: Seen,
    /// Written in the background, the body not waiting for it (a hedged
    /// miss: its lookup is slow).
    pub(crate) detached: bool,
    pub(crate) leader: Option<Leader>,
    pub(crate) binding: Binding,
    pub(crate) ttl: Duration,
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) started: Instant,
    /// The body read so far, and the most it may hold.
    pub(crate) copy: Vec<Bytes>,
    pub(crate) size: usize,
    pub(crate) cap: usize,
}

impl Filling {
    /// The followers' end of this streamed body, announced to the flight
    /// this request leads (`data`: what was read already). `None` when it
    /// leads none, or when the body is in a coding, which a follower may
    /// not accept (they then wait for the entry, as before).
    pub(crate) fn fan_out(
        &self,
        parts: &http::response::Parts,
        read: impl Iterator<Item = Bytes>,
    ) -> Option<crate::fanout::TeeWriter> {
        let leader = self.leader.as_ref()?;
        if parts.headers.contains_key(http::header::CONTENT_ENCODING) {
            return None;
        }
        let (tee, writer) = crate::fanout::Tee::new(
            parts.status,
            parts.headers.clone(),
            self.binding,
            self.cap,
            read,
        );
        leader.stream(tee);
        Some(writer)
    }

    /// Keeps a copy of `data`; false (and nothing is stored) once the body
    /// runs over the cap.
    pub(crate) fn keep(&mut self, data: &Bytes) -> bool {
        self.size += data.len();
        if self.size > self.cap {
            return false;
        }
        self.copy.push(data.clone());
        true
    }

    /// The body ended complete: makes the entry, shares it with the misses
    /// waiting on the flight, and returns its write, which the body awaits
    /// before it ends (so the client's next request finds the entry).
    pub(crate) fn complete(mut self) -> Option<Writing> {
        let mut body = BytesMut::with_capacity(self.size);
        for data in &self.copy {
            body.extend_from_slice(data);
        }
        let body = body.freeze();
        let store = self.policy.store().clone();
        // As for a miss read whole: a miss slower than half a tombstone's
        // life might store over an expired tombstone.
        if self.started.elapsed() > store.tombstone_ttl() / 2 {
            return None;
        }
        let now = crate::clock::shifted(crate::clock::unix_ms(), store.clock_offset_ms());
        let made = super::storable::entry_of(
            &self.policy,
            self.binding,
            self.ttl,
            now,
            self.status,
            &mut self.headers,
            &body,
        );
        let Ok((_, encoded)) = made else {
            return None;
        };
        // Listed until the write is done: a request that saw the flight's
        // lease joins it and gets the entry.
        let mut leader = self.leader.take();
        if let Some(leader) = &mut leader {
            leader.share(encoded.clone());
        }
        let ttl = self.ttl + self.policy.route(self.route).stale_window;
        let (policy, route, key) = (self.policy.clone(), self.route, self.key);
        let seen = self.seen;
        let writing: Writing = Box::pin(async move {
            let _listed = leader;
            let seen = match seen {
                Seen::Known(seen) => seen,
                // A hedged miss: the handler may have read before its
                // lookup ran, which only some guards cover.
                Seen::Pending(lookup) => match lookup.await {
                    Ok(seen) if seen.guards_an_earlier_read() => seen,
                    _ => return,
                },
            };
            let started = Instant::now();
            match store.store(&key, &seen, encoded, ttl).await {
                Ok(true) => policy.stats_ref().stored(route, started.elapsed()),
                Ok(false) => {}
                Err(err) => {
                    policy.stats_ref().error(route, Op::Store, err.kind());
                    warn_limited!(error = %err, "cache store of a streamed miss failed");
                }
            }
        });
        if !self.detached {
            return Some(writing);
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(writing);
        }
        None
    }
}
