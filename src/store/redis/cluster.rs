//! A `RedisStore` over a Redis Cluster (feature `cluster`).
//!
//! The key layout already puts a version key and every entry under it in
//! one slot, and every script names all its keys, so the store's commands
//! are the same as on one server: an item hit is one `SET … NX GET`, a list
//! hit one `MGET`, a miss's write one script call. Concurrent lookups go
//! out batched, one pipeline per slot, sent to that slot's master.
//!
//! What a cluster adds, so that a failover keeps the one-server guarantee:
//!
//! - **Entries are stamped with the node they were read from.** Each
//!   pipeline ends with `CLUSTER MYID`; a lookup serves an entry only when
//!   the node that answered is the one whose id it carries. A replica that
//!   took over the slot (a failover, even one that lost acknowledged
//!   writes) serves nothing written before it.
//! - **Invalidations are confirmed on replicas.** Each goes out as one
//!   script call per slot, in one pipeline with a `WAIT` for every replica
//!   the cluster lists for that slot's master (read with `CLUSTER SHARDS`
//!   at connection and every second). One that fewer replicas acknowledged
//!   within half its try is reported `invalidation-pending` and replayed
//!   until confirmed.
//!
//! A node keeps its id across a restart: one that restarts from an old
//! snapshot, before its replica took over, is not detected. Run cluster
//! nodes without persistence, or with `appendonly yes`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::Value;
use tokio::sync::OnceCell;

use super::batch::Batched;
use super::connection::sealed::Source;
use super::connection::{Connecting, Epoch};
use super::errors::backend;

/// The connection of a store over a Redis Cluster: one cluster connection
/// (redis-rs `cluster-async`, which follows `MOVED`/`ASK` and reconnects to
/// nodes itself), made on first use. Entries are stamped with the node
/// that answered their lookup (`CLUSTER MYID`, in the lookup's pipeline),
/// so a replica that took over a slot serves none written before; and
/// invalidations wait (`WAIT`) for every replica of the slot's master, or
/// are reported pending and replayed. A node that restarted from an old
/// snapshot is not detected: run cluster nodes without persistence, or
/// with `appendonly yes`.
#[derive(Clone)]
pub struct ClusterSource {
    inner: Arc<Shared>,
}

struct Shared {
    client: ClusterClient,
    conn: OnceCell<Batched<ClusterConnection>>,
    scripts: Vec<String>,
    /// Per slot range, how many replicas its master has: what an
    /// invalidation waits for (`WAIT`) before it counts as applied.
    replicas: RwLock<Vec<Shard>>,
    /// The user may not run `CLUSTER SHARDS`: nothing is waited for.
    shards_denied: std::sync::atomic::AtomicBool,
    /// The clock of the master of slot 0 against this process's, in ms:
    /// every process reads the same node's.
    clock: std::sync::atomic::AtomicI64,
}

/// What a cluster store whose user may not run `CLUSTER SHARDS` cannot keep.
const SHARDS_DENIED: &str = "the Redis user may not run CLUSTER SHARDS (grant \
    +cluster|shards): invalidations are not confirmed on replicas";

/// A slot range and the number of replicas its master has (every replica
/// the cluster does not list as failed, whatever the state of its link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shard {
    first: u16,
    last: u16,
    replicas: usize,
}

impl std::fmt::Debug for ClusterSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSource").finish_non_exhaustive()
    }
}

impl ClusterSource {
    /// Connections through `client`, made on first use.
    pub(crate) fn new(client: ClusterClient) -> Self {
        Self {
            inner: Arc::new(Shared {
                client,
                conn: OnceCell::new(),
                scripts: super::scripts::scripts(),
                replicas: RwLock::default(),
                shards_denied: std::sync::atomic::AtomicBool::new(false),
                clock: std::sync::atomic::AtomicI64::new(0),
            }),
        }
    }
}

impl Source for ClusterSource {
    type Conn = Batched<ClusterConnection>;

    fn send(conn: &mut Self::Conn, cmd: redis::Cmd) -> redis::RedisFuture<'_, redis::Value> {
        conn.send(cmd)
    }

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
                    match read_shards(&mut conn).await {
                        Ok(shards) => {
                            *shared.replicas.write().unwrap_or_else(|e| e.into_inner()) = shards;
                        }
                        Err(err) if err.code() == Some("NOPERM") => {
                            shared.shards_denied.store(true, Ordering::Relaxed);
                            tracing::warn!("{SHARDS_DENIED}");
                        }
                        Err(err) => return Err(err),
                    }
                    if let Some(clock) = measure_cluster_clock(&mut conn).await {
                        shared.clock.store(clock, Ordering::Relaxed);
                    }
                    tokio::spawn(follow_shards(Arc::downgrade(&shared), conn.clone()));
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

    /// The id of the node that answered (`CLUSTER MYID`, in the lookup's
    /// own pipeline): entries are stamped with the node they were read
    /// from, and a node that took over the slot serves none of them.
    fn served_by(conn: &Batched<ClusterConnection>) -> Option<Epoch> {
        conn.served_by()
    }

    fn degraded(&self) -> Option<&'static str> {
        if self.inner.shards_denied.load(Ordering::Relaxed) {
            return Some(SHARDS_DENIED);
        }
        let conn = self.inner.conn.get()?;
        conn.node_denied().then_some(super::batch::NODE_DENIED)
    }

    fn clock_offset_ms(&self) -> i64 {
        self.inner.clock.load(Ordering::Relaxed)
    }

    fn replicas(&self, slot: u16) -> usize {
        let shards = self
            .inner
            .replicas
            .read()
            .unwrap_or_else(|e| e.into_inner());
        shards
            .iter()
            .find(|shard| (shard.first..=shard.last).contains(&slot))
            .map_or(0, |shard| shard.replicas)
    }
}

