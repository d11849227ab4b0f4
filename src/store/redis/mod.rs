//! The Redis backend: [`RedisStore`] over one node, a cluster or a
//! connection you bring, all through redis-rs.
//!
//! - `connection`: where connections come from, and the server epoch each
//!   one reads (restarts and failovers never serve older entries).
//! - `batch`: the lookups of concurrent requests, sent as one pipeline.
//! - `lookups`: a hit's one round trip, and the epoch stamp on entries.
//! - `scripts`: the conditional write and the invalidation, as Lua.
//! - `errors`: what each Redis error means for the store.
//! - `cluster`: the store over a Redis Cluster (feature `cluster`).
//! - `subscription`: invalidations published to in-process tiers.

use std::time::Duration;

use bytes::Bytes;

mod batch;
mod builder;
#[cfg(feature = "cluster")]
mod cluster;
mod connection;
mod errors;
mod lookups;
mod replicas;
mod scripts;
mod subscription;
mod target;
#[cfg(test)]
mod tests;

pub use builder::{RedisSource, RedisStoreBuilder};
#[cfg(feature = "cluster")]
pub use cluster::ClusterSource;
pub use connection::{Connect, Reconnecting};
pub use subscription::DEFAULT_CHANNEL;

use self::connection::Epoch;
use self::errors::backend;
use self::lookups::{
    looked_up, plain_lookup, seen_args, stamp, unstamp, versioned_lookup, EntryKey, SeenVersions,
};
use self::scripts::{apply, millis, STORE};
use super::resilient::{Resilient, StoreHealth};
use super::{CacheKey, Invalidation, Lookup, Observed, Peeked, Store, StoreError, StoreFuture};

/// How long [`RedisStore::connect`] tries before it gives up.
const CONNECT_BUDGET: Duration = Duration::from_secs(5);

/// How many times a write's invalidation is tried within its budget.
const WRITE_TRIES: usize = 3;

/// The pause before an invalidation is tried again: time for a cluster
/// client to reconnect or refresh its slots.
const RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Default deadline for one Redis read or entry write.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(100);

/// Default budget of a write's invalidation: longer than a read's, since a
/// write waits for it and a missed one leaves stale data.
pub const DEFAULT_WRITE_DEADLINE: Duration = Duration::from_secs(1);

/// A store in Redis, over one cloneable connection; made with
/// [`RedisStore::builder`].
///
/// Over one node or Sentinel the connection is a [`Reconnecting`]: one
/// multiplexed connection shared by every request, replaced when it breaks,
/// opened lazily (building the store needs no running Redis), and aware of
/// the server's lifetime. Every operation has a deadline ([`DEFAULT_DEADLINE`] unless set);
/// a late or failed operation is an error the layers turn into a miss.
///
/// Entries are written with `SET … PX ttl`; lookups are one `SET key lease
/// NX PX ttl GET` (plain keys: the entry, or a lease of this miss when the
/// key is empty; Redis 7.0 or later) or one `MGET` (versioned keys);
/// writes and invalidations are one `EVALSHA` each. No command scans the
/// keyspace. Over one node, Sentinel or a cluster, the lookups of
/// concurrent requests go out as one pipeline (one write, and one read in
/// Redis, for many lookups); each request still waits for its own reply
/// only.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_redis_cache::store::RedisStore;
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379/0")
///     .deadline(Duration::from_millis(50))
///     .build()?;
/// # Ok::<(), tower_redis_cache::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct RedisStore<C = Reconnecting> {
    inner: Resilient<Link<C>>,
}

/// The Redis operations themselves, without breaker or queue.
#[derive(Clone)]
struct Link<C> {
    source: C,
    deadline: Duration,
    write_deadline: Duration,
    tombstone_ttl: Duration,
    lease_ttl: Duration,
    seen_versions: std::sync::Arc<SeenVersions>,
    /// What tells this store's leases from other processes'.
    minter: crate::store::tokens::Minter,
    /// Whether invalidations go out one per cluster slot: known for a
    /// cluster source, learned from a `CROSSSLOT` for any other.
    split: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Where invalidations are published (empty: nowhere).
    channel: std::sync::Arc<str>,
    /// The servers an in-process tier subscribes through, tried in turn.
    subscribe_via: std::sync::Arc<[redis::Client]>,
}

impl<C> std::fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let link = self.inner.get_ref();
        f.debug_struct("RedisStore")
            .field("deadline", &link.deadline)
            .field("write_deadline", &link.write_deadline)
            .field("tombstone_ttl", &link.tombstone_ttl)
            .finish_non_exhaustive()
    }
}

