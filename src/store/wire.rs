//! A connection of its own for lookups: the commands of concurrent
//! requests written as one buffer, their replies read in place.
//!
//! A hit is one command (`SET … NX GET`, or an `MGET`) and one reply.
//! Sent through redis-rs's multiplexed connection, each costs a command
//! object, a message to the connection's driver task, a reply parsed into
//! an owned value and copied, and a second hand-over from the driver
//! back to the request: together more CPU than everything else the layer
//! does for a hit. [`Wire`] speaks just enough RESP2 for these commands
//! over a second connection to the same server: a request encodes its
//! command straight into the connection's outgoing buffer and waits for
//! its own reply; one writer task sends whatever is buffered in one
//! write, one reader task cuts the replies out of what it reads (a
//! reply's bulk strings are slices of the read buffer, not copies) and
//! hands each to the request that waits for it, in order.
//!
//! Like a batch on the multiplexed connection, a command still costs its
//! request exactly one round trip: the writer sends at once on an idle
//! connection and, while earlier commands are out, yields once first so
//! that every request the runtime is about to poll adds its command to the
//! same write.
//!
//! A command may carry a deadline: if its reply has not come by then, it
//! fails with [`StoreError::Timeout`] (its place in line is kept, and the
//! late reply dropped). The reader keeps one timer for all of them, set for
//! the earliest, instead of each request keeping one of its own: Redis
//! answers in order, so that timer rarely needs to move. The store replaces
//! a connection that stalls or fails (dropping the last handle closes the
//! connection and ends both tasks).
//!
//! Everything else (scripts, writes, Pub/Sub, TLS, a cluster) stays on
//! redis-rs; a server this cannot reach the way redis-rs does (a `rediss://`
//! URL) simply gets no wire.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;

use super::StoreError;

/// One reply, as RESP2 has them. Bulk strings and lines are slices of the
/// buffer they were read into: a holder that keeps one for long (the
/// in-process tier, the versions a store remembers) copies it.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A nil bulk string or nil array.
    Nil,
    /// A bulk string.
    Bulk(Bytes),
    /// An array.
    Array(Vec<Reply>),
    /// An integer.
    Int(i64),
    /// A status line (`+OK`).
    Status(Bytes),
    /// An error line (`-WRONGTYPE …`): the command was refused.
    Error(Bytes),
}

impl Reply {
    /// The error's code (its first word), for an error reply.
    pub(crate) fn error_code(&self) -> Option<&[u8]> {
        match self {
            Reply::Error(line) => line.split(|b| *b == b' ').next(),
            _ => None,
        }
    }
}

/// The most a reply nests (an array of arrays…): deeper is not a reply to
/// any command sent here, and is refused as malformed.
const MAX_DEPTH: usize = 8;

/// The longest bulk string (or array) taken for a reply: longer than any
/// entry a policy stores (bodies are capped far below), and short enough
/// that no length overflows on 32 bits.
const MAX_LEN: i64 = 512 * 1024 * 1024;

/// Where the first complete reply in `buf` ends: `None` while it is
/// incomplete, an error when `buf` does not start with a reply.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, &'static str> {
    frame_end(buf, 0, 0)
}

fn frame_end(buf: &[u8], at: usize, depth: usize) -> Result<Option<usize>, &'static str> {
    let Some(line_end) = line_end(buf, at)? else {
        return Ok(None);
    };
    let after = line_end + 2;
    match buf[at] {
        b'+' | b'-' | b':' => Ok(Some(after)),
        b'$' => match decimal(&buf[at + 1..line_end])? {
            -1 => Ok(Some(after)),
            len if len > MAX_LEN => Err("bulk string longer than Redis allows"),
            len if len >= 0 => {
                let end = after + len as usize;
                if buf.len() < end + 2 {
                    return Ok(None);
                }
                match &buf[end..end + 2] {
                    b"\r\n" => Ok(Some(end + 2)),
                    _ => Err("bulk string without its CRLF"),
                }
            }
            _ => Err("negative bulk length"),
        },
        b'*' => {
            if depth == MAX_DEPTH {
                return Err("reply nested too deep");
            }
            let count = decimal(&buf[at + 1..line_end])?;
            if count > MAX_LEN {
                return Err("array longer than Redis allows");
            }
            let mut next = after;
            for _ in 0..count.max(0) {
                match frame_end(buf, next, depth + 1)? {
                    Some(end) => next = end,
                    None => return Ok(None),
                }
            }
            Ok(Some(next))
        }
        _ => Err("not a RESP2 reply"),
    }
}