/// Reads the cluster's shards again every [`EPOCH_CHECK`](super::connection::EPOCH_CHECK) while the
/// store exists: a replica added, lost or promoted changes what an
/// invalidation waits for.
async fn follow_shards(shared: std::sync::Weak<Shared>, mut conn: ClusterConnection) {
    loop {
        tokio::time::sleep(super::connection::EPOCH_CHECK).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let read = tokio::time::timeout(CONNECT_TIMEOUT, read_shards(&mut conn)).await;
        if let Ok(Ok(shards)) = read {
            *shared.replicas.write().unwrap_or_else(|e| e.into_inner()) = shards;
        }
        if let Ok(Some(clock)) =
            tokio::time::timeout(CONNECT_TIMEOUT, measure_cluster_clock(&mut conn)).await
        {
            shared.clock.store(clock, Ordering::Relaxed);
        }
    }
}

/// The clock of the master of slot 0 against this process's (`TIME`
/// there, taken as read halfway through the round trip).
async fn measure_cluster_clock(conn: &mut ClusterConnection) -> Option<i64> {
    use redis::cluster_routing::{Route, SlotAddr};
    let sent = crate::clock::unix_ms() as i64;
    let route = SingleNodeRoutingInfo::SpecificNode(Route::new(0, SlotAddr::Master));
    let reply = conn
        .route_command(redis::cmd("TIME"), RoutingInfo::SingleNode(route))
        .await
        .ok()?;
    let received = crate::clock::unix_ms() as i64;
    let (secs, micros): (i64, i64) = redis::from_redis_value(reply).ok()?;
    Some(secs * 1000 + micros / 1000 - (sent + received) / 2)
}

/// `CLUSTER SHARDS`, as slot ranges and the online replicas of each.
async fn read_shards(conn: &mut ClusterConnection) -> redis::RedisResult<Vec<Shard>> {
    let mut shards_cmd = redis::cmd("CLUSTER");
    shards_cmd.arg("SHARDS");
    let reply = conn
        .route_command(
            shards_cmd,
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await;
    Ok(parse_shards(super::errors::refusal(reply)?))
}

/// The fields of a RESP3 map or of a RESP2 array of name/value pairs.
fn fields(value: Value) -> Vec<(String, Value)> {
    let pairs: Vec<(Value, Value)> = match value {
        Value::Map(pairs) => pairs,
        Value::Array(items) => {
            let mut items = items.into_iter();
            std::iter::from_fn(|| Some((items.next()?, items.next()?))).collect()
        }
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(name, value)| Some((redis::from_redis_value::<String>(name).ok()?, value)))
        .collect()
}

fn parse_shards(reply: Value) -> Vec<Shard> {
    let Value::Array(shards) = reply else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for shard in shards {
        let (mut ranges, mut replicas) = (Vec::new(), 0);
        for (name, value) in fields(shard) {
            match (name.as_str(), value) {
                ("slots", Value::Array(bounds)) => {
                    let bounds: Vec<u16> = bounds
                        .into_iter()
                        .filter_map(|b| redis::from_redis_value(b).ok())
                        .collect();
                    ranges = bounds.chunks_exact(2).map(|b| (b[0], b[1])).collect();
                }
                ("nodes", Value::Array(nodes)) => {
                    replicas = nodes
                        .into_iter()
                        .map(fields)
                        .filter(|node| {
                            let text = |field: &str| {
                                node.iter().find(|(name, _)| name == field).and_then(
                                    |(_, value)| redis::from_redis_value_ref::<String>(value).ok(),
                                )
                            };
                            // `loading` too: a replica that has not
                            // synced yet can still be promoted.
                            text("role").as_deref() == Some("replica")
                                && text("health").as_deref() != Some("fail")
                        })
                        .count();
                }
                _ => {}
            }
        }
        out.extend(ranges.into_iter().map(|(first, last)| Shard {
            first,
            last,
            replicas,
        }));
    }
    out
}

/// How long one connection attempt to a node may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn node(role: &str, health: &str) -> Value {
        Value::Array(vec![
            text("id"),
            text("abc"),
            text("role"),
            text(role),
            text("health"),
            text(health),
        ])
    }

    #[test]
    fn shards_count_every_replica_not_failed() {
        let shard = |slots: Vec<i64>, nodes: Vec<Value>| {
            Value::Array(vec![
                text("slots"),
                Value::Array(slots.into_iter().map(Value::Int).collect()),
                text("nodes"),
                Value::Array(nodes),
            ])
        };
        let reply = Value::Array(vec![
            shard(
                vec![0, 100, 200, 300],
                vec![node("master", "online"), node("replica", "loading")],
            ),
            shard(
                vec![101, 199],
                vec![
                    node("master", "online"),
                    node("replica", "online"),
                    node("replica", "fail"),
                ],
            ),
            shard(vec![301, 16383], vec![node("master", "online")]),
        ]);
        let shards = parse_shards(reply);
        let replicas = |slot: u16| {
            shards
                .iter()
                .find(|s| (s.first..=s.last).contains(&slot))
                .map(|s| s.replicas)
        };
        assert_eq!(replicas(50), Some(1), "a loading replica can be promoted");
        assert_eq!(replicas(250), Some(1));
        assert_eq!(replicas(150), Some(1), "a failed replica is not waited for");
        assert_eq!(replicas(16383), Some(0));
    }
}
