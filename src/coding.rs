//! Content codings of stored bodies (feature `compression`): zstd or gzip,
//! what a request accepts, and the (de)compression itself.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

/// The content coding a compressed entry is stored in, and sent in to the
/// clients that accept it (`Accept-Encoding`).
///
/// ```
/// # #[cfg(feature = "compression")] {
/// use tower_redis_cache::{Coding, Policy};
///
/// // Every HTTP client speaks gzip; browsers speak zstd since 2024.
/// let policy = Policy::builder().compress_with(Coding::Gzip).build()?;
/// # let _ = policy;
/// # }
/// # Ok::<(), tower_redis_cache::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
#[cfg_attr(not(feature = "compression"), allow(dead_code, unreachable_pub))]
pub enum Coding {
    /// Zstandard (`zstd`): the fastest to decompress for the clients that
    /// do not accept it. The default.
    Zstd,
    /// `gzip`, which every HTTP client accepts.
    Gzip,
}

impl Coding {
    /// The byte that names the coding in an entry.
    pub(crate) fn id(self) -> u8 {
        match self {
            Coding::Zstd => 1,
            Coding::Gzip => 2,
        }
    }

    pub(crate) fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(Coding::Zstd),
            2 => Some(Coding::Gzip),
            _ => None,
        }
    }

    /// The coding's name in `Content-Encoding`, and its header value.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Coding::Zstd => "zstd",
            Coding::Gzip => "gzip",
        }
    }

    pub(crate) fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.name())
    }

    /// The coding a `Content-Encoding` value names, when it is one this
    /// crate can decode.
    #[cfg_attr(not(feature = "compression"), allow(dead_code))]
    pub(crate) fn from_content_encoding(value: &HeaderValue) -> Option<Self> {
        let value = value.to_str().ok()?.trim();
        if value.eq_ignore_ascii_case("zstd") {
            Some(Coding::Zstd)
        } else if value.eq_ignore_ascii_case("gzip") || value.eq_ignore_ascii_case("x-gzip") {
            Some(Coding::Gzip)
        } else {
            None
        }
    }
}

/// The codings a request accepts (`Accept-Encoding`, q above 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Accepts(u8);

impl Accepts {
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let mut accepts = 0u8;
        for value in headers.get_all(http::header::ACCEPT_ENCODING) {
            let Ok(value) = value.to_str() else { continue };
            for item in value.split(',') {
                let mut parts = item.split(';');
                let name = parts.next().unwrap_or("").trim();
                let refused = parts.any(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .and_then(|q| q.trim().parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                let bits = match name {
                    _ if name.eq_ignore_ascii_case("zstd") => 1 << Coding::Zstd.id(),
                    _ if name.eq_ignore_ascii_case("gzip") => 1 << Coding::Gzip.id(),
                    "*" => (1 << Coding::Zstd.id()) | (1 << Coding::Gzip.id()),
                    _ => 0,
                };
                match refused {
                    true => accepts &= !bits,
                    false => accepts |= bits,
                }
            }
        }
        Self(accepts)
    }

    pub(crate) fn accepts(self, coding: Coding) -> bool {
        self.0 & (1 << coding.id()) != 0
    }
}

/// `etag` for the representation in `coding`: a strong tag must differ
/// between representations, so `"abc"` becomes `"abc-gzip"`.
pub(crate) fn etag_for(etag: &HeaderValue, coding: Coding) -> Option<HeaderValue> {
    let open = etag.as_bytes().strip_suffix(b"\"")?;
    let name = coding.name().as_bytes();
    let mut tag = bytes::BytesMut::with_capacity(open.len() + name.len() + 2);
    tag.extend_from_slice(open);
    tag.extend_from_slice(b"-");
    tag.extend_from_slice(name);
    tag.extend_from_slice(b"\"");
    HeaderValue::from_maybe_shared(tag.freeze()).ok()
}

/// The zstd level of compressed entries: fast to write, and decoding speed
/// barely depends on it.
#[cfg(feature = "compression")]
pub(crate) const ZSTD_LEVEL: i32 = 3;

// A zstd context costs far more to set up than a few KiB cost to
// (de)compress: each thread keeps one of each.
#[cfg(feature = "compression")]
thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// `body` in `coding`, when that makes it shorter.
#[cfg(feature = "compression")]
pub(crate) fn compress(body: &[u8], coding: Coding) -> Option<Vec<u8>> {
    let compressed = match coding {
        Coding::Zstd => COMPRESSOR.with(|cell| {
            let mut cell = cell.try_borrow_mut().ok()?;
            if cell.is_none() {
                *cell = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
            }
            cell.as_mut()?.compress(body).ok()
        })?,
        Coding::Gzip => {
            use std::io::Write;
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 4),
                flate2::Compression::default(),
            );
            encoder.write_all(body).ok()?;
            encoder.finish().ok()?
        }
    };
    (compressed.len() < body.len()).then_some(compressed)
}

