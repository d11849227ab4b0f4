//! A hit's one round trip: the lookups, and the stamp that ties every
//! entry to the server lifetime it was written under.

use bytes::Bytes;
use redis::aio::ConnectionLike;
use redis::{Cmd, Value};

use super::connection::sealed::Source;
use super::connection::Epoch;
use super::errors::{backend, refusal};
use super::scripts::{ensure_versions, millis};
use crate::store::{CacheKey, LeaseHolder, Lookup, Observed, StoreError, VersionKey};

/// A plain key's lookup: one command, the entry if there is one, else
/// this miss's lease (`SET key lease NX PX ttl GET`); and whose lease it
/// met, if it met one.
pub(super) async fn plain_lookup<S: Source>(
    conn: &mut S::Conn,
    key: &str,
    lease_ttl: std::time::Duration,
    minter: &crate::store::tokens::Minter,
) -> Result<(Observed, LeaseHolder), StoreError> {
    let lease = crate::store::tokens::lease_by(minter);
    let mut set = Cmd::with_capacity(7, key.len() + lease.len() + 32);
    set.arg("SET")
        .arg(key)
        .arg(&lease[..])
        .arg("NX")
        .arg("PX")
        .arg(millis(lease_ttl))
        .arg("GET");
    let found = match refusal(S::send(conn, set).await) {
        Ok(Value::BulkString(value)) => {
            let holder = if !crate::store::tokens::is_lease(&value) {
                LeaseHolder::Nobody
            } else if crate::store::tokens::is_lease_of_another(&value, minter) {
                LeaseHolder::Another
            } else {
                // Another request of this process: filling the entry (its
                // flight may have landed already), or gone.
                LeaseHolder::Us
            };
            return Ok((Observed::Value(Bytes::from(value)), holder));
        }
        Ok(Value::Nil) => Observed::Value(Bytes::copy_from_slice(&lease)),
        Err(err) if err.code() == Some("WRONGTYPE") => Observed::WrongType,
        // Full, without eviction: no lease, but hits still serve.
        // An empty key then reads absent, which no write matches.
        Err(err) if err.code() == Some("OOM") => {
            let mut get = Cmd::with_capacity(2, key.len() + 3);
            get.arg("GET").arg(key);
            match refusal(conn.req_packed_command(&get).await).map_err(backend)? {
                Value::BulkString(value) => Observed::Value(Bytes::from(value)),
                Value::Nil => Observed::Absent,
                other => return Err(unexpected("GET", other)),
            }
        }
        Ok(other) => return Err(unexpected("SET", other)),
        Err(err) => return Err(backend(err)),
    };
    Ok((found, LeaseHolder::Nobody))
}

/// A reply no command here expects.
fn unexpected(command: &str, reply: Value) -> StoreError {
    StoreError::Backend(format!("{command} answered {reply:?}"))
}

/// What a lookup saw, with what of it may be served under `epoch`.
pub(super) fn looked_up(versions: Vec<Observed>, entry: Observed, epoch: Epoch) -> Lookup {
    let payload = unstamp(&entry, &epoch);
    Lookup::new(versions, entry)
        .with_payload(payload)
        .with_origin(epoch)
}

/// The version values this process last read, per version key, with the
/// epoch each was read under, so that a versioned lookup can read the
/// versions and the entry under them in one round trip. A value here is
/// only a guess: the lookup checks it against the versions it reads in the
/// same trip. Bounded, on a concurrent cache (quick_cache: sharded, no lock
/// shared by every hit) that evicts the groups read least, never all at
/// once: with more groups than it holds (a version group per tenant), the
/// hot ones keep their one round trip.
#[derive(Debug)]
pub(super) struct SeenVersions(
    quick_cache::sync::Cache<
        String,
        (Bytes, Epoch),
        quick_cache::UnitWeighter,
        quick_cache::DefaultHashBuilder,
    >,
);

/// What this process had read of a key's versions when a lookup was
/// called.
#[derive(Debug)]
pub(super) struct Guess {
    pub(super) values: Vec<Observed>,
    /// The epoch they were all read under; none when not all under one.
    pub(super) epoch: Option<Epoch>,
}

