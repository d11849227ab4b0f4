//! How a `RedisStore` reaches Redis, and how it knows which server lifetime
//! it talks to.
//!
//! Every command goes over a redis-rs connection: a
//! [`MultiplexedConnection`] made by [`Reconnecting`] (what
//! a URL, a client or Sentinel gives), a cluster connection (`ClusterSource`), or one
//! the user brings. On the first two, the lookups of concurrent requests
//! go out as one pipeline (see `batch.rs`), so many lookups cost Redis one
//! read.
//!
//! [`Reconnecting`] replaces its connection when it breaks. Each connection
//! it makes first reads the server's epoch (`run_id` and `master_replid`)
//! and loads the store's scripts, in one round trip: requests never pay
//! `NOSCRIPT` round trips, and every entry is stamped with the epoch it was
//! written under. A restart that reloads a snapshot, a failover or a full
//! resync changes the epoch, so no entry written before it is served after
//! it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::AsyncConnectionConfig;
use tokio::sync::watch;

use super::batch::Batched;
use super::errors::{backend, refusal};
use super::replicas::{connected_replicas, Replicas};
use super::target::{Standing, Target};

mod upkeep;

#[cfg(feature = "cluster")]
pub(crate) use self::upkeep::EPOCH_CHECK;
use self::upkeep::{check_epochs, measure_clock};
use crate::store::StoreError;

/// What a connection reports about the server it talks to: its `run_id`,
/// empty when unknown.
pub(crate) type Epoch = Bytes;

/// A connection being made: the connection, the server's epoch and the
/// connection's generation.
pub(crate) type Connecting<C> =
    Pin<Box<dyn Future<Output = Result<(C, Epoch, u64), StoreError>> + Send>>;

/// A source of connections for a `RedisStore`: a [`Reconnecting`], a
/// [`ClusterSource`](super::ClusterSource), or any cloneable redis-rs async
/// connection (a `MultiplexedConnection`, a `ConnectionManager`). Only
/// `Reconnecting` knows the server's `run_id`, so only it protects against
/// restarts that reload old data. Sealed: implemented for those types only.
pub trait Connect: sealed::Source {}

impl<T: sealed::Source> Connect for T {}

pub(crate) mod sealed {
    use super::{Connecting, ConnectionLike, Epoch};

    /// What a store needs of its connections; see [`Connect`](super::Connect).
    pub trait Source: Clone + Send + Sync + 'static {
        /// The connection one operation uses.
        type Conn: ConnectionLike + Send + 'static;

        /// A connection, the server's epoch and the connection's generation.
        fn connect(&self) -> Connecting<Self::Conn>;

        /// What [`connect`](Source::connect) gives when a connection is
        /// already up, without a future to box: the path of every operation.
        fn live(&self) -> Option<(Self::Conn, Epoch, u64)> {
            None
        }

        /// The connection of `generation` failed: the next operation gets a
        /// fresh one.
        fn broken(&self, generation: u64) {
            let _ = generation;
        }

        /// The server's persistence, when it could be read: `none`, `rdb`,
        /// `aof` or `rdb+aof`.
        fn persistence(&self) -> Option<&'static str> {
            None
        }

        /// A guarantee the connection cannot keep (a permission missing),
        /// as a sentence for health reports.
        fn degraded(&self) -> Option<&'static str> {
            None
        }

        /// Sends `cmd`, which `conn` may keep rather than copy (a batch
        /// queues it as it is): the path of a hit's one command.
        fn send(conn: &mut Self::Conn, cmd: redis::Cmd) -> redis::RedisFuture<'_, redis::Value> {
            Box::pin(async move { conn.req_packed_command(&cmd).await })
        }

        /// The epoch of the server that answered the commands `conn` sent,
        /// when it is only known from the replies (a cluster's node).
        fn served_by(conn: &Self::Conn) -> Option<Epoch> {
            let _ = conn;
            None
        }

        /// Milliseconds to add to this process's clock to read the
        /// server's, as last measured (`TIME`).
        fn clock_offset_ms(&self) -> i64 {
            0
        }

        /// How many replicas the master holding `slot` has: an
        /// invalidation there counts as applied once they acknowledged it.
        fn replicas(&self, slot: u16) -> usize {
            let _ = slot;
            0
        }

        /// True for a Redis Cluster: multi-key commands must stay in one slot.
        fn is_cluster(&self) -> bool {
            false
        }

        /// The server (`host:port`) the live connection is on, when the
        /// source knows it: where an in-process tier must hear publishes.
        fn server(&self) -> Option<String> {
            None
        }
    }
}

impl<C> sealed::Source for C
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    type Conn = C;

    fn connect(&self) -> Connecting<C> {
        let conn = self.clone();
        Box::pin(async move { Ok((conn, Epoch::new(), 0)) })
    }

    fn live(&self) -> Option<(C, Epoch, u64)> {
        Some((self.clone(), Epoch::new(), 0))
    }
}

