//! How a [`RedisStore`] is made: where it connects ([`RedisSource`]) and
//! its settings ([`RedisStoreBuilder`]), checked once at `build()`.

use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "cluster")]
use super::cluster::ClusterSource;
use super::connection::{Connect, Reconnecting};
use super::lookups::SeenVersions;
use super::target::Target;
use super::{scripts, Link, RedisStore, DEFAULT_CHANNEL, DEFAULT_DEADLINE, DEFAULT_WRITE_DEADLINE};
use crate::error::ConfigError;
use crate::store::resilient::{BreakerConfig, ReplayConfig, Resilient};
use crate::store::{DEFAULT_LEASE_TTL, DEFAULT_TOMBSTONE_TTL};

/// Where a [`RedisStore`] connects: one node, the master a set of
/// Sentinels monitor, a Redis Cluster, or a connection you bring. A URL
/// (`&str` or `String`) and a `redis::Client` convert into the one-node
/// source, so `RedisStore::builder("redis://127.0.0.1:6379")` works as is.
///
/// ```
/// use tower_redis_cache::store::RedisSource;
///
/// let one_node = RedisSource::url("redis://127.0.0.1:6379/0");
/// # let _ = one_node;
/// ```
pub struct RedisSource<C = Reconnecting> {
    conn: Result<C, ConfigError>,
    /// The servers an in-process tier subscribes through, when known.
    subscribe_via: Vec<redis::Client>,
}

impl<C> std::fmt::Debug for RedisSource<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSource")
            .field("valid", &self.conn.is_ok())
            .finish_non_exhaustive()
    }
}

fn unusable(err: redis::RedisError) -> ConfigError {
    ConfigError::RedisSource {
        reason: err.to_string(),
    }
}

impl RedisSource<Reconnecting> {
    /// The Redis at `url` (`redis://[user:password@]host:port/db`, or
    /// `rediss://` with a TLS feature of redis-rs). Connections are made on
    /// first use and again whenever one breaks; each reads the server's
    /// `run_id` and loads the scripts first, so entries written before a
    /// restart that reloaded old data, or before a failover, are never
    /// served after it. A URL that does not parse fails `build()`.
    pub fn url(url: &str) -> Self {
        match redis::Client::open(url) {
            Ok(client) => Self::client(client),
            Err(err) => Self {
                conn: Err(unusable(err)),
                subscribe_via: Vec::new(),
            },
        }
    }

    /// The Redis a client you built points at (an ACL user, a database,
    /// TLS settings), with the same reconnection and restart detection as
    /// [`RedisSource::url`].
    pub fn client(client: redis::Client) -> Self {
        Self {
            subscribe_via: vec![client.clone()],
            conn: Ok(Reconnecting::new(
                Target::Server(client),
                Duration::from_secs(1),
                scripts::scripts(),
            )),
        }
    }

    /// The master that the Sentinels at `sentinels` (`redis://host:26379`
    /// URLs) monitor as `master`: each connection asks them for the
    /// current master and checks that it is one. After a failover, the old
    /// master's connection breaks (or its epoch changes within a second,
    /// when it is demoted in place) and the next one goes to the new
    /// master, whose epoch serves nothing written before the failover.
    #[cfg(feature = "sentinel")]
    pub fn sentinel<I, S>(master: &str, sentinels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let urls: Vec<String> = sentinels
            .into_iter()
            .map(|s| s.as_ref().to_owned())
            .collect();
        match redis::sentinel::SentinelClient::build(
            urls,
            // A `String` without TLS, `impl AsRef<str>` with `tls-rustls`.
            String::from(master),
            None,
            redis::sentinel::SentinelServerType::Master,
        ) {
            Ok(client) => Self::sentinel_client(client),
            Err(err) => Self {
                conn: Err(unusable(err)),
                subscribe_via: Vec::new(),
            },
        }
    }

    /// The master a Sentinel client you built names (credentials or TLS
    /// for the master, for the Sentinels). Give
    /// [`RedisStoreBuilder::subscribe_via`] the servers for an in-process
    /// tier.
    #[cfg(feature = "sentinel")]
    pub fn sentinel_client(client: redis::sentinel::SentinelClient) -> Self {
        Self {
            conn: Ok(Reconnecting::new(
                Target::Sentinel(super::target::sentinel::SentinelTarget::new(client)),
                Duration::from_secs(1),
                scripts::scripts(),
            )),
            subscribe_via: Vec::new(),
        }
    }
}

