//! The subscription that feeds an in-process tier with the invalidations
//! Redis publishes (feature `tier`).
//!
//! The invalidation script publishes, on the store's channel, every key it
//! deleted or bumped, in the same atomic step. One task per tier holds a
//! dedicated pub/sub connection: it reports each message, pings every
//! second, and on any failure reports the subscription lost (the tier drops
//! everything) before it subscribes again.
//!
//! Outside a cluster, `PUBLISH` reaches the subscribers of the server it
//! runs on only: a replica never hears what its master publishes. So the
//! subscription is made on a master only (a replica among the servers is
//! passed over), on the very server the store's connection is on when it
//! is among them (after a Sentinel failover the old master may still call
//! itself one for seconds, while writes go to the new one), and a server
//! that stops being the master (a failover, a `REPLICAOF`, the store's
//! connection moving elsewhere) is noticed at the next ping and left for
//! the one that is. The tier is off, its entries dropped, in between. On a
//! cluster every node hears every message.

#![cfg_attr(not(feature = "tier"), allow(dead_code, unused_imports))]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

#[cfg(feature = "tier")]
use futures_core::Stream;
use redis::aio::{PubSubSink, PubSubStream};

use crate::stats::telemetry::warn_limited;
use crate::store::{WatchTask, Watcher};

/// The channel invalidations are published on unless set otherwise.
pub const DEFAULT_CHANNEL: &str = "tower-redis-cache:invalidations";

/// How often the subscription connection is pinged.
const PING_EVERY: Duration = Duration::from_secs(1);

/// How long a ping, a connection or a subscription may take.
const WITHIN: Duration = Duration::from_secs(1);

/// How often the store's connection is checked for a move to another
/// master (an in-memory read): the tier drops what it holds this soon
/// after the store's connection left the server it heard.
const MOVE_CHECK: Duration = Duration::from_millis(50);

/// The pause before subscribing again.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// The keys of one published invalidation: `<len>:<key>` pieces, back to
/// back (keys may hold any byte). Stops at the first malformed piece.
pub(crate) fn published_keys(payload: &[u8]) -> impl Iterator<Item = &str> {
    let mut rest = payload;
    std::iter::from_fn(move || {
        let colon = rest.iter().position(|&b| b == b':')?;
        let len: usize = std::str::from_utf8(&rest[..colon]).ok()?.parse().ok()?;
        let key = rest.get(colon + 1..colon + 1 + len)?;
        rest = &rest[colon + 1 + len..];
        std::str::from_utf8(key).ok()
    })
}

/// The server (`host:port`) the store's connection is on, when known.
pub(crate) type Master = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Without the tier, nothing subscribes.
#[cfg(not(feature = "tier"))]
pub(crate) fn task(
    _: Arc<[redis::Client]>,
    _: Arc<str>,
    _: Master,
    _: Watcher,
) -> Option<WatchTask> {
    None
}

/// `client`'s server as `host:port`.
fn address(client: &redis::Client) -> String {
    client.get_connection_info().addr().to_string()
}

/// The task that keeps `watcher` told, over a subscription to `channel`
/// on one of `clients` (the one `master` names first, else tried in turn),
/// until the tier is gone.
#[cfg(feature = "tier")]
pub(crate) fn task(
    clients: Arc<[redis::Client]>,
    channel: Arc<str>,
    master: Master,
    watcher: Watcher,
) -> Option<WatchTask> {
    Some(Box::pin(async move {
        let mut turn = 0;
        // The server the store is on was tried and is not a master (a
        // store pinned to a demoted server): the others are, in turn.
        let mut passed_named = false;
        while watcher.wanted() && !clients.is_empty() {
            // The server the store is on, when it is among the clients.
            let named = master()
                .filter(|named| clients.iter().any(|c| address(c) == *named))
                .filter(|_| !std::mem::take(&mut passed_named));
            let client = match &named {
                Some(named) => clients
                    .iter()
                    .find(|c| address(c) == *named)
                    .unwrap_or(&clients[0]),
                None => &clients[turn % clients.len()],
            };
            turn += 1;
            let subscribed = tokio::time::timeout(WITHIN, async {
                let mut conn = client.get_multiplexed_async_connection().await?;
                if !hears_publishes(&mut conn).await? {
                    return Ok(None);
                }
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&*channel).await?;
                let (sink, stream) = pubsub.split();
                Ok::<_, redis::RedisError>(Some((sink, stream, conn)))
            })
            .await;
            match subscribed {
                // A replica: the next server.
                Ok(Ok(None)) => {
                    passed_named = named.is_some();
                    tracing::debug!(
                        server = %client.get_connection_info().addr(),
                        "in-process tier: not a master, its publishes are not heard here"
                    );
                }
                Ok(Ok(Some((sink, stream, conn)))) => {
                    if !watcher.live() {
                        return;
                    }
                    tracing::info!(
                        channel = &*channel,
                        "in-process tier on: subscribed to invalidations"
                    );
                    // Moved: the store's connection is on another of the
                    // servers (one it was not on, or not connected, when
                    // this subscription was made).
                    let on = address(client);
                    let moved = || {
                        master().is_some_and(|m| m != on && clients.iter().any(|c| address(c) == m))
                    };
                    let why = listen(sink, stream, conn, &moved, &watcher).await;
                    if !watcher.lost() {
                        return;
                    }
                    tracing::warn!(
                        channel = &*channel,
                        reason = why,
                        "in-process tier off until subscribed again"
                    );
                }
                Ok(Err(err)) => {
                    warn_limited!(channel = &*channel, error = %err, "in-process tier: cannot subscribe to invalidations");
                }
                Err(_) => {
                    warn_limited!(
                        channel = &*channel,
                        "in-process tier: subscribing timed out"
                    );
                }
            }
            tokio::time::sleep(RETRY_AFTER).await;
        }
    }))
}

