//! Why a store operation failed, and what each failure means for the cache.

use std::fmt;

/// Why a store operation failed. The layers turn every one of them into a
/// miss or a skipped write, never into an error response.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// The operation did not finish within the deadline.
    Timeout,
    /// The store could not be reached (refused, dropped, reset).
    Unreachable(String),
    /// The store answered with an error that may pass (out of memory,
    /// busy…): an invalidation that failed so is queued for replay.
    Backend(String),
    /// The store refused the credentials or a permission (`WRONGPASS`,
    /// `NOAUTH`, `NOPERM`, whose message names the command): nothing works
    /// until the configuration is fixed.
    /// Counts towards opening the circuit, like an unreachable store.
    Denied(String),
    /// The store refused the command itself (`CROSSSLOT`, `WRONGTYPE`,
    /// `NOSCRIPT`…): sending it again cannot succeed, so an invalidation
    /// that failed so is not queued for replay (it would block the cache
    /// for ever); it is counted and logged.
    Rejected(String),
    /// An invalidation reached the master, but not every replica of it
    /// acknowledged it in time (a cluster's `WAIT`): a failover now could
    /// lose it, so it is queued for replay like one that failed.
    Unconfirmed(String),
    /// The circuit breaker is open: the store was not tried.
    CircuitOpen,
    /// Invalidations are waiting for replay, or were lost; the cache is not
    /// used until they are applied (or the entries they guard expired).
    PendingInvalidations,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => write!(f, "store operation timed out"),
            Self::Unreachable(msg) => write!(f, "store unreachable: {msg}"),
            Self::Backend(msg) => write!(f, "store error: {msg}"),
            Self::Denied(msg) => {
                write!(f, "store denied access (credentials or permissions): {msg}")
            }
            Self::Rejected(msg) => write!(f, "store refused the command: {msg}"),
            Self::Unconfirmed(msg) => write!(f, "invalidation not confirmed by replicas: {msg}"),
            Self::CircuitOpen => write!(f, "store circuit open; not tried"),
            Self::PendingInvalidations => write!(f, "invalidations not yet applied"),
        }
    }
}

impl std::error::Error for StoreError {}

impl StoreError {
    /// A short label for the kind of error, as metrics and logs name it:
    /// `timeout`, `unreachable`, `backend`, `denied`, `rejected`,
    /// `unconfirmed`, `circuit-open` or `pending-invalidations`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Unreachable(_) => "unreachable",
            Self::Backend(_) => "backend",
            Self::Denied(_) => "denied",
            Self::Rejected(_) => "rejected",
            Self::Unconfirmed(_) => "unconfirmed",
            Self::CircuitOpen => "circuit-open",
            Self::PendingInvalidations => "pending-invalidations",
        }
    }

    /// Whether the same operation may succeed later: what an invalidation
    /// queue should keep.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Rejected(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_has_a_label() {
        let errors = [
            StoreError::Timeout,
            StoreError::Unreachable(String::new()),
            StoreError::Backend(String::new()),
            StoreError::Denied(String::new()),
            StoreError::Rejected(String::new()),
            StoreError::Unconfirmed(String::new()),
            StoreError::CircuitOpen,
            StoreError::PendingInvalidations,
        ];
        for err in &errors {
            assert!(
                crate::stats::telemetry::ERROR_KINDS.contains(&err.kind()),
                "{err}"
            );
        }
    }
}
