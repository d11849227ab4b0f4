use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionLike;
use redis::{RedisError, Script};
use tokio::time::Instant;

use super::connect::{Connect, Epoch, Reconnecting};
use super::resilient::{BreakerConfig, Resilient, StoreHealth};
pub use super::subscribe::DEFAULT_CHANNEL;
use super::wire::{Decimal, Reply};
use super::{
    CacheKey, Invalidation, Lookup, Observed, Store, StoreError, StoreFuture, DEFAULT_LEASE_TTL,
    DEFAULT_TOMBSTONE_TTL,
};

/// How long [`RedisStore::connect`] tries before it gives up.
const CONNECT_BUDGET: Duration = Duration::from_secs(5);

/// Default deadline for one Redis read or entry write.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(100);

/// Default budget of a write's invalidation: longer than a read's, since a
/// write waits for it and a missed one leaves stale data.
pub const DEFAULT_WRITE_DEADLINE: Duration = Duration::from_secs(1);

// Shared by the scripts: the state of a key as (0 absent | 1 string | 2 other type, value).
const READ_FN: &str = r"
local function read(k)
  local t = redis.call('TYPE', k)['ok']
  if t == 'none' then return 0, '' end
  if t ~= 'string' then return 2, '' end
  return 1, redis.call('GET', k)
end
";

/// KEYS version keys; ARGV the ttl ms of each. Reads every version key and
/// creates a missing (or unreadable) one with the server time in
/// microseconds, above anything a lost counter reached, so a miss's write
/// compares against a value it saw, never against "absent". Returns the
/// values. Run only when a plain read found a version key missing: no entry
/// can exist under a version created here.
static ENSURE_VERSIONS_CODE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{READ_FN}
local out = {{}}
for i = 1, #KEYS do
  local s, v = read(KEYS[i])
  if s ~= 1 then
    local t = redis.call('TIME')
    v = t[1] .. string.format('%06d', tonumber(t[2]))
    redis.call('SET', KEYS[i], v, 'PX', ARGV[i])
  end
  out[i] = v
end
return out"
    )
});
static ENSURE_VERSIONS: LazyLock<Script> = LazyLock::new(|| Script::new(&ENSURE_VERSIONS_CODE));

/// Plain: KEYS[1] entry key; ARGV 'p', seen state, seen value, value, ttl ms.
/// Versioned: KEYS version keys then the entry key (made of the versions the
/// lookup saw); ARGV 'v', then per version key its seen value and ttl ms,
/// then value, ttl ms.
/// Writes only if every key still holds exactly what the lookup saw (the
/// miss's own lease, a tombstone, the version): a guard that was evicted or
/// expired reads absent and fails the write. Version keys are renewed so
/// they outlive the entry. Every key the script touches is in KEYS.
static STORE_CODE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{READ_FN}
local value, ttl = ARGV[#ARGV - 1], ARGV[#ARGV]
if ARGV[1] == 'p' then
  local s, cur = read(KEYS[1])
  if s == 0 or s ~= tonumber(ARGV[2]) or cur ~= ARGV[3] then return 0 end
  redis.call('SET', KEYS[1], value, 'PX', ttl)
  return 1
end
local n = #KEYS - 1
for i = 1, n do
  local s, cur = read(KEYS[i])
  if s ~= 1 or cur ~= ARGV[2 * i] then return 0 end
end
for i = 1, n do
  local keep = tonumber(ARGV[1 + 2 * i])
  if redis.call('PTTL', KEYS[i]) < keep then
    redis.call('PEXPIRE', KEYS[i], keep)
  end
end
redis.call('SET', KEYS[#KEYS], value, 'PX', ttl)
return 1"
    )
});
static STORE: LazyLock<Script> = LazyLock::new(|| Script::new(&STORE_CODE));

/// KEYS deletes then bumps; ARGV number of deletes, tombstone, tombstone ttl
/// ms, channel, then the ttl ms of each bumped key. A bump of a missing or
/// unreadable version sets the server time in microseconds, above anything
/// the lost counter reached; `INCR` keeps the key's TTL. Then, in the same
/// atomic step, every key is published on the channel (unless empty) as
/// `<len>:<key>` pieces, for the in-process tiers of every process.
const INVALIDATE_CODE: &str = r"
local deletes = tonumber(ARGV[1])
for i = 1, deletes do
  redis.call('SET', KEYS[i], ARGV[2], 'PX', ARGV[3])
end
for i = deletes + 1, #KEYS do
  local k = KEYS[i]
  local n = nil
  if redis.call('TYPE', k)['ok'] == 'string' then n = tonumber(redis.call('GET', k)) end
  if n then
    redis.call('INCR', k)
  else
    local t = redis.call('TIME')
    redis.call('SET', k, t[1] .. string.format('%06d', tonumber(t[2])), 'PX', ARGV[4 + i - deletes])
  end
end
if ARGV[4] ~= '' then
  local keys = {}
  for i = 1, #KEYS do keys[i] = string.len(KEYS[i]) .. ':' .. KEYS[i] end
  redis.call('PUBLISH', ARGV[4], table.concat(keys))
end
return 1";
static INVALIDATE: LazyLock<Script> = LazyLock::new(|| Script::new(INVALIDATE_CODE));

/// A store in Redis, over one cloneable connection.
///
/// With [`RedisStore::open`] the connection is a [`Reconnecting`]: one
/// multiplexed connection shared by every request, replaced when it breaks,
/// opened lazily (building the store needs no running Redis), and aware of
/// the server's lifetime. Every operation has a deadline ([`DEFAULT_DEADLINE`] unless set);
/// a late or failed operation is an error the layers turn into a miss.
///
/// Entries are written with `SET … PX ttl`; lookups are one `SET key lease
/// NX PX ttl GET` (plain keys: the entry, or a lease of this miss when the
/// key is empty; Redis 7.0 or later) or one `EVALSHA` (versioned keys);
/// writes and invalidations are one `EVALSHA` each. No command scans the
/// keyspace. On the connection [`RedisStore::open`] makes, the commands of
/// concurrent requests go out together as one pipeline (one write, and one
/// read in Redis, for many lookups); each request still waits for its own
/// reply only.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_redis_cache::store::RedisStore;
///
/// let store = RedisStore::open("redis://127.0.0.1:6379/0")?
///     .deadline(Duration::from_millis(50));
/// # Ok::<(), tower_redis_cache::store::StoreError>(())
/// ```
#[derive(Clone)]
pub struct RedisStore<C = Reconnecting> {
    inner: Resilient<Link<C>>,
}