/// What woke the listener.
#[cfg(feature = "tier")]
enum Event {
    Message(Option<redis::Msg>),
    Moved,
    Tick,
    /// The ping's outcome: `None` failed, else whether the server still
    /// hears publishes.
    Pinged(Option<bool>),
}

#[cfg(feature = "tier")]
type Ping = Pin<Box<dyn Future<Output = Option<bool>> + Send>>;

/// Whether the server on `conn` hears what the invalidation script
/// publishes: a master, or any node of a cluster. A user who may not run
/// `INFO` is believed to be on one.
#[cfg(feature = "tier")]
async fn hears_publishes(conn: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<bool> {
    let mut read = redis::pipe();
    read.ignore_errors();
    read.cmd("INFO").arg("replication");
    read.cmd("INFO").arg("cluster");
    let replies: Vec<redis::Value> = read.query_async(conn).await?;
    let text = |value: Option<&redis::Value>| match value {
        Some(redis::Value::BulkString(info)) => Some(String::from_utf8_lossy(info).into_owned()),
        Some(redis::Value::VerbatimString { text, .. }) => Some(text.clone()),
        _ => None,
    };
    Ok(match (text(replies.first()), text(replies.get(1))) {
        (_, Some(cluster)) if cluster.contains("cluster_enabled:1") => true,
        (Some(replication), _) => replication.contains("role:master"),
        // Refused (`NOPERM`): as before the check.
        (None, _) => true,
    })
}

/// Reports messages until the connection ends, a ping fails, the server
/// stops being a master or the tier is gone; returns why it stopped.
#[cfg(feature = "tier")]
async fn listen(
    sink: PubSubSink,
    mut stream: PubSubStream,
    conn: redis::aio::MultiplexedConnection,
    moved: &(dyn Fn() -> bool + Sync),
    watcher: &Watcher,
) -> &'static str {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut moves = tokio::time::interval(MOVE_CHECK);
    moves.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping: Option<Ping> = None;
    loop {
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(message) = Pin::new(&mut stream).poll_next(cx) {
                return Poll::Ready(Event::Message(message));
            }
            if moves.poll_tick(cx).is_ready() && moved() {
                return Poll::Ready(Event::Moved);
            }
            match ping.as_mut() {
                Some(ping) => ping.as_mut().poll(cx).map(Event::Pinged),
                None => ticks.poll_tick(cx).map(|_| Event::Tick),
            }
        })
        .await;
        match event {
            Event::Message(Some(message)) => {
                if !watcher.invalidated(published_keys(message.get_payload_bytes())) {
                    return "tier gone";
                }
            }
            Event::Message(None) => return "connection closed",
            Event::Tick if !watcher.wanted() => return "tier gone",
            // The store's connection moved to another of the servers.
            Event::Moved => return "the store's connection moved to another master",
            Event::Tick => {
                let (mut sink, mut conn) = (sink.clone(), conn.clone());
                ping = Some(Box::pin(async move {
                    let checked = tokio::time::timeout(WITHIN, async {
                        sink.ping::<redis::Value>().await.ok()?;
                        hears_publishes(&mut conn).await.ok()
                    });
                    checked.await.ok().flatten()
                }));
            }
            Event::Pinged(Some(true)) => ping = None,
            Event::Pinged(Some(false)) => return "the server is no longer a master",
            Event::Pinged(None) => return "ping failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_keys_are_length_prefixed_and_may_hold_any_character() {
        let payload = [
            &b"12:app:person:1"[..],
            b"4:a:b\n",
            b"22:{app:persons:list}:ver",
        ]
        .concat();
        let keys: Vec<&str> = published_keys(&payload).collect();
        assert_eq!(keys, ["app:person:1", "a:b\n", "{app:persons:list}:ver"]);
    }

    #[test]
    fn a_malformed_payload_yields_what_parsed() {
        let keys: Vec<&str> = published_keys(b"12:app:person:1x:oops").collect();
        assert_eq!(keys, ["app:person:1"]);
        assert_eq!(published_keys(b"99:short").count(), 0);
    }
}
