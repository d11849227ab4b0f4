//! Single-flight: concurrent misses for the same entry in one process call
//! the inner service once; the others wait for that response. And
//! hit-for-miss: an entry whose response could not be stored is remembered
//! for [`HIT_FOR_MISS`], and its misses call the inner service at once
//! instead of waiting for a response they could not share.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::store::{CacheKey, Lookup, Observed};

/// How a flight ended for the requests that waited on it.
#[derive(Debug, Clone)]
pub(crate) enum Landed {
    /// The leader's response, in its stored form.
    Entry(Bytes),
    /// The leader's response cannot be shared (not storable): each waiting
    /// request calls the inner service itself.
    Unshareable,
    /// The leader's response streams: each waiting request reads it as it
    /// comes (see `fanout.rs`); the entry, once stored, replaces it.
    Streaming(std::sync::Arc<crate::fanout::Tee>),
}

/// What a follower waits for: how the flight landed, or `None` when the
/// leader was dropped first (its client went away): then one follower takes
/// the flight over.
pub(crate) type Wait = Pin<Box<dyn Future<Output = Option<Landed>> + Send>>;

type Flights = Arc<Mutex<HashMap<String, watch::Receiver<Option<Landed>>>>>;

/// How long an entry whose response could not be stored (a 404, a
/// `Set-Cookie`, a body over the cap) sends its misses straight to the
/// inner service. A storable response ends it at once.
pub(crate) const HIT_FOR_MISS: Duration = Duration::from_secs(10);

/// Most entries remembered as hit-for-miss at once; the oldest go first.
const HIT_FOR_MISS_ENTRIES: usize = 10_000;

/// The misses under way in this process, and the entries whose responses
/// could not be stored lately.
#[derive(Clone)]
pub(crate) struct FlightTable {
    flights: Flights,
    unstorable: Arc<quick_cache::sync::Cache<String, Instant>>,
}

impl Default for FlightTable {
    fn default() -> Self {
        Self {
            flights: Flights::default(),
            unstorable: Arc::new(quick_cache::sync::Cache::new(HIT_FOR_MISS_ENTRIES)),
        }
    }
}

impl std::fmt::Debug for FlightTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightTable").finish_non_exhaustive()
    }
}

/// Whether this request leads a flight or joins one.
pub(crate) enum Role {
    Lead(Leader),
    Join(Wait),
}

/// Held by the request that calls the inner service. Dropping it without
/// [`Leader::share`] or [`Leader::unshareable`] hands the flight to one of
/// the followers.
#[derive(Debug)]
pub(crate) struct Leader {
    flights: Flights,
    name: String,
    sender: watch::Sender<Option<Landed>>,
    /// The flight landed with an entry: it stays listed, landed, until the
    /// leader is dropped (its write done), so a request whose lookup saw
    /// the flight's lease joins it and gets the entry at once.
    shared: bool,
}

impl FlightTable {
    /// True when the entry `key` names under what `seen` read had a
    /// response that could not be stored, less than [`HIT_FOR_MISS`] ago.
    pub(crate) fn passes(&self, key: &CacheKey, seen: &Lookup) -> bool {
        self.unstorable
            .get(&entry_name(key, seen))
            .is_some_and(|until| Instant::now() < until)
    }

    /// The entry's response could not be stored: its misses pass.
    pub(crate) fn unstorable(&self, key: &CacheKey, seen: &Lookup) {
        self.unstorable
            .insert(entry_name(key, seen), Instant::now() + HIT_FOR_MISS);
    }

    /// The entry's response was stored: its misses coalesce again.
    pub(crate) fn stored(&self, key: &CacheKey, seen: &Lookup) {
        if !self.unstorable.is_empty() {
            self.unstorable.remove(&entry_name(key, seen));
        }
    }

    /// Leads or joins the flight for `key` as the lookup saw it. The flight
    /// is named by what the lookup saw (version, tombstone), so a request
    /// that looked up after an invalidation never joins a flight that
    /// started before it.
    pub(crate) fn enter(&self, key: &CacheKey, seen: &Lookup) -> Role {
        let name = flight_name(key, seen);
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(receiver) = flights.get(&name) {
            let mut receiver = receiver.clone();
            return Role::Join(Box::pin(async move {
                receiver
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|v| v.clone())
            }));
        }
        let (sender, receiver) = watch::channel(None);
        flights.insert(name.clone(), receiver);
        Role::Lead(Leader {
            flights: self.flights.clone(),
            name,
            sender,
            shared: false,
        })
    }
}

impl Leader {
    /// Hands the streamed response to every follower, now and until the
    /// flight lands.
    pub(crate) fn stream(&self, tee: std::sync::Arc<crate::fanout::Tee>) {
        self.sender.send_replace(Some(Landed::Streaming(tee)));
    }

    /// Hands the stored form of the response to every follower, and to
    /// every request that joins until the leader is dropped.
    pub(crate) fn share(&mut self, entry: Bytes) {
        self.shared = true;
        self.sender.send_replace(Some(Landed::Entry(entry)));
    }

    /// Tells the followers to call the inner service themselves, unless
    /// the flight landed with an entry already.
    pub(crate) fn unshareable(self) {
        if !self.shared {
            self.sender.send_replace(Some(Landed::Unshareable));
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if flights
            .get(&self.name)
            .is_some_and(|r| r.same_channel(&self.sender.subscribe()))
        {
            flights.remove(&self.name);
        }
    }
}

/// The entry a lookup names: the key under the versions it read.
fn entry_name(key: &CacheKey, seen: &Lookup) -> String {
    match seen.version_values() {
        Some(versions) => key.entry_key(&versions),
        None => key.entry_key(&[b"?"]),
    }
}

fn flight_name(key: &CacheKey, seen: &Lookup) -> String {
    let mut name = entry_name(key, seen);
    // What the lookup saw, whole: two lookups that saw different bytes
    // never share a flight.
    let mut hasher = Sha256::new();
    for observed in seen.versions().iter().chain([seen.entry()]) {
        match observed {
            Observed::Absent => hasher.update([0]),
            Observed::WrongType => hasher.update([2]),
            Observed::Value(bytes) => {
                hasher.update([1]);
                hasher.update((bytes.len() as u64).to_be_bytes());
                hasher.update(bytes);
            }
        }
    }
    name.push('|');
    for byte in hasher.finalize().iter().take(16) {
        let _ = write!(name, "{byte:02x}");
    }
    name
}
