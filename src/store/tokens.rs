//! The guards a store writes at a key: a purge's tombstone and a miss's
//! lease, each unique to its call (and a lease to the store that minted
//! it), so a conditional write tells its own guard from any other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::entry::{FORMAT_LEASE, FORMAT_TOMBSTONE};

/// A tombstone unique to this call, so that a read which saw an earlier
/// tombstone cannot mistake this one for it.
pub(crate) fn tombstone() -> Bytes {
    token(FORMAT_TOMBSTONE)
}

/// A lease unique to this call: what a miss writes at an empty key, so its
/// conditional write has something of its own to compare against. A purge
/// overwrites it; an eviction removes it; either way the write fails.
pub(crate) fn lease() -> Bytes {
    token(FORMAT_LEASE)
}

fn token(format: u8) -> Bytes {
    Bytes::copy_from_slice(&token_bytes(format))
}

pub(crate) const TOKEN_LEN: usize = 29;

/// `format`, then what tells this process from any other (its id, when it
/// first minted a token, 64 random bits) and a counter: unique across
/// calls, processes, restarts and hosts. No clock is read per token: a
/// lease is minted per lookup.
fn token_bytes(format: u8) -> [u8; TOKEN_LEN] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = [0; TOKEN_LEN];
    out[0] = format;
    out[1..21].copy_from_slice(process());
    out[21..].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    out
}

/// What tells the leases one store mints from every other store's (in
/// this process or another).
pub(crate) type Minter = [u8; 20];

/// A minter no other store has.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn minter() -> Minter {
    let mut out = [0; 20];
    out.copy_from_slice(&token_bytes(FORMAT_LEASE)[9..]);
    out
}

/// A lease minted by `minter`, unique to this call, on the stack: a hit
/// never needs it as `Bytes`.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn lease_by(minter: &Minter) -> [u8; TOKEN_LEN] {
    let mut out = token_bytes(FORMAT_LEASE);
    out[1..21].copy_from_slice(minter);
    out
}

/// True for a miss's lease that a store other than `minter`'s minted:
/// another process is filling the entry.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn is_lease_of_another(raw: &[u8], minter: &Minter) -> bool {
    raw.len() == TOKEN_LEN && raw[0] == FORMAT_LEASE && raw[1..21] != minter[..]
}

/// True for a miss's lease, whichever store minted it.
pub(crate) fn is_lease(raw: &[u8]) -> bool {
    raw.len() == TOKEN_LEN && raw[0] == FORMAT_LEASE
}

/// What tells this process's tokens from any other's.
fn process() -> &'static [u8; 20] {
    static PROCESS: std::sync::OnceLock<[u8; 20]> = std::sync::OnceLock::new();
    PROCESS.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut out = [0; 20];
        out[..4].copy_from_slice(&std::process::id().to_be_bytes());
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        out[4..12].copy_from_slice(&started.to_be_bytes());
        // The standard library seeds each `RandomState` from the OS.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        out[12..].copy_from_slice(&random.to_be_bytes());
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{decode, Slot};

    #[test]
    fn tokens_are_unique_and_carry_their_format() {
        let minter = minter();
        let (a, b) = (lease_by(&minter), lease_by(&minter));
        assert_ne!(a, b);
        assert_eq!(a[..21], b[..21], "one minter, one prefix");
        assert_eq!(a[0], FORMAT_LEASE);
        assert_eq!(tombstone()[0], FORMAT_TOMBSTONE);
        assert!(!is_lease_of_another(&a, &minter));
        assert!(is_lease_of_another(&a, &super::minter()), "another store's");
        assert!(!is_lease_of_another(&tombstone(), &super::minter()));
    }

    #[test]
    fn tombstones_are_unique() {
        assert!(matches!(decode(tombstone()), Slot::Tombstone));
        assert_ne!(tombstone(), tombstone());
    }
}