/// Commands a multiplexed connection queues before callers wait (redis-rs
/// defaults to 50): every request of a burst on a busy server gets its
/// command queued at once, and they go out together.
const PIPELINE_BUFFER: usize = 1024;

/// Bytes a multiplexed connection encodes before it writes to the socket:
/// a burst of lookups (a hundred bytes each) goes out as one write.
const WRITE_BOUNDARY: usize = 64 * 1024;

/// One multiplexed connection, replaced when it breaks, that reads the
/// server's epoch (`run_id` and `master_replid`) and loads the scripts on
/// every (re)connection, in one round trip: requests never pay `NOSCRIPT`
/// round trips, and entries are stamped with the epoch they were written
/// under, so none written before a restart that reloads old data, a
/// failover or a full resync is served after it. One connection attempt
/// runs at a time. What [`RedisSource::url`](super::RedisSource::url) and Sentinel give.
#[derive(Clone)]
pub struct Reconnecting {
    // One allocation shared by every clone: each operation clones this.
    inner: Arc<Shared>,
}

struct Shared {
    target: Target,
    config: AsyncConnectionConfig,
    live: Mutex<Option<Live>>,
    attempt: Mutex<Attempt>,
    scripts: Vec<String>,
    /// The longest one connection attempt may take, setup included.
    setup_timeout: Duration,
    /// Whether the task that re-reads the epoch runs.
    checking: std::sync::atomic::AtomicBool,
    /// The server's clock against this process's, in milliseconds.
    clock: std::sync::atomic::AtomicI64,
    /// The replicas the master is known to have: what an invalidation
    /// waits for.
    replicas: Mutex<Replicas>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forgets the live connection of `generation`: the next operation makes
/// a new one.
fn drop_live(shared: &Shared, generation: u64) {
    let mut current = lock(&shared.live);
    if current.as_ref().is_some_and(|l| l.generation == generation) {
        *current = None;
    }
}

impl std::fmt::Debug for Reconnecting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconnecting").finish_non_exhaustive()
    }
}

/// After a failed connection attempt, operations fail at once for this
/// long instead of starting another.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// The connection attempt under way, or how the last one failed.
#[derive(Default)]
struct Attempt {
    running: Option<watch::Receiver<Option<Result<(), StoreError>>>>,
    failed: Option<(Instant, StoreError)>,
    generation: u64,
}

#[derive(Clone)]
struct Live {
    conn: Batched<MultiplexedConnection>,
    /// The server it is connected to (`host:port`).
    server: String,
    epoch: Epoch,
    /// Sentinel's failover count for the master, folded into `epoch`.
    failovers: Option<u64>,
    generation: u64,
    persistence: Option<&'static str>,
    /// The guarantee this connection cannot keep, if any.
    degraded: Option<&'static str>,
}

/// The epoch stamped on entries for a server that tells `lifetime`.
fn epoch_of(lifetime: &str) -> Epoch {
    use sha2::Digest;
    Bytes::copy_from_slice(&sha2::Sha256::digest(lifetime.as_bytes())[..EPOCH_LEN])
}

/// The epoch of the server whose `INFO server` and `INFO replication`
/// read `server` and `replication`: its lifetime and its dataset's history,
/// and over Sentinel the `failovers` behind it (see `target.rs`).
/// A restart changes the first, a promotion or a full resync the second,
/// every Sentinel failover the third.
/// Every entry carries it, and every hit reads it back: the first 12 bytes
/// of its SHA-256 stand for the 81 of `run_id.replid`.
fn epoch_from(server: &str, replication: &str, failovers: Option<u64>) -> Epoch {
    let field = |info: &str, name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().to_owned())
    };
    match (
        field(server, "run_id:"),
        field(replication, "master_replid:"),
    ) {
        (Some(run), Some(replid)) => match failovers {
            Some(failovers) => epoch_of(&format!("{run}.{replid}.{failovers}")),
            None => epoch_of(&format!("{run}.{replid}")),
        },
        (Some(run), None) => epoch_of(&run),
        _ => Epoch::new(),
    }
}

/// What a connection without an epoch cannot keep.
pub(crate) const NO_EPOCH: &str = "the Redis user may not run INFO (grant +info): \
    a restart that reloads a snapshot, or a failover, is not detected, so \
    entries written before it may be served after it";

/// Whether the reply to `INFO replication` (second of `replies`) says
/// `role:master`; true when it could not be read (a user denied `INFO`).
fn is_master(replies: &[redis::Value]) -> bool {
    match replies.get(1) {
        Some(redis::Value::BulkString(info)) => {
            String::from_utf8_lossy(info).contains("role:master")
        }
        Some(redis::Value::VerbatimString { text, .. }) => text.contains("role:master"),
        _ => true,
    }
}