/// The Redis operations themselves, without breaker or queue.
#[derive(Clone)]
struct Link<C> {
    source: C,
    deadline: Duration,
    write_deadline: Duration,
    tombstone_ttl: Duration,
    lease_ttl: Duration,
    seen_versions: std::sync::Arc<SeenVersions>,
    /// Whether invalidations go out one per cluster slot: known for a
    /// cluster source, learned from a `CROSSSLOT` for any other.
    split: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Where invalidations are published (empty: nowhere).
    channel: std::sync::Arc<str>,
    /// The servers an in-process tier subscribes through, tried in turn.
    subscribe_via: std::sync::Arc<[redis::Client]>,
}

impl<C> std::fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let link = self.inner.get_ref();
        f.debug_struct("RedisStore")
            .field("deadline", &link.deadline)
            .field("write_deadline", &link.write_deadline)
            .field("tombstone_ttl", &link.tombstone_ttl)
            .finish_non_exhaustive()
    }
}

impl RedisStore<Reconnecting> {
    /// A store for the Redis at `url`, connecting on first use and again
    /// whenever the connection breaks. Each connection reads the server's
    /// `run_id` and loads the scripts first: entries written before a
    /// restart that reloaded old data, or before a failover, are never
    /// served after it.
    ///
    /// Fails only when the URL does not parse. Must be called within a Tokio
    /// runtime.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(backend)?;
        let subscribe_via = client.clone();
        Ok(
            Self::new(Reconnecting::new(client, Duration::from_secs(1), scripts()))
                .subscribe_via([subscribe_via]),
        )
    }
}

impl RedisStore<Reconnecting> {
    /// Like [`RedisStore::open`], then connects and pings once, so that a
    /// wrong address, password or permission fails at start-up with a clear
    /// error instead of turning every request into a miss. Later outages
    /// are handled as always (misses, never errors).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_redis_cache::store::StoreError> {
    /// use tower_redis_cache::store::RedisStore;
    ///
    /// let store = RedisStore::connect("redis://cache:s3cret@10.0.0.5:6379/0").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let store = Self::open(url)?;
        store.connected().await?;
        Ok(store)
    }
}

impl<C: Connect> RedisStore<C> {
    /// Pings until the store answers, or fails with the reason. The read
    /// deadline is for requests: at start-up the first connection
    /// (handshake, scripts, cluster topology) may take longer than one.
    pub(crate) async fn connected(&self) -> Result<(), StoreError> {
        let until = tokio::time::Instant::now() + CONNECT_BUDGET;
        loop {
            match self.inner.get_ref().ping().await {
                Ok(()) => return Ok(()),
                Err(StoreError::Timeout) if tokio::time::Instant::now() < until => continue,
                Err(err) => return Err(err),
            }
        }
    }

    /// A store over `conn`: a `MultiplexedConnection`, a `ConnectionManager`
    /// or any other cloneable async connection (for an ACL user, a database
    /// number, TLS settings), or a [`Reconnecting`]. Only
    /// [`RedisStore::open`]'s connection knows the server's `run_id`: over
    /// another, a restart that reloads old data is not detected.
    pub fn new(conn: C) -> Self {
        let link = Link {
            split: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(conn.is_cluster())),
            source: conn,
            deadline: DEFAULT_DEADLINE,
            write_deadline: DEFAULT_WRITE_DEADLINE,
            tombstone_ttl: DEFAULT_TOMBSTONE_TTL,
            lease_ttl: DEFAULT_LEASE_TTL,
            seen_versions: std::sync::Arc::default(),
            channel: std::sync::Arc::from(DEFAULT_CHANNEL),
            subscribe_via: std::sync::Arc::from([]),
        };
        Self {
            inner: Resilient::new(link, BreakerConfig::default()),
        }
    }

    /// The circuit breaker and invalidation queue thresholds.
    pub fn breaker(self, config: BreakerConfig) -> Self {
        Self {
            inner: Resilient::new(self.inner.into_inner(), config),
        }
    }

    /// The deadline for one read or entry write (default 100 ms).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.inner.get_mut().deadline = deadline;
        self
    }

    /// The budget of a write's invalidation (default 1 s): it is tried
    /// twice within it (the second time on a fresh connection when the
    /// first one dropped), and it is sent even while the circuit is open.
    pub fn write_deadline(mut self, deadline: Duration) -> Self {
        self.inner.get_mut().write_deadline = deadline;
        self
    }

    /// How long a delete's tombstone lives (default 5 minutes).
    pub fn tombstone_ttl(mut self, ttl: Duration) -> Self {
        self.inner.get_mut().tombstone_ttl = ttl;
        self
    }

    /// How long a miss's lease lives (default 60 s): a miss whose handler
    /// takes longer is not stored.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.inner.get_mut().lease_ttl = ttl;
        self
    }

    /// The Pub/Sub channel every invalidation is published on, for the
    /// in-process tiers of every process (default [`DEFAULT_CHANNEL`]).
    /// Every process over one Redis must use the same; an empty name
    /// publishes nothing (then no process may use an in-process tier).
    pub fn channel(mut self, channel: &str) -> Self {
        self.inner.get_mut().channel = std::sync::Arc::from(channel);
        self
    }

    /// The servers an in-process tier subscribes to invalidations through,
    /// tried in turn (for a cluster, any of its nodes: messages reach them
    /// all). Set by [`RedisStore::open`] and [`RedisStore::cluster`]; give
    /// them for a store made with [`RedisStore::new`] or
    /// [`RedisStore::from_cluster_client`] whose routes use the tier.
    pub fn subscribe_via(mut self, clients: impl IntoIterator<Item = redis::Client>) -> Self {
        self.inner.get_mut().subscribe_via = clients.into_iter().collect();
        self
    }
}

/// The sources of every script the store runs, loaded on each connection.
pub(crate) fn scripts() -> Vec<String> {
    vec![
        ENSURE_VERSIONS_CODE.clone(),
        STORE_CODE.clone(),
        INVALIDATE_CODE.to_owned(),
    ]
}

/// A server that is loading, read-only (a demoted master) or without its
/// master answers, but not as the master we had: like a dropped connection.
const NOT_OUR_MASTER: [&str; 3] = ["READONLY", "LOADING", "MASTERDOWN"];

/// Refusals of who we are or what we may do.
const DENIED: [&str; 3] = ["WRONGPASS", "NOAUTH", "NOPERM"];

/// Refusals of the command itself: sending it again cannot succeed.
const REJECTED: [&str; 4] = ["CROSSSLOT", "WRONGTYPE", "NOSCRIPT", "EXECABORT"];

pub(crate) fn backend(err: RedisError) -> StoreError {
    if err.kind() == redis::ErrorKind::AuthenticationFailed {
        return StoreError::Denied(err.to_string());
    }
    match by_code(err.code(), err.to_string()) {
        StoreError::Backend(message)
            if err.is_io_error()
                || err.is_connection_refusal()
                || err.is_connection_dropped()
                || err.is_timeout() =>
        {
            StoreError::Unreachable(message)
        }
        classified => classified,
    }
}

