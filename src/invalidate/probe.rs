//! Write probes ([`Rule::probe`](crate::Rule::probe)): a sampled write's
//! invalidation read back from the store about 1 s and 10 s after it was
//! confirmed, off every request's path, to check that the store no longer
//! serves what the write replaced.

use std::time::{Duration, Instant};

use crate::entry::Slot;
use crate::policy::Policy;
use crate::stats::Probed;
use crate::store::{Invalidation, Observed, Peeked, StoreFuture};

/// How much earlier than the write an entry must have been stored to be
/// stale: processes read the store's clock through their own offset
/// estimates, each off by up to half a round trip (tens of milliseconds
/// over a slow link), so an entry another process stored just after the
/// invalidation may carry a time a little before the write began.
const CLOCK_SLACK_MS: u64 = 100;

/// When a probed write is checked, after its invalidation was confirmed.
pub(crate) const AFTER: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(10)];

/// What a probe must find: the write's keys, and how to judge each.
struct Probe {
    policy: Policy,
    /// The purged keys, then the bumped version keys.
    keys: Vec<String>,
    purges: usize,
    /// When the write's handler was called, on the store's clock: an entry
    /// stored before then was made from data older than the write.
    began_ms: u64,
}

/// Probes `invalidation`, just confirmed, when the store can be read
/// without writing; `began_ms` is when the write's handler was called (on
/// the store's clock).
pub(crate) fn start(policy: Policy, invalidation: &Invalidation, began_ms: u64) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let keys: Vec<String> = invalidation
        .deletes()
        .iter()
        .cloned()
        .chain(invalidation.bumps().iter().map(|b| b.key().to_owned()))
        .collect();
    // The bumped versions right after the write: no later read on the same
    // server lifetime may find less (a lost bump brings back every entry
    // it orphaned).
    let Some(now) = policy.store().peek(&keys) else {
        return;
    };
    let probe = Probe {
        policy,
        keys,
        purges: invalidation.deletes().len(),
        began_ms,
    };
    runtime.spawn(probe.run(now));
}

/// What a probe found wrong at one key.
#[derive(Debug, PartialEq, Eq)]
enum Stale {
    /// A purged key holds an entry stored this long before the write began.
    Entry { before_write_ms: u64 },
    /// A bumped version reads below the value the bump made, on the same
    /// server lifetime: the entries the bump orphaned are served again.
    Version { read: u64, bumped: u64 },
}

/// A bumped version key right after the write: its value and the server
/// lifetime that holds it.
type Floor = Option<(u64, bytes::Bytes)>;

impl Probe {
    async fn run(self, now: StoreFuture<Vec<Peeked>>) {
        let started = Instant::now();
        let stats = self.policy.stats_ref().clone();
        let floors: Vec<Floor> = match now.await {
            Ok(seen) => seen
                .iter()
                .skip(self.purges)
                .map(|p| version(&p.value).map(|v| (v, p.origin.clone())))
                .collect(),
            Err(_) => {
                for window in 0..AFTER.len() {
                    stats.probed(window, Probed::Unread);
                }
                return;
            }
        };
        for (window, after) in AFTER.iter().enumerate() {
            tokio::time::sleep_until((started + *after).into()).await;
            let Some(read) = self.policy.store().peek(&self.keys) else {
                return;
            };
            let outcome = match read.await {
                Err(_) => Probed::Unread,
                Ok(seen) => match self.first_stale(&floors, &seen) {
                    None => Probed::Consistent,
                    Some((key, stale)) => {
                        tracing::warn!(
                            key,
                            after_ms = started.elapsed().as_millis() as u64,
                            found = ?stale,
                            "write probe: the store still serves what a confirmed write replaced"
                        );
                        Probed::Stale
                    }
                },
            };
            stats.probed(window, outcome);
        }
    }

    /// The first key where `seen` holds what the write replaced.
    fn first_stale<'k>(&'k self, floors: &[Floor], seen: &[Peeked]) -> Option<(&'k str, Stale)> {
        let purged = self.keys.iter().zip(seen).take(self.purges);
        for (key, seen) in purged {
            if let Some(stale) = stale_entry(&seen.value, self.began_ms) {
                return Some((key, stale));
            }
        }
        let bumped = self.keys.iter().zip(seen).skip(self.purges).zip(floors);
        for ((key, seen), floor) in bumped {
            match (version(&seen.value), floor) {
                (Some(read), Some((bumped, origin)))
                    if read < *bumped && seen.origin == *origin =>
                {
                    return Some((
                        key,
                        Stale::Version {
                            read,
                            bumped: *bumped,
                        },
                    ))
                }
                // Absent: the next lookup creates it above every value
                // used. Under another server lifetime (a restart, a
                // failover): nothing stored before it is served.
                _ => {}
            }
        }
        None
    }
}

/// An entry at a purged key stored before the write began, by more than
/// [`CLOCK_SLACK_MS`] (a tombstone, a lease, nothing, or an entry stored
/// since are all fine).
fn stale_entry(seen: &Observed, began_ms: u64) -> Option<Stale> {
    let Observed::Value(raw) = seen else {
        return None;
    };
    match crate::entry::decode(raw.clone()) {
        Slot::Entry(entry) if entry.stored_at_ms + CLOCK_SLACK_MS < began_ms => {
            Some(Stale::Entry {
                before_write_ms: began_ms - entry.stored_at_ms,
            })
        }
        _ => None,
    }
}

/// A version key's value as a number.
fn version(seen: &Observed) -> Option<u64> {
    match seen {
        Observed::Value(v) => std::str::from_utf8(v).ok()?.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn only_an_entry_stored_before_the_write_is_stale() {
        let entry = |stored_at_ms| {
            let entry = crate::entry::Entry::new(
                crate::key::Binding::default(),
                http::StatusCode::OK,
                http::HeaderMap::new(),
                Bytes::from_static(b"{}"),
                Duration::from_secs(60),
                stored_at_ms,
            );
            Observed::Value(entry.encode())
        };
        assert_eq!(
            stale_entry(&entry(800), 1_000),
            Some(Stale::Entry {
                before_write_ms: 200
            })
        );
        // Within the clock slack of the processes' offsets: not judged.
        assert_eq!(stale_entry(&entry(900), 1_000), None);
        assert_eq!(stale_entry(&entry(1_000), 1_000), None);
        assert_eq!(stale_entry(&Observed::Absent, 1_000), None);
        let tombstone = crate::store::tokens::tombstone();
        assert_eq!(stale_entry(&Observed::Value(tombstone), 1_000), None);
    }

    #[test]
    fn a_version_reads_as_a_number_or_nothing() {
        assert_eq!(
            version(&Observed::Value(Bytes::from_static(b"42"))),
            Some(42)
        );
        assert_eq!(version(&Observed::Value(Bytes::from_static(b"x"))), None);
        assert_eq!(version(&Observed::Absent), None);
    }
}
