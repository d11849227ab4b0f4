//! Records a history of reads and writes against persons processes, for the
//! consistency checker (`scripts/consistency`): writers rename persons to
//! `v<version>` on some processes, readers read items and a list on others,
//! and every operation is written down with its process, key, start and end
//! (microseconds on this recorder's one clock), status, `cache-status`
//! detail and the versions it wrote or saw.
//!
//! ```sh
//! cargo build --release -p tower-redis-cache-load
//! target/release/history --procs 127.0.0.1:3001,127.0.0.1:3002 --writers 0 \
//!     --readers 1 --items 40 --seconds 10 --out history.txt
//! ```
//!
//! A first line `T <unix_us>`: when the clock below started. Then one line
//! per operation: `W|R <process> <key> <start_us> <end_us> <status>
//! <detail> <versions>`, where key is `i<id>` (an item) or `l` (the list),
//! versions `id:version` pairs joined by `;` (`-` when none). Status 0: no
//! response (the process was down, the connection cut, or 3 s passed; a
//! person whose write got none is written no more: it may still commit
//! after a later one).

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

struct Options {
    procs: Vec<String>,
    writers: Vec<usize>,
    readers: Vec<usize>,
    token: String,
    items: u64,
    list: String,
    list_share: f64,
    read_tasks: usize,
    write_tasks: usize,
    write_pause: Duration,
    seconds: u64,
    out: String,
}

