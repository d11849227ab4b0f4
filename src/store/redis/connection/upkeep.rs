//! A live connection's upkeep: the server's clock, and the task that reads
//! its epoch, clock and replica count again every second, riding a
//! request's pipeline where one goes out (see `Batched::ride`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;

use super::{drop_live, lock, read_epoch, Shared};
use crate::store::redis::replicas::connected_replicas;
use crate::store::redis::target::Standing;

/// The server's clock against this process's: `TIME` on `conn`, the
/// server's reading taken as made halfway through the round trip.
pub(super) async fn measure_clock<C: ConnectionLike>(conn: &mut C) -> Option<i64> {
    let sent = crate::clock::unix_ms() as i64;
    let time = redis::cmd("TIME").query_async(conn).await.ok()?;
    clock_of(time, sent, crate::clock::unix_ms() as i64)
}

/// The server's clock against this process's from its reply to `TIME`,
/// sent at `sent` and answered at `received` (Unix ms, this process's).
fn clock_of(time: redis::Value, sent: i64, received: i64) -> Option<i64> {
    let (secs, micros): (i64, i64) = redis::from_redis_value(time).ok()?;
    Some(secs * 1000 + micros / 1000 - (sent + received) / 2)
}

/// How often a live connection's server epoch is read again: a master
/// demoted in place (made a replica of another server without closing our
/// connection, as a proxy or a DNS flip does) serves nothing written
/// before it for longer than this.
pub(crate) const EPOCH_CHECK: Duration = Duration::from_secs(1);

/// Reads the live connection's epoch, clock and replica count again at
/// least every [`EPOCH_CHECK`] while the store exists; a connection whose
/// server's epoch changed is replaced, and the next one reads the new
/// epoch. List lookups (`MGET`) never meet the `READONLY` that tells item
/// lookups of a demotion. The reads ride in the pipeline of a request's
/// command when one goes out within half the period (so a busy
/// connection spends no round trip of its own on them), else alone.
pub(super) async fn check_epochs(shared: std::sync::Weak<Shared>) {
    loop {
        tokio::time::sleep(EPOCH_CHECK / 2).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let live = shared
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(live) = live.filter(|live| !live.epoch.is_empty()) else {
            continue;
        };
        let mut upkeep = vec![redis::cmd("INFO"), redis::cmd("INFO"), redis::cmd("TIME")];
        upkeep[0].arg("server");
        upkeep[1].arg("replication");
        let conn = live.conn.clone();
        // The store is not kept alive while the rider waits.
        let setup_timeout = shared.setup_timeout;
        let weak = Arc::downgrade(&shared);
        drop(shared);
        let carried = tokio::time::timeout(
            EPOCH_CHECK / 2 + setup_timeout,
            conn.ride(upkeep, EPOCH_CHECK / 2),
        )
        .await;
        let Ok(Ok(carried)) = carried else {
            continue;
        };
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let mut replies = carried.values;
        let time = (replies.len() == 3).then(|| replies.pop()).flatten();
        if let Some(connected) = connected_replicas(&replies) {
            lock(&shared.replicas).read(connected, false);
        }
        let standing =
            tokio::time::timeout(shared.setup_timeout, shared.target.standing(&live.server)).await;
        let failovers = match standing {
            Ok(Ok(Standing::Replaced)) => {
                // Sentinel promoted another server while this one still
                // answers as a master (its demotion comes later): move now.
                tracing::warn!(from = %live.server, "Sentinel names another master: reconnecting");
                drop_live(&shared, live.generation);
                continue;
            }
            Ok(Ok(Standing::Master { failovers })) => failovers,
            // Sentinel unreachable: the server's own epoch is still checked.
            _ => live.failovers,
        };
        if let Some(clock) =
            time.and_then(|time| clock_of(time, carried.sent_ms, carried.received_ms))
        {
            shared.clock.store(clock, Ordering::Relaxed);
        }
        match read_epoch(replies, failovers) {
            Ok(Some(epoch)) if epoch != live.epoch => {
                tracing::warn!(
                    "the Redis server's epoch changed under a live connection (a demotion, \
                     a failover or a restart): entries written before it are no longer served"
                );
                drop_live(&shared, live.generation);
            }
            _ => {}
        }
    }
}
