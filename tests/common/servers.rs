//! Real servers for the tests: a `redis-server` per test, Sentinel, a
//! loopback cluster (with replicas), the ACL user of docs/deploying.md, a delaying TCP
//! proxy, free ports.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tower_redis_cache::store::{ClusterSource, RedisSource, RedisStore, RedisStoreBuilder};

use super::backend::{test_breaker, TEST_DEADLINE};

/// A `redis-server` on a free port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port. The tests that call this are
    /// marked ignored when `redis-server` is not on PATH (see `build.rs`);
    /// run anyway (`REQUIRE_REDIS=1`, `--include-ignored`), they fail here.
    pub fn start() -> Self {
        if let Err(err) = Command::new("redis-server").arg("--version").output() {
            panic!(
                "redis-server is not on PATH ({err}); install it (apt-get install redis-server)"
            );
        }
        // A port found free can be taken before the server binds it (by
        // another test's socket): the server then exits, and a fresh port
        // is tried.
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                child: None,
            };
            let _ = std::fs::remove_dir_all(server.dir());
            if server.try_spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Starts the server on its port (again, after a restart).
    fn spawn(&mut self) {
        assert!(
            self.try_spawn(),
            "redis-server exited on port {}",
            self.port
        );
    }

    /// Starts the server; false when it exits before it answers (its
    /// port was taken).
    fn try_spawn(&mut self) -> bool {
        let dir = self.dir();
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--dir", dir.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        for _ in 0..200 {
            if answers_ping(self.port) {
                return true;
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not answer on {}", self.port);
    }

    /// Where this server keeps its snapshot (`dump.rdb`), reloaded at start.
    fn dir(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("tower-redis-cache-test-{}", self.port))
    }

    /// Writes a snapshot that the next [`RedisServer::restart`] reloads, as
    /// a server with persistence (or a lagging replica) would.
    pub fn snapshot(&self) {
        let mut conn = redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let _: () = redis::cmd("SAVE").query(&mut conn).unwrap();
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The URL of the least-privilege user of docs/deploying.md, made on this server
    /// with its key pattern widened to every test namespace.
    pub fn cache_user_url(&self) -> String {
        create_user(self.port, CACHE_USER, &readme_acl(), &["~*"]);
        user_url(self.port, CACHE_USER)
    }

    /// Kills the server (connection refused from now on).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("server running")
            .id()
            .to_string();
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success());
    }

    /// Starts it again on the same port: empty, or with the last
    /// [`RedisServer::snapshot`].
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// A plain connection for arranging state behind the layer's back.
    pub async fn raw(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

/// The `calls` Redis counted for lookups, writes and invalidations.
pub async fn data_commands(server: &RedisServer) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut server.raw().await)
        .await
        .unwrap();
    info.lines()
        .filter(|l| {
            [
                "cmdstat_get:",
                "cmdstat_set:",
                "cmdstat_mget:",
                "cmdstat_evalsha:",
            ]
            .iter()
            .any(|c| l.starts_with(c))
        })
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// A Redis Sentinel on a free port monitoring one master as `mymaster`
/// (quorum 1, down after 1 s), killed on drop.
pub struct Sentinel {
    pub port: u16,
    child: Child,
    dir: std::path::PathBuf,
}

impl Sentinel {
    pub fn start(master_port: u16) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("tower-redis-cache-sentinel-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor mymaster 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds mymaster 1000\n\
                 sentinel failover-timeout mymaster 10000\n",
                dir.display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel starts");
        assert!(
            wait_for(Duration::from_secs(10), || answers_ping(port)),
            "the sentinel on {port} did not start"
        );
        Self { port, child, dir }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The user the `ACL SETUSER` line of docs/deploying.md makes.
pub const CACHE_USER: &str = "cache";

/// The rules of the `ACL SETUSER cache …` line in docs/deploying.md: what the tests run
/// as, so that the docs cannot name less than the cache needs.
pub fn readme_acl() -> Vec<String> {
    let readme = include_str!("../../docs/deploying.md");
    let line = readme
        .lines()
        .find(|line| line.starts_with("ACL SETUSER cache "))
        .expect("docs/deploying.md names the cache's ACL user");
    line.split_whitespace().skip(3).map(str::to_owned).collect()
}

/// Makes `name` on the server at `port` with `rules` and then `extra`, its
/// password `s3cret`, unless it exists.
pub fn create_user(port: u16, name: &str, rules: &[String], extra: &[&str]) {
    try_create_user(port, name, rules, extra).expect("the ACL user is made");
}

/// [`create_user`], which fails when the server does not answer.
pub fn try_create_user(
    port: u16,
    name: &str,
    rules: &[String],
    extra: &[&str],
) -> redis::RedisResult<()> {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?
        .get_connection_with_timeout(Duration::from_secs(1))?;
    // Made once: remaking a user disconnects every client logged in as it.
    let known: redis::Value = redis::cmd("ACL")
        .arg("GETUSER")
        .arg(name)
        .query(&mut conn)?;
    if known != redis::Value::Nil {
        return Ok(());
    }
    let mut setuser = redis::cmd("ACL");
    setuser.arg("SETUSER").arg(name).arg("on").arg(">s3cret");
    for rule in rules
        .iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
    {
        if !rule.starts_with('>') && rule != "on" {
            setuser.arg(rule);
        }
    }
    setuser.query(&mut conn)
}

/// A URL that logs in as `name` (password `s3cret`).
pub fn user_url(port: u16, name: &str) -> String {
    format!("redis://{name}:s3cret@127.0.0.1:{port}/")
}

/// True when a Redis server answers `PING` on `port`: a connection alone
/// may be no server's (a socket that connected to itself, or another
/// test's listener).
fn answers_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir());
    }
}