/// Where the CRLF ending the line that starts at `at` is (`None` until it
/// arrived); a CR without its LF is refused.
fn line_end(buf: &[u8], at: usize) -> Result<Option<usize>, &'static str> {
    let Some(line) = buf.get(at..) else {
        return Ok(None);
    };
    let Some(cr) = line.iter().position(|b| *b == b'\r') else {
        return Ok(None);
    };
    match line.get(cr + 1) {
        Some(b'\n') => Ok(Some(at + cr)),
        Some(_) => Err("a CR without its LF"),
        None => Ok(None),
    }
}

fn decimal(digits: &[u8]) -> Result<i64, &'static str> {
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() {
        return Err("bad integer");
    }
    let mut value: i64 = 0;
    for digit in digits {
        if !digit.is_ascii_digit() {
            return Err("bad integer");
        }
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(i64::from(digit - b'0')))
            .ok_or("integer out of range")?;
    }
    Ok(if negative { -value } else { value })
}

/// The reply at `*at` of a complete frame (checked by [`frame_len`]),
/// moving `*at` past it.
fn parse(frame: &Bytes, at: &mut usize) -> Reply {
    let start = *at;
    let line_end = line_end(frame, start).ok().flatten().unwrap_or(frame.len());
    let line = frame.slice(start + 1..line_end);
    *at = line_end + 2;
    match frame[start] {
        b'+' => Reply::Status(line),
        b'-' => Reply::Error(line),
        b':' => Reply::Int(decimal(&line).unwrap_or_default()),
        b'$' => match decimal(&line).unwrap_or(-1) {
            len if len >= 0 => {
                let body = frame.slice(*at..*at + len as usize);
                *at += len as usize + 2;
                Reply::Bulk(body)
            }
            _ => Reply::Nil,
        },
        _ => match decimal(&line).unwrap_or(-1) {
            count if count >= 0 => Reply::Array((0..count).map(|_| parse(frame, at)).collect()),
            _ => Reply::Nil,
        },
    }
}

/// Appends `args` to `out` as one command.
fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    let size: usize = args.iter().map(|arg| arg.len() + 16).sum();
    out.reserve(size + 16);
    out.push(b'*');
    push_decimal(out, args.len() as u64);
    out.extend_from_slice(b"\r\n");
    for arg in args {
        out.push(b'$');
        push_decimal(out, arg.len() as u64);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// `n` in decimal, on the stack.
pub(crate) struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    pub(crate) fn new(mut n: u64) -> Self {
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        Self { digits, start }
    }
}

impl AsRef<[u8]> for Decimal {
    fn as_ref(&self) -> &[u8] {
        &self.digits[self.start..]
    }
}

fn push_decimal(out: &mut Vec<u8>, n: u64) {
    // Lengths and counts are mostly one or two digits.
    match n {
        0..=9 => out.push(b'0' + n as u8),
        10..=99 => out.extend_from_slice(&[b'0' + (n / 10) as u8, b'0' + (n % 10) as u8]),
        _ => out.extend_from_slice(Decimal::new(n).as_ref()),
    }
}

/// Where a request's reply goes: the reply, or the deadline it missed.
type ReplyTo = oneshot::Sender<Result<Reply, StoreError>>;

/// A request waiting for its reply.
struct Waiter {
    /// Taken when the deadline passed: the reply, when it comes, is dropped.
    reply: Option<ReplyTo>,
    until: Option<Instant>,
}

/// A connection for lookups. Cheap to clone; the connection closes when
/// the last clone is dropped.
#[derive(Clone)]
pub(crate) struct Wire {
    owner: Arc<Owner>,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire").finish_non_exhaustive()
    }
}

/// What the handles share; dropping it tells both tasks to stop.
struct Owner {
    shared: Arc<Shared>,
    _close: watch::Sender<()>,
}

struct Shared {
    state: Mutex<State>,
    /// Commands were buffered for the writer.
    buffered: Notify,
    /// A deadline came that the reader's timer is not set for.
    rewatch: Notify,
}