impl RedisStore<Reconnecting> {
    /// The builder of a store over `source`: a URL or a `redis::Client`
    /// (one node), or a [`RedisSource`] (Sentinel, a cluster, a connection
    /// you bring).
    ///
    /// ```no_run
    /// use tower_redis_cache::store::{RedisSource, RedisStore};
    ///
    /// let one_node = RedisStore::builder("redis://127.0.0.1:6379/0").build()?;
    /// let cluster = RedisStore::builder(RedisSource::cluster(["redis://10.0.0.1:7000"])).build()?;
    /// # Ok::<(), tower_redis_cache::ConfigError>(())
    /// ```
    pub fn builder<C: Connect>(source: impl Into<RedisSource<C>>) -> RedisStoreBuilder<C> {
        RedisStoreBuilder::new(source.into())
    }
}

impl<C: Connect> RedisStore<C> {
    /// Connects and pings now, trying for up to 5 s, so that a wrong
    /// address, password, Sentinel name or permission fails at start-up
    /// with the reason instead of turning every request into a miss. Later
    /// outages are handled as always (misses, never errors). The read
    /// deadline is for requests: the first connection (handshake, scripts,
    /// cluster topology) may take longer than one.
    pub async fn connect(&self) -> Result<(), StoreError> {
        let until = tokio::time::Instant::now() + CONNECT_BUDGET;
        loop {
            match self.inner.get_ref().ping().await {
                Ok(()) => return Ok(()),
                Err(StoreError::Timeout) if tokio::time::Instant::now() < until => continue,
                Err(err) => return Err(err),
            }
        }
    }
}

impl<C: Connect> Link<C> {
    /// `invalidation` as one script call, tried up to three times within
    /// the write deadline: a dropped or stalled connection fails a try, and
    /// the next goes over a fresh one.
    fn send(&self, invalidation: Invalidation) -> StoreFuture<()> {
        let (source, budget, tombstone_ttl) =
            (self.source.clone(), self.write_deadline, self.tombstone_ttl);
        let channel = self.channel.clone();
        Box::pin(async move {
            let until = tokio::time::Instant::now() + budget;
            let send = |deadline: Duration, invalidation: Invalidation| {
                let (source, channel) = (source.clone(), channel.clone());
                async move {
                    // Keys in several slots (one node): its one master's.
                    let confirm = source.replicas(invalidation.slot().unwrap_or(0));
                    // Half the try: the pipeline still answers within it.
                    let within = deadline / 2;
                    let apply = |mut conn: C::Conn, _| async move {
                        apply(
                            &mut conn,
                            &invalidation,
                            tombstone_ttl,
                            &channel,
                            confirm,
                            within,
                        )
                        .await
                    };
                    on_connection(&source, deadline, apply).await
                }
            };
            // Tried again, over a fresh connection, on any failure that
            // may pass (a dropped connection, a cluster client between
            // connections, a `MOVED` while its slot map catches up, a
            // replica slow to acknowledge): each try after the first carries
            // a tombstone of its own, since an earlier one may still land.
            let mut result = send(budget / 2, invalidation.clone()).await;
            for try_number in 1..WRITE_TRIES {
                match &result {
                    // A slow link: one more try at most, as sends queued
                    // behind each other there only slow the next writes.
                    Err(StoreError::Timeout) if try_number > 1 => break,
                    Err(err) if err.is_transient() => {}
                    _ => break,
                }
                // The second try goes at once, as it always did (over a slow
                // link it must not lose a moment); a third, after a pause
                // for a cluster client to reconnect or refresh its slots.
                if try_number > 1 {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                // Each later try may use all that is left: a slow link needs
                // it; a try that fails fast (a dropped connection, `MOVED`)
                // leaves time for the next.
                result = send(left, invalidation.reissued()).await;
            }
            result
        })
    }

    /// One script call per slot, all under way at once; the first error,
    /// if any part failed.
    async fn send_by_slot(&self, invalidation: &Invalidation) -> Result<(), StoreError> {
        let sends = invalidation
            .split_by_slot()
            .into_iter()
            .map(|part| self.send(part))
            .collect();
        super::all(sends).await.into_iter().collect()
    }
}

/// Runs `op` on a connection from `source`, all within `deadline`. A
/// connection that failed or stalled is replaced for the next operation
/// (a silently dead peer, a demoted master), and the new one reads the
/// server's epoch again.
async fn on_connection<C, T, F, Fut>(source: &C, deadline: Duration, op: F) -> Result<T, StoreError>
where
    C: Connect,
    F: FnOnce(C::Conn, Epoch) -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    on_live(source, deadline, source.live(), op).await
}

