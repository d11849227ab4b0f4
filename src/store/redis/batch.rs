//! Lookups of concurrent requests, sent to Redis as one pipeline.
//!
//! Every request on a hot route sends one command. Sent one by one, each is
//! a message to the connection's driver and, when the driver runs between
//! two of them, a write of its own: Redis then wakes, reads and answers a
//! few commands at a time, and that per-batch cost (system calls, context
//! switches on a loaded machine) dominates a hit. [`Batched`] queues the
//! single commands of a connection; the first command of a batch spawns
//! a flush. While an earlier batch is still out, the flush first yields, so
//! that every request the runtime is about to poll queues its command too;
//! then it sends the whole queue as one pipeline (one write, one read in
//! Redis) and hands each request its own reply. A command still costs its
//! request exactly one round trip: nothing waits for a batch to fill, an
//! idle connection sends at once, and a flush never waits for an earlier
//! one. A batch keeps the order its commands were queued in; batches
//! flushed at the same moment on two threads may pass each other, which
//! no request can see: a request queues its next command only once the
//! previous one answered.
//!
//! redis-rs's multiplexed connection already writes concurrent commands
//! together, but each still travels alone to its driver task (a message,
//! a wake-up, a packing); a batch travels as one. Measured through the
//! layer, single-node hits went 1.04x to 1.14x tower-http-cache's Redis
//! backend with it (`scripts/peer-bench/ab`, 8 rounds).
//!
//! On a cluster a pipeline must stay in one slot: a batch goes out as one
//! pipeline per slot its commands name, all at once.
//!
//! The store's upkeep (the server's epoch, clock and replica count, read
//! again every second) rides: [`Batched::ride`] hands its commands to the
//! next batch or pipeline that goes out anyway, and sends them on their
//! own only when none does within its wait (an idle connection, where no
//! request is there to wait behind them). Sequential requests then cost
//! one round trip each, upkeep included.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionLike;
use redis::{Arg, Cmd, RedisError, RedisFuture, Value};
use tokio::sync::oneshot;

/// The longest a flushed batch waits for Redis, longer than any
/// operation's deadline (each still gives up at its own): a batch sent to
/// a server that never answers does not hold its connection forever.
const BATCH_BUDGET: Duration = Duration::from_secs(10);

/// A connection whose single commands are sent in batches (pipelines go
/// out as they are). Cheap to clone: clones share the queue. The
/// connection of [`Reconnecting`](super::Reconnecting) and
/// [`ClusterSource`](super::ClusterSource) stores. Public only as the
/// sealed `Connect` trait's associated type: no path outside the crate
/// names it.
#[allow(unreachable_pub)]
pub struct Batched<C> {
    shared: Arc<Shared<C>>,
    /// On a cluster, the node that answered this handle's commands.
    served_by: Option<Arc<Mutex<ServedBy>>>,
}

/// Which cluster node answered the commands of one handle.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
enum ServedBy {
    #[default]
    Nobody,
    Node(Bytes),
    /// Two nodes (a failover between two commands): nothing read may be
    /// served.
    Several,
}

/// A clone is a new handle on the same connection and queue, for one
/// operation: it tells which node answered its own commands only.
impl<C> Clone for Batched<C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            served_by: self.shared.by_slot.then(Arc::default),
        }
    }
}

struct Shared<C> {
    conn: C,
    /// A cluster's: each batch goes out as one pipeline per slot.
    by_slot: bool,
    /// Batches sent and not answered yet.
    in_flight: AtomicUsize,
    /// The user may not run `CLUSTER MYID`: replies carry no node.
    node_denied: std::sync::atomic::AtomicBool,
    queue: Mutex<Vec<Queued>>,
    /// Commands that go out with the next batch or pipeline, never one of
    /// their own (see [`Batched::ride`]); one server's connection only.
    rider: Mutex<Option<Rider>>,
}

/// Commands riding with the next batch, and where their replies go.
struct Rider {
    cmds: Vec<Cmd>,
    reply: oneshot::Sender<Result<Carried, RedisError>>,
}

/// A rider's replies, with when the pipeline that carried them went out
/// and when its replies were read (Unix milliseconds, this process's
/// clock): `TIME` among them is read as taken halfway between.
pub(crate) struct Carried {
    pub(crate) values: Vec<Value>,
    pub(crate) sent_ms: i64,
    pub(crate) received_ms: i64,
}

/// A command waiting for the next flush, with where its reply goes (and,
/// on a cluster, the id of the node that answered it).
struct Queued {
    cmd: Cmd,
    reply: oneshot::Sender<Result<(Value, Option<Bytes>), RedisError>>,
}