/// How many version keys [`SeenVersions`] remembers by default.
pub(super) const DEFAULT_REMEMBERED_VERSIONS: usize = 100_000;

impl Default for SeenVersions {
    fn default() -> Self {
        Self::new(DEFAULT_REMEMBERED_VERSIONS)
    }
}

impl SeenVersions {
    /// At most `capacity` version keys (at least 1).
    pub(super) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self(quick_cache::sync::Cache::with(
            capacity,
            capacity as u64,
            quick_cache::UnitWeighter,
            quick_cache::DefaultHashBuilder::default(),
            quick_cache::sync::DefaultLifecycle::default(),
        ))
    }

    /// The values last read for `versions`, in order, as what a lookup
    /// expects to read again; none when one is not known.
    pub(super) fn get(&self, versions: &[VersionKey]) -> Option<Guess> {
        let mut values = Vec::with_capacity(versions.len());
        let mut epoch: Option<Option<Epoch>> = None;
        for version in versions {
            let (value, read_under) = self.0.get(version.key())?;
            values.push(Observed::Value(value));
            epoch = match epoch {
                None => Some(Some(read_under)),
                Some(Some(one)) if one == read_under => Some(Some(one)),
                Some(_) => Some(None),
            };
        }
        Some(Guess {
            values,
            epoch: epoch.flatten(),
        })
    }

    /// Remembers the versions a lookup read under `epoch`.
    pub(super) fn remember(&self, versions: &[VersionKey], read: &[Observed], epoch: &Epoch) {
        for (version, value) in versions.iter().zip(read) {
            if let Observed::Value(value) = value {
                self.0
                    .insert(version.key().to_owned(), (value.clone(), epoch.clone()));
            }
        }
    }
}

/// A versioned lookup with plain reads, one command in the steady state:
/// one `MGET` of the version keys and of the entry under the versions this
/// process saw last (`guess`). When the versions read are those, the entry
/// read is current; after a bump (or on a first lookup) a second command,
/// a `GET`, reads the entry under the new versions. A missing version
/// key is created by a script, and then no entry can exist under it.
/// Every command names its keys (no key is built inside Redis). Returns
/// the versions, the entry, and whether the versions read were the guess.
pub(super) async fn versioned_lookup<S: Source>(
    conn: &mut S::Conn,
    guess: Option<Vec<Observed>>,
    key: &CacheKey,
) -> Result<(Vec<Observed>, Observed, bool), StoreError> {
    let versions = key.versions();
    // The versions this process read last, until the reply says otherwise.
    let guessed = guess.is_some();
    let mut current = guess.unwrap_or_else(|| Vec::with_capacity(versions.len()));
    let mut mget = Cmd::with_capacity(versions.len() + 2, 128);
    mget.arg("MGET");
    for version in versions {
        mget.arg(version.key());
    }
    if guessed {
        mget.arg(EntryKey(key, &values(&current).collect::<Vec<_>>()));
    }
    // MGET answers nil for a missing key and for one of another type alike.
    let replies = match refusal(S::send(conn, mget).await).map_err(backend)? {
        Value::Array(replies) => replies,
        other => return Err(unexpected("MGET", other)),
    };
    let mut replies = replies.into_iter();
    let mut matched = guessed;
    let mut read = 0;
    for reply in replies.by_ref().take(versions.len()) {
        let Value::BulkString(value) = reply else {
            break;
        };
        match current.get_mut(read) {
            Some(Observed::Value(seen)) if seen[..] == value[..] => {}
            Some(slot) => {
                matched = false;
                *slot = Observed::Value(Bytes::from(value));
            }
            None => {
                matched = false;
                current.push(Observed::Value(Bytes::from(value)));
            }
        }
        read += 1;
    }
    current.truncate(read);
    if current.len() < versions.len() {
        // Rare (a version key new or lost): boxed, so that the hit's
        // future does not carry the script call's.
        let created = Box::pin(ensure_versions(conn, versions)).await?;
        return Ok((
            created.into_iter().map(Observed::Value).collect(),
            Observed::Absent,
            false,
        ));
    }
    // An entry key of another type reads absent: the write replaces it.
    let entry = match matched {
        true => match replies.next() {
            Some(Value::BulkString(value)) => Some(Bytes::from(value)),
            _ => None,
        },
        false => {
            let read: Vec<Bytes> = current
                .iter()
                .filter_map(|read| match read {
                    Observed::Value(value) => Some(value.clone()),
                    _ => None,
                })
                .collect();
            // After a bump only: boxed, like the script call above.
            Box::pin(entry_under(conn, key, &read)).await?
        }
    };
    let entry = entry.map_or(Observed::Absent, Observed::Value);
    Ok((current, entry, matched))
}

