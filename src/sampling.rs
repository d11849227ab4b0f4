//! Sampling without a lock: which hits are verified
//! ([`Route::verify`](crate::Route::verify)) and which writes are probed
//! ([`Rule::probe`](crate::Rule::probe)).

use std::cell::Cell;

/// Whether this one (a hit, a write) is one of the `rate` (0 to 1) that
/// are sampled: a draw from a per-thread xorshift generator, so sampling
/// takes no lock and no system call.
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
}