/// The epoch in the replies to `INFO server` and `INFO replication`, with
/// Sentinel's `failovers`; `None` when the user may not run `INFO`.
fn read_epoch(
    replies: Vec<redis::Value>,
    failovers: Option<u64>,
) -> Result<Option<Epoch>, StoreError> {
    let mut texts = Vec::with_capacity(2);
    for reply in replies {
        match refusal(Ok(reply)) {
            Ok(reply) => texts.push(
                redis::from_redis_value::<String>(reply)
                    .map_err(|err| StoreError::Backend(err.to_string()))?,
            ),
            Err(err) if err.code() == Some("NOPERM") => return Ok(None),
            Err(err) => return Err(backend(err)),
        }
    }
    match texts.as_slice() {
        [server, replication] => Ok(Some(epoch_from(server, replication, failovers))),
        _ => Err(StoreError::Backend("INFO answered nothing".to_owned())),
    }
}

/// Bytes of an epoch: 96 bits, so two server lifetimes never share one.
const EPOCH_LEN: usize = 12;

/// What `CONFIG GET save` and `CONFIG GET appendonly` say, when the server
/// allows `CONFIG` (managed services often do not).
async fn persistence(conn: &mut MultiplexedConnection) -> Option<&'static str> {
    let mut get = redis::pipe();
    get.cmd("CONFIG").arg("GET").arg("save");
    get.cmd("CONFIG").arg("GET").arg("appendonly");
    let (save, aof): (Vec<String>, Vec<String>) = get.query_async(conn).await.ok()?;
    let rdb = save.get(1).is_some_and(|points| !points.trim().is_empty());
    let aof = aof.get(1).is_some_and(|v| v == "yes");
    Some(match (rdb, aof) {
        (false, false) => "none",
        (true, false) => "rdb",
        (false, true) => "aof",
        (true, true) => "rdb+aof",
    })
}

impl Reconnecting {
    /// Connections to `client`'s server, each attempt bounded by
    /// `connect_timeout`; nothing is connected before the first use.
    pub(crate) fn new(target: Target, connect_timeout: Duration, scripts: Vec<String>) -> Self {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(None)
            .set_pipeline_buffer_size(PIPELINE_BUFFER)
            .set_write_backpressure_boundary(WRITE_BOUNDARY);
        Self {
            inner: Arc::new(Shared {
                target,
                config,
                live: Mutex::default(),
                attempt: Mutex::default(),
                scripts,
                setup_timeout: connect_timeout * 3,
                checking: std::sync::atomic::AtomicBool::new(false),
                clock: std::sync::atomic::AtomicI64::new(0),
                replicas: Mutex::default(),
            }),
        }
    }

    fn current(&self) -> Option<Live> {
        self.inner
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// One connection attempt: connect, read the server's epoch, load the
    /// scripts, read its persistence. A user who may not run `INFO` (Redis's
    /// advice `+@all -@dangerous` denies it) still gets a connection, without
    /// an epoch: see [`NO_EPOCH`].
    async fn establish(&self) -> Result<Live, StoreError> {
        let setup = async {
            let client = self.inner.target.client().await?;
            let server = client.get_connection_info().addr().to_string();
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&self.inner.config)
                .await?;
            let mut setup = redis::pipe();
            setup.ignore_errors();
            setup.cmd("INFO").arg("server");
            setup.cmd("INFO").arg("replication");
            for script in self.inner.scripts.iter() {
                setup.cmd("SCRIPT").arg("LOAD").arg(script);
            }
            let replies: Vec<redis::Value> = setup.query_async(&mut conn).await?;
            Ok::<_, redis::RedisError>((conn, server, replies))
        };
        let (mut conn, server, mut replies) =
            match tokio::time::timeout(self.inner.setup_timeout, setup).await {
                Ok(done) => done.map_err(backend)?,
                Err(_) => return Err(StoreError::Timeout),
            };
        let loads = replies.split_off(2.min(replies.len()));
        for load in loads {
            refusal(Ok(load)).map_err(backend)?;
        }
        if self.inner.target.needs_master() && !is_master(&replies) {
            return Err(StoreError::Unreachable(
                "Sentinel named a server that is not a master (yet)".to_owned(),
            ));
        }
        // Read after the server said it is a master: the count is at least
        // that of its promotion.
        let standing = tokio::time::timeout(
            self.inner.setup_timeout,
            self.inner.target.standing(&server),
        )
        .await;
        let failovers = match standing {
            Ok(Ok(Standing::Master { failovers })) => failovers,
            Ok(Ok(Standing::Replaced)) => {
                return Err(StoreError::Unreachable(
                    "Sentinel no longer names this server its master".to_owned(),
                ))
            }
            Ok(Err(err)) => return Err(backend(err)),
            Err(_) => return Err(StoreError::Timeout),
        };
        let connected = connected_replicas(&replies).unwrap_or(0);
        lock(&self.inner.replicas).read(connected, true);
        let epoch = match read_epoch(replies, failovers)? {
            Some(epoch) => epoch,
            None => {
                tracing::warn!("{NO_EPOCH}");
                Epoch::new()
            }
        };
        let persistence = tokio::time::timeout(self.inner.setup_timeout, persistence(&mut conn))
            .await
            .ok()
            .flatten();
        let clock = tokio::time::timeout(self.inner.setup_timeout, measure_clock(&mut conn))
            .await
            .ok()
            .flatten()
            .unwrap_or(0);
        self.inner.clock.store(clock, Ordering::Relaxed);
        Ok(Live {
            conn: Batched::new(conn, false),
            server,
            generation: 0,
            persistence,
            degraded: epoch.is_empty().then_some(NO_EPOCH),
            epoch,
            failovers,
        })
    }