impl<C> std::fmt::Debug for Batched<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batched").finish_non_exhaustive()
    }
}

impl<C> Batched<C> {
    /// Batches over `conn`; `by_slot` for a cluster connection.
    pub(crate) fn new(conn: C, by_slot: bool) -> Self {
        Self {
            shared: Arc::new(Shared {
                conn,
                by_slot,
                in_flight: AtomicUsize::new(0),
                node_denied: std::sync::atomic::AtomicBool::new(false),
                queue: Mutex::new(Vec::new()),
                rider: Mutex::new(None),
            }),
            served_by: by_slot.then(Arc::default),
        }
    }

    /// On a cluster, the id of the node that answered every command sent
    /// through this handle (`CLUSTER MYID`, asked in the same pipeline);
    /// [`SEVERAL_NODES`] when they came from different nodes; `None`
    /// before any answer, and on one server.
    /// True once the user was refused `CLUSTER MYID`.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn node_denied(&self) -> bool {
        self.shared.node_denied.load(Ordering::Relaxed)
    }

    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn served_by(&self) -> Option<Bytes> {
        let served_by = self.served_by.as_ref()?;
        match &*served_by.lock().unwrap_or_else(|e| e.into_inner()) {
            ServedBy::Nobody => None,
            ServedBy::Node(id) => Some(id.clone()),
            ServedBy::Several => Some(Bytes::from_static(SEVERAL_NODES)),
        }
    }
}

/// What a cluster store whose user may not run `CLUSTER MYID` cannot keep.
pub(crate) const NODE_DENIED: &str = "the Redis user may not run CLUSTER MYID (grant \
    +cluster|myid): entries are not tied to the node that holds them, so a failover \
    that loses a write's purge may serve pre-write entries";

/// What [`Batched::served_by`] tells when commands of one handle were
/// answered by different nodes: no node has this id, so nothing read is
/// served and nothing is written.
pub(crate) const SEVERAL_NODES: &[u8] = b"several nodes";

impl<C> Shared<C> {
    fn queue(&self) -> MutexGuard<'_, Vec<Queued>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The rider waiting for a pipeline, taken (one server only).
    fn take_rider(&self) -> Option<Rider> {
        if self.by_slot {
            return None;
        }
        self.rider.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Appends `rider`'s commands to `pipe`.
fn board(pipe: &mut redis::Pipeline, rider: &Option<Rider>) {
    for cmd in rider.iter().flat_map(|rider| &rider.cmds) {
        pipe.add_command(cmd.clone());
    }
}

/// Hands a rider the replies after `own` in `answered`, the pipeline's
/// outcome; what is left is the pipeline's own.
fn alight(
    rider: Option<Rider>,
    answered: &mut Result<Vec<Value>, RedisError>,
    own: usize,
    sent_ms: i64,
) {
    let Some(Rider { reply, .. }) = rider else {
        return;
    };
    let carried = match answered {
        Ok(values) if values.len() > own => Ok(Carried {
            values: values.split_off(own),
            sent_ms,
            received_ms: crate::clock::unix_ms() as i64,
        }),
        Ok(_) => Err(RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "pipeline answered with the wrong number of replies",
        ))),
        Err(err) => Err(err.clone()),
    };
    let _ = reply.send(carried);
}

/// Sends what is queued and answers each. While an earlier batch is
/// still out, it first lets the requests already runnable queue theirs:
/// Redis is busy anyway, and they go out together. An idle connection
/// sends at once.
async fn flush<C: Pipelines>(shared: Arc<Shared<C>>) {
    if shared.in_flight.load(Ordering::Relaxed) > 0 {
        tokio::task::yield_now().await;
    }
    // Drained in place: the queue keeps its capacity for the next batch.
    let queued: Vec<Queued> = shared.queue().drain(..).collect();
    if queued.is_empty() {
        return;
    }
    if !shared.by_slot {
        return send(&shared, queued, None).await;
    }
    // One pipeline per slot, in the order each slot first appears (a
    // command whose slot is not read here goes alone, routed by redis-rs);
    // all but the first go out from tasks of their own, at once.
    let mut groups: Vec<(Option<u16>, Vec<Queued>)> = Vec::new();
    for command in queued {
        let slot = slot_of(&command.cmd);
        match groups
            .iter_mut()
            .find(|(s, _)| slot.is_some() && *s == slot)
        {
            Some((_, group)) => group.push(command),
            None => groups.push((slot, vec![command])),
        }
    }
    // A group in one slot also asks which node answers it.
    let mut groups = groups.into_iter();
    let first = groups.next();
    for (slot, group) in groups {
        let shared = shared.clone();
        tokio::spawn(async move { send(&shared, group, slot).await });
    }
    if let Some((slot, group)) = first {
        send(&shared, group, slot).await;
    }
}

