//! What operators see: a span per store operation, and warnings that do
//! not flood the log when the store fails on every request.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use common::{app, get_req, method_req, send, Db};
use tower_redis_cache::store::{BreakerConfig, MemoryStore, RedisStore};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::fmt::MakeWriter;

/// Everything the subscriber writes, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn subscriber(level: &str, out: &Captured) -> impl tracing::Subscriber + Send + Sync {
    tracing_subscriber::fmt()
        .with_env_filter(level)
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(false)
        .with_writer(out.clone())
        .finish()
}

#[tokio::test]
async fn every_store_operation_has_a_span_with_its_route_outcome_and_duration() {
    let out = Captured::default();
    let _guard = tracing::subscriber::set_default(subscriber("tower_redis_cache=debug", &out));
    let db = Db::default();
    db.set("1", 1);
    let (router, _) = app(Arc::new(MemoryStore::new()), db);
    send(&router, get_req("/persons/1")).await;
    send(&router, get_req("/persons/1")).await;
    send(&router, method_req("PATCH", "/persons/1")).await;
    let log = out.text();
    let spans: Vec<&str> = log.lines().filter(|l| l.contains("cache.store{")).collect();
    let find = |op: &str, outcome: &str| {
        spans.iter().any(|l| {
            l.contains(&format!("op=\"{op}\""))
                && l.contains(&format!("outcome=\"{outcome}\""))
                && l.contains("duration_us=")
        })
    };
    assert!(find("lookup", "miss"), "{log}");
    assert!(find("store", "stored"), "{log}");
    assert!(find("lookup", "hit"), "{log}");
    assert!(find("invalidate", "applied"), "{log}");
    assert!(
        spans
            .iter()
            .filter(|l| l.contains("op=\"lookup\""))
            .all(|l| l.contains("route=\"GET /persons/{id}\"")),
        "{log}"
    );
}

#[tokio::test]
async fn a_store_failing_on_every_request_warns_once_per_interval() {
    let out = Captured::default();
    let _guard = tracing::subscriber::set_default(subscriber("tower_redis_cache=warn", &out));
    // Nothing listens there: every lookup fails at once. The breaker is
    // told to stay closed so that every request really tries the store.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = RedisStore::builder(format!("redis://127.0.0.1:{port}"))
        .breaker(BreakerConfig::default().failure_threshold(u32::MAX))
        .build()
        .unwrap();
    let db = Db::default();
    db.set("1", 1);
    let (router, policy) = app(Arc::new(store), db);
    for _ in 0..50 {
        let (status, x_cache, body) = send(&router, get_req("/persons/1")).await;
        assert_eq!(status, 200);
        assert_eq!(x_cache, "BYPASS");
        assert_eq!(body, r#"{"id":"1","rev":1}"#);
    }
    let errors = policy.stats().route("GET /persons/{id}").unwrap().errors;
    assert_eq!(errors, 50, "every request tried the store");
    let log = out.text();
    let warned = log.matches("cache lookup failed").count();
    assert_eq!(warned, 1, "{log}");
    assert!(log.contains("suppressed=0"), "{log}");
}
