//! The whole cache set-up of the example, in one file: which store (the
//! environment picks one node, Sentinel, a cluster, or the in-process
//! store), which routes are cached and how they are keyed (per tenant),
//! and what each write invalidates. `main.rs` puts the layer on the
//! router, inside authentication, and drains the cache on shutdown.

use std::sync::Arc;
use std::time::Duration;

use tower_redis_cache::store::{RedisSource, RedisStore, Store};
use tower_redis_cache::{Policy, Route, Rule, Scope};

use crate::{env, env_u64, list, Tenant};

/// The cache as the environment sets it, with the store's name for the
/// start-up banner; `None` with `CACHE=off`.
pub(crate) fn from_env() -> Result<Option<(Policy, &'static str)>, Box<dyn std::error::Error>> {
    if env("CACHE", "on").eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let (store, store_name) = store_from_env()?;
    let verify_rate: f64 = env("CACHE_VERIFY_RATE", "0.001")
        .parse()
        .map_err(|_| "CACHE_VERIFY_RATE: a number from 0 to 1")?;
    let probe_rate: f64 = env("CACHE_PROBE_RATE", "0.01")
        .parse()
        .map_err(|_| "CACHE_PROBE_RATE: a number from 0 to 1")?;
    let in_process = Some(env_u64("CACHE_IN_PROCESS_MS", 0))
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    let policy = policy(Settings {
        namespace: env("CACHE_NAMESPACE", "app"),
        person_ttl: Duration::from_secs(env_u64("CACHE_TTL_PERSON_SECONDS", 300)),
        list_ttl: Duration::from_secs(env_u64("CACHE_TTL_LIST_SECONDS", 60)),
        in_process,
        verify_rate,
        probe_rate,
        hedge: match env("CACHE_HEDGE", "off").to_ascii_lowercase().as_str() {
            "budget" => Hedging::Budget,
            "on" => Hedging::On,
            "off" => Hedging::Off,
            _ => return Err("CACHE_HEDGE: budget, on or off".into()),
        },
        store,
    })?;
    Ok(Some((policy, store_name)))
}

/// A store (none: the in-process one) and its name.
type Named = (Option<Arc<dyn Store>>, &'static str);

/// The store the environment names: `REDIS_CLUSTER_URLS` (a cluster's
/// seeds), else `REDIS_SENTINEL_URLS` (the master Sentinel names), else
/// `REDIS_URL` (one node), else none (the in-process store). Nothing is
/// connected yet: the store connects on first use, and a Redis that is
/// down means misses, not errors.
fn store_from_env() -> Result<Named, tower_redis_cache::ConfigError> {
    let deadline = Duration::from_millis(env_u64("CACHE_REDIS_TIMEOUT_MS", 100));
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let store: Arc<dyn Store> = if let Some(seeds) = var("REDIS_CLUSTER_URLS") {
        let source = RedisSource::cluster(list(&seeds));
        let store = RedisStore::builder(source).deadline(deadline).build()?;
        return Ok((Some(Arc::new(store)), "redis cluster"));
    } else if let Some(sentinels) = var("REDIS_SENTINEL_URLS") {
        let master = env("REDIS_SENTINEL_MASTER", "mymaster");
        let source = RedisSource::sentinel(&master, list(&sentinels));
        let mut builder = RedisStore::builder(source).deadline(deadline);
        // The in-process tier hears invalidations on the master only (a
        // replica never hears what its master publishes): given the whole
        // replication group, it subscribes on whichever is the master and
        // follows it through failovers.
        if let Some(urls) = var("REDIS_SUBSCRIBE_URLS") {
            let clients = list(&urls)
                .into_iter()
                .map(redis::Client::open)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| tower_redis_cache::ConfigError::RedisSource {
                    reason: format!("REDIS_SUBSCRIBE_URLS: {err}"),
                })?;
            builder = builder.subscribe_via(clients);
        }
        let store = builder.build()?;
        return Ok((Some(Arc::new(store)), "redis sentinel"));
    } else if let Some(url) = var("REDIS_URL") {
        Arc::new(RedisStore::builder(url).deadline(deadline).build()?)
    } else {
        return Ok((None, "memory"));
    };
    Ok((Some(store), "redis"))
}

/// Every request of a tenant is keyed by its tenant: the auth middleware
/// sets the `Tenant` extension, and the scope reads it.
fn tenant_scope() -> Scope {
    Scope::new().extension(|ext| ext.get::<Tenant>().map(|t| t.0.clone()))
}

/// What the environment can change.
struct Settings {
    namespace: String,
    person_ttl: Duration,
    list_ttl: Duration,
    in_process: Option<Duration>,
    verify_rate: f64,
    probe_rate: f64,
    hedge: Hedging,
    store: Option<Arc<dyn Store>>,
}

/// `CACHE_HEDGE`: how a slow lookup lets the handler answer.
#[derive(Clone, Copy)]
enum Hedging {
    /// After the later of the lookups' p95 and the handler's time, for at
    /// most 5% of a route's requests.
    Budget,
    /// Every request whose lookup takes longer than the handler does.
    On,
    Off,
}

/// The cache configuration: tenant-scoped items and per-tenant list
/// groups, and what each write invalidates.
fn policy(settings: Settings) -> Result<Policy, tower_redis_cache::ConfigError> {
    // A share of the hits checked against the handler (the handlers only
    // read), and of the writes probed 1 s and 10 s later; hedging as
    // asked for (off unless told); the in-process tier when asked for,
    // each route's entries also kept in this process for at most `bound`.
    let local = |route: Route| {
        let route = route.verify(settings.verify_rate);
        let route = match settings.hedge {
            Hedging::Budget => route.hedge_within_budget(),
            Hedging::On => route.hedge(),
            Hedging::Off => route,
        };
        match settings.in_process {
            Some(bound) => route.in_process(bound),
            None => route,
        }
    };
    let item_and_lists = |route: &str| {
        Rule::new(route)
            .purge("GET /persons/{id}")
            .bump("persons:list")
    };
    let mut policy = Policy::builder()
        .namespace(&settings.namespace)
        .probe_writes(settings.probe_rate)
        .route(local(
            Route::get("/persons/{id}")
                .key("person:{id}")
                .ttl(settings.person_ttl)
                .scope(tenant_scope()),
        ))
        .route(local(
            Route::get("/persons")
                .key("persons:list:v{version}:{query_hash}")
                .versioned_by("persons:list")
                .per_scope()
                .query_allowlist(["limit", "skip", "name", "email", "sort"])
                .ttl(settings.list_ttl)
                .scope(tenant_scope()),
        ))
        .on(Rule::new("POST /persons").bump("persons:list"))
        .on(item_and_lists("PATCH|DELETE /persons/{id}"))
        .on(item_and_lists("POST /persons/{id}/addresses"))
        .on(item_and_lists(
            "DELETE /persons/{id}/addresses/{address_id}",
        ))
        .on(item_and_lists("POST /persons/{id}/phones"))
        .on(item_and_lists("DELETE /persons/{id}/phones/{phone_id}"));
    if let Some(store) = settings.store {
        policy = policy.store(store);
    }
    policy.build()
}