#[cfg(feature = "cluster")]
impl RedisSource<ClusterSource> {
    /// The Redis Cluster that `seeds` (`redis://host:port` URLs of some of
    /// its nodes, with credentials if any) belong to. The cluster client
    /// is tuned to the store's deadlines: at most 2 retries, 5 to 25 ms
    /// apart (redis-rs would otherwise wait from about a second, longer
    /// than any request should wait for a cache), 1 s to connect to a
    /// node, and a response timeout of half the default write budget;
    /// every operation is still bounded by the store's own deadline.
    pub fn cluster<I, S>(seeds: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let seeds: Vec<String> = seeds.into_iter().map(|s| s.as_ref().to_owned()).collect();
        let client = redis::cluster::ClusterClient::builder(seeds.clone())
            .retries(2)
            .min_retry_wait(5)
            .max_retry_wait(25)
            .connection_timeout(super::cluster::CONNECT_TIMEOUT)
            // Each operation has the store's own deadline (reads 100 ms,
            // invalidations 1 s in up to three tries); the client's must not cut a
            // write's try short.
            .response_timeout(DEFAULT_WRITE_DEADLINE / 2)
            .build();
        match client {
            Ok(client) => Self {
                conn: Ok(ClusterSource::new(client)),
                // Messages published on one node reach every node's
                // subscribers.
                subscribe_via: seeds
                    .iter()
                    .filter_map(|seed| redis::Client::open(seed.as_str()).ok())
                    .collect(),
            },
            Err(err) => Self {
                conn: Err(unusable(err)),
                subscribe_via: Vec::new(),
            },
        }
    }

    /// A cluster client you built (TLS, ACL user, read routing…). Keep its
    /// retries and timeouts within the store's deadline (see
    /// [`RedisSource::cluster`]); give [`RedisStoreBuilder::subscribe_via`]
    /// the nodes for an in-process tier.
    pub fn cluster_client(client: redis::cluster::ClusterClient) -> Self {
        Self {
            conn: Ok(ClusterSource::new(client)),
            subscribe_via: Vec::new(),
        }
    }
}

impl<C: Connect> RedisSource<C> {
    /// A connection you bring: a `MultiplexedConnection`, a
    /// `ConnectionManager` or any other cloneable redis-rs async
    /// connection. Only the sources above know the server's `run_id`: over
    /// another, a restart that reloads old data is not detected.
    pub fn connection(conn: C) -> Self {
        Self {
            conn: Ok(conn),
            subscribe_via: Vec::new(),
        }
    }
}

impl From<&str> for RedisSource<Reconnecting> {
    fn from(url: &str) -> Self {
        Self::url(url)
    }
}

impl From<String> for RedisSource<Reconnecting> {
    fn from(url: String) -> Self {
        Self::url(&url)
    }
}

impl From<&String> for RedisSource<Reconnecting> {
    fn from(url: &String) -> Self {
        Self::url(url)
    }
}

impl From<redis::Client> for RedisSource<Reconnecting> {
    fn from(client: redis::Client) -> Self {
        Self::client(client)
    }
}

/// The settings of a [`RedisStore`], from [`RedisStore::builder`]. Every
/// setter takes and returns the builder; [`build`](Self::build) checks them
/// all and the source, and connects nothing.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_redis_cache::store::{BreakerConfig, RedisStore, ReplayConfig};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::builder("redis://127.0.0.1:6379/0")
///     .deadline(Duration::from_millis(50))
///     .breaker(BreakerConfig::default().failure_threshold(3))
///     .replay(ReplayConfig::default().max_pending_keys(50_000))
///     .build()?;
/// // Optional: fail at start-up, with the reason, when Redis is wrong.
/// store.connect().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a builder does nothing until `build()`"]
pub struct RedisStoreBuilder<C = Reconnecting> {
    source: RedisSource<C>,
    deadline: Duration,
    write_deadline: Duration,
    tombstone_ttl: Duration,
    lease_ttl: Duration,
    remembered_versions: Option<usize>,
    channel: Arc<str>,
    subscribe_via: Option<Vec<redis::Client>>,
    breaker: BreakerConfig,
    replay: ReplayConfig,
}

