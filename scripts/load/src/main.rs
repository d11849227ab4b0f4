//! A small HTTP load client for the persons example: keep-alive
//! connections, a fixed number of requests, latency percentiles.
//!
//! Run with (the persons example listening):
//!
//! ```sh
//! cargo run --release -p tower-redis-cache-load -- --addr 127.0.0.1:3000 \
//!     --path /persons/1 --requests 5000 --concurrency 16
//! ```
//!
//! `--vary skip` makes every request distinct (`&skip=<n>`), so each one
//! misses. Prints one line: requests, concurrency, p50/p99/mean in µs,
//! throughput, and the `x-cache` values seen.
//!
//! `--writer <addr>` measures instead how soon a write on one process is
//! seen by another (two persons processes with `CACHE_IN_PROCESS_MS` set,
//! one Redis, one `PERSONS_DB`): `--requests` rounds of a `PATCH` of
//! `--path` on the writer, a read on the writer (which must show it at
//! once), then reads on `--addr` until it shows it (`--patch <path>`
//! writes another path, such as a person shown in a `--path` list). Prints the writer's
//! stale reads and the delay percentiles, from the write's response to the
//! first response showing it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Options {
    addr: String,
    writer: Option<String>,
    patch: Option<String>,
    path: String,
    token: String,
    requests: usize,
    concurrency: usize,
    vary: Option<String>,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        addr: "127.0.0.1:3000".into(),
        writer: None,
        patch: None,
        path: "/persons/1".into(),
        token: "demo-token-acme".into(),
        requests: 2000,
        concurrency: 1,
        vary: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => options.addr = value,
            "--writer" => options.writer = Some(value),
            "--patch" => options.patch = Some(value),
            "--path" => options.path = value,
            "--token" => options.token = value,
            "--requests" => options.requests = value.parse().map_err(|_| "--requests: a number")?,
            "--concurrency" => {
                options.concurrency = value.parse().map_err(|_| "--concurrency: a number")?
            }
            "--vary" => options.vary = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    options.concurrency = options.concurrency.max(1);
    Ok(options)
}

/// One GET on a keep-alive connection; returns (status, x-cache).
async fn request(
    stream: &mut BufReader<TcpStream>,
    addr: &str,
    path: &str,
    token: &str,
) -> std::io::Result<(u16, String)> {
    let (status, x_cache, _) = exchange(stream, addr, "GET", path, token, None).await?;
    Ok((status, x_cache))
}

/// One request on a keep-alive connection, with a JSON body if any;
/// returns (status, x-cache, body).
async fn exchange(
    stream: &mut BufReader<TcpStream>,
    addr: &str,
    method: &str,
    path: &str,
    token: &str,
    json: Option<&str>,
) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n");
    if let Some(json) = json {
        head.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
            json.len()
        ));
    } else {
        head.push_str("\r\n");
    }
    stream.get_mut().write_all(head.as_bytes()).await?;
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (mut length, mut x_cache) = (0usize, String::from("-"));
    loop {
        line.clear();
        stream.read_line(&mut line).await?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("x-cache") {
                x_cache.replace_range(..x_cache.find(' ').unwrap_or(x_cache.len()), value.trim());
            } else if name.eq_ignore_ascii_case("cache-status") && value.contains("in-process") {
                x_cache.push_str(" in-process");
            }
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await?;
    Ok((status, x_cache, body))
}

/// The `--writer` mode: how soon another process sees a write.
async fn publish_delay(options: &Options, writer: &str) -> Result<(), Box<dyn std::error::Error>> {
    let (path, token) = (options.path.as_str(), options.token.as_str());
    let patch = options.patch.as_deref().unwrap_or(path);
    let mut on_writer = BufReader::new(TcpStream::connect(writer).await?);
    let mut on_reader = BufReader::new(TcpStream::connect(&options.addr).await?);
    let (mut delays, mut writer_stale, mut polls, mut kept) = (Vec::new(), 0, 0, 0);
    for round in 0..options.requests {
        // Both processes hold the current version in process.
        for _ in 0..2 {
            exchange(&mut on_writer, writer, "GET", path, token, None).await?;
            let (_, x_cache, _) =
                exchange(&mut on_reader, &options.addr, "GET", path, token, None).await?;
            kept += usize::from(x_cache == "HIT in-process");
        }
        let name = format!("delay-{}-{round}", std::process::id());
        let json = format!(r#"{{"name":"{name}"}}"#);
        let (status, _, _) =
            exchange(&mut on_writer, writer, "PATCH", patch, token, Some(&json)).await?;
        if status != 200 {
            return Err(format!("PATCH {patch} answered {status}").into());
        }
        let written = Instant::now();
        let shows = |body: &[u8]| String::from_utf8_lossy(body).contains(&name);
        let (_, _, body) = exchange(&mut on_writer, writer, "GET", path, token, None).await?;
        writer_stale += usize::from(!shows(&body));
        loop {
            let (_, _, body) =
                exchange(&mut on_reader, &options.addr, "GET", path, token, None).await?;
            polls += 1;
            if shows(&body) {
                delays.push(written.elapsed());
                break;
            }
            if written.elapsed() > Duration::from_secs(30) {
                return Err(format!("round {round}: the reader never showed the write").into());
            }
        }
    }
    delays.sort();
    let at =
        |q: f64| delays[((delays.len() as f64 * q) as usize).min(delays.len() - 1)].as_micros();
    println!(
        "rounds={} writer_stale={writer_stale} delay_p50_us={} delay_p99_us={} delay_max_us={} reader_polls={polls} reader_in_process_hits={kept}",
        delays.len(),
        at(0.50),
        at(0.99),
        at(1.0),
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = options()?;
    if let Some(writer) = options.writer.clone() {
        return publish_delay(&options, &writer).await;
    }
    let per_client = options.requests / options.concurrency;
    let started = Instant::now();
    let mut clients = Vec::new();
    for client in 0..options.concurrency {
        let (addr, path, token, vary) = (
            options.addr.clone(),
            options.path.clone(),
            options.token.clone(),
            options.vary.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut stream = BufReader::new(TcpStream::connect(&addr).await?);
            let mut samples = Vec::with_capacity(per_client);
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            for i in 0..per_client {
                let path = match &vary {
                    Some(param) => {
                        let sep = if path.contains('?') { '&' } else { '?' };
                        format!("{path}{sep}{param}={}", client * per_client + i)
                    }
                    None => path.clone(),
                };
                let start = Instant::now();
                let (status, x_cache) = request(&mut stream, &addr, &path, &token).await?;
                samples.push(start.elapsed());
                *seen.entry(format!("{status} {x_cache}")).or_default() += 1;
            }
            Ok::<_, std::io::Error>((samples, seen))
        }));
    }
    let mut samples: Vec<Duration> = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for client in clients {
        let (s, k) = client.await??;
        samples.extend(s);
        for (key, n) in k {
            *seen.entry(key).or_default() += n;
        }
    }
    let elapsed = started.elapsed();
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_micros();
    let mean = samples.iter().sum::<Duration>().as_micros() / samples.len().max(1) as u128;
    println!(
        "requests={} concurrency={} p50_us={} p99_us={} mean_us={} rps={:.0} seen={:?}",
        samples.len(),
        options.concurrency,
        at(0.50),
        at(0.99),
        mean,
        samples.len() as f64 / elapsed.as_secs_f64(),
        seen
    );
    Ok(())
}
