//! The circuit breaker: its configuration, its state, and how an
//! operation is admitted and recorded.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{lock, Admit, Shared};
use crate::error::ConfigError;
use crate::stats::telemetry::{self, CircuitGauge};
use crate::store::StoreError;

/// The circuit breaker's thresholds: by-value setters from
/// [`BreakerConfig::default`], checked where the store is built
/// ([`RedisStoreBuilder::build`](crate::store::RedisStoreBuilder::build),
/// [`Resilient::new`](crate::store::Resilient::new)): a value that cannot
/// work (a zero threshold or window, a share over 100 %) is a
/// [`ConfigError::Breaker`] there.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_cache::store::BreakerConfig;
///
/// let config = BreakerConfig::default()
///     .failure_threshold(3)
///     .slow_calls(Duration::from_millis(50), 50, 20)
///     .open_for(Duration::from_secs(2));
/// # let _ = config;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failed operations that open the circuit (default 5).
    pub(super) failure_threshold: u32,
    /// How long the circuit stays open before one probe is let through
    /// (default 1 s).
    pub(super) open_for: Duration,
    /// A call slower than this counts as slow, even when it succeeds
    /// (default 25 ms).
    pub(super) slow_call: Duration,
    /// The share of slow calls, in percent, among the last `window` calls
    /// that opens the circuit (default 50).
    pub(super) slow_call_percent: u8,
    /// How many recent calls the slow-call rate is taken over (default 20).
    pub(super) window: usize,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(1),
            slow_call: Duration::from_millis(25),
            slow_call_percent: 50,
            window: 20,
        }
    }
}

impl BreakerConfig {
    /// Sets the consecutive failures that open the circuit (at least 1).
    pub fn failure_threshold(mut self, failures: u32) -> Self {
        self.failure_threshold = failures;
        self
    }

    /// Sets how long the circuit stays open before a probe.
    pub fn open_for(mut self, open_for: Duration) -> Self {
        self.open_for = open_for;
        self
    }

    /// Sets what counts as a slow call and the share of them, in percent
    /// (1 to 100) of the last `window` calls (at least 1), that opens the
    /// circuit.
    pub fn slow_calls(mut self, slow_call: Duration, percent: u8, window: usize) -> Self {
        self.slow_call = slow_call;
        self.slow_call_percent = percent;
        self.window = window;
        self
    }

    /// Refuses the values that cannot work.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        let refuse = |reason: &str| {
            Err(ConfigError::Breaker {
                reason: reason.to_owned(),
            })
        };
        if self.failure_threshold == 0 {
            return refuse("a failure threshold of 0 opens the circuit on every call");
        }
        if !(1..=100).contains(&self.slow_call_percent) {
            return refuse("the slow-call share is a percentage from 1 to 100");
        }
        if self.window == 0 {
            return refuse("a slow-call window of 0 calls opens the circuit on every call");
        }
        Ok(())
    }
}

/// The state of a store's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Circuit {
    /// Operations go to the store.
    #[default]
    Closed,
    /// The store failed or was slow repeatedly; reads are refused without
    /// trying.
    Open,
    /// One probe is under way to find out whether the store is back.
    HalfOpen,
}

impl Circuit {
    /// `closed`, `open` or `half-open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half-open",
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Breaker {
    pub(super) consecutive_failures: u32,
    pub(super) open_until: Option<Instant>,
    pub(super) probing: bool,
    /// Whether each of the last calls was slow.
    pub(super) recent: VecDeque<bool>,
    /// How many of them were.
    pub(super) slow: usize,
}

impl Breaker {
    /// Adds one call to the window of the last `window` calls.
    pub(super) fn push(&mut self, slow: bool, window: usize) {
        self.recent.push_back(slow);
        self.slow += usize::from(slow);
        while self.recent.len() > window {
            if self.recent.pop_front() == Some(true) {
                self.slow -= 1;
            }
        }
    }

