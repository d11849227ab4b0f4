//! The Lua scripts of the store, and the calls that run them. Every
//! script names all the keys it touches in KEYS (so a cluster routes it),
//! and all are loaded on every (re)connection, so no request pays a
//! `NOSCRIPT` round trip.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionLike;
use redis::Script;

use super::errors::{backend, refusal};
use crate::stats::telemetry::warn_limited;
use crate::store::{Invalidation, StoreError, VersionKey};

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
pub(super) static ENSURE_VERSIONS: LazyLock<Script> =
    LazyLock::new(|| Script::new(&ENSURE_VERSIONS_CODE));

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
pub(super) static STORE: LazyLock<Script> = LazyLock::new(|| Script::new(&STORE_CODE));

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
pub(super) static INVALIDATE: LazyLock<Script> = LazyLock::new(|| Script::new(INVALIDATE_CODE));

/// The sources of every script the store runs, loaded on each connection.
pub(crate) fn scripts() -> Vec<String> {
    vec![
        ENSURE_VERSIONS_CODE.clone(),
        STORE_CODE.clone(),
        INVALIDATE_CODE.to_owned(),
    ]
}

/// Sends `invalidation` as one script call. With `confirm`, the script
/// and a `WAIT` for that many replicas go as one pipeline (one round trip
/// to the master of the invalidation's slot), and an invalidation fewer
/// replicas acknowledged within `within` is [`StoreError::Unconfirmed`].
pub(super) async fn apply<C: ConnectionLike>(
    conn: &mut C,
    invalidation: &Invalidation,
    tombstone_ttl: Duration,
    channel: &str,
    confirm: usize,
    within: Duration,
) -> Result<(), StoreError> {
    let mut call = redis::cmd("EVALSHA");
    call.arg(INVALIDATE.get_hash())
        .arg(invalidation.deletes().len() + invalidation.bumps().len());
    for key in invalidation.deletes() {
        call.arg(key);
    }
    for bump in invalidation.bumps() {
        call.arg(bump.key());
    }
    call.arg(invalidation.deletes().len())
        .arg(invalidation.tombstone().as_ref())
        .arg(millis(tombstone_ttl))
        .arg(channel);
    for bump in invalidation.bumps() {
        call.arg(millis(bump.ttl()));
    }
    let mut sent = redis::pipe();
    sent.ignore_errors().add_command(call);
    if confirm > 0 {
        sent.cmd("WAIT").arg(confirm).arg(millis(within));
    }
    let mut replies: Vec<redis::Value> = sent.query_async(conn).await.map_err(backend)?;
    if matches!(replies.first(), Some(redis::Value::ServerError(err)) if err.code() == "NOSCRIPT") {
        // A server that lost its script cache (a restarted node, a
        // promoted replica): loaded, then sent again.
        let mut load = redis::cmd("SCRIPT");
        load.arg("LOAD").arg(INVALIDATE_CODE);
        let _: String = load.query_async(conn).await.map_err(backend)?;
        replies = sent.query_async(conn).await.map_err(backend)?;
    }
    let mut replies = replies.into_iter();
    refusal(replies.next().ok_or_else(|| no_reply("EVALSHA"))).map_err(backend)?;
    if confirm == 0 {
        return Ok(());
    }
    let acknowledged: usize = match refusal(replies.next().ok_or_else(|| no_reply("WAIT"))) {
        Ok(reply) => redis::from_redis_value(reply).unwrap_or(0),
        // Confirming only strengthens the guarantee: without it, what one
        // node gives (see `WAIT_DENIED`).
        Err(err) if err.code() == Some("NOPERM") => {
            warn_limited!("{WAIT_DENIED}");
            return Ok(());
        }
        Err(err) => return Err(backend(err)),
    };
    if acknowledged < confirm {
        return Err(StoreError::Unconfirmed(format!(
            "{acknowledged} of {confirm} replicas acknowledged within {} ms",
            millis(within)
        )));
    }
    Ok(())
}

/// What a store whose user may not run `WAIT` cannot keep.
const WAIT_DENIED: &str = "the Redis user may not run WAIT (grant +wait): invalidations \
    are not confirmed on replicas, so a failover may lose one";

/// A pipeline that answered fewer replies than it sent commands.
fn no_reply(command: &str) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "no reply",
        command.to_owned(),
    ))
}

/// Creates the version keys of `versions` that are missing (at a number
/// never used before: see `ENSURE_VERSIONS`) and reads them all.
pub(super) async fn ensure_versions<C: ConnectionLike>(
    conn: &mut C,
    versions: &[VersionKey],
) -> Result<Vec<Bytes>, StoreError> {
    let mut invocation = ENSURE_VERSIONS.prepare_invoke();
    for version in versions {
        invocation.key(version.key()).arg(millis(version.ttl()));
    }
    let created: Vec<Vec<u8>> = invocation.invoke_async(conn).await.map_err(backend)?;
    Ok(created.into_iter().map(Bytes::from).collect())
}

/// A TTL in whole milliseconds, at least 1 (Redis refuses `PX 0`).
pub(super) fn millis(ttl: Duration) -> u64 {
    (ttl.as_millis() as u64).max(1)
}