/// [`on_connection`], given what `source.live()` returned.
async fn on_live<C, T, F, Fut>(
    source: &C,
    deadline: Duration,
    live: Option<(C::Conn, Epoch, u64)>,
    op: F,
) -> Result<T, StoreError>
where
    C: Connect,
    F: FnOnce(C::Conn, Epoch) -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let generation = std::sync::atomic::AtomicU64::new(u64::MAX);
    let attempt = async {
        let (conn, epoch, used) = match live {
            Some(live) => live,
            None => source.connect().await?,
        };
        generation.store(used, std::sync::atomic::Ordering::Relaxed);
        op(conn, epoch).await
    };
    let result = match tokio::time::timeout(deadline, attempt).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Timeout),
    };
    settle(
        source,
        generation.load(std::sync::atomic::Ordering::Relaxed),
        result,
    )
}

/// `result` of an operation on the connection of generation `used`, which
/// is replaced when it failed or stalled.
fn settle<C: Connect, T>(
    source: &C,
    used: u64,
    result: Result<T, StoreError>,
) -> Result<T, StoreError> {
    if matches!(
        result,
        Err(StoreError::Unreachable(_) | StoreError::Timeout)
    ) {
        source.broken(used);
    }
    result
}

impl<C: Connect> Store for Link<C> {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn lookup(&self, key: &CacheKey) -> StoreFuture<Lookup> {
        let (source, deadline) = (&self.source, self.deadline);
        match key {
            CacheKey::Plain(key) => {
                let (key, lease_ttl, minter) = (key.clone(), self.lease_ttl, self.minter);
                let (source, live) = (source.clone(), source.live());
                Box::pin(async move {
                    on_live(&source, deadline, live, |mut conn, epoch| async move {
                        let (entry, holder) =
                            plain_lookup::<C>(&mut conn, &key, lease_ttl, &minter).await?;
                        let epoch = C::served_by(&conn).unwrap_or(epoch);
                        Ok(looked_up(Vec::new(), entry, epoch).with_lease(holder))
                    })
                    .await
                })
            }
            versioned @ CacheKey::Versioned { .. } => {
                let seen_versions = self.seen_versions.clone();
                // The guess is taken at the call: read again unchanged under
                // the same epoch, the versions were already current then.
                // Boxed with the key, so that the future stays small.
                let mut read =
                    Box::new((versioned.clone(), seen_versions.get(versioned.versions())));
                let (source, live) = (source.clone(), source.live());
                Box::pin(async move {
                    on_live(&source, deadline, live, |mut conn, epoch| async move {
                        let (key, guess) = &mut *read;
                        let (values, guessed_under) = match guess.take() {
                            Some(guess) => (Some(guess.values), guess.epoch),
                            None => (None, None),
                        };
                        let (versions, entry, matched) =
                            versioned_lookup::<C>(&mut conn, values, key).await?;
                        let epoch = C::served_by(&conn).unwrap_or(epoch);
                        let again = matched && guessed_under.as_ref() == Some(&epoch);
                        if !again {
                            seen_versions.remember(key.versions(), &versions, &epoch);
                        }
                        // Within one known epoch a version is never set back
                        // to a value it held before (an unknown epoch may
                        // hide a restart that reloaded older versions).
                        let current_at_call = again && !epoch.is_empty();
                        let lookup = looked_up(versions, entry, epoch);
                        Ok(match current_at_call {
                            true => lookup.with_versions_current_at_call(),
                            false => lookup,
                        })
                    })
                    .await
                })
            }
        }
    }

    fn store(
        &self,
        key: &CacheKey,
        seen: &Lookup,
        value: Bytes,
        ttl: Duration,
    ) -> StoreFuture<bool> {
        let mut invocation = STORE.prepare_invoke();
        match key {
            CacheKey::Plain(key) => {
                // Absent is what an evicted guard looks like: never matched.
                if *seen.entry() == Observed::Absent {
                    return Box::pin(async { Ok(false) });
                }
                let (state, current) = seen_args(seen.entry());
                invocation.key(key).arg("p");
                invocation.arg(state).arg(current);
            }
            CacheKey::Versioned { versions, .. } => {
                // A version the lookup did not read as a value cannot match.
                let Some(seen) = seen.version_values() else {
                    return Box::pin(async { Ok(false) });
                };
                if seen.len() != versions.len() {
                    return Box::pin(async { Ok(false) });
                }
                invocation.arg("v");
                for (version, seen) in versions.iter().zip(&seen) {
                    invocation.key(version.key());
                    invocation.arg(*seen).arg(millis(version.ttl()));
                }
                invocation.key(EntryKey(key, &seen));
            }
        }
        let (source, deadline) = (self.source.clone(), self.deadline);
        let origin = seen.origin().clone();
        Box::pin(async move {
            let cluster = source.is_cluster();
            on_connection(&source, deadline, |mut conn, epoch| async move {
                // On a cluster the value is stamped with the node the lookup
                // read (if the write lands on another, no lookup serves it);
                // on one server, with the connection's epoch.
                let epoch = if cluster { origin.clone() } else { epoch };
                // What the lookup saw belongs to another server lifetime.
                if origin != epoch || origin.as_ref() == batch::SEVERAL_NODES {
                    return Ok(false);
                }
                // The value and TTL go last: the value is stamped with the
                // epoch it was read and written under.
                invocation
                    .arg(stamp(&value, &epoch).as_ref())
                    .arg(millis(ttl));
                let written: i64 = invocation.invoke_async(&mut conn).await.map_err(backend)?;
                Ok(written == 1)
            })
            .await
        })
    }

