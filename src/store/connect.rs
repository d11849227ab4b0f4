//! How a `RedisStore` reaches Redis, and how it knows which server lifetime
//! it talks to.
//!
//! [`Reconnecting`] (what `RedisStore::open` uses) keeps one multiplexed
//! connection, plus one for lookups (see `wire.rs`), and replaces both when
//! either breaks. Each connection it makes first reads the server's epoch
//! (`run_id` and `master_replid`) and loads the store's scripts, in one
//! round trip: requests never pay `NOSCRIPT` round trips, and every entry is
//! stamped with the epoch it was written under. A restart that reloads a
//! snapshot, a failover or a full resync changes the epoch, so no entry
//! written before it is served after it. The lookup connection reads the
//! epoch too, and is used only when it reads the same one.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Cmd, RedisFuture, Value};
use tokio::sync::watch;

use super::batch::Batched;
use super::wire::{Replied, Reply, Wire};
use super::StoreError;

/// What a connection reports about the server it talks to: its `run_id`,
/// empty when unknown.
pub(crate) type Epoch = Bytes;

pub(crate) type Connecting<C> =
    Pin<Box<dyn Future<Output = Result<(C, Epoch, u64), StoreError>> + Send>>;

/// A source of connections for a `RedisStore`: any cloneable redis-rs async
/// connection (a `MultiplexedConnection`, a `ConnectionManager`, a mock), or
/// [`Reconnecting`]. Only `Reconnecting` knows the server's `run_id`, so
/// only it protects against restarts that reload old data.
pub trait Connect: Clone + Send + Sync + 'static {
    /// The connection one operation uses.
    #[doc(hidden)]
    type Conn: ConnectionLike + Send + 'static;

    /// A connection, the server's epoch and the connection's generation.
    #[doc(hidden)]
    fn connect(&self) -> Connecting<Self::Conn>;

    /// What [`connect`](Connect::connect) gives when a connection is
    /// already up, without a future to box: the path of every operation.
    #[doc(hidden)]
    fn live(&self) -> Option<(Self::Conn, Epoch, u64)> {
        None
    }

    /// Sends one single command, given as its arguments (a lookup's); its
    /// reply. A connection that [keeps deadlines](Connect::keeps_deadlines)
    /// fails it at `until`; others leave that to the operation's timer.
    #[doc(hidden)]
    fn request<'a>(
        conn: &'a mut Self::Conn,
        args: &[&[u8]],
        until: tokio::time::Instant,
    ) -> Requested<'a> {
        let _ = until;
        let cmd = command(args);
        Requested::redis(Box::pin(async move { conn.req_packed_command(&cmd).await }))
    }

    /// True when `conn`'s [`request`](Connect::request)s fail by
    /// themselves at their deadline: a lookup made of them needs no timer
    /// of its own.
    #[doc(hidden)]
    fn keeps_deadlines(conn: &Self::Conn) -> bool {
        let _ = conn;
        false
    }

    /// The connection of `generation` failed: the next operation gets a
    /// fresh one.
    #[doc(hidden)]
    fn broken(&self, generation: u64) {
        let _ = generation;
    }

    /// The server's persistence, when it could be read: `none`, `rdb`,
    /// `aof` or `rdb+aof`.
    #[doc(hidden)]
    fn persistence(&self) -> Option<&'static str> {
        None
    }

    /// True for a Redis Cluster: multi-key commands must stay in one slot.
    #[doc(hidden)]
    fn is_cluster(&self) -> bool {
        false
    }
}

impl<C> Connect for C
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

/// `args` as a redis-rs command.
fn command(args: &[&[u8]]) -> Cmd {
    let size = args.iter().map(|arg| arg.len()).sum();
    let mut cmd = Cmd::with_capacity(args.len(), size);
    for arg in args {
        cmd.arg(*arg);
    }
    cmd
}

/// The reply to one command sent with [`Connect::request`].
#[doc(hidden)]
pub struct Requested<'a>(Sent<'a>);

enum Sent<'a> {
    Wire(Replied),
    Redis(RedisFuture<'a, Value>),
}

impl<'a> Requested<'a> {
    fn redis(sent: RedisFuture<'a, Value>) -> Self {
        Self(Sent::Redis(sent))
    }
}

impl std::fmt::Debug for Requested<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requested").finish_non_exhaustive()
    }
}

impl Future for Requested<'_> {
    type Output = Result<Reply, StoreError>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut self.0 {
            Sent::Wire(replied) => Pin::new(replied).poll(cx),
            Sent::Redis(sent) => sent.as_mut().poll(cx).map(|sent| {
                sent.map_err(super::redis::backend)
                    .and_then(|value| reply_of(value, 0))
            }),
        }
    }
}

