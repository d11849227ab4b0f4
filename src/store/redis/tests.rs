//! Exact Redis commands per request, through the layers, on a mock
//! connection: a hit is one round trip, item or list alike.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use redis::aio::ConnectionLike;
use redis::Value;
use tower::{Layer, Service, ServiceExt};

use super::scripts::{ENSURE_VERSIONS, INVALIDATE, STORE};
use super::*;
use crate::{CacheLayer, InvalidateLayer, Policy, Route, Rule};

/// A store over `conn`, with the default settings.
fn over<C: Connect>(conn: C) -> RedisStore<C> {
    RedisStore::builder(RedisSource::connection(conn))
        .build()
        .expect("default settings")
}

fn policy(store: impl Store) -> Policy {
    Policy::builder()
        .store(store)
        .route(
            Route::get("/persons/{id}")
                .key("person:{id}")
                .ttl(Duration::from_secs(300)),
        )
        .route(
            Route::get("/persons")
                .key("persons:list:v{version}:{query_hash}")
                .versioned_by("persons:list"),
        )
        .on(Rule::new("POST /persons").bump("persons:list"))
        .on(Rule::new("PATCH /persons/{id}")
            .purge("GET /persons/{id}")
            .bump("persons:list"))
        .build()
        .unwrap()
}

/// The entry `policy()` serves to a GET of `uri`.
fn entry_for(uri: &str) -> Bytes {
    let request = Request::get(uri).body(()).unwrap();
    crate::entry::testing::encode_for(
        &policy(crate::store::MemoryStore::new()),
        &request,
        Bytes::from_static(b"{}"),
    )
    .unwrap()
}

fn entry() -> Bytes {
    entry_for("/persons")
}

async fn get<C: ConnectionLike + Clone + Send + Sync + 'static>(
    conn: C,
    uri: &str,
) -> Response<crate::cache::ResponseBody<Full<Bytes>>> {
    service(conn)
        .oneshot(Request::get(uri).body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap()
}

/// The cache layer of `policy()` over a store on `conn`, in front of a
/// handler that answers `{}` as JSON.
fn service<C: ConnectionLike + Clone + Send + Sync + 'static>(
    conn: C,
) -> impl Service<
    Request<Empty<Bytes>>,
    Response = Response<crate::cache::ResponseBody<Full<Bytes>>>,
    Error = Infallible,
> + Clone {
    let handler = tower::service_fn(|_req: Request<Empty<Bytes>>| async {
        let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
        response
            .headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        Ok::<_, Infallible>(response)
    });
    CacheLayer::new(policy(over(conn))).layer(handler)
}

fn list_key_parts() -> (String, String) {
    let query_hash = crate::key::QueryRule::hash(&[]);
    (
        "{app:persons:list}:persons:list:v".to_owned(),
        format!(":{query_hash}"),
    )
}

/// A hit's lookup is one boxed future: it must stay within the sizes
/// the allocator serves from each thread's own cache (glibc's tcache:
/// up to 1032 bytes). Over it (it was 1056 bytes when the timed path
/// shared the future), every lookup took the arena lock that threads
/// share and consolidated its free chunks.
#[test]
fn a_lookup_future_fits_the_allocators_thread_cache() {
    const THREAD_CACHE_MAX: usize = 1024;
    let store = over(Recorder::default());
    let link = store.inner.get_ref();
    let plain = CacheKey::Plain("app:person:42".to_owned());
    let versioned = CacheKey::Versioned {
        versions: vec![crate::store::VersionKey::new(
            "{app:persons:list}:ver".to_owned(),
            Duration::from_secs(600),
        )],
        prefix: "{app:persons:list}:persons:list:v".to_owned(),
        suffix: ":abc".to_owned(),
    };
    for key in [plain, versioned] {
        let lookup = link.lookup(&key);
        let size = std::mem::size_of_val(&*lookup);
        assert!(
            size <= THREAD_CACHE_MAX,
            "a lookup of {key:?} is a {size}-byte future"
        );
    }
}

#[tokio::test]
async fn an_item_hit_is_one_command() {
    let recorder = Recorder::answering([Value::BulkString(entry_for("/persons/42").to_vec())]);
    let response = get(recorder.clone(), "/persons/42").await;
    assert_eq!(response.headers()["x-cache"], "HIT");
    let commands = recorder.commands();
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert_eq!(commands[0][..2], ["SET", "app:person:42"]);
    assert_eq!(commands[0][3..], ["NX", "PX", "60000", "GET"]);
}