/// The cluster slot of a command's first key: the second argument of the
/// store's key commands (`SET`, `GET`, `MGET`), the fourth of a script
/// call (`EVALSHA sha numkeys key…`). `None` for anything else.
fn slot_of(cmd: &Cmd) -> Option<u16> {
    let mut args = cmd.args_iter().map(|arg| match arg {
        Arg::Simple(bytes) => bytes,
        _ => &[][..],
    });
    let name = args.next()?;
    let key = if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL") {
        let numkeys = args.nth(1)?;
        if numkeys == b"0" {
            return None;
        }
        args.next()?
    } else if [&b"SET"[..], b"GET", b"MGET"]
        .iter()
        .any(|known| name.eq_ignore_ascii_case(known))
    {
        args.next()?
    } else {
        return None;
    };
    Some(crate::store::slot(key))
}

/// Sends `queued` as one pipeline and hands each command its reply. On a
/// cluster, a group in one `slot` goes to that slot's master and ends with
/// `CLUSTER MYID`, and each reply carries the id of the node that answered.
async fn send<C: Pipelines>(shared: &Shared<C>, queued: Vec<Queued>, slot: Option<u16>) {
    let ask_node = slot.is_some();
    let mut pipe = redis::Pipeline::with_capacity(queued.len() + 1);
    let mut replies = Vec::with_capacity(queued.len());
    for Queued { cmd, reply } in queued {
        pipe.add_command(cmd);
        replies.push(reply);
    }
    if ask_node {
        pipe.cmd("CLUSTER").arg("MYID");
    }
    let rider = shared.take_rider();
    board(&mut pipe, &rider);
    let own = replies.len() + usize::from(ask_node);
    let expected = own + rider.as_ref().map_or(0, |rider| rider.cmds.len());
    let sent_ms = crate::clock::unix_ms() as i64;
    // No lock is held while Redis answers: the next batch may go out
    // meanwhile.
    let mut conn = shared.conn.clone();
    let answered = {
        let _out = InFlight::new(&shared.in_flight);
        let sent = conn.send_pipeline(&pipe, expected, slot);
        match tokio::time::timeout(BATCH_BUDGET, sent).await {
            Ok(Ok(values)) if values.len() != expected => Err(RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "pipeline answered with the wrong number of replies",
            ))),
            Ok(answered) => answered,
            Err(_) => Err(io_error(std::io::ErrorKind::TimedOut)),
        }
    };
    let mut answered = answered;
    alight(rider, &mut answered, own, sent_ms);
    match answered {
        Ok(mut values) => {
            let node = if ask_node {
                match values.pop() {
                    Some(Value::BulkString(id)) => Some(Bytes::from(id)),
                    Some(Value::SimpleString(id)) => Some(Bytes::from(id)),
                    // A user who may not ask: entries go unstamped, as
                    // before node stamps (see `node_denied`).
                    Some(Value::ServerError(err)) if err.code() == "NOPERM" => {
                        if !shared.node_denied.swap(true, Ordering::Relaxed) {
                            tracing::warn!("{NODE_DENIED}");
                        }
                        None
                    }
                    // Not told: no node, so nothing read is served.
                    _ => Some(Bytes::from_static(SEVERAL_NODES)),
                }
            } else {
                None
            };
            for (reply, value) in replies.into_iter().zip(values) {
                let _ = reply.send(Ok((value, node.clone())));
            }
        }
        Err(err) => {
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

/// How a batch goes out: over one server's connection as it is, or over a
/// cluster's to the master of the batch's slot. Public only as a bound
/// of [`Batched`]'s: no path outside the crate names it.
#[allow(unreachable_pub)]
pub trait Pipelines: ConnectionLike + Clone + Send + Sync + 'static {
    /// Sends `pipe`, whose commands all name keys in `slot` (when known),
    /// and reads its `count` replies.
    fn send_pipeline<'a>(
        &'a mut self,
        pipe: &'a redis::Pipeline,
        count: usize,
        slot: Option<u16>,
    ) -> RedisFuture<'a, Vec<Value>> {
        let _ = slot;
        self.req_packed_commands(pipe, 0, count)
    }
}

impl Pipelines for redis::aio::MultiplexedConnection {}

