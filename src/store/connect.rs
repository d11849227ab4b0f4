//! How a `RedisStore` reaches Redis, and how it knows which server lifetime
//! it talks to.
//!
//! [`Reconnecting`] (what `RedisStore::open` uses) keeps one multiplexed
//! connection and replaces it when it breaks. Each connection it makes first
//! reads the server's `run_id` and loads the store's scripts, in one round
//! trip: requests never pay `NOSCRIPT` round trips, and every entry is
//! stamped with the `run_id` of the connection that wrote it. A restart that
//! reloads a snapshot, or a failover to a replica, changes the `run_id`, so
//! no entry written before it is served after it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::AsyncConnectionConfig;

use super::StoreError;

/// What a connection reports about the server it talks to: its `run_id`,
/// empty when unknown.
pub(crate) type Epoch = Bytes;

type Connecting<C> = Pin<Box<dyn Future<Output = Result<(C, Epoch, u64), StoreError>> + Send>>;

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
}

/// One multiplexed connection, replaced when it breaks, that reads the
/// server's `run_id` and loads the scripts on every (re)connection, in one
/// round trip: requests never pay `NOSCRIPT` round trips, and entries are
/// stamped with the `run_id` of the connection that wrote them, so none
/// written before a restart that reloads old data (or a failover) is served
/// after it. What [`RedisStore::open`](super::RedisStore::open) uses.
#[derive(Clone)]
pub struct Reconnecting {
    client: redis::Client,
    config: AsyncConnectionConfig,
    live: Arc<Mutex<Option<Live>>>,
    /// One connection attempt at a time.
    connecting: Arc<tokio::sync::Mutex<u64>>,
    scripts: Arc<[String]>,
    /// The longest one connection attempt may take, setup included.
    setup_timeout: Duration,
}

impl std::fmt::Debug for Reconnecting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconnecting").finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Live {
    conn: MultiplexedConnection,
    epoch: Epoch,
    generation: u64,
    persistence: Option<&'static str>,
}

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
            client,
            config,
            live: Arc::default(),
            connecting: Arc::default(),
            scripts: scripts.into(),
            setup_timeout: connect_timeout * 3,
        }
    }

    fn current(&self) -> Option<Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Reconnecting {
    /// One connection attempt: connect, read `run_id`, load the scripts.
    /// Attempts queue behind each other; one that finds a connection made
    /// meanwhile uses it.
    async fn establish(self) -> Result<(MultiplexedConnection, Epoch, u64), StoreError> {
        let mut generation = self.connecting.lock().await;
        if let Some(live) = self.current() {
            return Ok((live.conn, live.epoch, live.generation));
        }
        let setup = async {
            let mut conn = self
                .client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await?;
            let mut setup = redis::pipe();
            setup.cmd("INFO").arg("server");
            for script in self.scripts.iter() {
                setup.cmd("SCRIPT").arg("LOAD").arg(script).ignore();
            }
            let (info,): (String,) = setup.query_async(&mut conn).await?;
            Ok::<_, redis::RedisError>((conn, info))
        };
        let (mut conn, info) = match tokio::time::timeout(self.setup_timeout, setup).await {
            Ok(done) => done.map_err(super::redis::backend)?,
            Err(_) => return Err(StoreError::Timeout),
        };
        let epoch = info
            .lines()
            .find_map(|line| line.strip_prefix("run_id:"))
            .map(|id| Bytes::copy_from_slice(id.trim().as_bytes()))
            .unwrap_or_default();
        let persistence = tokio::time::timeout(self.setup_timeout, persistence(&mut conn))
            .await
            .ok()
            .flatten();
        *generation += 1;
        let live = Live {
            conn: conn.clone(),
            epoch: epoch.clone(),
            generation: *generation,
            persistence,
        };
        *self.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(live);
        tracing::debug!(run_id = %String::from_utf8_lossy(&epoch), "connected to redis");
        Ok((conn, epoch, *generation))
    }
}

impl Connect for Reconnecting {
    type Conn = MultiplexedConnection;

    fn connect(&self) -> Connecting<MultiplexedConnection> {
        if let Some(live) = self.current() {
            return Box::pin(async move { Ok((live.conn, live.epoch, live.generation)) });
        }
        // The attempt runs as its own task: an operation that gives up at
        // its deadline does not cancel it, so a slow link still ends up
        // connected for the next one.
        let attempt = tokio::spawn(self.clone().establish());
        Box::pin(async move {
            attempt
                .await
                .unwrap_or_else(|err| Err(StoreError::Unreachable(err.to_string())))
        })
    }

    fn persistence(&self) -> Option<&'static str> {
        self.current().and_then(|live| live.persistence)
    }

    fn broken(&self, generation: u64) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.as_ref().is_some_and(|l| l.generation == generation) {
            *live = None;
        }
    }
}