#[tokio::test]
async fn concurrent_hits_on_a_batched_connection_share_round_trips() {
    const N: usize = 64;
    let recorder = Recorder::answering(
        (0..N).map(|id| Value::BulkString(entry_for(&format!("/persons/{id}")).to_vec())),
    );
    let conn = super::batch::Batched::new(recorder.clone(), false);
    // All runnable at once, as after one poll of many sockets.
    let local = tokio::task::LocalSet::new();
    let requests: Vec<_> = (0..N)
        .map(|id| {
            let (conn, uri) = (conn.clone(), format!("/persons/{id}"));
            local.spawn_local(async move { get(conn, &uri).await })
        })
        .collect();
    local
        .run_until(async {
            for request in requests {
                assert_eq!(request.await.unwrap().headers()["x-cache"], "HIT");
            }
        })
        .await;
    // The idle connection sends what is queued when its flush runs;
    // what queued after that goes out as the next batch.
    let trips = recorder.trips();
    let sizes: Vec<usize> = trips.iter().map(Vec::len).collect();
    assert!(sizes.len() <= 2, "{N} lookups in batches of {sizes:?}");
    let keys: Vec<&str> = trips
        .iter()
        .flatten()
        .map(|command| command[1].as_str())
        .collect();
    let expected: Vec<String> = (0..N).map(|id| format!("app:person:{id}")).collect();
    assert_eq!(keys, expected, "in the order they were queued");
}

/// On a cluster a batch goes out as one pipeline per slot, each with
/// only that slot's commands, and every lookup gets its own reply.
#[tokio::test]
async fn a_cluster_batch_is_one_pipeline_per_slot() {
    const N: usize = 32;
    const SLOTS: usize = 4;
    let recorder = Recorder::default();
    let store = over(super::batch::Batched::new(recorder.clone(), true));
    let key = |id: usize| CacheKey::Plain(format!("{{tag{}}}:item:{id}", id % SLOTS));
    // All runnable at once, as after one poll of many sockets.
    let local = tokio::task::LocalSet::new();
    let lookups: Vec<_> = (0..N)
        .map(|id| {
            let (store, key) = (store.clone(), key(id));
            local.spawn_local(async move { store.lookup(&key).await })
        })
        .collect();
    local
        .run_until(async {
            for lookup in lookups {
                let seen = lookup.await.unwrap().unwrap();
                // An empty key: the reply is this lookup's own lease.
                assert!(matches!(seen.entry(), Observed::Value(_)));
            }
        })
        .await;
    let mut trips = recorder.trips();
    for trip in &mut trips {
        // Each pipeline asks which node answered it, last.
        assert_eq!(
            trip.pop(),
            Some(vec!["CLUSTER".to_owned(), "MYID".to_owned()])
        );
        let slot = crate::store::slot(trip[0][1].as_bytes());
        assert!(
            trip.iter()
                .all(|command| crate::store::slot(command[1].as_bytes()) == slot),
            "a pipeline across slots: {trip:?}"
        );
    }
    assert_eq!(trips.iter().map(Vec::len).sum::<usize>(), N);
    assert!(
        trips.len() <= 2 * SLOTS,
        "{N} lookups over {SLOTS} slots in {} pipelines",
        trips.len()
    );
}

/// Script calls are batched by the slot of their first key, not of their
/// first argument (the script's hash, the same for every call): the parts
/// of a cluster invalidation never share a pipeline.
#[tokio::test]
async fn a_cluster_batch_keeps_script_calls_of_two_slots_apart() {
    let recorder = Recorder::default();
    let conn = super::batch::Batched::new(recorder.clone(), true);
    let call = |key: &str| {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(INVALIDATE.get_hash()).arg(1).arg(key).arg(1);
        cmd
    };
    let (a, b) = (call("{app:person}:1"), call("{app:persons:list}:ver"));
    assert_ne!(
        crate::store::slot(b"{app:person}:1"),
        crate::store::slot(b"{app:persons:list}:ver")
    );
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let sent: Vec<_> = [a, b]
                .into_iter()
                .map(|cmd| {
                    let mut conn = conn.clone();
                    tokio::task::spawn_local(
                        async move { conn.req_packed_command(&cmd).await.unwrap() },
                    )
                })
                .collect();
            for reply in sent {
                reply.await.unwrap();
            }
        })
        .await;
    let trips = recorder.trips();
    assert_eq!(trips.len(), 2, "{trips:?}");
    assert!(
        trips
            .iter()
            .all(|trip| trip.len() == 2 && trip[1][0] == "CLUSTER"),
        "each call alone, with the node question: {trips:?}"
    );
}

