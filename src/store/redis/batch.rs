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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

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
}

impl<C> Clone for Batched<C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<C> {
    conn: C,
    /// A cluster's: each batch goes out as one pipeline per slot.
    by_slot: bool,
    /// Batches sent and not answered yet.
    in_flight: AtomicUsize,
    queue: Mutex<Vec<Queued>>,
}

/// A command waiting for the next flush, with where its reply goes.
struct Queued {
    cmd: Cmd,
    reply: oneshot::Sender<Result<Value, RedisError>>,
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
                queue: Mutex::new(Vec::new()),
            }),
        }
    }
}

impl<C> Shared<C> {
    fn queue(&self) -> MutexGuard<'_, Vec<Queued>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Sends what is queued and answers each. While an earlier batch is
/// still out, it first lets the requests already runnable queue theirs:
/// Redis is busy anyway, and they go out together. An idle connection
/// sends at once.
async fn flush<C: ConnectionLike + Clone + Send + Sync + 'static>(shared: Arc<Shared<C>>) {
    if shared.in_flight.load(Ordering::Relaxed) > 0 {
        tokio::task::yield_now().await;
    }
    // Drained in place: the queue keeps its capacity for the next batch.
    let queued: Vec<Queued> = shared.queue().drain(..).collect();
    if queued.is_empty() {
        return;
    }
    if !shared.by_slot {
        return send(&shared, queued).await;
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
    let mut groups = groups.into_iter().map(|(_, group)| group);
    let first = groups.next();
    for group in groups {
        let shared = shared.clone();
        tokio::spawn(async move { send(&shared, group).await });
    }
    if let Some(group) = first {
        send(&shared, group).await;
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

/// Sends `queued` as one pipeline and hands each command its reply.
async fn send<C: ConnectionLike + Clone>(shared: &Shared<C>, queued: Vec<Queued>) {
    let mut pipe = redis::Pipeline::with_capacity(queued.len());
    let mut replies = Vec::with_capacity(queued.len());
    for Queued { cmd, reply } in queued {
        pipe.add_command(cmd);
        replies.push(reply);
    }
    // No lock is held while Redis answers: the next batch may go out
    // meanwhile.
    let mut conn = shared.conn.clone();
    let answered = {
        let _out = InFlight::new(&shared.in_flight);
        let sent = conn.req_packed_commands(&pipe, 0, replies.len());
        match tokio::time::timeout(BATCH_BUDGET, sent).await {
            Ok(Ok(values)) if values.len() != replies.len() => Err(RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "pipeline answered with the wrong number of replies",
            ))),
            Ok(answered) => answered,
            Err(_) => Err(io_error(std::io::ErrorKind::TimedOut)),
        }
    };
    match answered {
        Ok(values) => {
            for (reply, value) in replies.into_iter().zip(values) {
                let _ = reply.send(Ok(value));
            }
        }
        Err(err) => {
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
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

impl<C: ConnectionLike + Clone + Send + Sync + 'static> Batched<C> {
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
        Box::pin(async move {
            answer
                .await
                .unwrap_or_else(|_| Err(io_error(std::io::ErrorKind::BrokenPipe)))
        })
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> ConnectionLike for Batched<C> {
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
        Box::pin(async move { conn.req_packed_commands(cmd, offset, count).await })
    }

    fn get_db(&self) -> i64 {
        self.shared.conn.get_db()
    }
}
