//! The clocks: the wall clock in unix milliseconds, read once per request
//! (paired with the monotonic clock per thread), and a clock shifted to
//! another's (the Redis server's).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `ms` on the clock `offset_ms` ahead of this one.
pub(crate) fn shifted(ms: u64, offset_ms: i64) -> u64 {
    (ms as i64).saturating_add(offset_ms).max(0) as u64
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How long a thread trusts its pairing of the monotonic clock with the
/// wall clock before it reads the wall clock again (so a stepped system
/// clock is followed within this).
const WALL_CLOCK_RESYNC: Duration = Duration::from_secs(1);

thread_local! {
    /// An instant and the wall clock (unix ms) read together.
    static WALL_CLOCK: std::cell::Cell<Option<(Instant, u64)>> = const { std::cell::Cell::new(None) };
}

/// The wall clock (unix ms) at `at`, an instant the caller read anyway: a
/// hit reads one clock, not two. Derived from a pairing of both clocks
/// that each thread renews every [`WALL_CLOCK_RESYNC`].
pub(crate) fn unix_ms_at(at: Instant) -> u64 {
    WALL_CLOCK.with(|pair| match pair.get() {
        Some((base, base_ms))
            if at >= base && at.saturating_duration_since(base) < WALL_CLOCK_RESYNC =>
        {
            base_ms + at.saturating_duration_since(base).as_millis() as u64
        }
        // An instant read before the pairing (a request that started before
        // this thread last paired the clocks, and was decided after) reads
        // from the same pairing: pairing again would move it past every
        // request still in flight, and each of them would pair again.
        Some((base, base_ms))
            if at < base && base.saturating_duration_since(at) < WALL_CLOCK_RESYNC =>
        {
            base_ms.saturating_sub(base.saturating_duration_since(at).as_millis() as u64)
        }
        _ => {
            let (now, now_ms) = (Instant::now(), unix_ms());
            pair.set(Some((now, now_ms)));
            now_ms.saturating_sub(now.saturating_duration_since(at).as_millis() as u64)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_that_started_before_the_pairing_read_from_it() {
        let (before, started) = (unix_ms(), Instant::now());
        std::thread::sleep(Duration::from_millis(5));
        // The thread pairs the clocks after the request started.
        let _ = unix_ms_at(Instant::now());
        let pairing = WALL_CLOCK.with(|pair| pair.get());
        let derived = unix_ms_at(started);
        assert_eq!(
            WALL_CLOCK.with(|pair| pair.get()),
            pairing,
            "an earlier instant paired the clocks again"
        );
        assert!(
            derived + 1 >= before && derived <= unix_ms(),
            "{before} {derived}"
        );
        assert_eq!(
            unix_ms_at(started),
            derived,
            "the same pairing, the same reading"
        );
    }

    #[test]
    fn the_wall_clock_at_an_instant_follows_the_system_clock() {
        let before = unix_ms();
        let at = Instant::now();
        let derived = unix_ms_at(at);
        let after = unix_ms();
        assert!(
            (before..=after + 1).contains(&derived),
            "{before} {derived} {after}"
        );
        // Later instants read later times, from the same pairing.
        let later = at + Duration::from_millis(250);
        let apart = unix_ms_at(later) - unix_ms_at(at);
        assert!((249..=251).contains(&apart), "{apart}");
        // An instant before the pairing was made still reads its own time.
        let earlier = at.checked_sub(Duration::from_millis(40)).unwrap();
        let derived = unix_ms_at(earlier);
        assert!(
            derived + 40 <= after + 1 && derived + 40 + 2 >= before,
            "{derived}"
        );
    }

    /// An instant more than the resync period after the pairing reads the
    /// wall clock again (it once read the pairing's time, frozen).
    #[test]
    fn an_instant_long_after_the_pairing_reads_the_clock_again() {
        let start = Instant::now();
        let _ = unix_ms_at(start);
        std::thread::sleep(WALL_CLOCK_RESYNC + Duration::from_millis(100));
        let later = Instant::now();
        let (before, derived) = (unix_ms(), unix_ms_at(later));
        assert!(
            derived + 20 >= before,
            "{derived} read {} ms early",
            before - derived
        );
    }
}
