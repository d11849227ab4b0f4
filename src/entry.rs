//! The stored form of a response: a small envelope, format byte first.
//!
//! ```text
//! 0x06 | binding [8] | status u16 | stored_at_ms u64 | ttl_s u32 | n u16 | (name_len u16, name, value_len u32, value)* | body_len u32 | body
//! 0x07 | (the same head)                                                   | coding u8 | body_len u32 | raw_len u32 | the body in that coding
//! 0x02 | nonce                               (a tombstone left by an invalidation)
//! 0x03 | nonce                               (a miss's lease)
//! ```
//!
//! The binding is a digest of the key and the request inputs the entry was
//! stored for (see `key::inputs`); a hit serves an entry only when it
//! matches. The headers are every end-to-end header of the response, in
//! order, repeats kept.
//!
//! `0x07` (feature `compression`) holds a body in a content coding (1: zstd,
//! 2: gzip): compressed by this crate when longer than the policy's
//! `compress_over`, or as a layer inside the cache encoded it. It is
//! decoded only for a client that does not accept the coding; the others
//! get it as stored. A build without the feature reads a `0x07` entry as
//! unreadable: a miss, then overwritten. The formats of earlier versions
//! (`0x01`, `0x05`: five named headers, no binding) read as unreadable too.
//!
//! Anything else — another format, truncated bytes, garbage — decodes to
//! [`Slot::Unreadable`] and is treated as a miss.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use sha2::Digest;

use crate::coding::{self, Coding};
use crate::key::{Binding, BINDING_LEN};

const FORMAT_ENTRY: u8 = 0x06;
pub(crate) const FORMAT_TOMBSTONE: u8 = 0x02;
pub(crate) const FORMAT_LEASE: u8 = 0x03;
// 0x04 is the Redis store's epoch stamp, around an entry.
const FORMAT_COMPRESSED: u8 = 0x07;
/// The entry formats of earlier versions, recognised as entries (a store
/// that stamps entries tells them from guards) but never served.
const FORMATS_BEFORE: [u8; 2] = [0x01, 0x05];

/// Whether a response header is stored with the entry and replayed on
/// hits: every end-to-end header but `Date` (each response has its own),
/// `Age` (computed per hit), `Content-Length` (set from the body), this
/// cache's own status headers, and the policy's per-response headers.
/// Hop-by-hop headers (RFC 9110 7.6.1: `Connection` and what it names,
/// `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`,
/// `Proxy-*`) belong to one connection and are never stored.
pub(crate) fn is_stored_header(
    name: &HeaderName,
    connection: &HeaderMap,
    per_response: &[HeaderName],
) -> bool {
    use http::header;
    const NOT_STORED: [HeaderName; 10] = [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::DATE,
        header::AGE,
        header::CONTENT_LENGTH,
        header::SET_COOKIE,
    ];
    if NOT_STORED.contains(name)
        || name.as_str().starts_with("proxy-")
        || name.as_str() == crate::headers::X_CACHE
        || *name == crate::headers::CACHE_STATUS
        || per_response.contains(name)
    {
        return false;
    }
    !connection
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|named| named.trim().eq_ignore_ascii_case(name.as_str()))
}

/// The headers of `source` an entry keeps, in order.
pub(crate) fn stored_headers(source: &HeaderMap, per_response: &[HeaderName]) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(source.len() + ADDED_HEADERS);
    for (name, value) in source {
        if is_stored_header(name, source, per_response) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

/// Bytes the stored headers take in an entry.
pub(crate) fn headers_len(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| 6 + n.as_str().len() + v.len())
        .sum()
}

/// Headers a hit adds to the stored ones: `content-length`, `age`,
/// `x-cache`, `cache-status`.
pub(crate) const ADDED_HEADERS: usize = 4;

/// The most headers a stored response may have.
pub(crate) const MAX_HEADERS: usize = u16::MAX as usize;

