//! A delaying TCP proxy for the consistency harness's slow-link fault:
//! forwards each `--listen` port to its `--to` address, holding every chunk
//! for the delay (milliseconds) written in the `--control` file, read every
//! 50 ms, in both directions. Order is kept and the link's throughput is
//! not: chunks queue behind each other, each leaving at its arrival plus
//! the delay. A delay of 0 (or no file) passes chunks through at once.
//!
//! ```sh
//! cargo build --release -p tower-redis-cache-load
//! echo 30 > /tmp/delay
//! target/release/delay-proxy --control /tmp/delay --listen 16379 --to 127.0.0.1:6379
//! ```
//!
//! A connection the target refuses, or either side closes, is closed on
//! the other side too (a killed Redis connection looks killed to the
//! client).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

fn options() -> Result<(String, Vec<(u16, String)>), String> {
    let (mut control, mut pairs) = (String::new(), Vec::new());
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--control" => control = value,
            "--listen" => pairs.push((
                value
                    .parse()
                    .map_err(|_| format!("--listen {value}: a port"))?,
                String::new(),
            )),
            "--to" => match pairs.last_mut() {
                Some((_, to)) if to.is_empty() => *to = value,
                _ => return Err("--to follows its --listen".into()),
            },
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if pairs.is_empty() || pairs.iter().any(|(_, to)| to.is_empty()) {
        return Err("--listen PORT --to HOST:PORT, one or more".into());
    }
    Ok((control, pairs))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (control, pairs) = options()?;
    let delay = Arc::new(AtomicU64::new(0));
    if !control.is_empty() {
        let delay = delay.clone();
        tokio::spawn(async move {
            loop {
                let ms = std::fs::read_to_string(&control)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                delay.store(ms, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    let mut listeners = Vec::new();
    for (port, to) in pairs {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        listeners.push(tokio::spawn(serve(listener, to, delay.clone())));
    }
    for listener in listeners {
        listener.await?;
    }
    Ok(())
}

async fn serve(listener: TcpListener, to: String, delay: Arc<AtomicU64>) {
    while let Ok((client, _)) = listener.accept().await {
        let (to, delay) = (to.clone(), delay.clone());
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&to).await else {
                return;
            };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(pump(client_read, server_write, delay.clone()));
            tokio::spawn(pump(server_read, client_write, delay));
        });
    }
}

/// Copies `from` to `to`, each chunk leaving `delay` ms after it arrived.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Arc<AtomicU64>) {
    let (queue, mut queued) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let due = Instant::now() + Duration::from_millis(delay.load(Ordering::Relaxed));
        if queue.send((due, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(queue);
    let _ = writer.await;
}