/// A server's refusal, as its error line (`WRONGTYPE Operation…`).
pub(crate) fn refused(line: &str) -> StoreError {
    by_code(line.split(' ').next(), line.to_owned())
}

/// What a refusal with `code` means for the store.
fn by_code(code: Option<&str>, message: String) -> StoreError {
    match code {
        Some(code) if DENIED.contains(&code) => StoreError::Denied(message),
        Some(code) if REJECTED.contains(&code) => StoreError::Rejected(message),
        Some(code) if NOT_OUR_MASTER.contains(&code) => StoreError::Unreachable(message),
        _ => StoreError::Backend(message),
    }
}

/// Sends `invalidation` as one script call.
async fn apply<C: ConnectionLike>(
    conn: &mut C,
    invalidation: &Invalidation,
    tombstone_ttl: Duration,
    channel: &str,
) -> Result<(), StoreError> {
    let mut invocation = INVALIDATE.prepare_invoke();
    for key in invalidation.deletes() {
        invocation.key(key);
    }
    for bump in invalidation.bumps() {
        invocation.key(bump.key());
    }
    invocation
        .arg(invalidation.deletes().len())
        .arg(invalidation.tombstone().as_ref())
        .arg(millis(tombstone_ttl))
        .arg(channel);
    for bump in invalidation.bumps() {
        invocation.arg(millis(bump.ttl()));
    }
    let _: i64 = invocation.invoke_async(conn).await.map_err(backend)?;
    Ok(())
}

/// A plain key's lookup: one command, the entry if there is one, else
/// this miss's lease (`SET key lease NX PX ttl GET`).
async fn plain_lookup<C: Connect>(
    conn: &mut C::Conn,
    key: &str,
    lease_ttl: Duration,
    until: Instant,
) -> Result<Observed, StoreError> {
    let lease = crate::entry::lease_bytes();
    // The arguments are copied out when sent: scoped, the future does not
    // keep them.
    let sent = {
        let ttl = Decimal::new(millis(lease_ttl));
        let args: [&[u8]; 7] = [
            b"SET",
            key.as_bytes(),
            &lease,
            b"NX",
            b"PX",
            ttl.as_ref(),
            b"GET",
        ];
        C::request(conn, &args, until)
    };
    let reply = sent.await?;
    Ok(match reply {
        Reply::Bulk(value) => Observed::Value(value),
        Reply::Nil => Observed::Value(Bytes::copy_from_slice(&lease)),
        Reply::Error(_) if reply.error_code() == Some(b"WRONGTYPE") => Observed::WrongType,
        // Full, without eviction: no lease, but hits still serve.
        // An empty key then reads absent, which no write matches.
        Reply::Error(_) if reply.error_code() == Some(b"OOM") => {
            match C::request(conn, &[b"GET", key.as_bytes()], until).await? {
                Reply::Bulk(value) => Observed::Value(value),
                Reply::Nil => Observed::Absent,
                other => return Err(unexpected("GET", other)),
            }
        }
        other => return Err(unexpected("SET", other)),
    })
}

/// A reply no command here expects: a refusal, or something else.
fn unexpected(command: &str, reply: Reply) -> StoreError {
    match reply {
        Reply::Error(line) => refused(&String::from_utf8_lossy(&line)),
        other => StoreError::Backend(format!("{command} answered {other:?}")),
    }
}

/// What a lookup saw, with what of it may be served under `epoch`.
fn looked_up(versions: Vec<Observed>, entry: Observed, epoch: Epoch) -> Lookup {
    let payload = unstamp(&entry, &epoch);
    Lookup::new(versions, entry)
        .with_payload(payload)
        .with_origin(epoch)
}

/// The version values this process last read, per version key, so that a
/// versioned lookup can read the versions and the entry under them in one
/// round trip. A value here is only a guess: the lookup checks it against
/// the versions it reads in the same trip. Bounded: cleared when full.
#[derive(Debug, Default)]
struct SeenVersions(std::sync::Mutex<std::collections::HashMap<String, Bytes>>);

/// How many version keys [`SeenVersions`] remembers before it starts over.
const SEEN_VERSIONS_CAP: usize = 4096;

impl SeenVersions {
    /// The values last read for `versions`, in order, as what a lookup
    /// expects to read again; false (and `into` left empty) when one is
    /// not known.
    fn get(&self, versions: &[super::VersionKey], into: &mut Vec<Observed>) -> bool {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for version in versions {
            match map.get(version.key()) {
                Some(value) => into.push(Observed::Value(value.clone())),
                None => {
                    into.clear();
                    return false;
                }
            }
        }
        true
    }

    fn remember(&self, versions: &[super::VersionKey], values: &[Bytes]) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() + versions.len() > SEEN_VERSIONS_CAP {
            map.clear();
        }
        for (version, value) in versions.iter().zip(values) {
            match map.get_mut(version.key()) {
                Some(known) => *known = value.clone(),
                None => {
                    map.insert(version.key().to_owned(), value.clone());
                }
            }
        }
    }
}