#[tokio::test]
async fn a_list_hit_is_one_mget_once_the_version_is_known() {
    let (prefix, suffix) = list_key_parts();
    let entry_key = format!("{prefix}17{suffix}");
    let version = || Value::BulkString(b"17".to_vec());
    let entry = || Value::BulkString(entry().to_vec());
    // The first lookup learns the version, then reads the entry under
    // it; the second reads both at once.
    let recorder = Recorder::answering([
        Value::Array(vec![version()]),
        entry(),
        Value::Array(vec![version(), entry()]),
    ]);
    two_list_hits(&recorder).await;
    assert_eq!(
        recorder.commands(),
        [
            vec!["MGET", "{app:persons:list}:ver"],
            vec!["GET", &entry_key],
            vec!["MGET", "{app:persons:list}:ver", &entry_key],
        ]
    );
    assert_eq!(recorder.trips().len(), 3, "one round trip per command");
}

#[tokio::test]
async fn after_a_bump_the_entry_is_read_under_the_new_version() {
    let (prefix, suffix) = list_key_parts();
    let bulk = |b: &[u8]| Value::BulkString(b.to_vec());
    let recorder = Recorder::answering([
        Value::Array(vec![bulk(b"17")]),
        bulk(&entry()),
        // Bumped by another process: the guess misses, a second GET.
        Value::Array(vec![bulk(b"18"), Value::Nil]),
        bulk(&entry()),
    ]);
    two_list_hits(&recorder).await;
    let commands = recorder.commands();
    assert_eq!(commands.len(), 4, "{commands:?}");
    assert_eq!(commands[2][2], format!("{prefix}17{suffix}"));
    assert_eq!(commands[3], ["GET", &format!("{prefix}18{suffix}")]);
}

#[tokio::test]
async fn a_missing_version_is_created_by_a_script_and_stored_under() {
    let (prefix, suffix) = list_key_parts();
    let recorder = Recorder::answering([
        Value::Array(vec![Value::Nil]),
        Value::Array(vec![Value::BulkString(b"1795331671440125".to_vec())]),
    ]);
    let response = service(recorder.clone())
        .oneshot(
            Request::get("/persons")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.headers()["cache-status"].to_str().unwrap();
    assert!(status.ends_with("stored"), "{status}");
    let commands = recorder.commands();
    assert_eq!(commands.len(), 3, "{commands:?}");
    assert_eq!(commands[0], ["MGET", "{app:persons:list}:ver"]);
    assert_eq!(
        commands[1],
        [
            "EVALSHA",
            ENSURE_VERSIONS.get_hash(),
            "1",
            "{app:persons:list}:ver",
            "60000"
        ]
    );
    // The write names every key it touches: the version, then the entry.
    assert_eq!(
        commands[2][..5],
        [
            "EVALSHA",
            STORE.get_hash(),
            "2",
            "{app:persons:list}:ver",
            &format!("{prefix}1795331671440125{suffix}")
        ]
    );
    assert_eq!(commands[2][5..8], ["v", "1795331671440125", "60000"]);
}

/// Two requests for `/persons` over one store on `recorder`: both hits.
async fn two_list_hits(recorder: &Recorder) {
    let service = service(recorder.clone());
    for _ in 0..2 {
        let response = service
            .clone()
            .oneshot(
                Request::get("/persons")
                    .body(Empty::<Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.headers()["x-cache"], "HIT");
    }
}

/// Records every round trip (a command, or a pipeline of them); answers
/// commands with the replies queued by `answering`, in order, then
/// with nil for `GET`/`SET` (an empty key) and 1 for anything else.
#[derive(Clone, Default)]
struct Recorder {
    trips: std::sync::Arc<std::sync::Mutex<Vec<Vec<Vec<String>>>>>,
    answers: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Value>>>,
}

impl Recorder {
    fn answering(replies: impl IntoIterator<Item = Value>) -> Self {
        let recorder = Self::default();
        recorder.answers.lock().unwrap().extend(replies);
        recorder
    }

    /// Every command sent, in order.
    fn commands(&self) -> Vec<Vec<String>> {
        self.trips
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// The commands of each round trip.
    fn trips(&self) -> Vec<Vec<Vec<String>>> {
        self.trips.lock().unwrap().clone()
    }

    fn answer(&self, cmd: &redis::Cmd) -> (Vec<String>, Value) {
        let args: Vec<String> = cmd
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => "<other>".to_owned(),
            })
            .collect();
        let reply = match self.answers.lock().unwrap().pop_front() {
            Some(reply) => reply,
            None if args[0] == "GET" || args[0] == "SET" => Value::Nil,
            None => Value::Int(1),
        };
        (args, reply)
    }
}

impl super::batch::Pipelines for Recorder {}

impl ConnectionLike for Recorder {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        let (args, reply) = self.answer(cmd);
        self.trips.lock().unwrap().push(vec![args]);
        Box::pin(async move { Ok(reply) })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        _offset: usize,
        _count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        let (commands, replies): (Vec<_>, Vec<_>) =
            pipeline.cmd_iter().map(|cmd| self.answer(cmd)).unzip();
        self.trips.lock().unwrap().push(commands);
        Box::pin(async move { Ok(replies) })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// A connection that never answers.
#[derive(Clone)]
struct Hang;

impl super::batch::Pipelines for Hang {}

impl ConnectionLike for Hang {
    fn req_packed_command<'a>(&'a mut self, _: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        Box::pin(std::future::pending())
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        _: &'a redis::Pipeline,
        _: usize,
        _: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        Box::pin(std::future::pending())
    }

    fn get_db(&self) -> i64 {
        0
    }
}

#[tokio::test]
async fn a_dropped_probe_never_leaves_the_circuit_half_open() {
    let store = RedisStore::builder(RedisSource::connection(Hang))
        .deadline(Duration::from_millis(5))
        .breaker(
            crate::store::BreakerConfig::default()
                .failure_threshold(1)
                .open_for(Duration::from_millis(20)),
        )
        .build()
        .unwrap();
    let key = CacheKey::Plain("k".into());
    assert_eq!(store.lookup(&key).await, Err(StoreError::Timeout));
    assert_eq!(store.lookup(&key).await, Err(StoreError::CircuitOpen));
    tokio::time::sleep(Duration::from_millis(30)).await;
    // The probe's request is cancelled before the store answers.
    // Polled once (it is pending: the store never answers), then dropped:
    // no timer races the store's own deadline on a loaded machine.
    let mut probe = Box::pin(store.lookup(&key));
    let pending = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::future::Future::poll(probe.as_mut(), cx).is_pending())
    })
    .await;
    assert!(pending, "the probe answered before the store did");
    drop(probe);
    // The next request probes, instead of being refused for ever.
    assert_eq!(store.lookup(&key).await, Err(StoreError::Timeout));
}

