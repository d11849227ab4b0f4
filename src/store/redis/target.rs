//! Where a [`Reconnecting`](super::Reconnecting) store connects: one
//! server, or the master Sentinel names, with Sentinel's count of the
//! failovers behind it.
//!
//! A failover does not always change the promoted server's `run_id` or
//! `master_replid`: Sentinel demotes an old master about 8 s after its
//! replica's promotion, and a second failover within that time promotes
//! the old master back as it was, still holding entries that the purges
//! sent to the other master never reached. Sentinel's configuration epoch
//! for the master grows with every failover, so a store over Sentinel
//! folds it into the epoch it stamps on entries: none written before a
//! failover is served after it, whichever server it lands on.

/// Where each connection attempt goes. One per store, made once and never
/// moved on a request's path: its variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Target {
    /// One server.
    Server(redis::Client),
    /// The master Sentinel names at the time of the attempt; a server
    /// that is not a master (Sentinel's view lags a failover) fails it.
    #[cfg(feature = "sentinel")]
    Sentinel(sentinel::SentinelTarget),
}

impl Target {
    /// The client of the server to connect to now.
    pub(crate) async fn client(&self) -> redis::RedisResult<redis::Client> {
        match self {
            Self::Server(client) => Ok(client.clone()),
            #[cfg(feature = "sentinel")]
            Self::Sentinel(sentinel) => sentinel.client().await,
        }
    }

    /// Whether a connection must reach a master (a replica serves no
    /// lookup: they write leases).
    pub(crate) fn needs_master(&self) -> bool {
        !matches!(self, Self::Server(_))
    }

    /// What the target says of the server at `server` (`host:port`).
    pub(crate) async fn standing(&self, server: &str) -> redis::RedisResult<Standing> {
        match self {
            Self::Server(_) => {
                let _ = server;
                Ok(Standing::Master { failovers: None })
            }
            #[cfg(feature = "sentinel")]
            Self::Sentinel(sentinel) => Ok(match sentinel.config_epoch(server).await? {
                Some(epoch) => Standing::Master {
                    failovers: Some(epoch),
                },
                None => Standing::Replaced,
            }),
        }
    }
}

/// What a target says of a server it once named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    /// Still the one to use; over Sentinel, with the failovers behind it
    /// (Sentinel's configuration epoch for the master).
    Master { failovers: Option<u64> },
    /// Sentinel names another master.
    #[cfg_attr(not(feature = "sentinel"), allow(dead_code))]
    Replaced,
}

#[cfg(feature = "sentinel")]
pub(crate) mod sentinel {
    use std::collections::HashMap;

    use redis::aio::MultiplexedConnection;
    use redis::sentinel::SentinelClient;
    use tokio::sync::Mutex;

    /// A Sentinel client, and one connection to a Sentinel it knows for
    /// reading the masters' configuration epochs.
    pub(crate) struct SentinelTarget {
        client: Mutex<SentinelClient>,
        watch: Mutex<Option<MultiplexedConnection>>,
    }

    impl SentinelTarget {
        pub(crate) fn new(client: SentinelClient) -> Self {
            Self {
                client: Mutex::new(client),
                watch: Mutex::new(None),
            }
        }

        /// A client for the master the Sentinels name now.
        pub(crate) async fn client(&self) -> redis::RedisResult<redis::Client> {
            self.client.lock().await.async_get_client().await
        }

        /// The configuration epoch of the master at `server`, as one
        /// Sentinel reports it (`SENTINEL MASTERS`); `None` when that
        /// Sentinel names no master there.
        pub(crate) async fn config_epoch(&self, server: &str) -> redis::RedisResult<Option<u64>> {
            let mut watch = self.watch.lock().await;
            let mut conn = match watch.take() {
                Some(conn) => conn,
                None => {
                    let sentinel = self.client.lock().await.async_get_sentinel_client().await?;
                    sentinel.get_multiplexed_async_connection().await?
                }
            };
            let masters: Vec<HashMap<String, String>> = redis::cmd("SENTINEL")
                .arg("MASTERS")
                .query_async(&mut conn)
                .await?;
            // Kept only after an answer: a broken one is made again.
            *watch = Some(conn);
            Ok(config_epoch_of(&masters, server))
        }
    }

    /// The `config-epoch` of the entry of `masters` at `server`.
    fn config_epoch_of(masters: &[HashMap<String, String>], server: &str) -> Option<u64> {
        masters
            .iter()
            .find(|master| {
                let field = |name: &str| master.get(name).map(String::as_str).unwrap_or("");
                format!("{}:{}", field("ip"), field("port")) == server
                    && field("flags").split(',').any(|flag| flag == "master")
            })
            .and_then(|master| master.get("config-epoch")?.parse().ok())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn master(ip: &str, port: u16, flags: &str, epoch: u64) -> HashMap<String, String> {
            [
                ("name", "mymaster".to_owned()),
                ("ip", ip.to_owned()),
                ("port", port.to_string()),
                ("flags", flags.to_owned()),
                ("config-epoch", epoch.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
        }

        #[test]
        fn the_epoch_is_read_for_the_named_master_only() {
            let masters = vec![
                master("10.0.0.1", 6379, "master", 4),
                master("10.0.0.2", 6380, "master,s_down", 7),
            ];
            assert_eq!(config_epoch_of(&masters, "10.0.0.1:6379"), Some(4));
            // A master Sentinel thinks down is still the master it names.
            assert_eq!(config_epoch_of(&masters, "10.0.0.2:6380"), Some(7));
            assert_eq!(config_epoch_of(&masters, "10.0.0.1:6380"), None);
            assert_eq!(config_epoch_of(&masters, "10.0.0.3:6379"), None);
        }
    }
}
