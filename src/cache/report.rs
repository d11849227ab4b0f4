//! What a finished request reports: the `x-cache` and `cache-status`
//! headers, the stats and the logs.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::Response;

use super::request::{Ctx, Outcome};
use crate::flight::Leader;
use crate::headers::{CACHE_STATUS, X_CACHE_NAME};
use crate::stats::telemetry::Op;
use crate::store::CacheKey;

const CACHE_NAME: &str = "tower-redis-cache";

impl Ctx {
    /// Tells the flight this request led, or joined, how it ended.
    fn settle_flight(&mut self, outcome: &Outcome) {
        // Followers still waiting go to the inner service themselves; the
        // misses after them too, for a while, when the response itself
        // could not be stored.
        let led = self.leader.take().map(Leader::unshareable).is_some();
        if let (Some(key), Some(seen)) = (&self.key, &self.seen) {
            match outcome {
                Outcome::NotStored(reason) if (led || self.passed) && reason.is_response() => {
                    self.policy.flights().unstorable(key, seen);
                }
                Outcome::Stored => self.policy.flights().stored(key, seen),
                _ => {}
            }
        }
    }

    /// Sets `x-cache` and `cache-status`, counts and logs the outcome.
    pub(crate) fn finish<B>(&mut self, mut response: Response<B>, outcome: Outcome) -> Response<B> {
        self.settle_flight(&outcome);
        let stats = self.policy.stats_ref();
        let took = self.started.elapsed();
        let status = response.status().as_u16();
        let route = self.label();
        let key = self.key_text();
        let (x_cache, cache_status) = match outcome {
            Outcome::Hit {
                ttl,
                age,
                stale,
                local,
            } => {
                stats.hit(self.route, took, local);
                response
                    .headers_mut()
                    .insert(header::AGE, decimal_value(age));
                tracing::debug!(route, key = %key, stale, "cache hit");
                let detail = match (stale, local) {
                    (true, _) => "; detail=stale-while-revalidate",
                    (false, true) => "; detail=in-process",
                    (false, false) => "",
                };
                ("HIT", hit_status(ttl, detail))
            }
            Outcome::Bypass(reason) => {
                stats.bypass(self.route, reason);
                let reason = reason.as_str();
                tracing::debug!(route, reason, "cache bypassed");
                (
                    "BYPASS",
                    header_value(format_args!("{CACHE_NAME}; fwd=bypass; detail={reason}")),
                )
            }
            miss => {
                stats.miss(self.route, took);
                let (prefix, detail) = match miss {
                    Outcome::NotStored(reason) => {
                        stats.not_stored(self.route, reason);
                        match self.passed {
                            true => ("detail=", "hit-for-miss"),
                            false => ("detail=", reason.as_str()),
                        }
                    }
                    Outcome::Stored => ("", "stored"),
                    Outcome::Hedged => ("detail=", "hedged"),
                    Outcome::Streamed => ("detail=", "streamed"),
                    _ => ("", "collapsed"),
                };
                tracing::debug!(route, key = %key, detail, "cache miss");
                let value = match miss {
                    Outcome::Collapsed => Some(HeaderValue::from_static(
                        "tower-redis-cache; fwd=uri-miss; collapsed",
                    )),
                    _ => header_value(format_args!(
                        "{CACHE_NAME}; fwd=uri-miss; fwd-status={status}; {prefix}{detail}"
                    )),
                };
                ("MISS", value)
            }
        };
        let headers = response.headers_mut();
        headers.insert(X_CACHE_NAME, HeaderValue::from_static(x_cache));
        if let Some(value) = cache_status {
            headers.insert(CACHE_STATUS, value);
        }
        response
    }
}

/// The `cache-status` of a hit with `ttl` seconds left: formatted once per
/// thread for each distinct value (hits on hot entries repeat it until the
/// next second), then cloned.
fn hit_status(ttl: i64, detail: &'static str) -> Option<HeaderValue> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(i64, &'static str, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((seen, seen_detail, value)) = last.as_ref() {
            // The details are a few literals: the same one is the same
            // pointer, compared without reading the bytes.
            if *seen == ttl && std::ptr::eq(*seen_detail, detail) {
                return Some(value.clone());
            }
        }
        let value = header_value(format_args!("{CACHE_NAME}; hit; ttl={ttl}{detail}"))?;
        *last = Some((ttl, detail, value.clone()));
        Some(value)
    })
}

/// `n` as a header value (`content-length`, `age`): one below 1000 is a
/// slice of a static table, without an allocation (`HeaderValue::from`
/// makes two).
pub(super) fn decimal_value(n: u64) -> HeaderValue {
    static DIGITS: [u8; 3000] = three_digits();
    if n < 1000 {
        let at = 3 * n as usize;
        let skip = usize::from(n < 100) + usize::from(n < 10);
        let digits = Bytes::from_static(&DIGITS[at + skip..at + 3]);
        if let Ok(value) = HeaderValue::from_maybe_shared(digits) {
            return value;
        }
    }
    header_value(format_args!("{n}")).unwrap_or_else(|| HeaderValue::from(n))
}

/// `000`, `001`, … `999`, one after the other.
const fn three_digits() -> [u8; 3000] {
    let mut digits = [0u8; 3000];
    let mut n = 0;
    while n < 1000 {
        digits[3 * n] = b'0' + (n / 100) as u8;
        digits[3 * n + 1] = b'0' + (n / 10 % 10) as u8;
        digits[3 * n + 2] = b'0' + (n % 10) as u8;
        n += 1;
    }
    digits
}

/// A header value formatted on the stack and copied once (a `String`
/// would grow, then be copied again).
fn header_value(args: std::fmt::Arguments<'_>) -> Option<HeaderValue> {
    use std::io::Write;
    let mut buf = [0u8; 128];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    cursor.write_fmt(args).ok()?;
    let len = cursor.position() as usize;
    HeaderValue::from_bytes(&buf[..len]).ok()
}

/// The span of one store operation: `op` (`lookup`, `store`), the route,
/// then its `outcome` and `duration_us` once it ended.
pub(crate) fn store_span(op: Op, route: &str) -> tracing::Span {
    tracing::debug_span!(
        "cache.store",
        op = op.as_str(),
        route,
        outcome = tracing::field::Empty,
        duration_us = tracing::field::Empty,
    )
}

/// A cache key as logs show it: `app:person:42`, `app:persons:list:v{version}:…`.
pub(super) struct KeyText<'a>(pub(super) Option<&'a CacheKey>);

impl std::fmt::Display for KeyText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(CacheKey::Plain(key)) => f.write_str(key),
            Some(CacheKey::Versioned { prefix, suffix, .. }) => {
                write!(f, "{prefix}{{version}}{suffix}")
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reason::Reason;

    #[test]
    pub(super) fn decimal_values_read_as_their_numbers() {
        for n in (0..=1100).chain([9_999, 123_456, u64::MAX]) {
            assert_eq!(decimal_value(n).to_str().unwrap(), n.to_string(), "{n}");
        }
    }

    #[test]
    pub(super) fn every_cache_status_fits_the_stack_buffer() {
        for reason in Reason::ALL {
            let reason = reason.as_str();
            let value = header_value(format_args!(
                "{CACHE_NAME}; fwd=uri-miss; fwd-status=599; detail={reason}"
            ));
            assert!(value.is_some(), "{reason}");
        }
        let hit = header_value(format_args!(
            "{CACHE_NAME}; hit; ttl={}; detail=stale-while-revalidate",
            i64::MIN
        ));
        assert!(hit.is_some());
    }
}
