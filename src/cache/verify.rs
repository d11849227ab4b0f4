//! Sampled verification of hits ([`Route::verify`](crate::Route::verify)):
//! which hits are checked, how many checks run at once, and when the
//! handler's response differs from the entry.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::entry::Entry;

/// The most verifications that run at once in a process; a sampled hit
/// beyond it is not checked.
const MAX_VERIFYING: usize = 16;

static VERIFYING: AtomicUsize = AtomicUsize::new(0);

/// One of the process's [`MAX_VERIFYING`] places, held while a
/// verification runs.
pub(crate) struct Slot(());

impl Slot {
    /// A free place, when there is one.
    pub(crate) fn take() -> Option<Self> {
        if VERIFYING.fetch_add(1, Ordering::AcqRel) >= MAX_VERIFYING {
            VERIFYING.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        VERIFYING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether this hit is one of the `rate` (0 to 1) that are checked: a
/// draw from a per-thread xorshift generator, so sampling takes no lock
/// and no system call.
pub(crate) fn sampled(rate: f64) -> bool {
    if rate <= 0.0 {
        return false;
    }
    if rate >= 1.0 {
        return true;
    }
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    let draw = STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    });
    // The top 53 bits as a fraction of 1.
    ((draw >> 11) as f64) / ((1u64 << 53) as f64) < rate
}

/// A non-zero seed that differs per thread and per process start.
fn seed() -> u64 {
    let local = 0u8;
    let address = std::ptr::addr_of!(local) as u64;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (address.rotate_left(32) ^ nanos) | 1
}

/// Whether `fresh` (the handler's response, as it would be stored) is the
/// response `stored` replays: the same status, the same stored headers and
/// the same body once decoded. The times an entry carries (stored at, its
/// TTL) do not count; `Date` and `Age` are never stored.
pub(crate) fn same_response(stored: &Entry, fresh: &Entry) -> bool {
    if stored.status != fresh.status || stored.headers != fresh.headers {
        return false;
    }
    if stored.coding.is_none() && fresh.coding.is_none() {
        return stored.body == fresh.body;
    }
    match (stored.clone().identity(), fresh.clone().identity()) {
        (Some(stored), Some(fresh)) => stored.body == fresh.body,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_samples_about_that_share_of_hits() {
        for rate in [0.01, 0.1, 0.5] {
            let draws = 200_000;
            let hits = (0..draws).filter(|_| sampled(rate)).count();
            let share = hits as f64 / draws as f64;
            assert!(
                (share - rate).abs() < rate * 0.2,
                "rate {rate}: sampled {share}"
            );
        }
        assert!(!(0..1000).any(|_| sampled(0.0)));
        assert!((0..1000).all(|_| sampled(1.0)));
    }

    #[test]
    fn slots_are_bounded_and_given_back() {
        let held: Vec<Slot> = std::iter::from_fn(Slot::take).take(100).collect();
        assert!(held.len() <= MAX_VERIFYING);
        assert!(Slot::take().is_none() || held.len() < MAX_VERIFYING);
        drop(held);
        assert!(Slot::take().is_some());
    }
}