/// Routed by hand: redis-rs would route `CLUSTER MYID` by its subcommand's
/// name, as if it were a key.
#[cfg(feature = "cluster")]
impl Pipelines for redis::cluster_async::ClusterConnection {
    fn send_pipeline<'a>(
        &'a mut self,
        pipe: &'a redis::Pipeline,
        count: usize,
        slot: Option<u16>,
    ) -> RedisFuture<'a, Vec<Value>> {
        use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
        match slot {
            Some(slot) => Box::pin(self.route_pipeline(
                pipe.clone(),
                0,
                count,
                SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master)),
            )),
            None => self.req_packed_commands(pipe, 0, count),
        }
    }
}

/// An I/O error of `kind`, which the store reads as "unreachable" (the
/// connection is then replaced).
fn io_error(kind: std::io::ErrorKind) -> RedisError {
    RedisError::from(std::io::Error::from(kind))
}

/// Counts a batch as out until dropped (answered, timed out, or the
/// runtime shut down under it).
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<C: Pipelines> Batched<C> {
    /// Queues `cmd` for the next flush; its reply.
    pub(crate) fn send(&self, cmd: Cmd) -> RedisFuture<'static, Value> {
        let (reply, answer) = oneshot::channel();
        let first = {
            let mut queue = self.shared.queue();
            queue.push(Queued { cmd, reply });
            queue.len() == 1
        };
        if first {
            tokio::spawn(flush(self.shared.clone()));
        }
        let served_by = self.served_by.clone();
        Box::pin(async move {
            let (value, node) = answer
                .await
                .unwrap_or_else(|_| Err(io_error(std::io::ErrorKind::BrokenPipe)))?;
            if let (Some(node), Some(served_by)) = (node, served_by) {
                let mut served = served_by.lock().unwrap_or_else(|e| e.into_inner());
                *served = match &*served {
                    ServedBy::Nobody => ServedBy::Node(node),
                    ServedBy::Node(id) if *id == node => ServedBy::Node(node),
                    _ => ServedBy::Several,
                };
            }
            Ok(value)
        })
    }
}

impl<C: Pipelines> Batched<C> {
    /// Sends `cmds` with the next batch or pipeline that goes out on this
    /// connection; when none does within `wait`, on their own. Their
    /// replies, with the carrying pipeline's times. For the store's
    /// upkeep, one rider at a time (a newer one replaces the older, whose
    /// caller gets an error); on one server's connection only.
    pub(crate) async fn ride(&self, cmds: Vec<Cmd>, wait: Duration) -> Result<Carried, RedisError> {
        let (reply, mut answer) = oneshot::channel();
        let count = cmds.len();
        *self.shared.rider.lock().unwrap_or_else(|e| e.into_inner()) = Some(Rider { cmds, reply });
        let gone = || io_error(std::io::ErrorKind::BrokenPipe);
        if let Ok(carried) = tokio::time::timeout(wait, &mut answer).await {
            return carried.unwrap_or_else(|_| Err(gone()));
        }
        // Nothing went out: the rider goes alone, unless a pipeline took it
        // just now.
        let Some(rider) = self.shared.take_rider() else {
            return answer.await.unwrap_or_else(|_| Err(gone()));
        };
        let mut pipe = redis::Pipeline::with_capacity(count);
        for cmd in rider.cmds {
            pipe.add_command(cmd);
        }
        let sent_ms = crate::clock::unix_ms() as i64;
        let mut conn = self.shared.conn.clone();
        let values = conn.req_packed_commands(&pipe, 0, count).await?;
        Ok(Carried {
            values,
            sent_ms,
            received_ms: crate::clock::unix_ms() as i64,
        })
    }
}

impl<C: Pipelines> ConnectionLike for Batched<C> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.send(cmd.clone())
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let mut conn = self.shared.conn.clone();
        let shared = self.shared.clone();
        Box::pin(async move {
            // A transaction's replies come as one: nothing rides with it.
            let rider = match cmd.is_transaction() {
                true => None,
                false => shared.take_rider(),
            };
            let Some(rider) = rider else {
                return conn.req_packed_commands(cmd, offset, count).await;
            };
            let mut pipe = redis::Pipeline::with_capacity(cmd.len() + rider.cmds.len());
            for own in cmd.cmd_iter() {
                pipe.add_command(own.clone());
            }
            let rider = Some(rider);
            board(&mut pipe, &rider);
            let sent_ms = crate::clock::unix_ms() as i64;
            let expected = pipe.len();
            let mut answered = conn.req_packed_commands(&pipe, 0, expected).await;
            alight(rider, &mut answered, cmd.len(), sent_ms);
            answered
        })
    }

    fn get_db(&self) -> i64 {
        self.shared.conn.get_db()
    }
}
