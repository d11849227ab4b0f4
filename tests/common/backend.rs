//! The store under test and the `backend_tests!` macro that runs one
//! suite on the memory store, a real `redis-server` and a real cluster.

use std::sync::Arc;
use std::time::Duration;

use tower_redis_cache::store::{BreakerConfig, MemoryStore, RedisStore, Store};

use super::servers::*;

/// A store under test, and the server behind it if any.
pub struct Backend {
    pub store: Arc<dyn Store>,
    pub server: Option<RedisServer>,
    pub cluster: Option<RedisCluster>,
    memory: Option<MemoryStore>,
}

impl Backend {
    pub fn memory() -> Self {
        let memory = MemoryStore::new();
        Self {
            store: Arc::new(memory.clone()),
            server: None,
            cluster: None,
            memory: Some(memory),
        }
    }

    /// A real redis-server, the store logged in as the README's
    /// least-privilege user.
    pub fn redis() -> Self {
        let server = RedisServer::start();
        let store = RedisStore::builder(server.cache_user_url())
            .deadline(TEST_DEADLINE)
            .breaker(test_breaker())
            .build()
            .unwrap();
        Self {
            store: Arc::new(store),
            server: Some(server),
            cluster: None,
            memory: None,
        }
    }

    pub fn cluster() -> Self {
        let cluster = RedisCluster::start();
        Self {
            store: Arc::new(cluster.store()),
            server: None,
            cluster: Some(cluster),
            memory: None,
        }
    }

    /// A second store over the same data, as another process would have
    /// (for Redis: its own connection, breaker and queue).
    pub fn another_store(&self) -> Arc<dyn Store> {
        match (&self.server, &self.cluster) {
            (Some(server), _) => Arc::new(
                RedisStore::builder(server.cache_user_url())
                    .deadline(TEST_DEADLINE)
                    .breaker(test_breaker())
                    .build()
                    .unwrap(),
            ),
            (None, Some(cluster)) => Arc::new(cluster.store()),
            (None, None) => self.store.clone(),
        }
    }

    /// Loses a key (an entry, a tombstone, a version key), as an eviction or
    /// a restart without persistence would.
    pub async fn evict(&self, key: &str) {
        let del = || redis::cmd("DEL").arg(key).clone();
        match (&self.memory, &self.server, &self.cluster) {
            (Some(memory), _, _) => memory.evict(key),
            (None, Some(server), _) => {
                let _: () = del().query_async(&mut server.raw().await).await.unwrap();
            }
            (None, None, Some(cluster)) => {
                let _: () = del().query_async(&mut cluster.raw().await).await.unwrap();
            }
            (None, None, None) => unreachable!(),
        }
    }
}

/// Runs each listed async test fn against the memory store and a real Redis.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    let backend = $crate::common::Backend::memory();
                    super::$name(backend).await;
                }
            )*
        }
        mod redis_server {
            $(
                #[tokio::test]
                #[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
                async fn $name() {
                    let backend = $crate::common::Backend::redis();
                    super::$name(backend).await;
                }
            )*
        }
        mod redis_cluster {
            $(
                #[tokio::test]
                #[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
                async fn $name() {
                    let backend = $crate::common::Backend::cluster();
                    super::$name(backend).await;
                }
            )*
        }
    };
}

/// A store over `url`, connected and pinged: the error names what is wrong
/// (an address, a password, a permission).
#[allow(dead_code)]
pub async fn connected(url: &str) -> Result<RedisStore, tower_redis_cache::store::StoreError> {
    let store = RedisStore::builder(url)
        .deadline(TEST_DEADLINE)
        .build()
        .expect("a valid url");
    store.connect().await.map(|()| store)
}

/// Generous, so that a loaded CI machine does not turn slow writes into
/// misses; the deadline itself is not what these tests check.
pub const TEST_DEADLINE: Duration = Duration::from_secs(2);

/// The default breaker, but for what counts as a slow call: raised with the
/// deadline, so that a debug build on a loaded machine (200 concurrent
/// lookups on one runtime thread) does not open the circuit mid-test. The
/// suites that test the breaker set their own.
pub fn test_breaker() -> BreakerConfig {
    BreakerConfig::default().slow_calls(TEST_DEADLINE / 4, 50, 20)
}