#[derive(Default)]
struct State {
    /// Encoded commands the writer has not taken yet.
    out: Vec<u8>,
    /// How many commands `out` holds.
    unsent: usize,
    /// Who waits for a reply, in the order the commands were buffered
    /// (sent ones first): the order Redis answers in.
    waiting: VecDeque<Waiter>,
    /// When the reader's timer goes off (or is about to be set for, once
    /// told): no waiting deadline is earlier. `None`: no timer.
    watch: Option<Instant>,
    /// Set once the connection failed: every later command fails at once.
    failed: bool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection is gone: fails what waits and what comes.
    fn fail(&self) {
        let waiting = {
            let mut state = self.state();
            state.failed = true;
            state.out = Vec::new();
            state.unsent = 0;
            state.watch = None;
            std::mem::take(&mut state.waiting)
        };
        // Dropped senders: each waiting request reads a lost connection.
        drop(waiting);
    }

    /// Fails every request whose deadline is `now` or past; the earliest
    /// deadline left, which the reader's timer is then set for.
    fn expire(&self, now: Instant) -> Option<Instant> {
        let mut expired = Vec::new();
        let next = {
            let mut state = self.state();
            let mut next: Option<Instant> = None;
            for waiter in state.waiting.iter_mut() {
                match waiter.until {
                    Some(until) if until <= now => expired.extend(waiter.reply.take()),
                    Some(until) if waiter.reply.is_some() => {
                        next = Some(next.map_or(until, |next| next.min(until)));
                    }
                    _ => {}
                }
            }
            state.watch = next;
            next
        };
        for reply in expired {
            let _ = reply.send(Err(StoreError::Timeout));
        }
        next
    }
}

/// What reading buffers at a time.
const READ_CHUNK: usize = 16 * 1024;

impl Wire {
    /// A wire over `stream`, its writer and reader spawned.
    fn spawn<R, W>(read: R, write: W) -> Self
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            buffered: Notify::new(),
            rewatch: Notify::new(),
        });
        let (close, closed) = watch::channel(());
        tokio::spawn(write_loop(shared.clone(), write, closed.clone()));
        tokio::spawn(read_loop(shared.clone(), read, closed));
        Self {
            owner: Arc::new(Owner {
                shared,
                _close: close,
            }),
        }
    }

    /// Buffers one command; its reply. A lost connection reads as
    /// [`StoreError::Unreachable`], no reply by `until` as
    /// [`StoreError::Timeout`].
    pub(crate) fn send(&self, args: &[&[u8]], until: Option<Instant>) -> Replied {
        let (reply, answer) = oneshot::channel();
        let shared = &self.owner.shared;
        let (first, rewatch) = {
            let mut state = shared.state();
            let mut rewatch = false;
            if !state.failed {
                encode(&mut state.out, args);
                state.unsent += 1;
                state.waiting.push_back(Waiter {
                    reply: Some(reply),
                    until,
                });
                // Mostly the timer is set already, for an earlier deadline.
                if let Some(until) = until {
                    if state.watch.is_none_or(|watch| until < watch) {
                        state.watch = Some(until);
                        rewatch = true;
                    }
                }
            }
            (state.unsent == 1, rewatch)
        };
        if first {
            shared.buffered.notify_one();
        }
        if rewatch {
            shared.rewatch.notify_one();
        }
        Replied { answer }
    }

    /// Connects to the server `info` names (plain TCP or a Unix socket),
    /// authenticates, selects the database and names the connection
    /// `name`; then reads the server's `INFO server` and `INFO replication`.
    /// `None` for an address this does not speak (TLS).
    pub(crate) async fn open(
        info: &redis::ConnectionInfo,
        name: &str,
    ) -> Option<Result<(Wire, String, String), StoreError>> {
        let wire = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => {
                match tokio::net::TcpStream::connect((host.as_str(), *port)).await {
                    Ok(stream) => {
                        let _ = stream.set_nodelay(true);
                        let (read, write) = stream.into_split();
                        Wire::spawn(read, write)
                    }
                    Err(err) => return Some(Err(StoreError::Unreachable(err.to_string()))),
                }
            }
            #[cfg(unix)]
            redis::ConnectionAddr::Unix(path) => {
                match tokio::net::UnixStream::connect(path).await {
                    Ok(stream) => {
                        let (read, write) = stream.into_split();
                        Wire::spawn(read, write)
                    }
                    Err(err) => return Some(Err(StoreError::Unreachable(err.to_string()))),
                }
            }
            _ => return None,
        };
        Some(
            wire.handshake(info.redis_settings(), name)
                .await
                .map(|(server, replication)| (wire, server, replication)),
        )
    }

    /// Sends the connection's setup and the two `INFO` reads as one write.
    /// A username that a server older than Redis 6 refuses (`AUTH` takes
    /// only a password there) is dropped, as redis-rs does.
    async fn handshake(
        &self,
        settings: &redis::RedisConnectionInfo,
        name: &str,
    ) -> Result<(String, String), StoreError> {
        let user = settings.username();
        match self.handshake_as(settings, user, name).await {
            Err(StoreError::Backend(refusal))
                if user.is_some() && refusal.contains("wrong number of arguments") =>
            {
                self.handshake_as(settings, None, name).await
            }
            done => done,
        }
    }

    async fn handshake_as(
        &self,
        settings: &redis::RedisConnectionInfo,
        user: Option<&str>,
        name: &str,
    ) -> Result<(String, String), StoreError> {
        let mut setup = Vec::new();
        if let Some(password) = settings.password() {
            setup.push(match user {
                Some(user) => self.send(&[b"AUTH", user.as_bytes(), password.as_bytes()], None),
                None => self.send(&[b"AUTH", password.as_bytes()], None),
            });
        }
        if settings.db() != 0 {
            let db = settings.db().to_string();
            setup.push(self.send(&[b"SELECT", db.as_bytes()], None));
        }
        // A name is for operators only: a proxy that refuses it is fine.
        let named = self.send(&[b"CLIENT", b"SETNAME", name.as_bytes()], None);
        let server = self.send(&[b"INFO", b"server"], None);
        let replication = self.send(&[b"INFO", b"replication"], None);
        for step in setup {
            if let Reply::Error(refusal) = step.await? {
                return Err(super::redis::refused(&String::from_utf8_lossy(&refusal)));
            }
        }
        named.await?;
        let text = |reply: Reply| match reply {
            Reply::Bulk(text) => Ok(String::from_utf8_lossy(&text).into_owned()),
            other => Err(StoreError::Backend(format!("INFO answered {other:?}"))),
        };
        Ok((text(server.await?)?, text(replication.await?)?))
    }
}