/// A decoded cached response.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    /// What the entry may be served for (see the module docs).
    pub(crate) binding: Binding,
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    /// The body as stored: in `coding` when set, else as the handler gave it.
    pub(crate) body: Bytes,
    /// The content coding of `body`, and its length once decoded.
    pub(crate) coding: Option<(Coding, u32)>,
    pub(crate) stored_at_ms: u64,
    pub(crate) ttl_s: u32,
}

/// What a stored value turned out to be.
#[derive(Debug)]
pub(crate) enum Slot {
    Entry(Entry),
    /// A purge's tombstone, or a miss's lease: a guard, not an entry.
    Tombstone,
    Unreadable,
}

impl Entry {
    /// An entry of a response whose stored headers are `headers` (see
    /// [`stored_headers`]), for requests with `binding`.
    pub(crate) fn new(
        binding: Binding,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        ttl: Duration,
        stored_at_ms: u64,
    ) -> Self {
        Self {
            binding,
            coding: None,
            status,
            headers,
            body,
            stored_at_ms,
            ttl_s: ttl.as_secs().min(u32::MAX as u64) as u32,
        }
    }

    /// The stored form, a body longer than `compress_over` compressed with
    /// zstd.
    #[cfg(test)]
    pub(crate) fn encode_over(&self, compress_over: usize) -> Bytes {
        let mut entry = self.clone();
        entry.compress(compress_over, Coding::Zstd);
        entry.encode()
    }

    /// Compresses the body in `coding` when it is longer than
    /// `compress_over` bytes, is in no coding yet, and compression makes it
    /// shorter (feature `compression`; without it, never). True when it did.
    pub(crate) fn compress(&mut self, compress_over: usize, coding: Coding) -> bool {
        if self.coding.is_some() || self.body.len() <= compress_over {
            return false;
        }
        match coding::compress(&self.body, coding) {
            Some(packed) => {
                self.coding = Some((coding, self.body.len() as u32));
                self.body = Bytes::from(packed);
                true
            }
            None => false,
        }
    }

    /// The stored form, the body as it is (in its coding, if any).
    pub(crate) fn encode(&self) -> Bytes {
        let body = &self.body;
        let mut out =
            BytesMut::with_capacity(32 + BINDING_LEN + headers_len(&self.headers) + body.len());
        out.put_u8(match self.coding {
            Some(_) => FORMAT_COMPRESSED,
            None => FORMAT_ENTRY,
        });
        out.put_slice(&self.binding);
        out.put_u16(self.status.as_u16());
        out.put_u64(self.stored_at_ms);
        out.put_u32(self.ttl_s);
        // A storable response has at most `MAX_HEADERS` headers, and header
        // names are far below u16::MAX bytes (`http` refuses longer ones).
        let count = self.headers.len().min(MAX_HEADERS);
        out.put_u16(count as u16);
        for (name, value) in self.headers.iter().take(count) {
            out.put_u16(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
            out.put_u32(value.len() as u32);
            out.put_slice(value.as_bytes());
        }
        if let Some((coding, _)) = self.coding {
            out.put_u8(coding.id());
        }
        out.put_u32(body.len() as u32);
        if let Some((_, raw_len)) = self.coding {
            out.put_u32(raw_len);
        }
        out.put_slice(body);
        out.freeze()
    }

    /// The entry with its body decoded (as it is when not in a coding);
    /// `None` when the stored stream does not decode to its stated length.
    pub(crate) fn identity(mut self) -> Option<Self> {
        if let Some((coding, raw_len)) = self.coding.take() {
            self.body = coding::decompress(&self.body, coding, raw_len as usize)?;
        }
        Some(self)
    }

    /// Seconds left at `now_ms` (see [`unix_ms`](crate::clock::unix_ms)) before the entry goes
    /// stale, negative once it has.
    pub(crate) fn remaining_ttl_s(&self, now_ms: u64) -> i64 {
        i64::from(self.ttl_s) - self.age_s(now_ms) as i64
    }

    /// True once the entry outlived its TTL at `now_ms` (served only within
    /// a stale-while-revalidate window).
    pub(crate) fn is_stale(&self, now_ms: u64) -> bool {
        now_ms >= self.fresh_until_ms()
    }

    pub(crate) fn fresh_until_ms(&self) -> u64 {
        self.stored_at_ms + u64::from(self.ttl_s) * 1000
    }

    pub(crate) fn age_s(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_at_ms) / 1000
    }
}