/// The entry of `key` under the versions `read` (one `GET`).
async fn entry_under<C: ConnectionLike>(
    conn: &mut C,
    key: &CacheKey,
    read: &[Bytes],
) -> Result<Option<Bytes>, StoreError> {
    let mut get = Cmd::with_capacity(2, 128);
    get.arg("GET").arg(EntryKey(key, read));
    match refusal(conn.req_packed_command(&get).await).map_err(backend)? {
        Value::BulkString(value) => Ok(Some(Bytes::from(value))),
        Value::Nil => Ok(None),
        other => Err(unexpected("GET", other)),
    }
}

/// The values of the versions a lookup read (all values: a missing one
/// ends the read).
fn values(read: &[Observed]) -> impl Iterator<Item = &[u8]> {
    read.iter().filter_map(|read| match read {
        Observed::Value(value) => Some(&value[..]),
        _ => None,
    })
}

/// The entry key of a versioned key under these versions, written into a
/// command as it is built (no string of its own). Lookups and writes both
/// name the entry this way, byte for byte.
pub(super) struct EntryKey<'a, V>(pub(super) &'a CacheKey, pub(super) &'a [V]);

impl<V: AsRef<[u8]>> redis::ToRedisArgs for EntryKey<'_, V> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        let EntryKey(key, versions) = self;
        let mut arg = out.writer_for_next_arg();
        let _ = key.write_entry_key(versions.iter().map(AsRef::as_ref), &mut arg);
    }
}

/// Marks a value written under a known server epoch.
const STAMP: u8 = 0x04;

/// `value` stamped with the epoch of the connection that writes it.
pub(super) fn stamp(value: &[u8], epoch: &Epoch) -> Bytes {
    if epoch.is_empty() || epoch.len() > usize::from(u8::MAX) {
        return Bytes::copy_from_slice(value);
    }
    let mut out = Vec::with_capacity(2 + epoch.len() + value.len());
    out.push(STAMP);
    out.push(epoch.len() as u8);
    out.extend_from_slice(epoch);
    out.extend_from_slice(value);
    Bytes::from(out)
}

/// What may be served from `raw`: the value under the stamp when it was
/// written under this server's epoch; nothing when under another (the
/// server restarted with old data, or failed over), nor an unstamped entry
/// when the epoch is known (a process without epochs wrote it); guards
/// (leases, tombstones) as they are.
pub(super) fn unstamp(raw: &Observed, epoch: &Epoch) -> Observed {
    let Observed::Value(bytes) = raw else {
        return raw.clone();
    };
    if bytes.first() != Some(&STAMP) {
        if !epoch.is_empty() && crate::entry::is_entry(bytes) {
            return Observed::Absent;
        }
        return raw.clone();
    }
    let len = bytes.get(1).map_or(0, |l| usize::from(*l));
    match bytes.get(2..2 + len) {
        Some(written) if !epoch.is_empty() && written == epoch.as_ref() => {
            Observed::Value(bytes.slice(2 + len..))
        }
        _ => Observed::Absent,
    }
}

/// What a plain lookup saw, as the store script's ARGV: (0 absent | 1
/// string | 2 other type, value).
pub(super) fn seen_args(seen: &Observed) -> (i64, &[u8]) {
    match seen {
        Observed::Absent => (0, b""),
        Observed::Value(v) => (1, v),
        Observed::WrongType => (2, b""),
    }
}