/// A versioned lookup with plain reads, one command in the steady state:
/// one `MGET` of the version keys and of the entry under the versions this
/// process saw last. When the versions read are those, the entry read is
/// current; after a bump (or on a first lookup) a second command, a `GET`,
/// reads the entry under the new versions. A missing version
/// key is created by a script, and then no entry can exist under it.
/// Every command names its keys (no key is built inside Redis).
async fn versioned_lookup<C: Connect>(
    conn: &mut C::Conn,
    seen_versions: &SeenVersions,
    key: &CacheKey,
    until: Instant,
) -> Result<(Vec<Observed>, Observed), StoreError> {
    let versions = key.versions();
    // The versions this process read last, until the reply says otherwise.
    let mut current = Vec::with_capacity(versions.len());
    let guessed = seen_versions.get(versions, &mut current);
    // The arguments are copied out when sent: scoped, the future does not
    // keep them (the entry key alone is 256 bytes on the stack).
    let sent = {
        let mut entry_key = KeyBuf::new();
        if guessed {
            let _ = key.write_entry_key(values(&current), &mut entry_key);
        }
        // A group has at most two version keys (its own and a scope's): the
        // command's arguments then fit on the stack.
        let mut few: [&[u8]; 4] = [b"MGET", b"", b"", b""];
        let mut many = Vec::new();
        let mget: &[&[u8]] = if versions.len() <= 2 {
            for (slot, version) in few[1..].iter_mut().zip(versions) {
                *slot = version.key().as_bytes();
            }
            let mut len = versions.len() + 1;
            if guessed {
                few[len] = entry_key.as_bytes();
                len += 1;
            }
            &few[..len]
        } else {
            many.push(&b"MGET"[..]);
            many.extend(versions.iter().map(|version| version.key().as_bytes()));
            if guessed {
                many.push(entry_key.as_bytes());
            }
            &many
        };
        C::request(conn, mget, until)
    };
    // MGET answers nil for a missing key and for one of another type alike.
    let replies = match sent.await? {
        Reply::Array(replies) => replies,
        other => return Err(unexpected("MGET", other)),
    };
    let mut replies = replies.into_iter();
    let mut matched = guessed;
    let mut read = 0;
    for reply in replies.by_ref().take(versions.len()) {
        let Reply::Bulk(value) = reply else { break };
        // Remembered values are copies of their own, not slices of the
        // reply: one that reads as remembered is kept as it is.
        match current.get_mut(read) {
            Some(Observed::Value(seen)) if *seen == value => {}
            Some(slot) => {
                matched = false;
                *slot = Observed::Value(Bytes::copy_from_slice(&value));
            }
            None => {
                matched = false;
                current.push(Observed::Value(Bytes::copy_from_slice(&value)));
            }
        }
        read += 1;
    }
    current.truncate(read);
    if current.len() < versions.len() {
        // Rare (a version key new or lost): boxed, so that the hit's
        // future does not carry the script call's.
        let created = Box::pin(ensure_versions::<C>(conn, versions, until)).await?;
        seen_versions.remember(versions, &created);
        return Ok((
            created.into_iter().map(Observed::Value).collect(),
            Observed::Absent,
        ));
    }
    // An entry key of another type reads absent: the write replaces it.
    let entry = match matched {
        true => match replies.next() {
            Some(Reply::Bulk(value)) => Some(value),
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
            seen_versions.remember(versions, &read);
            let sent = {
                let mut entry_key = KeyBuf::new();
                let _ = key.write_entry_key(values(&current), &mut entry_key);
                C::request(conn, &[b"GET", entry_key.as_bytes()], until)
            };
            match sent.await? {
                Reply::Bulk(value) => Some(value),
                Reply::Nil => None,
                other => return Err(unexpected("GET", other)),
            }
        }
    };
    let entry = entry.map_or(Observed::Absent, Observed::Value);
    Ok((current, entry))
}

/// Creates the version keys of `versions` that are missing (at a number
/// never used before: see `ENSURE_VERSIONS`) and reads them all, by `until`.
async fn ensure_versions<C: Connect>(
    conn: &mut C::Conn,
    versions: &[super::VersionKey],
    until: Instant,
) -> Result<Vec<Bytes>, StoreError> {
    let mut invocation = ENSURE_VERSIONS.prepare_invoke();
    for version in versions {
        invocation.key(version.key()).arg(millis(version.ttl()));
    }
    let created: Vec<Vec<u8>> =
        match tokio::time::timeout_at(until, invocation.invoke_async(conn)).await {
            Ok(created) => created.map_err(backend)?,
            Err(_) => return Err(StoreError::Timeout),
        };
    Ok(created.into_iter().map(Bytes::from).collect())
}

/// The values of the versions a lookup read (all values: a missing one
/// ends the read).
fn values(read: &[Observed]) -> impl Iterator<Item = &[u8]> {
    read.iter().filter_map(|read| match read {
        Observed::Value(value) => Some(&value[..]),
        _ => None,
    })
}

/// How long an entry key may be and still be written on the stack.
const SHORT_KEY: usize = 256;

/// An entry key written for one command: on the stack when it is short
/// (a namespace, a template, versions and two hashes usually are).
struct KeyBuf {
    short: [u8; SHORT_KEY],
    len: usize,
    long: Option<Vec<u8>>,
}

impl KeyBuf {
    fn new() -> Self {
        Self {
            short: [0; SHORT_KEY],
            len: 0,
            long: None,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match &self.long {
            Some(long) => long,
            None => &self.short[..self.len],
        }
    }
}

impl std::io::Write for KeyBuf {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let end = self.len + bytes.len();
        match &mut self.long {
            Some(long) => long.extend_from_slice(bytes),
            None if end <= SHORT_KEY => {
                self.short[self.len..end].copy_from_slice(bytes);
                self.len = end;
            }
            None => {
                let mut long = Vec::with_capacity(2 * end);
                long.extend_from_slice(&self.short[..self.len]);
                long.extend_from_slice(bytes);
                self.long = Some(long);
            }
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The entry key of a versioned key under these versions, written into a
/// command as it is built (no string of its own). Lookups and writes both
/// name the entry this way, byte for byte.
struct EntryKey<'a, V>(&'a CacheKey, &'a [V]);

impl<V: AsRef<[u8]>> redis::ToRedisArgs for EntryKey<'_, V> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        let EntryKey(key, versions) = self;
        let mut arg = out.writer_for_next_arg();
        let _ = key.write_entry_key(versions.iter().map(AsRef::as_ref), &mut arg);
    }
}

impl<C: Connect> Link<C> {
    /// `invalidation` as one script call, tried twice within the write
    /// deadline: a dropped or stalled connection fails the first, and the
    /// second goes over a fresh one.
    fn send(&self, invalidation: Invalidation) -> StoreFuture<()> {
        let (source, budget, tombstone_ttl) =
            (self.source.clone(), self.write_deadline, self.tombstone_ttl);
        let channel = self.channel.clone();
        Box::pin(async move {
            let until = tokio::time::Instant::now() + budget;
            let send = |deadline, invalidation: Invalidation| {
                let (source, channel) = (source.clone(), channel.clone());
                async move {
                    let apply = |mut conn: C::Conn, _| async move {
                        apply(&mut conn, &invalidation, tombstone_ttl, &channel).await
                    };
                    on_connection(&source, deadline, apply).await
                }
            };
            let first = send(budget / 2, invalidation.clone()).await;
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match first {
                // The first send may still land late: the second carries a
                // tombstone of its own.
                Err(StoreError::Unreachable(_) | StoreError::Timeout) if !left.is_zero() => {
                    send(left, invalidation.reissued()).await
                }
                other => other,
            }
        })
    }

