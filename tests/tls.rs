//! `rediss://` through the `tls-rustls` feature, against a `redis-server`
//! serving TLS only, with a certificate made for the test.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{app, get_req, send, Db};
use tower_redis_cache::store::StoreError;

struct TlsRedis {
    port: u16,
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_tls() -> TlsRedis {
    let port = common::free_port();
    let dir = std::env::temp_dir().join(format!("tower-redis-cache-tls-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ])
        .current_dir(&dir)
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs (apt-get install openssl)");
    assert!(made.success());
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args(["--tls-cert-file", "cert.pem", "--tls-key-file", "key.pem"])
        .args(["--tls-ca-cert-file", "cert.pem", "--tls-auth-clients", "no"])
        .args(["--save", "", "--appendonly", "no"])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    // Killed and waited for on drop, on every path.
    let server = TlsRedis { port, child, dir };
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return server;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("redis-server did not listen on {port}");
}

#[tokio::test]
#[cfg_attr(redis_missing, ignore = "redis-server is not on PATH")]
async fn rediss_urls_connect_over_tls_and_cache() {
    let server = start_tls();
    // A self-signed certificate: `#insecure` skips its verification (a
    // real deployment passes its CA instead).
    let url = format!("rediss://127.0.0.1:{}/0#insecure", server.port);
    let store = common::connected(&url).await.expect("TLS connection");
    let db = Db::default();
    db.set("1", 1);
    let (app, _) = app(Arc::new(store), db.clone());
    assert_eq!(send(&app, get_req("/persons/1")).await.1, "MISS");
    assert_eq!(send(&app, get_req("/persons/1")).await.1, "HIT");
    assert_eq!(db.calls(), 1);

    // Plain text to a TLS-only port fails at start-up, with a reason.
    let plain = format!("redis://127.0.0.1:{}/0", server.port);
    let refused = common::connected(&plain).await.unwrap_err();
    assert!(
        matches!(refused, StoreError::Unreachable(_) | StoreError::Timeout),
        "{refused}"
    );
}
