//! What a Redis error means for the store: every redis-rs error, and every
//! refusal inside a reply, is read here and nowhere else.

use redis::RedisError;

use crate::store::StoreError;

/// A server that is loading, read-only (a demoted master) or without its
/// master answers, but not as the master we had: like a dropped connection.
const NOT_OUR_MASTER: [&str; 3] = ["READONLY", "LOADING", "MASTERDOWN"];

/// Refusals of who we are or what we may do.
const DENIED: [&str; 3] = ["WRONGPASS", "NOAUTH", "NOPERM"];

/// Refusals of the command itself: sending it again cannot succeed.
const REJECTED: [&str; 4] = ["CROSSSLOT", "WRONGTYPE", "NOSCRIPT", "EXECABORT"];

/// `err` as the store reports it.
pub(crate) fn backend(err: RedisError) -> StoreError {
    if err.kind() == redis::ErrorKind::AuthenticationFailed {
        return StoreError::Denied(err.to_string());
    }
    let message = err.to_string();
    match err.code() {
        Some(code) if DENIED.contains(&code) => StoreError::Denied(message),
        Some(code) if REJECTED.contains(&code) => StoreError::Rejected(message),
        Some(code) if NOT_OUR_MASTER.contains(&code) => StoreError::Unreachable(message),
        _ if err.is_io_error()
            || err.is_connection_refusal()
            || err.is_connection_dropped()
            || err.is_timeout() =>
        {
            StoreError::Unreachable(message)
        }
        _ => StoreError::Backend(message),
    }
}

/// A reply, with a refusal inside it (as a pipeline's replies carry them)
/// turned into the error it is.
pub(crate) fn refusal(reply: redis::RedisResult<redis::Value>) -> redis::RedisResult<redis::Value> {
    match reply {
        Ok(redis::Value::ServerError(err)) => Err(err.into()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(line: &str) -> RedisError {
        let reply = redis::parse_redis_value(format!("-{line}\r\n").as_bytes());
        refusal(reply).unwrap_err()
    }

    #[test]
    fn refusals_are_read_by_their_code() {
        assert!(matches!(
            backend(server("NOPERM no")),
            StoreError::Denied(_)
        ));
        assert!(matches!(
            backend(server("WRONGPASS x")),
            StoreError::Denied(_)
        ));
        assert!(matches!(
            backend(server("CROSSSLOT Keys")),
            StoreError::Rejected(_)
        ));
        assert!(matches!(
            backend(server("READONLY You can't write")),
            StoreError::Unreachable(_)
        ));
        assert!(matches!(
            backend(server("OOM command not allowed")),
            StoreError::Backend(_)
        ));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(matches!(backend(io), StoreError::Unreachable(_)));
    }
}