    /// One script call per slot, all under way at once; the first error,
    /// if any part failed.
    async fn send_by_slot(&self, invalidation: &Invalidation) -> Result<(), StoreError> {
        let sends = invalidation
            .split_by_slot()
            .into_iter()
            .map(|part| self.send(part))
            .collect();
        super::all(sends).await.into_iter().collect()
    }
}

/// Marks a value written under a known server epoch.
const STAMP: u8 = 0x04;

/// `value` stamped with the epoch of the connection that writes it.
fn stamp(value: &[u8], epoch: &Epoch) -> Bytes {
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
fn unstamp(raw: &Observed, epoch: &Epoch) -> Observed {
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

/// Runs `op` on a connection from `source`, all within `deadline`. A
/// connection that failed or stalled is replaced for the next operation
/// (a silently dead peer, a demoted master), and the new one reads the
/// server's epoch again.
async fn on_connection<C, T, F, Fut>(source: &C, deadline: Duration, op: F) -> Result<T, StoreError>
where
    C: Connect,
    F: FnOnce(C::Conn, Epoch) -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    on_live(source, deadline, source.live(), op).await
}

/// [`on_connection`], given what `source.live()` returned.
async fn on_live<C, T, F, Fut>(
    source: &C,
    deadline: Duration,
    live: Option<(C::Conn, Epoch, u64)>,
    op: F,
) -> Result<T, StoreError>
where
    C: Connect,
    F: FnOnce(C::Conn, Epoch) -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let generation = std::sync::atomic::AtomicU64::new(u64::MAX);
    let attempt = async {
        let (conn, epoch, used) = match live {
            Some(live) => live,
            None => source.connect().await?,
        };
        generation.store(used, std::sync::atomic::Ordering::Relaxed);
        op(conn, epoch).await
    };
    let result = match tokio::time::timeout(deadline, attempt).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Timeout),
    };
    settle(
        source,
        generation.load(std::sync::atomic::Ordering::Relaxed),
        result,
    )
}

/// A lookup, run like [`on_connection`]; but on a live connection that
/// [keeps its requests' deadlines](Connect::keeps_deadlines), without a
/// timer of its own: a hit then costs no timer at all. `op` bounds
/// anything else it awaits by the instant it is given.
///
/// The path is chosen before anything is boxed, and each path is boxed on
/// its own: the hit's future then holds none of the other path's timer
/// and connecting, small enough for the allocator's per-thread cache (one
/// future holding both was over 1 KiB: a locked arena, shared by the
/// threads, on every lookup).
fn lookup_on<C, T, F, Fut>(source: &C, deadline: Duration, op: F) -> StoreFuture<T>
where
    C: Connect,
    T: Send + 'static,
    F: FnOnce(C::Conn, Epoch, Instant) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, StoreError>> + Send,
{
    let until = Instant::now() + deadline;
    let source = source.clone();
    match source.live() {
        Some((conn, epoch, used)) if C::keeps_deadlines(&conn) => Box::pin(async move {
            let result = op(conn, epoch, until).await;
            settle(&source, used, result)
        }),
        live => Box::pin(async move {
            on_live(&source, deadline, live, |conn, epoch| {
                op(conn, epoch, until)
            })
            .await
        }),
    }
}

/// `result` of an operation on the connection of generation `used`, which
/// is replaced when it failed or stalled.
fn settle<C: Connect, T>(
    source: &C,
    used: u64,
    result: Result<T, StoreError>,
) -> Result<T, StoreError> {
    if matches!(
        result,
        Err(StoreError::Unreachable(_) | StoreError::Timeout)
    ) {
        source.broken(used);
    }
    result
}

/// What a plain lookup saw, as the store script's ARGV: (0 absent | 1
/// string | 2 other type, value).
fn seen_args(seen: &Observed) -> (i64, &[u8]) {
    match seen {
        Observed::Absent => (0, b""),
        Observed::Value(v) => (1, v),
        Observed::WrongType => (2, b""),
    }
}

fn millis(ttl: Duration) -> u64 {
    (ttl.as_millis() as u64).max(1)
}

impl<C: Connect> Store for Link<C> {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn lookup(&self, key: &CacheKey) -> StoreFuture<Lookup> {
        let (source, deadline) = (&self.source, self.deadline);
        match key {
            CacheKey::Plain(key) => {
                let (key, lease_ttl) = (key.clone(), self.lease_ttl);
                lookup_on(source, deadline, move |mut conn, epoch, until| async move {
                    let entry = plain_lookup::<C>(&mut conn, &key, lease_ttl, until).await?;
                    Ok(looked_up(Vec::new(), entry, epoch))
                })
            }
            versioned @ CacheKey::Versioned { .. } => {
                let seen_versions = self.seen_versions.clone();
                let key = versioned.clone();
                lookup_on(source, deadline, move |mut conn, epoch, until| async move {
                    let (versions, entry) =
                        versioned_lookup::<C>(&mut conn, &seen_versions, &key, until).await?;
                    Ok(looked_up(versions, entry, epoch))
                })
            }
        }
    }

    fn store(
        &self,
        key: &CacheKey,
        seen: &Lookup,
        value: Bytes,
        ttl: Duration,
    ) -> StoreFuture<bool> {
        let mut invocation = STORE.prepare_invoke();
        match key {
            CacheKey::Plain(key) => {
                // Absent is what an evicted guard looks like: never matched.
                if *seen.entry() == Observed::Absent {
                    return Box::pin(async { Ok(false) });
                }
                let (state, current) = seen_args(seen.entry());
                invocation.key(key).arg("p");
                invocation.arg(state).arg(current);
            }
            CacheKey::Versioned { versions, .. } => {
                // A version the lookup did not read as a value cannot match.
                let Some(seen) = seen.version_values() else {
                    return Box::pin(async { Ok(false) });
                };
                if seen.len() != versions.len() {
                    return Box::pin(async { Ok(false) });
                }
                invocation.arg("v");
                for (version, seen) in versions.iter().zip(&seen) {
                    invocation.key(version.key());
                    invocation.arg(*seen).arg(millis(version.ttl()));
                }
                invocation.key(EntryKey(key, &seen));
            }
        }
        let (source, deadline) = (self.source.clone(), self.deadline);
        let origin = seen.origin().clone();
        Box::pin(async move {
            on_connection(&source, deadline, |mut conn, epoch| async move {
                // What the lookup saw belongs to another server lifetime.
                if origin != epoch {
                    return Ok(false);
                }
                // The value and TTL go last: the value is stamped with the
                // epoch it was read and written under.
                invocation
                    .arg(stamp(&value, &epoch).as_ref())
                    .arg(millis(ttl));
                let written: i64 = invocation.invoke_async(&mut conn).await.map_err(backend)?;
                Ok(written == 1)
            })
            .await
        })
    }

    /// One script call, or on a cluster one per slot, sent concurrently
    /// (a `CROSSSLOT` refusal teaches a store over a connection it did not
    /// know to be a cluster's to split from then on).
    fn invalidate(&self, invalidation: &Invalidation) -> StoreFuture<()> {
        if invalidation.is_empty() {
            return Box::pin(async { Ok(()) });
        }
        let link = self.clone();
        let invalidation = invalidation.clone();
        Box::pin(async move {
            if link.split.load(std::sync::atomic::Ordering::Relaxed) {
                return link.send_by_slot(&invalidation).await;
            }
            match link.send(invalidation.clone()).await {
                Err(StoreError::Rejected(msg)) if msg.contains("CROSSSLOT") => {
                    link.split.store(true, std::sync::atomic::Ordering::Relaxed);
                    link.send_by_slot(&invalidation.reissued()).await
                }
                other => other,
            }
        })
    }

