//! A `RedisStore` over a Redis Cluster (feature `cluster`).
//!
//! The key layout already puts a version key and every entry under it in
//! one slot, and every script names all its keys, so the store's commands
//! are the same as on one server: an item hit is one `SET … NX GET`, a list
//! hit one `MGET`, a miss's write one script call. Concurrent lookups go
//! out batched, one pipeline per slot. Only invalidations
//! differ: one script call per slot their keys fall in, sent concurrently.

use std::sync::Arc;
use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use tokio::sync::OnceCell;

use super::batch::Batched;
use super::connection::sealed::Source;
use super::connection::{Connecting, Epoch};
use super::errors::backend;
use super::{RedisStore, DEFAULT_WRITE_DEADLINE};
use crate::store::StoreError;

/// The connection of a store over a Redis Cluster: one cluster connection
/// (redis-rs `cluster-async`, which follows `MOVED`/`ASK` and reconnects to
/// nodes itself), made on first use. Clusters do not tell one epoch, so
/// unlike [`Reconnecting`](super::Reconnecting) it cannot detect a node that
/// restarted from an old snapshot: run cluster nodes without persistence,
/// or with `appendonly yes`.
#[derive(Clone)]
pub struct ClusterSource {
    inner: Arc<Shared>,
}

struct Shared {
    client: ClusterClient,
    conn: OnceCell<Batched<ClusterConnection>>,
    scripts: Vec<String>,
}

impl std::fmt::Debug for ClusterSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSource").finish_non_exhaustive()
    }
}

impl ClusterSource {
    /// Connections through `client`, made on first use.
    pub fn new(client: ClusterClient) -> Self {
        Self {
            inner: Arc::new(Shared {
                client,
                conn: OnceCell::new(),
                scripts: super::scripts::scripts(),
            }),
        }
    }
}

impl Source for ClusterSource {
    type Conn = Batched<ClusterConnection>;

    fn connect(&self) -> Connecting<Batched<ClusterConnection>> {
        let shared = self.inner.clone();
        Box::pin(async move {
            let conn = shared
                .conn
                .get_or_try_init(|| async {
                    let mut conn = shared.client.get_async_connection().await?;
                    // On every master, so requests never pay a NOSCRIPT
                    // round trip (a restarted node still may, once).
                    for script in &shared.scripts {
                        let _: redis::Value = redis::cmd("SCRIPT")
                            .arg("LOAD")
                            .arg(script)
                            .query_async(&mut conn)
                            .await?;
                    }
                    // Lookups batched, one pipeline per slot.
                    Ok::<_, redis::RedisError>(Batched::new(conn, true))
                })
                .await
                .map_err(backend)?;
            Ok((conn.clone(), Epoch::new(), 0))
        })
    }

    fn live(&self) -> Option<(Batched<ClusterConnection>, Epoch, u64)> {
        let conn = self.inner.conn.get()?;
        Some((conn.clone(), Epoch::new(), 0))
    }

    fn is_cluster(&self) -> bool {
        true
    }
}

/// How long one connection attempt to a node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl RedisStore<ClusterSource> {
    /// A store over the Redis Cluster that `seeds` (`redis://host:port`
    /// URLs of some of its nodes, with credentials if any) belong to. The
    /// cluster client is tuned to the store's deadlines: at most 2 retries,
    /// 5 to 25 ms apart (redis-rs would otherwise wait from about a second,
    /// longer than any request should wait for a cache), 1 s to connect to
    /// a node, and a response timeout of half the write budget; every
    /// operation is still bounded by the store's own deadline. Nothing is connected before first
    /// use; see [`RedisStore::cluster_connect`] to fail fast at start-up.
    ///
    /// ```no_run
    /// use tower_redis_cache::store::RedisStore;
    ///
    /// let store = RedisStore::cluster(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])?;
    /// # Ok::<(), tower_redis_cache::store::StoreError>(())
    /// ```
    pub fn cluster<I, S>(seeds: I) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let seeds: Vec<String> = seeds.into_iter().map(|s| s.as_ref().to_owned()).collect();
        let client = ClusterClient::builder(seeds.clone())
            .retries(2)
            .min_retry_wait(5)
            .max_retry_wait(25)
            .connection_timeout(CONNECT_TIMEOUT)
            // Each operation has the store's own deadline (reads 100 ms,
            // invalidations 1 s in two tries); the client's must not cut a
            // write's try short.
            .response_timeout(DEFAULT_WRITE_DEADLINE / 2)
            .build()
            .map_err(backend)?;
        // Messages published on one node reach every node's subscribers.
        let nodes = seeds
            .iter()
            .filter_map(|seed| redis::Client::open(seed.as_str()).ok());
        Ok(Self::from_cluster_client(client).subscribe_via(nodes.collect::<Vec<_>>()))
    }

    /// A store over a cluster client you built (TLS, ACL user, read
    /// routing…). Keep its retries and timeouts within the store's
    /// deadline (see [`RedisStore::cluster`]).
    pub fn from_cluster_client(client: ClusterClient) -> Self {
        Self::new(ClusterSource::new(client))
    }

    /// Like [`RedisStore::cluster`], then connects and pings, so that a
    /// wrong seed, password or permission fails at start-up with the reason.
    pub async fn cluster_connect<I, S>(seeds: I) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let store = Self::cluster(seeds)?;
        store.connected().await?;
        Ok(store)
    }
}
