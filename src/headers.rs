//! The headers the layers add to the responses they pass: what the cache
//! did (`x-cache`, `cache-status`). Never stored in an entry.

use http::HeaderName;

/// Header telling whether the cache served the response: `HIT`, `MISS` or `BYPASS`.
pub const X_CACHE: &str = "x-cache";

/// [`X_CACHE`] as a header name: inserting by `&str` would parse (and, for a
/// name `http` does not know, allocate) on every response.
pub(crate) const X_CACHE_NAME: HeaderName = HeaderName::from_static(X_CACHE);

/// The RFC 9211 `cache-status` header.
pub(crate) const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