    fn ping(&self) -> StoreFuture<()> {
        let (source, deadline) = (self.source.clone(), self.deadline);
        Box::pin(async move {
            on_connection(&source, deadline, |mut conn, _| async move {
                let _: String = redis::cmd("PING")
                    .query_async(&mut conn)
                    .await
                    .map_err(backend)?;
                Ok(())
            })
            .await
        })
    }

    fn tombstone_ttl(&self) -> Duration {
        self.tombstone_ttl
    }

    fn parts(&self, invalidation: &Invalidation) -> Option<Vec<Invalidation>> {
        if !self.split.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let parts = invalidation.split_by_slot();
        (parts.len() > 1).then_some(parts)
    }
}

impl<C: Connect> Store for RedisStore<C> {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn lookup(&self, key: &CacheKey) -> StoreFuture<Lookup> {
        self.inner.lookup(key)
    }

    fn store(
        &self,
        key: &CacheKey,
        seen: &Lookup,
        value: Bytes,
        ttl: Duration,
    ) -> StoreFuture<bool> {
        self.inner.store(key, seen, value, ttl)
    }

    fn invalidate(&self, invalidation: &Invalidation) -> StoreFuture<()> {
        self.inner.invalidate(invalidation)
    }

    fn ping(&self) -> StoreFuture<()> {
        self.inner.ping()
    }

    fn parts(&self, invalidation: &Invalidation) -> Option<Vec<Invalidation>> {
        self.inner.parts(invalidation)
    }

    fn tombstone_ttl(&self) -> Duration {
        self.inner.tombstone_ttl()
    }

    fn longest_entry_life(&self, life: Duration) {
        self.inner.longest_entry_life(life);
    }

    /// Subscribes to the store's channel, when it publishes and knows a
    /// server to subscribe through.
    #[cfg(feature = "tier")]
    fn watch(&self, watcher: crate::store::tier::Watcher) -> Option<crate::store::tier::WatchTask> {
        let link = self.inner.get_ref();
        if link.channel.is_empty() || link.subscribe_via.is_empty() {
            return None;
        }
        Some(super::subscribe::task(
            link.subscribe_via.clone(),
            link.channel.clone(),
            watcher,
        ))
    }

    fn health(&self) -> StoreHealth {
        let mut health = self.inner.health();
        health.persistence = self.inner.get_ref().source.persistence();
        health
    }
}

#[cfg(test)]
mod tests {
    //! Exact Redis commands per request, through the layers, on a mock
    //! connection: a hit is one round trip, item or list alike.

    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::Full;
    use redis::Value;
    use tower::{Layer, Service, ServiceExt};

    use super::*;
    use crate::{CacheLayer, InvalidateLayer, Policy, Route, Rule};

    fn policy(store: impl Store) -> Policy {
        Policy::builder()
            .store(store)
            .route(
                Route::get("/persons/{id}")
                    .key("person:{id}")
                    .ttl(Duration::from_secs(300)),
            )
            .route(
                Route::get("/persons")
                    .key("persons:list:v{version}:{query_hash}")
                    .versioned_by("persons:list"),
            )
            .on(Rule::new("POST /persons").bump("persons:list"))
            .on(Rule::new("PATCH /persons/{id}")
                .purge("GET /persons/{id}")
                .bump("persons:list"))
            .build()
            .unwrap()
    }

    /// The entry `policy()` serves to a GET of `uri`.
    fn entry_for(uri: &str) -> Bytes {
        let request = Request::get(uri).body(()).unwrap();
        crate::bench_support::encode_entry_for(
            &policy(crate::store::MemoryStore::new()),
            &request,
            Bytes::from_static(b"{}"),
        )
        .unwrap()
    }

    fn entry() -> Bytes {
        entry_for("/persons")
    }