/// A redis-rs reply as a [`Reply`] (bulk strings without a copy).
fn reply_of(value: Value, depth: usize) -> Result<Reply, StoreError> {
    Ok(match value {
        Value::Nil => Reply::Nil,
        Value::BulkString(bytes) => Reply::Bulk(Bytes::from(bytes)),
        Value::Int(n) => Reply::Int(n),
        Value::Okay => Reply::Status(Bytes::from_static(b"OK")),
        Value::SimpleString(line) => Reply::Status(Bytes::from(line)),
        Value::Array(items) | Value::Set(items) if depth < 8 => Reply::Array(
            items
                .into_iter()
                .map(|item| reply_of(item, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Value::ServerError(err) => Reply::Error(Bytes::from(match err.details() {
            Some(details) => format!("{} {details}", err.code()),
            None => err.code().to_owned(),
        })),
        other => return Err(StoreError::Backend(format!("unexpected reply {other:?}"))),
    })
}

/// The connection a [`Reconnecting`] store's operations get: the
/// multiplexed connection, its single commands batched, and the wire that
/// lookups take (unless the server is one the wire cannot reach, over
/// TLS).
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct Linked {
    batched: Batched,
    wire: Option<Wire>,
}

impl ConnectionLike for Linked {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.batched.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.batched.req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.batched.get_db()
    }
}

/// The name the wire connection gives itself (`CLIENT LIST` shows it).
pub(crate) const WIRE_NAME: &str = "tower-redis-cache:lookups";

/// One multiplexed connection, replaced when it breaks, that reads the
/// server's epoch (`run_id` and `master_replid`) and loads the scripts on
/// every (re)connection, in one round trip: requests never pay `NOSCRIPT`
/// round trips, and entries are stamped with the epoch they were written
/// under, so none written before a restart that reloads old data, a
/// failover or a full resync is served after it. One connection attempt
/// runs at a time. What [`RedisStore::open`](super::RedisStore::open) uses.
///
/// Lookups (the one command of a hit) take a second connection to the same
/// server, named `tower-redis-cache:lookups` in `CLIENT LIST`: a minimal
/// RESP2 client that writes the commands of concurrent requests as one
/// buffer and reads replies without copying them. It authenticates and
/// selects the database as the URL says, reads the server's epoch itself,
/// and is used only when that epoch is the multiplexed connection's; both
/// are replaced together. Over TLS (`rediss://`) lookups take the
/// multiplexed connection, their single commands batched.
#[derive(Clone)]
pub struct Reconnecting {
    // One allocation shared by every clone: each operation clones this.
    inner: Arc<Shared>,
}

struct Shared {
    client: redis::Client,
    config: AsyncConnectionConfig,
    live: Mutex<Option<Live>>,
    attempt: Mutex<Attempt>,
    scripts: Vec<String>,
    /// The longest one connection attempt may take, setup included.
    setup_timeout: Duration,
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
    conn: Linked,
    epoch: Epoch,
    generation: u64,
    persistence: Option<&'static str>,
}

/// The epoch stamped on entries for a server that tells `lifetime`.
fn epoch_of(lifetime: &str) -> Epoch {
    use sha2::Digest;
    Bytes::copy_from_slice(&sha2::Sha256::digest(lifetime.as_bytes())[..EPOCH_LEN])
}

/// The epoch of the server whose `INFO server` and `INFO replication`
/// read `server` and `replication`: its lifetime and its dataset's history.
/// A restart changes the first, a promotion or a full resync the second.
/// Every entry carries it, and every hit reads it back: the first 12 bytes
/// of its SHA-256 stand for the 81 of `run_id.replid`.
fn epoch_from(server: &str, replication: &str) -> Epoch {
    let field = |info: &str, name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().to_owned())
    };
    match (
        field(server, "run_id:"),
        field(replication, "master_replid:"),
    ) {
        (Some(run), Some(replid)) => epoch_of(&format!("{run}.{replid}")),
        (Some(run), None) => epoch_of(&run),
        _ => Epoch::new(),
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
    pub(crate) fn new(
        client: redis::Client,
        connect_timeout: Duration,
        scripts: Vec<String>,
    ) -> Self {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(None);
        Self {
            inner: Arc::new(Shared {
                client,
                config,
                live: Mutex::default(),
                attempt: Mutex::default(),
                scripts,
                setup_timeout: connect_timeout * 3,
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
}

impl Reconnecting {
    /// One connection attempt: connect, read the server's epoch, load the
    /// scripts, read its persistence.
    async fn establish(&self) -> Result<(Linked, Epoch, Option<&'static str>), StoreError> {
        let setup = async {
            let mut conn = self
                .inner
                .client
                .get_multiplexed_async_connection_with_config(&self.inner.config)
                .await?;
            let mut setup = redis::pipe();
            setup.cmd("INFO").arg("server");
            setup.cmd("INFO").arg("replication");
            for script in self.inner.scripts.iter() {
                setup.cmd("SCRIPT").arg("LOAD").arg(script).ignore();
            }
            let (server, replication): (String, String) = setup.query_async(&mut conn).await?;
            Ok::<_, redis::RedisError>((conn, server, replication))
        };
        let (mut conn, server, replication) =
            match tokio::time::timeout(self.inner.setup_timeout, setup).await {
                Ok(done) => done.map_err(super::redis::backend)?,
                Err(_) => return Err(StoreError::Timeout),
            };
        let epoch = epoch_from(&server, &replication);
        let persistence = tokio::time::timeout(self.inner.setup_timeout, persistence(&mut conn))
            .await
            .ok()
            .flatten();
        let wire = self.wire(&epoch).await;
        let conn = Linked {
            batched: Batched::new(conn),
            wire,
        };
        Ok((conn, epoch, persistence))
    }

    /// The wire for lookups, when the server can be reached with one and
    /// is the one the multiplexed connection reads `epoch` from (a restart
    /// in between would mix two lifetimes). Without it, lookups take the
    /// multiplexed connection: slower, as correct.
    async fn wire(&self, epoch: &Epoch) -> Option<Wire> {
        let info = self.inner.client.get_connection_info();
        let opened = tokio::time::timeout(self.inner.setup_timeout, Wire::open(info, WIRE_NAME));
        let (wire, server, replication) = match opened.await {
            Ok(Some(Ok(opened))) => opened,
            Ok(None) => return None,
            Ok(Some(Err(err))) => {
                tracing::warn!(error = %err, "lookups take the multiplexed connection: their own failed to open");
                return None;
            }
            Err(_) => {
                tracing::warn!(
                    "lookups take the multiplexed connection: their own timed out opening"
                );
                return None;
            }
        };
        // An unknown epoch proves nothing: behind a proxy or a round-robin
        // name the two connections could reach two servers.
        if epoch.is_empty() || epoch_from(&server, &replication) != *epoch {
            tracing::debug!(
                "the server changed while connecting: lookups take the multiplexed connection"
            );
            return None;
        }
        Some(wire)
    }

    /// Runs one attempt and tells every operation waiting on it.
    async fn attempt(self, done: watch::Sender<Option<Result<(), StoreError>>>) {
        let result = self.establish().await;
        let mut attempt = self.inner.attempt.lock().unwrap_or_else(|e| e.into_inner());
        attempt.running = None;
        let outcome = match result {
            Ok((conn, epoch, persistence)) => {
                attempt.generation += 1;
                attempt.failed = None;
                tracing::debug!(epoch = ?epoch, "connected to redis");
                *self.inner.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(Live {
                    conn,
                    epoch,
                    generation: attempt.generation,
                    persistence,
                });
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

impl Connect for Reconnecting {
    type Conn = Linked;

    /// The live connection; else the attempt under way; else a new attempt,
    /// unless one failed less than [`RETRY_AFTER`] ago. One attempt at a
    /// time, as its own task: an operation that gives up at its deadline
    /// does not cancel it, so a slow link still ends up connected.
    fn connect(&self) -> Connecting<Linked> {
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

    fn live(&self) -> Option<(Linked, Epoch, u64)> {
        self.current()
            .map(|live| (live.conn, live.epoch, live.generation))
    }

    fn request<'a>(
        conn: &'a mut Linked,
        args: &[&[u8]],
        until: tokio::time::Instant,
    ) -> Requested<'a> {
        match &conn.wire {
            Some(wire) => Requested(Sent::Wire(wire.send(args, Some(until)))),
            None => Requested::redis(conn.batched.send(command(args))),
        }
    }

    fn keeps_deadlines(conn: &Linked) -> bool {
        conn.wire.is_some()
    }

    fn persistence(&self) -> Option<&'static str> {
        self.current().and_then(|live| live.persistence)
    }

    fn broken(&self, generation: u64) {
        let mut live = self.inner.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.as_ref().is_some_and(|l| l.generation == generation) {
            *live = None;
        }
    }
}