#[cfg(not(feature = "compression"))]
pub(crate) fn compress(_: &[u8], _: Coding) -> Option<Vec<u8>> {
    None
}

/// `data` decoded from `coding`, which must be exactly `raw_len` bytes
/// (`None`: not exactly, or not a valid stream).
#[cfg(feature = "compression")]
pub(crate) fn decompress(data: &[u8], coding: Coding, raw_len: usize) -> Option<Bytes> {
    let body = match coding {
        Coding::Zstd => DECOMPRESSOR.with(|cell| {
            let mut cell = cell.try_borrow_mut().ok()?;
            if cell.is_none() {
                *cell = zstd::bulk::Decompressor::new().ok();
            }
            cell.as_mut()?.decompress(data, raw_len).ok()
        })?,
        Coding::Gzip => decode_gzip(data, raw_len)?,
    };
    (body.len() == raw_len).then(|| Bytes::from(body))
}

/// `data` decoded from `coding`, up to `cap` bytes (`None` past it): for a
/// body a layer inside the cache encoded, whose length is not known.
#[cfg(feature = "compression")]
pub(crate) fn decompress_capped(data: &[u8], coding: Coding, cap: usize) -> Option<Bytes> {
    match coding {
        Coding::Zstd => {
            use std::io::Read;
            let mut out = Vec::new();
            let decoder = zstd::stream::read::Decoder::new(data).ok()?;
            decoder.take(cap as u64 + 1).read_to_end(&mut out).ok()?;
            (out.len() <= cap).then(|| Bytes::from(out))
        }
        Coding::Gzip => decode_gzip(data, cap).map(Bytes::from),
    }
}

/// A gzip stream decoded, up to `cap` bytes.
#[cfg(feature = "compression")]
fn decode_gzip(data: &[u8], cap: usize) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(cap.min(1 << 20));
    flate2::read::GzDecoder::new(data)
        .take(cap as u64 + 1)
        .read_to_end(&mut out)
        .ok()?;
    (out.len() <= cap).then_some(out)
}

#[cfg(not(feature = "compression"))]
pub(crate) fn decompress(_: &[u8], _: Coding, _: usize) -> Option<Bytes> {
    None
}

#[cfg(not(feature = "compression"))]
pub(crate) fn decompress_capped(_: &[u8], _: Coding, _: usize) -> Option<Bytes> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(value: &str) -> Accepts {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::ACCEPT_ENCODING, value.parse().unwrap());
        Accepts::of(&headers)
    }

    #[test]
    fn accepted_codings_follow_their_q_values() {
        assert!(accepts("gzip, deflate, br").accepts(Coding::Gzip));
        assert!(!accepts("gzip, deflate, br").accepts(Coding::Zstd));
        assert!(accepts("zstd;q=0.5").accepts(Coding::Zstd));
        assert!(!accepts("zstd;q=0").accepts(Coding::Zstd));
        assert!(accepts("*").accepts(Coding::Zstd));
        assert!(!accepts("*, gzip;q=0").accepts(Coding::Gzip));
        assert!(!Accepts::of(&HeaderMap::new()).accepts(Coding::Gzip));
    }

    #[test]
    fn etags_differ_per_coding() {
        let tag = HeaderValue::from_static("\"abc\"");
        assert_eq!(etag_for(&tag, Coding::Gzip).unwrap(), "\"abc-gzip\"");
        let weak = HeaderValue::from_static("W/\"abc\"");
        assert_eq!(etag_for(&weak, Coding::Zstd).unwrap(), "W/\"abc-zstd\"");
    }

    #[cfg(feature = "compression")]
    #[test]
    fn both_codings_round_trip() {
        let body = br#"{"items":[1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,6,7,8,9,10]}"#.repeat(20);
        for coding in [Coding::Zstd, Coding::Gzip] {
            let packed = compress(&body, coding).unwrap();
            assert!(packed.len() < body.len());
            assert_eq!(decompress(&packed, coding, body.len()).unwrap(), body);
            assert_eq!(decompress(&packed, coding, body.len() - 1), None);
            assert_eq!(
                decompress_capped(&packed, coding, body.len()).unwrap(),
                body
            );
            assert_eq!(decompress_capped(&packed, coding, body.len() - 1), None);
            assert_eq!(decompress(b"garbage", coding, 10), None);
        }
    }
}
