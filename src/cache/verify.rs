//! Sampled verification of hits ([`Route::verify`](crate::Route::verify)):
//! how many checks run at once, and when the handler's response differs
//! from the entry. Which hits are checked: [`crate::sampling`].

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
    fn slots_are_bounded_and_given_back() {
        let held: Vec<Slot> = std::iter::from_fn(Slot::take).take(100).collect();
        assert!(held.len() <= MAX_VERIFYING);
        assert!(Slot::take().is_none() || held.len() < MAX_VERIFYING);
        drop(held);
        assert!(Slot::take().is_some());
    }
}