/// The reply to one command sent on a [`Wire`].
pub(crate) struct Replied {
    answer: oneshot::Receiver<Result<Reply, StoreError>>,
}

impl std::fmt::Debug for Replied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replied").finish_non_exhaustive()
    }
}

impl Future for Replied {
    type Output = Result<Reply, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.answer).poll(cx).map(|answer| {
            answer.unwrap_or_else(|_| {
                Err(StoreError::Unreachable("redis connection lost".to_owned()))
            })
        })
    }
}

/// `op`, unless the wire is closed first.
async fn unless_closed<T>(
    closed: &mut watch::Receiver<()>,
    op: impl Future<Output = T>,
) -> Option<T> {
    let mut op = std::pin::pin!(op);
    let closing = closed.changed();
    let mut closing = std::pin::pin!(closing);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(done) = op.as_mut().poll(cx) {
            return Poll::Ready(Some(done));
        }
        // The sender is only ever dropped: any change is the close.
        closing.as_mut().poll(cx).map(|_| None)
    })
    .await
}

/// Writes what requests buffer, all of it in one write. While earlier
/// commands are still out it first yields once, so that requests the
/// runtime is about to poll add theirs: Redis is busy anyway.
async fn write_loop<W: AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut write: W,
    mut closed: watch::Receiver<()>,
) {
    let mut sending = Vec::new();
    loop {
        if unless_closed(&mut closed, shared.buffered.notified())
            .await
            .is_none()
        {
            return;
        }
        let busy = {
            let state = shared.state();
            state.waiting.len() > state.unsent
        };
        if busy {
            tokio::task::yield_now().await;
        }
        {
            let mut state = shared.state();
            if state.unsent == 0 {
                continue;
            }
            // The buffers swap: each keeps its capacity.
            std::mem::swap(&mut state.out, &mut sending);
            state.unsent = 0;
        }
        match unless_closed(&mut closed, write.write_all(&sending)).await {
            Some(Ok(())) => sending.clear(),
            Some(Err(err)) => {
                tracing::debug!(error = %err, "redis wire write failed");
                shared.fail();
                return;
            }
            None => return,
        }
    }
}

/// What the reader woke up for.
enum Woken {
    Read(std::io::Result<usize>),
    /// A deadline may have passed, or came that the timer is not set for.
    Watch,
    Closed,
}