/// True when `raw` is in the entry format (whether or not it decodes).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn is_entry(raw: &[u8]) -> bool {
    matches!(raw.first(), Some(&(FORMAT_ENTRY | FORMAT_COMPRESSED)))
        || raw.first().is_some_and(|f| FORMATS_BEFORE.contains(f))
}

pub(crate) fn decode(mut raw: Bytes) -> Slot {
    match raw.first() {
        Some(&(FORMAT_ENTRY | FORMAT_COMPRESSED)) => {
            decode_entry(&mut raw).map_or(Slot::Unreadable, Slot::Entry)
        }
        Some(&FORMAT_TOMBSTONE | &FORMAT_LEASE) => Slot::Tombstone,
        _ => Slot::Unreadable,
    }
}

fn decode_entry(raw: &mut Bytes) -> Option<Entry> {
    if raw.remaining() < 1 + BINDING_LEN + 2 + 8 + 4 + 2 {
        return None;
    }
    let compressed = raw.get_u8() == FORMAT_COMPRESSED;
    let mut binding = [0; BINDING_LEN];
    raw.copy_to_slice(&mut binding);
    let status = StatusCode::from_u16(raw.get_u16()).ok()?;
    let stored_at_ms = raw.get_u64();
    let ttl_s = raw.get_u32();
    let count = usize::from(raw.get_u16());
    let mut headers = HeaderMap::with_capacity(count.min(64) + ADDED_HEADERS);
    for _ in 0..count {
        if raw.remaining() < 2 {
            return None;
        }
        let name_len = usize::from(raw.get_u16());
        if raw.remaining() < name_len + 4 {
            return None;
        }
        let name = HeaderName::from_bytes(&raw.split_to(name_len)).ok()?;
        let value_len = raw.get_u32() as usize;
        if raw.remaining() < value_len {
            return None;
        }
        let value = HeaderValue::from_maybe_shared(raw.split_to(value_len)).ok()?;
        headers.append(name, value);
    }
    let coding = match compressed {
        true => Some(Coding::from_id(*raw.first()?).filter(|_| cfg!(feature = "compression"))?),
        false => None,
    };
    if compressed {
        raw.advance(1);
    }
    if raw.remaining() < 4 {
        return None;
    }
    let body_len = raw.get_u32() as usize;
    let (body, coding) = match coding {
        None if raw.remaining() == body_len => (raw.split_off(0), None),
        Some(coding) if raw.remaining() >= 4 && raw.remaining() - 4 == body_len => {
            let raw_len = raw.get_u32();
            (raw.split_off(0), Some((coding, raw_len)))
        }
        _ => return None,
    };
    Some(Entry {
        binding,
        coding,
        status,
        headers,
        body,
        stored_at_ms,
        ttl_s,
    })
}

/// Gives a stored response a strong ETag from its body's SHA-256, unless
/// the application set one.
pub(crate) fn ensure_etag(headers: &mut HeaderMap, body: &[u8]) {
    if headers.contains_key(http::header::ETAG) {
        return;
    }
    let digest = sha2::Sha256::digest(body);
    let mut tag = String::with_capacity(34);
    tag.push('"');
    for byte in &digest[..16] {
        tag.push_str(&format!("{byte:02x}"));
    }
    tag.push('"');
    if let Ok(value) = HeaderValue::try_from(tag) {
        headers.insert(http::header::ETAG, value);
    }
}