impl<C: Connect> RedisStoreBuilder<C> {
    pub(super) fn new(source: RedisSource<C>) -> Self {
        Self {
            source,
            deadline: DEFAULT_DEADLINE,
            write_deadline: DEFAULT_WRITE_DEADLINE,
            tombstone_ttl: DEFAULT_TOMBSTONE_TTL,
            lease_ttl: DEFAULT_LEASE_TTL,
            remembered_versions: None,
            channel: Arc::from(DEFAULT_CHANNEL),
            subscribe_via: None,
            breaker: BreakerConfig::default(),
            replay: ReplayConfig::default(),
        }
    }

    /// The deadline for one read or entry write (default
    /// [`DEFAULT_DEADLINE`], 100 ms).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The budget of a write's invalidation (default
    /// [`DEFAULT_WRITE_DEADLINE`], 1 s): it is tried up to three times
    /// within it (again over a fresh connection on any failure that may
    /// pass: a dropped connection, a cluster client between connections or
    /// slot maps, replicas slow to acknowledge), and it is sent even while
    /// the circuit is open.
    pub fn write_deadline(mut self, deadline: Duration) -> Self {
        self.write_deadline = deadline;
        self
    }

    /// How long a delete's tombstone lives (default 5 minutes).
    pub fn tombstone_ttl(mut self, ttl: Duration) -> Self {
        self.tombstone_ttl = ttl;
        self
    }

    /// How many version keys this store remembers the values of (default
    /// 100 000): a list hit is one `MGET` when its groups' versions are
    /// remembered, two commands when not. With a group per tenant, give
    /// at least the number of tenants whose lists are read; the groups read
    /// least are forgotten first.
    pub fn remembered_versions(mut self, groups: usize) -> Self {
        self.remembered_versions = Some(groups);
        self
    }

    /// How long a miss's lease lives (default 60 s): a miss whose handler
    /// takes longer is not stored.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// The Pub/Sub channel every invalidation is published on, for the
    /// in-process tiers of every process (default [`DEFAULT_CHANNEL`]).
    /// Every process over one Redis must use the same; an empty name
    /// publishes nothing (then no process may use an in-process tier).
    pub fn channel(mut self, channel: &str) -> Self {
        self.channel = Arc::from(channel);
        self
    }

    /// The servers an in-process tier subscribes to invalidations through,
    /// tried in turn (for a cluster, any of its nodes: messages reach them
    /// all). Known for [`RedisSource::url`], [`RedisSource::client`] and
    /// [`RedisSource::cluster`]; give them for the other sources when a
    /// route uses the tier.
    pub fn subscribe_via(mut self, clients: impl IntoIterator<Item = redis::Client>) -> Self {
        self.subscribe_via = Some(clients.into_iter().collect());
        self
    }

    /// The circuit breaker's thresholds.
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// The invalidation replay queue's bounds.
    pub fn replay(mut self, config: ReplayConfig) -> Self {
        self.replay = config;
        self
    }

    /// The store. Connects nothing (see [`RedisStore::connect`] to fail
    /// fast at start-up); fails when the source or a setting cannot work:
    /// a URL that does not parse, a zero deadline, a breaker or replay
    /// value that cannot work. Must be called within a Tokio runtime.
    pub fn build(self) -> Result<RedisStore<C>, ConfigError> {
        let conn = self.source.conn?;
        for (name, value) in [
            ("deadline", self.deadline),
            ("write_deadline", self.write_deadline),
            ("lease_ttl", self.lease_ttl),
        ] {
            if value.is_zero() {
                return Err(ConfigError::RedisSource {
                    reason: format!("a {name} of 0 fails every operation"),
                });
            }
        }
        let seen_versions = match self.remembered_versions {
            Some(groups) => Arc::new(SeenVersions::new(groups)),
            None => Arc::default(),
        };
        let link = Link {
            split: Arc::new(std::sync::atomic::AtomicBool::new(conn.is_cluster())),
            source: conn,
            deadline: self.deadline,
            write_deadline: self.write_deadline,
            tombstone_ttl: self.tombstone_ttl,
            lease_ttl: self.lease_ttl,
            seen_versions,
            minter: crate::store::tokens::minter(),
            channel: self.channel,
            subscribe_via: self
                .subscribe_via
                .unwrap_or(self.source.subscribe_via)
                .into(),
        };
        Ok(RedisStore {
            inner: Resilient::new(link, self.breaker, self.replay)?,
        })
    }
}
