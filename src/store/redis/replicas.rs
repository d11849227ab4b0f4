//! The replicas an invalidation waits for over one node or Sentinel: how
//! many `INFO replication` lists online, a drop believed only once it lasts.

/// The replicas connected to the master, as `INFO replication` says. A
/// drop is believed only once it lasted [`REPLICA_LOSS_CHECKS`] reads: a
/// master whose replica was just promoted by a failover still answers as
/// a master for a moment, and an invalidation it takes then is lost when
/// it is demoted; waiting for the replica it had makes that invalidation
/// unconfirmed (pending, replayed on the new master) instead.
#[derive(Debug, Default)]
pub(super) struct Replicas {
    pub(super) expected: usize,
    /// Consecutive reads that found fewer.
    fewer: u32,
}

/// Reads (one per `EPOCH_CHECK`, a second) that must find fewer replicas before
/// invalidations stop waiting for the ones that left.
const REPLICA_LOSS_CHECKS: u32 = 3;

impl Replicas {
    /// One reading of the connected replicas; a new connection trusts its
    /// first.
    pub(super) fn read(&mut self, connected: usize, fresh: bool) {
        let fewer = !fresh && connected < self.expected;
        self.fewer = if fewer { self.fewer + 1 } else { 0 };
        if !fewer || self.fewer >= REPLICA_LOSS_CHECKS {
            self.expected = connected;
            self.fewer = 0;
        }
    }
}

/// The replicas the reply to `INFO replication` (second of `replies`)
/// lists as `state=online`: the ones that can acknowledge a `WAIT` (one
/// still in its first sync cannot).
pub(super) fn connected_replicas(replies: &[redis::Value]) -> Option<usize> {
    let text = match replies.get(1)? {
        redis::Value::BulkString(info) => String::from_utf8_lossy(info).into_owned(),
        redis::Value::VerbatimString { text, .. } => text.clone(),
        _ => return None,
    };
    text.contains("role:").then(|| {
        text.lines()
            .filter(|line| line.starts_with("slave") && line.contains("state=online"))
            .count()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_lost_is_believed_only_after_three_reads() {
        let mut replicas = Replicas::default();
        replicas.read(1, true);
        assert_eq!(replicas.expected, 1);
        // A failover promotes the replica: the master sees none for a moment.
        replicas.read(0, false);
        replicas.read(0, false);
        assert_eq!(replicas.expected, 1, "invalidations still wait for it");
        replicas.read(1, false);
        replicas.read(0, false);
        replicas.read(0, false);
        assert_eq!(replicas.expected, 1, "the count of lower reads restarts");
        replicas.read(0, false);
        assert_eq!(
            replicas.expected, 0,
            "gone for three reads: no longer waited for"
        );
        replicas.read(2, false);
        assert_eq!(replicas.expected, 2, "a new replica counts at once");
        replicas.read(0, true);
        assert_eq!(
            replicas.expected, 0,
            "a new connection trusts its first read"
        );
    }

    #[test]
    fn connected_replicas_are_read_from_info_replication() {
        let info = |text: &str| redis::Value::BulkString(text.as_bytes().to_vec());
        let replies = [
            info("# Server"),
            info(concat!(
                "role:master\r\nconnected_slaves:3\r\n",
                "slave0:ip=127.0.0.1,port=7001,state=online,offset=10,lag=0\r\n",
                "slave1:ip=127.0.0.1,port=7002,state=wait_bgsave,offset=0,lag=0\r\n",
                "slave2:ip=127.0.0.1,port=7003,state=online,offset=10,lag=1\r\n",
            )),
        ];
        assert_eq!(connected_replicas(&replies), Some(2), "online ones only");
        assert_eq!(connected_replicas(&replies[..1]), None);
    }
}