fn indices(value: &str) -> Result<Vec<usize>, String> {
    value
        .split(',')
        .map(|i| {
            i.trim()
                .parse()
                .map_err(|_| format!("`{i}`: a process index"))
        })
        .collect()
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        procs: Vec::new(),
        writers: vec![0],
        readers: vec![0],
        token: "demo-token-acme".into(),
        items: 40,
        list: "/persons?limit=10".into(),
        list_share: 0.2,
        read_tasks: 8,
        write_tasks: 2,
        write_pause: Duration::from_millis(5),
        seconds: 10,
        out: "history.txt".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = |what: &str| value.parse::<f64>().map_err(|_| format!("{flag}: {what}"));
        match flag.as_str() {
            "--procs" => o.procs = value.split(',').map(str::to_owned).collect(),
            "--writers" => o.writers = indices(&value)?,
            "--readers" => o.readers = indices(&value)?,
            "--token" => o.token = value,
            "--items" => o.items = number("a count")? as u64,
            "--list" => o.list = value,
            "--list-share" => o.list_share = number("a share from 0 to 1")?,
            "--read-tasks" => o.read_tasks = number("a count")? as usize,
            "--write-tasks" => o.write_tasks = number("a count")? as usize,
            "--write-pause-ms" => o.write_pause = Duration::from_millis(number("ms")? as u64),
            "--seconds" => o.seconds = number("seconds")? as u64,
            "--out" => o.out = value,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if o.procs.is_empty() {
        return Err("--procs: the processes' addresses".into());
    }
    let known = |i: &usize| *i < o.procs.len();
    if !o.writers.iter().all(known) || !o.readers.iter().all(known) {
        return Err("--writers/--readers: indices into --procs".into());
    }
    Ok(o)
}

/// The longest one request may take: past it, no response (status 0).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// One response: status, the cache's `detail=`, the body.
struct Reply {
    status: u16,
    detail: String,
    body: String,
}

/// A keep-alive HTTP/1.1 connection to one process, made again after any
/// failure.
struct Conn {
    addr: String,
    stream: Option<BufReader<TcpStream>>,
}

impl Conn {
    async fn send(&mut self, request: &str) -> std::io::Result<Reply> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.send_now(request)).await {
            Ok(result) => result,
            Err(_) => {
                self.stream = None;
                Err(std::io::ErrorKind::TimedOut.into())
            }
        }
    }

    async fn send_now(&mut self, request: &str) -> std::io::Result<Reply> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(&self.addr).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(BufReader::new(stream));
        }
        let result = self.exchange(request).await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn exchange(&mut self, request: &str) -> std::io::Result<Reply> {
        let stream = self.stream.as_mut().expect("connected");
        stream.get_mut().write_all(request.as_bytes()).await?;
        let (mut status, mut length, mut detail) = (0u16, None::<usize>, String::new());
        let mut close = false;
        let mut line = String::new();
        loop {
            line.clear();
            if stream.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let text = line.trim_end();
            if text.is_empty() {
                break;
            }
            if let Some(rest) = text.strip_prefix("HTTP/1.") {
                status = rest.get(2..5).and_then(|s| s.parse().ok()).unwrap_or(0);
            } else if let Some((name, value)) = text.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse().ok();
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    // Only bodies of a known length are read: anything else
                    // would put this connection out of step.
                    return Err(std::io::ErrorKind::InvalidData.into());
                } else if name.eq_ignore_ascii_case("connection") {
                    close |= value.eq_ignore_ascii_case("close");
                } else if name.eq_ignore_ascii_case("cache-status") && detail.is_empty() {
                    detail = value
                        .split([';', ','])
                        .find_map(|part| part.trim().strip_prefix("detail="))
                        .and_then(|d| d.split_whitespace().next())
                        .unwrap_or("-")
                        .to_owned();
                }
            }
        }
        let Some(length) = length else {
            return Err(std::io::ErrorKind::InvalidData.into());
        };
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await?;
        if close {
            self.stream = None;
        }
        Ok(Reply {
            status,
            detail: if detail.is_empty() {
                "-".into()
            } else {
                detail
            },
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// The (id, version) pairs a body shows: each `"id":N` and the `"name"`
/// after it; a name other than `v<version>` (the seed's) is version 0.
fn versions(body: &str) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.find("\"id\":") {
        rest = &rest[at + 5..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(id) = digits.parse::<u64>() else {
            continue;
        };
        let Some(name_at) = rest.find("\"name\":\"") else {
            break;
        };
        // An address's or a phone's id has no name before the next id.
        if rest.find("\"id\":").is_some_and(|next| next < name_at) {
            continue;
        }
        let name = &rest[name_at + 8..];
        let name = &name[..name.find('"').unwrap_or(0)];
        let version = name
            .strip_prefix('v')
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        out.push((id, version));
        rest = &rest[name_at..];
    }
    out
}

/// A small, fast random number source (xorshift), one per task.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn get(path: &str, addr: &str, token: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let o = Arc::new(options()?);
    let started = Instant::now();
    let started_unix_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let us = move || started.elapsed().as_micros() as u64;
    let done = Arc::new(AtomicBool::new(false));
    let (lines, mut out) = mpsc::unbounded_channel::<String>();
    let mut tasks = Vec::new();
    for w in 0..o.write_tasks {
        let (o, done, lines) = (o.clone(), done.clone(), lines.clone());
        tasks.push(tokio::spawn(async move {
            let proc = o.writers[w % o.writers.len()];
            let addr = o.procs[proc].clone();
            let mut conn = Conn { addr: addr.clone(), stream: None };
            let ids: Vec<u64> = (1..=o.items).filter(|id| (id - 1) as usize % o.write_tasks == w).collect();
            let mut next_version = vec![1u64; ids.len()];
            // A write left without a response may still commit after a
            // later one: its person is written no more.
            let mut retired = vec![false; ids.len()];
            let mut turn = 0;
            while !done.load(Ordering::Relaxed) && retired.iter().any(|r| !r) {
                let slot = turn % ids.len();
                turn += 1;
                if retired[slot] {
                    continue;
                }
                let (id, version) = (ids[slot], next_version[slot]);
                next_version[slot] += 1;
                let body = format!(r#"{{"name":"v{version}"}}"#);
                let request = format!(
                    "PATCH /persons/{id} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    o.token,
                    body.len()
                );
                let start = us();
                let reply = conn.send(&request).await;
                let end = us();
                let (status, detail) = match &reply {
                    Ok(r) => (r.status, r.detail.as_str()),
                    Err(_) => (0, "-"),
                };
                let _ = lines.send(format!("W {proc} i{id} {start} {end} {status} {detail} {id}:{version}"));
                if let Err(err) = &reply {
                    if err.kind() == std::io::ErrorKind::TimedOut {
                        retired[slot] = true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(o.write_pause).await;
            }
        }));
    }
    for r in 0..o.read_tasks {
        let (o, done, lines) = (o.clone(), done.clone(), lines.clone());
        tasks.push(tokio::spawn(async move {
            let proc = o.readers[r % o.readers.len()];
            let addr = o.procs[proc].clone();
            let mut conn = Conn {
                addr: addr.clone(),
                stream: None,
            };
            let mut random = Random(0x9E37_79B9_7F4A_7C15 ^ ((r as u64 + 1) * 0x2545_F491));
            while !done.load(Ordering::Relaxed) {
                let list = (random.next() % 1000) as f64 / 1000.0 < o.list_share;
                let (key, path) = if list {
                    ("l".to_owned(), o.list.clone())
                } else {
                    let id = random.next() % o.items + 1;
                    (format!("i{id}"), format!("/persons/{id}"))
                };
                let start = us();
                let reply = conn.send(&get(&path, &addr, &o.token)).await;
                let end = us();
                let line = match &reply {
                    Ok(r) => {
                        let seen = versions(&r.body);
                        let seen = if seen.is_empty() {
                            "-".to_owned()
                        } else {
                            seen.iter()
                                .map(|(i, v)| format!("{i}:{v}"))
                                .collect::<Vec<_>>()
                                .join(";")
                        };
                        format!(
                            "R {proc} {key} {start} {end} {} {} {seen}",
                            r.status, r.detail
                        )
                    }
                    Err(_) => format!("R {proc} {key} {start} {end} 0 - -"),
                };
                let _ = lines.send(line);
                if reply.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    drop(lines);
    let writer = {
        let path = o.out.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
            // The clock every start and end below counts from.
            writeln!(file, "T {started_unix_us}")?;
            let mut count = 0;
            while let Some(line) = out.blocking_recv() {
                writeln!(file, "{line}")?;
                count += 1;
            }
            file.flush()?;
            Ok(count)
        })
    };
    tokio::time::sleep(Duration::from_secs(o.seconds)).await;
    done.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let count = writer.await??;
    println!(
        "history: {count} operations in {} s to {}",
        o.seconds, o.out
    );
    Ok(())
}