    async fn get<C: ConnectionLike + Clone + Send + Sync + 'static>(
        conn: C,
        uri: &str,
    ) -> Response<crate::cache::ResponseBody<Full<Bytes>>> {
        service(conn)
            .oneshot(Request::get(uri).body(()).unwrap())
            .await
            .unwrap()
    }

    /// The cache layer of `policy()` over a store on `conn`, in front of a
    /// handler that answers `{}` as JSON.
    fn service<C: ConnectionLike + Clone + Send + Sync + 'static>(
        conn: C,
    ) -> impl Service<
        Request<()>,
        Response = Response<crate::cache::ResponseBody<Full<Bytes>>>,
        Error = Infallible,
    > + Clone {
        let handler = tower::service_fn(|_req: Request<()>| async {
            let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok::<_, Infallible>(response)
        });
        CacheLayer::new(policy(RedisStore::new(conn))).layer(handler)
    }

    fn list_key_parts() -> (String, String) {
        let query_hash = crate::key::QueryRule::hash(&[]);
        (
            "{app:persons:list}:persons:list:v".to_owned(),
            format!(":{query_hash}"),
        )
    }

    /// A connection that keeps its requests' deadlines, as the lookup
    /// wire does: its lookups take the path without a timer.
    #[derive(Clone, Default)]
    struct Deadlined(Recorder);

    impl Connect for Deadlined {
        type Conn = Recorder;

        fn connect(&self) -> crate::store::connect::Connecting<Recorder> {
            let conn = self.0.clone();
            Box::pin(async move { Ok((conn, Epoch::new(), 0)) })
        }

        fn live(&self) -> Option<(Recorder, Epoch, u64)> {
            Some((self.0.clone(), Epoch::new(), 0))
        }

        fn keeps_deadlines(_: &Recorder) -> bool {
            true
        }
    }

    /// A hit's lookup is one boxed future: it must stay within the sizes
    /// the allocator serves from each thread's own cache (glibc's tcache:
    /// up to 1032 bytes). Over it (it was 1056 bytes when the timed path
    /// shared the future), every lookup took the arena lock that threads
    /// share and consolidated its free chunks.
    #[test]
    fn a_lookup_future_fits_the_allocators_thread_cache() {
        const THREAD_CACHE_MAX: usize = 1024;
        let store = RedisStore::new(Deadlined::default());
        let link = store.inner.get_ref();
        let plain = CacheKey::Plain("app:person:42".to_owned());
        let versioned = CacheKey::Versioned {
            versions: vec![crate::store::VersionKey::new(
                "{app:persons:list}:ver".to_owned(),
                Duration::from_secs(600),
            )],
            prefix: "{app:persons:list}:persons:list:v".to_owned(),
            suffix: ":abc".to_owned(),
        };
        for key in [plain, versioned] {
            let lookup = link.lookup(&key);
            let size = std::mem::size_of_val(&*lookup);
            assert!(
                size <= THREAD_CACHE_MAX,
                "a lookup of {key:?} is a {size}-byte future"
            );
        }
    }

    #[test]
    fn entry_keys_read_the_same_on_the_stack_and_past_it() {
        use std::io::Write;
        for parts in [
            vec![&b"{app:list}:list:v"[..], b"17", b":abc"],
            vec![&[b'a'; SHORT_KEY - 1][..], b"1", b":x"],
            vec![&[b'b'; 3 * SHORT_KEY][..], b"2"],
        ] {
            let mut buf = KeyBuf::new();
            for part in &parts {
                buf.write_all(part).unwrap();
            }
            assert_eq!(buf.as_bytes(), parts.concat());
        }
    }

    #[tokio::test]
    async fn an_item_hit_is_one_command() {
        let recorder = Recorder::answering([Value::BulkString(entry_for("/persons/42").to_vec())]);
        let response = get(recorder.clone(), "/persons/42").await;
        assert_eq!(response.headers()["x-cache"], "HIT");
        let commands = recorder.commands();
        assert_eq!(commands.len(), 1, "{commands:?}");
        assert_eq!(commands[0][..2], ["SET", "app:person:42"]);
        assert_eq!(commands[0][3..], ["NX", "PX", "60000", "GET"]);
    }

    #[tokio::test]
    async fn concurrent_hits_on_a_batched_connection_share_round_trips() {
        const N: usize = 64;
        let recorder = Recorder::answering(
            (0..N).map(|id| Value::BulkString(entry_for(&format!("/persons/{id}")).to_vec())),
        );
        let conn = crate::store::Batched::new(recorder.clone());
        // All runnable at once, as after one poll of many sockets.
        let local = tokio::task::LocalSet::new();
        let requests: Vec<_> = (0..N)
            .map(|id| {
                let (conn, uri) = (conn.clone(), format!("/persons/{id}"));
                local.spawn_local(async move { get(conn, &uri).await })
            })
            .collect();
        local
            .run_until(async {
                for request in requests {
                    assert_eq!(request.await.unwrap().headers()["x-cache"], "HIT");
                }
            })
            .await;
        // The idle connection sends what is queued when its flush runs;
        // what queued after that goes out as the next batch.
        let trips = recorder.trips();
        let sizes: Vec<usize> = trips.iter().map(Vec::len).collect();
        assert!(sizes.len() <= 2, "{N} lookups in batches of {sizes:?}");
        let keys: Vec<&str> = trips
            .iter()
            .flatten()
            .map(|command| command[1].as_str())
            .collect();
        let expected: Vec<String> = (0..N).map(|id| format!("app:person:{id}")).collect();
        assert_eq!(keys, expected, "in the order they were queued");
    }

    #[tokio::test]
    async fn a_list_hit_is_one_mget_once_the_version_is_known() {
        let (prefix, suffix) = list_key_parts();
        let entry_key = format!("{prefix}17{suffix}");
        let version = || Value::BulkString(b"17".to_vec());
        let entry = || Value::BulkString(entry().to_vec());
        // The first lookup learns the version, then reads the entry under
        // it; the second reads both at once.
        let recorder = Recorder::answering([
            Value::Array(vec![version()]),
            entry(),
            Value::Array(vec![version(), entry()]),
        ]);
        two_list_hits(&recorder).await;
        assert_eq!(
            recorder.commands(),
            [
                vec!["MGET", "{app:persons:list}:ver"],
                vec!["GET", &entry_key],
                vec!["MGET", "{app:persons:list}:ver", &entry_key],
            ]
        );
        assert_eq!(recorder.trips().len(), 3, "one round trip per command");
    }

    #[tokio::test]
    async fn after_a_bump_the_entry_is_read_under_the_new_version() {
        let (prefix, suffix) = list_key_parts();
        let bulk = |b: &[u8]| Value::BulkString(b.to_vec());
        let recorder = Recorder::answering([
            Value::Array(vec![bulk(b"17")]),
            bulk(&entry()),
            // Bumped by another process: the guess misses, a second GET.
            Value::Array(vec![bulk(b"18"), Value::Nil]),
            bulk(&entry()),
        ]);
        two_list_hits(&recorder).await;
        let commands = recorder.commands();
        assert_eq!(commands.len(), 4, "{commands:?}");
        assert_eq!(commands[2][2], format!("{prefix}17{suffix}"));
        assert_eq!(commands[3], ["GET", &format!("{prefix}18{suffix}")]);
    }

    #[tokio::test]
    async fn a_missing_version_is_created_by_a_script_and_stored_under() {
        let (prefix, suffix) = list_key_parts();
        let recorder = Recorder::answering([
            Value::Array(vec![Value::Nil]),
            Value::Array(vec![Value::BulkString(b"1795331671440125".to_vec())]),
        ]);
        let response = service(recorder.clone())
            .oneshot(Request::get("/persons").body(()).unwrap())
            .await
            .unwrap();
        let status = response.headers()["cache-status"].to_str().unwrap();
        assert!(status.ends_with("stored"), "{status}");
        let commands = recorder.commands();
        assert_eq!(commands.len(), 3, "{commands:?}");
        assert_eq!(commands[0], ["MGET", "{app:persons:list}:ver"]);
        assert_eq!(
            commands[1],
            [
                "EVALSHA",
                ENSURE_VERSIONS.get_hash(),
                "1",
                "{app:persons:list}:ver",
                "60000"
            ]
        );
        // The write names every key it touches: the version, then the entry.
        assert_eq!(
            commands[2][..5],
            [
                "EVALSHA",
                STORE.get_hash(),
                "2",
                "{app:persons:list}:ver",
                &format!("{prefix}1795331671440125{suffix}")
            ]
        );
        assert_eq!(commands[2][5..8], ["v", "1795331671440125", "60000"]);
    }

    /// Two requests for `/persons` over one store on `recorder`: both hits.
    async fn two_list_hits(recorder: &Recorder) {
        let service = service(recorder.clone());
        for _ in 0..2 {
            let response = service
                .clone()
                .oneshot(Request::get("/persons").body(()).unwrap())
                .await
                .unwrap();
            assert_eq!(response.headers()["x-cache"], "HIT");
        }
    }

    /// Records every round trip (a command, or a pipeline of them); answers
    /// commands with the replies queued by `answering`, in order, then
    /// with nil for `GET`/`SET` (an empty key) and 1 for anything else.
    #[derive(Clone, Default)]
    struct Recorder {
        trips: std::sync::Arc<std::sync::Mutex<Vec<Vec<Vec<String>>>>>,
        answers: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Value>>>,
    }

    impl Recorder {
        fn answering(replies: impl IntoIterator<Item = Value>) -> Self {
            let recorder = Self::default();
            recorder.answers.lock().unwrap().extend(replies);
            recorder
        }

        /// Every command sent, in order.
        fn commands(&self) -> Vec<Vec<String>> {
            self.trips
                .lock()
                .unwrap()
                .iter()
                .flatten()
                .cloned()
                .collect()
        }

        /// The commands of each round trip.
        fn trips(&self) -> Vec<Vec<Vec<String>>> {
            self.trips.lock().unwrap().clone()
        }

        fn answer(&self, cmd: &redis::Cmd) -> (Vec<String>, Value) {
            let args: Vec<String> = cmd
                .args_iter()
                .map(|arg| match arg {
                    redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    _ => "<other>".to_owned(),
                })
                .collect();
            let reply = match self.answers.lock().unwrap().pop_front() {
                Some(reply) => reply,
                None if args[0] == "GET" || args[0] == "SET" => Value::Nil,
                None => Value::Int(1),
            };
            (args, reply)
        }
    }

    impl ConnectionLike for Recorder {
        fn req_packed_command<'a>(
            &'a mut self,
            cmd: &'a redis::Cmd,
        ) -> redis::RedisFuture<'a, Value> {
            let (args, reply) = self.answer(cmd);
            self.trips.lock().unwrap().push(vec![args]);
            Box::pin(async move { Ok(reply) })
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            pipeline: &'a redis::Pipeline,
            _offset: usize,
            _count: usize,
        ) -> redis::RedisFuture<'a, Vec<Value>> {
            let (commands, replies): (Vec<_>, Vec<_>) =
                pipeline.cmd_iter().map(|cmd| self.answer(cmd)).unzip();
            self.trips.lock().unwrap().push(commands);
            Box::pin(async move { Ok(replies) })
        }

        fn get_db(&self) -> i64 {
            0
        }
    }

    /// A connection that never answers.
    #[derive(Clone)]
    struct Hang;

    impl ConnectionLike for Hang {
        fn req_packed_command<'a>(
            &'a mut self,
            _: &'a redis::Cmd,
        ) -> redis::RedisFuture<'a, Value> {
            Box::pin(std::future::pending())
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            _: &'a redis::Pipeline,
            _: usize,
            _: usize,
        ) -> redis::RedisFuture<'a, Vec<Value>> {
            Box::pin(std::future::pending())
        }

        fn get_db(&self) -> i64 {
            0
        }
    }

    #[tokio::test]
    async fn a_dropped_probe_never_leaves_the_circuit_half_open() {
        let store = RedisStore::new(Hang)
            .deadline(Duration::from_millis(5))
            .breaker(
                BreakerConfig::default()
                    .failure_threshold(1)
                    .unwrap()
                    .open_for(Duration::from_millis(20)),
            );
        let key = CacheKey::Plain("k".into());
        assert_eq!(store.lookup(&key).await, Err(StoreError::Timeout));
        assert_eq!(store.lookup(&key).await, Err(StoreError::CircuitOpen));
        tokio::time::sleep(Duration::from_millis(30)).await;
        // The probe's request is cancelled before the store answers.
        // Polled once (it is pending: the store never answers), then dropped:
        // no timer races the store's own deadline on a loaded machine.
        let mut probe = Box::pin(store.lookup(&key));
        let pending = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(probe.as_mut(), cx).is_pending())
        })
        .await;
        assert!(pending, "the probe answered before the store did");
        drop(probe);
        // The next request probes, instead of being refused for ever.
        assert_eq!(store.lookup(&key).await, Err(StoreError::Timeout));
    }

    #[tokio::test]
    async fn a_miss_is_a_lease_then_one_write_conditional_on_it() {
        let recorder = Recorder::default();
        let response = get(recorder.clone(), "/persons/42").await;
        let status = response.headers()["cache-status"].to_str().unwrap();
        assert!(status.ends_with("stored"), "{status}");
        let commands = recorder.commands();
        assert_eq!(commands.len(), 2, "{commands:?}");
        assert_eq!(commands[0][..2], ["SET", "app:person:42"]);
        let lease = &commands[0][2];
        assert_eq!(
            commands[1][..5],
            ["EVALSHA", STORE.get_hash(), "1", "app:person:42", "p"]
        );
        // What the lookup saw (a string, our lease), then the value and TTL.
        assert_eq!(commands[1][5..7], ["1", lease.as_str()]);
        assert_eq!(commands[1][8], "300000");
    }

    #[tokio::test]
    async fn an_invalidation_through_the_layer_is_one_evalsha() {
        let recorder = Recorder::default();
        let handler = tower::service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        });
        let policy = policy(RedisStore::new(recorder.clone()));
        let service = InvalidateLayer::new(policy.clone()).layer(handler);
        let response = service
            .oneshot(Request::patch("/persons/42").body(()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(policy.stats().invalidations().applied, 1);
        let commands = recorder.commands();
        assert_eq!(commands.len(), 1, "{commands:?}");
        assert_eq!(
            commands[0][..6],
            [
                "EVALSHA",
                INVALIDATE.get_hash(),
                "2",
                "app:person:42",
                "{app:persons:list}:ver",
                "1"
            ]
        );
    }

    #[tokio::test]
    async fn a_write_through_the_cache_layer_is_one_evalsha() {
        let recorder = Recorder::default();
        let handler = tower::service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        });
        let policy = policy(RedisStore::new(recorder.clone()));
        // Both layers of one policy stacked: only the outer invalidates.
        let service = InvalidateLayer::new(policy.clone())
            .layer(CacheLayer::new(policy.clone()).layer(handler));
        service
            .oneshot(Request::patch("/persons/42").body(()).unwrap())
            .await
            .unwrap();
        assert_eq!(policy.stats().invalidations().applied, 1);
        let commands = recorder.commands();
        assert_eq!(commands.len(), 1, "{commands:?}");
        assert_eq!(commands[0][..2], ["EVALSHA", INVALIDATE.get_hash()]);
    }

    #[tokio::test]
    async fn a_failed_mutation_sends_nothing() {
        let recorder = Recorder::default();
        let handler = tower::service_fn(|_req: Request<()>| async {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            Ok::<_, Infallible>(response)
        });
        let service = CacheLayer::new(policy(RedisStore::new(recorder.clone()))).layer(handler);
        service
            .oneshot(Request::post("/persons").body(()).unwrap())
            .await
            .unwrap();
        assert!(recorder.commands().is_empty());
    }
}