    /// One script call, or on a cluster one per slot, sent concurrently
    /// (a `CROSSSLOT` refusal teaches a store over a connection it did not
    /// know to be a cluster's to split from then on).
    fn invalidate(&self, invalidation: &Invalidation) -> StoreFuture<()> {
        if invalidation.is_empty() {
            return Box::pin(async { Ok(()) });
        }
        let link = self.clone();
        let invalidation = invalidation.clone();
        Box::pin(async move {
            if link.split.load(std::sync::atomic::Ordering::Relaxed) {
                return link.send_by_slot(&invalidation).await;
            }
            match link.send(invalidation.clone()).await {
                Err(StoreError::Rejected(msg)) if msg.contains("CROSSSLOT") => {
                    link.split.store(true, std::sync::atomic::Ordering::Relaxed);
                    link.send_by_slot(&invalidation.reissued()).await
                }
                other => other,
            }
        })
    }

    fn ping(&self) -> StoreFuture<()> {
        let (source, deadline) = (self.source.clone(), self.deadline);
        Box::pin(async move {
            on_connection(&source, deadline, |mut conn, _| async move {
                let _: String = redis::cmd("PING")
                    .query_async(&mut conn)
                    .await
                    .map_err(backend)?;
                Ok(())
            })
            .await
        })
    }

    fn tombstone_ttl(&self) -> Duration {
        self.tombstone_ttl
    }

    /// A `GET` per key, each on a connection handle of its own (on a
    /// cluster, each key's entry is judged by the node that answered).
    fn peek(&self, keys: &[String]) -> Option<StoreFuture<Vec<Peeked>>> {
        let reads = keys
            .iter()
            .map(|key| {
                let (source, deadline, key) = (self.source.clone(), self.deadline, key.clone());
                Box::pin(async move {
                    on_connection(&source, deadline, |mut conn, epoch| async move {
                        let mut get = redis::cmd("GET");
                        get.arg(&key);
                        let raw: Option<Vec<u8>> =
                            get.query_async(&mut conn).await.map_err(backend)?;
                        let raw = raw.map_or(Observed::Absent, |v| Observed::Value(v.into()));
                        let origin = C::served_by(&conn).unwrap_or(epoch);
                        Ok(Peeked::new(unstamp(&raw, &origin), origin))
                    })
                    .await
                }) as StoreFuture<Peeked>
            })
            .collect();
        Some(Box::pin(async move {
            super::all(reads).await.into_iter().collect()
        }))
    }

    fn parts(&self, invalidation: &Invalidation) -> Option<Vec<Invalidation>> {
        if !self.split.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let parts = invalidation.split_by_slot();
        (parts.len() > 1).then_some(parts)
    }
}

impl<C: Connect> Store for RedisStore<C> {
    fn name(&self) -> &'static str {
        "redis"
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
        self.inner.invalidate(invalidation)
    }

    fn ping(&self) -> StoreFuture<()> {
        self.inner.ping()
    }

    fn parts(&self, invalidation: &Invalidation) -> Option<Vec<Invalidation>> {
        self.inner.parts(invalidation)
    }

    fn peek(&self, keys: &[String]) -> Option<StoreFuture<Vec<Peeked>>> {
        self.inner.peek(keys)
    }

    fn tombstone_ttl(&self) -> Duration {
        self.inner.tombstone_ttl()
    }

    fn longest_entry_life(&self, life: Duration) {
        self.inner.longest_entry_life(life);
    }

    /// The Redis server's clock, as measured on the connection.
    fn clock_offset_ms(&self) -> i64 {
        self.inner.get_ref().source.clock_offset_ms()
    }

    /// Subscribes to the store's channel, when it publishes and knows a
    /// server to subscribe through (feature `tier`; `None` without it).
    fn watch(&self, watcher: crate::store::Watcher) -> Option<crate::store::WatchTask> {
        let link = self.inner.get_ref();
        if link.channel.is_empty() || link.subscribe_via.is_empty() {
            return None;
        }
        let source = link.source.clone();
        let master = std::sync::Arc::new(move || connection::sealed::Source::server(&source));
        subscription::task(
            link.subscribe_via.clone(),
            link.channel.clone(),
            master,
            watcher,
        )
    }

    fn health(&self) -> StoreHealth {
        let mut health = self.inner.health();
        health.persistence = self.inner.get_ref().source.persistence();
        health.degraded = self.inner.get_ref().source.degraded();
        health
    }
}
