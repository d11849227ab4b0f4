//! What may be stored: the rules a response's head must pass, and the entry
//! a storable response becomes.

use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body::Body;

use crate::coding::etag_for;
use crate::entry::Entry;
use crate::key::Binding;
use crate::policy::{Despite, Policy};
use crate::reason::Reason;

/// Why a response with this head must not be stored, if it must not.
/// `scoped` says whether the key is already scoped by a request header;
/// `despite`, which directives the route stores anyway.
pub(crate) fn unstorable_reason(
    status: StatusCode,
    headers: &HeaderMap,
    scoped: impl Fn(&str) -> bool,
    despite: Despite,
) -> Option<Reason> {
    if status != StatusCode::OK {
        return Some(Reason::Status);
    }
    if !headers.get(header::CONTENT_TYPE).is_some_and(is_json) {
        return Some(Reason::NotJson);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Some(Reason::SetCookie);
    }
    let directives = comma_separated(headers, header::CACHE_CONTROL);
    if directives.iter().any(|d| {
        let name = d.split('=').next().unwrap_or("").trim();
        ["no-store", "no-cache", "private"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
    }) {
        return Some(Reason::CacheControl);
    }
    if refuses_reuse(&directives, headers, despite) {
        return Some(Reason::CacheControl);
    }
    if comma_separated(headers, header::VARY)
        .iter()
        .any(|v| v == "*" || !scoped(v))
    {
        return Some(Reason::Vary);
    }
    // A body a layer inside encoded is stored in its coding when this
    // build can decode it for the clients that do not accept it.
    if headers.get(header::CONTENT_ENCODING).is_some_and(|v| {
        !v.as_bytes().eq_ignore_ascii_case(b"identity")
            && (!cfg!(feature = "compression")
                || crate::coding::Coding::from_content_encoding(v).is_none())
    }) {
        return Some(Reason::ContentEncoding);
    }
    None
}

/// The entry of a storable response (status, `headers`, the whole `body`),
/// for requests with `binding`, and its stored form. A body a layer inside
/// the cache encoded (gzip, zstd) is stored in its coding, once it decoded
/// within the cap; another is compressed as the policy says. Sets the ETag
/// (and `Vary: accept-encoding` for an entry in a coding) on the
/// response's `headers` as on the entry's.
pub(crate) fn entry_of(
    policy: &Policy,
    binding: Binding,
    ttl: Duration,
    stored_at_ms: u64,
    status: StatusCode,
    headers: &mut HeaderMap,
    body: &Bytes,
) -> Result<(Entry, Bytes), Reason> {
    let per_response = policy.per_response();
    let encoded_by_inner = headers
        .get(header::CONTENT_ENCODING)
        .filter(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
        .map(crate::coding::Coding::from_content_encoding);
    let entry = match encoded_by_inner {
        Some(None) => return Err(Reason::ContentEncoding),
        Some(Some(coding)) => {
            let identity = crate::coding::decompress_capped(body, coding, policy.max_body_bytes())
                .ok_or(Reason::ContentEncoding)?;
            let mut stored = crate::entry::stored_headers(headers, per_response);
            stored.remove(header::CONTENT_ENCODING);
            crate::entry::ensure_etag(&mut stored, &identity);
            if !headers.contains_key(header::ETAG) {
                if let Some(tag) = stored.get(header::ETAG).and_then(|e| etag_for(e, coding)) {
                    headers.insert(header::ETAG, tag);
                }
            }
            let mut entry = Entry::new(binding, status, stored, body.clone(), ttl, stored_at_ms);
            entry.coding = Some((coding, identity.len() as u32));
            entry
        }
        None => {
            crate::entry::ensure_etag(headers, body);
            let stored = crate::entry::stored_headers(headers, per_response);
            let mut entry = Entry::new(binding, status, stored, body.clone(), ttl, stored_at_ms);
            entry.compress(policy.compress_over(), policy.coding());
            entry
        }
    };
    let mut entry = entry;
    if entry.coding.is_some() {
        vary_on_accept_encoding(&mut entry.headers);
        vary_on_accept_encoding(headers);
    }
    let encoded = entry.encode();
    Ok((entry, encoded))
}

/// Adds `accept-encoding` to `Vary`, unless it is there.
fn vary_on_accept_encoding(headers: &mut HeaderMap) {
    let named = comma_separated(headers, header::VARY)
        .iter()
        .any(|v| v == "*" || v.eq_ignore_ascii_case("accept-encoding"));
    if !named {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// The body length known from the head, before reading the body.
pub(crate) fn declared_length<B: Body>(response: &Response<B>) -> u64 {
    let header = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    header.max(response.body().size_hint().lower())
}

/// Whether the response says it must not be reused without asking the
/// origin again: no freshness for a shared cache (`s-maxage=0`, else
/// `max-age=0`), `must-revalidate` (or `proxy-revalidate`) with none, or
/// `Pragma: no-cache`; unless the route stores it despite that.
fn refuses_reuse(directives: &[String], headers: &HeaderMap, despite: Despite) -> bool {
    let seconds = |name: &str| {
        directives.iter().find_map(|d| {
            let (n, v) = d.split_once('=')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().trim_matches('"').parse::<u64>().unwrap_or(0))
        })
    };
    let named = |name: &str| {
        directives.iter().any(|d| {
            d.split('=')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case(name)
        })
    };
    let (s_maxage, max_age) = (seconds("s-maxage"), seconds("max-age"));
    // A shared cache reads `s-maxage` first.
    match (s_maxage, max_age) {
        (Some(0), _) if !despite.s_maxage_zero => return true,
        (None, Some(0)) if !despite.max_age_zero => return true,
        _ => {}
    }
    let fresh = s_maxage.or(max_age).is_some_and(|s| s > 0);
    if !fresh && !despite.must_revalidate && (named("must-revalidate") || named("proxy-revalidate"))
    {
        return true;
    }
    !despite.pragma_no_cache
        && comma_separated(headers, header::PRAGMA)
            .iter()
            .any(|p| p.eq_ignore_ascii_case("no-cache"))
}

fn comma_separated(headers: &HeaderMap, name: header::HeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect()
}

/// `application/json` or any `+json` type, parameters ignored.
fn is_json(value: &HeaderValue) -> bool {
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    !kind.is_empty() && (subtype == "json" && kind == "application" || subtype.ends_with("+json"))
}

/// The whole body, if it holds no more than `cap` bytes and no trailers.
pub(crate) async fn collect_capped<B: Body>(body: B, cap: usize) -> Result<Bytes, Reason> {
    let mut body = std::pin::pin!(body);
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        let Ok(frame) = frame else {
            return Err(Reason::BodyError);
        };
        let Ok(mut data) = frame.into_data() else {
            return Err(Reason::Trailers);
        };
        if out.len() + data.remaining() > cap {
            return Err(Reason::TooLarge);
        }
        out.extend_from_slice(&data.copy_to_bytes(data.remaining()));
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(status: u16, headers: &[(&str, &str)]) -> Option<Reason> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        unstorable_reason(
            StatusCode::from_u16(status).unwrap(),
            &map,
            |h| h.eq_ignore_ascii_case("x-tenant-id"),
            Despite::default(),
        )
    }

    const JSON: (&str, &str) = ("content-type", "application/json; charset=utf-8");

    #[test]
    fn storable_responses() {
        assert_eq!(reason(200, &[JSON]), None);
        assert_eq!(
            reason(200, &[("content-type", "application/problem+json")]),
            None
        );
        assert_eq!(reason(200, &[JSON, ("vary", "X-Tenant-Id")]), None);
        assert_eq!(
            reason(200, &[JSON, ("cache-control", "max-age=60, public")]),
            None
        );
        for fresh in [
            "max-age=0, s-maxage=30",
            "must-revalidate, max-age=60",
            "s-maxage=10, must-revalidate",
        ] {
            assert_eq!(
                reason(200, &[JSON, ("cache-control", fresh)]),
                None,
                "{fresh}"
            );
        }
    }

    #[test]
    fn a_route_stores_despite_the_directives_it_names() {
        let despite = Despite::parse(&[
            "max-age=0".to_owned(),
            "must-revalidate".to_owned(),
            "Pragma: no-cache".to_owned(),
        ])
        .unwrap();
        let of = |value: &str, name: &str| {
            let mut map = HeaderMap::new();
            map.insert(header::CONTENT_TYPE, JSON.1.parse().unwrap());
            map.insert(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
            unstorable_reason(StatusCode::OK, &map, |_| false, despite)
        };
        assert_eq!(of("max-age=0, must-revalidate", "cache-control"), None);
        assert_eq!(of("no-cache", "pragma"), None);
        assert_eq!(
            of("s-maxage=0", "cache-control"),
            Some(Reason::CacheControl),
            "not named"
        );
        assert_eq!(
            of("no-store", "cache-control"),
            Some(Reason::CacheControl),
            "always refused"
        );
        assert_eq!(
            Despite::parse(&["no-store".to_owned()]),
            Err("no-store".to_owned())
        );
    }

    #[test]
    fn unstorable_responses() {
        assert_eq!(reason(404, &[JSON]), Some(Reason::Status));
        assert_eq!(reason(500, &[JSON]), Some(Reason::Status));
        assert_eq!(reason(201, &[JSON]), Some(Reason::Status));
        assert_eq!(
            reason(200, &[("content-type", "text/html")]),
            Some(Reason::NotJson)
        );
        assert_eq!(
            reason(200, &[("content-type", "application/jsonx")]),
            Some(Reason::NotJson)
        );
        assert_eq!(reason(200, &[]), Some(Reason::NotJson));
        assert_eq!(
            reason(200, &[JSON, ("set-cookie", "a=b")]),
            Some(Reason::SetCookie)
        );
        assert_eq!(
            reason(200, &[JSON, ("cache-control", "no-store")]),
            Some(Reason::CacheControl)
        );
        assert_eq!(
            reason(200, &[JSON, ("cache-control", "max-age=5, Private")]),
            Some(Reason::CacheControl)
        );
        assert_eq!(reason(200, &[JSON, ("vary", "*")]), Some(Reason::Vary));
        assert_eq!(
            reason(200, &[JSON, ("vary", "accept-language")]),
            Some(Reason::Vary)
        );
        // A coding this build cannot decode is never stored; gzip and
        // zstd are, with the `compression` feature.
        assert_eq!(
            reason(200, &[JSON, ("content-encoding", "br")]),
            Some(Reason::ContentEncoding)
        );
        for refused in [
            "max-age=0",
            "public, max-age=0",
            "s-maxage=0, max-age=60",
            "must-revalidate",
            "no-transform, proxy-revalidate",
        ] {
            assert_eq!(
                reason(200, &[JSON, ("cache-control", refused)]),
                Some(Reason::CacheControl),
                "{refused}"
            );
        }
        assert_eq!(
            reason(200, &[JSON, ("pragma", "no-cache")]),
            Some(Reason::CacheControl)
        );
        let gzip = reason(200, &[JSON, ("content-encoding", "gzip")]);
        match cfg!(feature = "compression") {
            true => assert_eq!(gzip, None),
            false => assert_eq!(gzip, Some(Reason::ContentEncoding)),
        }
    }
}