/// A Redis Cluster of three masters on loopback, formed with `redis-cli
/// --cluster create`, killed on drop.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Option<Child>>,
}

impl RedisCluster {
    /// Forms a cluster on free ports. A port found free can still be
    /// taken before a node binds it (the node exits) and a slow machine
    /// can take a while to agree on the slots: either way the nodes are
    /// killed and the cluster is formed again on other ports.
    pub fn start() -> Self {
        Self::start_with(0)
    }

    /// Three masters with one replica each.
    pub fn start_with_replicas() -> Self {
        Self::start_with(1)
    }

    fn start_with(replicas: usize) -> Self {
        if let Err(err) = Command::new("redis-cli").arg("--version").output() {
            panic!("redis-cli is not on PATH ({err}); install it (apt-get install redis-tools)");
        }
        let mut failures = Vec::new();
        for _ in 0..5 {
            match Self::try_start(replicas) {
                Ok(cluster) => return cluster,
                Err(failure) => failures.push(failure),
            }
        }
        panic!("no cluster formed in 5 tries: {failures:?}");
    }

    fn try_start(replicas: usize) -> Result<Self, String> {
        let ports: Vec<u16> = (0..3 * (1 + replicas))
            .map(|_| free_cluster_port())
            .collect();
        let mut cluster = Self {
            ports: ports.clone(),
            children: Vec::new(),
        };
        for port in &ports {
            let dir = std::env::temp_dir().join(format!("tower-redis-cache-cluster-{port}"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                .args(["--dir", dir.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server starts");
            cluster.children.push(Some(child));
        }
        for (index, port) in ports.iter().enumerate() {
            let answered = wait_for(Duration::from_secs(10), || {
                answers_ping(*port) || cluster.exited(index)
            });
            if !answered || cluster.exited(index) {
                return Err(format!("the node on {port} did not start"));
            }
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        if !created.status.success() {
            return Err(String::from_utf8_lossy(&created.stdout).into_owned());
        }
        for port in &ports {
            let agreed = wait_for(Duration::from_secs(30), || {
                Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .is_ok_and(|out| {
                        String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok")
                    })
                    && Command::new("redis-cli")
                        .args(["-p", &port.to_string(), "info", "replication"])
                        .output()
                        .is_ok_and(|out| {
                            let info = String::from_utf8_lossy(&out.stdout).into_owned();
                            info.contains("role:master") || info.contains("master_link_status:up")
                        })
            });
            if !agreed {
                return Err(format!(
                    "the node on {port} never reported cluster_state:ok"
                ));
            }
        }
        Ok(cluster)
    }

    /// True when the node at `index` has exited (or was killed).
    fn exited(&mut self, index: usize) -> bool {
        self.children[index]
            .as_mut()
            .is_none_or(|child| matches!(child.try_wait(), Ok(Some(_))))
    }

    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// A store over the cluster, logged in as docs/deploying.md's
    /// least-privilege user.
    pub fn store(&self) -> RedisStore<ClusterSource> {
        self.store_builder().build().unwrap()
    }

    /// The builder of [`Self::store`], for a test that changes a setting.
    pub fn store_builder(&self) -> RedisStoreBuilder<ClusterSource> {
        let acl = readme_acl();
        for port in &self.ports {
            // A node killed by the test is made the user when it was up.
            let _ = try_create_user(*port, CACHE_USER, &acl, &["~*"]);
        }
        let urls = self.ports.iter().map(|port| user_url(*port, CACHE_USER));
        RedisStore::builder(RedisSource::cluster(urls))
            .deadline(TEST_DEADLINE)
            .breaker(test_breaker())
    }

    /// A connection that follows the cluster, for checks and key surgery.
    pub async fn raw(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .unwrap()
            .get_async_connection()
            .await
            .unwrap()
    }

    /// Stops (`SIGSTOP`) or resumes (`SIGCONT`) the master at `index`: it
    /// keeps its connections and answers nothing meanwhile.
    pub fn signal(&self, index: usize, signal: &str) {
        if let Some(child) = &self.children[index] {
            let done = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .unwrap();
            assert!(done.success());
        }
    }

    /// The cluster's nodes as the node on `port` sees them.
    pub fn nodes(&self, port: u16) -> Vec<ClusterNode> {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "cluster", "nodes"])
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let port = fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                let slots = fields[8..]
                    .iter()
                    .filter(|range| !range.starts_with('['))
                    .filter_map(|range| {
                        let mut bounds = range.split('-').map(|b| b.parse::<u16>().ok());
                        let first = bounds.next()??;
                        Some((first, bounds.next().flatten().unwrap_or(first)))
                    })
                    .collect();
                Some(ClusterNode {
                    id: fields[0].to_owned(),
                    port,
                    master: fields[2].contains("master"),
                    failed: fields[2].contains("fail"),
                    master_id: fields[3].to_owned(),
                    slots,
                })
            })
            .collect()
    }

    /// The port of the master serving `slot`, and of its replicas, as the
    /// node on `port` sees them.
    pub fn shard_of(&self, port: u16, slot: u16) -> (u16, Vec<u16>) {
        let nodes = self.nodes(port);
        let master = nodes
            .iter()
            .find(|n| n.master && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .expect("a master serves the slot");
        let replicas = nodes
            .iter()
            .filter(|n| n.master_id == master.id && !n.failed)
            .map(|n| n.port)
            .collect();
        (master.port, replicas)
    }

    /// Kills the node on `port`.
    pub fn kill_port(&mut self, port: u16) {
        let index = self.ports.iter().position(|p| *p == port).expect("a node");
        self.kill(index);
    }

    /// Kills the master at `index` (its slots stay unserved: no replicas).
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.children[index].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub master: bool,
    pub failed: bool,
    pub master_id: String,
    pub slots: Vec<(u16, u16)>,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for index in 0..self.children.len() {
            // A node that already exited (a start that failed, to be tried
            // again) has no process left to resume.
            if !self.exited(index) {
                self.signal(index, "-CONT");
            }
            self.kill(index);
        }
        for port in &self.ports {
            let _ = std::fs::remove_dir_all(
                std::env::temp_dir().join(format!("tower-redis-cache-cluster-{port}")),
            );
        }
    }
}

/// Forwards `127.0.0.1:<returned port>` to `target`, holding every chunk
/// `to_server` on its way there and `to_client` on its way back: a slow
/// link, or a slow server.
pub async fn delaying_proxy(target: u16, to_server: Duration, to_client: Duration) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                continue;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let pump = |mut from: tokio::net::tcp::OwnedReadHalf,
                        mut to: tokio::net::tcp::OwnedWriteHalf,
                        delay: Duration| async move {
                let mut buf = vec![0; 64 * 1024];
                while let Ok(n) = from.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    tokio::time::sleep(delay).await;
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            };
            tokio::spawn(pump(client_read, server_write, to_server));
            tokio::spawn(pump(server_read, client_write, to_client));
        }
    });
    port
}

/// A port free now, below the kernel's ephemeral range (32768 and up by
/// default) so that no outgoing connection's source port takes it before a
/// server binds it, and picked at random so that tests starting servers at
/// once rarely pick the same.
pub fn free_port() -> u16 {
    free_port_in(20_000..32_000, |_| true)
}

/// A free port whose cluster bus port (port + 10 000) is free too, both
/// below the ephemeral range.
fn free_cluster_port() -> u16 {
    free_port_in(10_000..22_000, |port| bindable(port + 10_000))
}

fn free_port_in(range: std::ops::Range<u16>, also: impl Fn(u16) -> bool) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    for _ in 0..1000 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        let span = u64::from(range.end - range.start);
        let port = range.start + (hasher.finish() % span) as u16;
        if bindable(port) && also(port) {
            return port;
        }
    }
    panic!("no free port in {range:?}");
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Polls `ready` every 20 ms for up to `limit`; false when it never was.
fn wait_for(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