/// Whether `If-None-Match` matches `etag` (weak comparison, RFC 9110
/// 13.1.2): `*`, or any listed tag equal to it once `W/` is set aside.
pub(crate) fn none_match(if_none_match: &HeaderValue, etag: &HeaderValue) -> bool {
    let (Ok(list), Ok(etag)) = (if_none_match.to_str(), etag.to_str()) else {
        return false;
    };
    let opaque = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    let etag = opaque(etag);
    list.split(',')
        .any(|tag| tag.trim() == "*" || opaque(tag) == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.insert("set-cookie", "a=b".parse().unwrap());
        Entry::new(
            [7; BINDING_LEN],
            StatusCode::OK,
            stored_headers(&headers, &[]),
            Bytes::from_static(b"{\"id\":1}"),
            Duration::from_secs(300),
            crate::clock::unix_ms(),
        )
    }

    #[test]
    fn every_end_to_end_header_is_kept_in_order_with_repeats() {
        let mut source = HeaderMap::new();
        for (name, value) in [
            ("content-type", "application/json"),
            ("vary", "x-tenant-id"),
            ("link", "</items?page=2>; rel=\"next\""),
            ("x-total-count", "42"),
            ("vary", "origin"),
            ("connection", "x-hop, keep-alive"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("proxy-authenticate", "Basic"),
            ("date", "Sat, 05 Dec 2026 06:00:00 GMT"),
            ("age", "3"),
            ("content-length", "2"),
            ("x-request-id", "abc"),
            ("x-cache", "MISS"),
        ] {
            source.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let kept = stored_headers(&source, &[HeaderName::from_static("x-request-id")]);
        let names: Vec<_> = kept
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        assert_eq!(
            names,
            [
                "content-type: application/json",
                "vary: x-tenant-id",
                "vary: origin",
                "link: </items?page=2>; rel=\"next\"",
                "x-total-count: 42",
            ]
        );
    }

    #[test]
    fn entries_of_earlier_formats_are_never_served() {
        let mut old = sample().encode().to_vec();
        for format in FORMATS_BEFORE {
            old[0] = format;
            assert!(is_entry(&old));
            assert!(matches!(decode(Bytes::from(old.clone())), Slot::Unreadable));
        }
    }

    #[test]
    fn round_trips_and_keeps_only_end_to_end_headers() {
        let entry = sample();
        assert!(entry.headers.get("set-cookie").is_none());
        match decode(entry.encode()) {
            Slot::Entry(decoded) => assert_eq!(decoded, entry),
            other => panic!("expected an entry, got {other:?}"),
        }
    }

    #[test]
    fn every_truncation_is_unreadable_not_a_panic() {
        let encoded = sample().encode();
        for cut in 0..encoded.len() {
            assert!(
                matches!(decode(encoded.slice(..cut)), Slot::Unreadable),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn garbage_and_other_formats_are_unreadable() {
        for raw in [&b"{\"id\":1}"[..], b"\x07abc", b"", b"\x01\xff\xff"] {
            assert!(matches!(
                decode(Bytes::copy_from_slice(raw)),
                Slot::Unreadable
            ));
        }
    }

    #[test]
    fn etags_compare_weakly() {
        let tag = HeaderValue::from_static("\"abc\"");
        for matching in ["\"abc\"", "W/\"abc\"", "*", "\"x\", W/\"abc\""] {
            assert!(
                none_match(&HeaderValue::from_str(matching).unwrap(), &tag),
                "{matching}"
            );
        }
        for other in ["\"abd\"", "\"x\", \"y\"", ""] {
            assert!(
                !none_match(&HeaderValue::from_str(other).unwrap(), &tag),
                "{other}"
            );
        }
        let mut headers = HeaderMap::new();
        ensure_etag(&mut headers, b"{}");
        let strong = headers[http::header::ETAG].to_str().unwrap();
        assert!(strong.starts_with('"') && strong.len() == 34, "{strong}");
    }

    #[cfg(feature = "compression")]
    fn json_list(items: usize) -> Bytes {
        let list: Vec<String> = (0..items)
            .map(|i| format!(r#"{{"id":{i},"name":"Person {i}","email":"person{i}@example.com"}}"#))
            .collect();
        Bytes::from(format!("[{}]", list.join(",")))
    }

    #[test]
    fn short_bodies_are_never_compressed() {
        let entry = sample();
        assert_eq!(entry.encode_over(entry.body.len()), entry.encode());
        // Compressing 8 bytes would make them longer: kept as they are.
        assert_eq!(entry.encode_over(0)[0], FORMAT_ENTRY);
    }

    #[cfg(feature = "compression")]
    #[test]
    fn long_bodies_are_compressed_and_read_back_whole() {
        let mut entry = sample();
        entry.body = json_list(100);
        let plain = entry.encode();
        for coding in [Coding::Zstd, Coding::Gzip] {
            let mut packed = entry.clone();
            assert!(packed.compress(1024, coding));
            let packed = packed.encode();
            assert_eq!(packed[0], FORMAT_COMPRESSED);
            assert!(
                packed.len() * 3 < plain.len(),
                "{} vs {}",
                packed.len(),
                plain.len()
            );
            for raw in [plain.clone(), packed.clone()] {
                match decode(raw) {
                    Slot::Entry(decoded) => assert_eq!(decoded.identity().unwrap(), entry),
                    other => panic!("expected an entry, got {other:?}"),
                }
            }
            let Slot::Entry(stored) = decode(packed.clone()) else {
                panic!("expected an entry");
            };
            assert_eq!(stored.coding, Some((coding, entry.body.len() as u32)));
            for cut in 0..packed.len() {
                assert!(
                    matches!(decode(packed.slice(..cut)), Slot::Unreadable),
                    "cut at {cut}"
                );
            }
            // A stream that decodes to another length than the entry says is
            // refused, not trusted.
            let Slot::Entry(stored) = decode(packed.clone()) else {
                panic!("expected an entry");
            };
            let raw_len_at = packed.len() - stored.body.len() - 4;
            for claimed in [entry.body.len() - 1, entry.body.len() + 1] {
                let mut lying = packed.to_vec();
                lying[raw_len_at..raw_len_at + 4].copy_from_slice(&(claimed as u32).to_be_bytes());
                match decode(Bytes::from(lying)) {
                    Slot::Entry(lying) => assert!(lying.identity().is_none(), "{claimed}"),
                    other => panic!("expected an entry, got {other:?}"),
                }
            }
        }
    }

    #[cfg(not(feature = "compression"))]
    #[test]
    fn without_the_feature_a_compressed_entry_is_a_miss() {
        let mut raw = sample().encode().to_vec();
        raw[0] = FORMAT_COMPRESSED;
        assert!(is_entry(&raw));
        assert!(matches!(decode(Bytes::from(raw)), Slot::Unreadable));
    }
}

/// Entries for the crate's own tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::time::Duration;

    use bytes::Bytes;

    /// A 200 JSON response with `body` as a stored entry, bound to no
    /// request (a hit never serves it).
    pub(crate) fn encode(body: Bytes) -> Bytes {
        entry([0; crate::key::BINDING_LEN], body).encode()
    }

    /// A 200 JSON response with `body` as the entry `policy` would serve
    /// to `request`; `None` when the request is not cached.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn encode_for<B>(
        policy: &crate::Policy,
        request: &http::Request<B>,
        body: Bytes,
    ) -> Option<Bytes> {
        match policy.plan(request) {
            crate::policy::Decision::Cache { binding, .. } => Some(entry(binding, body).encode()),
            _ => None,
        }
    }

    fn entry(binding: crate::key::Binding, body: Bytes) -> super::Entry {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        super::Entry::new(
            binding,
            http::StatusCode::OK,
            headers,
            body,
            Duration::from_secs(60),
            crate::clock::unix_ms(),
        )
    }

    /// True when `raw` decodes as an entry.
    pub(crate) fn is_entry(raw: Bytes) -> bool {
        matches!(super::decode(raw), super::Slot::Entry(_))
    }
}