/// Reads replies and hands each to the request that waits for it; fails
/// the requests whose deadline passes first.
async fn read_loop<R: AsyncRead + Unpin>(
    shared: Arc<Shared>,
    mut read: R,
    mut closed: watch::Receiver<()>,
) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut replies = Vec::new();
    let mut waiters = Vec::new();
    let timer = tokio::time::sleep_until(Instant::now());
    let mut timer = std::pin::pin!(timer);
    let mut timed = false;
    loop {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let woken = {
            let mut reading = std::pin::pin!(read.read_buf(&mut buf));
            let mut rewatch = std::pin::pin!(shared.rewatch.notified());
            let mut closing = std::pin::pin!(closed.changed());
            std::future::poll_fn(|cx| {
                // A reply that came wins over a deadline that passed.
                if let Poll::Ready(read) = reading.as_mut().poll(cx) {
                    return Poll::Ready(Woken::Read(read));
                }
                if rewatch.as_mut().poll(cx).is_ready()
                    || (timed && timer.as_mut().poll(cx).is_ready())
                {
                    return Poll::Ready(Woken::Watch);
                }
                // The sender is only ever dropped: any change is the close.
                closing.as_mut().poll(cx).map(|_| Woken::Closed)
            })
            .await
        };
        let read = match woken {
            Woken::Read(read) => read,
            Woken::Watch => {
                let next = shared.expire(Instant::now());
                timed = next.is_some();
                if let Some(next) = next {
                    timer.as_mut().reset(next);
                }
                continue;
            }
            Woken::Closed => return,
        };
        match read {
            Ok(0) => {
                tracing::debug!("redis wire closed by the server");
                return shared.fail();
            }
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(error = %err, "redis wire read failed");
                return shared.fail();
            }
        }
        loop {
            match frame_len(&buf) {
                Ok(Some(len)) => {
                    let frame = buf.split_to(len).freeze();
                    replies.push(parse(&frame, &mut 0));
                }
                Ok(None) => break,
                Err(malformed) => {
                    tracing::warn!(malformed, "redis wire read a malformed reply");
                    return shared.fail();
                }
            }
        }
        // After a large reply, a fresh buffer: one small slice still held
        // (a slow client's body) would keep the large one alive.
        if buf.is_empty() && buf.capacity() > 4 * READ_CHUNK {
            buf = BytesMut::with_capacity(READ_CHUNK);
        }
        if replies.is_empty() {
            continue;
        }
        {
            let mut state = shared.state();
            if state.waiting.len() < replies.len() {
                drop(state);
                tracing::warn!("redis wire read a reply nobody asked for");
                return shared.fail();
            }
            waiters.extend(state.waiting.drain(..replies.len()));
        }
        for (reply, waiter) in replies.drain(..).zip(waiters.drain(..)) {
            // A request that gave up has dropped its receiver; one whose
            // deadline passed has no sender left.
            if let Some(to) = waiter.reply {
                let _ = to.send(Ok(reply));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(raw: &[u8]) -> Vec<Reply> {
        let mut buf = BytesMut::from(raw);
        let mut out = Vec::new();
        while let Some(len) = frame_len(&buf).unwrap() {
            out.push(parse(&buf.split_to(len).freeze(), &mut 0));
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        out
    }

    #[test]
    fn replies_are_cut_out_whole() {
        let raw = b"+OK\r\n-WRONGTYPE Operation against a key\r\n:42\r\n$-1\r\n$5\r\nhe\r\no\r\n*-1\r\n*3\r\n$1\r\na\r\n$-1\r\n*1\r\n:-7\r\n$0\r\n\r\n";
        assert_eq!(
            parsed(raw),
            vec![
                Reply::Status(Bytes::from_static(b"OK")),
                Reply::Error(Bytes::from_static(b"WRONGTYPE Operation against a key")),
                Reply::Int(42),
                Reply::Nil,
                Reply::Bulk(Bytes::from_static(b"he\r\no")),
                Reply::Nil,
                Reply::Array(vec![
                    Reply::Bulk(Bytes::from_static(b"a")),
                    Reply::Nil,
                    Reply::Array(vec![Reply::Int(-7)]),
                ]),
                Reply::Bulk(Bytes::new()),
            ]
        );
        assert_eq!(
            parsed(b"-OOM command not allowed\r\n")[0].error_code(),
            Some(&b"OOM"[..])
        );
    }

    #[test]
    fn an_incomplete_reply_waits_for_the_rest() {
        let whole = b"*2\r\n$3\r\nabc\r\n$4\r\ndefg\r\n";
        for cut in 0..whole.len() {
            assert_eq!(frame_len(&whole[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(frame_len(whole), Ok(Some(whole.len())));
    }

    #[test]
    fn what_is_not_a_reply_is_refused() {
        assert!(frame_len(b"hello\r\n").is_err());
        assert!(frame_len(b"$3\r\nabcd\r\n").is_err());
        assert!(frame_len(b"$x\r\n").is_err());
        assert!(frame_len(b"$-2\r\n").is_err());
        assert!(frame_len(b"+O\rK\r\n").is_err());
        assert!(frame_len(b"$536870913\r\n").is_err());
        assert!(frame_len(b"$99999999999999999999\r\n").is_err());
        assert_eq!(decimal(b"9223372036854775807"), Ok(i64::MAX));
        assert!(frame_len(b"*999999999\r\n").is_err());
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        assert!(frame_len(deep.as_bytes()).is_err());
    }

    #[test]
    fn commands_are_encoded_as_resp_arrays() {
        let mut out = Vec::new();
        encode(&mut out, &[b"SET", b"k", b"", Decimal::new(60000).as_ref()]);
        encode(&mut out, &[b"GET", b"k"]);
        assert_eq!(
            out,
            b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n$5\r\n60000\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
        );
        for n in [9, 10, 42, 99, 100, 12345] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        assert_eq!(Decimal::new(0).as_ref(), b"0");
        assert_eq!(Decimal::new(u64::MAX).as_ref(), b"18446744073709551615");
    }

    /// A request that gave up (its future dropped) keeps its place: the
    /// reply meant for it is dropped, not handed to the next request.
    #[tokio::test]
    async fn a_dropped_request_keeps_its_place_in_line() {
        let (wire, mut server_read, mut server_write) = wire_to_a_server(1024);
        let a = wire.send(&[b"GET", b"a"], None);
        let b = wire.send(&[b"GET", b"b"], None);
        let c = wire.send(&[b"GET", b"c"], None);
        drop(b);
        let mut got = vec![0u8; 60];
        server_read.read_exact(&mut got).await.unwrap();
        server_write
            .write_all(b"$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n")
            .await
            .unwrap();
        assert_eq!(a.await.unwrap(), Reply::Bulk(Bytes::from_static(b"a")));
        assert_eq!(c.await.unwrap(), Reply::Bulk(Bytes::from_static(b"c")));
        let d = wire.send(&[b"GET", b"d"], None);
        let mut got = vec![0u8; 20];
        server_read.read_exact(&mut got).await.unwrap();
        server_write.write_all(b"$1\r\nd\r\n").await.unwrap();
        assert_eq!(d.await.unwrap(), Reply::Bulk(Bytes::from_static(b"d")));
    }

    /// Replies reach their own requests in order, whatever the reads cut
    /// them into; a closed connection fails what waits and what comes.
    #[tokio::test]
    async fn replies_reach_their_requests_and_a_lost_connection_fails_them() {
        let (wire, mut server_read, mut server_write) = wire_to_a_server(64);
        let first = wire.send(&[b"GET", b"a"], None);
        let second = wire.send(&[b"GET", b"b"], None);
        let mut got = vec![0u8; 40];
        server_read.read_exact(&mut got).await.unwrap();
        assert_eq!(
            got,
            b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*2\r\n$3\r\nGET\r\n$1\r\nb\r\n"
        );
        // Replies arrive in pieces smaller than one.
        for piece in [&b"$3\r\nx"[..], b"yz\r", b"\n$-1", b"\r\n"] {
            server_write.write_all(piece).await.unwrap();
            server_write.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        assert_eq!(
            first.await.unwrap(),
            Reply::Bulk(Bytes::from_static(b"xyz"))
        );
        assert_eq!(second.await.unwrap(), Reply::Nil);
        let pending = wire.send(&[b"GET", b"c"], None);
        drop((server_read, server_write));
        assert!(matches!(pending.await, Err(StoreError::Unreachable(_))));
        assert!(matches!(
            wire.send(&[b"GET", b"d"], None).await,
            Err(StoreError::Unreachable(_))
        ));
    }

    /// A request whose reply has not come by its deadline fails then, not
    /// sooner nor later; the others keep theirs, and the late reply is
    /// dropped, not handed to the next request.
    #[tokio::test(start_paused = true)]
    async fn a_request_fails_at_its_deadline_and_keeps_its_place() {
        let (wire, mut server_read, mut server_write) = wire_to_a_server(1024);
        let start = Instant::now();
        let ms = std::time::Duration::from_millis;
        let a = wire.send(&[b"GET", b"a"], Some(start + ms(100)));
        let mut b = wire.send(&[b"GET", b"b"], Some(start + ms(300)));
        let mut c = wire.send(&[b"GET", b"c"], None);
        let mut got = vec![0u8; 60];
        server_read.read_exact(&mut got).await.unwrap();
        assert_eq!(within_a_second(a).await, Err(StoreError::Timeout));
        assert_eq!(start.elapsed(), ms(100));
        // A reply before its deadline still reaches b, and c has none.
        tokio::time::sleep(ms(150)).await;
        assert!(futures_now(&mut b).is_none() && futures_now(&mut c).is_none());
        server_write
            .write_all(b"$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n")
            .await
            .unwrap();
        assert_eq!(
            within_a_second(b).await,
            Ok(Reply::Bulk(Bytes::from_static(b"b")))
        );
        assert_eq!(
            within_a_second(c).await,
            Ok(Reply::Bulk(Bytes::from_static(b"c")))
        );
    }

    /// The reader's one timer follows every deadline: one earlier than
    /// those already waiting, and one that comes after the connection sat
    /// idle (its timer gone off and not set again).
    #[tokio::test(start_paused = true)]
    async fn every_deadline_is_kept_whatever_the_order_it_comes_in() {
        let (wire, mut server_read, mut server_write) = wire_to_a_server(1024);
        let ms = std::time::Duration::from_millis;
        let start = Instant::now();
        let late = wire.send(&[b"GET", b"a"], Some(start + ms(300)));
        // The reader sets its timer for the first deadline meanwhile.
        tokio::time::sleep(ms(10)).await;
        let early = wire.send(&[b"GET", b"b"], Some(start + ms(50)));
        let mut got = vec![0u8; 40];
        server_read.read_exact(&mut got).await.unwrap();
        assert_eq!(within_a_second(early).await, Err(StoreError::Timeout));
        assert_eq!(start.elapsed(), ms(50));
        server_write
            .write_all(b"$1\r\na\r\n$1\r\nb\r\n")
            .await
            .unwrap();
        assert_eq!(
            within_a_second(late).await,
            Ok(Reply::Bulk(Bytes::from_static(b"a")))
        );
        // Idle well past every deadline: the timer went off with nothing left.
        tokio::time::sleep(ms(1000)).await;
        let start = Instant::now();
        let after = wire.send(&[b"GET", b"c"], Some(start + ms(80)));
        let mut got = vec![0u8; 20];
        server_read.read_exact(&mut got).await.unwrap();
        assert_eq!(within_a_second(after).await, Err(StoreError::Timeout));
        assert_eq!(start.elapsed(), ms(80));
    }

    /// A wire over an in-memory pipe of `capacity` bytes, and the server's
    /// ends of it.
    fn wire_to_a_server(
        capacity: usize,
    ) -> (
        Wire,
        tokio::io::ReadHalf<tokio::io::DuplexStream>,
        tokio::io::WriteHalf<tokio::io::DuplexStream>,
    ) {
        let (ours, theirs) = tokio::io::duplex(capacity);
        let (read, write) = tokio::io::split(ours);
        let (server_read, server_write) = tokio::io::split(theirs);
        (Wire::spawn(read, write), server_read, server_write)
    }

    /// `replied`'s outcome, which must come within a second.
    async fn within_a_second(replied: Replied) -> Result<Reply, StoreError> {
        tokio::time::timeout(std::time::Duration::from_secs(1), replied)
            .await
            .expect("no reply and no timeout within a second")
    }

    /// The reply `replied` has now, if any, without waiting.
    fn futures_now(replied: &mut Replied) -> Option<Result<Reply, StoreError>> {
        let waker = std::task::Waker::noop();
        match Pin::new(replied).poll(&mut Context::from_waker(waker)) {
            Poll::Ready(reply) => Some(reply),
            Poll::Pending => None,
        }
    }
}