#[tokio::test]
async fn a_miss_is_a_lease_then_one_write_conditional_on_it() {
    let recorder = Recorder::default();
    let response = get(recorder.clone(), "/persons/42").await;
    let status = response.headers()["cache-status"].to_str().unwrap();
    assert!(status.ends_with("stored"), "{status}");
    let commands = recorder.commands();
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert_eq!(commands[0][..2], ["SET", "app:person:42"]);
    let lease = &commands[0][2];
    assert_eq!(
        commands[1][..5],
        ["EVALSHA", STORE.get_hash(), "1", "app:person:42", "p"]
    );
    // What the lookup saw (a string, our lease), then the value and TTL.
    assert_eq!(commands[1][5..7], ["1", lease.as_str()]);
    assert_eq!(commands[1][8], "300000");
}

#[tokio::test]
async fn an_invalidation_through_the_layer_is_one_evalsha() {
    let recorder = Recorder::default();
    let handler = tower::service_fn(|_req: Request<Empty<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let policy = policy(over(recorder.clone()));
    let service = InvalidateLayer::new(policy.clone()).layer(handler);
    let response = service
        .oneshot(
            Request::patch("/persons/42")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(policy.stats().invalidations().applied, 1);
    let commands = recorder.commands();
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert_eq!(
        commands[0][..6],
        [
            "EVALSHA",
            INVALIDATE.get_hash(),
            "2",
            "app:person:42",
            "{app:persons:list}:ver",
            "1"
        ]
    );
}

#[tokio::test]
async fn a_write_through_the_cache_layer_is_one_evalsha() {
    let recorder = Recorder::default();
    let handler = tower::service_fn(|_req: Request<Empty<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let policy = policy(over(recorder.clone()));
    // Both layers of one policy stacked: only the outer invalidates.
    let service =
        InvalidateLayer::new(policy.clone()).layer(CacheLayer::new(policy.clone()).layer(handler));
    service
        .oneshot(
            Request::patch("/persons/42")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(policy.stats().invalidations().applied, 1);
    let commands = recorder.commands();
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert_eq!(commands[0][..2], ["EVALSHA", INVALIDATE.get_hash()]);
}

#[tokio::test]
async fn a_failed_mutation_sends_nothing() {
    let recorder = Recorder::default();
    let handler = tower::service_fn(|_req: Request<Empty<Bytes>>| async {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        Ok::<_, Infallible>(response)
    });
    let service = CacheLayer::new(policy(over(recorder.clone()))).layer(handler);
    service
        .oneshot(
            Request::post("/persons")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(recorder.commands().is_empty());
}