    /// Runs one attempt and tells every operation waiting on it.
    async fn attempt(self, done: watch::Sender<Option<Result<(), StoreError>>>) {
        let result = self.establish().await;
        let mut attempt = self.inner.attempt.lock().unwrap_or_else(|e| e.into_inner());
        attempt.running = None;
        let outcome = match result {
            Ok(mut live) => {
                attempt.generation += 1;
                attempt.failed = None;
                tracing::debug!(epoch = ?live.epoch, "connected to redis");
                live.generation = attempt.generation;
                *self.inner.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(live);
                if !self.inner.checking.swap(true, Ordering::AcqRel) {
                    tokio::spawn(check_epochs(Arc::downgrade(&self.inner)));
                }
                Ok(())
            }
            Err(err) => {
                attempt.failed = Some((Instant::now(), err.clone()));
                Err(err)
            }
        };
        done.send_replace(Some(outcome));
    }
}

impl sealed::Source for Reconnecting {
    type Conn = Batched<MultiplexedConnection>;

    fn send(conn: &mut Self::Conn, cmd: redis::Cmd) -> redis::RedisFuture<'_, redis::Value> {
        conn.send(cmd)
    }

    /// The live connection; else the attempt under way; else a new attempt,
    /// unless one failed less than [`RETRY_AFTER`] ago. One attempt at a
    /// time, as its own task: an operation that gives up at its deadline
    /// does not cancel it, so a slow link still ends up connected.
    fn connect(&self) -> Connecting<Batched<MultiplexedConnection>> {
        if let Some(live) = self.live() {
            return Box::pin(async move { Ok(live) });
        }
        let mut waiting = {
            let mut attempt = self.inner.attempt.lock().unwrap_or_else(|e| e.into_inner());
            match (&attempt.running, &attempt.failed) {
                (Some(running), _) => running.clone(),
                (None, Some((at, err))) if at.elapsed() < RETRY_AFTER => {
                    let err = err.clone();
                    return Box::pin(async move { Err(err) });
                }
                (None, _) => {
                    let (done, running) = watch::channel(None);
                    attempt.running = Some(running.clone());
                    tokio::spawn(self.clone().attempt(done));
                    running
                }
            }
        };
        let this = self.clone();
        Box::pin(async move {
            let outcome = waiting
                .wait_for(Option::is_some)
                .await
                .map_err(|_| StoreError::Unreachable("connection attempt lost".to_owned()))?
                .clone();
            match outcome {
                Some(Err(err)) => Err(err),
                _ => match this.current() {
                    Some(live) => Ok((live.conn, live.epoch, live.generation)),
                    None => Err(StoreError::Unreachable("connection lost".to_owned())),
                },
            }
        })
    }

    /// What a request needs of the live connection, taken under the lock
    /// without copying the rest (its server's name is a `String`).
    fn live(&self) -> Option<(Batched<MultiplexedConnection>, Epoch, u64)> {
        lock(&self.inner.live)
            .as_ref()
            .map(|live| (live.conn.clone(), live.epoch.clone(), live.generation))
    }

    fn server(&self) -> Option<String> {
        lock(&self.inner.live)
            .as_ref()
            .map(|live| live.server.clone())
    }

    fn persistence(&self) -> Option<&'static str> {
        self.current().and_then(|live| live.persistence)
    }

    fn degraded(&self) -> Option<&'static str> {
        self.current().and_then(|live| live.degraded)
    }

    fn clock_offset_ms(&self) -> i64 {
        self.inner.clock.load(Ordering::Relaxed)
    }

    /// The replicas the master had (see [`Replicas`]).
    fn replicas(&self, _slot: u16) -> usize {
        lock(&self.inner.replicas).expected
    }

    fn broken(&self, generation: u64) {
        let mut live = self.inner.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.as_ref().is_some_and(|l| l.generation == generation) {
            *live = None;
        }
    }
}