    /// True when the window is full and slow calls reach the threshold.
    pub(super) fn too_slow(&self, config: &BreakerConfig) -> bool {
        self.recent.len() >= config.window
            && self.slow * 100 >= self.recent.len() * usize::from(config.slow_call_percent)
    }
}

impl Shared {
    pub(super) fn admit(&self) -> Result<Admit, StoreError> {
        if self.closed.load(Ordering::Acquire) {
            self.operations.fetch_add(1, Ordering::Relaxed);
            return Ok(Admit::Go);
        }
        let mut breaker = lock(&self.breaker);
        let admit = match breaker.open_until {
            None => Admit::Go,
            Some(until) if Instant::now() >= until && !breaker.probing => {
                breaker.probing = true;
                telemetry::circuit(CircuitGauge::HalfOpen);
                Admit::Probe
            }
            Some(_) => return Err(StoreError::CircuitOpen),
        };
        self.operations.fetch_add(1, Ordering::Relaxed);
        Ok(admit)
    }

    /// Records how an operation ended and how long it took. Timeouts,
    /// unreachable stores and refused credentials count towards the failure
    /// threshold, slow calls towards the slow-call rate; other server errors
    /// (`OOM`, `WRONGTYPE`…) towards neither.
    pub(super) fn record<T>(&self, admit: Admit, result: &Result<T, StoreError>, took: Duration) {
        let unhealthy = matches!(
            result,
            Err(StoreError::Timeout | StoreError::Unreachable(_) | StoreError::Denied(_))
        );
        if result.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let config = &self.config;
        let slow = took > config.slow_call;
        // A fast healthy call into a window of fast calls changes nothing.
        if admit == Admit::Go && !unhealthy && !slow && self.quiet.load(Ordering::Acquire) {
            return;
        }
        let mut breaker = lock(&self.breaker);
        if admit == Admit::Probe {
            breaker.probing = false;
        }
        breaker.push(slow, config.window);
        breaker.consecutive_failures = match unhealthy {
            true => breaker.consecutive_failures.saturating_add(1),
            false => 0,
        };
        let too_slow = breaker.too_slow(config);
        let trip = too_slow
            || (admit == Admit::Probe && (unhealthy || slow))
            || (unhealthy && breaker.consecutive_failures >= config.failure_threshold);
        if trip {
            if breaker.open_until.is_none() || admit == Admit::Probe {
                tracing::warn!(open_for = ?config.open_for, slow = too_slow, "cache store unhealthy; circuit open");
            }
            breaker.open_until = Some(Instant::now() + config.open_for);
            breaker.recent.clear();
            breaker.slow = 0;
            telemetry::circuit(CircuitGauge::Open);
        } else if !unhealthy && !slow && breaker.open_until.take().is_some() {
            tracing::info!("cache store healthy again; circuit closed");
            telemetry::circuit(CircuitGauge::Closed);
        }
        self.settle_breaker(&breaker);
    }

    pub(super) fn settle_breaker(&self, breaker: &Breaker) {
        let closed = breaker.open_until.is_none();
        let quiet = closed
            && breaker.consecutive_failures == 0
            && breaker.slow == 0
            && breaker.recent.len() >= self.config.window;
        self.closed.store(closed, Ordering::Release);
        self.quiet.store(quiet, Ordering::Release);
    }

    /// An operation whose future was dropped before the store answered:
    /// a probe gives its turn back, and the time it waited still counts
    /// towards the slow-call rate (a caller's timeout shorter than ours must
    /// not hide a slow store).
    pub(super) fn abandoned(&self, admit: Admit, waited: Duration) {
        let config = &self.config;
        let mut breaker = lock(&self.breaker);
        if admit == Admit::Probe {
            breaker.probing = false;
        }
        breaker.push(waited > config.slow_call, config.window);
        if breaker.too_slow(config) {
            tracing::warn!(open_for = ?config.open_for, "cache store slow; circuit open");
            breaker.open_until = Some(Instant::now() + config.open_for);
            breaker.recent.clear();
            breaker.slow = 0;
            telemetry::circuit(CircuitGauge::Open);
        }
        self.settle_breaker(&breaker);
    }
}
